#!/usr/bin/env bash
# nbdkit-snapshot-filter on a full disk: the file system under the COW file
# (a small tmpfs, mounted in a private mount namespace) fills up while a
# snapshot is written. Only the writes that found no room fail (ENOSPC);
# the flush after them commits the rest, the snapshot stays valid and
# readable, an origin write that would need a copy-out is refused with
# ENOSPC and changes nothing, and a restart on the full disk serves the
# same data. Before, the commit after the failed write grew the file over
# the failed chunk, failed in turn, and ended the snapshot (P and PO).
#
# Each case runs for 4 KiB chunks (a metadata area every 256 chunks, so
# the disk also runs out where the next area goes) and 64 KiB chunks, and
# for the transient (N) store, which must zero its file when it stops,
# the part written by the failed write included.

source "$srcdir/functions.sh"
set -e
set -x

requires nbdkit --version
requires nbdsh --version
requires nbdinfo --version
requires python3 -c 'import nbd'
requires unshare -rm sh -c \
    'd=$(mktemp -d) && mount -t tmpfs -o size=64k tmpfs "$d" && umount "$d" && rmdir "$d"'

# Everything below runs as root of a private user and mount namespace.
if [ -z "${SNAP_IN_MOUNT_NS:-}" ]; then
    SNAP_IN_MOUNT_NS=1 exec unshare -rm bash "$0" "$@"
fi

enter_tmpdir
export tmp

# run CHUNK STORE SIZE_KIB: one case on a tmpfs of SIZE_KIB.
run() {
    local cs=$1 store=$2 kib=$3
    mkdir -p "$tmp/disk"
    mount -t tmpfs -o size=${kib}k tmpfs "$tmp/disk"
    cleanup_fn umount -l "$tmp/disk"
    python3 -c 'open("origin.img", "wb").write(b"o" * (4 << 20))'
    export cs
    nbdkit -U - --filter="$FILTER" file origin.img snapshot=s=$tmp/disk/s.cow \
        snapshot-chunk-size=$cs snapshot-store=$store --run '
      set -e
      nbdsh -u "nbd+unix:///s?socket=$unixsocket" -c "
import os
cs = int(os.environ[\"cs\"][:-1]) * 1024
n = 0
while True:
    try:
        h.pwrite(bytes([n % 250 + 1]) * cs, n * cs)
    except nbd.Error as e:
        assert e.errno == \"ENOSPC\", e
        break
    n += 1
assert 0 < n < (4 << 20) // cs, n
h.flush()
for i in range(n):
    assert h.pread(cs, i * cs) == bytes([i % 250 + 1]) * cs, i
# Nothing was written where the write failed.
assert h.pread(cs, n * cs) == b\"o\" * cs
open(\"written\", \"w\").write(str(n))
"
      nbdsh -u "nbd+unix:///origin?socket=$unixsocket" -c "
try:
    h.pwrite(b\"N\" * 4096, (4 << 20) - 4096)
    raise SystemExit(\"an origin write needing a copy-out went through\")
except nbd.Error as e:
    assert e.errno == \"ENOSPC\", e
h.flush()
assert h.pread(4096, (4 << 20) - 4096) == b\"o\" * 4096
"
      nbdinfo --list "nbd+unix:///?socket=$unixsocket" > list.txt'
    cat list.txt
    grep -q "snapshot s (.*$store store" list.txt
    if grep -q "Invalid" list.txt; then
        echo "$0: the snapshot was invalidated on a full disk"; exit 1
    fi
    # A restart on the still full disk serves the same snapshot; a
    # transient (N) one starts empty, its file (failed write included)
    # zeroed and taken again.
    export store
    nbdkit -U - --filter="$FILTER" file origin.img snapshot=s=$tmp/disk/s.cow \
        snapshot-store=$store snapshot-chunk-size=$cs --run '
      nbdsh -u "nbd+unix:///s?socket=$unixsocket" -c "
import os
cs = int(os.environ[\"cs\"][:-1]) * 1024
n = int(open(\"written\").read())
if os.environ[\"store\"] == \"N\":
    assert h.pread(4 << 20, 0) == b\"o\" * (4 << 20)
for i in range(n if os.environ[\"store\"] != \"N\" else 0):
    assert h.pread(cs, i * cs) == bytes([i % 250 + 1]) * cs, i
"'
    umount "$tmp/disk"
}

# 4 KiB chunks: header, area 0 and its 256 chunks take 1032 KiB; the
# disk fills around the next area.
for kib in 1028 1032 1036 1040; do
    for store in P PO; do run 4k $store $kib; done
done
for store in P PO N; do run 64k $store 1200; done
run 4k N 1032

# take on a full disk: refused with the reason, and the file it began is
# gone; once there is room, the same take works.
mkdir -p "$tmp/disk"
mount -t tmpfs -o size=256k tmpfs "$tmp/disk"
head -c 200000 /dev/zero > "$tmp/disk/filler"
nbdkit -U - --filter="$FILTER" file origin.img \
    snapshot-control="$tmp/ctl" --run '
  take() {
    python3 "$srcdir/control_client.py" "$tmp/ctl" take t "$tmp/disk/t.cow" || true
  }
  take > take1.out
  ls -la "$tmp/disk" > ls1.out
  rm "$tmp/disk/filler"
  take > take2.out'
cat take1.out ls1.out take2.out
grep -q "^ERR .*No space left on device" take1.out
absent "t.cow" ls1.out
grep -q "^OK" take2.out
umount "$tmp/disk"
