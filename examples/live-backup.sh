#!/usr/bin/env bash
# Workflow 2, a point-in-time backup of a live disk: a "VM" keeps writing the
# origin export while a snapshot taken through the control socket is copied
# with nbdcopy; the copy is the disk as it was at the take. Then the
# snapshot is dropped.
set -euo pipefail
filter=${FILTER:-snapshot}
work=$(mktemp -d); cd "$work"
vm=
trap '[ -z "$vm" ] || kill $vm 2>/dev/null; [ ! -s pid ] || kill $(cat pid); rm -rf "$work"' EXIT
head -c 16M /dev/urandom > disk.img
cp disk.img disk-at-start.img

# ctl COMMAND...: one command on the control socket (nbdsnap -c ctl ...
# does the same); prints the reply, fails on ERR.
ctl () {
  python3 -c '
import socket, sys
s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1])
s.sendall((" ".join(sys.argv[2:]) + "\n").encode()); r = b""
while not (r.endswith(b"OK\n") or b"ERR" in r): r += s.recv(4096) or sys.exit(r)
print(r.decode(), end=""); sys.exit(b"ERR" in r)' "$work/ctl" "$@"
}

nbdkit -P pid -U "$work/nbd.sock" --filter="$filter" file disk.img \
  snapshot-control="$work/ctl"
while [ ! -S "$work/ctl" ]; do sleep 0.1; done

# The "VM": sweeps over the disk writing 64 KiB blocks, each stamped with
# its sequence number, one at a time, until told to stop.
nbdsh -u "nbd+unix:///origin?socket=$work/nbd.sock" -c '
import os, itertools
for seq in itertools.count(1):
    if os.path.exists("stop"): break
    h.pwrite(b"seq %08d " % seq + b"-" * 65523, (seq % 256) * 65536)
' &
vm=$!
sleep 1

# Take the snapshot and copy it while the VM goes on writing.
ctl take backup "$work/backup.cow"
nbdcopy "nbd+unix:///backup?socket=$work/nbd.sock" backup.img
touch stop; wait $vm; vm=
ctl drop backup
rm backup.cow

# The backup is the disk after the VM's first k writes, for one k: block b
# holds the newest write seq <= k with seq % 256 == b, or its old data.
python3 - <<'PY'
start = open("disk-at-start.img", "rb").read()
backup = open("backup.img", "rb").read()
B = 65536
blocks = [backup[i:i + B] for i in range(0, len(backup), B)]
stamps = [int(b[4:12]) for b in blocks if b.startswith(b"seq ")]
k = max(stamps)
for b, data in enumerate(blocks):
    last = k - (k - b) % 256   # newest seq <= k writing block b
    want = (b"seq %08d " % last + b"-" * 65523) if last >= 1 else start[b * B:(b + 1) * B]
    assert data == want, "block %d is not the disk at write %d" % (b, k)
print("backup = the disk after write", k)
PY
echo OK
