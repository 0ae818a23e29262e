#!/usr/bin/env bash
# Workflow 3, rollback: take a snapshot before an upgrade; when the upgrade
# goes wrong, merge the snapshot back and the disk is as it was.
set -euo pipefail
filter=${FILTER:-snapshot}
work=$(mktemp -d); trap 'rm -rf "$work"' EXIT; cd "$work"
head -c 16M /dev/urandom > disk.img
before=$(sha256sum < disk.img)

# Serve the disk (the "origin" export) with a snapshot "before" taken at
# start. The "upgrade" writes all over the disk.
nbdkit -U - --filter="$filter" file disk.img snapshot=before=before.cow \
  snapshot-export=origin --run '
  nbdsh -u "$uri" -c "
for i in range(64):
    h.pwrite(b\"broken upgrade\" * 4096, i * 262144)
h.flush()"
  nbdinfo --list "$uri" | grep -E "export=|description"'
[ "$(sha256sum < disk.img)" != "$before" ]

# Roll back: merge "before" into the disk, in the foreground (-f), and exit
# when done (exit status 0; 1 if the merge fails).
nbdkit -f -U "$work/merge.sock" --filter="$filter" file disk.img \
  snapshot=before=before.cow snapshot-merge=before snapshot-merge-exit=true
[ "$(sha256sum < disk.img)" = "$before" ]
echo OK
