//! `clonekv`: the command-line client of a clonekv server pair, built on
//! [`clonekv_zmq::client`]. See `clonekv --help`.

mod bench;
mod group;
mod group_bench;
mod reach;
mod show;

use std::io::{self, Write};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use clap::{CommandFactory, Parser, Subcommand, ValueEnum};
use clonekv_zmq::client::{Client, ClientError, Event, ServerAddress, Status, DEFAULT_SERVERS};
use clonekv_zmq::core::client::State;
use clonekv_zmq::core::kvmsg::{Limits, HUGZ, KTHXBAI};
use clonekv_zmq::curve::{KeyError, KeyPair, PublicKey};
use clonekv_zmq::discovery::{
    Discovery, DiscoveryOptions, FoundServer, DEFAULT_CLUSTER, DEFAULT_DISCOVERY_PORT,
};
use clonekv_zmq::duration::HumanDuration;
use serde_json::{json, Map, Value};

use crate::show::{line_text, put_bytes, remaining_ttl, text};

/// Exit status: the key does not exist (`get`).
const EXIT_NOT_FOUND: u8 = 1;
/// Exit status: a bad argument, or an update the client refuses (empty key, ...).
const EXIT_USAGE: u8 = 2;
/// Exit status: no server answered, or a commit was not confirmed, in time.
const EXIT_UNAVAILABLE: u8 = 3;
/// Exit status: anything else went wrong (an update lost in a failover, a socket error).
const EXIT_FAILURE: u8 = 4;

#[derive(Parser, Debug)]
#[command(
    name = "clonekv",
    version,
    about = "Read, write and watch a clonekv store (ZeroMQ Clone protocol)",
    after_help = "Without --server, the servers are found by their UDP beacons (discovery: \
cluster \"clonekv\" on UDP port 5560 unless --cluster / --discovery-port say otherwise); \
when none announces itself within 1.5 s, or with --no-discovery, the reference pair on \
this host is used: tcp://localhost:5556 (primary) and tcp://localhost:5566 (backup). Each \
server is given by its base endpoint P; the client also uses P+1 (updates) and P+2 \
(collector).\n\n\
Durations take a unit: 250ms, 1.5s, 2m (a bare number is seconds).\n\n\
Security: without --curve-secret-key the client speaks plain ZMTP (the zguide's wire), \
readable and forgeable by anyone on the network. Servers started with CURVE keys need \
--curve-secret-key (a pair from `clonekv keygen`, whose public key the servers admit) and \
--server-public-key. See docs/SECURITY.md.\n\n\
Exit status: 0 success; 1 key not found (get); 2 bad arguments or a refused update; \
3 no server answered, or the commit was not confirmed, within --timeout, or every server \
refused our CURVE key; 4 other \
failures (an update lost in a failover, a socket error)."
)]
struct Cli {
    /// A server's base endpoint (repeat, or separate with commas); tried in order.
    #[arg(
        short,
        long = "server",
        value_name = "ENDPOINT",
        env = "CLONEKV_SERVERS",
        value_delimiter = ',',
        global = true
    )]
    servers: Vec<String>,

    /// The cluster to find by discovery when no --server is given.
    #[arg(long, value_name = "NAME", env = "CLONEKV_CLUSTER", default_value = DEFAULT_CLUSTER, global = true)]
    cluster: String,

    /// UDP port of the cluster's discovery beacons.
    #[arg(long, value_name = "PORT", env = "CLONEKV_DISCOVERY_PORT", default_value_t = DEFAULT_DISCOVERY_PORT, global = true)]
    discovery_port: u16,

    /// Listen for beacons on this network interface only (e.g. eth0).
    #[arg(
        long,
        value_name = "IFACE",
        env = "CLONEKV_DISCOVERY_INTERFACE",
        global = true
    )]
    discovery_interface: Option<String>,

    /// Do not look for servers by beacon: without --server, use the pair on this host.
    #[arg(
        long,
        env = "CLONEKV_NO_DISCOVERY",
        value_parser = clap::builder::BoolishValueParser::new(),
        global = true
    )]
    no_discovery: bool,

    /// How long to wait for a server to answer, and for a commit with --wait.
    #[arg(
        short,
        long,
        value_name = "DURATION",
        default_value = "10s",
        global = true
    )]
    timeout: HumanDuration,

    /// The largest value the servers accept, in bytes: their --max-body-len (1 MiB by
    /// default; values and snapshot entries past it are refused).
    #[arg(long, value_name = "BYTES", default_value_t = Limits::default().max_body_len, global = true)]
    max_value_len: usize,

    /// Silence from the current server before trying the next one.
    #[arg(long, value_name = "DURATION", default_value = "5s", global = true)]
    server_ttl: HumanDuration,

    /// This client's CURVE key pair file (`clonekv keygen NAME` writes NAME.key): every
    /// connection then uses CURVE. Needs --server-public-key. Without it the client
    /// speaks plain ZMTP, which servers with keys refuse.
    #[arg(
        long,
        value_name = "FILE",
        env = "CLONEKV_CURVE_SECRET_KEY",
        global = true
    )]
    curve_secret_key: Option<std::path::PathBuf>,

    /// The servers' CURVE public key (Z85) or .pub file: one for every server, or one per
    /// --server in the same order (repeat, or separate with commas).
    #[arg(
        long,
        value_name = "KEY|FILE",
        env = "CLONEKV_SERVER_PUBLIC_KEY",
        value_delimiter = ',',
        // A Z85 key may start with `-`.
        allow_hyphen_values = true,
        global = true
    )]
    server_public_key: Vec<String>,

    /// Print JSON (one object per line) instead of text.
    #[arg(long, global = true)]
    json: bool,

    /// Show the client library's log on stderr: -v warnings, -vv info, -vvv debug
    /// (RUST_LOG, when set, decides instead).
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    verbose: u8,

    #[command(subcommand)]
    command: Command,
}

/// Shells `clonekv completions` knows.
#[derive(Clone, Copy, Debug, ValueEnum)]
enum Shell {
    Bash,
    Zsh,
    Fish,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Print the value of KEY (exit status 1 if it does not exist).
    Get {
        /// The key.
        key: String,
        /// Print the value's bytes exactly, without a newline (text output escapes bytes
        /// that are not UTF-8 as \xNN; --json gives them as base64).
        #[arg(long, conflicts_with = "json")]
        raw: bool,
    },
    /// Set KEY to VALUE on every server (VALUE `-` reads it from stdin).
    Set {
        /// The key.
        key: String,
        /// The value (must not be empty: use `del` to delete); `-` reads it from stdin.
        #[arg(required_unless_present = "file", conflicts_with = "file")]
        value: Option<String>,
        /// Read the value from this file (any bytes, up to the server's body limit).
        #[arg(long, value_name = "PATH")]
        file: Option<std::path::PathBuf>,
        /// Expire the key after this long.
        #[arg(long, value_name = "DURATION")]
        ttl: Option<HumanDuration>,
        /// Wait until the active server has published the update (the commit).
        #[arg(long)]
        wait: bool,
    },
    /// Delete KEY on every server.
    Del {
        /// The key.
        key: String,
        /// Wait until the active server has published the delete.
        #[arg(long)]
        wait: bool,
    },
    /// Print every key and value under SUBTREE (a key prefix; default: everything).
    Dump {
        /// Key prefix.
        subtree: Option<String>,
        /// Also show each key's sequence and remaining ttl.
        #[arg(short, long)]
        long: bool,
    },
    /// Print the keys under SUBTREE, then every change as it happens, until Ctrl-C.
    Watch {
        /// Key prefix.
        subtree: Option<String>,
    },
    /// Groups: join one (members, a leader with a fencing token, votes), show one,
    /// request a vote, cast a ballot.
    Group(group::GroupArgs),
    /// Show the pair: each server's endpoint, Binary Star state, sequence, keys,
    /// heartbeat age and whether it answered.
    Status,
    /// Print a shell completion script (e.g. `clonekv completions bash >
    /// /etc/bash_completion.d/clonekv`).
    Completions {
        /// The shell.
        shell: Shell,
    },
    /// Print the manual page (roff), e.g. `clonekv man | man -l -`.
    Man,
    /// Write a new CURVE key pair: NAME.key (both keys; mode 0600, keep it secret) and
    /// NAME.pub (the public key, for the other side's --curve-clients or
    /// --server-public-key / --peer-public-key). Prints the public key.
    Keygen {
        /// Path and base name of the two files.
        name: std::path::PathBuf,
        /// Replace existing files.
        #[arg(long)]
        force: bool,
    },
    /// Measure a server's throughput, latency, snapshot, failover and memory against
    /// the raw libzmq limits of this machine (see docs/PERFORMANCE.md).
    Bench(bench::BenchArgs),
    /// Measure clonekvd's HTTP gateway (PUT with commit, GET, watch fan-out) against
    /// etcd's v3 JSON gateway in the same run (see docs/PERFORMANCE.md).
    BenchHttp(bench::http::HttpBenchArgs),
    /// The raw relay the bench measures as a baseline (started by `bench`).
    #[command(hide = true)]
    BenchRelay {
        /// Endpoint to bind the collector SUB on.
        #[arg(long)]
        collector: String,
        /// Endpoint to bind the PUB on.
        #[arg(long)]
        publisher: String,
        /// High-water mark of both sockets.
        #[arg(long, default_value_t = 100_000)]
        hwm: i32,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // An error is one line of the CLI's own; the library's log is for -v (or RUST_LOG).
    clonekv_zmq::log::init(match cli.verbose {
        0 => "off",
        1 => "warn",
        2 => "info",
        _ => "debug",
    });
    match &cli.command {
        Command::Bench(args) => return run_bench(args, cli.json),
        Command::BenchHttp(args) => return run_bench_http(args, cli.json),
        Command::Completions { shell } => return print_completions(*shell),
        Command::Man => return print_man_page(),
        Command::Keygen { name, force } => return keygen(name, *force, cli.json),
        Command::BenchRelay {
            collector,
            publisher,
            hwm,
        } => {
            return match bench::run_relay(collector, publisher, *hwm) {
                Ok(()) => ExitCode::SUCCESS,
                Err(error) => {
                    eprintln!("clonekv: {error}");
                    ExitCode::from(EXIT_FAILURE)
                }
            };
        }
        _ => {}
    }
    match run(&cli) {
        Ok(code) => code,
        Err(failure) => {
            eprintln!("clonekv: {}", failure.message);
            ExitCode::from(failure.status)
        }
    }
}

struct Failure {
    status: u8,
    message: String,
}

impl Failure {
    fn new(status: u8, message: impl Into<String>) -> Self {
        Failure {
            status,
            message: message.into(),
        }
    }
}

/// Each server's public key, in the order of `servers`: none, one for all, or one each.
fn server_keys(cli: &Cli, servers: &[String]) -> Result<Vec<PublicKey>, Failure> {
    let keys = cli
        .server_public_key
        .iter()
        .map(|key| {
            PublicKey::from_key_or_file(key)
                .map_err(|error| Failure::new(EXIT_USAGE, format!("--server-public-key: {error}")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    match keys.as_slice() {
        [] => Ok(Vec::new()),
        [key] => Ok(vec![*key; servers.len()]),
        _ if keys.len() == servers.len() => Ok(keys),
        _ => Err(Failure::new(
            EXIT_USAGE,
            format!(
                "--server-public-key: {} keys for {} servers; give one key for all, or one per --server in order",
                keys.len(),
                servers.len()
            ),
        )),
    }
}

/// `clonekv keygen NAME`: writes the pair and prints the public key.
fn keygen(name: &std::path::Path, force: bool, json: bool) -> ExitCode {
    let written = KeyPair::generate().and_then(|pair| {
        let (secret, public) = pair.write(name, force)?;
        Ok((pair.public(), secret, public))
    });
    match written {
        Ok((key, secret, public)) => {
            let mut out = Output::new(json);
            if json {
                out.json(json!({
                    "public_key": key.z85(),
                    "key_pair_file": secret.display().to_string(),
                    "public_key_file": public.display().to_string(),
                }));
            } else {
                out.line(&format!("{key}"));
                eprintln!(
                    "clonekv: wrote {} (secret: keep it, mode 0600) and {} (give it to the other side)",
                    secret.display(),
                    public.display()
                );
            }
            ExitCode::SUCCESS
        }
        Err(error) => {
            let status = match error {
                KeyError::Io { .. } => EXIT_USAGE,
                _ => EXIT_FAILURE,
            };
            eprintln!("clonekv: {error}");
            ExitCode::from(status)
        }
    }
}

fn client_failure(error: ClientError, servers: &[String]) -> Failure {
    let status = match &error {
        ClientError::NotSynced { .. }
        | ClientError::CommitTimeout { .. }
        | ClientError::Handshake { .. } => EXIT_UNAVAILABLE,
        ClientError::Rejected(_)
        | ClientError::Endpoint { .. }
        | ClientError::Config(_)
        | ClientError::Curve(_) => EXIT_USAGE,
        _ => EXIT_FAILURE,
    };
    let message = match &error {
        ClientError::NotSynced { .. } => format!(
            "{error} (tried {}; is clonekvd running? see --server)",
            servers.join(", ")
        ),
        _ => error.to_string(),
    };
    Failure::new(status, message)
}

/// How long the CLI listens for beacons before it falls back to the pair on this host:
/// a server announces itself every second.
const DISCOVERY_WINDOW: Duration = Duration::from_millis(1500);

/// Where the servers are: given, discovered, or the defaults on this host.
struct Servers {
    endpoints: Vec<String>,
    /// Discovery's options and what it found, when it found any.
    discovered: Option<(DiscoveryOptions, Vec<FoundServer>)>,
    /// Why the defaults are used although discovery was tried, for error messages.
    fallback_note: Option<String>,
}

fn find_servers(cli: &Cli) -> Result<Servers, Failure> {
    let defaults = || DEFAULT_SERVERS.iter().map(|s| s.to_string()).collect();
    if !cli.servers.is_empty() {
        return Ok(Servers {
            endpoints: cli.servers.clone(),
            discovered: None,
            fallback_note: None,
        });
    }
    if cli.no_discovery {
        return Ok(Servers {
            endpoints: defaults(),
            discovered: None,
            fallback_note: None,
        });
    }
    let mut options = DiscoveryOptions::new(cli.cluster.clone());
    options.port = cli.discovery_port;
    options.interface = cli.discovery_interface.clone();
    let found = Discovery::listen_for_servers(options.clone(), DISCOVERY_WINDOW)
        .map_err(|error| Failure::new(EXIT_USAGE, error.to_string()))?;
    if found.is_empty() {
        return Ok(Servers {
            endpoints: defaults(),
            discovered: None,
            fallback_note: Some(format!(
                "no server of cluster {:?} announced itself on UDP port {} within {:.1}s, so the pair on this host was tried",
                cli.cluster,
                cli.discovery_port,
                DISCOVERY_WINDOW.as_secs_f64()
            )),
        });
    }
    tracing::info!(servers = ?found, "discovery: found servers");
    Ok(Servers {
        endpoints: found.iter().map(FoundServer::base_endpoint).collect(),
        discovered: Some((options, found)),
        fallback_note: None,
    })
}

fn run(cli: &Cli) -> Result<ExitCode, Failure> {
    let found = find_servers(cli)?;
    let servers = found.endpoints.clone();
    let with_note = |mut failure: Failure| {
        if let Some(note) = &found.fallback_note {
            failure.message = format!("{}; {note}", failure.message);
        }
        failure
    };
    let fail = |error: ClientError| with_note(client_failure(error, &servers));
    let limits = Limits {
        max_body_len: cli.max_value_len,
        ..Limits::default()
    };
    // Arguments are checked before anything connects, and named in the error.
    let value = match &cli.command {
        Command::Get { key, .. } | Command::Del { key, .. } => {
            check_key(key, &limits)?;
            None
        }
        Command::Set {
            key, value, file, ..
        } => {
            check_key(key, &limits)?;
            Some(read_value(value.as_deref(), file.as_deref(), &limits)?)
        }
        Command::Group(args) => {
            args.command.check()?;
            None
        }
        _ => None,
    };
    for server in &servers {
        ServerAddress::from_base(server).map_err(fail)?;
    }
    let unresolvable = reach::unresolvable(&servers);
    if unresolvable.len() == servers.len() {
        return Err(with_note(Failure::new(
            EXIT_UNAVAILABLE,
            format!("cannot reach {}", unresolvable.join("; ")),
        )));
    }
    let subtree = match &cli.command {
        // A get only needs its own key: the snapshot is the entries starting with it.
        Command::Get { key, .. } => key.clone(),
        Command::Dump { subtree, .. } | Command::Watch { subtree } => {
            subtree.clone().unwrap_or_default()
        }
        // The subtree only needs to contain the key, so that the echo (the commit)
        // reaches us, and the snapshot stays small.
        Command::Set { key, .. } | Command::Del { key, .. } => key.clone(),
        // Status needs a snapshot (its KTHXBAI carries the server's sequence) but no
        // entries: `HUGZ` is a reserved key, so this subtree holds nothing in practice.
        Command::Status => "HUGZ".to_string(),
        Command::Group(args) => args.command.subtree(),
        _ => String::new(),
    };
    let mut builder = Client::builder()
        .limits(limits)
        .subtree(subtree)
        .server_ttl(cli.server_ttl.get());
    match &found.discovered {
        Some((options, discovered)) => {
            builder = builder
                .discover(options.clone())
                .discovered(discovered.clone());
            // Discovered servers, found at run time, take the one key given for both.
            let keys = server_keys(cli, &["the pair".to_string()]).map_err(|_| {
                Failure::new(
                    EXIT_USAGE,
                    "--server-public-key: servers found by discovery take one key for both \
                     (a pair sharing one key pair); to give each server its own key, name them \
                     with --server",
                )
            })?;
            if let Some(key) = keys.first() {
                builder = builder.server_public_key(*key);
            }
        }
        None => {
            let keys = server_keys(cli, &servers)?;
            for (index, server) in servers.iter().enumerate() {
                builder = match keys.get(index) {
                    Some(key) => builder.server_with_key(server.clone(), *key),
                    None => builder.server(server.clone()),
                };
            }
        }
    }
    if let Some(path) = &cli.curve_secret_key {
        let pair = KeyPair::read(path)
            .map_err(|error| Failure::new(EXIT_USAGE, format!("--curve-secret-key: {error}")))?;
        builder = builder.curve_key_pair(pair);
    }
    if let Command::Group(group::GroupArgs {
        command: group::GroupCommand::Bench { votes, crashes },
    }) = &cli.command
    {
        let mut out = Output::new(cli.json);
        group_bench::run(
            &builder,
            &mut out,
            cli.json,
            usize::try_from(*votes).unwrap_or(usize::MAX),
            usize::try_from(*crashes).unwrap_or(usize::MAX),
            cli.timeout.get(),
        )?;
        return Ok(ExitCode::SUCCESS);
    }
    let client = builder.connect().map_err(fail)?;
    let timeout = cli.timeout.get();
    let synced = match reach::wait_for_server(&client, timeout).map_err(fail)? {
        reach::Outcome::Synced(status) => status,
        reach::Outcome::Unavailable(message) => {
            if matches!(cli.command, Command::Status) {
                // Status still shows what it heard of each server.
                let status = client.status().map_err(fail)?;
                let mut out = Output::new(cli.json);
                print_status(&mut out, &status, false);
            }
            return Err(with_note(Failure::new(EXIT_UNAVAILABLE, message)));
        }
    };

    let mut out = Output::new(cli.json);
    let code = match &cli.command {
        Command::Get { key, raw } => match client.entry(key).map_err(fail)? {
            Some(entry) => {
                if cli.json {
                    let mut object = Map::new();
                    put_bytes(&mut object, "key", key.as_bytes());
                    put_bytes(&mut object, "value", &entry.value);
                    object.insert("sequence".into(), entry.sequence.into());
                    out.json(Value::Object(object));
                } else if *raw {
                    out.bytes(&entry.value);
                } else {
                    out.line(&text(&entry.value));
                }
                ExitCode::SUCCESS
            }
            None => {
                if cli.json {
                    out.json(json!({ "key": key, "value": null }));
                    ExitCode::from(EXIT_NOT_FOUND)
                } else {
                    return Err(Failure::new(EXIT_NOT_FOUND, format!("{key}: not found")));
                }
            }
        },
        Command::Set { key, ttl, wait, .. } => {
            let value = value.unwrap_or_default();
            let ttl = ttl.map(HumanDuration::get);
            let sequence = if *wait {
                Some(
                    client
                        .set_confirmed(key, value, ttl, timeout)
                        .map_err(fail)?,
                )
            } else {
                client.set(key, value, ttl).map_err(fail)?;
                None
            };
            report_update(&mut out, "set", key, sequence);
            ExitCode::SUCCESS
        }
        Command::Del { key, wait } => {
            let sequence = if *wait {
                Some(client.delete_confirmed(key, timeout).map_err(fail)?)
            } else {
                client.delete(key).map_err(fail)?;
                None
            };
            report_update(&mut out, "del", key, sequence);
            ExitCode::SUCCESS
        }
        Command::Dump { subtree, long } => {
            let entries = client
                .dump(subtree.as_deref().unwrap_or(""))
                .map_err(fail)?;
            for (key, entry) in entries {
                let ttl = remaining_ttl(&entry);
                if cli.json {
                    let mut object = Map::new();
                    put_bytes(&mut object, "key", &key);
                    put_bytes(&mut object, "value", &entry.value);
                    object.insert("sequence".into(), entry.sequence.into());
                    object.insert(
                        "ttl_seconds".into(),
                        ttl.map_or(Value::Null, |ttl| ttl.as_secs_f64().into()),
                    );
                    out.json(Value::Object(object));
                } else if *long {
                    let ttl = ttl.map_or_else(
                        || "-".to_string(),
                        |ttl| format!("{:.1}s", ttl.as_secs_f64()),
                    );
                    out.line(&format!(
                        "{}={}\tsequence={}\tttl={ttl}",
                        line_text(&key),
                        line_text(&entry.value),
                        entry.sequence
                    ));
                } else {
                    out.line(&format!("{}={}", line_text(&key), line_text(&entry.value)));
                }
                if out.closed {
                    break;
                }
            }
            ExitCode::SUCCESS
        }
        Command::Watch { subtree } => {
            let stop = Arc::new(AtomicBool::new(false));
            for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
                signal_hook::flag::register(signal, Arc::clone(&stop)).map_err(|error| {
                    Failure::new(EXIT_FAILURE, format!("cannot handle Ctrl-C: {error}"))
                })?;
            }
            // Subscribe, then read the map: the agent handles both in order, so every
            // change is either in the listing or arrives as an event (a change in
            // between may show in both). A big subtree's listing never goes through
            // the bounded event queue.
            let events = client.subscribe();
            let entries = client
                .dump(subtree.as_deref().unwrap_or(""))
                .map_err(fail)?;
            for (key, entry) in entries {
                print_event(
                    &mut out,
                    &client,
                    Event::Updated {
                        key,
                        value: entry.value,
                        sequence: entry.sequence,
                    },
                );
            }
            print_event(
                &mut out,
                &client,
                Event::Synced {
                    server: synced.server,
                    sequence: synced.sequence,
                    keys: synced.keys,
                },
            );
            // Ctrl-C only sets the flag; check it between events.
            while !stop.load(Ordering::SeqCst) && !out.closed {
                match events.recv_timeout(Duration::from_millis(100)) {
                    Ok(event) => print_event(&mut out, &client, event),
                    Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
                    Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                        return Err(Failure::new(EXIT_FAILURE, "the client stopped"));
                    }
                }
            }
            ExitCode::SUCCESS
        }
        Command::Status => {
            // One heartbeat interval, so that every live server has been heard.
            std::thread::sleep(STATUS_LISTEN);
            let status = client.status().map_err(fail)?;
            print_status(&mut out, &status, true);
            ExitCode::SUCCESS
        }
        Command::Group(args) => {
            group::run(&client, &args.command, &mut out, cli.json, timeout)?;
            ExitCode::SUCCESS
        }
        // Dispatched in main before any client exists.
        Command::Bench(_)
        | Command::BenchHttp(_)
        | Command::BenchRelay { .. }
        | Command::Completions { .. }
        | Command::Man
        | Command::Keygen { .. } => ExitCode::from(EXIT_USAGE),
    };
    client.shutdown().map_err(fail)?;
    Ok(code)
}

/// How long `status` listens after its snapshot, so that every live server's heartbeat
/// (one a second) has arrived.
const STATUS_LISTEN: Duration = Duration::from_millis(1_100);

/// A key argument the servers would accept, or a usage error that names it.
fn check_key(key: &str, limits: &Limits) -> Result<(), Failure> {
    if key.is_empty() {
        return Err(Failure::new(EXIT_USAGE, "KEY must not be empty"));
    }
    if key.len() > limits.max_key_len {
        return Err(Failure::new(
            EXIT_USAGE,
            format!(
                "KEY is {} bytes; the limit is {} bytes",
                key.len(),
                limits.max_key_len
            ),
        ));
    }
    if key.as_bytes() == HUGZ || key.as_bytes() == KTHXBAI {
        return Err(Failure::new(
            EXIT_USAGE,
            format!("KEY {key:?} is reserved by the protocol"),
        ));
    }
    Ok(())
}

/// The value of `set`: the argument, stdin (`-`) or a file, within the body limit.
fn read_value(
    argument: Option<&str>,
    file: Option<&std::path::Path>,
    limits: &Limits,
) -> Result<Vec<u8>, Failure> {
    use std::io::Read;
    let max = limits.max_body_len;
    // One byte past the limit is enough to know it is too large.
    let cap = u64::try_from(max).unwrap_or(u64::MAX).saturating_add(1);
    let (value, source) = match (argument, file) {
        (_, Some(path)) => {
            let opened = std::fs::File::open(path).map_err(|error| {
                Failure::new(
                    EXIT_USAGE,
                    format!("cannot read --file {}: {error}", path.display()),
                )
            })?;
            let mut value = Vec::new();
            opened.take(cap).read_to_end(&mut value).map_err(|error| {
                Failure::new(
                    EXIT_USAGE,
                    format!("cannot read --file {}: {error}", path.display()),
                )
            })?;
            (value, format!("--file {}", path.display()))
        }
        (Some("-"), None) => {
            let mut value = Vec::new();
            io::stdin()
                .lock()
                .take(cap)
                .read_to_end(&mut value)
                .map_err(|error| {
                    Failure::new(
                        EXIT_USAGE,
                        format!("cannot read the value from stdin: {error}"),
                    )
                })?;
            (value, "the value from stdin".to_string())
        }
        (Some(argument), None) => (argument.as_bytes().to_vec(), "VALUE".to_string()),
        (None, None) => return Err(Failure::new(EXIT_USAGE, "give VALUE, - (stdin) or --file")),
    };
    if value.is_empty() {
        return Err(Failure::new(
            EXIT_USAGE,
            format!("{source} is empty (an empty value means delete: use `clonekv del`)"),
        ));
    }
    if value.len() > max {
        return Err(Failure::new(
            EXIT_USAGE,
            format!(
                "{source} is over the limit of {max} bytes per value (a server started with a \
                 larger --max-body-len takes more: pass the same as --max-value-len)"
            ),
        ));
    }
    Ok(value)
}

fn print_completions(shell: Shell) -> ExitCode {
    let mut command = Cli::command();
    let shell = match shell {
        Shell::Bash => clap_complete::Shell::Bash,
        Shell::Zsh => clap_complete::Shell::Zsh,
        Shell::Fish => clap_complete::Shell::Fish,
    };
    // Into a buffer first: clap_complete panics on a write error (`| head` closes
    // stdout early), and `write_generated` reports it instead.
    let mut script = Vec::new();
    clap_complete::generate(shell, &mut command, "clonekv", &mut script);
    write_generated(&script, "the completion script")
}

/// Writes generated text to stdout; a reader that stops early is not an error.
fn write_generated(bytes: &[u8], what: &str) -> ExitCode {
    let mut stdout = io::stdout().lock();
    match stdout.write_all(bytes).and_then(|()| stdout.flush()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) if error.kind() == io::ErrorKind::BrokenPipe => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("clonekv: cannot write {what}: {error}");
            ExitCode::from(EXIT_FAILURE)
        }
    }
}

fn print_man_page() -> ExitCode {
    let mut page = Vec::new();
    match clap_mangen::Man::new(Cli::command()).render(&mut page) {
        Ok(()) => write_generated(&page, "the manual page"),
        Err(error) => {
            eprintln!("clonekv: cannot render the manual page: {error}");
            ExitCode::from(EXIT_FAILURE)
        }
    }
}

/// `clonekv bench`: the table (or one JSON object) on stdout, progress on stderr.
fn run_bench(args: &bench::BenchArgs, json: bool) -> ExitCode {
    let bin_dir = std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(std::path::Path::to_path_buf));
    match bench::run(args, bin_dir) {
        Ok(report) => {
            let text = if json {
                serde_json::to_string_pretty(&report).unwrap_or_default()
            } else {
                bench::render(&report)
            };
            let written = write_generated(format!("{text}\n").as_bytes(), "the report");
            if written != ExitCode::SUCCESS {
                return written;
            }
            if report.problems.is_empty() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(EXIT_FAILURE)
            }
        }
        Err(error) => {
            eprintln!("clonekv bench: {error}");
            ExitCode::from(EXIT_FAILURE)
        }
    }
}

fn run_bench_http(args: &bench::http::HttpBenchArgs, json: bool) -> ExitCode {
    let bin_dir = std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(std::path::Path::to_path_buf));
    match bench::http::run(args, bin_dir) {
        Ok(report) => {
            let text = if json {
                serde_json::to_string_pretty(&report).unwrap_or_default()
            } else {
                bench::http::render(&report)
            };
            let written = write_generated(format!("{text}\n").as_bytes(), "the report");
            if written != ExitCode::SUCCESS {
                return written;
            }
            if report.problems.is_empty() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(EXIT_FAILURE)
            }
        }
        Err(error) => {
            eprintln!("clonekv bench-http: {error}");
            ExitCode::from(EXIT_FAILURE)
        }
    }
}

fn report_update(out: &mut Output, verb: &str, key: &str, sequence: Option<i64>) {
    if out.json_mode {
        out.json(json!({
            "op": verb,
            "key": key,
            "committed": sequence.is_some(),
            "sequence": sequence,
        }));
    } else if let Some(sequence) = sequence {
        out.line(&format!("committed at sequence {sequence}"));
    }
}

fn print_event(out: &mut Output, client: &Client, event: Event) {
    // The status has each server's endpoint now: with discovery, a server found (or
    // moved) after the client started is not in the list it started with.
    let endpoint = |index: usize| {
        client
            .status()
            .ok()
            .and_then(|status| {
                status
                    .servers
                    .get(index)
                    .map(|server| server.endpoint.clone())
            })
            .filter(|endpoint| !endpoint.is_empty())
            .unwrap_or_else(|| format!("server {index}"))
    };
    if out.json_mode {
        let value = match event {
            Event::Updated {
                key,
                value,
                sequence,
            } => {
                let mut object = Map::new();
                object.insert("event".into(), "set".into());
                put_bytes(&mut object, "key", &key);
                put_bytes(&mut object, "value", &value);
                object.insert("sequence".into(), sequence.into());
                Value::Object(object)
            }
            Event::Deleted { key, sequence } => {
                let mut object = Map::new();
                object.insert("event".into(), "del".into());
                put_bytes(&mut object, "key", &key);
                object.insert("sequence".into(), sequence.into());
                Value::Object(object)
            }
            Event::Synced {
                server,
                sequence,
                keys,
            } => {
                json!({"event": "synced", "server": endpoint(server), "sequence": sequence, "keys": keys})
            }
            Event::ServerChanged { from, to } => {
                json!({"event": "server_changed", "from": endpoint(from), "to": endpoint(to)})
            }
            Event::Lagged { missed } => json!({"event": "lagged", "missed": missed}),
        };
        out.json(value);
    } else {
        let line = match event {
            Event::Updated {
                key,
                value,
                sequence,
            } => format!(
                "set {}={} (sequence {sequence})",
                line_text(&key),
                line_text(&value)
            ),
            Event::Deleted { key, sequence } => {
                format!("del {} (sequence {sequence})", line_text(&key))
            }
            Event::Synced {
                server,
                sequence,
                keys,
            } => format!(
                "# synced from {} at sequence {sequence} ({keys} keys)",
                endpoint(server)
            ),
            Event::ServerChanged { from, to } => {
                format!("# left {}; now following {}", endpoint(from), endpoint(to))
            }
            Event::Lagged { missed } => {
                format!("# fell behind: {missed} events missed")
            }
        };
        out.line(&line);
    }
}

fn print_status(out: &mut Output, status: &Status, answered: bool) {
    let state = match status.state {
        State::Initial => "connecting",
        State::Syncing => "syncing",
        State::Active => "following",
    };
    let age = |age: Option<Duration>| age.map(|age| age.as_secs_f64());
    if out.json_mode {
        let servers: Vec<Value> = status
            .servers
            .iter()
            .map(|server| {
                json!({
                    "endpoint": (!server.endpoint.is_empty()).then_some(&server.endpoint),
                    "current": server.current,
                    "connected": server.connected,
                    "answered": answered && server.current,
                    "state": server.announced.map(|state| state.to_string()),
                    "sequence": server.sequence,
                    "keys": server.keys,
                    "heartbeat_age_seconds": age(server.last_heard),
                    "handshake_failure": server.handshake_failure.map(|failure| failure.to_string()),
                })
            })
            .collect();
        out.json(json!({
            "problem": reach::role_conflict(&status.servers),
            "server": status.endpoint,
            "server_index": status.server,
            "client_state": state,
            "sequence": status.sequence,
            "heartbeat_age_seconds": age(status.last_heard),
            "servers": servers,
            "discovered": status.discovered.iter().map(|server| json!({
                "role": role_name(server),
                "endpoint": server.base_endpoint(),
                "state": server.state.map(|state| state.to_string()),
            })).collect::<Vec<Value>>(),
        }));
        return;
    }
    out.line(&format!(
        "{:<28} {:<9} {:>10} {:>9} {:>10}  {}",
        "SERVER", "STATE", "SEQUENCE", "KEYS", "HEARTBEAT", "ANSWERED"
    ));
    for server in &status.servers {
        let state = server
            .announced
            .map_or_else(|| "-".to_string(), |state| state.to_string());
        let sequence = server
            .sequence
            .map_or_else(|| "-".to_string(), |sequence| sequence.to_string());
        let keys = server
            .keys
            .map_or_else(|| "-".to_string(), |keys| keys.to_string());
        let heartbeat = server.last_heard.map_or_else(
            || "never".to_string(),
            |age| format!("{:.1}s ago", age.as_secs_f64()),
        );
        let answered = if server.current && answered {
            "yes (snapshot)".to_string()
        } else if let Some(failure) = server.handshake_failure {
            format!("no: {failure}")
        } else if server.sequence.is_some() {
            "heartbeats only".to_string()
        } else if server.connected {
            "connected, silent".to_string()
        } else {
            "no".to_string()
        };
        // A discovery slot whose server has not been heard has no endpoint yet.
        let endpoint = if server.endpoint.is_empty() {
            "(not discovered)"
        } else {
            server.endpoint.as_str()
        };
        out.line(&format!(
            "{:<28} {:<9} {:>10} {:>9} {:>10}  {answered}",
            endpoint, state, sequence, keys, heartbeat
        ));
    }
    if let Some(conflict) = reach::role_conflict(&status.servers) {
        out.line(&format!("problem: {conflict}"));
    }
    if !status.discovered.is_empty() {
        let found: Vec<String> = status
            .discovered
            .iter()
            .map(|server| {
                let state = server
                    .state
                    .map_or_else(|| "-".to_string(), |state| state.to_string());
                format!("{} {} ({state})", role_name(server), server.base_endpoint())
            })
            .collect();
        out.line(&format!("discovered: {}", found.join(", ")));
    }
}

fn role_name(server: &FoundServer) -> &'static str {
    match server.kind {
        clonekv_zmq::core::beacon::Kind::Primary => "primary",
        clonekv_zmq::core::beacon::Kind::Backup => "backup",
        clonekv_zmq::core::beacon::Kind::Client => "client",
    }
}

/// Writes lines to stdout; once stdout is closed (`clonekv watch | head`) it stops
/// quietly instead of panicking.
struct Output {
    json_mode: bool,
    closed: bool,
    stdout: io::Stdout,
}

impl Output {
    fn new(json_mode: bool) -> Self {
        Output {
            json_mode,
            closed: false,
            stdout: io::stdout(),
        }
    }

    fn line(&mut self, line: &str) {
        if self.closed {
            return;
        }
        let mut lock = self.stdout.lock();
        if writeln!(lock, "{line}")
            .and_then(|()| lock.flush())
            .is_err()
        {
            self.closed = true;
        }
    }

    /// Writes bytes as they are (`get --raw`, so that `clonekv get --raw k > file`
    /// gives back what `set --file` stored).
    fn bytes(&mut self, bytes: &[u8]) {
        if self.closed {
            return;
        }
        let mut lock = self.stdout.lock();
        if lock.write_all(bytes).and_then(|()| lock.flush()).is_err() {
            self.closed = true;
        }
    }

    fn json(&mut self, value: serde_json::Value) {
        self.line(&value.to_string());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_keys_are_one_for_all_or_one_each_and_may_start_with_a_hyphen() {
        let hyphen = format!("-{}", "0".repeat(39));
        let other = "0".repeat(40);
        let servers = vec!["tcp://a:1".to_string(), "tcp://b:1".to_string()];
        let parse = |keys: &str| {
            let cli =
                Cli::try_parse_from(["clonekv", "--server-public-key", keys, "status"]).unwrap();
            server_keys(&cli, &servers)
        };
        let one = parse(&hyphen).ok().unwrap();
        assert_eq!(one.len(), 2);
        assert_eq!(one[0], one[1]);
        let each = parse(&format!("{hyphen},{other}")).ok().unwrap();
        assert_ne!(each[0], each[1]);
        let three = parse(&format!("{hyphen},{other},{other}")).err().unwrap();
        assert!(
            three.message.contains("3 keys for 2 servers"),
            "{}",
            three.message
        );
    }

    #[test]
    fn the_help_text_is_valid() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }

    #[test]
    fn set_takes_ttl_and_wait() {
        let cli =
            Cli::try_parse_from(["clonekv", "set", "k", "v", "--ttl", "1.5s", "--wait"]).unwrap();
        let Command::Set { ttl, wait, .. } = cli.command else {
            panic!("not a set: {:?}", cli.command);
        };
        assert_eq!(
            ttl.map(HumanDuration::get),
            Some(Duration::from_millis(1_500))
        );
        assert!(wait);
    }

    #[test]
    fn servers_may_be_repeated_or_comma_separated() {
        let cli = Cli::try_parse_from([
            "clonekv",
            "--server",
            "tcp://a:1,tcp://b:2",
            "-s",
            "tcp://c:3",
            "status",
        ])
        .unwrap();
        assert_eq!(cli.servers, ["tcp://a:1", "tcp://b:2", "tcp://c:3"]);
    }
}
