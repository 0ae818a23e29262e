#!/usr/bin/env bash
# Every man page source is valid POD without warnings, and has no line
# over 76 columns (verbatim blocks included) and no trailing whitespace.
source "$srcdir/functions.sh"
set -e
set -x
requires command -v podchecker
out=$(mktemp)
cleanup_fn rm -f "$out"
n=0
for pod in "$top_srcdir"/man/*.pod; do
    podchecker -warnings "$pod" > "$out" 2>&1 || { cat "$out"; exit 1; }
    cat "$out"
    if grep -q 'WARNING' "$out"; then exit 1; fi
    awk 'length($0) > 76 { print FILENAME ":" FNR ": over 76 columns"; bad = 1 }
         END { exit bad }' "$pod"
    if grep -n '[[:space:]]$' "$pod"; then
        echo "$pod: trailing whitespace"; exit 1
    fi
    n=$((n + 1))
done
[ $n -gt 0 ]
