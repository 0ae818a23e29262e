#!/usr/bin/env bash
# nbdkit-snapshot-filter: zero, fast zero, trim and block status.
#
#  - nbdinfo: can_zero, can_fast_zero, can_trim, can_fua, can_flush,
#    can_multi_conn are true on the origin and on a snapshot export.
#  - zero on a snapshot writes zeros into the COW: they read back as zeros,
#    the rest of a partial chunk keeps the origin's data, the origin is
#    unchanged.
#  - FAST_ZERO on a snapshot: a partial chunk without an exception fails
#    ENOTSUP (it would need a copy), and changes nothing; a whole chunk, or
#    a partial chunk already in the COW, succeeds.  On the origin, a fast
#    zero that needs a copy-out fails ENOTSUP, and so does one the plugin
#    cannot do fast (the file plugin may not; nozero filter below).
#  - trim on a snapshot never changes the origin, nor the snapshot outside
#    the trimmed range.
#  - zero and trim on the origin copy out first: the snapshot keeps the old
#    data; also with the origin's zero emulated (nozero filter below).
#  - nbdinfo --map on a snapshot: chunks in the COW are data, the rest is
#    the origin's map.
# A python model of each device; every export read back whole and compared.

source "$srcdir/functions.sh"
set -e
set -x

requires nbdkit --version
requires nbdsh --version
requires nbdcopy --version
requires nbdinfo --version
requires python3 -c 'import nbd'
requires nbdkit --filter=nozero null --version
requires test -r "$FILTER"

enter_tmpdir

sock=$tmp/sock
size=$((1024 * 1024))
n=0
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

# run_py EXPORT: the python on stdin, in nbdsh connected to EXPORT, with
# helpers: put(model, off, data) mirrors a write into a model file and
# expect_error(errno, fn, *args).
run_py ()
{
    { cat <<'EOF'
import os
def put(model, off, data):
    with open(model, "r+b") as m:
        m.seek(off)
        m.write(data)
def expect_error(errno, fn, *args):
    try:
        fn(*args)
    except nbd.Error as ex:
        assert ex.errno == errno, (ex.errno, errno, str(ex))
        return
    assert False, "%s%r did not fail" % (fn.__name__, args)
EOF
      cat
    } > script.py
    nbdsh -u "$(uri $1)" -c - < script.py
}

# A 1 MiB origin: random data in the first half, a hole in the second half
# except one data block at 800 KiB.
new_origin ()
{
    rm -f origin.img
    truncate -s $size origin.img
    python3 -c 'import random, sys
sys.stdout.buffer.write(random.Random(int(sys.argv[1])).randbytes(512 * 1024))' $1 |
        dd of=origin.img conv=notrunc status=none
    printf 'data at 800k' | dd of=origin.img bs=1024 seek=800 conv=notrunc status=none
    cp origin.img take.model
    cp origin.img origin.model
    cp origin.img snap.model
    rm -f s.cow
}

# ---------------------------------------------------------------- flags
new_origin 1
serve file "$tmp/origin.img" snapshot=s=$tmp/s.cow
for e in origin s; do
    nbdinfo --json "$(uri $e)" > info.json
    python3 -c 'import json
e = json.load(open("info.json"))["exports"][0]
for k in ("can_zero", "can_fast_zero", "can_trim", "can_fua", "can_flush",
          "can_multi_conn"):
    assert e[k] is True, (k, e)
assert e["is_read_only"] is False, e'
done

# ---------------------------------------------------------------- snapshot
run_py s <<'EOF'
cs = 4096
m = "snap.model"
# Whole chunks, and a range cutting chunks 2 and 5 partway.
h.zero(2 * cs, 10 * cs)
put(m, 10 * cs, bytes(2 * cs))
h.zero(3 * cs + 100, 2 * cs + 50)
put(m, 2 * cs + 50, bytes(3 * cs + 100))
# With FUA and with NO_HOLE (without it, a zero may trim).
h.zero(1000, 20 * cs + 3, nbd.CMD_FLAG_FUA)
put(m, 20 * cs + 3, bytes(1000))
h.zero(cs, 30 * cs, nbd.CMD_FLAG_NO_HOLE)
put(m, 30 * cs, bytes(cs))

# FAST_ZERO: partial chunk, no exception: ENOTSUP, nothing changes.
expect_error("ENOTSUP", h.zero, 100, 40 * cs + 10, nbd.CMD_FLAG_FAST_ZERO)
# ... and a range that includes whole chunks plus a partial one.
expect_error("ENOTSUP", h.zero, 2 * cs + 1, 41 * cs, nbd.CMD_FLAG_FAST_ZERO)
# Whole chunks: fine.
h.zero(2 * cs, 50 * cs, nbd.CMD_FLAG_FAST_ZERO)
put(m, 50 * cs, bytes(2 * cs))
# Partial chunk already in the COW (chunk 20): fine.
h.pwrite(b"w" * 500, 60 * cs)
put(m, 60 * cs, b"w" * 500)
h.zero(10, 60 * cs + 100, nbd.CMD_FLAG_FAST_ZERO)
put(m, 60 * cs + 100, bytes(10))
h.zero(10, 20 * cs + 2000, nbd.CMD_FLAG_FAST_ZERO)
put(m, 20 * cs + 2000, bytes(10))
# The last chunk, and a zero across the hole at the end.
h.zero(cs, 255 * cs)
put(m, 255 * cs, bytes(cs))
h.zero(3 * cs - 7, 200 * cs + 7)
put(m, 200 * cs + 7, bytes(3 * cs - 7))
h.flush()
EOF
check s snap.model
check origin origin.model
# A fast zero refused (ENOTSUP, as the client asked) logs no error (before:
# "error:" each time, and clients probe with fast zeros).
nbdkit -U - --filter="$FILTER" file "$tmp/origin.img" snapshot=fz=$tmp/fz.cow \
    --run 'nbdsh -u "nbd+unix:///fz?socket=$unixsocket" -c "
try:
    h.zero(100, 40 * 4096 + 10, nbd.CMD_FLAG_FAST_ZERO)
    raise SystemExit(\"a fast zero of a partial chunk succeeded\")
except nbd.Error as e:
    assert e.errno == \"ENOTSUP\", e
"' 2> fastzero.err
cat fastzero.err
absent 'error: snapshot' fastzero.err

# Trim on the snapshot: advisory; never the origin, never outside its
# range.  Chunks 70..79 are in the COW (written), 90..99 are not.
run_py s <<'EOF'
cs = 4096
for c in range(70, 80):
    h.pwrite(bytes([c]) * cs, c * cs)
    put("snap.model", c * cs, bytes([c]) * cs)
h.flush()
EOF
cp snap.model snap-before-trim.model
run_py s <<'EOF'
cs = 4096
h.trim(4 * cs, 72 * cs)
h.trim(cs + 300, 77 * cs + 100)
h.trim(5 * cs, 90 * cs)
h.trim(10, 95 * cs + 5, nbd.CMD_FLAG_FUA)
h.flush()
EOF
check origin origin.model
# Outside the trimmed ranges the snapshot is unchanged: compare with the
# trimmed ranges masked in both.
rm -f out.img
nbdcopy "$(uri s)" out.img
python3 -c '
cs = 4096
a = bytearray(open("out.img", "rb").read())
b = bytearray(open("snap-before-trim.model", "rb").read())
for off, n in ((72 * cs, 4 * cs), (77 * cs + 100, cs + 300),
               (90 * cs, 5 * cs), (95 * cs + 5, 10)):
    a[off:off + n] = bytes(n)
    b[off:off + n] = bytes(n)
assert a == b, "snapshot changed outside the trimmed ranges"
'
cp out.img snap-final.img
stop
cmp origin.img origin.model

# ---------------------------------------------------------------- map
# nbdinfo --map on the snapshot: COW chunks (written above) are data, the
# rest follows the origin (data in the first half, a hole after, data at
# 800 KiB).  Compare with a model of the map.
serve file "$tmp/origin.img" snapshot=s=$tmp/s.cow
# Zeros and trims are persistent too.
check s snap-final.img
check origin origin.model
nbdinfo --map "$(uri origin)" > origin.map
nbdinfo --map "$(uri s)" > snap.map
cat origin.map snap.map
python3 - <<'EOF'
def parse(path):
    # -> list of (offset, length, type), merged where types repeat
    out = []
    for line in open(path):
        off, n, t = [int(x) for x in line.split()[:3]]
        if out and out[-1][2] == t and out[-1][0] + out[-1][1] == off:
            out[-1] = (out[-1][0], out[-1][1] + n, t)
        else:
            out.append((off, n, t))
    return out
def types(m, size):
    t = [None] * (size // 512)
    for off, n, ty in m:
        for s in range(off // 512, (off + n) // 512):
            t[s] = ty
    return t
size = 1024 * 1024
cs = 4096
origin = types(parse("origin.map"), size)
snap = types(parse("snap.map"), size)
assert None not in origin and None not in snap
# The origin file: data in the first half, a hole after except 800 KiB.
assert all(t & 1 == 0 for t in origin[:1024]), origin[:1024]
assert origin[800 * 2] & 1 == 0
assert all(t == 3 for t in origin[1024:1600]), origin[1024:1600]
# Chunks the snapshot holds (written or zeroed above).
cow = set()
for first, count in ((10, 2), (2, 4), (20, 1), (30, 1), (50, 2), (60, 1),
                     (70, 10), (200, 3), (255, 1)):
    cow.update(range(first, first + count))
for c in range(size // cs):
    sectors = range(c * cs // 512, (c + 1) * cs // 512)
    if c in cow:
        assert all(snap[s] == 0 for s in sectors), ("COW chunk not data", c)
    else:
        assert all(snap[s] == origin[s] for s in sectors), \
            ("chunk not in the COW differs from the origin's map", c)
print("map ok")
EOF
stop

# ---------------------------------------------------------------- origin
# Zero and trim on the origin copy out first.  Run with the file plugin's
# own zero, and with zero emulated by the filter (nozero below it).
# Whether the plugin itself does fast zeros (the file plugin may not).
plugin_fast=$(nbdkit -U - file "$tmp/origin.img" \
                     --run 'nbdsh -u "$uri" -c "print(int(h.can_fast_zero()))"')
export plugin_fast
for below in "" "--filter=nozero"; do
    new_origin 2
    serve $below file "$tmp/origin.img" snapshot=s=$tmp/s.cow
    export below
    run_py origin <<'EOF'
cs = 4096
m = "origin.model"
# A fast zero the plugin cannot do (or that the filter emulates with
# writes, nozero below) is not fast either.
fast = os.environ["plugin_fast"] == "1" and os.environ["below"] == ""
# Fast zero needing a copy-out: ENOTSUP, nothing changes.
expect_error("ENOTSUP", h.zero, cs, 5 * cs, nbd.CMD_FLAG_FAST_ZERO)
h.zero(8 * cs, 8 * cs)
put(m, 8 * cs, bytes(8 * cs))
h.zero(1000, 20 * cs + 123, nbd.CMD_FLAG_FUA)
put(m, 20 * cs + 123, bytes(1000))
h.zero(3 * cs, 30 * cs, nbd.CMD_FLAG_NO_HOLE)
put(m, 30 * cs, bytes(3 * cs))
# Chunks 8..15 are copied out now: a fast zero there is up to the plugin.
if fast:
    h.zero(cs, 9 * cs, nbd.CMD_FLAG_FAST_ZERO)
else:
    expect_error("ENOTSUP", h.zero, cs, 9 * cs, nbd.CMD_FLAG_FAST_ZERO)
    h.zero(cs, 9 * cs)
put(m, 9 * cs, bytes(cs))
# A big zero over data and the hole.
h.zero(300 * 1024, 400 * 1024)
put(m, 400 * 1024, bytes(300 * 1024))
h.flush()
EOF
    check origin origin.model
    check s take.model
    # Trim: the snapshot keeps the old data; the origin's trimmed ranges
    # read back as anything (the file plugin punches holes: zeros).
    run_py origin <<'EOF'
cs = 4096
h.trim(4 * cs, 40 * cs)
h.trim(100, 50 * cs + 7)
h.flush()
EOF
    check s take.model
    rm -f out.img
    nbdcopy "$(uri origin)" out.img
    python3 -c '
cs = 4096
a = bytearray(open("out.img", "rb").read())
b = bytearray(open("origin.model", "rb").read())
for off, n in ((40 * cs, 4 * cs), (50 * cs + 7, 100)):
    a[off:off + n] = bytes(n)
    b[off:off + n] = bytes(n)
assert a == b, "origin changed outside the trimmed ranges"
'
    stop
    serve file "$tmp/origin.img" snapshot=s=$tmp/s.cow
    check s take.model
    stop
done
