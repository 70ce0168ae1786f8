//! A simulated disk per server, and crash-and-restart runs of a recording pair against
//! it.
//!
//! [`Disk`] holds what a `clonekvd --data-dir` holds, as the core's format writes it: a
//! snapshot (replaced atomically, so always whole and synced) and a log whose bytes are
//! volatile until synced. A crash keeps every synced byte and a seed-chosen prefix of
//! the rest (a torn write), sometimes with a damaged byte in what it kept; the reader cuts
//! the log at the first record that is not whole, as the daemon does.
//!
//! [`run`] drives an active primary and its passive backup, both recording (instant
//! delivery between them), with a seeded workload of sets, deletes, ttls, time passing,
//! compactions and whole-pair crashes, and checks after every restart:
//!
//! 1. a restored server's map is exactly the published history's state at the sequence it
//!    restored (nothing goes back, nothing appears that was not published), the model
//!    being built only from the KVPUBs the active published;
//! 2. under [`Policy::Always`] every published (so confirmable) update survives: the
//!    restored active is at the last published sequence, and numbering continues above it;
//! 3. no key whose ttl ran out while the pair was down is served again;
//! 4. every sync the backup completes (a resume or a full snapshot) leaves its map at the
//!    published history's state at its sequence.
//!
//! Under `batch` and `never` a crash may lose the last published updates; the history then
//! continues from the restored sequence (what the daemon documents), and the backup's
//! check is skipped until it has re-synced with the continued history.
//!
//! Not modelled here (yet): network faults between the two (the world in [`crate::world`]
//! has them, without disks), and a crash in the middle of one input's outputs.

use std::collections::BTreeMap;
use std::time::Duration;

use clonekv_core::kvmsg::{BstarState, KvMsg, Limits, Uuid};
use clonekv_core::server::persist::{
    encode_header, next_record, FileKind, Image, NextRecord, Restored, Restorer, HEADER_LEN,
};
use clonekv_core::server::{Config, HashKey, Output, Server};
use clonekv_core::time::{EpochMillis, Instant};
use rand::RngExt;

use crate::{derive_rng, SimRng};

/// When the simulated host syncs the log.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Policy {
    /// After every input's records, before what they cover is published.
    Always,
    /// Every `every`-th input.
    Batch {
        /// Inputs between two syncs.
        every: u32,
    },
    /// Never (only snapshots are synced).
    Never,
}

/// One server's data directory.
#[derive(Clone, Debug)]
pub struct Disk {
    snapshot: Vec<u8>,
    log_synced: Vec<u8>,
    log_volatile: Vec<u8>,
    generation: u64,
}

impl Disk {
    /// A data directory as a fresh start leaves it: an empty snapshot and its log.
    pub fn fresh() -> Disk {
        let mut disk = Disk {
            snapshot: Vec::new(),
            log_synced: Vec::new(),
            log_volatile: Vec::new(),
            generation: 0,
        };
        disk.write_image(&Restored::default().image());
        disk
    }

    /// Appends a record's bytes (volatile until [`Disk::sync`]).
    pub fn append(&mut self, bytes: &[u8]) {
        self.log_volatile.extend_from_slice(bytes);
    }

    /// Makes everything appended durable.
    pub fn sync(&mut self) {
        self.log_synced.append(&mut self.log_volatile);
    }

    /// Replaces the snapshot with `image` (atomically and synced, as the daemon's
    /// rename does) and starts the next generation's empty log.
    pub fn write_image(&mut self, image: &Image) {
        self.generation += 1;
        let mut snapshot = encode_header(FileKind::Snapshot, self.generation).to_vec();
        let mut buffer = Vec::new();
        let written = image.encode(&mut buffer, usize::MAX, |chunk| {
            snapshot.append(chunk);
            Ok::<(), ()>(())
        });
        debug_assert!(written.is_ok());
        self.snapshot = snapshot;
        self.log_synced = encode_header(FileKind::Log, self.generation).to_vec();
        self.log_volatile.clear();
    }

    /// A crash: the synced bytes stay, of the rest a random prefix reaches the disk, and
    /// one time in four a byte of that prefix is damaged. Returns how many volatile bytes
    /// were lost or torn.
    pub fn crash(&mut self, rng: &mut SimRng) -> usize {
        let volatile = std::mem::take(&mut self.log_volatile);
        let kept = rng.random_range(0..=volatile.len());
        let mut torn = volatile.get(..kept).unwrap_or_default().to_vec();
        if !torn.is_empty() && rng.random_range(0..4) == 0 {
            let at = rng.random_range(0..torn.len());
            if let Some(byte) = torn.get_mut(at) {
                *byte ^= 1 << rng.random_range(0..8);
            }
        }
        self.log_synced.extend_from_slice(&torn);
        volatile.len() - kept
    }

    /// Reads the directory back as the daemon does: the whole snapshot, then the log up
    /// to its first record that is not whole (which, and everything after it, is cut).
    /// Returns the restored state and the number of log bytes cut.
    pub fn read(&mut self) -> Result<(Restored, usize), String> {
        let mut restorer = Restorer::new();
        let mut rest = self.snapshot.get(HEADER_LEN..).unwrap_or_default();
        while let NextRecord::Record { payload, consumed } = next_record(rest) {
            restorer
                .apply(payload)
                .map_err(|error| format!("snapshot: {error}"))?;
            rest = rest.get(consumed..).unwrap_or_default();
        }
        if !rest.is_empty() {
            return Err("the snapshot is not whole".to_string());
        }
        let mut offset = HEADER_LEN;
        while let NextRecord::Record { payload, consumed } =
            next_record(self.log_synced.get(offset..).unwrap_or_default())
        {
            if restorer.apply(payload).is_err() {
                break;
            }
            offset += consumed;
        }
        let cut = self.log_synced.len().saturating_sub(offset);
        self.log_synced.truncate(offset);
        Ok((restorer.finish(), cut))
    }
}

/// A server and its disk, driven like the daemon drives them.
struct Host {
    server: Server,
    disk: Disk,
    inputs: u32,
}

/// What one run did, for the test's report.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RunReport {
    /// Updates the active published.
    pub published: usize,
    /// Whole-pair crashes and restarts.
    pub crashes: usize,
    /// Log bytes cut at restarts (torn or damaged tails).
    pub bytes_cut: usize,
    /// Published updates a crash took back (possible under `batch` and `never` only).
    pub lost: usize,
    /// Syncs the backup completed by resuming rather than by a full snapshot.
    pub resumes: usize,
}

/// The published history: every KVPUB, in order.
#[derive(Default)]
struct Model {
    /// (sequence, key, value; empty for a delete).
    published: Vec<(i64, Vec<u8>, Vec<u8>)>,
}

impl Model {
    fn last(&self) -> i64 {
        self.published.last().map_or(0, |(sequence, ..)| *sequence)
    }

    fn state_at(&self, sequence: i64) -> BTreeMap<Vec<u8>, Vec<u8>> {
        let mut state = BTreeMap::new();
        for (at, key, value) in &self.published {
            if *at > sequence {
                break;
            }
            if value.is_empty() {
                state.remove(key);
            } else {
                state.insert(key.clone(), value.clone());
            }
        }
        state
    }
}

fn map_of(server: &Server) -> BTreeMap<Vec<u8>, Vec<u8>> {
    server
        .iter()
        .map(|(key, entry)| (key.to_vec(), entry.body().to_vec()))
        .collect()
}

/// The pair under test, with the simulated time.
struct Pair {
    active: Host,
    backup: Host,
    now: Instant,
    wall: EpochMillis,
    policy: Policy,
    model: Model,
    /// The backup's map may belong to published updates a crash took back from the
    /// active, until it re-syncs.
    backup_forked: bool,
    /// Syncs the backup completed by resuming.
    resumes: usize,
    /// Log bytes the restart cut off both disks.
    cut: usize,
}

fn config(base: Config) -> Config {
    Config {
        persistence: true,
        ..base
    }
}

impl Pair {
    /// Starts both servers from their disks. Each process draws a fresh hash key from
    /// `keys`, as the daemon draws one from the OS: reign ids derive from it.
    fn start(
        policy: Policy,
        active: Disk,
        backup: Disk,
        (now, wall): (Instant, EpochMillis),
        keys: &mut SimRng,
    ) -> Result<Pair, String> {
        let mut cut = 0;
        let mut open = |mut disk: Disk, base: Config| -> Result<Host, String> {
            let (restored, bytes) = disk.read()?;
            cut += bytes;
            let server = Server::restore(
                now,
                wall,
                config(base),
                HashKey::from_rng(&mut *keys),
                restored,
            )
            .map_err(|error| error.to_string())?;
            Ok(Host {
                server,
                disk,
                inputs: 0,
            })
        };
        let active = open(active, Config::primary())?;
        let backup = open(backup, Config::backup())?;
        Ok(Pair {
            active,
            backup,
            cut,
            now,
            wall,
            policy,
            model: Model::default(),
            backup_forked: false,
            resumes: 0,
        })
    }

    /// Carries out both servers' outputs until neither has any, delivering instantly.
    fn settle(&mut self) -> Result<(), String> {
        for _ in 0..1000 {
            let mut moved = false;
            while let Some(output) = self.active.server.poll_output() {
                moved = true;
                self.carry_out(true, output)?;
            }
            commit(&mut self.active, self.policy);
            while let Some(output) = self.backup.server.poll_output() {
                moved = true;
                self.carry_out(false, output)?;
            }
            commit(&mut self.backup, self.policy);
            if !moved {
                return Ok(());
            }
        }
        Err("the pair never settled".to_string())
    }

    fn carry_out(&mut self, from_active: bool, output: Output) -> Result<(), String> {
        let (now, wall) = (self.now, self.wall);
        let (host, peer) = if from_active {
            (&mut self.active, &mut self.backup)
        } else {
            (&mut self.backup, &mut self.active)
        };
        match output {
            Output::Persist(record) => {
                let mut bytes = Vec::new();
                record.encode_into(&mut bytes);
                host.disk.append(&bytes);
            }
            Output::PersistImage(image) => host.disk.write_image(&image),
            Output::Publish(frames) => {
                // The daemon publishes only after the records before it are written and,
                // under `always`, synced.
                if self.policy == Policy::Always {
                    host.disk.sync();
                }
                let frames: Vec<Vec<u8>> = frames.iter().map(|frame| frame.to_vec()).collect();
                let message = KvMsg::decode(&frames, &Limits::default())
                    .map_err(|error| error.to_string())?;
                if from_active && !message.is_hugz() {
                    if message.sequence <= self.model.last() {
                        return Err(format!(
                            "numbering went back: published {} after {}",
                            message.sequence,
                            self.model.last()
                        ));
                    }
                    self.model.published.push((
                        message.sequence,
                        message.key.clone(),
                        message.body.clone(),
                    ));
                }
                peer.server.handle_peer_update(now, wall, &frames);
            }
            Output::SendStateToPeer(frame) => peer.server.handle_peer_state(now, wall, &[frame]),
            Output::RequestPeerSnapshot(frames) => {
                peer.server
                    .handle_snapshot_request(now, wall, b"peer", &frames);
            }
            Output::SnapshotReady { routing_id } => {
                while let Some(frames) = host.server.poll_snapshot(now, &routing_id) {
                    peer.server.handle_peer_snapshot(now, wall, &frames);
                }
            }
            Output::ForwardToPeerCollector(frames) => {
                peer.server.handle_collected(now, wall, &frames);
            }
            Output::Event(clonekv_core::server::Event::SyncCompleted { resumed, .. })
                if !from_active =>
            {
                // Oracle 4: a completed sync, a resume or a full snapshot, leaves the
                // backup at the published history's state at its sequence.
                self.backup_forked = false;
                self.resumes += usize::from(resumed.is_some());
                self.check_restored("the backup after its sync", &self.backup.server)?;
            }
            Output::Event(_) => {}
        }
        Ok(())
    }

    /// Brings both servers to their roles: the primary active, the backup following it.
    fn elect(&mut self) -> Result<(), String> {
        let (now, wall) = (self.now, self.wall);
        self.backup
            .server
            .handle_peer_state(now, wall, &[BstarState::Primary.encode()]);
        self.active
            .server
            .handle_peer_state(now, wall, &[BstarState::Backup.encode()]);
        self.settle()?;
        if self.active.server.state() != BstarState::Active {
            return Err(format!(
                "the restarted primary is {:?}, not active",
                self.active.server.state()
            ));
        }
        Ok(())
    }

    fn advance(&mut self, by: Duration) -> Result<(), String> {
        self.now += by;
        self.wall = self.wall.saturating_add(by);
        let (now, wall) = (self.now, self.wall);
        self.active.server.handle_timeout(now, wall);
        self.backup.server.handle_timeout(now, wall);
        self.settle()
    }

    /// Checks a restored (and, for the active, elected) server against the model.
    fn check_restored(&self, name: &str, server: &Server) -> Result<(), String> {
        let expected = self.model.state_at(server.sequence());
        let found = map_of(server);
        if found != expected {
            let differs = expected
                .keys()
                .chain(found.keys())
                .find(|key| expected.get(*key) != found.get(*key));
            return Err(format!(
                "{name} restored at sequence {} holds another map than the history published \
                 up to it (first difference at key {:?}: published {:?}, restored {:?})",
                server.sequence(),
                differs.map(|key| String::from_utf8_lossy(key).into_owned()),
                differs.and_then(|key| expected.get(key)),
                differs.and_then(|key| found.get(key)),
            ));
        }
        Ok(())
    }
}

fn commit(host: &mut Host, policy: Policy) {
    host.inputs += 1;
    match policy {
        Policy::Always => host.disk.sync(),
        Policy::Batch { every } if host.inputs.is_multiple_of(every.max(1)) => host.disk.sync(),
        Policy::Batch { .. } | Policy::Never => {}
    }
}

/// One seeded run of `steps` operations; `Err` names the first oracle that failed.
pub fn run(seed: u64, policy: Policy, steps: usize) -> Result<RunReport, String> {
    let mut rng = derive_rng(seed, 0xD15C);
    let mut report = RunReport::default();
    let mut now = Instant::ZERO;
    let mut wall = EpochMillis(1_700_000_000_000);
    let mut keys = derive_rng(seed, 0xD15C_4E75);
    let mut pair = Pair::start(policy, Disk::fresh(), Disk::fresh(), (now, wall), &mut keys)?;
    pair.elect()?;
    let mut uuid = 0u64;
    for _ in 0..steps {
        match rng.random_range(0..100) {
            0..60 => {
                uuid += 1;
                let key = format!("/k{}", rng.random_range(0..8)).into_bytes();
                let value = if rng.random_range(0..5) == 0 {
                    Vec::new()
                } else {
                    format!("v{uuid}").into_bytes()
                };
                let mut bytes = [0u8; 16];
                bytes[..8].copy_from_slice(&uuid.to_be_bytes());
                let mut update = KvMsg::kvset(key, value, Uuid::from_bytes(bytes));
                if rng.random_range(0..4) == 0 {
                    update = update.with_ttl(Duration::from_millis(rng.random_range(100..3000)));
                }
                pair.active
                    .server
                    .handle_collected(pair.now, pair.wall, &update.encode());
                pair.settle()?;
            }
            60..85 => pair.advance(Duration::from_millis(rng.random_range(1..1500)))?,
            85..92 => {
                let image = pair.active.server.image();
                pair.active.disk.write_image(&image);
            }
            _ => {
                report.crashes += 1;
                let last = pair.model.last();
                let Pair {
                    mut active,
                    mut backup,
                    mut model,
                    backup_forked,
                    resumes,
                    ..
                } = pair;
                report.resumes += resumes;
                active.disk.crash(&mut rng);
                backup.disk.crash(&mut rng);
                // Down for a while: ttls run out meanwhile.
                let down = Duration::from_millis(rng.random_range(0..4000));
                now += down;
                wall = wall.saturating_add(down);
                let mut next =
                    Pair::start(policy, active.disk, backup.disk, (now, wall), &mut keys)?;
                report.bytes_cut += next.cut;
                // Oracle 1 on both restored maps, before anything runs.
                next.model = std::mem::take(&mut model);
                next.backup_forked = backup_forked;
                let restored = next.active.server.sequence();
                next.check_restored("the primary", &next.active.server)?;
                if !next.backup_forked {
                    next.check_restored("the backup", &next.backup.server)?;
                }
                // Oracle 2.
                if policy == Policy::Always && restored != last {
                    return Err(format!(
                        "under fsync always the primary restored sequence {restored}, but \
                         {last} was published"
                    ));
                }
                if restored < last {
                    // The history continues from what survived.
                    report.lost += next
                        .model
                        .published
                        .iter()
                        .filter(|(sequence, ..)| *sequence > restored)
                        .count();
                    next.model
                        .published
                        .retain(|(sequence, ..)| *sequence <= restored);
                    // A backup past the restored sequence holds the lost updates; one
                    // already on a lost branch stays there until it re-syncs, whatever
                    // its sequence (the new history reuses the lost numbers).
                    next.backup_forked |= next.backup.server.sequence() > restored;
                }
                next.elect()?;
                // Oracle 3: nothing past its ttl is served once active.
                if let Some((key, _)) = next
                    .active
                    .server
                    .iter()
                    .find(|(_, entry)| entry.expires_at().is_some_and(|at| at <= next.wall))
                {
                    return Err(format!(
                        "{} is served after its ttl ran out while the pair was down",
                        String::from_utf8_lossy(key)
                    ));
                }
                pair = next;
                now = pair.now;
                wall = pair.wall;
                continue;
            }
        }
        now = pair.now;
        wall = pair.wall;
    }
    report.published = pair.model.published.len();
    report.resumes += pair.resumes;
    Ok(report)
}
