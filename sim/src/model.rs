//! The simulator's ground truth: an independent model built only from what the
//! servers *published*.
//!
//! Every incarnation of a server (a [`HistoryId`]) has one canonical history: every
//! KVPUB it sent (client updates, replays, expiry deletes) in order, and counts of its
//! HUGZ and KTHXBAI. A history is cut into *reigns*, one per stretch as active. A reign
//! starts from a map the model computes itself, never read from the new active:
//!
//! - a fresh incarnation holds nothing;
//! - a passive holds its peer's history replayed to the passive's sequence (a passive
//!   never expires nor changes its map except by installing a snapshot of the active's
//!   history and applying that history's KVPUBs in sequence), and takes over with it;
//!   numbering resumes above every sequence its incarnation already published;
//! - the only exception is a failover in the middle of a sync (`SyncAbandoned`), which
//!   merges a partial snapshot and buffered updates by rules the model does not
//!   re-implement (PROTOCOL.md §7): that reign starts from the machine's map and is
//!   marked [`Origin::Merged`] (counted in the coverage, so its share is visible).
//!
//! Invariants checked against it (each returns a [`Violation`]):
//! - oracle 1: within one incarnation a server never numbers two KVPUBs alike nor goes
//!   back (never reset by a sync or a step-down);
//! - oracle 9: an active's map is its reign replayed; a passive's map after a sync is its
//!   peer's history at the snapshot's KTHXBAI plus the buffered KVPUBs that follow it;
//!   a passive's map at every sequence it reaches is its peer's history at that
//!   sequence; a reign's map is the model's from its first step;
//! - oracle 2 (clients): the client's map after KTHXBAI is the server's reign replayed to
//!   that sequence ([`Model::maps_at`]);
//! - oracle 10: every `Committed { uuid, sequence }` names a KVPUB of that uuid at that
//!   sequence in the serving server's history or the histories it descends from.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;

use clonekv_core::kvmsg::{KvMsg, Uuid};

use crate::network::NodeId;
use crate::oracles::{Oracle, Violation};

/// One incarnation of one server: `(node, incarnation)`.
pub type HistoryId = (NodeId, u32);

/// A server's map as the model sees it: key → value.
pub type Map = BTreeMap<Vec<u8>, Vec<u8>>;

/// A map the model compares with its own without copying it: (key, value) in key order.
/// Oracle 9 compares a server's whole map at every step it moves; a copy per step was
/// most of a run's time.
pub trait MapView {
    /// The entries, in key order.
    fn entries(&self) -> impl Iterator<Item = (&[u8], &[u8])>;

    /// Whether this holds exactly `expected`.
    fn holds_exactly(&self, expected: &Map) -> bool {
        let mut expected = expected.iter();
        let mut actual = self.entries();
        loop {
            match (actual.next(), expected.next()) {
                (None, None) => return true,
                (Some((key, value)), Some((want_key, want_value)))
                    if key == want_key.as_slice() && value == want_value.as_slice() => {}
                _ => return false,
            }
        }
    }

    /// An owned copy (to describe a difference, or to keep).
    fn to_map(&self) -> Map {
        self.entries()
            .map(|(key, value)| (key.to_vec(), value.to_vec()))
            .collect()
    }
}

impl MapView for Map {
    fn entries(&self) -> impl Iterator<Item = (&[u8], &[u8])> {
        self.iter()
            .map(|(key, value)| (key.as_slice(), value.as_slice()))
    }
}

/// Where a reign's first map came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Origin {
    /// A fresh incarnation: the empty map at sequence 0.
    Empty,
    /// The map of `history` replayed to `sequence`: what the server followed (its
    /// peer's history) or held (its own, after a step-down without a completed sync).
    Replayed {
        /// The history.
        history: HistoryId,
        /// Replayed through this sequence.
        sequence: i64,
    },
    /// A failover mid-sync or after a sync the model could not check (harsh network):
    /// the machine's map, which the model does not rebuild.
    Merged {
        /// The point of a history the server's map was before the merge, if the model
        /// knew it: what the merge was applied to.
        after: Option<(HistoryId, i64)>,
    },
}

/// One KVPUB of a history.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Publication {
    /// The key.
    pub key: Vec<u8>,
    /// The update's uuid.
    pub uuid: Option<Uuid>,
    /// The value; empty for a delete.
    pub value: Vec<u8>,
}

/// One stretch of one history as active.
#[derive(Clone, Debug)]
struct Reign {
    base_sequence: i64,
    base: Map,
    origin: Origin,
    /// The reign's KVPUBs, in order: sequence, key, value (empty: delete).
    log: Vec<(i64, Vec<u8>, Vec<u8>)>,
    /// The map after the last KVPUB.
    map: Map,
    sequence: i64,
}

impl Reign {
    fn new(base_sequence: i64, base: Map, origin: Origin) -> Reign {
        Reign {
            base_sequence,
            map: base.clone(),
            base,
            origin,
            log: Vec::new(),
            sequence: base_sequence,
        }
    }

    fn apply(&mut self, sequence: i64, key: &[u8], value: &[u8]) {
        self.log.push((sequence, key.to_vec(), value.to_vec()));
        apply(&mut self.map, key, value);
        self.sequence = sequence;
    }

    fn map_at(&self, sequence: i64) -> Option<Map> {
        if sequence < self.base_sequence || sequence > self.sequence {
            return None;
        }
        if sequence == self.sequence {
            return Some(self.map.clone());
        }
        let mut map = self.base.clone();
        for (at, key, value) in &self.log {
            if *at > sequence {
                break;
            }
            apply(&mut map, key, value);
        }
        Some(map)
    }
}

fn apply(map: &mut Map, key: &[u8], value: &[u8]) {
    if value.is_empty() {
        map.remove(key);
    } else {
        map.insert(key.to_vec(), value.to_vec());
    }
}

/// The canonical history of one server incarnation.
#[derive(Clone, Debug, Default)]
struct ServerHistory {
    /// Newest last. The first is the empty map at sequence 0 of a fresh incarnation.
    reigns: Vec<Reign>,
    /// Every KVPUB, by sequence (unique within an incarnation: oracle 1).
    publications: BTreeMap<i64, Publication>,
    /// True while the server is active (its last reign is open).
    reigning: bool,
}

/// What a passive received of one peer history.
#[derive(Clone, Debug, Default)]
struct Receipts {
    /// Per key, the latest KVPUB: sequence, uuid, and whether it deletes.
    latest: BTreeMap<Vec<u8>, (i64, Option<Uuid>, bool)>,
    /// Every sequence received.
    sequences: BTreeSet<i64>,
}

/// What the model says a server's map is, when it knows.
#[derive(Clone, Debug)]
struct Belief {
    /// The history the map is a point of.
    history: HistoryId,
    /// Its sequence.
    sequence: i64,
    map: Map,
}

/// Counts that show how much the model checked (part of the coverage report).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ModelStats {
    /// Reigns that began from a map the model rebuilt.
    pub reigns_replayed: u64,
    /// Reigns that began from a merged map (a failover mid-sync, or a harsh world's sync).
    pub reigns_merged: u64,
    /// Passive syncs whose installed map was checked against the peer's history.
    pub syncs_checked: u64,
    /// `Committed` events checked against the histories.
    pub commits_checked: u64,
    /// HUGZ published by actives, each checked to carry the reign's sequence.
    pub hugz_checked: u64,
    /// Takeovers that replayed a late client copy of an update whose KVPUB the server
    /// never received over a newer value it did receive (CHP's known limit: a copy
    /// carries no sequence).
    pub late_copies_replayed_after_a_gap: u64,
}

impl ModelStats {
    /// Adds another run's counts.
    pub fn merge(&mut self, other: &ModelStats) {
        self.reigns_replayed += other.reigns_replayed;
        self.reigns_merged += other.reigns_merged;
        self.syncs_checked += other.syncs_checked;
        self.commits_checked += other.commits_checked;
        self.hugz_checked += other.hugz_checked;
        self.late_copies_replayed_after_a_gap += other.late_copies_replayed_after_a_gap;
    }
}

/// The model: every history, and what it believes each live server holds.
#[derive(Debug, Default)]
pub struct Model {
    histories: BTreeMap<HistoryId, ServerHistory>,
    /// Per server node: its current incarnation, if it runs.
    current: BTreeMap<NodeId, u32>,
    /// Per running server: its map as the model derives it (None: unknown since a merge
    /// the model does not rebuild, until its next checked sync).
    beliefs: BTreeMap<NodeId, Option<Belief>>,
    /// Per server, since it last became active: the latest KVPUB per key it received
    /// from each peer history (sequence, uuid), whatever it did with it.
    received: BTreeMap<NodeId, BTreeMap<HistoryId, Receipts>>,
    /// What was checked.
    pub stats: ModelStats,
}

impl Model {
    /// A server incarnation starts: empty map, sequence 0, nothing published.
    pub fn server_started(&mut self, node: NodeId, incarnation: u32) {
        let id = (node, incarnation);
        self.current.insert(node, incarnation);
        self.received.remove(&node);
        self.histories.insert(
            id,
            ServerHistory {
                reigns: vec![Reign::new(0, Map::new(), Origin::Empty)],
                ..ServerHistory::default()
            },
        );
        self.beliefs.insert(
            node,
            Some(Belief {
                history: id,
                sequence: 0,
                map: Map::new(),
            }),
        );
    }

    /// A passive `node` was handed a KVPUB of history `from` (applied, buffered or
    /// dropped as stale: it has it either way).
    pub fn received(&mut self, node: NodeId, from: HistoryId, message: &KvMsg) {
        let receipts = self
            .received
            .entry(node)
            .or_default()
            .entry(from)
            .or_default();
        receipts.sequences.insert(message.sequence);
        let latest = receipts.latest.entry(message.key.clone()).or_insert((
            message.sequence,
            message.uuid,
            message.body.is_empty(),
        ));
        if message.sequence >= latest.0 {
            *latest = (message.sequence, message.uuid, message.body.is_empty());
        }
    }

    /// Oracles 3 and 5 at a takeover, from the model, for what the server received of
    /// `peer`'s history beyond the point of it the model knew the server held (its
    /// reign's base, or the map a failover mid-sync merged into: what the merge, which
    /// the model does not rebuild, had to keep). A server that received the
    /// KVPUB of `peer` at sequence `s` for a key
    /// - does not hold, once active, an update of that key that `peer` published before
    ///   `s` (and not since): in `peer`'s history that update is older (oracle 3);
    /// - does not lack the key if that KVPUB set a value, unless it published a delete of
    ///   the key in the takeover step (an expiry): it received the write (oracle 5).
    ///
    /// `entries` is the new active's map after the step: key and the uuid of its entry;
    /// `published` the uuids and the deleted keys of the step's KVPUBs. What it received
    /// is forgotten (a reign begins).
    ///
    /// One case is CHP's known limit (docs/DECISIONS.md, "a late copy of an update lost
    /// in a gap"), excused and counted: the held update is a client copy replayed at the
    /// takeover, its KVPUB never reached this server, and either no snapshot this reign
    /// is based on held it or the copy arrived after that snapshot's request
    /// (`copies_after_base`: the uuids of such copies), when only a snapshot storing
    /// its very uuid could settle it. A copy carries no sequence: it may be that lost
    /// update, or a write the active published after everything this server received,
    /// or never.
    pub fn check_takeover_keeps_received<'a>(
        &mut self,
        node: NodeId,
        peer: HistoryId,
        entries: impl Iterator<Item = (&'a [u8], Option<Uuid>)>,
        replayed: &BTreeSet<Option<Uuid>>,
        copies_after_base: &BTreeSet<Option<Uuid>>,
        deleted: &BTreeSet<Vec<u8>>,
    ) -> Result<(), Violation> {
        let based_through = self
            .current_id(node)
            .and_then(|id| self.histories.get(&id))
            .and_then(|history| history.reigns.last())
            .and_then(|reign| match reign.origin {
                Origin::Replayed { history, sequence } if history == peer => Some(sequence),
                Origin::Merged {
                    after: Some((history, sequence)),
                } if history == peer => Some(sequence),
                _ => None,
            });
        let Some(mut received) = self.received.remove(&node) else {
            return Ok(());
        };
        let Some(Receipts {
            mut latest,
            sequences,
        }) = received.remove(&peer)
        else {
            return Ok(());
        };
        let Some(history) = self.histories.get(&peer) else {
            return Ok(());
        };
        // What the reign's base holds is the model's, checked by oracle 9.
        latest.retain(|_, (at, _, _)| based_through.is_none_or(|through| *at > through));
        let mut missing: BTreeSet<&Vec<u8>> = latest
            .iter()
            .filter(|(key, (_, _, delete))| !delete && !deleted.contains(*key))
            .map(|(key, _)| key)
            .collect();
        for (key, uuid) in entries {
            missing.remove(&key.to_vec());
            let Some((received_at, received_uuid, _)) = latest.get(key) else {
                continue;
            };
            // The newest publication of the held update in the peer's history.
            let held_at = history
                .publications
                .iter()
                .rev()
                .find(|(_, publication)| {
                    publication.key == key
                        && publication.uuid == uuid
                        && !publication.value.is_empty()
                })
                .map(|(at, _)| *at);
            let Some(held_at) = held_at else {
                continue;
            };
            let same_update = uuid == *received_uuid && held_at == *received_at;
            let ambiguous_copy = replayed.contains(&uuid)
                && !sequences.contains(&held_at)
                && (based_through.is_none_or(|through| through < held_at)
                    || copies_after_base.contains(&uuid));
            if held_at < *received_at && !same_update && ambiguous_copy {
                self.stats.late_copies_replayed_after_a_gap += 1;
                continue;
            }
            if held_at < *received_at && !same_update {
                return Err(Violation::new(
                    Oracle::NoRegression,
                    format!(
                        "server {node} became active holding {} as server {} (incarnation {}) published it at sequence {held_at}, though it had received that history's later update of the key at sequence {received_at}",
                        String::from_utf8_lossy(key),
                        peer.0,
                        peer.1
                    ),
                ));
            }
        }
        if let Some(key) = missing.first() {
            let (at, _, _) = latest.get(*key).copied().unwrap_or_default();
            return Err(Violation::new(
                Oracle::FailoverKeepsUpdates,
                format!(
                    "server {node} became active without {}, though it had received the KVPUB that set it (sequence {at} of server {}, incarnation {}) and nothing of that history after it for the key",
                    String::from_utf8_lossy(key),
                    peer.0,
                    peer.1
                ),
            ));
        }
        Ok(())
    }

    /// A server crashed: its history is closed (what it published stays).
    pub fn server_crashed(&mut self, node: NodeId) {
        self.received.remove(&node);
        if let Some(incarnation) = self.current.remove(&node) {
            if let Some(history) = self.histories.get_mut(&(node, incarnation)) {
                history.reigning = false;
            }
        }
        self.beliefs.remove(&node);
    }

    fn current_id(&self, node: NodeId) -> Option<HistoryId> {
        self.current
            .get(&node)
            .map(|incarnation| (node, *incarnation))
    }

    /// True while `node`'s current incarnation is active in the model.
    pub fn is_reigning(&self, node: NodeId) -> bool {
        self.current_id(node)
            .and_then(|id| self.histories.get(&id))
            .is_some_and(|history| history.reigning)
    }

    /// `node` became active from what the model believes it held: a passive following
    /// its peer, or a server that never synced. Returns false when the model does not
    /// know that map (call [`Model::begin_merged_reign`] after the step instead).
    pub fn begin_replayed_reign(&mut self, node: NodeId) -> bool {
        let Some(id) = self.current_id(node) else {
            return false;
        };
        let Some(Some(belief)) = self.beliefs.get(&node).cloned() else {
            return false;
        };
        let Some(history) = self.histories.get_mut(&id) else {
            return false;
        };
        // Numbering resumes above everything this incarnation published.
        let published = history
            .publications
            .keys()
            .next_back()
            .copied()
            .unwrap_or(0);
        let base_sequence = belief.sequence.max(published);
        history.reigns.push(Reign::new(
            base_sequence,
            belief.map,
            Origin::Replayed {
                history: belief.history,
                sequence: belief.sequence,
            },
        ));
        history.reigning = true;
        self.beliefs.insert(node, None);
        self.stats.reigns_replayed += 1;
        true
    }

    /// `node` became active from a map the model does not rebuild (a failover mid-sync):
    /// the reign starts from the machine's map after the step, publications included.
    pub fn begin_merged_reign(&mut self, node: NodeId, sequence: i64, map: Map) {
        let Some(id) = self.current_id(node) else {
            return;
        };
        let after = self
            .beliefs
            .get(&node)
            .and_then(Option::as_ref)
            .map(|belief| (belief.history, belief.sequence));
        let Some(history) = self.histories.get_mut(&id) else {
            return;
        };
        history
            .reigns
            .push(Reign::new(sequence, map, Origin::Merged { after }));
        history.reigning = true;
        self.beliefs.insert(node, None);
        self.stats.reigns_merged += 1;
    }

    /// `node` stopped being active: it holds its reign's map until a sync replaces it.
    pub fn end_reign(&mut self, node: NodeId) {
        let Some(id) = self.current_id(node) else {
            return;
        };
        let Some(history) = self.histories.get_mut(&id) else {
            return;
        };
        history.reigning = false;
        let belief = history.reigns.last().map(|reign| Belief {
            history: id,
            sequence: reign.sequence,
            map: reign.map.clone(),
        });
        self.beliefs.insert(node, belief);
    }

    /// Oracle 1 and the history: `node` published this KVPUB.
    pub fn published(&mut self, node: NodeId, message: &KvMsg) -> Result<(), Violation> {
        let Some(id) = self.current_id(node) else {
            return Ok(());
        };
        let Some(history) = self.histories.get_mut(&id) else {
            return Ok(());
        };
        if let Some(last) = history.publications.keys().next_back() {
            if message.sequence <= *last {
                return Err(Violation::new(
                    Oracle::SequencesIncrease,
                    format!(
                        "server {node} (incarnation {}) published sequence {} after {last}: an incarnation never numbers a KVPUB at or below one it published",
                        id.1, message.sequence
                    ),
                ));
            }
        }
        history.publications.insert(
            message.sequence,
            Publication {
                key: message.key.clone(),
                uuid: message.uuid,
                value: message.body.clone(),
            },
        );
        if history.reigning {
            if let Some(reign) = history.reigns.last_mut() {
                reign.apply(message.sequence, &message.key, &message.body);
            }
        }
        Ok(())
    }

    /// An active's HUGZ carries its reign's sequence.
    pub fn heartbeat(&mut self, node: NodeId, sequence: i64) -> Result<(), Violation> {
        let Some(reign) = self
            .current_id(node)
            .and_then(|id| self.histories.get(&id))
            .filter(|history| history.reigning)
            .and_then(|history| history.reigns.last())
        else {
            return Ok(());
        };
        self.stats.hugz_checked += 1;
        if sequence != reign.sequence {
            return Err(Violation::new(
                Oracle::MapIsHistory,
                format!(
                    "active {node} sent HUGZ at sequence {sequence}, but its history is at {}",
                    reign.sequence
                ),
            ));
        }
        Ok(())
    }

    /// Oracle 9 at an active: its map and sequence after a step are its reign's.
    pub fn check_active(
        &self,
        node: NodeId,
        sequence: i64,
        map: &impl MapView,
        what: &str,
    ) -> Result<(), Violation> {
        let Some((id, reign)) = self.current_id(node).and_then(|id| {
            self.histories
                .get(&id)
                .filter(|history| history.reigning)
                .and_then(|history| history.reigns.last())
                .map(|reign| (id, reign))
        }) else {
            return Ok(());
        };
        if sequence != reign.sequence || !map.holds_exactly(&reign.map) {
            let map = map.to_map();
            return Err(Violation::new(
                Oracle::MapIsHistory,
                format!(
                    "active {node} {what}: its map ({} keys, sequence {sequence}) is not its history's ({} keys, sequence {}, reign from {:?}, incarnation {}){}",
                    map.len(),
                    reign.map.len(),
                    reign.sequence,
                    reign.origin,
                    id.1,
                    first_difference(&map, &reign.map)
                ),
            ));
        }
        Ok(())
    }

    /// The map of `history` at `sequence`, then its KVPUBs through `through` (each must
    /// exist: a passive applies them in sequence), for every reign that covers
    /// `sequence`, newest first.
    fn replays(&self, history: HistoryId, sequence: i64, through: i64) -> Vec<Map> {
        let Some(server) = self.histories.get(&history) else {
            return Vec::new();
        };
        server
            .reigns
            .iter()
            .rev()
            .filter_map(|reign| reign.map_at(sequence))
            .filter_map(|mut map| {
                for at in sequence.saturating_add(1)..=through {
                    let publication = server.publications.get(&at)?;
                    apply(&mut map, &publication.key, &publication.value);
                }
                Some(map)
            })
            .collect()
    }

    /// Oracle 9 at a passive that installed a snapshot of `peer` at `snapshot_sequence`
    /// and, in the same step, applied the buffered KVPUBs through `sequence`.
    /// `checkable` is false in a harsh world (a reordered KTHXBAI can overtake entries
    /// of its own reply, which CHP cannot notice): the model then stops knowing the map.
    pub fn sync_completed(
        &mut self,
        node: NodeId,
        peer: HistoryId,
        snapshot_sequence: i64,
        sequence: i64,
        map: &Map,
        checkable: bool,
    ) -> Result<(), Violation> {
        if !checkable {
            self.beliefs.insert(node, None);
            return Ok(());
        }
        self.stats.syncs_checked += 1;
        let candidates = self.replays(peer, snapshot_sequence, sequence);
        if candidates.iter().any(|candidate| candidate == map) {
            self.beliefs.insert(
                node,
                Some(Belief {
                    history: peer,
                    sequence,
                    map: map.clone(),
                }),
            );
            return Ok(());
        }
        let difference = candidates
            .first()
            .map(|expected| first_difference(map, expected))
            .unwrap_or_default();
        Err(Violation::new(
            Oracle::MapIsHistory,
            format!(
                "server {node} installed a snapshot of server {} (incarnation {}) at KTHXBAI {snapshot_sequence} and is at sequence {sequence} with {} keys, which matches none of that history's {} maps there{difference}",
                peer.0,
                peer.1,
                map.len(),
                candidates.len()
            ),
        ))
    }

    /// Oracle 9 at a passive after a step: if its sequence moved, it applied its
    /// history's KVPUBs in order and its map is that history's at the new sequence.
    pub fn passive_step(
        &mut self,
        node: NodeId,
        sequence: i64,
        map: &impl MapView,
    ) -> Result<(), Violation> {
        let Some(Some(belief)) = self.beliefs.get_mut(&node) else {
            return Ok(());
        };
        if belief.sequence == sequence {
            return Ok(());
        }
        let (history, from) = (belief.history, belief.sequence);
        let Some(server) = self.histories.get(&history) else {
            return Ok(());
        };
        // Moved forward in place: a violation ends the run, so the belief is only ever
        // read again when the map matched it.
        let mut missing = None;
        if sequence < from {
            missing = Some(sequence);
        } else {
            for at in from.saturating_add(1)..=sequence {
                match server.publications.get(&at) {
                    Some(publication) => {
                        apply(&mut belief.map, &publication.key, &publication.value)
                    }
                    None => {
                        missing = Some(at);
                        break;
                    }
                }
            }
        }
        if missing.is_some() || !map.holds_exactly(&belief.map) {
            let why = match missing {
                Some(at) => format!(
                    "server {} (incarnation {}) never published sequence {at} after {from}",
                    history.0, history.1
                ),
                None => first_difference(&map.to_map(), &belief.map),
            };
            return Err(Violation::new(
                Oracle::MapIsHistory,
                format!(
                    "passive {node} following server {} (incarnation {}) moved from sequence {from} to {sequence} with a map that is not that history's: {why}",
                    history.0, history.1
                ),
            ));
        }
        belief.sequence = sequence;
        Ok(())
    }

    /// Every map `node` had at `sequence` as active, newest incarnation and reign
    /// first (oracle 2's candidates for a client's snapshot).
    pub fn maps_at(&self, node: NodeId, sequence: i64) -> Vec<Map> {
        self.histories
            .range((node, 0)..=(node, u32::MAX))
            .rev()
            .flat_map(|(_, history)| {
                history
                    .reigns
                    .iter()
                    .rev()
                    .filter_map(move |reign| reign.map_at(sequence))
            })
            .collect()
    }

    /// Oracle 10: `Committed { uuid, sequence }` from server `node` names a KVPUB of
    /// `uuid` at `sequence` in one of `node`'s histories or in one they descend from (a
    /// snapshot entry keeps the sequence of the history it was first published in).
    pub fn check_committed(
        &mut self,
        client: NodeId,
        node: NodeId,
        uuid: Uuid,
        sequence: i64,
    ) -> Result<(), Violation> {
        self.stats.commits_checked += 1;
        let mut queue: Vec<HistoryId> = self
            .histories
            .range((node, 0)..=(node, u32::MAX))
            .map(|(id, _)| *id)
            .collect();
        let mut visited = BTreeSet::new();
        while let Some(id) = queue.pop() {
            if !visited.insert(id) {
                continue;
            }
            let Some(history) = self.histories.get(&id) else {
                continue;
            };
            if history
                .publications
                .get(&sequence)
                .is_some_and(|publication| publication.uuid == Some(uuid))
            {
                return Ok(());
            }
            for reign in &history.reigns {
                match reign.origin {
                    Origin::Empty => {}
                    Origin::Replayed { history, .. } => queue.push(history),
                    // A merge holds entries of the peer's histories.
                    Origin::Merged { .. } => queue.extend(self.histories.keys().copied()),
                }
            }
        }
        let mut detail = format!(
            "client {client} was told that server {node} committed {uuid} at sequence {sequence}, but no history it descends from published that uuid there"
        );
        let elsewhere: Vec<(HistoryId, i64)> = self
            .histories
            .iter()
            .flat_map(|(id, history)| {
                history
                    .publications
                    .iter()
                    .filter(|(_, publication)| publication.uuid == Some(uuid))
                    .map(move |(at, _)| (*id, *at))
            })
            .collect();
        let _ = write!(detail, " (published at {elsewhere:?})");
        Err(Violation::new(Oracle::AcknowledgedWrites, detail))
    }
}

/// The first key on which two maps differ, for a failure message.
pub fn first_difference(actual: &Map, expected: &Map) -> String {
    let keys: BTreeSet<&Vec<u8>> = actual.keys().chain(expected.keys()).collect();
    for key in keys {
        let (a, e) = (actual.get(key), expected.get(key));
        if a != e {
            let show = |value: Option<&Vec<u8>>| {
                value.map_or("absent".to_string(), |value| {
                    format!("{:?}", String::from_utf8_lossy(value))
                })
            };
            return format!(
                "; first difference at {}: has {}, history has {}",
                String::from_utf8_lossy(key),
                show(a),
                show(e)
            );
        }
    }
    String::new()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kvpub(key: &str, sequence: i64, uuid: u8, value: &str) -> KvMsg {
        let mut message = KvMsg::kvset(
            key.as_bytes().to_vec(),
            value.as_bytes().to_vec(),
            Uuid::from_bytes([uuid; 16]),
        );
        message.sequence = sequence;
        message
    }

    fn map(entries: &[(&str, &str)]) -> Map {
        entries
            .iter()
            .map(|(key, value)| (key.as_bytes().to_vec(), value.as_bytes().to_vec()))
            .collect()
    }

    #[test]
    fn an_incarnation_never_numbers_below_what_it_published_even_after_a_sync() {
        let mut model = Model::default();
        model.server_started(0, 0);
        model.server_started(1, 0);
        assert!(model.begin_replayed_reign(0));
        model.published(0, &kvpub("a", 1, 1, "v1")).unwrap();
        model.published(0, &kvpub("a", 2, 2, "v2")).unwrap();
        model.end_reign(0);
        // The peer took over with a lower history; server 0 synced with it.
        assert!(model.begin_replayed_reign(1));
        model.published(1, &kvpub("b", 1, 3, "w")).unwrap();
        model
            .sync_completed(0, (1, 0), 1, 1, &map(&[("b", "w")]), true)
            .unwrap();
        model.end_reign(1);
        assert!(model.begin_replayed_reign(0));
        let error = model.published(0, &kvpub("c", 2, 4, "x")).unwrap_err();
        assert_eq!(error.oracle, Oracle::SequencesIncrease);
        model.published(0, &kvpub("c", 3, 4, "x")).unwrap();
        model
            .check_active(0, 3, &map(&[("b", "w"), ("c", "x")]), "published")
            .unwrap();
    }

    #[test]
    fn a_passive_holds_its_peers_history_at_its_sequence() {
        let mut model = Model::default();
        model.server_started(0, 0);
        model.server_started(1, 0);
        assert!(model.begin_replayed_reign(0));
        model.published(0, &kvpub("a", 1, 1, "v1")).unwrap();
        model.published(0, &kvpub("b", 2, 2, "w")).unwrap();
        model.published(0, &kvpub("a", 3, 3, "v3")).unwrap();
        // Snapshot at 2, the buffered KVPUB 3 applied: the history at 3.
        model
            .sync_completed(1, (0, 0), 2, 3, &map(&[("a", "v3"), ("b", "w")]), true)
            .unwrap();
        // Installing the snapshot without the buffered update is not the history at 3.
        let error = model
            .sync_completed(1, (0, 0), 2, 3, &map(&[("a", "v1"), ("b", "w")]), true)
            .unwrap_err();
        assert_eq!(error.oracle, Oracle::MapIsHistory);
        model.published(0, &kvpub("b", 4, 4, "")).unwrap();
        model.passive_step(1, 4, &map(&[("a", "v3")])).unwrap();
        let error = model.passive_step(1, 5, &map(&[("a", "v3")])).unwrap_err();
        assert_eq!(error.oracle, Oracle::MapIsHistory);
    }

    #[test]
    fn a_reign_starts_from_the_model_not_from_the_machine() {
        let mut model = Model::default();
        model.server_started(0, 0);
        model.server_started(1, 0);
        assert!(model.begin_replayed_reign(0));
        model.published(0, &kvpub("a", 1, 1, "v1")).unwrap();
        model
            .sync_completed(1, (0, 0), 1, 1, &map(&[("a", "v1")]), true)
            .unwrap();
        model.server_crashed(0);
        assert!(model.begin_replayed_reign(1));
        // The backup lost the key at takeover: the machine's map is not the model's.
        let error = model
            .check_active(1, 1, &Map::new(), "became active")
            .unwrap_err();
        assert_eq!(error.oracle, Oracle::MapIsHistory);
        model
            .check_active(1, 1, &map(&[("a", "v1")]), "became active")
            .unwrap();
    }

    #[test]
    fn a_takeover_keeps_what_it_received_beyond_its_base() {
        let uuid = |n: u8| Some(Uuid::from_bytes([n; 16]));
        let setup = || {
            let mut model = Model::default();
            model.server_started(0, 0);
            model.server_started(1, 0);
            assert!(model.begin_replayed_reign(0));
            for (sequence, key, n, value) in
                [(1, "x", 1, "old"), (2, "y", 2, "v"), (3, "x", 3, "new")]
            {
                model.published(0, &kvpub(key, sequence, n, value)).unwrap();
            }
            // The backup received #1 and #3, missed #2, and takes over mid-sync.
            model.received(1, (0, 0), &kvpub("x", 1, 1, "old"));
            model.received(1, (0, 0), &kvpub("x", 3, 3, "new"));
            model.server_crashed(0);
            model.begin_merged_reign(1, 3, Map::new());
            model
        };
        let none = BTreeSet::new();
        // Holding the older update of x goes back in the history it received.
        let error = setup()
            .check_takeover_keeps_received(
                1,
                (0, 0),
                [(&b"x"[..], uuid(1))].into_iter(),
                &none,
                &none,
                &BTreeSet::new(),
            )
            .unwrap_err();
        assert_eq!(error.oracle, Oracle::NoRegression);
        // Lacking x loses what it received.
        let error = setup()
            .check_takeover_keeps_received(
                1,
                (0, 0),
                std::iter::empty(),
                &none,
                &none,
                &BTreeSet::new(),
            )
            .unwrap_err();
        assert_eq!(error.oracle, Oracle::FailoverKeepsUpdates);
        // An expiry published at the takeover removes it rightly.
        setup()
            .check_takeover_keeps_received(
                1,
                (0, 0),
                std::iter::empty(),
                &none,
                &none,
                &BTreeSet::from([b"x".to_vec()]),
            )
            .unwrap();
        setup()
            .check_takeover_keeps_received(
                1,
                (0, 0),
                [(&b"x"[..], uuid(3))].into_iter(),
                &none,
                &none,
                &BTreeSet::new(),
            )
            .unwrap();
    }

    #[test]
    fn a_late_copy_of_an_update_lost_in_a_gap_is_counted_not_failed() {
        let mut model = Model::default();
        model.server_started(0, 0);
        model.server_started(1, 0);
        assert!(model.begin_replayed_reign(0));
        model.published(0, &kvpub("x", 1, 1, "older")).unwrap();
        model.published(0, &kvpub("x", 2, 2, "newer")).unwrap();
        model.received(1, (0, 0), &kvpub("x", 2, 2, "newer"));
        model.server_crashed(0);
        model.begin_merged_reign(1, 3, Map::new());
        // The copy of #1, never received as a KVPUB, replayed at the takeover.
        let replayed = BTreeSet::from([Some(Uuid::from_bytes([1; 16]))]);
        let entries = [(&b"x"[..], Some(Uuid::from_bytes([1; 16])))];
        model
            .check_takeover_keeps_received(
                1,
                (0, 0),
                entries.into_iter(),
                &replayed,
                &BTreeSet::new(),
                &BTreeSet::new(),
            )
            .unwrap();
        assert_eq!(model.stats.late_copies_replayed_after_a_gap, 1);
    }

    #[test]
    fn a_copy_that_arrived_after_the_base_snapshots_request_is_that_limit_too() {
        // Swarm 312254343679: the snapshot the reign is based on held a newer value of
        // the key; the copy of an older update arrived after that snapshot's request,
        // so the snapshot could not settle it (only its own uuid there could).
        let setup = || {
            let mut model = Model::default();
            model.server_started(0, 0);
            model.server_started(1, 0);
            assert!(model.begin_replayed_reign(0));
            model.published(0, &kvpub("x", 1, 1, "older")).unwrap();
            model.published(0, &kvpub("x", 2, 2, "mid")).unwrap();
            model
                .sync_completed(1, (0, 0), 2, 2, &map(&[("x", "mid")]), true)
                .unwrap();
            model.published(0, &kvpub("x", 3, 3, "newer")).unwrap();
            model.received(1, (0, 0), &kvpub("x", 3, 3, "newer"));
            model.server_crashed(0);
            model.begin_merged_reign(1, 4, Map::new());
            model
        };
        let copy = BTreeSet::from([Some(Uuid::from_bytes([1; 16]))]);
        let entries = [(&b"x"[..], Some(Uuid::from_bytes([1; 16])))];
        let mut after_request = setup();
        after_request
            .check_takeover_keeps_received(
                1,
                (0, 0),
                entries.into_iter(),
                &copy,
                &copy,
                &BTreeSet::new(),
            )
            .unwrap();
        assert_eq!(after_request.stats.late_copies_replayed_after_a_gap, 1);
        // Arrived before the request: the snapshot settles it, so replaying it fails.
        let error = setup()
            .check_takeover_keeps_received(
                1,
                (0, 0),
                entries.into_iter(),
                &copy,
                &BTreeSet::new(),
                &BTreeSet::new(),
            )
            .unwrap_err();
        assert_eq!(error.oracle, Oracle::NoRegression);
    }

    #[test]
    fn a_commit_names_a_publication_of_its_uuid_in_the_servers_lineage() {
        let mut model = Model::default();
        model.server_started(0, 0);
        model.server_started(1, 0);
        assert!(model.begin_replayed_reign(0));
        model.published(0, &kvpub("a", 1, 1, "v1")).unwrap();
        model
            .sync_completed(1, (0, 0), 1, 1, &map(&[("a", "v1")]), true)
            .unwrap();
        model.server_crashed(0);
        assert!(model.begin_replayed_reign(1));
        // The backup serves the entry with the sequence the primary gave it.
        model
            .check_committed(2, 1, Uuid::from_bytes([1; 16]), 1)
            .unwrap();
        let error = model
            .check_committed(2, 1, Uuid::from_bytes([1; 16]), 2)
            .unwrap_err();
        assert_eq!(error.oracle, Oracle::AcknowledgedWrites);
    }
}
