#!/usr/bin/env bash
# A COW file that the filter or nbdsnap create makes is durable by name:
# its directory is synced after the file is made, before anything is
# written to it. Without that, a power loss could take the new file, and
# every flush it served, away. Checked with strace: an fsync of the
# directory follows the O_EXCL create of the file, in the same process.

source "$srcdir/functions.sh"
set -e
set -x

requires nbdkit --version
requires nbdsh --version
requires python3 --version
requires test -x "$NBDSNAP"
requires strace -f -o /dev/null true

enter_tmpdir
export tmp

# LeakSanitizer cannot run under ptrace (ASan builds): no leak check here.
export ASAN_OPTIONS="${ASAN_OPTIONS:+$ASAN_OPTIONS:}detect_leaks=0"

# check TRACE FILE: the create of FILE is followed by an fsync of a
# descriptor opened on its directory.
check() {
  python3 - "$1" "$2" <<'PY'
import re, sys, os
trace, path = sys.argv[1], sys.argv[2]
d = os.path.dirname(path)
created = None
dirfds = {}
for line in open(trace):
    m = re.match(r'(\d+)\s+openat\(AT_FDCWD, "([^"]*)", ([^)]*)\)\s+= (\d+)', line)
    if m:
        pid, name, flags, fd = m.groups()
        if name == path and "O_CREAT" in flags and "O_EXCL" in flags:
            created = pid
        elif name == d and "O_DIRECTORY" in flags and created == pid:
            dirfds[(pid, fd)] = True
        continue
    m = re.match(r'(\d+)\s+fsync\((\d+)\)\s+= 0', line)
    if m and (m.group(1), m.group(2)) in dirfds:
        print("directory of", path, "synced after the create")
        sys.exit(0)
sys.exit("no fsync of %s after %s was created (created by pid %s)" %
         (d, path, created))
PY
}

# The filter, making the COW file of its first snapshot.
strace -f -e trace=openat,fsync -o trace1 \
  nbdkit -U - --filter="$FILTER" memory 1M snapshot=s=$tmp/new.cow \
    --run 'nbdsh -u "nbd+unix:///s?socket=$unixsocket" \
             -c "h.pwrite(b\"s\" * 4096, 0); h.flush()"'
test -s new.cow
check trace1 "$tmp/new.cow"

# nbdsnap create.
strace -f -e trace=openat,fsync -o trace2 "$NBDSNAP" create "$tmp/made.cow"
test -s made.cow
check trace2 "$tmp/made.cow"

# An existing file is opened as it is: no create, no directory sync.
strace -f -e trace=openat,fsync -o trace3 \
  nbdkit -U - --filter="$FILTER" memory 1M snapshot=s=$tmp/new.cow \
    --run 'nbdinfo "nbd+unix:///s?socket=$unixsocket"' >/dev/null
if check trace3 "$tmp/new.cow"; then
  echo "$0: an existing COW file was created again"; exit 1
fi
