#!/usr/bin/env bash
# Merge throughput against nbdcopy copying the same bytes.
# A snapshot of a SIZE MiB origin gets every chunk written (so the merge
# moves SIZE MiB); we time `snapshot-merge=... snapshot-merge-exit=true`
# and `nbdcopy` between two nbdkit file exports of the same size, REPS
# times each, interleaved, and report medians and the ratio.
#
#   bench/merge.sh [-s SIZE_MIB] [-c CHUNK] [-r REPS]
set -euo pipefail
top=$(cd "$(dirname "$0")/.." && pwd)
export PATH=/usr/bin:$top/tools:$PATH PYENV_VERSION=system
FILTER=${FILTER:-$top/filter/.libs/nbdkit-snapshot-filter.so}
SIZE=256 CHUNK=64k REPS=3
while getopts s:c:r: opt; do
  case $opt in s) SIZE=$OPTARG ;; c) CHUNK=$OPTARG ;; r) REPS=$OPTARG ;; *) exit 2 ;; esac
done
work=$(mktemp -d /var/tmp/snapmerge.XXXXXX)
trap 'rm -rf "$work"' EXIT
cd "$work"
head -c $((SIZE << 20)) /dev/urandom > data.img
ms() { echo $(( $(date +%s%N) / 1000000 )); }
merge_ms=() copy_ms=()
for _ in $(seq "$REPS"); do
  # A snapshot holding SIZE MiB of new data.
  rm -f origin.img s.cow; truncate -s "${SIZE}M" origin.img
  nbdkit -U - --filter="$FILTER" file origin.img snapshot=s=s.cow \
    snapshot-chunk-size="$CHUNK" \
    --run 'nbdcopy data.img "nbd+unix:///s?socket=$unixsocket"'
  sync
  t0=$(ms)
  rm -f m.sock
  nbdkit -f -U m.sock --filter="$FILTER" file origin.img snapshot=s=s.cow \
    snapshot-merge=s snapshot-merge-exit=true
  t1=$(ms)
  cmp -s origin.img data.img || { echo "merge result differs" >&2; exit 1; }
  merge_ms+=($((t1 - t0)))
  # nbdcopy of the same bytes between two file exports, flushed.
  rm -f dst.img; truncate -s "${SIZE}M" dst.img
  sync
  t0=$(ms)
  rm -f dst.sock
  nbdkit -f -U dst.sock file dst.img &
  dst=$!
  while [ ! -S dst.sock ]; do sleep 0.02; done
  nbdkit -U - file data.img --run \
    "nbdcopy --flush \"\$uri\" 'nbd+unix:///?socket=$work/dst.sock'"
  t1=$(ms)
  kill $dst; wait $dst 2>/dev/null || true
  cmp -s dst.img data.img || { echo "nbdcopy result differs" >&2; exit 1; }
  copy_ms+=($((t1 - t0)))
done
med() { printf '%s\n' "$@" | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
m=$(med "${merge_ms[@]}") c=$(med "${copy_ms[@]}")
echo "merge of $SIZE MiB (chunk $CHUNK): median $m ms; nbdcopy of the same: median $c ms"
awk -v m="$m" -v c="$c" -v s="$SIZE" 'BEGIN {printf "merge %.0f MiB/s, nbdcopy %.0f MiB/s, ratio %.2f\n", s*1000/m, s*1000/c, c/m}'
