// The one door through which the store touches a file. Tests put a
// fault-injecting, crash-simulating implementation behind it.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace snap {

class BlockFile {
 public:
  virtual ~BlockFile() = default;
  // Reads exactly buf.size() bytes; reading past the end is an error
  // (kOutOfRange), never a short read.
  virtual absl::Status PRead(std::span<char> buf, uint64_t offset) = 0;
  // Writes all of buf, growing the file if needed.
  virtual absl::Status PWrite(std::span<const char> buf, uint64_t offset) = 0;
  // Makes every completed write durable (fdatasync).
  virtual absl::Status Sync() = 0;
  virtual absl::StatusOr<uint64_t> Size() = 0;
  // Grows (never shrinks) the file to at least size bytes, sparsely.
  virtual absl::Status GrowTo(uint64_t size) = 0;
  // Sets aside disk space for a range, without changing the size, so that
  // writes there need not allocate one at a time, and cannot fail for
  // want of space. Fails (kResourceExhausted) only when the disk is full;
  // where space cannot be set aside (no fallocate), it does nothing.
  virtual absl::Status Reserve(uint64_t /*offset*/, uint64_t /*length*/) {
    return absl::OkStatus();
  }
  // Gives back what Reserve set aside past the end of the file.
  virtual void ReleaseReserve() {}
  // Whether disk space is allocated past the end (best effort: holes in a
  // sparse file can hide it), as a killed process leaves its reserve.
  virtual bool HoldsSpacePastEnd() { return false; }
  // Best effort: turns the range into zeros, freeing space where it can.
  virtual absl::Status ZeroRange(uint64_t offset, uint64_t length) = 0;
  // Takes an exclusive lock for the life of the object, so that one
  // process owns the file; the error says who holds it when it can.
  virtual absl::Status LockExclusive() { return absl::OkStatus(); }
  virtual const std::string& name() const = 0;
  virtual bool is_block_device() const { return false; }
  // The offset of the first byte before `end` that is not zero, or nullopt.
  // This one reads every byte; a POSIX file skips its holes.
  virtual absl::StatusOr<std::optional<uint64_t>> FirstNonZeroByte(uint64_t end);

 protected:
  // The same over [begin, end), reading every byte.
  absl::StatusOr<std::optional<uint64_t>> FirstNonZeroIn(uint64_t begin, uint64_t end);
};

enum class OpenMode { kReadOnly, kReadWrite, kReadWriteCreate };

// A POSIX file. kReadWriteCreate creates it (0644) when missing, and syncs
// its directory so that the new name survives a power loss.
// A store lives in a regular file or on a block device; anything else (a
// directory, a FIFO, a character device) gets this error.
absl::Status CheckStoreFileKind(const std::string& path, unsigned mode);

absl::StatusOr<std::unique_ptr<BlockFile>> OpenPosixFile(const std::string& path,
                                                         OpenMode mode);

}  // namespace snap
