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
# SETTLE=SECONDS (40) is the pause before each measured step; see settle() below.
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

# Each measured step starts SETTLE seconds after the one before, so all of them start on the
# same footing: ext4 looks past inodes freed in the last seconds when it allocates new ones
# (the baselines delete 15,000 files just before), and this machine's DAMON reclaim evicts
# idle page cache during a pause (the settled rsync reads its tree from disk, as the restore
# reads the holder's store).
settle() { sync; sleep "${SETTLE:-40}"; }
settle
bash "$shared/bench/baselines.sh" "$work/tree"
settle
# The baselines' rsync runs right after their tar|tar output is deleted; it is timed again here
# on the same footing as the restore below.
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
printf 'port = %s\naddress = 127.0.0.1\npid file = %s\nuse chroot = no\nuid = root\ngid = root\n[tree]\npath = %s\nread only = yes\n' \
  "$port" "$work/rsyncd.pid" "$work/tree" > "$work/rsyncd.conf"
rsync --daemon --config="$work/rsyncd.conf"
for _ in $(seq 50); do [ -s "$work/rsyncd.pid" ] && break; sleep 0.1; done
pids+=("$(cat "$work/rsyncd.pid")")
t=$(ms); rsync -a "rsync://127.0.0.1:$port/tree/" "$work/rs/"; echo "rsync daemon, loopback, full, settled: $(( $(ms) - t )) ms"
rm -rf "$work/rs"
settle

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
