#!/usr/bin/env bash
# Workflow 4, interop and forensics: read an LVM snapshot's COW volume
# (copied to a file) against its origin, check it, and merge it, as
# `lvconvert --merge` would. The COW here was written by the Linux kernel's
# dm-snapshot (tests/fixtures/kernel/small8); its origin is regenerated.
set -euo pipefail
filter=${FILTER:-snapshot}
nbdsnap=${NBDSNAP:-nbdsnap}
fx=$(cd "$(dirname "$0")/../tests/fixtures/kernel" && pwd)
work=$(mktemp -d); trap 'rm -rf "$work"' EXIT; cd "$work"
get () { sed -n "s/^$1=//p" "$fx/small8.expect"; }

xz -dc "$fx/small8.cow.xz" > lvm-cow.img          # the COW volume
python3 "$fx/gen-origin.py" "$(get origin_size_bytes)" \
  --apply "$fx/small8.script" --kind origin > origin.img   # the origin LV
cp lvm-cow.img lvm-cow.orig

# Check and describe it offline, if nbdsnap is built.
if command -v "$nbdsnap" >/dev/null; then
  "$nbdsnap" check lvm-cow.img
  "$nbdsnap" info lvm-cow.img
fi

# Read the snapshot through the filter.
nbdkit -U - --filter="$filter" file origin.img snapshot=lv=lvm-cow.img \
  --run 'nbdinfo --list "$uri" | grep -E "export=|description"
         nbdcopy "nbd+unix:///lv?socket=$unixsocket" snapshot.img'
[ "$(sha256sum < snapshot.img | cut -d" " -f1)" = "$(get snap_sha256)" ]
cmp lvm-cow.img lvm-cow.orig                      # reading changed nothing

# Merge it into the origin, in the foreground, exit when done.
nbdkit -f -U "$work/merge.sock" --filter="$filter" file origin.img \
  snapshot=lv=lvm-cow.img snapshot-merge=lv snapshot-merge-exit=true
[ "$(sha256sum < origin.img | cut -d" " -f1)" = "$(get snap_sha256)" ]
echo OK
