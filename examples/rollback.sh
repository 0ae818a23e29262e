#!/usr/bin/env bash
# Workflow 3, rollback: snapshot before an upgrade; when the upgrade goes
# wrong, merge the snapshot back and the disk is as it was.
set -euo pipefail
filter=${FILTER:-snapshot}
work=$(mktemp -d); trap 'rm -rf "$work"' EXIT; cd "$work"
head -c 16M /dev/urandom > disk.img
before=$(sha256sum < disk.img)

# Run with a snapshot taken at start; the "upgrade" writes the origin.
nbdkit -U - --filter="$filter" file disk.img snapshot=before=before.cow \
  snapshot-export=origin --run '
  nbdsh -u "$uri" -c "
for i in range(64):
    h.pwrite(b\"broken upgrade\" * 4096, i * 262144)
h.flush()"'
[ "$(sha256sum < disk.img)" != "$before" ]

# Roll back: merge the snapshot into the origin, exit when it is done.
nbdkit -f -U "$work/merge.sock" --filter="$filter" file disk.img \
  snapshot=before=before.cow snapshot-merge=before snapshot-merge-exit=true
[ "$(sha256sum < disk.img)" = "$before" ]
echo OK
