#!/usr/bin/env bash
# The real kernel (dm-snapshot under qemu, ../shared/tools/kdm) and the
# filter read and merge each other's COW files, checked against a model.
source "$srcdir/functions.sh"
set -e
set -x
requires test -x "$KDM"
requires command -v qemu-system-x86_64
requires "$KDM" build
requires nbdsh --version
tmp=$(mktemp -d)
cleanup_fn rm -rf "$tmp"
cd "$tmp"

# Writes as "kind offset length byte" lines, applied to the model and sent
# through the filter (kind origin or snap).
cat > writes.txt <<'W'
origin 0 4096 0x11
snap 8192 8192 0x22
origin 8192 512 0x33
snap 100000 3000 0x44
origin 1048576 65536 0x55
snap 1050000 10 0x66
origin 2097153 1 0x77
snap 3000000 70000 0x88
origin 0 512 0x99
origin 3500000 300000 0xaa
W
for chunk in 4k 64k; do
  cs=$(( ${chunk%k} * 2 ))
  python3 -c "
import random
random.seed(7)
open('origin0.img','wb').write(bytes(random.getrandbits(8) for _ in range(4 << 20)))"
  cp origin0.img origin.img
  rm -f s.cow
  nbdkit -U - --filter="$FILTER" file origin.img snapshot=s=s.cow \
    snapshot-chunk-size=$chunk --run '
    nbdsh -u "nbd+unix:///origin?socket=$unixsocket" -c "
import os
so = nbd.NBD(); so.connect_uri(\"nbd+unix:///s?socket=$unixsocket\")
for line in open(\"writes.txt\"):
    kind, off, ln, b = line.split()
    data = bytes([int(b, 0)]) * int(ln)
    (h if kind == \"origin\" else so).pwrite(data, int(off))
h.flush(); so.flush()
"'
  python3 - <<'PY'
o = bytearray(open("origin0.img", "rb").read())
snap, orig = bytearray(o), bytearray(o)
for line in open("writes.txt"):
    kind, off, ln, b = line.split()
    t = orig if kind == "origin" else snap
    t[int(off):int(off) + int(ln)] = bytes([int(b, 0)]) * int(ln)
open("want_snap.img", "wb").write(snap)
open("want_origin.img", "wb").write(orig)
PY
  cmp origin.img want_origin.img
  # The kernel reads the filter's COW: the same snapshot view, and the
  # same status as nbdsnap computes.
  "$KDM" read origin.img s.cow $cs out.img | tee kdm.log
  cmp out.img want_snap.img
  kstatus=$(sed -n 's/^KDM-STATUS: kdm-snap: [0-9]* [0-9]* snapshot //p' kdm.log | head -1)
  if [ -x "$NBDSNAP" ]; then
    ours=$("$NBDSNAP" info --json s.cow | python3 -c 'import json,sys; print(json.load(sys.stdin)["status"])')
    [ "$kstatus" = "$ours" ]
  fi
  # The kernel merges the filter's COW.
  cp origin.img origin-k.img; cp s.cow s-k.cow
  "$KDM" merge origin-k.img s-k.cow $cs
  cmp origin-k.img want_snap.img
done

# The filter serves and extends a COW the kernel wrote.
python3 -c "
import random
random.seed(9)
open('origin0.img','wb').write(bytes(random.getrandbits(8) for _ in range(4 << 20)))"
cp origin0.img origin.img
cat > kscript.txt <<'K'
origin 0 65536 0x11
snap 131072 65536 0x22
origin 1048576 131072 0x33
K
rm -f k.cow; truncate -s 4M k.cow
"$KDM" write origin.img k.cow 16 kscript.txt
python3 - <<'PY'
o = bytearray(open("origin0.img", "rb").read())
snap, orig = bytearray(o), bytearray(o)
for line in open("kscript.txt"):
    kind, off, ln, b = line.split()
    t = orig if kind == "origin" else snap
    t[int(off):int(off) + int(ln)] = bytes([int(b, 0)]) * int(ln)
# More writes through the filter, below.
orig[2097152:2097152 + 65536] = b"\x44" * 65536
snap[3145728:3145728 + 100] = b"\x55" * 100
open("want_snap.img", "wb").write(snap)
open("want_origin.img", "wb").write(orig)
PY
nbdkit -U - --filter="$FILTER" file origin.img snapshot=k=k.cow --run '
  nbdsh -u "nbd+unix:///origin?socket=$unixsocket" -c "h.pwrite(b\"\\x44\" * 65536, 2097152); h.flush()"
  nbdsh -u "nbd+unix:///k?socket=$unixsocket" -c "h.pwrite(b\"\\x55\" * 100, 3145728); h.flush()"
  nbdcopy "nbd+unix:///k?socket=$unixsocket" view.img'
cmp view.img want_snap.img
cmp origin.img want_origin.img
"$KDM" read origin.img k.cow 16 out.img
cmp out.img want_snap.img
