//! The simulator in `cargo test`: determinism, and every seed that ever found a bug.
//!
//! A failing seed here prints the oracle, what it saw, and the command that replays it.

use clonekv_sim::options::Options;
use clonekv_sim::world::{TraceMode, World};

/// Seeds of the default world that found a bug in core, now fixed. Each names it.
const REGRESSIONS: &[(u64, &str)] = &[
    (
        0,
        "a pending update whose ttl ran out was replayed with ttl=0.001",
    ),
    (
        6,
        "a snapshot installed after a client copy arrived did not settle it; \
         clients stayed on a backup that stepped down",
    ),
    (
        9,
        "a client stayed on a restarted server and dropped its new history as old",
    ),
    (
        20,
        "the oracle mistook an in-order replay of a delete for a regression",
    ),
    (
        22,
        "replaying every pending copy of one key published a value already replaced",
    ),
];

/// Swarm seeds (every knob drawn from the seed) that found a bug, now fixed.
const SWARM_REGRESSIONS: &[(u64, &str)] = &[
    (
        15,
        "a break swallowed a delete; a lost own update stayed in the client's map",
    ),
    (
        55,
        "a client's own update never reached a server and was never reconciled",
    ),
    (
        90,
        "the oracle protected updates a just-restarted, undecided server received",
    ),
    (
        192,
        "a stepped-down backup forwarded an update the primary had already replaced",
    ),
    (
        203,
        "harsh network: KTHXBAI overtook its own reply (oracle scope)",
    ),
    (
        296,
        "a SUB reconnect while the client was paused went unreported",
    ),
    (
        599,
        "an expiry stored by another server's clock came back through a snapshot",
    ),
    (
        750,
        "a delete seen while syncing was re-applied from a delayed client copy",
    ),
    (
        107,
        "a snapshot requested before an own update cleared its echo deadline",
    ),
    (
        114,
        "the oracle counted KVPUBs of a restarted peer's new history",
    ),
    (
        657,
        "the oracle ignored what a restarted passive received while re-syncing",
    ),
    (
        721,
        "the subtree HWM waiver began at KTHXBAI, not at the snapshot request",
    ),
    (
        10321,
        "the oracle kept a value received after the request that the snapshot deleted",
    ),
    (
        11413,
        "the oracle ignored KVPUBs read after a pause from a since-restarted active",
    ),
    (
        16385,
        "a timed-out sync applied the dead active's backlog over a new history",
    ),
    (
        80,
        "dropping that backlog instead lost it at a failover mid-sync",
    ),
    (
        14014,
        "a forward the primary had superseded was replayed at a later failover",
    ),
    (
        32681,
        "a failover mid-sync kept the backup's split-time entry over the primary's newer update",
    ),
    (
        40918,
        "the oracle kept a split-time ttl promise the adopted snapshot had replaced",
    ),
    (
        42617,
        "a failover mid-sync merged a restarted active's new updates under its old history's",
    ),
    (
        52010,
        "a client syncing across its server's restart took old-history evidence as current",
    ),
    (
        1147,
        "a backup applied a restarted primary's new history over its old map: no gap showed",
    ),
    (
        19211,
        "harsh network: a reordered KVPUB was taken for a restarted active's new history",
    ),
    (
        45316,
        "the oracle counted a late KVPUB the adopted snapshot already covered",
    ),
    (
        32991,
        "oracle 5 judged a promotion while the peer was still active (split brain)",
    ),
    (
        10497,
        "a whole-map client applied a snapshot's buffered updates across a hole",
    ),
    (
        12553,
        "a passive's own ttl promise was dropped at its re-sync (oracle)",
    ),
    (
        90737,
        "a client's older copy was replayed: the echo of its newer one had come first",
    ),
    (75661, "harsh network: the same older-copy replay as 90737"),
    (
        91791,
        "the oracle held a split-time ttl promise a failover mid-sync had replaced",
    ),
    (
        47684,
        "both servers published one update; the oracle took the later of two ttl promises",
    ),
    (
        25704,
        "a backup's takeover replay was left out of its split log, so never forwarded",
    ),
    (44202, "the same unforwarded takeover replay as 25704"),
    (
        66756,
        "the oracle ignored a dead active's KVPUBs read after a pause, while re-syncing",
    ),
    (
        93922,
        "a pending copy's expiry left the key's older merged value standing",
    ),
    (
        74799,
        "a client waited for a crashed server's reply after its DEALER reconnected",
    ),
    (
        7609,
        "a restarted backup lost an update it saw while deciding, at a failover mid-sync",
    ),
    (
        24559,
        "the ttl oracle ignored a late KVPUB's receipt that a failover mid-sync applied",
    ),
    (
        32551,
        "oracle 5 protected a client copy of an update from a restarted peer's lost history",
    ),
    (
        36280,
        "the ttl oracle lost a follower's receipt time, then judged by the peer's expiry",
    ),
    (87070, "the same lost receipt time as 36280"),
    (
        48374,
        "a late HUGZ's re-sync buffered stale KVPUBs, merged over newer values at a failover",
    ),
    (
        7027800,
        "PASSIVE states read late at a heal cleared the backup's split log: nothing forwarded",
    ),
    (
        7000666,
        "a backup resuming from a pause took a stale PASSIVE for a follower and logged nothing",
    ),
    (
        7043944,
        "oracle 3 took a late-published value's expiry for its expired copy's earlier delete",
    ),
    (
        7031294,
        "oracle 5 ordered a forward the primary published after a delete by its split-time first",
    ),
    (
        7041692,
        "a forward of an entry the primary had merged at a failover mid-sync was published again",
    ),
    (7012028, "the same forward of a merged entry as 7041692"),
    (7021981, "the same forward of a merged entry as 7041692"),
    (
        7058450,
        "harsh network: the same forward of a merged entry, after a real split",
    ),
    (
        7047798,
        "a copy later than the request, whose update the snapshot held, was replayed",
    ),
    (
        11002238,
        "the model's takeover check counted a KVPUB a completed sync had since accounted for",
    ),
    (
        23402302,
        "the same stale receipt as 11002238, an expired value",
    ),
    (
        821565385,
        "a resume reply cut by the active's crash: the sync's retry dropped the changes \
         that had arrived (a delete among them), and the takeover lost it",
    ),
    (
        371150194,
        "a retried sync set the old attempt's updates aside ahead of the new resume reply, \
         and a failover merged the reply's older change of a key over the newer update",
    ),
    (
        550446178,
        "harsh network: a resume reply's HUGZ arrived after its first change; the world \
         counted the changes as received while the passive read a snapshot (and the \
         passive installed the changes alone as its map)",
    ),
    (
        203527195063,
        "a failover mid-resume merged the cut reply's older changes of a key (a delete \
         last) over the newer update an earlier connection had brought",
    ),
    (
        312254343679,
        "the model's late-copy excuse: a client copy that arrived after the request of the \
         snapshot the reign is based on, and older than that snapshot's value, replayed at \
         a failover mid-sync (CHP's known limit, counted)",
    ),
    (
        639914810480,
        "a resume reply's delete echoed its client copy by uuid only; an older copy of the \
         key, arrived before it, stayed live and was replayed over the delete at failover",
    ),
    (
        48250498,
        "liveness: a subtree client's snapshot, answering an earlier request of a burst, \
         completed after its publisher dropped #808-#810 at the high-water mark and held \
         none of them; the excuse now also counts drops beyond the last snapshot's sequence",
    ),
    (
        319977409590,
        "the world handed a paused backup its monitor's reconnect notice before the dead \
         primary's last KVPUBs that had reached it earlier: they were applied over the \
         restarted primary's snapshot (the hosts now read a socket before its notice)",
    ),
    (
        566391955759,
        "the same notice-first order as 319977409590 (oracle 5)",
    ),
    (
        348143971121,
        "the same notice-first order as 319977409590 (oracle 5)",
    ),
    (
        936433587533,
        "an active stepped down and took over again in one instant, merging the dead \
         peer's last updates: its subscribers never heard the reign end and missed them \
         (a stepping-down active now announces PASSIVE at once)",
    ),
    (
        936433589950,
        "liveness owed faster than the world's links carry: 481-entry snapshots at ~50 \
         messages/s (high-water mark 20, 5% delay spikes up to 1.5 s) with two obsolete \
         streams queued ahead (the heal phase now covers three snapshots)",
    ),
    (
        517240274067,
        "oracle 5 counted a stale resume reply's change, which the server dropped (no \
         request out), as received over the server's own newer publications of the key",
    ),
    (
        873077008152,
        "oracle 3 looked a paused client's delete from a restarted server's old history up \
         by (server, sequence, value) and found the new history's delete at that sequence",
    ),
    (
        567475528694,
        "oracle 3 did not know that a failover mid-sync merged the snapshot entries \
         received so far: the expiry of a merged value looked like a replay of an older \
         delete of the same update",
    ),
    (
        692477835536,
        "a client took a reply held up on a stalled link since an earlier reign of its \
         server for the answer to its new request, and followed the new reign from the \
         old reign's map",
    ),
    (
        832248865444,
        "a syncing passive whose peer began a new reign started its sync over with \
         nothing, letting go of the old reign's updates it held; the peer died and the \
         failover lost them",
    ),
    (
        331561370784,
        "oracle 5 took a snapshot entry for newer than a KVPUB of the same history \
         numbered above the snapshot, because the KVPUB's value (split-time, forwarded, \
         republished) had first been published earlier elsewhere",
    ),
    (
        614048952748,
        "oracle 5 protected a client copy of the expiry delete the active had published \
         last for a key, though the active's map had since taken the peer's value in a \
         merged reign (a failover mid-sync) without publishing it: the passive's \
         snapshot held that value, and it dropped the late copy as a repeat",
    ),
    (
        1061122210006,
        "a paused passive took over on resuming, published a newer value, read the old \
         active's late state and stepped down; the old active's late updates, numbered \
         at or below what its map had followed, filled its sync, and a failover \
         mid-sync merged an older value over the newer one it had published",
    ),
];

fn assert_passes(seed: u64, options: Options, why: &str) {
    let report = World::new(seed, options, TraceMode::Recent).run();
    if let Some(violation) = report.violation {
        panic!(
            "seed {seed} ({why}) failed {}: {}\nlast events:\n  {}\nreplay: cargo run --release -p clonekv-sim -- --seed {seed} --trace (add --default-world for the default-world list)",
            violation.oracle,
            violation.detail,
            report.recent.join("\n  ")
        );
    }
}

#[test]
fn every_regression_seed_still_passes() {
    for (seed, why) in REGRESSIONS {
        assert_passes(*seed, Options::default(), why);
    }
}

#[test]
fn every_swarm_regression_seed_still_passes() {
    for (seed, why) in SWARM_REGRESSIONS {
        assert_passes(*seed, Options::swarm(*seed), why);
    }
}

#[test]
fn the_same_seed_replays_the_same_world_byte_for_byte() {
    for seed in [1, 7, 42] {
        let first = World::new(seed, Options::swarm(seed), TraceMode::Hash).run();
        let second = World::new(seed, Options::swarm(seed), TraceMode::Hash).run();
        assert_eq!(
            first.trace_hash, second.trace_hash,
            "seed {seed} diverged between two runs: replay both with \
             `cargo run --release -p clonekv-sim -- --seed {seed} --trace` and diff"
        );
        assert_eq!(first.coverage, second.coverage);
    }
}

#[test]
fn different_seeds_make_different_worlds() {
    let one = World::new(1, Options::swarm(1), TraceMode::Hash).run();
    let two = World::new(2, Options::swarm(2), TraceMode::Hash).run();
    assert_ne!(one.trace_hash, two.trace_hash);
}
