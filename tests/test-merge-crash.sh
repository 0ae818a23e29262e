#!/usr/bin/env bash
# A merge killed with SIGKILL at random moments resumes on restart and
# completes: the origin ends equal to the snapshot view; a sibling stays.
# Then a merge that fails (origin write errors from nbdkit's error filter)
# shows "Merge failed", loses nothing, exits 1 with snapshot-merge-exit,
# and a restart completes it. Bad merge parameters stop the start.
source "$srcdir/functions.sh"
set -e
set -x
requires nbdsh --version
requires nbdcopy --version
requires nbdkit --filter=delay null --version
requires nbdkit --filter=error null --version
tmp=$(mktemp -d)
cleanup_fn rm -rf "$tmp"
cd "$tmp"

make_snapshot() {
  python3 -c "
import random
random.seed(11)
open('origin.img','wb').write(bytes(random.getrandbits(8) for _ in range(2 << 20)))"
  cp origin.img base.img
  rm -f m.cow s.cow
  nbdkit -U - --filter="$FILTER" file origin.img snapshot=m=m.cow snapshot=s=s.cow \
    snapshot-chunk-size=4k --run '
    nbdsh -u "nbd+unix:///m?socket=$unixsocket" -c "
import random
random.seed(12)
for i in range(300):
    h.pwrite(bytes([i % 250 + 1]) * random.randrange(1, 12000), random.randrange((2 << 20) - 12000))
h.flush()"
    nbdcopy "nbd+unix:///m?socket=$unixsocket" m-view.img'
}

# SIGKILL during the merge, several times, then let it finish.
make_snapshot
for delay in 0.3 0.7 1.1 0.5; do
  rm -f sock
  nbdkit -f -U sock --filter="$FILTER" --filter=delay file origin.img \
    snapshot=m=m.cow snapshot=s=s.cow snapshot-merge=m wdelay=20ms &
  pid=$!
  sleep "$delay"
  kill -9 $pid
  wait $pid || true
done
rm -f sock
nbdkit -f -U sock --filter="$FILTER" file origin.img snapshot=m=m.cow \
  snapshot=s=s.cow snapshot-merge=m snapshot-merge-exit=true
cmp origin.img m-view.img
rm -f sock
nbdkit -U - --filter="$FILTER" file origin.img snapshot=s=s.cow \
  --run 'nbdcopy "nbd+unix:///s?socket=$unixsocket" s-view.img'
cmp s-view.img base.img

# A failing merge: the origin refuses writes while $tmp/inject exists.
make_snapshot
touch inject
rm -f sock
rc=0
nbdkit -f -v -U sock --filter="$FILTER" --filter=error file origin.img \
  snapshot=m=m.cow snapshot-merge=m snapshot-merge-exit=true \
  error=EIO error-pwrite-rate=100% error-file="$tmp/inject" 2> fail.log || rc=$?
[ $rc -eq 1 ]
grep -q 'merge of m failed' fail.log
# While failed, the merged view is still whole.
start_nbdkit -P pid -U sock2 --filter="$FILTER" --filter=error file origin.img \
  snapshot=m=m.cow snapshot-merge=m \
  error=EIO error-pwrite-rate=100% error-file="$tmp/inject"
for i in $(seq 100); do
  nbdinfo --list "nbd+unix:///?socket=$tmp/sock2" | grep -q 'failed' && break
  sleep 0.1
done
nbdinfo --list "nbd+unix:///?socket=$tmp/sock2" | tee list.txt
grep -q 'Merge failed' list.txt
nbdcopy "nbd+unix:///origin?socket=$tmp/sock2" during.img
cmp during.img m-view.img
kill_nbdkit "$(cat pid)"
rm -f inject sock
nbdkit -f -U sock --filter="$FILTER" file origin.img snapshot=m=m.cow \
  snapshot-merge=m snapshot-merge-exit=true
cmp origin.img m-view.img

# Refused at start: each names the problem.
refused() {
  local pattern=$1; shift
  local rc=0
  nbdkit -U - --filter="$FILTER" file origin.img "$@" --run true 2> err.txt || rc=$?
  cat err.txt
  [ $rc -ne 0 ]
  grep -Eq "$pattern" err.txt
}
refused 'only one merge' snapshot=m=m.cow snapshot=s=s.cow snapshot-merge=m snapshot-merge=s
refused 'transient' snapshot=n=n.cow snapshot-store=N snapshot-merge=n
refused 'no such snapshot' snapshot=m=m.cow snapshot-merge=nosuch
refused 'needs snapshot-merge' snapshot=m=m.cow snapshot-merge-exit=true
# An invalid snapshot cannot be merged.
rm -f inv.cow
nbdkit -U - --filter="$FILTER" file origin.img snapshot=inv=inv.cow \
  snapshot-chunk-size=4k snapshot-cow-size=16k --run '
  nbdsh -u "nbd+unix:///origin?socket=$unixsocket" -c "h.pwrite(b\"x\" * 65536, 0)"'
refused 'invalid' snapshot=inv=inv.cow snapshot-merge=inv
