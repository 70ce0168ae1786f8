#!/usr/bin/env bash
# Interop check: clonekv against the zguide's Clone Model Six reference programs.
#
#   CLONEKV_ANCHORS=DIR [CLONEKV_BIN=DIR] scripts/interop.sh [CASE...]
#
# CLONEKV_ANCHORS  a directory holding the zguide's Clone Model Six programs, built from
#                  the Guide's sources (docs/INTEROP.md says how): the C server
#                  build/clonesrv6q (clonesrv6.c, Binary Star tracing off), the C client
#                  build/clonetool (the Guide's clone.c agent as a command), the Python
#                  programs py/clonesrv6.py, py/clone.py (and their modules) and a
#                  venv/bin/python with pyzmq.
# CLONEKV_BIN      where clonekvd and clonekv are (default: target/release of this repo),
#                  built by `cargo build --release -p clonekv-zmq`; the library cases
#                  also run CLONEKV_BIN/examples/interop_client, built by
#                  `cargo build --release -p clonekv-zmq --examples`.
# KEEP_LOGS=1      keep the temp dir of logs even when every case passes.
# CASE             run only these cases (default: all): a b c-c c-py d e f-c-primary
#                  f-clonekvd-primary.
#
# Needs root (ip netns), iproute2 and coreutils. Everything runs in a private network
# namespace (clonekv-interop-PID) because the zguide's ports are fixed (primary 5556-5558
# and Binary Star 5003, backup 5566-5568 and 5004) and clonekvd's defaults are the same;
# so the pairs run one after another. On exit (also on failure or Ctrl-C) the script
# kills only the processes it started and deletes the namespace. Every client command
# runs under `timeout`. Exit status: 0 if every case passed, 1 if any failed, 2 if the
# setup is missing.
set -euo pipefail

die() { echo "interop.sh: $*" >&2; exit 2; }

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/.." && pwd)

ANCHORS=${CLONEKV_ANCHORS:-}
if [ -z "$ANCHORS" ] || [ ! -x "$ANCHORS/build/clonesrv6q" ] || [ ! -x "$ANCHORS/build/clonetool" ] \
  || [ ! -f "$ANCHORS/py/clonesrv6.py" ] || [ ! -x "$ANCHORS/venv/bin/python" ]; then
  die "set CLONEKV_ANCHORS to a directory built by: bash $(cd "$REPO/.." && pwd)/shared/anchors/build.sh DIR ZGUIDE_BARE_GIT_DIR"
fi
ANCHORS=$(cd "$ANCHORS" && pwd)
BIN=${CLONEKV_BIN:-$REPO/target/release}
for b in clonekvd clonekv; do
  [ -x "$BIN/$b" ] || die "$BIN/$b is missing: run \`cargo build --release -p clonekv-zmq\` (or set CLONEKV_BIN)"
done
[ "$(id -u)" = 0 ] || die "needs root for ip netns (run with sudo)"
command -v ip >/dev/null || die "needs ip (iproute2)"
command -v ss >/dev/null || die "needs ss (iproute2)"

ALL_CASES=(a b c-c c-py d e f-c-primary f-clonekvd-primary)
if [ $# -gt 0 ]; then CASES=("$@"); else CASES=("${ALL_CASES[@]}"); fi
for c in "${CASES[@]}"; do
  case " ${ALL_CASES[*]} " in *" $c "*) ;; *) die "unknown case $c (cases: ${ALL_CASES[*]})" ;; esac
done

NS=clonekv-interop-$$
TMP=$(mktemp -d "${TMPDIR:-/tmp}/clonekv-interop.XXXXXX")
PORTS=(5556 5557 5558 5003 5566 5567 5568 5004)
declare -A PID=()   # daemon name -> pid, for the daemons running now
STARTED=()          # every pid this script started
NS_CREATED=0
FAILED_ANY=0

cleanup() {
  local rc=$? pid
  trap - EXIT INT TERM
  for pid in "${STARTED[@]}"; do
    kill -9 "$pid" 2>/dev/null || true
  done
  for pid in "${STARTED[@]}"; do
    wait "$pid" 2>/dev/null || true
  done
  if [ "$NS_CREATED" = 1 ]; then
    ip netns del "$NS" 2>/dev/null || echo "interop.sh: could not delete netns $NS" >&2
  fi
  if [ "$rc" = 0 ] && [ "$FAILED_ANY" = 0 ] && [ "${KEEP_LOGS:-0}" != 1 ]; then
    rm -rf "$TMP"
  else
    echo "logs kept in $TMP"
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# Copies of the binaries, so a rebuild during the run cannot swap them.
mkdir -p "$TMP/bin"
cp "$BIN/clonekvd" "$BIN/clonekv" "$TMP/bin/"
HAVE_LIB_CLIENT=0
if [ -x "$BIN/examples/interop_client" ]; then
  cp "$BIN/examples/interop_client" "$TMP/bin/"
  HAVE_LIB_CLIENT=1
fi
CLONEKVD=$TMP/bin/clonekvd
CLONEKV=$TMP/bin/clonekv
# The zguide programs neither send nor hear clonekv's discovery beacons: every case here
# uses the reference endpoints (localhost defaults), as the zguide programs do.
export CLONEKVD_NO_DISCOVERY=1 CLONEKV_NO_DISCOVERY=1
PY=$ANCHORS/venv/bin/python

ip netns add "$NS"
NS_CREATED=1
ip netns exec "$NS" ip link set lo up

# The clone.py driver (case e): set KEY VALUE, then poll for GETKEY=EXPECTED.
cat >"$TMP/clonepy_driver.py" <<'EOF'
"""Drive the zguide's clone.py agent: set one key, read another, exit 0 or 1."""
import os
import sys
import time

sys.path.insert(0, os.getcwd())  # run with cwd $CLONEKV_ANCHORS/py
import clone  # noqa: E402

set_key, set_value, get_key, expected = (a.encode() for a in sys.argv[1:5])
c = clone.Clone()
c.subtree = b"/interop/"
c.connect("tcp://localhost", 5556)
c.connect("tcp://localhost", 5566)
time.sleep(1.0)  # let the PUB -> collector connections settle (slow joiner)
c.set(set_key, set_value, 0)
print("set %s=%s" % (set_key.decode(), set_value.decode()), flush=True)
value = b""
deadline = time.time() + 10
while time.time() < deadline:
    value = c.get(get_key) or b""
    if value:
        break
    time.sleep(0.05)
print("%s=%s" % (get_key.decode(), value.decode(errors="replace")), flush=True)
time.sleep(0.5)  # let the set go out before the process ends
os._exit(0 if value == expected else 1)
EOF

# ---- helpers --------------------------------------------------------------------------

CASE_NAMES=()
CASE_RESULTS=()
CASE_NOTES=()
CUR_CASE=""
CUR_OK=1
CUR_NOTE=""
CUR_LOGS=()

# nsrun SECS CMD...: run CMD in the namespace under a timeout; prints the command, its
# stdout (| ) and stderr (! ) and the time taken; leaves stdout in $OUT, status in $RC.
OUT=""
RC=0
nsrun() {
  local secs=$1 start end
  shift
  echo "  \$ $*"
  start=$(date +%s%N)
  if timeout "$secs" ip netns exec "$NS" "$@" >"$TMP/out" 2>"$TMP/err"; then RC=0; else RC=$?; fi
  end=$(date +%s%N)
  OUT=$(cat "$TMP/out")
  sed 's/^/    | /' "$TMP/out"
  sed 's/^/    ! /' "$TMP/err" | tail -n 20
  echo "    -> exit $RC$([ "$RC" = 124 ] && echo " (timed out after ${secs}s)") in $(((end - start) / 1000000)) ms"
}

# nsrun_in DIR SECS CMD...: nsrun with DIR as the working directory.
nsrun_in() {
  local dir=$1
  shift
  pushd "$dir" >/dev/null
  nsrun "$@"
  popd >/dev/null
}

fail_step() {
  CUR_OK=0
  [ -n "$CUR_NOTE" ] || CUR_NOTE=$1
  echo "    FAILED: $1"
}

# check DESC [--expect TEXT | --contains TEXT] SECS CMD...: a step of the case; it
# fails on a non-zero exit, or when stdout is not (does not contain a line) TEXT.
check() {
  local desc=$1 mode="" want=""
  shift
  case $1 in
    --expect | --contains) mode=$1; want=$2; shift 2 ;;
  esac
  echo "  [$desc]"
  nsrun "$@"
  if [ "$RC" != 0 ]; then
    fail_step "$desc: exit $RC"
  elif [ "$mode" = --expect ] && [ "$OUT" != "$want" ]; then
    fail_step "$desc: printed '$OUT', expected '$want'"
  elif [ "$mode" = --contains ] && ! grep -qxF -- "$want" <<<"$OUT"; then
    fail_step "$desc: no line '$want'"
  fi
}

# check_in DIR DESC ...: check with DIR as the working directory.
check_in() {
  local dir=$1
  shift
  pushd "$dir" >/dev/null
  check "$@"
  popd >/dev/null
}

# start NAME DIR CMD...: start a daemon in the namespace, cwd DIR, log in $TMP/NAME.log.
start() {
  local name=$1 dir=$2
  shift 2
  local log="$TMP/$CUR_CASE.$name.log"
  echo "  start $name: (cd $dir && $*) > $log"
  (cd "$dir" && exec ip netns exec "$NS" env PYTHONUNBUFFERED=1 "$@") >"$log" 2>&1 &
  PID[$name]=$!
  STARTED+=("$!")
  CUR_LOGS+=("$log")
}

# kill9 NAME: kill -9 a daemon (a crash).
kill9() {
  local name=$1 pid=${PID[$1]}
  echo "  kill -9 $name (pid $pid)"
  kill -9 "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
  unset "PID[$name]"
}

# stop_all: SIGTERM every running daemon, SIGKILL after 5 s, then wait for free ports.
stop_all() {
  local name pid i
  for name in "${!PID[@]}"; do
    kill -TERM "${PID[$name]}" 2>/dev/null || true
  done
  for name in "${!PID[@]}"; do
    pid=${PID[$name]}
    for ((i = 0; i < 50; i++)); do
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.1
    done
    kill -9 "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    unset "PID[$name]"
  done
  wait_ports free
}

listening() {
  ip netns exec "$NS" ss -Hltn "sport = :$1" | grep -q .
}

# wait_ports free | PORT...: wait (up to 15 s) until none of the pair's ports listens,
# or until every PORT given listens.
wait_ports() {
  local i p ok
  for ((i = 0; i < 150; i++)); do
    ok=1
    if [ "$1" = free ]; then
      for p in "${PORTS[@]}"; do
        if listening "$p"; then ok=0; fi
      done
    else
      for p in "$@"; do
        listening "$p" || ok=0
      done
    fi
    [ "$ok" = 1 ] && return 0
    sleep 0.1
  done
  return 1
}

# pair_up: wait until both servers listen, then 2.5 s (a Binary Star primary rejects
# client requests for its first 2 heartbeats).
pair_up() {
  if ! wait_ports 5556 5566; then
    fail_step "servers did not listen on 5556 and 5566 within 15 s"
    return 0
  fi
  sleep 2.5
}

# collapse: runs of log lines that differ only in their leading timestamp become one
# line with a count (a client retrying in a loop makes a server log thousands of them).
collapse() {
  awk '
    { key = $0; sub(/^[0-9][-0-9]* [0-9:.]+ |^[0-9][-0-9T:.]*Z? +/, "", key) }
    key == prev { n++; next }
    { flush(); prev = key; line = $0; n = 1 }
    function flush() { if (n > 1) print line "  [repeated " n " times]"; else if (n) print line }
    END { flush() }'
}

case_begin() {
  CUR_CASE=$1
  CUR_OK=1
  CUR_NOTE=""
  CUR_LOGS=()
  echo
  echo "=== case $1: $2"
}

case_end() {
  local log
  stop_all
  if [ "$CUR_OK" = 1 ]; then
    echo "=== PASS $CUR_CASE"
  else
    FAILED_ANY=1
    echo "=== FAIL $CUR_CASE: $CUR_NOTE"
    for log in "${CUR_LOGS[@]}"; do
      echo "  --- tail of $log ($(wc -l <"$log") lines; repeats collapsed)"
      collapse <"$log" | tail -n 25 | sed 's/^/  /'
    done
  fi
  CASE_NAMES+=("$CUR_CASE")
  CASE_RESULTS+=("$([ "$CUR_OK" = 1 ] && echo PASS || echo FAIL)")
  CASE_NOTES+=("$CUR_NOTE")
}

start_c_pair() {
  start c-primary "$ANCHORS/build" ./clonesrv6q -p
  start c-backup "$ANCHORS/build" ./clonesrv6q -b
  pair_up
}

start_py_pair() {
  start py-primary "$ANCHORS/py" "$PY" -W ignore clonesrv6.py -p
  start py-backup "$ANCHORS/py" "$PY" -W ignore clonesrv6.py -b
  pair_up
}

start_clonekvd_pair() {
  start clonekvd-primary "$TMP" "$CLONEKVD"
  start clonekvd-backup "$TMP" "$CLONEKVD" --backup
  pair_up
}

# ---- cases ----------------------------------------------------------------------------

# The clonekv CLI against a reference pair, then a failover to its backup.
cli_case() {
  local kind=$1
  check "clonekv set --wait" 20 "$CLONEKV" set /interop/a hello --wait
  check "clonekv get" --expect hello 20 "$CLONEKV" get /interop/a
  check "clonekv dump" --contains /interop/a=hello 20 "$CLONEKV" dump /interop/
  kill9 "$kind-primary"
  check "clonekv get after failover" --expect hello 20 "$CLONEKV" get /interop/a
  check "clonekv set --wait after failover" 20 "$CLONEKV" set /interop/a2 after --wait
  check "clonekv get after failover (new key)" --expect after 20 "$CLONEKV" get /interop/a2
}

case_a() {
  case_begin a "clonekv CLI against the C pair (clonesrv6q -p / -b), with a failover"
  start_c_pair
  cli_case c
  case_end
}

case_b() {
  case_begin b "clonekv CLI against the Python pair (clonesrv6.py -p / -b), with a failover"
  start_py_pair
  cli_case py
  case_end
}

lib_case() {
  if [ "$HAVE_LIB_CLIENT" = 0 ]; then
    fail_step "$BIN/examples/interop_client not built: cargo build --release -p clonekv-zmq --examples"
    return 0
  fi
  check "interop_client set_confirmed + get" 40 "$TMP/bin/interop_client" "/interop/lib-$1" "v-$1" \
    tcp://localhost:5556 tcp://localhost:5566
}

case_c_c() {
  case_begin c-c "clonekv library (examples/interop_client) against the C pair"
  start_c_pair
  lib_case c
  case_end
}

case_c_py() {
  case_begin c-py "clonekv library (examples/interop_client) against the Python pair"
  start_py_pair
  lib_case py
  case_end
}

case_d() {
  local B=$ANCHORS/build
  case_begin d "C client (clonetool, clone.c) against a clonekvd pair"
  start_clonekvd_pair
  check_in "$B" "clonetool set" 20 ./clonetool set /interop/c v 0
  check_in "$B" "clonetool get" --expect /interop/c=v 20 ./clonetool -t /interop/ get /interop/c
  check "clonekv get of clonetool's key" --expect v 20 "$CLONEKV" get /interop/c
  check "clonekv set --wait" 20 "$CLONEKV" set /interop/d fromrust --wait
  check_in "$B" "clonetool get of clonekv's key" --expect /interop/d=fromrust 20 \
    ./clonetool -t /interop/ get /interop/d
  case_end
}

case_e() {
  case_begin e "Python agent (clone.py) against a clonekvd pair"
  start_clonekvd_pair
  check "clonekv set --wait" 20 "$CLONEKV" set /interop/fromrust r1 --wait
  check_in "$ANCHORS/py" "clone.py set + get of clonekv's key" --contains /interop/fromrust=r1 30 \
    "$PY" -W ignore "$TMP/clonepy_driver.py" /interop/frompy p1 /interop/fromrust r1
  check "clonekv get of clone.py's key" --expect p1 20 "$CLONEKV" get /interop/frompy
  case_end
}

case_f_c_primary() {
  local B=$ANCHORS/build
  case_begin f-c-primary "mixed pair: C primary + clonekvd backup; kill -9 the C primary"
  start c-primary "$B" ./clonesrv6q -p
  start clonekvd-backup "$TMP" "$CLONEKVD" --backup
  pair_up
  # Written with the C client: the clonekv CLI cannot sync from a C server (case a).
  check_in "$B" "clonetool set via the C primary" 20 ./clonetool set /interop/f1 before 0
  check_in "$B" "clonetool get" --expect /interop/f1=before 20 ./clonetool -t /interop/ get /interop/f1
  kill9 c-primary
  check "clonekv get via the clonekvd backup" --expect before 20 "$CLONEKV" get /interop/f1
  check "clonekv set --wait via the clonekvd backup" 20 "$CLONEKV" set /interop/f1b after --wait
  check "clonekv get via the clonekvd backup (new key)" --expect after 20 "$CLONEKV" get /interop/f1b
  case_end
}

case_f_clonekvd_primary() {
  local B=$ANCHORS/build
  case_begin f-clonekvd-primary "mixed pair: clonekvd primary + C backup; kill -9 clonekvd"
  start clonekvd-primary "$TMP" "$CLONEKVD"
  start c-backup "$B" ./clonesrv6q -b
  pair_up
  check "clonekv set --wait via the clonekvd primary" 20 "$CLONEKV" set /interop/f2 before --wait
  check "clonekv get" --expect before 20 "$CLONEKV" get /interop/f2
  kill9 clonekvd-primary
  # The C client first: it tells whether the C backup has the key, apart from clonekv.
  check_in "$B" "clonetool get via the C backup" --expect /interop/f2=before 25 \
    ./clonetool -w 15000 -t /interop/ get /interop/f2
  check "clonekv get via the C backup" --expect before 20 "$CLONEKV" get /interop/f2
  case_end
}

# ---- run --------------------------------------------------------------------------------

echo "interop: anchors $ANCHORS ($(sed -n 's/^zguide: //p' "$ANCHORS/BUILDINFO" 2>/dev/null | cut -c1-12))"
echo "interop: clonekv from $BIN; namespace $NS; logs in $TMP"
[ "$HAVE_LIB_CLIENT" = 1 ] || echo "interop: $BIN/examples/interop_client not built (cases c-*)"
wait_ports free || die "ports of the pair are in use inside the new namespace?"
for c in "${CASES[@]}"; do
  "case_${c//-/_}"
done

echo
echo "=== summary"
printf '%-20s %-5s %s\n' CASE RESULT "FIRST FAILURE"
for i in "${!CASE_NAMES[@]}"; do
  printf '%-20s %-5s %s\n' "${CASE_NAMES[$i]}" "${CASE_RESULTS[$i]}" "${CASE_NOTES[$i]}"
done
[ "$FAILED_ANY" = 0 ]
