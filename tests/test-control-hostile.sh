#!/usr/bin/env bash
# The control socket against hostile and careless clients: garbage bytes,
# NULs, a 100 KB line, unknown commands, known ones with the wrong number
# of words (their usage), empty lines, half-closed and silent
# connections, 20 concurrent clients. The server keeps answering and NBD I/O
# keeps working throughout. Then the socket file rules: mode 0600; a regular
# file at the path is refused and left alone; a stale socket is replaced; a
# live one is refused (and keeps working).
source "$srcdir/functions.sh"
set -e
set -x
requires nbdinfo --version
requires python3 -c 'import nbd'
enter_tmpdir
export tmp

head -c 4M /dev/urandom > origin.img
start_nbdkit -P pid -U sock --filter="$FILTER" file origin.img \
  snapshot=s1="$tmp/s1.cow" snapshot-chunk-size=4k snapshot-control="$tmp/ctl"
[ -S ctl ]
[ "$(stat -c %a ctl)" = 600 ]
[ "$(stat -c %u ctl)" = "$(id -u)" ]

# NBD I/O in the background for the whole hostile phase: origin writes
# (copying out to s1) and s1 reads, checked.
cat > io.py <<'PY'
import nbd, os, sys
o = nbd.NBD(); o.connect_uri("nbd+unix:///origin?socket=%s/sock" % os.environ["tmp"])
s = nbd.NBD(); s.connect_uri("nbd+unix:///s1?socket=%s/sock" % os.environ["tmp"])
base = open("origin.img", "rb").read()   # s1 was taken at start: frozen
n = 0
while not os.path.exists("io-stop"):
    b = n % 1024
    o.pwrite(b"io %d " % n + b"." * 4000, b * 4096)
    assert s.pread(4096, b * 4096) == base[b * 4096:(b + 1) * 4096], b
    n += 1
o.flush()
open("io-count", "w").write("%d\n" % n)
PY
cp origin.img base.img
python3 io.py &
io=$!
cleanup_fn kill $io

python3 - <<'PY'
import os, socket, threading, time
path = os.environ["tmp"] + "/ctl"

def connect():
    # A blocking connect waits while the listen backlog is full (with a
    # timeout set, Python's AF_UNIX connect fails with EAGAIN instead).
    s = socket.socket(socket.AF_UNIX); s.connect(path); s.settimeout(30); return s

pending = {}   # bytes read past the last reply, per socket
def reply(s, strict=True):
    """Read one reply: lines up to OK or ERR ..."""
    buf = pending.pop(s, b"")
    while True:
        lines = buf.split(b"\n")
        for i, l in enumerate(lines[:-1]):
            if l == b"OK" or l.startswith(b"ERR"):
                rest = b"\n".join(lines[i + 1:])
                if rest: pending[s] = rest
                return b"\n".join(lines[:i + 1]) + b"\n"
        c = s.recv(65536)
        assert c, "connection closed; got %r" % buf
        buf += c

def call(s, data):
    assert s not in pending, "unexpected extra reply: %r" % pending[s]
    s.sendall(data)
    return reply(s)

def ok(r): assert r.endswith(b"OK\n"), r; return r
def err(r, what=b""):
    assert r.startswith(b"ERR") and r.count(b"\n") == 1 and what in r, r
    return r

s = connect()
ok(call(s, b"status\n"))
# Garbage: binary, NULs, high bytes, control characters.
err(call(s, b"\x00\x01\x02\xff\xfe garbage\n"), b"unknown command")
err(call(s, b"\x00\x00\x00\x00\n"))
err(call(s, bytes(range(1, 10)) + bytes(range(11, 256)) + b"\n"))
err(call(s, b"status\x00\n"))
err(call(s, b"\x1b[2J\x1b]0;title\x07\n"))
# Unknown commands, wrong arity, case, empty and blank lines.
err(call(s, b"frobnicate\n"), b"unknown command")
err(call(s, b"STATUS\n"))
# A known command with the wrong number of words: its usage.
for line, usage in ((b"status extra", b"status"), (b"list a b", b"list"),
                    (b"take", b"take NAME FILE [CHUNK-SIZE] [P|PO|N]"),
                    (b"take a b c d e", b"take NAME FILE [CHUNK-SIZE] [P|PO|N]"),
                    (b"drop", b"drop NAME"), (b"merge a b", b"merge NAME")):
    r = call(s, line + b"\n")
    assert r == b"ERR usage: " + usage + b"\n", (line, r)
err(call(s, b"\n"), b"empty")
err(call(s, b"   \t  \n"))
err(call(s, b"\r\n"))
ok(call(s, b"status\r\n"))
ok(call(s, b"  status  \n"))
# A 100 KB line: ERR line too long, once, and the same connection goes on.
r = call(s, b"x" * 100000 + b"\n")
assert r == b"ERR line too long\n", r
ok(call(s, b"status\n"))
r = call(s, b"take " + b"a" * 100000 + b" f\n")
assert r == b"ERR line too long\n", r
ok(call(s, b"list\n"))
# ... also when it arrives in pieces.
for i in range(10):
    s.sendall(b"y" * 10000); time.sleep(0.01)
s.sendall(b"\nstatus\n")
assert reply(s) == b"ERR line too long\n"
ok(reply(s))
# Just under and just over the limit.
err(call(s, b"z" * 4096 + b"\n"), b"unknown command")
assert call(s, b"z" * 4097 + b"\n") == b"ERR line too long\n"
ok(call(s, b"status\n"))
# Several commands in one write, answered in order.
s.sendall(b"status\nbogus\nlist\n")
ok(reply(s)); err(reply(s)); ok(reply(s))
s.close()

# Half-closed: send a command, shut down writing; the reply still comes,
# then end of file.
for cmd in (b"status\n", b"list\n", b"bogus\n", b"status\nlist\n"):
    h = connect(); h.sendall(cmd); h.shutdown(socket.SHUT_WR)
    out = b""
    while True:
        c = h.recv(4096)
        if not c: break
        out += c
    h.close()
    assert out.endswith(b"OK\n") or (cmd == b"bogus\n" and out.startswith(b"ERR")), (cmd, out)
    if cmd == b"status\nlist\n": assert out.count(b"OK\n") == 2, out

# Clients that connect and go: silently, after half a command, with a reset.
for i in range(50):
    q = connect()
    if i % 3 == 1: q.sendall(b"sta")
    if i % 3 == 2:
        q.sendall(b"status\n")
        q.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")
    q.close()
# Many idle connections held open at once, one short of the 32 served
# at once (test-control-limits.sh goes past it).
idle = [connect() for _ in range(31)]
ok(call(connect(), b"status\n"))
for q in idle: q.close()

# 20 concurrent clients, each doing status and list in a loop.
errors = []
def worker(k):
    try:
        c = connect()
        for _ in range(50):
            r = ok(call(c, b"status\n"))
            assert r.startswith(b"origin: "), r
            r = ok(call(c, b"list\n"))
            assert r.startswith(b"s1 "), r
        c.close()
    except Exception as e:
        errors.append((k, repr(e)))
ts = [threading.Thread(target=worker, args=(k,)) for k in range(20)]
[t.start() for t in ts]; [t.join() for t in ts]
assert not errors, errors
ok(call(connect(), b"status\n"))
print("hostile clients: done")
PY
# NBD I/O went on the whole time.
touch io-stop
wait $io
cat io-count
[ "$(cat io-count)" -gt 0 ]
nbdinfo --list "nbd+unix:///?socket=$tmp/sock" | grep -q 'export="s1"'
nbdsh -u "nbd+unix:///s1?socket=$tmp/sock" -c '
assert h.pread(4096, 0) == open("base.img", "rb").read(4096)'

# ---- the socket path ----
# A regular file: refused, unchanged.
echo "precious data" > regular
sha=$(sha256sum < regular)
rc=0
nbdkit -U - --filter="$FILTER" file base.img snapshot-control="$tmp/regular" \
  --run true 2> err || rc=$?
cat err
[ $rc -ne 0 ]
grep -q 'not a socket' err
[ -f regular ] && [ "$(sha256sum < regular)" = "$sha" ]
# A directory and a symlink to a socket: refused too.
mkdir adir
rc=0
nbdkit -U - --filter="$FILTER" file base.img snapshot-control="$tmp/adir" \
  --run true 2> err || rc=$?
[ $rc -ne 0 ]; [ -d adir ]
ln -s ctl link
rc=0
nbdkit -U - --filter="$FILTER" file base.img snapshot-control="$tmp/link" \
  --run true 2> err || rc=$?
[ $rc -ne 0 ]; [ -L link ]

# A live socket (the running nbdkit's): refused; the live one keeps working.
rc=0
nbdkit -U - --filter="$FILTER" file base.img snapshot-control="$tmp/ctl" \
  --run true 2> err || rc=$?
cat err
[ $rc -ne 0 ]
grep -q 'in use' err
[ -S ctl ]
python3 - <<'PY'
import os, socket
s = socket.socket(socket.AF_UNIX); s.settimeout(30)
s.connect(os.environ["tmp"] + "/ctl"); s.sendall(b"status\n")
out = b""
while not out.endswith(b"OK\n"):
    c = s.recv(4096); assert c, out; out += c
PY

# A stale socket: its nbdkit was killed (SIGKILL leaves the file behind).
nbdkit -f -U sock2 --filter="$FILTER" file base.img snapshot-control="$tmp/ctl2" &
p2=$!
for i in $(seq 200); do [ -S ctl2 ] && break; sleep 0.05; done
[ -S ctl2 ]
kill -9 $p2; wait $p2 || true
[ -S ctl2 ]
rm -f sock2
start_nbdkit -P pid3 -U sock3 --filter="$FILTER" file base.img \
  snapshot-control="$tmp/ctl2"
[ -S ctl2 ]
[ "$(stat -c %a ctl2)" = 600 ]
python3 - <<'PY'
import os, socket
s = socket.socket(socket.AF_UNIX); s.settimeout(30)
s.connect(os.environ["tmp"] + "/ctl2"); s.sendall(b"status\n")
out = b""
while not out.endswith(b"OK\n"):
    c = s.recv(4096); assert c, out; out += c
PY
# On a clean shutdown, the server removes its socket.
kill_nbdkit "$(cat pid3)"
[ ! -e ctl2 ]
