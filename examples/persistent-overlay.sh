#!/usr/bin/env bash
# Workflow 1, a persistent overlay (what qcow2 backing files are used for):
# serve a golden image writable with the changes kept in a COW file across
# restarts; throw the changes away (rm), or commit them into the image
# (merge).
set -euo pipefail
filter=${FILTER:-snapshot}
work=$(mktemp -d); trap 'rm -rf "$work"' EXIT; cd "$work"
qemu-img create -q -f raw golden.img 16M
python3 -c "open('golden.img', 'r+b').write(b'golden image ' * 5000)"
golden=$(sha256sum < golden.img)

# Serve golden.img writable; the changes go to changes.cow.
nbdkit -U - --filter="$filter" file golden.img snapshot=changes.cow \
  --run 'nbdsh -u "$uri" -c "h.pwrite(b\"changed\" * 1000, 65536); h.flush()"'
# After a restart the changes are still there; golden.img is untouched.
nbdkit -U - --filter="$filter" file golden.img snapshot=changes.cow \
  --run 'nbdsh -u "$uri" -c "assert h.pread(7000, 65536) == b\"changed\" * 1000"'
[ "$(sha256sum < golden.img)" = "$golden" ]

# Throw the changes away: remove the file. The next run starts afresh.
rm changes.cow
nbdkit -U - --filter="$filter" file golden.img snapshot=changes.cow \
  --run 'nbdcopy "$uri" view.img
         nbdsh -u "$uri" -c "h.pwrite(b\"kept\" * 2000, 1 << 20); h.flush()"
         nbdcopy "$uri" overlay.img'
[ "$(sha256sum < view.img)" = "$golden" ]
[ "$(sha256sum < golden.img)" = "$golden" ]

# Commit them into golden.img: merge, in the foreground (-f), and exit when
# the merge is done (exit status 0; 1 if it fails).
nbdkit -f -U "$work/merge.sock" --filter="$filter" file golden.img \
  snapshot=changes.cow snapshot-merge=changes snapshot-merge-exit=true
cmp golden.img overlay.img          # golden.img now has the changes
echo OK
