#!/usr/bin/env bash
# The control socket and nbdsnap's live commands: a take during continuous
# origin writes is one point in time; drop; merge --wait; snapshot names
# that look like reply words (ERRATA, failed-upgrade); hostile and
# concurrent clients; the socket's mode and path rules.
source "$srcdir/functions.sh"
set -e
set -x
requires test -x "$NBDSNAP"
requires python3 -c 'import nbd'
enter_tmpdir
export tmp
blocks=512
python3 -c "
import random
random.seed(2)
open('origin.img','wb').write(bytes(random.getrandbits(8) for _ in range($blocks * 4096)))"
cp origin.img base.img

start_nbdkit -P pid -U sock --filter="$FILTER" file origin.img \
  snapshot-chunk-size=4k snapshot-control="$tmp/ctl"
[ "$(stat -c %a ctl)" = 600 ]
uri="nbd+unix:///origin?socket=$tmp/sock"

# A writer stamps blocks with increasing sequence numbers, in order, and
# logs each write once acknowledged.
cat > writer.py <<'PY'
import nbd, sys, time
h = nbd.NBD(); h.connect_uri(sys.argv[1])
log = open("writes.log", "w", buffering=1)
for seq in range(1, 3000):
    b = (seq * 7) % 512
    h.pwrite(("%d %d " % (seq, b)).encode().ljust(4096, b"."), b * 4096)
    log.write("%d %d\n" % (seq, b))
    if seq > 200 and open("stop").read().strip() == "1":
        break
PY
echo 0 > stop
python3 writer.py "$uri" &
writer=$!
for i in $(seq 100); do [ "$(wc -l < writes.log 2>/dev/null || echo 0)" -gt 100 ] && break; sleep 0.05; done
"$NBDSNAP" -c ctl take t1 t1.cow
nbdinfo --list "nbd+unix:///?socket=$tmp/sock" | grep -q 'export="t1"'
sleep 0.3
echo 1 > stop
wait $writer
nbdcopy "nbd+unix:///t1?socket=$tmp/sock" t1.img
# The snapshot must equal base + writes 1..k for one k.
python3 - <<'PY'
base = open("base.img", "rb").read()
snap = open("t1.img", "rb").read()
writes = [tuple(map(int, l.split())) for l in open("writes.log")]
img = bytearray(base)
def blk(b): return bytes(img[b * 4096:(b + 1) * 4096])
# Find k: the newest write whose stamp the snapshot shows.
shown = 0
for b in range(512):
    head = snap[b * 4096:b * 4096 + 16].split(b" ")
    if snap[b * 4096:(b + 1) * 4096] != base[b * 4096:(b + 1) * 4096]:
        shown = max(shown, int(head[0]))
for seq, b in writes:
    if seq > shown:
        break
    img[b * 4096:(b + 1) * 4096] = ("%d %d " % (seq, b)).encode().ljust(4096, b".")
assert bytes(img) == snap, "the snapshot is not the origin at one point in time"
assert 0 < shown < writes[-1][0], "take did not land during the writes"
print("take at write", shown, "of", writes[-1][0])
PY
# Later origin writes copy out: the snapshot does not change.
nbdsh -u "$uri" -c 'h.pwrite(b"later" * 1000, 0); h.flush()'
nbdcopy "nbd+unix:///t1?socket=$tmp/sock" t1-again.img
cmp t1.img t1-again.img

# Refusals: an existing name, a non-empty store, bad arguments.
rc=0; "$NBDSNAP" -c ctl take t1 other.cow 2> err || rc=$?
[ $rc -eq 1 ]; grep -q 'exists already' err
rc=0; "$NBDSNAP" -c ctl take t2 t1.cow 2> err || rc=$?
[ $rc -eq 1 ]; grep -q "is already snapshot 't1'" err
rc=0; "$NBDSNAP" -c ctl take 2> err || rc=$?
[ $rc -eq 2 ]
# Option values are checked as create checks them (a usage error, exit 2)
# and sent as read: a newline in one started a second command (here a
# drop of t1, which the status below would miss).
rc=0; "$NBDSNAP" -c ctl take t4 t4.cow --chunk-size 64k --store nope 2> err || rc=$?
[ $rc -eq 2 ]; grep -q 'P, PO or N' err; [ ! -e t4.cow ]
rc=0; "$NBDSNAP" -c ctl take t4 t4.cow --chunk-size 3k 2> err || rc=$?
[ $rc -eq 2 ]; grep -q 'not a power of two' err; [ ! -e t4.cow ]
rc=0; "$NBDSNAP" -c ctl take t4 t4.cow --chunk-size $'64k\ndrop t1' 2> err || rc=$?
[ $rc -eq 2 ]; grep -q 'control character' err; [ ! -e t4.cow ]
rc=0; "$NBDSNAP" -c ctl take t4 t4.cow --chunk-size 64k --store $'P\ndrop t1' 2> err || rc=$?
[ $rc -eq 2 ]; grep -q 'control character' err; [ ! -e t4.cow ]
"$NBDSNAP" -c ctl list | grep -q '^t1 '
"$NBDSNAP" --control=ctl list | grep -q '^t1 '
"$NBDSNAP" -c ctl take t3 t3.cow --chunk-size 64k --store N
"$NBDSNAP" -c ctl list | tee list.txt
grep -q "^t3 $tmp/t3.cow N 65536 " list.txt
# --store alone keeps nbdkit's chunk size (before: a usage error).
"$NBDSNAP" -c ctl take t5 t5.cow --store PO
"$NBDSNAP" -c ctl list | grep -q "^t5 $tmp/t5.cow PO 4096 "
"$NBDSNAP" -c ctl drop t5
"$NBDSNAP" -c ctl status --json | python3 -c '
import json, sys
j = json.load(sys.stdin)
assert {s["name"] for s in j["snapshots"]} == {"t1", "t3"}, j'

# drop: the export goes, its COW stops changing, open connections fail.
python3 - <<'PY' &
import nbd, os, time
h = nbd.NBD(); h.connect_uri("nbd+unix:///t3?socket=%s/sock" % os.environ["tmp"])
open("t3-open", "w").write("1")
while not os.path.exists("t3-dropped"): time.sleep(0.05)
try:
    h.pread(4096, 0)
    open("t3-result", "w").write("read worked")
except nbd.Error as e:
    open("t3-result", "w").write(e.errno or "error")
PY
reader=$!
for i in $(seq 100); do [ -e t3-open ] && break; sleep 0.05; done
"$NBDSNAP" -c ctl drop t3
touch t3-dropped
wait $reader
[ "$(cat t3-result)" = EIO ]
if nbdinfo --list "nbd+unix:///?socket=$tmp/sock" | grep -q 'export="t3"'; then exit 1; fi
rc=0; "$NBDSNAP" -c ctl drop t3 2>/dev/null || rc=$?
[ $rc -eq 1 ]

# merge --wait: the origin becomes t1's view; a second merge and a drop of
# the merging snapshot are refused while it runs (it may finish first).
nbdsh -u "nbd+unix:///t1?socket=$tmp/sock" -c 'h.pwrite(b"snapdata" * 512, 40960); h.flush()'
nbdcopy "nbd+unix:///t1?socket=$tmp/sock" t1-final.img
"$NBDSNAP" -c ctl merge t1 --wait > merge.out
cat merge.out
grep -q 'merge complete' merge.out
nbdcopy "$uri" merged.img
cmp merged.img t1-final.img
"$NBDSNAP" -c ctl status | grep -q 'merged t1'

# Names that look like the protocol's words are still names: ERRATA
# starts like an ERR reply, and failed-upgrade holds " failed", which
# merge --wait took for a failed merge.
"$NBDSNAP" -c ctl take ERRATA errata.cow
"$NBDSNAP" -c ctl status > st.out
cat st.out
grep -Eqx 'ERRATA: [0-9]+/[0-9]+ [0-9]+' st.out
"$NBDSNAP" -c ctl list > list2.out
grep -q "^ERRATA $tmp/errata.cow P 4096 " list2.out
"$NBDSNAP" -c ctl take failed-upgrade fu.cow
nbdsh -u "nbd+unix:///failed-upgrade?socket=$tmp/sock" \
  -c 'h.pwrite(b"upgrade" * 4096, 8192); h.flush()'
nbdcopy "nbd+unix:///failed-upgrade?socket=$tmp/sock" fu-final.img
"$NBDSNAP" -c ctl merge failed-upgrade --wait > merge2.out
cat merge2.out
[ "$(tail -n 1 merge2.out)" = "merge complete" ]
nbdcopy "$uri" merged2.img
cmp merged2.img fu-final.img
"$NBDSNAP" -c ctl status | grep -Eqx 'origin: [0-9]+ bytes; merged failed-upgrade'

# Hostile clients: garbage, NULs, a huge line, half-closed sockets, silent
# clients, and 20 at once. The server keeps answering throughout.
python3 - <<'PY'
import os, socket, threading
path = os.environ["tmp"] + "/ctl"
def call(s, data):
    s.sendall(data)
    out = b""
    while not (out.endswith(b"OK\n") or b"ERR" in out):
        chunk = s.recv(65536)
        if not chunk: break
        out += chunk
    return out
s = socket.socket(socket.AF_UNIX); s.connect(path)
assert call(s, b"\x00\x01\xff garbage\n").startswith(b"ERR unknown command")
assert call(s, b"\n").startswith(b"ERR empty")
assert call(s, b"x" * 100000 + b"\n").startswith(b"ERR line too long")
assert call(s, b"status\n").endswith(b"OK\n"), "server stopped after a long line"
assert call(s, b"take\n").startswith(b"ERR usage")
s.close()
h = socket.socket(socket.AF_UNIX); h.connect(path)
h.sendall(b"list\n"); h.shutdown(socket.SHUT_WR)
out = b""
while True:
    c = h.recv(4096)
    if not c: break
    out += c
assert out.endswith(b"OK\n"), out
for _ in range(10):
    q = socket.socket(socket.AF_UNIX); q.connect(path); q.close()
errors = []
def worker():
    try:
        c = socket.socket(socket.AF_UNIX); c.connect(path)
        for _ in range(30):
            assert call(c, b"status\n").endswith(b"OK\n")
            assert call(c, b"list\n").endswith(b"OK\n")
    except Exception as e:
        errors.append(e)
ts = [threading.Thread(target=worker) for _ in range(20)]
[t.start() for t in ts]; [t.join() for t in ts]
assert not errors, errors
PY
nbdsh -u "$uri" -c 'assert len(h.pread(4096, 0)) == 4096'

# Path rules: a regular file is not replaced; a live socket is refused; a
# stale one (its server killed) is replaced.
echo keep > regular
rc=0
nbdkit -U - --filter="$FILTER" file origin.img snapshot-control="$tmp/regular" --run true 2> err || rc=$?
[ $rc -ne 0 ]; grep -q 'not a socket' err; [ "$(cat regular)" = keep ]
rc=0
nbdkit -U - --filter="$FILTER" file base.img snapshot-control="$tmp/ctl" --run true 2> err || rc=$?
[ $rc -ne 0 ]; grep -q 'in use' err
nbdkit -f -U sock2 --filter="$FILTER" file base.img snapshot-control="$tmp/ctl2" &
p2=$!
for i in $(seq 100); do [ -S ctl2 ] && break; sleep 0.05; done
kill -9 $p2; wait $p2 || true
[ -S ctl2 ]
nbdkit -U - --filter="$FILTER" file base.img snapshot-control="$tmp/ctl2" \
  --run "$NBDSNAP -c $tmp/ctl2 status"
