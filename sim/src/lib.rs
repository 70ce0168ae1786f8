//! # clonekv-sim
//!
//! Deterministic simulation testing of a whole clonekv cluster (see
//! `shared/spec/SIMULATION.md`): the real `clonekv-core` state machines of a primary, a
//! backup and several clients run in one thread under a world decided entirely by a
//! seed — delays, loss, partitions, crashes, clock skew — with the safety oracles checked
//! after every step.
//!
//! Status: the crate exists so the workspace has its final shape; the simulated world
//! arrives with the simulator issue, once the core server, Binary Star and client state
//! machines exist. Nothing here pretends to simulate yet.
