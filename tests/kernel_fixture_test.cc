// COW files written by the Linux kernel's dm-snapshot (tests/fixtures/kernel,
// see its README.md): the store must read them as the kernel does, and must
// write byte-identical files when it replays the same exceptions.
//
// The fixtures are found through $srcdir (set by AM_TESTS_ENVIRONMENT to
// the tests directory) or, failing that, relative to the current directory.
// They are decompressed with `xz -dc`. With no fixtures the tests say so
// and pass.
#include <stdio.h>
#include <stdlib.h>
#include <sys/wait.h>

#include <algorithm>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <map>
#include <memory>
#include <set>
#include <string>
#include <vector>

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

using snap::ExceptionStore;
using snap::Geometry;
using snap::StoreOptions;
using snap::StoreType;
using snap::WriteSource;
using snaptest::FaultFile;

namespace {

using ull = unsigned long long;

struct DumpRecord {
  uint64_t area, index, old_chunk, new_chunk;
};

struct Fixture {
  std::string name;
  std::map<std::string, std::string> expect;
  std::vector<DumpRecord> dump;
  std::string cow_path;

  const std::string& Get(const std::string& key) const {
    auto it = expect.find(key);
    ck_assert_msg(it != expect.end(), "%s.expect has no %s=", name.c_str(), key.c_str());
    return it->second;
  }
  uint64_t Num(const std::string& key) const { return std::stoull(Get(key)); }
};

std::string FixtureDir() {
  std::vector<std::string> tries;
  if (const char* s = getenv("srcdir"); s && *s)
    tries.push_back(std::string(s) + "/fixtures/kernel");
  tries.push_back("tests/fixtures/kernel");
  tries.push_back("fixtures/kernel");
  for (const std::string& d : tries)
    if (std::filesystem::is_directory(d)) return d;
  return "";
}

std::vector<Fixture> LoadFixtures() {
  std::vector<Fixture> out;
  std::string dir = FixtureDir();
  if (dir.empty()) return out;
  std::vector<std::string> names;
  for (const auto& e : std::filesystem::directory_iterator(dir)) {
    std::string f = e.path().filename().string();
    if (f.size() > 7 && f.ends_with(".expect")) names.push_back(f.substr(0, f.size() - 7));
  }
  std::sort(names.begin(), names.end());
  for (const std::string& n : names) {
    Fixture fx;
    fx.name = n;
    fx.cow_path = dir + "/" + n + ".cow.xz";
    if (!std::filesystem::exists(fx.cow_path)) continue;
    std::ifstream ex(dir + "/" + n + ".expect");
    for (std::string line; std::getline(ex, line);) {
      if (line.empty() || line[0] == '#') continue;
      size_t eq = line.find('=');
      if (eq != std::string::npos) fx.expect[line.substr(0, eq)] = line.substr(eq + 1);
    }
    std::ifstream dump(dir + "/" + n + ".cowdump");
    ck_assert_msg(dump.good(), "%s.cowdump is missing", n.c_str());
    for (std::string line; std::getline(dump, line);) {
      ull a, i, o, nc;
      if (std::sscanf(line.c_str(), " area %llu idx %llu: old_chunk %llu -> new_chunk %llu", &a,
                      &i, &o, &nc) == 4)
        fx.dump.push_back({a, i, o, nc});
    }
    out.push_back(std::move(fx));
  }
  return out;
}

std::vector<char> Decompress(const std::string& path) {
  std::string cmd = "xz -dc '" + path + "'";
  FILE* p = popen(cmd.c_str(), "r");
  ck_assert_msg(p != nullptr, "cannot run %s", cmd.c_str());
  std::vector<char> out;
  char buf[65536];
  for (size_t n; (n = fread(buf, 1, sizeof buf, p)) > 0;) out.insert(out.end(), buf, buf + n);
  int rc = pclose(p);
  ck_assert_msg(rc == 0, "%s failed (status %d): is xz installed?", cmd.c_str(), rc);
  return out;
}

StoreType TypeOf(const Fixture& fx) {
  absl::StatusOr<StoreType> t = snap::ParseStoreType(fx.Get("persist"));
  ck_assert(t.ok());
  return *t;
}

bool NoFixtures(const std::vector<Fixture>& fxs) {
  if (fxs.empty()) {
    std::printf("SKIP: no kernel fixtures found (srcdir=%s); nothing checked\n",
                getenv("srcdir") ? getenv("srcdir") : "(unset)");
  } else if (std::system("xz --version >/dev/null 2>&1") != 0) {
    std::printf("SKIP: xz is not installed (apt-get install xz-utils); nothing checked\n");
  } else {
    return false;
  }
  std::fflush(stdout);
  return true;
}

// Read-only open, as `nbdsnap` / a reload would: header, validity, status
// line, the exception list, lookups.
START_TEST(kernel_cow_files_read_like_the_kernel) {
  std::vector<Fixture> fxs = LoadFixtures();
  if (NoFixtures(fxs)) return;
  for (const Fixture& fx : fxs) {
    const char* n = fx.name.c_str();
    std::vector<char> cow = Decompress(fx.cow_path);
    ck_assert_msg(cow.size() == fx.Num("cow_size_bytes"), "%s: %zu bytes", n, cow.size());
    const uint32_t cs = static_cast<uint32_t>(fx.Num("chunk_sectors"));
    const bool valid = fx.Num("valid") != 0;
    ck_assert_msg(fx.dump.size() == fx.Num("exceptions"), "%s: cowdump has %zu records", n,
                  fx.dump.size());
    FaultFile file(cow, fx.name + ".cow");
    StoreOptions o;
    o.type = TypeOf(fx);
    o.read_only = true;
    absl::StatusOr<std::unique_ptr<ExceptionStore>> so = snap::OpenStore(file.Handle(), o);
    ck_assert_msg(so.ok(), "%s: %s", n, so.status().ToString().c_str());
    ExceptionStore& s = **so;
    ck_assert_msg(s.chunk_sectors() == cs, "%s: chunk size %u, want %u", n, s.chunk_sectors(),
                  cs);
    ck_assert_msg(s.valid() == valid, "%s: valid() is %d", n, s.valid());
    ck_assert_msg(s.StatusLine() == fx.Get("status_reload"), "%s: status '%s', kernel '%s'", n,
                  s.StatusLine().c_str(), fx.Get("status_reload").c_str());
    if (valid) {
      std::set<uint64_t> olds;
      for (const DumpRecord& r : fx.dump) olds.insert(r.old_chunk);
      ck_assert_msg(s.exception_count() == olds.size(), "%s: %llu exceptions, want %zu", n,
                    static_cast<ull>(s.exception_count()), olds.size());
      std::set<uint64_t> seen;
      for (const DumpRecord& r : fx.dump) {
        if (!seen.insert(r.old_chunk).second) continue;  // the earliest wins
        std::optional<snap::Exception> e = s.Lookup(r.old_chunk);
        EXPECT_MSG(e.has_value(), "%s: area %llu idx %llu: old chunk %llu not found", n,
                   static_cast<ull>(r.area), static_cast<ull>(r.index),
                   static_cast<ull>(r.old_chunk));
        EXPECT_MSG(e->cow_chunk == r.new_chunk, "%s: old chunk %llu -> %llu, kernel %llu", n,
                   static_cast<ull>(r.old_chunk), static_cast<ull>(e->cow_chunk),
                   static_cast<ull>(r.new_chunk));
        EXPECT(e->durable);
      }
      // Chunks the kernel did not map are not mapped.
      for (uint64_t c = 0; c < 4096; ++c)
        if (!olds.count(c))
          EXPECT_MSG(!s.Lookup(c).has_value(), "%s: chunk %llu mapped", n, static_cast<ull>(c));
    } else {
      ck_assert_uint_eq(s.exception_count(), 0);
    }
    ck_assert_msg(s.notes().empty(), "%s: unexpected note: %s", n,
                  s.notes().empty() ? "" : s.notes()[0].c_str());
    // The scan agrees with the kernel's bookkeeping.
    absl::StatusOr<snap::CowScan> scan = snap::ScanCow(file);
    ck_assert(scan.ok());
    ck_assert_msg(scan->problems.empty(), "%s: %s", n,
                  scan->problems.empty() ? "" : scan->problems[0].c_str());
    if (valid) {
      ck_assert_uint_eq(scan->exceptions, fx.Num("exceptions"));
      ck_assert_uint_eq(scan->current_area + 1, fx.Num("areas_used"));
      ck_assert((scan->current_area + 2) * cs == fx.Num("metadata_sectors"));
      ck_assert(scan->allocation_ordered);
      ck_assert(!scan->tail_garbage);
    }
    ck_assert_msg(file.counters().writes == 0 && file.counters().grows == 0,
                  "%s: a read-only open wrote to the file", n);
    ck_assert_msg(file.Contents() == cow, "%s: the file changed", n);
  }
}
END_TEST

// Read-write open of the kernel's files: a different requested chunk size
// is overridden by the header; new exceptions go where the kernel would
// put them (after a reload: CVE-2013-4299's skip of the next area).
START_TEST(kernel_cow_files_take_new_exceptions) {
  std::vector<Fixture> fxs = LoadFixtures();
  if (NoFixtures(fxs)) return;
  for (const Fixture& fx : fxs) {
    if (fx.Num("valid") == 0) continue;
    const char* n = fx.name.c_str();
    const uint32_t cs = static_cast<uint32_t>(fx.Num("chunk_sectors"));
    Geometry g(cs);
    std::vector<char> cow = Decompress(fx.cow_path);
    FaultFile file(cow, fx.name + ".cow");
    StoreOptions o;
    o.type = TypeOf(fx);
    o.chunk_sectors = cs == 8 ? 16 : 8;
    absl::StatusOr<std::unique_ptr<ExceptionStore>> so = snap::OpenStore(file.Handle(), o);
    ck_assert_msg(so.ok(), "%s: %s", n, so.status().ToString().c_str());
    ExceptionStore& s = **so;
    ck_assert_uint_eq(s.chunk_sectors(), cs);
    ck_assert_msg(s.notes().size() == 1 && s.notes()[0].find("overrides") != std::string::npos,
                  "%s: no note that the header's chunk size wins", n);
    uint64_t max_new = 1;
    for (const DumpRecord& r : fx.dump) max_new = std::max(max_new, r.new_chunk);
    uint64_t want = max_new + 1;
    if (g.IsMetadataChunk(want)) ++want;
    absl::StatusOr<uint64_t> c = s.Allocate(1ull << 40, WriteSource::kOrigin);
    if (!c.ok()) {
      // Only a full COW may refuse.
      ck_assert_msg((want + 1) * g.chunk_bytes() > cow.size(), "%s: %s", n,
                    c.status().ToString().c_str());
      continue;
    }
    ck_assert_msg(*c == want, "%s: new exception at chunk %llu, want %llu", n,
                  static_cast<ull>(*c), static_cast<ull>(want));
    ASSERT_OK(s.Commit(*c, true));
    so->reset();
    absl::StatusOr<std::unique_ptr<ExceptionStore>> r = snap::OpenStore(file.PowerLoss(), o);
    ck_assert(r.ok());
    ck_assert_uint_eq((*r)->exception_count(), fx.dump.size() + 1);
    ck_assert_uint_eq((*r)->Lookup(1ull << 40)->cow_chunk, want);
  }
}
END_TEST

// Replaying the kernel's exceptions, in order and with the same data, into
// a zeroed file of the same size gives the kernel's file, byte for byte.
START_TEST(replay_gives_kernel_bytes) {
  std::vector<Fixture> fxs = LoadFixtures();
  if (NoFixtures(fxs)) return;
  size_t replayed = 0;
  for (const Fixture& fx : fxs) {
    if (fx.Num("valid") == 0 || fx.expect.count("merged_from")) continue;
    const char* n = fx.name.c_str();
    const uint32_t cs = static_cast<uint32_t>(fx.Num("chunk_sectors"));
    Geometry g(cs);
    const uint64_t cb = g.chunk_bytes();
    std::vector<char> kernel = Decompress(fx.cow_path);
    FaultFile file(std::vector<char>(kernel.size(), 0), fx.name + ".replay");
    StoreOptions o;
    o.type = TypeOf(fx);
    o.chunk_sectors = cs;
    absl::StatusOr<std::unique_ptr<ExceptionStore>> so = snap::OpenStore(file.Handle(), o);
    ck_assert_msg(so.ok(), "%s: %s", n, so.status().ToString().c_str());
    ExceptionStore& s = **so;
    for (size_t i = 0; i < fx.dump.size(); ++i) {
      const DumpRecord& r = fx.dump[i];
      absl::StatusOr<uint64_t> c = s.Allocate(r.old_chunk, WriteSource::kOrigin);
      ck_assert_msg(c.ok(), "%s: record %zu: %s", n, i, c.status().ToString().c_str());
      ck_assert_msg(*c == r.new_chunk, "%s: record %zu got chunk %llu, kernel %llu", n, i,
                    static_cast<ull>(*c), static_cast<ull>(r.new_chunk));
      std::span<const char> data(kernel.data() + r.new_chunk * cb, cb);
      ASSERT_OK(s.WriteChunk(*c, 0, data));
      ASSERT_OK(s.Commit(*c, i % 3 == 0));
    }
    ASSERT_OK(s.Flush());
    ck_assert_msg(s.StatusLine() == fx.Get("status_reload"), "%s: status '%s', kernel '%s'", n,
                  s.StatusLine().c_str(), fx.Get("status_reload").c_str());
    std::vector<char> ours = file.Durable();
    ck_assert_msg(ours.size() == kernel.size(), "%s: %zu bytes, kernel %zu", n, ours.size(),
                  kernel.size());
    size_t i = std::mismatch(ours.begin(), ours.end(), kernel.begin()).first - ours.begin();
    ck_assert_msg(i == ours.size(),
                  "%s: first difference from the kernel's file at byte %zu (chunk %llu, "
                  "offset %llu)",
                  n, i, static_cast<ull>(i / cb), static_cast<ull>(i % cb));
    ++replayed;
  }
  std::printf("replayed %zu kernel fixtures byte-identically\n", replayed);
  std::fflush(stdout);
  ck_assert_uint_gt(replayed, 0);
}
END_TEST

// The same replay into an empty file that the store grows (areas past the
// end need no zeroing write): the same bytes as far as the file goes, and
// the same used/metadata figures in the status line after every exception
// where the kernel's live status is known (the end).
START_TEST(replay_into_growing_file_matches_kernel) {
  std::vector<Fixture> fxs = LoadFixtures();
  if (NoFixtures(fxs)) return;
  for (const Fixture& fx : fxs) {
    if (fx.Num("valid") == 0 || fx.expect.count("merged_from")) continue;
    const char* n = fx.name.c_str();
    const uint32_t cs = static_cast<uint32_t>(fx.Num("chunk_sectors"));
    Geometry g(cs);
    const uint64_t cb = g.chunk_bytes();
    const uint64_t epa = g.exceptions_per_area();
    std::vector<char> kernel = Decompress(fx.cow_path);
    FaultFile file;
    StoreOptions o;
    o.type = TypeOf(fx);
    o.chunk_sectors = cs;
    absl::StatusOr<std::unique_ptr<ExceptionStore>> so = snap::OpenStore(file.Handle(), o);
    ck_assert(so.ok());
    ExceptionStore& s = **so;
    for (size_t i = 0; i < fx.dump.size(); ++i) {
      const DumpRecord& r = fx.dump[i];
      absl::StatusOr<uint64_t> c = s.Allocate(r.old_chunk, WriteSource::kOrigin);
      ck_assert_msg(c.ok() && *c == r.new_chunk, "%s: record %zu", n, i);
      ASSERT_OK(
          s.WriteChunk(*c, 0, std::span<const char>(kernel.data() + r.new_chunk * cb, cb)));
      ASSERT_OK(s.Commit(*c, true));
      // dm after a commit: current_area = committed / epa.
      snap::StoreUsage u = s.Usage();
      EXPECT_MSG(u.used_sectors == g.SlotToChunk(i + 1) * cs &&
                     u.metadata_sectors == ((i + 1) / epa + 2) * cs,
                 "%s: after %zu exceptions: used %llu metadata %llu, dm says %llu %llu", n,
                 i + 1, static_cast<ull>(u.used_sectors), static_cast<ull>(u.metadata_sectors),
                 static_cast<ull>(g.SlotToChunk(i + 1) * cs),
                 static_cast<ull>(((i + 1) / epa + 2) * cs));
    }
    ASSERT_OK(s.Flush());
    unsigned long long ku, kt, km;
    if (std::sscanf(fx.Get("status_reload").c_str(), "%llu/%llu %llu", &ku, &kt, &km) == 3) {
      snap::StoreUsage u = s.Usage();
      ck_assert_msg(u.used_sectors == ku && u.metadata_sectors == km,
                    "%s: status %s, kernel %s", n, s.StatusLine().c_str(),
                    fx.Get("status_reload").c_str());
    }
    std::vector<char> ours = file.Durable();
    ck_assert_uint_le(ours.size(), kernel.size());
    size_t i = std::mismatch(ours.begin(), ours.end(), kernel.begin()).first - ours.begin();
    ck_assert_msg(i == ours.size(), "%s: first difference at byte %zu (chunk %llu)", n, i,
                  static_cast<ull>(i / cb));
    ck_assert_msg(std::all_of(kernel.begin() + static_cast<ptrdiff_t>(ours.size()),
                              kernel.end(), [](char c) { return c == 0; }),
                  "%s: the kernel's file has data past our end (%zu bytes)", n, ours.size());
  }
}
END_TEST

// Merging the kernel's small8 COW with the store gives the kernel's merged8
// COW (records zeroed, header valid, data chunks left as they were).
START_TEST(merge_gives_kernel_merged_file) {
  std::vector<Fixture> fxs = LoadFixtures();
  if (NoFixtures(fxs)) return;
  size_t merged = 0;
  for (const Fixture& to : fxs) {
    if (!to.expect.count("merged_from")) continue;
    const Fixture* from = nullptr;
    for (const Fixture& f : fxs)
      if (f.name == to.Get("merged_from")) from = &f;
    ck_assert_msg(from != nullptr, "%s: fixture %s is missing", to.name.c_str(),
                  to.Get("merged_from").c_str());
    const uint32_t cs = static_cast<uint32_t>(from->Num("chunk_sectors"));
    std::vector<char> before = Decompress(from->cow_path);
    std::vector<char> kernel_after = Decompress(to.cow_path);
    FaultFile file(before, from->name + ".cow");
    StoreOptions o;
    o.type = TypeOf(*from);
    absl::StatusOr<std::unique_ptr<ExceptionStore>> so = snap::OpenStore(file.Handle(), o);
    ck_assert(so.ok());
    ExceptionStore& s = **so;
    size_t steps = 0;
    for (;;) {
      absl::StatusOr<snap::MergeRun> r = s.PrepareMerge();
      ck_assert_msg(r.ok(), "%s", r.status().ToString().c_str());
      if (r->count == 0) break;
      ASSERT_OK(s.CommitMerge(r->count));
      ck_assert_uint_lt(++steps, 100000);
    }
    ck_assert_msg(s.StatusLine() == to.Get("status_reload"), "%s: status '%s', kernel '%s'",
                  to.name.c_str(), s.StatusLine().c_str(), to.Get("status_reload").c_str());
    std::vector<char> ours = file.Durable();
    ck_assert_uint_eq(ours.size(), kernel_after.size());
    size_t i =
        std::mismatch(ours.begin(), ours.end(), kernel_after.begin()).first - ours.begin();
    ck_assert_msg(i == ours.size(),
                  "%s: first difference from the kernel's merged file at byte %zu (chunk %zu)",
                  to.name.c_str(), i, i / (cs * 512));
    ++merged;
  }
  std::printf("merged %zu kernel fixtures byte-identically\n", merged);
  std::fflush(stdout);
}
END_TEST

Suite* KernelSuite() {
  Suite* s = suite_create("kernel_fixtures");
  TCase* tc = tcase_create("fixtures");
  tcase_set_timeout(tc, 120);
  tcase_add_test(tc, kernel_cow_files_read_like_the_kernel);
  tcase_add_test(tc, kernel_cow_files_take_new_exceptions);
  tcase_add_test(tc, replay_gives_kernel_bytes);
  tcase_add_test(tc, replay_into_growing_file_matches_kernel);
  tcase_add_test(tc, merge_gives_kernel_merged_file);
  suite_add_tcase(s, tc);
  return s;
}

}  // namespace

int main() { return snaptest::RunSuites({KernelSuite()}); }
