#!/usr/bin/env bash
# Memory per exception and restart time with a big store:
# 262,144 random 4 KiB exceptions (a 1 GiB origin, every chunk once, in
# random order), written through the snapshot export. Reports the nbdkit
# process's RSS growth per exception and the median time to start nbdkit
# on that COW file and serve a first request, against an empty COW.
#
#   bench/memory.sh [-n EXCEPTIONS] [-r REPS]
set -euo pipefail
top=$(cd "$(dirname "$0")/.." && pwd)
export PATH=/usr/bin:$top/tools:$PATH PYENV_VERSION=system
FILTER=${FILTER:-$top/filter/.libs/nbdkit-snapshot-filter.so}
N=262144
REPS=7
while getopts n:r: opt; do
  case $opt in n) N=$OPTARG ;; r) REPS=$OPTARG ;; *) exit 2 ;; esac
done
work=$(mktemp -d /var/tmp/snapmem.XXXXXX)
trap 'kill $pid 2>/dev/null || true; rm -rf "$work"' EXIT
cd "$work"
sock=$work/s.sock
truncate -s $((N * 4096)) origin.img

rss_kib() { awk '/^VmRSS/ {print $2}' "/proc/$1/status"; }

nbdkit -f -U "$sock" --filter="$FILTER" file origin.img snapshot=s=s.cow \
  snapshot-chunk-size=4k &
pid=$!
for _ in $(seq 200); do [ -S "$sock" ] && break; sleep 0.05; done
nbdinfo "nbd+unix:///s?socket=$sock" >/dev/null   # warm up one connection
rss0=$(rss_kib $pid)
fio --name=fill --ioengine=nbd --uri="nbd+unix:///s?socket=$sock" \
  --rw=randwrite --bs=4k --iodepth=32 --size=$((N * 4))k --randrepeat=1 \
  --output-format=terse >/dev/null
nbdsh -u "nbd+unix:///s?socket=$sock" -c 'h.flush()'
rss1=$(rss_kib $pid)
desc=$(nbdinfo --list "nbd+unix:///?socket=$sock" | grep 'description: snapshot')
kill $pid; wait $pid 2>/dev/null || true

echo "exceptions: $N (${desc##*: })"
echo "RSS before: ${rss0} KiB, after: ${rss1} KiB"
awk -v a="$rss0" -v b="$rss1" -v n="$N" \
  'BEGIN {printf "RSS growth per exception: %.1f bytes\n", (b - a) * 1024 / n}'

# Restart time: start, serve one request, stop; median of REPS, with the
# page cache warm (the first, cold run is dropped).
startup_ms() {
  local cow=$1 t0 t1 times=()
  for i in $(seq 0 "$REPS"); do
    t0=$(date +%s%N)
    nbdkit -U - --filter="$FILTER" file origin.img snapshot=s="$cow" \
      --run 'nbdinfo --size "$uri" >/dev/null'
    t1=$(date +%s%N)
    [ "$i" -gt 0 ] && times+=($(( (t1 - t0) / 1000000 )))
  done
  printf '%s\n' "${times[@]}" | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'
}
big=$(startup_ms s.cow)
empty=$(startup_ms empty.cow)
echo "start+first request+stop, median ms: with $N exceptions $big, empty COW $empty"
echo "restart cost of the exceptions: $((big - empty)) ms"
