#!/usr/bin/env bash
# Extents of a snapshot stay right while the origin changes under them: a
# chunk the snapshot reads from the origin is held still until its
# extents are answered. Before, an origin trim or write that came between
# the filter's "this chunk is on the origin" and the origin's own answer
# copied the chunk out and changed the origin, and the snapshot's old
# data was called a hole: nbdcopy skipped it and the backup got zeros
# while the snapshot read right. nbdkit's delay filter (under ours) holds
# each extents call at the plugin for 2 s, so the origin change lands in
# that window every time.
source "$srcdir/functions.sh"
set -e
set -x
requires nbdkit --filter=delay null --version
requires nbdcopy --version
requires nbdsh --version
requires timeout --version
enter_tmpdir

# race CHANGE: a backup of snapshot s with nbdcopy, and CHANGE (nbdsh
# code on the origin) half a second into it; the backup must be the
# disk as it was.
race () {
    rm -f s.cow backup.img
    python3 -c "open('disk.img', 'wb').write(b'\x55' * (1 << 20))"
    cp disk.img before.img
    export change=$1
    timeout 120 nbdkit -U - --filter="$FILTER" --filter=delay file disk.img \
        delay-extents=2 snapshot=s.cow --run '
      set -e
      nbdcopy "nbd+unix:///s?socket=$unixsocket" backup.img &
      copy=$!
      sleep 0.5
      nbdsh -u "nbd+unix:///origin?socket=$unixsocket" -c "$change"
      wait $copy'
    cmp before.img backup.img
    if cmp -s before.img disk.img; then echo "the origin did not change"; exit 1; fi
}
race 'h.trim(1 << 20, 0)'
race 'h.pwrite(b"\xaa" * (1 << 20), 0)'
