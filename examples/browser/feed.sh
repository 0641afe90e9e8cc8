#!/usr/bin/env bash
# Feeds the live board (examples/browser) with random-walk prices and orders through
# roomcast-cli, one publish per process.
#
#   roomcast serve --dev-ui examples/browser --volatile-namespaces ticker     # terminal 1
#   examples/browser/feed.sh [ws://127.0.0.1:4433/ws]                          # terminal 2
#
# roomcast-cli is taken from $ROOMCAST_CLI, the PATH, or target/{debug,release}.
set -euo pipefail
cd "$(dirname "$0")/../.."
URL=${1:-ws://127.0.0.1:4433/ws}
COUNT=${FEED_COUNT:-0} # rounds to run; 0 = until Ctrl-C
CLI=${ROOMCAST_CLI:-$(command -v roomcast-cli || true)}
for candidate in target/debug/roomcast-cli target/release/roomcast-cli; do
  [[ -n $CLI ]] && break
  [[ -x $candidate ]] && CLI=$candidate
done
if [[ -z $CLI ]]; then
  echo "roomcast-cli not found: cargo build -p roomcast-client --bin roomcast-cli" >&2
  exit 1
fi

symbols=(BTC-EUR ETH-EUR SOL-EUR ADA-EUR)
prices=(6425000 318000 14250 46) # in cents
steps=(2500 300 40 1)
statuses=(partial filled filled cancelled)
orders=()

pub() { "$CLI" pub "$URL" "$@" >/dev/null 2>&1 || echo "publish to $1 failed" >&2; }
money() { printf '%d.%02d' $(($1 / 100)) $(($1 % 100)); }

round=0
while ((COUNT == 0 || round < COUNT)); do
  round=$((round + 1))
  for i in "${!symbols[@]}"; do
    step=${steps[$i]}
    prices[$i]=$((prices[i] + (RANDOM % (2 * step + 1)) - step))
    ((prices[i] < 1)) && prices[$i]=1
    p=${prices[$i]}
    spread=$((step / 2 + 1))
    pub "ticker:${symbols[$i]}" price \
      "{\"last\":$(money "$p"),\"bid\":$(money $((p - spread))),\"ask\":$(money $((p + spread))),\"ts\":$(date +%s%3N)}" &
  done
  if ((round % 3 == 1)); then
    i=$((RANDOM % ${#symbols[@]}))
    id="O-$((1000 + round))"
    side=$([[ $((RANDOM % 2)) == 0 ]] && echo buy || echo sell)
    qty=$((RANDOM % 400 + 10))
    pub orders:board new \
      "{\"id\":\"$id\",\"symbol\":\"${symbols[$i]}\",\"side\":\"$side\",\"qty\":$(money "$qty"),\"price\":$(money "${prices[$i]}")}" &
    orders+=("$id")
  elif ((${#orders[@]} > 0)); then
    n=$((RANDOM % ${#orders[@]}))
    pub orders:board status "{\"id\":\"${orders[$n]}\",\"status\":\"${statuses[$((RANDOM % 4))]}\"}" &
  fi
  wait
  sleep "${FEED_INTERVAL:-0.4}"
done
