#!/usr/bin/env bash
# A merge with the origin in use: writes through the origin export during
# the merge land where the merged view stays right (checked against a
# model), a sibling snapshot keeps its point in time (copy-out driven by
# the merge), the merging snapshot is not exported, progress shows.
source "$srcdir/functions.sh"
set -e
set -x
requires nbdsh --version
requires nbdcopy --version
requires nbdkit --filter=delay null --version
enter_tmpdir
export tmp

python3 -c "
import random
random.seed(3)
open('origin.img','wb').write(bytes(random.getrandbits(8) for _ in range(4 << 20)))"
cp origin.img base.img
# Snapshot m gets many scattered writes; sibling s is taken at the start.
nbdkit -U - --filter="$FILTER" file origin.img snapshot=m=m.cow snapshot=s=s.cow \
  snapshot-chunk-size=4k --run '
  set -e
  nbdsh -u "nbd+unix:///m?socket=$unixsocket" -c "
import random
random.seed(4)
for i in range(400):
    h.pwrite(bytes([i % 250 + 1]) * 4096, random.randrange(1024) * 4096)
h.flush()"
  nbdcopy "nbd+unix:///m?socket=$unixsocket" m-view.img'
cmp origin.img base.img

# Merge, slowed by a delay under the filter so writes meet it half way.
start_nbdkit -P pid -U sock --filter="$FILTER" --filter=delay \
  file origin.img snapshot=m=m.cow snapshot=s=s.cow snapshot-merge=m wdelay=5ms
uri="nbd+unix:///origin?socket=$tmp/sock"
nbdinfo --list "nbd+unix:///?socket=$tmp/sock" > list.txt
cat list.txt
grep -q 'export="origin"' list.txt
grep -q 'export="s"' list.txt
if grep -q 'export="m"' list.txt; then exit 1; fi
if nbdinfo "nbd+unix:///m?socket=$tmp/sock"; then exit 1; fi
grep -Eq 'merging m, [0-9]+%' list.txt || grep -q 'merged m' list.txt

# Writes during the merge; the model is the merged view plus these.
nbdsh -u "$uri" -c "
import random
random.seed(5)
model = bytearray(open('m-view.img', 'rb').read())
for i in range(300):
    off = random.randrange((4 << 20) - 9000)
    n = random.randrange(1, 9000)
    data = bytes([random.randrange(256)]) * n
    h.pwrite(data, off)
    model[off:off + n] = data
    if i % 50 == 0:
        assert h.pread(4 << 20, 0) == model, 'merged view wrong during merge'
h.flush()
open('model.img', 'wb').write(model)
"
# Wait for the end of the merge.
for i in $(seq 600); do
  nbdinfo --list "nbd+unix:///?socket=$tmp/sock" | grep -q 'merged m' && break
  sleep 0.1
done
nbdinfo --list "nbd+unix:///?socket=$tmp/sock" | grep 'merged m'
nbdcopy "$uri" after.img
cmp after.img model.img
nbdcopy "nbd+unix:///s?socket=$tmp/sock" s-after.img
cmp s-after.img base.img
kill_nbdkit "$(cat pid)"
cmp origin.img model.img
if [ -x "$NBDSNAP" ]; then
  "$NBDSNAP" info --json m.cow | grep -q '"exceptions": 0'
fi
