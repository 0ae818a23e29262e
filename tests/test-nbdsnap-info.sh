#!/usr/bin/env bash
# nbdsnap info on stores with exceptions, invalid and new stores, odd file
# names: every figure is computed here from the layout and compared.
source "$srcdir/functions.sh"
set -e
set -x
requires test -x "$NBDSNAP"
requires python3 --version
enter_tmpdir

# info_is FILE STATUS EXCEPTIONS AREAS: the JSON and the text agree with
# these, and with each other.
info_is () {
    "$NBDSNAP" info --json "$1" > info.json
    "$NBDSNAP" info "$1" > info.txt
    cat info.json info.txt
    [ "$(json_field status < info.json)" = "$2" ]
    [ "$(json_field exceptions < info.json)" = "$3" ]
    [ "$(json_field areas < info.json)" = "$4" ]
    [ "$(json_field file_size < info.json)" = "$(stat -c %s "$1")" ]
    grep -Fx "status: $2" info.txt
    grep -Fx "exceptions: $3" info.txt
    grep -Fx "metadata areas: $4" info.txt
    # used/total metadata are the status's three numbers.
    [ "$(json_field used_sectors < info.json)/$(json_field total_sectors < info.json) $(json_field metadata_sectors < info.json)" = "$2" ]
}

# cs 1 (epa 32). used = next free chunk * cs; metadata = (areas + 1) * cs.
# 40 exceptions: area 0 full, 8 in area 1; the next data chunk is 43.
make_cow a.cow 1 40 80
info_is a.cow "43/80 3" 40 2
[ "$(json_field notes < info.json)" = "[]" ]
# Exactly one full area: the last data chunk (33) is just before area 1
# (chunk 34), so the next free one skips it (CVE-2013-4299): 35.
make_cow b.cow 1 32
info_is b.cow "35/$(($(stat -c %s b.cow) / 512)) 3" 32 2
# Bigger chunks: 300 exceptions at cs 8 (epa 256) -> slots 0..299, next is
# chunk 2 + 300 + 1 = 303 -> 303 * 8 used; 2 areas.
make_cow c.cow 8 300 400
info_is c.cow "2424/3200 24" 300 2

# A duplicate record: the kernel keeps the first; info counts it once and
# says so in a note.
cp a.cow dup.cow
python3 -c '
import struct
f = open("dup.cow", "r+b"); f.seek(512 + 16 * 5); f.write(struct.pack("<Q", 1000))'
info_is dup.cow "43/80 3" 39 2
json_field notes < info.json | grep -q 'repeat an origin chunk'
grep -q '^note: .*repeat an origin chunk' info.txt

# valid = 0: Invalid, and the exceptions are not read (as in the kernel).
cp a.cow inv.cow
printf '\0\0\0\0' | dd of=inv.cow bs=1 seek=4 conv=notrunc
"$NBDSNAP" info --json inv.cow > inv.json
[ "$(json_field valid < inv.json)" = false ]
[ "$(json_field status < inv.json)" = Invalid ]
[ "$(json_field exceptions < inv.json)" = null ]
[ "$(json_field chunk_sectors < inv.json)" = 1 ]
"$NBDSNAP" info inv.cow > inv.txt
grep -Fx 'status: Invalid' inv.txt
grep -q '^valid: no' inv.txt

# New stores (magic 0): an empty file, an all-zero one, and one with bytes
# after the magic (the kernel would use it; the filter refuses: a note).
: > empty.cow
truncate -s 1M zero.cow
python3 -c 'open("junk.cow", "wb").write(bytes(100) + b"junk" + bytes(8000))'
for f in empty.cow zero.cow junk.cow; do
    "$NBDSNAP" info --json $f > new.json
    [ "$(json_field new_store < new.json)" = true ]
    [ "$(json_field valid < new.json)" = false ]
    [ "$(json_field magic < new.json)" = 0 ]
    [ "$(json_field status < new.json)" = null ]
    [ "$(json_field exceptions < new.json)" = 0 ]
    [ "$(json_field file_size < new.json)" = "$(stat -c %s $f)" ]
    "$NBDSNAP" info $f | grep -q 'new, empty store (magic 0, uninitialised)'
done
[ "$(json_field notes < new.json | python3 -c 'import json,sys; print(len(json.load(sys.stdin)))')" = 1 ]
json_field notes < new.json | grep -q 'filter refuses'

# The JSON is valid whatever the file is called.
for name in 'quo"te.cow' 'back\slash.cow' $'new\nline.cow' $'tab\t.cow' \
            'ünïcode.cow' ' space.cow'; do
    cp a.cow "$name"
    "$NBDSNAP" info --json "$name" > odd.json
    [ "$(python3 -c 'import json,sys; print(json.load(open("odd.json"))["file"] == sys.argv[1])' "$name")" = True ]
done
cp a.cow $'bad\xff.cow'
"$NBDSNAP" info --json $'bad\xff.cow' > odd.json
[ "$(json_field file < odd.json)" = 'bad�.cow' ]

# Files that are not stores: exit 1, one line on stderr, nothing on stdout.
printf 'XXXXXXXXXXXXXXXX' > bad.cow
mkdir adir
for f in bad.cow missing.cow adir; do
    rc=0; "$NBDSNAP" info $f > out 2> err || rc=$?
    cat err
    [ $rc -eq 1 ]
    [ ! -s out ]
    [ "$(wc -l < err)" -eq 1 ]
    grep -q '^nbdsnap: ' err
done
grep -q 'is a directory' err

# Usage errors exit 2.
for args in "" "a.cow a.cow" "--nosuch a.cow" "--json"; do
    rc=0; "$NBDSNAP" info $args 2> err || rc=$?
    [ $rc -eq 2 ]
    grep -q '(see nbdsnap info --help)$' err
done
