#![no_main]
//! Fuzzes every CHP decoder with frames built from the fuzzer's bytes.

#[path = "../harness.rs"]
mod harness;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    harness::decode_everything(data);
});
