//! An interop check of the client library against any CHP server pair: the zguide's C or
//! Python Clone Model Six servers, or `clonekvd`. It follows the subtree of KEY (KEY up to
//! its last `/`), makes a confirmed write of KEY=VALUE, reads it back from a second
//! client that takes a fresh snapshot, prints each step, and exits with status 1 if any
//! step fails (2 for bad arguments). `scripts/interop.sh` runs it.
//!
//! ```sh
//! cargo build --release -p clonekv-zmq --examples
//! target/release/examples/interop_client KEY VALUE [SERVER...]
//! ```
//!
//! With no SERVER it uses the default pair, tcp://localhost:5556 and :5566.

use std::process::ExitCode;
use std::time::Duration;

use clonekv_zmq::client::{Client, ClientBuilder};

/// How long each step (snapshot, commit) may take.
const TIMEOUT: Duration = Duration::from_secs(15);

const USAGE: &str = "usage: interop_client KEY VALUE [SERVER...]";

fn main() -> ExitCode {
    clonekv_zmq::log::init("info");
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.len() < 2 || args[0].starts_with('-') {
        eprintln!("{USAGE}");
        return ExitCode::from(2);
    }
    match run(&args[0], &args[1], &args[2..]) {
        Ok(()) => {
            println!("interop_client: ok");
            ExitCode::SUCCESS
        }
        Err(message) => {
            eprintln!("interop_client: FAILED: {message}");
            ExitCode::FAILURE
        }
    }
}

fn builder(subtree: &str, servers: &[String]) -> ClientBuilder {
    let mut builder = Client::builder().subtree(subtree);
    for server in servers {
        builder = builder.server(server.clone());
    }
    builder
}

fn run(key: &str, value: &str, servers: &[String]) -> Result<(), String> {
    let subtree = match key.rfind('/') {
        Some(end) => &key[..=end],
        None => "",
    };

    // The writer: a confirmed set (the current server published it).
    let writer = builder(subtree, servers)
        .connect()
        .map_err(|error| format!("connect: {error}"))?;
    let status = writer
        .wait_synced(TIMEOUT)
        .map_err(|error| format!("writer wait_synced: {error}"))?;
    println!(
        "writer synced with {} at sequence {} ({} keys under {subtree:?})",
        status.endpoint, status.sequence, status.keys
    );
    let sequence = writer
        .set_confirmed(key, value, None, TIMEOUT)
        .map_err(|error| format!("set_confirmed {key}: {error}"))?;
    println!("set {key}={value} committed at sequence {sequence}");

    // The reader: a new client, so the value comes from a server's snapshot.
    let reader = builder(subtree, servers)
        .connect()
        .map_err(|error| format!("connect: {error}"))?;
    let status = reader
        .wait_synced(TIMEOUT)
        .map_err(|error| format!("reader wait_synced: {error}"))?;
    println!(
        "reader synced with {} at sequence {} ({} keys under {subtree:?})",
        status.endpoint, status.sequence, status.keys
    );
    let got = reader
        .get(key)
        .map_err(|error| format!("get {key}: {error}"))?
        .map(|bytes| String::from_utf8_lossy(&bytes).into_owned());
    println!("get {key} = {got:?}");
    if got.as_deref() != Some(value) {
        return Err(format!("get {key}: expected {value:?}, got {got:?}"));
    }

    reader
        .shutdown()
        .map_err(|error| format!("reader shutdown: {error}"))?;
    writer
        .shutdown()
        .map_err(|error| format!("writer shutdown: {error}"))
}
