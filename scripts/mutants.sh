#!/usr/bin/env bash
# Mutation testing of clonekv-core with cargo-mutants: each mutant
# (a function body replaced, an operator swapped, ...) is built in a scratch copy of the
# workspace and must be caught by the test command: every unit and integration test of
# clonekv-core and of clonekv-sim (its regression seeds, sim/tests/seeds.rs, are most of
# the time), doctests aside. The results are in docs/MUTANTS.md.
#
# Usage: scripts/mutants.sh [--shard K/N] [--file GLOB]... [--re REGEX] [--timeout SECS]
#                           [--output DIR] [--list] [--baseline-skip] [--iterate]
#                           [--summary] [-- CARGO_MUTANTS_ARGS]
#   --shard K/N      run only shard K (0-based) of N, e.g. 0/4 (cargo-mutants --shard)
#   --file GLOB      only mutants in files matching GLOB, e.g. core/src/budget.rs (repeatable)
#   --re REGEX       only mutants whose name (as --list prints it) matches REGEX
#   --timeout SECS   per-mutant test timeout (default 150: the tests take about 40 s on a
#                    busy 2-core machine; cargo-mutants' own default comes from a baseline
#                    that runs clonekv-core's tests only, too short for the seeds)
#   --output DIR     where mutants.out/ goes (default $TMPDIR/clonekv-mutants); a
#                    previous mutants.out there is kept as mutants.out.old
#   --list           list the mutants and exit, running nothing
#   --baseline-skip  do not test the unmutated tree first
#   --iterate        skip the mutants DIR/mutants.out lists as caught or unviable (test
#                    again only the missed, timed-out and new ones, e.g. after adding tests)
#   --summary        print the per-file table of DIR/mutants.out (caught, missed, timeout,
#                    unviable, score = caught / (caught + missed)) and exit
#   -- ARGS          passed to cargo mutants as they are
# Environment: MUTANTS_TARGET_DIR (cargo's target directory for the scratch builds,
# default DIR/target; reused between runs, so only the workspace crates rebuild).
#
# Runs one mutant at a time (--jobs 1) at nice 10: it is long on 2 cores (about a
# minute per mutant), so shard it or pick files. Needs `cargo install cargo-mutants`.
# Nothing in the repository is modified (cargo-mutants works in a copy).
set -euo pipefail

shard=()
files=()
filters=()
timeout=(--timeout 150)
baseline=()
list=()
iterate=()
summary=0
extra=()
output="${TMPDIR:-/tmp}/clonekv-mutants"
while [ $# -gt 0 ]; do
  case "$1" in
    --shard) shard=(--shard "${2:?--shard needs K/N}"); shift 2 ;;
    --file) files+=(--file "${2:?--file needs a glob}"); shift 2 ;;
    --re) filters+=(--re "${2:?--re needs a regex}"); shift 2 ;;
    --timeout) timeout=(--timeout "${2:?--timeout needs seconds}"); shift 2 ;;
    --output) output="${2:?--output needs a directory}"; shift 2 ;;
    --list) list=(--list); shift ;;
    --baseline-skip) baseline=(--baseline skip); shift ;;
    --iterate) iterate=(--iterate); shift ;;
    --summary) summary=1; shift ;;
    -h|--help) sed -n '2,31p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    --) shift; extra=("$@"); break ;;
    *) echo "mutants.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
if [ ${#shard[@]} -gt 0 ]; then
  case "${shard[1]}" in
    [0-9]*/[0-9]*) ;;
    *) echo "mutants.sh: --shard takes K/N, e.g. 0/4" >&2; exit 2 ;;
  esac
fi
if [ ${#timeout[@]} -gt 0 ]; then
  case "${timeout[1]}" in
    ''|*[!0-9]*) echo "mutants.sh: --timeout takes whole seconds" >&2; exit 2 ;;
  esac
fi
if [ "$summary" = 1 ]; then
  results="$output/mutants.out"
  if [ ! -f "$results/caught.txt" ]; then
    echo "mutants.sh: no results in $results (run first, or give --output DIR)" >&2
    exit 2
  fi
  for outcome in caught missed timeout unviable; do
    sed "s/^\([^:]*\):.*/\1 $outcome/" "$results/$outcome.txt"
  done | sort | awk '
    !($1 in seen) { seen[$1] = 1; order[++n] = $1 }
    { count[$1, $2]++; total[$2]++ }
    function row(name, c, m, t, u) {
      score = (c + m > 0) ? sprintf("%.1f%%", 100 * c / (c + m)) : "-"
      printf "| %s | %d | %d | %d | %d | %d | %s |\n", name, c + m + t + u, c, m, t, u, score
    }
    END {
      print "| file | mutants | caught | missed | timeout | unviable | score |"
      print "|---|---|---|---|---|---|---|"
      for (i = 1; i <= n; i++) {
        f = order[i]
        row("`" f "`", count[f, "caught"], count[f, "missed"], count[f, "timeout"], count[f, "unviable"])
      }
      row("total", total["caught"], total["missed"], total["timeout"], total["unviable"])
    }'
  exit 0
fi
if ! cargo mutants --version >/dev/null 2>&1; then
  echo "mutants.sh: cargo-mutants is missing: cargo install cargo-mutants --locked" >&2
  exit 2
fi

repo=$(git rev-parse --show-toplevel)
mkdir -p "$output"
export CARGO_TARGET_DIR="${MUTANTS_TARGET_DIR:-$output/target}"
# No debug info in the scratch builds: a mutant's verdict needs none, and without it each
# mutant's compile and the link of its ~11 test binaries are markedly shorter.
export CARGO_PROFILE_DEV_DEBUG=0 CARGO_PROFILE_TEST_DEBUG=0

# The test command: cargo test -p clonekv-core -p clonekv-sim --lib --tests: every unit
# and integration test of both packages (the seeds are about 30 s of it, the rest about
# 15 s); not the doctests, which cost a compile each and check examples, not rules.
# cargo-mutants' baseline runs the mutated package's tests only (clonekv-core), hence
# the fixed --timeout above.
exec nice -n 10 cargo mutants \
  --dir "$repo" \
  --package clonekv-core \
  --test-package clonekv-core --test-package clonekv-sim \
  --jobs 1 \
  --output "$output" \
  ${shard[@]+"${shard[@]}"} \
  ${files[@]+"${files[@]}"} \
  ${filters[@]+"${filters[@]}"} \
  ${timeout[@]+"${timeout[@]}"} \
  ${baseline[@]+"${baseline[@]}"} \
  ${list[@]+"${list[@]}"} \
  ${iterate[@]+"${iterate[@]}"} \
  ${extra[@]+"${extra[@]}"} \
  -- --lib --tests
