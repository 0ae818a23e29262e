#!/usr/bin/env bash
# nbdkit-snapshot-filter: bad parameters and bad COW files are clean
# startup errors (nbdkit exits non-zero before serving, with a message
# naming the parameter or file), and a refused COW file is left untouched.
#
#  - parameters: snapshot-chunk-size 3k (lvm2 lvcreate-usage: -c 3k),
#    256 (not whole sectors), 2G (dmtest too_large_chunk_size_fails),
#    snapshot-store=X (and nope, no, nonpersistent, poo: dm's first-letter
#    rule would take them), snapshot-export=nosuch, snapshot-cow-size=lots,
#    snapshot-export of the snapshot being merged, a single-value key
#    given twice with different values,
#    one name twice, snapshot=origin=x.cow and a file named origin.cow
#    (the name "origin" is the origin's export), an empty
#    snapshot-control=, and one in a missing directory (the OS error
#    named once);
#  - snapshot-cow-size under 3 chunks (lvm2 lvcreate-small-snap: 2 chunks
#    is refused), also when the chunk size is the default or the existing
#    header's; and under what the COW file already holds (lvm2: shrinking a
#    COW below its used space is refused);
#  - COW files: bad magic with non-zero data, version 2, a chunk size that
#    is not a power of two, truncated in the header, in metadata area 0 and
#    in the data, zero but for data at byte 8192 (also for
#    snapshot-store=N); sha256 before and after;
#  - all-zero and empty files are new stores (accepted); a transient
#    store's file is zeroed at exit and accepted again;
#  - an unknown export name is refused, and nbdkit's log lists the exports;
#  - a COW file in use by another running nbdkit is refused ("in use").

source "$srcdir/functions.sh"
set -e
set -x

requires nbdkit --version
requires nbdinfo --version
requires nbdsh --version
requires python3 -c 'import nbd'
requires sha256sum --version
requires test -r "$FILTER"

enter_tmpdir

truncate -s 1M origin.img

# refused PATTERN ARGS...: nbdkit must fail to start (the --run command
# must not run) and its stderr must match the extended regexp PATTERN.
refused ()
{
    local pattern="$1"
    shift
    rm -f ran err.log
    if nbdkit -U - --filter="$FILTER" file origin.img "$@" \
              --run 'touch ran' 2> err.log; then
        cat err.log
        echo "$0: nbdkit $* did not fail"
        exit 1
    fi
    cat err.log
    test ! -f ran
    grep -E -- "$pattern" err.log
}

# accepted ARGS...: nbdkit starts and serves.
accepted ()
{
    rm -f ran
    nbdkit -U - --filter="$FILTER" file origin.img "$@" \
           --run 'nbdinfo --list "$uri" && touch ran'
    test -f ran
}

# ------------------------------------------------------------ parameters
refused 'snapshot-chunk-size=3k' snapshot=a.cow snapshot-chunk-size=3k
refused 'snapshot-chunk-size=256' snapshot=a.cow snapshot-chunk-size=256
refused 'snapshot-chunk-size=2G' snapshot=a.cow snapshot-chunk-size=2G
refused 'snapshot-store=X' snapshot=a.cow snapshot-store=X
# Only P, PO or N: dm's first-letter rule would make these N (transient,
# lost at restart) or PO.
for t in nope no nonpersistent poo; do
    refused "snapshot-store=$t: .*P, PO or N" snapshot=a.cow snapshot-store=$t
done
refused 'snapshot-export=nosuch' snapshot=a.cow snapshot-export=nosuch
refused 'snapshot-export=a: that snapshot is merging' snapshot=a.cow \
        snapshot-export=a snapshot-merge=a
# A single-value key twice, with different values (the same twice is fine).
refused 'snapshot-chunk-size is given twice \(64K, then 4k\)' snapshot=a.cow \
        snapshot-chunk-size=64K snapshot-chunk-size=4k
refused 'snapshot-store is given twice' snapshot=a.cow snapshot-store=P \
        snapshot-store=PO
refused 'snapshot-cow-size=lots' snapshot=a.cow snapshot-cow-size=lots
refused "snapshot=a=b.cow.*'a'" snapshot=a=a.cow snapshot=a=b.cow
refused "snapshot=y/a.cow.*'a'" snapshot=x/a.cow snapshot=y/a.cow
refused 'snapshot=origin=x.cow' snapshot=origin=x.cow
refused "'ERR' ends the control socket's replies" snapshot=ERR=err.cow
refused 'snapshot=origin.cow.*origin' snapshot=origin.cow
refused 'snapshot-cow-size' snapshot=a.cow snapshot-chunk-size=4k \
        snapshot-cow-size=8k
refused 'snapshot-control= needs a socket path' snapshot-control=
# An OS error is named once.
refused 'snapshot-control=/nonexistent/dir/ctl: bind: No such file or directory$' \
        snapshot-control=/nonexistent/dir/ctl
[ "$(grep -c 'No such file or directory' err.log)" -eq 1 ]
# Nothing above may have made a COW file.
test ! -e a.cow -a ! -e b.cow -a ! -e x.cow -a ! -e origin.cow
# One COW file under two names: named as given twice, not "in use"
# (the first name's store is made before the second is looked at).
ln -s a.cow link.cow
refused "link.cow is given twice" snapshot=a=a.cow snapshot=b=link.cow
rm -f link.cow a.cow
# Neither a regular file nor a block device: said so (before: "Illegal
# seek" from a write into a FIFO, "Invalid argument" from a sync of
# /dev/null).
mkfifo fifo.cow
refused "fifo.cow is not a regular file or a block device" snapshot=fifo.cow
refused "/dev/null is not a regular file or a block device" snapshot=/dev/null
rm -f fifo.cow

# ------------------------------------------------------------ COW files
# refused_file PATTERN FILE [ARGS...]: FILE is refused and left unchanged.
refused_file ()
{
    local pattern=$1 file=$2
    shift 2
    sha256sum "$file" > file.sum
    refused "$pattern" snapshot=f=$tmp/$file "$@"
    sha256sum -c file.sum
}

# Bad magic, non-zero data.
python3 -c 'import random, sys
sys.stdout.buffer.write(random.Random(1).randbytes(100000))' > bad.cow
refused_file 'bad.cow' bad.cow
# Non-zero data that happens to start with zeros (only the magic is zero).
python3 -c 'import random, sys
sys.stdout.buffer.write(bytes(16) + random.Random(2).randbytes(8192))' > bad2.cow
refused_file 'bad2.cow' bad2.cow

# Zero but for data at byte 8192: a new store writes two whole chunks, so
# a regular file must be all zero; a transient store writes from byte 0.
python3 -c 'import sys
sys.stdout.buffer.write(bytes(8192) + b"data" + bytes((2 << 20) - 8196))' > late.cow
refused_file 'late.cow.*byte 8192 is not zero' late.cow
refused_file 'late.cow.*byte 8192 is not zero' late.cow snapshot-store=N \
    snapshot-chunk-size=4k

# Version 2, and a chunk size that is not a power of two.
python3 -c 'import struct, sys
sys.stdout.buffer.write(struct.pack("<4I", 0x70416e53, 1, 2, 8) + bytes(3 * 4096 - 16))' \
    > v2.cow
refused_file 'v2.cow.*version' v2.cow
python3 -c 'import struct, sys
sys.stdout.buffer.write(struct.pack("<4I", 0x70416e53, 1, 1, 7) + bytes(3 * 4096 - 16))' \
    > cs7.cow
refused_file 'cs7.cow' cs7.cow

# A valid COW with 100 exceptions, then truncated in the header, in
# metadata area 0 and in the data chunks.
rm -f good.cow
nbdkit -U - --filter="$FILTER" file origin.img snapshot=good=$tmp/good.cow \
    --run 'nbdsh -u "nbd+unix:///good?socket=$unixsocket" \
             -c "h.pwrite(b\"g\" * (100 * 4096), 0)"'
accepted snapshot=good=$tmp/good.cow
for len in 10 4096 6000 8192 12288 $((50 * 4096)) $((101 * 4096 + 100)); do
    cp good.cow tr.cow
    truncate -s $len tr.cow
    refused_file 'tr.cow.*truncated' tr.cow
done

# All-zero and empty files become new stores.
truncate -s 1M zero.cow
accepted snapshot=zero=$tmp/zero.cow
python3 -c 'import struct, sys
assert struct.unpack("<4I", open("zero.cow", "rb").read(16)) == (0x70416e53, 1, 1, 128)'  # the default chunk, 64 KiB
: > empty.cow
accepted snapshot=empty=$tmp/empty.cow
python3 -c 'import struct, sys
assert struct.unpack("<4I", open("empty.cow", "rb").read(16)) == (0x70416e53, 1, 1, 128)'  # the default chunk, 64 KiB

# A transient store's file is zeroed when nbdkit stops, so the next start
# takes it again.
rm -f n.cow
nbdkit -U - --filter="$FILTER" file origin.img snapshot=n=$tmp/n.cow \
    snapshot-store=N snapshot-chunk-size=4k \
    --run 'nbdsh -u "nbd+unix:///n?socket=$unixsocket" -c "h.pwrite(b\"n\" * 8192, 0)"'
python3 -c 'assert not any(open("n.cow", "rb").read())'
accepted snapshot=n=$tmp/n.cow snapshot-store=N snapshot-chunk-size=4k

# What the scan of a store notes is shown without -v (before: only as a
# debug message): records after a zeroed one (bytes past an area's last
# record, which the kernel ignores too), and a header overriding the
# chunk size asked for.
python3 -c '
import struct
cb = 4096
img = bytearray(8 * cb)
img[0:16] = struct.pack("<IIII", 0x70416e53, 1, 1, 8)
for i, (o, n) in enumerate([(0, 2), (1, 3), (0, 0), (3, 5), (4, 6)]):
    img[cb + 16 * i:cb + 16 * i + 16] = struct.pack("<QQ", o, n)
open("gap.cow", "wb").write(img)'
nbdkit -U - --filter="$FILTER" file origin.img snapshot=gap=$tmp/gap.cow \
    snapshot-chunk-size=64k --run true 2> gap.err
cat gap.err
grep -q "warning: .*gap.cow: area 0 has non-zero bytes after its last record (2)" gap.err
grep -q "warning: .*gap.cow: chunk size 8 sectors in the header overrides the requested 128" gap.err

# ------------------------------------------------------------ exports
# An unknown export: the client is refused, nbdkit's log lists the exports.
rm -f u.cow w.cow
nbdkit -U - --filter="$FILTER" file origin.img \
    snapshot=u=$tmp/u.cow snapshot=w=$tmp/w.cow \
    --run 'if nbdinfo "nbd+unix:///nosuch?socket=$unixsocket"; then
               echo "nbdinfo of export nosuch worked"; exit 1
           fi
           nbdinfo "nbd+unix:///w?socket=$unixsocket"' 2> err.log
cat err.log
grep "nosuch" err.log | grep "origin, u, w"

# ------------------------------------------------------------ in use
sock=$tmp/sock
rm -f "$sock"
start_nbdkit -P "$tmp/pid" -U "$sock" --filter="$FILTER" file origin.img \
    snapshot=u=$tmp/u.cow
sha256sum u.cow > u.sum
refused 'u.cow.*in use' snapshot=u=$tmp/u.cow
refused 'u.cow.*in use' snapshot=other=$tmp/u.cow snapshot-store=N
sha256sum -c u.sum
# The running server is unharmed.
nbdinfo "nbd+unix:///u?socket=$sock"
# The same file twice in one server.
refused 'in use|twice|same' snapshot=a=$tmp/w.cow snapshot=b=$tmp/w.cow

# ------------------------------------------------------------ caps
# A cap under 3 chunks of the default chunk size (4k).
refused 'snapshot-cow-size' snapshot=a.cow snapshot-cow-size=8k
rm -f a.cow
# Without snapshot-chunk-size (64k chunks), for a missing file and an
# all-zero one: refused before the file is made or written (before, the
# new store's header went into it, and the missing file was left made).
refused "snapshot=$tmp/none.cow: snapshot-cow-size=131072 is under 3 chunks of 65536" \
    snapshot=$tmp/none.cow snapshot-cow-size=128k
test ! -e none.cow
rm -f blank.cow; truncate -s 1M blank.cow
refused "snapshot=$tmp/blank.cow: snapshot-cow-size=131072 is under 3 chunks of 65536" \
    snapshot=$tmp/blank.cow snapshot-cow-size=128k
cmp blank.cow <(head -c 1M /dev/zero)
rm -f blank.cow

# A cap under 3 chunks of the chunk size in an existing header (64k).
accepted snapshot=big=$tmp/big.cow snapshot-chunk-size=64k
sha256sum big.cow > big.sum
refused 'snapshot-cow-size' snapshot=big=$tmp/big.cow snapshot-cow-size=128k
sha256sum -c big.sum

# A cap smaller than what the COW file already holds (100 chunks).
rm -f used.cow
nbdkit -U - --filter="$FILTER" file origin.img snapshot=used=$tmp/used.cow \
    --run 'nbdsh -u "nbd+unix:///used?socket=$unixsocket" \
             -c "h.pwrite(b\"u\" * (100 * 4096), 0)"'
sha256sum used.cow > used.sum
refused 'snapshot-cow-size' snapshot=used=$tmp/used.cow snapshot-cow-size=64k
sha256sum -c used.sum
