#!/usr/bin/env bash
# Two monsoon binaries through the bench's `noida` section (snapshot of --docs documents, then
# --stream streamed inserts, through the stand-ins), alternating runs: A, B, A, B, ... Prints
# each run's monsoon CPU seconds and peak RSS, and B / A per round. For comparing a commit
# with an older one (issue 16: the commit before the middleware, d83a818), build both with the
# same profile (the release profile: fat LTO), e.g.:
#
#   git worktree add --detach ../old d83a818
#   (cd ../old && CARGO_TARGET_DIR=/tmp/target-old cargo build --release -p monsoon)
#   cargo build --release -p monsoon -p monsoon-bench
#   crates/bench/compare.sh target/release/monsoon-bench /tmp/target-old/release/monsoon target/release/monsoon 2
#
# Usage: compare.sh BENCH BIN_A BIN_B ROUNDS [bench arguments, default --docs 200000 --stream 100000]
# Each run's whole output is kept in $COMPARE_LOGS (default a new temporary directory).
set -euo pipefail

[[ $# -ge 4 ]] || { sed -n 2,14p "$0" >&2; exit 2; }
bench=$1 a=$2 b=$3 rounds=$4
shift 4
extra=("$@")
[[ ${#extra[@]} -gt 0 ]] || extra=(--docs 200000 --stream 100000)
logs=${COMPARE_LOGS:-$(mktemp -d)}
mkdir -p "$logs"

# "snapshot_cpu snapshot_rss_mib stream_cpu_per_100k stream_rss_mib" from one run's output.
figures() {
  awk '
    /^## Snapshot of/ { s = "snap" } /^## Streaming/ { s = "stream" } /^## Backlog/ { s = "" }
    s == "snap" && /^\| monsoon CPU \|/ { split($0, f, "|"); split(f[3], v, " "); sc = v[1] }
    s == "snap" && /^\| monsoon peak RSS \|/ { split($0, f, "|"); split(f[3], v, " "); sr = v[1] }
    s == "stream" && /^\| monsoon CPU \|/ { split($0, f, "|"); split(f[3], v, " "); tc = v[1] }
    s == "stream" && /^\| monsoon peak RSS \|/ { split($0, f, "|"); split(f[3], v, " "); tr = v[1] }
    END { print sc, sr, tc, tr }' "$1"
}

echo "# $(date -u '+%F %H:%M') UTC, $(nproc) cores, load before: $(cut -d' ' -f1-3 /proc/loadavg); bench ${extra[*]}; logs in $logs"
echo "| round | binary | snapshot CPU s | snapshot peak RSS MiB | stream CPU s per 100k | stream peak RSS MiB | load (1 min) after |"
echo "|---|---|---|---|---|---|---|"
for round in $(seq 1 "$rounds"); do
  for side in A B; do
    bin=$a; [[ $side == B ]] && bin=$b
    log="$logs/round$round-$side.txt"
    "$bench" "$bin" --only noida --backlog 0 "${extra[@]}" >"$log" 2>&1 || { echo "run $round $side failed: see $log" >&2; exit 1; }
    read -r sc sr tc tr < <(figures "$log")
    eval "fig_$side=(\"$sc\" \"$sr\" \"$tc\" \"$tr\")"
    echo "| $round | $side | $sc | $sr | $tc | $tr | $(cut -d' ' -f1 /proc/loadavg) |"
  done
  ratio() { awk -v x="$1" -v y="$2" 'BEGIN { if (y > 0) printf "%.3f", x / y; else print "-" }'; }
  echo "| $round | B / A | $(ratio "${fig_B[0]}" "${fig_A[0]}") | $(ratio "${fig_B[1]}" "${fig_A[1]}") | $(ratio "${fig_B[2]}" "${fig_A[2]}") | $(ratio "${fig_B[3]}" "${fig_A[3]}") | |"
done
