#!/usr/bin/env bash
# Benchmarks: the snapshot filter side by side with passthrough nbdkit file,
# nbdkit's cow filter (4K, 64K) and qemu-nbd over a qcow2 overlay, in one
# run, several repetitions, medians reported as ratios to passthrough, then
# every figure behind them. Each workload runs on every target back to back
# (the order turning each repetition), so a ratio compares figures taken
# seconds apart: each ratio shown is the median of one ratio per
# repetition, next to the median KiB/s. Not a test: nothing here asserts
# a time.
#
#   bench/run.sh [-r REPS] [-s SIZE_MIB] [-o RESULTS.md] [-P]
#
# On a VM whose balloon reports free pages to the hypervisor, the run
# holds that off while it runs, when it may (root), and says so; -P leaves
# it on. A reported page is unbacked until it is written again, and that
# write costs a fault in the host: every target that writes new pages (the
# COW file, the cow filter's file, the qcow2 overlay) pays it, passthrough
# (rewriting pages it already has) does not, and how much depends on what
# the run before freed.
#
# Needs: nbdkit, the built filter, fio (nbd engine), qemu-img, qemu-nbd.
set -euo pipefail
top=$(cd "$(dirname "$0")/.." && pwd)
export PATH=/usr/bin:$top/tools:$PATH PYENV_VERSION=system
FILTER=${FILTER:-$top/filter/.libs/nbdkit-snapshot-filter.so}
REPS=5
# 1 GiB: at 2 GB/s a 256 MiB pass lasts a tenth of a second, too short to
# time on a shared host, and too small for qcow2's allocation costs to show.
SIZE=1024
OUT=
KEEP_REPORTING=
while getopts r:s:o:P opt; do
  case $opt in
    r) REPS=$OPTARG ;; s) SIZE=$OPTARG ;; o) OUT=$OPTARG ;; P) KEEP_REPORTING=1 ;;
    *) exit 2 ;;
  esac
done
work=$(mktemp -d /var/tmp/snapbench.XXXXXX)
pids=()
reporting=/sys/module/page_reporting/parameters/page_reporting_order
reporting_was=
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  rm -rf "$work"
  if [ -n "$reporting_was" ]; then echo "$reporting_was" > "$reporting"; fi
}
trap cleanup EXIT
# Free pages of an order at or above page_reporting_order are reported;
# no order reaches 11 (MAX_PAGE_ORDER is 10 here).
if [ ! -e "$reporting" ]; then
  reporting_note="free page reporting: not on this machine"
elif [ -n "$KEEP_REPORTING" ]; then
  reporting_note="free page reporting: left on (-P)"
elif old=$(cat "$reporting") && echo 11 2>/dev/null > "$reporting"; then
  reporting_was=$old
  reporting_note="free page reporting: held off during the run (page_reporting_order $old -> 11)"
else
  reporting_note="free page reporting: on (could not hold it off: not root?)"
fi
cd "$work"
sock=$work/nbd.sock

head -c $((SIZE << 20)) /dev/urandom > base0.img

# start_server TARGET: serves TARGET's export on $sock, with fresh state.
start_server() {
  rm -f "$sock" cur.img ./*.cow overlay.qcow2
  cp --reflink=auto base0.img cur.img
  # Written back now, not while the next target runs: the copies' dirty
  # pages would compete with whatever syncs it makes.
  sync
  local export=
  case $1 in
    passthrough) nbdkit -f -U "$sock" file cur.img & ;;
    cow4k) nbdkit -f -U "$sock" --filter=cow file cur.img cow-block-size=4096 & ;;
    cow64k) nbdkit -f -U "$sock" --filter=cow file cur.img cow-block-size=65536 & ;;
    qcow2)
      qemu-img create -q -f qcow2 -F raw -b cur.img overlay.qcow2
      qemu-nbd -k "$sock" -f qcow2 --cache=writeback --persistent --shared=16 overlay.qcow2 & ;;
    snap4k|snap64k)
      local cs=${1#snap}
      nbdkit -f -U "$sock" --filter="$FILTER" file cur.img \
        snapshot=s=s.cow snapshot-chunk-size="$cs" & ;;
    origin1|origin8)
      local n=${1#origin} args=()
      for i in $(seq 1 "$n"); do args+=("snapshot=s$i=s$i.cow"); done
      nbdkit -f -U "$sock" --filter="$FILTER" file cur.img "${args[@]}" \
        snapshot-chunk-size=64k snapshot-export=origin & ;;
  esac
  pids=($!)
  for _ in $(seq 200); do [ -S "$sock" ] && break; sleep 0.05; done
}
stop_server() { kill "${pids[@]}" 2>/dev/null || true; wait "${pids[@]}" 2>/dev/null || true; pids=(); }

# fio_run NAME FIO-ARGS...: prints bandwidth in KiB/s (reads + writes).
fio_run() {
  shift  # the name is for the reader
  fio --name=b --ioengine=nbd --uri="nbd+unix:///?socket=$sock" \
      --size="${SIZE}M" --output-format=json "$@" |
    python3 -c 'import json,sys; t=sys.stdin.read(); j=json.loads(t[t.index("{"):])["jobs"][0]; print(j["read"]["bw"] + j["write"]["bw"])'
}

declare -A W=(
  [seqread]="--rw=read --bs=1M --iodepth=8"
  [seqwrite]="--rw=write --bs=1M --iodepth=8"
  [randwrite4k]="--rw=randwrite --bs=4k --iodepth=32"
  [randread4k]="--rw=randread --bs=4k --iodepth=32"
)
TARGETS=(passthrough snap4k snap64k cow4k cow64k qcow2)
declare -A R

# Each workload runs on every target back to back, so that the figures a
# ratio compares were taken seconds apart, under the same load from the
# rest of the host; the order of targets turns each repetition.
for rep in $(seq 1 "$REPS"); do
  order=("${TARGETS[@]:rep % ${#TARGETS[@]}}" "${TARGETS[@]:0:rep % ${#TARGETS[@]}}")
  for w in seqread seqwrite randwrite4k randread4k; do
    for t in "${order[@]}"; do
      start_server "$t"
      v=$(fio_run "$w" ${W[$w]})
      stop_server
      R[$t,$w]+="$v "
    done
  done
  # Rewrite: the same random writes again, chunks already copied.
  for t in "${order[@]}"; do
    start_server "$t"
    fio_run warm ${W[randwrite4k]} >/dev/null
    v=$(fio_run rewrite ${W[randwrite4k]})
    stop_server
    R[$t,randrewrite4k]+="$v "
  done
  # Flush: 4k writes each followed by a flush (fsync=1), time-bound.
  for t in "${order[@]}"; do
    start_server "$t"
    v=$(fio_run flush --rw=write --bs=4k --iodepth=1 --fsync=1 --runtime=5 --time_based)
    stop_server
    R[$t,flush]+="$v "
  done
  for t in origin1 origin8 passthrough; do
    start_server "$t"
    v=$(fio_run originw --rw=randwrite --bs=64k --iodepth=16)
    stop_server
    R[$t,originwrite]+="$v "
  done
  # Sequential origin writes (1 MiB, as a copy of an image onto the
  # origin would make them): each request copies out 16 chunks at once.
  for t in origin1 passthrough; do
    start_server "$t"
    v=$(fio_run originseq ${W[seqwrite]})
    stop_server
    R[$t,originseq]+="$v "
  done
  # The same with a flush at the end, so that both keep the data: the
  # passthrough figure above never reaches the disk.
  for t in origin1 passthrough; do
    start_server "$t"
    v=$(fio_run originw --rw=randwrite --bs=64k --iodepth=16 --end_fsync=1)
    stop_server
    R[$t,originwrite_durable]+="$v "
  done
  # The disk's own ceiling for durable data: the same amount written to a
  # file here and synced once. Copy-outs must be durable before their
  # origin writes go out, so origin writes cannot outrun it for long.
  rm -f ceiling.dat
  v=$(fio --name=b --filename=ceiling.dat --ioengine=psync --rw=write --bs=1M \
        --size="${SIZE}M" --end_fsync=1 --output-format=json |
      python3 -c 'import json,sys; t=sys.stdin.read(); print(json.loads(t[t.index("{"):])["jobs"][0]["write"]["bw"])')
  rm -f ceiling.dat
  R[disk,sync]+="$v "
done

median() { tr ' ' '\n' | grep -v '^$' | sort -n | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }
# rratio A B: the median over repetitions of A's figure over B's, each pair
# taken in the same repetition (R[A] and R[B] are "t,w" keys).
rratio() {
  paste <(echo "${R[$1]}" | tr ' ' '\n' | grep -v '^$') \
        <(echo "${R[$2]}" | tr ' ' '\n' | grep -v '^$') |
    awk '{print ($2 ? $1/$2 : 0)}' | median
}
# cell KEY BASEKEY: "median KiB/s (median ratio)".
cell() { printf '%s (%.2f)' "$(echo "${R[$1]}" | median)" "$(rratio "$1" "$2")"; }

report() {
  echo "Median of $REPS runs, ${SIZE} MiB image: KiB/s, and in brackets the median"
  echo "of the ratios to passthrough taken in the same repetition;"
  echo "$reporting_note."
  echo
  printf '| workload |'; for t in "${TARGETS[@]}"; do printf ' %s |' "$t"; done; echo
  printf '|---|'; for _ in "${TARGETS[@]}"; do printf -- '---|'; done; echo
  for w in seqread seqwrite randwrite4k randrewrite4k randread4k flush; do
    printf '| %s |' "$w"
    for t in "${TARGETS[@]}"; do printf ' %s |' "$(cell "$t,$w" "passthrough,$w")"; done
    echo
  done
  printf '| seqwrite, snap64k to qcow2 | %.2f |\n' "$(rratio snap64k,seqwrite qcow2,seqwrite)"
  for t in origin1 origin8; do
    printf '| origin 64k randwrite, %s snapshot(s) | %s |\n' "${t#origin}" \
      "$(cell "$t,originwrite" passthrough,originwrite)"
  done
  printf '| origin 1M seqwrite, 1 snapshot (passthrough %s) | %s |\n' \
    "$(echo "${R[passthrough,originseq]}" | median)" \
    "$(cell origin1,originseq passthrough,originseq)"
  printf '| origin 64k randwrite, 1 snapshot, final flush (passthrough %s) | %s |\n' \
    "$(echo "${R[passthrough,originwrite_durable]}" | median)" \
    "$(cell origin1,originwrite_durable passthrough,originwrite_durable)"
  printf '| disk ceiling: write and sync %d MiB to a file | %s |\n' "$SIZE" \
    "$(cell disk,sync passthrough,originwrite)"
}
# Every figure behind the medians, so that the spread can be judged.
raw() {
  echo
  echo "Every run, in the order taken (KiB/s):"
  echo
  local k
  for k in $(printf '%s\n' "${!R[@]}" | sort); do
    echo "- ${k/,/ }: ${R[$k]% }"
  done
}
if [ -n "$OUT" ]; then { report; raw; } | tee "$OUT"; else report; raw; fi
