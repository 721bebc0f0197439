#!/usr/bin/env bash
# The pool-cache benchmark (docs/BENCHMARKS.md): restoring the benchmark tree (15,000 small files
# and a 1 GiB file) from a peer over loopback, side by side with the shared baselines (tar|tar on
# one machine, an rsync daemon over loopback, full and unchanged).
#
# Two nodes on 127.0.0.1; node A imports the tree; node B fetches it from A through the blob
# protocol (`POST /v1/cache/fetch`, what a cache restore does on a miss) and exports it into a
# folder (`peerbuild cache export`, what a restore writes). Then B fetches again with everything
# already in its store ("unchanged").
# Needs tar, zstd, rsync and curl (apt-get install -y zstd rsync curl).
#   bench/pool-cache.sh [SCALE]     (SCALE 1.0 is the full 1.3 GiB tree; 0.1 for a quick run)
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
shared=${PEERBUILD_SHARED:-$here/../shared}
scale=${1:-1.0}
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

python3 "$shared/bench/make-tree.py" "$work/tree" --scale "$scale"
echo "tree: $(du -sh --apparent-size "$work/tree" | cut -f1), $(find "$work/tree" -type f | wc -l) files; $(nproc) cores"

start_node() { # DATA [BOOTSTRAP]
  local args=(--data-dir "$1" node --listen /ip4/127.0.0.1/tcp/0 --no-mdns --heartbeat-interval 1s)
  [ -n "${2:-}" ] && args+=(--bootstrap "$2")
  PEERBUILD_LOG=warn "$pb" "${args[@]}" 2>>"$work/nodes.log" &
  pids+=($!)
  for _ in $(seq 100); do [ -s "$1/node.json" ] && return 0; sleep 0.1; done
  echo "node on $1 did not start" >&2; cat "$work/nodes.log" >&2; exit 1
}
start_node "$work/a"
address=$(python3 -c "import json,sys; print(json.load(open(sys.argv[1]))['bootstrap_addresses'][0])" "$work/a/node.json")
start_node "$work/b" "$address"
digest=$("$pb" --data-dir "$work/a" cache import "$work/tree" 2>/dev/null)
# Both nodes connected and heard each other.
for _ in $(seq 100); do
  "$pb" --data-dir "$work/b" status --json | grep -q "$(python3 -c "import json,sys; print(json.load(open(sys.argv[1]))['peer_id'])" "$work/a/node.json")" && break
  sleep 0.2
done
sleep 2; sync

bash "$shared/bench/baselines.sh" "$work/tree"

fetch() {
  curl -sS --fail-with-body --unix-socket "$work/b/api.sock" -X POST \
    -H 'content-type: application/json' -d "{\"tree\":\"$digest\"}" http://node/v1/cache/fetch
}
sync
t=$(ms); out=$(fetch); fetched=$(( $(ms) - t ))
t=$(ms); "$pb" --data-dir "$work/b" cache export "$digest" "$work/out" >/dev/null; exported=$(( $(ms) - t ))
echo "peerbuild restore from a peer: $(( fetched + exported )) ms (fetch $fetched ms: $out; export $exported ms)"
diff -r --no-dereference "$work/tree" "$work/out" >/dev/null && echo "restored tree is identical"
t=$(ms); out=$(fetch); echo "peerbuild fetch again, unchanged: $(( $(ms) - t )) ms ($out)"
