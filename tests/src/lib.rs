//! # clonekv-tests
//!
//! End-to-end tests that start real `clonekvd` daemons on 127.0.0.1, drive them with the
//! `clonekv` CLI and the client library, and kill them. The tests live in `tests/tests/`;
//! this library is their harness:
//!
//! - [`binary`] finds the `clonekvd` and `clonekv` executables of this build (building
//!   them first if needed, see its docs);
//! - [`Cluster`] allocates a free block of ports, so tests run in parallel, and starts,
//!   kills (`kill -9`) and restarts a primary and a backup with every endpoint given
//!   explicitly and short test timings;
//! - [`Daemon::wait_for_log`] and [`wait_until`] wait for an event with a deadline
//!   instead of sleeping.
//!
//! A failing test keeps its scratch directory (daemon logs) and prints its path.

use std::fs;
use std::io::{self, Read};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use clonekv_zmq::client::{Client, ClientBuilder};

pub mod netns;

/// How long any single wait in a test may take before it fails. Generous: the suite
/// must pass on a slow, shared 2-core machine with debug builds.
pub const PATIENCE: Duration = Duration::from_secs(60);

/// Heartbeat the test daemons use (the default is 1 s), to keep failovers quick.
pub const HEARTBEAT: &str = "200ms";
/// Heartbeats of silence before a peer counts as dead (the default is 2). With the
/// heartbeat above that is 1 s, long enough that a busy machine does not fake a death.
pub const PEER_EXPIRY_BEATS: &str = "5";
/// The test clients' server ttl: silence before they try the next server.
pub const SERVER_TTL: Duration = Duration::from_secs(2);

/// A command running one of the workspace's binaries with discovery off: tests on the
/// host's network must send nothing beyond loopback, and a daemon or CLI with discovery
/// on would broadcast beacons on every interface. The discovery tests run theirs in
/// network namespaces instead.
pub fn tool(name: &str) -> Command {
    let mut command = Command::new(binary(name));
    command
        .env("CLONEKVD_NO_DISCOVERY", "1")
        .env("CLONEKV_NO_DISCOVERY", "1");
    command
}

/// The path of one of clonekv-zmq's executables (`clonekvd` or `clonekv`) of this build.
///
/// Integration tests of one package cannot name another package's binaries
/// (`CARGO_BIN_EXE_*` is per package), so the harness finds them next to its own test
/// executable: `target/<profile>/deps/<test>` → `target/<profile>/<name>`. On first use
/// it runs `cargo build -p clonekv-zmq --bins` for the same profile and target
/// directory, so the binaries exist and are current even when only this package is
/// tested; under `cargo test --workspace` they are already built and it is a no-op.
pub fn binary(name: &str) -> PathBuf {
    static PROFILE_DIR: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    match PROFILE_DIR.get_or_init(build_binaries) {
        Ok(dir) => dir.join(name),
        Err(error) => panic!("{error}"),
    }
}

fn build_binaries() -> Result<PathBuf, String> {
    let exe = std::env::current_exe().map_err(|error| format!("current_exe: {error}"))?;
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .ok_or_else(|| format!("unexpected test executable path {}", exe.display()))?
        .to_path_buf();
    let target_dir = profile_dir
        .parent()
        .ok_or_else(|| format!("no target directory above {}", profile_dir.display()))?;
    let profile = match profile_dir.file_name().and_then(|name| name.to_str()) {
        Some("debug") => "dev".to_string(),
        Some(other) => other.to_string(),
        None => {
            return Err(format!(
                "unexpected profile directory {}",
                profile_dir.display()
            ))
        }
    };
    let output = Command::new(env!("CARGO"))
        .args([
            "build",
            "--quiet",
            "-p",
            "clonekv-zmq",
            "--bins",
            "--profile",
        ])
        .arg(&profile)
        .arg("--target-dir")
        .arg(target_dir)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .stdin(Stdio::null())
        .output()
        .map_err(|error| format!("cannot run cargo to build the binaries: {error}"))?;
    if !output.status.success() {
        return Err(format!(
            "building the clonekv-zmq binaries failed:\n{}",
            String::from_utf8_lossy(&output.stderr)
        ));
    }
    Ok(profile_dir)
}

/// Polls `condition` every 20 ms until it holds; panics with `what` after [`PATIENCE`].
pub fn wait_until(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + PATIENCE;
    while !condition() {
        assert!(
            Instant::now() < deadline,
            "timed out after {PATIENCE:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A scratch directory for one test (a `tempfile::TempDir`: a unique name, removed on
/// drop): removed when the test passes, kept (and its path printed) when it fails.
#[derive(Debug)]
pub struct Scratch {
    dir: Option<tempfile::TempDir>,
    path: PathBuf,
}

impl Scratch {
    /// A new empty directory named after the test.
    pub fn new(test: &str) -> Scratch {
        let dir = tempfile::Builder::new()
            .prefix(&format!("clonekv-e2e-{test}-"))
            .tempdir()
            .unwrap_or_else(|error| panic!("cannot create a scratch directory: {error}"));
        let path = dir.path().to_path_buf();
        Scratch {
            dir: Some(dir),
            path,
        }
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if std::thread::panicking() {
            if let Some(dir) = self.dir.take() {
                eprintln!("test failed; daemon logs kept in {}", dir.keep().display());
            }
        }
    }
}

/// A block of 16 consecutive TCP ports that were free on 127.0.0.1 when allocated
/// (hand-made: a server needs three consecutive ports, P to P+2, which neither binding
/// port 0 nor a port-picking crate hands out). Blocks differ between the tests of one process and are drawn from the process id
/// across processes, so parallel tests do not collide.
#[derive(Clone, Copy, Debug)]
pub struct PortBlock {
    base: u16,
}

const BLOCK: u16 = 16;
const FIRST_PORT: u32 = 20_000;
const BLOCKS: u32 = 2_500; // 20 000 .. 60 000

impl PortBlock {
    /// Finds a free block.
    pub fn allocate() -> PortBlock {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let start = std::process::id().wrapping_mul(7_919);
        for _ in 0..BLOCKS {
            let index = start.wrapping_add(NEXT.fetch_add(1, Ordering::SeqCst) * 37) % BLOCKS;
            let Ok(base) = u16::try_from(FIRST_PORT + index * u32::from(BLOCK)) else {
                continue;
            };
            let all_free =
                (base..base + BLOCK).all(|port| TcpListener::bind(("127.0.0.1", port)).is_ok());
            if all_free {
                return PortBlock { base };
            }
        }
        panic!("no free block of {BLOCK} ports found");
    }

    /// The `offset`-th port of the block.
    pub fn port(&self, offset: u16) -> u16 {
        assert!(offset < BLOCK, "port offset {offset} outside the block");
        self.base + offset
    }
}

/// Which server of the pair.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// Base port at offset 0 of the block, Binary Star state at offset 8.
    Primary,
    /// Base port at offset 4 of the block, Binary Star state at offset 9.
    Backup,
}

/// A primary/backup pair on one [`PortBlock`], every endpoint explicit.
#[derive(Debug)]
pub struct Cluster {
    /// The ports.
    pub ports: PortBlock,
    /// The running primary, if any.
    pub primary: Option<Daemon>,
    /// The running backup, if any.
    pub backup: Option<Daemon>,
    scratch: Scratch,
    starts: u32,
    extra_args: Vec<String>,
    /// `--fsync` policy of the servers' data directories, when they have one.
    fsync: Option<String>,
    /// Flags of one role only: the primary's, then the backup's.
    role_args: [Vec<String>; 2],
    http: bool,
}

impl Cluster {
    /// A cluster with nothing running yet; `test` names its scratch directory.
    pub fn new(test: &str) -> Cluster {
        Cluster {
            ports: PortBlock::allocate(),
            primary: None,
            backup: None,
            scratch: Scratch::new(test),
            starts: 0,
            extra_args: Vec::new(),
            fsync: None,
            role_args: [Vec::new(), Vec::new()],
            http: false,
        }
    }

    /// A primary and a backup, started together.
    pub fn pair(test: &str) -> Cluster {
        let mut cluster = Cluster::new(test);
        cluster.start(Role::Primary);
        cluster.start(Role::Backup);
        cluster
    }

    /// Adds `clonekvd` flags for every server started from now on.
    pub fn with_daemon_args(mut self, args: &[&str]) -> Cluster {
        self.extra_args
            .extend(args.iter().map(|arg| arg.to_string()));
        self
    }

    /// Gives each server started from now on its own data directory in the scratch
    /// directory ([`Cluster::data_dir`]), fsynced by `fsync` policy. A restarted server
    /// finds what it recorded before.
    pub fn with_data_dirs(mut self, fsync: &str) -> Cluster {
        self.fsync = Some(fsync.to_string());
        self
    }

    /// The data directory of a server (see [`Cluster::with_data_dirs`]).
    pub fn data_dir(&self, role: Role) -> PathBuf {
        self.scratch
            .path()
            .join(format!("{role:?}-data").to_lowercase())
    }

    /// Adds `clonekvd` flags for the servers of `role` started from now on.
    pub fn with_role_args(mut self, role: Role, args: &[String]) -> Cluster {
        let index = match role {
            Role::Primary => 0,
            Role::Backup => 1,
        };
        self.role_args[index].extend(args.iter().cloned());
        self
    }

    /// Serves each server's HTTP gateway (from the next start on), on
    /// [`Cluster::http_port`].
    pub fn with_http(mut self) -> Cluster {
        self.http = true;
        self
    }

    /// The port of a server's HTTP gateway (offset 12 of the block for the primary, 13
    /// for the backup).
    pub fn http_port(&self, role: Role) -> u16 {
        match role {
            Role::Primary => self.ports.port(12),
            Role::Backup => self.ports.port(13),
        }
    }

    /// The base URL of a server's HTTP gateway, `http://127.0.0.1:PORT`.
    pub fn http_url(&self, role: Role) -> String {
        format!("http://127.0.0.1:{}", self.http_port(role))
    }

    /// The base port P of a server.
    pub fn base_port(&self, role: Role) -> u16 {
        match role {
            Role::Primary => self.ports.port(0),
            Role::Backup => self.ports.port(4),
        }
    }

    /// The Binary Star state port of a server.
    pub fn state_port(&self, role: Role) -> u16 {
        match role {
            Role::Primary => self.ports.port(8),
            Role::Backup => self.ports.port(9),
        }
    }

    /// A server's base endpoint, as clients name it.
    pub fn endpoint(&self, role: Role) -> String {
        format!("tcp://127.0.0.1:{}", self.base_port(role))
    }

    /// Both servers' endpoints, primary first.
    pub fn servers(&self) -> Vec<String> {
        vec![self.endpoint(Role::Primary), self.endpoint(Role::Backup)]
    }

    /// The command-line arguments of a server: every endpoint explicit, test timings.
    pub fn daemon_args(&self, role: Role) -> Vec<String> {
        let peer = match role {
            Role::Primary => Role::Backup,
            Role::Backup => Role::Primary,
        };
        let mut args: Vec<String> = Vec::new();
        if role == Role::Backup {
            args.push("--backup".into());
        }
        for (flag, value) in [
            ("--bind-host", "127.0.0.1".to_string()),
            ("--port", self.base_port(role).to_string()),
            ("--state-port", self.state_port(role).to_string()),
            ("--peer-host", "127.0.0.1".to_string()),
            ("--peer-port", self.base_port(peer).to_string()),
            ("--peer-state-port", self.state_port(peer).to_string()),
            ("--heartbeat", HEARTBEAT.to_string()),
            ("--peer-expiry-beats", PEER_EXPIRY_BEATS.to_string()),
        ] {
            args.push(flag.into());
            args.push(value);
        }
        if let Some(fsync) = &self.fsync {
            args.push("--data-dir".into());
            args.push(self.data_dir(role).display().to_string());
            args.push("--fsync".into());
            args.push(fsync.clone());
        }
        if self.http {
            args.push("--http".into());
            args.push(format!("127.0.0.1:{}", self.http_port(role)));
        }
        args.extend(self.extra_args.iter().cloned());
        let index = match role {
            Role::Primary => 0,
            Role::Backup => 1,
        };
        args.extend(self.role_args[index].iter().cloned());
        args
    }

    /// Starts (or restarts) a server. Panics if one is already running in that role.
    pub fn start(&mut self, role: Role) -> &mut Daemon {
        self.starts += 1;
        let name = format!("{role:?}-{}", self.starts).to_lowercase();
        let daemon = Daemon::spawn(&name, &self.daemon_args(role), self.scratch.path());
        let slot = match role {
            Role::Primary => &mut self.primary,
            Role::Backup => &mut self.backup,
        };
        assert!(slot.is_none(), "{role:?} is already running");
        slot.insert(daemon)
    }

    /// The running server in `role`. Panics if it is not running.
    pub fn daemon(&mut self, role: Role) -> &mut Daemon {
        let slot = match role {
            Role::Primary => &mut self.primary,
            Role::Backup => &mut self.backup,
        };
        slot.as_mut()
            .unwrap_or_else(|| panic!("{role:?} is not running"))
    }

    /// `kill -9` a server.
    pub fn kill(&mut self, role: Role) {
        let slot = match role {
            Role::Primary => &mut self.primary,
            Role::Backup => &mut self.backup,
        };
        if let Some(mut daemon) = slot.take() {
            daemon.kill9();
        }
    }

    /// A client builder for this cluster: both servers (primary first), the test
    /// server ttl.
    pub fn client(&self) -> ClientBuilder {
        Client::builder()
            .server(self.endpoint(Role::Primary))
            .server(self.endpoint(Role::Backup))
            .server_ttl(SERVER_TTL)
    }

    /// A client builder that talks to one server only.
    pub fn client_of(&self, role: Role) -> ClientBuilder {
        Client::builder()
            .server(self.endpoint(role))
            .server_ttl(SERVER_TTL)
    }

    /// Runs the `clonekv` CLI against this cluster and returns its output.
    pub fn cli(&self, args: &[&str]) -> Output {
        self.cli_command(args)
            .output()
            .unwrap_or_else(|error| panic!("cannot run clonekv: {error}"))
    }

    /// The `clonekv` CLI command against this cluster, not yet started.
    pub fn cli_command(&self, args: &[&str]) -> Command {
        let mut command = tool("clonekv");
        command
            .arg("--server")
            .arg(self.servers().join(","))
            .args(["--server-ttl", "2s", "--timeout", "60s"])
            .args(args)
            .env_remove("CLONEKV_SERVERS")
            .stdin(Stdio::null());
        command
    }

    /// The scratch directory.
    pub fn scratch(&self) -> &Path {
        self.scratch.path()
    }
}

/// A running `clonekvd`. Dropping it kills it.
#[derive(Debug)]
pub struct Daemon {
    name: String,
    child: Child,
    log: PathBuf,
}

impl Daemon {
    /// Starts `clonekvd args...`, logging (at debug level) to `<dir>/<name>.log`.
    pub fn spawn(name: &str, args: &[String], dir: &Path) -> Daemon {
        Daemon::spawn_command(name, tool("clonekvd"), args, dir)
    }

    /// Starts `clonekvd args...` inside network namespace `namespace`, with discovery
    /// left to its flags (on by default), logging as [`Daemon::spawn`] does. `ip netns
    /// exec` runs the daemon in its own process, so the pid is the daemon's.
    pub fn spawn_in(namespace: &str, name: &str, args: &[String], dir: &Path) -> Daemon {
        let mut command = Command::new("ip");
        command
            .args(["netns", "exec", namespace])
            .arg(binary("clonekvd"));
        Daemon::spawn_command(name, command, args, dir)
    }

    fn spawn_command(name: &str, mut command: Command, args: &[String], dir: &Path) -> Daemon {
        let log = dir.join(format!("{name}.log"));
        let file = fs::File::create(&log)
            .unwrap_or_else(|error| panic!("cannot create {}: {error}", log.display()));
        let child = command
            .args(args)
            .env("RUST_LOG", "clonekvd=debug,clonekv_zmq=debug")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(file)
            .spawn()
            .unwrap_or_else(|error| panic!("cannot start clonekvd: {error}"));
        Daemon {
            name: name.to_string(),
            child,
            log,
        }
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Everything it has logged so far.
    pub fn log(&self) -> String {
        let mut text = String::new();
        if let Ok(mut file) = fs::File::open(&self.log) {
            let _ = file.read_to_string(&mut text);
        }
        text
    }

    /// Waits until its log contains `needle` (at or after byte `from`); returns the
    /// position just past it. Panics after [`PATIENCE`], or if the process exits.
    pub fn wait_for_log_from(&mut self, from: usize, needle: &str) -> usize {
        let mut found = None;
        let name = self.name.clone();
        wait_until(&format!("{name} to log {needle:?}"), || {
            let log = self.log();
            if let Some(position) = log.get(from..).and_then(|rest| rest.find(needle)) {
                found = Some(from + position + needle.len());
                return true;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("{name} exited ({status}) before logging {needle:?}:\n{log}");
            }
            false
        });
        found.unwrap_or(from)
    }

    /// Waits until its log contains `needle`.
    pub fn wait_for_log(&mut self, needle: &str) -> usize {
        self.wait_for_log_from(0, needle)
    }

    /// True while the process runs.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Sends a signal by name (`TERM`, `INT`) with `kill`.
    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.pid().to_string())
            .status()
            .unwrap_or_else(|error| panic!("cannot run kill: {error}"));
        assert!(status.success(), "kill -{signal} {} failed", self.pid());
    }

    /// Waits for the process to exit, at most [`PATIENCE`].
    pub fn wait_exit(&mut self) -> ExitStatus {
        let mut exit = None;
        let name = self.name.clone();
        wait_until(&format!("{name} to exit"), || {
            exit = self.child.try_wait().ok().flatten();
            exit.is_some()
        });
        exit.unwrap_or_else(|| panic!("{name} did not exit"))
    }

    /// `kill -9` and reap.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// The stdout of a finished command, as text.
pub fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Panics with the command's stderr unless it exited successfully.
pub fn assert_success(output: &Output, what: &str) {
    assert!(
        output.status.success(),
        "{what} failed ({}): stdout {:?} stderr {:?}",
        output.status,
        stdout(output),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// Reads lines from a child's stdout on a thread, so a test can wait for a line with a
/// deadline.
#[derive(Debug)]
pub struct LineReader {
    lines: std::sync::mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl LineReader {
    /// Starts reading `stdout` line by line.
    pub fn new(stdout: impl io::Read + Send + 'static) -> LineReader {
        let (sender, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            use io::BufRead;
            for line in io::BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if sender.send(line).is_err() {
                    break;
                }
            }
        });
        LineReader {
            lines,
            seen: Vec::new(),
        }
    }

    /// Waits for a line that contains `needle` (or returns one already seen and not
    /// yet matched); panics after [`PATIENCE`].
    pub fn wait_for(&mut self, needle: &str) -> String {
        if let Some(index) = self.seen.iter().position(|line| line.contains(needle)) {
            return self.seen.remove(index);
        }
        let deadline = Instant::now() + PATIENCE;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) if line.contains(needle) => return line,
                Ok(line) => self.seen.push(line),
                Err(_) => panic!(
                    "no line containing {needle:?} within {PATIENCE:?}; saw {:?}",
                    self.seen
                ),
            }
        }
    }
}
