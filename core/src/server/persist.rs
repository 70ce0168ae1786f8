//! What a server records for a restart, and the bytes it is recorded in.
//!
//! With [`Config::persistence`](super::Config::persistence) on, the server reports every
//! change of its map and sequence as an output, in the order it made them:
//!
//! - [`Output::Persist`](super::Output::Persist) with a [`Record`]: one key written (its
//!   stored entry, which carries its sequence and absolute expiry) or deleted (with the
//!   sequence of the delete). It comes before any output that reveals the change: the
//!   KVPUB of a published update follows its record. A host that makes the records
//!   durable before it carries out the outputs after them (`--fsync always`) therefore
//!   never shows a client a change that a crash could take back.
//! - [`Output::PersistImage`](super::Output::PersistImage) with an [`Image`] when the map
//!   is replaced as a whole (a passive installs the active's snapshot, or merges what it
//!   had when it takes over mid-sync). The host records the whole image and starts a new
//!   log after it.
//! - [`Output::Persist`](super::Output::Persist) with a history record when the map's
//!   [`Lineage`] changes (a reign begins, a resume adopts the active's), after the
//!   changes it covers.
//!
//! Invariant: the last image recorded, followed by every record emitted since, in order,
//! rebuilds the map, the sequence, the highest published sequence and the lineage the
//! server holds after its latest output. [`Server::image`](super::Server::image) is that image now (the
//! host's compaction writes it); [`Restorer`] rebuilds it from the bytes and
//! [`Server::restore`](super::Server::restore) starts a server from it.
//!
//! # Format, version 2
//!
//! All integers big-endian. A file is a header and records:
//!
//! ```text
//! header  := "CLONEKV\0" | version u32 | kind u8 (1 snapshot, 2 log) | generation u64
//!            | crc32(the 21 bytes before) u32                           (25 bytes)
//! record  := length u32 | crc32(payload) u32 | payload (length bytes)
//! payload := 1 PUT    | key length u16 | key | stored entry
//!          | 2 DELETE | sequence i64 | key
//!          | 3 STATE  | sequence i64 | highest published sequence i64
//!          | 4 END    | number of PUT records u64
//!          | 5 HISTORY| peer serves resumes u8 (0/1) | reigns u8 | (id u64 | base i64)*
//! ```
//!
//! Version 1 is version 2 without HISTORY records; it is read (its map has no known
//! history, so its first re-sync is a full snapshot) and never written.
//!
//! A stored entry is the entry's in-memory bytes (sequence, absolute expiry, uuid,
//! properties length, properties, body), validated again when read. A snapshot is
//! `STATE HISTORY? PUT* END` and counts only when whole; a log holds `PUT`, `DELETE` and
//! `HISTORY` records that apply, in order, over the snapshot of the same generation. A record is whole
//! when its length fits in the file and its checksum matches: the first that is not
//! ends what a reader may use ([`next_record`]).

use super::frame::Frame;
use super::history::Lineage;
use super::store::{uuid_frame, Key, Map, Store};
use super::Entry;
use crate::kvmsg::{Uuid, FRAME_COUNT};

/// The version of the on-disk format written by this build. It also reads
/// [`OLDEST_READABLE_VERSION`] and later; a file with another version is refused
/// ([`HeaderError::UnsupportedVersion`]).
pub const FORMAT_VERSION: u32 = 2;

/// The oldest version this build reads.
pub const OLDEST_READABLE_VERSION: u32 = 1;

/// The first bytes of every clonekv data file.
pub const MAGIC: [u8; 8] = *b"CLONEKV\0";

/// Length of a file header.
pub const HEADER_LEN: usize = 25;

/// Length of a record's frame before its payload (length and checksum).
pub const RECORD_HEAD_LEN: usize = 8;

const TAG_PUT: u8 = 1;
const TAG_DELETE: u8 = 2;
const TAG_STATE: u8 = 3;
const TAG_END: u8 = 4;
const TAG_HISTORY: u8 = 5;

/// Which of the two files a header opens.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FileKind {
    /// The whole map at one point.
    Snapshot,
    /// The changes after the snapshot of the same generation.
    Log,
}

impl FileKind {
    fn code(self) -> u8 {
        match self {
            FileKind::Snapshot => 1,
            FileKind::Log => 2,
        }
    }
}

/// A decoded file header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    /// What the file holds.
    pub kind: FileKind,
    /// The snapshot and the log of one generation belong together.
    pub generation: u64,
}

/// Why a file header is refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum HeaderError {
    /// Shorter than a header: a file cut before its header was written.
    #[error("the file is shorter than a header ({found} of {HEADER_LEN} bytes)")]
    Truncated {
        /// Bytes present.
        found: usize,
    },
    /// The magic bytes are not clonekv's.
    #[error("not a clonekv data file (its first bytes are not \"CLONEKV\\0\")")]
    NotClonekv,
    /// Written by a build with another format version.
    #[error(
        "written in on-disk format version {found}; this build reads versions {OLDEST_READABLE_VERSION} to {FORMAT_VERSION}"
    )]
    UnsupportedVersion {
        /// The file's version.
        found: u32,
    },
    /// The header's checksum does not match, or its kind is unknown.
    #[error("the header is corrupt (checksum mismatch or unknown file kind)")]
    Corrupt,
}

/// The header of a `kind` file of `generation`.
pub fn encode_header(kind: FileKind, generation: u64) -> [u8; HEADER_LEN] {
    let mut body = Vec::with_capacity(HEADER_LEN);
    body.extend_from_slice(&MAGIC);
    body.extend_from_slice(&FORMAT_VERSION.to_be_bytes());
    body.push(kind.code());
    body.extend_from_slice(&generation.to_be_bytes());
    let crc = crc32fast::hash(&body);
    body.extend_from_slice(&crc.to_be_bytes());
    let mut header = [0u8; HEADER_LEN];
    for (slot, byte) in header.iter_mut().zip(body) {
        *slot = byte;
    }
    header
}

/// Reads a file header from the start of `bytes`. The magic and the version are
/// checked before the checksum, so that a file of another version is reported as such.
pub fn decode_header(bytes: &[u8]) -> Result<Header, HeaderError> {
    let header = bytes
        .get(..HEADER_LEN)
        .ok_or(HeaderError::Truncated { found: bytes.len() })?;
    let mut reader = Reader(header);
    if reader.take(MAGIC.len()) != Some(&MAGIC[..]) {
        return Err(HeaderError::NotClonekv);
    }
    let version = reader.u32().ok_or(HeaderError::Corrupt)?;
    if !(OLDEST_READABLE_VERSION..=FORMAT_VERSION).contains(&version) {
        return Err(HeaderError::UnsupportedVersion { found: version });
    }
    let kind = match reader.u8() {
        Some(1) => FileKind::Snapshot,
        Some(2) => FileKind::Log,
        _ => return Err(HeaderError::Corrupt),
    };
    let generation = reader.u64().ok_or(HeaderError::Corrupt)?;
    let crc = reader.u32().ok_or(HeaderError::Corrupt)?;
    let covered = header.get(..HEADER_LEN - 4).ok_or(HeaderError::Corrupt)?;
    if crc32fast::hash(covered) != crc {
        return Err(HeaderError::Corrupt);
    }
    Ok(Header { kind, generation })
}

/// What the bytes at a reader's position hold.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NextRecord<'a> {
    /// A whole record: its payload, and how many bytes it took in all.
    Record {
        /// The payload (checksum verified).
        payload: &'a [u8],
        /// Frame and payload length: where the next record starts.
        consumed: usize,
    },
    /// Nothing left.
    End,
    /// The rest cannot be used from here on.
    Torn(Torn),
}

/// Why the bytes at a position are not a whole record.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Torn {
    /// Fewer bytes than a record's frame: a write cut short.
    #[error(
        "a record's length and checksum are cut short ({available} of {RECORD_HEAD_LEN} bytes)"
    )]
    ShortHead {
        /// Bytes present.
        available: usize,
    },
    /// The frame announces more bytes than follow: a write cut short (or a corrupt length).
    #[error("a record announces {announced} bytes but only {available} follow")]
    ShortPayload {
        /// Payload length in the frame.
        announced: usize,
        /// Bytes present after the frame.
        available: usize,
    },
    /// The payload does not match its checksum: the bytes were damaged (or only part of
    /// a rewrite reached the disk).
    #[error("a record's checksum does not match its {length} bytes")]
    ChecksumMismatch {
        /// Payload length.
        length: usize,
    },
}

/// The record at the start of `bytes` (which begin right after a header or a previous
/// record).
pub fn next_record(bytes: &[u8]) -> NextRecord<'_> {
    if bytes.is_empty() {
        return NextRecord::End;
    }
    let mut reader = Reader(bytes);
    let (Some(length), Some(crc)) = (reader.u32(), reader.u32()) else {
        return NextRecord::Torn(Torn::ShortHead {
            available: bytes.len(),
        });
    };
    let length = length as usize;
    let Some(payload) = reader.take(length) else {
        return NextRecord::Torn(Torn::ShortPayload {
            announced: length,
            available: bytes.len().saturating_sub(RECORD_HEAD_LEN),
        });
    };
    if crc32fast::hash(payload) != crc {
        return NextRecord::Torn(Torn::ChecksumMismatch { length });
    }
    NextRecord::Record {
        payload,
        consumed: RECORD_HEAD_LEN + length,
    }
}

/// Appends one framed record whose payload `write_payload` appends.
fn frame_into(out: &mut Vec<u8>, write_payload: impl FnOnce(&mut Vec<u8>)) {
    let start = out.len();
    out.extend_from_slice(&[0; RECORD_HEAD_LEN]);
    write_payload(out);
    let payload = out.get(start + RECORD_HEAD_LEN..).unwrap_or_default();
    // A payload is bounded by the decoder's limits, far below 4 GiB.
    let length = u32::try_from(payload.len()).unwrap_or(u32::MAX);
    let crc = crc32fast::hash(payload);
    let mut head = [0u8; RECORD_HEAD_LEN];
    let (length_field, crc_field) = head.split_at_mut(4);
    length_field.copy_from_slice(&length.to_be_bytes());
    crc_field.copy_from_slice(&crc.to_be_bytes());
    if let Some(slot) = out.get_mut(start..start + RECORD_HEAD_LEN) {
        slot.copy_from_slice(&head);
    }
}

fn put_payload(out: &mut Vec<u8>, key: &[u8], entry: &Entry) {
    out.push(TAG_PUT);
    // Keys are at most 255 bytes (the decoder's limit is a u8 length on the wire).
    let key_len = u16::try_from(key.len()).unwrap_or(u16::MAX);
    out.extend_from_slice(&key_len.to_be_bytes());
    out.extend_from_slice(key.get(..usize::from(key_len)).unwrap_or(key));
    out.extend_from_slice(entry.stored_bytes());
}

/// One change of the map, or of its history, to append to the log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record(Kind);

#[derive(Clone, Debug, PartialEq, Eq)]
enum Kind {
    Change(Change),
    History(History),
}

/// One change of the map: a key written or deleted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Change {
    /// The key now holds this entry (which carries the change's sequence).
    Put(Key, Entry),
    /// The key was deleted by the change numbered here, which carried this uuid (kept
    /// in memory for a resume reply; the log does not record it).
    Delete {
        key: Key,
        sequence: i64,
        uuid: Option<Uuid>,
    },
}

/// A map's lineage, and whether its peer answered with one (so serves resumes).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct History {
    /// The reigns the map went through.
    pub lineage: Lineage,
    /// The active this map was last synced from named its history.
    pub peer_serves_resumes: bool,
}

impl Change {
    /// The key changed.
    pub(crate) fn key(&self) -> &[u8] {
        match self {
            Change::Put(key, _) | Change::Delete { key, .. } => key,
        }
    }

    /// The sequence of the change.
    pub(crate) fn sequence(&self) -> i64 {
        match self {
            Change::Put(_, entry) => entry.sequence(),
            Change::Delete { sequence, .. } => *sequence,
        }
    }

    /// The value written, or `None` for a delete.
    pub(crate) fn entry(&self) -> Option<&Entry> {
        match self {
            Change::Put(_, entry) => Some(entry),
            Change::Delete { .. } => None,
        }
    }

    /// The change as a KVSYNC: a stored entry as a snapshot sends it, a delete as its
    /// key and sequence with every other frame empty.
    pub(crate) fn kvsync_frames(&self) -> [Frame; FRAME_COUNT] {
        match self {
            Change::Put(key, entry) => Entry::kvsync_frames(entry, key),
            Change::Delete {
                key,
                sequence,
                uuid,
            } => [
                Frame::from(&**key),
                Frame::sequence(*sequence),
                uuid_frame(*uuid),
                Frame::EMPTY,
                Frame::EMPTY,
            ],
        }
    }
}

impl Record {
    pub(crate) fn change(change: Change) -> Self {
        Record(Kind::Change(change))
    }

    pub(crate) fn of_history(history: History) -> Self {
        Record(Kind::History(history))
    }

    /// The key a change of the map wrote or deleted; `None` for a history record.
    pub fn key(&self) -> Option<&[u8]> {
        match &self.0 {
            Kind::Change(change) => Some(change.key()),
            Kind::History(_) => None,
        }
    }

    /// The sequence of a change of the map; `None` for a history record.
    pub fn sequence(&self) -> Option<i64> {
        match &self.0 {
            Kind::Change(change) => Some(change.sequence()),
            Kind::History(_) => None,
        }
    }

    /// The history this records, if it is a history record.
    pub fn history(&self) -> Option<&History> {
        match &self.0 {
            Kind::History(history) => Some(history),
            Kind::Change(_) => None,
        }
    }

    /// Appends the framed record to `out`.
    pub fn encode_into(&self, out: &mut Vec<u8>) {
        frame_into(out, |out| match &self.0 {
            Kind::Change(Change::Put(key, entry)) => put_payload(out, key, entry),
            Kind::Change(Change::Delete { key, sequence, .. }) => {
                out.push(TAG_DELETE);
                out.extend_from_slice(&sequence.to_be_bytes());
                out.extend_from_slice(key);
            }
            Kind::History(history) => history_payload(out, history),
        });
    }
}

fn history_payload(out: &mut Vec<u8>, history: &History) {
    out.push(TAG_HISTORY);
    out.push(u8::from(history.peer_serves_resumes));
    history.lineage.encode_into(out);
}

/// The map and numbering of a server at one point: what a snapshot file holds. Cloning
/// it is O(1) (the map is persistent), so a host may write it while the server goes on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Image {
    map: Map,
    sequence: i64,
    highest_published: i64,
    history: History,
}

impl Image {
    pub(crate) fn new(map: Map, sequence: i64, highest_published: i64, history: History) -> Self {
        Image {
            map,
            sequence,
            highest_published,
            history,
        }
    }

    /// The sequence of the last change it holds.
    pub fn sequence(&self) -> i64 {
        self.sequence
    }

    /// The highest sequence the server ever published (numbering resumes above it).
    pub fn highest_published(&self) -> i64 {
        self.highest_published
    }

    /// Number of keys.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// True when the map is empty.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Appends the image as snapshot records (`STATE HISTORY PUT* END`, without the file
    /// header) to `out`, handing `out` to `flush` whenever it holds at least
    /// `chunk` bytes and once at the end; `flush` is expected to empty it. Returns
    /// the number of keys written, or `flush`'s first error.
    pub fn encode<E>(
        &self,
        out: &mut Vec<u8>,
        chunk: usize,
        mut flush: impl FnMut(&mut Vec<u8>) -> Result<(), E>,
    ) -> Result<u64, E> {
        frame_into(out, |out| {
            out.push(TAG_STATE);
            out.extend_from_slice(&self.sequence.to_be_bytes());
            out.extend_from_slice(&self.highest_published.to_be_bytes());
        });
        frame_into(out, |out| history_payload(out, &self.history));
        let mut entries = 0u64;
        for (key, entry) in self.map.iter() {
            frame_into(out, |out| put_payload(out, key, entry));
            entries += 1;
            if out.len() >= chunk {
                flush(out)?;
            }
        }
        frame_into(out, |out| {
            out.push(TAG_END);
            out.extend_from_slice(&entries.to_be_bytes());
        });
        flush(out)?;
        Ok(entries)
    }
}

/// Why a whole record (its checksum matched) is still refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RecordError {
    /// The payload is empty, has an unknown tag, or its fields do not fit.
    #[error("a record does not decode (unknown tag or short fields)")]
    Malformed,
    /// A key that is empty or longer than 255 bytes.
    #[error("a record holds an empty or over-long key")]
    BadKey,
    /// The stored entry is not well formed.
    #[error("a record's stored entry is not well formed")]
    BadEntry,
}

/// What kind of record [`Restorer::apply`] read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Applied {
    /// A key written.
    Put,
    /// A key deleted.
    Delete,
    /// A snapshot's first record: the sequence and the highest published sequence.
    State,
    /// The map's history (in a snapshot, right after its STATE).
    History,
    /// A snapshot's last record, with the number of keys it says the snapshot holds.
    End {
        /// `PUT` records the snapshot's writer counted.
        entries: u64,
    },
}

/// Rebuilds a server's map and numbering from the payloads of a snapshot and then of
/// its log, in file order.
#[derive(Clone, Debug, Default)]
pub struct Restorer {
    store: Store,
    sequence: i64,
    highest_published: i64,
    history: History,
}

impl Restorer {
    /// An empty map at sequence 0.
    pub fn new() -> Self {
        Restorer::default()
    }

    /// Applies one record's payload (see [`next_record`]). A payload that does not
    /// decode changes nothing; the caller treats it like a damaged record.
    pub fn apply(&mut self, payload: &[u8]) -> Result<Applied, RecordError> {
        let mut reader = Reader(payload);
        match reader.u8().ok_or(RecordError::Malformed)? {
            TAG_PUT => {
                let key_len = reader.u16().ok_or(RecordError::Malformed)?;
                let key = reader
                    .take(usize::from(key_len))
                    .ok_or(RecordError::Malformed)?;
                check_key(key)?;
                let entry = Entry::from_stored(reader.0).ok_or(RecordError::BadEntry)?;
                self.numbered(entry.sequence());
                self.store.insert(Key::from(key), entry);
                Ok(Applied::Put)
            }
            TAG_DELETE => {
                let sequence = reader.i64().ok_or(RecordError::Malformed)?;
                check_key(reader.0)?;
                self.numbered(sequence);
                self.store.remove(reader.0);
                Ok(Applied::Delete)
            }
            TAG_STATE => {
                let sequence = reader.i64().ok_or(RecordError::Malformed)?;
                let highest_published = reader.i64().ok_or(RecordError::Malformed)?;
                if !reader.0.is_empty() {
                    return Err(RecordError::Malformed);
                }
                self.sequence = sequence;
                self.highest_published = highest_published;
                Ok(Applied::State)
            }
            TAG_END => {
                let entries = reader.u64().ok_or(RecordError::Malformed)?;
                if !reader.0.is_empty() {
                    return Err(RecordError::Malformed);
                }
                Ok(Applied::End { entries })
            }
            TAG_HISTORY => {
                let peer_serves_resumes = match reader.u8() {
                    Some(0) => false,
                    Some(1) => true,
                    _ => return Err(RecordError::Malformed),
                };
                let lineage = Lineage::decode(reader.0).ok_or(RecordError::Malformed)?;
                self.history = History {
                    lineage,
                    peer_serves_resumes,
                };
                Ok(Applied::History)
            }
            _ => Err(RecordError::Malformed),
        }
    }

    /// A change numbered `sequence` was applied. A log's changes are this server's own
    /// (published, or applied in the active's order), so the highest of them is the
    /// sequence; counting it as published too can only make numbering skip, never
    /// reuse, a sequence.
    fn numbered(&mut self, sequence: i64) {
        self.sequence = self.sequence.max(sequence);
        self.highest_published = self.highest_published.max(sequence);
    }

    /// The sequence of the last change read.
    pub fn sequence(&self) -> i64 {
        self.sequence
    }

    /// Keys in the map so far.
    pub fn len(&self) -> usize {
        self.store.len()
    }

    /// True when the map is empty.
    pub fn is_empty(&self) -> bool {
        self.store.len() == 0
    }

    /// What was read, to start a server from.
    pub fn finish(self) -> Restored {
        Restored {
            store: self.store,
            sequence: self.sequence,
            highest_published: self.highest_published,
            history: self.history,
        }
    }
}

fn check_key(key: &[u8]) -> Result<(), RecordError> {
    if key.is_empty() || key.len() > usize::from(u8::MAX) {
        return Err(RecordError::BadKey);
    }
    Ok(())
}

/// A map and numbering read back from disk, for
/// [`Server::restore`](super::Server::restore).
#[derive(Clone, Debug, Default)]
pub struct Restored {
    pub(crate) store: Store,
    pub(crate) sequence: i64,
    pub(crate) highest_published: i64,
    pub(crate) history: History,
}

impl Restored {
    /// The sequence of the last change.
    pub fn sequence(&self) -> i64 {
        self.sequence
    }

    /// The highest sequence published.
    pub fn highest_published(&self) -> i64 {
        self.highest_published
    }

    /// Number of keys.
    pub fn len(&self) -> usize {
        self.store.len()
    }

    /// True when the map is empty.
    pub fn is_empty(&self) -> bool {
        self.store.len() == 0
    }

    /// The stored entry for `key`.
    pub fn get(&self, key: &[u8]) -> Option<&Entry> {
        self.store.get(key)
    }

    /// The map's history as recorded.
    pub fn history(&self) -> &History {
        &self.history
    }

    /// The same state as an image, to record (an empty directory's first snapshot).
    pub fn image(&self) -> Image {
        Image::new(
            self.store.map().clone(),
            self.sequence,
            self.highest_published,
            self.history.clone(),
        )
    }
}

/// Big-endian fields off the front of a byte slice.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, len: usize) -> Option<&'a [u8]> {
        if self.0.len() < len {
            return None;
        }
        let (head, rest) = self.0.split_at(len);
        self.0 = rest;
        Some(head)
    }

    fn array<const N: usize>(&mut self) -> Option<[u8; N]> {
        self.take(N).and_then(|bytes| bytes.try_into().ok())
    }

    fn u8(&mut self) -> Option<u8> {
        self.array::<1>().map(|[byte]| byte)
    }

    fn u16(&mut self) -> Option<u16> {
        self.array().map(u16::from_be_bytes)
    }

    fn u32(&mut self) -> Option<u32> {
        self.array().map(u32::from_be_bytes)
    }

    fn u64(&mut self) -> Option<u64> {
        self.array().map(u64::from_be_bytes)
    }

    fn i64(&mut self) -> Option<i64> {
        self.array().map(i64::from_be_bytes)
    }
}

#[cfg(test)]
mod tests;
