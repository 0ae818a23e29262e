#!/usr/bin/env bash
# Every man page source is valid POD, with no line over 76 columns outside
# verbatim blocks (nbdkit's rule).
source "$srcdir/functions.sh"
set -e
set -x
requires command -v podchecker
for pod in "$top_srcdir"/man/*.pod; do
  podchecker "$pod"
  if awk '/^[^ \t]/ && length($0) > 76 {print FILENAME": "FNR": too long"; bad=1} END {exit !bad}' "$pod"; then exit 1; fi
  if grep -n '[[:space:]]$' "$pod"; then exit 1; fi
done
