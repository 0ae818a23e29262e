# Shared helpers for the shell tests, in the style of nbdkit's own
# tests/functions.sh: cleanup_fn, requires, start_nbdkit, kill_nbdkit,
# absent, wait_merged.
# Source it first:  source "$srcdir/functions.sh"; set -e; set -x

# absent PATTERN FILE: fails the test if a line of FILE matches PATTERN.
# (`! grep ...` cannot: set -e ignores a command negated with `!`.)
absent () {
    if grep -q -- "$1" "$2"; then
        echo "$0: unexpected line in $2 matching $1:" >&2
        grep -- "$1" "$2" >&2
        exit 1
    fi
}

# wait_merged NAME: polls the test's `ctl status` (its control client)
# into status.out until it says "merged NAME" (up to 2 minutes); fails at
# once when the merge failed or the control socket stops answering.
wait_merged () {
    local i
    for i in $(seq 1200); do
        ctl status > status.out || { cat status.out; return 1; }
        grep -q "merged $1\$" status.out && return 0
        grep -q 'failed' status.out && { cat status.out; return 1; }
        sleep 0.1
    done
    cat status.out
    return 1
}

_cleanup_hook=()
# cleanup_fn CMD ARGS...: run CMD when the script exits, however it exits.
cleanup_fn () { _cleanup_hook[${#_cleanup_hook[@]}]="$*"; }
_run_cleanup_hooks () {
    local _status=$? _i
    set +e
    trap '' INT QUIT TERM EXIT ERR
    echo "$0: run cleanup hooks: exit code $_status"
    for (( _i = 0; _i < ${#_cleanup_hook[@]}; ++_i )); do
        eval "${_cleanup_hook[_i]}"
    done
    exit $_status
}
trap _run_cleanup_hooks INT QUIT TERM EXIT ERR

# requires CMD ARGS...: skip the test (exit 77) unless CMD succeeds.
requires () {
    ( "$@" ) </dev/null >/dev/null 2>&1 ||
        { echo "$0: '$*' failed: test skipped"; exit 77; }
}
requires_not () {
    ! ( "$@" ) </dev/null >/dev/null 2>&1 ||
        { echo "$0: '$*' succeeded: test skipped"; exit 77; }
}

# make_tmpdir: a fresh directory for the test in $tmp, removed when the
# test exits; enter_tmpdir also makes it the working directory.
make_tmpdir () {
    local base=${TMPDIR:-/tmp}
    # Sockets live in it, and a Unix socket path must fit in 108 bytes.
    [ ${#base} -le 50 ] || base=/tmp
    tmp=$(mktemp -d "$base/$(basename "$0" .sh).XXXXXX")
    cleanup_fn rm -rf "$tmp"
}
enter_tmpdir () { make_tmpdir; cd "$tmp"; }

# The filter under test must exist.
: "${FILTER:?FILTER must name nbdkit-snapshot-filter.so}"

# A process that is gone or a zombie (init here reaps late) has exited.
_pid_alive () {
    local state
    state=$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null) || return 1
    [ -n "$state" ] && [ "$state" != Z ]
}

# start_nbdkit -P PIDFILE ARGS...: nbdkit -v ARGS, in the background; waits
# for the pidfile and kills nbdkit when the test exits.
start_nbdkit () {
    if [ "$1" != "-P" ]; then echo "$0: start_nbdkit: -P PIDFILE first"; exit 1; fi
    local pidfile="$2" i
    nbdkit -v "$@"
    for i in {1..600}; do test -s "$pidfile" && break; sleep 0.1; done
    if ! test -s "$pidfile"; then
        echo "$0: start_nbdkit: PID file $pidfile was not created"; exit 1
    fi
    cleanup_fn kill_nbdkit "$(cat "$pidfile")"
}

# kill_nbdkit PID: SIGTERM, wait up to 60 s, then SIGKILL and fail.
kill_nbdkit () {
    local pid=$1 i
    kill "$pid" 2>/dev/null || return 0
    for i in {1..600}; do _pid_alive "$pid" || return 0; sleep 0.1; done
    echo "error: nbdkit pid $pid failed to respond to SIGTERM"
    kill -9 "$pid"
    cleanup_fn exit 1
}

# json_field KEY: the value of KEY in the JSON object on stdin; strings as
# they are, anything else as JSON (true, false, null, 42, [...]).
json_field () {
    python3 -c '
import json, sys
v = json.load(sys.stdin)[sys.argv[1]]
print(v if isinstance(v, str) else json.dumps(v))' "$1"
}

# make_cow FILE CHUNK_SECTORS COUNT [FILE_CHUNKS]: a persistent COW laid out
# as the kernel writes it, COUNT exceptions in allocation order: the k-th
# maps origin chunk 1000+3k to the k-th data chunk (area chunks skipped).
# The file is FILE_CHUNKS chunks long; by default just long enough for the
# last data chunk and the area that ends the list.
make_cow () {
    python3 - "$@" <<'PY'
import struct, sys
path, cs, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
cb, epa = cs * 512, cs * 512 // 16
def data_chunk(slot): return 2 + slot + slot // epa
def area_chunk(area): return 1 + area * (epa + 1)
chunks = max(area_chunk(count // epa), data_chunk(count - 1) if count else 0) + 1
if len(sys.argv) > 4: chunks = int(sys.argv[4])
img = bytearray(cb * chunks)
img[0:16] = struct.pack("<4I", 0x70416e53, 1, 1, cs)
for k in range(count):
    off = area_chunk(k // epa) * cb + (k % epa) * 16
    img[off:off + 16] = struct.pack("<QQ", 1000 + 3 * k, data_chunk(k))
open(path, "wb").write(img)
PY
}
