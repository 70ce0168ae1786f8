//! Why no server answered, in one line: the CLI waits for a snapshot, but gives up
//! early when every server's connection attempts fail, and then asks the operating
//! system for the reason (libzmq retries silently and never says).

use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use clonekv_zmq::client::{Client, ClientError, ServerStatus, Status};
use clonekv_zmq::core::kvmsg::BstarState;

/// How long every connection may fail (or every server refuse our CURVE key) before the
/// CLI stops waiting: libzmq retries a refused connection every 100 ms, so a few
/// failures each tell that nobody listens, or that nobody lets us in.
const GIVE_UP_UNREACHABLE_AFTER: Duration = Duration::from_millis(700);

/// How long a diagnostic TCP connect may take.
const PROBE_TIMEOUT: Duration = Duration::from_millis(500);

/// What waiting for a server ended with.
pub enum Outcome {
    /// A snapshot was applied.
    Synced(Status),
    /// Nothing answered: the message says who was tried and what each said.
    Unavailable(String),
}

/// Waits up to `timeout` for a snapshot; fails early when no server can be reached.
pub fn wait_for_server(client: &Client, timeout: Duration) -> Result<Outcome, ClientError> {
    let start = Instant::now();
    let step = Duration::from_millis(50);
    loop {
        let left = timeout.saturating_sub(start.elapsed());
        match client.wait_synced(step.min(left)) {
            Ok(status) => return Ok(Outcome::Synced(status)),
            Err(ClientError::NotSynced { .. } | ClientError::Handshake { .. }) => {}
            Err(error) => return Err(error),
        }
        let status = client.status()?;
        let refused = status
            .servers
            .iter()
            .all(|server| server.handshake_failure.is_some());
        if refused && start.elapsed() >= GIVE_UP_UNREACHABLE_AFTER {
            if let Some(error) = client.handshake_error() {
                return Ok(Outcome::Unavailable(error.to_string()));
            }
        }
        let unreachable = status.servers.iter().all(|server| {
            !server.ever_connected && server.connects_failed > 0 && server.sequence.is_none()
        });
        if unreachable && start.elapsed() >= GIVE_UP_UNREACHABLE_AFTER {
            return Ok(Outcome::Unavailable(cannot_reach(&status.servers)));
        }
        if start.elapsed() >= timeout {
            if let Some(error) = client.handshake_error() {
                return Ok(Outcome::Unavailable(error.to_string()));
            }
            return Ok(Outcome::Unavailable(nobody_answered(&status, timeout)));
        }
    }
}

/// Every server is unreachable: `cannot reach tcp://h:p: connection refused`.
fn cannot_reach(servers: &[ServerStatus]) -> String {
    let causes: Vec<String> = servers
        .iter()
        .map(|server| format!("{}: {}", server.endpoint, probe(&server.endpoint)))
        .collect();
    format!("cannot reach {}", causes.join("; "))
}

/// Two servers that both announce the starting state of one role were configured with
/// the same role: neither will ever serve. The fix, in words.
pub fn role_conflict(servers: &[ServerStatus]) -> Option<String> {
    for (state, fix) in [
        (BstarState::Primary, "start one of them with --backup"),
        (BstarState::Backup, "start one of them without --backup"),
    ] {
        let same: Vec<&str> = servers
            .iter()
            .filter(|server| server.announced == Some(state))
            .map(|server| server.endpoint.as_str())
            .collect();
        if same.len() >= 2 {
            return Some(format!(
                "{} all announce themselves {state}: both servers are configured as {state}; {fix}",
                same.join(" and ")
            ));
        }
    }
    None
}

/// Someone may be there, but no snapshot came: say what each server is doing.
fn nobody_answered(status: &Status, timeout: Duration) -> String {
    let waited = clonekv_zmq::duration::HumanDuration(timeout);
    if let Some(conflict) = role_conflict(&status.servers) {
        return format!("no active server within {waited}: {conflict}");
    }
    let passive: Vec<&ServerStatus> = status
        .servers
        .iter()
        .filter(|server| {
            server
                .announced
                .is_some_and(|state| state != BstarState::Active)
        })
        .collect();
    let active = status
        .servers
        .iter()
        .any(|server| server.announced == Some(BstarState::Active));
    let silent: Vec<String> = status
        .servers
        .iter()
        .filter(|server| server.sequence.is_none())
        .map(|server| {
            if server.connected {
                format!("{} (connected, but silent)", server.endpoint)
            } else {
                format!("{} ({})", server.endpoint, probe(&server.endpoint))
            }
        })
        .collect();
    if !passive.is_empty() && !active {
        let which: Vec<String> = passive
            .iter()
            .map(|server| {
                let state = server.announced.map_or("?".to_string(), |s| s.to_string());
                format!("{} is {state}", server.endpoint)
            })
            .collect();
        let others = if silent.is_empty() {
            String::new()
        } else {
            format!("; not answering: {}", silent.join(", "))
        };
        return format!(
            "no active server within {waited}: {}{others} (a backup takes over when its \
             primary has been silent for two heartbeats and a client asks; if both run, \
             check that one is --backup and that they reach each other)",
            which.join(", ")
        );
    }
    if silent.is_empty() {
        return format!("no server answered within {waited} (every server was heard, but no snapshot completed)");
    }
    format!(
        "no server answered within {waited}: {} (is clonekvd running? see --server)",
        silent.join(", ")
    )
}

/// Why a plain TCP connection to the endpoint's host and port fails, in a few words.
fn probe(endpoint: &str) -> String {
    let host_port = endpoint.strip_prefix("tcp://").unwrap_or(endpoint);
    let addresses: Vec<SocketAddr> = match host_port.to_socket_addrs() {
        Ok(addresses) => addresses.collect(),
        Err(error) => return format!("cannot resolve its host ({error})"),
    };
    let mut cause = "no address".to_string();
    for address in addresses {
        match TcpStream::connect_timeout(&address, PROBE_TIMEOUT) {
            Ok(_) => return "a connection opens, but no clonekv server answers on it".to_string(),
            Err(error) => cause = describe(&error),
        }
    }
    cause
}

fn describe(error: &std::io::Error) -> String {
    use std::io::ErrorKind;
    match error.kind() {
        ErrorKind::ConnectionRefused => "connection refused".to_string(),
        ErrorKind::TimedOut | ErrorKind::WouldBlock => "no reply (timed out)".to_string(),
        ErrorKind::HostUnreachable => "host unreachable".to_string(),
        ErrorKind::NetworkUnreachable => "network unreachable".to_string(),
        _ => error.to_string(),
    }
}

/// The host of every endpoint resolves; otherwise the endpoints that do not, with why.
pub fn unresolvable(endpoints: &[String]) -> Vec<String> {
    endpoints
        .iter()
        .filter_map(|endpoint| {
            let host_port = endpoint.strip_prefix("tcp://").unwrap_or(endpoint);
            match host_port.to_socket_addrs() {
                Ok(_) => None,
                Err(error) => Some(format!("{endpoint}: cannot resolve its host ({error})")),
            }
        })
        .collect()
}
