#!/usr/bin/env bash
# A COW on a block device (a 256 KiB loop device; skipped where losetup is
# not permitted) is full at the device's end, without snapshot-cow-size,
# as in dm: the status line's total is the device's size (512 sectors),
# and a full store behaves as under the cap.
#  * P and N: sixteen 64 KiB origin writes to a 1 MiB origin (4 KiB
#    chunks, 64 data chunks needed, 62 on the device) all succeed and
#    reach the origin; the snapshot becomes Invalid, as the kernel's does
#    (kdm.sh write: "Invalidating snapshot: Unable to allocate
#    exception"). Before, the store handed out chunks past the device's
#    end and 13 of the writes failed with ENOSPC, for ever, while the
#    snapshot stayed valid.
#  * PO: snapshot writes fail with ENOSPC once the device is full, the
#    status says Overflow, what was written still reads back.
source "$srcdir/functions.sh"
set -e
set -x

requires nbdkit --version
requires nbdsh --version
requires nbdinfo --version
requires python3 -c 'import nbd'
requires losetup --version

enter_tmpdir

truncate -s 256K dev.img
dev=$(losetup -f --show dev.img) || {
    echo "$0: losetup is not permitted here: test skipped"
    exit 77
}
cleanup_fn losetup -d "$dev"

# ./status EXPORT SOCKET: the status part of the export's description.
cat > status <<'SH'
#!/bin/sh
nbdinfo --list --json "nbd+unix:///origin?socket=$2" |
    python3 -c 'import json, sys
for e in json.load(sys.stdin)["exports"]:
    if e["export-name"] == sys.argv[1]:
        print(e["description"].rsplit(": ", 1)[1])' "$1"
SH
chmod +x status

for store in P N; do
    dd if=/dev/zero of="$dev" bs=64k count=4 conv=fsync status=none
    python3 -c 'open("origin.img", "wb").write(b"o" * (1 << 20))'
    export store
    nbdkit -U - --filter="$FILTER" file origin.img snapshot=s="$dev" \
        snapshot-chunk-size=4k snapshot-store=$store --run '
      set -e
      if [ $store = P ]; then want="16/512 16"; else want="0/512 0"; fi
      [ "$(./status s "$unixsocket")" = "$want" ]
      nbdsh -u "nbd+unix:///origin?socket=$unixsocket" -c "
for i in range(16):
    h.pwrite(b\"n\" * 65536, i * 65536)
h.flush()
"
      [ "$(./status s "$unixsocket")" = Invalid ]'
    cmp origin.img <(python3 -c 'import sys; sys.stdout.buffer.write(b"n" * (1 << 20))')
done

dd if=/dev/zero of="$dev" bs=64k count=4 conv=fsync status=none
python3 -c 'open("origin.img", "wb").write(b"o" * (1 << 20))'
nbdkit -U - --filter="$FILTER" file origin.img snapshot=s="$dev" \
    snapshot-chunk-size=4k snapshot-store=PO --run '
  set -e
  [ "$(./status s "$unixsocket")" = "16/512 16" ]
  nbdsh -u "nbd+unix:///s?socket=$unixsocket" -c "
n = 0
while True:
    try:
        h.pwrite(bytes([n + 1]) * 4096, n * 4096)
    except nbd.Error as e:
        assert e.errno == \"ENOSPC\", e
        break
    n += 1
    assert n < 256, n
assert n == 62, n
h.flush()
for i in range(n):
    assert h.pread(4096, i * 4096) == bytes([i + 1]) * 4096, i
assert h.pread(4096, n * 4096) == b\"o\" * 4096
"
  [ "$(./status s "$unixsocket")" = Overflow ]'
