#!/usr/bin/env bash
# A/B of origin writes with one snapshot: builds of the filter against each
# other and passthrough nbdkit file, round after round (interleaved, so
# each round compares figures taken seconds apart). Not a test.
#
#   bench/origin-ab.sh ROUNDS FILTER.so...
#
# Prints the KiB/s of every round per target. The workload is bench/run.sh's
# origin-write row: 256 MiB of random 64 KiB writes at queue depth 16, 64k
# chunks; FIO_EXTRA adds fio arguments.
set -euo pipefail
export PATH=/usr/bin:$PATH PYENV_VERSION=system
rounds=$1; shift
work=$(mktemp -d /var/tmp/originab.XXXXXX)
pid=
trap '[ -n "$pid" ] && kill "$pid" 2>/dev/null; rm -rf "$work"' EXIT
cd "$work"
sock=$work/s.sock
head -c $((256 << 20)) /dev/urandom > base0.img
run() {  # TARGET: passthrough, or a filter .so
  rm -f "$sock" cur.img ./*.cow
  cp base0.img cur.img
  sync
  if [ "$1" = passthrough ]; then
    nbdkit -f -U "$sock" file cur.img &
  else
    nbdkit -f -U "$sock" --filter="$1" file cur.img snapshot=s1=s1.cow \
      snapshot-chunk-size=64k snapshot-export=origin &
  fi
  pid=$!
  for _ in $(seq 200); do [ -S "$sock" ] && break; sleep 0.05; done
  # shellcheck disable=SC2086
  fio --name=b --ioengine=nbd --uri="nbd+unix:///?socket=$sock" --size=256M \
      --rw=randwrite --bs=64k --iodepth=16 ${FIO_EXTRA:-} --output-format=json |
    python3 -c 'import json,sys; t=sys.stdin.read(); print(json.loads(t[t.index("{"):])["jobs"][0]["write"]["bw"])'
  kill "$pid"; wait "$pid" 2>/dev/null || true; pid=
}
declare -A R
for _ in $(seq "$rounds"); do
  for t in passthrough "$@"; do R[$t]+="$(run "$t") "; done
done
for t in passthrough "$@"; do echo "$t: ${R[$t]}"; done
