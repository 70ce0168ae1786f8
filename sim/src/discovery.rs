//! # The discovery world
//!
//! The real [`clonekv_core::beacon::Beacon`] machine of every node of two clusters on
//! one simulated broadcast LAN, under a world decided by one `u64` seed: per-datagram
//! loss (with a worst case: at most `K` losses in a row on one path), delay, spikes and
//! duplicates; nodes cut off the LAN and healed; restarts with a new instance id; a
//! server moving to a new address; a server heard from two addresses; garbage datagrams
//! of every kind; Binary Star state changes. Oracles (i) to (vi) of
//! [`world::DiscoveryOracle`] are checked after every step; `docs/SIMULATION.md`
//! describes them and the bound of oracle (i).
//!
//! The world is separate from the cluster world ([`crate::world`]): discovery runs
//! beside CHP, not inside it, and a world of beacons alone runs thousands of seeds a
//! minute.

pub mod options;
pub mod runner;
pub mod world;

pub use options::DiscoveryOptions;
pub use world::{DiscoveryOracle, DiscoveryReport, DiscoveryWorld, Garbage, Scripted};
