// snap::SnapshotEngine under concurrency, without nbdkit, against a model.
//
// The origin is memory (tests/memory_origin.h); the snapshots are real
// persistent stores on temporary files, with 512 B, 4 KiB and 64 KiB
// chunks. Ownership keeps the model deterministic while the I/O still
// collides: the origin and each snapshot are cut into segments of random
// length (1 B .. 192 KiB, so they start and end anywhere inside chunks) and
// every segment belongs to one thread; a thread writes (or zeroes) any
// sub-range of its own segments, with its own byte values. Chunks are
// therefore shared by several threads on every device, and origin writes
// race with snapshot writes and reads of the same chunks. Values tell who
// wrote a byte: the origin at the start holds 0..63 (a hash of the
// position), origin writes use 64..127 and snapshot j writes use its own
// 42 values from 128.
//
// parallel_io: 6 threads, in 3 rounds (2 with TSan). Each round takes 3
// new snapshots of the origin as it is then (chunks from 512 B to the
// whole 4 MiB origin) and keeps the older ones, which only take copy-outs
// from then on. While it runs, every read checks the bytes its thread owns
// exactly, all of an older round's snapshot exactly, and every other byte
// by kind (a snapshot never shows origin writes or another snapshot's
// writes, the origin never shows snapshot writes, nothing moves). After
// each round every snapshot equals its take + its own writes and the
// origin equals its writes; at the end the same holds for the stores
// closed and reopened from their files.
//
// live_take: one snapshot is added while threads write the origin; it must
// show one point in time: for each thread, the origin after some prefix of
// its writes (those done before Add started, plus perhaps the one in
// flight).
//
// Built twice (tests/interop.inc): with the configured sanitizers, and as
// engine_stress_tsan_test with -fsanitize=thread.
#include <stdlib.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <memory>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "filter/snapshot_engine.h"
#include "store/exception_store.h"
#include "tests/memory_origin.h"

// Last: check.h defines macros that clash with the C++ library.
#include "tests/check_util.h"

namespace {

using snap_test::MemoryOrigin;

constexpr uint64_t kSize = 4 << 20;
constexpr int kThreads = 6;
constexpr int kSnaps = 3;  // taken per round
// Per round: 512 B .. 64 KiB, then a 1 MiB chunk and a chunk as large as
// the whole origin.
constexpr uint32_t kChunkSectors[][kSnaps] = {
    {1, 8, 128}, {2048, 16, 2}, {8192, 4, 1}};
#if defined(__SANITIZE_THREAD__)
constexpr int kRounds = 2;  // TSan is slow
constexpr int kOps = 300;   // per thread and round
#else
constexpr int kRounds = 3;
constexpr int kOps = 600;
#endif

uint8_t Base(uint64_t pos) {
  return static_cast<uint8_t>((pos * 0x9E3779B97F4A7C15ull) >> 58);  // 0..63
}
bool IsOriginValue(uint8_t v) { return v >= 64 && v < 128; }
uint8_t SnapValueLow(int j) { return static_cast<uint8_t>(128 + 42 * j); }
bool IsSnapValue(int j, uint8_t v) {
  return v >= SnapValueLow(j) && v < SnapValueLow(j) + 42;
}

std::vector<char> Origin0() {
  std::vector<char> v(kSize);
  for (uint64_t i = 0; i < kSize; ++i) v[i] = static_cast<char>(Base(i));
  return v;
}

// A device cut into segments, each owned by one thread.
struct Partition {
  std::vector<uint8_t> owner;  // per byte
  std::vector<std::vector<std::pair<uint64_t, uint64_t>>> segs;  // per thread

  explicit Partition(uint64_t seed) : owner(kSize), segs(kThreads) {
    std::mt19937_64 r(seed);
    uint64_t pos = 0;
    for (int t = 0; pos < kSize; t = (t + 1) % kThreads) {
      // Mostly small segments, some spanning several 64 KiB chunks.
      uint64_t len = r() % 8 == 0 ? 1 + r() % (192 << 10) : 1 + r() % 12000;
      len = std::min(len, kSize - pos);
      segs[t].push_back({pos, len});
      std::memset(owner.data() + pos, t, len);
      pos += len;
    }
  }
  // A random sub-range of one of t's segments.
  std::pair<uint64_t, uint64_t> Pick(int t, std::mt19937_64& r) const {
    auto [off, len] = segs[t][r() % segs[t].size()];
    uint64_t a = r() % len;
    uint64_t n = 1 + r() % (len - a);
    return {off + a, n};
  }
};

std::string TempDir() {
  char tmpl[] = "/tmp/engine_stress.XXXXXX";
  ck_assert_ptr_nonnull(mkdtemp(tmpl));
  return tmpl;
}

void RemoveDir(const std::string& dir) {
  std::string cmd = "rm -rf '" + dir + "'";
  ck_assert_int_eq(system(cmd.c_str()), 0);
}

// A snapshot of the parallel test and its model.
struct SnapState {
  int id = 0;
  uint32_t chunk_sectors = 0;
  std::string path;
  std::shared_ptr<snap::Snapshot> snap;
  std::unique_ptr<Partition> part;  // who writes which bytes
  std::vector<char> want;           // the take + its writes
  uint64_t exceptions = 0;
};

std::shared_ptr<snap::Snapshot> OpenSnapshot(const std::string& name,
                                             const std::string& path,
                                             uint32_t chunk_sectors) {
  snap::StoreOptions opts;
  opts.chunk_sectors = chunk_sectors;
  absl::StatusOr<std::unique_ptr<snap::ExceptionStore>> st =
      snap::OpenStoreFile(path, opts);
  ck_assert_msg(st.ok(), "open %s: %s", path.c_str(),
                std::string(st.status().message()).c_str());
  if (chunk_sectors != 0) ck_assert_int_eq((*st)->chunk_sectors(), chunk_sectors);
  return std::make_shared<snap::Snapshot>(name, path, std::move(*st));
}

// The first difference between a device and its model, as a message.
std::string FirstDiff(const std::vector<char>& got,
                      const std::vector<char>& want, uint64_t chunk) {
  for (uint64_t i = 0; i < want.size(); ++i)
    if (got[i] != want[i]) {
      uint64_t n = 0;
      for (uint64_t k = i; k < want.size() && got[k] != want[k]; ++k) ++n;
      char buf[200];
      snprintf(buf, sizeof buf,
               "byte %llu (chunk %llu): got %u, want %u (%llu bytes differ "
               "from there)",
               (unsigned long long)i, (unsigned long long)(i / chunk),
               (unsigned)(uint8_t)got[i], (unsigned)(uint8_t)want[i],
               (unsigned long long)n);
      return buf;
    }
  return "";
}

// ------------------------------------------------------------ parallel_io

START_TEST(parallel_io) {
  MemoryOrigin origin(Origin0());
  snap::SnapshotEngine engine(origin);
  const std::string dir = TempDir();
  const Partition origin_part(1);
  std::vector<char> want_origin = origin.Contents();
  std::vector<std::unique_ptr<SnapState>> all;

  for (int round = 0; round < kRounds; ++round) {
    // Take this round's snapshots of the origin as it is now.
    const std::vector<char> take = origin.Contents();
    const size_t first = all.size();
    for (int j = 0; j < kSnaps; ++j) {
      auto st = std::make_unique<SnapState>();
      st->id = static_cast<int>(all.size());
      st->chunk_sectors = kChunkSectors[round][j];
      st->path = dir + "/s" + std::to_string(st->id) + ".cow";
      st->snap = OpenSnapshot("s" + std::to_string(st->id), st->path,
                              st->chunk_sectors);
      st->part = std::make_unique<Partition>(100 + st->id);
      st->want = take;
      ASSERT_OK(engine.Add(st->snap));
      all.push_back(std::move(st));
    }
    std::atomic<int> failures{0};
    std::atomic<uint64_t> ops[8] = {};

    auto worker = [&](int t) {
      std::mt19937_64 r(1000 * (round + 1) + t);
      std::vector<char> buf;
      auto report = [&](const char* what, int id, uint64_t pos, uint8_t v) {
        if (failures.fetch_add(1) < 20)
          fprintf(stderr, "round %d thread %d: %s (snapshot %d) byte %llu = %u\n",
                  round, t, what, id, (unsigned long long)pos, (unsigned)v);
      };
      for (int i = 0; i < kOps && failures.load() == 0; ++i) {
        const int what = static_cast<int>(r() % 100);
        const bool fua = r() % 10 == 0;
        // Writes go to this round's snapshots; reads to any.
        SnapState& w = *all[first + r() % kSnaps];
        SnapState& rd = *all[r() % all.size()];
        const int j = w.id - static_cast<int>(first);
        if (what < 30) {  // origin write
          auto [off, len] = origin_part.Pick(t, r);
          const char v = static_cast<char>(64 + r() % 64);
          buf.assign(len, v);
          ASSERT_OK(engine.OriginWrite(buf, off, fua));
          std::memset(want_origin.data() + off, v, len);
          ops[0]++;
        } else if (what < 38) {  // origin zero
          auto [off, len] = origin_part.Pick(t, r);
          ASSERT_OK(engine.OriginZero(len, off, false, fua, false));
          std::memset(want_origin.data() + off, 0, len);
          ops[1]++;
        } else if (what < 66) {  // snapshot write
          auto [off, len] = w.part->Pick(t, r);
          const char v = static_cast<char>(SnapValueLow(j) + r() % 42);
          buf.assign(len, v);
          ASSERT_OK(engine.SnapWrite(*w.snap, buf, off, fua));
          std::memset(w.want.data() + off, v, len);
          ops[2]++;
        } else if (what < 72) {  // snapshot zero
          auto [off, len] = w.part->Pick(t, r);
          ASSERT_OK(engine.SnapZero(*w.snap, len, off, fua, false));
          std::memset(w.want.data() + off, 0, len);
          ops[3]++;
        } else if (what < 88) {  // snapshot read, checked
          const uint64_t len = 1 + r() % (160 << 10);
          const uint64_t off = r() % (kSize - len + 1);
          buf.resize(len);
          ASSERT_OK(engine.SnapRead(*rd.snap, buf, off));
          const bool current = static_cast<size_t>(rd.id) >= first;
          const int rj = rd.id - static_cast<int>(first);
          for (uint64_t k = 0; k < len; ++k) {
            const uint64_t p = off + k;
            const uint8_t v = static_cast<uint8_t>(buf[k]);
            if (!current || rd.part->owner[p] == t) {
              // An earlier round's snapshot is frozen: all of it is known.
              if (buf[k] != rd.want[p]) report("byte differs from the model", rd.id, p, v);
            } else if (buf[k] == take[p] || v == 0 || IsSnapValue(rj, v)) {
              // the take, a zero, or a write of this snapshot
            } else if (IsOriginValue(v)) {
              report("origin data in the snapshot", rd.id, p, v);
            } else {
              report("foreign or misplaced data in the snapshot", rd.id, p, v);
            }
          }
          ops[4]++;
        } else if (what < 95) {  // origin read, checked
          const uint64_t len = 1 + r() % (160 << 10);
          const uint64_t off = r() % (kSize - len + 1);
          buf.resize(len);
          ASSERT_OK(engine.OriginRead(buf, off));
          for (uint64_t k = 0; k < len; ++k) {
            const uint64_t p = off + k;
            const uint8_t v = static_cast<uint8_t>(buf[k]);
            if (origin_part.owner[p] == t) {
              if (buf[k] != want_origin[p]) report("own origin byte differs", -1, p, v);
            } else if (v >= 128) {
              report("snapshot data in the origin", -1, p, v);
            } else if (buf[k] != take[p] && v != 0 && !IsOriginValue(v)) {
              report("misplaced data in the origin", -1, p, v);
            }
          }
          ops[5]++;
        } else if (what < 98) {
          ASSERT_OK(engine.SnapFlush(*w.snap));
          ops[6]++;
        } else {
          ASSERT_OK(engine.OriginFlush());
          ops[7]++;
        }
      }
    };
    const auto t0 = std::chrono::steady_clock::now();
    std::vector<std::thread> threads;
    for (int t = 0; t < kThreads; ++t) threads.emplace_back(worker, t);
    for (std::thread& th : threads) th.join();
    const double secs = std::chrono::duration<double>(
        std::chrono::steady_clock::now() - t0).count();
    fprintf(stderr,
            "parallel_io round %d (chunks %u, %u, %u sectors; %zu snapshots): "
            "%.1f s: %llu origin writes, %llu origin zeroes, %llu snapshot "
            "writes, %llu snapshot zeroes, %llu snapshot reads, %llu origin "
            "reads, %llu+%llu flushes\n",
            round, kChunkSectors[round][0], kChunkSectors[round][1],
            kChunkSectors[round][2], all.size(), secs,
            (unsigned long long)ops[0].load(), (unsigned long long)ops[1].load(),
            (unsigned long long)ops[2].load(), (unsigned long long)ops[3].load(),
            (unsigned long long)ops[4].load(), (unsigned long long)ops[5].load(),
            (unsigned long long)ops[6].load(), (unsigned long long)ops[7].load());
    ck_assert_int_eq(failures.load(), 0);

    // Every snapshot so far, and the origin, equal their models.
    std::vector<char> got(kSize);
    for (auto& st : all) {
      ck_assert_msg(st->snap->store->valid(), "snapshot %d invalid: %s", st->id,
                    st->snap->store->invalid_reason().c_str());
      ASSERT_OK(engine.SnapRead(*st->snap, got, 0));
      ck_assert_msg(got == st->want, "round %d: snapshot %d (chunk %u sectors): %s",
                    round, st->id, st->chunk_sectors,
                    FirstDiff(got, st->want, st->snap->chunk_bytes).c_str());
    }
    std::vector<char> o = origin.Contents();
    ck_assert_msg(o == want_origin, "round %d: origin: %s", round,
                  FirstDiff(o, want_origin, 512).c_str());
  }

  // The stores reopened from their files hold the same.
  for (auto& st : all) {
    fprintf(stderr, "snapshot %d (chunk %u sectors): %llu exceptions, %s\n",
            st->id, st->chunk_sectors,
            (unsigned long long)st->snap->store->exception_count(),
            st->snap->store->StatusLine().c_str());
    ASSERT_OK(engine.SnapFlush(*st->snap));
    st->exceptions = st->snap->store->exception_count();
    ASSERT_OK(engine.Remove(st->snap->name));
    st->snap.reset();  // closes the store
  }
  MemoryOrigin origin2(origin.Contents());
  snap::SnapshotEngine engine2(origin2);
  std::vector<char> got(kSize);
  for (auto& st : all) {
    // Chunk 0: the header's chunk size applies.
    auto s = OpenSnapshot("s" + std::to_string(st->id), st->path, 0);
    ck_assert_int_eq(s->store->chunk_sectors(), st->chunk_sectors);
    ck_assert_int_eq(s->store->exception_count(), st->exceptions);
    ASSERT_OK(engine2.Add(s));
    ASSERT_OK(engine2.SnapRead(*s, got, 0));
    ck_assert_msg(got == st->want, "reopened snapshot %d: %s", st->id,
                  FirstDiff(got, st->want, s->chunk_bytes).c_str());
    ASSERT_OK(engine2.Remove(s->name));
  }
  RemoveDir(dir);
}
END_TEST

// -------------------------------------------------------------- live_take

START_TEST(live_take) {
  const std::vector<char> base = Origin0();
  MemoryOrigin origin(base);
  snap::SnapshotEngine engine(origin);
  const std::string dir = TempDir();
  auto early = OpenSnapshot("early", dir + "/early.cow", 8);
  ASSERT_OK(engine.Add(early));
  const Partition part(7);

  struct Write {
    uint64_t off, len;
    char v;
  };
  std::vector<std::vector<Write>> history(kThreads);
  std::atomic<int> started[kThreads] = {}, done[kThreads] = {};
  std::atomic<bool> stop{false};
  auto worker = [&](int t) {
    std::mt19937_64 r(5000 + t);
    std::vector<char> buf;
    for (int i = 0; !stop.load() && i < 100000; ++i) {
      auto [off, len] = part.Pick(t, r);
      const char v = static_cast<char>(64 + r() % 64);
      history[t].push_back({off, len, v});
      buf.assign(len, v);
      started[t].store(i + 1);
      ASSERT_OK(engine.OriginWrite(buf, off, false));
      done[t].store(i + 1);
    }
  };
  // Waits (up to a minute) until every thread has done `n(t)` writes.
  auto wait_for = [&](auto n) {
    for (int k = 0; k < 6000; ++k) {
      bool all = true;
      for (int t = 0; t < kThreads; ++t) all = all && done[t].load() >= n(t);
      if (all) return;
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
    }
  };
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) threads.emplace_back(worker, t);
  wait_for([](int) { return 5; });

  // Take "late" while the writes go on.
  int lo[kThreads], hi[kThreads];
  auto late = OpenSnapshot("late", dir + "/late.cow", 1);
  for (int t = 0; t < kThreads; ++t) lo[t] = done[t].load();
  ASSERT_OK(engine.Add(late));
  for (int t = 0; t < kThreads; ++t) hi[t] = started[t].load();
  wait_for([&](int t) { return hi[t] + 5; });
  stop.store(true);
  for (std::thread& th : threads) th.join();

  std::vector<char> got(kSize);
  ASSERT_OK(engine.SnapRead(*early, got, 0));
  ck_assert_msg(got == base, "early snapshot: %s",
                FirstDiff(got, base, 4096).c_str());

  ASSERT_OK(engine.SnapRead(*late, got, 0));
  for (int t = 0; t < kThreads; ++t) {
    ck_assert_int_le(lo[t], hi[t]);
    ck_assert_msg(static_cast<int>(history[t].size()) > hi[t],
                  "thread %d wrote nothing after the take", t);
    // Thread t's bytes after its first lo[t] writes, then try each write
    // that may have been in flight during Add.
    std::vector<char> view = base;
    for (int i = 0; i < lo[t]; ++i)
      std::memset(view.data() + history[t][i].off, history[t][i].v,
                  history[t][i].len);
    bool match = false;
    for (int p = lo[t];; ++p) {
      bool same = true;
      for (auto [off, len] : part.segs[t])
        if (std::memcmp(view.data() + off, got.data() + off, len) != 0) {
          same = false;
          break;
        }
      if (same) {
        match = true;
        fprintf(stderr, "live_take: thread %d: %d writes before the take "
                "(%d done, %d started when Add ran)\n", t, p, lo[t], hi[t]);
        break;
      }
      if (p >= hi[t]) break;
      std::memset(view.data() + history[t][p].off, history[t][p].v,
                  history[t][p].len);
    }
    ck_assert_msg(match,
                  "late snapshot: thread %d's bytes match no prefix of its "
                  "writes between %d and %d", t, lo[t], hi[t]);
  }
  ASSERT_OK(engine.Remove("early"));
  ASSERT_OK(engine.Remove("late"));
  RemoveDir(dir);
}
END_TEST

}  // namespace

int main() {
  Suite* s = suite_create("engine_stress");
  TCase* tc = tcase_create("concurrency");
  tcase_set_timeout(tc, 600);
  tcase_add_test(tc, parallel_io);
  tcase_add_test(tc, live_take);
  suite_add_tcase(s, tc);
  return snaptest::RunSuites({s});
}
