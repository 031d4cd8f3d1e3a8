#!/usr/bin/env bash
# Service load tests (docs/benchmarks-service.md): build the release binaries, then run
# `service-load` (kvindex under --fsync never / interval:10 / always, and Dynamo 1.6.1's
# standalone indexer when installed), medians of 4 runs (RUNS=n to change; with 4 targets each
# one goes first once). Writes
#   benches/results/service-<commit>.json   (every run, summaries, ratios, machine, command)
#   benches/results/service-<commit>.txt    (the console output)
#   docs/img/service-query-rps.svg, service-query-p99.svg, service-ingest.svg
# Extra arguments go to service-load (e.g. --limit-requests 500 --runs 5).
# Dynamo: python3 -m venv /tmp/dynvenv-load && /tmp/dynvenv-load/bin/pip install ai-dynamo-runtime==1.6.1
# (or DYNAMO_PYTHON=/path/to/python); skipped with a note when absent.
set -euo pipefail
cd "$(dirname "$0")/.."

dyn_py=${DYNAMO_PYTHON:-/tmp/dynvenv-load/bin/python}
cargo build --release --locked -p kvindex-server --bin kvindex
cargo build --release --locked -p kvindex-benches --bin service-load

commit=$(git rev-parse --short HEAD)
out=benches/results/service-$commit
args=(--runs "${RUNS:-4}" --json-out "$out.json" --plots-dir docs/img)
if [ -x "$dyn_py" ]; then
  args+=(--dynamo-python "$dyn_py")
else
  echo "note: $dyn_py not found: Dynamo is skipped" >&2
fi
{
  echo "machine: nproc=$(nproc) $(lscpu | sed -n 's/^Model name: *//p') mem=$(free -g | awk '/^Mem:/{print $2}')G commit=$commit"
  echo "command: target/release/service-load ${args[*]} $*"
  target/release/service-load "${args[@]}" "$@" 2>&1
} | tee "$out.txt"
