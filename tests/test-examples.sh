#!/usr/bin/env bash
# The README's workflows are scripts in examples/: run each one.
source "$srcdir/functions.sh"
set -e
set -x
requires qemu-img --version
requires xz --version
requires test -x "$NBDSNAP"
for ex in persistent-overlay live-backup rollback lvm-cow; do
  out=$(FILTER="$FILTER" bash "$top_srcdir/examples/$ex.sh" 2>&1) || {
    echo "$out"; echo "$ex failed"; exit 1; }
  echo "$out"
  echo "$out" | tail -1 | grep -qx OK
done
