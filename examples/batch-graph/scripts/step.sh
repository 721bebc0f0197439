#!/bin/sh
# One step of the example batch: lint, build TARGET, or package.
set -eu
mkdir -p out
case "$1" in
  lint) echo "checking scripts"; sh -n scripts/step.sh; echo "lint ok" > out/lint.txt ;;
  build) sleep 1; echo "built $2 at $(date +%s)" > "out/$2.txt"; cat "out/$2.txt" ;;
  package) tar -cf out/package.tar scripts buildspec.yml; echo "packaged $(tar -tf out/package.tar | wc -l) files" ;;
  *) echo "unknown step $1" >&2; exit 2 ;;
esac
