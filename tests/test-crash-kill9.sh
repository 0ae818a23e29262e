#!/usr/bin/env bash
# kill -9 under load, against a model: a writer sends 4 KiB block writes to
# the origin and the snapshot, flushing now and then, and logs what was
# issued and what a flush made durable. After each SIGKILL the store
# opens, the snapshot never shows origin data (point in time), every
# snapshot block holds its old contents or one of the writes issued to it,
# and every write covered by a successful flush is there.
source "$srcdir/functions.sh"
set -e
set -x
requires python3 -c 'import nbd'
tmp=$(mktemp -d)
cleanup_fn rm -rf "$tmp"
cd "$tmp"
export tmp
blocks=256
python3 -c "
import random
random.seed(1)
open('origin.img','wb').write(bytes(random.getrandbits(8) for _ in range($blocks * 4096)))"
cp origin.img base.img
cat > writer.py <<'PY'
import nbd, os, random, sys
sock, seed, log = sys.argv[1], int(sys.argv[2]), open(sys.argv[3], "a", buffering=1)
o = nbd.NBD(); o.connect_uri("nbd+unix:///origin?socket=" + sock)
s = nbd.NBD(); s.connect_uri("nbd+unix:///s?socket=" + sock)
rnd = random.Random(seed)
for i in range(100000):
    seq = seed * 1000000 + i
    kind = "s" if rnd.random() < 0.5 else "o"
    b = rnd.randrange(256)
    data = (b"%s %d %d " % (kind.encode(), b, seq)).ljust(4096, b".")
    log.write("issue %s %d %d\n" % (kind, b, seq))
    (s if kind == "s" else o).pwrite(data, b * 4096)
    if i % 8 == 7:
        s.flush()
        log.write("flushed %d\n" % seq)
PY
cat > check.py <<'PY'
import sys
blocks = 256
base = open("base.img", "rb").read()
snap = open("snap.img", "rb").read()
issued = {}      # block -> set of snapshot payloads issued
durable = {}     # block -> seq of the newest snapshot write covered by a flush
pending = {}     # block -> newest snapshot write seq since the last flush
for line in open("log.txt"):
    w = line.split()
    if w[0] == "issue" and w[1] == "s":
        b, seq = int(w[2]), int(w[3])
        issued.setdefault(b, set()).add(seq)
        pending[b] = seq
    elif w[0] == "flushed":
        durable.update(pending)
        pending.clear()
for b in range(blocks):
    got = snap[b * 4096:(b + 1) * 4096]
    if got == base[b * 4096:(b + 1) * 4096]:
        assert b not in durable, "block %d lost flushed write %d" % (b, durable[b])
        continue
    head = got.split(b" ")
    assert head[0] == b"s", "block %d shows origin data or garbage: %r" % (b, got[:32])
    seq = int(head[2])
    assert seq in issued.get(b, ()), "block %d holds a write never issued to it" % b
    if b in durable:
        assert seq >= durable[b], "block %d went back before flushed write %d" % (b, durable[b])
print("snapshot consistent:", len(durable), "blocks with flushed writes")
PY
: > log.txt
for round in 1 2 3 4 5; do
  rm -f sock
  nbdkit -f -U sock --filter="$FILTER" file origin.img snapshot=s=s.cow \
    snapshot-chunk-size=4k &
  pid=$!
  for i in $(seq 100); do [ -S sock ] && break; sleep 0.05; done
  python3 writer.py "$tmp/sock" $round log.txt &
  writer=$!
  sleep "0.$((RANDOM % 9 + 1))"
  kill -9 $pid
  wait $pid || true
  wait $writer || true
  # Restart on the same files: it opens, and the views obey the model.
  rm -f sock
  nbdkit -U - --filter="$FILTER" file origin.img snapshot=s=s.cow \
    --run 'nbdcopy "nbd+unix:///s?socket=$unixsocket" snap.img'
  python3 check.py
done
if [ -x "$NBDSNAP" ]; then "$NBDSNAP" check s.cow; fi
