//! The stored map and its expiry index.

use std::borrow::Cow;
use std::collections::BTreeSet;
use std::sync::Arc;

use imbl::OrdMap;

use super::frame::Frame;
use crate::budget::ENTRY_OVERHEAD;
use crate::kvmsg::{KvMsgRef, Properties, Uuid, FRAME_COUNT};
use crate::time::EpochMillis;

/// Keys up to this long are stored inline in the map's nodes.
const INLINE_KEY: usize = 22;

/// A stored key. Short keys (most: the zguide's are 12–16 bytes) live inline, with no
/// allocation of their own; longer ones are shared, so that copying a B-tree node (when
/// a snapshot holds the old version) bumps reference counts instead of copying bytes.
/// Either way it is 24 bytes, and it orders, compares and borrows as its bytes.
#[derive(Clone)]
pub(crate) enum Key {
    Inline { len: u8, bytes: [u8; INLINE_KEY] },
    Shared(Arc<[u8]>),
}

impl Key {
    pub(crate) fn as_bytes(&self) -> &[u8] {
        match self {
            Key::Inline { len, bytes } => bytes.get(..usize::from(*len)).unwrap_or_default(),
            Key::Shared(bytes) => bytes,
        }
    }
}

impl Key {
    /// The key, if it is short enough to be stored inline: a key to look up an ordered
    /// index with, at no allocation and with the cheap comparisons of [`Key::cmp`]
    /// instead of a `memcmp` per step. A longer key is looked up by its bytes.
    pub(crate) fn inline(key: &[u8]) -> Option<Key> {
        let mut bytes = [0; INLINE_KEY];
        match (bytes.get_mut(..key.len()), u8::try_from(key.len())) {
            (Some(prefix), Ok(len)) => {
                prefix.copy_from_slice(key);
                Some(Key::Inline { len, bytes })
            }
            _ => None,
        }
    }
}

impl From<&[u8]> for Key {
    fn from(key: &[u8]) -> Self {
        Key::inline(key).unwrap_or_else(|| Key::Shared(Arc::from(key)))
    }
}

impl From<Vec<u8>> for Key {
    fn from(key: Vec<u8>) -> Self {
        Key::from(key.as_slice())
    }
}

impl std::borrow::Borrow<[u8]> for Key {
    fn borrow(&self) -> &[u8] {
        self.as_bytes()
    }
}

impl std::ops::Deref for Key {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        self.as_bytes()
    }
}

impl Key {
    /// An inline key's padded bytes as two big-endian words (bytes 0..16 and 14..22;
    /// the overlap does not matter once the first words are equal), so that comparing
    /// two keys costs two integer comparisons instead of a `memcmp` call: the map's
    /// insert makes ~20 of them per update at a million keys.
    fn words(bytes: &[u8; INLINE_KEY]) -> (u128, u64) {
        (
            bytes
                .first_chunk()
                .map_or(0, |head| u128::from_be_bytes(*head)),
            bytes
                .last_chunk()
                .map_or(0, |tail| u64::from_be_bytes(*tail)),
        )
    }
}

impl PartialEq for Key {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == std::cmp::Ordering::Equal
    }
}

impl Eq for Key {}

impl PartialOrd for Key {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

/// The order of the keys' bytes, whatever their representation.
impl Ord for Key {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        match (self, other) {
            // The unused bytes of an inline key are zero. Where the padded arrays
            // first differ, either both keys have a byte there (the byte order), or
            // only one has, a non-zero one, against the other's padding (the shorter
            // key is a prefix of the longer, which orders first): both agree with the
            // byte order. Equal padded arrays are equal keys, or one is the other
            // followed by zero bytes: the shorter first.
            (
                Key::Inline { len, bytes },
                Key::Inline {
                    len: other_len,
                    bytes: other_bytes,
                },
            ) => Key::words(bytes)
                .cmp(&Key::words(other_bytes))
                .then(len.cmp(other_len)),
            _ => self.as_bytes().cmp(other.as_bytes()),
        }
    }
}

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}", String::from_utf8_lossy(self.as_bytes()))
    }
}

/// The persistent map: cloning it is O(1) and later writes do not disturb the clone.
pub(crate) type Map = OrdMap<Key, Entry>;

/// Where each field of an entry's header lies in its buffer.
mod header {
    use std::ops::Range;
    pub(super) const SEQUENCE: Range<usize> = 0..8;
    pub(super) const EXPIRES_AT: Range<usize> = 8..16;
    /// 1 when the uuid is present.
    pub(super) const HAS_UUID: usize = 16;
    pub(super) const UUID: Range<usize> = 17..33;
    pub(super) const PROPERTIES_LEN: Range<usize> = 33..37;
    pub(super) const LEN: usize = 37;
}

/// One stored value: exactly what a KVSYNC carries for its key.
///
/// Compact, because a million of them make up most of a server's memory: one shared
/// allocation holds a fixed header (sequence, expiry, uuid, the properties frame's
/// length), the properties frame and the body, so a stored update costs a single
/// allocation, and cloning an entry (into a snapshot's batch, or into a frame being
/// sent) is a reference-count increment. "No expiry" is the epoch itself.
#[derive(Clone, PartialEq, Eq)]
pub struct Entry(Arc<[u8]>);

impl Entry {
    /// Builds the stored form of an update, copying its key (inline when short) and
    /// the rest into one allocation: the ttl property, if the value expires, is
    /// rewritten to the absolute expiry in epoch milliseconds (§5).
    /// `scratch` is a buffer reused from one call to the next (its contents do not
    /// matter), so that the entry is assembled without an allocation of its own and
    /// then copied once into its shared allocation.
    pub(crate) fn from_update(
        update: &KvMsgRef,
        expires_at: Option<EpochMillis>,
        scratch: &mut Vec<u8>,
    ) -> (Key, Entry) {
        let properties = match expires_at {
            Some(expires_at) => {
                let mut properties = Properties::from_valid_frame(update.properties);
                properties.set_ttl_expires_at(expires_at);
                Cow::Owned(properties.as_frame().to_vec())
            }
            None => update.normalized_properties(),
        };
        // The decoder bounds the properties frame far below 4 GiB; a larger one could
        // only come from a misconfigured limit, and is then stored without properties
        // rather than mis-split.
        let (properties_len, properties) = match u32::try_from(properties.len()) {
            Ok(len) => (len, &*properties),
            Err(_) => (0, &[][..]),
        };
        let mut head = [0u8; header::LEN];
        let fields: [(std::ops::Range<usize>, &[u8]); 3] = [
            (header::SEQUENCE, &update.sequence.to_be_bytes()),
            // 0 means persistent, so an expiry at the epoch itself (long past) is kept
            // as 1 ms after it.
            (
                header::EXPIRES_AT,
                &expires_at.map_or(0, |at| at.0.max(1)).to_be_bytes(),
            ),
            (header::PROPERTIES_LEN, &properties_len.to_be_bytes()),
        ];
        for (range, bytes) in fields {
            if let Some(field) = head.get_mut(range) {
                field.copy_from_slice(bytes);
            }
        }
        if let Some(uuid) = update.uuid {
            if let Some(flag) = head.get_mut(header::HAS_UUID) {
                *flag = 1;
            }
            if let Some(field) = head.get_mut(header::UUID) {
                field.copy_from_slice(uuid.as_bytes());
            }
        }
        scratch.clear();
        scratch.extend_from_slice(&head);
        scratch.extend_from_slice(properties);
        scratch.extend_from_slice(update.body);
        (Key::from(update.key), Entry(Arc::from(scratch.as_slice())))
    }

    /// The entry's bytes as held in memory (header, properties, body): what a persisted
    /// record stores for it.
    pub(crate) fn stored_bytes(&self) -> &[u8] {
        &self.0
    }

    /// An entry from [`Entry::stored_bytes`], if they are well formed: a whole header,
    /// a properties length within the bytes, a uuid flag of 0 or 1 and a properties
    /// frame that decodes.
    pub(crate) fn from_stored(bytes: &[u8]) -> Option<Entry> {
        let entry = Entry(Arc::from(bytes));
        let flag = *bytes.get(header::HAS_UUID)?;
        let properties_end = header::LEN.checked_add(entry.properties_len())?;
        if bytes.len() < properties_end || flag > 1 {
            return None;
        }
        let properties = bytes.get(header::LEN..properties_end)?;
        if !properties.is_empty() && Properties::decode(properties).is_err() {
            return None;
        }
        Some(entry)
    }

    fn field<const N: usize>(&self, range: std::ops::Range<usize>) -> [u8; N] {
        self.0
            .get(range)
            .and_then(|bytes| bytes.try_into().ok())
            .unwrap_or([0; N])
    }

    fn properties_len(&self) -> usize {
        u32::from_be_bytes(self.field(header::PROPERTIES_LEN)) as usize
    }

    /// The sequence at which the key was last written.
    pub fn sequence(&self) -> i64 {
        i64::from_be_bytes(self.field(header::SEQUENCE))
    }

    /// The uuid of the update that wrote it.
    pub fn uuid(&self) -> Option<Uuid> {
        (self.0.get(header::HAS_UUID) == Some(&1))
            .then(|| Uuid::from_bytes(self.field(header::UUID)))
    }

    /// Its properties, with `ttl` as absolute epoch milliseconds when it expires.
    pub fn properties(&self) -> Properties {
        Properties::from_valid_frame(self.properties_frame())
    }

    /// The properties frame as stored (and sent in a KVSYNC).
    pub(crate) fn properties_frame(&self) -> &[u8] {
        let start = header::LEN;
        self.0
            .get(start..start.saturating_add(self.properties_len()))
            .unwrap_or_default()
    }

    /// The value.
    pub fn body(&self) -> &[u8] {
        self.0
            .get(header::LEN.saturating_add(self.properties_len())..)
            .unwrap_or_default()
    }

    /// When it expires, if it is ephemeral.
    pub fn expires_at(&self) -> Option<EpochMillis> {
        let expires_at = u64::from_be_bytes(self.field(header::EXPIRES_AT));
        (expires_at != 0).then_some(EpochMillis(expires_at))
    }

    /// The KVSYNC for this entry under `key`: every frame as stored, the body and
    /// properties shared with the entry (no copy).
    pub(crate) fn kvsync_frames(entry: &Entry, key: &[u8]) -> [Frame; FRAME_COUNT] {
        [
            Frame::from(key),
            Frame::sequence(entry.sequence()),
            uuid_frame(entry.uuid()),
            Frame::properties_of(entry),
            Frame::body_of(entry),
        ]
    }

    /// The delete published when `entry` expires: its key, a new `sequence`, its uuid
    /// and stored properties, an empty body.
    pub(crate) fn expiry_frames(entry: &Entry, key: &[u8], sequence: i64) -> [Frame; FRAME_COUNT] {
        [
            Frame::from(key),
            Frame::sequence(sequence),
            uuid_frame(entry.uuid()),
            Frame::properties_of(entry),
            Frame::EMPTY,
        ]
    }
}

impl std::fmt::Debug for Entry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Entry")
            .field("sequence", &self.sequence())
            .field("expires_at", &self.expires_at())
            .field("uuid", &self.uuid())
            .field("properties", &self.properties())
            .field("body", &String::from_utf8_lossy(self.body()))
            .finish()
    }
}

/// The uuid frame: 16 bytes, or empty.
pub(crate) fn uuid_frame(uuid: Option<Uuid>) -> Frame {
    uuid.map_or(Frame::EMPTY, |uuid| Frame::from(uuid.as_bytes().as_slice()))
}

/// The map plus an ordered index of expiries, so that finding what is due costs
/// O(log n) whatever the size of the map (the reference sweeps the whole map).
#[derive(Clone, Debug, Default)]
pub(crate) struct Store {
    map: Map,
    /// The sum of [`Store::charge`] over the map's entries.
    bytes: usize,
    expiries: BTreeSet<(EpochMillis, Key)>,
    scratch: Scratch,
}

/// The map's optional bounds ([`crate::server::Config::max_keys`],
/// [`crate::server::Config::max_map_bytes`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct MapLimits {
    pub(crate) max_keys: Option<usize>,
    pub(crate) max_bytes: Option<usize>,
}

/// Which map bound a write would pass.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum MapFull {
    Keys,
    Bytes,
}

/// Bytes a stored update's properties may grow by when its ttl is rewritten to an
/// absolute expiry (`ttl=` and the digits of epoch milliseconds, at most 20).
const TTL_REWRITE_SLACK: usize = 32;

/// The buffer in which entries are assembled; see [`Entry::from_update`].
#[derive(Clone, Default)]
struct Scratch(Vec<u8>);

impl std::fmt::Debug for Scratch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Scratch")
    }
}

impl Store {
    pub(crate) fn map(&self) -> &Map {
        &self.map
    }

    /// What one stored entry is charged: its key, its shared allocation (header,
    /// properties, body) and [`ENTRY_OVERHEAD`] for the map's nodes and the expiry index.
    fn charge(key: &[u8], entry: &Entry) -> usize {
        ENTRY_OVERHEAD
            .saturating_add(key.len())
            .saturating_add(entry.0.len())
    }

    /// Bytes charged for the whole map.
    pub(crate) fn bytes(&self) -> usize {
        self.bytes
    }

    /// The map's bound: whether storing `update` (not a delete) keeps the map within
    /// `limits`. Replacing a key's value counts no new key, and only the difference in
    /// bytes. The new entry is estimated from above (its ttl may be rewritten), so the
    /// map never passes a bound.
    pub(crate) fn admits(&self, update: &KvMsgRef, limits: MapLimits) -> Result<(), MapFull> {
        let previous = self.map.get(update.key);
        let keys_after = self.len().saturating_add(usize::from(previous.is_none()));
        if limits.max_keys.is_some_and(|max| keys_after > max) {
            return Err(MapFull::Keys);
        }
        let incoming = ENTRY_OVERHEAD
            .saturating_add(update.key.len())
            .saturating_add(header::LEN)
            .saturating_add(update.properties.len())
            .saturating_add(1 + TTL_REWRITE_SLACK)
            .saturating_add(update.body.len());
        let bytes_after = self
            .bytes
            .saturating_sub(previous.map_or(0, |entry| Store::charge(update.key, entry)))
            .saturating_add(incoming);
        if limits.max_bytes.is_some_and(|max| bytes_after > max) {
            return Err(MapFull::Bytes);
        }
        Ok(())
    }

    pub(crate) fn len(&self) -> usize {
        self.map.len()
    }

    pub(crate) fn get(&self, key: &[u8]) -> Option<&Entry> {
        self.map.get(key)
    }

    /// Stores `entry` under `key`, replacing (and unindexing) any previous value.
    pub(crate) fn insert(&mut self, key: Key, entry: Entry) {
        if let Some(expires_at) = entry.expires_at() {
            self.expiries.insert((expires_at, key.clone()));
        }
        self.bytes = self.bytes.saturating_add(Store::charge(&key, &entry));
        if let Some(previous) = self.map.insert(key.clone(), entry) {
            self.bytes = self.bytes.saturating_sub(Store::charge(&key, &previous));
            self.unindex(&key, &previous);
        }
    }

    /// Stores the update's value, or removes the key when the update is a delete.
    pub(crate) fn apply(&mut self, update: &KvMsgRef, expires_at: Option<EpochMillis>) {
        if update.is_delete() {
            self.remove(update.key);
        } else {
            self.store_value(update, expires_at);
        }
    }

    /// Stores the value of an update that is not a delete; returns the stored entry
    /// (shared: a clone is a reference count).
    pub(crate) fn store_value(
        &mut self,
        update: &KvMsgRef,
        expires_at: Option<EpochMillis>,
    ) -> Entry {
        let (key, entry) = Entry::from_update(update, expires_at, &mut self.scratch.0);
        self.insert(key, entry.clone());
        entry
    }

    pub(crate) fn remove(&mut self, key: &[u8]) -> Option<(Key, Entry)> {
        let (key, entry) = self.map.remove_with_key(key)?;
        self.bytes = self.bytes.saturating_sub(Store::charge(&key, &entry));
        self.unindex(&key, &entry);
        Some((key, entry))
    }

    fn unindex(&mut self, key: &Key, entry: &Entry) {
        if let Some(expires_at) = entry.expires_at() {
            // The index may already hold the new entry's (expiry, key) when the
            // replacement expires at the same instant; only drop the old one.
            if self.map.get(&**key).and_then(|now| now.expires_at()) != Some(expires_at) {
                self.expiries.remove(&(expires_at, key.clone()));
            }
        }
    }

    /// Number of keys with an expiry.
    #[cfg(test)]
    pub(crate) fn expiry_count(&self) -> usize {
        self.expiries.len()
    }

    /// The earliest expiry in the map.
    pub(crate) fn next_expiry(&self) -> Option<EpochMillis> {
        self.expiries.first().map(|(expires_at, _)| *expires_at)
    }

    /// Removes and returns one entry whose expiry is at or before `wall`.
    pub(crate) fn pop_expired(&mut self, wall: EpochMillis) -> Option<(Key, Entry)> {
        loop {
            let (expires_at, key) = self.expiries.first()?.clone();
            if expires_at > wall {
                return None;
            }
            self.expiries.pop_first();
            // The index and the map change together, so the key is always there; an
            // index entry without its key is skipped rather than trusted.
            if let Some((key, entry)) = self.map.remove_with_key(&*key) {
                self.bytes = self.bytes.saturating_sub(Store::charge(&key, &entry));
                return Some((key, entry));
            }
        }
    }

    pub(crate) fn iter(&self) -> impl Iterator<Item = (&Key, &Entry)> + '_ {
        self.map.iter()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kvmsg::KvMsg;

    #[test]
    fn keys_are_their_bytes_inline_or_shared() {
        let short = Key::from(&b"/weather/london"[..]);
        let exact = Key::from(&[7u8; INLINE_KEY][..]);
        let long = Key::from(vec![b'x'; INLINE_KEY + 1]);
        assert!(matches!(short, Key::Inline { .. }));
        assert!(matches!(exact, Key::Inline { .. }));
        assert!(matches!(long, Key::Shared(_)));
        assert_eq!(&*short, b"/weather/london");
        assert_eq!(exact.as_bytes(), &[7u8; INLINE_KEY]);
        assert_eq!(long.len(), INLINE_KEY + 1);
        assert_eq!(&*Key::from(&b""[..]), b"");
        // Ordered by bytes whatever the representation.
        let mut keys = [
            long.clone(),
            short.clone(),
            Key::from(&b"/a"[..]),
            exact.clone(),
        ];
        keys.sort();
        let sorted: Vec<&[u8]> = keys.iter().map(Key::as_bytes).collect();
        let mut expected = vec![long.as_bytes(), short.as_bytes(), b"/a", exact.as_bytes()];
        expected.sort();
        assert_eq!(sorted, expected);
        assert_eq!(std::mem::size_of::<Key>(), 24);
    }

    #[test]
    fn keys_order_as_their_bytes_across_padding_and_prefixes() {
        // Zero bytes against padding, prefixes, the inline limit, both forms.
        let samples: Vec<Vec<u8>> = vec![
            vec![],
            vec![0],
            vec![0, 0],
            vec![1],
            vec![1, 0],
            vec![0; INLINE_KEY],
            vec![0; INLINE_KEY + 1],
            vec![255; INLINE_KEY],
            vec![255; INLINE_KEY + 1],
            b"key:000000012345".to_vec(),
            b"key:000000012345\0".to_vec(),
            b"key:00000001234".to_vec(),
            [&[7u8; 15][..], &[0, 9][..]].concat(),
            [&[7u8; 16][..], &[0, 9][..]].concat(),
            [&[7u8; 21][..], &[1][..]].concat(),
            [&[7u8; 21][..], &[0][..]].concat(),
            [&[7u8; 21][..], &[1, 0][..]].concat(),
        ];
        for a in &samples {
            for b in &samples {
                let (key_a, key_b) = (Key::from(a.as_slice()), Key::from(b.as_slice()));
                assert_eq!(key_a.cmp(&key_b), a.cmp(b), "{a:?} against {b:?}");
                assert_eq!(key_a == key_b, a == b, "{a:?} against {b:?}");
            }
        }
    }

    proptest::proptest! {
        #[test]
        fn any_two_keys_order_as_their_bytes(
            a in proptest::collection::vec(proptest::prelude::prop_oneof![proptest::prelude::Just(0u8), proptest::prelude::Just(1u8), proptest::prelude::any::<u8>()], 0..30),
            b in proptest::collection::vec(proptest::prelude::prop_oneof![proptest::prelude::Just(0u8), proptest::prelude::Just(1u8), proptest::prelude::any::<u8>()], 0..30),
            shared_prefix in 0usize..30,
        ) {
            // Often a common prefix, as real keys have.
            let b = [a.get(..shared_prefix.min(a.len())).unwrap_or_default(), &b].concat();
            let (key_a, key_b) = (Key::from(a.as_slice()), Key::from(b.as_slice()));
            proptest::prop_assert_eq!(key_a.cmp(&key_b), a.cmp(&b));
            proptest::prop_assert_eq!(key_b.cmp(&key_a), b.cmp(&a));
            proptest::prop_assert_eq!(key_a == key_b, a == b);
        }
    }

    #[test]
    fn an_entry_is_one_shared_allocation() {
        // A fat pointer in the map's nodes; one allocation of the Arc's counts, the
        // header, the properties frame and the body.
        assert_eq!(std::mem::size_of::<Entry>(), 16);
        let update = KvMsg::kvset(b"/k".to_vec(), vec![b'v'; 100], Uuid::from_bytes([9; 16]));
        let (_, entry) = Entry::from_update(&update.as_msg_ref(), None, &mut Vec::new());
        assert_eq!(entry.0.len(), header::LEN + 100);
        assert_eq!(entry.uuid(), Some(Uuid::from_bytes([9; 16])));
        assert_eq!(entry.sequence(), 0);
        let anonymous = KvMsg {
            uuid: None,
            ..update.with_sequence(-7)
        };
        let (_, entry) = Entry::from_update(&anonymous.as_msg_ref(), None, &mut Vec::new());
        assert_eq!(entry.uuid(), None);
        assert_eq!(entry.sequence(), -7);
    }

    #[test]
    fn properties_and_body_are_split_back_exactly() {
        let update = KvMsg::kvset(b"/k".to_vec(), b"value".to_vec(), Uuid::from_bytes([1; 16]))
            .with_ttl(std::time::Duration::from_secs(5));
        let (key, entry) = Entry::from_update(
            &update.as_msg_ref(),
            Some(EpochMillis(1_700_000_005_000)),
            &mut Vec::new(),
        );
        assert_eq!(&*key, b"/k");
        assert_eq!(entry.body(), b"value");
        assert_eq!(entry.properties_frame(), b"ttl=1700000005000\n");
        assert_eq!(entry.properties().get("ttl"), Some(&b"1700000005000"[..]));
        assert_eq!(entry.expires_at(), Some(EpochMillis(1_700_000_005_000)));

        let plain = KvMsg::kvset(b"/p".to_vec(), b"v".to_vec(), Uuid::from_bytes([2; 16]));
        let (_, entry) = Entry::from_update(&plain.as_msg_ref(), None, &mut Vec::new());
        assert_eq!(entry.body(), b"v");
        assert!(entry.properties().is_empty());
        assert_eq!(entry.expires_at(), None);
    }

    #[test]
    fn an_expiry_at_the_epoch_still_expires() {
        let update = KvMsg::kvset(b"/e".to_vec(), b"v".to_vec(), Uuid::from_bytes([3; 16]));
        let (_, entry) =
            Entry::from_update(&update.as_msg_ref(), Some(EpochMillis(0)), &mut Vec::new());
        assert!(entry.expires_at().is_some());
    }
    #[test]
    fn stored_bytes_read_back_only_when_well_formed() {
        let ttl = std::time::Duration::from_secs(5);
        let with_uuid =
            KvMsg::kvset(b"/k".to_vec(), b"v".to_vec(), Uuid::from_bytes([1; 16])).with_ttl(ttl);
        // No uuid, and no body: its bytes end with its properties.
        let bare = KvMsg {
            uuid: None,
            ..KvMsg::kvset(b"/b".to_vec(), Vec::new(), Uuid::from_bytes([2; 16])).with_ttl(ttl)
        };
        let expires_at = Some(EpochMillis(1_700_000_005_000));
        for update in [&with_uuid, &bare] {
            let (_, entry) = Entry::from_update(&update.as_msg_ref(), expires_at, &mut Vec::new());
            let bytes = entry.stored_bytes();
            assert_eq!(
                Entry::from_stored(bytes).map(|back| back.stored_bytes().to_vec()),
                Some(bytes.to_vec()),
                "{update:?}"
            );
            assert!(entry.properties_len() > 2, "{update:?}");
            let cut = bytes.get(..header::LEN + 2).unwrap_or_default();
            assert!(
                Entry::from_stored(cut).is_none(),
                "cut inside its properties"
            );
            let mut flagged = bytes.to_vec();
            if let Some(flag) = flagged.get_mut(header::HAS_UUID) {
                *flag = 2;
            }
            assert!(Entry::from_stored(&flagged).is_none(), "a uuid flag of 2");
            let mut garbled = bytes.to_vec();
            let properties = header::LEN..header::LEN + entry.properties_len();
            garbled
                .get_mut(properties)
                .into_iter()
                .flatten()
                .for_each(|byte| *byte = b'x');
            assert!(
                Entry::from_stored(&garbled).is_none(),
                "properties that do not decode"
            );
        }
    }

    #[test]
    fn keys_and_entries_debug_as_their_fields_in_text() {
        assert_eq!(format!("{:?}", Key::from(&b"/k/a"[..])), "\"/k/a\"");
        let update = KvMsg::kvset(b"/k".to_vec(), b"value".to_vec(), Uuid::from_bytes([1; 16]))
            .with_sequence(7);
        let (_, entry) = Entry::from_update(&update.as_msg_ref(), None, &mut Vec::new());
        let text = format!("{entry:?}");
        for field in [
            "Entry",
            "sequence: 7",
            "expires_at: None",
            "body: \"value\"",
        ] {
            assert!(text.contains(field), "{text}");
        }
        // The assembly buffer's leftovers are no part of the store's state.
        let store = format!("{:?}", Store::default());
        assert!(store.contains("scratch: Scratch }"), "{store}");
    }
    #[test]
    fn the_map_admits_a_write_up_to_its_byte_bound_estimated_from_above() {
        let store = Store::default();
        let update = KvMsg::kvset(b"/k".to_vec(), b"value".to_vec(), Uuid::from_bytes([1; 16]))
            .with_ttl(std::time::Duration::from_secs(5));
        let update = update.as_msg_ref();
        // Its entry, with room for the ttl's rewrite as an absolute expiry.
        let estimate = ENTRY_OVERHEAD
            + update.key.len()
            + header::LEN
            + update.properties.len()
            + 1
            + TTL_REWRITE_SLACK
            + update.body.len();
        let bound = |max_bytes: usize| {
            store.admits(
                &update,
                MapLimits {
                    max_keys: Some(1),
                    max_bytes: Some(max_bytes),
                },
            )
        };
        assert_eq!(bound(estimate), Ok(()));
        assert_eq!(bound(estimate - 1), Err(MapFull::Bytes));
    }
}
