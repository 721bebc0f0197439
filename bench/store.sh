#!/usr/bin/env bash
# The store benchmark (docs/BENCHMARKS.md): `peerbuild cache import/export` of the benchmark
# tree (15,000 small files and a 1 GiB file) side by side with the shared baselines (tar|tar,
# tar|zstd -1, rsync). Needs tar, zstd and rsync (apt-get install -y zstd rsync).
#   bench/store.sh [SCALE]        (SCALE 1.0 is the full 1.3 GiB tree; 0.1 for a quick run)
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
shared=${PEERBUILD_SHARED:-$here/../shared}
scale=${1:-1.0}
work=$(mktemp -d "${TMPDIR:-/tmp}/pb-bench-store.XXXXXX")
trap 'rm -rf "$work"' EXIT
target=${CARGO_TARGET_DIR:-$here/target}
cargo build --quiet --release -p node --manifest-path "$here/Cargo.toml"
pb="$target/release/peerbuild"
export PEERBUILD_DATA_DIR="$work/data"
ms() { date +%s%3N; }
field() { python3 -c "import json,sys; d=json.load(sys.stdin); print(eval('d' + sys.argv[1]))" "$1"; }

python3 "$shared/bench/make-tree.py" "$work/tree" --scale "$scale"
echo "tree: $(du -sh --apparent-size "$work/tree" | cut -f1), $(find "$work/tree" -type f | wc -l) files; $(nproc) cores"
sleep 2 # the stat cache does not trust files changed in the last two seconds
sync
bash "$shared/bench/baselines.sh" "$work/tree"

t=$(ms); out=$("$pb" cache import "$work/tree" --json); echo "peerbuild cache import (empty store): $(( $(ms) - t )) ms"
digest=$(echo "$out" | field "['digest']")
t=$(ms); "$pb" cache import "$work/tree" >/dev/null 2>&1; echo "peerbuild cache import (unchanged, again): $(( $(ms) - t )) ms"
# Export against tar|tar, alternating (EXPORT_RUNS pairs, default 3), so both see the same
# page-cache and disk conditions; each run writes a fresh folder, removed and synced after.
# The two take turns at going first: creating a file costs more while many were deleted in
# the last minutes (ext4 without a journal steps over each recently deleted inode to find a
# free one), so whichever runs second in a pair starts with one more deleted tree.
tar_run() {
  sync; mkdir "$work/tarout"; t=$(ms); tar cf - -C "$work/tree" . | tar xf - -C "$work/tarout"; echo "tar|tar (run $run): $(( $(ms) - t )) ms"
  rm -rf "$work/tarout"; sync
}
export_run() {
  sync; t=$(ms); "$pb" cache export "$digest" "$work/out" >/dev/null; echo "peerbuild cache export (run $run): $(( $(ms) - t )) ms"
  if [ "$run" = 1 ]; then
    diff -r --no-dereference "$work/tree" "$work/out" >/dev/null && echo "export is identical to the tree"
  fi
  rm -rf "$work/out"; sync
}
for run in $(seq "${EXPORT_RUNS:-3}"); do
  if [ $(( run % 2 )) = 1 ]; then tar_run; export_run; else export_run; tar_run; fi
done

python3 "$shared/bench/make-tree.py" "$work/tree" --mutate 1
sleep 2
total=$("$pb" cache stat --json | field "['logical_bytes']")
out=$("$pb" cache import "$work/tree" --json)
new=$(echo "$out" | field "['imported']['new_bytes']")
bytes=$(echo "$out" | field "['imported']['bytes']")
echo "after changing 1% of the files: $new new stored bytes = $(python3 -c "print(f'{100*$new/$bytes:.3f}')")% of the tree"
"$pb" cache stat
