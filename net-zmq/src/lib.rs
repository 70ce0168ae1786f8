//! # clonekv-zmq
//!
//! The production adapter of clonekv: real libzmq sockets, driven by a `mio` event loop,
//! feeding the sans-IO state machines of `clonekv-core` and carrying out their outputs.
//! It ships the `clonekvd` daemon, the `clonekv` command-line client, and a client
//! library for Rust applications. No protocol decision is made here: every `if` about
//! the protocol lives in the core.
//!
//! ## Model
//!
//! A host owns the sockets and two clocks ([`clock::Clock`]: monotonic time as
//! `clonekv_core::time::Instant`, wall time as `EpochMillis`). Each libzmq socket is a
//! [`socket::ZmqSocket`] whose `ZMQ_FD` is registered with mio for READABLE only. That
//! fd is edge-triggered, so the loop is:
//!
//! ```text
//! loop {
//!     repeat until one full pass receives and sends nothing:
//!         if core.poll_timeout() <= now { core.handle_timeout(now, …) }
//!         for every socket: while try_recv() gives a message (at most a batch):
//!             core.handle_*(now, …, frames); drain core.poll_output() into sockets
//!         (server) send snapshot replies while each client's pipe has room
//!     mio.poll(until core.poll_timeout())
//! }
//! ```
//!
//! - [`server::ServerHost`] runs one server of a Binary Star pair (`clonekvd`). Snapshot
//!   replies are pulled from the core per client and sent on a `ROUTER_MANDATORY`
//!   socket without blocking; a full pipe pauses only that client's stream.
//! - [`client::Client`] runs the clone agent in a background thread with its own loop;
//!   the application talks to it over a channel and a `mio::Waker` (`clonekv` is built
//!   on it).
//!
//! ## Running a server in-process
//!
//! ```no_run
//! use clonekv_zmq::server::{ServerHost, ServerOptions};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let mut host = ServerHost::start(ServerOptions::primary())?; // binds 5556-5558, 5003
//! let stop = host.stop_handle(); // stop.stop() from another thread ends run()
//! # drop(stop);
//! host.run()?;
//! # Ok(())
//! # }
//! ```
//!
//! See [`client`] for the client library and its example, and [`group`] for groups
//! (members, a leader, votes, messages) on top of it.

pub mod client;
pub mod clock;
pub mod curve;
pub mod discovery;
pub mod duration;
pub mod endpoint;
mod ffi;
pub mod group;
pub mod http;
pub mod log;
pub mod persist;
pub mod server;
pub mod socket;
pub mod watch;

pub use clonekv_core as core;
