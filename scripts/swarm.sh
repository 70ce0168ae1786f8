#!/usr/bin/env bash
# A swarm over seed ranges drawn at random: nobody tuned anything on them.
#
#   scripts/swarm.sh [--bin PATH] [--chunk N] [--chunks K] [--log FILE]
#
# Each chunk runs N consecutive random-world seeds from a start drawn from
# /dev/urandom (below 2^40), with --keep-going so that a chunk counts all its
# failures. One line per chunk goes to the log (default: stdout):
#   <utc time> start=<S> seeds=<N> failed=<F> seconds=<T> seeds_per_minute=<R>
# followed by the failing seeds' replay commands, if any. Run one instance per core.
# Without --bin it builds the simulator with the `swarm` profile (Cargo.toml: release
# plus fat LTO, the same worlds about 10% faster) and runs that.
# Not part of .ci/run: it is a hunt, hours long.
set -euo pipefail

bin=""
chunk=20000
chunks=1000000
log=/dev/stdout
while [ $# -gt 0 ]; do
    case "$1" in
        --bin) bin="$2"; shift 2 ;;
        --chunk) chunk="$2"; shift 2 ;;
        --chunks) chunks="$2"; shift 2 ;;
        --log) log="$2"; shift 2 ;;
        -h|--help) sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "swarm.sh: unknown argument '$1' (try --help)" >&2; exit 2 ;;
    esac
done
if [ -z "$bin" ]; then
    cd "$(dirname "$0")/.."
    cargo build --profile swarm -p clonekv-sim >&2
    bin="${CARGO_TARGET_DIR:-target}/swarm/clonekv-sim"
fi
[ -x "$bin" ] || { echo "swarm.sh: $bin is not an executable clonekv-sim" >&2; exit 2; }

done_chunks=0
while [ "$done_chunks" -lt "$chunks" ]; do
    done_chunks=$((done_chunks + 1))
    start=$(( $(od -An -N5 -tu8 /dev/urandom | tr -d ' ') % (1 << 40) ))
    began=$(date +%s)
    out=$("$bin" --seeds "$chunk" --from "$start" --keep-going 2>&1 || true)
    seconds=$(( $(date +%s) - began ))
    failed=$(printf '%s\n' "$out" | sed -n 's/^[0-9]* seeds, \([0-9]*\) failed.*/\1/p' | head -1)
    rate=$(( seconds > 0 ? chunk * 60 / seconds : 0 ))
    {
        echo "$(date -u +%FT%TZ) start=$start seeds=$chunk failed=${failed:-?} seconds=$seconds seeds_per_minute=$rate"
        printf '%s\n' "$out" | grep -E '^(FAILED seed|  oracle:|  at |  replay:)' || true
    } >>"$log"
done
