// OriginIo over one shared nbdkit context, opened in .after_fork, so that
// every export and the merge thread see one origin. Calls are serialized
// when the final thread model is below PARALLEL: our threads bypass
// nbdkit's own request locks.
#pragma once

#include <nbdkit-filter.h>

#include <mutex>
#include <string>

#include "filter/origin_io.h"

namespace snap {

// "origin WHAT at offset OFFSET failed: <the OS's words for err>", with
// err (EIO when 0) attached for nbdkit.
absl::Status OriginError(const char* what, uint64_t offset, int err);

class NbdkitOrigin final : public OriginIo {
 public:
  // Opens, prepares and probes the context. Errors go to nbdkit_error.
  bool Open(nbdkit_backend* backend, bool serialize);
  void Close();
  nbdkit_next* next() { return next_; }

  uint64_t size() const override { return size_; }
  bool can_write() const override { return can_write_; }
  bool can_zero() const override { return can_zero_; }
  bool can_fast_zero() const override { return can_fast_zero_; }
  uint32_t block_min() const override { return block_min_; }
  uint32_t block_preferred() const { return block_preferred_; }
  uint32_t block_max() const { return block_max_; }
  bool can_trim() const override { return can_trim_; }
  bool can_fua() const override { return can_fua_; }
  bool can_flush() const override { return can_flush_; }
  bool can_extents() const { return can_extents_; }
  // Snapshots read what they did not change from the origin, so they
  // share its seek costs.
  bool is_rotational() const { return is_rotational_; }

  absl::Status Read(std::span<char> buf, uint64_t offset) override;
  absl::Status Write(std::span<const char> buf, uint64_t offset,
                     bool fua) override;
  absl::Status Zero(uint64_t length, uint64_t offset, bool may_trim,
                    bool fua, bool fast) override;
  absl::Status Trim(uint64_t length, uint64_t offset, bool fua) override;
  absl::Status Flush() override;
  // Extents of [offset, offset+length) from the plugin, into `out`.
  int Extents(uint32_t length, uint64_t offset, uint32_t flags,
              nbdkit_extents* out, int* err);

 private:
  // Holds the serializing lock when one is needed.
  std::unique_lock<std::mutex> Guard() {
    return serialize_ ? std::unique_lock<std::mutex>(mu_)
                      : std::unique_lock<std::mutex>();
  }

  nbdkit_next* next_ = nullptr;
  bool serialize_ = false;
  std::mutex mu_;
  uint64_t size_ = 0;
  bool can_write_ = false, can_zero_ = false, can_trim_ = false;
  bool can_fua_ = false, can_flush_ = false, can_extents_ = false;
  bool can_fast_zero_ = false, is_rotational_ = false;
  // The plugin's block size constraints (1, 0 and 0xffffffff when none);
  // requests to it are split at max_request_, a multiple of block_min_.
  uint32_t block_min_ = 1, block_preferred_ = 0, block_max_ = 0xffffffff;
  uint64_t max_request_ = 0;
};

}  // namespace snap
