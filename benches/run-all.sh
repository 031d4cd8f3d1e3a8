#!/usr/bin/env bash
# Regenerate every benchmark result JSON and plot of docs/benchmarks*.md, medians of 3 runs.
#
#   benches/run-all.sh [all|compare|sweep|replay|plots]    (default: all)
#
# Environment: RUNS (default 3), THREADS (event/query threads, default: nproc), WORKERS_REPLAY
# (publishers of the replay comparison, default 2). Results go to benches/results/ named by the
# commit measured, plots to docs/img/. On the 2-core dev machine, loaded, `all` took about 50
# minutes (sweep ~32, compare ~14, replay ~3); run it on a quiet machine.
set -euo pipefail
cd "$(dirname "$0")/.."

what=${1:-all}
RUNS=${RUNS:-3}
THREADS=${THREADS:-$(nproc)}
WORKERS_REPLAY=${WORKERS_REPLAY:-2}
COMMIT=$(git rev-parse --short HEAD)
if ! git diff --quiet HEAD -- engine persistence benches/src; then
    COMMIT="$COMMIT-dirty"
fi
OUT=benches/results
B=target/release
COMPARE=$OUT/compare-all-$COMMIT
SWEEP=$OUT/sweep-$COMMIT
REPLAY=$OUT/replay-compare-$COMMIT

machine() {
    echo "# $(date -u +%FT%TZ) commit $COMMIT"
    echo "# nproc=$(nproc) cpu=\"$(lscpu | sed -n 's/^Model name: *//p' | head -1)\" mem=$(free -g | awk '/^Mem:/{print $2}')GiB load=\"$(cut -d' ' -f1-3 /proc/loadavg)\""
}

cargo build --release --locked -p kvindex-benches --bins

run_compare() {
    { machine; "$B/mooncake-replay" --compare --backends kvindex,dynamo-crtc,dynamo-positional \
        --event-threads "$THREADS" --query-threads "$THREADS" --runs "$RUNS" \
        --json-out "$COMPARE.json"; } | tee "$COMPARE.txt"
}

run_sweep() {
    { machine; "$B/mooncake-replay" --sweep --backends kvindex,dynamo-crtc,dynamo-positional \
        --event-threads "$THREADS" --runs "$RUNS" \
        --rates 5000,10000,20000,40000,80000,160000,320000 --point-secs 3 --warm-fraction 0.5 \
        --json-out "$SWEEP.json"; } | tee "$SWEEP.txt"
}

run_replay() {
    { machine; "$B/replay-compare" --workers "$WORKERS_REPLAY" --reps "$RUNS" \
        --event-threads "$THREADS" --json-out "$REPLAY.json"; } | tee "$REPLAY.txt"
}

run_plots() {
    # The files of this commit when they exist, else the newest of each kind.
    args=()
    [ -f "$COMPARE.json" ] && args+=(--compare "$COMPARE.json")
    [ -f "$SWEEP.json" ] && args+=(--sweep "$SWEEP.json")
    [ -f "$REPLAY.json" ] && args+=(--replay "$REPLAY.json")
    "$B/plot-results" "${args[@]}" --out docs/img
}

case "$what" in
    all) run_compare; run_sweep; run_replay; run_plots ;;
    compare) run_compare ;;
    sweep) run_sweep ;;
    replay) run_replay ;;
    plots) run_plots ;;
    *) echo "usage: $0 [all|compare|sweep|replay|plots]" >&2; exit 64 ;;
esac
