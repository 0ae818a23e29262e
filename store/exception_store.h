// The exception store interface, after dm's exception-store registry: one
// interface, a persistent implementation (P, and PO which only changes what
// a full store does to a snapshot write) and a transient one (N).
//
// Thread-safe. The life of an exception: Allocate() hands out a COW chunk,
// the caller writes the chunk's data with WriteChunk(), then Commit() makes
// it visible to Lookup() at once and durable in allocation order, in group
// commits (one area write and its syncs serve every waiting exception).
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "store/block_file.h"

namespace snap {

enum class StoreType { kPersistent, kPersistentOverflow, kTransient };

// "P", "PO" or "N", upper or lower case; nothing else (dm looks at the
// first letter only, which makes a typo such as "nope" a transient store).
absl::StatusOr<StoreType> ParseStoreType(std::string_view text);
std::string_view StoreTypeName(StoreType type);  // "P", "PO", "N"

// Who needs the new exception; decides what a full store does (dm 4.4/4.5):
// an origin copy-out that finds no room invalidates the snapshot in every
// mode; a snapshot write does too, except in PO mode where it only sets
// Overflow and the snapshot stays readable.
enum class WriteSource { kOrigin, kSnapshot };

struct StoreOptions {
  StoreType type = StoreType::kPersistent;
  uint32_t chunk_sectors = 0;  // for new stores; 0 = kDefaultChunkSectors
  uint64_t size_cap = 0;       // bytes the file may grow to; 0 = no cap
  bool read_only = false;
};

struct StoreUsage {
  uint64_t used_sectors = 0;
  uint64_t total_sectors = 0;
  uint64_t metadata_sectors = 0;
};

struct Exception {
  uint64_t cow_chunk = 0;
  bool durable = false;  // its record is on disk
};

// A run of exceptions to merge: origin chunks old_chunk..old_chunk+count-1
// live in COW chunks cow_chunk..cow_chunk+count-1. count == 0: nothing left.
struct MergeRun {
  uint64_t old_chunk = 0;
  uint64_t cow_chunk = 0;
  uint32_t count = 0;
};

class ExceptionStore {
 public:
  virtual ~ExceptionStore() = default;

  virtual StoreType type() const = 0;
  virtual uint32_t chunk_sectors() const = 0;
  uint64_t chunk_bytes() const { return uint64_t{chunk_sectors()} * 512; }
  virtual const std::string& file_name() const = 0;

  virtual bool valid() const = 0;
  virtual bool overflowed() const = 0;
  // Why the store is invalid, for logs and errors ("" when valid).
  virtual std::string invalid_reason() const = 0;
  // Things worth telling the user that are not errors (header chunk size
  // overriding the requested one, duplicate records...).
  virtual std::vector<std::string> notes() const = 0;

  virtual uint64_t exception_count() const = 0;
  virtual std::optional<Exception> Lookup(uint64_t old_chunk) const = 0;

  // Reserves a COW chunk for old_chunk. When the store is full it applies
  // dm's policy for `source` and returns kResourceExhausted.
  virtual absl::StatusOr<uint64_t> Allocate(uint64_t old_chunk,
                                            WriteSource source) = 0;
  // The data of an allocated chunk is written: publish the exception. With
  // wait_durable, returns once its record is durable. A failed commit
  // invalidates the store, as in dm.
  virtual absl::Status Commit(uint64_t cow_chunk, bool wait_durable) = 0;
  // An allocated chunk that will never be committed (its copy failed): the
  // chunk is left unused and the snapshot stays valid.
  virtual void Abandon(uint64_t cow_chunk) = 0;

  virtual absl::Status ReadChunk(uint64_t cow_chunk, uint64_t offset,
                                 std::span<char> buf) = 0;
  virtual absl::Status WriteChunk(uint64_t cow_chunk, uint64_t offset,
                                  std::span<const char> buf) = 0;
  virtual absl::Status ZeroChunk(uint64_t cow_chunk, uint64_t offset,
                                 uint64_t length) = 0;
  // Every write and commit so far becomes durable.
  virtual absl::Status Flush() = 0;

  // Marks the store invalid (header valid = 0, best effort) and logs why.
  virtual void Invalidate(std::string_view reason) = 0;

  // Merge steps (dm 1.10). PrepareMerge gives the newest exception and the
  // run of consecutive ones before it in the same area; after the caller
  // copied it to the origin and flushed the origin, CommitMerge(count)
  // removes those records durably. Replaying a step after a crash is
  // harmless.
  virtual absl::StatusOr<MergeRun> PrepareMerge() = 0;
  // Several steps at once: the runs PrepareMerge would return one after the
  // other, newest first, within the current area and up to max_records in
  // all; CommitMerge(their total) then removes them with one area write.
  // Empty: nothing left.
  virtual absl::StatusOr<std::vector<MergeRun>> PrepareMergeRuns(
      uint32_t max_records) = 0;
  virtual absl::Status CommitMerge(uint32_t count) = 0;
  virtual void set_merge_failed(bool failed) = 0;

  virtual StoreUsage Usage() const = 0;
  // dm's status: "Invalid", "Merge failed", "Overflow" or
  // "<used>/<total> <metadata>" (sectors).
  virtual std::string StatusLine() const = 0;
};

// Opens (or, for a missing, empty or all-zero-header file, creates) a store.
// Errors name the file and say what to do.
absl::StatusOr<std::unique_ptr<ExceptionStore>> OpenStore(
    std::unique_ptr<BlockFile> file, const StoreOptions& options);

// Convenience: opens the path with the right mode first.
absl::StatusOr<std::unique_ptr<ExceptionStore>> OpenStoreFile(
    const std::string& path, const StoreOptions& options);

absl::StatusOr<std::unique_ptr<ExceptionStore>> OpenPersistentStore(
    std::unique_ptr<BlockFile> file, const StoreOptions& options);
absl::StatusOr<std::unique_ptr<ExceptionStore>> OpenTransientStore(
    std::unique_ptr<BlockFile> file, const StoreOptions& options);

}  // namespace snap
