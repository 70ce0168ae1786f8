//! # clonekv-core
//!
//! The sans-IO heart of clonekv: pure state machines for the Clone protocol (CHP, ZeroMQ
//! RFC 12) with Binary Star failover. Nothing in this crate opens a socket, reads a clock,
//! draws OS randomness or spawns a thread. Time comes in as an argument ([`time::Instant`]
//! for timers, [`time::EpochMillis`] where the protocol needs wall-clock time), randomness
//! from an injected seeded RNG, and every effect goes out as a value that the caller
//! executes. The same code therefore runs under the deterministic simulator (`clonekv-sim`)
//! and in the production daemon (`clonekv-zmq`).
//!
//! Modules:
//! - [`client`]: the clone agent — snapshot, live updates and failover over a list of
//!   servers, the application's own updates and their commit confirmation (§4, §8).
//! - [`kvmsg`]: the wire codec — the five-frame message, ICANHAZ?, the Binary Star state
//!   frame, properties and ttl parsing (PROTOCOL.md §2, §3, §5).
//! - [`time`]: the monotonic [`time::Instant`] and wall-clock [`time::EpochMillis`] types.
//! - [`bstar`]: the Binary Star failover state machine (§7), including the dual-active
//!   and dual-passive resolutions the reference lacks.
//! - [`budget`]: the count and byte bounds of every buffer that input fills, and the
//!   report ([`budget::BoundedStructure`]) that lets a host check them.
//! - [`beacon`]: zero-config discovery — a UDP beacon per node and the table of peers
//!   heard, with their addresses, roles and Binary Star states.
//! - [`server`]: the clone server — map, sequence, ttl expiry, streamed point-in-time
//!   snapshots, the passive's pending list and re-sync, failover replay (§3–§7).
//!
//! A host drives every state machine the same way: feed an input with `handle_*(now, …)`,
//! then drain `poll_output()` until it returns `None`, then sleep until `poll_timeout()`
//! and call `handle_timeout(now)`.
// The workspace denies `unsafe`; the sans-IO core forbids it outright (only the libzmq
// adapter has one audited call, DECISIONS.md).
#![forbid(unsafe_code)]
#![cfg_attr(
    not(test),
    deny(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)
)]

pub mod beacon;
pub mod bstar;
pub mod budget;
pub mod client;
pub mod kvmsg;
pub mod server;
pub mod time;
