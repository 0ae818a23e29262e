#!/usr/bin/env bash
# The filter serves COW files that the real kernel made
# (tests/fixtures/kernel, see its README.md); no qemu needed.
#
# For every fixture NAME.expect:
#  * the origin is regenerated with gen-origin.py (post-job origin: origin0
#    plus the script's origin writes; for merged8, small8's snapshot view)
#    and must hash to origin_sha256 (checks the regeneration itself);
#  * valid=1: the snapshot export's sha256 equals snap_sha256 (what the
#    kernel read back), the origin export equals the origin, the status in
#    the export description equals status_reload (what a fresh kernel table
#    load of the same files reports), and a merge by the filter leaves the
#    origin equal to the kernel's snapshot view (for small8: the COW bytes
#    equal merged8, the kernel's own merge);
#  * valid=0: the filter still starts, the description says Invalid, every
#    snapshot read fails with EIO and the origin export is served unchanged.
source "$srcdir/functions.sh"
set -e
set -o pipefail
set -x

requires xz --version
requires python3 --version
requires nbdcopy --version
requires nbdinfo --version
requires nbdsh --version
unset LIBNBD_DEBUG

fx=$srcdir/fixtures/kernel
make_tmpdir

sha () { sha256sum < "$1" | cut -d' ' -f1; }

count=0
for expect in "$fx"/*.expect; do
  name=$(basename "$expect" .expect)
  get () { sed -n "s/^$1=//p" "$expect"; }
  size=$(get origin_size_bytes)
  valid=$(get valid)
  chunk=$(get chunk_sectors)
  d=$tmp/$name
  mkdir "$d"
  xz -dc "$fx/$name.cow.xz" > "$d/cow"
  [ "$(stat -c %s "$d/cow")" = "$(get cow_size_bytes)" ]
  cp "$d/cow" "$d/cow.orig"
  from=$(get merged_from)
  if [ -n "$from" ]; then
    # The kernel merged $from: the origin after the job is $from's
    # snapshot view.
    python3 "$fx/gen-origin.py" "$size" --apply "$fx/$from.script" --kind snap > "$d/origin"
  else
    python3 "$fx/gen-origin.py" "$size" --apply "$fx/$name.script" --kind origin > "$d/origin"
  fi
  [ "$(sha "$d/origin")" = "$(get origin_sha256)" ]
  cp "$d/origin" "$d/origin.orig"

  # --run: nbdkit stops when the command is done.
  nbdkit -U - --filter="$FILTER" file "$d/origin" snapshot=s="$d/cow" \
    --run '
      nbdinfo --list "$uri" > '"$d/list"'
      nbdcopy "nbd+unix:///origin?socket=$unixsocket" '"$d/origin-view"'
      nbdcopy "nbd+unix:///s?socket=$unixsocket" '"$d/snap-view"' ||
        echo "$?" > '"$d/snap-rc"'
      nbdsh -u "nbd+unix:///s?socket=$unixsocket" -c "
import errno
try:
    h.pread(4096, 0)
    print(\"read ok\")
except nbd.Error as e:
    print(\"read error\", e.errno)
" > '"$d/pread"
  cat "$d/list"
  desc=$(sed -n 's/^[[:space:]]*description: snapshot s (.*): //p' "$d/list")
  cmp "$d/origin-view" "$d/origin.orig"
  # The filter's chunk size is the header's.
  grep -q "chunk $((chunk * 512))):" "$d/list"

  if [ "$valid" = 1 ]; then
    [ ! -e "$d/snap-rc" ]
    [ "$(sha "$d/snap-view")" = "$(get snap_sha256)" ]
    [ "$desc" = "$(get status_reload)" ]
    grep -qx 'read ok' "$d/pread"
    # Serving it changed nothing in either file.
    cmp "$d/cow" "$d/cow.orig"
    cmp "$d/origin" "$d/origin.orig"

    # Merge with the filter: the origin becomes the kernel's view.
    nbdkit -f -U "$tmp/m.sock" --filter="$FILTER" file "$d/origin" \
      snapshot=s="$d/cow" snapshot-merge=s snapshot-merge-exit=true
    rm -f "$tmp/m.sock"
    [ "$(sha "$d/origin")" = "$(get snap_sha256)" ]
    if [ "$name" = small8 ]; then
      xz -dc "$fx/merged8.cow.xz" > "$d/merged8.cow"
      cmp "$d/cow" "$d/merged8.cow"
    fi
  else
    [ "$desc" = Invalid ]
    [ -e "$d/snap-rc" ]
    grep -qxE 'read error (EIO|5)' "$d/pread"
  fi
  count=$((count + 1))
done
[ "$count" -ge 9 ]
echo "$0: $count kernel fixtures checked"
