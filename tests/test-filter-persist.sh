#!/usr/bin/env bash
# nbdkit-snapshot-filter: a persistent (P) snapshot survives restarts
# (lvm2 snapshot-reactivate.sh: the snapshot's checksum is stable across
# deactivate/activate cycles and origin writes of odd sizes).
#
# For chunk sizes 4k and 64k: write to the origin and the snapshot with
# qemu-io (the same qemu-io commands are applied to local model files),
# compare with qemu-img compare, stop nbdkit (SIGTERM, or --run ending),
# restart with the same files and check that the sha256 of both exports is
# unchanged; three restart cycles, each adding writes.  One restart gives a
# different snapshot-chunk-size: the COW header's chunk size must win.

source "$srcdir/functions.sh"
set -e
set -x

requires nbdkit --version
requires nbdcopy --version
requires nbdinfo --version
requires qemu-io --version
requires qemu-img --version
requires python3 --version
requires sha256sum --version
requires test -r "$FILTER"

enter_tmpdir

size=$((4 * 1024 * 1024))
sock=$tmp/sock

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

uri () { echo "nbd+unix:///$1?socket=$sock"; }

# qio EXPORT MODEL CMD...: run the qemu-io commands on the export and on
# its model file.
qio ()
{
    local export=$1 model=$2 c
    local args=()
    shift 2
    for c in "$@"; do args+=(-c "$c"); done
    qemu-io -f raw "$(uri $export)" "${args[@]}"
    qemu-io -f raw "$model" "${args[@]}"
}

# compare EXPORT MODEL
compare ()
{
    qemu-img compare -f raw -F raw "$2" "$(uri $1)"
}

# sums: the sha256 of both exports, read with nbdcopy, on stdout.
sums ()
{
    local e
    for e in origin snap; do
        rm -f out.img
        nbdcopy "$(uri $e)" out.img
        sha256sum < out.img | cut -d' ' -f1
    done
}

# header_chunk COWFILE: the chunk size (bytes) in the kernel COW header.
header_chunk ()
{
    python3 -c 'import struct, sys
magic, valid, version, cs = struct.unpack("<4I", open(sys.argv[1], "rb").read(16))
assert magic == 0x70416e53 and version == 1, (hex(magic), version)
print(cs * 512)' "$1"
}

# preferred EXPORT: the preferred block size, which the filter sets to the
# snapshot's chunk size.
preferred ()
{
    nbdinfo --json "$(uri $1)" |
        python3 -c 'import json, sys
print(json.load(sys.stdin)["exports"][0]["block_size_preferred"])'
}

for cs in 4096 65536; do
    if [ $cs = 4096 ]; then other=65536; else other=4096; fi
    python3 -c 'import random, sys
sys.stdout.buffer.write(random.Random(int(sys.argv[2])).randbytes(int(sys.argv[1])))' \
        $size $cs > origin.img
    cp origin.img origin.model
    cp origin.img snap.model
    rm -f snap.cow

    # Cycle 0: a new snapshot.
    serve snapshot=snap=$tmp/snap.cow snapshot-chunk-size=$cs
    test "$(header_chunk snap.cow)" = $cs
    test "$(preferred snap)" = $cs
    qio origin origin.model 'write -P 0x55 0 64k' 'write -P 0x56 70000 5000' \
        'write -P 0x57 1234567 1234567'
    qio snap snap.model 'write -P 0xaa 32k 64k' 'write -P 0xab 1000000 300' \
        'write -z 2M 100k'
    compare origin origin.model
    compare snap snap.model
    sums > sums.expected
    stop
    cmp origin.img origin.model

    for cycle in 1 2 3; do
        # Cycle 2 restarts with the other chunk size: the header wins.
        if [ $cycle = 2 ]; then ccs=$other; else ccs=$cs; fi
        serve snapshot=snap=$tmp/snap.cow snapshot-chunk-size=$ccs
        test "$(header_chunk snap.cow)" = $cs
        test "$(preferred snap)" = $cs
        sums > sums.actual
        diff -u sums.expected sums.actual
        compare origin origin.model
        compare snap snap.model

        # More writes, on new chunks and on chunks already in the COW,
        # with odd sizes.
        p=$((cycle * 16))
        qio origin origin.model "write -P $((p+1)) $((cycle * 300001)) 77777" \
            "write -P $((p+2)) 0 4k"
        qio snap snap.model "write -P $((p+3)) $((cycle * 500009)) 99999" \
            "write -P $((p+4)) 40k 1k"
        compare origin origin.model
        compare snap snap.model
        sums > sums.expected
        stop
        cmp origin.img origin.model
    done

    # A last restart where nbdkit is stopped by --run finishing.
    rm -f ro.img rs.img
    nbdkit -U - --filter="$FILTER" file "$tmp/origin.img" \
        snapshot=snap=$tmp/snap.cow snapshot-chunk-size=$other \
        --run 'nbdcopy "nbd+unix:///origin?socket=$unixsocket" ro.img &&
               nbdcopy "nbd+unix:///snap?socket=$unixsocket" rs.img'
    cmp ro.img origin.model
    cmp rs.img snap.model
    test "$(header_chunk snap.cow)" = $cs
done
