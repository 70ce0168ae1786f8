#![no_main]
//! Fuzzes the real state machines (a primary, a backup and a client) with sequences of
//! operations: messages between them, arbitrary frames on every input, writes, notices,
//! restarts, time and wall-clock jumps.

#[path = "../machines_harness.rs"]
mod machines_harness;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    machines_harness::drive_machines(data);
});
