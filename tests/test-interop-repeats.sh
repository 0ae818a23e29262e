#!/usr/bin/env bash
# COW files whose records repeat origin chunks (old kernels, damage): the
# filter serves every chunk from the record the real kernel (dm-snapshot
# under qemu, through $KDM) serves it from. The kernel folds a record that
# continues a run of consecutive chunks ahead of an earlier record of the
# same chunk; the filter used to take the earliest always, and differed on
# seeds 1, 7 and 8 here. For 8 seeds: 4 KiB chunks, 6 to 39 records with
# repeats and runs in a 64-chunk origin, each record's data stamped with
# its index; the filter's snapshot view must equal `kdm.sh read`'s.
source "$srcdir/functions.sh"
set -e
set -x

requires test -x "$KDM"
requires qemu-system-x86_64 --version
requires nbdcopy --version
enter_tmpdir

cat > gen.py <<'PY'
import random, struct, sys
seed = int(sys.argv[1]); rnd = random.Random(seed)
cb = 4096
recs, new = [], 2
for i in range(rnd.randrange(6, 40)):
    if recs and rnd.random() < 0.5:
        if rnd.random() < 0.6:
            o = recs[-1][0] + rnd.choice([1, -1, 0])
        else:
            o = rnd.choice(recs)[0]
        o = max(0, min(63, o))
    else:
        o = rnd.randrange(0, 64)
    recs.append((o, new)); new += 1
img = bytearray((new + 1) * cb)
img[0:16] = struct.pack("<IIII", 0x70416e53, 1, 1, 8)
for i, (o, n) in enumerate(recs):
    img[cb + 16 * i:cb + 16 * i + 16] = struct.pack("<QQ", o, n)
    img[n * cb:(n + 1) * cb] = bytes([i + 1]) * cb
open("cow.img", "wb").write(img)
print(recs)
PY
python3 -c "open('origin.img', 'wb').write(bytes([0xee]) * (64 * 4096))"

for seed in 1 2 3 4 5 6 7 8; do
    python3 gen.py $seed
    cp cow.img filter.cow
    nbdkit -U - --filter="$FILTER" file origin.img snapshot=s=$tmp/filter.cow \
        --run 'nbdcopy "nbd+unix:///s?socket=$unixsocket" filter-view.img'
    "$KDM" read origin.img cow.img 8 kernel-view.img
    cmp filter-view.img kernel-view.img
done
