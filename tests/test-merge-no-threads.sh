#!/usr/bin/env bash
# A merge where threads cannot be had (EAGAIN, as under a pids limit),
# made so by tests/fail_threads.c preloaded into nbdkit:
#  A. Every second thread fails once a live merge has started: the merge
#     step copies the runs of the workers it could not start itself; the
#     merge completes, nbdkit stays up, and the origin is the snapshot's
#     view. (Before: std::terminate, nbdkit gone mid-merge.)
#  B. No thread at all: `merge m` is refused naming the merge thread; the
#     status says the merge failed (not "merging m, 0%" for ever); nothing
#     is lost (the origin export reads m's view, the origin file is
#     unchanged); a restart with snapshot-merge=m completes it.
source "$srcdir/functions.sh"
set -e
set -x

requires nbdkit --version
requires nbdcopy --version
requires python3 -c 'import nbd'
requires cc --version
requires timeout --version
requires test -r "$FILTER"
unset LIBNBD_DEBUG

enter_tmpdir
sock=$tmp/sock
ctl () { python3 "$srcdir/control_client.py" "$tmp/ctl" "$@"; }
cc -shared -fPIC -o fail_threads.so "$srcdir/fail_threads.c" -ldl

# make_snapshot: a 4 MiB random origin, and m (4k chunks) with about 480
# scattered exceptions, so each merge step has many runs for its workers.
make_snapshot () {
    rm -f origin.img m.cow
    python3 -c "
import random
random.seed(71)
open('origin.img', 'wb').write(random.randbytes(4 << 20))"
    nbdkit -U - --filter="$FILTER" file origin.img snapshot=m=m.cow \
        snapshot-chunk-size=4k --run '
      set -e
      python3 - "$unixsocket" <<"PY"
import nbd, random, sys
h = nbd.NBD()
h.connect_uri("nbd+unix:///m?socket=" + sys.argv[1])
random.seed(72)
for c in random.sample(range(0, 1024, 2), 480):
    h.pwrite(random.randbytes(1000), c * 4096 + random.randrange(3096))
h.flush()
PY
      nbdcopy "nbd+unix:///m?socket=$unixsocket" m-view.img'
    cp origin.img origin-before.img
    cmp -s m-view.img origin.img && { echo "m's view is the origin"; exit 1; }
    return 0
}

# serve: nbdkit with the shim, a control socket, m not merging yet.
serve () {
    rm -f "$sock" ctl pid
    LD_PRELOAD=$tmp/fail_threads.so FAIL_THREADS_FILE=$tmp/nothreads \
    start_nbdkit -P pid -U "$sock" --filter="$FILTER" file origin.img \
        snapshot=m=m.cow snapshot-control="$tmp/ctl" "$@"
}

# ------------------------------------------------------------------ A
make_snapshot
serve
rm -f nothreads.log
echo 2 > nothreads
ctl merge m
rc=0; wait_merged m || rc=$?
rm nothreads
[ $rc -eq 0 ]
_pid_alive "$(cat pid)"
test -s nothreads.log   # the shim did fail threads
nbdcopy "nbd+unix:///origin?socket=$sock" a-origin.img
cmp a-origin.img m-view.img
kill_nbdkit "$(cat pid)"
cmp origin.img m-view.img

# ------------------------------------------------------------------ B
make_snapshot
serve
rm -f nothreads.log
echo 1 > nothreads
if ctl merge m > merge.txt; then
    cat merge.txt; echo "merge started without a thread"; exit 1
fi
rm nothreads
cat merge.txt
grep -q '^ERR merge of m failed: cannot start the merge thread' merge.txt
ctl status | tee status.txt
grep -q 'merge of m failed' status.txt
absent 'merging m' status.txt
nbdcopy "nbd+unix:///origin?socket=$sock" b-origin.img
cmp b-origin.img m-view.img
kill_nbdkit "$(cat pid)"
cmp origin.img origin-before.img
rm -f "$sock"
timeout 60 nbdkit -f -U "$sock" --filter="$FILTER" file origin.img \
    snapshot=m=m.cow snapshot-merge=m snapshot-merge-exit=true
cmp origin.img m-view.img
