// The origin as the engine sees it: a block device. The nbdkit glue
// implements it over one shared plugin context; tests can use memory.
#pragma once

#include <cstdint>
#include <span>

#include "absl/status/status.h"

namespace snap {

class OriginIo {
 public:
  virtual ~OriginIo() = default;
  virtual uint64_t size() const = 0;
  virtual bool can_write() const = 0;
  virtual bool can_zero() const = 0;
  virtual bool can_fast_zero() const = 0;
  virtual bool can_trim() const = 0;
  virtual bool can_fua() const = 0;
  virtual bool can_flush() const = 0;
  // The smallest I/O the origin takes, a power of two: every request to it
  // is a multiple of this, aligned to it.
  virtual uint32_t block_min() const { return 1; }
  virtual absl::Status Read(std::span<char> buf, uint64_t offset) = 0;
  virtual absl::Status Write(std::span<const char> buf, uint64_t offset,
                             bool fua) = 0;
  // fast: fail with ENOTSUP rather than zero slowly (NBD's FAST_ZERO).
  virtual absl::Status Zero(uint64_t length, uint64_t offset, bool may_trim,
                            bool fua, bool fast) = 0;
  virtual absl::Status Trim(uint64_t length, uint64_t offset, bool fua) = 0;
  virtual absl::Status Flush() = 0;
};

}  // namespace snap
