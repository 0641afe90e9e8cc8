# Shared by the scripts/bench-* runners (sourced, not run): building, a broker on a free port,
# tagging and appending results, running limit-ref's matching scenario.
#
# Results: roomcast's JSON lines go to target/bench/results.jsonl, tagged with "label",
# "commit" (git rev-parse --short HEAD) and "dirty" (uncommitted changes under broker/,
# protocol/ or benches/); limit-ref's go to target/bench/limit-ref.jsonl with the same
# "label", so scripts/bench-plot can pair them.
#
# Environment: BENCH_RESULTS and BENCH_LIMIT_OUT (other files for the two, e.g. for trial runs;
# pass the same to bench-plot as --results/--limit-ref), LIMIT_REF (default ../shared/limit-ref; "none" to skip it), BENCH_NO_BUILD=1
# (skip cargo build, as bench-all does after building once), BROKER_ARGS (extra flags for
# `roomcast serve`).

set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
mkdir -p target/bench
RESULTS=${BENCH_RESULTS:-$PWD/target/bench/results.jsonl}
LIMIT_OUT=${BENCH_LIMIT_OUT:-$PWD/target/bench/limit-ref.jsonl}
LIMIT_REF=${LIMIT_REF:-../shared/limit-ref}
COMMIT=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
if git diff --quiet HEAD -- broker protocol benches 2>/dev/null; then DIRTY=false; else DIRTY=true; fi
BROKER=
URL=

build() {
  if [ "${BENCH_NO_BUILD:-0}" != 1 ]; then
    cargo build --release -q -p roomcast-broker -p roomcast-bench
  fi
}

# start_broker [serve flags...]: a broker on 127.0.0.1:0; sets BROKER (pid) and URL.
start_broker() {
  local log=target/bench/broker.log
  # Emptied here, not by the background redirection below: that one may run after the first
  # grep, which would then find the previous broker's address.
  : > "$log"
  # shellcheck disable=SC2086
  ROOMCAST_LOG=${ROOMCAST_LOG:-info} target/release/roomcast serve --listen 127.0.0.1:0 \
    ${BROKER_ARGS:-} "$@" > "$log" 2>&1 &
  BROKER=$!
  for _ in $(seq 50); do grep -q 'listening' "$log" && break; sleep 0.1; done
  local addr
  addr=$(sed -n 's/.*addr=\([0-9.:]*\).*/\1/p' "$log" | head -1)
  if [ -z "$addr" ]; then
    echo "broker did not start:" >&2; cat "$log" >&2; exit 1
  fi
  URL="ws://$addr/ws"
}

stop_broker() {
  if [ -n "$BROKER" ]; then
    kill "$BROKER" 2>/dev/null || true
    wait "$BROKER" 2>/dev/null || true
    BROKER=
  fi
}
trap stop_broker EXIT

# run_roomcast LABEL SCENARIO [args...]: roomcast-bench against the running broker, JSON line
# tagged and appended to $RESULTS (and echoed).
run_roomcast() {
  local label=$1 scenario=$2; shift 2
  echo "== roomcast: $scenario ($label), broker pid $BROKER at $URL" >&2
  target/release/roomcast-bench "$scenario" --url "$URL" --broker-pid "$BROKER" --json \
    --tag label="$label" --tag commit="$COMMIT" --tag dirty="$DIRTY" "$@" | tee -a "$RESULTS"
}

# run_limit_ref LABEL SCENARIO [loadgen args...]: limit-ref's bench.sh, its JSON line appended to
# $LIMIT_OUT under the same label. Pass CONNS in the environment for scenario C.
run_limit_ref() {
  local label=$1 scenario=$2; shift 2
  if [ "$LIMIT_REF" = none ]; then
    echo "== limit-ref skipped (LIMIT_REF=none)" >&2; return 0
  fi
  if [ ! -x "$LIMIT_REF/bench.sh" ]; then
    echo "== limit-ref not found at $LIMIT_REF: no side-by-side figure" >&2; return 0
  fi
  echo "== limit-ref: $scenario ($label)" >&2
  sleep 1 # let the sockets of the roomcast run close
  OUT="$LIMIT_OUT" "$LIMIT_REF/bench.sh" "$scenario" "$@" --label "$label"
  tail -n 1 "$LIMIT_OUT"
}
