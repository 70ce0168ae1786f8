//! Snapshot requests as a CHP client sends them (ICANHAZ? on a DEALER to P), used to
//! wake a lone server (a request is what makes a lone primary active) and to time a
//! whole-map snapshot.

use std::time::{Duration, Instant};

use clonekv_zmq::core::kvmsg::{SnapshotRequest, KTHXBAI};

use super::traffic::{RouteCurve, Shape};
use super::BenchError;

/// A DEALER to a server's snapshot ROUTER.
fn dealer(
    context: &zmq::Context,
    endpoint: &str,
    curve: Option<&RouteCurve>,
) -> Result<zmq::Socket, BenchError> {
    let socket = context
        .socket(zmq::DEALER)
        .map_err(|error| BenchError::new(format!("cannot create a DEALER: {error}")))?;
    RouteCurve::apply(curve, &socket)?;
    socket
        .set_linger(0)
        .and_then(|()| socket.connect(endpoint))
        .map_err(|error| BenchError::new(format!("cannot connect to {endpoint}: {error}")))?;
    Ok(socket)
}

fn send_request(socket: &zmq::Socket, subtree: &[u8]) -> Result<(), BenchError> {
    let frames = SnapshotRequest::new(subtree.to_vec()).encode();
    socket
        .send_multipart(frames, 0)
        .map_err(|error| BenchError::new(format!("cannot send ICANHAZ?: {error}")))
}

/// Asks for an (empty) snapshot until one is answered: a server that answers is active.
/// A lone primary becomes active on the first request after its peer has been silent
/// for its peer expiry; a passive never answers.
pub fn wait_active(
    endpoint: &str,
    patience: Duration,
    curve: Option<&RouteCurve>,
) -> Result<Duration, BenchError> {
    let context = zmq::Context::new();
    let began = Instant::now();
    while began.elapsed() < patience {
        // A fresh DEALER per attempt: a late reply to an earlier request is never read.
        let socket = dealer(&context, endpoint, curve)?;
        // `HUGZ` is a reserved key: the snapshot of that subtree is empty.
        send_request(&socket, clonekv_zmq::core::kvmsg::HUGZ)?;
        let attempt = Instant::now();
        while attempt.elapsed() < Duration::from_millis(300) {
            if socket
                .poll(zmq::POLLIN, 50)
                .map_err(|error| BenchError::new(format!("poll: {error}")))?
                > 0
            {
                let frames = socket
                    .recv_multipart(0)
                    .map_err(|error| BenchError::new(format!("receive: {error}")))?;
                if frames.first().map(Vec::as_slice) == Some(KTHXBAI) {
                    return Ok(began.elapsed());
                }
            }
        }
    }
    Err(BenchError::new(format!(
        "{endpoint} did not answer a snapshot request within {patience:?}"
    )))
}

/// A received snapshot.
#[derive(Clone, Debug)]
pub struct SnapshotResult {
    pub elapsed: Duration,
    /// KVSYNC entries received.
    pub entries: u64,
    /// Bytes of every frame received, KTHXBAI included.
    pub bytes: u64,
    /// True when the KTHXBAI arrived.
    pub ended: bool,
    /// Of the keys `0..expected` (bench keys), how many were in it.
    pub expected_present: u64,
}

/// Requests the snapshot of `subtree` (the run's prefix: every key the bench wrote) and
/// receives it to the end, timing from the request to the KTHXBAI. The DEALER keeps
/// libzmq's default high-water mark (1000), as a client does.
pub fn take(
    endpoint: &str,
    shape: &Shape,
    expected: u64,
    patience: Duration,
    mut progress: impl FnMut(u64),
) -> Result<SnapshotResult, BenchError> {
    let context = zmq::Context::new();
    let socket = dealer(&context, endpoint, None)?;
    let mut present = vec![false; expected as usize];
    let began = Instant::now();
    send_request(&socket, shape.prefix.as_bytes())?;
    let mut entries = 0u64;
    let mut bytes = 0u64;
    let mut ended = false;
    let mut frames: [zmq::Message; 5] = std::array::from_fn(|_| zmq::Message::new());
    let mut last_arrival = Instant::now();
    while last_arrival.elapsed() < patience {
        if socket
            .poll(zmq::POLLIN, 100)
            .map_err(|error| BenchError::new(format!("poll: {error}")))?
            == 0
        {
            continue;
        }
        loop {
            let mut count = 0;
            let mut size = 0u64;
            loop {
                let slot = count.min(frames.len() - 1);
                let flags = if count == 0 { zmq::DONTWAIT } else { 0 };
                match socket.recv(&mut frames[slot], flags) {
                    Ok(()) => {}
                    Err(zmq::Error::EAGAIN) if count == 0 => break,
                    Err(error) => return Err(BenchError::new(format!("receive: {error}"))),
                }
                size += frames[slot].len() as u64;
                count += 1;
                if !frames[slot].get_more() {
                    break;
                }
            }
            if count == 0 {
                break;
            }
            last_arrival = Instant::now();
            bytes += size;
            if &frames[0][..] == KTHXBAI {
                ended = true;
                break;
            }
            entries += 1;
            if entries.is_multiple_of(65_536) {
                progress(entries);
            }
            if let Some(index) = shape.key_index(&frames[0]) {
                if let Some(slot) = present.get_mut(index as usize) {
                    *slot = true;
                }
            }
        }
        if ended {
            break;
        }
    }
    Ok(SnapshotResult {
        elapsed: began.elapsed(),
        entries,
        bytes,
        ended,
        expected_present: present.iter().filter(|&&p| p).count() as u64,
    })
}

/// Entries in the snapshot of `subtree`: all of them when the reply ends (KTHXBAI), at
/// least these when it stops short (the zguide C server drops what does not fit its
/// high-water mark, the KTHXBAI too). Fails if nothing at all arrives within `patience`.
pub fn count(endpoint: &str, subtree: &[u8], patience: Duration) -> Result<u64, BenchError> {
    let context = zmq::Context::new();
    let socket = dealer(&context, endpoint, None)?;
    // No limit on this side: whatever the server sends is taken.
    socket
        .set_rcvhwm(0)
        .map_err(|error| BenchError::new(format!("cannot configure a DEALER: {error}")))?;
    send_request(&socket, subtree)?;
    let mut entries = 0;
    let mut wait = patience;
    loop {
        let millis = i64::try_from(wait.as_millis()).unwrap_or(i64::MAX);
        if socket
            .poll(zmq::POLLIN, millis)
            .map_err(|error| BenchError::new(format!("poll: {error}")))?
            == 0
        {
            if entries > 0 {
                return Ok(entries);
            }
            return Err(BenchError::new(format!(
                "{endpoint} did not answer a snapshot request for {} within {patience:?}",
                String::from_utf8_lossy(subtree)
            )));
        }
        let frames = socket
            .recv_multipart(0)
            .map_err(|error| BenchError::new(format!("receive: {error}")))?;
        if frames.first().map(Vec::as_slice) == Some(KTHXBAI) {
            return Ok(entries);
        }
        entries += 1;
        // A reply flows without pauses: a long one means it was cut short.
        wait = Duration::from_secs(2);
    }
}
