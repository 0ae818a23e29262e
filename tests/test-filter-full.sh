#!/usr/bin/env bash
# nbdkit-snapshot-filter: a full COW file, with dm's semantics (lvm2
# snapshot-cow-reduce.sh, snapshot-autoumount-dmeventd.sh; the kernel's
# "add new persistent store option to support overflow").
#
# snapshot-cow-size=64k with 4 KiB chunks: a P store holds a header chunk,
# one metadata area and 14 data chunks; an N store 16 data chunks.
#  P:  128 KiB of origin writes overflow it: the origin writes succeed and
#      the origin is right; the snapshot is Invalid (nbdinfo --list), its
#      reads and writes fail with EIO, and it is still Invalid after a
#      restart.  Snapshot writes past the cap: the same (lvm2
#      snapshot-cow-reduce.sh).
#  PO: snapshot writes beyond the cap fail with ENOSPC, then every snapshot
#      write does (dm: snapshot_overflowed); reads go on and return what was
#      written; status Overflow.  After a restart: valid again, chunks in
#      the COW can be rewritten, a new chunk overflows again.  A trim of an
#      overflowed snapshot changes nothing.  An origin
#      write that needs a copy-out to the full store invalidates it (dm).
#  N:  full -> Invalid, origin unharmed.
#  Exactly the maximum size (lvm2 snapshot-maxsize.sh, dmtest's
#  max_snapshot_size: cs * (1 + ceil((N+1)/epa) + N) = 259 chunks for a
#  1 MiB origin): a full overwrite of the origin, or of the snapshot, keeps
#  it valid; one chunk less (no room for the next, terminating metadata
#  area) makes the last exception fail: Invalid.
# The COW file never grows beyond the cap.

source "$srcdir/functions.sh"
set -e
set -x

requires nbdkit --version
requires nbdsh --version
requires nbdcopy --version
requires nbdinfo --version
requires python3 -c 'import nbd'
requires test -r "$FILTER"

enter_tmpdir

size=$((1024 * 1024))
cap=$((64 * 1024))
sock=$tmp/sock

n=0
serve ()
{
    n=$((n+1))
    rm -f "$sock"
    start_nbdkit -P "$tmp/pid.$n" -U "$sock" --filter="$FILTER" \
        file "$tmp/origin.img" snapshot=s=$tmp/s.cow \
        snapshot-chunk-size=4k snapshot-cow-size=${cowsize:-64k} "$@"
}
# SIGTERM, and wait until nbdkit has exited.  The daemon's parent is PID 1,
# which may be slow to reap it: a zombie has exited (and closed its files).
stop ()
{
    local pid i
    pid="$(cat "$tmp/pid.$n")"
    kill "$pid"
    for i in {1..600}; do
        if ! kill -0 "$pid" 2>/dev/null ||
           grep -q '^[0-9]* (.*) Z' "/proc/$pid/stat" 2>/dev/null; then
            return 0
        fi
        sleep 0.05
    done
    echo "$0: nbdkit $pid did not exit on SIGTERM"
    exit 1
}
uri () { echo "nbd+unix:///$1?socket=$sock"; }

# status EXPORT: the status part (after the last ": ") of the export's
# description in nbdinfo --list.
status ()
{
    nbdinfo --list --json "$(uri origin)" |
        python3 -c 'import json, sys
for e in json.load(sys.stdin)["exports"]:
    if e["export-name"] == sys.argv[1]:
        print(e["description"].rsplit(": ", 1)[1])' "$1"
}

# check EXPORT MODEL
check ()
{
    rm -f out.img
    nbdcopy "$(uri $1)" out.img
    cmp out.img "$2"
}

# run_py EXPORT: runs the python on stdin in nbdsh connected to EXPORT.
# It gets a helper expect_error(errno, fn, *args).
run_py ()
{
    { cat <<'EOF'
def expect_error(errno, fn, *args):
    try:
        fn(*args)
    except nbd.Error as ex:
        assert ex.errno == errno, (ex.errno, errno, str(ex))
        return
    assert False, "%s%r did not fail" % (fn.__name__, args)
EOF
      cat
    } > script.py
    nbdsh -u "$(uri $1)" -c - < script.py
}

new_origin ()
{
    python3 -c 'import random, sys
sys.stdout.buffer.write(random.Random(int(sys.argv[2])).randbytes(int(sys.argv[1])))' \
        $size $1 > origin.img
    cp origin.img take.model
    cp origin.img origin.model
    rm -f s.cow
}

# Writes 128 KiB (32 chunks) to the origin at 256 KiB, in 4 KiB pieces.
origin_128k ()
{
    run_py origin <<'EOF'
with open("origin.model", "r+b") as m:
    for i in range(32):
        data = bytes([0x40 + i]) * 4096
        h.pwrite(data, 256 * 1024 + i * 4096)
        m.seek(256 * 1024 + i * 4096)
        m.write(data)
h.flush()
EOF
}

# ---------------------------------------------------------------- P and N
for store in P N; do
    new_origin 1
    serve snapshot-store=$store
    test "$(status s)" != Invalid
    check s take.model
    origin_128k
    check origin origin.model
    test "$(status s)" = Invalid
    run_py s <<'EOF'
expect_error("EIO", h.pread, 4096, 0)
expect_error("EIO", h.pread, 512, 300 * 1024)
expect_error("EIO", h.pwrite, b"x" * 4096, 0)
EOF
    # The origin goes on working.
    run_py origin <<'EOF'
with open("origin.model", "r+b") as m:
    for off in (0, 600 * 1024, 256 * 1024 + 100):
        h.pwrite(b"after" * 100, off)
        m.seek(off)
        m.write(b"after" * 100)
EOF
    check origin origin.model
    stop
    cmp origin.img origin.model
    test "$(stat -c %s s.cow)" -le $cap

    if [ $store = P ]; then
        # Invalid is persistent (the header's valid field is 0).
        python3 -c 'import struct, sys
assert struct.unpack("<4I", open("s.cow", "rb").read(16))[:3] == (0x70416e53, 0, 1)'
        serve snapshot-store=P
        test "$(status s)" = Invalid
        run_py s <<'EOF'
expect_error("EIO", h.pread, 4096, 0)
EOF
        check origin origin.model
        stop
    fi
done

# P, overflowed by snapshot writes (lvm2 snapshot-cow-reduce.sh: dd to the
# snapshot past its COW: the write fails and the snapshot is Invalid).
new_origin 5
serve snapshot-store=P
run_py s <<'EOF'
for i in range(14):
    h.pwrite(bytes([0x70 + i]) * 4096, 512 * 1024 + i * 4096)
expect_error("EIO", h.pwrite, b"y" * 4096, 512 * 1024 + 14 * 4096)
expect_error("EIO", h.pread, 4096, 512 * 1024)
EOF
test "$(status s)" = Invalid
check origin take.model
stop
test "$(stat -c %s s.cow)" -le $cap
cmp origin.img take.model

# ---------------------------------------------------------------- PO
new_origin 2
cp take.model snap.model
serve snapshot-store=PO
# Fill the snapshot chunk by chunk from 512 KiB: 14 data chunks fit.
run_py s <<'EOF'
written = 0
with open("snap.model", "r+b") as m:
    for i in range(40):
        data = bytes([0x60 + i]) * 4096
        try:
            h.pwrite(data, 512 * 1024 + i * 4096)
        except nbd.Error as ex:
            assert ex.errno == "ENOSPC", ex
            break
        m.seek(512 * 1024 + i * 4096)
        m.write(data)
        written += 1
print("written before overflow:", written)
assert written == 14, written
# Overflowed: every snapshot write fails now, even to a chunk in the COW.
expect_error("ENOSPC", h.pwrite, b"y" * 4096, 512 * 1024)
expect_error("ENOSPC", h.pwrite, b"y" * 100, 0)
expect_error("ENOSPC", h.zero, 4096, 512 * 1024)
# A trim (advisory) changes nothing either (before: it zeroed the chunks
# in the COW, as dm, which fails every write to an overflowed snapshot,
# would not).
h.trim(8192, 512 * 1024)
EOF
test "$(status s)" = Overflow
check s snap.model
check origin take.model
stop
test "$(stat -c %s s.cow)" -le $cap
cmp origin.img take.model

# After a restart: not overflowed; chunks in the COW can be rewritten, a
# new chunk overflows it again.
serve snapshot-store=PO
test "$(status s)" != Overflow
test "$(status s)" != Invalid
check s snap.model
run_py s <<'EOF'
with open("snap.model", "r+b") as m:
    h.pwrite(b"z" * 1000, 512 * 1024 + 10)
    m.seek(512 * 1024 + 10)
    m.write(b"z" * 1000)
expect_error("ENOSPC", h.pwrite, b"y" * 4096, 0)
EOF
check s snap.model
test "$(status s)" = Overflow
# An origin write that needs a copy-out to the full store invalidates the
# snapshot (dm: origin writes never fail for a snapshot's sake).
run_py origin <<'EOF'
with open("origin.model", "r+b") as m:
    h.pwrite(b"o" * 4096, 0)
    m.seek(0)
    m.write(b"o" * 4096)
EOF
check origin origin.model
test "$(status s)" = Invalid
run_py s <<'EOF'
expect_error("EIO", h.pread, 4096, 512 * 1024)
EOF
stop
cmp origin.img origin.model
test "$(stat -c %s s.cow)" -le $cap

# ---------------------------------------------------------------- max size
for exp in origin s; do
    new_origin 3
    cp take.model snap.model
    cowsize=$((259 * 4096)) serve
    EXP=$exp run_py $exp <<'EOF'
import os
model = "origin.model" if os.environ["EXP"] == "origin" else "snap.model"
with open(model, "r+b") as m:
    for i in range(256):
        data = bytes([i]) * 4096
        h.pwrite(data, i * 4096)
        m.seek(i * 4096)
        m.write(data)
h.flush()
EOF
    test "$(status s)" != Invalid
    check origin origin.model
    check s snap.model
    stop
    test "$(stat -c %s s.cow)" -le $((259 * 4096))
    cowsize=$((259 * 4096)) serve
    test "$(status s)" != Invalid
    check origin origin.model
    check s snap.model
    stop
done

new_origin 4
cowsize=$((258 * 4096)) serve
run_py origin <<'EOF'
with open("origin.model", "r+b") as m:
    for i in range(256):
        h.pwrite(b"m" * 4096, i * 4096)
    m.write(b"m" * 256 * 4096)
EOF
check origin origin.model
test "$(status s)" = Invalid
stop
