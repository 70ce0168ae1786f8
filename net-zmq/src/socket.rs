//! A libzmq socket registered with mio, with the edge-triggered readiness rules built in.
//!
//! libzmq exposes one file descriptor per socket (`ZMQ_FD`) that signals *edges*: it
//! becomes readable when the socket's state may have changed, not while messages are
//! waiting. So after every wakeup, and after every send or receive on the socket, the
//! caller must ask `ZMQ_EVENTS` again and keep receiving until `POLLIN` is gone;
//! reading one message per wakeup hangs, and replying without re-checking loses wakeups.
//! [`ZmqSocket::try_recv`] and [`ZmqSocket::try_recv_into`] are the only ways to read;
//! the event loop calls them until they report nothing waiting for every socket.
//! `try_recv` asks `ZMQ_EVENTS` first; `try_recv_into` (the server's hot path) relies on
//! a non-blocking receive instead, which tells the same thing: on `EAGAIN` libzmq has
//! just processed the socket's pending commands, exactly as a `ZMQ_EVENTS` query does.

use std::io;

use mio::unix::SourceFd;
use mio::{Interest, Registry, Token};

use clonekv_core::kvmsg::{Limits, FRAME_COUNT};

use crate::ffi::HandledSocket;

/// What happened to a non-blocking send.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SendOutcome {
    /// The message is queued in libzmq.
    Sent,
    /// The peer's pipe is at its high-water mark (`EAGAIN`): try again later.
    WouldBlock,
    /// A ROUTER with `ZMQ_ROUTER_MANDATORY` has no peer with that routing id
    /// (`EHOSTUNREACH`): it disconnected.
    Unreachable,
}

/// Frames kept of one received message, at most: the protocol's five and a ROUTER's
/// routing id, plus one so that the decoder still sees a message that had too many.
pub const MAX_STORED_FRAMES: usize = FRAME_COUNT + 2;

/// The largest frame a valid message can carry under `limits` (a body, a properties
/// frame or a key), as libzmq's `ZMQ_MAXMSGSIZE` takes it: set on every receiving
/// socket, so that libzmq refuses a longer frame (and drops its sender) before it
/// allocates it; without it a peer that announces a 100 MiB frame gets 100 MiB.
pub fn largest_legal_frame(limits: &Limits) -> i64 {
    let largest = limits
        .max_body_len
        .max(limits.max_properties_len)
        .max(limits.max_key_len)
        .max(16);
    i64::try_from(largest).unwrap_or(i64::MAX)
}

/// Bytes libzmq holds for one queued message at most under `limits`: every frame at
/// its limit (key, sequence, uuid, properties, body, and a routing id of up to 255
/// bytes), plus, per frame of a message of [`MAX_STORED_FRAMES`], libzmq's 64-byte
/// `zmq_msg_t` and 9 bytes of ZMTP framing.
pub fn largest_queued_message(limits: &Limits) -> usize {
    let frames = [
        limits.max_key_len,
        8,
        16,
        limits.max_properties_len,
        limits.max_body_len,
        255,
    ];
    frames
        .iter()
        .fold(MAX_STORED_FRAMES * (64 + 9), |sum, frame| {
            sum.saturating_add(*frame)
        })
}

/// The high-water mark (messages) that keeps one pipe of a streaming socket within
/// `queue_bytes` when every message is the largest `limits` allow: libzmq counts
/// messages, not bytes, so the count is the budget divided by the largest message. At
/// least 1 (0 would mean no limit).
pub fn hwm_for_queue_bytes(queue_bytes: usize, limits: &Limits) -> i32 {
    let messages = queue_bytes / largest_queued_message(limits).max(1);
    i32::try_from(messages.max(1)).unwrap_or(i32::MAX)
}

/// One libzmq socket and its mio registration.
pub struct ZmqSocket {
    socket: HandledSocket,
    name: &'static str,
}

impl ZmqSocket {
    /// A socket of `kind` in `context`; `name` appears in logs and errors.
    pub fn new(
        context: &zmq::Context,
        kind: zmq::SocketType,
        name: &'static str,
    ) -> Result<ZmqSocket, zmq::Error> {
        let socket = context.socket(kind)?;
        // Never block at shutdown on unsent messages.
        socket.set_linger(0)?;
        let socket = HandledSocket::new(socket).ok_or(zmq::Error::EFAULT)?;
        Ok(ZmqSocket { socket, name })
    }

    /// The libzmq socket, for options, bind and connect.
    pub fn inner(&self) -> &zmq::Socket {
        self.socket.socket()
    }

    /// The name given at creation.
    pub fn name(&self) -> &'static str {
        self.name
    }

    /// Registers the socket's `ZMQ_FD` with mio. It is only ever registered for
    /// READABLE: libzmq signals writability through the same fd and `ZMQ_EVENTS`.
    pub fn register(&self, registry: &Registry, token: Token) -> io::Result<()> {
        let fd = self.socket.socket().get_fd().map_err(io::Error::other)?;
        registry.register(&mut SourceFd(&fd), token, Interest::READABLE)
    }

    /// Removes the mio registration.
    pub fn deregister(&self, registry: &Registry) -> io::Result<()> {
        let fd = self.socket.socket().get_fd().map_err(io::Error::other)?;
        registry.deregister(&mut SourceFd(&fd))
    }

    /// The next whole message if one is waiting, without blocking.
    pub fn try_recv(&self) -> Result<Option<Vec<Vec<u8>>>, zmq::Error> {
        self.try_recv_up_to(MAX_STORED_FRAMES)
    }

    /// [`ZmqSocket::try_recv`], keeping at most `max_frames` frames of the message (the
    /// rest are read and let go).
    pub fn try_recv_up_to(&self, max_frames: usize) -> Result<Option<Vec<Vec<u8>>>, zmq::Error> {
        if !self.socket.socket().get_events()?.contains(zmq::POLLIN) {
            return Ok(None);
        }
        let socket = self.socket.socket();
        let mut frames = Vec::new();
        let mut part = zmq::Message::new();
        loop {
            let flags = if frames.is_empty() { zmq::DONTWAIT } else { 0 };
            match socket.recv(&mut part, flags) {
                Ok(()) => {}
                Err(zmq::Error::EAGAIN) if frames.is_empty() => return Ok(None),
                Err(error) => return Err(error),
            }
            // Past the most any message may have, frames are read and let go: the
            // decoder rejects the message for its count all the same.
            if frames.len() < max_frames {
                frames.push(part.to_vec());
            }
            if !part.get_more() {
                return Ok(Some(frames));
            }
        }
    }

    /// The next whole message, if one is waiting, received into `frames` without
    /// allocating or copying: each frame keeps libzmq's own buffer, and the buffers of
    /// the previous message are reused. Returns false when nothing is waiting (see the
    /// module docs for why no `ZMQ_EVENTS` query is needed).
    pub fn try_recv_into(&self, frames: &mut Frames) -> Result<bool, zmq::Error> {
        frames.len = 0;
        loop {
            // Past the most any message may have, the last slot is reused: the frames
            // are read and let go, and the decoder still sees one too many.
            if frames.len == frames.slots.len() && frames.len < MAX_STORED_FRAMES {
                frames.slots.push(Frame(zmq::Message::new()));
            }
            let index = frames.len.min(MAX_STORED_FRAMES - 1);
            let Some(Frame(slot)) = frames.slots.get_mut(index) else {
                // Unreachable: a slot was just pushed if none was left.
                return Ok(frames.len > 0);
            };
            // Only the first frame can be missing; the rest of a message arrives with it.
            let flags = if frames.len == 0 { zmq::DONTWAIT } else { 0 };
            match self.socket.socket().recv(slot, flags) {
                Ok(()) => {}
                Err(zmq::Error::EAGAIN) if frames.len == 0 => return Ok(false),
                Err(error) => return Err(error),
            }
            let more = slot.get_more();
            frames.len = (frames.len + 1).min(MAX_STORED_FRAMES);
            if !more {
                return Ok(true);
            }
        }
    }

    /// True when a message could be sent now without blocking.
    pub fn is_writable(&self) -> Result<bool, zmq::Error> {
        Ok(self.socket.socket().get_events()?.contains(zmq::POLLOUT))
    }

    /// Sends one multi-frame message without blocking. libzmq queues all parts of a
    /// message or none, and only the first part can hit the high-water mark.
    pub fn send<F: AsRef<[u8]>>(&self, frames: &[F]) -> Result<SendOutcome, zmq::Error> {
        self.send_reusing(frames, None)
    }

    /// [`ZmqSocket::send`], except that `last`, when given, is sent in place of the
    /// last of `frames`: a frame received earlier that holds the same bytes (checked
    /// by the caller, see [`Frames::take_if_equal`]). libzmq then passes its buffer on
    /// by reference, as a proxy does, instead of allocating and copying a new one.
    pub fn send_reusing<F: AsRef<[u8]>>(
        &self,
        frames: &[F],
        mut last: Option<zmq::Message>,
    ) -> Result<SendOutcome, zmq::Error> {
        let final_index = frames.len().saturating_sub(1);
        for (index, frame) in frames.iter().enumerate() {
            let flags = if index < final_index {
                zmq::DONTWAIT | zmq::SNDMORE
            } else {
                zmq::DONTWAIT
            };
            let sent = match last.take() {
                Some(message) if index == final_index => self.socket.socket().send(message, flags),
                other => {
                    last = other;
                    // Copied into libzmq in one call (see `ffi`); frames of up to 33
                    // bytes (keys, sequences, uuids, most properties frames, empty
                    // bodies) go inline in libzmq's message, without an allocation.
                    self.socket.send_copy(frame.as_ref(), flags)
                }
            };
            match sent {
                Ok(()) => {}
                Err(zmq::Error::EAGAIN) if index == 0 => return Ok(SendOutcome::WouldBlock),
                Err(zmq::Error::EHOSTUNREACH) if index == 0 => return Ok(SendOutcome::Unreachable),
                Err(error) => return Err(error),
            }
        }
        Ok(SendOutcome::Sent)
    }
}

/// One received frame, in libzmq's own buffer.
pub struct Frame(zmq::Message);

impl AsRef<[u8]> for Frame {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

/// The frames of the last message [`ZmqSocket::try_recv_into`] received; reused from
/// one message to the next.
#[derive(Default)]
pub struct Frames {
    slots: Vec<Frame>,
    len: usize,
}

impl Frames {
    /// The frames of the last message received.
    pub fn get(&self) -> &[Frame] {
        self.slots.get(..self.len).unwrap_or_default()
    }

    /// Takes frame `index` of the last message out (leaving an empty frame in its
    /// place) if it holds exactly `bytes` and is longer than libzmq copies inline: a
    /// frame that is about to be sent again need not be copied.
    pub fn take_if_equal(&mut self, index: usize, bytes: &[u8]) -> Option<zmq::Message> {
        let Frame(message) = self.slots.get_mut(..self.len)?.get_mut(index)?;
        if bytes.len() <= INLINE_SIZE || **message != *bytes {
            return None;
        }
        Some(std::mem::replace(message, zmq::Message::new()))
    }
}

/// libzmq keeps messages up to this size inside the message itself (`ZMQ_MAX_VSM_SIZE`):
/// copying one costs no allocation, so it is not worth passing on by reference.
const INLINE_SIZE: usize = 33;

#[cfg(test)]
mod tests {
    use super::*;
    use mio::{Events, Poll};
    use std::time::Duration;

    fn pair(context: &zmq::Context, endpoint: &str) -> (ZmqSocket, ZmqSocket) {
        let pull = ZmqSocket::new(context, zmq::PULL, "pull").unwrap();
        pull.inner().bind(endpoint).unwrap();
        let push = ZmqSocket::new(context, zmq::PUSH, "push").unwrap();
        push.inner().connect(endpoint).unwrap();
        (pull, push)
    }

    #[test]
    fn one_wakeup_drains_every_waiting_message() {
        let context = zmq::Context::new();
        let (pull, push) = pair(&context, "inproc://drain");
        let mut poll = Poll::new().unwrap();
        pull.register(poll.registry(), Token(0)).unwrap();
        for n in 0..5u8 {
            assert_eq!(push.send(&[[n], [n]]).unwrap(), SendOutcome::Sent);
        }
        let mut events = Events::with_capacity(4);
        let mut received = Vec::new();
        while received.len() < 5 {
            poll.poll(&mut events, Some(Duration::from_secs(5)))
                .unwrap();
            while let Some(frames) = pull.try_recv().unwrap() {
                received.push(frames);
            }
        }
        assert_eq!(received.len(), 5);
        assert_eq!(received[4], vec![vec![4], vec![4]]);
        assert_eq!(pull.try_recv().unwrap(), None);
    }

    #[test]
    fn receiving_into_reused_frames_sees_every_message_whole() {
        let context = zmq::Context::new();
        let (pull, push) = pair(&context, "inproc://into");
        let mut poll = Poll::new().unwrap();
        pull.register(poll.registry(), Token(0)).unwrap();
        // Messages of different lengths, so a reused slot must not keep old frames.
        push.send(&[&b"a"[..], b"bb", b"ccc"]).unwrap();
        push.send(&[&b"d"[..]]).unwrap();
        push.send(&[&b"e"[..], b""]).unwrap();
        let mut frames = Frames::default();
        let mut received: Vec<Vec<Vec<u8>>> = Vec::new();
        let mut events = Events::with_capacity(4);
        while received.len() < 3 {
            poll.poll(&mut events, Some(Duration::from_secs(5)))
                .unwrap();
            while pull.try_recv_into(&mut frames).unwrap() {
                received.push(frames.get().iter().map(|f| f.as_ref().to_vec()).collect());
            }
        }
        assert_eq!(
            received,
            vec![
                vec![b"a".to_vec(), b"bb".to_vec(), b"ccc".to_vec()],
                vec![b"d".to_vec()],
                vec![b"e".to_vec(), Vec::new()],
            ]
        );
        assert!(!pull.try_recv_into(&mut frames).unwrap());
        assert!(frames.get().is_empty());
    }

    #[test]
    fn a_received_frame_is_sent_on_only_when_it_holds_the_same_bytes() {
        let context = zmq::Context::new();
        let (pull, push) = pair(&context, "inproc://reuse");
        let (forward_pull, forward_push) = pair(&context, "inproc://reuse-out");
        let long = vec![b'v'; 100];
        push.send(&[&b"k"[..], &long]).unwrap();
        let mut frames = Frames::default();
        while !pull.try_recv_into(&mut frames).unwrap() {}
        // Short frames and different bytes are copied, not taken.
        assert!(frames.take_if_equal(0, b"k").is_none());
        assert!(frames.take_if_equal(1, &[b'w'; 100]).is_none());
        assert!(frames.take_if_equal(2, &long).is_none());
        let taken = frames.take_if_equal(1, &long).unwrap();
        assert!(frames.get()[1].as_ref().is_empty());
        let outcome = forward_push
            .send_reusing(&[&b"k2"[..], &long], Some(taken))
            .unwrap();
        assert_eq!(outcome, SendOutcome::Sent);
        let mut forwarded = Frames::default();
        while !forward_pull.try_recv_into(&mut forwarded).unwrap() {}
        let bytes: Vec<&[u8]> = forwarded.get().iter().map(AsRef::as_ref).collect();
        assert_eq!(bytes, vec![&b"k2"[..], &long[..]]);
    }

    #[test]
    fn the_high_water_mark_keeps_a_pipe_of_largest_messages_within_its_bytes() {
        let limits = Limits::default();
        let largest = largest_queued_message(&limits);
        assert!(largest > limits.max_body_len + limits.max_properties_len);
        let hwm = hwm_for_queue_bytes(32 << 20, &limits);
        assert_eq!(hwm, 31, "32 MiB of messages just over 1 MiB");
        assert!(hwm as usize * largest <= 32 << 20);
        let small = Limits {
            max_body_len: 4096,
            ..Limits::default()
        };
        assert!(hwm_for_queue_bytes(32 << 20, &small) > 3_000);
        assert_eq!(hwm_for_queue_bytes(1, &limits), 1, "never 0 (unlimited)");
    }

    #[test]
    fn a_full_pipe_reports_would_block_instead_of_blocking() {
        let context = zmq::Context::new();
        let pull = ZmqSocket::new(&context, zmq::PULL, "pull").unwrap();
        pull.inner().set_rcvhwm(1).unwrap();
        pull.inner().bind("inproc://full").unwrap();
        let push = ZmqSocket::new(&context, zmq::PUSH, "push").unwrap();
        push.inner().set_sndhwm(1).unwrap();
        push.inner().connect("inproc://full").unwrap();
        let outcomes: Vec<SendOutcome> = (0..10).map(|_| push.send(&[b"x"]).unwrap()).collect();
        assert!(outcomes.contains(&SendOutcome::WouldBlock));
    }

    #[test]
    fn a_mandatory_router_reports_an_unknown_peer() {
        let context = zmq::Context::new();
        let router = ZmqSocket::new(&context, zmq::ROUTER, "router").unwrap();
        router.inner().set_router_mandatory(true).unwrap();
        router.inner().bind("inproc://router").unwrap();
        let outcome = router.send(&[&b"nobody"[..], b"hello"]).unwrap();
        assert_eq!(outcome, SendOutcome::Unreachable);
    }
}

/// Makes monitor endpoints unique within the process.
static MONITOR_IDS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Watches one connecting socket's TCP connection with libzmq's socket monitor: the only
/// way to learn that it broke and came back, losing whatever was sent in between, and
/// that a security handshake failed (a CURVE key refused or not proven).
pub struct ReconnectMonitor {
    /// A PAIR on the monitor's inproc endpoint, receiving connection events.
    events: ZmqSocket,
    /// The connection went down since it last came up.
    disconnected: bool,
}

/// What [`ReconnectMonitor::poll_reconnected`] found.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MonitorPoll {
    /// At least one event was read (the loop made progress).
    pub received: bool,
    /// The connection came back after going down.
    pub reconnected: bool,
    /// The connection went down, or an attempt to make it failed (refused, unreachable),
    /// before `reconnected` if both happened.
    pub disconnected: bool,
    /// Connection attempts that failed (libzmq retries them).
    pub connects_failed: u64,
    /// The state of the connection after these events: `Some(true)` if the last one
    /// brought it up, `Some(false)` if it took it down, `None` if neither.
    pub up: Option<bool>,
    /// The last security handshake that failed among these events (a CURVE key refused
    /// or not proven, or one side without CURVE).
    pub handshake_failed: Option<HandshakeFailure>,
    /// A security handshake succeeded among these events (after any failure).
    pub handshake_succeeded: bool,
}

/// Why libzmq's handshake on a connection failed (its socket monitor's
/// `ZMQ_EVENT_HANDSHAKE_FAILED_*` events).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HandshakeFailure {
    /// The other side's ZAP handler refused our key (`status`: the ZAP status code, 400
    /// for a key it does not admit).
    Refused {
        /// ZAP status code.
        status: u32,
    },
    /// One side uses CURVE and the other does not.
    MechanismMismatch,
    /// A CURVE box did not open: a side does not hold the secret key of the public key
    /// the other expects.
    Cryptographic,
    /// Another ZMTP or ZAP protocol error (libzmq's `ZMQ_PROTOCOL_ERROR_*` code).
    Protocol {
        /// The code.
        code: u32,
    },
    /// The connection failed during the handshake without a reason (`errno`).
    NoDetail {
        /// The errno libzmq gave.
        errno: u32,
    },
}

impl HandshakeFailure {
    /// The failure of a monitor event, if it is a handshake failure.
    fn from_event(event: zmq::SocketEvent, value: u32) -> Option<HandshakeFailure> {
        /// `ZMQ_PROTOCOL_ERROR_ZMTP_CRYPTOGRAPHIC` and `..._MECHANISM_MISMATCH` (zmq.h).
        const CRYPTOGRAPHIC: u32 = 0x1100_0001;
        const MECHANISM_MISMATCH: u32 = 0x1100_0002;
        Some(match event {
            zmq::SocketEvent::HANDSHAKE_FAILED_AUTH => HandshakeFailure::Refused { status: value },
            zmq::SocketEvent::HANDSHAKE_FAILED_PROTOCOL => match value {
                MECHANISM_MISMATCH => HandshakeFailure::MechanismMismatch,
                CRYPTOGRAPHIC => HandshakeFailure::Cryptographic,
                code => HandshakeFailure::Protocol { code },
            },
            zmq::SocketEvent::HANDSHAKE_FAILED_NO_DETAIL => {
                HandshakeFailure::NoDetail { errno: value }
            }
            _ => return None,
        })
    }
}

impl std::fmt::Display for HandshakeFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HandshakeFailure::Refused { status } => write!(
                f,
                "the other side refused our CURVE key (not admitted; ZAP status {status})"
            ),
            HandshakeFailure::MechanismMismatch => f.write_str(
                "one side uses CURVE and the other does not (keys configured on one side only)",
            ),
            HandshakeFailure::Cryptographic => f.write_str(
                "the CURVE handshake did not verify: a side does not hold the secret of the public key the other expects",
            ),
            HandshakeFailure::Protocol { code } => {
                write!(f, "handshake protocol error (libzmq code {code:#x})")
            }
            HandshakeFailure::NoDetail { errno } => write!(
                f,
                "the connection closed during the handshake ({})",
                std::io::Error::from_raw_os_error(i32::try_from(*errno).unwrap_or(0))
            ),
        }
    }
}

impl ReconnectMonitor {
    /// Starts monitoring `socket` (before it connects, so that no event is missed).
    pub fn new(context: &zmq::Context, socket: &ZmqSocket) -> Result<ReconnectMonitor, zmq::Error> {
        let endpoint = format!(
            "inproc://clonekv-monitor-{}",
            MONITOR_IDS.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        );
        socket.inner().monitor(
            &endpoint,
            i32::from(zmq::SocketEvent::CONNECTED.to_raw())
                | i32::from(zmq::SocketEvent::DISCONNECTED.to_raw())
                | i32::from(zmq::SocketEvent::CONNECT_RETRIED.to_raw())
                | i32::from(zmq::SocketEvent::HANDSHAKE_SUCCEEDED.to_raw())
                | i32::from(zmq::SocketEvent::HANDSHAKE_FAILED_NO_DETAIL.to_raw())
                | i32::from(zmq::SocketEvent::HANDSHAKE_FAILED_PROTOCOL.to_raw())
                | i32::from(zmq::SocketEvent::HANDSHAKE_FAILED_AUTH.to_raw()),
        )?;
        let events = ZmqSocket::new(context, zmq::PAIR, "monitor")?;
        events.inner().connect(&endpoint)?;
        Ok(ReconnectMonitor {
            events,
            disconnected: false,
        })
    }

    /// Registers the event socket with mio (see [`ZmqSocket::register`]).
    pub fn register(&self, registry: &Registry, token: Token) -> io::Result<()> {
        self.events.register(registry, token)
    }

    /// Removes the event socket's mio registration.
    pub fn deregister(&self, registry: &Registry) -> io::Result<()> {
        self.events.deregister(registry)
    }

    /// Reads every waiting event (the fd is edge-triggered).
    pub fn poll_reconnected(&mut self) -> Result<MonitorPoll, zmq::Error> {
        let mut poll = MonitorPoll::default();
        while let Some(frames) = self.events.try_recv()? {
            poll.received = true;
            // The event's first frame: a 16-bit event number, then a 32-bit value.
            let first = frames.first();
            let event = first
                .and_then(|frame| frame.get(..2))
                .and_then(|bytes| <[u8; 2]>::try_from(bytes).ok())
                .map(u16::from_le_bytes);
            let value = first
                .and_then(|frame| frame.get(2..6))
                .and_then(|bytes| <[u8; 4]>::try_from(bytes).ok())
                .map_or(0, u32::from_le_bytes);
            let event = event.map(zmq::SocketEvent::from_raw);
            if let Some(failure) =
                event.and_then(|event| HandshakeFailure::from_event(event, value))
            {
                poll.handshake_failed = Some(failure);
                poll.handshake_succeeded = false;
                continue;
            }
            match event {
                Some(zmq::SocketEvent::HANDSHAKE_SUCCEEDED) => poll.handshake_succeeded = true,
                Some(zmq::SocketEvent::DISCONNECTED) => {
                    self.disconnected = true;
                    // Reported only when it precedes any reconnect in this batch.
                    poll.disconnected |= !poll.reconnected;
                    poll.up = Some(false);
                }
                Some(zmq::SocketEvent::CONNECT_RETRIED) => {
                    poll.disconnected |= !poll.reconnected;
                    poll.connects_failed += 1;
                }
                Some(zmq::SocketEvent::CONNECTED) => {
                    poll.up = Some(true);
                    if self.disconnected {
                        self.disconnected = false;
                        poll.reconnected = true;
                    }
                }
                _ => {}
            }
        }
        Ok(poll)
    }
}
