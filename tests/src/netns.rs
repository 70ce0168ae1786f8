//! A private LAN for tests that need a real broadcast network: network namespaces, each
//! with one veth interface whose other end is on a bridge in a namespace of its own. The
//! host's own network is never touched: every interface and address lives inside a
//! namespace this made, and [`Lan`]'s drop deletes them all (deleting a namespace
//! deletes its interfaces), also when the test fails.
//!
//! Needs root (CI runs as root) and iproute2; without them [`Lan::new`] panics with a
//! message that says so. Nothing is skipped silently.

use std::process::{Command, Output};

/// A bridge and hosts on it, `10.77.0.0/24`, no default route (as on a small isolated
/// LAN: the limited broadcast 255.255.255.255 is unreachable there, the subnet's works).
#[derive(Debug)]
pub struct Lan {
    prefix: String,
    /// Namespaces made, the bridge's first; deleted in reverse order.
    namespaces: Vec<String>,
}

impl Lan {
    /// The bridge's namespace, named after the test and this process.
    pub fn new(test: &str) -> Lan {
        let prefix = format!("ckv-{test}-{}", std::process::id());
        let mut lan = Lan {
            prefix,
            namespaces: Vec::new(),
        };
        let bridge = lan.namespace_name("br");
        if let Err(message) = try_ip(&["netns", "add", &bridge]) {
            panic!(
                "network namespaces are not available, so this test cannot run: `ip netns add` \
                 failed ({message}). It needs root and iproute2 (CI runs as root)."
            );
        }
        lan.namespaces.push(bridge.clone());
        lan.exec(&bridge, &["ip", "link", "set", "lo", "up"]);
        lan.exec(&bridge, &["ip", "link", "add", "br0", "type", "bridge"]);
        lan.exec(&bridge, &["ip", "link", "set", "br0", "up"]);
        lan
    }

    /// Adds host `name` at `10.77.0.<host>/24` (interface `eth0`, up) and returns its
    /// namespace.
    pub fn add_host(&mut self, name: &str, host: u8) -> String {
        let namespace = self.namespace_name(name);
        ip(&["netns", "add", &namespace]);
        self.namespaces.push(namespace.clone());
        let bridge = self.namespace_name("br");
        let port = format!("v{host}");
        self.exec(&namespace, &["ip", "link", "set", "lo", "up"]);
        self.exec(
            &namespace,
            &[
                "ip", "link", "add", "eth0", "type", "veth", "peer", "name", &port, "netns",
                &bridge,
            ],
        );
        self.exec(
            &namespace,
            &[
                "ip",
                "addr",
                "add",
                &format!("10.77.0.{host}/24"),
                "dev",
                "eth0",
            ],
        );
        self.exec(&namespace, &["ip", "link", "set", "eth0", "up"]);
        self.exec(&bridge, &["ip", "link", "set", &port, "master", "br0"]);
        self.exec(&bridge, &["ip", "link", "set", &port, "up"]);
        namespace
    }

    /// Runs `command` inside `namespace` and panics unless it succeeds.
    pub fn exec(&self, namespace: &str, command: &[&str]) -> Output {
        let mut args = vec!["netns", "exec", namespace];
        args.extend_from_slice(command);
        match try_ip(&args) {
            Ok(output) => output,
            Err(message) => panic!("{message}"),
        }
    }

    fn namespace_name(&self, name: &str) -> String {
        format!("{}-{name}", self.prefix)
    }
}

impl Drop for Lan {
    fn drop(&mut self) {
        for namespace in self.namespaces.iter().rev() {
            if let Err(message) = try_ip(&["netns", "delete", namespace]) {
                eprintln!("cleanup: {message}");
            }
        }
    }
}

fn ip(args: &[&str]) -> Output {
    try_ip(args).unwrap_or_else(|message| panic!("{message}"))
}

fn try_ip(args: &[&str]) -> Result<Output, String> {
    let output = Command::new("ip")
        .args(args)
        .output()
        .map_err(|error| format!("cannot run `ip {}`: {error}", args.join(" ")))?;
    if output.status.success() {
        Ok(output)
    } else {
        Err(format!(
            "`ip {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr).trim()
        ))
    }
}
