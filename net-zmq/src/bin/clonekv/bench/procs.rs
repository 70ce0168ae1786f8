//! The processes a bench run starts: `clonekvd` servers and the raw relay, on free ports
//! of 127.0.0.1, each killed when its handle is dropped (also on error and on panic).

use std::fs;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, Once};
use std::time::Duration;

use super::BenchError;

/// Consecutive TCP ports that were free on 127.0.0.1 when allocated, handed out in
/// order.
pub struct Ports {
    next: u16,
    end: u16,
}

impl Ports {
    /// Finds `count` consecutive free ports, starting at a place drawn from the process
    /// id so that two runs at once are unlikely to collide.
    pub fn allocate(count: u16) -> Result<Ports, BenchError> {
        const FIRST: u32 = 20_000;
        // Below Linux's ephemeral range (32768 and up by default), from which outgoing
        // connections take their local ports and could take one of ours.
        const LAST: u32 = 32_000;
        let span = (LAST - FIRST) / u32::from(count);
        let start = std::process::id().wrapping_mul(7_919);
        for attempt in 0..span {
            let index = start.wrapping_add(attempt.wrapping_mul(37)) % span;
            let Ok(base) = u16::try_from(FIRST + index * u32::from(count)) else {
                continue;
            };
            let all_free =
                (base..base + count).all(|port| TcpListener::bind(("127.0.0.1", port)).is_ok());
            if all_free {
                return Ok(Ports {
                    next: base,
                    end: base + count,
                });
            }
        }
        Err(BenchError::new("no block of free ports on 127.0.0.1"))
    }

    /// The next `count` ports, the first of them returned.
    pub fn take(&mut self, count: u16) -> Result<u16, BenchError> {
        let first = self.next;
        if self.end - first < count {
            return Err(BenchError::new("port block exhausted (a bench bug)"));
        }
        self.next += count;
        Ok(first)
    }
}

/// Process ids of the children still running, for the signal handler.
static CHILDREN: Mutex<Vec<u32>> = Mutex::new(Vec::new());

/// Work to do on a signal before exiting: removing the run's keys from a server the
/// bench did not start.
type SignalWork = Box<dyn FnOnce() + Send>;
static ON_SIGNAL: Mutex<Option<SignalWork>> = Mutex::new(None);

/// Has `work` done on SIGINT, SIGTERM or SIGHUP, after the children are killed and
/// before the process exits; a second signal exits at once.
pub fn on_signal(work: SignalWork) {
    handle_signals();
    if let Ok(mut slot) = ON_SIGNAL.lock() {
        *slot = Some(work);
    }
}

/// Takes back the work given to [`on_signal`]: a signal from now on only stops.
pub fn forget_on_signal() {
    if let Ok(mut slot) = ON_SIGNAL.lock() {
        slot.take();
    }
}

/// On SIGINT, SIGTERM or SIGHUP, kills every child still running, does the work given to
/// [`on_signal`] if any, then exits: a signal ends the process without running
/// destructors, and the children must not outlive it.
fn handle_signals() {
    static INSTALL: Once = Once::new();
    INSTALL.call_once(|| {
        use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
        let Ok(mut signals) = signal_hook::iterator::Signals::new([SIGINT, SIGTERM, SIGHUP]) else {
            return;
        };
        std::thread::spawn(move || {
            let mut signals = signals.forever();
            if let Some(signal) = signals.next() {
                let pids = CHILDREN.lock().map(|pids| pids.clone()).unwrap_or_default();
                for pid in pids {
                    let _ = Command::new("kill")
                        .arg("-KILL")
                        .arg(pid.to_string())
                        .stderr(Stdio::null())
                        .status();
                }
                eprintln!("clonekv bench: stopped by signal {signal}");
                let work = ON_SIGNAL.lock().ok().and_then(|mut slot| slot.take());
                if let Some(work) = work {
                    std::thread::spawn(move || {
                        work();
                        std::process::exit(128 + signal);
                    });
                    // Until the work is done, or another signal.
                    let _ = signals.next();
                }
                std::process::exit(128 + signal);
            }
        });
    });
}

/// A `clonekvd` or relay child process; dropping it sends SIGKILL and reaps it.
pub struct Process {
    name: String,
    child: Child,
    log: PathBuf,
}

impl Process {
    /// Starts `program args...` with stderr to `<dir>/<name>.log`.
    pub fn spawn(
        name: &str,
        program: &Path,
        args: &[String],
        dir: &Path,
    ) -> Result<Process, BenchError> {
        Process::spawn_at_level(name, program, args, dir, "warn")
    }

    /// The same, logging at info level (for a part that reads what the server did).
    pub fn spawn_logging(
        name: &str,
        program: &Path,
        args: &[String],
        dir: &Path,
    ) -> Result<Process, BenchError> {
        Process::spawn_at_level(name, program, args, dir, "info")
    }

    fn spawn_at_level(
        name: &str,
        program: &Path,
        args: &[String],
        dir: &Path,
        level: &str,
    ) -> Result<Process, BenchError> {
        let log = dir.join(format!("{name}.log"));
        let file = fs::File::create(&log).map_err(|error| {
            BenchError::new(format!("cannot create {}: {error}", log.display()))
        })?;
        let child = Command::new(program)
            .args(args)
            .env("RUST_LOG", level)
            // The bench's servers are on loopback: no beacons on the LAN.
            .env("CLONEKVD_NO_DISCOVERY", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(file)
            .spawn()
            .map_err(|error| {
                BenchError::new(format!(
                    "cannot start {} ({error}); build it with `cargo build --release -p clonekv-zmq` or pass --clonekvd",
                    program.display()
                ))
            })?;
        handle_signals();
        if let Ok(mut pids) = CHILDREN.lock() {
            pids.push(child.id());
        }
        Ok(Process {
            name: name.to_string(),
            child,
            log,
        })
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Fails if the process has exited (a port taken, a crash), quoting its log.
    pub fn check_running(&mut self) -> Result<(), BenchError> {
        match self.child.try_wait() {
            Ok(None) => Ok(()),
            Ok(Some(status)) => {
                let log = fs::read_to_string(&self.log).unwrap_or_default();
                Err(BenchError::new(format!(
                    "{} exited ({status}):\n{}",
                    self.name,
                    log.trim_end()
                )))
            }
            Err(error) => Err(BenchError::new(format!("{}: {error}", self.name))),
        }
    }

    /// SIGKILL, now.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Ok(mut pids) = CHILDREN.lock() {
            pids.retain(|&pid| pid != self.child.id());
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Resident set size of a process in bytes (`VmRSS`), Linux only.
#[cfg(target_os = "linux")]
pub fn rss_of(pid: u32) -> Option<u64> {
    let status = linux_process(pid)?.status().ok()?;
    Some(status.vmrss? * 1024)
}

/// CPU time (user + system, all its threads) a process has used so far, Linux only.
#[cfg(target_os = "linux")]
pub fn cpu_time_of(pid: u32) -> Option<Duration> {
    let stat = linux_process(pid)?.stat().ok()?;
    let ticks = stat.utime + stat.stime;
    let per_second = procfs::ticks_per_second().max(1);
    Some(Duration::from_nanos(
        ticks.saturating_mul(1_000_000_000) / per_second,
    ))
}

/// The 1-minute load average, Linux only.
#[cfg(target_os = "linux")]
pub fn load_average() -> Option<f64> {
    use procfs::Current;
    procfs::LoadAverage::current()
        .ok()
        .map(|load| f64::from(load.one))
}

#[cfg(target_os = "linux")]
fn linux_process(pid: u32) -> Option<procfs::process::Process> {
    procfs::process::Process::new(i32::try_from(pid).ok()?).ok()
}

#[cfg(not(target_os = "linux"))]
pub fn rss_of(_pid: u32) -> Option<u64> {
    None
}

#[cfg(not(target_os = "linux"))]
pub fn cpu_time_of(_pid: u32) -> Option<Duration> {
    None
}

#[cfg(not(target_os = "linux"))]
pub fn load_average() -> Option<f64> {
    None
}

/// Timings of a server started by the bench.
#[derive(Clone, Copy, Debug)]
pub struct Timing {
    /// `--heartbeat` in milliseconds.
    pub heartbeat_ms: u64,
    /// `--peer-expiry-beats`.
    pub peer_expiry_beats: u32,
}

impl Timing {
    /// clonekvd's defaults: 1 s heartbeat, peer dead after 2.
    pub const DEFAULT: Timing = Timing {
        heartbeat_ms: 1_000,
        peer_expiry_beats: 2,
    };
}

/// The ports of one server: base P (P, P+1, P+2) and its Binary Star state port.
#[derive(Clone, Copy, Debug)]
pub struct ServerPorts {
    pub base: u16,
    pub state: u16,
}

impl ServerPorts {
    pub fn take(ports: &mut Ports) -> Result<ServerPorts, BenchError> {
        let base = ports.take(3)?;
        let state = ports.take(1)?;
        Ok(ServerPorts { base, state })
    }

    /// The snapshot endpoint P, as clients name a server.
    pub fn endpoint(&self) -> String {
        format!("tcp://127.0.0.1:{}", self.base)
    }
}

/// The `clonekvd` command line of one server with every endpoint on 127.0.0.1.
pub fn server_args(
    me: ServerPorts,
    peer: ServerPorts,
    backup: bool,
    timing: Timing,
    hwm: i32,
) -> Vec<String> {
    let mut args = Vec::new();
    if backup {
        args.push("--backup".to_string());
    }
    for (flag, value) in [
        ("--bind-host", "127.0.0.1".to_string()),
        ("--port", me.base.to_string()),
        ("--state-port", me.state.to_string()),
        ("--peer-host", "127.0.0.1".to_string()),
        ("--peer-port", peer.base.to_string()),
        ("--peer-state-port", peer.state.to_string()),
        ("--heartbeat", format!("{}ms", timing.heartbeat_ms)),
        ("--peer-expiry-beats", timing.peer_expiry_beats.to_string()),
        ("--hwm", hwm.to_string()),
    ] {
        args.push(flag.to_string());
        args.push(value);
    }
    args
}

/// A scratch directory for the children's logs: a new one with a unique name under the
/// system's temporary directory, removed at the end unless the run failed (then its
/// path is printed).
pub struct Scratch {
    dir: Option<tempfile::TempDir>,
    pub path: PathBuf,
    pub keep: bool,
}

impl Scratch {
    pub fn new() -> Result<Scratch, BenchError> {
        let dir = tempfile::Builder::new()
            .prefix("clonekv-bench-")
            .tempdir()
            .map_err(|error| {
                BenchError::new(format!(
                    "cannot create a directory in {}: {error}",
                    std::env::temp_dir().display()
                ))
            })?;
        Ok(Scratch {
            path: dir.path().to_path_buf(),
            dir: Some(dir),
            keep: false,
        })
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        // Dropping the `TempDir` removes it; keeping it leaves it in place.
        if let Some(dir) = self.dir.take() {
            if self.keep {
                eprintln!("clonekv bench: child logs kept in {}", dir.keep().display());
            }
        }
    }
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;

    #[test]
    fn this_process_has_memory_cpu_time_and_a_load_average() {
        let pid = std::process::id();
        // Spin until the kernel has charged this process a clock tick: 30 ms of wall
        // time were not always one tick of CPU on a machine loaded 10 times over.
        let spin = std::time::Instant::now();
        while spin.elapsed() < Duration::from_secs(10)
            && cpu_time_of(pid).is_none_or(|cpu| cpu == Duration::ZERO)
        {
            for _ in 0..100_000 {
                std::hint::black_box(0u64);
            }
        }
        assert!(rss_of(pid).is_some_and(|bytes| bytes > 1_000_000));
        assert!(cpu_time_of(pid).is_some_and(|cpu| cpu > Duration::ZERO));
        assert!(load_average().is_some_and(|load| load >= 0.0));
    }

    #[test]
    fn the_scratch_directory_goes_unless_kept() {
        let scratch = Scratch::new().unwrap();
        let path = scratch.path.clone();
        assert!(path.is_dir());
        drop(scratch);
        assert!(!path.exists());
        let mut kept = Scratch::new().unwrap();
        kept.keep = true;
        let path = kept.path.clone();
        drop(kept);
        assert!(path.is_dir());
        fs::remove_dir_all(path).unwrap();
    }
}
