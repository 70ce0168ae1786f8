//! The run's key prefix, and removing everything under it.
//!
//! Every key a run writes starts with `/cb-XXXX/` ("clonekv bench", then four random
//! letters or digits naming the run). On a server the bench did not start
//! (`--endpoint`), the run ends by deleting every key under its prefix, also after a
//! failure or a Ctrl-C: the client library follows that subtree (its snapshot lists the
//! keys, its stream brings any written late) and deletes the keys as any client would,
//! each batch confirmed by the server's echo; a fresh snapshot of the subtree then
//! shows whether any is left.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use clonekv_zmq::client::{Client, ClientError};

use super::traffic::Shape;
use super::BenchError;

/// Bytes of a prefix: `/cb-`, four characters, `/`. Short on purpose: a default
/// 16-byte key keeps seven digits (ten million keys), and stays within the 22 bytes a
/// clonekvd stores inline, as the figures before the prefix were measured.
pub const PREFIX_LEN: usize = 9;

/// The prefix of every key one run writes.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Prefix([u8; PREFIX_LEN]);

impl Prefix {
    /// A new run's prefix, its name drawn from the OS's randomness.
    pub fn random() -> Result<Prefix, BenchError> {
        let mut name = [0u8; 4];
        getrandom::fill(&mut name)
            .map_err(|error| BenchError::new(format!("no OS randomness: {error}")))?;
        Ok(Prefix::named(name))
    }

    /// The prefix whose name is made of these four bytes (each taken modulo 36).
    fn named(name: [u8; 4]) -> Prefix {
        const ALPHABET: &[u8; 36] = b"0123456789abcdefghijklmnopqrstuvwxyz";
        let mut bytes = *b"/cb-0000/";
        for (slot, byte) in bytes[4..8].iter_mut().zip(name) {
            *slot = ALPHABET[usize::from(byte) % ALPHABET.len()];
        }
        Prefix(bytes)
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    pub fn as_str(&self) -> &str {
        // Built from ASCII only.
        std::str::from_utf8(&self.0).unwrap_or("/cb-????/")
    }
}

impl fmt::Display for Prefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Debug for Prefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Prefix({self})")
    }
}

/// What removing a run's keys did.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Cleanup {
    pub prefix: String,
    /// Deletes sent (a key written again after its delete counts twice).
    pub keys_deleted: u64,
    /// Keys under the prefix in the server's last snapshot: 0 unless something failed.
    pub keys_left: u64,
    pub seconds: f64,
}

/// Threads deleting at once, and the deletes each sends before waiting for the server
/// to echo the last of them: together well within the client's own-update memory
/// (10 000) and its sockets' high-water mark (100 000), so that none is dropped on the
/// way.
const WORKERS: usize = 4;
const BATCH: usize = 2_000;

/// Rounds of deleting: the first deletes the keys the client's snapshot listed; if a
/// fresh snapshot still shows some, the next ones also delete every key the run could
/// have written (the whole keyspace), since a listing can be incomplete (the zguide C
/// server cuts a snapshot at its high-water mark of 1 000 entries) or miss a key that
/// was still on its way.
const ROUNDS: usize = 3;

/// Deletes every key under the run's prefix on `servers` (a primary and maybe its
/// backup), and checks with a fresh snapshot of the subtree that none is left.
pub fn remove_all(
    servers: &[String],
    shape: &Shape,
    patience: Duration,
) -> Result<Cleanup, BenchError> {
    let prefix = shape.prefix;
    let began = Instant::now();
    let fail =
        |error: ClientError| BenchError::new(format!("removing the keys under {prefix}: {error}"));
    let mut builder = Client::builder().subtree(prefix.as_bytes());
    for server in servers {
        builder = builder.server(server.clone());
    }
    let client = builder.connect().map_err(fail)?;
    client.wait_synced(patience).map_err(fail)?;
    let mut keys_deleted = 0u64;
    let mut keys_left = 0u64;
    for round in 0..ROUNDS {
        let mut keys: Vec<Vec<u8>> = client
            .dump(prefix.as_bytes())
            .map_err(fail)?
            .into_iter()
            .map(|(key, _)| key)
            .collect();
        if round > 0 {
            keys.extend((0..shape.keyspace).map(|index| {
                let mut key = Vec::with_capacity(shape.key_len);
                shape.key(index, &mut key);
                key
            }));
        }
        // A few threads at once: each delete waits for the client's agent to take it,
        // and the agent can take the next while a thread waits.
        let deleted = AtomicU64::new(0);
        let share = keys.len().div_ceil(WORKERS).max(1);
        thread::scope(|scope| {
            let workers: Vec<_> = keys
                .chunks(share)
                .map(|keys| {
                    let (client, deleted) = (&client, &deleted);
                    scope.spawn(move || {
                        for batch in keys.chunks(BATCH) {
                            let Some((last, others)) = batch.split_last() else {
                                continue;
                            };
                            for key in others {
                                client.delete(key)?;
                            }
                            client.delete_confirmed(last, patience)?;
                            deleted.fetch_add(batch.len() as u64, Ordering::Relaxed);
                        }
                        Ok(())
                    })
                })
                .collect();
            workers
                .into_iter()
                .try_for_each(|worker| worker.join().unwrap_or(Err(ClientError::Stopped)))
        })
        .map_err(fail)?;
        keys_deleted += deleted.into_inner();
        let active = client.status().map_err(fail)?.endpoint;
        keys_left = super::snapshot::count(&active, prefix.as_bytes(), patience)?;
        if keys_left == 0 {
            break;
        }
    }
    let _ = client.shutdown();
    Ok(Cleanup {
        prefix: prefix.to_string(),
        keys_deleted,
        keys_left,
        seconds: began.elapsed().as_secs_f64(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_prefix_is_nine_ascii_bytes_naming_the_run() {
        let prefix = Prefix::named([0, 35, 36, 255]);
        assert_eq!(prefix.as_str(), "/cb-0z03/");
        assert_eq!(prefix.as_bytes().len(), PREFIX_LEN);
        let random = Prefix::random().unwrap();
        assert!(random.as_str().starts_with("/cb-") && random.as_str().ends_with('/'));
        assert!(random.as_str()[4..8]
            .bytes()
            .all(|byte| byte.is_ascii_digit() || byte.is_ascii_lowercase()));
    }
}
