//! Replays the decoder fuzz corpus (`fuzz/corpus/decode`, plus any saved crash inputs in
//! `fuzz/regressions/decode`) on stable Rust, so CI exercises every input the fuzzer
//! ever kept without needing nightly or libFuzzer.

#[path = "../../fuzz/harness.rs"]
mod harness;

use std::path::Path;

#[path = "../../fuzz/corpus_files.rs"]
mod corpus_files;
use corpus_files::inputs_in;

#[test]
fn every_fuzz_corpus_input_decodes_without_panicking() {
    let fuzz = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz");
    let corpus = inputs_in(&fuzz.join("corpus/decode"));
    assert!(
        corpus.len() >= 10,
        "the committed seed corpus is missing from {}",
        fuzz.display()
    );
    let regressions = inputs_in(&fuzz.join("regressions/decode"));
    for path in corpus.iter().chain(&regressions) {
        let data = std::fs::read(path).unwrap();
        let accepted = harness::decode_everything(&data);
        // Hand-written seeds say in their name whether they are well-formed, which also
        // proves they are spelled in the harness's frame encoding.
        let name = path.file_name().unwrap().to_string_lossy();
        if let Some(seed) = name.strip_prefix("seed-") {
            let malformed = seed.starts_with("bad-") && seed != "bad-ttl";
            assert_eq!(accepted, !malformed, "seed {seed}");
        }
    }
}
