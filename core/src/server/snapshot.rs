//! Open snapshot replies, streamed on demand (PROTOCOL.md §3–§4).
//!
//! A stream holds a clone of the map taken when the request was accepted (O(1): the
//! map is persistent) and a cursor, so later updates never leak into it and nothing is
//! copied up front. Entries are read from the clone in batches by a range scan from
//! the cursor, which keeps the per-message cost O(1) amortised.
//!
//! A resume reply (PROTOCOL.md §13) is a stream too: a HUGZ numbered with the position
//! it resumes from, then the changes after it (an O(1) clone of the server's recent
//! changes), then KTHXBAI.
//!
//! Replies to one routing id go out in request order, one stream after the other, since
//! they share the client's connection.

use std::collections::{BTreeMap, VecDeque};
use std::ops::Bound;
use std::time::Duration;

use imbl::Vector;

use super::frame::Frame;
use super::history::MAX_REIGNS;
use super::persist::Change;
use super::store::{Entry, Key, Map};
use crate::budget::ENTRY_OVERHEAD;
use crate::kvmsg::{KvMsg, FRAME_COUNT};
use crate::time::Instant;

/// The longest `history` property a KTHXBAI carries: per reign 16 hex digits, `@`, a
/// sequence of at most 20 characters and a comma.
const MAX_HISTORY_LEN: usize = MAX_REIGNS * 38;

#[derive(Clone, Debug)]
struct Stream {
    map: Map,
    subtree: Vec<u8>,
    /// The server's sequence when the snapshot was taken: KTHXBAI carries it.
    sequence: i64,
    /// The `history` property of the KTHXBAI, if it names one.
    history: Option<Vec<u8>>,
    /// For a resume reply: the changes to send instead of the map's entries.
    resume: Option<Resume>,
    /// The last key read from `map`; the next batch starts after it.
    cursor: Option<Key>,
    batch: VecDeque<(Key, Entry)>,
    entries_exhausted: bool,
}

#[derive(Clone, Debug)]
struct Resume {
    /// The position the changes follow: the HUGZ that opens the reply and the KTHXBAI
    /// that ends it say so.
    after: i64,
    announced: bool,
    changes: Vector<Change>,
}

impl Stream {
    fn next_message(&mut self, batch_size: usize) -> Pulled {
        if let Some(resume) = &mut self.resume {
            if !resume.announced {
                resume.announced = true;
                return Pulled::Message(KvMsg::hugz(resume.after).encode().map(Frame::from));
            }
            if let Some(change) = resume.changes.pop_front() {
                return Pulled::Message(change.kvsync_frames());
            }
        } else {
            if self.batch.is_empty() && !self.entries_exhausted {
                self.refill(batch_size);
            }
            if let Some((key, entry)) = self.batch.pop_front() {
                return Pulled::Message(Entry::kvsync_frames(&entry, &key));
            }
        }
        // Sent once: the caller drops the stream after this.
        let mut kthxbai = KvMsg::kthxbai(self.sequence, std::mem::take(&mut self.subtree));
        if let Some(history) = &self.history {
            kthxbai = kthxbai.with_history(history);
        }
        if let Some(resume) = &self.resume {
            kthxbai = kthxbai.with_resumed(resume.after);
        }
        Pulled::Finished(kthxbai.encode().map(Frame::from))
    }

    fn refill(&mut self, batch_size: usize) {
        let start = match &self.cursor {
            Some(cursor) => Bound::Excluded(&**cursor),
            None => Bound::Included(self.subtree.as_slice()),
        };
        let mut range = self.map.range::<_, [u8]>((start, Bound::Unbounded));
        while self.batch.len() < batch_size.max(1) {
            match range.next() {
                Some((key, entry)) if key.starts_with(&self.subtree) => {
                    self.batch.push_back((key.clone(), entry.clone()));
                }
                // Keys are ordered, so the first key outside the prefix ends the subtree.
                Some(_) | None => {
                    self.entries_exhausted = true;
                    break;
                }
            }
        }
        if let Some((key, _)) = self.batch.back() {
            self.cursor = Some(key.clone());
        }
    }
}

#[derive(Clone, Debug)]
struct ClientStreams {
    queue: VecDeque<Stream>,
    /// When the host last pulled a message for this client (or when it was opened).
    last_pulled: Instant,
}

/// What a stream sends.
pub(crate) enum Reply {
    /// The entries of `map` under `subtree`.
    Snapshot { map: Map, subtree: Vec<u8> },
    /// The changes after sequence `after` (a resume).
    Changes { after: i64, changes: Vector<Change> },
}

/// What [`SnapshotStreams::next_message`] produced.
pub(crate) enum Pulled {
    /// A KVSYNC.
    Message([Frame; FRAME_COUNT]),
    /// The KTHXBAI that ends a stream.
    Finished([Frame; FRAME_COUNT]),
}

#[derive(Clone, Debug, Default)]
pub(crate) struct SnapshotStreams {
    by_client: BTreeMap<Vec<u8>, ClientStreams>,
    open: usize,
}

/// The longest routing id a stream is opened for: libzmq's own limit (a ROUTER never
/// hands a longer one up).
pub(crate) const MAX_ROUTING_ID_LEN: usize = 255;

impl SnapshotStreams {
    /// Number of open streams (queued ones included).
    pub(crate) fn len(&self) -> usize {
        self.open
    }

    /// Bytes the open streams hold of their own: each one's routing id, subtree and the
    /// batch of entry handles read ahead (the entries themselves are the map's, shared),
    /// plus [`ENTRY_OVERHEAD`] for the stream and its client's bookkeeping.
    pub(crate) fn bytes(&self) -> usize {
        self.by_client
            .iter()
            .flat_map(|(routing_id, client)| {
                client.queue.iter().map(move |stream| {
                    ENTRY_OVERHEAD
                        .saturating_add(routing_id.len())
                        .saturating_add(stream.subtree.len())
                        .saturating_add(stream.history.as_ref().map_or(0, Vec::len))
                        .saturating_add(
                            stream
                                .batch
                                .capacity()
                                .saturating_mul(std::mem::size_of::<(Key, Entry)>()),
                        )
                })
            })
            .sum()
    }

    /// The most [`SnapshotStreams::bytes`] one stream can reach under these limits.
    pub(crate) fn max_bytes_per_stream(max_key_len: usize, batch_size: usize) -> usize {
        ENTRY_OVERHEAD
            .saturating_add(MAX_ROUTING_ID_LEN)
            .saturating_add(max_key_len)
            .saturating_add(MAX_HISTORY_LEN)
            .saturating_add(
                // A VecDeque grows by doubling from 4.
                batch_size
                    .max(4)
                    .checked_next_power_of_two()
                    .unwrap_or(usize::MAX)
                    .saturating_mul(std::mem::size_of::<(Key, Entry)>()),
            )
    }

    pub(crate) fn routing_ids(&self) -> impl Iterator<Item = &[u8]> + '_ {
        self.by_client.keys().map(Vec::as_slice)
    }

    /// Opens a stream of `map` restricted to `subtree`, taken at `sequence`, or with
    /// `changes` a resume reply (see the module docs); its KTHXBAI names `history`. A
    /// client has at most one stream waiting behind the one being sent: a newer request
    /// replaces the waiting one, whose snapshot it makes obsolete (the client gets one
    /// reply fewer than it asked for, as when a passive drops a request). Returns true
    /// when a waiting stream was replaced.
    pub(crate) fn open(
        &mut self,
        now: Instant,
        routing_id: &[u8],
        reply: Reply,
        sequence: i64,
        history: Option<Vec<u8>>,
    ) -> bool {
        let client = self
            .by_client
            .entry(routing_id.to_vec())
            .or_insert_with(|| ClientStreams {
                queue: VecDeque::new(),
                last_pulled: now,
            });
        let replaced = client.queue.len() >= 2 && client.queue.pop_back().is_some();
        if replaced {
            self.open -= 1;
        }
        let (map, subtree, resume) = match reply {
            Reply::Snapshot { map, subtree } => (map, subtree, None),
            Reply::Changes { after, changes } => (
                Map::default(),
                Vec::new(),
                Some(Resume {
                    after,
                    announced: false,
                    changes,
                }),
            ),
        };
        client.queue.push_back(Stream {
            map,
            subtree,
            sequence,
            history,
            resume,
            cursor: None,
            batch: VecDeque::new(),
            entries_exhausted: false,
        });
        self.open += 1;
        replaced
    }

    /// The next message for `routing_id`, if it has an open stream.
    pub(crate) fn next_message(
        &mut self,
        now: Instant,
        routing_id: &[u8],
        batch_size: usize,
    ) -> Option<Pulled> {
        let client = self.by_client.get_mut(routing_id)?;
        client.last_pulled = now;
        let stream = client.queue.front_mut()?;
        let pulled = stream.next_message(batch_size);
        if let Pulled::Finished(_) = pulled {
            client.queue.pop_front();
            self.open = self.open.saturating_sub(1);
            if client.queue.is_empty() {
                self.by_client.remove(routing_id);
            }
        }
        Some(pulled)
    }

    /// The maps the open streams read from.
    #[cfg(test)]
    pub(crate) fn maps(&self) -> impl Iterator<Item = &Map> + '_ {
        self.by_client
            .values()
            .flat_map(|client| client.queue.iter().map(|stream| &stream.map))
    }

    /// Closes every stream of `routing_id`; returns how many there were.
    pub(crate) fn cancel(&mut self, routing_id: &[u8]) -> usize {
        let closed = self
            .by_client
            .remove(routing_id)
            .map_or(0, |client| client.queue.len());
        self.open = self.open.saturating_sub(closed);
        closed
    }

    /// Closes every stream; returns the routing ids that had one.
    pub(crate) fn cancel_all(&mut self) -> Vec<Vec<u8>> {
        self.open = 0;
        std::mem::take(&mut self.by_client).into_keys().collect()
    }

    /// The earliest instant a client's streams count as stalled.
    pub(crate) fn next_stall(&self, stall_timeout: Duration) -> Option<Instant> {
        self.by_client
            .values()
            .map(|client| client.last_pulled + stall_timeout)
            .min()
    }

    /// Closes the streams of clients not pulled for `stall_timeout`; returns their ids.
    pub(crate) fn close_stalled(&mut self, now: Instant, stall_timeout: Duration) -> Vec<Vec<u8>> {
        let stalled: Vec<Vec<u8>> = self
            .by_client
            .iter()
            .filter(|(_, client)| now >= client.last_pulled + stall_timeout)
            .map(|(routing_id, _)| routing_id.clone())
            .collect();
        for routing_id in &stalled {
            self.cancel(routing_id);
        }
        stalled
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kvmsg::{Limits, Uuid, HISTORY, RESUMED};

    fn map_of(keys: &[&[u8]]) -> Map {
        let mut map = Map::default();
        for (index, key) in (0u8..).zip(keys) {
            let update = KvMsg::kvset(key.to_vec(), b"v".to_vec(), Uuid::from_bytes([index; 16]))
                .with_sequence(i64::from(index) + 1);
            let (key, entry) = Entry::from_update(&update.as_msg_ref(), None, &mut Vec::new());
            map.insert(key, entry);
        }
        map
    }

    fn snapshot(map: &Map, subtree: &[u8]) -> Reply {
        Reply::Snapshot {
            map: map.clone(),
            subtree: subtree.to_vec(),
        }
    }

    fn at(secs: u64) -> Instant {
        Instant::ZERO + Duration::from_secs(secs)
    }

    fn decode(frames: &[Frame; FRAME_COUNT]) -> KvMsg {
        KvMsg::decode(frames, &Limits::default()).expect("the server's own message decodes")
    }

    /// Pulls one stream of `routing_id` to its end: the messages before the KTHXBAI,
    /// then the KTHXBAI.
    fn pull_stream(
        streams: &mut SnapshotStreams,
        routing_id: &[u8],
        batch_size: usize,
    ) -> (Vec<KvMsg>, KvMsg) {
        let mut sent = Vec::new();
        for _ in 0..100 {
            match streams.next_message(at(0), routing_id, batch_size) {
                Some(Pulled::Message(frames)) => sent.push(decode(&frames)),
                Some(Pulled::Finished(frames)) => return (sent, decode(&frames)),
                None => panic!("no stream open for {routing_id:?}"),
            }
        }
        panic!("the stream does not end");
    }

    #[test]
    fn a_snapshot_streams_its_subtree_in_key_order_then_kthxbai() {
        let map = map_of(&[b"/a/1", b"/a/2", b"/a/3", b"/b/1", b"/a0"]);
        let mut streams = SnapshotStreams::default();
        let history = b"0000000000000001@0".to_vec();
        streams.open(
            at(0),
            b"c",
            snapshot(&map, b"/a/"),
            9,
            Some(history.clone()),
        );
        for batch_size in [1, 2, 10] {
            let mut again = streams.clone();
            let (sent, kthxbai) = pull_stream(&mut again, b"c", batch_size);
            let keys: Vec<&[u8]> = sent.iter().map(|msg| msg.key.as_slice()).collect();
            assert_eq!(keys, [&b"/a/1"[..], b"/a/2", b"/a/3"], "batch {batch_size}");
            assert_eq!(kthxbai.sequence, 9);
            assert_eq!(kthxbai.body, b"/a/");
            assert_eq!(kthxbai.properties.get(HISTORY), Some(&history[..]));
            assert_eq!(
                kthxbai.properties.get(RESUMED),
                None,
                "a snapshot is unmarked"
            );
            assert_eq!(again.len(), 0);
            assert!(again.next_message(at(0), b"c", batch_size).is_none());
        }
    }

    #[test]
    fn a_resume_reply_announces_its_position_then_sends_the_changes() {
        let changes: Vector<Change> = (5..=6)
            .map(|sequence| Change::Delete {
                key: Key::from(&b"/k"[..]),
                sequence,
                uuid: None,
            })
            .collect();
        let mut streams = SnapshotStreams::default();
        let reply = Reply::Changes { after: 4, changes };
        streams.open(at(0), b"peer", reply, 6, None);
        let (sent, kthxbai) = pull_stream(&mut streams, b"peer", 10);
        let sequences: Vec<i64> = sent.iter().map(|msg| msg.sequence).collect();
        assert_eq!(sequences, [4, 5, 6], "HUGZ at 4, then the changes");
        assert_eq!(kthxbai.sequence, 6);
        assert_eq!(kthxbai.properties.get(HISTORY), None);
        assert_eq!(kthxbai.properties.get(RESUMED), Some(&b"4"[..]), "marked");
    }

    #[test]
    fn a_newer_request_replaces_the_waiting_one_and_the_count_follows() {
        let map = map_of(&[b"/k"]);
        let mut streams = SnapshotStreams::default();
        assert!(!streams.open(at(0), b"a", snapshot(&map, b""), 1, None));
        assert!(!streams.open(at(0), b"a", snapshot(&map, b""), 2, None));
        assert_eq!(streams.len(), 2);
        assert!(
            streams.open(at(0), b"a", snapshot(&map, b""), 3, None),
            "replaced"
        );
        assert_eq!(streams.len(), 2);
        assert!(!streams.open(at(0), b"b", snapshot(&map, b""), 4, None));
        assert_eq!(streams.len(), 3);
        let ids: Vec<&[u8]> = streams.routing_ids().collect();
        assert_eq!(ids, [&b"a"[..], b"b"]);
        let (_, first) = pull_stream(&mut streams, b"a", 10);
        let (_, second) = pull_stream(&mut streams, b"a", 10);
        assert_eq!((first.sequence, second.sequence), (1, 3), "2 was replaced");
        assert_eq!(streams.len(), 1);
        assert_eq!(streams.cancel(b"b"), 1);
        assert_eq!(streams.cancel(b"b"), 0);
        assert_eq!(streams.len(), 0);
    }

    #[test]
    fn cancelling_closes_every_stream_of_a_client() {
        let map = map_of(&[b"/k"]);
        let mut streams = SnapshotStreams::default();
        streams.open(at(0), b"a", snapshot(&map, b""), 1, None);
        streams.open(at(0), b"a", snapshot(&map, b""), 2, None);
        streams.open(at(0), b"b", snapshot(&map, b""), 3, None);
        assert_eq!(streams.cancel(b"a"), 2);
        assert_eq!(streams.len(), 1);
        streams.open(at(0), b"c", snapshot(&map, b""), 4, None);
        assert_eq!(streams.cancel_all(), vec![b"b".to_vec(), b"c".to_vec()]);
        assert_eq!(streams.len(), 0);
        assert_eq!(streams.routing_ids().count(), 0);
    }

    #[test]
    fn a_client_not_pulled_for_the_stall_timeout_is_closed() {
        let stall = Duration::from_secs(5);
        let map = map_of(&[b"/k"]);
        let mut streams = SnapshotStreams::default();
        assert_eq!(streams.next_stall(stall), None);
        streams.open(at(10), b"a", snapshot(&map, b""), 1, None);
        streams.open(at(12), b"b", snapshot(&map, b""), 1, None);
        assert_eq!(streams.next_stall(stall), Some(at(15)));
        assert!(streams.next_message(at(13), b"a", 10).is_some(), "a pulls");
        assert_eq!(streams.next_stall(stall), Some(at(17)));
        assert!(streams.close_stalled(at(16), stall).is_empty());
        assert_eq!(streams.close_stalled(at(17), stall), vec![b"b".to_vec()]);
        assert_eq!(streams.len(), 1);
        assert_eq!(streams.close_stalled(at(18), stall), vec![b"a".to_vec()]);
        assert_eq!(streams.len(), 0);
    }

    #[test]
    fn a_streams_bytes_are_its_own_and_stay_below_the_per_stream_bound() {
        let map = map_of(&[b"/a/1", b"/a/2"]);
        let mut streams = SnapshotStreams::default();
        assert_eq!(streams.bytes(), 0);
        let history = vec![b'h'; 7];
        streams.open(at(0), b"rid", snapshot(&map, b"/a/"), 1, Some(history));
        assert_eq!(
            streams.bytes(),
            ENTRY_OVERHEAD + 3 + 3 + 7,
            "nothing read ahead yet"
        );
        let batch_size = 2;
        assert!(streams.next_message(at(0), b"rid", batch_size).is_some());
        let read_ahead = streams.bytes() - (ENTRY_OVERHEAD + 3 + 3 + 7);
        assert_eq!(read_ahead % std::mem::size_of::<(Key, Entry)>(), 0);
        assert!(read_ahead > 0, "the batch's handles are charged");
        assert!(streams.bytes() <= SnapshotStreams::max_bytes_per_stream(255, batch_size));
    }

    #[test]
    fn a_stream_reads_ahead_at_most_one_batch() {
        let keys: Vec<Vec<u8>> = (0..70).map(|n| format!("/k/{n:02}").into_bytes()).collect();
        let keys: Vec<&[u8]> = keys.iter().map(Vec::as_slice).collect();
        let map = map_of(&keys);
        let batch_size = 64;
        let mut streams = SnapshotStreams::default();
        streams.open(at(0), b"rid", snapshot(&map, b""), 1, None);
        let bound = SnapshotStreams::max_bytes_per_stream(255, batch_size);
        let mut sent = 0;
        while let Some(Pulled::Message(_)) = streams.next_message(at(0), b"rid", batch_size) {
            sent += 1;
            assert!(streams.bytes() <= bound, "{} > {bound}", streams.bytes());
        }
        assert_eq!(sent, 70);
        assert_eq!(
            SnapshotStreams::max_bytes_per_stream(255, 100),
            ENTRY_OVERHEAD
                + MAX_ROUTING_ID_LEN
                + 255
                + MAX_REIGNS * 38
                + 128 * std::mem::size_of::<(Key, Entry)>(),
            "a batch of 100 grows to 128 slots"
        );
    }
}
