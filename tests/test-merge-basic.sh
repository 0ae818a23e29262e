#!/usr/bin/env bash
# Merge, the plain case (reference §1.10): a snapshot made by the filter,
# with snapshot writes of many shapes (1 byte, unaligned, chunk-crossing,
# multi-chunk, zeroes, rewrites of excepted chunks, the last byte of an
# origin whose size is not a chunk multiple) and origin writes (which copy
# out), is merged with snapshot-merge=s snapshot-merge-exit=true, for
# chunk sizes 4k and 64k:
#  * nbdkit exits 0 by itself, soon;
#  * the origin file equals the snapshot view recorded before the merge
#    (and the python model of it);
#  * nbdsnap info: 0 exceptions, status `2cs/<total> 2cs`, header valid;
#    nbdsnap check passes;
#  * a second merge run on the merged store exits 0 at once and changes
#    nothing; the (now empty) snapshot then reads as the origin;
#  * a merge of a brand-new (missing) COW file exits 0 and changes nothing.
# nbdkit 1.32's --run does not end when the server shuts down, so every
# merge runs in the foreground (-f) under timeout(1).
source "$srcdir/functions.sh"
set -e
set -x

requires nbdkit --version
requires nbdsh --version
requires nbdcopy --version
requires python3 --version
requires timeout --version
requires test -r "$FILTER"
unset LIBNBD_DEBUG

enter_tmpdir

# merge LOG ARGS...: nbdkit -f with the filter on the file plugin until it
# exits; prints the seconds it took, returns its exit status.
merge () {
    local log=$1 t0 rc=0; shift
    rm -f "$tmp/sock"
    t0=$(date +%s.%N)
    timeout 60 nbdkit -f -v -U "$tmp/sock" --filter="$FILTER" file "$tmp/origin.img" \
        "$@" 2> "$log" || rc=$?
    python3 -c "import sys; print('merge took %.2f s' % (float(sys.argv[2]) - float(sys.argv[1])))" \
        "$t0" "$(date +%s.%N)"
    return $rc
}

info () { "$NBDSNAP" info --json "$1" | json_field "$2"; }

cat > writes.py <<'PY'
import nbd, random, sys
sock, cs, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
h = nbd.NBD()
h.connect_uri("nbd+unix:///s?socket=" + sock)
o = nbd.NBD()
o.connect_uri("nbd+unix:///origin?socket=" + sock)
snap = bytearray(open("model-origin0.img", "rb").read())
orig = bytearray(snap)
random.seed(cs)
def sw(off, data, fua=False):
    h.pwrite(data, off, nbd.CMD_FLAG_FUA if fua else 0)
    snap[off:off + len(data)] = data
def sz(off, n):
    h.zero(n, off)
    snap[off:off + n] = bytes(n)
def ow(off, data):
    o.pwrite(data, off)
    orig[off:off + len(data)] = data
rnd = random.randbytes
# Origin writes first: their chunks are copied out to s.
ow(0, rnd(cs))                          # a whole chunk
ow(3 * cs + 17, rnd(100))               # unaligned, inside a chunk
ow(5 * cs - 10, rnd(cs + 20))           # crossing two chunk borders
ow(size // 2 + 1234, rnd(3 * cs))       # into the hole
# Snapshot writes of every shape.
sw(7 * cs + 5, b"\x01")                 # one byte
sw(9 * cs - 300, rnd(600))              # unaligned, crossing a border
sw(12 * cs, rnd(cs))                    # exactly one chunk, no copy first
sw(20 * cs + 100, rnd(5 * cs + 7), fua=True)   # multi-chunk, unaligned, FUA
sw(0, rnd(512))                         # a chunk already copied out
sw(3 * cs, rnd(cs // 2))                # another copied-out chunk
sz(30 * cs + 1, 2 * cs)                 # zeroes, unaligned
sw(size // 2 + 7 * cs, rnd(2 * cs))     # into the origin's hole
sw(size - 1, b"\xee")                   # the very last byte
sw(size - 2 * cs - 3, rnd(100))         # near the end
for i in range(60):                     # scattered, some rewrites
    n = random.choice([1, 511, 512, 4096, cs, 3 * cs + 1])
    sw(random.randrange(size - n), rnd(n))
# Origin writes after the snapshot writes: some hit excepted chunks
# (no copy-out), some new ones.
ow(12 * cs + 1, rnd(10))
ow(size - cs, rnd(cs))
for i in range(20):
    n = random.choice([1, 4096, cs + 3])
    ow(random.randrange(size - n), rnd(n))
h.flush()
o.flush()
assert h.pread(size, 0) == snap, "snapshot view differs from the model"
assert o.pread(size, 0) == orig, "origin differs from the model"
open("model-snap.img", "wb").write(snap)
open("model-origin.img", "wb").write(orig)
PY

for cs in 4096 65536; do
    rm -f origin.img s.cow view.img model-*.img
    # Origin: random data with a hole in the middle, and a size that is
    # not a multiple of the chunk (nor of 512) at 64k.
    if [ $cs = 4096 ]; then size=$((4 << 20)); else size=$(( (6 << 20) + 5000 )); fi
    python3 - $size <<'PY'
import random, sys
size = int(sys.argv[1])
random.seed(size)
with open("origin.img", "wb") as f:
    f.truncate(size)
    f.write(random.randbytes(size // 2))
    f.seek(size * 3 // 4)
    f.write(random.randbytes(size - size * 3 // 4))
PY
    cp origin.img model-origin0.img

    # Writes; the model applies the same ones.  Snapshot writes go to s,
    # origin writes to origin (copy-outs to s first).
    nbdkit -U - --filter="$FILTER" file origin.img snapshot=s=s.cow \
        snapshot-chunk-size=$cs --run '
      python3 writes.py "$unixsocket" '$cs' '$size' &&
      nbdcopy "nbd+unix:///s?socket=$unixsocket" view.img'
    cmp view.img model-snap.img
    cmp origin.img model-origin.img
    if cmp -s origin.img view.img; then echo "the writes changed nothing"; exit 1; fi
    cp s.cow s.cow.before

    # The merge.  It must end by itself with status 0.
    merge merge1.log snapshot=s=s.cow snapshot-merge=s snapshot-merge-exit=true ||
        { tail -30 merge1.log; exit 1; }
    grep 'merge of s complete' merge1.log
    cmp origin.img view.img

    if [ -x "$NBDSNAP" ]; then
        "$NBDSNAP" info s.cow
        csec=$((cs / 512))
        [ "$(info s.cow exceptions)" = 0 ]
        [ "$(info s.cow valid)" = true ]
        [ "$(info s.cow chunk_sectors)" = $csec ]
        [ "$(info s.cow used_sectors)" = $((2 * csec)) ]
        [ "$(info s.cow metadata_sectors)" = $((2 * csec)) ]
        total=$(info s.cow total_sectors)
        [ "$(info s.cow status)" = "$((2 * csec))/$total $((2 * csec))" ]
        "$NBDSNAP" check s.cow
    fi
    # The header is untouched (valid=1): the kernel leaves it alone too.
    cmp -n 16 s.cow s.cow.before

    # Merging again: nothing to do, exits 0 at once, changes nothing.
    cp s.cow s.cow.merged
    SECONDS=0
    merge merge2.log snapshot=s=s.cow snapshot-merge=s snapshot-merge-exit=true ||
        { tail -30 merge2.log; exit 1; }
    [ $SECONDS -lt 10 ]
    cmp origin.img view.img
    cmp s.cow s.cow.merged

    # The empty snapshot now reads as the origin, and is exported again.
    nbdkit -U - --filter="$FILTER" file origin.img snapshot=s=s.cow --run '
        set -e
        nbdinfo --list "$uri" | grep -q "export=\"s\""
        nbdcopy "nbd+unix:///s?socket=$unixsocket" after-s.img'
    cmp after-s.img view.img

    # A merge of a COW file that does not exist yet: a new empty store,
    # nothing to merge.
    rm -f new.cow
    merge merge3.log snapshot=new=new.cow snapshot-merge=new snapshot-merge-exit=true \
        snapshot-chunk-size=$cs || { tail -30 merge3.log; exit 1; }
    cmp origin.img view.img
done
