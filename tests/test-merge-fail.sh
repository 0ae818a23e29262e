#!/usr/bin/env bash
# A merge that fails (reference §4.11): origin writes fail with EIO from
# nbdkit's error filter stacked under ours, while $tmp/inject exists.
#  A. Failing from the first step:
#     * with snapshot-merge-exit=true nbdkit exits 1 by itself, saying why,
#       and removes its control socket;
#     * started by nbdsnap -c merge --wait, which exits 1 and prints the
#       origin's status line (the OS error named once);
#       nothing is lost: served without the merge, m's and s's views are
#       unchanged, nbdsnap check passes;
#     * without it, nbdkit stays up: the origin's description (nbdinfo
#       --list) says "merge of m failed" and "(Merge failed)"; m is still
#       not exported; the origin export reads as m's view, with pread and
#       with nbdcopy, and its extents call nothing zero that is not (part
#       of m's data lies in a hole of the origin file); a write into a chunk that
#       is still in m's COW works and reads back; the sibling s is intact;
#       merge, take and drop on the control socket are refused with the
#       command line that resumes the merge;
#     * after the inject file is gone, a restart with the same parameters
#       completes the merge (exit 0): origin == m's view plus that write.
#  B. Failing half way (inject created once the merge has made progress,
#     the delay filter slowing it): "Merge failed", the origin export still
#     reads the model, a restart completes it.
#  C. Refused at startup, each with a message naming the problem: two
#     different snapshot-merge=, snapshot-merge with snapshot-store=N,
#     snapshot-merge=nosuch, snapshot-merge-exit without snapshot-merge,
#     and a merge of an invalid snapshot (one made Invalid by a
#     snapshot-cow-size overflow, and the kernel-made invalid8 fixture).
#  D. Two records for one origin chunk (old kernels): the merge stops at
#     the one the snapshot does not use, before copying anything, naming
#     the chunk (the kernel fails such a merge too; it used to hang here);
#     snapshot-merge-exit=true exits 1, the origin and the COW unchanged.
# Failures in A, B and D are counted, so one run reports all of them.
source "$srcdir/functions.sh"
set -e
set -x

requires nbdkit --version
requires nbdkit --filter=error null --version
requires nbdkit --filter=delay null --version
requires nbdcopy --version
requires nbdinfo --version
requires python3 -c 'import nbd'
requires timeout --version
requires test -r "$FILTER"
unset LIBNBD_DEBUG

enter_tmpdir
sock=$tmp/sock
uri () { echo "nbd+unix:///$1?socket=$sock"; }

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

# readall EXPORT FILE: the whole export, read with pread, equals FILE.
readall () {
    python3 - "$sock" "$1" "$2" <<'PY'
import nbd, sys
h = nbd.NBD()
h.connect_uri("nbd+unix:///%s?socket=%s" % (sys.argv[2], sys.argv[1]))
want = open(sys.argv[3], "rb").read()
for off in range(0, len(want), 1 << 20):
    if h.pread(min(1 << 20, len(want) - off), off) != want[off:off + (1 << 20)]:
        sys.exit("%s differs from %s at MiB %d" % (sys.argv[2], sys.argv[3], off >> 20))
PY
}

# make_snapshots: a 4 MiB origin, random in its first 3 MiB and a hole in
# the last; m (4k chunks, ~500 exceptions in 2 areas, some in the hole)
# and s (64k chunks); origin writes copy out to both.
make_snapshots () {
    rm -f origin.img m.cow s.cow
    python3 -c "
import random
random.seed(61)
with open('origin.img', 'wb') as f:
    f.truncate(4 << 20)
    f.write(random.randbytes(3 << 20))"
    nbdkit -U - --filter="$FILTER" file origin.img snapshot=s=s.cow \
        snapshot-chunk-size=64k --run true
    nbdkit -U - --filter="$FILTER" file origin.img snapshot=m=m.cow \
        snapshot=s=s.cow snapshot-chunk-size=4k --run '
      set -e
      python3 - "$unixsocket" <<"PY"
import nbd, random, sys
def conn(name):
    h = nbd.NBD()
    h.connect_uri("nbd+unix:///%s?socket=%s" % (name, sys.argv[1]))
    return h
m, s, o = conn("m"), conn("s"), conn("origin")
size = o.get_size()
random.seed(62)
for c in random.sample(range(0, size // 4096, 2), 480):
    n = random.choice([4096, 1000, 1])
    m.pwrite(random.randbytes(n), c * 4096 + random.randrange(4096 - n + 1))
for i in range(10):
    s.pwrite(random.randbytes(3000), random.randrange(size - 3000))
for i in range(20):
    o.pwrite(random.randbytes(5000), random.randrange(size - 5000))
for h in (m, s, o):
    h.flush()
PY
      nbdcopy "nbd+unix:///m?socket=$unixsocket" m-view.img &&
      nbdcopy "nbd+unix:///s?socket=$unixsocket" s-view.img'
    cp origin.img origin-before.img
}

# views_intact: served without a merge, m and s read as before.
views_intact () {
    nbdkit -U - --filter="$FILTER" file origin.img snapshot=m=m.cow \
        snapshot=s=s.cow --run '
      nbdcopy "nbd+unix:///m?socket=$unixsocket" m-now.img &&
      nbdcopy "nbd+unix:///s?socket=$unixsocket" s-now.img'
    cmp m-now.img "$1" || fail "$2: m's view changed"
    cmp s-now.img s-view.img || fail "$2: s's view changed"
    if [ -x "$NBDSNAP" ]; then
        "$NBDSNAP" check m.cow || fail "$2: m.cow is damaged"
        "$NBDSNAP" check s.cow || fail "$2: s.cow is damaged"
    fi
}

# wait_desc PATTERN: until the origin's description matches (10 s).
wait_desc () {
    local i
    for i in $(seq 200); do
        nbdinfo --list "$(uri)" 2>/dev/null | grep 'description: origin' |
            grep -Eq "$1" && return 0
        sleep 0.05
    done
    return 1
}

errargs=(error=EIO error-pwrite-rate=100% error-file="$tmp/inject")

# ------------------------------------------------------------------ A
make_snapshots
touch inject

# A1: snapshot-merge-exit=true: exit status 1.  Without -v: the reason is
# an error, not only a debug message.
rm -f "$sock"
rc=0
timeout 60 nbdkit -f -U "$sock" --filter="$FILTER" --filter=error file origin.img \
    snapshot=m=m.cow snapshot=s=s.cow snapshot-merge=m snapshot-merge-exit=true \
    snapshot-control=a1.ctl "${errargs[@]}" 2> a1.log || rc=$?
grep -E 'merge of m|merge failed' a1.log || :
[ $rc -eq 1 ] || fail "A1: a failed merge with snapshot-merge-exit=true exited $rc, not 1"
[ ! -e a1.ctl ] || fail "A1: the exit left the control socket behind"
grep -q 'error: snapshot: merge of m failed: .*restart' a1.log ||
    fail "A1: no error 'merge of m failed' in the log"
grep -q 'error: .*merge failed' a1.log || fail "A1: no error message about the failed merge"
cmp origin.img origin-before.img || fail "A1: the origin file changed"
views_intact m-view.img A1

# A1b: a merge started with nbdsnap -c merge --wait: exit 1, and the
# origin's status line on stderr, naming the OS error once.
if [ -x "$NBDSNAP" ]; then
    rm -f "$sock"
    start_nbdkit -P pid -U "$sock" --filter="$FILTER" --filter=error \
        file origin.img snapshot=m=m.cow snapshot=s=s.cow \
        snapshot-control="$tmp/a1b.ctl" "${errargs[@]}"
    rc=0
    timeout 60 "$NBDSNAP" -c a1b.ctl merge m --wait > a1b.out 2> a1b.err || rc=$?
    cat a1b.out a1b.err
    [ $rc -eq 1 ] || fail "A1b: merge --wait of a failing merge exited $rc, not 1"
    grep -Eqx 'nbdsnap: origin: [0-9]+ bytes; merge of m failed: origin write at offset [0-9]+ failed: Input/output error; restart nbdkit with snapshot=m=/[^ ]*/m.cow snapshot-merge=m to resume it' a1b.err ||
        fail "A1b: stderr is not the failed merge's status line"
    kill_nbdkit "$(cat pid)"
fi

# A2: without exit: stays up, says so, serves the merged view.  (A1's
# _exit left its socket behind.)
rm -f "$sock"
start_nbdkit -P pid -U "$sock" --filter="$FILTER" --filter=error file origin.img \
    snapshot=m=m.cow snapshot=s=s.cow snapshot-merge=m "${errargs[@]}" \
    snapshot-control="$tmp/a2.ctl"
wait_desc 'Merge failed' || fail "A2: the description never said Merge failed"
# On the control socket, each refusal the failed merge causes says how to
# resume it (before: "only one merge per origin", "once the merge is
# done", neither of which a wait would change).
a2ctl () { python3 "$srcdir/control_client.py" "$tmp/a2.ctl" "$@"; }
resume='restart nbdkit with snapshot=m=/[^ ]*/m.cow snapshot-merge=m to resume it$'
a2ctl merge m > a2-merge.txt && fail "A2: a second merge was accepted"
grep -Eq "^ERR merge of m failed: .*; $resume" a2-merge.txt ||
    fail "A2: merge again: $(cat a2-merge.txt)"
a2ctl take x "$tmp/x.cow" > a2-take.txt && fail "A2: a take was accepted"
grep -Eq "^ERR no snapshot can be taken until the failed merge completes: merge of m failed: .*; $resume" a2-take.txt ||
    fail "A2: take: $(cat a2-take.txt)"
[ ! -e x.cow ] || fail "A2: the refused take made x.cow"
a2ctl drop m > a2-drop.txt && fail "A2: the merging snapshot was dropped"
grep -Eq "^ERR m cannot be dropped: merge of m failed: .*; $resume" a2-drop.txt ||
    fail "A2: drop: $(cat a2-drop.txt)"
nbdinfo --list "$(uri)" > a2-list.txt
cat a2-list.txt
grep -q 'description: origin.*merge of m failed' a2-list.txt ||
    fail "A2: no 'merge of m failed' in the origin's description"
grep -q 'description: origin.*(Merge failed)' a2-list.txt ||
    fail "A2: no dm status '(Merge failed)' in the origin's description"
if grep -q 'export="m"' a2-list.txt; then fail "A2: m is exported"; fi
grep -q 'export="s"' a2-list.txt || fail "A2: s is not exported"
readall origin m-view.img || fail "A2: the origin export (pread) is not m's view"
python3 extents.py "$sock" origin m-view.img ||
    fail "A2: the origin export's extents call m's data (in the origin's hole) zero"
nbdcopy "$(uri origin)" - > a2-origin.img
if ! cmp a2-origin.img m-view.img; then
    fail "A2: nbdcopy of the origin export is not m's view"
    echo "$(cmp -l a2-origin.img m-view.img | wc -l) bytes differ"
fi
nbdcopy "$(uri s)" a2-s.img
cmp a2-s.img s-view.img || fail "A2: s is not its view"
# A write into a chunk still in m's COW (the first of m's chunks in the
# hole) lands in the COW; one into a chunk m does not have reaches the
# (failing) origin and gets EIO.
cp m-view.img model.img
python3 - "$sock" <<'PY' || fail "A2: writes while failed"
import nbd, sys
h = nbd.NBD()
h.connect_uri("nbd+unix:///origin?socket=" + sys.argv[1])
model = bytearray(open("model.img", "rb").read())
orig = open("origin-before.img", "rb").read()
# A chunk in the hole where m has data: in m's COW.
c = next(c for c in range(768, 1024)
         if model[c * 4096:(c + 1) * 4096] != orig[c * 4096:(c + 1) * 4096])
data = b"\x5a" * 3000
h.pwrite(data, c * 4096 + 100)
model[c * 4096 + 100:c * 4096 + 3100] = data
assert h.pread(4096, c * 4096) == model[c * 4096:(c + 1) * 4096], "write into m's chunk"
# A chunk m does not have (odd chunks never had snapshot writes; pick
# one equal to the origin).
c = next(c for c in range(1, 768, 2)
         if model[c * 4096:(c + 1) * 4096] == orig[c * 4096:(c + 1) * 4096])
try:
    h.pwrite(b"\xa5" * 512, c * 4096)
    sys.exit("a write to the failing origin succeeded")
except nbd.Error as e:
    print("expected:", e)
assert h.pread(4096, c * 4096) == model[c * 4096:(c + 1) * 4096], "failed write changed data"
h.flush()
open("model.img", "wb").write(model)
PY
readall origin model.img || fail "A2: the origin export is not the model after the writes"
kill_nbdkit "$(cat pid)"
cmp origin.img origin-before.img || fail "A2: the origin file changed"

# A3: the inject file gone, a restart completes the merge.
rm -f inject "$sock"
rc=0
timeout 60 nbdkit -f -v -U "$sock" --filter="$FILTER" --filter=error file origin.img \
    snapshot=m=m.cow snapshot=s=s.cow snapshot-merge=m snapshot-merge-exit=true \
    "${errargs[@]}" 2> a3.log || rc=$?
[ $rc -eq 0 ] || { grep 'merge of m' a3.log; fail "A3: the restarted merge exited $rc"; }
cmp origin.img model.img || fail "A3: after the merge the origin is not the model"
if [ -x "$NBDSNAP" ]; then
    [ "$("$NBDSNAP" info --json m.cow | json_field exceptions)" = 0 ] ||
        fail "A3: m.cow still has exceptions"
fi
nbdkit -U - --filter="$FILTER" file origin.img snapshot=s=s.cow --run '
  nbdcopy "nbd+unix:///s?socket=$unixsocket" s-now.img'
cmp s-now.img s-view.img || fail "A3: s changed"

# ------------------------------------------------------------------ B
make_snapshots
rm -f inject "$sock"
start_nbdkit -P pid -U "$sock" --filter="$FILTER" --filter=error --filter=delay \
    file origin.img snapshot=m=m.cow snapshot=s=s.cow snapshot-merge=m \
    wdelay=20ms "${errargs[@]}"
wait_desc 'merging m, [1-9]' || fail "B: no progress seen"
touch inject
nbdinfo --list "$(uri)" | grep 'description: origin'
wait_desc 'Merge failed' || fail "B: the description never said Merge failed"
nbdinfo --list "$(uri)" | grep 'description: origin'
readall origin m-view.img || fail "B: the origin export is not m's view"
python3 extents.py "$sock" origin m-view.img ||
    fail "B: the origin export's extents call m's data zero"
nbdcopy "$(uri s)" b-s.img
cmp b-s.img s-view.img || fail "B: s is not its view"
kill_nbdkit "$(cat pid)"
views_intact m-view.img B
rm -f inject "$sock"
rc=0
timeout 60 nbdkit -f -U "$sock" --filter="$FILTER" --filter=error file origin.img \
    snapshot=m=m.cow snapshot=s=s.cow snapshot-merge=m snapshot-merge-exit=true \
    "${errargs[@]}" || rc=$?
[ $rc -eq 0 ] || fail "B: the restarted merge exited $rc"
cmp origin.img m-view.img || fail "B: after the merge the origin is not m's view"

# ------------------------------------------------------------------ C
# refused PATTERN ARGS...: nbdkit must not start; its message matches.
refused () {
    local pattern=$1 rc=0; shift
    timeout 30 nbdkit -U - --filter="$FILTER" file origin.img "$@" --run true \
        2> err.txt || rc=$?
    cat err.txt
    if [ $rc -eq 0 ] || [ $rc -eq 124 ]; then
        fail "C: started (rc $rc) with: $*"
        return
    fi
    grep -Eq "$pattern" err.txt || fail "C: no message matching '$pattern' for: $*"
}
refused 'snapshot-merge=s: .*already merging m.*only one merge' \
    snapshot=m=m.cow snapshot=s=s.cow snapshot-merge=m snapshot-merge=s
refused 'snapshot-merge=n: .*transient.*cannot be merged' \
    snapshot=n=n.cow snapshot-store=N snapshot-merge=n
refused 'snapshot-merge=n: .*transient.*cannot be merged' \
    snapshot=n=n.cow snapshot-merge=n snapshot-store=N
refused 'snapshot-merge=nosuch: no such snapshot.*m' \
    snapshot=m=m.cow snapshot-merge=nosuch
refused 'snapshot-merge-exit=true needs snapshot-merge' \
    snapshot=m=m.cow snapshot-merge-exit=true
# A snapshot made Invalid by a full COW (a 64k origin write needs 16
# copy-outs; the cap leaves room for 2).
rm -f inv.cow
nbdkit -U - --filter="$FILTER" file origin.img snapshot=inv=inv.cow \
    snapshot-chunk-size=4k snapshot-cow-size=16k --run '
  set -e
  nbdsh -u "nbd+unix:///origin?socket=$unixsocket" -c "h.pwrite(b\"x\" * 65536, 0)"
  nbdinfo --list "$uri" | grep "description: snapshot inv"' | tee inv.txt
grep -q Invalid inv.txt
refused 'snapshot-merge=inv: the snapshot is invalid' snapshot=inv=inv.cow \
    snapshot-merge=inv
# The same name twice is one merge, not two: accepted (exits 0 at once
# with merge-exit, m being empty now).
rc=0
rm -f "$sock"
timeout 30 nbdkit -f -U "$sock" --filter="$FILTER" file origin.img snapshot=m=m.cow \
    snapshot-merge=m snapshot-merge=m snapshot-merge-exit=true || rc=$?
[ $rc -eq 0 ] || fail "C: snapshot-merge=m given twice: exit $rc"
if [ -r "$srcdir/fixtures/kernel/invalid8.cow.xz" ] && xz --version >/dev/null 2>&1; then
    xz -dc "$srcdir/fixtures/kernel/invalid8.cow.xz" > invalid8.cow
    python3 "$srcdir/fixtures/kernel/gen-origin.py" 1048576 > inv-origin.img
    rc=0
    timeout 30 nbdkit -U - --filter="$FILTER" file inv-origin.img \
        snapshot=k=invalid8.cow snapshot-merge=k --run true 2> err.txt || rc=$?
    cat err.txt
    [ $rc -ne 0 ] || fail "C: a merge of the kernel-made invalid8 started"
    grep -q 'snapshot-merge=k: the snapshot is invalid' err.txt ||
        fail "C: no message for invalid8"
fi

# ------------------------------------------------------------------ D
# 4k chunks, area 0: 5->2, 9->3, 5->4, 6->5; the first record of 5 wins.
python3 -c '
import struct
cb = 4096
img = bytearray(40 * cb)
img[0:16] = struct.pack("<IIII", 0x70416e53, 1, 1, 8)
for i, (o, n) in enumerate([(5, 2), (9, 3), (5, 4), (6, 5)]):
    img[cb + 16 * i:cb + 16 * i + 16] = struct.pack("<QQ", o, n)
for c in range(2, 6):
    img[c * cb:(c + 1) * cb] = bytes([c]) * cb
open("dup.cow", "wb").write(img)
open("dup-origin.img", "wb").write(bytes(64 * cb))'
cp dup.cow dup-before.cow
cp dup-origin.img dup-origin-before.img
rm -f "$sock"
rc=0
timeout -k 10 30 nbdkit -f -U "$sock" --filter="$FILTER" file dup-origin.img \
    snapshot=dup=dup.cow snapshot-merge=dup snapshot-merge-exit=true 2> d.log || rc=$?
cat d.log
[ $rc -eq 1 ] || fail "D: a merge over a duplicate record exited $rc, not 1"
grep -q 'origin chunk 5 .*nbdsnap check' d.log ||
    fail "D: the error does not name origin chunk 5 and nbdsnap check"
cmp dup-origin.img dup-origin-before.img || fail "D: the origin changed"
cmp dup.cow dup-before.cow || fail "D: the COW changed"

echo "$failed failure(s)"
[ $failed -eq 0 ]
