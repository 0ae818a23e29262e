// The transient store ("N", dm-snap-transient.c): no header, no metadata,
// data chunks from chunk 0, the table only in memory. Nothing survives a
// restart, so nothing needs to be durable.
#include <algorithm>
#include <vector>

#include "absl/strings/str_format.h"
#include "store/sync.h"
#include "store/cow_format.h"
#include "store/cow_scan.h"
#include "store/exception_store.h"
#include "store/exception_table.h"
#include "store/store_status.h"

namespace snap {
namespace {

class TransientStore final : public ExceptionStore {
 public:
  TransientStore(std::unique_ptr<BlockFile> file, const StoreOptions& opts,
                 uint64_t limit)
      : file_(std::move(file)),
        chunk_sectors_(opts.chunk_sectors != 0 ? opts.chunk_sectors
                                               : kDefaultChunkSectors),
        limit_(limit) {}

  ~TransientStore() override {
    // Nothing in the file means anything once the store is gone: zero what
    // was used, so that the next start finds the file unused and takes it
    // again. Best effort; after a crash the file is refused until emptied.
    snap::MutexLock l(&mu_);
    // Chunks given back by Abandon may hold part of a failed write.
    uint64_t used = std::max(next_chunk_, high_chunk_) * chunk_bytes();
    if (file_->is_block_device()) used = std::min<uint64_t>(used, 4096);
    if (used != 0) (void)file_->ZeroRange(0, used);
  }

  StoreType type() const override { return StoreType::kTransient; }
  uint32_t chunk_sectors() const override { return chunk_sectors_; }
  const std::string& file_name() const override { return file_->name(); }
  bool valid() const override {
    snap::MutexLock l(&mu_);
    return valid_;
  }
  bool overflowed() const override { return false; }
  std::string invalid_reason() const override {
    snap::MutexLock l(&mu_);
    return invalid_reason_;
  }
  std::vector<std::string> notes() const override { return {}; }
  uint64_t exception_count() const override {
    snap::MutexLock l(&mu_);
    return table_.size();
  }
  std::optional<Exception> Lookup(uint64_t old_chunk) const override {
    snap::ReaderMutexLock l(&mu_);
    std::optional<uint32_t> slot = table_.Lookup(old_chunk);
    if (!slot) return std::nullopt;
    return Exception{*slot, true};
  }

  absl::StatusOr<uint64_t> Allocate(uint64_t old_chunk, WriteSource) override {
    snap::MutexLock l(&mu_);
    if (!valid_)
      return absl::FailedPreconditionError(absl::StrFormat(
          "%s: snapshot is invalid: %s", file_->name(), invalid_reason_));
    const uint64_t cb = chunk_bytes();
    const uint64_t chunk = next_chunk_;
    if ((chunk + 1) * cb > limit_ ||
        chunk >= ExceptionTable::kMaxSlots) {
      // dm's transient store has no overflow mode: a full store invalidates.
      InvalidateLocked("Unable to allocate exception: the COW file is full");
      return absl::ResourceExhaustedError(
          absl::StrFormat("%s: COW file is full", file_->name()));
    }
    pending_[chunk] = old_chunk;
    ++next_chunk_;
    return chunk;
  }

  absl::Status Commit(uint64_t cow_chunk, bool) override {
    snap::MutexLock l(&mu_);
    auto it = pending_.find(cow_chunk);
    if (it == pending_.end())
      return absl::InternalError("commit of a chunk that is not allocated");
    table_.Insert(it->second, static_cast<uint32_t>(cow_chunk));
    pending_.erase(it);
    return absl::OkStatus();
  }
  void Abandon(uint64_t cow_chunk) override {
    snap::MutexLock l(&mu_);
    pending_.erase(cow_chunk);
    // The last chunk is used again (no record names chunks here), so that
    // writes failing on a full disk do not push the store ever further.
    if (cow_chunk + 1 == next_chunk_) {
      high_chunk_ = std::max(high_chunk_, next_chunk_);
      --next_chunk_;
    }
  }

  absl::Status ReadChunk(uint64_t c, uint64_t off, std::span<char> b) override {
    return file_->PRead(b, c * chunk_bytes() + off);
  }
  absl::Status WriteChunk(uint64_t c, uint64_t off,
                          std::span<const char> b) override {
    return file_->PWrite(b, c * chunk_bytes() + off);
  }
  absl::Status ZeroChunk(uint64_t c, uint64_t off, uint64_t len) override {
    // Punching a hole does not extend the file; reads must still work.
    if (absl::Status st = file_->GrowTo(c * chunk_bytes() + off + len); !st.ok())
      return st;
    return file_->ZeroRange(c * chunk_bytes() + off, len);
  }
  absl::Status Flush() override { return absl::OkStatus(); }
  void Invalidate(std::string_view reason) override {
    snap::MutexLock l(&mu_);
    InvalidateLocked(reason);
  }

  absl::StatusOr<MergeRun> PrepareMerge() override {
    return absl::FailedPreconditionError(absl::StrFormat(
        "%s is a transient (N) store: it cannot be merged", file_->name()));
  }
  absl::StatusOr<std::vector<MergeRun>> PrepareMergeRuns(uint32_t) override {
    return PrepareMerge().status();
  }
  absl::Status CommitMerge(uint32_t) override { return PrepareMerge().status(); }
  void set_merge_failed(bool failed) override {
    snap::MutexLock l(&mu_);
    merge_failed_ = failed;
  }

  StoreUsage Usage() const override {
    snap::MutexLock l(&mu_);
    return UsageLocked();
  }
  std::string StatusLine() const override {
    snap::MutexLock l(&mu_);
    return FormatStatusLine(valid_, merge_failed_, false, UsageLocked());
  }

 private:
  StoreUsage UsageLocked() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    const uint64_t total =
        limit_ != kNoLimit ? limit_ : file_->Size().value_or(0);
    return {next_chunk_ * chunk_sectors_, total / kSectorBytes, 0};
  }
  void InvalidateLocked(std::string_view reason) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    if (!valid_) return;
    valid_ = false;
    invalid_reason_ = std::string(reason);
  }

  std::unique_ptr<BlockFile> file_;
  const uint32_t chunk_sectors_;
  const uint64_t limit_;  // CowLimit: the cap, or a block device's size
  mutable snap::Mutex mu_;
  ExceptionTable table_ ABSL_GUARDED_BY(mu_);
  absl::flat_hash_map<uint64_t, uint64_t> pending_ ABSL_GUARDED_BY(mu_);
  uint64_t next_chunk_ ABSL_GUARDED_BY(mu_) = 0;
  uint64_t high_chunk_ ABSL_GUARDED_BY(mu_) = 0;  // next_chunk_ at its highest
  bool valid_ ABSL_GUARDED_BY(mu_) = true;
  bool merge_failed_ ABSL_GUARDED_BY(mu_) = false;
  std::string invalid_reason_ ABSL_GUARDED_BY(mu_);
};

}  // namespace

absl::StatusOr<std::unique_ptr<ExceptionStore>> OpenTransientStore(
    std::unique_ptr<BlockFile> file, const StoreOptions& opts) {
  if (opts.chunk_sectors == 0)
    return absl::InvalidArgumentError(
        "a transient (N) store needs an explicit chunk size, as in dm");
  if (absl::Status st = ValidateChunkSectors(opts.chunk_sectors); !st.ok())
    return st;
  if (opts.read_only)
    return absl::FailedPreconditionError(
        "a transient (N) store holds nothing to read offline");
  if (absl::Status st = file->LockExclusive(); !st.ok()) return st;
  // Data chunks start at chunk 0: refuse a file holding anything, as the
  // persistent store does, and say so specially for a persistent store.
  absl::StatusOr<std::optional<uint64_t>> used = FirstUsedByte(*file);
  if (!used.ok()) return used.status();
  if (used->has_value()) {
    char hdr[kHeaderBytes];
    if (**used < kHeaderBytes && file->PRead(hdr, 0).ok() &&
        DiskHeader::Decode(hdr).magic == kSnapMagic)
      return absl::FailedPreconditionError(absl::StrFormat(
          "%s holds a persistent snapshot store (SnAp header): refusing to "
          "use it as a transient (N) store; use another file or "
          "snapshot-store=P",
          file->name()));
    return absl::FailedPreconditionError(absl::StrFormat(
        "%s holds data (byte %d is not zero): refusing to overwrite it with "
        "a transient (N) store; use a new or empty file",
        file->name(), **used));
  }
  absl::StatusOr<uint64_t> limit = CowLimit(*file, opts.size_cap);
  if (!limit.ok()) return limit.status();
  return std::unique_ptr<ExceptionStore>(
      new TransientStore(std::move(file), opts, *limit));
}

}  // namespace snap
