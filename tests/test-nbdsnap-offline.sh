#!/usr/bin/env bash
# nbdsnap create/info/check/dump on stores it makes and on damaged files;
# every figure is computed here and compared with what nbdsnap prints.
source "$srcdir/functions.sh"
set -e
set -x
requires test -x "$NBDSNAP"
requires python3 --version
tmp=$(mktemp -d)
cleanup_fn rm -rf "$tmp"
cd "$tmp"

field() { python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))[sys.argv[2]])' "$1" "$2"; }

# Fresh stores at several chunk sizes: status 2cs/total 2cs, total = size.
for cb in 512 4096 65536 1048576; do
  rm -f s.cow
  "$NBDSNAP" create --chunk-size "$cb" s.cow
  "$NBDSNAP" info --json s.cow > info.json
  cs=$((cb / 512))
  size=$(stat -c %s s.cow)
  [ "$size" -eq $((2 * cb)) ]
  [ "$(field info.json status)" = "$((2 * cs))/$((size / 512)) $((2 * cs))" ]
  [ "$(field info.json chunk_sectors)" = "$cs" ]
  [ "$(field info.json chunk_size_bytes)" = "$cb" ]
  [ "$(field info.json exceptions)" = 0 ]
  [ "$(field info.json valid)" = True ]
  "$NBDSNAP" check s.cow | grep -q "clean, 0 exceptions in 1 areas"
  [ "$("$NBDSNAP" dump s.cow | grep -c '^area')" = 0 ]
done

# A store with records, written as the kernel lays them out (cs 1, epa 32):
# 40 exceptions fill area 0 (chunk 1) and start area 1 (chunk 34).
python3 - <<'PY'
import struct
cs, cb, epa = 1, 512, 32
def chunk(slot): return 2 + slot + slot // epa
img = bytearray(cb * 80)
img[0:16] = struct.pack("<4I", 0x70416e53, 1, 1, cs)
for k in range(40):
    area, idx = divmod(k, epa)
    off = (1 + area * (epa + 1)) * cb + idx * 16
    img[off:off + 16] = struct.pack("<QQ", 1000 + 3 * k, chunk(k))
open("made.cow", "wb").write(img)
PY
"$NBDSNAP" info --json made.cow > info.json
# used = next free chunk (slot 40 -> chunk 43) * cs; metadata = (1 + 2) * cs
[ "$(field info.json status)" = "43/80 3" ]
[ "$(field info.json exceptions)" = 40 ]
[ "$(field info.json areas)" = 2 ]
[ "$("$NBDSNAP" dump made.cow | grep -c '^area')" = 40 ]
"$NBDSNAP" dump made.cow | grep -q '^area 1 index 7: origin chunk 1117 -> cow chunk 42$'
"$NBDSNAP" check made.cow

# Damage: each is reported on one line and check exits 1.
damaged() {  # NAME PYTHON-EDIT EXPECTED-MESSAGE
  cp made.cow "$1"
  python3 -c "
import struct
f = open('$1', 'r+b')
$2
"
  rc=0
  "$NBDSNAP" check "$1" > check.out 2>&1 || rc=$?
  cat check.out
  [ $rc -eq 1 ]
  grep -Eq "$3" check.out
}
damaged badmagic.cow 'f.write(b"XXXX")' 'not a dm-snapshot COW file'
damaged version2.cow 'f.seek(8); f.write(struct.pack("<I", 2))' 'version 2'
damaged chunk7.cow 'f.seek(12); f.write(struct.pack("<I", 7))' 'not a power of two'
damaged intometa.cow 'f.seek(512 + 16 * 3 + 8); f.write(struct.pack("<Q", 34))' 'metadata area'
damaged pastend.cow 'f.seek(512 + 16 * 3 + 8); f.write(struct.pack("<Q", 5000))' 'past the end'
damaged dup.cow 'f.seek(512 + 16 * 5); f.write(struct.pack("<Q", 1000))' 'repeat an origin chunk'
damaged shared.cow 'f.seek(512 + 16 * 5 + 8); f.write(struct.pack("<Q", 2))' 'share a COW chunk'
damaged garbage.cow 'f.seek(34 * 512 + 16 * 20); f.write(b"junk")' 'non-zero bytes after'
# Truncated in the header and in an area.
head -c 10 made.cow > trunc-header.cow
rc=0; "$NBDSNAP" check trunc-header.cow > check.out 2>&1 || rc=$?
[ $rc -eq 1 ]; grep -q 'truncated in the header' check.out
head -c $((34 * 512 + 100)) made.cow > trunc-area.cow
rc=0; "$NBDSNAP" check trunc-area.cow > check.out 2>&1 || rc=$?
[ $rc -eq 1 ]; grep -q 'truncated in metadata area 1' check.out

# Usage errors exit 2.
for args in "" "bogus" "check" "info a b" "create --chunk-size 3k x.cow" \
            "create --store X x.cow" "dump --nosuch x"; do
  rc=0; "$NBDSNAP" $args 2>/dev/null || rc=$?
  [ $rc -eq 2 ]
done

# create refuses to clobber data, and leaves it unchanged.
head -c 65536 /dev/urandom > data.img
sum=$(sha256sum < data.img)
rc=0; "$NBDSNAP" create data.img 2> err.txt || rc=$?
[ $rc -eq 1 ]
grep -q 'refusing to overwrite' err.txt
[ "$(sha256sum < data.img)" = "$sum" ]
# An all-zero file is fine (what LVM leaves at the start of a new COW).
truncate -s 1M zero.cow
"$NBDSNAP" create --chunk-size 64k zero.cow
"$NBDSNAP" info --json zero.cow > z.json
[ "$(field z.json chunk_sectors)" = 128 ]
