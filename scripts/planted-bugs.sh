#!/usr/bin/env bash
# Plants each deliberate bug of scripts/planted-bugs/*.patch, one at a time, in a scratch
# copy of HEAD, runs the swarm on it and reports which oracle caught the bug first, at
# which seed, and how many seeds that took. A bug no seed catches is reported as
# "not caught". The table it prints is the one in docs/SIMULATION.md ("Planted bugs").
#
# Usage: scripts/planted-bugs.sh [--seeds N] [--from K] [PATCH...]
#   --seeds N   seeds to run per bug (default 1000); the run stops at the first failure
#   --from K    first seed (default 0)
#   PATCH...    patches to plant (default: every scripts/planted-bugs/*.patch)
# Environment: PLANTED_DIR (scratch directory, default $TMPDIR/clonekv-planted; its
# target/ is reused between bugs, so only the workspace crates rebuild).
#
# The patches apply to committed code only (git archive HEAD): commit first. Nothing in
# the repository or its worktrees is modified.
set -euo pipefail

seeds=1000
from=0
patches=()
while [ $# -gt 0 ]; do
  case "$1" in
    --seeds) seeds="${2:?--seeds needs a number}"; shift 2 ;;
    --from) from="${2:?--from needs a number}"; shift 2 ;;
    -h|--help) sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    -*) echo "planted-bugs.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    *) patches+=("$(realpath "$1")"); shift ;;
  esac
done
case "$seeds$from" in
  *[!0-9]*) echo "planted-bugs.sh: --seeds and --from take whole numbers" >&2; exit 2 ;;
esac

repo=$(git rev-parse --show-toplevel)
if [ ${#patches[@]} -eq 0 ]; then
  for patch in "$repo"/scripts/planted-bugs/*.patch; do patches+=("$patch"); done
fi
scratch="${PLANTED_DIR:-${TMPDIR:-/tmp}/clonekv-planted}"
target="$scratch/target"
mkdir -p "$scratch"

printf '%-58s %-10s %-7s %s\n' "bug" "seed" "seeds" "caught by"
for patch in "${patches[@]}"; do
  name=$(basename "$patch" .patch)
  rm -rf "$scratch/src"
  mkdir -p "$scratch/src"
  git -C "$repo" archive HEAD | tar -x -C "$scratch/src"
  if ! (cd "$scratch/src" && git apply "$patch"); then
    printf '%-58s %s\n' "$name" "patch does not apply to HEAD"
    continue
  fi
  if ! CARGO_TARGET_DIR="$target" nice -n 10 cargo build --release --quiet \
      --manifest-path "$scratch/src/Cargo.toml" -p clonekv-sim 2>"$scratch/$name.build.log"; then
    printf '%-58s %s\n' "$name" "does not build (see $scratch/$name.build.log)"
    continue
  fi
  log="$scratch/$name.log"
  nice -n 10 "$target/release/clonekv-sim" --seeds "$seeds" --from "$from" >"$log" 2>&1 || true
  seed=$(sed -n 's/^FAILED seed \([0-9]*\).*/\1/p' "$log" | head -n 1)
  if [ -z "$seed" ]; then
    printf '%-58s %-10s %-7s %s\n' "$name" "-" "$seeds" "not caught"
    continue
  fi
  oracle=$(sed -n 's/^  oracle: //p; s/^  panic: .*/panic/p' "$log" | head -n 1)
  printf '%-58s %-10s %-7s %s\n' "$name" "$seed" "$((seed - from + 1))" "$oracle"
done
echo "logs and failure reports: $scratch/*.log"
