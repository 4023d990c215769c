#!/usr/bin/env bash
# Two monsoon binaries through the bench's `noida` section under valgrind's callgrind, which
# counts the instructions each monsoon process ran: the snapshot's process and the stream's.
# Unlike CPU seconds (compare.sh), the count is the same from run to run within about 0.2 %,
# whatever else the machine does, so a few percent between two builds shows in one run.
# Under callgrind monsoon runs 10-50 times slower: the bench's times and CPU figures are
# meaningless here, only the counts are. Needs valgrind.
#
# Usage: instructions.sh BENCH BIN_A BIN_B [bench arguments, default --docs 100000 --stream 50000]
# e.g.   crates/bench/instructions.sh target/release/monsoon-bench /tmp/target-old/release/monsoon target/release/monsoon
# The callgrind files are kept in $INSTRUCTIONS_DIR (default a new temporary directory): read
# one with `callgrind_annotate FILE`.
set -euo pipefail

[[ $# -ge 3 ]] || { sed -n 2,12p "$0" >&2; exit 2; }
command -v valgrind >/dev/null || { echo "valgrind is needed" >&2; exit 2; }
bench=$1 a=$2 b=$3
shift 3
extra=("$@")
[[ ${#extra[@]} -gt 0 ]] || extra=(--docs 100000 --stream 50000)
dir=${INSTRUCTIONS_DIR:-$(mktemp -d)}
mkdir -p "$dir"

# "snapshot stream" instruction totals of one side's callgrind files.
totals() {
  local snap=0 stream=0 f n
  for f in "$dir/$1"-*.out; do
    n=$(grep -m1 '^summary:' "$f" | awk '{print $2}')
    [[ -n $n ]] || continue
    if grep -m1 '^cmd:' "$f" | grep -q 'bench-stream'; then stream=$n; else snap=$n; fi
  done
  echo "$snap $stream"
}

echo "# $(date -u '+%F %H:%M') UTC; bench ${extra[*]}; callgrind files in $dir"
echo "| binary | snapshot instructions | stream instructions |"
echo "|---|---|---|"
for side in A B; do
  bin=$a; [[ $side == B ]] && bin=$b
  wrapper="$dir/run-$side.sh"
  # monsoon re-executes itself once (malloc tunables): callgrind must follow it.
  printf '#!/bin/sh\nexec valgrind --tool=callgrind --trace-children=yes --callgrind-out-file=%s/%s-%%p.out %s "$@"\n' "$dir" "$side" "$(realpath "$bin")" > "$wrapper"
  chmod +x "$wrapper"
  "$bench" "$wrapper" --only noida --backlog 0 "${extra[@]}" > "$dir/bench-$side.txt" 2>&1 || { echo "run $side failed: see $dir/bench-$side.txt" >&2; exit 1; }
  read -r s t < <(totals "$side")
  eval "count_$side=($s $t)"
  echo "| $side | $s | $t |"
done
ratio() { awk -v x="$1" -v y="$2" 'BEGIN { if (y > 0) printf "%.3f", x / y; else print "-" }'; }
echo "| B / A | $(ratio "${count_B[0]}" "${count_A[0]}") | $(ratio "${count_B[1]}" "${count_A[1]}") |"
