#!/usr/bin/env bash
# nbdkit-snapshot-filter: isolation between the origin and its snapshots,
# in both directions (device-mapper-test-suite consistency_tests.rb:
# snapshot_writes_do_not_affect_origin_{P,N} and
# origin_writes_do_not_affect_snapshot_{P,N}), over the file plugin.
#
# 4 KiB blocks are stamped with data derived from a random seed (the seed
# is in the first 16 bytes, as dmtest's PatternStomper writes it; the rest
# of the block is random too).  A python model of every device is kept in
# a local file and each export is read back whole with nbdcopy and compared
# byte for byte.  "Taking" a snapshot means starting nbdkit with a new,
# missing COW file.

source "$srcdir/functions.sh"
set -e
set -x

requires nbdkit --version
requires nbdsh --version
requires nbdcopy --version
requires python3 -c 'import nbd'
requires cmp --version
requires test -r "$FILTER"

enter_tmpdir

size=$((8 * 1024 * 1024))
sock=$tmp/sock

# stamp.py: run by nbdsh (handle h is connected to the device).
#   STAMP_MODEL  the local model file of that device (updated in place)
#   STAMP_FRAC   fraction of the 4 KiB blocks to stamp (mode blocks)
#   STAMP_SEED   seed of the random choices
#   STAMP_MODE   blocks: whole 4 KiB blocks, dmtest style
#                random: writes of 1 byte .. 12 KiB at any offset, crossing
#                        chunk boundaries (partial chunks)
cat > stamp.py <<'EOF'
import os, random
model = os.environ["STAMP_MODEL"]
frac = float(os.environ.get("STAMP_FRAC", "0.1"))
rng = random.Random(int(os.environ["STAMP_SEED"]))
mode = os.environ.get("STAMP_MODE", "blocks")
bs = 4096
size = h.get_size()
assert size == os.path.getsize(model), (size, os.path.getsize(model))
writes = []
if mode == "blocks":
    for b in rng.sample(range(size // bs), int(size // bs * frac)):
        seed = rng.getrandbits(128).to_bytes(16, "little")
        writes.append((b * bs, seed + random.Random(seed).randbytes(bs - 16)))
else:
    for _ in range(int(size // bs * frac)):
        n = rng.randint(1, 3 * bs)
        off = rng.randrange(0, size - n)
        writes.append((off, rng.randbytes(n)))
with open(model, "r+b") as m:
    for off, data in writes:
        h.pwrite(data, off)
        m.seek(off)
        m.write(data)
h.flush()
print("stamped", len(writes), "writes,", mode)
EOF

# stamp EXPORT MODEL FRAC SEED [MODE]
stamp ()
{
    STAMP_MODEL="$2" STAMP_FRAC="$3" STAMP_SEED="$4" STAMP_MODE="${5:-blocks}" \
        LIBNBD_DEBUG=0 \
        nbdsh -u "nbd+unix:///$1?socket=$sock" -c - < stamp.py
}

# check EXPORT MODEL: the whole export equals the model.
check ()
{
    rm -f out.img
    nbdcopy "nbd+unix:///$1?socket=$sock" out.img
    cmp out.img "$2"
}

n=0
serve ()
{
    n=$((n+1))
    rm -f "$sock"
    start_nbdkit -P "$tmp/pid.$n" -U "$sock" --filter="$FILTER" \
        file "$tmp/origin.img" "$@"
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

# A new origin with random contents (model: origin.model), stamped 20%
# through the filter with no snapshot.
new_origin ()
{
    python3 -c 'import random, sys
sys.stdout.buffer.write(random.Random(int(sys.argv[2])).randbytes(int(sys.argv[1])))' \
        $size $1 > origin.img
    cp origin.img origin.model
    serve
    stamp origin origin.model 0.2 $1
    check origin origin.model
    check "" origin.model
    stop
    cmp origin.img origin.model
}

for store in P N; do
    for cs in 4k 16k; do
        opts="snapshot-store=$store snapshot-chunk-size=$cs"

        # --- Snapshot writes do not affect the origin.
        new_origin 1
        cp origin.model take.model
        rm -f snap.cow
        serve snapshot=snap=$tmp/snap.cow $opts
        check snap take.model
        check origin take.model
        cp take.model snap.model
        stamp snap snap.model 0.1 2
        stamp snap snap.model 0.02 3 random
        check snap snap.model
        check "" snap.model   # the default export is the only snapshot
        check origin take.model
        if [ $store = P ]; then
            stop
            cmp origin.img take.model
            serve snapshot=snap=$tmp/snap.cow $opts
            check snap snap.model
            check origin take.model
        fi
        stop
        cmp origin.img take.model

        # --- Origin writes do not affect the snapshot.
        new_origin 4
        cp origin.model take.model
        rm -f snap.cow
        serve snapshot=snap=$tmp/snap.cow $opts
        check snap take.model
        stamp origin origin.model 0.1 5
        stamp origin origin.model 0.02 6 random
        check origin origin.model
        check snap take.model
        if [ $store = P ]; then
            stop
            cmp origin.img origin.model
            serve snapshot=snap=$tmp/snap.cow $opts
            check snap take.model
            check origin origin.model
        fi
        stop
        cmp origin.img origin.model

        # --- Both at once, two snapshots: origin writes must not copy out
        # over chunks s1 already holds, and s2 must keep the point in time.
        new_origin 7
        cp origin.model take.model
        rm -f s1.cow s2.cow
        serve snapshot=s1=$tmp/s1.cow snapshot=s2=$tmp/s2.cow $opts
        check "" take.model   # two snapshots: the default export is origin
        cp take.model s1.model
        stamp origin origin.model 0.1 8
        stamp s1 s1.model 0.1 9
        stamp s1 s1.model 0.02 10 random
        stamp origin origin.model 0.1 11
        stamp origin origin.model 0.02 12 random
        check origin origin.model
        check s1 s1.model
        check s2 take.model
        stop
        cmp origin.img origin.model
    done
done

# --- Odd sizes: an origin that ends inside a chunk (1 MiB + 1000 bytes,
# 64k chunks: the last chunk is partial; a write reaching the end covers a
# whole chunk), and a chunk larger than the whole origin (100 KiB, 1M
# chunks: dm's huge_chunk_size).  Random writes near the end, on both.
for spec in "$((1024 * 1024 + 1000)) 64k" "$((100 * 1024)) 1M"; do
    set -- $spec
    python3 -c 'import random, sys
sys.stdout.buffer.write(random.Random(13).randbytes(int(sys.argv[1])))' $1 \
        > origin.img
    cp origin.img take.model
    cp origin.img origin.model
    cp origin.img snap.model
    rm -f snap.cow
    serve snapshot=snap=$tmp/snap.cow snapshot-chunk-size=$2
    for e in origin snap; do
        MODEL=$e.model LIBNBD_DEBUG=0 nbdsh -u "nbd+unix:///$e?socket=$sock" -c '
import os, random
rng = random.Random(14)
size = h.get_size()
with open(os.environ["MODEL"], "r+b") as m:
    for _ in range(40):
        n = rng.randint(1, min(size, 70000))
        off = rng.randrange(max(0, size - 200000), size - n + 1)
        data = rng.randbytes(n)
        h.pwrite(data, off)
        m.seek(off)
        m.write(data)
    h.pwrite(b"T" * 10, size - 10)
    m.seek(size - 10)
    m.write(b"T" * 10)
    h.zero(500, size - 500)
    m.seek(size - 500)
    m.write(bytes(500))
' < /dev/null
        if [ $e = origin ]; then check snap take.model; fi
    done
    check origin origin.model
    check snap snap.model
    stop
    cmp origin.img origin.model
    serve snapshot=snap=$tmp/snap.cow
    check snap snap.model
    stop
done
