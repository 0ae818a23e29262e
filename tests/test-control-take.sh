#!/usr/bin/env bash
# snapshot-control `take`: a take during continuous origin writes is one
# point in time (the snapshot equals the origin after exactly the first k
# acknowledged writes, for one k); the export appears at once; later origin
# writes copy out; refusals; chunk size and store arguments; the taken COW
# persists across a restart; snapshot-cow-size checked as at startup; a
# take that fails removes the file it made. Uses only the control socket (no nbdsnap).
source "$srcdir/functions.sh"
set -e
set -x
requires nbdinfo --version
requires nbdcopy --version
requires python3 -c 'import nbd'
requires nbdkit --filter=blocksize-policy null --version
enter_tmpdir

# ctl COMMAND...: prints the reply; exit 0 on OK, 1 on ERR.
ctl () { python3 "$srcdir/control_client.py" "$tmp/ctl" "$@"; }
# ctl_err PATTERN COMMAND...: the command must get ERR matching PATTERN.
ctl_err () {
    local pat=$1 out; shift
    if out=$(ctl "$@"); then echo "expected ERR from: $*"; echo "$out"; exit 1; fi
    echo "$out"
    echo "$out" | grep -q "^ERR .*$pat"
}

blocks=512
python3 -c "
import random
random.seed(1)
open('origin.img','wb').write(random.randbytes($blocks * 4096))"
cp origin.img base.img

start_nbdkit -P pid -U sock --filter="$FILTER" file origin.img \
  snapshot-chunk-size=4k snapshot-control="$tmp/ctl"
uri="nbd+unix:///origin?socket=$tmp/sock"
ctl status
ctl list

# The writer: one handle, synchronous writes, so acknowledgements come in
# order; each 4 KiB block is stamped with its sequence number and logged
# once acknowledged. It runs until the file "stop" appears.
cat > writer.py <<'PY'
import nbd, os, random, sys
h = nbd.NBD(); h.connect_uri(sys.argv[1])
rnd = random.Random(7)
log = open("writes.log", "w", buffering=1)
seq = 0
while not os.path.exists("stop") or seq < 400:
    seq += 1
    b = rnd.randrange(512)
    h.pwrite(("seq %d block %d " % (seq, b)).encode().ljust(4096, b"#"), b * 4096)
    log.write("%d %d\n" % (seq, b))
PY
python3 writer.py "$uri" &
writer=$!
cleanup_fn kill $writer
for i in $(seq 200); do
  [ "$(wc -l < writes.log 2>/dev/null || echo 0)" -gt 150 ] && break
  sleep 0.05
done
ctl take t1 "$tmp/t1.cow" | tee take.out
grep -q '^t1: ' take.out
# The export is there at once.
nbdinfo --list "nbd+unix:///?socket=$tmp/sock" > list.out
grep -q 'export="t1"' list.out
# Copy the snapshot while the writer keeps going; then stop it and copy
# again: both copies must be the same.
nbdcopy "nbd+unix:///t1?socket=$tmp/sock" t1.img
sleep 0.3
touch stop
wait $writer
nbdcopy "nbd+unix:///t1?socket=$tmp/sock" t1-b.img
cmp t1.img t1-b.img
nbdcopy "$uri" origin-now.img

# There is one k with snapshot == base + writes[0..k), and the take fell
# strictly inside the writes. The final origin is base + all the writes.
python3 - <<'PY'
base = open("base.img", "rb").read()
snap = open("t1.img", "rb").read()
final = open("origin-now.img", "rb").read()
writes = [tuple(map(int, l.split())) for l in open("writes.log")]
B = 4096
n = len(base) // B
img = bytearray(base)
def blk(d, b): return bytes(d[b * B:(b + 1) * B])
bad = {b for b in range(n) if blk(img, b) != blk(snap, b)}
cuts = [0] if not bad else []
for k, (seq, b) in enumerate(writes, 1):
    img[b * B:(b + 1) * B] = ("seq %d block %d " % (seq, b)).encode().ljust(B, b"#")
    if blk(img, b) == blk(snap, b): bad.discard(b)
    else: bad.add(b)
    if not bad: cuts.append(k)
assert bytes(img) == final, "origin is not base + every acknowledged write"
assert cuts, "the snapshot is not the origin at any single point in time"
print("snapshot == origin after writes", cuts, "of", len(writes))
assert 0 < cuts[0] and cuts[-1] < len(writes), "take did not land during the writes"
PY

# Later origin writes copy out: the snapshot does not change.
size_before=$(stat -c %s t1.cow)
nbdsh -u "$uri" -c '
for i in range(0, 512, 3):
    h.pwrite(b"later" * 800 + b"\0" * 96, i * 4096)
h.flush()'
nbdcopy "nbd+unix:///t1?socket=$tmp/sock" t1-c.img
cmp t1.img t1-c.img
nbdcopy "$uri" origin-now.img
if cmp -s origin-now.img t1.img; then echo "origin did not change"; exit 1; fi

# Refusals: an existing name; a non-empty store file (the one in use, a
# copy of it not in use, a file of random bytes); bad arguments.
ctl_err 'exists already' take t1 "$tmp/other.cow"
[ ! -s other.cow ]
ctl_err "$tmp/t1.cow is already snapshot 't1'" take t2 "$tmp/t1.cow"
ln -s t1.cow link.cow
ctl_err "$tmp/link.cow is already snapshot 't1'" take t2 "$tmp/link.cow"
# Not a regular file or a block device: refused at once, with that said
# (before: "Illegal seek" or "Invalid argument" from a write or a sync).
mkfifo fifo
ctl_err "$tmp/fifo is not a regular file or a block device" take t2 "$tmp/fifo"
ctl_err "/dev/null is not a regular file or a block device" take t2 /dev/null
nbdsh -u "nbd+unix:///t1?socket=$tmp/sock" -c 'h.flush()'
cp t1.cow t1-copy.cow
sha_copy=$(sha256sum < t1-copy.cow)
ctl_err '' take t2 "$tmp/t1-copy.cow"
[ "$(sha256sum < t1-copy.cow)" = "$sha_copy" ]
head -c 1M /dev/urandom > random.bin
sha_random=$(sha256sum < random.bin)
ctl_err '' take t2 "$tmp/random.bin"
[ "$(sha256sum < random.bin)" = "$sha_random" ]
# A dangling symlink is refused and left alone (before: the failed take
# removed it, as if it had made it).
ln -s nowhere.cow dangling.cow
ctl_err 'No such file' take t2 "$tmp/dangling.cow"
[ -L dangling.cow ]
ctl_err usage take
ctl_err usage take t2
ctl_err usage take t2 "$tmp/t2.cow" 64k P extra
ctl_err '' take t2 "$tmp/t2.cow" 3000
ctl_err '' take t2 "$tmp/t2.cow" 2g
ctl_err '' take t2 "$tmp/t2.cow" 64k Q
ctl_err usage take t2 "$tmp/t2.cow" P 64k
ctl_err '' take 'bad/name' "$tmp/t2.cow"
ctl list | tee list.out
absent '^t2 ' list.out
absent '^bad' list.out
if nbdinfo --list "nbd+unix:///?socket=$tmp/sock" | grep -q 'export="t2"'; then
  echo "a refused take left an export"; exit 1
fi

# take with chunk size and store type.
ctl take t3 "$tmp/t3.cow" 16k PO
ctl take t4 "$tmp/t4.cow" 64k N
ctl take t5 "$tmp/t5.cow" 8k
# A store type alone, as the usage [CHUNK-SIZE] [P|PO|N] allows: the
# default chunk size (before: "'po' is not a size").
ctl take t7 "$tmp/t7.cow" po
ctl list | tee list.out
grep -q "^t7 $tmp/t7.cow PO 4096 " list.out
grep -q "^t1 $tmp/t1.cow P 4096 " list.out
grep -q "^t3 $tmp/t3.cow PO 16384 " list.out
grep -q "^t4 $tmp/t4.cow N 65536 " list.out
grep -q "^t5 $tmp/t5.cow P 8192 " list.out
nbdinfo --list "nbd+unix:///?socket=$tmp/sock" > list.out
for s in t1 t3 t4 t5; do grep -q "export=\"$s\"" list.out; done
# Each new snapshot freezes the origin as of its take.
nbdcopy "$uri" at-t3.img
nbdsh -u "$uri" -c '
for i in range(1, 512, 5):
    h.pwrite(b"after t3" * 512, i * 4096)
h.flush()'
for s in t3 t4 t5; do
  nbdcopy "nbd+unix:///$s?socket=$tmp/sock" $s.img
  cmp at-t3.img $s.img
done
python3 -c "
import struct
h = open('$tmp/t3.cow', 'rb').read(16)
magic, valid, version, chunk = struct.unpack('<4I', h)
assert magic == 0x70416e53 and valid == 1 and chunk == 32, (magic, valid, version, chunk)"

# Restart: the taken P/PO COWs persist when given as snapshot= again.
nbdsh -u "nbd+unix:///t1?socket=$tmp/sock" -c 'h.flush()'
nbdsh -u "nbd+unix:///t3?socket=$tmp/sock" -c 'h.flush()'
kill_nbdkit "$(cat pid)"
rm -f pid sock    # nbdkit leaves a -U socket it did not create itself
[ ! -e ctl ]      # the control socket is removed at exit
start_nbdkit -P pid -U sock --filter="$FILTER" file origin.img \
  snapshot=t1="$tmp/t1.cow" snapshot=t3="$tmp/t3.cow" \
  snapshot-control="$tmp/ctl"
ctl list
nbdcopy "nbd+unix:///t1?socket=$tmp/sock" t1-r.img
cmp t1.img t1-r.img
nbdcopy "nbd+unix:///t3?socket=$tmp/sock" t3-r.img
cmp at-t3.img t3-r.img
nbdcopy "$uri" origin-r.img
cmp origin.img origin-r.img
# And a take after the restart works.
ctl take t6 "$tmp/t6.cow"
nbdcopy "nbd+unix:///t6?socket=$tmp/sock" t6.img
cmp origin.img t6.img

# snapshot-cow-size binds take as it binds startup: a cap under 3 chunks
# is refused with the startup message, whether the chunk size comes from
# take (no file is made) or from an existing store's header (the file is
# left as it was). Before, such a take was accepted and its first write
# failed.
kill_nbdkit "$(cat pid)"
rm -f pid sock
nbdkit -U - --filter="$FILTER" file origin.img snapshot=h=$tmp/h1m.cow \
  snapshot-chunk-size=1M --run true
sha=$(sha256sum < h1m.cow)
start_nbdkit -P pid -U sock --filter="$FILTER" file origin.img \
  snapshot-cow-size=1M snapshot-control="$tmp/ctl"
msg="snapshot-cow-size=1048576 is under 3 chunks of 1048576 bytes (header, area, data): make it larger"
rc=0; out=$(ctl take big "$tmp/big.cow" 1M) || rc=$?
[ $rc -eq 1 ]
[ "$out" = "ERR $tmp/big.cow: $msg" ]
[ ! -e big.cow ]
rc=0; out=$(ctl take h "$tmp/h1m.cow") || rc=$?
[ $rc -eq 1 ]
[ "$out" = "ERR $tmp/h1m.cow: $msg" ]
[ "$(sha256sum < h1m.cow)" = "$sha" ]
# A file that is there, all zero (no store yet): refused the same way,
# and left all zero (before: a header was written into it).
truncate -s 4M zero.cow
rc=0; out=$(ctl take z "$tmp/zero.cow" 1M) || rc=$?
[ $rc -eq 1 ]
[ "$out" = "ERR $tmp/zero.cow: $msg" ]
cmp zero.cow <(head -c 4M /dev/zero)
[ "$(ctl list)" = OK ]
# The same cap at startup, same words.
rc=0
nbdkit -U - --filter="$FILTER" file origin.img snapshot=h=$tmp/h1m.cow \
  snapshot-cow-size=1M --run true 2> err || rc=$?
cat err
[ $rc -ne 0 ]
grep -q "snapshot=$tmp/h1m.cow: $msg" err
# Chunks small enough: taken, and writes work.
ctl take fits "$tmp/fits.cow" 256k
nbdsh -u "nbd+unix:///fits?socket=$tmp/sock" -c 'h.pwrite(b"f" * 4096, 0); h.flush()'

# A take refused for a chunk under the plugin's minimum block size makes
# no file (before: a new, empty store was made, then removed again), and
# leaves a file that was there as it was (before: it kept a new, empty
# store's header).
truncate -s 1M kept.cow
export tmp
nbdkit -U - --filter="$FILTER" --filter=blocksize-policy file origin.img \
  blocksize-minimum=4096 blocksize-error-policy=error \
  snapshot-control="$tmp/ctl2" --run '
  python3 "$srcdir/control_client.py" "$tmp/ctl2" take small "$tmp/small.cow" 512 > small.out || true
  python3 "$srcdir/control_client.py" "$tmp/ctl2" take kept "$tmp/kept.cow" 512 > kept.out || true'
cat small.out kept.out
grep -q "^ERR .*chunk size 512 is under the origin's minimum block size 4096" small.out
grep -q "^ERR .*chunk size 512 is under the origin's minimum block size 4096" kept.out
[ ! -e small.cow ]
cmp kept.cow <(head -c 1M /dev/zero)
