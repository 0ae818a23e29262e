#!/usr/bin/env bash
# Records for origin chunks past the origin's end (a damaged COW, or one
# of another origin), with 4 KiB chunks and a 32 KiB origin (chunks 0-7):
#  * 2^52+1 -> 2: old_chunk << 12 wrapped to 4096, and the merge wrote
#    the COW chunk over origin chunk 1. Now the merge fails before
#    writing anything, as the kernel's does (kdm.sh merge: "Merge
#    failed"), naming the chunk: snapshot-merge-exit=true exits 1, the
#    origin and the COW unchanged.
#  * 7 -> 2, 8 -> 3, one run reaching past the end: the same, and origin
#    chunk 7 is not written either.
#  * 3 -> 2, 2^64-1 -> 3: served without a merge, the snapshot reads as
#    the origin with chunk 3 from the COW (the other record is out of
#    reach) and its extents cover the export; the merge fails as above
#    (it used to hang: the chunk lock's range ended at 2^64-1).
source "$srcdir/functions.sh"
set -e
set -x

requires nbdkit --version
requires nbdsh --version
requires python3 -c 'import nbd'
requires timeout --version

enter_tmpdir
sock=$tmp/sock

failed=0
fail () { echo "FAIL: $*"; failed=$((failed + 1)); }

# make_cow FILE OLD:NEW...: a 4k-chunk COW with these records in area 0,
# COW chunk c filled with byte c.
make_cow () {
    python3 - "$@" <<'PY'
import struct, sys
cb = 4096
out, recs = sys.argv[1], [tuple(map(int, r.split(":"))) for r in sys.argv[2:]]
img = bytearray(8 * cb)
img[0:16] = struct.pack("<IIII", 0x70416e53, 1, 1, 8)
for i, (o, n) in enumerate(recs):
    img[cb + 16 * i:cb + 16 * i + 16] = struct.pack("<QQ", o, n)
    img[n * cb:(n + 1) * cb] = bytes([n]) * cb
open(out, "wb").write(img)
PY
}

# merge_fails NAME CHUNK: the merge of NAME.cow exits 1, naming CHUNK,
# and changes neither the origin nor the COW.
merge_fails () {
    local name=$1 chunk=$2 rc=0
    python3 -c 'open("origin.img", "wb").write(bytes(range(0x80, 0x88)) * 4096)'
    cp origin.img origin-before.img
    cp $name.cow $name-before.cow
    rm -f "$sock"
    timeout -k 10 30 nbdkit -f -U "$sock" --filter="$FILTER" file origin.img \
        snapshot=$name=$name.cow snapshot-merge=$name \
        snapshot-merge-exit=true 2> $name.log || rc=$?
    cat $name.log
    [ $rc -eq 1 ] || fail "$name: the merge exited $rc, not 1"
    grep -q "origin chunk $chunk is past the origin's end.*nbdsnap dump" $name.log ||
        fail "$name: the error does not name origin chunk $chunk and nbdsnap dump"
    cmp origin.img origin-before.img || fail "$name: the origin changed"
    cmp $name.cow $name-before.cow || fail "$name: the COW changed"
}

make_cow wrap.cow $(( (1 << 52) + 1 )):2
merge_fails wrap $(( (1 << 52) + 1 ))

make_cow straddle.cow 7:2 8:3
merge_fails straddle 8

make_cow far.cow 3:2 18446744073709551615:3
python3 -c 'open("origin.img", "wb").write(bytes(range(0x80, 0x88)) * 4096)'
nbdkit -U - --filter="$FILTER" file origin.img snapshot=far=far.cow --run '
  nbdsh -u "nbd+unix:///far?socket=$unixsocket" -c "
want = bytearray(open(\"origin.img\", \"rb\").read())
want[3 * 4096:4 * 4096] = bytes([2]) * 4096
assert h.pread(len(want), 0) == want
" && nbdsh --base-allocation \
      -u "nbd+unix:///far?socket=$unixsocket" -c "
ents = []
def cb(ctx, offset, entries, err):
    ents.extend(entries[0::2])
    return 0
h.block_status(h.get_size(), 0, cb)
assert sum(ents) >= h.get_size(), ents
"' || fail "far: the snapshot does not read as the origin with chunk 3"
merge_fails far 18446744073709551615

echo "$failed failure(s)"
[ $failed -eq 0 ]
