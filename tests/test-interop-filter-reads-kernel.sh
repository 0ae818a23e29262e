#!/usr/bin/env bash
# The filter reads and extends COW files that the real kernel wrote
# (dm-snapshot 6.1 under qemu, through $KDM), and the kernel reads them
# back.
#
# For chunk 8, 128 and 1 sectors: `kdm.sh write` makes a fresh kernel COW
# from a script of origin and snapshot writes over a copy of origin0 (the
# chunk-1 script fills metadata area 0 exactly, so the filter must start
# area 1). Then:
#  * nbdsnap (or, without it, the filter) reads the same status as the
#    kernel printed, and nbdsnap check passes;
#  * the filter serves it: snapshot export == model snapshot view, origin
#    export == model origin;
#  * more origin and snapshot writes (and zeroes) go through the filter,
#    into chunks with kernel exceptions and into new ones; nbdkit stops;
#  * `kdm.sh read` of the extended COW == the model snapshot view, and
#    `kdm.sh status` == nbdsnap's status;
#  * `kdm.sh merge` of it leaves the origin equal to the snapshot view.
# Fixtures made by the kernel earlier are checked without qemu in
# test-interop-fixtures.sh.
source "$srcdir/functions.sh"
set -e
set -o pipefail
set -x

requires test -x "$KDM"
requires qemu-system-x86_64 --version
requires python3 -c "import nbd"
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

# model.py OUT_ORIGIN OUT_SNAP SCRIPT...: origin0 + the scripts' writes.
# Lines: origin|snap OFFSET LENGTH BYTE, ozero|szero OFFSET LENGTH,
# status, # comments.
cat > model.py <<'EOF'
import sys
o = open("origin0.img", "rb").read()
orig, snap = bytearray(o), bytearray(o)
for script in sys.argv[3:]:
    for line in open(script):
        f = line.split("#")[0].split()
        if not f or f[0] == "status":
            continue
        kind, off, ln = f[0], int(f[1], 0), int(f[2], 0)
        b = int(f[3], 0) if len(f) > 3 else 0
        t = orig if kind in ("origin", "ozero") else snap
        assert off + ln <= len(t), line
        t[off:off + ln] = bytes([b]) * ln
open(sys.argv[1], "wb").write(orig)
open(sys.argv[2], "wb").write(snap)
EOF

# client.py SOCKET SCRIPT: the script's writes through the filter, then
# a flush of both exports.
cat > client.py <<'EOF'
import nbd, sys
h = nbd.NBD()
h.connect_uri("nbd+unix:///origin?socket=" + sys.argv[1])
s = nbd.NBD()
s.connect_uri("nbd+unix:///k?socket=" + sys.argv[1])
for line in open(sys.argv[2]):
    f = line.split("#")[0].split()
    if not f or f[0] == "status":
        continue
    kind, off, ln = f[0], int(f[1], 0), int(f[2], 0)
    dev = h if kind in ("origin", "ozero") else s
    if kind.endswith("zero"):
        dev.zero(ln, off)
    else:
        dev.pwrite(bytes([int(f[3], 0)]) * ln, off)
h.flush()
s.flush()
s.shutdown()
h.shutdown()
EOF

# The kernel's writes (kdm.sh write scripts). Lengths that are multiples
# of 64 KiB reach dm as O_DIRECT bios; the rest go through the guest's
# page cache (whole 4 KiB pages).
cat > k8.txt <<'EOF'
origin 0 65536 0x11
snap 131072 65536 0x21
origin 1048576 131072 0x12
snap 1048576 4096 0x22
origin 200000 5000 0x13
snap 300000 100 0x23
origin 2097152 512 0x14
snap 4128768 65536 0x24
status
EOF
cp k8.txt k128.txt
# Chunk 1 (epa 32): each 4 KiB page is 8 exceptions, so 4 pages fill
# area 0 exactly (like the area-exact1 fixture).
cat > k1.txt <<'EOF'
origin 0 4096 0x11
origin 65536 4096 0x12
snap 131072 4096 0x21
origin 1048576 4096 0x13
status
EOF

# What the filter writes afterwards.
cat > f8.txt <<'EOF'
origin 0 4096 0x31           # kernel exception (origin copy-out): no copy
origin 3000000 70000 0x32    # new copy-outs, unaligned, multi-chunk
snap 131072 100 0x41         # into a kernel snap-write exception
snap 3500000 10000 0x42      # new partial chunks
snap 1048576 65536 0x43      # over the kernel's copy-outs
origin 1048576 4096 0x33     # chunk with an exception
ozero 3900000 100000         # origin zero, copy-outs
szero 50000 20000            # snapshot zero, partial chunks
origin 4128768 65536 0x34    # snap-written at the end: no copy-out
snap 4194303 1 0x44          # the last byte
EOF
cp f8.txt f128.txt
cat > f1.txt <<'EOF'
origin 8192 4096 0x31        # 8 new exceptions: area 1
origin 1048576 1000 0x32     # kernel exceptions
snap 65536 512 0x41          # over a kernel copy-out
snap 200000 3000 0x42        # new, unaligned
origin 300000 40000 0x33     # 79 new copy-outs: areas 1..3
EOF

kstatus () { sed -n "s/^KDM-STATUS: $2: [0-9]* [0-9]* snapshot //p" "$1" | tail -n1; }

for cs in 8 128 1; do
  rm -f origin.img k.cow
  cp origin0.img origin.img
  truncate -s 4M k.cow
  # 1. The kernel writes a fresh COW.
  "$KDM" write origin.img k.cow $cs k$cs.txt | tee kdm-write.log
  if grep -q '^KDM-STATUS: kdm-snap: .* Invalid' kdm-write.log; then
    echo "$0: the kernel invalidated its own snapshot"; exit 1
  fi
  python3 model.py want_origin.img want_snap.img k$cs.txt
  cmp origin.img want_origin.img
  # nbdsnap reads what the kernel wrote and agrees on the status.
  nbdsnap_opt check k.cow
  nbdsnap_opt info k.cow
  [ "$(cow_status origin.img k.cow)" = "$(kstatus kdm-write.log kdm-snap)" ]

  # 2. The filter serves it, then writes more.
  python3 model.py want_origin2.img want_snap2.img k$cs.txt f$cs.txt
  nbdkit -U - --filter="$FILTER" file origin.img snapshot=k=k.cow \
    --run '
      set -e
      nbdcopy "nbd+unix:///k?socket=$unixsocket" view_snap.img
      nbdcopy "nbd+unix:///origin?socket=$unixsocket" view_origin.img
      python3 client.py "$unixsocket" f'$cs'.txt
      nbdcopy "nbd+unix:///k?socket=$unixsocket" view_snap2.img
      nbdcopy "nbd+unix:///origin?socket=$unixsocket" view_origin2.img'
  cmp view_snap.img want_snap.img
  cmp view_origin.img want_origin.img
  cmp view_snap2.img want_snap2.img
  cmp view_origin2.img want_origin2.img
  cmp origin.img want_origin2.img
  nbdsnap_opt check k.cow
  nbdsnap_opt info k.cow
  ours=$(cow_status origin.img k.cow)
  python3 "$(dirname "$KDM")/cowdump.py" k.cow | head -n 20 || true

  # 3. The kernel reads the extended COW: the model snapshot view.
  "$KDM" read origin.img k.cow $cs out.img | tee kdm-read.log
  cmp out.img want_snap2.img
  "$KDM" status origin.img k.cow $cs | tee kdm-status.log
  [ "$(kstatus kdm-status.log kdm-snap)" = "$ours" ]

  # 4. The kernel merges it.
  "$KDM" merge origin.img k.cow $cs | tee kdm-merge.log
  cmp origin.img want_snap2.img
done
