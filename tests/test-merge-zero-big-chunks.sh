#!/usr/bin/env bash
# Zero requests on the origin during a merge, with chunks larger than the
# 4 MiB zero buffer the filter writes zeros from (8 MiB chunks): a zero
# into a chunk still in the merging COW, and one into a chunk the
# snapshot does not have, each across a 4 MiB piece boundary. The merge
# is held where it is by failing it (nbdkit's error filter fails origin
# writes while $tmp/inject exists), so the first zero surely lands in the
# COW. After the merge, resumed by a restart, the origin is the
# snapshot's view with those zeros. (Such a zero used to allocate a
# zeroed buffer as large as the chunk, up to 1 GiB, per request; the
# pieces now come from one bounded buffer.)
source "$srcdir/functions.sh"
set -e
set -x
requires nbdkit --filter=error null --version
requires nbdsh --version
requires nbdcopy --version
requires timeout --version
enter_tmpdir
sock=$tmp/sock
ctl () { python3 "$srcdir/control_client.py" "$tmp/ctl" "$@"; }

python3 -c "
import random
random.seed(81)
open('origin.img', 'wb').write(random.randbytes(96 << 20))"
# m: chunks 0 to 9 of 8 MiB in the COW.
nbdkit -U - --filter="$FILTER" file origin.img snapshot=m=m.cow \
    snapshot-chunk-size=8M --run '
  nbdsh -u "nbd+unix:///m?socket=$unixsocket" -c "
for c in range(10):
    h.pwrite(bytes([0x61 + c]) * 4096, (c << 23) + 100)
h.flush()"'
nbdkit -U - --filter="$FILTER" file origin.img snapshot=m=m.cow \
    --run 'nbdcopy "nbd+unix:///m?socket=$unixsocket" model.img'

touch inject
start_nbdkit -P pid -U "$sock" --filter="$FILTER" --filter=error \
    file origin.img snapshot=m=m.cow snapshot-control="$tmp/ctl" \
    error=EIO error-pwrite-rate=100% error-file="$tmp/inject"
ctl merge m
for i in $(seq 300); do
    ctl status > status.out
    grep -q 'merge of m failed' status.out && break
    sleep 0.1
done
cat status.out
grep -q 'merge of m failed' status.out
rm inject
python3 - "$sock" <<'PY'
import nbd, sys
h = nbd.NBD()
h.connect_uri("nbd+unix:///origin?socket=" + sys.argv[1])
model = bytearray(open("model.img", "rb").read())
# Chunk 0 (still in m's COW), chunk 11 (m does not have it).
for off, n in (3 << 20, 2 << 20), ((11 << 23) + (3 << 20), 2 << 20):
    h.zero(n, off)
    model[off:off + n] = bytes(n)
    assert h.pread(n + 8192, off - 4096) == model[off - 4096:off + n + 4096], off
h.flush()
open("model.img", "wb").write(model)
PY
kill_nbdkit "$(cat pid)"
rm -f "$sock"
timeout 120 nbdkit -f -U "$sock" --filter="$FILTER" file origin.img \
    snapshot=m=m.cow snapshot-merge=m snapshot-merge-exit=true
cmp origin.img model.img
