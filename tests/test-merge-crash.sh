#!/usr/bin/env bash
# A merge killed with SIGKILL at random moments (reference §1.10: "doing a
# step twice after a crash gives the same result") resumes when nbdkit is
# started again with the same parameters, and completes.
#
# m (4k chunks, ~700 exceptions over 3 metadata areas, single chunks and
# runs of consecutive chunks) is merged with nbdkit's delay filter under
# ours (wdelay=20ms) to widen the window; a sibling s (64k chunks) gets
# copy-outs from the merge.  Each round starts nbdkit with
# snapshot-merge=m snapshot-merge-exit=true, reads the whole origin export
# (the merged view: must be m's view) and kills nbdkit with SIGKILL 0.2-2 s
# after its start.  After each kill:
#  * nbdsnap check passes on both COW files;
#  * served without snapshot-merge, m's view and s's view are unchanged
#    (a half-done merge step is still all in m's COW);
# until a round ends by itself with exit status 0.  Then the origin file
# equals m's view, m.cow has no exceptions, and s is unchanged.
# The kill times are printed; set MERGE_CRASH_SEED to repeat a run.
source "$srcdir/functions.sh"
set -e
set -x

requires nbdkit --version
requires nbdkit --filter=delay null --version
requires nbdcopy --version
requires python3 -c 'import nbd'
requires timeout --version
requires test -r "$FILTER"
unset LIBNBD_DEBUG

enter_tmpdir

seed=${MERGE_CRASH_SEED:-$$}
echo "MERGE_CRASH_SEED=$seed"
RANDOM=$seed

python3 -c "
import random
random.seed(51)
open('origin.img', 'wb').write(random.randbytes(4 << 20))"

# s first, with 64k chunks (its header wins over snapshot-chunk-size).
nbdkit -U - --filter="$FILTER" file origin.img snapshot=s=s.cow \
    snapshot-chunk-size=64k --run true
cat > prepare.py <<'PY'
import nbd, random, sys
sock = sys.argv[1]
def conn(name):
    h = nbd.NBD()
    h.connect_uri("nbd+unix:///%s?socket=%s" % (name, sock))
    return h
m, s, o = conn("m"), conn("s"), conn("origin")
size = o.get_size()
random.seed(52)
chunks = list(range(0, size // 4096, 2))
random.shuffle(chunks)
for c in chunks[:560]:                       # single chunks, partial or whole
    n = random.choice([4096, 700, 1])
    m.pwrite(random.randbytes(n), c * 4096 + random.randrange(4096 - n + 1))
for i in range(12):                          # runs of consecutive chunks
    off = random.randrange(size // 4096 - 10) * 4096
    m.pwrite(random.randbytes(8 * 4096), off)
for i in range(20):
    s.pwrite(random.randbytes(5000), random.randrange(size - 5000))
for i in range(30):                          # copy-outs to m and s
    o.pwrite(random.randbytes(6000), random.randrange(size - 6000))
for h in (m, s, o):
    h.flush()
PY
nbdkit -U - --filter="$FILTER" file origin.img snapshot=m=m.cow snapshot=s=s.cow \
    snapshot-chunk-size=4k --run '
  python3 prepare.py "$unixsocket" &&
  nbdcopy "nbd+unix:///m?socket=$unixsocket" m-view.img &&
  nbdcopy "nbd+unix:///s?socket=$unixsocket" s-view.img'
if [ -x "$NBDSNAP" ]; then "$NBDSNAP" info m.cow; "$NBDSNAP" info s.cow; fi

# Exit 3: the merged view is wrong; 2: the connection went away (the
# kill, or the end of the merge: snapshot-merge-exit).
cat > readall.py <<'PY'
import nbd, sys
want = open("m-view.img", "rb").read()
try:
    h = nbd.NBD()
    h.connect_uri("nbd+unix:///origin?socket=" + sys.argv[1])
    for off in range(0, len(want), 1 << 20):
        if h.pread(1 << 20, off) != want[off:off + (1 << 20)]:
            print("the merged view differs from m's view at MiB %d" % (off >> 20))
            sys.exit(3)
except nbd.Error as e:
    print("read stopped: %s" % e)
    sys.exit(2)
PY

sock=$tmp/sock
done=no
for round in $(seq 12); do
    rm -f "$sock" killed
    nbdkit -f -v -U "$sock" --filter="$FILTER" --filter=delay file origin.img \
        snapshot=m=m.cow snapshot=s=s.cow snapshot-merge=m \
        snapshot-merge-exit=true wdelay=20ms 2> round$round.log &
    pid=$!
    ms=$((200 + RANDOM % 1800))
    ( sleep "$(printf '%d.%03d' $((ms / 1000)) $((ms % 1000)))"
      if kill -0 $pid 2>/dev/null; then touch killed; kill -9 $pid; fi ) &
    killer=$!
    for i in $(seq 100); do test -S "$sock" && break; sleep 0.02; done
    rrc=0
    python3 readall.py "$sock" || rrc=$?
    if [ $rrc = 3 ]; then
        echo "round $round: the merged view is wrong after a restart"
        exit 1
    fi
    wait $killer
    rc=0
    wait $pid || rc=$?
    if [ $rrc != 0 ] && [ ! -e killed ] && [ $rc != 0 ]; then
        echo "round $round: reading the origin export failed, nbdkit exited $rc"
        exit 1
    fi
    grep -E 'merge of m (started|failed|complete)|merge of m: [0-9]+%' round$round.log || :
    if [ -e killed ]; then
        echo "round $round: killed after $ms ms"
    else
        echo "round $round: nbdkit exited by itself with $rc after less than $ms ms"
        [ $rc -eq 0 ]
        done=yes
        break
    fi
    # The files after the crash.
    if [ -x "$NBDSNAP" ]; then
        "$NBDSNAP" check m.cow
        "$NBDSNAP" check s.cow
        "$NBDSNAP" info --json m.cow | json_field exceptions
    fi
    nbdkit -U - --filter="$FILTER" file origin.img snapshot=m=m.cow snapshot=s=s.cow \
        --run '
      nbdcopy "nbd+unix:///m?socket=$unixsocket" m-now.img &&
      nbdcopy "nbd+unix:///s?socket=$unixsocket" s-now.img'
    cmp m-now.img m-view.img
    cmp s-now.img s-view.img
done

if [ $done = no ]; then
    # Not done after the rounds: finish without the delay.
    rm -f "$sock"
    timeout 60 nbdkit -f -U "$sock" --filter="$FILTER" file origin.img \
        snapshot=m=m.cow snapshot=s=s.cow snapshot-merge=m snapshot-merge-exit=true
fi
cmp origin.img m-view.img
if [ -x "$NBDSNAP" ]; then
    [ "$("$NBDSNAP" info --json m.cow | json_field exceptions)" = 0 ]
    "$NBDSNAP" check m.cow
    "$NBDSNAP" check s.cow
fi
nbdkit -U - --filter="$FILTER" file origin.img snapshot=s=s.cow --run '
  nbdcopy "nbd+unix:///s?socket=$unixsocket" s-now.img'
cmp s-now.img s-view.img
