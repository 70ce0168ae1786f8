//! # clonekv-zmq
//!
//! The thin production adapter: libzmq sockets driven by a `mio` event loop that feeds
//! the `clonekv-core` state machines and executes their outputs, plus the `clonekvd`
//! daemon and the `clonekv` command-line client. No protocol logic lives here.
//!
//! Built so far: [`socket::ZmqSocket`], a libzmq socket registered with mio that obeys
//! the edge-triggered `ZMQ_FD` rules. The event loop, daemon, client library and CLI
//! arrive with the production issue, on top of the core server and client machines.

pub mod socket;

pub use clonekv_core as core;
