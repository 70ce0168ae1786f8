//! A clonekv client in a few lines: follow the `/weather/` subtree, write to it, wait for
//! a commit, and print the changes seen for a few seconds.
//!
//! Start a server first (`cargo run -p clonekv-zmq --bin clonekvd`), then:
//!
//! ```sh
//! cargo run -p clonekv-zmq --example weather [SERVER...]
//! ```
//!
//! With no arguments it uses the default pair, tcp://localhost:5556 and :5566.

use std::time::{Duration, Instant};

use clonekv_zmq::client::{Client, ClientError, Event};

fn main() -> Result<(), ClientError> {
    clonekv_zmq::log::init("info");
    let mut builder = Client::builder().subtree("/weather/");
    for server in std::env::args().skip(1) {
        builder = builder.server(server);
    }
    let client = builder.connect()?;
    let status = client.wait_synced(Duration::from_secs(15))?;
    println!(
        "following {} at sequence {} ({} keys)",
        status.endpoint, status.sequence, status.keys
    );

    let events = client.subscribe();
    client.set("/weather/london", "rain", None)?;
    let sequence = client.set_confirmed(
        "/weather/paris",
        "sun",
        Some(Duration::from_secs(2)), // gone in two seconds
        Duration::from_secs(5),
    )?;
    println!("/weather/paris committed at sequence {sequence}");
    println!(
        "/weather/london = {:?}",
        client
            .get("/weather/london")?
            .map(|value| String::from_utf8_lossy(&value).into_owned())
    );

    let until = Instant::now() + Duration::from_secs(4);
    while let Some(left) = until.checked_duration_since(Instant::now()) {
        match events.recv_timeout(left) {
            Ok(Event::Updated {
                key,
                value,
                sequence,
            }) => println!(
                "set {} = {} (sequence {sequence})",
                String::from_utf8_lossy(&key),
                String::from_utf8_lossy(&value)
            ),
            Ok(Event::Deleted { key, sequence }) => {
                println!(
                    "del {} (sequence {sequence})",
                    String::from_utf8_lossy(&key)
                )
            }
            Ok(other) => println!("{other:?}"),
            Err(_) => break,
        }
    }
    client.shutdown()
}
