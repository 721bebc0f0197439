#!/usr/bin/env bash
# The remote-build benchmark (docs/BENCHMARKS.md): a trivial build (`echo hello`) submitted
# beside node A and run on node B over loopback, side by side with the same commands in bash and
# with the build on this machine's embedded pool (`--local`). Both nodes allow the host sandbox,
# so what is measured is the pool's own cost (submit, placement, offer, source fetch, the
# worker's `peerbuild run`, events relayed, the signed result checked).
#   bench/remote.sh [RUNS]     (default 20; medians and quartiles are printed)
set -euo pipefail
source "$(dirname "$0")/pool-lib.sh"
runs=${1:-20}

host_only() { mkdir -p "$1"; printf '[sandbox]\ndefault = "host"\nallow = ["host"]\n' > "$1/config.toml"; }
host_only "$work/a"; host_only "$work/b"
start_node "$work/a" "" --label role=submitter
start_node "$work/b" "$(bootstrap_address "$work/a")" --label role=worker
await_peer "$work/a" "$work/b"
sleep 3

mkdir -p "$work/src"
printf 'version: 0.2\nphases:\n  build:\n    commands:\n      - echo hello\n' > "$work/src/buildspec.yml"
echo "one build, $runs runs each, alternating; $(nproc) cores"
python3 - "$pb" "$work" "$runs" <<'PY'
import json, statistics, subprocess, sys, time
pb, work, runs = sys.argv[1], sys.argv[2], int(sys.argv[3])
cases = {
    "bash -c 'echo hello'": ["bash", "-c", "echo hello"],
    "peerbuild run --local (embedded, host sandbox)": [pb, "--data-dir", f"{work}/a", "run", f"{work}/src", "--local", "--sandbox", "host", "--json"],
    "peerbuild run (remote: node A places it on node B)": [pb, "--data-dir", f"{work}/a", "run", f"{work}/src", "--require", "role=worker", "--json"],
}
times = {name: [] for name in cases}
for _ in range(runs):
    for name, command in cases.items():
        started = time.perf_counter()
        out = subprocess.run(command, capture_output=True, text=True)
        elapsed = (time.perf_counter() - started) * 1000
        if out.returncode != 0:
            sys.exit(f"{name} failed: {out.stdout}{out.stderr}")
        if "remote" in name:
            result = [json.loads(l) for l in out.stdout.splitlines() if '"build_finished"' in l][-1]
            assert result["result"]["peer"] != "", result
        times[name].append(elapsed)
for name, values in times.items():
    q = statistics.quantiles(values, n=4)
    print(f"{name}: median {statistics.median(values):.1f} ms (quartiles {q[0]:.1f}-{q[2]:.1f})")
PY
