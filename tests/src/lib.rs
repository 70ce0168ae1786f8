//! # clonekv-tests
//!
//! End-to-end tests that start real `clonekvd` daemons on 127.0.0.1, drive them with the
//! `clonekv` CLI and library, and kill them. They live under `tests/tests/` and arrive
//! with the daemon issue; this library will hold the shared harness (port allocation,
//! process supervision, waiting on events instead of sleeping).
