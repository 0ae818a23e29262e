#!/usr/bin/env bash
# nbdsnap's command line: help, per-command help, usage errors (exit 2, one
# line on stderr), and -c without a server (exit 3).
source "$srcdir/functions.sh"
set -e
set -x
requires test -x "$NBDSNAP"
enter_tmpdir

# The general help, three ways: every command listed, exit 0, stdout only.
for h in --help -h help; do
    "$NBDSNAP" $h > help.txt 2> err
    [ ! -s err ]
    for cmd in create info check dump help status list take drop merge; do
        grep -Eq "^  $cmd( |$)" help.txt
    done
done

# Each command's help, two ways, the same text.
for cmd in create info check dump; do
    "$NBDSNAP" $cmd --help > a.txt
    "$NBDSNAP" help $cmd > b.txt
    "$NBDSNAP" $cmd -h > c.txt
    cmp a.txt b.txt
    cmp a.txt c.txt
    grep -q "^  nbdsnap $cmd .*FILE$" a.txt
    grep -q -- '--help' a.txt
done
if grep -q -- '--chunk-size' a.txt; then exit 1; fi  # dump's help
"$NBDSNAP" create --help | grep -q -- '--chunk-size=SIZE'
"$NBDSNAP" create --help | grep -q -- '--store=TYPE'
"$NBDSNAP" create --help | grep -q -- '--force'
"$NBDSNAP" info --help | grep -q -- '--json'
"$NBDSNAP" -c sock take --help | grep -q '^  nbdsnap -c sock take .*NAME FILE$'
# help COMMAND for the live commands too, and for help itself.
for cmd in status list take drop merge; do
    "$NBDSNAP" -c SOCKET $cmd --help > a.txt
    "$NBDSNAP" help $cmd > b.txt 2> err
    [ ! -s err ]
    cmp a.txt b.txt
    grep -q "^  nbdsnap -c SOCKET $cmd" b.txt
done
"$NBDSNAP" help take | grep -q -- '--chunk-size=SIZE'
"$NBDSNAP" help merge | grep -q -- '--wait'
"$NBDSNAP" help help > b.txt
"$NBDSNAP" --help > a.txt
cmp a.txt b.txt

# Usage errors: exit 2, nothing on stdout, one line on stderr.
usage_error () {
    local rc=0
    "$NBDSNAP" "$@" > out 2> err || rc=$?
    cat err
    [ $rc -eq 2 ]
    [ ! -s out ]
    [ "$(wc -l < err)" -eq 1 ]
    grep -q '^nbdsnap: .*(see nbdsnap.* --help)$' err
}
usage_error
usage_error bogus
usage_error help bogus
usage_error help create info
usage_error --help extra
usage_error -c
usage_error -c sock
usage_error -c sock bogus
usage_error -c sock take onlyname
usage_error -c sock status extra
usage_error status
grep -q "'status' is a live command: nbdsnap -c SOCKET status" err
usage_error help status extra
usage_error -c sock status --wait
usage_error -c sock take "a b" f.cow
usage_error -c sock take a $'f\ndrop a'
# take's option values, checked as create's are, before any connection.
usage_error -c sock take a f.cow --chunk-size 3k
grep -q 'not a power of two' err
usage_error -c sock take a f.cow --chunk-size 64k --store Q
grep -q 'P, PO or N' err
usage_error -c sock take a f.cow --chunk-size $'64k\ndrop a'
grep -Fq "'64k\\ndrop a' contains a control character" err
usage_error -c sock take a f.cow --chunk-size 64k --store $'P\r'
usage_error create --chunk-size $'4k\n' f.cow
[ ! -e f.cow ]

# -c to a socket nobody listens on: exit 3, and what to check; -cSOCKET,
# --control SOCKET and --control=SOCKET are the same.
for c in "-c $tmp/none.sock" "-c$tmp/none.sock" "--control $tmp/none.sock" \
         "--control=$tmp/none.sock"; do
    rc=0; "$NBDSNAP" $c status 2> err || rc=$?
    cat err
    [ $rc -eq 3 ]
    grep -q "^nbdsnap: cannot reach $tmp/none.sock: .*snapshot-control=" err
done
usage_error --control=
usage_error --control= status
usage_error --control=sock
usage_error -csock
usage_error -csock take a f.cow --chunk-size 3k
