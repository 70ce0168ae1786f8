//! # clonekv-zmq
//!
//! The thin production adapter: libzmq sockets driven by a `mio` event loop that feeds
//! the `clonekv-core` state machines and executes their outputs, plus the `clonekvd`
//! daemon and the `clonekv` command-line client. No protocol logic lives here.
pub mod client;
pub mod clock;
pub mod duration;
pub mod log;
pub mod server;
pub mod socket;

pub use clonekv_core as core;
