#!/usr/bin/env bash
# Merge interop with the real kernel (reference §1.10, §4.9):
#  1. The filter merges COW files that the kernel made
#     (tests/fixtures/kernel: small8, multi16, chunk128, area-boundary1).
#     The origin is regenerated as it was after the kernel's write job;
#     after the filter's merge (snapshot-merge-exit=true, exit 0) its
#     sha256 is the fixture's snap_sha256 (the kernel's snapshot view),
#     nbdsnap sees 0 exceptions and status 2cs/<total> 2cs, and for small8
#     the merged COW file is byte for byte the kernel's own merge result
#     (merged8.cow).
#  2. The kernel ($KDM merge, the snapshot-merge target under qemu) merges
#     COW files that the filter made (chunk 8 over two areas, chunk 1 over
#     five): the origin becomes the filter's snapshot view; the same inputs
#     merged by the filter give the same origin and the same COW bytes.
#     This part is skipped when kdm is not set up.
source "$srcdir/functions.sh"
set -e
set -x

requires nbdkit --version
requires nbdcopy --version
requires nbdsh --version
requires python3 --version
requires xz --version
requires sha256sum --version
requires timeout --version
requires test -r "$FILTER"
unset LIBNBD_DEBUG

fx=$srcdir/fixtures/kernel
enter_tmpdir

sha () { sha256sum < "$1" | cut -d' ' -f1; }
info () { "$NBDSNAP" info --json "$1" | json_field "$2"; }

# filter_merge ORIGIN COW: merge COW into ORIGIN with the filter, in the
# foreground, until it exits by itself with status 0.
filter_merge () {
    local rc=0
    rm -f "$tmp/sock"
    timeout 60 nbdkit -f -v -U "$tmp/sock" --filter="$FILTER" file "$1" \
        snapshot=m="$2" snapshot-merge=m snapshot-merge-exit=true \
        2> "$tmp/merge.log" || rc=$?
    if [ $rc -ne 0 ]; then
        tail -30 "$tmp/merge.log"
        echo "filter merge of $2 into $1 exited with $rc"
        return 1
    fi
    grep -q 'merge of m complete' "$tmp/merge.log"
}

# check_merged COW CHUNK_SECTORS: no exceptions left, status 2cs/total 2cs.
check_merged () {
    [ -x "$NBDSNAP" ] || return 0
    "$NBDSNAP" info "$1"
    [ "$(info "$1" exceptions)" = 0 ]
    [ "$(info "$1" valid)" = true ]
    [ "$(info "$1" chunk_sectors)" = "$2" ]
    [ "$(info "$1" status)" = "$((2 * $2))/$(info "$1" total_sectors) $((2 * $2))" ]
    "$NBDSNAP" check "$1"
}

# ---------------------------------------------------------------- part 1
for name in small8 multi16 chunk128 area-boundary1; do
    expect=$fx/$name.expect
    get () { sed -n "s/^$1=//p" "$expect"; }
    [ "$(get valid)" = 1 ]
    size=$(get origin_size_bytes)
    chunk=$(get chunk_sectors)
    python3 "$fx/gen-origin.py" "$size" --apply "$fx/$name.script" --kind origin \
        > $name.origin
    [ "$(sha $name.origin)" = "$(get origin_sha256)" ]
    xz -dc "$fx/$name.cow.xz" > $name.cow
    [ "$(stat -c %s $name.cow)" = "$(get cow_size_bytes)" ]

    SECONDS=0
    filter_merge $name.origin $name.cow
    echo "$name: filter merge took $SECONDS s"
    [ "$(sha $name.origin)" = "$(get snap_sha256)" ]
    check_merged $name.cow "$chunk"
done

# small8 merged by the kernel is merged8: the same bytes.
xz -dc "$fx/merged8.cow.xz" > merged8.cow
if ! cmp small8.cow merged8.cow; then
    echo "small8 merged by the filter differs from the kernel's merged8.cow:"
    cmp -l small8.cow merged8.cow | head -40
    exit 1
fi
# And merged8's origin is small8's snapshot view.
[ "$(sha small8.origin)" = "$(sed -n 's/^origin_sha256=//p' "$fx/merged8.expect")" ]

# ---------------------------------------------------------------- part 2
kdm_ok=yes
if [ ! -x "$KDM" ] || ! qemu-system-x86_64 --version >/dev/null 2>&1 ||
   ! ls "${KDM_WORK:-${XDG_CACHE_HOME:-$HOME/.cache}/kdm}"/kroot/boot/vmlinuz-* \
       >/dev/null 2>&1; then
    kdm_ok=no
fi
if [ $kdm_ok = no ]; then
    echo "$0: kdm is not set up: the kernel-merges-filter part is skipped"
    exit 0
fi

# A filter-made COW: NAME CHUNK_BYTES SNAPSHOT_WRITES ORIGIN_WRITES.
make_filter_cow () {
    local name=$1 cs=$2 nsnap=$3 norig=$4
    python3 "$fx/gen-origin.py" $((2 << 20)) > $name.origin
    rm -f $name.cow
    nbdkit -U - --filter="$FILTER" file $name.origin snapshot=s=$name.cow \
        snapshot-chunk-size=$cs --run '
      python3 - "$unixsocket" '$cs' '$nsnap' '$norig' <<"PY"
import nbd, random, sys
sock, cs, nsnap, norig = sys.argv[1], *map(int, sys.argv[2:])
h = nbd.NBD(); h.connect_uri("nbd+unix:///s?socket=" + sock)
o = nbd.NBD(); o.connect_uri("nbd+unix:///origin?socket=" + sock)
size = h.get_size()
random.seed(cs * 7 + nsnap)
for i in range(max(nsnap, norig)):
    # Origin writes copy chunks out; snapshot writes of mixed shapes;
    # some runs of consecutive chunks (one merge copy each).
    if i < norig:
        n = random.choice([1, 512, cs, 3 * cs])
        o.pwrite(random.randbytes(n), random.randrange(size - n))
    if i < nsnap:
        n = random.choice([1, 100, cs, 2 * cs + 5, 8 * cs])
        h.pwrite(random.randbytes(n), random.randrange(size - n))
h.flush(); o.flush()
PY
      nbdcopy "nbd+unix:///s?socket=$unixsocket" '$name'.view'
    [ -x "$NBDSNAP" ] && "$NBDSNAP" info $name.cow
    if cmp -s $name.origin $name.view; then echo "no change"; exit 1; fi
}

# name chunk(bytes) snapshot-writes origin-writes: chunk 8 gives two
# areas (epa 256); chunk 1 gives five (epa 32).
for spec in "k8 4096 220 80" "k1 512 90 40"; do
    set -- $spec
    name=$1; cs=$2
    make_filter_cow "$@"
    mkdir -p kernel filter
    cp $name.origin $name.cow kernel/
    cp $name.origin $name.cow filter/

    SECONDS=0
    rc=0
    KDM_TIMEOUT=120 "$KDM" merge kernel/$name.origin kernel/$name.cow $((cs / 512)) \
        > kdm-$name.log 2>&1 || rc=$?
    cat kdm-$name.log
    echo "$name: kernel merge took $SECONDS s"
    case $rc in
        0) ;;
        2|3|124) echo "$0: kdm could not run (rc $rc): test skipped"; exit 77 ;;
        *) echo "kernel merge of the filter-made $name failed"; exit 1 ;;
    esac
    cmp kernel/$name.origin $name.view
    check_merged kernel/$name.cow $((cs / 512))

    filter_merge filter/$name.origin filter/$name.cow
    cmp filter/$name.origin $name.view
    if ! cmp filter/$name.cow kernel/$name.cow; then
        echo "$name: the COW merged by the filter differs from the kernel's:"
        cmp -l filter/$name.cow kernel/$name.cow | head -40
        exit 1
    fi
done
