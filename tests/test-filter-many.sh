#!/usr/bin/env bash
# nbdkit-snapshot-filter: many snapshots of one origin, with mixed chunk
# sizes, under parallel origin writes (device-mapper-test-suite
# create_lots_of_snaps, parallel_io_to_many_snaps; lvm2: many snapshots with
# different chunk sizes).
#
# 20 COW files are made beforehand with chunk sizes 4k, 8k and 64k (with
# nbdsnap create when it is built, else by starting nbdkit once per chunk
# size); the server is then started with a different snapshot-chunk-size,
# which each header must override.  Several clients write the origin at
# once (each with many requests in flight, on interleaved 4 KiB blocks so
# that they race on the same chunks), while nbdcopy backs up some snapshots.
# Every snapshot must still equal the origin from before the writes
# (sha256), the origin must equal the model, also after a restart.

source "$srcdir/functions.sh"
set -e
set -x

requires nbdkit --version
requires nbdsh --version
requires nbdcopy --version
requires nbdinfo --version
requires python3 -c 'import nbd'
requires sha256sum --version
requires test -r "$FILTER"

enter_tmpdir

size=$((8 * 1024 * 1024))
nsnaps=20
writers=4
sock=$tmp/sock

python3 -c 'import random, sys
sys.stdout.buffer.write(random.Random(1).randbytes(int(sys.argv[1])))' \
    $size > origin.img
cp origin.img origin.model
before="$(sha256sum < origin.img | cut -d' ' -f1)"

# snapshot i has chunk size cs[i % 3].
cs=(4096 8192 65536)
snaps=()
for ((i = 0; i < nsnaps; i++)); do
    snaps+=(snapshot=s$i=$tmp/s$i.cow)
done

# Make the COW files.
if [ -x "$NBDSNAP" ]; then
    for ((i = 0; i < nsnaps; i++)); do
        "$NBDSNAP" create --chunk-size ${cs[i % 3]} s$i.cow
    done
else
    echo "$0: $NBDSNAP is not built: making the COW files with nbdkit"
    for c in 0 1 2; do
        args=()
        for ((i = c; i < nsnaps; i += 3)); do args+=("${snaps[i]}"); done
        nbdkit -U - --filter="$FILTER" file origin.img "${args[@]}" \
            snapshot-chunk-size=${cs[c]} --run 'nbdinfo --list "$uri"'
    done
fi
for ((i = 0; i < nsnaps; i++)); do
    python3 -c 'import struct, sys
magic, valid, version, cs = struct.unpack("<4I", open(sys.argv[1], "rb").read(16))
assert (magic, valid, version, cs * 512) == (0x70416e53, 1, 1, int(sys.argv[2])), \
    (hex(magic), valid, version, cs)' s$i.cow ${cs[i % 3]}
done
cmp origin.img origin.model

n=0
serve ()
{
    n=$((n+1))
    rm -f "$sock"
    start_nbdkit -P "$tmp/pid.$n" -U "$sock" --filter="$FILTER" \
        file "$tmp/origin.img" "${snaps[@]}" snapshot-chunk-size=16k
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

# same_as_before FILE: FILE is the origin from before the writes; if not,
# list the 4 KiB blocks that differ, and fail.
same_as_before ()
{
    if [ "$(sha256sum < "$1" | cut -d' ' -f1)" != "$before" ]; then
        python3 -c 'import random, sys
a = open(sys.argv[1], "rb").read()
b = random.Random(1).randbytes(int(sys.argv[2]))
bad = [i for i in range(len(b) // 4096)
       if a[i * 4096:(i + 1) * 4096] != b[i * 4096:(i + 1) * 4096]]
print("%s: %d blocks differ from the point in time: %r" % (sys.argv[3], len(bad), bad[:20]))
for i in bad[:5]:
    blk = a[i * 4096:(i + 1) * 4096]
    print("  block %d: %s" % (i, "all zeros" if not any(blk) else "other data"))
' "$1" $size "$2"
        return 1
    fi
}

# check_all: every snapshot holds the origin from before the writes.
check_all ()
{
    local i
    for ((i = 0; i < nsnaps; i++)); do
        rm -f out.img
        nbdcopy "$(uri s$i)" out.img
        same_as_before out.img s$i
    done
}

serve

# Every snapshot is exported, with its header's chunk size.
nbdinfo --list --json "$(uri origin)" > list.json
python3 - "$nsnaps" > list.out <<'EOF'
import json, sys
n = int(sys.argv[1])
cs = [4096, 8192, 65536]
exports = {e["export-name"]: e for e in json.load(open("list.json"))["exports"]}
assert set(exports) == {"origin"} | {"s%d" % i for i in range(n)}, sorted(exports)
for i in range(n):
    e = exports["s%d" % i]
    assert e["block_size_preferred"] == cs[i % 3], (i, e)
    print(e["export-name"], e["description"])
# The origin splits writes at the smallest chunk size.
assert exports["origin"]["block_size_preferred"] == 4096, exports["origin"]
EOF
cat list.out
check_all

# The writers: client k writes the 4 KiB blocks b with b % writers == k,
# half of them, in random order, up to 16 requests in flight, and records
# what it wrote in the model (disjoint ranges: no two clients touch the
# same byte, but they share every chunk).
cat > writer.py <<'EOF'
import os, random
k, writers = int(os.environ["K"]), int(os.environ["WRITERS"])
rng = random.Random(100 + k)
bs = 4096
size = h.get_size()
mine = [b for b in range(size // bs) if b % writers == k]
blocks = rng.sample(mine, len(mine) // 2)
fd = os.open("origin.model", os.O_WRONLY)
pending = []
def reap():
    global pending
    # aio_command_completed raises nbd.Error if the write failed.
    pending = [(c, bf) for c, bf in pending if not h.aio_command_completed(c)]
for b in blocks:
    data = rng.randbytes(bs)
    buf = nbd.Buffer.from_bytearray(bytearray(data))
    pending.append((h.aio_pwrite(buf, b * bs), buf))
    os.pwrite(fd, data, b * bs)
    while h.aio_in_flight() >= 16:
        h.poll(-1)
    reap()
while h.aio_in_flight() > 0:
    h.poll(-1)
reap()
assert not pending
h.flush()
os.close(fd)
print("writer", k, "wrote", len(blocks), "blocks")
EOF

pids=()
for ((k = 0; k < writers; k++)); do
    K=$k WRITERS=$writers LIBNBD_DEBUG=0 \
        nbdsh -u "$(uri origin)" -c - < writer.py &
    pids+=($!)
done
# Backups of three snapshots with different chunk sizes while the origin
# is being written.
for i in 0 1 2; do
    nbdcopy "$(uri s$i)" backup$i.img &
    pids+=($!)
done
for p in "${pids[@]}"; do wait $p; done

for i in 0 1 2; do
    same_as_before backup$i.img "backup of s$i"
done
rm -f out.img
nbdcopy "$(uri origin)" out.img
cmp out.img origin.model
check_all
stop

cmp origin.img origin.model
serve
check_all
rm -f out.img
nbdcopy "$(uri origin)" out.img
cmp out.img origin.model
stop
