#!/usr/bin/env bash
# nbdsnap create: the bytes it writes, what info says about them, and the
# files it refuses to touch.
source "$srcdir/functions.sh"
set -e
set -x
requires test -x "$NBDSNAP"
requires python3 --version
enter_tmpdir

# expect_rc RC CMD...: CMD exits with RC; its stdout and stderr are left in
# out and err.
expect_rc () {
    local want=$1 rc=0
    shift
    "$@" > out 2> err || rc=$?
    cat out err
    [ "$rc" -eq "$want" ]
}

# At each chunk size (as bytes and with suffixes): the header chunk and an
# empty area 0, nothing else; info agrees, status "2cs/total 2cs".
# Every suffix the man page lists (b, k, M, G, T in either case) is one.
for size in 512 4k 64K 1M 1024b 8192B 2m default; do
    case $size in
        512) cb=512 ;; 4k) cb=4096 ;; 64K) cb=65536 ;; 1M) cb=1048576 ;;
        1024b) cb=1024 ;; 8192B) cb=8192 ;; 2m) cb=2097152 ;;
        default) cb=65536 ;;  # kDefaultChunkSectors, store/cow_format.h
    esac
    cs=$((cb / 512))
    rm -f s.cow
    if [ $size = default ]; then
        "$NBDSNAP" create s.cow > out
    else
        "$NBDSNAP" create --chunk-size $size s.cow > out
    fi
    grep -Fx "s.cow: new P store, chunk size $cb bytes ($cs sectors), status $((2*cs))/$((2*cs)) $((2*cs))" out
    [ "$(stat -c %s s.cow)" -eq $((2 * cb)) ]
    # magic "SnAp", valid 1, version 1, chunk size; zeros to the end.
    python3 -c '
import struct, sys
b = open("s.cow", "rb").read()
assert b[:16] == struct.pack("<4I", 0x70416e53, 1, 1, int(sys.argv[1])), b[:16]
assert b[16:] == bytes(len(b) - 16)' $cs

    "$NBDSNAP" info --json s.cow > info.json
    python3 -c '
import json, sys
j = json.load(open("info.json"))
cs = int(sys.argv[1]); size = 2 * cs * 512
want = {"file": "s.cow", "new_store": False, "magic": 0x70416e53,
        "valid": True, "version": 1, "chunk_size_bytes": cs * 512,
        "chunk_sectors": cs, "store_type": "P", "exceptions": 0, "areas": 1,
        "used_sectors": 2 * cs, "total_sectors": size // 512,
        "metadata_sectors": 2 * cs, "file_size": size,
        "status": "%d/%d %d" % (2 * cs, size // 512, 2 * cs), "notes": []}
assert j == want, (j, want)' $cs
    "$NBDSNAP" info s.cow > info.txt
    grep -Fx "status: $((2*cs))/$((2*cs)) $((2*cs))" info.txt
    grep -Fx "chunk size: $cb bytes ($cs sectors)" info.txt
    grep -Fx "exceptions: 0" info.txt
    [ "$("$NBDSNAP" check s.cow)" = "s.cow: clean, 0 exceptions in 1 areas" ]
    [ "$("$NBDSNAP" dump s.cow | grep -vc '^#')" -eq 0 ]
done

# PO stores look exactly like P ones on disk.
"$NBDSNAP" create --chunk-size 4k p.cow
"$NBDSNAP" create --chunk-size 4k --store po po.cow > out
grep -q 'new PO store' out
cmp p.cow po.cow

# An all-zero file (what LVM leaves at the start of a new COW volume) keeps
# its size, which is the total of the status.
truncate -s 1M zero.cow
"$NBDSNAP" create --chunk-size 64k zero.cow
[ "$(stat -c %s zero.cow)" -eq 1048576 ]
[ "$("$NBDSNAP" info --json zero.cow | json_field status)" = "256/2048 256" ]
# The same bytes as a store the kernel initialised on a 1 MiB COW device.
fixture=$srcdir/fixtures/kernel/fresh8.cow.xz
if test -f "$fixture" && xz --version >/dev/null 2>&1; then
    truncate -s 1M k.cow
    "$NBDSNAP" create --chunk-size 4k k.cow
    xz -dc "$fixture" > fresh8.cow
    cmp k.cow fresh8.cow
fi

# Data is never overwritten without --force: random bytes, a file whose
# first 4 KiB are zero but not the rest, and an existing store.
head -c 65536 /dev/urandom > data.img
truncate -s 2M late.img
printf 'data' | dd of=late.img bs=1 seek=$((1024 * 1024)) conv=notrunc
"$NBDSNAP" create --chunk-size 512 old.cow
make_cow old.cow 1 5
for f in data.img late.img old.cow; do
    sum=$(sha256sum < $f)
    expect_rc 1 "$NBDSNAP" create $f
    [ ! -s out ]
    [ "$(wc -l < err)" -eq 1 ]
    grep -q '^nbdsnap: .*refusing to' err
    [ "$(sha256sum < $f)" = "$sum" ]
done
grep -q 'already a snapshot store' err
expect_rc 1 "$NBDSNAP" create late.img
grep -q 'byte 1048576 is not zero' err
# --force replaces them with a new, empty store.
for f in data.img late.img old.cow; do
    "$NBDSNAP" create --force --chunk-size 4k $f | grep -q 'replacing its old contents'
    [ "$(stat -c %s $f)" -eq 8192 ]
    cmp $f p.cow
done

# A transient store has no format: an empty file, and info says so.
"$NBDSNAP" create --store N n.cow > out
grep -q 'transient (N)' out
[ -f n.cow ] && [ ! -s n.cow ]
"$NBDSNAP" info --json n.cow > n.json
[ "$(json_field new_store < n.json)" = true ]
[ "$(json_field status < n.json)" = null ]
expect_rc 2 "$NBDSNAP" create --store N --chunk-size 4k n2.cow
[ ! -e n2.cow ]

# A file in use (nbdkit holds an OFD lock on it) is refused, untouched.
truncate -s 1M busy.cow
python3 - <<'PY' &
import fcntl, os, struct, time
fd = os.open("busy.cow", os.O_RDWR)
fcntl.fcntl(fd, fcntl.F_OFD_SETLK, struct.pack("hhqqi4x", fcntl.F_WRLCK, 0, 0, 0, 0))
open("locked", "w").close()
while os.path.exists("locked"): time.sleep(0.05)
PY
locker=$!
for i in {1..100}; do [ -e locked ] && break; sleep 0.05; done
expect_rc 1 "$NBDSNAP" create busy.cow
grep -q 'in use' err
rm locked
wait $locker
[ "$(python3 -c 'print(open("busy.cow","rb").read() == bytes(1 << 20))')" = True ]

# Usage errors exit 2 and create nothing; a path that cannot be made, 1.
for args in "" "a.cow b.cow" "--chunk-size 3k u.cow" "--chunk-size 0 u.cow" \
            "--chunk-size 2G u.cow" "--chunk-size 1000 u.cow" \
            "--chunk-size 1t u.cow" "--chunk-size 1g1 u.cow" \
            "--chunk-size 4x u.cow" "--chunk-size u.cow" "--store X u.cow" \
            "--store PX u.cow" "--store nope u.cow" "--store poo u.cow" \
            "--nosuch u.cow"; do
    expect_rc 2 "$NBDSNAP" create $args
    [ "$(wc -l < err)" -eq 1 ]
    grep -q '^nbdsnap: .*(see nbdsnap create --help)$' err
    [ ! -e u.cow ]
done
expect_rc 1 "$NBDSNAP" create "$tmp/no/such/dir/x.cow"
grep -q '^nbdsnap: cannot open' err
mkdir dir.cow
expect_rc 1 "$NBDSNAP" create dir.cow
grep -q 'is a directory' err
# "--" ends the options: a file may start with a dash.
"$NBDSNAP" create --chunk-size 4k -- --dash.cow
cmp -- --dash.cow p.cow
