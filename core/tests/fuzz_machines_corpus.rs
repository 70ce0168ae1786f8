//! Replays the state-machine fuzz corpus (`fuzz/corpus/machines`, plus any saved crash
//! inputs in `fuzz/regressions/machines`) on stable Rust, so CI runs every sequence of
//! operations the fuzzer ever kept through the real machines.

#[path = "../../fuzz/machines_harness.rs"]
mod machines_harness;

use std::path::Path;

#[path = "../../fuzz/corpus_files.rs"]
mod corpus_files;
use corpus_files::inputs_in;

#[test]
fn every_machines_corpus_input_runs_without_a_panic_or_a_broken_invariant() {
    let fuzz = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz");
    let corpus = inputs_in(&fuzz.join("corpus/machines"));
    assert!(
        corpus.len() >= 10,
        "the committed corpus is missing from {}",
        fuzz.display()
    );
    let regressions = inputs_in(&fuzz.join("regressions/machines"));
    let mut operations = 0;
    for path in corpus.iter().chain(&regressions) {
        let data = std::fs::read(path).unwrap();
        operations += machines_harness::drive_machines(&data);
    }
    assert!(operations > corpus.len(), "the corpus drives the machines");
}
