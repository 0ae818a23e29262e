#!/usr/bin/env bash
# A COW file nbdkit is done with is let go of (closed, its lock gone):
#  * a snapshot given at startup, then dropped (before: kept open until
#    nbdkit exited, so `take`, `nbdsnap create --force` or another nbdkit
#    found it "in use", and rm freed no space);
#  * a snapshot whose live merge completed (same before): it can be taken
#    again at once.
# And `take` of a file this nbdkit already uses names the snapshot using
# it, rather than "in use by another process: stop it first".
source "$srcdir/functions.sh"
set -e
set -x
requires nbdsh --version
requires python3 -c 'import nbd'
enter_tmpdir

ctl () { python3 "$srcdir/control_client.py" "$tmp/ctl" "$@"; }
# held FILE: nbdkit has FILE open.
held () {
    local fd
    for fd in /proc/"$(cat pid)"/fd/*; do
        [ "$(readlink "$fd")" = "$tmp/$1" ] && return 0
    done
    return 1
}

head -c 4M /dev/urandom > origin.img
start_nbdkit -P pid -U sock --filter="$FILTER" file origin.img \
    snapshot=p="$tmp/p.cow" snapshot-chunk-size=4k snapshot-control="$tmp/ctl"
uri () { echo "nbd+unix:///$1?socket=$tmp/sock"; }
nbdsh -u "$(uri origin)" -c 'h.pwrite(b"o" * 65536, 0); h.flush()'
held p.cow

# take of a file in use here: named.
rc=0; out=$(ctl take p2 "$tmp/p.cow") || rc=$?
echo "$out"
[ $rc -eq 1 ]
[ "$out" = "ERR $tmp/p.cow is already snapshot 'p': each snapshot needs its own COW file" ]

# A startup snapshot, dropped: let go of.
ctl drop p
if held p.cow; then echo "the dropped p.cow is still open"; exit 1; fi

# A live merge that completes: let go of, and the file can be taken again.
ctl take t "$tmp/t.cow"
nbdsh -u "$(uri t)" -c 'h.pwrite(b"t" * 8192, 4096); h.flush()'
held t.cow
ctl merge t
wait_merged t
if held t.cow; then echo "the merged t.cow is still open"; exit 1; fi
ctl take t "$tmp/t.cow"
held t.cow
nbdsh -u "$(uri origin)" -c '
assert h.pread(4096, 4096) == b"t" * 4096
assert h.pread(4096, 0) == b"o" * 4096'
