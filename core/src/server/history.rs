//! Which history a server's map belongs to, and the recent changes that let a peer at an
//! earlier point of the same history catch up without a full snapshot (PROTOCOL.md §13).
//!
//! A *reign* is one server's time as active: it starts when the server becomes active,
//! from its map at `base` (the sequence of that map's last change), and it numbers every
//! change after that. A [`Lineage`] lists the reigns a map went through, oldest first:
//! a passive adopts its active's lineage with a snapshot, and a server that becomes
//! active appends its new reign.
//!
//! Invariant: while a server's lineage is not empty, its map is the state its
//! lineage's history reached at the server's sequence. Then two servers whose lineages
//! share a reign agree on every map of that reign up to where the later of them left it
//! (the next reign's `base`, or its sequence for the last reign), so a peer whose map
//! stands at sequence `s` of reign `r` needs exactly the changes numbered after `s` —
//! which [`RecentChanges`] keeps while they are few enough. Anything else (a reign the
//! server does not know, a position past where the reign left off, changes already let
//! go) is answered with a full snapshot.

use std::collections::VecDeque;
use std::fmt::Write as _;
use std::hash::Hasher;

use imbl::Vector;
use siphasher::sip::SipHasher13;

use super::persist::Change;
use super::seen::HashKey;
use crate::budget::{message_bytes, Budget, ENTRY_OVERHEAD};
use crate::time::Instant;

/// Most reigns a lineage remembers; an older one is forgotten (a peer still in it gets
/// a full snapshot).
pub const MAX_REIGNS: usize = 16;

/// One server's time as active: its id and the sequence of the map it started from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Reign {
    /// Drawn at random when the reign begins.
    pub id: u64,
    /// The sequence of the map the reign started from; its changes are numbered above.
    pub base: i64,
}

/// The reigns a map went through, oldest first (see the module docs).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Lineage {
    reigns: VecDeque<Reign>,
}

impl Lineage {
    /// The reigns, oldest first.
    pub fn reigns(&self) -> impl Iterator<Item = Reign> + '_ {
        self.reigns.iter().copied()
    }

    /// True when nothing is known of the map's history.
    pub(crate) fn is_empty(&self) -> bool {
        self.reigns.is_empty()
    }

    /// The reign that numbered the map's latest change.
    pub fn current(&self) -> Option<Reign> {
        self.reigns.back().copied()
    }

    /// A new reign starts from the map at `base`. `continues` says whether the map is
    /// still the state of this lineage at `base`; if it is not (a takeover merged what a
    /// sync had half received), the earlier reigns no longer describe it.
    pub fn begin_reign(&mut self, reign: Reign, continues: bool) {
        if !continues {
            self.reigns.clear();
        }
        if self.reigns.len() >= MAX_REIGNS {
            self.reigns.pop_front();
        }
        self.reigns.push_back(reign);
    }

    /// Where reign `id` left the map in this lineage: the base of the reign after it,
    /// or `sequence` (the map's own) for the current one. `None` if it is not here.
    pub fn end_of(&self, id: u64, sequence: i64) -> Option<i64> {
        let index = self.reigns.iter().position(|reign| reign.id == id)?;
        Some(
            self.reigns
                .get(index + 1)
                .map_or(sequence, |next| next.base),
        )
    }

    /// The `history` property text: `<id hex>@<base>` per reign, comma-separated.
    pub fn to_property(&self) -> Vec<u8> {
        let mut text = String::new();
        for (index, reign) in self.reigns.iter().enumerate() {
            if index > 0 {
                text.push(',');
            }
            // Writing to a String cannot fail.
            let _ = write!(text, "{:016x}@{}", reign.id, reign.base);
        }
        text.into_bytes()
    }

    /// Parses a `history` property; `None` if it is malformed or lists more than
    /// [`MAX_REIGNS`] reigns.
    pub fn from_property(text: &[u8]) -> Option<Lineage> {
        let text = std::str::from_utf8(text).ok()?;
        let mut reigns = VecDeque::new();
        if text.is_empty() {
            return Some(Lineage { reigns });
        }
        for part in text.split(',') {
            let (id, base) = part.split_once('@')?;
            if id.len() != 16 || reigns.len() >= MAX_REIGNS {
                return None;
            }
            reigns.push_back(Reign {
                id: u64::from_str_radix(id, 16).ok()?,
                base: base.parse().ok()?,
            });
        }
        Some(Lineage { reigns })
    }

    /// The lineage as the payload bytes of a persisted record (after its tag).
    pub(crate) fn encode_into(&self, out: &mut Vec<u8>) {
        // At most MAX_REIGNS, which fits a byte.
        out.push(u8::try_from(self.reigns.len()).unwrap_or(u8::MAX));
        for reign in &self.reigns {
            out.extend_from_slice(&reign.id.to_be_bytes());
            out.extend_from_slice(&reign.base.to_be_bytes());
        }
    }

    /// Reads what [`Lineage::encode_into`] wrote; `None` if it does not fit.
    pub(crate) fn decode(bytes: &[u8]) -> Option<Lineage> {
        let (&count, mut rest) = bytes.split_first()?;
        if usize::from(count) > MAX_REIGNS || rest.len() != usize::from(count) * 16 {
            return None;
        }
        let mut reigns = VecDeque::new();
        while let Some((id, tail)) = rest.split_first_chunk::<8>() {
            let (base, tail) = tail.split_first_chunk::<8>()?;
            reigns.push_back(Reign {
                id: u64::from_be_bytes(*id),
                base: i64::from_be_bytes(*base),
            });
            rest = tail;
        }
        Some(Lineage { reigns })
    }
}

/// A fresh reign id: unpredictable to anyone without the server's secret key, and
/// distinct for each (time, sequence, count) on one server. Core reads no randomness;
/// the key is the host's random draw.
pub(crate) fn draw_reign_id(key: HashKey, now: Instant, sequence: i64, count: u64) -> u64 {
    let (key0, key1) = key.words();
    let mut hasher = SipHasher13::new_with_keys(key0, key1);
    hasher.write(b"clonekv reign");
    hasher.write_u64(now.as_nanos());
    hasher.write_i64(sequence);
    hasher.write_u64(count);
    hasher.finish()
}

/// The changes a server made to its map after sequence `since`, in order, within a
/// budget: the oldest are let go first (and `since` moves up past them). Cloning is
/// O(1), so a reply being sent reads its own copy while the server goes on.
#[derive(Clone, Debug)]
pub(crate) struct RecentChanges {
    since: i64,
    changes: Vector<Change>,
    bytes: usize,
}

impl RecentChanges {
    /// No changes after `since`.
    pub(crate) fn new(since: i64) -> Self {
        RecentChanges {
            since,
            changes: Vector::new(),
            bytes: 0,
        }
    }

    /// What one change is charged: its message's bytes plus [`ENTRY_OVERHEAD`].
    pub(crate) fn charge(record: &Change) -> usize {
        match record.entry() {
            Some(entry) => message_bytes(
                record.key().len(),
                entry.properties_frame().len(),
                entry.body().len(),
            ),
            None => message_bytes(record.key().len(), 0, 0),
        }
        .max(ENTRY_OVERHEAD)
    }

    /// Keeps `record`, the map's next change, letting the oldest go while the budget
    /// would be passed.
    pub(crate) fn push(&mut self, record: Change, budget: Budget) {
        let incoming = RecentChanges::charge(&record);
        while !budget.admits(self.changes.len(), self.bytes, incoming) {
            let Some(oldest) = self.changes.pop_front() else {
                break;
            };
            self.bytes = self.bytes.saturating_sub(RecentChanges::charge(&oldest));
            self.since = oldest.sequence();
        }
        if budget.admits(self.changes.len(), self.bytes, incoming) {
            self.bytes = self.bytes.saturating_add(incoming);
            self.changes.push_back(record);
        } else {
            // Larger than the whole budget: nothing before it can be served.
            self.since = record.sequence();
        }
    }

    /// The map was replaced as a whole at `sequence`: no change before it is known.
    pub(crate) fn reset(&mut self, sequence: i64) {
        *self = RecentChanges::new(sequence);
    }

    /// The changes after `sequence`, if every one of them is still kept.
    pub(crate) fn after(&self, sequence: i64) -> Option<Vector<Change>> {
        if sequence < self.since {
            return None;
        }
        let skip = self
            .changes
            .iter()
            .take_while(|record| record.sequence() <= sequence)
            .count();
        Some(self.changes.clone().split_off(skip))
    }

    /// Changes kept.
    pub(crate) fn len(&self) -> usize {
        self.changes.len()
    }

    /// The bytes the kept changes are charged.
    pub(crate) fn bytes(&self) -> usize {
        self.bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kvmsg::{KvMsg, Uuid};
    use crate::server::store::{Entry, Key};

    fn delete(sequence: i64) -> Change {
        Change::Delete {
            key: Key::from(&b"/k"[..]),
            sequence,
            uuid: None,
        }
    }

    #[test]
    fn a_reign_ends_where_the_next_one_began() {
        let mut lineage = Lineage::default();
        assert!(lineage.is_empty());
        lineage.begin_reign(Reign { id: 1, base: 0 }, true);
        assert!(!lineage.is_empty());
        lineage.begin_reign(Reign { id: 2, base: 40 }, true);
        assert_eq!(lineage.end_of(1, 90), Some(40));
        assert_eq!(lineage.end_of(2, 90), Some(90));
        assert_eq!(lineage.end_of(3, 90), None);
        lineage.begin_reign(Reign { id: 3, base: 90 }, false);
        assert_eq!(lineage.end_of(1, 95), None, "a merged map forgets its past");
    }

    #[test]
    fn lineage_round_trips_and_stays_bounded() {
        let mut lineage = Lineage::default();
        for id in 0..(MAX_REIGNS as u64 + 3) {
            lineage.begin_reign(
                Reign {
                    id: id.wrapping_mul(0x9e37_79b9_7f4a_7c15),
                    base: id as i64 * 7,
                },
                true,
            );
        }
        assert_eq!(lineage.reigns().count(), MAX_REIGNS);
        assert_eq!(
            Lineage::from_property(&lineage.to_property()),
            Some(lineage.clone())
        );
        let mut bytes = Vec::new();
        lineage.encode_into(&mut bytes);
        assert_eq!(Lineage::decode(&bytes), Some(lineage));
        assert_eq!(Lineage::from_property(b"zz@1"), None);
        assert_eq!(Lineage::from_property(b"0000000000000001@x"), None);
        assert_eq!(Lineage::decode(&[1, 0, 0]), None);
    }

    #[test]
    fn changes_are_served_only_while_all_of_them_are_kept() {
        let budget = Budget {
            max_len: 3,
            max_bytes: usize::MAX,
        };
        let mut recent = RecentChanges::new(10);
        for sequence in 11..=15 {
            recent.push(delete(sequence), budget);
        }
        assert_eq!(recent.len(), 3);
        assert!(recent.after(11).is_none(), "12 was let go");
        let served: Vec<i64> = recent
            .after(12)
            .into_iter()
            .flatten()
            .map(|record| record.sequence())
            .collect();
        assert_eq!(served, vec![13, 14, 15]);
        assert_eq!(recent.after(15).map(|changes| changes.len()), Some(0));
    }

    #[test]
    fn a_property_with_a_short_id_or_too_many_reigns_is_refused() {
        assert_eq!(
            Lineage::from_property(b"1@5"),
            None,
            "ids are 16 hex digits"
        );
        let reign = |id: usize| format!("{id:016x}@{id}");
        let full: Vec<String> = (0..MAX_REIGNS).map(reign).collect();
        let parsed = Lineage::from_property(full.join(",").as_bytes());
        assert_eq!(
            parsed.map(|lineage| lineage.reigns().count()),
            Some(MAX_REIGNS)
        );
        let over: Vec<String> = (0..=MAX_REIGNS).map(reign).collect();
        assert_eq!(Lineage::from_property(over.join(",").as_bytes()), None);
        assert_eq!(Lineage::from_property(b""), Some(Lineage::default()));
    }

    #[test]
    fn reign_ids_differ_with_every_input() {
        use rand_chacha::ChaCha8Rng;
        use rand_core::SeedableRng;
        use std::time::Duration;
        let key = HashKey::from_rng(&mut ChaCha8Rng::seed_from_u64(1));
        let other_key = HashKey::from_rng(&mut ChaCha8Rng::seed_from_u64(2));
        let now = Instant::ZERO + Duration::from_secs(3);
        let id = draw_reign_id(key, now, 10, 1);
        assert_eq!(id, draw_reign_id(key, now, 10, 1), "one input, one id");
        let others = [
            draw_reign_id(other_key, now, 10, 1),
            draw_reign_id(key, now + Duration::from_nanos(1), 10, 1),
            draw_reign_id(key, now, 11, 1),
            draw_reign_id(key, now, 10, 2),
        ];
        for other in others {
            assert_ne!(id, other);
        }
        assert!(
            id > 1 && others.iter().all(|other| *other > 1),
            "drawn, not fixed"
        );
    }

    #[test]
    fn changes_are_charged_their_message_and_let_go_by_bytes() {
        let charge = RecentChanges::charge(&delete(1));
        assert_eq!(charge, ENTRY_OVERHEAD + 2, "key /k, no properties, no body");
        let budget = Budget {
            max_len: 100,
            max_bytes: 2 * charge,
        };
        let mut recent = RecentChanges::new(0);
        recent.push(delete(1), budget);
        recent.push(delete(2), budget);
        assert_eq!((recent.len(), recent.bytes()), (2, 2 * charge));
        recent.push(delete(3), budget);
        assert_eq!((recent.len(), recent.bytes()), (2, 2 * charge));
        assert!(recent.after(0).is_none(), "1 was let go for bytes");
        assert_eq!(recent.after(1).map(|changes| changes.len()), Some(2));

        let tiny = Budget {
            max_len: 100,
            max_bytes: charge - 1,
        };
        recent.push(delete(4), tiny);
        assert_eq!(
            (recent.len(), recent.bytes()),
            (0, 0),
            "larger than the budget"
        );
        assert!(recent.after(3).is_none());
        assert_eq!(recent.after(4).map(|changes| changes.len()), Some(0));
    }

    #[test]
    fn a_put_is_charged_its_key_properties_and_body() {
        let body = vec![b'v'; 1_000];
        let update = KvMsg::kvset(b"/k".to_vec(), body, Uuid::from_bytes([1; 16]));
        let (key, entry) = Entry::from_update(&update.as_msg_ref(), None, &mut Vec::new());
        let properties = entry.properties_frame().len();
        let put = Change::Put(key, entry);
        assert_eq!(
            RecentChanges::charge(&put),
            message_bytes(2, properties, 1_000)
        );
        assert!(RecentChanges::charge(&put) > RecentChanges::charge(&delete(1)));
    }

    #[test]
    fn a_reset_forgets_every_change_before_it() {
        let budget = Budget {
            max_len: 10,
            max_bytes: usize::MAX,
        };
        let mut recent = RecentChanges::new(0);
        for sequence in 1..=3 {
            recent.push(delete(sequence), budget);
        }
        recent.reset(20);
        assert_eq!((recent.len(), recent.bytes()), (0, 0));
        assert!(recent.after(3).is_none());
        assert_eq!(recent.after(20).map(|changes| changes.len()), Some(0));
    }

    proptest::proptest! {
        #[test]
        fn recent_changes_stay_within_budget(
            max_len in 1usize..20,
            max_bytes in 400usize..4000,
            count in 0i64..60,
        ) {
            let budget = Budget { max_len, max_bytes };
            let mut recent = RecentChanges::new(0);
            for sequence in 1..=count {
                recent.push(delete(sequence), budget);
                proptest::prop_assert!(recent.len() <= max_len);
                proptest::prop_assert!(recent.bytes() <= max_bytes);
                let served = recent.after(sequence - 1).map(|changes| changes.len());
                proptest::prop_assert!(served.is_none() || served == Some(1));
            }
        }
    }
}
