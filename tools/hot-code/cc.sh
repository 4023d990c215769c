#!/usr/bin/env bash
# The linker cargo runs for this workspace (.cargo/config.toml): `cc`, with the arguments rustc
# gives it (the name matters: rustc infers from it that this is a `cc`, not a bare `ld`). For a
# release build of the monsoon binary it first writes a symbol ordering file, so that lld lays
# the functions a plain pipeline runs (tools/hot-code/monsoon.txt) next to each other at the
# start of .text, in that list's order, and everything else after them.
#
# Why: the kernel maps a binary's code in whole page-cache folios (read ahead, up to hundreds of
# KiB), so the code a run touches is resident with everything around it. Kept together, the
# code a plain pipeline runs costs its own pages and few others.
#
# The list holds symbol names as tools/hot-code/collect.py found them. A name not in this build
# (a new compiler or new dependency versions change the hash in `17h<hash>E`, LLVM may add
# `.llvm.<n>`) is matched without them, when that leaves exactly one function (generic
# functions share a name up to the hash, and only the instances run belong up front); anything
# else simply goes with the rest. MONSOON_HOT_CODE=0 links without the list.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
list=$here/monsoon.txt
out= prev=
for a in "$@"; do
  [[ $prev == -o ]] && out=$a
  prev=$a
done
extra=()
if [[ $out == */release/deps/monsoon-* && -s $list && ${MONSOON_HOT_CODE:-1} != 0 ]]; then
  objects=()
  for a in "$@"; do
    [[ ($a == *.o || $a == *.a || $a == *.rlib) && -f $a ]] && objects+=("$a")
  done
  order=$out.symbol-order
  # Never fails the link: without a list the binary is the same, only laid out as rustc left it.
  { nm --defined-only "${objects[@]}" 2>/dev/null || true; } | awk -v list="$list" '
    function key(s) { sub(/\.llvm\.[0-9]+$/, "", s); sub(/17h[0-9a-f]+E$/, "17hE", s); return s }
    NF == 3 && $2 ~ /^[tTwW]$/ { have[$3] = 1; k = key($3); count[k]++; named[k] = $3 }
    END {
      while ((getline line < list) > 0) {
        if (line in have) name = line
        else if (count[key(line)] == 1) name = named[key(line)]
        else continue
        if (!(name in done)) { done[name] = 1; print name }
      }
    }' > "$order" && extra=("-Wl,--symbol-ordering-file=$order" -Wl,--no-warn-symbol-ordering) || true
fi
exec "${MONSOON_LINK_CC:-cc}" "$@" "${extra[@]}"
