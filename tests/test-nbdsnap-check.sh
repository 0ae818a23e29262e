#!/usr/bin/env bash
# nbdsnap check: clean stores pass with a summary; each kind of damage is
# one line and exit 1 (100 lines at most, the rest counted); harmless
# oddities are warnings; usage errors exit 2.
source "$srcdir/functions.sh"
set -e
set -x
requires test -x "$NBDSNAP"
requires python3 --version
enter_tmpdir

# cs 1 (512-byte chunks, epa 32): 40 exceptions, area 0 (chunk 1) full and
# 8 records in area 1 (chunk 34); record k maps origin 1000+3k.
make_cow made.cow 1 40 80
[ "$("$NBDSNAP" check made.cow)" = "made.cow: clean, 40 exceptions in 2 areas" ]
make_cow empty.cow 8 0
[ "$("$NBDSNAP" check empty.cow)" = "empty.cow: clean, 0 exceptions in 1 areas" ]
make_cow full.cow 1 32
[ "$("$NBDSNAP" check full.cow)" = "full.cow: clean, 32 exceptions in 2 areas" ]
truncate -s 1M new.cow
[ "$("$NBDSNAP" check new.cow)" = "new.cow: clean, a new, empty store (magic 0, uninitialised)" ]

# damaged NAME PYTHON-EDIT-OF-f PROBLEMS REGEX: a copy of made.cow, edited,
# fails check with PROBLEMS problem lines, one of them matching REGEX.
damaged () {
    cp made.cow "$1"
    python3 -c "
import struct
f = open('$1', 'r+b')
$2"
    check_fails "$1" "$3" "$4"
}
check_fails () {
    local rc=0
    "$NBDSNAP" check "$1" > out 2> err || rc=$?
    cat out err
    [ $rc -eq 1 ]
    [ ! -s err ]
    grep -Eq "$3" out
    # The last line counts the problems, each printed on its own line.
    [ "$(tail -n1 out)" = "$1: damaged: $2 problem$([ "$2" = 1 ] || echo s)" ]
    [ "$(grep -vc '^warning: ' out)" -eq $(($2 + 1)) ]
}
damaged badmagic.cow 'f.write(b"XXXX")' 1 'not a dm-snapshot COW file'
damaged version2.cow 'f.seek(8); f.write(struct.pack("<I", 2))' 1 'version 2'
damaged chunk7.cow 'f.seek(12); f.write(struct.pack("<I", 7))' 1 'not a power of two'
damaged chunkbig.cow 'f.seek(12); f.write(struct.pack("<I", 1 << 22))' 1 'too large'
# Record 3 of area 0 points at area 1's chunk, record 4 at the header.
damaged intometa.cow 'f.seek(512 + 16 * 3 + 8); f.write(struct.pack("<Q", 34))' 1 \
    'area 0 record 3 .* chunk 34, which is a metadata area'
damaged pastend.cow 'f.seek(512 + 16 * 3 + 8); f.write(struct.pack("<Q", 5000))' 1 \
    'area 0 record 3 points at chunk 5000, past the end'
# Record 5 repeats record 0's origin chunk; record 6 reuses record 2's
# COW chunk (the kernel checks neither).
damaged dup.cow 'f.seek(512 + 16 * 5); f.write(struct.pack("<Q", 1000))' 1 \
    'area 0 record 5: origin chunk 1000 already has an exception'
damaged shared.cow 'f.seek(512 + 16 * 6 + 8); f.write(struct.pack("<Q", 4))' 1 \
    'area 0 record 6: COW chunk 4 .* two exceptions share a COW chunk'
damaged both.cow '
f.seek(512 + 16 * 5); f.write(struct.pack("<Q", 1000))
f.seek(34 * 512 + 16 * 2 + 8); f.write(struct.pack("<Q", 4))' 2 'area 1 record 2: COW chunk 4'
# Bytes after the list's end in the last area.
damaged garbage.cow 'f.seek(34 * 512 + 16 * 20); f.write(b"junk")' 1 \
    'area 1 has non-zero bytes after its last record \(8\)'
# Truncated: in the header, in the header chunk, in an area.
head -c 10 made.cow > trunc-header.cow
check_fails trunc-header.cow 1 'truncated in the header'
make_cow big.cow 8 3
head -c 1000 big.cow > trunc-chunk.cow
check_fails trunc-chunk.cow 1 'truncated in the header chunk'
head -c $((34 * 512 + 100)) made.cow > trunc-area.cow
check_fails trunc-area.cow 1 'truncated in metadata area 1'
# Magic 0 but data behind it: not a store the filter will make.
python3 -c 'open("junk.cow", "wb").write(bytes(100) + b"junk")'
check_fails junk.cow 1 'not a store'

# A header and then noise: every record is a problem; the first 100 are
# printed and the rest counted.
python3 -c '
import random, struct
img = bytearray(random.Random(3).randbytes(1 << 20))
img[0:512] = struct.pack("<4I", 0x70416e53, 1, 1, 1) + bytes(496)
open("noise.cow", "wb").write(img)'
rc=0; "$NBDSNAP" check noise.cow > out || rc=$?
head -n3 out; tail -n2 out
[ $rc -eq 1 ]
[ "$(grep -c '^noise.cow: area [0-9]* record ' out)" -eq 100 ]
more=$(sed -n 's/^noise.cow: \.\.\. and \([0-9]*\) more problems$/\1/p' out)
[ "$more" -gt 1000 ]
[ "$(tail -n1 out)" = "noise.cow: damaged: $((100 + more)) problems" ]
[ "$(wc -l < out)" -eq 102 ]

# Harmless: records out of allocation order (old kernels), and data chunks
# no record names (a copy that never committed). Warnings, exit 0.
cp made.cow order.cow
python3 -c '
import struct
f = open("order.cow", "r+b")
f.seek(512 + 16 * 1); a = f.read(16); b = f.read(16)
f.seek(512 + 16 * 1); f.write(b + a)'
"$NBDSNAP" check order.cow > out
cat out
grep -q '^warning: .*not in allocation order' out
[ "$(tail -n1 out)" = "order.cow: clean, 40 exceptions in 2 areas" ]
cp made.cow hole.cow
python3 -c '
import struct
f = open("hole.cow", "r+b")
f.seek(34 * 512 + 16 * 7 + 8); f.write(struct.pack("<Q", 44))'
"$NBDSNAP" check hole.cow > out
cat out
grep -q '^warning: hole.cow: 2 data chunks below the last one in use are not named' out
[ "$(tail -n1 out)" = "hole.cow: clean, 40 exceptions in 2 areas" ]

# An invalid store is not damaged: the kernel loads it, as Invalid.
cp made.cow inv.cow
printf '\0' | dd of=inv.cow bs=1 seek=4 conv=notrunc
[ "$("$NBDSNAP" check inv.cow)" = "inv.cow: clean, marked Invalid (valid = 0): the kernel reads no exceptions from it" ]

# Usage errors exit 2, a missing file 1.
for args in "" "a b" "--json made.cow"; do
    rc=0; "$NBDSNAP" check $args 2> err || rc=$?
    [ $rc -eq 2 ]
    grep -q '(see nbdsnap check --help)$' err
done
rc=0; "$NBDSNAP" check missing.cow 2> err || rc=$?
[ $rc -eq 1 ]
grep -q '^nbdsnap: cannot open missing.cow' err
