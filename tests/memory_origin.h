// An in-memory origin for engine tests: a byte vector behind a mutex.
#pragma once

#include <cstring>
#include <mutex>
#include <span>
#include <vector>

#include "absl/status/status.h"
#include "filter/origin_io.h"

namespace snap_test {

class MemoryOrigin final : public snap::OriginIo {
 public:
  explicit MemoryOrigin(std::vector<char> data) : data_(std::move(data)) {}

  uint64_t size() const override { return data_.size(); }  // never changes
  bool can_write() const override { return true; }
  // No zero: the engine writes zeros itself (its fallback path).
  bool can_zero() const override { return false; }
  bool can_fast_zero() const override { return false; }
  bool can_trim() const override { return false; }
  bool can_fua() const override { return true; }
  bool can_flush() const override { return true; }

  absl::Status Read(std::span<char> buf, uint64_t offset) override {
    if (offset + buf.size() > data_.size())
      return absl::OutOfRangeError("read past the end of the origin");
    std::lock_guard<std::mutex> l(mu_);
    std::memcpy(buf.data(), data_.data() + offset, buf.size());
    return absl::OkStatus();
  }
  absl::Status Write(std::span<const char> buf, uint64_t offset,
                     bool) override {
    if (offset + buf.size() > data_.size())
      return absl::OutOfRangeError("write past the end of the origin");
    std::lock_guard<std::mutex> l(mu_);
    std::memcpy(data_.data() + offset, buf.data(), buf.size());
    return absl::OkStatus();
  }
  absl::Status Zero(uint64_t, uint64_t, bool, bool, bool) override {
    return absl::UnimplementedError("MemoryOrigin has no zero");
  }
  absl::Status Trim(uint64_t, uint64_t, bool) override {
    return absl::OkStatus();
  }
  absl::Status Flush() override { return absl::OkStatus(); }

  std::vector<char> Contents() {
    std::lock_guard<std::mutex> l(mu_);
    return data_;
  }

 private:
  std::mutex mu_;
  std::vector<char> data_;
};

}  // namespace snap_test
