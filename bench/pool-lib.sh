# Helpers the pool benchmarks source: a scratch folder cleaned up on exit with every node they
# started, the release binary, and `start_node DATA [BOOTSTRAP] [NODE FLAGS...]` (loopback, no
# mDNS, 1 s heartbeats; returns once node.json is written).
here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
work=$(mktemp -d "${TMPDIR:-/tmp}/pb-bench-pool.XXXXXX")
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
target=${CARGO_TARGET_DIR:-$here/target}
cargo build --quiet --release -p node --manifest-path "$here/Cargo.toml"
pb="$target/release/peerbuild"
ms() { date +%s%3N; }
node_field() { python3 -c "import json,sys; print(json.load(open(sys.argv[1]))[sys.argv[2]])" "$1/node.json" "$2"; }
bootstrap_address() { python3 -c "import json,sys; print(json.load(open(sys.argv[1]))['bootstrap_addresses'][0])" "$1/node.json"; }

start_node() {
  local data=$1 bootstrap=${2:-}
  shift 2 || shift $#
  local args=(--data-dir "$data" node --listen /ip4/127.0.0.1/tcp/0 --no-mdns --heartbeat-interval 1s "$@")
  [ -n "$bootstrap" ] && args+=(--bootstrap "$bootstrap")
  PEERBUILD_LOG=${PEERBUILD_LOG:-warn} "$pb" "${args[@]}" 2>>"$work/nodes.log" &
  pids+=($!)
  for _ in $(seq 100); do [ -s "$data/node.json" ] && return 0; sleep 0.1; done
  echo "node on $data did not start" >&2; cat "$work/nodes.log" >&2; exit 1
}

# Waits until node DATA_A has heard node DATA_B's heartbeat.
await_peer() {
  local peer; peer=$(node_field "$2" peer_id)
  for _ in $(seq 150); do
    "$pb" --data-dir "$1" status --json | grep -q "\"peer_id\":\"$peer\"" && return 0
    sleep 0.2
  done
  echo "node $1 never heard $2" >&2; exit 1
}
