//! Checks a server's endpoints before any socket is made: ports that clash, and peer
//! hosts that do not resolve. libzmq would accept both silently: two sockets of one
//! server on one port fail only at the second bind, a peer endpoint that is one of this
//! server's own makes it talk to itself, and a connect to a host that does not resolve
//! is retried for ever.
//!
//! Only `tcp://` endpoints have hosts and ports; any other transport clashes only with
//! the very same endpoint.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr, ToSocketAddrs, UdpSocket};

/// Why a set of endpoints cannot work.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum EndpointError {
    /// Two sockets this server binds would listen on the same address and port.
    #[error(
        "the {first} endpoint {first_endpoint} and the {second} endpoint {second_endpoint} \
         are the same port: each socket needs its own"
    )]
    BindClash {
        /// The first socket.
        first: &'static str,
        /// Its endpoint.
        first_endpoint: String,
        /// The second socket.
        second: &'static str,
        /// Its endpoint.
        second_endpoint: String,
    },
    /// A peer endpoint names an address and port this server binds itself: the peer
    /// would be this server.
    #[error(
        "the {peer} endpoint {peer_endpoint} is this server's own {own} endpoint \
         ({own_endpoint}): this server would talk to itself"
    )]
    PeerIsSelf {
        /// The peer socket.
        peer: &'static str,
        /// Its endpoint.
        peer_endpoint: String,
        /// This server's socket.
        own: &'static str,
        /// Its endpoint.
        own_endpoint: String,
    },
    /// Two peer endpoints name the same address and port: the peer cannot bind both.
    #[error(
        "the {first} endpoint {first_endpoint} and the {second} endpoint {second_endpoint} \
         are the same port: the peer cannot listen on both"
    )]
    PeerClash {
        /// The first peer socket.
        first: &'static str,
        /// Its endpoint.
        first_endpoint: String,
        /// The second peer socket.
        second: &'static str,
        /// Its endpoint.
        second_endpoint: String,
    },
    /// A peer endpoint's host does not resolve.
    #[error("the {socket} endpoint {endpoint}: the host {host:?} does not resolve ({reason})")]
    Unresolvable {
        /// The peer socket.
        socket: &'static str,
        /// Its endpoint.
        endpoint: String,
        /// The host.
        host: String,
        /// The resolver's reason.
        reason: String,
        /// The resolver could not answer now (a name server is unreachable); the same
        /// name may resolve later.
        temporary: bool,
    },
}

/// Checks the endpoints a server binds (`binds`) and those of its peer it connects to
/// (`connects`), each with the socket's name:
///
/// - no two binds on one port of one address (a wildcard host covers every address);
/// - no two connects to one port of one address;
/// - every connect's host resolves;
/// - no connect to an address of this host on a port this server binds there.
///
/// Ports `0` and `*` (any free port) never clash.
pub fn check(
    binds: &[(&'static str, &str)],
    connects: &[(&'static str, &str)],
) -> Result<(), EndpointError> {
    for (index, (first, first_endpoint)) in binds.iter().enumerate() {
        for (second, second_endpoint) in &binds[index + 1..] {
            if same_place(first_endpoint, second_endpoint) {
                return Err(EndpointError::BindClash {
                    first,
                    first_endpoint: first_endpoint.to_string(),
                    second,
                    second_endpoint: second_endpoint.to_string(),
                });
            }
        }
    }
    for (index, (first, first_endpoint)) in connects.iter().enumerate() {
        for (second, second_endpoint) in &connects[index + 1..] {
            if same_place(first_endpoint, second_endpoint) {
                return Err(EndpointError::PeerClash {
                    first,
                    first_endpoint: first_endpoint.to_string(),
                    second,
                    second_endpoint: second_endpoint.to_string(),
                });
            }
        }
    }
    let mut resolved: BTreeMap<String, Vec<IpAddr>> = BTreeMap::new();
    for (peer, peer_endpoint) in connects {
        let Some(target) = Tcp::parse(peer_endpoint) else {
            if let Some((own, own_endpoint)) = binds.iter().find(|(_, own)| own == peer_endpoint) {
                return Err(peer_is_self(peer, peer_endpoint, own, own_endpoint));
            }
            continue;
        };
        let addresses = match resolved.get(target.host) {
            Some(addresses) => addresses.clone(),
            None => {
                let addresses = resolve(target.host).map_err(|error| {
                    let reason = error.to_string();
                    EndpointError::Unresolvable {
                        socket: peer,
                        endpoint: peer_endpoint.to_string(),
                        host: target.host.to_string(),
                        // glibc's text for EAI_AGAIN; std gives no code.
                        temporary: reason.contains("Temporary failure"),
                        reason,
                    }
                })?;
                resolved.insert(target.host.to_string(), addresses.clone());
                addresses
            }
        };
        let Some(port) = target.port else { continue };
        let local: Vec<IpAddr> = addresses.into_iter().filter(|ip| is_local(*ip)).collect();
        if local.is_empty() {
            continue;
        }
        for (own, own_endpoint) in binds {
            let Some(bound) = Tcp::parse(own_endpoint) else {
                continue;
            };
            if bound.port != Some(port) {
                continue;
            }
            let covers = bound.is_wildcard()
                || bound.host == target.host
                || resolve(bound.host).is_ok_and(|bound| bound.iter().any(|ip| local.contains(ip)));
            if covers {
                return Err(peer_is_self(peer, peer_endpoint, own, own_endpoint));
            }
        }
    }
    Ok(())
}

fn peer_is_self(
    peer: &'static str,
    peer_endpoint: &str,
    own: &'static str,
    own_endpoint: &str,
) -> EndpointError {
    EndpointError::PeerIsSelf {
        peer,
        peer_endpoint: peer_endpoint.to_string(),
        own,
        own_endpoint: own_endpoint.to_string(),
    }
}

/// A `tcp://` endpoint's host and port.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Tcp<'a> {
    host: &'a str,
    /// `None` for any free port (`*` or `0`).
    port: Option<u16>,
}

impl<'a> Tcp<'a> {
    /// `tcp://host:port`, `tcp://[v6]:port`, or a connect's `tcp://source;host:port`.
    fn parse(endpoint: &'a str) -> Option<Tcp<'a>> {
        let rest = endpoint.strip_prefix("tcp://")?;
        let rest = rest
            .rsplit_once(';')
            .map_or(rest, |(_, destination)| destination);
        let (host, port) = rest.rsplit_once(':')?;
        let host = host
            .strip_prefix('[')
            .and_then(|host| host.strip_suffix(']'))
            .unwrap_or(host);
        let port = match port.parse::<u16>() {
            Ok(0) => None,
            Ok(port) => Some(port),
            Err(_) => None,
        };
        Some(Tcp { host, port })
    }

    fn is_wildcard(&self) -> bool {
        matches!(self.host, "*" | "0.0.0.0" | "::")
    }
}

/// Whether two endpoints name one port of one address: for TCP, the same port with
/// the same host, a wildcard host, or hosts with an address in common; otherwise the
/// same text.
fn same_place(first: &str, second: &str) -> bool {
    let (Some(first), Some(second)) = (Tcp::parse(first), Tcp::parse(second)) else {
        return first == second;
    };
    let (Some(port), Some(other_port)) = (first.port, second.port) else {
        return false;
    };
    if port != other_port {
        return false;
    }
    if first.host == second.host || first.is_wildcard() || second.is_wildcard() {
        return true;
    }
    // Names (or an interface name libzmq accepts for a bind) that do not resolve are
    // compared by text only.
    match (resolve(first.host), resolve(second.host)) {
        (Ok(first), Ok(second)) => first.iter().any(|ip| second.contains(ip)),
        _ => false,
    }
}

/// The addresses of `host` (an IP address is its own).
fn resolve(host: &str) -> std::io::Result<Vec<IpAddr>> {
    if let Ok(ip) = host.parse::<IpAddr>() {
        return Ok(vec![ip]);
    }
    Ok((host, 0)
        .to_socket_addrs()?
        .map(|address| address.ip())
        .collect())
}

/// Whether `ip` is an address of this host: one can bind a socket to it. (Binding a UDP
/// socket sends nothing.)
fn is_local(ip: IpAddr) -> bool {
    ip.is_loopback() || UdpSocket::bind(SocketAddr::new(ip, 0)).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    const BINDS: [(&str, &str); 4] = [
        ("snapshot", "tcp://*:5556"),
        ("publisher", "tcp://*:5557"),
        ("collector", "tcp://*:5558"),
        ("state", "tcp://*:5003"),
    ];
    const CONNECTS: [(&str, &str); 4] = [
        ("peer snapshot", "tcp://127.0.0.1:5566"),
        ("peer publisher", "tcp://127.0.0.1:5567"),
        ("peer collector", "tcp://127.0.0.1:5568"),
        ("peer state", "tcp://127.0.0.1:5004"),
    ];

    /// The endpoints with `from` replaced by `to` in each.
    fn renamed(
        endpoints: &[(&'static str, &str)],
        from: &str,
        to: &str,
    ) -> Vec<(&'static str, String)> {
        endpoints
            .iter()
            .map(|(name, endpoint)| (*name, endpoint.replace(from, to)))
            .collect()
    }

    fn borrowed<'a>(endpoints: &'a [(&'static str, String)]) -> Vec<(&'static str, &'a str)> {
        endpoints
            .iter()
            .map(|(name, endpoint)| (*name, endpoint.as_str()))
            .collect()
    }

    #[test]
    fn the_default_layouts_pass() {
        assert_eq!(check(&BINDS, &CONNECTS), Ok(()));
        let named = renamed(&CONNECTS, "127.0.0.1", "localhost");
        assert_eq!(check(&BINDS, &borrowed(&named)), Ok(()));
    }

    #[test]
    fn two_binds_on_one_port_clash_whatever_the_host_spelling() {
        let mut binds = BINDS;
        binds[3] = ("state", "tcp://127.0.0.1:5557");
        assert_eq!(
            check(&binds, &CONNECTS),
            Err(EndpointError::BindClash {
                first: "publisher",
                first_endpoint: "tcp://*:5557".into(),
                second: "state",
                second_endpoint: "tcp://127.0.0.1:5557".into(),
            })
        );
        // Different addresses of one host may share a port.
        let binds = [
            ("snapshot", "tcp://127.0.0.1:5556"),
            ("state", "tcp://127.0.0.2:5556"),
        ];
        assert_eq!(check(&binds, &[]), Ok(()));
        // Any free port never clashes; other transports only with the same text.
        let binds = [
            ("snapshot", "tcp://127.0.0.1:*"),
            ("publisher", "tcp://127.0.0.1:0"),
            ("collector", "tcp://127.0.0.1:*"),
            ("state", "ipc:///tmp/state"),
        ];
        assert_eq!(check(&binds, &[]), Ok(()));
        let binds = [("snapshot", "inproc://a"), ("state", "inproc://a")];
        assert!(matches!(
            check(&binds, &[]),
            Err(EndpointError::BindClash { .. })
        ));
    }

    #[test]
    fn a_peer_endpoint_on_this_host_and_one_of_our_ports_is_this_server() {
        let mut connects = CONNECTS;
        connects[3] = ("peer state", "tcp://127.0.0.1:5557");
        assert_eq!(
            check(&BINDS, &connects),
            Err(EndpointError::PeerIsSelf {
                peer: "peer state",
                peer_endpoint: "tcp://127.0.0.1:5557".into(),
                own: "publisher",
                own_endpoint: "tcp://*:5557".into(),
            })
        );
        let binds = [("state", "tcp://127.0.0.1:5003")];
        let connects = [("peer state", "tcp://localhost:5003")];
        assert!(matches!(
            check(&binds, &connects),
            Err(EndpointError::PeerIsSelf { .. })
        ));
        // Bound to another address of this host: no clash.
        let binds = [("state", "tcp://127.0.0.2:5003")];
        let connects = [("peer state", "tcp://127.0.0.1:5003")];
        assert_eq!(check(&binds, &connects), Ok(()));
    }

    #[test]
    fn a_peer_on_another_host_may_use_our_ports() {
        // 192.0.2.0/24 is reserved for documentation: never an address of this host.
        let elsewhere = renamed(&BINDS, "*", "192.0.2.1");
        assert_eq!(check(&BINDS, &borrowed(&elsewhere)), Ok(()));
    }

    #[test]
    fn two_peer_endpoints_on_one_port_clash() {
        let mut connects = CONNECTS;
        connects[3] = ("peer state", "tcp://127.0.0.1:5566");
        assert!(matches!(
            check(&BINDS, &connects),
            Err(EndpointError::PeerClash {
                first: "peer snapshot",
                second: "peer state",
                ..
            })
        ));
    }

    #[test]
    fn a_peer_host_that_does_not_resolve_is_named() {
        let connects = [("peer state", "tcp://no-such-host.invalid:5004")];
        let Err(EndpointError::Unresolvable { socket, host, .. }) = check(&BINDS, &connects) else {
            panic!("an unresolvable host must be an error");
        };
        assert_eq!(
            (socket, host.as_str()),
            ("peer state", "no-such-host.invalid")
        );
    }

    #[test]
    fn endpoints_parse() {
        assert_eq!(
            Tcp::parse("tcp://[::1]:5556"),
            Some(Tcp {
                host: "::1",
                port: Some(5556)
            })
        );
        assert_eq!(
            Tcp::parse("tcp://10.0.0.1;kv1:5556"),
            Some(Tcp {
                host: "kv1",
                port: Some(5556)
            })
        );
        assert_eq!(Tcp::parse("ipc:///tmp/x"), None);
    }
}
