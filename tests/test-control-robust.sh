#!/usr/bin/env bash
# The control socket with clients that misbehave in ways the hostile test
# does not cover, and with relative paths under a daemonized nbdkit (which
# runs in /):
# - a client that floods commands and never reads its replies is dropped
#   once 1 MiB of replies wait, and never holds the server: another client
#   is answered meanwhile; one that reads late, under the cap, gets every
#   reply in order;
# - a last command without a newline is answered at end of file;
# - `take` refuses a relative FILE and a FILE with control characters,
#   creating nothing; nbdsnap -c makes FILE absolute against its own
#   directory;
# - snapshot=FILE given relative is listed absolute, and a relative
#   snapshot-control socket is removed on exit.
source "$srcdir/functions.sh"
set -e
set -x
requires nbdsh --version
requires python3 -c 'import nbd'
enter_tmpdir
export tmp

head -c 4M /dev/urandom > origin.img
cp origin.img base.img
# Relative names throughout: nbdkit resolves them here, before its fork.
start_nbdkit -P pid -U sock --filter="$FILTER" file origin.img \
  snapshot=s1=s1.cow snapshot-chunk-size=4k snapshot-control=ctl
[ "$(readlink "/proc/$(cat pid)/cwd")" = / ]
[ -S ctl ]

bogus=robust-$$-$RANDOM.cow
export bogus
python3 - <<'PY'
import os, socket, threading, time
tmp = os.environ["tmp"]
path = tmp + "/ctl"

def connect():
    s = socket.socket(socket.AF_UNIX); s.connect(path); s.settimeout(30); return s

def read_replies(s, n):
    """n replies (lines up to OK or ERR ...), and whatever follows."""
    buf, got = b"", []
    while len(got) < n:
        c = s.recv(65536)
        assert c, "closed after %d replies: %r" % (len(got), buf[-200:])
        buf += c
        while True:
            lines = buf.split(b"\n")
            for i, l in enumerate(lines[:-1]):
                if l == b"OK" or l.startswith(b"ERR"):
                    got.append(b"\n".join(lines[:i + 1]) + b"\n")
                    buf = b"\n".join(lines[i + 1:])
                    break
            else:
                break
    return got

def call(s, line):
    s.sendall(line)
    return read_replies(s, 1)[0]

def until_eof(s):
    out = b""
    while True:
        c = s.recv(65536)
        if not c: return out
        out += c

# The snapshot given relative on the command line is listed absolute.
r = call(connect(), b"list\n")
assert r.startswith(b"s1 %s/s1.cow P 4096 " % tmp.encode()), r

# A last command without its newline is answered at end of file.
for cmd, want in ((b"status", b"OK\n"), (b"list\nstatus", b"OK\n"),
                  (b"bogus", b"unknown command")):
    h = connect(); h.sendall(cmd); h.shutdown(socket.SHUT_WR)
    out = until_eof(h)
    assert want in out, (cmd, out)
    if cmd == b"list\nstatus": assert out.count(b"OK\n") == 2, out

# take: relative FILE and control characters are refused; nothing made.
s = connect()
bogus = os.environ["bogus"].encode()
r = call(s, b"take t1 " + bogus + b"\n")
assert r.startswith(b"ERR FILE " + bogus + b" is relative"), r
for f in (b"/tmp/a\tb.cow", tmp.encode() + b"/x\x01y.cow", tmp.encode() + b"/z\x7f.cow"):
    r = call(s, b"take t1 " + f + b"\n")
    assert r.startswith(b"ERR FILE contains a control character"), (f, r)
r = call(s, b"list\n")
assert r.count(b"\n") == 2 and r.startswith(b"s1 "), r   # s1 and OK only
assert not os.path.exists(b"/" + bogus)
assert sorted(os.listdir(tmp)) == sorted(
    ["base.img", "ctl", "origin.img", "pid", "s1.cow", "sock"]), os.listdir(tmp)

# A client that reads late, under the cap: every reply, in order.
late = connect()
late.sendall(b"status\nbogus\nlist\n" * 300)
time.sleep(1)
got = read_replies(late, 900)
for i, r in enumerate(got):
    if i % 3 == 1: assert r.startswith(b"ERR unknown command"), (i, r)
    else: assert r.endswith(b"OK\n") and not r.startswith(b"ERR"), (i, r)
late.close()

# A client that floods and never reads is dropped; the server answers
# others meanwhile (before the fix each reply blocked it for seconds).
flood = connect()
flood_end = []
def flooder():
    try:
        for _ in range(200):
            flood.sendall(b"status\nlist\n" * 5000)
        flood_end.append("sent everything")
    except OSError as e:
        flood_end.append(repr(e))
t = threading.Thread(target=flooder); t.start()
other = connect()
for i in range(20):
    r = call(other, b"status\n")
    assert r.startswith(b"origin: ") and r.endswith(b"OK\n"), r
t.join(120)
assert not t.is_alive(), "the flooding client was never dropped"
assert flood_end and flood_end[0] != "sent everything", flood_end
# What the flooder can still read ends: the server closed it.
flood.settimeout(30)
total = 0
try:
    while True:
        c = flood.recv(1 << 20)
        if not c: break
        total += len(c)
except ConnectionResetError:
    pass
assert total <= (1 << 20) + (4 << 20), total   # the cap plus socket buffers
r = call(other, b"list\n")
assert r.startswith(b"s1 "), r
print("robust clients: done")
PY

# nbdsnap -c takes FILE relative to its own directory.
mkdir sub
(cd sub && nbdsnap -c ../ctl take t2 t2.cow)
[ -s sub/t2.cow ]
nbdsnap -c ctl list | grep -qx "t2 $tmp/sub/t2.cow P 4096 .*"

# The snapshots work: write the origin, both still read as taken.
nbdsh -u "nbd+unix:///origin?socket=$tmp/sock" -c 'h.pwrite(b"\xaa" * 65536, 0); h.flush()'
for s in s1 t2; do
  nbdsh -u "nbd+unix:///$s?socket=$tmp/sock" -c '
assert h.pread(65536, 0) == open("base.img", "rb").read(65536)'
done

# On exit the relative control socket is removed, though nbdkit is in /.
kill_nbdkit "$(cat pid)"
[ ! -e ctl ]
