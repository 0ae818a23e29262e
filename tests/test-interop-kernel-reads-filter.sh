#!/usr/bin/env bash
# The real kernel (dm-snapshot 6.1 under qemu, through $KDM) reads and
# merges COW files that the filter wrote.
#
# For chunk sizes 4 KiB, 64 KiB and 512 B: the filter serves a 4 MiB
# origin (every sector distinct, gen-origin.py) with one new P snapshot;
# nbdsh sends a fixed list of origin and snapshot writes and zeroes
# (aligned, unaligned, sub-sector, multi-chunk, to the device's end, into
# chunks that already have an exception); nbdkit stops. Then:
#  * the filter's own views and the origin file equal the model;
#  * nbdsnap check passes (when nbdsnap is built);
#  * `kdm.sh read` gives exactly the model snapshot view and leaves the
#    COW unchanged;
#  * the `kdm.sh status` line equals `nbdsnap info`'s status (if built)
#    and the status in the filter's export description (used/total metadata, sectors;
#    total is the COW file's size);
#  * `kdm.sh merge` (the kernel merging our file) leaves the origin equal
#    to the snapshot view, and the filter then serves the merged COW as an
#    empty snapshot of the merged origin.
source "$srcdir/functions.sh"
set -e
set -o pipefail
set -x

requires test -x "$KDM"
requires qemu-system-x86_64 --version
requires python3 -c "import nbd"
requires nbdsh --version
requires nbdcopy --version
requires nbdinfo --version
unset LIBNBD_DEBUG
# nbdsnap is optional: without it, statuses come from the filter's export
# description and the offline checks are left out.
have_nbdsnap=false
if [ -x "$NBDSNAP" ]; then have_nbdsnap=true; fi
nbdsnap_opt () { if $have_nbdsnap; then "$NBDSNAP" "$@"; fi; }
# cow_status ORIGIN COW: the dm status line ("used/total metadata") of COW.
cow_status () {
  if $have_nbdsnap; then
    "$NBDSNAP" info --json "$2" |
      python3 -c 'import json, sys; print(json.load(sys.stdin)["status"])'
  else
    nbdkit -U - --filter="$FILTER" file "$1" snapshot=s="$2" \
      --run 'nbdinfo --list "$uri"' |
      sed -n 's/^[[:space:]]*description: snapshot s (.*): //p'
  fi
}

enter_tmpdir

# Is the kdm kernel set up? A hand-made empty store (header + zero area 0,
# chunk 8) must give a status line; otherwise skip.
truncate -s 1M probe-origin.img
printf 'SnAp\001\000\000\000\001\000\000\000\010\000\000\000' > probe.cow
truncate -s 8192 probe.cow
if ! "$KDM" status probe-origin.img probe.cow 8 > probe.log 2>&1 ||
   ! grep -q '^KDM-STATUS: kdm-snap: .* 16/16 16$' probe.log; then
  cat probe.log
  echo "$0: '$KDM status' does not work (run kdm.sh setup): test skipped"
  exit 77
fi

gen=$srcdir/fixtures/kernel/gen-origin.py
size=4194304
python3 "$gen" $size > origin0.img

# KIND OFFSET LENGTH BYTE. origin/snap: write LENGTH bytes of BYTE to the
# origin / the snapshot export; ozero/szero: NBD zero of LENGTH bytes.
cat > writes.txt <<'EOF'
origin 0 4096 0x11
snap 65536 65536 0x21
snap 8192 8192 0x22
origin 8192 512 0x12
origin 70000 3 0x13
snap 100000 3000 0x23
origin 1048576 65536 0x14
snap 1050000 10 0x24
origin 2097153 1 0x15
snap 3000000 70000 0x25
origin 2990000 100000 0x16
ozero 500000 200000 0
szero 600000 131072 0
origin 0 512 0x17
snap 1 1 0x27
origin 3500000 694304 0x18
snap 4190000 4304 0x26
origin 4128768 65536 0x19
snap 2097152 512 0x28
origin 2097152 4096 0x1a
EOF

python3 - <<'EOF'
o = bytearray(open("origin0.img", "rb").read())
snap, orig = bytearray(o), bytearray(o)
for line in open("writes.txt"):
    kind, off, ln, b = line.split()
    off, ln, b = int(off), int(ln), int(b, 0)
    t = orig if kind in ("origin", "ozero") else snap
    assert off + ln <= len(t)
    t[off:off + ln] = bytes([b]) * ln
open("want_snap.img", "wb").write(snap)
open("want_origin.img", "wb").write(orig)
EOF

cat > client.py <<'EOF'
# client.py SOCKET: sends writes.txt to the origin and snapshot exports.
import nbd, sys
h = nbd.NBD()
h.connect_uri("nbd+unix:///origin?socket=" + sys.argv[1])
s = nbd.NBD()
s.connect_uri("nbd+unix:///s?socket=" + sys.argv[1])
for line in open("writes.txt"):
    kind, off, ln, b = line.split()
    off, ln, b = int(off), int(ln), int(b, 0)
    dev = h if kind in ("origin", "ozero") else s
    if kind.endswith("zero"):
        dev.zero(ln, off)
    else:
        dev.pwrite(bytes([b]) * ln, off)
h.flush()
s.flush()
s.shutdown()
h.shutdown()
EOF

kstatus () { sed -n 's/^KDM-STATUS: kdm-snap: [0-9]* [0-9]* snapshot //p' "$1" | tail -n1; }

for chunk in 4096 65536 512; do
  cs=$((chunk / 512))
  rm -f s.cow origin.img
  cp origin0.img origin.img
  nbdkit -U - --filter="$FILTER" file origin.img snapshot=s=s.cow \
    snapshot-chunk-size=$chunk \
    --run '
      set -e
      python3 client.py "$unixsocket"
      nbdcopy "nbd+unix:///origin?socket=$unixsocket" view_origin.img
      nbdcopy "nbd+unix:///s?socket=$unixsocket" view_snap.img
      nbdinfo --list "$uri" > list.txt'
  cat list.txt
  # The filter agrees with the model (else the kernel checks mean nothing).
  cmp view_origin.img want_origin.img
  cmp view_snap.img want_snap.img
  cmp origin.img want_origin.img
  nbdsnap_opt check s.cow
  nbdsnap_opt info s.cow
  ours=$(cow_status origin.img s.cow)
  desc=$(sed -n 's/^[[:space:]]*description: snapshot s (.*): //p' list.txt)
  [ "$desc" = "$ours" ]
  # total is the file's size in sectors.
  [ "$(echo "$ours" | sed 's,^[0-9]*/\([0-9]*\) .*,\1,')" = $(( $(stat -c %s s.cow) / 512 )) ]
  python3 "$(dirname "$KDM")/cowdump.py" s.cow | head -n 20 || true
  cow_sum=$(sha256sum < s.cow)

  # The kernel reads the filter's COW: exactly the model snapshot view.
  "$KDM" read origin.img s.cow $cs out.img | tee kdm-read.log
  cmp out.img want_snap.img
  [ "$(sha256sum < s.cow)" = "$cow_sum" ]
  cmp origin.img want_origin.img
  grep "^KDM-TABLE: kdm-snap: .* P $cs\$" kdm-read.log

  # ... and reports the same status as nbdsnap and the filter.
  "$KDM" status origin.img s.cow $cs | tee kdm-status.log
  [ "$(kstatus kdm-status.log)" = "$ours" ]
  [ "$(kstatus kdm-read.log)" = "$ours" ]

  # The kernel merges the filter's COW (into copies).
  cp origin.img origin-k.img
  cp s.cow s-k.cow
  "$KDM" merge origin-k.img s-k.cow $cs | tee kdm-merge.log
  cmp origin-k.img want_snap.img
  # Merged: back to 2 chunks used / 2 chunks metadata.
  grep -E "^KDM-STATUS: kdm-merge: [0-9]+ [0-9]+ snapshot-merge $((2 * cs))/[0-9]+ $((2 * cs))\$" kdm-merge.log

  # The filter opens the kernel-merged COW: no exceptions, and the
  # snapshot is the merged origin.
  nbdsnap_opt check s-k.cow
  if $have_nbdsnap; then
    [ "$("$NBDSNAP" info --json s-k.cow |
         python3 -c 'import json, sys; print(json.load(sys.stdin)["exceptions"])')" = 0 ]
  fi
  nbdkit -U - --filter="$FILTER" file origin-k.img snapshot=s=s-k.cow \
    --run 'nbdcopy "nbd+unix:///s?socket=$unixsocket" view_merged.img'
  cmp view_merged.img want_snap.img
  cmp origin-k.img want_snap.img
done
