#!/usr/bin/env bash
# nbdsnap dump: a comment line, then exactly the records on disk, in order.
source "$srcdir/functions.sh"
set -e
set -x
requires test -x "$NBDSNAP"
requires python3 --version
enter_tmpdir

# expected_dump CS COUNT: what make_cow wrote, as dump prints it.
expected_dump () {
    python3 - "$@" <<'PY'
import sys
cs, count = int(sys.argv[1]), int(sys.argv[2])
epa = cs * 32
for k in range(count):
    print("area %d index %d: origin chunk %d -> cow chunk %d"
          % (k // epa, k % epa, 1000 + 3 * k, 2 + k + k // epa))
PY
}

# 40 records at cs 1 (two areas); 600 at cs 8 (three areas).
make_cow a.cow 1 40 80
"$NBDSNAP" dump a.cow > dump.txt
[ "$(head -n1 dump.txt)" = "# chunk_size=512 chunk_sectors=1 valid=1 exceptions=40 status=43/80 3" ]
[ "$(grep -c '^area ' dump.txt)" -eq 40 ]
[ "$(grep -vc '^area ' dump.txt)" -eq 1 ]
diff -u <(expected_dump 1 40) <(tail -n +2 dump.txt)
grep -Fx 'area 1 index 7: origin chunk 1117 -> cow chunk 42' dump.txt

make_cow b.cow 8 600
"$NBDSNAP" dump b.cow > dump.txt
[ "$(grep -c '^area ' dump.txt)" -eq 600 ]
diff -u <(expected_dump 8 600) <(grep '^area ' dump.txt)
# The header's status is info's.
[ "$(head -n1 dump.txt | sed 's/.* status=//')" = "$("$NBDSNAP" info --json b.cow | json_field status)" ]

# A duplicate record is listed where it is, marked; the count excludes it.
cp a.cow dup.cow
python3 -c '
import struct
f = open("dup.cow", "r+b"); f.seek(512 + 16 * 5); f.write(struct.pack("<Q", 1000))'
"$NBDSNAP" dump dup.cow > dump.txt 2> err
grep -q '^# .* exceptions=39 ' dump.txt
[ "$(grep -c '^area ' dump.txt)" -eq 40 ]
grep -Fx 'area 0 index 5: origin chunk 1000 -> cow chunk 7 (duplicate, ignored)' dump.txt
[ "$(grep -c 'duplicate' dump.txt)" -eq 1 ]
# ... and, as check calls it damage, a warning on stderr says so.
cat err
[ "$(wc -l < err)" -eq 1 ]
grep -q '^nbdsnap: warning: dup.cow: 1 records repeat an origin chunk.*nbdsnap check' err
# So are bytes after the last record: the records are listed, with a
# warning. A clean store warns of nothing.
cp a.cow junk.cow
python3 -c '
f = open("junk.cow", "r+b"); f.seek(34 * 512 + 16 * 20); f.write(b"junk")'
"$NBDSNAP" dump junk.cow > dump.txt 2> err
cat err
[ "$(grep -c '^area ' dump.txt)" -eq 40 ]
grep -q '^nbdsnap: warning: junk.cow: area 1 has non-zero bytes after its last record' err
"$NBDSNAP" dump a.cow > /dev/null 2> err
[ ! -s err ]

# Empty, new and invalid stores: comments only.
make_cow e.cow 8 0
[ "$("$NBDSNAP" dump e.cow)" = "# chunk_size=4096 chunk_sectors=8 valid=1 exceptions=0 status=16/16 16" ]
truncate -s 1M new.cow
[ "$("$NBDSNAP" dump new.cow)" = "# new store (magic 0, uninitialised): no exceptions" ]
cp a.cow inv.cow
printf '\0' | dd of=inv.cow bs=1 seek=4 conv=notrunc
"$NBDSNAP" dump inv.cow > dump.txt
[ "$(grep -c '^area ' dump.txt || :)" -eq 0 ]
grep -q '^# .* valid=0 .*status=Invalid$' dump.txt

# A damaged store: exit 1, the problem on stderr, pointing at check.
cp a.cow bad.cow
python3 -c '
import struct
f = open("bad.cow", "r+b"); f.seek(512 + 16 * 3 + 8); f.write(struct.pack("<Q", 34))'
rc=0; "$NBDSNAP" dump bad.cow > out 2> err || rc=$?
cat err
[ $rc -eq 1 ]
[ ! -s out ]
grep -q '^nbdsnap: bad.cow: area 0 record 3 .*nbdsnap check' err

# Usage errors exit 2.
for args in "" "a.cow a.cow" "--json a.cow"; do
    rc=0; "$NBDSNAP" dump $args 2> err || rc=$?
    [ $rc -eq 2 ]
    grep -q '(see nbdsnap dump --help)$' err
done
