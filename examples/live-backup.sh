#!/usr/bin/env bash
# Workflow 2, a point-in-time backup of a live disk: the VM keeps writing
# the origin export while a backup job copies a frozen snapshot, which is
# then dropped.
set -euo pipefail
filter=${FILTER:-snapshot}
work=$(mktemp -d); cd "$work"
trap 'kill $vm 2>/dev/null || true; kill $(cat pid) 2>/dev/null || true; rm -rf "$work"' EXIT
vm=
head -c 32M /dev/urandom > disk.img

nbdkit -P pid -U "$work/nbd.sock" --filter="$filter" file disk.img \
  snapshot-control="$work/ctl"
while [ ! -S "$work/ctl" ]; do sleep 0.05; done

# The "VM": writes all over the disk, all the time.
nbdsh -u "nbd+unix:///origin?socket=$work/nbd.sock" -c '
import random, itertools
for i in itertools.count():
    h.pwrite(bytes([i % 256]) * 65536, random.randrange(512) * 65536)
' &
vm=$!
sleep 0.5

# Take the snapshot, copy it, and record what the disk was at that moment.
nbdsnap -c "$work/ctl" take backup "$work/backup.cow"
nbdcopy "nbd+unix:///backup?socket=$work/nbd.sock" backup.img
nbdcopy "nbd+unix:///backup?socket=$work/nbd.sock" backup-again.img
cmp backup.img backup-again.img       # frozen while the VM writes
nbdsnap -c "$work/ctl" drop backup
rm backup.cow
kill $vm; wait $vm 2>/dev/null || true; vm=
echo OK
