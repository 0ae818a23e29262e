#!/usr/bin/env bash
# A take that waits on the origin holds up only the changes behind it:
# status and list from other clients are answered meanwhile. Before, every
# command ran in the control socket's one thread, so a take waiting for an
# origin write that hung (here: nbdkit's pause filter under ours, holding
# the copy-out's read) left `nbdsnap status` hanging for every client.
# Also: a client's own lines keep their order behind its take; a second
# change waits for the first; a client that leaves while its take runs
# loses only the reply, and the take still happens; its place is free at
# once (the cap is 32 clients).
source "$srcdir/functions.sh"
set -e
set -x
requires nbdkit --filter=pause --filter=log null --version
requires nbdsh --version
requires python3 -c 'import nbd'
enter_tmpdir
export tmp

# snapshot -> log -> pause -> memory: the log shows a request reaching the
# pause filter, which holds it while paused.
start_nbdkit -P pid -U sock --filter="$FILTER" --filter=log --filter=pause \
  memory 4M logfile=log pause-control="$tmp/pause" \
  snapshot=s1="$tmp/s1.cow" snapshot-chunk-size=4k snapshot-export=origin \
  snapshot-control="$tmp/ctl"

python3 - <<'PY'
import os, re, socket, subprocess, time
tmp = os.environ["tmp"]

def connect(path):
    s = socket.socket(socket.AF_UNIX); s.connect(path); s.settimeout(30); return s

pending = {}  # socket -> bytes received past the replies returned

def reply(s):
    """One reply: data lines up to OK or ERR ..."""
    buf = pending.pop(s, b"")
    while True:
        m = re.search(rb"(^|\n)(OK|ERR[^\n]*)\n", buf)
        if m:
            pending[s] = buf[m.end():]
            return buf[:m.end()].decode()
        c = s.recv(65536)
        assert c, "closed mid-reply: %r" % buf
        buf += c

def nothing_yet(s):
    s.setblocking(False)
    try:
        data = s.recv(65536)
        raise AssertionError("a reply came early: %r" % data)
    except BlockingIOError:
        pass
    finally:
        s.setblocking(True); s.settimeout(30)

pause = connect(tmp + "/pause")

def stuck_write(offset):
    """An origin write: its copy-out to the snapshots reads the old chunk,
    and that read hangs at the pause filter, holding the origin."""
    pause.sendall(b"p"); assert pause.recv(1) == b"P"
    writer = subprocess.Popen(
        ["nbdsh", "-u", "nbd+unix:///origin?socket=%s/sock" % tmp,
         "-c", "h.pwrite(b'\\xaa' * 4096, %d)" % offset])
    for _ in range(600):
        if re.search(r"Read .*offset=%#x " % offset, open(tmp + "/log").read()):
            return writer
        time.sleep(0.05)
    raise AssertionError("the copy-out's read never reached the origin")

writer = stuck_write(65536)

# take waits for the write; the list after it, on the same connection,
# waits for the take.
a = connect(tmp + "/ctl")
a.sendall(("take t1 %s/t1.cow\nlist\n" % tmp).encode())
# A second change, from another client, waits behind the first.
c = connect(tmp + "/ctl")
c.sendall(("take t2 %s/t2.cow\n" % tmp).encode())
# A client that leaves while its take waits.
d = connect(tmp + "/ctl")
d.sendall(("take t3 %s/t3.cow\n" % tmp).encode())
time.sleep(1)  # the takes are under way (the old server was stuck in one)
d.close()

b = connect(tmp + "/ctl")
b.sendall(b"status\nlist\n")
st = reply(b)
assert re.search(r"^s1: \d+/\d+ \d+\n", st, re.M), st
assert "t1" not in st, st
ls = reply(b)
assert ls.startswith("s1 "), ls
nothing_yet(a)
nothing_yet(c)
assert writer.poll() is None, "the origin write finished while paused"

pause.sendall(b"r"); assert pause.recv(1) == b"R"
assert writer.wait(60) == 0

r = reply(a)
assert re.match(r"t1: \d+/\d+ \d+\nOK\n$", r), r
ls = reply(a)  # after the take, so it lists t1
assert re.search(r"^t1 %s/t1.cow P 4096 " % re.escape(tmp), ls, re.M), ls
r = reply(c)
assert r.startswith("t2: ") and r.endswith("OK\n"), r

def wait_listed(s, want):
    """Lists on s until the snapshots are want: a queued take of a client
    that left runs after the replies the test waits for."""
    for _ in range(600):
        s.sendall(b"list\n")
        ls = reply(s)
        assert ls.startswith("s1 "), ls
        names = {l.split()[0] for l in ls.splitlines()[:-1]}
        if names == want: return
        time.sleep(0.1)
    raise AssertionError("listed %s, not %s" % (sorted(names), sorted(want)))

wait_listed(b, {"s1", "t1", "t2", "t3"})

# A client that leaves while its take waits gives back its place at once.
# Before, it held it until its reply, so with the origin stuck, 30 such
# clients (with b and u0's: the cap of 32) left `status` from e waiting.
# Their takes still run, and their replies go nowhere: not to e, which
# gets one of their file descriptors.
a.close(); c.close()
writer = stuck_write(131072)
u0 = connect(tmp + "/ctl")
u0.sendall(("take u0 %s/u0.cow\n" % tmp).encode())
for i in range(1, 31):
    u = connect(tmp + "/ctl")
    u.sendall(("take u%d %s/u%d.cow\n" % (i, tmp, i)).encode())
    time.sleep(0.02)  # read, and queued, before it leaves
    u.close()
e = connect(tmp + "/ctl"); e.settimeout(10)
e.sendall(b"status\n")
try:
    st = reply(e)
except socket.timeout:
    raise AssertionError("status unanswered: clients that left hold every place")
assert re.search(r"^s1: ", st, re.M), st
assert writer.poll() is None, "the origin write finished while paused"
pause.sendall(b"r"); assert pause.recv(1) == b"R"
assert writer.wait(60) == 0
r = reply(u0)
assert re.match(r"u0: \d+/\d+ \d+\nOK\n$", r), r
wait_listed(e, {"s1", "t1", "t2", "t3"} | {"u%d" % i for i in range(31)})
PY

# The write reached the origin before t1 was taken, and after s1 was:
# s1 keeps the old zeros, t1 and the origin have the new data.
nbdsh -c '
import os
sock = os.environ["tmp"] + "/sock"
def read(export):
    h = nbd.NBD(); h.set_export_name(export)
    h.connect_unix(sock)
    return h.pread(4096, 65536)
assert read("s1") == bytes(4096)
assert read("t1") == b"\xaa" * 4096
assert read("t2") == b"\xaa" * 4096
assert read("origin") == b"\xaa" * 4096
'
