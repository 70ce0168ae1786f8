//! # clonekv-zmq
//!
//! The thin production adapter: libzmq sockets driven by a `mio` event loop that feeds
//! the `clonekv-core` state machines and executes their outputs, plus the `clonekvd`
//! daemon and the `clonekv` command-line client. No protocol logic lives here.
//!
//! Status: the adapter, daemon and CLI arrive with the daemon issue; until then this crate
//! only re-exports the core so downstream code has one import path.

pub use clonekv_core as core;
