#!/usr/bin/env bash
# Workflow 1, a persistent overlay: serve a golden image writable, keep the
# changes in a file across restarts, then throw them away or commit them.
set -euo pipefail
filter=${FILTER:-snapshot}
work=$(mktemp -d); trap 'rm -rf "$work"' EXIT; cd "$work"
qemu-img create -q -f raw golden.img 16M
golden=$(sha256sum < golden.img)

# Serve golden.img with the changes kept in changes.cow.
nbdkit -U - --filter="$filter" file golden.img snapshot=changes.cow \
  --run 'nbdsh -u "$uri" -c "h.pwrite(b\"changed\" * 100, 4096); h.flush()"'
# After a restart the changes are still there, and golden.img is untouched.
nbdkit -U - --filter="$filter" file golden.img snapshot=changes.cow \
  --run 'nbdsh -u "$uri" -c "assert h.pread(7, 4096) == b\"changed\""'
[ "$(sha256sum < golden.img)" = "$golden" ]

# Throw the changes away: remove the file. (Kept here for the commit below.)
cp changes.cow discard.cow && rm discard.cow

# Commit them into golden.img: merge, in the foreground, exit when done.
nbdkit -f -U "$work/merge.sock" --filter="$filter" file golden.img \
  snapshot=changes.cow snapshot-merge=changes snapshot-merge-exit=true
python3 -c "
d = open('golden.img', 'rb').read()
assert d[4096:4096 + 700] == b'changed' * 100"
echo OK
