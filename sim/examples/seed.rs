//! Runs one seed and prints the outcome (a debugging aid until the binary exists).
use clonekv_sim::options::Options;
use clonekv_sim::world::{TraceMode, World};

fn main() {
    let seed: u64 = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let mode = if std::env::var("PRINT").is_ok() {
        TraceMode::Print
    } else {
        TraceMode::Recent
    };
    let report = World::new(seed, Options::default(), mode).run();
    println!(
        "seed {seed}: {:?} simulated {:?}",
        report.violation, report.simulated
    );
}
