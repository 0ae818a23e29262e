#!/usr/bin/env bash
# COW space: while nbdkit runs, disk space is set aside past the end of a
# growing COW file (fewer, larger allocations); when it stops, the file
# keeps only what it holds, and the size was never touched by it.
source "$srcdir/functions.sh"
set -e
set -x
requires nbdsh --version
requires du --version
enter_tmpdir
truncate -s 64M origin.img
nbdkit -U - --filter="$FILTER" file origin.img snapshot=s=s.cow --run '
  set -e
  nbdsh -u "$uri" -c "h.pwrite(b\"x\" * (1 << 20), 0); h.flush()"
  echo "$(du -k s.cow | cut -f1) $(stat -c %s s.cow)" > during'
read -r kib size < during
# 16 chunks of 64 KiB and the two metadata chunks: 1152 KiB of file.
[ "$size" -eq $((18 * 65536)) ]
[ "$kib" -gt $((size / 1024 + 1024)) ]     # space set aside while running
after=$(du -k s.cow | cut -f1)
[ "$after" -le $((size / 1024 + 64)) ]     # and given back at exit
[ "$(stat -c %s s.cow)" -eq "$size" ]

# A killed nbdkit cannot give it back; the next start does, even one that
# writes nothing (before: it stayed until a run that grew the file).
start_nbdkit -P pid -U sock --filter="$FILTER" file origin.img snapshot=s=s.cow
nbdsh -u "nbd+unix:///s?socket=$tmp/sock" \
  -c 'h.pwrite(b"y" * (1 << 20), 2 << 20); h.flush()'
size=$(stat -c %s s.cow)
kill -9 "$(cat pid)"
for i in {1..100}; do _pid_alive "$(cat pid)" || break; sleep 0.1; done
[ "$(du -k s.cow | cut -f1)" -gt $((size / 1024 + 1024)) ]   # left behind
nbdkit -U - --filter="$FILTER" file origin.img snapshot=s=s.cow --run true
[ "$(du -k s.cow | cut -f1)" -le $((size / 1024 + 64)) ]
[ "$(stat -c %s s.cow)" -eq "$size" ]
data=$(nbdkit -U - --filter="$FILTER" file origin.img snapshot=s=s.cow \
  --run 'nbdsh -u "$uri" -c "print(h.pread(4, 2 << 20))"')
[ "$data" = "bytearray(b'yyyy')" ]
