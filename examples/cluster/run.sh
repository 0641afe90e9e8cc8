#!/usr/bin/env bash
# Two regions on one machine: a NATS server per region joined by a gateway (a two-cluster
# JetStream supercluster) and a roomcast broker per region. A subscriber on the broker of
# region B receives events published in region A over WebSocket, over HTTP and straight over
# NATS; then a subscriber of region B's broker survives that broker's death: it moves to
# region A and recovers what it missed from the room's stream, printing every event once.
#
#   examples/cluster/run.sh          # runs the demo and exits
#   examples/cluster/run.sh --keep   # leaves everything running until Ctrl-C
#
# Ports (loopback): NATS 14222/14223, monitoring 18222/18223, gateways 17222/17223, cluster
# routes 16222/16223, brokers 14433 (region A) and 14434 (region B).
set -euo pipefail
cd "$(dirname "$0")/../.."
here=examples/cluster
command -v nats-server >/dev/null || { echo "install nats-server: apt-get install -y nats-server" >&2; exit 1; }

cargo build -q -p roomcast-broker --bin roomcast --example nats_publish
cargo build -q -p roomcast-client --bin roomcast-cli
bin=target/debug
logs=$(mktemp -d)
pids=()
cleanup() { for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done; }
trap cleanup EXIT

export ROOMCAST_JS_STORE_A="$logs/js-a" ROOMCAST_JS_STORE_B="$logs/js-b"
nats-server -c $here/region-a.conf -l "$logs/nats-a.log" & pids+=($!)
nats-server -c $here/region-b.conf -l "$logs/nats-b.log" & pids+=($!)

export ROOMCAST_API_KEY=demo-key
$bin/roomcast serve --listen 127.0.0.1:14433 --nats nats://127.0.0.1:14222 --node-id edge-a-1 \
  2>"$logs/broker-a.log" & pids+=($!)
$bin/roomcast serve --listen 127.0.0.1:14434 --nats nats://127.0.0.1:14223 --node-id edge-b-1 \
  2>"$logs/broker-b.log" & broker_b=$!
pids+=($broker_b)

ready() { # wait until a broker's /readyz says ready (connected to its region's NATS)
  for _ in $(seq 100); do
    curl -fsS "http://$1/readyz" >/dev/null 2>&1 && return 0
    sleep 0.1
  done
  echo "broker $1 not ready; logs in $logs" >&2; exit 1
}
ready 127.0.0.1:14433
ready 127.0.0.1:14434
# Each region needs its outbound gateway connection to the other before events cross; the
# side that started first retries its connection after a delay.
gateway_up() { # monitoring port, remote gateway name
  curl -fsS "http://127.0.0.1:$1/gatewayz" | tr -d ' \n' |
    grep -q "\"outbound_gateways\":{\"$2\":{\"configured\":true,\"connection\""
}
for _ in $(seq 100); do
  gateway_up 18222 region-b && gateway_up 18223 region-a && break
  sleep 0.1
done
gateway_up 18222 region-b && gateway_up 18223 region-a || { echo "gateways not connected; logs in $logs" >&2; exit 1; }
echo "both regions up, gateways connected both ways"

# A subscriber in region B; it exits after three events.
$bin/roomcast-cli sub ws://127.0.0.1:14434/ws orders:1042 --count 3 & sub=$!
pids+=($sub)
publish_http() {
  curl -fsS http://127.0.0.1:14433/api/publish -H "Authorization: Bearer $ROOMCAST_API_KEY" \
    -H 'Content-Type: application/json' -d "$1"
}
# Wait until node B has subscribed to the room's subject in region B (interest follows the
# first local subscriber).
for _ in $(seq 100); do
  curl -fsS 'http://127.0.0.1:18223/connz?subs=1' | grep -q '"roomcast.SEQ.orders.1042"' && break
  sleep 0.1
done
echo "publishing in region A: HTTP, WebSocket, raw NATS"
# The first publish creates the namespace's stream; the supercluster may still be electing
# its JetStream leader right after start, so retry until it is stored.
for _ in $(seq 50); do
  publish_http '{"room":"orders:1042","event":"status","data":{"state":"packed","via":"http"}}' && break
  sleep 0.2
done; echo
$bin/roomcast-cli pub ws://127.0.0.1:14433/ws orders:1042 status '{"state":"shipped","via":"websocket"}'
$bin/examples/nats_publish nats://127.0.0.1:14222 orders:1042 status
wait $sub && echo "region B received all three events"

echo "a subscriber of region B's broker (falling back to region A's) while region B's broker dies"
$bin/roomcast-cli sub ws://127.0.0.1:14434/ws,ws://127.0.0.1:14433/ws bids:lot-7 --count 6 & sub=$!
pids+=($sub)
for _ in $(seq 100); do
  curl -fsS 'http://127.0.0.1:18223/connz?subs=1' | grep -q '"roomcast.SEQ.bids.lot-7"' && break
  sleep 0.1
done
for n in 1 2 3; do
  publish_http "{\"room\":\"bids:lot-7\",\"event\":\"bid\",\"data\":{\"n\":$n}}"; echo
done
sleep 0.5
kill -9 "$broker_b"; echo "region B's broker killed"
for n in 4 5 6; do
  publish_http "{\"room\":\"bids:lot-7\",\"event\":\"bid\",\"data\":{\"n\":$n}}"; echo
done
wait $sub && echo "the subscriber printed all six bids once, in order, across the move"

if [[ ${1:-} == --keep ]]; then
  echo "running; logs in $logs; Ctrl-C to stop"
  wait
fi
