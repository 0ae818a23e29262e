#!/usr/bin/env bash
# The filter serves COW files the real kernel made (tests/fixtures/kernel):
# each valid snapshot reads back exactly as the kernel read it, and merging
# it with the filter gives the origin the kernel's view (for small8, the
# same COW bytes the kernel's own merge left: merged8).
source "$srcdir/functions.sh"
set -e
set -x
requires xz --version
requires nbdcopy --version
tmp=$(mktemp -d)
cleanup_fn rm -rf "$tmp"
fx=$srcdir/fixtures/kernel
for name in small8 multi16 chunk128 area-boundary1 area-exact1 fresh8 po8; do
  get() { sed -n "s/^$1=//p" "$fx/$name.expect"; }
  size=$(get origin_size_bytes)
  xz -dc "$fx/$name.cow.xz" > "$tmp/$name.cow"
  python3 "$fx/gen-origin.py" "$size" --apply "$fx/$name.script" --kind origin > "$tmp/$name.origin"
  [ "$(sha256sum < "$tmp/$name.origin" | cut -d' ' -f1)" = "$(get origin_sha256)" ]
  nbdkit -U - --filter="$FILTER" file "$tmp/$name.origin" snapshot=s="$tmp/$name.cow" \
    --run 'nbdcopy "nbd+unix:///s?socket=$unixsocket" '"$tmp/$name.view"
  want=$(get snap_sha256)
  if [ "$name" = po8 ]; then
    # The kernel kept the chunks of the write that overflowed; its view
    # after a reload is origin0 with chunks 64..75 = 0x22 (po8.expect).
    python3 - "$fx/gen-origin.py" "$size" "$tmp/po8.want" <<'PY'
import subprocess, sys
b = bytearray(subprocess.run([sys.executable, sys.argv[1], sys.argv[2]],
                             check=True, capture_output=True).stdout)
b[262144:311296] = b"\x22" * (311296 - 262144)
open(sys.argv[3], "wb").write(b)
PY
    want=$(sha256sum < "$tmp/po8.want" | cut -d' ' -f1)
  fi
  [ "$(sha256sum < "$tmp/$name.view" | cut -d' ' -f1)" = "$want" ]
  # Merge with the filter: the origin becomes the snapshot view.
  rm -f "$tmp/m.sock"
  nbdkit -f -U "$tmp/m.sock" --filter="$FILTER" file "$tmp/$name.origin" \
    snapshot=s="$tmp/$name.cow" snapshot-merge=s snapshot-merge-exit=true
  cmp "$tmp/$name.origin" "$tmp/$name.view"
  if [ "$name" = small8 ]; then
    xz -dc "$fx/merged8.cow.xz" > "$tmp/merged8.cow"
    cmp "$tmp/small8.cow" "$tmp/merged8.cow"
  fi
done
