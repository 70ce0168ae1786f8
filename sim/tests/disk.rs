//! The simulated disk: seeded runs of a recording pair with whole-pair crashes, torn and
//! damaged log tails, under each fsync policy (oracles in `clonekv_sim::disk`).
//!
//! `CLONEKV_DISK_SEEDS=N` runs N seeds per policy instead of the default.

use clonekv_sim::disk::{run, Policy, RunReport};

fn seeds() -> u64 {
    std::env::var("CLONEKV_DISK_SEEDS")
        .ok()
        .and_then(|value| value.parse().ok())
        .unwrap_or(200)
}

fn swarm(policy: Policy) -> RunReport {
    let mut total = RunReport::default();
    for seed in 0..seeds() {
        match run(seed, policy, 300) {
            Ok(report) => {
                total.published += report.published;
                total.crashes += report.crashes;
                total.bytes_cut += report.bytes_cut;
                total.lost += report.lost;
                total.resumes += report.resumes;
            }
            Err(violation) => panic!(
                "seed {seed} under {policy:?}: {violation}\n\
                 rerun: cargo test -p clonekv-sim --test disk (seed {seed})"
            ),
        }
    }
    eprintln!("{policy:?}: {total:?}");
    total
}

#[test]
fn under_fsync_always_every_published_update_survives_every_crash() {
    let total = swarm(Policy::Always);
    assert!(total.crashes > 0 && total.published > 0, "{total:?}");
    assert_eq!(total.lost, 0);
    assert!(total.resumes > 0, "restarted backups resume: {total:?}");
}

#[test]
fn under_batch_a_crash_loses_only_a_tail_and_the_history_continues_from_it() {
    let total = swarm(Policy::Batch { every: 4 });
    assert!(total.crashes > 0, "{total:?}");
    assert!(
        total.lost > 0 && total.bytes_cut > 0,
        "the runs tore some tails: {total:?}"
    );
}

#[test]
fn under_never_restored_maps_still_match_the_published_history() {
    let total = swarm(Policy::Never);
    assert!(total.lost > 0, "{total:?}");
    assert!(total.resumes > 0, "{total:?}");
}

#[test]
fn a_seed_replays_the_same_run() {
    for policy in [Policy::Always, Policy::Batch { every: 3 }, Policy::Never] {
        assert_eq!(run(7, policy, 300), run(7, policy, 300));
    }
}
