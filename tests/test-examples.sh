#!/usr/bin/env bash
# The README's workflows are scripts in examples/: run each one (except the
# demo, which quickstart.sh runs) with FILTER set to the built filter; each
# must exit 0 and print OK.
source "$srcdir/functions.sh"
set -e
set -x
requires qemu-img --version
requires xz --version
requires nbdcopy --version
requires nbdinfo --version
requires python3 -c 'import nbd'
[ -x "$NBDSNAP" ] || unset NBDSNAP    # lvm-cow.sh then skips nbdsnap
export FILTER
n=0
for ex in "$top_srcdir"/examples/*.sh; do
  [ "$(basename "$ex")" = demo.sh ] && continue
  start=$(date +%s.%N)
  rc=0
  out=$(bash "$ex" 2>&1) || rc=$?
  echo "$out"
  echo "$ex: exit $rc in $(echo "$(date +%s.%N) - $start" | bc 2>/dev/null || echo '?') s"
  [ $rc -eq 0 ]
  echo "$out" | grep -qx OK
  n=$((n + 1))
done
[ $n -ge 4 ]
