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
source "$(dirname "$0")/pool-lib.sh"
shared=${PEERBUILD_SHARED:-$here/../shared}
scale=${1:-1.0}

python3 "$shared/bench/make-tree.py" "$work/tree" --scale "$scale"
echo "tree: $(du -sh --apparent-size "$work/tree" | cut -f1), $(find "$work/tree" -type f | wc -l) files; $(nproc) cores"

start_node "$work/a"
start_node "$work/b" "$(bootstrap_address "$work/a")"
digest=$("$pb" --data-dir "$work/a" cache import "$work/tree" 2>/dev/null)
await_peer "$work/b" "$work/a"
sleep 2; sync

bash "$shared/bench/baselines.sh" "$work/tree"

fetch() {
  curl -sS --fail-with-body --unix-socket "$work/b/api.sock" -X POST \
    -H 'content-type: application/json' -d "{\"tree\":\"$digest\"}" http://node/v1/cache/fetch
}
sync
t=$(ms); out=$(fetch) || { echo "fetch failed: $out" >&2; cat "$work/nodes.log" >&2; exit 1; }; fetched=$(( $(ms) - t ))
t=$(ms); "$pb" --data-dir "$work/b" cache export "$digest" "$work/out" >/dev/null; exported=$(( $(ms) - t ))
echo "peerbuild restore from a peer: $(( fetched + exported )) ms (fetch $fetched ms: $out; export $exported ms)"
diff -r --no-dereference "$work/tree" "$work/out" >/dev/null && echo "restored tree is identical"
t=$(ms); out=$(fetch); echo "peerbuild fetch again, unchanged: $(( $(ms) - t )) ms ($out)"
