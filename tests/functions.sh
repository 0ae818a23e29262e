# Shared helpers for the shell tests, in the style of nbdkit's own
# tests/functions.sh: cleanup_fn, requires, start_nbdkit, kill_nbdkit.
# Source it first:  source "$srcdir/functions.sh"; set -e; set -x

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
