#!/usr/bin/env bash
# The pool-cache benchmark (docs/BENCHMARKS.md): restoring the benchmark tree (15,000 small files
# and a 1 GiB file) from a peer over loopback, side by side with tar|tar on one machine and an
# rsync daemon over loopback, all three measured in one run on the same footing.
#
# Three nodes on 127.0.0.1; node A imports the tree; on nodes B and C, `peerbuild cache export`
# finds the tree missing and has its node fetch it from A through the blob protocol, writing each
# file and chunk into the folder as it arrives (what a cache restore does on a miss). Then B
# fetches again with everything already in its store ("unchanged"). The shared baselines.sh runs
# last, for its own figures.
#
# Same footing: ext4 without a journal (this machine's root) will not reuse an inode freed in the
# last minute, or five when its inode table block is still dirty, and scans past every such inode
# on each file it creates: after a tree of 15,000 files is deleted, making another takes up to
# twice as long for several minutes. So nothing is deleted between the measured steps (each
# writes into a folder of its own, removed at the end), and the run starts once QUIET seconds
# (370) have passed since the last run of this script deleted its folders.
# Needs tar, zstd, rsync and curl (apt-get install -y zstd rsync curl).
#   bench/pool-cache.sh [SCALE]     (SCALE 1.0 is the full 1.3 GiB tree; 0.1 for a quick run)
set -euo pipefail
source "$(dirname "$0")/pool-lib.sh"
shared=${PEERBUILD_SHARED:-$here/../shared}
scale=${1:-1.0}
stamp=${TMPDIR:-/tmp}/peerbuild-bench-pool-cache.deleted
# This run's folders are deleted on exit: the next run waits for that to be forgotten.
trap 'cleanup; date +%s > "$stamp"' EXIT

python3 "$shared/bench/make-tree.py" "$work/tree" --scale "$scale"
echo "tree: $(du -sh --apparent-size "$work/tree" | cut -f1), $(find "$work/tree" -type f | wc -l) files; $(nproc) cores"

start_node "$work/a"
start_node "$work/b" "$(bootstrap_address "$work/a")"
start_node "$work/c" "$(bootstrap_address "$work/a")"
digest=$("$pb" --data-dir "$work/a" cache import "$work/tree" 2>/dev/null)
await_peer "$work/b" "$work/a"
await_peer "$work/c" "$work/a"

if [[ $(cat "$stamp" 2>/dev/null) =~ ^[0-9]+$ ]]; then
  wait=$(( $(cat "$stamp") + ${QUIET:-370} - $(date +%s) ))
  if [ "$wait" -gt 0 ]; then echo "waiting ${wait}s for the last run's deletions to age"; sleep "$wait"; fi
fi
step() { sync; sleep 5; }

# Later steps are slower on this machine whatever they are (four tar|tar copies in a row took
# 4.9, 6.6, 7.1 and 8.1 s), so each way of copying runs twice, in mirrored order (tar|tar,
# rsync, restore, restore, rsync, tar|tar), and is compared by the mean of its two times: a
# drift that grows steadily over the run weighs on all three alike.
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
printf 'port = %s\naddress = 127.0.0.1\npid file = %s\nuse chroot = no\nuid = root\ngid = root\n[tree]\npath = %s\nread only = yes\n' \
  "$port" "$work/rsyncd.pid" "$work/tree" > "$work/rsyncd.conf"
rsync --daemon --config="$work/rsyncd.conf"
for _ in $(seq 50); do [ -s "$work/rsyncd.pid" ] && break; sleep 0.1; done
pids+=("$(cat "$work/rsyncd.pid")")

declare -A took
copy_tar() {
  mkdir "$work/tar$1"; local t; t=$(ms)
  tar cf - -C "$work/tree" . | tar xf - -C "$work/tar$1"
  took[tar$1]=$(( $(ms) - t )); echo "tar|tar ($1): ${took[tar$1]} ms"
}
copy_rsync() {
  local t; t=$(ms); rsync -a "rsync://127.0.0.1:$port/tree/" "$work/rs$1/"
  took[rsync$1]=$(( $(ms) - t )); echo "rsync daemon, loopback, full ($1): ${took[rsync$1]} ms"
}
# Node B, then node C, restores the tree into a folder: B from node A; C from A and B (B holds
# the tree by then, and says so).
restore() {
  local node=$2 t out; t=$(ms)
  out=$("$pb" --data-dir "$work/$node" cache export --json "$digest" "$work/out$1" 2>/dev/null) \
    || { echo "restore failed: $out" >&2; cat "$work/nodes.log" >&2; exit 1; }
  took[restore$1]=$(( $(ms) - t ))
  echo "peerbuild restore from a peer ($1): ${took[restore$1]} ms ($out)"
  if ! diff -r --no-dereference "$work/tree" "$work/out$1" >/dev/null; then
    echo "restore $1: the restored tree differs from the tree" >&2; exit 1
  fi
  echo "restored tree is identical"
}
step; copy_tar 1
step; copy_rsync 1
step; restore 1 b
step; restore 2 c
step; copy_rsync 2
step; copy_tar 2

mean() { echo $(( (took[${1}1] + took[${1}2]) / 2 )); }
tar_ms=$(mean tar); rsync_ms=$(mean rsync); restore_ms=$(mean restore)
echo "means: restore $restore_ms ms, tar|tar $tar_ms ms, rsync $rsync_ms ms"
python3 -c "import sys; r,t,s=map(int,sys.argv[1:]); print(f'restore against tar|tar: {r/t:.2f}x the time (goal <= 1); rsync against restore: {s/r:.2f}x (goal >= 1.5)')" \
  "$restore_ms" "$tar_ms" "$rsync_ms"

t=$(ms); out=$(curl -sS --fail-with-body --unix-socket "$work/b/api.sock" -X POST \
  -H 'content-type: application/json' -d "{\"tree\":\"$digest\"}" http://node/v1/cache/fetch)
echo "peerbuild fetch again, unchanged: $(( $(ms) - t )) ms ($out)"

step
echo "baselines.sh, after the steps above:"
bash "$shared/bench/baselines.sh" "$work/tree"
