#!/usr/bin/env bash
# kill -9 under load, against a model (DESIGN.md, durability contract).
#
# nbdkit (file plugin, one P snapshot "s") runs in the background with a
# pidfile. Four writer processes (two on the origin export, two on the
# snapshot export; on each export every 4 KiB block belongs to one writer)
# send whole-block writes, some with FUA, and a flush every few writes; a
# reader checks live reads. Each block's contents are one 16-byte record
# (tag INIT/ORIG/SNAP, block number, sequence number) repeated, so every
# value names the write it came from. Writers log each write when issued
# (I) and when acknowledged (A, or AF with FUA), and each successful flush
# (F). nbdkit is SIGKILLed after a fixed delay; it is restarted on the same
# files and, per export and block, the value must be
#   - the newest write acknowledged before a successful flush or a FUA ack,
#     or any write issued after it; with none, the value observed after the
#     previous round, or any write issued this round;
# so the snapshot never shows origin data (point in time: copy-outs are
# durable before the origin changes), flushed writes are never lost, and
# nothing is torn or misplaced. Live reads during the load never show the
# other export's data. Also: nbdsnap check (if built) passes on the killed
# file, the store opens valid, and (when kdm works) the kernel reads the
# final COW as the filter does, with the same status. Two series: 4 KiB
# chunks (5 kills) and 64 KiB chunks (3 kills), each on a fresh origin and
# COW.
source "$srcdir/functions.sh"
set -e
set -o pipefail
set -x

requires python3 -c "import nbd"
requires nbdcopy --version
requires nbdinfo --version
unset LIBNBD_DEBUG
# nbdsnap is optional: without it, statuses come from the filter's export
# description and the offline checks are left out.
have_nbdsnap=false
if [ -x "$NBDSNAP" ]; then have_nbdsnap=true; fi
nbdsnap_opt () { if $have_nbdsnap; then "$NBDSNAP" "$@"; fi; }
# cow_status ORIGIN COW: the dm status line ("used/total metadata") of COW.
cow_status () {
  if $have_nbdsnap; then
    "$NBDSNAP" info --json "$2" |
      python3 -c 'import json, sys; print(json.load(sys.stdin)["status"])'
  else
    nbdkit -U - --filter="$FILTER" file "$1" snapshot=s="$2" \
      --run 'nbdinfo --list "$uri"' |
      sed -n 's/^[[:space:]]*description: snapshot s (.*): //p'
  fi
}

enter_tmpdir

blocks=8192   # a 32 MiB origin: copy-outs go on in every round

cat > mkorigin.py <<'EOF'
import struct, sys
n = int(sys.argv[1])
with open("origin.img", "wb") as f:
    for b in range(n):
        f.write(struct.pack("<4sIQ", b"INIT", b, 0) * 256)
EOF

cat > writer.py <<'EOF'
# writer.py SOCKET EXPORT WID PART SEED LOG BLOCKS: whole-block writes to
# the blocks b with b % 2 == PART until the connection fails.
import nbd, random, struct, sys
sock, export, wid, part, seed, logname, blocks = sys.argv[1:8]
wid, part, seed, blocks = int(wid), int(part), int(seed), int(blocks)
tag = b"ORIG" if export == "origin" else b"SNAP"
log = open(logname, "w", buffering=1)
rnd = random.Random(seed)
h = nbd.NBD()
h.connect_uri("nbd+unix:///%s?socket=%s" % (export, sock))
mine = [b for b in range(blocks) if b % 2 == part]
# Some hot blocks, so the same block is often rewritten.
hot = rnd.sample(mine, 16)
flush_every = rnd.randrange(1, 9)
try:
    for i in range(1, 100000):
        seq = seed * 100000 + i
        b = rnd.choice(hot) if rnd.random() < 0.3 else rnd.choice(mine)
        fua = rnd.random() < 0.1
        log.write("I %d %d\n" % (b, seq))
        h.pwrite(struct.pack("<4sIQ", tag, b, seq) * 256, b * 4096,
                 nbd.CMD_FLAG_FUA if fua else 0)
        log.write("%s %d %d\n" % ("AF" if fua else "A", b, seq))
        if i % flush_every == 0:
            h.flush()
            log.write("F\n")
except nbd.Error as e:
    log.write("E %s\n" % e)
EOF

cat > reader.py <<'EOF'
# reader.py SOCKET LOG BLOCKS: live reads; the snapshot never shows origin
# data, the origin never shows snapshot data, no block shows another one.
import nbd, random, struct, sys
sock, logname, blocks = sys.argv[1], sys.argv[2], int(sys.argv[3])
log = open(logname, "w", buffering=1)
bad = {"origin": b"SNAP", "s": b"ORIG"}
hs = {}
for e in bad:
    hs[e] = nbd.NBD()
    hs[e].connect_uri("nbd+unix:///%s?socket=%s" % (e, sock))
rnd = random.Random(1)
n = 0
try:
    while True:
        e = rnd.choice(list(bad))
        b = rnd.randrange(blocks - 4)
        data = hs[e].pread(4 * 4096, b * 4096)
        # A read racing a write of the same block may mix old and new
        # records, but never shows the other export's tag or another block.
        for r in range(0, len(data), 16):
            t, bb = struct.unpack_from("<4sI", data, r)
            if t == bad[e] or bb != b + r // 4096:
                log.write("VIOLATION %s block %d: %r\n" %
                          (e, b + r // 4096, data[r:r + 32]))
                sys.exit(1)
        n += 1
except nbd.Error as e:
    log.write("E %s\n" % e)
log.write("reads %d\n" % n)
EOF

cat > check.py <<'EOF'
# check.py ROUND BLOCKS: the views after restart against the writers' logs
# and state.json (the values observed after the previous round).
import json, os, struct, sys
rnd, blocks = int(sys.argv[1]), int(sys.argv[2])
init = lambda b: ["INIT", b, 0]
state = (json.load(open("state.json")) if os.path.exists("state.json") else
         {"origin": [init(b) for b in range(blocks)],
          "s": [init(b) for b in range(blocks)]})
for line in open("reader-%d.log" % rnd):
    assert not line.startswith("VIOLATION"), "live read: " + line
fails = []
stats = {}
for export, image, tag in (("origin", "view-origin.img", "ORIG"),
                           ("s", "view-snap.img", "SNAP")):
    data = open(image, "rb").read()
    assert len(data) == blocks * 4096
    # Per block: the newest durable write, and the writes issued after it.
    durable, since, issued = {}, {}, {}
    for part in (0, 1):
        acked = {}          # block -> seq acknowledged, not yet flushed
        for line in open("w-%d-%s-%d.log" % (rnd, export, part)):
            w = line.split()
            if w[0] == "I":
                b, seq = int(w[1]), int(w[2])
                since.setdefault(b, []).append(seq)
                issued[b] = issued.get(b, 0) + 1
            elif w[0] in ("A", "AF"):
                acked[int(w[1])] = int(w[2])
            if w[0] in ("F", "AF"):
                for b, seq in acked.items():
                    durable[b] = seq
                    since[b] = since[b][since[b].index(seq):]
                acked = {}
    n_new = n_durable = 0
    for b in range(blocks):
        blk = data[b * 4096:(b + 1) * 4096]
        t, bb, seq = struct.unpack("<4sIQ", blk[:16])
        got = [t.decode(errors="replace"), bb, seq]
        if blk != blk[:16] * 256:
            fails.append("%s block %d is torn: %r" % (export, b, blk[:48]))
            continue
        allowed = [[tag, b, s] for s in since.get(b, [])]
        if b not in durable:
            allowed.append(state[export][b])
        if got not in allowed:
            why = ("the newest flushed write is %d" % durable[b]
                   if b in durable else "was %r" % (state[export][b],))
            if export == "s" and t == b"ORIG":
                why = "ORIGIN DATA IN THE SNAPSHOT; " + why
            fails.append("%s block %d holds %r; allowed %r (%s)" %
                         (export, b, got, allowed[:6], why))
        n_new += got != state[export][b]
        n_durable += b in durable
        state[export][b] = got
    stats[export] = "%d writes, %d blocks with a durable write, %d changed" % (
        sum(issued.values()), n_durable, n_new)
for f in fails[:40]:
    print("FAIL:", f)
assert not fails, "%d blocks break the model" % len(fails)
json.dump(state, open("state.json", "w"))
print("round %d ok: origin: %s; snapshot: %s" % (rnd, stats["origin"], stats["s"]))
EOF

# Does the kdm kernel work? Then it reads each series' final COW too.
kdm_ok=false
if [ -x "$KDM" ] && command -v qemu-system-x86_64 > /dev/null; then
  truncate -s 1M probe-origin.img
  printf 'SnAp\001\000\000\000\001\000\000\000\010\000\000\000' > probe.cow
  truncate -s 8192 probe.cow
  if "$KDM" status probe-origin.img probe.cow 8 > probe.log 2>&1 &&
     grep -q '^KDM-STATUS: kdm-snap: .* 16/16 16$' probe.log; then
    kdm_ok=true
  fi
fi

pid_alive () {
  local state
  state=$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null) || return 1
  [ -n "$state" ] && [ "$state" != Z ]
}

round=0
series () {
  local chunk=$1; shift
  rm -f origin.img s.cow state.json
  python3 mkorigin.py $blocks
  local delay pid w
  for delay in "$@"; do
    round=$((round + 1))
    rm -f sock nbdkit.pid
    start_nbdkit -P "$tmp/nbdkit.pid" -U "$tmp/sock" --filter="$FILTER" \
      file "$tmp/origin.img" snapshot=s="$tmp/s.cow" snapshot-chunk-size=$chunk \
      2> nbdkit-$round.log
    pid=$(cat nbdkit.pid)
    local writers=()
    python3 writer.py "$tmp/sock" origin 1 0 $((round * 10 + 1)) w-$round-origin-0.log $blocks &
    writers+=($!)
    python3 writer.py "$tmp/sock" origin 2 1 $((round * 10 + 2)) w-$round-origin-1.log $blocks &
    writers+=($!)
    python3 writer.py "$tmp/sock" s 3 0 $((round * 10 + 3)) w-$round-s-0.log $blocks &
    writers+=($!)
    python3 writer.py "$tmp/sock" s 4 1 $((round * 10 + 4)) w-$round-s-1.log $blocks &
    writers+=($!)
    python3 reader.py "$tmp/sock" reader-$round.log $blocks &
    writers+=($!)
    sleep "$delay"
    kill -9 "$pid"
    for w in "${writers[@]}"; do wait "$w" || true; done
    for i in {1..100}; do pid_alive "$pid" || break; sleep 0.1; done
    if pid_alive "$pid"; then echo "$0: nbdkit $pid survived kill -9"; exit 1; fi
    tail -n 3 nbdkit-$round.log
    grep -c '^A' w-$round-*.log || true
    tail -n 1 w-$round-*.log reader-$round.log

    # The killed store is consistent on disk, and opens again.
    nbdsnap_opt check s.cow
    nbdsnap_opt info s.cow
    rm -f sock
    nbdkit -U - --filter="$FILTER" file origin.img snapshot=s=s.cow \
      --run '
        set -e
        nbdinfo --list "$uri" > list-'$round'.txt
        nbdcopy "nbd+unix:///s?socket=$unixsocket" view-snap.img
        nbdcopy "nbd+unix:///origin?socket=$unixsocket" view-origin.img'
    grep 'description: snapshot s' list-$round.txt
    if grep -q 'description: snapshot s .*: \(Invalid\|Overflow\|Merge failed\)$' list-$round.txt; then
      echo "$0: round $round: the snapshot is not usable after the kill"; exit 1
    fi
    cmp view-origin.img origin.img
    python3 check.py $round $blocks
  done
  nbdsnap_opt check s.cow
  if $kdm_ok; then
    # The kernel reads the crashed-and-reopened COW as the filter does,
    # with the same status as nbdsnap.
    "$KDM" read origin.img s.cow $((chunk / 512)) kernel-view.img | tee kdm.log
    cmp kernel-view.img view-snap.img
    [ "$(sed -n 's/^KDM-STATUS: kdm-snap: [0-9]* [0-9]* snapshot //p' kdm.log)" = \
      "$(cow_status origin.img s.cow)" ]
  fi
}

series 4096 0.4 0.9 1.5 0.2 2.3
series 65536 0.6 1.2 0.3
$kdm_ok || echo "$0: kdm not set up: the kernel read of the final COW was skipped"
