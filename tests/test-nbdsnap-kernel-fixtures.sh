#!/usr/bin/env bash
# nbdsnap agrees with the real kernel on COW files the kernel made
# (tests/fixtures/kernel, see its README.md): for each NAME.cow.xz and its
# NAME.expect, info's status is the one dmsetup printed after a reload,
# and the chunk size, exception and area counts are the kernel's; check
# passes and dump lists every record. The invalid fixture reads as Invalid.
source "$srcdir/functions.sh"
set -e
set -x
requires test -x "$NBDSNAP"
requires xz --version
requires python3 --version
fixtures=$srcdir/fixtures/kernel
if ! ls "$fixtures"/*.expect >/dev/null 2>&1; then
    echo "$0: no kernel fixtures in $fixtures: test skipped"
    exit 77
fi
make_tmpdir

n=0
for expect in "$fixtures"/*.expect; do
    name=$(basename "$expect" .expect)
    get () { sed -n "s/^$1=//p" "$expect"; }
    cow=$tmp/$name.cow
    xz -dc "$fixtures/$name.cow.xz" > "$cow"
    [ "$(stat -c %s "$cow")" = "$(get cow_size_bytes)" ]

    "$NBDSNAP" info --json "$cow" > "$tmp/info.json"
    cat "$tmp/info.json"
    [ "$(json_field status < "$tmp/info.json")" = "$(get status_reload)" ]
    [ "$(json_field chunk_sectors < "$tmp/info.json")" = "$(get chunk_sectors)" ]
    [ "$(json_field file_size < "$tmp/info.json")" = "$(get cow_size_bytes)" ]
    "$NBDSNAP" check "$cow"
    if [ "$(get valid)" = 1 ]; then
        [ "$(json_field valid < "$tmp/info.json")" = true ]
        [ "$(json_field exceptions < "$tmp/info.json")" = "$(get exceptions)" ]
        [ "$(json_field areas < "$tmp/info.json")" = "$(get areas_used)" ]
        [ "$(json_field metadata_sectors < "$tmp/info.json")" = "$(get metadata_sectors)" ]
        "$NBDSNAP" check "$cow" | grep -Fx "$cow: clean, $(get exceptions) exceptions in $(get areas_used) areas"
        [ "$("$NBDSNAP" dump "$cow" | grep -c '^area ' || :)" = "$(get exceptions)" ]
    else
        [ "$(json_field valid < "$tmp/info.json")" = false ]
        [ "$(json_field status < "$tmp/info.json")" = Invalid ]
        "$NBDSNAP" check "$cow" | grep -q 'clean, marked Invalid'
    fi
    n=$((n + 1))
done
echo "$0: $n fixtures agree"
