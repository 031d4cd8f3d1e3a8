#!/usr/bin/env bash
# A/B comparison of two kvindex builds on the reference workload (docs/benchmarks.md, "A/B
# comparisons of two commits"). A shared VM drifts by ±15 % between minutes, more than most
# single changes are worth, so the two builds run alternately (A B, B A, A B, ...) in single-run
# child processes and the medians over all pairs are compared: slow minutes hit both sides.
#
# usage: benches/ab-compare.sh [-n PAIRS] REV_OR_BINARY_A REV_OR_BINARY_B [mooncake-replay args...]
#   A side given as a path to an executable is used as is; otherwise it is a git revision,
#   checked out in a worktree under target/ab/ and built there (release, own target directory).
#   Default: 5 pairs, `--phases query` (ingest, then queries), 2 event threads, 2 query threads.
# example: benches/ab-compare.sh -n 6 HEAD~1 HEAD --phases ingest
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD

pairs=5
if [ "${1:-}" = "-n" ]; then
  pairs=$2
  shift 2
fi
if [ $# -lt 2 ]; then
  sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//' >&2
  exit 2
fi
side_a=$1
side_b=$2
shift 2
extra=("$@")
if [ ${#extra[@]} -eq 0 ]; then
  extra=(--phases query) # the query phase starts with the ingest phase
fi
trace=${TRACE:-$root/../shared/data/traces/conversation_trace.jsonl}

# Print the path of a mooncake-replay binary for a path or a revision (built when needed).
binary_for() {
  local spec=$1
  if [ -x "$spec" ] && [ -f "$spec" ]; then
    echo "$spec"
    return
  fi
  local rev
  rev=$(git rev-parse --short "$spec")
  local dir=$root/target/ab/$rev
  if [ ! -x "$dir/target/release/mooncake-replay" ]; then
    if [ ! -d "$dir" ]; then
      git worktree add -f --detach "$dir" "$rev" >&2
    fi
    (cd "$dir" && cargo build --release -p kvindex-benches --bin mooncake-replay >&2)
  fi
  echo "$dir/target/release/mooncake-replay"
}

bin_a=$(binary_for "$side_a")
bin_b=$(binary_for "$side_b")
log=$(mktemp)
run_out=$(mktemp)
trap 'rm -f "$log" "$run_out"' EXIT

echo "machine: nproc=$(nproc) $(lscpu | sed -n 's/^Model name: *//p') A=$side_a ($bin_a) B=$side_b ($bin_b)"
echo "command: mooncake-replay --backend kvindex --runs 1 --event-threads 2 --query-threads 2 ${extra[*]}, $pairs pairs"
for i in $(seq 1 "$pairs"); do
  # A B, then B A: each side runs first as often as the other (on the shared VM, whichever
  # ran first in a pair was ~30 % faster in some comparisons, never in an A/A run).
  order="A B"
  [ $((i % 2)) -eq 0 ] && order="B A"
  for side in $order; do
    bin=$bin_a
    [ "$side" = B ] && bin=$bin_b
    if ! "$bin" --backend kvindex --trace "$trace" --runs 1 --event-threads 2 --query-threads 2 \
      "${extra[@]}" >"$run_out" 2>&1; then
      echo "run $i of side $side failed:" >&2
      cat "$run_out" >&2
      exit 1
    fi
    awk -F'  +' -v side="$side" '/^  [a-z]/ && $3 ~ /^[0-9.]+[kM]? / {
      split($3, f, " ")
      v = f[1]
      mult = 1
      if (v ~ /k$/) mult = 1000
      if (v ~ /M$/) mult = 1000000
      sub(/[kM]$/, "", v)
      print side "|" $2 "|" v * mult
    }' "$run_out" >>"$log"
  done
  echo "pair $i/$pairs done" >&2
done

# Medians per side and metric, and B/A.
median() { sort -g | awk '{v[NR]=$1} END{if (NR%2) print v[(NR+1)/2]; else print (v[NR/2]+v[NR/2+1])/2}'; }
printf '%-28s %14s %14s %8s\n' metric "A median" "B median" "B/A"
cut -d'|' -f2 "$log" | awk '!seen[$0]++' | while read -r name; do
  a=$(awk -F'|' -v n="$name" '$1=="A" && $2==n {print $3}' "$log" | median)
  b=$(awk -F'|' -v n="$name" '$1=="B" && $2==n {print $3}' "$log" | median)
  ratio=$(awk -v a="$a" -v b="$b" 'BEGIN{if (a>0) printf "%.3f", b/a; else print "-"}')
  printf '%-28s %14s %14s %8s\n' "$name" "$a" "$b" "$ratio"
done
