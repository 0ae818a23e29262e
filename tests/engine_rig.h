// An engine over an in-memory origin with snapshots on FaultFiles, for
// engine tests: the COW files' syncs pass a gate the test can close, and
// every origin write checks that the copy-outs of its chunks are durable.
#pragma once

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "filter/snapshot_engine.h"
#include "store/exception_store.h"
#include "tests/fault_file.h"
#include "tests/memory_origin.h"

// Last: check.h defines macros that clash with the C++ library.
#include "tests/check_util.h"

namespace snap_test {

using snap::ExceptionStore;
using snap::Snapshot;
using snap::SnapshotEngine;
using snaptest::FaultFile;

constexpr uint64_t kSize = 1 << 20;
constexpr uint64_t kChunk = 4096;

inline std::vector<char> Fill(size_t n, char value) { return std::vector<char>(n, value); }

// A gate a sync waits at while it is closed.
class Gate {
 public:
  void Close() {
    std::lock_guard<std::mutex> l(mu_);
    open_ = false;
  }
  void Open() {
    std::lock_guard<std::mutex> l(mu_);
    open_ = true;
    cv_.notify_all();
  }
  void Pass() {
    std::unique_lock<std::mutex> l(mu_);
    cv_.wait(l, [&] { return open_; });
  }

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  bool open_ = true;
};

// The memory origin, with a check before every write and optional failures.
class CheckedOrigin final : public snap::OriginIo {
 public:
  explicit CheckedOrigin(snap_test::MemoryOrigin& mem) : mem_(mem) {}
  std::function<void(uint64_t offset, uint64_t length)> before_write;
  std::function<void(uint64_t offset)> before_read;
  // Reads touching [first, second) fail; set while no read runs.
  std::pair<uint64_t, uint64_t> fail_reads_in{0, 0};
  std::atomic<bool> fail_writes{false};
  std::atomic<int> fail_next_writes{0};  // this many writes fail, then pass

  uint64_t size() const override { return mem_.size(); }
  bool can_write() const override { return true; }
  bool can_zero() const override { return false; }
  bool can_fast_zero() const override { return false; }
  bool can_trim() const override { return false; }
  bool can_fua() const override { return true; }
  bool can_flush() const override { return true; }
  absl::Status Read(std::span<char> buf, uint64_t offset) override {
    if (before_read) before_read(offset);
    if (offset < fail_reads_in.second && offset + buf.size() > fail_reads_in.first)
      return absl::DataLossError("injected origin read error");
    return mem_.Read(buf, offset);
  }
  absl::Status Write(std::span<const char> buf, uint64_t offset, bool fua) override {
    if (before_write) before_write(offset, buf.size());
    if (fail_writes.load()) return absl::DataLossError("injected origin write error");
    if (fail_next_writes.fetch_sub(1) > 0)
      return absl::UnavailableError("injected passing origin write error");
    absl::Status st = mem_.Write(buf, offset, fua);
    // A plugin FUA such as the nbd plugin's: this write only.
    std::lock_guard<std::mutex> l(durable_mu_);
    if (st.ok() && fua) std::copy(buf.begin(), buf.end(), durable_.begin() + static_cast<long>(offset));
    return st;
  }
  // What survives a crash: the origin as of its last flush, plus FUA writes.
  std::vector<char> Durable(uint64_t offset, uint64_t n) {
    std::lock_guard<std::mutex> l(durable_mu_);
    return {durable_.begin() + static_cast<long>(offset),
            durable_.begin() + static_cast<long>(offset + n)};
  }
  absl::Status Zero(uint64_t l, uint64_t o, bool t, bool f, bool fast) override {
    return mem_.Zero(l, o, t, f, fast);
  }
  absl::Status Trim(uint64_t l, uint64_t o, bool f) override { return mem_.Trim(l, o, f); }
  absl::Status Flush() override {
    std::lock_guard<std::mutex> l(durable_mu_);
    durable_ = mem_.Contents();
    return mem_.Flush();
  }

 private:
  snap_test::MemoryOrigin& mem_;
  std::mutex durable_mu_;
  std::vector<char> durable_ = mem_.Contents();
};

// An origin of 'o' bytes, one engine, snapshots on FaultFiles whose syncs
// pass a gate.
struct Rig {
  snap_test::MemoryOrigin mem{Fill(kSize, 'o')};
  CheckedOrigin origin{mem};
  Gate gate;
  std::vector<std::unique_ptr<FaultFile>> disks;
  std::mutex snaps_mu;
  std::vector<std::shared_ptr<Snapshot>> snaps;  // taken, under snaps_mu
  std::atomic<int> early_writes{0};  // origin writes before a durable copy-out
  SnapshotEngine engine{origin};

  Rig() {
    origin.before_write = [this](uint64_t offset, uint64_t length) {
      std::lock_guard<std::mutex> l(snaps_mu);
      for (const auto& s : snaps) {
        if (!s->store->valid()) continue;
        for (uint64_t c = offset / kChunk; c <= (offset + length - 1) / kChunk; ++c) {
          std::optional<snap::Exception> e = s->store->Lookup(c);
          if (!e || !e->durable) ++early_writes;
        }
      }
    };
  }
  std::shared_ptr<Snapshot> NewSnapshot(const std::string& name) {
    disks.push_back(std::make_unique<FaultFile>(name + ".cow"));
    snap::StoreOptions o;
    o.type = snap::StoreType::kPersistent;
    o.chunk_sectors = kChunk / 512;
    absl::StatusOr<std::unique_ptr<ExceptionStore>> st = snap::OpenStore(disks.back()->Handle(), o);
    ck_assert_msg(st.ok(), "%s", st.status().ToString().c_str());
    disks.back()->set_sync_hook([this](uint64_t) { gate.Pass(); });
    return std::make_shared<Snapshot>(name, name + ".cow", std::move(*st));
  }
  // Once Add returns, every origin write must find s's copy-outs durable.
  void Take(const std::shared_ptr<Snapshot>& s) {
    ASSERT_OK(engine.Add(s));
    std::lock_guard<std::mutex> l(snaps_mu);
    snaps.push_back(s);
  }
  std::vector<char> Origin(uint64_t offset, uint64_t n) {
    std::vector<char> all = mem.Contents();
    return {all.begin() + static_cast<long>(offset), all.begin() + static_cast<long>(offset + n)};
  }
  // Runs the merge started on the engine to its end.
  void MergeToEnd() {
    for (;;) {
      absl::StatusOr<bool> done = engine.MergeStep();
      ASSERT_OK(done.status());
      if (*done) break;
    }
    engine.FinishMerge();
  }
  std::vector<char> SnapRead(Snapshot& s, uint64_t offset, uint64_t n) {
    std::vector<char> buf(n);
    ASSERT_OK(engine.SnapRead(s, buf, offset));
    return buf;
  }
};

}  // namespace snap_test
