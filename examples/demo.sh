#!/usr/bin/env bash
# The demo: the snapshot filter serving a real disk image with a snapshot.
# A 64 MiB disk image gets a snapshot; writes to the origin copy the
# old data out, so the snapshot keeps showing the disk as it was.
set -euo pipefail
top=$(cd "$(dirname "$0")/.." && pwd)
export PATH=/usr/bin:$top/tools:$PATH PYENV_VERSION=system
filter=$top/filter/.libs/nbdkit-snapshot-filter.so
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cd "$work"

echo "== a 64 MiB disk image with known contents"
qemu-img create -q -f raw disk.img 64M
python3 -c "
import sys
with open('disk.img','r+b') as f:
    for i in range(0, 64 << 20, 1 << 20):
        f.seek(i); f.write(('block at %d MiB, original\n' % (i >> 20)).encode().ljust(4096, b'.'))
"
before=$(sha256sum < disk.img | cut -c1-16)
echo "disk.img sha256 $before..."

echo
echo "== nbdkit --filter=snapshot file disk.img snapshot=before=before.cow"
nbdkit -U - --filter="$filter" file disk.img snapshot=before=before.cow \
  snapshot-export=origin --run '
  echo "-- exports:"
  nbdinfo --list "$uri" | grep -E "^export=|description"
  echo "-- write 8 MiB of new data to the origin (like a VM would)"
  nbdsh -u "nbd+unix:///origin?socket=$unixsocket" -c "
for i in range(8):
    h.pwrite(b\"NEW DATA \" * 100, i << 20)
h.flush()
"
  echo "-- the origin now reads:"
  nbdsh -u "nbd+unix:///origin?socket=$unixsocket" -c "print(h.pread(40, 0))"
  echo "-- the snapshot still reads:"
  nbdsh -u "nbd+unix:///before?socket=$unixsocket" -c "print(h.pread(40, 0))"
  nbdcopy "nbd+unix:///before?socket=$unixsocket" snapshot-copy.img
  echo "-- status after the writes:"
  nbdinfo --list "$uri" | grep description
'
echo
echo "== the snapshot, copied out with nbdcopy, equals the disk before the writes:"
echo "snapshot-copy.img sha256 $(sha256sum < snapshot-copy.img | cut -c1-16)..."
[ "$(sha256sum < snapshot-copy.img | cut -c1-16)" = "$before" ] && echo "MATCH"
echo
echo "== the COW file is a Linux dm-snapshot persistent store:"
nbdsnap info before.cow 2>/dev/null || xxd -l 16 before.cow
