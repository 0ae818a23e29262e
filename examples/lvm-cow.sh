#!/usr/bin/env bash
# Workflow 4, interop and forensics: open a COW volume the Linux kernel
# wrote (here a fixture made by dm-snapshot itself, as an LVM snapshot's
# COW volume copied to a file would be) against its origin, read it, check
# it, and merge it.
set -euo pipefail
filter=${FILTER:-snapshot}
fx=$(cd "$(dirname "$0")/../tests/fixtures/kernel" && pwd)
work=$(mktemp -d); trap 'rm -rf "$work"' EXIT; cd "$work"
get() { sed -n "s/^$1=//p" "$fx/small8.expect"; }

xz -dc "$fx/small8.cow.xz" > lvm-cow.img
python3 "$fx/gen-origin.py" "$(get origin_size_bytes)" \
  --apply "$fx/small8.script" --kind origin > origin.img

nbdsnap check lvm-cow.img
nbdsnap info lvm-cow.img
nbdkit -U - --filter="$filter" file origin.img snapshot=lv=lvm-cow.img \
  --run 'nbdinfo --list "$uri" | grep description
         nbdcopy "nbd+unix:///lv?socket=$unixsocket" snapshot.img'
[ "$(sha256sum < snapshot.img | cut -d' ' -f1)" = "$(get snap_sha256)" ]

# Merge it, as lvconvert --merge would.
nbdkit -f -U "$work/merge.sock" --filter="$filter" file origin.img \
  snapshot=lv=lvm-cow.img snapshot-merge=lv snapshot-merge-exit=true
cmp origin.img snapshot.img
echo OK
