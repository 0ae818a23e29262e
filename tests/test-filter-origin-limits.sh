#!/usr/bin/env bash
# nbdkit-snapshot-filter over an origin with limits:
#
#  - block sizes (nbdkit's blocksize-policy filter below, refusing what
#    breaks them): the filter advertises the plugin's minimum, splits at
#    its maximum, and origin writes and copy-outs go through, checked
#    against a model; a chunk size under the plugin's minimum is refused
#    with a message naming both;
#  - a rotational origin: every export says so, as the origin does;
#  - an origin that fails to open, and a merge into a read-only origin:
#    connections are refused with the reason, and nbdkit --run ends
#    instead of waiting for ever.

source "$srcdir/functions.sh"
set -e
set -x

requires nbdkit --version
requires nbdsh --version
requires nbdinfo --version
requires python3 -c 'import nbd'
requires nbdkit --filter=blocksize-policy null --version
requires nbdkit eval --version
requires timeout --version

enter_tmpdir
export tmp


# ------------------------------------------------------------- minimum
# A 4 KiB minimum: advertised, and every request that reaches the plugin
# (copy-outs of 64 KiB chunks, queued origin writes) honours it.
rm -f a.cow
nbdkit -U - --filter="$FILTER" --filter=blocksize-policy memory 4M \
       blocksize-error-policy=error \
       blocksize-minimum=4096 snapshot=a=$tmp/a.cow --run '
  nbdinfo --json "nbd+unix:///origin?socket=$unixsocket" > origin.json
  nbdsh -u "nbd+unix:///origin?socket=$unixsocket" -c "
h.pwrite(b\"o\" * (4 << 20), 0)
h.flush()
" -c "
import random
random.seed(1)
model = bytearray(b\"o\" * (4 << 20))
for i in range(200):
    off = random.randrange(1024) * 4096
    n = random.randrange(1, 5) * 4096
    n = min(n, (4 << 20) - off)
    data = bytes([random.randrange(256)]) * n
    h.pwrite(data, off)
    model[off:off + n] = data
h.flush()
assert h.pread(4 << 20, 0) == model, \"origin differs from the model\"
"'
python3 -c '
import json
e = json.load(open("origin.json"))["exports"][0]
assert e["block_size_minimum"] == 4096, e'

# The snapshot taken before the first write sees zeros (memory plugin);
# a snapshot of the written origin keeps "o" through random writes.
nbdkit -U - --filter="$FILTER" --filter=blocksize-policy memory 4M \
       blocksize-error-policy=error \
       blocksize-minimum=4096 blocksize-maximum=1M \
       snapshot-chunk-size=4M snapshot=b=$tmp/b.cow --run '
  nbdsh -u "nbd+unix:///b?socket=$unixsocket" -c "
assert h.get_block_size(nbd.SIZE_MINIMUM) == 4096
assert h.pread(4 << 20, 0) == bytes(4 << 20)
" -c "
o = nbd.NBD()
o.connect_uri(\"nbd+unix:///origin?socket=$unixsocket\")
# Larger than the plugin maximum: split below the filter.
o.pwrite(b\"x\" * (4 << 20), 0, nbd.CMD_FLAG_FUA)
assert o.pread(4 << 20, 0) == b\"x\" * (4 << 20)
assert h.pread(4 << 20, 0) == bytes(4 << 20), \"snapshot b changed\"
"'

# A chunk size under the plugin minimum: refused, with the reason.
rm -f c.cow
if timeout 60 nbdkit -U - --filter="$FILTER" --filter=blocksize-policy memory 4M \
       blocksize-error-policy=error \
        blocksize-minimum=4096 snapshot-chunk-size=512 snapshot=c=$tmp/c.cow \
        --run 'nbdinfo "nbd+unix:///c?socket=$unixsocket"' 2> err.log; then
    cat err.log; echo "$0: a 512-byte chunk over a 4 KiB minimum was served"; exit 1
fi
cat err.log
grep -q "chunk size 512 is under the origin's minimum block size 4096" err.log

# ----------------------------------------------------------- rotational
# Snapshots read what they did not change from the origin: a rotating
# origin makes every export rotational (it was reported as 0).
for rot in 0 1; do
  rm -f r.cow
  nbdkit -U - --filter="$FILTER" eval get_size='echo 1M' \
      pread='dd if=/dev/zero count=$3 iflag=count_bytes status=none' \
      is_rotational="exit $((1 - rot))" snapshot=r=$tmp/r.cow --run '
    nbdinfo --json "nbd+unix:///origin?socket=$unixsocket" > rot-origin.json
    nbdinfo --json "nbd+unix:///r?socket=$unixsocket" > rot-r.json'
  for e in origin r; do
    python3 -c '
import json, sys
got = json.load(open(sys.argv[1]))["exports"][0]["is_rotational"]
assert got == (sys.argv[2] == "1"), (sys.argv, got)' rot-$e.json $rot
  done
done

# ----------------------------------------------------- failing origins
# The plugin fails to open: --run's command is refused, nbdkit ends.
rc=0
timeout 60 nbdkit -U - --filter="$FILTER" eval \
    open='echo "origin is gone" >&2; exit 1' get_size='echo 1M' \
    pread='exit 1' snapshot=d=$tmp/d.cow \
    --run 'nbdinfo "nbd+unix:///origin?socket=$unixsocket"' 2> err.log || rc=$?
cat err.log
test $rc -ne 0 -a $rc -ne 124
grep -q 'cannot open the origin' err.log

# A merge into a read-only origin (no pwrite): refused at once, nothing
# waits for a merge that cannot run.
nbdkit -U - --filter="$FILTER" memory 1M snapshot=e=$tmp/e.cow --run '
  nbdsh -u "nbd+unix:///e?socket=$unixsocket" -c "h.pwrite(b\"e\" * 4096, 0)"'
rc=0
timeout 60 nbdkit -U - --filter="$FILTER" eval get_size='echo 1M' \
    pread='dd if=/dev/zero count=$3 iflag=count_bytes status=none' \
    snapshot=e=$tmp/e.cow snapshot-merge=e \
    --run 'nbdinfo "nbd+unix:///origin?socket=$unixsocket"' 2> err.log || rc=$?
cat err.log
test $rc -ne 0 -a $rc -ne 124
grep -q 'snapshot-merge=e: the origin is read-only' err.log
