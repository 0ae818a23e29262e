#!/usr/bin/env bash
# nbdkit-snapshot-filter over other plugins and stacked over other filters.
#
#  - memory plugin (memory 8M), P and N stores: isolation in both directions.
#  - nbd plugin over qemu-nbd serving a qcow2 image: origin writes copy out
#    correctly and reach the qcow2 (qemu-img compare after shutdown); with
#    qemu-nbd -r the origin export is read-only (EPERM) and the snapshot is
#    still writable (the golden image overlay).
#  - over the error filter: with injection on (origin preads fail with
#    EIO), an origin write that needs a copy-out fails with EIO, and so does
#    a partial snapshot write that needs the origin's chunk; after injection
#    is removed the origin and the snapshot are unchanged (nothing lost) and
#    a retry works.  Failed copy-outs must not use up COW space: a capped
#    COW still takes as many copy-outs as it has room for.
#  - over the delay filter (wdelay=100ms, then rdelay=100ms): snapshot reads
#    concurrent with origin writes (and with partial snapshot writes) always
#    see the point-in-time data.
#  - over eval (serialize_all_requests): the filter serializes its calls
#    into the plugin itself, with parallel clients on both exports.

source "$srcdir/functions.sh"
set -e
set -x

requires nbdkit --version
requires nbdsh --version
requires nbdcopy --version
requires nbdinfo --version
requires python3 -c 'import nbd'
requires nbdkit memory --version
requires nbdkit --filter=error null --version
requires nbdkit --filter=delay null --version
requires test -r "$FILTER"

enter_tmpdir

sock=$tmp/sock
n=0
# serve ARGS...: nbdkit with our filter outermost.
serve ()
{
    n=$((n+1))
    rm -f "$sock"
    # The models here are written for 4 KiB chunks.
    start_nbdkit -P "$tmp/pid.$n" -U "$sock" --filter="$FILTER" "$@" \
                 snapshot-chunk-size=4k
}
# SIGTERM, and wait until nbdkit has exited.  The daemon's parent is PID 1,
# which may be slow to reap it: a zombie has exited (and closed its files).
stop ()
{
    local pid i
    pid="$(cat "$tmp/pid.$n")"
    kill "$pid"
    for i in {1..600}; do
        if ! kill -0 "$pid" 2>/dev/null ||
           grep -q '^[0-9]* (.*) Z' "/proc/$pid/stat" 2>/dev/null; then
            return 0
        fi
        sleep 0.05
    done
    echo "$0: nbdkit $pid did not exit on SIGTERM"
    exit 1
}
uri () { echo "nbd+unix:///$1?socket=$sock"; }

# check EXPORT MODEL
check ()
{
    rm -f out.img
    nbdcopy "$(uri $1)" out.img
    cmp out.img "$2"
}

# random_file SIZE SEED
random_file ()
{
    python3 -c 'import random, sys
sys.stdout.buffer.write(random.Random(int(sys.argv[2])).randbytes(int(sys.argv[1])))' \
        "$1" "$2"
}

# stamp EXPORT MODEL SEED COUNT: COUNT random writes (1 byte .. 12 KiB,
# any alignment) through nbdsh, mirrored into MODEL.
cat > stamp.py <<'EOF'
import os, random
rng = random.Random(int(os.environ["SEED"]))
size = h.get_size()
with open(os.environ["MODEL"], "r+b") as m:
    for _ in range(int(os.environ["COUNT"])):
        n = rng.randint(1, 12288)
        off = rng.randrange(0, size - n)
        data = rng.randbytes(n)
        h.pwrite(data, off)
        m.seek(off)
        m.write(data)
h.flush()
EOF
stamp ()
{
    MODEL="$2" SEED="$3" COUNT="$4" LIBNBD_DEBUG=0 \
        nbdsh -u "$(uri $1)" -c - < stamp.py
}

# expect_error ERRNO EXPORT PYTHON: the python statement must fail with
# ERRNO.
expect_error ()
{
    nbdsh -u "$(uri $2)" -c "
try:
    $3
except nbd.Error as ex:
    assert ex.errno == '$1', ex
else:
    assert False, 'did not fail: $3'
"
}

# ---------------------------------------------------------------- memory
for store in P N; do
    rm -f s.cow
    truncate -s 8M zero.model
    cp zero.model origin.model
    cp zero.model snap.model
    serve memory 8M snapshot=s=$tmp/s.cow snapshot-store=$store
    stamp origin origin.model 1 200
    stamp s snap.model 2 200
    stamp origin origin.model 3 200
    check origin origin.model
    check s snap.model
    stop
done

# ---------------------------------------------------------------- nbd, qemu-nbd
if qemu-nbd --version && qemu-img --version && qemu-io --version &&
   nbdkit nbd --version; then
    qsock=$tmp/qsock
    kill_qemu_nbd () { kill "$1" 2>/dev/null || :; }
    # start_qemu_nbd ARGS...
    start_qemu_nbd ()
    {
        rm -f "$qsock"
        qemu-nbd -k "$qsock" -f qcow2 --persistent "$@" img.qcow2 &
        qpid=$!
        cleanup_fn kill_qemu_nbd $qpid
        for i in {1..300}; do test -S "$qsock" && break; sleep 0.05; done
        test -S "$qsock"
    }
    stop_qemu_nbd ()
    {
        kill $qpid
        wait $qpid || :
    }

    random_file $((4 * 1024 * 1024)) 4 > take.model
    qemu-img convert -f raw -O qcow2 take.model img.qcow2
    cp take.model origin.model
    rm -f s.cow
    start_qemu_nbd
    serve nbd socket="$qsock" snapshot=s=$tmp/s.cow
    check origin take.model
    check s take.model
    for c in 'write -P 0x55 0 64k' 'write -P 0x66 100000 123457' \
             'write -z 2M 300k'; do
        qemu-io -f raw "$(uri origin)" -c "$c"
        qemu-io -f raw origin.model -c "$c"
    done
    stamp origin origin.model 5 100
    check origin origin.model
    check s take.model
    stop
    stop_qemu_nbd
    qemu-img compare -f qcow2 -F raw img.qcow2 origin.model

    # Read-only origin: the snapshot is a writable overlay.
    rm -f s.cow
    start_qemu_nbd -r
    serve nbd socket="$qsock" snapshot=s=$tmp/s.cow
    nbdinfo "$(uri origin)" | grep "is_read_only: true"
    nbdinfo "$(uri s)" | grep "is_read_only: false"
    expect_error EPERM origin 'h.pwrite(b"x" * 512, 0)'
    check s origin.model
    cp origin.model snap.model
    stamp s snap.model 6 100
    check s snap.model
    check origin origin.model
    stop
    stop_qemu_nbd
    qemu-img compare -f qcow2 -F raw img.qcow2 origin.model
else
    echo "$0: qemu-nbd, qemu-img, qemu-io or the nbd plugin missing:" \
         "nbd plugin tests skipped"
fi

# ---------------------------------------------------------------- error
random_file $((1024 * 1024)) 7 > origin.img
cp origin.img take.model
cp origin.img origin.model
rm -f s.cow inject
serve --filter=error file "$tmp/origin.img" snapshot=s=$tmp/s.cow \
    error-pread-rate=100% error-file="$tmp/inject" error=EIO
# Setup, no injection: chunk 0 gets an exception, snapshot chunk 1 too.
nbdsh -u "$(uri origin)" -c '
h.pwrite(b"a" * 4096, 0)
with open("origin.model", "r+b") as m:
    m.write(b"a" * 4096)
'
cp take.model snap.model
nbdsh -u "$(uri s)" -c '
h.pwrite(b"b" * 100, 4096 + 10)
with open("snap.model", "r+b") as m:
    m.seek(4096 + 10)
    m.write(b"b" * 100)
'
check origin origin.model
check s snap.model
used_before="$(nbdinfo --list --json "$(uri origin)" | python3 -c 'import json, sys
print([e["description"] for e in json.load(sys.stdin)["exports"]
       if e["export-name"] == "s"][0].rsplit(": ", 1)[1].split("/")[0])')"

touch inject
# Needs a copy-out: fails, several times.
for i in 1 2 3; do
    expect_error EIO origin 'h.pwrite(b"c" * 4096, 8 * 4096)'
    expect_error EIO origin 'h.pwrite(b"c" * 100, 20 * 4096 + 7)'
done
expect_error EIO origin 'h.zero(4096, 30 * 4096)'
# A partial snapshot write to a chunk still on the origin: fails.
expect_error EIO s 'h.pwrite(b"d" * 100, 40 * 4096 + 5)'
# Chunks that already have their exception need no origin read.
nbdsh -u "$(uri origin)" -c '
h.pwrite(b"e" * 4096, 0)
with open("origin.model", "r+b") as m:
    m.write(b"e" * 4096)
'
nbdsh -u "$(uri s)" -c '
h.pwrite(b"f" * 4096, 4096)
with open("snap.model", "r+b") as m:
    m.seek(4096)
    m.write(b"f" * 4096)
'
rm inject

# Nothing lost, nothing changed by the failed requests.
check origin origin.model
check s snap.model
# Retries work.
nbdsh -u "$(uri origin)" -c '
with open("origin.model", "r+b") as m:
    h.pwrite(b"c" * 4096, 8 * 4096)
    m.seek(8 * 4096)
    m.write(b"c" * 4096)
    h.pwrite(b"c" * 100, 20 * 4096 + 7)
    m.seek(20 * 4096 + 7)
    m.write(b"c" * 100)
    h.zero(4096, 30 * 4096)
    m.seek(30 * 4096)
    m.write(bytes(4096))
'
nbdsh -u "$(uri s)" -c '
h.pwrite(b"d" * 100, 40 * 4096 + 5)
with open("snap.model", "r+b") as m:
    m.seek(40 * 4096 + 5)
    m.write(b"d" * 100)
'
check origin origin.model
check s snap.model
stop
cmp origin.img origin.model
serve file "$tmp/origin.img" snapshot=s=$tmp/s.cow
check origin origin.model
check s snap.model
stop

# ---------------------------------------------------------------- delay
# reader.py: reads the odd 4 KiB chunks of the snapshot (which only the
# origin writer touches) again and again, with many requests in flight,
# until the file "done" exists, and compares them with the snapshot model
# (take.model).
cat > reader.py <<'EOF'
import os
bs = 4096
size = h.get_size()
model = open("take.model", "rb").read()
rounds = 0
bad = []
while not os.path.exists("done") or rounds == 0:
    cmds = []
    for c in range(1, size // bs, 2):
        buf = nbd.Buffer(bs)
        cmds.append((c, buf, h.aio_pread(buf, c * bs)))
        while h.aio_in_flight() >= 32:
            h.poll(-1)
    while h.aio_in_flight() > 0:
        h.poll(-1)
    for c, buf, cookie in cmds:
        assert h.aio_command_completed(cookie)
        if buf.to_bytearray() != model[c * bs:(c + 1) * bs]:
            bad.append((rounds, c))
    rounds += 1
print("reader: %d rounds, %d bad chunks %r" % (rounds, len(bad), bad[:10]))
assert not bad
EOF
# writer.py: WHO=origin: whole and partial writes on random chunks (odd and
# even); WHO=snap: partial writes on even chunks.  16 in flight, each
# chunk once, mirrored into MODEL.
cat > writer.py <<'EOF'
import os, random
bs = 4096
who = os.environ["WHO"]
rng = random.Random(int(os.environ["SEED"]))
size = h.get_size()
if who == "origin":
    chunks = rng.sample(range(size // bs), 120)
else:
    chunks = rng.sample(range(0, size // bs, 2), 60)
fd = os.open(os.environ["MODEL"], os.O_WRONLY)
pending = []
for c in chunks:
    if rng.random() < 0.5:
        off, n = c * bs, bs
    else:
        n = rng.randint(1, bs - 1)
        off = c * bs + rng.randrange(0, bs - n)
    data = rng.randbytes(n)
    buf = nbd.Buffer.from_bytearray(bytearray(data))
    pending.append((h.aio_pwrite(buf, off), buf))
    os.pwrite(fd, data, off)
    while h.aio_in_flight() >= 16:
        h.poll(-1)
    pending = [(k, b) for k, b in pending if not h.aio_command_completed(k)]
while h.aio_in_flight() > 0:
    h.poll(-1)
pending = [(k, b) for k, b in pending if not h.aio_command_completed(k)]
assert not pending
h.flush()
print(who, "writer: wrote", len(chunks), "chunks")
EOF

for delay in wdelay=100ms rdelay=100ms; do
    random_file $((1024 * 1024)) 8 > origin.img
    cp origin.img take.model
    cp origin.img origin.model
    cp origin.img snap.model
    rm -f s.cow done
    serve --filter=delay file "$tmp/origin.img" snapshot=s=$tmp/s.cow $delay
    LIBNBD_DEBUG=0 nbdsh -u "$(uri s)" -c - < reader.py &
    rpid=$!
    WHO=origin SEED=9 MODEL=origin.model LIBNBD_DEBUG=0 \
        nbdsh -u "$(uri origin)" -c - < writer.py &
    opid=$!
    WHO=snap SEED=10 MODEL=snap.model LIBNBD_DEBUG=0 \
        nbdsh -u "$(uri s)" -c - < writer.py &
    spid=$!
    wait $opid
    wait $spid
    touch done
    wait $rpid
    check origin origin.model
    check s snap.model
    stop
    cmp origin.img origin.model
done

# ---------------------------------------------------------------- eval
# A plugin whose thread model is serialize_all_requests (eval): the filter
# must not call into it concurrently, even though its own model is
# parallel and its origin context is shared by every connection.  Each
# call takes a lock directory and records any overlap in "overlap".
if nbdkit eval --version; then
    truncate -s 1M ev.img
    cp ev.img take.model
    cp ev.img origin.model
    rm -rf s.cow lockdir overlap
    enter="mkdir $tmp/lockdir 2>/dev/null || { touch $tmp/overlap; echo EIO overlap >&2; exit 1; }; sleep 0.01"
    leave="rmdir $tmp/lockdir"
    serve eval snapshot=s=$tmp/s.cow \
        get_size='echo 1048576' can_write='exit 0' can_flush='exit 0' \
        flush='exit 0' \
        pread="$enter; dd if=$tmp/ev.img skip=\$4 count=\$3 iflag=skip_bytes,count_bytes status=none; $leave" \
        pwrite="$enter; dd of=$tmp/ev.img seek=\$4 oflag=seek_bytes conv=notrunc status=none; $leave"
    cat > evw.py <<'EOF'
import os
fd = os.open("origin.model", os.O_WRONLY)
for i in range(int(os.environ["FIRST"]), 64, 2):
    data = bytes([i + 1]) * 4096
    h.aio_pwrite(nbd.Buffer.from_bytearray(bytearray(data)), i * 8192)
    os.pwrite(fd, data, i * 8192)
while h.aio_in_flight() > 0:
    h.poll(-1)
h.flush()
EOF
    FIRST=0 LIBNBD_DEBUG=0 nbdsh -u "$(uri origin)" -c - < evw.py &
    p1=$!
    FIRST=1 LIBNBD_DEBUG=0 nbdsh -u "$(uri origin)" -c - < evw.py &
    p2=$!
    rm -f ev-backup.img
    nbdcopy "$(uri s)" ev-backup.img &
    p3=$!
    wait $p1; wait $p2; wait $p3
    test ! -e overlap
    cmp ev-backup.img take.model
    check s take.model
    check origin origin.model
    stop
    test ! -e overlap
    cmp ev.img origin.model
fi

# ---------------------------------------------------------------- error, cap
# Failed copy-outs must not use up the COW: after 30 failed origin writes,
# a COW capped at 64k (14 data chunks) still takes 14 copy-outs.
random_file $((1024 * 1024)) 11 > origin.img
cp origin.img take.model
cp origin.img origin.model
for store in P N; do
    rm -f s.cow inject
    serve --filter=error file "$tmp/origin.img" snapshot=s=$tmp/s.cow \
        snapshot-store=$store snapshot-cow-size=64k \
        error-pread-rate=100% error-file="$tmp/inject" error=EIO
    touch inject
    nbdsh -u "$(uri origin)" -c '
for i in range(30):
    try:
        h.pwrite(b"x" * 4096, 100 * 4096)
    except nbd.Error as ex:
        assert ex.errno == "EIO", ex
    else:
        assert False, ("failed copy-out %d: the origin write went through "
                       "(the snapshot was dropped: COW full?)" % i)
'
    rm inject
    nbdinfo --list "$(uri origin)" | grep 'snapshot s'
    nbdsh -u "$(uri origin)" -c '
with open("origin.model", "r+b") as m:
    for i in range(14):
        data = bytes([i + 1]) * 4096
        h.pwrite(data, i * 4096)
        m.seek(i * 4096)
        m.write(data)
'
    nbdinfo --list "$(uri origin)" | grep 'snapshot s' > desc
    cat desc
    if grep Invalid desc; then exit 1; fi
    check origin origin.model
    check s take.model
    stop
    cp origin.img take.model
done
