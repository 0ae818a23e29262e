// Crash consistency of the persistent store: power loss at every sync
// point of a fixed commit sequence (and with torn, reordered unsynced
// writes), crashes under concurrent commits, and merge (dm's
// prepare_merge/commit_merge) including crashes in the middle of a merge.
#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <random>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "store/cow_format.h"
#include "store/exception_store.h"
#include "tests/fault_file.h"

// Last: check.h defines a macro named fail.
#include "tests/check_util.h"

// ck_assert* records a mark point (a write to the test runner) on every
// success, which is slow in loops: loops use these, which act only on failure.
#define EXPECT_MSG(cond, ...)               \
  do {                                      \
    if (!(cond)) ck_abort_msg(__VA_ARGS__); \
  } while (0)
#define EXPECT(cond) EXPECT_MSG(cond, "%s", "Assertion '" #cond "' failed")

using snap::DiskRecord;
using snap::ExceptionStore;
using snap::Geometry;
using snap::MergeRun;
using snap::StoreOptions;
using snap::StoreType;
using snap::WriteSource;
using snaptest::Event;
using snaptest::FaultFile;
using snaptest::Op;

#define ASSERT_STR_EQ(got, want)                       \
  do {                                                 \
    const std::string got_s_ = (got);                  \
    const std::string want_s_ = (want);                \
    ck_assert_str_eq(got_s_.c_str(), want_s_.c_str()); \
  } while (0)

namespace {

using ull = unsigned long long;

constexpr uint32_t kCs = 1;  // 512-byte chunks: 32 records per area
const Geometry kGeo(kCs);
const uint64_t kCb = kGeo.chunk_bytes();
const uint64_t kEpa = kGeo.exceptions_per_area();

uint64_t Mix(uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

std::vector<char> Pattern(uint64_t tag, size_t n) {
  std::vector<char> v(n);
  for (size_t i = 0; i < n; i += 8) {
    uint64_t w = Mix(tag * 0x100000001b3ull + i);
    std::memcpy(v.data() + i, &w, std::min<size_t>(8, n - i));
  }
  return v;
}

StoreOptions Opts() {
  StoreOptions o;
  o.type = StoreType::kPersistent;
  o.chunk_sectors = kCs;
  return o;
}

std::unique_ptr<ExceptionStore> MustOpen(std::unique_ptr<snap::BlockFile> f) {
  absl::StatusOr<std::unique_ptr<ExceptionStore>> s = snap::OpenStore(std::move(f), Opts());
  ck_assert_msg(s.ok(), "open failed: %s", s.status().ToString().c_str());
  return std::move(*s);
}

// Distinct origin chunks with sequential runs (some crossing area ends).
std::vector<uint64_t> OriginChunks(size_t n, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::set<uint64_t> seen;
  std::vector<uint64_t> out;
  while (out.size() < n) {
    uint64_t start = rng() % 4000;
    uint64_t len = (rng() % 2 == 0) ? 1 + rng() % 14 : 1;
    for (uint64_t i = 0; i < len && out.size() < n; ++i)
      if (seen.insert(start + i).second)
        out.push_back(start + i);
      else
        break;
  }
  return out;
}

// ------------------------------------------- power loss at every sync

// The disks the sequences run on: an empty file the store grows, and a
// pre-sized block device whose bytes after the first 4 KiB are old garbage
// (an LV that LVM wiped the start of), where every area must be zeroed on
// disk.
std::vector<char> InitialImage(int kind) {
  if (kind == 0) return {};
  std::vector<char> img(128 * 1024);
  std::mt19937_64 rng(kind);
  for (char& c : img) c = static_cast<char>(rng());
  std::fill(img.begin(), img.begin() + 4096, 0);
  return img;
}
const char* const kImageName[] = {"empty file", "pre-sized garbage device"};

std::unique_ptr<FaultFile> InitialDisk(int kind) {
  auto disk = std::make_unique<FaultFile>(InitialImage(kind), "fault.cow");
  disk->set_block_device(kind == 1);
  return disk;
}

struct Step {
  uint64_t old_chunk;
  bool wait;
  bool flush_after;
};

std::vector<Step> Sequence() {
  const size_t n = 3 * kEpa + 5;
  std::vector<uint64_t> olds = OriginChunks(n, 2024);
  std::vector<Step> seq;
  for (size_t i = 0; i < n; ++i)
    seq.push_back({olds[i], i % 4 == 0 || i == kEpa - 1, i % 13 == 12 || i == 2 * kEpa});
  return seq;
}

struct Outcome {
  bool opened = false;
  size_t acked = 0;      // exceptions that must survive
  size_t committed = 0;  // Commit() returned OK
  size_t attempted = 0;  // Commit() was called (a failed one may persist)
};

Outcome RunSequence(FaultFile& disk, const std::vector<Step>& seq) {
  Outcome out;
  absl::StatusOr<std::unique_ptr<ExceptionStore>> so = snap::OpenStore(disk.Handle(), Opts());
  if (!so.ok()) return out;
  out.opened = true;
  ExceptionStore& s = **so;
  for (size_t i = 0; i < seq.size(); ++i) {
    absl::StatusOr<uint64_t> c = s.Allocate(seq[i].old_chunk, WriteSource::kOrigin);
    if (!c.ok()) break;
    ck_assert_uint_eq(*c, kGeo.SlotToChunk(i));
    if (!s.WriteChunk(*c, 0, Pattern(i, kCb)).ok()) break;
    out.attempted = i + 1;
    if (!s.Commit(*c, seq[i].wait).ok()) break;
    out.committed = i + 1;
    if (seq[i].wait) out.acked = i + 1;
    if (seq[i].flush_after) {
      if (!s.Flush().ok()) break;
      out.acked = out.committed;
    }
  }
  return out;
}

// Reopens the image left by a crash; "" if all is well, else what is wrong.
// With allow_invalid, a store whose header says invalid is fine too (an I/O
// error invalidates it on purpose).
std::string CheckAfterCrash(FaultFile& img, const std::vector<Step>& seq, const Outcome& o,
                            bool allow_invalid = false) {
  absl::StatusOr<std::unique_ptr<ExceptionStore>> so = snap::OpenStore(img.Handle(), Opts());
  if (!so.ok()) return "reopen failed: " + so.status().ToString();
  ExceptionStore& s = **so;
  if (!s.valid()) {
    if (!allow_invalid) return "reopened store is invalid: " + s.invalid_reason();
    if (s.StatusLine() != "Invalid") return "invalid store with status " + s.StatusLine();
    return "";
  }
  const uint64_t p = s.exception_count();
  if (p > o.attempted)
    return "more exceptions (" + std::to_string(p) + ") than commits (" +
           std::to_string(o.attempted) + ")";
  if (p < o.acked)
    return "lost acknowledged exceptions: " + std::to_string(p) + " present, " +
           std::to_string(o.acked) + " acknowledged";
  std::vector<char> buf(kCb);
  for (size_t i = 0; i < seq.size(); ++i) {
    std::optional<snap::Exception> e = s.Lookup(seq[i].old_chunk);
    if (i >= p) {
      if (e)
        return "exception " + std::to_string(i) + " present beyond the prefix of " +
               std::to_string(p);
      continue;
    }
    if (!e)
      return "exception " + std::to_string(i) + " missing from the prefix of " +
             std::to_string(p);
    if (e->cow_chunk != kGeo.SlotToChunk(i))
      return "exception " + std::to_string(i) + " maps to chunk " +
             std::to_string(e->cow_chunk);
    if (!s.ReadChunk(e->cow_chunk, 0, buf).ok() || buf != Pattern(i, kCb))
      return "exception " + std::to_string(i) + ": its data chunk " +
             std::to_string(e->cow_chunk) + " does not hold the data written for it";
  }
  // The store goes on working from there, and what it adds survives.
  absl::StatusOr<uint64_t> c = s.Allocate(99999999, WriteSource::kOrigin);
  if (!c.ok()) return "allocate after reopen: " + c.status().ToString();
  if (*c != kGeo.SlotToChunk(p))
    return "allocate after reopen gave chunk " + std::to_string(*c) + ", want " +
           std::to_string(kGeo.SlotToChunk(p));
  if (!s.WriteChunk(*c, 0, Pattern(777, kCb)).ok() || !s.Commit(*c, true).ok())
    return "commit after reopen failed";
  so->reset();
  std::unique_ptr<FaultFile> again = img.PowerLoss();
  absl::StatusOr<std::unique_ptr<ExceptionStore>> s2 = snap::OpenStore(again->Handle(), Opts());
  if (!s2.ok()) return "second reopen failed: " + s2.status().ToString();
  if ((*s2)->exception_count() != p + 1)
    return "second reopen: " + std::to_string((*s2)->exception_count()) + " exceptions, want " +
           std::to_string(p + 1);
  std::optional<snap::Exception> e = (*s2)->Lookup(99999999);
  if (!e || e->cow_chunk != *c) return "second reopen: the new exception is missing";
  return "";
}

uint64_t CountSyncs(const std::vector<Step>& seq, int kind) {
  std::unique_ptr<FaultFile> dp = InitialDisk(kind);
  FaultFile& disk = *dp;
  Outcome o = RunSequence(disk, seq);
  ck_assert(o.opened);
  ck_assert_uint_eq(o.committed, seq.size());
  return disk.counters().syncs;
}

START_TEST(power_loss_at_every_sync_point) {
  const std::vector<Step> seq = Sequence();
  for (int kind = 0; kind < 2; ++kind) {
    const uint64_t syncs = CountSyncs(seq, kind);
    std::printf("power loss, %s: %zu exceptions, %llu sync points\n", kImageName[kind],
                seq.size(), static_cast<ull>(syncs));
    std::fflush(stdout);
    ck_assert_uint_gt(syncs, 10);
    for (uint64_t k = 0; k <= syncs; ++k) {
      std::unique_ptr<FaultFile> dp = InitialDisk(kind);
      FaultFile& disk = *dp;
      disk.CrashAt(k);
      Outcome o = RunSequence(disk, seq);
      if (k < syncs)
        ck_assert_msg(disk.frozen(), "sync %llu was never reached", static_cast<ull>(k));
      std::unique_ptr<FaultFile> img = disk.PowerLoss();
      std::string err = CheckAfterCrash(*img, seq, o);
      ck_assert_msg(err.empty(), "%s, crash at sync %llu (%zu committed, %zu acknowledged): %s",
                    kImageName[kind], static_cast<ull>(k), o.committed, o.acked, err.c_str());
    }
  }
}
END_TEST

// The unsynced writes at the crash survive in any subset (the disk may
// persist completed writes in any order before a flush).
START_TEST(torn_power_loss_at_every_sync_point) {
  const std::vector<Step> seq = Sequence();
  std::vector<std::string> failures;
  for (int kind = 0; kind < 2; ++kind) {
    const uint64_t syncs = CountSyncs(seq, kind);
    for (uint64_t k = 0; k <= syncs; ++k) {
      for (uint64_t seed = 0; seed < 6; ++seed) {
        std::unique_ptr<FaultFile> dp = InitialDisk(kind);
        FaultFile& disk = *dp;
        disk.CrashAt(k);
        Outcome o = RunSequence(disk, seq);
        const size_t unsynced = disk.unsynced_ops();
        std::unique_ptr<FaultFile> img = disk.PowerLossTorn(k * 1000 + seed);
        std::string err = CheckAfterCrash(*img, seq, o);
        if (!err.empty())
          failures.push_back(std::string(kImageName[kind]) + ", crash at sync " +
                             std::to_string(k) + ", seed " + std::to_string(seed) + " (" +
                             std::to_string(unsynced) + " unsynced ops): " + err);
      }
    }
  }
  for (const std::string& f : failures) std::printf("torn: %s\n", f.c_str());
  std::fflush(stdout);
  ck_assert_msg(failures.empty(), "%zu torn power losses broke the store; first: %s",
                failures.size(), failures.empty() ? "" : failures[0].c_str());
}
END_TEST

// The creation of a new store: a crash may keep the header and lose the
// zeroed area 0 (they are not ordered by a sync).
START_TEST(torn_power_loss_while_creating_store) {
  for (uint32_t cs : {1u, 8u}) {
    FaultFile disk;
    disk.CrashAt(0);
    StoreOptions o = Opts();
    o.chunk_sectors = cs;
    ck_assert(!snap::OpenStore(disk.Handle(), o).ok());
    // Keep the header, lose area 0.
    std::unique_ptr<FaultFile> img =
        disk.PowerLossKeeping([](const Event& e) { return e.offset == 0; });
    absl::StatusOr<std::unique_ptr<ExceptionStore>> s = snap::OpenStore(img->Handle(), o);
    ck_assert_msg(s.ok(),
                  "cs %u: header durable without area 0 after a crash during "
                  "creation, and the store no longer opens: %s",
                  cs, s.status().ToString().c_str());
  }
}
END_TEST

// An I/O error (EIO, or a short write) at every write of the sequence, then
// at every sync (also losing the writes it covered): the store reports it,
// and the file, as it is and after a power loss, opens either invalid or
// with a correct prefix.
START_TEST(io_error_at_every_write_and_sync) {
  const std::vector<Step> seq = Sequence();
  std::vector<std::string> failures;
  int invalid = 0, total = 0;
  for (int kind = 0; kind < 2; ++kind) {
    uint64_t writes, syncs;
    {
      std::unique_ptr<FaultFile> dp = InitialDisk(kind);
      FaultFile& disk = *dp;
      RunSequence(disk, seq);
      writes = disk.counters().writes;
      syncs = disk.counters().syncs;
    }
    // Passes: EIO at a write, a short write, EIO at a sync, and a sync
    // that loses the writes it covered (Linux reports that once).
    for (int pass = 0; pass < 4; ++pass) {
      const uint64_t limit = pass >= 2 ? syncs : writes;
      for (uint64_t k = 0; k < limit; ++k) {
        std::unique_ptr<FaultFile> dp = InitialDisk(kind);
        FaultFile& disk = *dp;
        snaptest::Fault f;
        f.op = pass >= 2 ? Op::kSync : Op::kWrite;
        f.kind = pass == 1 ? snaptest::FaultKind::kShortWrite : snaptest::FaultKind::kEIO;
        f.short_bytes = 200;
        f.lose_writeback = pass == 3;
        f.nth = k;
        disk.AddFault(f);
        Outcome o = RunSequence(disk, seq);
        ck_assert_msg(disk.counters().faults_fired == 1, "pass %d fault %llu never fired", pass,
                      static_cast<ull>(k));
        for (int lost = 0; lost < 2; ++lost) {
          std::unique_ptr<FaultFile> img = lost ? disk.PowerLoss() : disk.Clone();
          std::string err = CheckAfterCrash(*img, seq, o, true);
          absl::StatusOr<std::unique_ptr<ExceptionStore>> r =
              snap::OpenStore(img->Handle(), Opts());
          ++total;
          if (r.ok() && !(*r)->valid()) ++invalid;
          if (!err.empty())
            failures.push_back(std::string(kImageName[kind]) + ", " +
                               std::string(pass == 3   ? "lost writeback at sync #"
                                           : pass == 2 ? "EIO at sync #"
                                           : pass == 1 ? "short write #"
                                                       : "EIO at write #") +
                               std::to_string(k) + (lost ? " + power loss" : "") + ": " + err);
        }
      }
    }
  }
  for (const std::string& f : failures) std::printf("io error: %s\n", f.c_str());
  std::printf("io errors: %d reopens, %d of them invalid (on purpose)\n", total, invalid);
  std::fflush(stdout);
  ck_assert_msg(failures.empty(), "%zu cases broke the store; first: %s", failures.size(),
                failures.empty() ? "" : failures[0].c_str());
}
END_TEST

// Threads commit concurrently (waiting and lazy) while the disk dies at a
// sync point: what survives is a prefix in allocation order, holding every
// acknowledged exception, each with its data.
// Group commits are pipelined: a copy that finishes while a commit's sync
// runs is not made durable by that sync; the next sync makes its data
// durable while it writes the records of the group before. Two overlapping
// commits cost three syncs, not four, and no record is on disk before its
// data.
START_TEST(commits_pipeline_data_and_records) {
  FaultFile disk;
  std::unique_ptr<ExceptionStore> s = MustOpen(disk.Handle());
  const uint64_t base = disk.counters().syncs;
  absl::StatusOr<uint64_t> a = s->Allocate(1, WriteSource::kOrigin);
  ASSERT_OK(a.status());
  ASSERT_OK(s->WriteChunk(*a, 0, Pattern(1, kCb)));
  absl::StatusOr<uint64_t> b = absl::UnknownError("not allocated");
  absl::Status b_commit = absl::UnknownError("not committed");
  disk.set_sync_hook([&](uint64_t index) {
    if (index != base) return;
    // a's first sync is under way: b's copy finishes now.
    b = s->Allocate(2, WriteSource::kOrigin);
    if (!b.ok()) return;
    b_commit = s->WriteChunk(*b, 0, Pattern(2, kCb));
    if (b_commit.ok()) b_commit = s->Commit(*b, false);
  });
  ASSERT_OK(s->Commit(*a, true));
  disk.set_sync_hook(nullptr);
  ASSERT_OK(b.status());
  ASSERT_OK(b_commit);
  // a's data, then a's record together with b's data.
  ck_assert_uint_eq(disk.counters().syncs - base, 2);
  std::vector<char> buf(kCb);
  {
    std::unique_ptr<FaultFile> img = disk.PowerLoss();
    std::unique_ptr<ExceptionStore> r = MustOpen(img->Handle());
    std::optional<snap::Exception> ea = r->Lookup(1);
    ck_assert(ea.has_value());
    ASSERT_OK(r->ReadChunk(ea->cow_chunk, 0, buf));
    ck_assert(buf == Pattern(1, kCb));
    ck_assert(!r->Lookup(2).has_value());
  }
  ASSERT_OK(s->Flush());
  ck_assert_uint_eq(disk.counters().syncs - base, 3);
  std::unique_ptr<FaultFile> img = disk.PowerLoss();
  std::unique_ptr<ExceptionStore> r = MustOpen(img->Handle());
  std::optional<snap::Exception> eb = r->Lookup(2);
  ck_assert(eb.has_value() && eb->cow_chunk == *b);
  ASSERT_OK(r->ReadChunk(eb->cow_chunk, 0, buf));
  ck_assert(buf == Pattern(2, kCb));
}
END_TEST

START_TEST(power_loss_under_concurrent_commits) {
  const int threads = 4, per = 40;
  for (uint64_t k = 3; k < 60; k += 4) {
    FaultFile disk;
    disk.set_sync_delay(std::chrono::microseconds(50));
    disk.CrashAt(k);
    std::unique_ptr<ExceptionStore> s = MustOpen(disk.Handle());
    struct Rec {
      uint64_t old_chunk, cow_chunk;
      bool acked;  // a waiting Commit() returned OK
    };
    std::mutex mu;
    std::vector<Rec> committed;  // Commit() was called
    std::vector<std::thread> ts;
    for (int t = 0; t < threads; ++t)
      ts.emplace_back([&, t] {
        for (int i = 0; i < per; ++i) {
          uint64_t old_chunk = uint64_t(t) * 10000 + i;
          absl::StatusOr<uint64_t> c = s->Allocate(old_chunk, WriteSource::kOrigin);
          if (!c.ok()) return;
          if (!s->WriteChunk(*c, 0, Pattern(old_chunk, kCb)).ok()) {
            s->Abandon(*c);
            return;
          }
          bool wait = (i + t) % 3 != 0;
          bool ok = s->Commit(*c, wait).ok();
          std::lock_guard<std::mutex> l(mu);
          committed.push_back({old_chunk, *c, wait && ok});
          if (!ok) return;
        }
      });
    for (std::thread& t : ts) t.join();
    s.reset();
    for (int torn = 0; torn < 2; ++torn) {
      std::unique_ptr<FaultFile> img = torn ? disk.PowerLossTorn(k) : disk.PowerLoss();
      std::unique_ptr<ExceptionStore> r = MustOpen(img->Handle());
      std::sort(committed.begin(), committed.end(),
                [](const Rec& a, const Rec& b) { return a.cow_chunk < b.cow_chunk; });
      bool gap = false;
      uint64_t present = 0;
      std::vector<char> buf(kCb);
      for (const Rec& rec : committed) {
        std::optional<snap::Exception> e = r->Lookup(rec.old_chunk);
        if (!e) {
          EXPECT_MSG(!rec.acked, "crash at sync %llu%s: acknowledged chunk %llu lost",
                     static_cast<ull>(k), torn ? " (torn)" : "",
                     static_cast<ull>(rec.old_chunk));
          gap = true;
          continue;
        }
        EXPECT_MSG(!gap, "crash at sync %llu%s: chunk %llu present after a lost one",
                   static_cast<ull>(k), torn ? " (torn)" : "", static_cast<ull>(rec.old_chunk));
        EXPECT(e->cow_chunk == rec.cow_chunk);
        ASSERT_OK(r->ReadChunk(e->cow_chunk, 0, buf));
        EXPECT(buf == Pattern(rec.old_chunk, kCb));
        ++present;
      }
      ck_assert_uint_eq(r->exception_count(), present);
    }
  }
}
END_TEST

// ------------------------------------------------------------------ merge

struct Built {
  std::vector<uint64_t> olds;             // in allocation order; exception i is slot i
  std::vector<std::vector<char>> origin;  // the model origin, by chunk
};

Built BuildForMerge(FaultFile& disk, size_t n, uint64_t seed) {
  Built b;
  b.olds = OriginChunks(n, seed);
  uint64_t max_old = *std::max_element(b.olds.begin(), b.olds.end());
  for (uint64_t c = 0; c <= max_old + 1; ++c) b.origin.push_back(Pattern(1000000 + c, kCb));
  std::unique_ptr<ExceptionStore> s = MustOpen(disk.Handle());
  for (size_t i = 0; i < n; ++i) {
    absl::StatusOr<uint64_t> c = s->Allocate(b.olds[i], WriteSource::kOrigin);
    ck_assert(c.ok());
    ASSERT_OK(s->WriteChunk(*c, 0, Pattern(i, kCb)));
    ASSERT_OK(s->Commit(*c, i % 5 == 0));
  }
  ASSERT_OK(s->Flush());
  return b;
}

// The snapshot's view: the origin with every exception's COW data.
std::vector<std::vector<char>> SnapshotView(const Built& b) {
  std::vector<std::vector<char>> v = b.origin;
  for (size_t i = 0; i < b.olds.size(); ++i) v[b.olds[i]] = Pattern(i, kCb);
  return v;
}

// dm's merge order: areas from the last, records from the end, a run being
// the records before the last one that are consecutive in both chunks.
std::vector<MergeRun> ExpectedRuns(const std::vector<uint64_t>& olds) {
  std::vector<MergeRun> runs;
  std::vector<DiskRecord> recs;
  for (size_t i = 0; i < olds.size(); ++i) recs.push_back({olds[i], kGeo.SlotToChunk(i)});
  size_t end = recs.size();
  while (end > 0) {
    size_t area_start = ((end - 1) / kEpa) * kEpa;
    DiskRecord last = recs[end - 1];
    uint32_t n = 1;
    while (end - n > area_start) {
      const DiskRecord& r = recs[end - 1 - n];
      if (r.old_chunk + n != last.old_chunk || r.new_chunk + n != last.new_chunk) break;
      ++n;
    }
    runs.push_back({last.old_chunk - (n - 1), last.new_chunk - (n - 1), n});
    end -= n;
  }
  return runs;
}

std::string Expect(uint64_t remaining, uint64_t total_sectors) {
  return std::to_string(kGeo.SlotToChunk(remaining) * kCs) + "/" +
         std::to_string(total_sectors) + " " + std::to_string((remaining / kEpa + 2) * kCs);
}

// Runs merge steps until done or a step fails; returns false on failure.
// `remaining` tracks how many exceptions are left (a prefix).
bool MergeSteps(ExceptionStore& s, Built& b, size_t& remaining,
                const std::vector<MergeRun>* expect, size_t* next_run, uint64_t total_sectors) {
  for (;;) {
    absl::StatusOr<MergeRun> r = s.PrepareMerge();
    if (!r.ok()) return false;
    if (r->count == 0) {
      EXPECT(remaining == 0);
      return true;
    }
    // Always the newest records.
    EXPECT(remaining >= r->count);
    EXPECT(r->cow_chunk + r->count - 1 == kGeo.SlotToChunk(remaining - 1));
    EXPECT(r->old_chunk + r->count - 1 == b.olds[remaining - 1]);
    if (expect) {
      EXPECT(*next_run < expect->size());
      const MergeRun& want = (*expect)[(*next_run)++];
      EXPECT_MSG(r->old_chunk == want.old_chunk && r->cow_chunk == want.cow_chunk &&
                     r->count == want.count,
                 "merge run %llu+%u@%llu, want %llu+%u@%llu", static_cast<ull>(r->old_chunk),
                 r->count, static_cast<ull>(r->cow_chunk), static_cast<ull>(want.old_chunk),
                 want.count, static_cast<ull>(want.cow_chunk));
    }
    // Copy the run to the origin (which is durable at once).
    std::vector<char> buf(kCb);
    for (uint32_t k = 0; k < r->count; ++k) {
      if (!s.ReadChunk(r->cow_chunk + k, 0, buf).ok()) return false;
      b.origin[r->old_chunk + k] = buf;
    }
    if (!s.CommitMerge(r->count).ok()) return false;
    remaining -= r->count;
    for (uint32_t k = 0; k < r->count; ++k)
      EXPECT_MSG(!s.Lookup(r->old_chunk + k).has_value(), "merged chunk %llu still mapped",
                 static_cast<ull>(r->old_chunk + k));
    EXPECT(s.exception_count() == remaining);
    const std::string status = s.StatusLine(), want = Expect(remaining, total_sectors);
    EXPECT_MSG(status == want, "status '%s' with %zu left, want '%s'", status.c_str(),
               remaining, want.c_str());
  }
}

START_TEST(merge_runs_newest_first_and_empties_store) {
  FaultFile disk;
  const size_t n = 3 * kEpa + 17;
  Built b = BuildForMerge(disk, n, 5);
  const std::vector<std::vector<char>> view = SnapshotView(b);
  const std::vector<MergeRun> expect = ExpectedRuns(b.olds);
  size_t multi = 0;
  for (const MergeRun& r : expect) multi += r.count > 1;
  ck_assert_msg(multi >= 5, "the test sequence has only %zu runs", multi);
  ck_assert_uint_lt(expect.size(), n);
  std::unique_ptr<ExceptionStore> s = MustOpen(disk.Handle());
  const uint64_t total = disk.Contents().size() / 512;
  ASSERT_STR_EQ(s->StatusLine(), Expect(n, total));
  size_t remaining = n, next_run = 0;
  ck_assert(MergeSteps(*s, b, remaining, &expect, &next_run, total));
  ck_assert_uint_eq(next_run, expect.size());
  ck_assert(b.origin == view);
  ASSERT_STR_EQ(s->StatusLine(), "2/" + std::to_string(total) + " 2");
  // Every area on disk is zero again; the data chunks are untouched.
  std::vector<char> img = disk.Durable();
  for (uint64_t a = 0; a <= n / kEpa + 1; ++a) {
    uint64_t off = kGeo.AreaChunk(a) * kCb;
    for (uint64_t i = off; i < off + kCb && i < img.size(); ++i)
      EXPECT_MSG(img[i] == 0, "area %llu not zero at byte %llu", static_cast<ull>(a),
                 static_cast<ull>(i - off));
  }
  s.reset();
  s = MustOpen(disk.PowerLoss());
  ck_assert_uint_eq(s->exception_count(), 0);
  ASSERT_STR_EQ(s->StatusLine(), "2/" + std::to_string(total) + " 2");
  absl::StatusOr<MergeRun> r = s->PrepareMerge();
  ck_assert(r.ok() && r->count == 0);
  // A merged store takes new exceptions from the start again.
  absl::StatusOr<uint64_t> c = s->Allocate(12345, WriteSource::kOrigin);
  ck_assert(c.ok());
  ck_assert_uint_eq(*c, 2);
}
END_TEST

START_TEST(merge_at_exact_area_boundaries) {
  for (size_t n : {size_t{1}, kEpa - 1, kEpa, kEpa + 1, 2 * kEpa}) {
    FaultFile disk;
    Built b = BuildForMerge(disk, n, 100 + n);
    const std::vector<std::vector<char>> view = SnapshotView(b);
    const std::vector<MergeRun> expect = ExpectedRuns(b.olds);
    std::unique_ptr<ExceptionStore> s = MustOpen(disk.Handle());
    const uint64_t total = disk.Contents().size() / 512;
    size_t remaining = n, next_run = 0;
    ck_assert(MergeSteps(*s, b, remaining, &expect, &next_run, total));
    ck_assert(b.origin == view);
    ASSERT_STR_EQ(s->StatusLine(), "2/" + std::to_string(total) + " 2");
  }
}
END_TEST

START_TEST(merge_refused_while_exceptions_in_flight) {
  FaultFile disk;
  std::unique_ptr<ExceptionStore> s = MustOpen(disk.Handle());
  absl::StatusOr<uint64_t> c = s->Allocate(1, WriteSource::kOrigin);
  ck_assert(c.ok());
  ck_assert(!s->PrepareMerge().ok());  // allocated, not committed
  ASSERT_OK(s->Commit(*c, false));
  ck_assert(!s->PrepareMerge().ok());  // committed, not durable
  ASSERT_OK(s->Flush());
  absl::StatusOr<MergeRun> r = s->PrepareMerge();
  ck_assert(r.ok());
  ck_assert_uint_eq(r->count, 1);
  ck_assert_uint_eq(r->old_chunk, 1);
  ck_assert_uint_eq(r->cow_chunk, 2);
  ck_assert(!s->CommitMerge(2).ok());  // more than there is
  ASSERT_OK(s->CommitMerge(1));
  ck_assert(!s->CommitMerge(1).ok());  // nothing left
}
END_TEST

// Duplicates (old kernels): the earliest record of an origin chunk is the
// snapshot's; a later one shadows nothing and must never reach the
// origin. A batch holding both would take one chunk lock twice and copy
// in any order, and the kernel fails such a merge: so does the store, at
// the first shadowed record, naming the chunk, before anything is copied.
START_TEST(merge_with_duplicate_records) {
  struct Case {
    std::vector<DiskRecord> recs;
    uint32_t batch;
    size_t merged_before;  // records merged before the duplicate is met
  } cases[] = {
      {{{5, 2}, {9, 3}, {5, 4}, {6, 5}}, 16384, 0},  // in the first batch
      {{{5, 2}, {5, 3}, {8, 4}, {9, 5}}, 2, 2},      // in a later one
  };
  for (const Case& c : cases) {
    std::vector<char> img(40 * kCb, 0);
    snap::DiskHeader{snap::kSnapMagic, 1, 1, kCs}.Encode(img);
    for (size_t i = 0; i < c.recs.size(); ++i) c.recs[i].Encode(img.data() + kCb + 16 * i);
    FaultFile disk(img, "dup.cow");
    std::unique_ptr<ExceptionStore> s = MustOpen(disk.Handle());
    ck_assert_uint_eq(s->Lookup(5)->cow_chunk, 2);
    size_t merged = 0;
    absl::StatusOr<std::vector<MergeRun>> runs;
    for (;;) {
      runs = s->PrepareMergeRuns(c.batch);
      if (!runs.ok() || runs->empty()) break;
      uint32_t n = 0;
      for (const MergeRun& r : *runs) n += r.count;
      ASSERT_OK(s->CommitMerge(n));
      merged += n;
    }
    ck_assert_msg(!runs.ok(), "a merge over a duplicate record went through");
    const std::string msg(runs.status().message());
    ck_assert_msg(msg.find("origin chunk 5") != std::string::npos &&
                      msg.find("nbdsnap check") != std::string::npos,
                  "message: %s", msg.c_str());
    ck_assert_uint_eq(merged, c.merged_before);
    ck_assert(s->valid());
    ck_assert_uint_eq(s->Lookup(5)->cow_chunk, 2);  // the snapshot's data is kept
  }
}
END_TEST

// CommitMerge removes what PrepareMergeRuns handed out, nothing else: no
// exception may be taken in between (a write through a handle opened
// before the merge would otherwise lose its record instead), a count
// larger than prepared is refused, and so is a commit without a prepare.
START_TEST(merge_commit_matches_its_prepare) {
  FaultFile disk;
  std::unique_ptr<ExceptionStore> s = MustOpen(disk.Handle());
  for (uint64_t old : {100, 200, 300}) {
    absl::StatusOr<uint64_t> c = s->Allocate(old, WriteSource::kOrigin);
    ck_assert(c.ok());
    ASSERT_OK(s->WriteChunk(*c, 0, Pattern(old, kCb)));
    ASSERT_OK(s->Commit(*c, true));
  }
  absl::Status none = s->CommitMerge(1);
  ck_assert_msg(absl::IsFailedPrecondition(none), "%s", none.ToString().c_str());
  absl::StatusOr<std::vector<MergeRun>> runs = s->PrepareMergeRuns(1);
  ck_assert(runs.ok() && runs->size() == 1 && (*runs)[0].old_chunk == 300);
  absl::StatusOr<uint64_t> c = s->Allocate(400, WriteSource::kSnapshot);
  ck_assert_msg(!c.ok(), "an exception was allocated during a merge step");
  ck_assert(absl::IsFailedPrecondition(c.status()));
  absl::Status more = s->CommitMerge(2);  // only 300 was copied
  ck_assert_msg(absl::IsFailedPrecondition(more), "%s", more.ToString().c_str());
  ck_assert_uint_eq(s->exception_count(), 3);
  ASSERT_OK(s->CommitMerge(1));
  ck_assert(!s->Lookup(300).has_value());
  ck_assert(s->Lookup(100).has_value() && s->Lookup(200).has_value());
  ck_assert(!s->CommitMerge(1).ok());  // that step is done
  // Allocation works again once the step is committed.
  c = s->Allocate(400, WriteSource::kSnapshot);
  ck_assert(c.ok());
  ASSERT_OK(s->WriteChunk(*c, 0, Pattern(400, kCb)));
  ASSERT_OK(s->Commit(*c, true));
  s.reset();
  s = MustOpen(disk.PowerLoss());
  ck_assert(s->Lookup(100) && s->Lookup(200) && s->Lookup(400) && !s->Lookup(300));
}
END_TEST

// A merge step that steps back into a full area and then stops (here at
// a shadowed duplicate) leaves that area current and full. When the next
// area is known to be zero, the next commit must still find room for its
// record instead of writing the same area again and again.
START_TEST(commit_after_merge_stepped_back_into_full_area) {
  FaultFile disk;
  std::unique_ptr<ExceptionStore> s = MustOpen(disk.Handle());
  for (uint64_t i = 0; i <= kEpa; ++i) {
    absl::StatusOr<uint64_t> c = s->Allocate(1000 + 2 * i, WriteSource::kOrigin);
    ck_assert(c.ok());
    ASSERT_OK(s->Commit(*c, false));
  }
  ASSERT_OK(s->Flush());
  // The last record of area 0 becomes a duplicate of its first.
  std::vector<char> rec(16);
  DiskRecord{1000, kGeo.SlotToChunk(kEpa - 1)}.Encode(rec.data());
  disk.Poke(kGeo.AreaChunk(0) * kCb + (kEpa - 1) * 16, rec);
  absl::StatusOr<std::vector<MergeRun>> runs = s->PrepareMergeRuns(1);
  ck_assert(runs.ok() && runs->size() == 1);
  ASSERT_OK(s->CommitMerge(1));               // area 1 is empty now
  ck_assert(!s->PrepareMergeRuns(1).ok());    // back in area 0: the duplicate
  absl::StatusOr<uint64_t> c = s->Allocate(5, WriteSource::kSnapshot);
  ck_assert_msg(c.ok(), "%s", c.status().ToString().c_str());
  ASSERT_OK(s->WriteChunk(*c, 0, Pattern(5, kCb)));
  auto done = std::make_shared<std::atomic<int>>(-1);
  ExceptionStore* sp = s.get();
  const uint64_t cow = *c;
  std::thread([sp, cow, done] { done->store(sp->Commit(cow, true).ok()); }).detach();
  for (int i = 0; i < 100 && done->load() < 0; ++i)
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  ck_assert_msg(done->load() >= 0, "Commit(wait) still running after 5 s (%llu syncs)",
                static_cast<ull>(disk.counters().syncs));
  ck_assert(done->load() == 1);
  ck_assert(s->Lookup(5)->durable);
  s.reset();
  s = MustOpen(disk.PowerLoss());
  std::optional<snap::Exception> e = s->Lookup(5);
  ck_assert(e && e->cow_chunk == cow);
  ck_assert_uint_eq(s->exception_count(), kEpa);  // area 0 but its duplicate, and 5
}
END_TEST

// The disk dies at the sync of the m-th merge step (after its area write);
// after the power loss (the write kept or lost), the reopened store goes on
// merging from where it is, and the origin ends right: replay is harmless.
START_TEST(merge_survives_power_loss_at_each_step) {
  const size_t n = 2 * kEpa + 9;
  // How many merge steps, and the sync count before merging.
  size_t steps;
  {
    FaultFile disk;
    Built b = BuildForMerge(disk, n, 9);
    steps = ExpectedRuns(b.olds).size();
  }
  for (size_t m = 0; m < steps; ++m) {
    for (int mode = 0; mode < 3; ++mode) {  // lose the write, keep it, torn
      FaultFile disk;
      Built b = BuildForMerge(disk, n, 9);
      const std::vector<std::vector<char>> view = SnapshotView(b);
      const uint64_t total = disk.Contents().size() / 512;
      std::unique_ptr<ExceptionStore> s = MustOpen(disk.Handle());
      disk.CrashAt(disk.counters().syncs + m);
      size_t remaining = n;
      ck_assert_msg(!MergeSteps(*s, b, remaining, nullptr, nullptr, total),
                    "merge step %zu did not fail", m);
      const size_t before_failed = remaining;
      s.reset();
      std::unique_ptr<FaultFile> img =
          mode == 0   ? disk.PowerLoss()
          : mode == 1 ? disk.PowerLossKeeping([](const Event&) { return true; })
                      : disk.PowerLossTorn(m);
      s = MustOpen(img->Handle());
      // A prefix is left: everything before the failed step, or less.
      remaining = s->exception_count();
      ck_assert_uint_le(remaining, before_failed);
      ck_assert_uint_ge(remaining + 2 * kEpa, before_failed);
      for (size_t i = 0; i < n; ++i)
        EXPECT(s->Lookup(b.olds[i]).has_value() == (i < remaining));
      ck_assert(MergeSteps(*s, b, remaining, nullptr, nullptr, total));
      ck_assert_msg(b.origin == view, "step %zu mode %d: origin differs after the merge", m,
                    mode);
      ASSERT_STR_EQ(s->StatusLine(), "2/" + std::to_string(total) + " 2");
    }
  }
}
END_TEST

// Area I/O fails in a merge step: the step fails, the store keeps every
// record it had, and a retry merges everything.
START_TEST(merge_area_io_error_fails_step_then_retry) {
  struct Case {
    Op op;
    uint64_t area;
    size_t n;
    size_t left;  // exceptions after the failed step
  } cases[] = {
      {Op::kWrite, 1, kEpa + 4, kEpa + 4},  // the first step's area write
      {Op::kRead, 0, kEpa + 3, kEpa},       // the full area a step goes back to
  };
  for (const Case& c : cases) {
    FaultFile disk;
    Built b = BuildForMerge(disk, c.n, 13);
    const std::vector<std::vector<char>> view = SnapshotView(b);
    std::unique_ptr<ExceptionStore> s = MustOpen(disk.Handle());
    const uint64_t total = disk.Contents().size() / 512;
    snaptest::Fault f;
    f.op = c.op;
    f.lo = kGeo.AreaChunk(c.area) * kCb;
    f.hi = f.lo + kCb;
    disk.AddFault(f);
    size_t remaining = c.n;
    ck_assert(!MergeSteps(*s, b, remaining, nullptr, nullptr, total));
    ck_assert_uint_eq(s->exception_count(), c.left);
    ck_assert(MergeSteps(*s, b, remaining, nullptr, nullptr, total));
    ck_assert(b.origin == view);
  }
}
END_TEST

// The sync of a merge step fails the Linux way (the write is lost, the
// error reported once): nothing may claim durability after it, but the
// header stays valid, because the COW holds the only copy of what is not
// merged yet: after a restart the merge resumes and ends right.
START_TEST(merge_sync_error_stops_store_but_merge_resumes) {
  FaultFile disk;
  const size_t n = kEpa + 5;
  Built b = BuildForMerge(disk, n, 17);
  const std::vector<std::vector<char>> view = SnapshotView(b);
  std::unique_ptr<ExceptionStore> s = MustOpen(disk.Handle());
  const uint64_t total = disk.Contents().size() / 512;
  absl::StatusOr<MergeRun> r = s->PrepareMerge();
  ck_assert(r.ok() && r->count > 0);
  std::vector<char> buf(kCb);
  for (uint32_t k = 0; k < r->count; ++k) {
    ASSERT_OK(s->ReadChunk(r->cow_chunk + k, 0, buf));
    b.origin[r->old_chunk + k] = buf;
  }
  snaptest::Fault f;
  f.op = Op::kSync;
  f.lose_writeback = true;
  disk.AddFault(f);
  ck_assert(!s->CommitMerge(r->count).ok());
  ck_assert_msg(!s->Flush().ok(), "a flush succeeded after a failed sync");
  ck_assert(!s->PrepareMerge().ok());
  s.reset();
  s = MustOpen(disk.PowerLoss());
  ck_assert_msg(s->valid(), "%s", s->invalid_reason().c_str());
  size_t remaining = s->exception_count();
  ck_assert(MergeSteps(*s, b, remaining, nullptr, nullptr, total));
  ck_assert(b.origin == view);
}
END_TEST

Suite* PowerLossSuite() {
  Suite* s = suite_create("power_loss");
  TCase* tc = tcase_create("sync_points");
  tcase_set_timeout(tc, 300);
  tcase_add_test(tc, power_loss_at_every_sync_point);
  tcase_add_test(tc, torn_power_loss_at_every_sync_point);
  tcase_add_test(tc, torn_power_loss_while_creating_store);
  tcase_add_test(tc, power_loss_under_concurrent_commits);
  tcase_add_test(tc, commits_pipeline_data_and_records);
  tcase_add_test(tc, io_error_at_every_write_and_sync);
  suite_add_tcase(s, tc);
  return s;
}

Suite* MergeSuite() {
  Suite* s = suite_create("merge");
  TCase* tc = tcase_create("merge");
  tcase_set_timeout(tc, 300);
  tcase_add_test(tc, merge_runs_newest_first_and_empties_store);
  tcase_add_test(tc, merge_at_exact_area_boundaries);
  tcase_add_test(tc, merge_refused_while_exceptions_in_flight);
  tcase_add_test(tc, merge_with_duplicate_records);
  tcase_add_test(tc, merge_commit_matches_its_prepare);
  tcase_add_test(tc, commit_after_merge_stepped_back_into_full_area);
  tcase_add_test(tc, merge_sync_error_stops_store_but_merge_resumes);
  tcase_add_test(tc, merge_survives_power_loss_at_each_step);
  tcase_add_test(tc, merge_area_io_error_fails_step_then_retry);
  suite_add_tcase(s, tc);
  return s;
}

}  // namespace

int main() { return snaptest::RunSuites({PowerLossSuite(), MergeSuite()}); }
