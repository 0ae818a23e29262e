#!/usr/bin/env bash
# nbdsnap info, check and dump on a COW file that a running nbdkit is
# growing: every run is clean. Records are written after the data they
# name, so a record read after the size never points past the file as it
# is then; nbdsnap once judged records against the size read before the
# metadata, and reported the newest ones as past the end of a truncated
# file (about one run in two failed here).
source "$srcdir/functions.sh"
set -e
set -x
requires test -x "$NBDSNAP"
requires test -r "$FILTER"
requires nbdkit memory --version
requires nbdsh --version
enter_tmpdir

# 4k chunks: every 4k write to the origin copies a new chunk, and an area
# (256 records) fills every 256 writes, so the file never stops growing.
start_nbdkit -P pid -U sock --filter="$FILTER" memory 4G \
    snapshot=grow.cow snapshot-chunk-size=4k snapshot-export=origin

# The writer: 4k writes to new origin chunks, 16 in flight, at most
# $rate a second (the file grows by 4k a write), until the file "stop"
# appears. Its own log would swamp the test's.
rate=${GROWING_RATE:-3000}
LIBNBD_DEBUG=0 nbdsh -u "nbd+unix:///?socket=$tmp/sock" -c '
import os, time
buf = bytearray(b"w" * 4096)
chunks = h.get_size() // 4096
i = 0
start = time.monotonic()
while not os.path.exists("stop") and i < chunks:
    while h.aio_in_flight() < 16 and i < chunks:
        h.aio_pwrite(buf, i * 4096)
        i += 1
    h.poll(-1)
    while h.aio_peek_command_completed() > 0:
        h.aio_command_completed(h.aio_peek_command_completed())
    ahead = i / '"$rate"' - (time.monotonic() - start)
    if ahead > 0:
        time.sleep(ahead)
' 2>writer.err &
writer=$!
cleanup_fn kill "$writer"

for i in {1..600}; do [ "$(stat -c %s grow.cow)" -gt $((4 << 20)) ] && break; sleep 0.1; done
size_before=$(stat -c %s grow.cow)

for i in $(seq ${GROWING_RUNS:-40}); do
    "$NBDSNAP" check grow.cow > check.out 2>&1 || { cat check.out; exit 1; }
    grep -q '^grow.cow: clean, [0-9]* exceptions' check.out
    "$NBDSNAP" info grow.cow > info.out 2>&1 || { cat info.out; exit 1; }
    # The size shown is read after the store: it covers what is used.
    used=$(sed -n 's/^used: \([0-9]*\) sectors.*/\1/p' info.out)
    fsize=$(sed -n 's/^file size: [0-9]* bytes (\([0-9]*\) sectors)/\1/p' info.out)
    [ "$used" -le "$fsize" ] || { cat info.out; exit 1; }
    "$NBDSNAP" dump grow.cow > dump.out 2>&1 || { tail -n3 dump.out; exit 1; }
    [ "$(head -c1 dump.out)" = "#" ]
done

# The file grew all along: the test saw a changing file.
size_after=$(stat -c %s grow.cow)
[ "$size_after" -gt "$size_before" ]
touch stop
wait "$writer"
cat writer.err
