#!/usr/bin/env bash
# Two regions on one machine: a NATS server per region joined by a gateway (a two-cluster
# supercluster) and a roomcast broker per region. A subscriber on the broker of region B
# receives events published in region A over WebSocket, over HTTP and straight over NATS.
#
#   examples/cluster/run.sh          # runs the demo and exits
#   examples/cluster/run.sh --keep   # leaves everything running until Ctrl-C
#
# Ports (loopback): NATS 14222/14223, monitoring 18222/18223, gateways 17222/17223,
# brokers 14433 (region A) and 14434 (region B).
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

nats-server -c $here/region-a.conf -l "$logs/nats-a.log" & pids+=($!)
nats-server -c $here/region-b.conf -l "$logs/nats-b.log" & pids+=($!)

export ROOMCAST_API_KEY=demo-key
$bin/roomcast serve --listen 127.0.0.1:14433 --nats nats://127.0.0.1:14222 --node-id edge-a-1 \
  2>"$logs/broker-a.log" & pids+=($!)
$bin/roomcast serve --listen 127.0.0.1:14434 --nats nats://127.0.0.1:14223 --node-id edge-b-1 \
  2>"$logs/broker-b.log" & pids+=($!)

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
  curl -fsS 'http://127.0.0.1:18223/connz?subs=1' | grep -q '"roomcast.orders.1042"' && break
  sleep 0.1
done
echo "publishing in region A: HTTP, WebSocket, raw NATS"
publish_http '{"room":"orders:1042","event":"status","data":{"state":"packed","via":"http"}}'; echo
$bin/roomcast-cli pub ws://127.0.0.1:14433/ws orders:1042 status '{"state":"shipped","via":"websocket"}'
$bin/examples/nats_publish nats://127.0.0.1:14222 orders:1042 status
wait $sub && echo "region B received all three events"

if [[ ${1:-} == --keep ]]; then
  echo "running; logs in $logs; Ctrl-C to stop"
  wait
fi
