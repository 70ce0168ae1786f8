//! The data directory of `clonekvd --data-dir`: where a server's records go and where
//! they are read back at start. The format and what is recorded are the core's
//! (`clonekv_core::server::persist`); this module only moves bytes between the core's
//! outputs and two files:
//!
//! - `snapshot`: the whole map at one point (`STATE PUT* END`), replaced atomically
//!   (written to `snapshot.tmp`, fsynced, renamed, directory fsynced);
//! - `log-<generation>`: every change since the snapshot of that generation, appended.
//!
//! A compaction (when the log has grown past both [`PersistOptions::compact_min_bytes`]
//! and the snapshot's size) or an image from the core (a full sync) writes the next
//! generation's snapshot, then starts its empty log, then deletes the old log. A crash at
//! any step leaves a whole snapshot and the log of its generation (or none yet, which is
//! empty).
//!
//! At start a damaged or cut-short tail of the log (a record whose length or checksum
//! does not hold, or that does not decode) is cut off and reported: the server starts
//! with every whole record before it. A damaged snapshot, a file of another format
//! version, or a log without its snapshot is refused with what to do.
//!
//! # What each fsync policy promises ([`FsyncPolicy`])
//!
//! Records are written to the log file before any update they cover is published (a
//! publish waits for the end of the loop pass that made it, so one write, and under
//! `always` one fsync, covers a whole batch of updates: group commit). Therefore, under
//! every policy, an update a client saw confirmed survives the server's process being
//! killed. The policies differ on a crash of the machine (power, kernel):
//! `always` loses nothing that was confirmed; `batch` loses at most the last
//! [`PersistOptions::fsync_interval`]; `never` loses what the kernel had not written back
//! (on Linux, typically up to 30 s).

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant as StdInstant};

use clonekv_core::server::persist::{
    decode_header, encode_header, next_record, Applied, FileKind, HeaderError, Image, NextRecord,
    Record, Restored, Restorer, HEADER_LEN,
};

/// When the log is fsynced.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FsyncPolicy {
    /// Before any update the records cover is published: a confirmation means "on the
    /// active's disk".
    Always,
    /// At most every [`PersistOptions::fsync_interval`], in the loop, never holding a
    /// publish back for it.
    Batch,
    /// Never: the kernel writes back when it chooses.
    Never,
}

impl FsyncPolicy {
    /// The name used on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            FsyncPolicy::Always => "always",
            FsyncPolicy::Batch => "batch",
            FsyncPolicy::Never => "never",
        }
    }
}

/// Where and how a server records its map.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PersistOptions {
    /// The data directory (created if missing).
    pub dir: PathBuf,
    /// When the log is fsynced.
    pub fsync: FsyncPolicy,
    /// Under [`FsyncPolicy::Batch`], the longest time written records wait for an fsync.
    pub fsync_interval: Duration,
    /// The log is compacted once it is larger than this and than the snapshot.
    pub compact_min_bytes: u64,
}

/// The default [`PersistOptions::compact_min_bytes`]: 64 MiB.
pub const DEFAULT_COMPACT_MIN_BYTES: u64 = 64 << 20;

impl PersistOptions {
    /// `dir` with `fsync always` and the default compaction threshold.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        PersistOptions {
            dir: dir.into(),
            fsync: FsyncPolicy::Always,
            fsync_interval: Duration::from_secs(1),
            compact_min_bytes: DEFAULT_COMPACT_MIN_BYTES,
        }
    }
}

/// Why a data directory cannot be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PersistError {
    /// A file operation failed.
    #[error("cannot {action} {}: {source}", path.display())]
    Io {
        /// What was being done.
        action: &'static str,
        /// On which file or directory.
        path: PathBuf,
        /// The system's reason.
        source: io::Error,
    },
    /// A file whose header is not usable by this build.
    #[error(
        "{}: {error}; start with another --data-dir, or move this one away (the server then \
         starts empty, or re-syncs from an active partner)",
        path.display()
    )]
    Header {
        /// The file.
        path: PathBuf,
        /// Why.
        error: HeaderError,
    },
    /// The snapshot is damaged (it is written whole and atomically, so only the disk
    /// could damage it).
    #[error(
        "{} is damaged ({reason}); move the data directory away: the server then starts \
         empty, or re-syncs from an active partner",
        path.display()
    )]
    DamagedSnapshot {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// Log files without the snapshot they follow.
    #[error(
        "{} holds a log but no snapshot file; it was not written by clonekvd (or the snapshot \
         was deleted): move it away",
        dir.display()
    )]
    LogWithoutSnapshot {
        /// The data directory.
        dir: PathBuf,
    },
    /// Another process holds the directory's lock: two servers writing one log would
    /// interleave their records.
    #[error(
        "{} is in use by another clonekvd (it holds {}); stop that server, or give this \
         one its own --data-dir",
        dir.display(),
        LOCK
    )]
    Locked {
        /// The data directory.
        dir: PathBuf,
    },
}

impl PersistError {
    /// True when starting again with the same directory cannot help (a refusal), false
    /// for an I/O failure that may pass.
    pub fn is_refusal(&self) -> bool {
        !matches!(self, PersistError::Io { .. })
    }
}

/// The part of the log that was cut off at start.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cut {
    /// The log file.
    pub path: PathBuf,
    /// Where the whole records end (the file's new length).
    pub offset: u64,
    /// Bytes removed.
    pub bytes: u64,
    /// Why the record there was not whole.
    pub reason: String,
}

/// What was read back at start, for the log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OpenReport {
    /// The data directory was empty (or new).
    pub fresh: bool,
    /// The generation in use.
    pub generation: u64,
    /// Keys in the snapshot.
    pub snapshot_keys: u64,
    /// Records replayed from the log.
    pub log_records: u64,
    /// The torn or damaged tail cut off, if any.
    pub cut: Option<Cut>,
    /// Old files removed (an interrupted compaction's).
    pub removed: Vec<PathBuf>,
    /// How long reading took.
    pub elapsed: Duration,
}

/// Counts since start, for the log and the benchmark.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct JournalCounters {
    /// Records appended.
    pub records: u64,
    /// Bytes written to logs.
    pub log_bytes: u64,
    /// fsyncs of the log.
    pub syncs: u64,
    /// Snapshots written (compactions and images from the core).
    pub snapshots: u64,
}

/// The open data directory: appends records, fsyncs by policy, compacts.
pub struct Journal {
    /// Held for as long as the journal lives: the directory's exclusive lock.
    _lock: File,
    options: PersistOptions,
    generation: u64,
    log: File,
    log_len: u64,
    snapshot_len: u64,
    /// Encoded records not yet written to the file.
    buffer: Vec<u8>,
    /// Written to the file but not fsynced.
    unsynced: bool,
    last_sync: StdInstant,
    counters: JournalCounters,
}

const SNAPSHOT: &str = "snapshot";
/// The file whose advisory lock (flock) marks the directory as in use.
const LOCK: &str = "lock";
const SNAPSHOT_TMP: &str = "snapshot.tmp";
const LOG_PREFIX: &str = "log-";

fn io_error<'a>(
    action: &'static str,
    path: &'a Path,
) -> impl FnOnce(io::Error) -> PersistError + 'a {
    move |source| PersistError::Io {
        action,
        path: path.to_path_buf(),
        source,
    }
}

fn log_path(dir: &Path, generation: u64) -> PathBuf {
    dir.join(format!("{LOG_PREFIX}{generation}"))
}

/// The generations of the `log-<n>` files in `dir`, in order.
fn log_generations(dir: &Path) -> Result<Vec<u64>, PersistError> {
    let mut generations = Vec::new();
    for entry in fs::read_dir(dir).map_err(io_error("list", dir))? {
        let entry = entry.map_err(io_error("list", dir))?;
        let name = entry.file_name();
        if let Some(generation) = name
            .to_str()
            .and_then(|name| name.strip_prefix(LOG_PREFIX))
            .and_then(|number| number.parse::<u64>().ok())
        {
            generations.push(generation);
        }
    }
    generations.sort_unstable();
    Ok(generations)
}

/// Takes the directory's exclusive lock, released when the returned file is closed
/// (also when the process dies, so a killed server leaves no stale lock).
fn lock_dir(dir: &Path) -> Result<File, PersistError> {
    let path = dir.join(LOCK);
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(io_error("open", &path))?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(fs::TryLockError::WouldBlock) => Err(PersistError::Locked {
            dir: dir.to_path_buf(),
        }),
        Err(fs::TryLockError::Error(source)) => Err(PersistError::Io {
            action: "lock",
            path,
            source,
        }),
    }
}

fn sync_dir(dir: &Path) -> Result<(), PersistError> {
    File::open(dir)
        .and_then(|handle| handle.sync_all())
        .map_err(io_error("fsync the directory", dir))
}

fn read_file(path: &Path) -> Result<Vec<u8>, PersistError> {
    let mut bytes = Vec::new();
    File::open(path)
        .and_then(|mut file| file.read_to_end(&mut bytes))
        .map_err(io_error("read", path))?;
    Ok(bytes)
}

impl Journal {
    /// Opens (or creates) the data directory and reads back what it holds: the restored
    /// map to start the server from, and a report to log.
    pub fn open(options: PersistOptions) -> Result<(Journal, Restored, OpenReport), PersistError> {
        let started = StdInstant::now();
        let dir = options.dir.clone();
        fs::create_dir_all(&dir).map_err(io_error("create", &dir))?;
        let lock = lock_dir(&dir)?;
        let mut removed = Vec::new();
        let tmp = dir.join(SNAPSHOT_TMP);
        if tmp.exists() {
            fs::remove_file(&tmp).map_err(io_error("remove", &tmp))?;
            removed.push(tmp);
        }
        let snapshot_path = dir.join(SNAPSHOT);
        let generations = log_generations(&dir)?;
        if !snapshot_path.exists() {
            if !generations.is_empty() {
                return Err(PersistError::LogWithoutSnapshot { dir });
            }
            let journal = Journal::fresh(options, lock)?;
            let report = OpenReport {
                fresh: true,
                generation: journal.generation,
                snapshot_keys: 0,
                log_records: 0,
                cut: None,
                removed,
                elapsed: started.elapsed(),
            };
            return Ok((journal, Restorer::new().finish(), report));
        }

        let mut restorer = Restorer::new();
        let (generation, snapshot_keys, snapshot_len) =
            read_snapshot(&snapshot_path, &mut restorer)?;
        for stale in generations.iter().filter(|g| **g != generation) {
            let path = log_path(&dir, *stale);
            fs::remove_file(&path).map_err(io_error("remove", &path))?;
            removed.push(path);
        }
        let path = log_path(&dir, generation);
        let (log_records, cut, log_len) = if path.exists() {
            replay_log(&path, generation, &mut restorer)?
        } else {
            (0, None, 0)
        };
        let log = if log_len == 0 {
            new_log(&dir, generation)?
        } else {
            OpenOptions::new()
                .append(true)
                .open(&path)
                .map_err(io_error("open", &path))?
        };
        let journal = Journal {
            _lock: lock,
            generation,
            log,
            log_len: log_len.max(HEADER_LEN as u64),
            snapshot_len,
            buffer: Vec::new(),
            unsynced: false,
            last_sync: StdInstant::now(),
            counters: JournalCounters::default(),
            options,
        };
        let report = OpenReport {
            fresh: false,
            generation,
            snapshot_keys,
            log_records,
            cut,
            removed,
            elapsed: started.elapsed(),
        };
        Ok((journal, restorer.finish(), report))
    }

    /// A journal for an empty directory: an empty snapshot of generation 1 first, then
    /// its log, so that a crash in between leaves a directory that opens.
    fn fresh(options: PersistOptions, lock: File) -> Result<Journal, PersistError> {
        let generation = 1;
        let snapshot_len =
            write_snapshot(&options.dir, generation, &Restorer::new().finish().image())?;
        let log = new_log(&options.dir, generation)?;
        Ok(Journal {
            _lock: lock,
            generation,
            log,
            log_len: HEADER_LEN as u64,
            snapshot_len,
            buffer: Vec::new(),
            unsynced: false,
            last_sync: StdInstant::now(),
            counters: JournalCounters::default(),
            options,
        })
    }

    /// The options in use.
    pub fn options(&self) -> &PersistOptions {
        &self.options
    }

    /// Counts since start.
    pub fn counters(&self) -> JournalCounters {
        self.counters
    }

    /// The generation in use.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Queues a record; it is written by the next [`Journal::commit`].
    pub fn append(&mut self, record: &Record) {
        record.encode_into(&mut self.buffer);
        self.counters.records += 1;
    }

    /// True when records were appended since the last [`Journal::commit`]: what
    /// reveals them (a publish) must wait for it.
    pub fn has_pending(&self) -> bool {
        !self.buffer.is_empty()
    }

    /// Writes the queued records to the log, and fsyncs it as the policy says.
    pub fn commit(&mut self, now: StdInstant) -> Result<(), PersistError> {
        if !self.buffer.is_empty() {
            let path = log_path(&self.options.dir, self.generation);
            self.log
                .write_all(&self.buffer)
                .map_err(io_error("append to", &path))?;
            self.log_len += self.buffer.len() as u64;
            self.counters.log_bytes += self.buffer.len() as u64;
            self.buffer.clear();
            self.unsynced = true;
        }
        let due = match self.options.fsync {
            FsyncPolicy::Always => true,
            FsyncPolicy::Batch => now >= self.last_sync + self.options.fsync_interval,
            FsyncPolicy::Never => false,
        };
        if self.unsynced && due {
            self.sync(now)?;
        }
        Ok(())
    }

    fn sync(&mut self, now: StdInstant) -> Result<(), PersistError> {
        let path = log_path(&self.options.dir, self.generation);
        self.log.sync_data().map_err(io_error("fsync", &path))?;
        self.unsynced = false;
        self.last_sync = now;
        self.counters.syncs += 1;
        Ok(())
    }

    /// Fsyncs whatever was written and not yet synced (at a clean stop).
    pub fn sync_now(&mut self) -> Result<(), PersistError> {
        if self.unsynced {
            self.sync(StdInstant::now())?;
        }
        Ok(())
    }

    /// When written records are next due for an fsync (under `batch`), if any wait.
    pub fn poll_sync(&self) -> Option<StdInstant> {
        (self.options.fsync == FsyncPolicy::Batch && self.unsynced)
            .then(|| self.last_sync + self.options.fsync_interval)
    }

    /// True when the log has outgrown the snapshot: time for [`Journal::write_image`]
    /// of the server's current image.
    pub fn wants_compaction(&self) -> bool {
        self.log_len >= self.options.compact_min_bytes && self.log_len >= self.snapshot_len
    }

    /// Records `image` as the next generation's snapshot and starts its empty log:
    /// everything queued or logged before is superseded by it. Returns the snapshot's
    /// size.
    pub fn write_image(&mut self, image: &Image) -> Result<u64, PersistError> {
        let dir = self.options.dir.clone();
        let generation = self.generation + 1;
        let written = write_snapshot(&dir, generation, image)?;
        let old = log_path(&dir, self.generation);
        self.log = new_log(&dir, generation)?;
        if old.exists() {
            fs::remove_file(&old).map_err(io_error("remove", &old))?;
        }
        self.generation = generation;
        self.log_len = HEADER_LEN as u64;
        self.snapshot_len = written;
        self.buffer.clear();
        self.unsynced = false;
        self.counters.snapshots += 1;
        Ok(written)
    }
}

/// Writes `image` as the snapshot of `generation`: to a temporary file, fsynced, renamed
/// over the snapshot, the directory fsynced. Returns its size.
fn write_snapshot(dir: &Path, generation: u64, image: &Image) -> Result<u64, PersistError> {
    let tmp = dir.join(SNAPSHOT_TMP);
    let mut file = File::create(&tmp).map_err(io_error("create", &tmp))?;
    let mut written = HEADER_LEN as u64;
    file.write_all(&encode_header(FileKind::Snapshot, generation))
        .map_err(io_error("write", &tmp))?;
    let mut buffer = Vec::with_capacity(1 << 20);
    image
        .encode(&mut buffer, 1 << 20, |chunk| {
            written += chunk.len() as u64;
            let result = file.write_all(chunk);
            chunk.clear();
            result
        })
        .map_err(io_error("write", &tmp))?;
    file.sync_all().map_err(io_error("fsync", &tmp))?;
    drop(file);
    let snapshot = dir.join(SNAPSHOT);
    fs::rename(&tmp, &snapshot).map_err(io_error("rename into place", &snapshot))?;
    sync_dir(dir)?;
    Ok(written)
}

/// Creates the empty log of `generation` (header only, fsynced, directory fsynced).
fn new_log(dir: &Path, generation: u64) -> Result<File, PersistError> {
    let path = log_path(dir, generation);
    let mut file = OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .open(&path)
        .map_err(io_error("create", &path))?;
    file.write_all(&encode_header(FileKind::Log, generation))
        .and_then(|()| file.sync_all())
        .map_err(io_error("write", &path))?;
    sync_dir(dir)?;
    drop(file);
    OpenOptions::new()
        .append(true)
        .open(&path)
        .map_err(io_error("open", &path))
}

/// Reads the whole snapshot into `restorer`; returns its generation, key count and size.
fn read_snapshot(path: &Path, restorer: &mut Restorer) -> Result<(u64, u64, u64), PersistError> {
    let bytes = read_file(path)?;
    let header = decode_header(&bytes).map_err(|error| PersistError::Header {
        path: path.to_path_buf(),
        error,
    })?;
    let damaged = |reason: String| PersistError::DamagedSnapshot {
        path: path.to_path_buf(),
        reason,
    };
    if header.kind != FileKind::Snapshot {
        return Err(damaged("its header says it is a log".to_string()));
    }
    let mut rest = bytes.get(HEADER_LEN..).unwrap_or_default();
    let mut puts = 0u64;
    let mut first = true;
    loop {
        let (payload, consumed) = match next_record(rest) {
            NextRecord::Record { payload, consumed } => (payload, consumed),
            NextRecord::End => return Err(damaged("it ends before its END record".to_string())),
            NextRecord::Torn(torn) => return Err(damaged(torn.to_string())),
        };
        rest = rest.get(consumed..).unwrap_or_default();
        match restorer.apply(payload) {
            Ok(Applied::State) if first => {}
            Ok(Applied::History) if !first && puts == 0 => {}
            Ok(Applied::Put) if !first => puts += 1,
            Ok(Applied::End { entries }) if !first => {
                if entries != puts || !rest.is_empty() {
                    return Err(damaged(format!(
                        "its END record counts {entries} keys, {puts} were read{}",
                        if rest.is_empty() {
                            ""
                        } else {
                            ", and bytes follow it"
                        }
                    )));
                }
                return Ok((header.generation, puts, bytes.len() as u64));
            }
            Ok(other) => return Err(damaged(format!("unexpected record {other:?}"))),
            Err(error) => return Err(damaged(error.to_string())),
        }
        first = false;
    }
}

/// Replays the log of `generation` into `restorer`, cutting off a torn or damaged tail;
/// returns the records replayed, the cut, and the log's length after it.
fn replay_log(
    path: &Path,
    generation: u64,
    restorer: &mut Restorer,
) -> Result<(u64, Option<Cut>, u64), PersistError> {
    let bytes = read_file(path)?;
    let header = match decode_header(&bytes) {
        Ok(header) => header,
        // A crash while the log's header was written: nothing follows it.
        Err(HeaderError::Truncated { .. }) => {
            let cut = Cut {
                path: path.to_path_buf(),
                offset: 0,
                bytes: bytes.len() as u64,
                reason: "the log's header is cut short".to_string(),
            };
            return Ok((0, Some(cut), 0));
        }
        Err(error) => {
            return Err(PersistError::Header {
                path: path.to_path_buf(),
                error,
            })
        }
    };
    if header.kind != FileKind::Log || header.generation != generation {
        return Err(PersistError::Header {
            path: path.to_path_buf(),
            error: HeaderError::Corrupt,
        });
    }
    let mut offset = HEADER_LEN;
    let mut records = 0u64;
    let problem = loop {
        let rest = bytes.get(offset..).unwrap_or_default();
        match next_record(rest) {
            NextRecord::End => break None,
            NextRecord::Torn(torn) => break Some(torn.to_string()),
            NextRecord::Record { payload, consumed } => match restorer.apply(payload) {
                Ok(Applied::Put | Applied::Delete | Applied::History) => {
                    records += 1;
                    offset += consumed;
                }
                Ok(other) => break Some(format!("a {other:?} record does not belong in a log")),
                Err(error) => break Some(error.to_string()),
            },
        }
    };
    let cut = match problem {
        None => None,
        Some(reason) => {
            let file = OpenOptions::new()
                .write(true)
                .open(path)
                .map_err(io_error("open", path))?;
            file.set_len(offset as u64)
                .and_then(|()| file.sync_all())
                .map_err(io_error("cut the damaged tail off", path))?;
            Some(Cut {
                path: path.to_path_buf(),
                offset: offset as u64,
                bytes: (bytes.len() - offset) as u64,
                reason,
            })
        }
    };
    Ok((records, cut, offset as u64))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clonekv_core::kvmsg::{BstarState, KvMsg, Uuid};
    use clonekv_core::server::{Config, HashKey, Output, Server};
    use clonekv_core::time::{EpochMillis, Instant};

    const WALL: EpochMillis = EpochMillis(1_700_000_000_000);

    fn options(dir: &Path) -> PersistOptions {
        PersistOptions::new(dir.join("data"))
    }

    /// An active primary started from `restored`, recording.
    fn server(restored: Restored) -> Server {
        let config = Config {
            persistence: true,
            ..Config::primary()
        };
        let mut server = Server::restore(
            Instant::ZERO,
            WALL,
            config,
            HashKey::from_bytes([1; 16]),
            restored,
        )
        .unwrap();
        server.handle_peer_state(Instant::ZERO, WALL, &[BstarState::Backup.encode()]);
        assert_eq!(server.state(), BstarState::Active);
        server
    }

    /// Sets `/k<n>` for each n, appending the records to the journal and committing.
    fn write(server: &mut Server, journal: &mut Journal, keys: std::ops::Range<u32>) {
        for n in keys {
            let update = KvMsg::kvset(
                format!("/k{n}").into_bytes(),
                format!("value {n}").into_bytes(),
                Uuid::from_bytes([n as u8; 16]),
            );
            server.handle_collected(Instant::ZERO, WALL, &update.encode());
        }
        while let Some(output) = server.poll_output() {
            if let Output::Persist(record) = output {
                journal.append(&record);
            }
        }
        journal.commit(StdInstant::now()).unwrap();
    }

    #[test]
    fn an_empty_directory_starts_empty_and_reopens_with_what_was_written() {
        let scratch = tempfile::tempdir().unwrap();
        let (mut journal, restored, report) = Journal::open(options(scratch.path())).unwrap();
        assert!(report.fresh);
        assert!(restored.is_empty());
        assert_eq!(journal.generation(), 1);
        assert_eq!(log_generations(&journal.options.dir).unwrap(), [1]);
        let mut server = server(restored);
        write(&mut server, &mut journal, 0..10);
        drop(journal);

        let (_, restored, report) = Journal::open(options(scratch.path())).unwrap();
        assert!(!report.fresh);
        assert_eq!(report.cut, None);
        assert_eq!((restored.len(), restored.sequence()), (10, 10));
        assert_eq!(
            restored.get(b"/k3").map(|entry| entry.body().to_vec()),
            Some(b"value 3".to_vec())
        );
    }

    #[test]
    fn a_directory_in_use_is_refused_until_its_journal_closes() {
        let scratch = tempfile::tempdir().unwrap();
        let (journal, _, _) = Journal::open(options(scratch.path())).unwrap();
        let Err(error) = Journal::open(options(scratch.path())) else {
            panic!("a second journal opened the directory in use");
        };
        assert!(matches!(error, PersistError::Locked { .. }), "{error}");
        assert!(error.is_refusal());
        assert!(error.to_string().contains("in use by another clonekvd"));
        drop(journal);
        assert!(Journal::open(options(scratch.path())).is_ok());
    }

    #[test]
    fn a_torn_tail_is_cut_once_and_the_whole_records_before_it_are_kept() {
        let scratch = tempfile::tempdir().unwrap();
        let (mut journal, restored, _) = Journal::open(options(scratch.path())).unwrap();
        let mut server = server(restored);
        write(&mut server, &mut journal, 0..5);
        let path = log_path(&journal.options.dir, journal.generation);
        drop(journal);
        let length = fs::metadata(&path).unwrap().len();
        let file = OpenOptions::new().write(true).open(&path).unwrap();
        file.set_len(length - 3).unwrap();
        drop(file);

        let (_, restored, report) = Journal::open(options(scratch.path())).unwrap();
        let cut = report.cut.expect("a cut");
        assert_eq!(restored.len(), 4);
        assert_eq!(cut.offset + cut.bytes, length - 3);
        assert_eq!(fs::metadata(&path).unwrap().len(), cut.offset);
        let (_, restored, report) = Journal::open(options(scratch.path())).unwrap();
        assert_eq!((report.cut, restored.len()), (None, 4));
    }

    #[test]
    fn a_compaction_starts_the_next_generation_with_the_same_map() {
        let scratch = tempfile::tempdir().unwrap();
        let mut opts = options(scratch.path());
        opts.compact_min_bytes = 200;
        let (mut journal, restored, _) = Journal::open(opts.clone()).unwrap();
        let mut server = server(restored);
        write(&mut server, &mut journal, 0..20);
        assert!(journal.wants_compaction());
        let before = journal.generation();
        journal.write_image(&server.image()).unwrap();
        assert!(!journal.wants_compaction());
        assert!(!log_path(&opts.dir, before).exists());
        write(&mut server, &mut journal, 20..25);
        drop(journal);

        let (journal, restored, report) = Journal::open(opts).unwrap();
        assert_eq!(journal.generation(), before + 1);
        assert_eq!((report.snapshot_keys, report.log_records), (20, 5));
        assert_eq!((restored.len(), restored.sequence()), (25, 25));
    }

    #[test]
    fn what_an_interrupted_compaction_left_is_removed() {
        let scratch = tempfile::tempdir().unwrap();
        let opts = options(scratch.path());
        let (journal, _, _) = Journal::open(opts.clone()).unwrap();
        let generation = journal.generation();
        drop(journal);
        fs::write(opts.dir.join(SNAPSHOT_TMP), b"half a snapshot").unwrap();
        fs::write(log_path(&opts.dir, generation - 1), b"an old log").unwrap();
        let (_, _, report) = Journal::open(opts.clone()).unwrap();
        assert_eq!(report.removed.len(), 2);
        assert!(!opts.dir.join(SNAPSHOT_TMP).exists());
    }

    #[test]
    fn a_log_without_a_snapshot_or_a_damaged_snapshot_is_refused() {
        let scratch = tempfile::tempdir().unwrap();
        let opts = options(scratch.path());
        drop(Journal::open(opts.clone()).unwrap());
        let snapshot = opts.dir.join(SNAPSHOT);
        let mut bytes = fs::read(&snapshot).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 0x55;
        fs::write(&snapshot, &bytes).unwrap();
        let error = Journal::open(opts.clone()).err().expect("refused");
        assert!(
            matches!(error, PersistError::DamagedSnapshot { .. }),
            "{error}"
        );
        assert!(error.is_refusal());

        fs::remove_file(&snapshot).unwrap();
        let error = Journal::open(opts).err().expect("refused");
        assert!(
            matches!(error, PersistError::LogWithoutSnapshot { .. }),
            "{error}"
        );
    }

    #[test]
    fn batch_syncs_at_most_once_per_interval_and_always_at_every_commit() {
        let scratch = tempfile::tempdir().unwrap();
        let mut opts = options(scratch.path());
        opts.fsync = FsyncPolicy::Batch;
        opts.fsync_interval = Duration::from_secs(3600);
        let (mut journal, restored, _) = Journal::open(opts).unwrap();
        let mut server = server(restored);
        write(&mut server, &mut journal, 0..3);
        write(&mut server, &mut journal, 3..6);
        assert_eq!(journal.counters().syncs, 0);
        assert!(journal.poll_sync().is_some());

        let other = tempfile::tempdir().unwrap();
        let (mut journal, restored, _) = Journal::open(options(other.path())).unwrap();
        let mut server = self::server(restored);
        write(&mut server, &mut journal, 0..3);
        write(&mut server, &mut journal, 3..6);
        assert_eq!(journal.counters().syncs, 2);
        assert_eq!(journal.poll_sync(), None);
    }
}
