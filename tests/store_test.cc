// Unit tests of the persistent ("P", "PO") and transient ("N") exception
// stores: round trips, the kernel's on-disk layout, header rules, group
// commit, error injection. Crash and merge tests are in crash_test.cc.
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdlib.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <functional>
#include <future>
#include <map>
#include <memory>
#include <random>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_format.h"
#include "store/block_file.h"
#include "store/cow_format.h"
#include "store/cow_scan.h"
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

using snap::DiskHeader;
using snap::DiskRecord;
using snap::ExceptionStore;
using snap::Geometry;
using snap::StoreOptions;
using snap::StoreType;
using snap::WriteSource;
using snaptest::Event;
using snaptest::Fault;
using snaptest::FaultFile;
using snaptest::FaultKind;
using snaptest::Op;

#define ASSERT_STR_EQ(got, want)                       \
  do {                                                 \
    const std::string got_s_ = (got);                  \
    const std::string want_s_ = (want);                \
    ck_assert_str_eq(got_s_.c_str(), want_s_.c_str()); \
  } while (0)

#define ASSERT_CONTAINS(haystack, needle)                                              \
  do {                                                                                 \
    const std::string h_ = (haystack);                                                 \
    ck_assert_msg(h_.find(needle) != std::string::npos, "'%s' lacks '%s'", h_.c_str(), \
                  needle);                                                             \
  } while (0)

namespace {

using ull = unsigned long long;

// -------------------------------------------------------------- helpers

uint64_t Mix(uint64_t x) {  // splitmix64
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

// Deterministic, tag-dependent bytes.
std::vector<char> Pattern(uint64_t tag, size_t n) {
  std::vector<char> v(n);
  for (size_t i = 0; i < n; i += 8) {
    uint64_t w = Mix(tag * 0x100000001b3ull + i);
    std::memcpy(v.data() + i, &w, std::min<size_t>(8, n - i));
  }
  return v;
}

std::unique_ptr<ExceptionStore> MustOpen(std::unique_ptr<snap::BlockFile> f,
                                         const StoreOptions& o) {
  absl::StatusOr<std::unique_ptr<ExceptionStore>> s = snap::OpenStore(std::move(f), o);
  ck_assert_msg(s.ok(), "open failed: %s", s.status().ToString().c_str());
  return std::move(*s);
}

absl::Status OpenError(std::unique_ptr<snap::BlockFile> f, const StoreOptions& o) {
  absl::StatusOr<std::unique_ptr<ExceptionStore>> s = snap::OpenStore(std::move(f), o);
  ck_assert_msg(!s.ok(), "open unexpectedly succeeded");
  return s.status();
}

StoreOptions Opts(uint32_t cs, StoreType type = StoreType::kPersistent, uint64_t cap = 0) {
  StoreOptions o;
  o.type = type;
  o.chunk_sectors = cs;
  o.size_cap = cap;
  return o;
}

struct Written {
  uint64_t old_chunk;
  uint64_t cow_chunk;
  uint64_t tag;
};

// Allocates, writes `bytes` bytes of Pattern(tag) at the chunk's start and
// commits one exception.
Written Add(ExceptionStore& s, uint64_t old_chunk, uint64_t tag, size_t bytes, bool wait,
            WriteSource src = WriteSource::kOrigin) {
  absl::StatusOr<uint64_t> c = s.Allocate(old_chunk, src);
  ck_assert_msg(c.ok(), "allocate %llu: %s", static_cast<ull>(old_chunk),
                c.status().ToString().c_str());
  std::vector<char> data = Pattern(tag, bytes);
  ASSERT_OK(s.WriteChunk(*c, 0, data));
  ASSERT_OK(s.Commit(*c, wait));
  return {old_chunk, *c, tag};
}

void Verify(ExceptionStore& s, const std::vector<Written>& w, size_t bytes) {
  EXPECT_MSG(s.exception_count() == w.size(), "%llu exceptions, want %zu",
             static_cast<ull>(s.exception_count()), w.size());
  std::vector<char> buf(bytes);
  for (const Written& x : w) {
    std::optional<snap::Exception> e = s.Lookup(x.old_chunk);
    EXPECT_MSG(e.has_value(), "chunk %llu missing", static_cast<ull>(x.old_chunk));
    EXPECT_MSG(e->cow_chunk == x.cow_chunk, "chunk %llu -> %llu, want %llu",
               static_cast<ull>(x.old_chunk), static_cast<ull>(e->cow_chunk),
               static_cast<ull>(x.cow_chunk));
    ASSERT_OK(s.ReadChunk(x.cow_chunk, 0, buf));
    EXPECT_MSG(buf == Pattern(x.tag, bytes), "data of chunk %llu differs",
               static_cast<ull>(x.old_chunk));
  }
}

// Distinct origin chunks: runs of sequential ones mixed with random ones.
std::vector<uint64_t> OriginChunks(size_t n, uint64_t seed, uint64_t range = 1 << 20) {
  std::mt19937_64 rng(seed);
  std::set<uint64_t> seen;
  std::vector<uint64_t> out;
  while (out.size() < n) {
    uint64_t start = rng() % range;
    uint64_t len = (rng() % 3 == 0) ? 1 + rng() % 12 : 1;
    for (uint64_t i = 0; i < len && out.size() < n; ++i)
      if (seen.insert(start + i).second) out.push_back(start + i);
  }
  return out;
}

std::string FirstDiff(const std::vector<char>& a, const std::vector<char>& b, uint64_t cb) {
  size_t n = std::min(a.size(), b.size());
  for (size_t i = 0; i < n; ++i)
    if (a[i] != b[i])
      return "first difference at byte " + std::to_string(i) + " (chunk " +
             std::to_string(i / cb) + " offset " + std::to_string(i % cb) + ")";
  if (a.size() != b.size())
    return "sizes differ: " + std::to_string(a.size()) + " vs " + std::to_string(b.size());
  return "identical";
}

bool AllZero(const std::vector<char>& v, uint64_t off, uint64_t len) {
  for (uint64_t i = off; i < off + len; ++i)
    if (i < v.size() && v[i] != 0) return false;
  return true;
}

std::vector<char> HeaderChunk(uint32_t cs, uint32_t valid = 1,
                              uint32_t magic = snap::kSnapMagic, uint32_t version = 1) {
  std::vector<char> c(uint64_t{cs} * 512, 0);
  DiskHeader{magic, valid, version, cs}.Encode(c);
  return c;
}

// A COW image: header, then the given records in allocation order in areas
// (no data), sized to hold `chunks` chunks.
std::vector<char> CraftCow(uint32_t cs, const std::vector<DiskRecord>& recs, uint64_t chunks) {
  Geometry g(cs);
  const uint64_t cb = g.chunk_bytes();
  std::vector<char> img(chunks * cb, 0);
  std::vector<char> h = HeaderChunk(cs);
  std::copy(h.begin(), h.end(), img.begin());
  for (size_t i = 0; i < recs.size(); ++i) {
    uint64_t off =
        g.AreaChunk(i / g.exceptions_per_area()) * cb + (i % g.exceptions_per_area()) * 16;
    recs[i].Encode(img.data() + off);
  }
  return img;
}

// Runs f on a thread; false if it has not returned within `limit` (the
// thread is then left behind, and the test should fail at once).
template <class F>
bool FinishesWithin(std::chrono::seconds limit, F f) {
  auto done = std::make_shared<std::promise<void>>();
  std::future<void> fut = done->get_future();
  std::thread([done, f]() mutable {
    f();
    done->set_value();
  }).detach();
  return fut.wait_for(limit) == std::future_status::ready;
}

class TempDir {
 public:
  TempDir() {
    const char* base = getenv("TMPDIR");
    std::string tmpl = std::string(base && *base ? base : "/tmp") + "/store_test.XXXXXX";
    std::vector<char> buf(tmpl.begin(), tmpl.end());
    buf.push_back(0);
    ck_assert_msg(mkdtemp(buf.data()) != nullptr, "mkdtemp %s: %s", tmpl.c_str(),
                  strerror(errno));
    path_ = buf.data();
  }
  ~TempDir() {
    std::error_code ec;
    std::filesystem::remove_all(path_, ec);
  }
  std::string File(const std::string& name) const { return path_ + "/" + name; }

 private:
  std::string path_;
};

uint64_t AreaWrites(const std::vector<Event>& ev, const Geometry& g) {
  uint64_t n = 0;
  for (const Event& e : ev)
    if (e.op == Op::kWrite && e.ok && !e.all_zero && e.offset % g.chunk_bytes() == 0 &&
        e.offset / g.chunk_bytes() != 0 && g.IsMetadataChunk(e.offset / g.chunk_bytes()))
      ++n;
  return n;
}

// ---------------------------------------------------------- round trips

void RoundTrip(uint32_t cs, size_t n,
               const std::function<std::unique_ptr<snap::BlockFile>()>& open_file,
               const std::function<std::unique_ptr<snap::BlockFile>()>& durable_file) {
  const uint64_t cb = uint64_t{cs} * 512;
  std::vector<uint64_t> olds = OriginChunks(n, cs);
  std::vector<Written> w;
  {
    std::unique_ptr<ExceptionStore> s = MustOpen(open_file(), Opts(cs));
    ck_assert_uint_eq(s->chunk_sectors(), cs);
    for (size_t i = 0; i < n; ++i) w.push_back(Add(*s, olds[i], 1000 * cs + i, cb, i % 3 == 0));
    ASSERT_OK(s->Flush());
    Verify(*s, w, cb);
    for (const Written& x : w) ck_assert(s->Lookup(x.old_chunk)->durable);
    // Allocation order: slots 0, 1, 2, ...
    Geometry g(cs);
    for (size_t i = 0; i < n; ++i) ck_assert_uint_eq(w[i].cow_chunk, g.SlotToChunk(i));
  }
  {
    std::unique_ptr<ExceptionStore> s = MustOpen(open_file(), Opts(cs));
    Verify(*s, w, cb);
    ck_assert(s->valid());
    ck_assert_uint_eq(s->notes().size(), 0);
  }
  if (durable_file) {
    std::unique_ptr<ExceptionStore> s = MustOpen(durable_file(), Opts(cs));
    Verify(*s, w, cb);
  }
}

START_TEST(roundtrip_chunk_sizes_on_fault_file) {
  struct {
    uint32_t cs;
    size_t n;
  } cases[] = {{1, 120}, {8, 120}, {128, 40}, {2048, 12}};
  for (const auto& c : cases) {
    auto file = std::make_shared<std::unique_ptr<FaultFile>>(std::make_unique<FaultFile>());
    RoundTrip(
        c.cs, c.n, [&]() -> std::unique_ptr<snap::BlockFile> { return (*file)->Handle(); },
        [&]() -> std::unique_ptr<snap::BlockFile> { return (*file)->PowerLoss(); });
  }
}
END_TEST

START_TEST(roundtrip_chunk_sizes_on_real_files) {
  TempDir dir;
  struct {
    uint32_t cs;
    size_t n;
  } cases[] = {{1, 120}, {8, 120}, {128, 40}, {2048, 12}};
  for (const auto& c : cases) {
    std::string path = dir.File("cow" + std::to_string(c.cs));
    RoundTrip(
        c.cs, c.n,
        [&]() -> std::unique_ptr<snap::BlockFile> {
          absl::StatusOr<std::unique_ptr<snap::BlockFile>> f =
              snap::OpenPosixFile(path, snap::OpenMode::kReadWriteCreate);
          ck_assert_msg(f.ok(), "%s", f.status().ToString().c_str());
          return std::move(*f);
        },
        nullptr);
    // OpenStoreFile, read-only: same view, and the file is not changed.
    StoreOptions ro = Opts(0);
    ro.read_only = true;
    absl::StatusOr<std::unique_ptr<ExceptionStore>> s = snap::OpenStoreFile(path, ro);
    ck_assert_msg(s.ok(), "%s", s.status().ToString().c_str());
    ck_assert_uint_eq((*s)->chunk_sectors(), c.cs);
    ck_assert_uint_eq((*s)->exception_count(), c.n);
    absl::StatusOr<uint64_t> a = (*s)->Allocate(99999999, WriteSource::kOrigin);
    ck_assert(!a.ok());
    ck_assert(!(*s)->WriteChunk(2, 0, std::vector<char>(512)).ok());
  }
}
END_TEST

START_TEST(real_file_is_locked_while_open) {
  TempDir dir;
  std::string path = dir.File("locked.cow");
  absl::StatusOr<std::unique_ptr<ExceptionStore>> a = snap::OpenStoreFile(path, Opts(8));
  ck_assert_msg(a.ok(), "%s", a.status().ToString().c_str());
  absl::StatusOr<std::unique_ptr<ExceptionStore>> b = snap::OpenStoreFile(path, Opts(8));
  ck_assert_msg(!b.ok(), "a second read-write open of a store in use succeeded");
  ASSERT_CONTAINS(std::string(b.status().message()), "in use");
  StoreOptions ro = Opts(8);
  ro.read_only = true;
  absl::StatusOr<std::unique_ptr<ExceptionStore>> c = snap::OpenStoreFile(path, ro);
  ck_assert_msg(c.ok(), "read-only open refused: %s", c.status().ToString().c_str());
  a->reset();
  absl::StatusOr<std::unique_ptr<ExceptionStore>> d = snap::OpenStoreFile(path, Opts(8));
  ck_assert_msg(d.ok(), "reopen after close refused: %s", d.status().ToString().c_str());
}
END_TEST

// The "in use" message names the process holding the lock, not the first
// one found with the file open, which may be a reader (nbdsnap dump).
START_TEST(real_file_lock_message_names_the_holder) {
  TempDir dir;
  const std::string path = dir.File("held.cow");
  { ck_assert(snap::OpenPosixFile(path, snap::OpenMode::kReadWriteCreate).ok()); }
  int ready[2];
  ck_assert(pipe(ready) == 0);
  // Forked before the lock is taken (by pids that sort first as often as
  // not): a reader, then the holder.
  std::vector<pid_t> kids;
  for (int role = 0; role < 2; ++role) {
    pid_t pid = fork();
    ck_assert(pid >= 0);
    if (pid == 0) {
      if (role == 0) {
        int fd = open(path.c_str(), O_RDONLY);
        (void)fd;
      } else {
        absl::StatusOr<std::unique_ptr<snap::BlockFile>> f =
            snap::OpenPosixFile(path, snap::OpenMode::kReadWrite);
        if (!f.ok() || !(*f)->LockExclusive().ok()) _exit(1);
        f->release();  // keep it open (and locked) until killed
      }
      (void)!write(ready[1], "x", 1);
      pause();
      _exit(0);
    }
    char c;
    ck_assert(read(ready[0], &c, 1) == 1);
    kids.push_back(pid);
  }
  absl::StatusOr<std::unique_ptr<snap::BlockFile>> f =
      snap::OpenPosixFile(path, snap::OpenMode::kReadWrite);
  ck_assert(f.ok());
  absl::Status st = (*f)->LockExclusive();
  for (pid_t k : kids) {
    kill(k, SIGKILL);
    waitpid(k, nullptr, 0);
  }
  ck_assert(!st.ok());
  const std::string msg(st.message());
  ck_assert_msg(msg.find(absl::StrFormat("pid %d)", kids[1])) != std::string::npos,
                "reader %d, holder %d: %s", kids[0], kids[1], msg.c_str());
}
END_TEST

START_TEST(reopen_at_area_boundaries_then_append) {
  for (uint32_t cs : {1u, 8u}) {
    Geometry g(cs);
    const uint64_t epa = g.exceptions_per_area();
    for (uint64_t n : {epa - 1, epa, epa + 1, 2 * epa, 2 * epa + 1}) {
      const size_t bytes = 64;
      FaultFile disk;
      std::vector<uint64_t> olds = OriginChunks(n + epa, n * 7 + cs);
      std::vector<Written> w;
      {
        std::unique_ptr<ExceptionStore> s = MustOpen(disk.Handle(), Opts(cs));
        for (uint64_t i = 0; i < n; ++i)
          w.push_back(Add(*s, olds[i], i, bytes, i % 5 == 0 || i + 1 == n));
      }
      for (int round = 0; round < 2; ++round) {
        std::unique_ptr<ExceptionStore> s = MustOpen(disk.Handle(), Opts(cs));
        Verify(*s, w, bytes);
        snap::StoreUsage u = s->Usage();
        ck_assert_uint_eq(u.used_sectors, g.SlotToChunk(w.size()) * cs);
        ck_assert_uint_eq(u.metadata_sectors, (w.size() / epa + 2) * cs);
        if (round == 1) break;
        // Append into the partial area (and beyond it), after the reload.
        const uint64_t more = epa / 2 + 3;
        for (uint64_t i = 0; i < more; ++i) {
          size_t k = w.size();
          Written x = Add(*s, olds[k], k, bytes, i + 1 == more);
          ck_assert_msg(x.cow_chunk == g.SlotToChunk(k),
                        "cs %u n %llu: exception %zu got chunk %llu, want %llu", cs,
                        static_cast<ull>(n), k, static_cast<ull>(x.cow_chunk),
                        static_cast<ull>(g.SlotToChunk(k)));
          ck_assert(!g.IsMetadataChunk(x.cow_chunk));
          w.push_back(x);
        }
        Verify(*s, w, bytes);
      }
      // And the layout stayed the kernel's: area k holds exceptions k*epa...
      std::vector<char> img = disk.Contents();
      const uint64_t cb = g.chunk_bytes();
      for (size_t i = 0; i < w.size(); ++i) {
        DiskRecord r =
            DiskRecord::Decode(img.data() + g.AreaChunk(i / epa) * cb + (i % epa) * 16);
        ck_assert_uint_eq(r.old_chunk, w[i].old_chunk);
        ck_assert_uint_eq(r.new_chunk, w[i].cow_chunk);
      }
    }
  }
}
END_TEST

START_TEST(status_line_arithmetic) {
  // cs = 8: epa 256; a fresh store is "16/<total> 16".
  const uint32_t cs = 8;
  Geometry g(cs);
  const uint64_t cap = 8 << 20;
  FaultFile disk;
  std::unique_ptr<ExceptionStore> s =
      MustOpen(disk.Handle(), Opts(cs, StoreType::kPersistent, cap));
  ASSERT_STR_EQ(s->StatusLine(), "16/16384 16");
  const uint64_t epa = g.exceptions_per_area();
  for (uint64_t k = 1; k <= 2 * epa + 3; ++k) {
    Add(*s, 10 * k, k, 16, true);
    std::string want =
        std::to_string(g.SlotToChunk(k) * cs) + "/16384 " + std::to_string((k / epa + 2) * cs);
    ASSERT_STR_EQ(s->StatusLine(), want);
  }
  // The kernel's figures at the area boundary: 256 exceptions use chunks
  // 2..257, area 1 is chunk 258, so next_free is 259: 259*8 = 2072.
  s.reset();
  FaultFile d2;
  s = MustOpen(d2.Handle(), Opts(cs, StoreType::kPersistent, cap));
  for (uint64_t k = 0; k < epa; ++k) Add(*s, k, k, 16, false);
  ASSERT_OK(s->Flush());
  ASSERT_STR_EQ(s->StatusLine(), "2072/16384 24");
  s.reset();
  s = MustOpen(d2.Handle(), Opts(cs, StoreType::kPersistent, cap));
  ASSERT_STR_EQ(s->StatusLine(), "2072/16384 24");
  // No cap: the total is the file's size.
  FaultFile d3;
  s = MustOpen(d3.Handle(), Opts(cs));
  ASSERT_STR_EQ(s->StatusLine(), "16/16 16");
  Add(*s, 5, 5, 16, true);
  ASSERT_STR_EQ(s->StatusLine(), "24/24 16");
}
END_TEST

START_TEST(lazy_commit_visible_at_once_durable_after_flush) {
  FaultFile disk;
  std::unique_ptr<ExceptionStore> s = MustOpen(disk.Handle(), Opts(8));
  Written a = Add(*s, 7, 1, 4096, false);
  std::optional<snap::Exception> e = s->Lookup(7);
  ck_assert(e.has_value());
  ck_assert_uint_eq(e->cow_chunk, a.cow_chunk);
  ck_assert_msg(!e->durable, "a lazy commit claims to be durable before any sync");
  ASSERT_OK(s->Flush());
  ck_assert(s->Lookup(7)->durable);
  // A commit that waits is durable when it returns, and is on the durable
  // image.
  Written b = Add(*s, 8, 2, 4096, true);
  ck_assert(s->Lookup(8)->durable);
  std::unique_ptr<ExceptionStore> r = MustOpen(disk.PowerLoss(), Opts(8));
  Verify(*r, {a, b}, 4096);
}
END_TEST

// The whole file, byte for byte, against what the kernel writes (§1.2-1.8),
// both in a file the store grows and in a zero-filled one of fixed size (a
// new LV or loop device, what the kernel sees).
START_TEST(on_disk_layout_matches_kernel) {
  for (uint32_t cs : {1u, 8u}) {
    for (bool presized : {false, true}) {
      Geometry g(cs);
      const uint64_t cb = g.chunk_bytes();
      const uint64_t epa = g.exceptions_per_area();
      const uint64_t n = 2 * epa + 6;
      uint64_t size = 2 * cb;
      for (uint64_t i = 0; i < n; ++i) {
        uint64_t c = g.SlotToChunk(i);
        size = std::max(size, (c + 1 + (g.IsMetadataChunk(c + 1) ? 1 : 0)) * cb);
      }
      const uint64_t initial = presized ? size + 3 * cb : 0;
      FaultFile disk(std::vector<char>(initial, 0), "layout.cow");
      std::vector<uint64_t> olds = OriginChunks(n, 77 + cs);
      std::vector<Written> w;
      {
        std::unique_ptr<ExceptionStore> s = MustOpen(disk.Handle(), Opts(cs));
        for (uint64_t i = 0; i < n; ++i) w.push_back(Add(*s, olds[i], i, cb, i % 4 == 3));
        ASSERT_OK(s->Flush());
      }
      std::vector<char> want(std::max(size, initial), 0);
      std::vector<char> h = HeaderChunk(cs);
      std::copy(h.begin(), h.end(), want.begin());
      for (uint64_t i = 0; i < n; ++i) {
        // new_chunk 2, 3, ... skipping the area chunks.
        ck_assert_uint_eq(w[i].cow_chunk, g.SlotToChunk(i));
        DiskRecord{olds[i], w[i].cow_chunk}.Encode(want.data() + g.AreaChunk(i / epa) * cb +
                                                   (i % epa) * 16);
        std::vector<char> d = Pattern(i, cb);
        std::copy(d.begin(), d.end(),
                  want.begin() + static_cast<ptrdiff_t>(w[i].cow_chunk * cb));
      }
      std::vector<char> got = disk.Contents();
      ck_assert_msg(got == want, "cs %u presized %d: %s", cs, presized,
                    FirstDiff(got, want, cb).c_str());
      ck_assert_msg(disk.Durable() == want, "cs %u presized %d: durable image: %s", cs,
                    presized, FirstDiff(disk.Durable(), want, cb).c_str());
      // When a full area is written, the next area reads as zeros: zeroed
      // by a write before it (required when the file already held that
      // area, as the kernel does), or never written (past the old end).
      std::vector<Event> ev = disk.events();
      for (uint64_t a = 0; a < n / epa; ++a) {
        ptrdiff_t last_area = -1, zero_next = -1, dirty_next = -1;
        for (size_t i = 0; i < ev.size(); ++i)
          if (ev[i].op == Op::kWrite && ev[i].ok && ev[i].offset == g.AreaChunk(a) * cb &&
              ev[i].length == cb)
            last_area = i;  // the write of the full area
        ck_assert(last_area >= 0);
        for (ptrdiff_t i = 0; i < last_area; ++i) {
          if (ev[i].op != Op::kWrite || !ev[i].ok) continue;
          if (ev[i].offset + ev[i].length <= g.AreaChunk(a + 1) * cb ||
              ev[i].offset >= (g.AreaChunk(a + 1) + 1) * cb)
            continue;
          if (ev[i].all_zero && ev[i].length == cb && zero_next < 0) zero_next = i;
          if (!ev[i].all_zero && dirty_next < 0) dirty_next = i;
        }
        ck_assert_msg(dirty_next < 0, "cs %u: area %llu written before area %llu was full", cs,
                      static_cast<ull>(a + 1), static_cast<ull>(a));
        if (presized)
          ck_assert_msg(zero_next >= 0 && zero_next < last_area,
                        "cs %u: area %llu (inside the file) was not zeroed before the full "
                        "area %llu was written",
                        cs, static_cast<ull>(a + 1), static_cast<ull>(a));
      }
    }
  }
}
END_TEST

// A COW whose later areas hold old bytes (LVM only zeroes the first 4 KiB
// of a new volume): the next area must be zeroed before the full area that
// leads to it. The kernel writes the full area with PREFLUSH, which makes
// the zeroing durable first; without a sync in between, a power loss can
// keep the full area and lose the zeroing.
std::vector<char> GarbageAfter4k(size_t size, uint64_t seed) {
  std::vector<char> img(size);
  std::mt19937_64 rng(seed);
  for (char& c : img) c = static_cast<char>(rng());
  std::fill(img.begin(), img.begin() + 4096, 0);
  return img;
}

START_TEST(full_area_commit_syncs_zeroed_next_area_first) {
  const uint32_t cs = 1;
  Geometry g(cs);
  const uint64_t cb = g.chunk_bytes();
  const uint64_t epa = g.exceptions_per_area();
  FaultFile disk(GarbageAfter4k(64 * 1024, 1), "garbage.cow");
  disk.set_block_device(true);  // an LV: LVM wiped only its first 4 KiB
  {
    std::unique_ptr<ExceptionStore> s = MustOpen(disk.Handle(), Opts(cs));
    for (uint64_t i = 0; i < epa; ++i) Add(*s, 100 + 3 * i, i, 64, true);
    Add(*s, 5000, 5000, 64, true);
  }
  ck_assert_msg(disk.Contents() == disk.Durable(), "not all durable");
  ck_assert_msg(AllZero(disk.Contents(), g.AreaChunk(1) * cb + 16, cb - 16),
                "area 1 holds old bytes after its first record");
  std::vector<Event> ev = disk.events();
  ptrdiff_t zero_next = -1, full_area = -1;
  for (size_t i = 0; i < ev.size(); ++i) {
    if (ev[i].op != Op::kWrite || !ev[i].ok) continue;
    if (ev[i].offset == g.AreaChunk(1) * cb && ev[i].all_zero && zero_next < 0) zero_next = i;
    if (ev[i].offset == g.AreaChunk(0) * cb) full_area = i;
  }
  ck_assert_msg(zero_next >= 0 && zero_next < full_area,
                "area 1 was not zeroed before the full area 0 was written");
  ck_assert_msg(ev[full_area].sync_epoch > ev[zero_next].sync_epoch,
                "no sync between zeroing area 1 (event %td) and writing the full "
                "area 0 (event %td): the kernel orders them with PREFLUSH",
                zero_next, full_area);
}
END_TEST

// What that missing sync costs: a COW whose later areas hold garbage (LVM
// only zeroes the first 4 KiB of a new volume) keeps the full area 0 but
// loses the zeroing of area 1 in a power loss; the reload then reads the
// garbage in area 1 as records.
START_TEST(power_loss_keeping_full_area_but_not_zeroed_next_area) {
  const uint32_t cs = 1;
  Geometry g(cs);
  const uint64_t cb = g.chunk_bytes();
  const uint64_t epa = g.exceptions_per_area();
  FaultFile disk(GarbageAfter4k(64 * 1024, 1), "garbage.cow");
  disk.set_block_device(true);  // an LV: LVM wiped only its first 4 KiB
  std::vector<Written> w;
  std::unique_ptr<ExceptionStore> s = MustOpen(disk.Handle(), Opts(cs));
  for (uint64_t i = 0; i + 1 < epa; ++i) w.push_back(Add(*s, 100 + 3 * i, i, 64, true));
  // The last commit fills area 0; the disk dies at its final sync and keeps
  // the write of area 0, but not the zeroing of area 1.
  disk.CrashAt(disk.counters().syncs + 1);
  absl::StatusOr<uint64_t> c = s->Allocate(5000, WriteSource::kOrigin);
  ck_assert(c.ok());
  ASSERT_OK(s->WriteChunk(*c, 0, Pattern(epa - 1, 64)));
  ck_assert(!s->Commit(*c, true).ok());
  std::unique_ptr<FaultFile> after = disk.PowerLossKeeping(
      [&](const Event& e) { return !(e.op == Op::kWrite && e.offset == g.AreaChunk(1) * cb); });
  absl::StatusOr<std::unique_ptr<ExceptionStore>> r =
      snap::OpenStore(std::move(after), Opts(cs));
  ck_assert_msg(r.ok(), "reopen after the power loss failed: %s",
                r.status().ToString().c_str());
  // Only area 0's records (or the first epa-1 of them) may be there.
  ck_assert_msg((*r)->exception_count() <= epa,
                "%llu exceptions after reload: garbage in area 1 was read as records",
                static_cast<ull>((*r)->exception_count()));
  for (const Written& x : w) ck_assert((*r)->Lookup(x.old_chunk).has_value());
}
END_TEST

// ---------------------------------------------------------- header rules

START_TEST(magic_zero_file_becomes_new_store) {
  // Empty file.
  {
    FaultFile disk;
    std::unique_ptr<ExceptionStore> s = MustOpen(disk.Handle(), Opts(8));
    ck_assert(s->valid());
    ck_assert_uint_eq(s->exception_count(), 0);
    std::vector<char> d = disk.Durable();
    ck_assert_uint_eq(d.size(), 8192);
    std::vector<char> h = HeaderChunk(8);
    ck_assert(std::equal(h.begin(), h.end(), d.begin()));
    ck_assert(AllZero(d, 4096, 4096));
  }
  // A block device with its first 4 KiB zero (what LVM wipes), garbage
  // after: area 0 (chunk 1 = bytes 4096..8191 at cs 8) is zeroed, the rest
  // is left alone.
  {
    std::vector<char> img(64 * 1024);
    std::mt19937_64 rng(2);
    for (char& c : img) c = static_cast<char>(rng() | 1);
    std::fill(img.begin(), img.begin() + 4096, 0);
    FaultFile disk(img, "lvm.cow");
    disk.set_block_device(true);
    std::unique_ptr<ExceptionStore> s = MustOpen(disk.Handle(), Opts(8));
    ck_assert(s->valid());
    ck_assert_uint_eq(s->exception_count(), 0);
    std::vector<char> d = disk.Durable();
    std::vector<char> h = HeaderChunk(8);
    ck_assert(std::equal(h.begin(), h.end(), d.begin()));
    ck_assert_msg(AllZero(d, 4096, 4096), "area 0 not zeroed");
    ck_assert(std::equal(img.begin() + 8192, img.end(), d.begin() + 8192));
    ASSERT_STR_EQ(s->StatusLine(), "16/128 16");
    // And it works as a store.
    Written a = Add(*s, 3, 3, 4096, true);
    ck_assert_uint_eq(a.cow_chunk, 2);
    s.reset();
    s = MustOpen(disk.PowerLoss(), Opts(8));
    Verify(*s, {a}, 4096);
  }
  // A file shorter than a header, all zero: new.
  {
    FaultFile disk(std::vector<char>(10, 0), "tiny.cow");
    std::unique_ptr<ExceptionStore> s = MustOpen(disk.Handle(), Opts(1));
    ck_assert(s->valid());
    ck_assert_uint_ge(disk.Contents().size(), 1024);
  }
  // Read-only open of a file with no store: refused, nothing written.
  {
    FaultFile disk(std::vector<char>(8192, 0), "zero.cow");
    StoreOptions ro = Opts(8);
    ro.read_only = true;
    absl::Status st = OpenError(disk.Handle(), ro);
    ASSERT_CONTAINS(std::string(st.message()), "no snapshot store");
    ck_assert_uint_eq(disk.counters().writes, 0);
  }
}
END_TEST

// A new store writes its first two chunks (128 KiB by default), so a
// regular file must be all zero to become one: only its first 4 KiB being
// zero (a btrfs image has its superblock at 64 KiB) is not enough, for a
// persistent store or a transient one, which writes data from byte 0. A
// block device needs only its first 4 KiB zero, as LVM leaves it.
START_TEST(new_store_needs_all_zero_file) {
  std::vector<char> img(1 << 20, 0);
  std::memcpy(&img[65536 + 0x40], "_BHRfS_M", 8);
  for (StoreType type : {StoreType::kPersistent, StoreType::kTransient}) {
    FaultFile disk(img, "btrfs.img");
    absl::Status st = OpenError(disk.Handle(), Opts(type == StoreType::kTransient ? 8 : 0, type));
    ASSERT_CONTAINS(std::string(st.message()), "byte 65600 is not zero");
    ASSERT_CONTAINS(std::string(st.message()), "btrfs.img");
    ck_assert(disk.Contents() == img);
    ck_assert_uint_eq(disk.counters().writes, 0);
    FaultFile dev(img, "lv");
    dev.set_block_device(true);
    ck_assert(snap::OpenStore(dev.Handle(), Opts(8, type)).ok());
  }
  // All zero, however big and wherever it ends: new.
  for (size_t size : {size_t{20}, size_t{4096}, size_t{3 << 20}}) {
    FaultFile disk(std::vector<char>(size, 0), "zero.cow");
    ck_assert(snap::OpenStore(disk.Handle(), Opts(8)).ok());
  }
  // The last byte set.
  std::vector<char> last(3 << 20, 0);
  last.back() = 1;
  FaultFile disk(last, "last.cow");
  ASSERT_CONTAINS(std::string(OpenError(disk.Handle(), Opts(8)).message()),
                  absl::StrFormat("byte %d is not zero", last.size() - 1).c_str());
}
END_TEST

// FirstNonZeroByte of a POSIX file skips holes and finds data anywhere;
// the BlockFile default reads every byte and agrees.
START_TEST(first_non_zero_byte_of_sparse_files) {
  TempDir dir;
  const std::string path = dir.File("sparse.img");
  struct Case {
    uint64_t size;
    std::optional<uint64_t> at;
  } cases[] = {{0, std::nullopt},       {8 << 20, std::nullopt},  {8 << 20, 0},
               {8 << 20, (5 << 20) + 3}, {8 << 20, (8 << 20) - 1}, {100, 99}};
  for (const Case& c : cases) {
    std::filesystem::remove(path);
    {
      absl::StatusOr<std::unique_ptr<snap::BlockFile>> f =
          snap::OpenPosixFile(path, snap::OpenMode::kReadWriteCreate);
      ck_assert(f.ok());
      ASSERT_OK((*f)->GrowTo(c.size));
      // Zeros written as data too, so that not everything is a hole.
      ASSERT_OK((*f)->PWrite(std::vector<char>(std::min<uint64_t>(c.size, 70000), 0), 0));
      if (c.at) ASSERT_OK((*f)->PWrite(std::vector<char>(1, 'x'), *c.at));
    }
    absl::StatusOr<std::unique_ptr<snap::BlockFile>> f =
        snap::OpenPosixFile(path, snap::OpenMode::kReadOnly);
    ck_assert(f.ok());
    absl::StatusOr<std::optional<uint64_t>> got = (*f)->FirstNonZeroByte(c.size);
    ASSERT_OK(got.status());
    ck_assert_msg(*got == c.at, "size %llu: got %lld, want %lld", static_cast<ull>(c.size),
                  got->has_value() ? static_cast<long long>(**got) : -1LL,
                  c.at ? static_cast<long long>(*c.at) : -1LL);
    FaultFile copy(std::vector<char>(c.size, 0), "copy");
    if (c.at) copy.Poke(*c.at, std::vector<char>(1, 'x'));
    got = copy.FirstNonZeroByte(c.size);
    ck_assert(got.ok() && *got == c.at);
  }
}
END_TEST

START_TEST(header_chunk_size_overrides_requested) {
  FaultFile disk;
  std::vector<Written> w;
  {
    std::unique_ptr<ExceptionStore> s = MustOpen(disk.Handle(), Opts(16));
    for (uint64_t i = 0; i < 5; ++i) w.push_back(Add(*s, i * 9, i, 8192, true));
  }
  {
    std::unique_ptr<ExceptionStore> s = MustOpen(disk.Handle(), Opts(8));
    ck_assert_uint_eq(s->chunk_sectors(), 16);
    Verify(*s, w, 8192);
    std::vector<std::string> notes = s->notes();
    ck_assert_uint_eq(notes.size(), 1);
    ASSERT_CONTAINS(notes[0], "overrides");
    ASSERT_STR_EQ(s->StatusLine(), std::to_string(7 * 16) + "/" +
                                       std::to_string(disk.Contents().size() / 512) + " 32");
  }
  for (uint32_t cs : {0u, 16u}) {
    std::unique_ptr<ExceptionStore> s = MustOpen(disk.Handle(), Opts(cs));
    ck_assert_uint_eq(s->chunk_sectors(), 16);
    ck_assert_uint_eq(s->notes().size(), 0);
    Verify(*s, w, 8192);
  }
  // Default for a new store without a size: LVM's 8 sectors.
  FaultFile d2;
  std::unique_ptr<ExceptionStore> s = MustOpen(d2.Handle(), Opts(0));
  ck_assert_uint_eq(s->chunk_sectors(), snap::kDefaultChunkSectors);
}
END_TEST

START_TEST(bad_headers_refused_unchanged) {
  struct Case {
    const char* what;
    std::vector<char> img;
    const char* says;
  };
  std::vector<Case> cases;
  auto cow = CraftCow(8, {{1, 2}}, 16);
  {
    auto v2 = cow;
    DiskHeader{snap::kSnapMagic, 1, 2, 8}.Encode(v2);
    cases.push_back({"version 2", v2, "version"});
    auto v0 = cow;
    DiskHeader{snap::kSnapMagic, 1, 0, 8}.Encode(v0);
    cases.push_back({"version 0", v0, "version"});
  }
  {
    auto m = cow;
    DiskHeader{0x70416e54, 1, 1, 8}.Encode(m);
    cases.push_back({"bad magic", m, "magic"});
    std::vector<char> text(8192, 0);
    std::memcpy(text.data(), "hello, world\n", 13);
    cases.push_back({"text file", text, "magic"});
  }
  for (uint32_t bad_cs : {0u, 3u, 12u, 65u, 1u << 22}) {
    auto c = cow;
    DiskHeader{snap::kSnapMagic, 1, 1, bad_cs}.Encode(c);
    cases.push_back({"bad chunk size", c, "chunk size"});
  }
  {
    // magic 0 but not empty in the first 4 KiB: not ours to overwrite.
    std::vector<char> nz(64 * 1024, 0);
    nz[4095] = 1;
    cases.push_back({"magic 0, byte 4095 set", nz, "not zero"});
    std::vector<char> nz2(64 * 1024, 0);
    nz2[16] = 'x';
    cases.push_back({"magic 0, byte 16 set", nz2, "not zero"});
  }
  for (const Case& c : cases) {
    FaultFile disk(c.img, "bad.cow");
    absl::Status st = OpenError(disk.Handle(), Opts(8));
    ck_assert_msg(std::string(st.message()).find(c.says) != std::string::npos,
                  "%s: message '%s' does not say '%s'", c.what,
                  std::string(st.message()).c_str(), c.says);
    ck_assert_msg(disk.Contents() == c.img, "%s: the file was changed", c.what);
    ck_assert_msg(disk.counters().writes == 0 && disk.counters().grows == 0,
                  "%s: the file was written", c.what);
    // The file's name is in the message.
    ASSERT_CONTAINS(std::string(st.message()), "bad.cow");
  }
}
END_TEST

// A header that claims 1 GiB chunks in a file far smaller is refused
// before anything chunk-sized is allocated (it used to cost a 1 GiB
// buffer, zeroed, to say no).
START_TEST(huge_chunk_header_refused_cheaply) {
  for (uint64_t size : {uint64_t{16}, uint64_t{1} << 20}) {
    std::vector<char> img(size, 0);
    DiskHeader{snap::kSnapMagic, 1, 1, 1u << 21}.Encode(img);
    for (bool ro : {false, true}) {
      FaultFile disk(img, "huge.cow");
      StoreOptions o = Opts(0);
      o.read_only = ro;
      struct rusage before, after;
      getrusage(RUSAGE_SELF, &before);
      absl::Status st = OpenError(disk.Handle(), o);
      getrusage(RUSAGE_SELF, &after);
      ASSERT_CONTAINS(std::string(st.message()), "truncated");
      const long grew_kib = after.ru_maxrss - before.ru_maxrss;
      ck_assert_msg(grew_kib < 64 * 1024, "refusing a %llu-byte file cost %ld KiB",
                    static_cast<ull>(size), grew_kib);
    }
  }
}
END_TEST

START_TEST(valid_zero_opens_invalid) {
  FaultFile disk;
  {
    std::unique_ptr<ExceptionStore> s = MustOpen(disk.Handle(), Opts(8));
    Add(*s, 1, 1, 4096, true);
  }
  std::vector<char> h(16);
  DiskHeader{snap::kSnapMagic, 0, 1, 8}.Encode(h);
  disk.Poke(0, h);
  for (bool ro : {false, true}) {
    StoreOptions o = Opts(8);
    o.read_only = ro;
    std::unique_ptr<ExceptionStore> s = MustOpen(disk.Handle(), o);
    ck_assert(!s->valid());
    ASSERT_STR_EQ(s->StatusLine(), "Invalid");
    ASSERT_CONTAINS(s->invalid_reason(), "valid");
    ck_assert_uint_eq(s->exception_count(), 0);
    ck_assert(!s->Lookup(1).has_value());
    ck_assert(!s->Allocate(2, WriteSource::kOrigin).ok());
    ck_assert(!s->PrepareMerge().ok());
  }
  // Any non-zero valid counts as valid.
  DiskHeader{snap::kSnapMagic, 0xdead, 1, 8}.Encode(h);
  disk.Poke(0, h);
  std::unique_ptr<ExceptionStore> s = MustOpen(disk.Handle(), Opts(8));
  ck_assert(s->valid());
  ck_assert_uint_eq(s->exception_count(), 1);
}
END_TEST

START_TEST(truncated_files_refused) {
  const uint32_t cs = 1;
  Geometry g(cs);
  const uint64_t cb = g.chunk_bytes();
  const uint64_t epa = g.exceptions_per_area();
  FaultFile disk;
  {
    std::unique_ptr<ExceptionStore> s = MustOpen(disk.Handle(), Opts(cs));
    for (uint64_t i = 0; i < epa + 3; ++i) Add(*s, i, i, cb, i + 1 == epa + 3);
  }
  const std::vector<char> full = disk.Contents();
  struct {
    const char* what;
    uint64_t size;
    const char* says;
  } cases[] = {
      {"inside the header", 10, "truncated"},
      {"inside the header chunk", 100, "truncated"},
      {"at the end of the header chunk", cb, "truncated"},
      {"inside area 0", cb + 100, "truncated"},
      {"inside area 1", g.AreaChunk(1) * cb + 1, "truncated"},
      {"before area 1", g.AreaChunk(1) * cb, "truncated"},
      {"inside the last data chunk", (g.SlotToChunk(epa + 2) + 1) * cb - 1, "past the end"},
      {"before the last data chunk", g.SlotToChunk(epa + 2) * cb, "past the end"},
      {"inside an early data chunk", 5 * cb + 7, "past the end"},
  };
  for (const auto& c : cases) {
    std::vector<char> img(full.begin(), full.begin() + static_cast<ptrdiff_t>(c.size));
    FaultFile t(img, "trunc.cow");
    absl::Status st = OpenError(t.Handle(), Opts(cs));
    ck_assert_msg(std::string(st.message()).find(c.says) != std::string::npos,
                  "%s: '%s' does not say '%s'", c.what, std::string(st.message()).c_str(),
                  c.says);
    ck_assert_msg(t.Contents() == img, "%s: the file was changed", c.what);
    absl::StatusOr<snap::CowScan> scan = snap::ScanCow(t);
    ck_assert_msg(scan.ok() && !scan->problems.empty(), "%s: ScanCow lists no problem", c.what);
  }
  // Exactly the whole thing opens.
  FaultFile ok(full, "whole.cow");
  std::unique_ptr<ExceptionStore> s = MustOpen(ok.Handle(), Opts(cs));
  ck_assert_uint_eq(s->exception_count(), epa + 3);
}
END_TEST

START_TEST(records_into_metadata_refused) {
  const uint32_t cs = 1;
  Geometry g(cs);
  struct {
    const char* what;
    std::vector<DiskRecord> recs;
    size_t problems;
  } cases[] = {
      {"chunk 1 (area 0)", {{5, 2}, {6, 1}}, 1},
      {"area 1", {{5, 2}, {6, g.AreaChunk(1)}}, 1},
      {"area 7", {{5, g.AreaChunk(7)}}, 1},
      {"three bad", {{5, 1}, {6, g.AreaChunk(2)}, {7, 3}, {8, 5000}}, 3},
  };
  for (const auto& c : cases) {
    std::vector<char> img = CraftCow(cs, c.recs, 400);
    FaultFile f(img, "meta.cow");
    absl::Status st = OpenError(f.Handle(), Opts(cs));
    ck_assert_msg(f.Contents() == img, "%s: file changed", c.what);
    absl::StatusOr<snap::CowScan> scan = snap::ScanCow(f);
    ck_assert(scan.ok());
    ck_assert_msg(scan->problems.size() == c.problems, "%s: %zu problems, want %zu: %s", c.what,
                  scan->problems.size(), c.problems, st.ToString().c_str());
  }
}
END_TEST

// A header and then garbage: every record is a problem. The scan keeps
// the text of the first few and counts the rest (it kept one string per
// record, so a damaged 100 GiB COW could need GBs), and opening a store
// stops reading at the first.
START_TEST(garbage_records_kept_few_and_open_stops_at_first) {
  std::vector<char> img(4 << 20);
  std::mt19937_64 rng(1);
  for (char& c : img) c = static_cast<char>(rng());
  std::vector<char> h = HeaderChunk(8);
  std::copy(h.begin(), h.end(), img.begin());
  FaultFile f(img, "garbage.cow");
  absl::StatusOr<snap::CowScan> scan = snap::ScanCow(f);
  ck_assert(scan.ok());
  ck_assert_uint_eq(scan->problems.size(), snap::kMaxKeptProblems);
  // Every record, and the area past the end of the file.
  ck_assert_uint_eq(scan->problems.size() + scan->more_problems, scan->exceptions + 1);
  ck_assert_uint_gt(scan->exceptions, 1000);
  FaultFile g(img, "garbage.cow");
  absl::Status st = OpenError(g.Handle(), Opts(8));
  ASSERT_CONTAINS(std::string(st.message()), "nbdsnap check");
  ck_assert_msg(g.counters().reads <= 3, "opening read %llu times",
                static_cast<ull>(g.counters().reads));
}
END_TEST

START_TEST(zero_new_chunk_ends_the_list) {
  const uint32_t cs = 1;
  // old 6 -> new 0 ends the list, whatever comes after it.
  std::vector<char> img = CraftCow(cs, {{5, 2}, {6, 0}, {7, 3}}, 40);
  FaultFile f(img, "term.cow");
  std::unique_ptr<ExceptionStore> s = MustOpen(f.Handle(), Opts(cs));
  ck_assert_uint_eq(s->exception_count(), 1);
  ck_assert_uint_eq(s->Lookup(5)->cow_chunk, 2);
  ck_assert(!s->Lookup(6).has_value());
  ck_assert(!s->Lookup(7).has_value());
  ck_assert_uint_ge(s->notes().size(), 1);
  absl::StatusOr<snap::CowScan> scan = snap::ScanCow(f);
  ck_assert(scan.ok() && scan->tail_garbage && scan->problems.empty());
  // The next exception takes index 1 and chunk 3; the area is rewritten
  // without the stale bytes.
  Written a = Add(*s, 9, 9, 512, true);
  ck_assert_uint_eq(a.cow_chunk, 3);
  std::vector<char> want = CraftCow(cs, {{5, 2}, {9, 3}}, 2);
  std::vector<char> d = f.Durable();
  ck_assert(std::equal(want.begin(), want.begin() + 1024, d.begin()));
  ck_assert(AllZero(d, 512 + 32, 512 - 32));
}
END_TEST

// Repeated origin chunks are served from the record the kernel serves
// them from: the earliest, unless a later one was folded into a run ahead
// of it. The expectations are the kernel's (kdm.sh read of these records,
// 4 KiB chunks, each record's data stamped with its index). Before, the
// earliest record always won: 8 of seed 1 and 47 of seed 8 differed.
START_TEST(repeated_chunks_served_as_dm) {
  struct Case {
    std::vector<DiskRecord> recs;
    std::vector<std::pair<uint64_t, uint64_t>> want;  // origin -> COW chunk
  };
  const std::vector<Case> cases = {
      {{{6, 4}, {5, 2}, {6, 3}}, {{6, 3}, {5, 2}}},
      {{{5, 2}, {9, 3}, {5, 4}, {6, 5}}, {{5, 2}, {6, 5}, {9, 3}}},
      {{{8, 2}, {7, 3}, {8, 4}, {7, 5}, {8, 6}, {34, 7}, {29, 8}, {13, 9}, {3, 10},
        {8, 11}, {48, 12}, {54, 13}, {28, 14}, {63, 15}},
       {{7, 3}, {8, 4}}},
      {{{19, 2}, {19, 3}, {19, 4}, {18, 5}, {17, 6}, {18, 7}, {7, 8}, {50, 9},
        {50, 10}, {37, 11}, {37, 12}, {19, 13}, {20, 14}, {21, 15}, {26, 16},
        {25, 17}, {19, 18}, {50, 19}, {49, 20}, {57, 21}, {18, 22}, {21, 23},
        {19, 24}, {53, 25}, {50, 26}, {40, 27}},
       {{18, 7}, {19, 2}, {21, 15}, {37, 11}, {50, 9}}},
      {{{47, 2}, {16, 3}, {17, 4}, {47, 5}, {46, 6}, {47, 7}, {51, 8}, {52, 9},
        {52, 10}, {16, 11}, {12, 12}, {8, 13}, {16, 14}, {43, 15}, {43, 16},
        {26, 17}, {18, 18}, {4, 19}, {4, 20}, {3, 21}},
       {{4, 19}, {16, 3}, {43, 15}, {47, 7}, {52, 9}}},
  };
  for (const Case& c : cases) {
    FaultFile f(CraftCow(8, c.recs, 30), "repeats.cow");
    std::unique_ptr<ExceptionStore> s = MustOpen(f.Handle(), Opts(8));
    for (const auto& [old_chunk, cow_chunk] : c.want) {
      std::optional<snap::Exception> e = s->Lookup(old_chunk);
      ck_assert_msg(e && e->cow_chunk == cow_chunk, "chunk %llu -> %lld, kernel %llu",
                    static_cast<ull>(old_chunk), e ? static_cast<long long>(e->cow_chunk) : -1LL,
                    static_cast<ull>(cow_chunk));
    }
  }
}
END_TEST

START_TEST(duplicate_old_chunks_earliest_wins) {
  const uint32_t cs = 1;
  std::vector<char> img = CraftCow(cs, {{5, 2}, {9, 3}, {5, 4}, {9, 5}, {5, 6}}, 40);
  FaultFile f(img, "dup.cow");
  std::unique_ptr<ExceptionStore> s = MustOpen(f.Handle(), Opts(cs));
  ck_assert_uint_eq(s->exception_count(), 2);
  ck_assert_uint_eq(s->Lookup(5)->cow_chunk, 2);
  ck_assert_uint_eq(s->Lookup(9)->cow_chunk, 3);
  bool noted = false;
  for (const std::string& n : s->notes()) noted |= n.find("earliest") != std::string::npos;
  ck_assert_msg(noted, "no note about the duplicates");
  absl::StatusOr<snap::CowScan> scan = snap::ScanCow(f);
  ck_assert(scan.ok());
  ck_assert_uint_eq(scan->exceptions, 5);
  ck_assert_uint_eq(scan->duplicates, 3);
  ck_assert(scan->problems.empty());
  // next_free is past every record, duplicates included (dm's rule).
  Written a = Add(*s, 11, 11, 512, true);
  ck_assert_uint_eq(a.cow_chunk, 7);
  ASSERT_STR_EQ(s->StatusLine(), "8/40 2");
}
END_TEST

START_TEST(out_of_order_records_accepted_with_note) {
  // Made by a kernel before 1.12: records not in allocation order, holes.
  const uint32_t cs = 1;
  std::vector<char> img = CraftCow(cs, {{5, 4}, {9, 2}, {1, 7}}, 40);
  FaultFile f(img, "old.cow");
  std::unique_ptr<ExceptionStore> s = MustOpen(f.Handle(), Opts(cs));
  ck_assert_uint_eq(s->exception_count(), 3);
  ck_assert_uint_eq(s->Lookup(1)->cow_chunk, 7);
  ck_assert_uint_ge(s->notes().size(), 1);
  Written a = Add(*s, 11, 11, 512, true);
  ck_assert_uint_eq(a.cow_chunk, 8);
  s.reset();
  s = MustOpen(f.PowerLoss(), Opts(cs));
  ck_assert_uint_eq(s->exception_count(), 4);
  ck_assert_uint_eq(s->Lookup(11)->cow_chunk, 8);
  ck_assert_uint_eq(s->Lookup(9)->cow_chunk, 2);
}
END_TEST

// ----------------------------------------------------------- group commit

START_TEST(concurrent_waiting_commits_are_grouped) {
  const uint32_t cs = 8;
  Geometry g(cs);
  const int threads = 8, per = 150;
  FaultFile disk;
  disk.set_sync_delay(std::chrono::microseconds(300));
  std::unique_ptr<ExceptionStore> s = MustOpen(disk.Handle(), Opts(cs));
  const uint64_t syncs0 = disk.counters().ok_syncs;
  std::vector<std::vector<Written>> got(threads);
  std::atomic<int> bad{0};
  std::vector<std::thread> ts;
  for (int t = 0; t < threads; ++t)
    ts.emplace_back([&, t] {
      for (int i = 0; i < per; ++i) {
        uint64_t old_chunk = uint64_t(t) * 1000000 + i;
        uint64_t tag = uint64_t(t) * 1000 + i;
        absl::StatusOr<uint64_t> c = s->Allocate(old_chunk, WriteSource::kOrigin);
        if (!c.ok()) {
          ++bad;
          return;
        }
        if (!s->WriteChunk(*c, 0, Pattern(tag, 256)).ok()) {
          ++bad;
          return;
        }
        if (!s->Commit(*c, true).ok()) {
          ++bad;
          return;
        }
        std::optional<snap::Exception> e = s->Lookup(old_chunk);
        if (!e || !e->durable || e->cow_chunk != *c) {
          ++bad;
          return;
        }
        got[t].push_back({old_chunk, *c, tag});
      }
    });
  for (std::thread& t : ts) t.join();
  ck_assert_int_eq(bad.load(), 0);
  const uint64_t total = uint64_t(threads) * per;
  const uint64_t areas = AreaWrites(disk.events(), g);
  const uint64_t syncs = disk.counters().ok_syncs - syncs0;
  std::printf("group commit: %llu exceptions, %d threads: %llu area writes, %llu syncs\n",
              static_cast<ull>(total), threads, static_cast<ull>(areas),
              static_cast<ull>(syncs));
  std::fflush(stdout);
  ck_assert_msg(areas < total / 2, "%llu area writes for %llu exceptions: no grouping",
                static_cast<ull>(areas), static_cast<ull>(total));
  std::vector<Written> all;
  for (auto& v : got) all.insert(all.end(), v.begin(), v.end());
  s.reset();
  std::unique_ptr<ExceptionStore> r = MustOpen(disk.PowerLoss(), Opts(cs));
  Verify(*r, all, 256);
}
END_TEST

START_TEST(lazy_commits_then_flush_are_durable) {
  const uint32_t cs = 1;
  const int threads = 4, per = 100;
  FaultFile disk;
  std::unique_ptr<ExceptionStore> s = MustOpen(disk.Handle(), Opts(cs));
  std::vector<std::vector<Written>> got(threads);
  std::vector<std::thread> ts;
  std::atomic<int> bad{0};
  for (int t = 0; t < threads; ++t)
    ts.emplace_back([&, t] {
      for (int i = 0; i < per; ++i) {
        uint64_t old_chunk = uint64_t(t) * 100000 + i;
        absl::StatusOr<uint64_t> c = s->Allocate(old_chunk, WriteSource::kSnapshot);
        if (!c.ok() || !s->WriteChunk(*c, 0, Pattern(old_chunk, 512)).ok() ||
            !s->Commit(*c, false).ok()) {
          ++bad;
          return;
        }
        got[t].push_back({old_chunk, *c, old_chunk});
      }
    });
  for (std::thread& t : ts) t.join();
  ck_assert_int_eq(bad.load(), 0);
  std::vector<Written> all;
  for (auto& v : got) all.insert(all.end(), v.begin(), v.end());
  Verify(*s, all, 512);
  ASSERT_OK(s->Flush());
  for (const Written& w : all) ck_assert(s->Lookup(w.old_chunk)->durable);
  std::unique_ptr<ExceptionStore> r = MustOpen(disk.PowerLoss(), Opts(cs));
  Verify(*r, all, 512);
}
END_TEST

// Copies finish out of order: the commit that completes area 0 comes when
// the exception after it is already committed. A later Flush() must make
// that one durable too (and return).
START_TEST(out_of_order_commits_across_area_end_then_flush) {
  const uint32_t cs = 1;
  Geometry g(cs);
  const uint64_t epa = g.exceptions_per_area();
  FaultFile disk;
  std::unique_ptr<ExceptionStore> s = MustOpen(disk.Handle(), Opts(cs));
  std::vector<Written> w;
  for (uint64_t i = 0; i <= epa + 1; ++i) {
    absl::StatusOr<uint64_t> c = s->Allocate(1000 + i, WriteSource::kOrigin);
    ck_assert(c.ok());
    ASSERT_OK(s->WriteChunk(*c, 0, Pattern(i, 512)));
    w.push_back({1000 + i, *c, i});
  }
  for (uint64_t i = epa + 2; i-- > 0;) ASSERT_OK(s->Commit(w[i].cow_chunk, false));
  Verify(*s, w, 512);
  absl::Status st;
  ExceptionStore* sp = s.get();
  bool returned = FinishesWithin(std::chrono::seconds(10), [sp, &st] { st = sp->Flush(); });
  ck_assert_msg(returned, "Flush() hangs after out-of-order commits across an area end");
  ASSERT_OK(st);
  for (const Written& x : w)
    ck_assert_msg(s->Lookup(x.old_chunk)->durable, "chunk %llu not durable after Flush",
                  static_cast<ull>(x.old_chunk));
  std::unique_ptr<ExceptionStore> r = MustOpen(disk.PowerLoss(), Opts(cs));
  Verify(*r, w, 512);
}
END_TEST

START_TEST(concurrent_commits_and_abandons) {
  const uint32_t cs = 1;
  const int threads = 6, per = 120;
  FaultFile disk;
  std::unique_ptr<ExceptionStore> s = MustOpen(disk.Handle(), Opts(cs));
  std::vector<std::vector<Written>> got(threads);
  std::vector<std::vector<uint64_t>> dropped(threads);
  std::vector<std::thread> ts;
  std::atomic<int> bad{0};
  for (int t = 0; t < threads; ++t)
    ts.emplace_back([&, t] {
      std::mt19937 rng(t);
      for (int i = 0; i < per; ++i) {
        uint64_t old_chunk = uint64_t(t) * 100000 + i;
        absl::StatusOr<uint64_t> c = s->Allocate(old_chunk, WriteSource::kOrigin);
        if (!c.ok()) {
          ++bad;
          return;
        }
        if (rng() % 7 == 0) {
          s->Abandon(*c);
          dropped[t].push_back(old_chunk);
          continue;
        }
        if (!s->WriteChunk(*c, 0, Pattern(old_chunk, 128)).ok() ||
            !s->Commit(*c, rng() % 3 == 0).ok()) {
          ++bad;
          return;
        }
        got[t].push_back({old_chunk, *c, old_chunk});
      }
    });
  for (std::thread& t : ts) t.join();
  ck_assert_int_eq(bad.load(), 0);
  ASSERT_OK(s->Flush());
  std::vector<Written> all;
  for (auto& v : got) all.insert(all.end(), v.begin(), v.end());
  s.reset();
  std::unique_ptr<ExceptionStore> r = MustOpen(disk.PowerLoss(), Opts(cs));
  Verify(*r, all, 128);
  for (auto& v : dropped)
    for (uint64_t c : v) ck_assert(!r->Lookup(c).has_value());
}
END_TEST

// ----------------------------------------------------------------- errors

START_TEST(eio_on_area_write_invalidates) {
  for (FaultKind kind : {FaultKind::kEIO, FaultKind::kShortWrite}) {
    const uint32_t cs = 8;
    Geometry g(cs);
    FaultFile disk;
    std::unique_ptr<ExceptionStore> s = MustOpen(disk.Handle(), Opts(cs));
    Written a = Add(*s, 1, 1, 4096, true);
    Fault f;
    f.op = Op::kWrite;
    f.kind = kind;
    f.short_bytes = 100;
    f.lo = g.AreaChunk(0) * 4096;
    f.hi = f.lo + 4096;
    disk.AddFault(f);
    absl::StatusOr<uint64_t> c = s->Allocate(2, WriteSource::kOrigin);
    ck_assert(c.ok());
    ASSERT_OK(s->WriteChunk(*c, 0, Pattern(2, 4096)));
    absl::Status st = s->Commit(*c, true);
    ck_assert_msg(!st.ok(), "commit succeeded though the area write failed");
    ck_assert(!s->valid());
    ASSERT_STR_EQ(s->StatusLine(), "Invalid");
    ck_assert(!s->Allocate(3, WriteSource::kOrigin).ok());
    ck_assert(!s->Commit(*c, true).ok());
    // The header was rewritten with valid = 0.
    std::vector<char> cur = disk.Contents();
    DiskHeader h = DiskHeader::Decode(cur);
    ck_assert_uint_eq(h.magic, snap::kSnapMagic);
    ck_assert_uint_eq(h.valid, 0);
    bool header_written = false;
    for (const Event& e : disk.events())
      header_written |= e.op == Op::kWrite && e.offset == 0 && e.ok && e.sync_epoch > 1;
    ck_assert(header_written);
    s.reset();
    s = MustOpen(disk.PowerLoss(), Opts(cs));
    ck_assert(!s->valid());
    ASSERT_STR_EQ(s->StatusLine(), "Invalid");
    (void)a;
  }
}
END_TEST

START_TEST(eio_on_sync_invalidates) {
  FaultFile disk;
  std::unique_ptr<ExceptionStore> s = MustOpen(disk.Handle(), Opts(8));
  Add(*s, 1, 1, 4096, true);
  Fault f;
  f.op = Op::kSync;
  disk.AddFault(f);
  absl::StatusOr<uint64_t> c = s->Allocate(2, WriteSource::kOrigin);
  ck_assert(c.ok());
  ck_assert(!s->Commit(*c, true).ok());
  ck_assert(!s->valid());
  ASSERT_STR_EQ(s->StatusLine(), "Invalid");
  ck_assert(!s->Flush().ok());
}
END_TEST

// Lazy commits pile up until a commit must write several areas' worth
// out; when that group commit fails, nothing drains any more, and the
// commit used to try the write-out again for ever (syncing the failing
// disk millions of times) instead of returning the error.
START_TEST(failed_lazy_write_out_returns) {
  FaultFile disk;
  std::unique_ptr<ExceptionStore> s = MustOpen(disk.Handle(), Opts(8));
  const uint64_t max_lazy = 8 * Geometry(8).exceptions_per_area();
  const std::vector<char> data = Pattern(1, 4096);
  for (uint64_t i = 0; i + 1 < max_lazy; ++i) {
    absl::StatusOr<uint64_t> c = s->Allocate(i, WriteSource::kOrigin);
    EXPECT(c.ok());
    EXPECT(s->WriteChunk(*c, 0, data).ok());
    EXPECT(s->Commit(*c, false).ok());
  }
  Fault f;
  f.op = Op::kSync;
  f.sticky = true;
  disk.AddFault(f);
  absl::StatusOr<uint64_t> c = s->Allocate(max_lazy, WriteSource::kOrigin);
  ck_assert(c.ok());
  ASSERT_OK(s->WriteChunk(*c, 0, data));
  // In a thread, so that a commit that never returns fails the test.
  std::future<absl::Status> commit =
      std::async(std::launch::async, [&] { return s->Commit(*c, false); });
  const bool returned =
      commit.wait_for(std::chrono::seconds(2)) == std::future_status::ready;
  const uint64_t syncs = disk.counters().syncs;
  if (!returned) disk.ClearFaults();  // lets the old code's loop end
  const absl::Status st = commit.get();
  ck_assert_msg(returned, "Commit has not returned after 2 s (%llu syncs)",
                static_cast<ull>(syncs));
  ck_assert(!st.ok());
  ck_assert(!s->valid());
  ck_assert_uint_le(syncs, 10);
}
END_TEST

// Linux reports a writeback error to one fsync only: the next one
// succeeds over the lost data. A failed sync in a client's flush must
// therefore end the store, or a later group commit would make a record
// durable for a copy-out whose data never reached the disk.
START_TEST(failed_flush_sync_is_fatal) {
  FaultFile disk;
  std::unique_ptr<ExceptionStore> s = MustOpen(disk.Handle(), Opts(8));
  Written a = Add(*s, 1, 1, 4096, true);
  // An origin copy-out: its data written, its commit still to come.
  absl::StatusOr<uint64_t> c = s->Allocate(2, WriteSource::kOrigin);
  ck_assert(c.ok());
  ASSERT_OK(s->WriteChunk(*c, 0, Pattern(2, 4096)));
  Fault f;
  f.op = Op::kSync;
  f.lose_writeback = true;
  disk.AddFault(f);
  absl::Status fl = s->Flush();
  ck_assert(!fl.ok());
  ck_assert_msg(!s->valid(), "the store is still valid after a failed sync");
  ASSERT_CONTAINS(s->invalid_reason(), "sync");
  ck_assert(!s->Commit(*c, true).ok());
  ck_assert(!s->Flush().ok());
  s.reset();
  // Whatever is on disk names no lost data.
  s = MustOpen(disk.PowerLoss(), Opts(8));
  if (s->valid()) {
    std::optional<snap::Exception> e = s->Lookup(2);
    std::vector<char> buf(4096);
    if (e) ASSERT_OK(s->ReadChunk(e->cow_chunk, 0, buf));
    ck_assert_msg(!e || buf == Pattern(2, 4096), "a record names data that was lost");
    Verify(*s, {a}, 4096);
  }
}
END_TEST

// A copy that failed after the last commit leaves an abandoned slot at the
// end: it needs no record, so the store is quiet and can be merged.
START_TEST(trailing_abandoned_slot_leaves_store_quiet) {
  FaultFile disk;
  std::unique_ptr<ExceptionStore> s = MustOpen(disk.Handle(), Opts(8));
  Add(*s, 10, 10, 4096, true);
  Add(*s, 11, 11, 4096, true);
  absl::StatusOr<uint64_t> c = s->Allocate(12, WriteSource::kSnapshot);
  ck_assert(c.ok());
  s->Abandon(*c);
  ASSERT_OK(s->Flush());
  absl::StatusOr<std::vector<snap::MergeRun>> runs = s->PrepareMergeRuns(100);
  ck_assert_msg(runs.ok(), "merge refused: %s", runs.status().ToString().c_str());
  ck_assert_uint_eq(runs->size(), 1);
  ck_assert_uint_eq((*runs)[0].old_chunk, 10);
  ck_assert_uint_eq((*runs)[0].count, 2);
  ASSERT_OK(s->CommitMerge(2));
  ck_assert_uint_eq(s->exception_count(), 0);
  // A lazy commit waiting for its sync is still in flight, and an
  // abandoned slot after it does not hide it.
  Add(*s, 20, 20, 4096, false);
  c = s->Allocate(21, WriteSource::kSnapshot);
  ck_assert(c.ok());
  s->Abandon(*c);
  ck_assert(!s->PrepareMergeRuns(100).ok());
  ASSERT_OK(s->Flush());
  runs = s->PrepareMergeRuns(100);
  ck_assert(runs.ok() && runs->size() == 1 && (*runs)[0].old_chunk == 20);
}
END_TEST

START_TEST(data_write_error_then_abandon_keeps_store_valid) {
  const uint32_t cs = 8;
  FaultFile disk;
  std::unique_ptr<ExceptionStore> s = MustOpen(disk.Handle(), Opts(cs));
  Written a = Add(*s, 1, 1, 4096, true);
  absl::StatusOr<uint64_t> c = s->Allocate(2, WriteSource::kOrigin);
  ck_assert(c.ok());
  Fault f;
  f.op = Op::kWrite;
  f.lo = *c * 4096;
  f.hi = f.lo + 4096;
  disk.AddFault(f);
  ck_assert(!s->WriteChunk(*c, 0, Pattern(2, 4096)).ok());
  s->Abandon(*c);
  ck_assert(s->valid());
  Written b = Add(*s, 3, 3, 4096, true);
  ck_assert_uint_eq(b.cow_chunk, *c);  // given back, taken again
  ck_assert(!s->Lookup(2).has_value());
  s.reset();
  s = MustOpen(disk.PowerLoss(), Opts(cs));
  Verify(*s, {a, b}, 4096);
}
END_TEST

START_TEST(abandon_leaves_hole_and_store_works) {
  const uint32_t cs = 1;
  Geometry g(cs);
  const uint64_t epa = g.exceptions_per_area();
  FaultFile disk;
  std::unique_ptr<ExceptionStore> s = MustOpen(disk.Handle(), Opts(cs));
  std::vector<Written> w;
  // Holes at the start, in the middle of an area, at an area's end, and
  // the very last allocation. A chunk is given back once the next one is
  // taken, so it stays a hole (the last one given back is taken again).
  std::set<uint64_t> holes = {0, 5, 6, epa - 1, epa, epa + 9};
  std::optional<uint64_t> held;
  for (uint64_t i = 0; i < epa + 10; ++i) {
    absl::StatusOr<uint64_t> c = s->Allocate(500 + i, WriteSource::kOrigin);
    ck_assert(c.ok());
    ck_assert_uint_eq(*c, g.SlotToChunk(i));
    if (held) s->Abandon(*std::exchange(held, std::nullopt));
    if (holes.count(i)) {
      held = *c;
      continue;
    }
    ASSERT_OK(s->WriteChunk(*c, 0, Pattern(i, 512)));
    ASSERT_OK(s->Commit(*c, i % 2 == 0));
    w.push_back({500 + i, *c, i});
  }
  if (held) s->Abandon(*held);
  ASSERT_OK(s->Flush());
  Verify(*s, w, 512);
  s.reset();
  std::unique_ptr<FaultFile> after = disk.PowerLoss();
  s = MustOpen(after->Handle(), Opts(cs));
  Verify(*s, w, 512);
  for (uint64_t h : holes) ck_assert(!s->Lookup(500 + h).has_value());
  // More after the reload; the trailing hole's chunk is reused (nothing
  // points at it).
  Written x = Add(*s, 9999, 9999, 512, true);
  ck_assert_uint_eq(x.cow_chunk, g.SlotToChunk(epa + 9));
  w.push_back(x);
  s.reset();
  s = MustOpen(after->PowerLoss(), Opts(cs));
  Verify(*s, w, 512);
}
END_TEST

// A full file system shows as ENOSPC on the data write: the store stays
// valid (the caller abandons the chunk and fails the write, see
// filter/snapshot_engine.cc), and goes on working when space comes back.
START_TEST(enospc_on_data_write_keeps_store) {
  for (StoreType type : {StoreType::kPersistent, StoreType::kPersistentOverflow}) {
    FaultFile disk;
    std::unique_ptr<ExceptionStore> s = MustOpen(disk.Handle(), Opts(8, type));
    Written a = Add(*s, 1, 1, 4096, true);
    absl::StatusOr<uint64_t> c = s->Allocate(2, WriteSource::kSnapshot);
    ck_assert(c.ok());
    Fault f;
    f.op = Op::kWrite;
    f.kind = FaultKind::kENOSPC;
    f.lo = *c * 4096;
    f.hi = f.lo + 4096;
    disk.AddFault(f);
    absl::Status st = s->WriteChunk(*c, 0, Pattern(2, 4096));
    ck_assert_msg(absl::IsResourceExhausted(st), "%s", st.ToString().c_str());
    s->Abandon(*c);
    ck_assert(s->valid());
    ck_assert(!s->overflowed());
    ck_assert(!s->Lookup(2).has_value());
    Verify(*s, {a}, 4096);
    Written b = Add(*s, 3, 3, 4096, true);
    s.reset();
    s = MustOpen(disk.PowerLoss(), Opts(8, type));
    Verify(*s, {a, b}, 4096);
  }
}
END_TEST

// A full disk from `from` on: writes, growth and reservations there fail.
void FillDiskFrom(FaultFile& disk, uint64_t from) {
  for (Op op : {Op::kWrite, Op::kGrow, Op::kReserve}) {
    Fault f;
    f.op = op;
    f.kind = FaultKind::kENOSPC;
    f.lo = from;
    f.sticky = true;
    disk.AddFault(f);
  }
}

// The disk fills up under a write: that write fails, and the flush after
// it commits the exceptions before it. The group commit grew the file to
// cover the failed write's chunk too, failed for want of space, and ended
// the store with every exception in it (seen on a full tmpfs).
START_TEST(full_disk_after_failed_write_flush_keeps_store) {
  for (StoreType type : {StoreType::kPersistent, StoreType::kPersistentOverflow}) {
    FaultFile disk;
    std::unique_ptr<ExceptionStore> s = MustOpen(disk.Handle(), Opts(8, type));
    std::vector<Written> w;
    for (uint64_t i = 0; i < 5; ++i) w.push_back(Add(*s, i, i, 4096, i == 0));
    absl::StatusOr<uint64_t> c = s->Allocate(9, WriteSource::kSnapshot);
    ck_assert(c.ok());
    FillDiskFrom(disk, *c * 4096);
    ck_assert(absl::IsResourceExhausted(s->WriteChunk(*c, 0, Pattern(9, 4096))));
    s->Abandon(*c);
    ASSERT_OK(s->Flush());
    ck_assert(s->valid());
    ck_assert(!s->overflowed());
    Verify(*s, w, 4096);
    s.reset();
    s = MustOpen(disk.PowerLoss(), Opts(8, type));
    Verify(*s, w, 4096);
  }
}
END_TEST

// A write that keeps failing on a full disk, retried many times, uses up
// nothing: the chunk it gave back is the next one taken. Before, each try
// used up a chunk, so under a snapshot-cow-size cap the retries alone
// filled the store and ended a P snapshot (Invalid) or overflowed a PO
// one, and the status counted chunks that hold nothing.
START_TEST(failed_writes_retried_use_up_nothing) {
  for (StoreType type : {StoreType::kPersistent, StoreType::kPersistentOverflow}) {
    FaultFile disk;
    // Room for the header, one area and 20 data chunks.
    std::unique_ptr<ExceptionStore> s =
        MustOpen(disk.Handle(), Opts(8, type, 22 * 4096));
    std::vector<Written> w;
    for (uint64_t i = 0; i < 5; ++i) w.push_back(Add(*s, i, i, 4096, i == 0));
    const std::string status = s->StatusLine();
    absl::StatusOr<uint64_t> first = s->Allocate(9, WriteSource::kOrigin);
    ck_assert(first.ok());
    s->Abandon(*first);
    FillDiskFrom(disk, *first * 4096);
    for (int i = 0; i < 100; ++i) {
      for (WriteSource src : {WriteSource::kOrigin, WriteSource::kSnapshot}) {
        absl::StatusOr<uint64_t> c = s->Allocate(9, src);
        ck_assert_msg(c.ok(), "try %d: %s", i, c.status().ToString().c_str());
        ck_assert_uint_eq(*c, *first);
        ck_assert(absl::IsResourceExhausted(s->WriteChunk(*c, 0, Pattern(9, 4096))));
        s->Abandon(*c);
      }
    }
    ck_assert(s->valid());
    ck_assert(!s->overflowed());
    ASSERT_STR_EQ(s->StatusLine(), status);
    ASSERT_OK(s->Flush());
    Verify(*s, w, 4096);
    s.reset();
    std::unique_ptr<FaultFile> after = disk.PowerLoss();
    s = MustOpen(after->Handle(), Opts(8, type, 22 * 4096));
    Verify(*s, w, 4096);
    // With room again, the chunk is used.
    w.push_back(Add(*s, 9, 9, 4096, true));
    ck_assert_uint_eq(w.back().cow_chunk, *first);
    Verify(*s, w, 4096);
  }
}
END_TEST

// The disk is full where the next metadata area goes: the write that would
// fill this area is refused (ENOSPC) before anything is written, and the
// store goes on. Before, its commit had to grow the file over the next
// area, failed, and ended the store. When space comes back, writes go on.
START_TEST(full_disk_at_next_area_refuses_write_keeps_store) {
  for (StoreType type : {StoreType::kPersistent, StoreType::kPersistentOverflow}) {
    FaultFile disk;
    std::unique_ptr<ExceptionStore> s = MustOpen(disk.Handle(), Opts(8, type));
    const Geometry g(8);
    const uint64_t epa = g.exceptions_per_area();
    std::vector<Written> w;
    for (uint64_t i = 0; i + 1 < epa; ++i) w.push_back(Add(*s, i, i, 4096, false));
    ASSERT_OK(s->Flush());
    FillDiskFrom(disk, g.AreaChunk(1) * 4096);
    for (WriteSource src : {WriteSource::kOrigin, WriteSource::kSnapshot}) {
      absl::StatusOr<uint64_t> c = s->Allocate(epa, src);
      ck_assert_msg(absl::IsResourceExhausted(c.status()), "%s",
                    c.status().ToString().c_str());
      ck_assert(s->valid());
      ck_assert(!s->overflowed());
    }
    ASSERT_OK(s->Flush());
    Verify(*s, w, 4096);
    s.reset();
    // A power loss, then space again (the new disk has no faults).
    std::unique_ptr<FaultFile> after = disk.PowerLoss();
    s = MustOpen(after->Handle(), Opts(8, type));
    Verify(*s, w, 4096);
    for (uint64_t i = epa - 1; i < epa + 2; ++i) w.push_back(Add(*s, i, i, 4096, true));
    s.reset();
    s = MustOpen(after->PowerLoss(), Opts(8, type));
    Verify(*s, w, 4096);
  }
}
END_TEST

// The group commit makes the file cover every chunk its records name; if
// that fails the records are not written and the store is invalid (as a
// failed metadata write is in dm).
START_TEST(grow_failure_at_group_commit_invalidates) {
  for (StoreType type : {StoreType::kPersistent, StoreType::kPersistentOverflow}) {
    FaultFile disk;
    std::unique_ptr<ExceptionStore> s = MustOpen(disk.Handle(), Opts(8, type));
    Written a = Add(*s, 1, 1, 4096, true);
    Fault f;
    f.op = Op::kGrow;
    f.kind = FaultKind::kENOSPC;
    f.sticky = true;
    disk.AddFault(f);
    absl::StatusOr<uint64_t> c = s->Allocate(2, WriteSource::kSnapshot);
    ck_assert(c.ok());
    ck_assert(!s->Commit(*c, true).ok());
    ck_assert(!s->valid());
    ASSERT_STR_EQ(s->StatusLine(), "Invalid");
    Verify(*s, {a, {2, *c, 0}}, 0);  // still mapped in memory, readable
    s.reset();
    s = MustOpen(disk.PowerLoss(), Opts(8, type));
    ck_assert(!s->valid());
  }
}
END_TEST

// A whole chunk of zeros (NBD_CMD_WRITE_ZEROES) goes to ZeroChunk, which
// does not extend the file. The exception is visible at once after a lazy
// commit, so a read of it must work before the next group commit grows
// the file.
START_TEST(zeroed_new_chunk_readable_before_group_commit) {
  TempDir dir;
  std::vector<std::string> errors;
  for (int real = 0; real < 2; ++real) {
    std::unique_ptr<snap::BlockFile> file;
    if (real) {
      absl::StatusOr<std::unique_ptr<snap::BlockFile>> f =
          snap::OpenPosixFile(dir.File("zero.cow"), snap::OpenMode::kReadWriteCreate);
      ck_assert(f.ok());
      file = std::move(*f);
    } else {
      file = std::make_unique<FaultFile>();
    }
    std::unique_ptr<ExceptionStore> s = MustOpen(std::move(file), Opts(8));
    Add(*s, 1, 1, 4096, true);
    absl::StatusOr<uint64_t> c = s->Allocate(7, WriteSource::kSnapshot);
    ck_assert(c.ok());
    ASSERT_OK(s->ZeroChunk(*c, 0, 4096));
    ASSERT_OK(s->Commit(*c, false));
    ck_assert(s->Lookup(7).has_value());
    std::vector<char> buf(4096, 'x');
    absl::Status st = s->ReadChunk(*c, 0, buf);
    if (!st.ok())
      errors.push_back(std::string(real ? "real file: " : "FaultFile: ") + st.ToString());
    else
      ck_assert(AllZero(buf, 0, 4096));
    ASSERT_OK(s->Flush());
    ASSERT_OK(s->ReadChunk(*c, 0, buf));
    ck_assert(AllZero(buf, 0, 4096));
  }
  ck_assert_msg(errors.empty(),
                "reading a zeroed, committed chunk before the group commit failed (%zu "
                "of 2 file kinds): %s%s%s",
                errors.size(), errors.empty() ? "" : errors[0].c_str(),
                errors.size() > 1 ? "; " : "", errors.size() > 1 ? errors[1].c_str() : "");
}
END_TEST

// The COW file is full at 16 chunks, set by snapshot-cow-size or by the
// size of a block device, which cannot grow (without the limit, a store on
// a device handed out chunks past its end, whose writes failed with ENOSPC
// for ever: the origin write was refused instead of the snapshot going).
struct Limit {
  const char* what;
  uint64_t device;  // a block device of this many bytes; 0: a regular file
  uint64_t cap;
};
const Limit kLimits[] = {
    {"a capped file", 0, 16 * 512},
    {"a device", 16 * 512, 0},
    {"a device under a larger cap", 16 * 512, 64 * 512},
    {"a capped larger device", 64 * 512, 16 * 512},
};

std::unique_ptr<FaultFile> LimitedDisk(const Limit& l) {
  auto disk = std::make_unique<FaultFile>(std::vector<char>(l.device, 0), "limited.cow");
  disk->set_block_device(l.device != 0);
  return disk;
}

START_TEST(size_cap_fills) {
  // cs 1, 16 chunks: data chunks 2..15, as the kernel on a 16-chunk COW.
  struct {
    StoreType type;
    WriteSource src;
    const char* status;
  } cases[] = {
      {StoreType::kPersistent, WriteSource::kOrigin, "Invalid"},
      {StoreType::kPersistent, WriteSource::kSnapshot, "Invalid"},
      {StoreType::kPersistentOverflow, WriteSource::kSnapshot, "Overflow"},
      {StoreType::kPersistentOverflow, WriteSource::kOrigin, "Invalid"},
  };
  for (const Limit& l : kLimits) {
    for (const auto& c : cases) {
      std::unique_ptr<FaultFile> disk = LimitedDisk(l);
      std::unique_ptr<ExceptionStore> s = MustOpen(disk->Handle(), Opts(1, c.type, l.cap));
      ASSERT_STR_EQ(s->StatusLine(), "2/16 2");
      std::vector<Written> w;
      absl::StatusOr<uint64_t> r;
      for (uint64_t i = 0;; ++i) {
        r = s->Allocate(100 + i, c.src);
        if (!r.ok()) break;
        ASSERT_OK(s->WriteChunk(*r, 0, Pattern(i, 512)));
        ASSERT_OK(s->Commit(*r, true));
        w.push_back({100 + i, *r, i});
        ck_assert_uint_lt(i, 100);
      }
      ck_assert_msg(absl::IsResourceExhausted(r.status()), "%s: %s", l.what,
                    r.status().ToString().c_str());
      ASSERT_CONTAINS(std::string(r.status().message()), "full");
      ck_assert_msg(w.size() == 14, "%s: %zu exceptions", l.what, w.size());
      ck_assert_uint_le(disk->Contents().size(), std::max<uint64_t>(l.device, 16 * 512));
      ASSERT_STR_EQ(s->StatusLine(), c.status);
      bool overflow = std::string(c.status) == "Overflow";
      ck_assert(s->valid() == overflow);
      ck_assert(s->overflowed() == overflow);
      Verify(*s, w, 512);
      s.reset();
      s = MustOpen(disk->PowerLoss(), Opts(1, c.type, l.cap));
      if (overflow) {
        Verify(*s, w, 512);
        ASSERT_STR_EQ(s->StatusLine(), "16/16 2");
      } else {
        ASSERT_STR_EQ(s->StatusLine(), "Invalid");
      }
    }
  }
}
END_TEST

// The last data chunk before an area: the kernel would fail the zeroing of
// the next area; the store keeps room for it instead.
START_TEST(size_cap_counts_next_area) {
  const uint32_t cs = 1;
  Geometry g(cs);
  const uint64_t epa = g.exceptions_per_area();
  // Room for chunks 0..epa+1 exactly (header, area 0, all of region 0).
  const uint64_t cap = (epa + 2) * 512;
  FaultFile disk;
  std::unique_ptr<ExceptionStore> s =
      MustOpen(disk.Handle(), Opts(cs, StoreType::kPersistentOverflow, cap));
  uint64_t n = 0;
  for (;; ++n) {
    absl::StatusOr<uint64_t> r = s->Allocate(n, WriteSource::kSnapshot);
    if (!r.ok()) break;
    ASSERT_OK(s->Commit(*r, true));
  }
  ck_assert_uint_eq(n, epa - 1);
  ck_assert(s->overflowed());
  ck_assert_uint_le(disk.Contents().size(), cap);
}
END_TEST

START_TEST(invalidate_writes_header_and_status_priority) {
  FaultFile disk;
  std::unique_ptr<ExceptionStore> s =
      MustOpen(disk.Handle(), Opts(8, StoreType::kPersistentOverflow, 64 * 1024));
  Add(*s, 1, 1, 4096, true);
  s->set_merge_failed(true);
  ASSERT_STR_EQ(s->StatusLine(), "Merge failed");
  s->set_merge_failed(false);
  ASSERT_STR_EQ(s->StatusLine(), "24/128 16");
  s->Invalidate("test says so");
  ck_assert(!s->valid());
  ASSERT_CONTAINS(s->invalid_reason(), "test says so");
  s->set_merge_failed(true);
  ASSERT_STR_EQ(s->StatusLine(), "Invalid");
  // Durable: a power loss does not bring the snapshot back.
  std::unique_ptr<ExceptionStore> r = MustOpen(disk.PowerLoss(), Opts(8));
  ck_assert(!r->valid());
}
END_TEST

START_TEST(read_only_store_never_writes) {
  FaultFile disk;
  {
    std::unique_ptr<ExceptionStore> s = MustOpen(disk.Handle(), Opts(8));
    Add(*s, 1, 1, 4096, true);
  }
  const uint64_t writes = disk.counters().writes;
  const uint64_t syncs = disk.counters().syncs;
  StoreOptions ro = Opts(8);
  ro.read_only = true;
  std::unique_ptr<ExceptionStore> s = MustOpen(disk.Handle(), ro);
  ck_assert(s->valid());
  ck_assert(s->Lookup(1).has_value());
  ck_assert(!s->Allocate(2, WriteSource::kOrigin).ok());
  ck_assert(!s->WriteChunk(2, 0, std::vector<char>(10)).ok());
  ck_assert(!s->ZeroChunk(2, 0, 10).ok());
  ASSERT_OK(s->Flush());
  s->Invalidate("read-only invalidate");
  ck_assert_uint_eq(disk.counters().writes, writes);
  ck_assert_uint_eq(disk.counters().syncs, syncs);
}
END_TEST

// -------------------------------------------------------------- transient

// PrepareMergeRuns: several dm merge steps at once. The runs come newest
// first, each a run PrepareMerge alone would give, within one area and up
// to the record budget (a first run always); one CommitMerge removes them.
START_TEST(merge_runs_batch_the_steps) {
  const uint32_t cs = 1;  // epa 32: several areas
  FaultFile disk("batch.cow");
  std::unique_ptr<ExceptionStore> s = MustOpen(disk.Handle(), Opts(cs));
  // Runs of 1..5 consecutive origin chunks, then singles, over 3 areas.
  std::map<uint64_t, uint64_t> model;  // old -> cow
  uint64_t old = 100;
  for (int i = 0; i < 80; ++i) {
    const int len = i < 40 ? 1 + i % 5 : 1;
    for (int k = 0; k < len && model.size() < 80; ++k) {
      absl::StatusOr<uint64_t> cow = s->Allocate(old + k, snap::WriteSource::kSnapshot);
      ck_assert(cow.ok());
      ck_assert(s->Commit(*cow, false).ok());
      model[old + k] = *cow;
    }
    old += len + 3;
  }
  ck_assert(s->Flush().ok());
  while (true) {
    absl::StatusOr<snap::MergeRun> one = s->PrepareMerge();
    ck_assert(one.ok());
    absl::StatusOr<std::vector<snap::MergeRun>> runs = s->PrepareMergeRuns(7);
    ck_assert(runs.ok());
    if (one->count == 0) {
      ck_assert(runs->empty());
      break;
    }
    // The first run of the batch is the one PrepareMerge gives.
    ck_assert(!runs->empty());
    ck_assert_uint_eq((*runs)[0].old_chunk, one->old_chunk);
    ck_assert_uint_eq((*runs)[0].count, one->count);
    uint32_t total = 0;
    for (const snap::MergeRun& r : *runs) {
      for (uint32_t k = 0; k < r.count; ++k) {
        ck_assert_msg(model.count(r.old_chunk + k) == 1, "run names an unknown chunk");
        ck_assert_uint_eq(model[r.old_chunk + k], r.cow_chunk + k);
        model.erase(r.old_chunk + k);
      }
      total += r.count;
    }
    ck_assert(total <= 7 || runs->size() == 1);
    ck_assert(s->CommitMerge(total).ok());
    for (const snap::MergeRun& r : *runs)
      ck_assert(!s->Lookup(r.old_chunk).has_value());
    ck_assert_uint_eq(s->exception_count(), model.size());
  }
  ck_assert(model.empty());
  const std::string got = s->StatusLine();
  const std::string want = absl::StrFormat("2/%d 2", disk.Contents().size() / 512);
  ck_assert_str_eq(got.c_str(), want.c_str());
}
END_TEST

// A write that fails part way (the disk filled up) leaves bytes in its
// abandoned chunk; the chunk is used again, and still zeroed at close, so
// that the next start takes the file again.
START_TEST(transient_failed_write_zeroed_at_close) {
  FaultFile disk;
  {
    std::unique_ptr<ExceptionStore> s =
        MustOpen(disk.Handle(), Opts(8, StoreType::kTransient));
    Add(*s, 1, 1, 4096, false);
    absl::StatusOr<uint64_t> c = s->Allocate(2, WriteSource::kSnapshot);
    ck_assert(c.ok());
    Fault f;
    f.kind = FaultKind::kShortWrite;
    f.short_bytes = 1000;
    disk.AddFault(f);
    ck_assert(!s->WriteChunk(*c, 0, Pattern(2, 4096)).ok());
    s->Abandon(*c);
  }
  const std::vector<char> after = disk.Contents();
  ck_assert_uint_ge(after.size(), 4096 + 1000);
  ck_assert(std::all_of(after.begin(), after.end(), [](char b) { return b == 0; }));
  MustOpen(disk.Handle(), Opts(8, StoreType::kTransient));
}
END_TEST

START_TEST(transient_basics) {
  FaultFile disk;
  std::unique_ptr<ExceptionStore> s =
      MustOpen(disk.Handle(), Opts(8, StoreType::kTransient, 1 << 20));
  ck_assert(s->type() == StoreType::kTransient);
  ASSERT_STR_EQ(s->StatusLine(), "0/2048 0");
  std::vector<Written> w;
  for (uint64_t i = 0; i < 5; ++i) {
    w.push_back(Add(*s, 40 - i, i, 4096, i % 2 == 0));
    ck_assert_uint_eq(w.back().cow_chunk, i);  // chunk 0 first: no header
    ck_assert(s->Lookup(40 - i)->durable);
  }
  Verify(*s, w, 4096);
  ASSERT_STR_EQ(s->StatusLine(), "40/2048 0");
  ck_assert(!s->PrepareMerge().ok());
  ck_assert(!s->CommitMerge(1).ok());
  ASSERT_OK(s->Flush());
  // Nothing on disk is a header.
  ck_assert(DiskHeader::Decode(disk.Contents()).magic != snap::kSnapMagic);
  absl::StatusOr<uint64_t> c = s->Allocate(77, WriteSource::kOrigin);
  ck_assert(c.ok());
  s->Abandon(*c);
  ck_assert(!s->Lookup(77).has_value());
  // The last chunk, abandoned (its write failed, on a full disk say), is
  // used again: failed writes do not push the store further out, nor its
  // use past the file's size.
  ASSERT_STR_EQ(s->StatusLine(), "40/2048 0");
  absl::StatusOr<uint64_t> again = s->Allocate(78, WriteSource::kOrigin);
  ck_assert(again.ok());
  ck_assert_uint_eq(*again, *c);
  s->Abandon(*again);
  // No cap: the total is the file's size.
  FaultFile d2;
  s = MustOpen(d2.Handle(), Opts(1, StoreType::kTransient));
  Add(*s, 1, 1, 512, false);
  Add(*s, 2, 2, 512, false);
  ASSERT_STR_EQ(s->StatusLine(), "2/2 0");
}
END_TEST

START_TEST(transient_full_invalidates) {
  for (const Limit& l : kLimits) {
    for (WriteSource src : {WriteSource::kOrigin, WriteSource::kSnapshot}) {
      std::unique_ptr<FaultFile> disk = LimitedDisk(l);
      std::unique_ptr<ExceptionStore> s =
          MustOpen(disk->Handle(), Opts(1, StoreType::kTransient, l.cap));
      ASSERT_STR_EQ(s->StatusLine(), "0/16 0");
      for (uint64_t i = 0; i < 16; ++i) Add(*s, i, i, 512, false, src);
      ASSERT_STR_EQ(s->StatusLine(), "16/16 0");
      absl::StatusOr<uint64_t> r = s->Allocate(99, src);
      ck_assert_msg(absl::IsResourceExhausted(r.status()), "%s: %s", l.what,
                    r.status().ToString().c_str());
      ASSERT_STR_EQ(s->StatusLine(), "Invalid");
      ck_assert(!s->overflowed());
    }
  }
}
END_TEST

START_TEST(transient_refuses_persistent_file_and_bad_options) {
  FaultFile disk;
  {
    std::unique_ptr<ExceptionStore> s = MustOpen(disk.Handle(), Opts(8));
    Add(*s, 1, 1, 4096, true);
  }
  std::vector<char> before = disk.Contents();
  absl::Status st = OpenError(disk.Handle(), Opts(8, StoreType::kTransient));
  ASSERT_CONTAINS(std::string(st.message()), "persistent");
  ck_assert(disk.Contents() == before);
  // A chunk size is required, and must be legal.
  FaultFile d2;
  (void)OpenError(d2.Handle(), Opts(0, StoreType::kTransient));
  (void)OpenError(d2.Handle(), Opts(12, StoreType::kTransient));
  StoreOptions ro = Opts(8, StoreType::kTransient);
  ro.read_only = true;
  (void)OpenError(d2.Handle(), ro);
  // Any other data is refused too: the store would overwrite it.
  std::vector<char> junk(8192, 'j');
  FaultFile d3(junk, "junk.cow");
  st = OpenError(d3.Handle(), Opts(8, StoreType::kTransient));
  ASSERT_CONTAINS(std::string(st.message()), "byte 0 is not zero");
  ck_assert(d3.Contents() == junk);
}
END_TEST

// Nothing in a transient store's file means anything once it is closed:
// what it used is zeroed, so the next start takes the file again.
START_TEST(transient_zeroes_its_file_when_closed) {
  for (bool device : {false, true}) {
    FaultFile disk(std::vector<char>(device ? 64 * 1024 : 0, 0), "fault.cow");
    disk.set_block_device(device);
    std::unique_ptr<ExceptionStore> s = MustOpen(disk.Handle(), Opts(8, StoreType::kTransient));
    Written a = Add(*s, 3, 3, 4096, false);
    Add(*s, 4, 4, 4096, false);
    ck_assert_uint_eq(a.cow_chunk, 0);
    Verify(*s, {a, {4, 1, 4}}, 4096);
    s.reset();
    std::vector<char> after = disk.Contents();
    ck_assert(AllZero(after, 0, device ? 4096 : after.size()));
    s = MustOpen(disk.Handle(), Opts(8, StoreType::kTransient));
    ck_assert_uint_eq(s->exception_count(), 0);
  }
}
END_TEST

// -------------------------------------------------------- the test double

std::vector<char> Bytes(const char* s) { return std::vector<char>(s, s + std::strlen(s)); }

std::string Str(const std::vector<char>& v) { return std::string(v.begin(), v.end()); }

START_TEST(fault_file_durable_and_current_images) {
  FaultFile f;
  ck_assert_uint_eq(*f.Size(), 0);
  ASSERT_OK(f.PWrite(Bytes("hello"), 0));
  ASSERT_OK(f.PWrite(Bytes("XY"), 10));
  ck_assert_uint_eq(*f.Size(), 12);
  ASSERT_STR_EQ(Str(f.Contents()), std::string("hello\0\0\0\0\0XY", 12));
  ck_assert_uint_eq(f.Durable().size(), 0);
  ck_assert_uint_eq(f.unsynced_ops(), 2);
  std::vector<char> buf(5);
  ASSERT_OK(f.PRead(buf, 0));
  ASSERT_STR_EQ(Str(buf), "hello");
  ck_assert(absl::IsOutOfRange(f.PRead(buf, 8)));  // past the end: no short read
  ASSERT_OK(f.Sync());
  ck_assert(f.Durable() == f.Contents());
  ck_assert_uint_eq(f.unsynced_ops(), 0);
  // Unsynced writes, grows and zeroes are lost in a power loss.
  ASSERT_OK(f.PWrite(Bytes("J"), 0));
  ASSERT_OK(f.GrowTo(100));
  ASSERT_OK(f.ZeroRange(1, 3));
  ASSERT_OK(f.GrowTo(50));  // never shrinks
  ck_assert_uint_eq(*f.Size(), 100);
  ASSERT_STR_EQ(Str(f.Contents()).substr(0, 5), std::string("J\0\0\0o", 5));
  std::unique_ptr<FaultFile> p = f.PowerLoss();
  ASSERT_STR_EQ(Str(p->Contents()), std::string("hello\0\0\0\0\0XY", 12));
  ck_assert(p->Durable() == p->Contents());
  ck_assert_uint_eq(p->counters().writes, 0);
  // Keep exactly the grow.
  std::unique_ptr<FaultFile> k =
      f.PowerLossKeeping([](const Event& e) { return e.op == Op::kGrow; });
  ck_assert_uint_eq(k->Contents().size(), 100);
  ASSERT_STR_EQ(Str(k->Contents()).substr(0, 5), "hello");
  snaptest::Counters c = f.counters();
  ck_assert_uint_eq(c.writes, 3);
  ck_assert_uint_eq(c.syncs, 1);
  ck_assert_uint_eq(c.ok_syncs, 1);
  ck_assert_uint_eq(c.grows, 2);
  ck_assert_uint_eq(c.zeros, 1);
  ck_assert_uint_eq(c.reads, 2);
}
END_TEST

START_TEST(fault_file_injected_faults) {
  FaultFile f;
  Fault nth;
  nth.op = Op::kWrite;
  nth.nth = 1;
  f.AddFault(nth);
  ASSERT_OK(f.PWrite(Bytes("aaaa"), 0));
  ck_assert(!f.PWrite(Bytes("bbbb"), 0).ok());  // write #1
  ASSERT_OK(f.PWrite(Bytes("cc"), 0));          // once only
  ASSERT_STR_EQ(Str(f.Contents()), "ccaa");
  // Byte range, sticky, ENOSPC.
  Fault range;
  range.op = Op::kWrite;
  range.kind = FaultKind::kENOSPC;
  range.lo = 100;
  range.hi = 200;
  range.sticky = true;
  f.AddFault(range);
  ASSERT_OK(f.PWrite(Bytes("x"), 99));
  ASSERT_OK(f.PWrite(Bytes("x"), 200));
  absl::Status st = f.PWrite(Bytes("xx"), 99);
  ck_assert(absl::IsResourceExhausted(st));
  ck_assert(!f.PWrite(Bytes("x"), 150).ok());
  ck_assert(!f.PWrite(Bytes("x"), 199).ok());
  f.ClearFaults();
  ASSERT_OK(f.PWrite(Bytes("x"), 150));
  // A short write lands its first bytes, then fails.
  Fault sh;
  sh.op = Op::kWrite;
  sh.kind = FaultKind::kShortWrite;
  sh.short_bytes = 3;
  f.AddFault(sh);
  ck_assert(!f.PWrite(Bytes("123456"), 0).ok());
  ASSERT_STR_EQ(Str(f.Contents()).substr(0, 6), std::string("123a\0\0", 6));
  // Grow, zero, sync and read faults.
  for (Op op : {Op::kGrow, Op::kZero, Op::kSync, Op::kRead}) {
    Fault g;
    g.op = op;
    g.kind = op == Op::kGrow ? FaultKind::kENOSPC : FaultKind::kEIO;
    f.AddFault(g);
  }
  ck_assert(absl::IsResourceExhausted(f.GrowTo(1 << 20)));
  ck_assert_uint_lt(*f.Size(), 1 << 20);
  ck_assert(!f.ZeroRange(0, 4).ok());
  ck_assert(!f.Sync().ok());
  std::vector<char> b(2);
  ck_assert(!f.PRead(b, 0).ok());
  ASSERT_OK(f.PRead(b, 0));
  ASSERT_OK(f.Sync());
  ck_assert_uint_eq(f.counters().faults_fired, 9);
}
END_TEST

// Linux's fsync: a failed writeback loses the writes it covered, reports
// the error once, and the next sync succeeds without them.
START_TEST(fault_file_lost_writeback_reported_once) {
  FaultFile f;
  ASSERT_OK(f.PWrite(Bytes("aaaa"), 0));
  ASSERT_OK(f.Sync());
  ASSERT_OK(f.PWrite(Bytes("bb"), 0));
  Fault lost;
  lost.op = Op::kSync;
  lost.lose_writeback = true;
  f.AddFault(lost);
  ck_assert(!f.Sync().ok());
  ASSERT_OK(f.PWrite(Bytes("c"), 3));
  ASSERT_OK(f.Sync());
  ASSERT_STR_EQ(Str(f.Contents()), "bbac");  // what reads see
  ASSERT_STR_EQ(Str(f.Durable()), "aaac");   // "bb" never reached the disk
}
END_TEST

START_TEST(fault_file_crash_at_freezes) {
  FaultFile f;
  f.CrashAt(1);
  ASSERT_OK(f.PWrite(Bytes("one"), 0));
  ASSERT_OK(f.Sync());  // sync #0
  ASSERT_OK(f.PWrite(Bytes("two"), 0));
  ck_assert(!f.Sync().ok());  // sync #1: the crash
  ck_assert(f.frozen());
  ck_assert(!f.PWrite(Bytes("six"), 0).ok());
  ck_assert(!f.GrowTo(1000).ok());
  ck_assert(!f.ZeroRange(0, 1).ok());
  ck_assert(!f.Sync().ok());
  ASSERT_STR_EQ(Str(f.Contents()), "two");  // nothing landed after the crash
  std::vector<char> b(3);
  ASSERT_OK(f.PRead(b, 0));
  ASSERT_STR_EQ(Str(f.PowerLoss()->Contents()), "one");
  ASSERT_STR_EQ(Str(f.PowerLossKeeping([](const Event&) { return true; })->Contents()), "two");
  ck_assert_uint_eq(f.counters().ok_syncs, 1);
  ck_assert_uint_eq(f.counters().syncs, 3);
  // A freezing fault does the same at a write.
  FaultFile g;
  Fault fr;
  fr.op = Op::kWrite;
  fr.nth = 1;
  fr.freeze = true;
  g.AddFault(fr);
  ASSERT_OK(g.PWrite(Bytes("a"), 0));
  ck_assert(!g.PWrite(Bytes("b"), 0).ok());
  ck_assert(g.frozen());
  ck_assert(!g.PWrite(Bytes("c"), 0).ok());
  ASSERT_STR_EQ(Str(g.Contents()), "a");
}
END_TEST

START_TEST(fault_file_torn_power_loss_keeps_subsets) {
  FaultFile f(Bytes("...."), "t");
  ASSERT_OK(f.PWrite(Bytes("A"), 0));
  ASSERT_OK(f.PWrite(Bytes("B"), 1));
  ASSERT_OK(f.PWrite(Bytes("C"), 2));
  ASSERT_OK(f.PWrite(Bytes("D"), 0));  // overwrites A, later in order
  std::set<std::string> seen;
  for (uint64_t seed = 0; seed < 200; ++seed) {
    std::string img = Str(f.PowerLossTorn(seed)->Contents());
    ck_assert_uint_eq(img.size(), 4);
    ck_assert(img[0] == '.' || img[0] == 'A' || img[0] == 'D');
    ck_assert(img[1] == '.' || img[1] == 'B');
    ck_assert(img[2] == '.' || img[2] == 'C');
    ck_assert_int_eq(img[3], '.');
    seen.insert(img);
  }
  ck_assert_uint_eq(seen.size(), 12);  // 3 * 2 * 2 outcomes, all possible
  // Deterministic per seed.
  ck_assert(f.PowerLossTorn(7)->Contents() == f.PowerLossTorn(7)->Contents());
}
END_TEST

START_TEST(fault_file_handles_share_one_disk) {
  FaultFile f;
  std::unique_ptr<FaultFile> h = f.Handle();
  ASSERT_OK(h->PWrite(Bytes("abc"), 0));
  ASSERT_STR_EQ(Str(f.Contents()), "abc");
  std::unique_ptr<FaultFile> c = f.Clone();
  ASSERT_OK(c->PWrite(Bytes("z"), 0));
  ASSERT_STR_EQ(Str(f.Contents()), "abc");
  ASSERT_STR_EQ(Str(c->Contents()), "zbc");
  ASSERT_STR_EQ(Str(c->PowerLoss()->Contents()), "abc");  // the clone is durable
  h->Freeze();
  ck_assert(f.frozen());
  std::vector<Event> ev = f.events();
  ck_assert_uint_eq(ev.size(), 1);
  ck_assert(ev[0].op == Op::kWrite && ev[0].ok && ev[0].length == 3 && !ev[0].all_zero);
  ASSERT_STR_EQ(h->name(), "fault.cow");
}
END_TEST

// ------------------------------------------------------------------ suites

Suite* FaultFileSuite() {
  Suite* s = suite_create("fault_file");
  TCase* tc = tcase_create("double");
  tcase_add_test(tc, fault_file_durable_and_current_images);
  tcase_add_test(tc, fault_file_injected_faults);
  tcase_add_test(tc, fault_file_lost_writeback_reported_once);
  tcase_add_test(tc, fault_file_crash_at_freezes);
  tcase_add_test(tc, fault_file_torn_power_loss_keeps_subsets);
  tcase_add_test(tc, fault_file_handles_share_one_disk);
  suite_add_tcase(s, tc);
  return s;
}

Suite* RoundTripSuite() {
  Suite* s = suite_create("persistent_roundtrip");
  TCase* tc = tcase_create("roundtrip");
  tcase_set_timeout(tc, 120);
  tcase_add_test(tc, roundtrip_chunk_sizes_on_fault_file);
  tcase_add_test(tc, roundtrip_chunk_sizes_on_real_files);
  tcase_add_test(tc, real_file_is_locked_while_open);
  tcase_add_test(tc, real_file_lock_message_names_the_holder);
  tcase_add_test(tc, reopen_at_area_boundaries_then_append);
  tcase_add_test(tc, status_line_arithmetic);
  tcase_add_test(tc, lazy_commit_visible_at_once_durable_after_flush);
  suite_add_tcase(s, tc);
  tc = tcase_create("layout");
  tcase_add_test(tc, on_disk_layout_matches_kernel);
  tcase_add_test(tc, full_area_commit_syncs_zeroed_next_area_first);
  tcase_add_test(tc, power_loss_keeping_full_area_but_not_zeroed_next_area);
  suite_add_tcase(s, tc);
  return s;
}

Suite* HeaderSuite() {
  Suite* s = suite_create("persistent_header_rules");
  TCase* tc = tcase_create("header");
  tcase_add_test(tc, magic_zero_file_becomes_new_store);
  tcase_add_test(tc, new_store_needs_all_zero_file);
  tcase_add_test(tc, first_non_zero_byte_of_sparse_files);
  tcase_add_test(tc, header_chunk_size_overrides_requested);
  tcase_add_test(tc, bad_headers_refused_unchanged);
  tcase_add_test(tc, valid_zero_opens_invalid);
  tcase_add_test(tc, huge_chunk_header_refused_cheaply);
  suite_add_tcase(s, tc);
  tc = tcase_create("records");
  tcase_add_test(tc, truncated_files_refused);
  tcase_add_test(tc, records_into_metadata_refused);
  tcase_add_test(tc, zero_new_chunk_ends_the_list);
  tcase_add_test(tc, garbage_records_kept_few_and_open_stops_at_first);
  tcase_add_test(tc, duplicate_old_chunks_earliest_wins);
  tcase_add_test(tc, repeated_chunks_served_as_dm);
  tcase_add_test(tc, out_of_order_records_accepted_with_note);
  suite_add_tcase(s, tc);
  return s;
}

Suite* GroupCommitSuite() {
  Suite* s = suite_create("group_commit");
  TCase* tc = tcase_create("threads");
  tcase_set_timeout(tc, 120);
  tcase_add_test(tc, concurrent_waiting_commits_are_grouped);
  tcase_add_test(tc, lazy_commits_then_flush_are_durable);
  tcase_add_test(tc, out_of_order_commits_across_area_end_then_flush);
  tcase_add_test(tc, concurrent_commits_and_abandons);
  suite_add_tcase(s, tc);
  return s;
}

Suite* ErrorSuite() {
  Suite* s = suite_create("errors");
  TCase* tc = tcase_create("injected");
  tcase_add_test(tc, eio_on_area_write_invalidates);
  tcase_add_test(tc, eio_on_sync_invalidates);
  tcase_add_test(tc, failed_lazy_write_out_returns);
  tcase_add_test(tc, failed_flush_sync_is_fatal);
  tcase_add_test(tc, trailing_abandoned_slot_leaves_store_quiet);
  tcase_add_test(tc, data_write_error_then_abandon_keeps_store_valid);
  tcase_add_test(tc, abandon_leaves_hole_and_store_works);
  tcase_add_test(tc, enospc_on_data_write_keeps_store);
  tcase_add_test(tc, full_disk_after_failed_write_flush_keeps_store);
  tcase_add_test(tc, failed_writes_retried_use_up_nothing);
  tcase_add_test(tc, transient_failed_write_zeroed_at_close);
  tcase_add_test(tc, full_disk_at_next_area_refuses_write_keeps_store);
  tcase_add_test(tc, grow_failure_at_group_commit_invalidates);
  tcase_add_test(tc, zeroed_new_chunk_readable_before_group_commit);
  tcase_add_test(tc, size_cap_fills);
  tcase_add_test(tc, size_cap_counts_next_area);
  tcase_add_test(tc, invalidate_writes_header_and_status_priority);
  tcase_add_test(tc, read_only_store_never_writes);
  tcase_add_test(tc, merge_runs_batch_the_steps);
  suite_add_tcase(s, tc);
  return s;
}

Suite* TransientSuite() {
  Suite* s = suite_create("transient");
  TCase* tc = tcase_create("transient");
  tcase_add_test(tc, transient_basics);
  tcase_add_test(tc, transient_full_invalidates);
  tcase_add_test(tc, transient_refuses_persistent_file_and_bad_options);
  tcase_add_test(tc, transient_zeroes_its_file_when_closed);
  suite_add_tcase(s, tc);
  return s;
}

}  // namespace

int main() { return snaptest::RunSuites({FaultFileSuite(), RoundTripSuite(), HeaderSuite(), GroupCommitSuite(), ErrorSuite(), TransientSuite()}); }
