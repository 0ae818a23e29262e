#!/usr/bin/env bash
# The control socket when clients or file descriptors run out (nbdkit
# started under a low `ulimit -n`):
# - at most 32 control clients are served at once: with 60 trying, the
#   server holds exactly 32; one more waits in the listen backlog and is
#   answered as soon as another client leaves;
# - idle clients that use up nbdkit's file descriptors make accept fail
#   with EMFILE; the server must not spin on the listen socket (it polled
#   it at 100% CPU), logs the error once, and when the clients leave, the
#   control socket and NBD connections work again.
# CPU use is nbdkit's utime + stime from /proc/PID/stat over 2 s: a busy
# loop shows ~200 ticks, an idle server 0-2.
source "$srcdir/functions.sh"
set -e
set -x
requires test -x "$NBDSNAP"
requires nbdinfo --version
requires python3 --version
enter_tmpdir
export tmp

head -c 4M /dev/urandom > origin.img

# start_limited LIMIT: nbdkit with at most LIMIT open files, logging to
# log.LIMIT.
start_limited () {
    rm -f pid sock ctl
    bash -c "ulimit -n $1; exec nbdkit -v -P pid -U sock --filter='$FILTER' \
      file origin.img snapshot=s1='$tmp/s1.cow' snapshot-chunk-size=4k \
      snapshot-control='$tmp/ctl'" 2> "log.$1"
    for i in {1..600}; do test -s pid && break; sleep 0.1; done
    test -s pid
    cleanup_fn kill_nbdkit "$(cat pid)"
    grep "^Max open files *$1 " "/proc/$(cat pid)/limits"
}

# hold.py N: up to N idle clients (as many as the server accepts and its
# backlog holds); prints how many connected, the control fds the server holds, and
# its CPU ticks over 2 s; then closes them all.
cat > hold.py <<'PY'
import os, socket, sys, time
pid = open("pid").read().strip()
path = os.environ["tmp"] + "/ctl"
def ticks():
    f = open("/proc/%s/stat" % pid).read()
    f = f[f.rindex(")") + 2:].split()
    return int(f[11]) + int(f[12])          # utime + stime
def control_fds():
    n = 0
    for fd in os.listdir("/proc/%s/fd" % pid):
        try:
            if os.readlink("/proc/%s/fd/%s" % (pid, fd)).startswith("socket:"):
                n += 1
        except FileNotFoundError:
            pass
    return n
base = control_fds()
def connect():
    """A connected socket, or None once the backlog has stayed full for
    a second (the server accepts no more)."""
    for _ in range(100):
        s = socket.socket(socket.AF_UNIX)
        s.setblocking(False)
        try:
            s.connect(path)
            return s
        except BlockingIOError:   # the listen backlog is full for now
            s.close()
            time.sleep(0.01)
    return None
held = []
for _ in range(int(sys.argv[1])):
    s = connect()
    if s is None: break
    held.append(s)
time.sleep(1)                    # let the server accept what it will
t0 = ticks(); time.sleep(2); t1 = ticks()
print("connected %d accepted %d ticks %d" % (len(held), control_fds() - base, t1 - t0))
for s in held: s.close()
PY

# ---- the client cap, with file descriptors to spare ----
start_limited 64
python3 hold.py 60 | tee hold.out
read -r _ connected _ accepted _ ticks < hold.out
[ "$ticks" -lt 50 ]
[ "$accepted" -eq 32 ]
[ "$connected" -gt 32 ]
"$NBDSNAP" -c ctl status | tee status.out
grep -q '^s1: ' status.out

# One client over the cap waits in the backlog until another leaves.
python3 - <<'PY'
import os, socket, time
path = os.environ["tmp"] + "/ctl"
def connect():
    s = socket.socket(socket.AF_UNIX); s.connect(path); return s
idle = [connect() for _ in range(32)]
time.sleep(0.5)
extra = connect()
extra.sendall(b"status\n")
extra.settimeout(1)
try:
    got = extra.recv(4096)
    raise SystemExit("a 33rd client was served: %r" % got)
except socket.timeout:
    pass
idle.pop().close()
extra.settimeout(30)
out = b""
while not out.endswith(b"OK\n"):
    c = extra.recv(4096); assert c, out; out += c
assert out.startswith(b"origin: "), out
print("33rd client answered once one left")
PY
nbdinfo "nbd+unix:///s1?socket=$tmp/sock" | grep -q 'export-size: 4194304'
kill_nbdkit "$(cat pid)"

# ---- out of file descriptors before the cap ----
start_limited 24
python3 hold.py 40 | tee hold.out
read -r _ connected _ accepted _ ticks < hold.out
[ "$ticks" -lt 50 ]
[ "$accepted" -lt 32 ]
[ "$connected" -gt "$accepted" ]
# Logged once, not once per retry.
[ "$(grep -c 'control: cannot accept a client: Too many open files' log.24)" -eq 1 ]
# Once they have gone, the control socket and NBD serve again.
"$NBDSNAP" -c ctl status | tee status.out
grep -q '^s1: ' status.out
nbdinfo "nbd+unix:///s1?socket=$tmp/sock" | grep -q 'export-size: 4194304'
"$NBDSNAP" -c ctl take t1 "$tmp/t1.cow"
"$NBDSNAP" -c ctl list | grep -q "^t1 $tmp/t1.cow P 4096 "
