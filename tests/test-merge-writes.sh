#!/usr/bin/env bash
# Writes to the origin export during a merge (reference §4.9), against a
# python model.  The merge of m (4k chunks, ~3000 scattered exceptions in
# 12 metadata areas, over a 24 MiB origin) is slowed down by nbdkit's
# delay filter stacked under ours (wdelay=15ms on every origin write: a
# step, one area, takes ~1 s, the merge ~12 s).  While it runs:
#  * nbdinfo --list shows "merging m, N%" and the dm status in the origin's
#    description; m is not in the export list and connecting to it fails;
#  * at the start, the export's extents call nothing zero that is not
#    (m's oldest chunks lie in a hole of the origin file); after phase a,
#    it reads as the model with pread and with nbdcopy;
#  * phase a (merge < ~25%): writes, zeroes and trims through the origin
#    export, into m's oldest chunks (merged last, so still in the COW) and
#    random places; phase b (merge >= 40%): into m's newest chunks (merged
#    already) and oldest ones, with FUA writes and a flush.  Each reads
#    back right at once; the whole export equals the model (m's view with
#    those writes on top) after each phase;
#  * the siblings t (4k chunks) and u (64k chunks) keep their views: the
#    merge copies out to them before it changes the origin.
# After the merge ("merged m"): the origin export and, after shutdown, the
# origin file equal the model; t and u are unchanged; m.cow has no
# exceptions; every COW passes nbdsnap check.  If the merge fails on the
# way, that is a failure, and a restart must still complete it to the
# model.  Last, the smallest case of a flush during a merge: a store of two
# metadata areas, one flush through the origin export while the merge
# works on the second (full) area: the merge must still complete.
# Failures are counted, so one run reports all of them.
source "$srcdir/functions.sh"
set -e
set -x

requires nbdkit --version
requires nbdkit --filter=delay null --version
requires nbdsh --version
requires nbdcopy --version
requires nbdinfo --version
requires python3 -c 'import nbd'
requires test -r "$FILTER"
unset LIBNBD_DEBUG

enter_tmpdir

failed=0
fail () { echo "FAIL: $*"; failed=$((failed + 1)); }

# extents.py EXPORT FILE: no extent of EXPORT that block status calls
# zero holds non-zero bytes of FILE (what nbdcopy, qemu-img convert and
# backups rely on to skip reading).
cat > extents.py <<'PY'
import nbd, sys
sock, export, wantfile = sys.argv[1:4]
want = open(wantfile, "rb").read()
h = nbd.NBD()
h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
h.connect_uri("nbd+unix:///%s?socket=%s" % (export, sock))
size = h.get_size()
bad = []
off = 0
while off < size:
    ents = []
    def cb(ctx, offset, entries, err):
        if ctx == nbd.CONTEXT_BASE_ALLOCATION:
            ents.extend(zip(entries[0::2], entries[1::2]))
        return 0
    h.block_status(min(size - off, 1 << 30), off, cb)
    for length, flags in ents:
        length = min(length, size - off)
        if flags & nbd.STATE_ZERO and want[off:off + length].count(0) != length:
            bad.append((off, length))
        off += length
if bad:
    print("%s: %d extent(s) said zero where the data is not, e.g. (offset, "
          "length): %s" % (export, len(bad), bad[:4]))
    sys.exit(1)
PY

size=$((24 << 20))
# The origin: random data, and a hole in the last 4 MiB.
python3 - $size <<'PY'
import random, sys
size = int(sys.argv[1])
random.seed(31)
with open("origin.img", "wb") as f:
    f.truncate(size)
    f.write(random.randbytes(size - (4 << 20)))
PY

# Snapshots m, t (4k) and u (64k), all taken now.  m gets ~3000 scattered
# single-chunk exceptions (every other chunk), the first ones in the
# origin's hole (so they are merged last); t and u get a few writes of
# their own; then origin writes copy out to all three.  order.txt lists
# m's chunks oldest first.
cat > prepare.py <<'PY'
import nbd, random, sys
sock = sys.argv[1]
def conn(name):
    h = nbd.NBD()
    h.connect_uri("nbd+unix:///%s?socket=%s" % (name, sock))
    return h
m, t, u, o = conn("m"), conn("t"), conn("u"), conn("origin")
size = o.get_size()
random.seed(32)
chunks = size // 4096
hole = [c for c in range((size - (4 << 20)) // 4096, chunks, 2)]
rest = [c for c in range(0, (size - (4 << 20)) // 4096, 2)]
random.shuffle(hole)
random.shuffle(rest)
order = hole[:400] + rest
for c in order:
    n = random.choice([4096, 4096, 1000, 1])
    m.pwrite(random.randbytes(n), c * 4096 + random.randrange(4096 - n + 1))
for i in range(30):
    t.pwrite(random.randbytes(5000), random.randrange(size - 5000))
    u.pwrite(random.randbytes(70000), random.randrange(size - 70000))
for i in range(40):
    o.pwrite(random.randbytes(3000), random.randrange(size - 3000))
for h in (m, t, u, o):
    h.flush()
open("order.txt", "w").write(" ".join(map(str, order)))
PY
# u gets its 64k header first; an existing header wins over
# snapshot-chunk-size.
nbdkit -U - --filter="$FILTER" file origin.img snapshot=u=u.cow \
    snapshot-chunk-size=64k --run true
nbdkit -U - --filter="$FILTER" file origin.img snapshot=m=m.cow \
    snapshot=t=t.cow snapshot=u=u.cow snapshot-chunk-size=4k --run '
  nbdinfo --list "$uri" | grep "description: snapshot u .*chunk 65536" &&
  python3 prepare.py "$unixsocket" &&
  nbdcopy "nbd+unix:///m?socket=$unixsocket" m-view.img &&
  nbdcopy "nbd+unix:///u?socket=$unixsocket" u-view.img &&
  nbdcopy "nbd+unix:///t?socket=$unixsocket" t-view.img'
if [ -x "$NBDSNAP" ]; then "$NBDSNAP" info m.cow; fi
cp m-view.img model.img

# The merge, slowed down.
sock=$tmp/sock
start_nbdkit -P pid -U "$sock" --filter="$FILTER" --filter=delay \
    file origin.img snapshot=m=m.cow snapshot=t=t.cow snapshot=u=u.cow \
    snapshot-merge=m wdelay=15ms
uri () { echo "nbd+unix:///$1?socket=$sock"; }
SECONDS=0

nbdinfo --list "$(uri)" > list1.txt
cat list1.txt
grep -Eq 'description: .*merging m, [0-9]+%' list1.txt ||
    fail "no 'merging m, N%' in the origin's description"
grep -Eq 'merging m, [0-9]+% \([0-9]+/[0-9]+ [0-9]+\)' list1.txt ||
    fail "no dm status after the progress"
grep -q 'export="origin"' list1.txt || fail "origin not listed"
grep -q 'export="t"' list1.txt || fail "t not listed"
grep -q 'export="u"' list1.txt || fail "u not listed"
if grep -q 'export="m"' list1.txt; then fail "the merging m is listed"; fi
if nbdinfo "$(uri m)" > m-info.txt 2>&1; then
    fail "connecting to the merging m worked"
fi
cat m-info.txt

# The merge has just started; m's oldest chunks (in the origin's hole)
# are merged last, so they are still in the COW now: block status must
# not call them zero.
python3 extents.py "$sock" origin model.img ||
    fail "the origin export's extents at the start of the merge call m's data zero"

# Writes through the origin export.  PHASE a: m's oldest chunks (still to
# be merged) and random places; PHASE b: m's newest chunks (merged by
# then) and random places.  Every write is read back at once; the whole
# export is compared with the model at the end of the phase.
cat > writes.py <<'PY'
import nbd, random, sys, time
sock, phase = sys.argv[1], sys.argv[2]
# At least 10 writes, then stop at the time budget: the merge must still
# be running (the machine may be slow).
deadline = time.time() + float(sys.argv[3])
h = nbd.NBD()
h.connect_uri("nbd+unix:///origin?socket=" + sock)
size = h.get_size()
model = bytearray(open("model.img", "rb").read())
order = list(map(int, open("order.txt").read().split()))
random.seed(phase)
targets = order[:40] if phase == "a" else order[-40:] + order[:20]
# Flushes and FUA only in the second half of phase b: the rest meets a
# running merge even if a flush breaks it (the last part of this test
# checks that case alone).
flush = phase == "b"
log = []
def check(off, n, what):
    got = h.pread(n, off)
    if got != model[off:off + n]:
        sys.exit("phase %s: %s at %d+%d reads back wrong" % (phase, what, off, n))
done = 0
for i, c in enumerate(targets):
    if i >= 10 and time.time() > deadline:
        break
    done += 1
    # Into m's chunk c: partial, whole, or crossing into the next chunk.
    n = random.choice([1, 700, 4096, 6000])
    off = c * 4096 + random.randrange(4096)
    off = min(off, size - n)
    data = random.randbytes(n)
    t0 = time.time()
    h.pwrite(data, off, nbd.CMD_FLAG_FUA if flush and i >= 30 and i % 7 == 0 else 0)
    if time.time() - t0 > 0.5:
        print("phase %s: write into chunk %d took %.1f s" % (phase, c, time.time() - t0))
    log.append(("write", off, n))
    model[off:off + n] = data
    check(off, n, "write into chunk %d" % c)
    if i % 3 == 0:
        # Somewhere else too: mostly chunks m never had.
        n = random.randrange(1, 9000)
        off = random.randrange(size - n)
        data = random.randbytes(n)
        t0 = time.time()
        h.pwrite(data, off)
        if time.time() - t0 > 0.5:
            print("phase %s: random write at chunk %d+%d took %.1f s"
                  % (phase, off // 4096, (off + n - 1) // 4096 - off // 4096 + 1,
                     time.time() - t0))
        log.append(("random", off, n))
        model[off:off + n] = data
        check(off, n, "random write")
    if i % 10 == 0:
        n = random.randrange(1, 9000)
        off = random.randrange(size - n)
        h.zero(n, off)
        log.append(("zero", off, n))
        model[off:off + n] = bytes(n)
        check(off, n, "zero")
    if i % 20 == 0:
        # Trim is advisory: while merging the filter ignores it (as dm
        # does); once the merge is over the file plugin may punch a hole.
        # Each 4k piece must read as before or as zeroes.
        off = (random.randrange(size - 8192) // 4096) * 4096
        h.trim(8192, off)
        got = h.pread(8192, off)
        for a in range(0, 8192, 4096):
            piece = got[a:a + 4096]
            if piece != model[off + a:off + a + 4096] and piece != bytes(4096):
                sys.exit("phase %s: trim at %d changed data to non-zero" % (phase, off))
        model[off:off + 8192] = got
        log.append(("trim", off, 8192))
if flush:
    h.flush()
got = b"".join(h.pread(1 << 20, off) for off in range(0, size, 1 << 20))
open("model.img", "wb").write(model)
if got != model:
    # Which 4k chunks differ, and what this phase wrote there.
    m_chunks = set(order)
    bad = [c for c in range(size // 4096)
           if got[c * 4096:(c + 1) * 4096] != model[c * 4096:(c + 1) * 4096]]
    print("phase %s: %d chunks differ from the model" % (phase, len(bad)))
    for c in bad[:8]:
        a = c * 4096
        diff = [i for i in range(4096) if got[a + i] != model[a + i]]
        hits = [w for w in log if w[1] < a + 4096 and w[1] + w[2] > a]
        old = open("m-view.img", "rb").read()[a:a + 4096]
        print("  chunk %d (%s m): bytes %d..%d differ; reads as m's view there: %s;"
              " writes this phase: %s" % (
                  c, "in" if c in m_chunks else "not in", diff[0], diff[-1],
                  all(got[a + i] == old[i] for i in diff), hits))
    sys.exit("phase %s: the origin export differs from the model" % phase)
print("phase %s: %d of %d target writes (and the others), all read back"
      % (phase, done, len(targets)))
PY

progress () {
    nbdinfo --list "$(uri)" | sed -n 's/.*merging m, \([0-9]*\)%.*/\1/p' | head -1
}
# The merge part of the origin's description.
state () {
    nbdinfo --list "$(uri)" | sed -n 's/.*description: origin with [0-9]* snapshot(s); //p' | head -1
}

python3 writes.py "$sock" a 3 || fail "writes during the merge (phase a)"
echo "phase a done at $SECONDS s: $(state)"

# Still early in the merge: a whole read with pread, then with nbdcopy
# (which skips what the extents call zero).
echo "reads at $SECONDS s: $(state)"
nbdsh -u "$(uri origin)" -c "
size = h.get_size()
model = open('model.img', 'rb').read()
for off in range(0, size, 1 << 20):
    assert h.pread(1 << 20, off) == model[off:off + (1 << 20)], off
" || fail "the origin export does not read as the model early in the merge"
nbdcopy "$(uri origin)" - > early.img
if ! cmp early.img model.img; then
    fail "nbdcopy of the origin export early in the merge differs from the merged view"
    echo "$(cmp -l early.img model.img | wc -l) bytes differ"
fi

# Wait until the newest half is merged.
for i in $(seq 300); do
    p=$(progress)
    [ -z "$p" ] && break
    [ "$p" -ge 40 ] && break
    sleep 0.1
done
echo "phase b starts at $SECONDS s: $(state)"
nbdinfo --list "$(uri)" | grep -q 'merging m' ||
    echo "WARNING: the merge ended before phase b: slow it down more"

python3 writes.py "$sock" b 5 || fail "writes during the merge (phase b)"
echo "phase b done at $SECONDS s: $(state)"

# While still merging (if it is): a whole read by nbdcopy (which uses the
# export's extents) and the siblings.
merging_then=$(state)
python3 extents.py "$sock" origin model.img ||
    fail "the origin export's extents during the merge ($merging_then) call data zero"
nbdcopy "$(uri origin)" - > during.img
if ! cmp during.img model.img; then
    fail "nbdcopy of the origin export during the merge ($merging_then) differs from the merged view"
    echo "$(cmp -l during.img model.img | wc -l) bytes differ"
fi
nbdcopy "$(uri t)" t-during.img
cmp t-during.img t-view.img || fail "t changed during the merge"
nbdcopy "$(uri u)" u-during.img
cmp u-during.img u-view.img || fail "u changed during the merge"

# The end of the merge (or its failure).
for i in $(seq 600); do
    nbdinfo --list "$(uri)" | grep -Eq 'merged m|merge of m failed' && break
    sleep 0.1
done
echo "merge over at $SECONDS s"
nbdinfo --list "$(uri)" > list2.txt
cat list2.txt
if grep -q 'merged m' list2.txt; then
    if grep -q 'export="m"' list2.txt; then fail "m is listed after its merge"; fi
    nbdcopy "$(uri origin)" after.img
    cmp after.img model.img || fail "the origin export differs from the model after the merge"
    nbdcopy "$(uri t)" t-after.img
    cmp t-after.img t-view.img || fail "t changed by the merge"
    nbdcopy "$(uri u)" u-after.img
    cmp u-after.img u-view.img || fail "u changed by the merge"
    kill_nbdkit "$(cat pid)"
else
    fail "the merge did not complete: $(grep 'description: origin' list2.txt)"
    # Nothing may be lost: the merged view is still the model.
    nbdsh -u "$(uri origin)" -c "
size = h.get_size()
model = open('model.img', 'rb').read()
for off in range(0, size, 1 << 20):
    assert h.pread(1 << 20, off) == model[off:off + (1 << 20)], off
" || fail "after the failed merge the origin export is not the model"
    kill_nbdkit "$(cat pid)"
    # A restart completes it.
    rm -f "$sock"
    rc=0
    timeout 60 nbdkit -f -U "$sock" --filter="$FILTER" file origin.img \
        snapshot=m=m.cow snapshot=t=t.cow snapshot=u=u.cow \
        snapshot-merge=m snapshot-merge-exit=true || rc=$?
    [ $rc -eq 0 ] || fail "the restarted merge exited with $rc"
fi

cmp origin.img model.img || fail "the origin file differs from the model"
if [ -x "$NBDSNAP" ]; then
    [ "$("$NBDSNAP" info --json m.cow | json_field exceptions)" = 0 ] ||
        fail "m.cow still has exceptions"
    for c in m t u; do "$NBDSNAP" check $c.cow || fail "$c.cow is damaged"; done
fi

# t and u, served again, still hold their views.
nbdkit -U - --filter="$FILTER" file origin.img snapshot=t=t.cow \
    snapshot=u=u.cow --run '
  nbdcopy "nbd+unix:///t?socket=$unixsocket" t-again.img &&
  nbdcopy "nbd+unix:///u?socket=$unixsocket" u-again.img'
cmp t-again.img t-view.img || fail "t differs after a restart"
cmp u-again.img u-view.img || fail "u differs after a restart"

# A flush during the merge of a store of two metadata areas (epa 256 at
# 4k: 300 exceptions).  The first step merges area 1's 44 records; while
# the second works on area 0 (full), a flush through the origin export.
rm -f f.cow f.img
python3 -c "
import random
random.seed(41)
open('f.img', 'wb').write(random.randbytes(4 << 20))"
nbdkit -U - --filter="$FILTER" file f.img snapshot=f=f.cow snapshot-chunk-size=4k --run '
  nbdsh -u "nbd+unix:///f?socket=$unixsocket" -c "
for i in range(300):
    h.pwrite(bytes([i % 200 + 1]) * 4096, i * 8192)
h.flush()" &&
  nbdcopy "nbd+unix:///f?socket=$unixsocket" f-view.img'
rm -f "$sock"
( rc=0
  timeout 60 nbdkit -f -v -U "$sock" --filter="$FILTER" --filter=delay file f.img \
      snapshot=f=f.cow snapshot-merge=f snapshot-merge-exit=true wdelay=40ms \
      2> f.log || rc=$?
  echo $rc > f.rc ) &
for i in $(seq 300); do
    nbdinfo --list "$(uri)" 2>/dev/null | grep -Eq 'merging f, [1-9]' && break
    [ -s f.rc ] && break
    sleep 0.05
done
nbdinfo --list "$(uri)" | grep 'description: origin' || :
nbdsh -u "$(uri origin)" -c 'h.flush()' || fail "flush during the merge failed"
wait
grep 'merge of f' f.log
[ "$(cat f.rc)" = 0 ] ||
    fail "a flush during the merge of a 2-area store: nbdkit exited $(cat f.rc): $(grep 'merge of f failed' f.log)"
rm -f "$sock"
timeout 60 nbdkit -f -U "$sock" --filter="$FILTER" file f.img snapshot=f=f.cow \
    snapshot-merge=f snapshot-merge-exit=true || fail "the restarted merge of f failed"
cmp f.img f-view.img || fail "f.img is not f's view after the merge"

echo "$failed failure(s)"
[ $failed -eq 0 ]
