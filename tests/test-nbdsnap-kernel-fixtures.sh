#!/usr/bin/env bash
# nbdsnap agrees with the real kernel on COW files the kernel made
# (tests/fixtures/kernel: status after a reload, exception counts).
source "$srcdir/functions.sh"
set -e
set -x
requires test -x "$NBDSNAP"
requires xz --version
tmp=$(mktemp -d)
cleanup_fn rm -rf "$tmp"
fixtures=$srcdir/fixtures/kernel
n=0
for expect in "$fixtures"/*.expect; do
  name=$(basename "$expect" .expect)
  get() { sed -n "s/^$1=//p" "$expect"; }
  xz -dc "$fixtures/$name.cow.xz" > "$tmp/$name.cow"
  "$NBDSNAP" info --json "$tmp/$name.cow" > "$tmp/info.json"
  status=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["status"])' "$tmp/info.json")
  [ "$status" = "$(get status_reload)" ]
  if [ "$(get valid)" = 1 ]; then
    exc=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["exceptions"])' "$tmp/info.json")
    [ "$exc" = "$(get exceptions)" ]
    "$NBDSNAP" check "$tmp/$name.cow"
    [ "$("$NBDSNAP" dump "$tmp/$name.cow" | grep -c '^area')" = "$(get exceptions)" ]
  fi
  n=$((n + 1))
done
[ $n -ge 5 ]
