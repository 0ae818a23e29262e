// The engine under concurrency, without nbdkit: threads write the origin
// and snapshots (4 KiB and 64 KiB chunks) at once, and read the snapshots
// while they do. Afterwards each snapshot equals the origin at the start
// plus its own writes, and the origin equals its writes. Built twice: with
// ASan/UBSan, and with TSan (engine_stress_tsan_test).
#include <stdlib.h>
#include <unistd.h>

#include <cstring>
#include <mutex>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "filter/snapshot_engine.h"
#include "store/exception_store.h"

// Last: check.h defines macros that clash with the C++ library.
#include <check.h>

namespace {

using snap::OriginIo;

class MemoryOrigin final : public OriginIo {
 public:
  explicit MemoryOrigin(std::vector<char> data) : data_(std::move(data)) {}
  uint64_t size() const override { return data_.size(); }
  bool can_write() const override { return true; }
  bool can_zero() const override { return false; }
  bool can_trim() const override { return false; }
  bool can_fua() const override { return false; }
  bool can_flush() const override { return true; }
  absl::Status Read(std::span<char> buf, uint64_t off) override {
    std::lock_guard<std::mutex> l(mu_);
    std::memcpy(buf.data(), data_.data() + off, buf.size());
    return absl::OkStatus();
  }
  absl::Status Write(std::span<const char> buf, uint64_t off, bool) override {
    std::lock_guard<std::mutex> l(mu_);
    std::memcpy(data_.data() + off, buf.data(), buf.size());
    return absl::OkStatus();
  }
  absl::Status Zero(uint64_t, uint64_t, bool, bool) override {
    return absl::UnimplementedError("no zero");
  }
  absl::Status Trim(uint64_t, uint64_t, bool) override { return absl::OkStatus(); }
  absl::Status Flush() override { return absl::OkStatus(); }
  std::vector<char> Contents() {
    std::lock_guard<std::mutex> l(mu_);
    return data_;
  }

 private:
  std::mutex mu_;
  std::vector<char> data_;
};

constexpr uint64_t kBlock = 4096;
constexpr uint64_t kBlocks = 1024;  // a 4 MiB origin
constexpr int kThreads = 6;

std::string TempDir() {
  char tmpl[] = "/tmp/engine_stress.XXXXXX";
  ck_assert_ptr_nonnull(mkdtemp(tmpl));
  return tmpl;
}

START_TEST(parallel_origin_and_snapshot_io) {
  std::mt19937_64 rng(42);
  std::vector<char> base(kBlocks * kBlock);
  for (char& c : base) c = static_cast<char>(rng());
  MemoryOrigin origin(base);
  snap::SnapshotEngine engine(origin);
  const std::string dir = TempDir();
  std::vector<std::shared_ptr<snap::Snapshot>> snaps;
  const uint32_t chunk_sectors[] = {8, 128, 8};
  for (int i = 0; i < 3; ++i) {
    snap::StoreOptions opts;
    opts.chunk_sectors = chunk_sectors[i];
    std::string path = dir + "/s" + std::to_string(i) + ".cow";
    absl::StatusOr<std::unique_ptr<snap::ExceptionStore>> st = snap::OpenStoreFile(path, opts);
    ck_assert_msg(st.ok(), "%s", std::string(st.status().message()).c_str());
    auto s = std::make_shared<snap::Snapshot>("s" + std::to_string(i), path, std::move(*st));
    engine.Add(s);
    snaps.push_back(s);
  }
  // Thread t owns origin blocks b % kThreads == t and, in snapshot j, the
  // blocks (b + j) % kThreads == t: writes never race on one block, while
  // chunks (64 KiB = 16 blocks) are shared by every thread.
  std::vector<std::vector<char>> want(3, base);
  std::vector<char> want_origin = base;
  std::mutex model_mu;
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      std::mt19937_64 r(t + 1);
      std::vector<char> buf(kBlock);
      for (int i = 0; i < 300; ++i) {
        const uint64_t b = (r() % (kBlocks / kThreads)) * kThreads;
        const int what = static_cast<int>(r() % 5);
        std::memset(buf.data(), static_cast<char>(r()), kBlock);
        if (what <= 1) {
          const uint64_t blk = b + t;
          if (blk >= kBlocks) continue;
          ck_assert(engine.OriginWrite(buf, blk * kBlock, i % 7 == 0).ok());
          std::lock_guard<std::mutex> l(model_mu);
          std::memcpy(want_origin.data() + blk * kBlock, buf.data(), kBlock);
        } else if (what <= 3) {
          const int j = static_cast<int>(r() % 3);
          const uint64_t blk = b + static_cast<uint64_t>((t - j + kThreads) % kThreads);
          if (blk >= kBlocks) continue;
          // Half-block writes exercise the partial-chunk copy.
          const uint64_t len = (i % 2) ? kBlock : kBlock / 2;
          ck_assert(engine.SnapWrite(*snaps[j], {buf.data(), len}, blk * kBlock, false).ok());
          std::lock_guard<std::mutex> l(model_mu);
          std::memcpy(want[j].data() + blk * kBlock, buf.data(), len);
        } else {
          // Reads race with everything; they must not fail.
          const int j = static_cast<int>(r() % 3);
          std::vector<char> rd(16 * kBlock);
          const uint64_t off = (r() % (kBlocks - 16)) * kBlock;
          ck_assert(engine.SnapRead(*snaps[j], rd, off).ok());
        }
      }
    });
  }
  for (std::thread& th : threads) th.join();
  for (int j = 0; j < 3; ++j) {
    std::vector<char> got(kBlocks * kBlock);
    ck_assert(engine.SnapRead(*snaps[j], got, 0).ok());
    for (uint64_t b = 0; b < kBlocks; ++b)
      ck_assert_msg(std::memcmp(got.data() + b * kBlock, want[j].data() + b * kBlock, kBlock) == 0,
                    "snapshot %d block %llu differs from the model", j,
                    static_cast<unsigned long long>(b));
    ck_assert(snaps[j]->store->Flush().ok());
  }
  ck_assert(origin.Contents() == want_origin);
  for (int j = 0; j < 3; ++j) {
    ck_assert(engine.Remove(snaps[j]->name).ok());
    snaps[j].reset();
  }
  std::string cmd = "rm -rf " + dir;
  ck_assert_int_eq(system(cmd.c_str()), 0);
}
END_TEST

}  // namespace

int main() {
  Suite* s = suite_create("engine_stress");
  TCase* tc = tcase_create("parallel");
  tcase_set_timeout(tc, 300);
  tcase_add_test(tc, parallel_origin_and_snapshot_io);
  suite_add_tcase(s, tc);
  SRunner* sr = srunner_create(s);
  srunner_run_all(sr, CK_NORMAL);
  int failed = srunner_ntests_failed(sr);
  srunner_free(sr);
  return failed == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}
