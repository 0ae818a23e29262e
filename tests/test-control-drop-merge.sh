#!/usr/bin/env bash
# snapshot-control `drop` and `merge`: drop removes the export, leaves its COW
# file alone from then on, and fails I/O on connections opened before it;
# merge runs in the background (status shows its progress), the origin ends
# as the snapshot's view, other snapshots keep theirs; refusals: a drop of
# the merging snapshot, a second merge, a merge of a transient (N) store,
# a merge of a snapshot a client has open, a take while a merge runs.
# Origin writes go through nbdkit's delay filter so that the merge takes a
# while. Uses only the control socket (no nbdsnap).
source "$srcdir/functions.sh"
set -e
set -x
requires nbdinfo --version
requires nbdcopy --version
requires python3 -c 'import nbd'
requires nbdkit --filter=delay null --dump-plugin
enter_tmpdir
export tmp

# ctl COMMAND...: prints the reply; exit 0 on OK, 1 on ERR.
ctl () { python3 "$srcdir/control_client.py" "$tmp/ctl" "$@"; }
ctl_err () {
    local pat=$1 out; shift
    if out=$(ctl "$@"); then echo "expected ERR from: $*"; echo "$out"; exit 1; fi
    echo "$out"
    echo "$out" | grep -q "^ERR .*$pat"
}
exports () { nbdinfo --list --json "nbd+unix:///?socket=$tmp/sock" |
  python3 -c 'import json,sys; print(" ".join(sorted(e["export-name"] for e in json.load(sys.stdin)["exports"])))'; }

head -c 8M /dev/urandom > origin.img
start_nbdkit -P pid -U sock --filter="$FILTER" --filter=delay file origin.img \
  delay-write=4ms snapshot-chunk-size=4k snapshot-control="$tmp/ctl"
uri="nbd+unix:///origin?socket=$tmp/sock"

# ---- drop ----
ctl take d1 "$tmp/d1.cow"
[ "$(exports)" = "d1 origin" ]
nbdsh -u "$uri" -c '
for i in range(0, 2048, 64):
    h.pwrite(b"before drop" * 372 + b"\0" * 4, i * 4096)
h.flush()'
nbdcopy "nbd+unix:///d1?socket=$tmp/sock" d1.img

# A connection to d1 opened before the drop.
python3 - <<'PY' &
import nbd, os, time
h = nbd.NBD(); h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
h.connect_uri("nbd+unix:///d1?socket=%s/sock" % os.environ["tmp"])
assert len(h.pread(4096, 0)) == 4096
open("d1-open", "w").write("1")
while not os.path.exists("d1-dropped"): time.sleep(0.05)
res = []
for what, op in (("read", lambda: h.pread(4096, 0)),
                 ("write", lambda: h.pwrite(b"x" * 4096, 0)),
                 ("flush", lambda: h.flush()),
                 ("extents", lambda: h.block_status(4096, 0, lambda *a: 0))):
    try:
        op(); res.append("%s ok" % what)
    except nbd.Error as e:
        res.append("%s %s" % (what, e.errno))
open("d1-result", "w").write("\n".join(res) + "\n")
PY
reader=$!
for i in $(seq 200); do [ -e d1-open ] && break; sleep 0.05; done
[ -e d1-open ]
ctl drop d1
sha_d1=$(sha256sum < d1.cow); size_d1=$(stat -c %s d1.cow)
touch d1-dropped
wait $reader
cat d1-result
grep -qx 'read EIO' d1-result
grep -qx 'write EIO' d1-result
grep -qx 'flush EIO' d1-result
grep -qx 'extents EIO' d1-result
[ "$(exports)" = "origin" ]
ctl list > list.out; absent '^d1 ' list.out
ctl status > status-d1.out; absent '^d1:' status-d1.out
# Origin writes no longer touch d1.cow; it still holds d1's view.
nbdsh -u "$uri" -c '
for i in range(1, 2048, 7):
    h.pwrite(b"after drop" * 409 + b"\0" * 6, i * 4096)
h.flush()'
[ "$(sha256sum < d1.cow)" = "$sha_d1" ]
[ "$(stat -c %s d1.cow)" = "$size_d1" ]
ctl_err '' drop d1
ctl_err usage drop
ctl_err '' drop origin
# The dropped COW is a complete snapshot: serve it on its own.
nbdcopy "$uri" origin-now.img
nbdkit -U - --filter="$FILTER" file origin-now.img snapshot=d1="$tmp/d1.cow" \
  --run 'nbdcopy "nbd+unix:///d1?socket=$unixsocket" d1-offline.img'
# (d1-offline.img differs from d1.img: origin chunks written after the drop
# were not copied out. Only the chunks written before it must match.)
python3 - <<'PY'
a = open("d1.img", "rb").read(); b = open("d1-offline.img", "rb").read()
for i in range(0, 2048, 64):
    assert a[i * 4096:(i + 1) * 4096] == b[i * 4096:(i + 1) * 4096], i
PY
# Its name can be used again.
ctl take d1 "$tmp/d1-new.cow"
ctl drop d1

# ---- merge ----
nbdcopy "$uri" at-m1.img
ctl take m1 "$tmp/m1.cow"
# Snapshot writes (every other chunk, so the merge has many runs) and
# origin writes after the take.
nbdsh -u "nbd+unix:///m1?socket=$tmp/sock" -c '
for i in range(0, 2048, 3):
    h.pwrite((b"m1 %d " % i).ljust(4096, b"m"), i * 4096)
h.flush()'
nbdsh -u "$uri" -c '
for i in range(1, 2048, 5):
    h.pwrite((b"origin %d " % i).ljust(4096, b"o"), i * 4096)
h.flush()'
nbdcopy "nbd+unix:///m1?socket=$tmp/sock" m1.img
nbdcopy "$uri" at-other.img
ctl take other "$tmp/other.cow"
ctl take trans "$tmp/trans.cow" 4k N
ctl_err 'transient' merge trans
ctl_err '' merge nosuch
ctl_err usage merge
# Not while a client has m1 open: its writes would land in chunks the
# merge has already moved, and be lost.
python3 - <<'PY' &
import nbd, os, time
h = nbd.NBD(); h.connect_uri("nbd+unix:///m1?socket=%s/sock" % os.environ["tmp"])
open("m1-open", "w").write("1")
while not os.path.exists("m1-refused"): time.sleep(0.05)
h.shutdown()
PY
holder=$!
for i in $(seq 200); do [ -e m1-open ] && break; sleep 0.05; done
ctl_err 'm1 is open by 1 client' merge m1
touch m1-refused
wait $holder

ctl merge m1 | tee merge.out
grep -q 'merging m1' merge.out
# Asked again, the running merge replies with its progress, so that
# nbdsnap merge --wait can wait for a merge already started (before:
# "merging m1, N%; only one merge per origin", and --wait exited 1).
ctl merge m1 | grep -q '^merging m1, '
waiter=
if [ -x "$NBDSNAP" ]; then
  "$NBDSNAP" -c "$tmp/ctl" merge m1 --wait > wait.out &
  waiter=$!
fi
# While it runs: refusals, status, and the export list.
ctl_err 'm1 is merging' take late "$tmp/late.cow"
test ! -e late.cow
ctl_err "" merge other
ctl_err "" drop m1
ctl status | tee status.out
grep -q 'merging m1' status.out
if grep -q 'merged m1' status.out; then
  echo "the merge finished too soon for this test; slow the origin down"; exit 1
fi
[ "$(exports)" = "origin other trans" ]
# The origin export shows the merged view at once.
nbdcopy "$uri" during.img
cmp m1.img during.img
wait_merged m1
cat status.out
if [ -n "$waiter" ]; then wait $waiter; grep -q 'merge complete' wait.out; fi
absent '^m1' status.out
ctl list > list.out; absent '^m1 ' list.out
[ "$(exports)" = "origin other trans" ]
nbdcopy "$uri" merged.img
cmp m1.img merged.img
# The other snapshots kept their contents.
nbdcopy "nbd+unix:///other?socket=$tmp/sock" other.img
cmp at-other.img other.img
nbdcopy "nbd+unix:///trans?socket=$tmp/sock" trans.img
cmp at-other.img trans.img
# A merge after the first one completed is allowed.
ctl merge other
wait_merged other
nbdcopy "$uri" merged2.img
cmp at-other.img merged2.img
# The data reached origin.img itself.
kill_nbdkit "$(cat pid)"
cmp at-other.img origin.img
