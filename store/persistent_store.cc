// The persistent exception store ("P" and "PO"), byte-compatible with
// drivers/md/dm-snap-persistent.c. See ../shared/reference/dm-snapshot.md §1.
#include <algorithm>
#include <cstring>
#include <optional>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/strings/str_format.h"
#include "store/sync.h"
#include "store/cow_format.h"
#include "store/cow_scan.h"
#include "store/dm_repeats.h"
#include "store/exception_store.h"
#include "store/exception_table.h"
#include "store/store_status.h"

namespace snap {
namespace {

class PersistentStore final : public ExceptionStore {
 public:
  PersistentStore(std::unique_ptr<BlockFile> file, const StoreOptions& opts,
                  uint32_t chunk_sectors, uint64_t limit)
      : file_(std::move(file)),
        type_(opts.type),
        geo_(chunk_sectors),
        limit_(limit),
        read_only_(opts.read_only) {}

  ~PersistentStore() override {
    // No writer is left: give back disk space set aside past the end.
    if (reserved_ != 0) file_->ReleaseReserve();
  }

  absl::Status Load(const StoreOptions& opts);
  absl::Status UseDmRepeatTargets() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  StoreType type() const override { return type_; }
  uint32_t chunk_sectors() const override { return geo_.chunk_sectors(); }
  const std::string& file_name() const override { return file_->name(); }

  bool valid() const override {
    snap::MutexLock l(&mu_);
    return valid_;
  }
  bool overflowed() const override {
    snap::MutexLock l(&mu_);
    return overflowed_;
  }
  std::string invalid_reason() const override {
    snap::MutexLock l(&mu_);
    return invalid_reason_;
  }
  std::vector<std::string> notes() const override {
    snap::MutexLock l(&mu_);
    return notes_;
  }
  uint64_t exception_count() const override {
    snap::MutexLock l(&mu_);
    return table_.size();
  }

  std::optional<Exception> Lookup(uint64_t old_chunk) const override {
    snap::ReaderMutexLock l(&mu_);
    std::optional<uint32_t> slot = table_.Lookup(old_chunk);
    if (!slot) return std::nullopt;
    return Exception{geo_.SlotToChunk(*slot), *slot < durable_upto_};
  }

  absl::StatusOr<uint64_t> Allocate(uint64_t old_chunk,
                                    WriteSource source) override;
  absl::Status Commit(uint64_t cow_chunk, bool wait_durable) override;
  void Abandon(uint64_t cow_chunk) override;

  absl::Status ReadChunk(uint64_t cow_chunk, uint64_t offset,
                         std::span<char> buf) override {
    return file_->PRead(buf, cow_chunk * geo_.chunk_bytes() + offset);
  }
  absl::Status WriteChunk(uint64_t cow_chunk, uint64_t offset,
                          std::span<const char> buf) override {
    if (read_only_) return ReadOnlyError();
    return file_->PWrite(buf, cow_chunk * geo_.chunk_bytes() + offset);
  }
  absl::Status ZeroChunk(uint64_t cow_chunk, uint64_t offset,
                         uint64_t length) override {
    if (read_only_) return ReadOnlyError();
    // Punching a hole does not extend the file: a new chunk past its end
    // must still read back (as zeros) before the next group commit grows it.
    const uint64_t start = cow_chunk * geo_.chunk_bytes() + offset;
    if (absl::Status st = file_->GrowTo(start + length); !st.ok()) return st;
    return file_->ZeroRange(start, length);
  }
  absl::Status Flush() override;
  void Invalidate(std::string_view reason) override {
    snap::MutexLock l(&mu_);
    InvalidateLocked(reason);
  }

  absl::StatusOr<MergeRun> PrepareMerge() override;
  absl::StatusOr<std::vector<MergeRun>> PrepareMergeRuns(uint32_t max_records) override;
  absl::Status CommitMerge(uint32_t count) override;
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
    return FormatStatusLine(valid_, merge_failed_, overflowed_, UsageLocked());
  }

 private:
  enum class SlotState { kCopying, kReady, kAbandoned };
  struct Pending {
    uint64_t old_chunk;
    SlotState state;
  };

  absl::Status ReadOnlyError() const {
    return absl::FailedPreconditionError(
        absl::StrFormat("%s is open read-only", file_->name()));
  }
  uint64_t Capacity() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    return limit_ != kNoLimit ? limit_ : file_size_;
  }
  StoreUsage UsageLocked() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    const uint64_t cs = geo_.chunk_sectors();
    return {geo_.SlotToChunk(next_slot_) * cs, Capacity() / kSectorBytes,
            (cur_area_ + 2) * cs};
  }
  void InvalidateLocked(std::string_view reason)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // A failed metadata write or sync ends the store. Linux reports a
  // writeback error to one fsync only: a later one would succeed over data
  // that never reached the disk, and a later commit could name it.
  void FailLocked(std::string_view what, const absl::Status& st)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Every committed exception has its record on disk and nothing is being
  // copied: what a merge step needs.
  bool QuietLocked() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Keeps the full current area for the next group commit and goes on in
  // the next one (known to read as zeros): a full area needs no sync of
  // its own.
  void NextAreaLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Moves ready_upto_ past the slots whose copy has finished.
  void AdvanceReadyLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Moves slots whose data is durable, in allocation order, into the area
  // buffer.
  void DrainLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  bool NextAreaKnownZeroLocked() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // The current area is full and its successor must be zeroed on disk
  // before more records can go anywhere.
  bool AreaFullLocked() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    return cur_count_ == geo_.exceptions_per_area() && !NextAreaKnownZeroLocked();
  }
  // One group commit, pipelined: write the records whose data an earlier
  // commit made durable, then one sync makes them durable together with
  // the data of every copy finished since. Drops the lock while doing I/O.
  void WriteAreaLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  absl::Status WriteHeader(uint32_t valid);

  std::unique_ptr<BlockFile> file_;
  const StoreType type_;
  const Geometry geo_;
  const uint64_t limit_;  // CowLimit: the cap, or a block device's size
  const bool read_only_;

  mutable snap::Mutex mu_;
  snap::CondVar cv_;
  ExceptionTable table_ ABSL_GUARDED_BY(mu_);
  absl::flat_hash_map<uint32_t, Pending> pending_ ABSL_GUARDED_BY(mu_);
  uint32_t next_slot_ ABSL_GUARDED_BY(mu_) = 0;
  // Slots below buffered_upto_ are in the area buffer or on disk; below
  // data_durable_upto_ their data is on disk; below ready_upto_ their copy
  // has finished (or was abandoned). buffered <= data_durable <= ready.
  uint32_t buffered_upto_ ABSL_GUARDED_BY(mu_) = 0;
  uint32_t data_durable_upto_ ABSL_GUARDED_BY(mu_) = 0;
  uint32_t ready_upto_ ABSL_GUARDED_BY(mu_) = 0;
  uint32_t durable_upto_ ABSL_GUARDED_BY(mu_) = 0;
  uint32_t committed_upto_ ABSL_GUARDED_BY(mu_) = 0;  // highest commit + 1
  uint64_t cur_area_ ABSL_GUARDED_BY(mu_) = 0;
  uint64_t cur_count_ ABSL_GUARDED_BY(mu_) = 0;
  std::vector<char> area_buf_ ABSL_GUARDED_BY(mu_);
  // Areas filled since the last group commit, not yet on disk; at most
  // kMaxFullAreas before a commit writes them.
  static constexpr size_t kMaxFullAreas = 8;
  std::vector<std::pair<uint64_t, std::vector<char>>> full_areas_
      ABSL_GUARDED_BY(mu_);
  uint64_t size_at_open_ ABSL_GUARDED_BY(mu_) = 0;
  bool writer_active_ ABSL_GUARDED_BY(mu_) = false;
  uint64_t file_size_ ABSL_GUARDED_BY(mu_) = 0;
  uint64_t reserved_ ABSL_GUARDED_BY(mu_) = 0;  // disk space set aside to here
  // The file's size must reach this before the records in memory are
  // written: the end of the last chunk they name (or of the next area).
  uint64_t record_end_ ABSL_GUARDED_BY(mu_) = 0;
  bool valid_ ABSL_GUARDED_BY(mu_) = true;
  bool overflowed_ ABSL_GUARDED_BY(mu_) = false;
  bool merge_failed_ ABSL_GUARDED_BY(mu_) = false;
  std::string invalid_reason_ ABSL_GUARDED_BY(mu_);
  absl::Status io_error_ ABSL_GUARDED_BY(mu_);
  std::vector<std::string> notes_ ABSL_GUARDED_BY(mu_);
  // What the last PrepareMergeRuns handed out, until CommitMerge removes
  // it: the records [count - records, count) of the area, as the store
  // was then.
  struct PreparedStep {
    uint64_t area;
    uint64_t count;
    uint32_t records;
    uint32_t next_slot;
  };
  std::optional<PreparedStep> prepared_ ABSL_GUARDED_BY(mu_);
  bool merge_begun_ ABSL_GUARDED_BY(mu_) = false;
};

absl::Status PersistentStore::WriteHeader(uint32_t valid) {
  std::vector<char> chunk(geo_.chunk_bytes(), 0);
  DiskHeader{kSnapMagic, valid, kDiskVersion, geo_.chunk_sectors()}.Encode(chunk);
  return file_->PWrite(chunk, 0);
}

// Several records name one origin chunk (old kernels, damage): serve it
// from the record dm serves it from, which the earliest-first table may not
// be. Rare, so the file is read a second time, only then.
absl::Status PersistentStore::UseDmRepeatTargets() {
  std::vector<DiskRecord> records;
  absl::StatusOr<CowScan> scan = ScanCow(
      *file_, [&](const ScannedRecord& r) { records.push_back(r.record); },
      [](uint64_t) { return false; }, {.stop_at_first_problem = true});
  if (!scan.ok()) return scan.status();
  if (!scan->problems.empty())
    return absl::DataLossError(absl::StrFormat(
        "%s (run nbdsnap check for details)", scan->problems.front()));
  for (const auto& [old_chunk, new_chunk] : DmRepeatedChunkTargets(records)) {
    const uint32_t slot = static_cast<uint32_t>(*geo_.ChunkToSlot(new_chunk));
    if (table_.Lookup(old_chunk) == slot) continue;
    table_.Erase(old_chunk);
    table_.Insert(old_chunk, slot);
  }
  return absl::OkStatus();
}

absl::Status PersistentStore::Load(const StoreOptions& opts) {
  snap::MutexLock l(&mu_);
  // At the first record, room for every data chunk the file holds: each
  // may be a lone exception (random writes), and loading then never
  // rehashes; runs need less, and FitToSize returns the rest. Capped: a
  // big device may hold few exceptions, and the room costs two to four
  // bytes per slot until then (8 MiB at the cap).
  constexpr uint64_t kMaxReserve = uint64_t{1} << 22;
  bool reserved = false;
  absl::StatusOr<CowScan> scan =
      ScanCow(
          *file_,
          [&](const ScannedRecord& r) ABSL_NO_THREAD_SAFETY_ANALYSIS {
            if (!reserved) {
              reserved = true;
              if (absl::StatusOr<uint64_t> size = file_->Size(); size.ok())
                table_.Reserve(std::min(*size / geo_.chunk_bytes(), kMaxReserve));
            }
            // The earliest record first; dm's choice is settled below.
            if (r.duplicate) return;
            table_.Insert(r.record.old_chunk,
                          static_cast<uint32_t>(*geo_.ChunkToSlot(r.record.new_chunk)));
          },
          [&](uint64_t old_chunk) ABSL_NO_THREAD_SAFETY_ANALYSIS {
            return table_.Lookup(old_chunk).has_value();
          },
          {.stop_at_first_problem = true});
  if (!scan.ok()) return scan.status();
  if (!scan->problems.empty())
    return absl::DataLossError(absl::StrFormat(
        "%s (run nbdsnap check for details)", scan->problems.front()));
  if (scan->duplicates > 0)
    if (absl::Status st = UseDmRepeatTargets(); !st.ok()) return st;
  table_.FitToSize();
  file_size_ = size_at_open_ = scan->file_size;
  // What a killed nbdkit had set aside past the end goes back now, as a
  // clean stop would have given it back (no writer yet: the lock is ours).
  if (!read_only_ && file_->HoldsSpacePastEnd()) file_->ReleaseReserve();
  if (scan->is_new) {
    if (read_only_)
      return absl::NotFoundError(absl::StrFormat(
          "%s holds no snapshot store yet (it becomes a new, empty one when "
          "first used by the filter)",
          file_->name()));
    // Area 0 durable first, then the header: a crash leaves either no
    // store (magic 0) or an empty one, never a header without its area.
    area_buf_.assign(geo_.chunk_bytes(), 0);
    if (absl::Status st = file_->PWrite(area_buf_, geo_.AreaChunk(0) * geo_.chunk_bytes());
        !st.ok())
      return st;
    if (absl::Status st = file_->Sync(); !st.ok()) return st;
    if (absl::Status st = WriteHeader(1); !st.ok()) return st;
    if (absl::Status st = file_->Sync(); !st.ok()) return st;
    file_size_ = std::max<uint64_t>(file_size_, 2 * geo_.chunk_bytes());
    return absl::OkStatus();
  }
  if (opts.chunk_sectors != 0 && opts.chunk_sectors != geo_.chunk_sectors())
    notes_.push_back(absl::StrFormat(
        "%s: chunk size %d sectors in the header overrides the requested %d",
        file_->name(), geo_.chunk_sectors(), opts.chunk_sectors));
  for (const std::string& w : scan->warnings) notes_.push_back(w);
  if (scan->header.valid == 0) {
    valid_ = false;
    invalid_reason_ = "the header marks the snapshot invalid (valid = 0)";
    return absl::OkStatus();
  }
  cur_area_ = scan->current_area;
  cur_count_ = scan->current_count;
  area_buf_ = std::move(scan->current_area_buf);
  next_slot_ = buffered_upto_ = data_durable_upto_ = ready_upto_ =
      durable_upto_ = committed_upto_ =
          static_cast<uint32_t>(scan->max_slot_plus_one);
  // If the next area is past the end of the file, room is made for it when
  // the current one fills.
  return absl::OkStatus();
}

void PersistentStore::InvalidateLocked(std::string_view reason) {
  if (!valid_) return;
  valid_ = false;
  invalid_reason_ = std::string(reason);
  cv_.SignalAll();
  if (read_only_) return;
  // A plain header write, like the kernel's; failing it is only logged
  // there too: the in-memory state already refuses I/O.
  if (WriteHeader(0).ok()) (void)file_->Sync();
}

void PersistentStore::FailLocked(std::string_view what, const absl::Status& st) {
  io_error_ = st;
  const std::string reason = absl::StrFormat("%s failed: %s", what, st.message());
  if (!merge_begun_) {
    InvalidateLocked(reason);
    return;
  }
  // The COW holds the only copy of what is not merged yet, and every
  // record on disk still names data synced before: keep the header valid,
  // so that a restart resumes the merge.
  if (!valid_) return;
  valid_ = false;
  invalid_reason_ = reason + " (restart to resume the merge)";
  cv_.SignalAll();
}

bool PersistentStore::QuietLocked() const {
  if (!full_areas_.empty() || durable_upto_ < committed_upto_) return false;
  // Abandoned slots need no record.
  return std::all_of(pending_.begin(), pending_.end(), [](const auto& p) {
    return p.second.state == SlotState::kAbandoned;
  });
}

absl::StatusOr<uint64_t> PersistentStore::Allocate(uint64_t old_chunk,
                                                   WriteSource source) {
  snap::MutexLock l(&mu_);
  if (read_only_) return ReadOnlyError();
  if (!valid_)
    return absl::FailedPreconditionError(absl::StrFormat(
        "%s: snapshot is invalid: %s", file_->name(), invalid_reason_));
  if (source == WriteSource::kSnapshot && overflowed_)
    return absl::ResourceExhaustedError(absl::StrFormat(
        "%s: snapshot overflowed: the COW file is full", file_->name()));
  // The merge step's CommitMerge removes the last records of the area: a
  // new one among them would be removed instead of a merged one.
  if (prepared_)
    return absl::FailedPreconditionError(absl::StrFormat(
        "%s: a merge step is under way: no new exceptions until it is "
        "committed",
        file_->name()));
  if (next_slot_ >= ExceptionTable::kMaxSlots)
    return absl::ResourceExhaustedError("exception store is full");
  const uint64_t cb = geo_.chunk_bytes();
  const uint64_t chunk = geo_.SlotToChunk(next_slot_);
  // Room for the chunk, and for the next area if the chunk ends a region:
  // that area is zeroed when the current one fills (dm 4.5 edge case).
  uint64_t need = (chunk + 1) * cb;
  if (geo_.IsMetadataChunk(chunk + 1)) need += cb;
  if (need > limit_) {
    if (source == WriteSource::kSnapshot &&
        type_ == StoreType::kPersistentOverflow) {
      overflowed_ = true;
    } else {
      InvalidateLocked("Unable to allocate exception: the COW file is full");
    }
    return absl::ResourceExhaustedError(absl::StrFormat(
        "%s: COW file is full (%d bytes)", file_->name(), limit_));
  }
  if (need > reserved_) {
    // Set disk space aside ahead of the data, in steps of an eighth of
    // the file (4 MiB to 256 MiB): one extent allocation instead of one
    // per chunk written. On a full disk this fails, and is tried again.
    uint64_t step =
        std::clamp<uint64_t>(std::max(file_size_, need) / 8, 4 << 20, 256 << 20);
    uint64_t until = need + step;
    until = std::min(until, limit_);
    const uint64_t from = std::max(reserved_, need - cb);
    if (until > from && file_->Reserve(from, until - from).ok())
      reserved_ = std::max(reserved_, until);
  }
  if (geo_.IsMetadataChunk(chunk + 1)) {
    // The next area's chunk must be on disk before the group commit that
    // fills this area, so it needs space of its own: without it, that
    // commit would fail and end the store, losing every exception it
    // holds. Refused here, only this write fails (ENOSPC), as when its
    // data cannot be written.
    if (absl::Status st = file_->Reserve((chunk + 1) * cb, cb); !st.ok())
      return absl::ResourceExhaustedError(absl::StrFormat(
          "no room for the COW file's next metadata area: %s", st.message()));
  }
  // The file grows with the data written into it; the group commit makes
  // sure it covers every chunk a record names before the record is written.
  file_size_ = std::max(file_size_, need);
  pending_[next_slot_] = Pending{old_chunk, SlotState::kCopying};
  ++next_slot_;
  return chunk;
}

bool PersistentStore::NextAreaKnownZeroLocked() const {
  // Areas past the end of the file as it was opened were never written by
  // anyone else: they read as zeros until we write them. Areas inside it
  // (a kernel-made or preallocated COW) may hold old bytes and must be
  // zeroed on disk before the area before them fills, as the kernel does.
  return geo_.AreaChunk(cur_area_ + 1) * geo_.chunk_bytes() >= size_at_open_;
}

void PersistentStore::AdvanceReadyLocked() {
  while (ready_upto_ < next_slot_) {
    auto it = pending_.find(ready_upto_);
    if (it == pending_.end() || it->second.state == SlotState::kCopying) break;
    ++ready_upto_;
  }
}

void PersistentStore::NextAreaLocked() {
  full_areas_.emplace_back(cur_area_, area_buf_);
  ++cur_area_;
  cur_count_ = 0;
  std::fill(area_buf_.begin(), area_buf_.end(), 0);
}

void PersistentStore::DrainLocked() {
  const uint64_t epa = geo_.exceptions_per_area();
  while (buffered_upto_ < next_slot_) {
    auto it = pending_.find(buffered_upto_);
    if (it == pending_.end() || it->second.state == SlotState::kCopying) break;
    if (it->second.state == SlotState::kReady) {
      // A record may only name data an earlier sync made durable.
      if (buffered_upto_ >= data_durable_upto_) break;
      // Full already when a merge step went back into a full area.
      if (cur_count_ == epa) {
        if (!NextAreaKnownZeroLocked()) break;  // WriteAreaLocked zeroes it
        NextAreaLocked();
      }
      const uint64_t new_chunk = geo_.SlotToChunk(buffered_upto_);
      DiskRecord{it->second.old_chunk, new_chunk}.Encode(
          area_buf_.data() + cur_count_ * kRecordBytes);
      ++cur_count_;
      // The file must cover what the records name, and the next area once
      // this one is full; not the chunks of writes that failed after it.
      record_end_ = std::max(record_end_, (new_chunk + 1) * geo_.chunk_bytes());
      if (cur_count_ == epa) {
        record_end_ = std::max(
            record_end_, (geo_.AreaChunk(cur_area_ + 1) + 1) * geo_.chunk_bytes());
        if (NextAreaKnownZeroLocked()) NextAreaLocked();
      }
    }
    // An abandoned slot needs neither a record nor durable data, so one at
    // the end drains at once and leaves the store quiet.
    pending_.erase(it);
    ++buffered_upto_;
    data_durable_upto_ = std::max(data_durable_upto_, buffered_upto_);
  }
  // A burst of writes between flushes can leave thousands of slots
  // pending; once they are all on disk, give that room back.
  if (pending_.empty() && pending_.capacity() > 1024) pending_.rehash(0);
}

void PersistentStore::WriteAreaLocked() {
  writer_active_ = true;
  DrainLocked();
  const uint32_t target = buffered_upto_;
  // Copies finished before the sync below starts are durable after it.
  const uint32_t data_target = ready_upto_;
  const bool full = AreaFullLocked();
  const bool new_records =
      target != durable_upto_ || full || !full_areas_.empty();
  const uint64_t area = cur_area_;
  std::vector<char> buf;
  if (new_records) buf = area_buf_;
  std::vector<std::pair<uint64_t, std::vector<char>>> full_areas;
  full_areas.swap(full_areas_);
  const uint64_t cb = geo_.chunk_bytes();
  const uint64_t grow_to = record_end_;
  mu_.Unlock();
  // The records written here name only data an earlier sync made durable,
  // so one sync (the kernel's PREFLUSH + FUA) commits them, and with them
  // the data of the next group: a copy-out costs one sync, not two.
  absl::StatusOr<uint64_t> size = file_->Size();
  absl::Status st = size.status();
  if (st.ok() && *size < grow_to) {
    // Growing: the new size must be on disk before records that need it
    // (a disk may keep the area write and lose the growth). Data written
    // past the records usually grew the file already; this sync comes at
    // most once an area, or for a zeroed chunk at the end.
    st = file_->GrowTo(grow_to);
    if (st.ok()) st = file_->Sync();
  }
  if (st.ok() && full) {
    // The next area must read as zeros on disk before a full area leads
    // the reader to it: zero it, and sync, before writing the full area.
    std::vector<char> zero(cb, 0);
    st = file_->PWrite(zero, geo_.AreaChunk(area + 1) * cb);
    if (st.ok()) st = file_->Sync();
  }
  for (const auto& [a, abuf] : full_areas)
    if (st.ok()) st = file_->PWrite(abuf, geo_.AreaChunk(a) * cb);
  if (st.ok() && new_records)
    st = file_->PWrite(buf, geo_.AreaChunk(area) * cb);
  if (st.ok()) st = file_->Sync();
  mu_.Lock();
  writer_active_ = false;
  if (!st.ok()) {
    FailLocked("metadata commit", st);
  } else {
    durable_upto_ = std::max(durable_upto_, target);
    data_durable_upto_ = std::max(data_durable_upto_, data_target);
    if (full && cur_area_ == area) {
      ++cur_area_;
      cur_count_ = 0;
      std::fill(area_buf_.begin(), area_buf_.end(), 0);
      DrainLocked();
    }
  }
  cv_.SignalAll();
}

absl::Status PersistentStore::Commit(uint64_t cow_chunk, bool wait_durable) {
  snap::MutexLock l(&mu_);
  const uint32_t slot = static_cast<uint32_t>(*geo_.ChunkToSlot(cow_chunk));
  auto it = pending_.find(slot);
  if (it == pending_.end() || it->second.state != SlotState::kCopying)
    return absl::InternalError(
        absl::StrFormat("commit of chunk %d that is not allocated", cow_chunk));
  it->second.state = SlotState::kReady;
  table_.Insert(it->second.old_chunk, slot);
  committed_upto_ = std::max(committed_upto_, slot + 1);
  AdvanceReadyLocked();
  cv_.SignalAll();
  const uint64_t max_lazy = kMaxFullAreas * geo_.exceptions_per_area();
  for (;;) {
    // Slots committed while the area was full wait here for a new area.
    DrainLocked();
    // First: after a failed group commit nothing drains any more, and the
    // write-out below would be tried again for ever.
    if (!valid_)
      return absl::DataLossError(absl::StrFormat(
          "%s: snapshot is invalid: %s", file_->name(), invalid_reason_));
    if (!writer_active_ && (full_areas_.size() >= kMaxFullAreas ||
                            ready_upto_ - buffered_upto_ >= max_lazy)) {
      // Lazy commits have piled up several areas' worth: write them out,
      // so memory stays bounded and a crash loses little.
      WriteAreaLocked();
      continue;
    }
    if (AreaFullLocked() && !writer_active_) {
      WriteAreaLocked();  // the next records need the next area
      continue;
    }
    if (!wait_durable || durable_upto_ > slot) return absl::OkStatus();
    // Wait for a writer in progress, or for the slots before ours: records
    // go to disk in allocation order.
    if (writer_active_ || ready_upto_ <= slot || AreaFullLocked()) {
      cv_.Wait(&mu_);
      DrainLocked();
      continue;
    }
    WriteAreaLocked();
  }
}

void PersistentStore::Abandon(uint64_t cow_chunk) {
  snap::MutexLock l(&mu_);
  const uint32_t slot = static_cast<uint32_t>(*geo_.ChunkToSlot(cow_chunk));
  auto it = pending_.find(slot);
  if (it == pending_.end() || it->second.state != SlotState::kCopying) return;
  if (slot + 1 == next_slot_) {
    // The last one taken is taken again by the next write: a write that
    // keeps failing (a full disk) does not use up the file, nor a
    // snapshot-cow-size cap, which would end the snapshot.
    pending_.erase(it);
    --next_slot_;
    cv_.SignalAll();
    return;
  }
  it->second.state = SlotState::kAbandoned;
  AdvanceReadyLocked();
  DrainLocked();
  cv_.SignalAll();
}

absl::Status PersistentStore::Flush() {
  snap::MutexLock l(&mu_);
  if (read_only_) return absl::OkStatus();
  const uint32_t target = committed_upto_;
  bool wrote = false;  // this thread ran a group commit, which syncs data first
  for (;;) {
    DrainLocked();
    if (!valid_)
      return absl::DataLossError(absl::StrFormat(
          "%s: snapshot is invalid: %s", file_->name(), invalid_reason_));
    // A full area needs writing when it holds records not yet on disk, or
    // records wait for the next one; a merge stepping back into a full
    // area has neither (and must keep it).
    if (AreaFullLocked() && !writer_active_ &&
        (durable_upto_ < buffered_upto_ || buffered_upto_ < next_slot_)) {
      WriteAreaLocked();
      wrote = true;
      continue;
    }
    if (durable_upto_ >= target) break;
    if (writer_active_ || ready_upto_ < target || AreaFullLocked()) {
      cv_.Wait(&mu_);
      DrainLocked();
      continue;
    }
    WriteAreaLocked();
    wrote = true;
  }
  if (wrote) return absl::OkStatus();
  // Nothing new for the metadata, or another thread wrote it: data written
  // to existing exceptions still needs its sync.
  mu_.Unlock();
  absl::Status st = file_->Sync();
  mu_.Lock();
  if (!st.ok()) FailLocked("flush", st);
  return st;
}

absl::StatusOr<MergeRun> PersistentStore::PrepareMerge() {
  absl::StatusOr<std::vector<MergeRun>> runs = PrepareMergeRuns(1);
  if (!runs.ok()) return runs.status();
  return runs->empty() ? MergeRun{} : runs->front();
}

absl::StatusOr<std::vector<MergeRun>> PersistentStore::PrepareMergeRuns(
    uint32_t max_records) {
  snap::MutexLock l(&mu_);
  prepared_.reset();  // a new prepare replaces one that was never committed
  if (!valid_)
    return absl::FailedPreconditionError(absl::StrFormat(
        "%s: snapshot is invalid, it cannot be merged: %s", file_->name(),
        invalid_reason_));
  DrainLocked();
  if (!QuietLocked())
    return absl::FailedPreconditionError(
        "merge needs a quiet store: exceptions are still in flight");
  merge_begun_ = true;
  const uint64_t cb = geo_.chunk_bytes();
  if (cur_count_ == 0) {
    if (cur_area_ == 0) return std::vector<MergeRun>{};
    // Into a copy first: a failed read must leave the store as it was.
    std::vector<char> prev(cb);
    if (absl::Status st = file_->PRead(prev, geo_.AreaChunk(cur_area_ - 1) * cb);
        !st.ok())
      return st;
    --cur_area_;
    area_buf_ = std::move(prev);
    cur_count_ = geo_.exceptions_per_area();
  }
  // Runs from the end of the area: each the newest record left and the
  // consecutive ones (old and new chunk both one less) before it.
  std::vector<MergeRun> runs;
  const char* base = area_buf_.data();
  uint64_t end = cur_count_;  // records [0, end) not yet taken
  uint32_t taken = 0;
  while (end > 0 && (taken == 0 || taken < max_records)) {
    DiskRecord last = DiskRecord::Decode(base + (end - 1) * kRecordBytes);
    uint32_t n = 1;
    while (n < end) {
      DiskRecord r = DiskRecord::Decode(base + (end - 1 - n) * kRecordBytes);
      if (r.old_chunk + n != last.old_chunk || r.new_chunk + n != last.new_chunk)
        break;
      ++n;
    }
    if (taken != 0 && taken + n > max_records) break;
    // A record the table does not map (a repeat of an origin chunk that
    // dm does not use) holds data the snapshot never showed:
    // merging it, or it and the real one in one batch, would put the wrong
    // data on the origin. The kernel fails such a merge too.
    for (uint32_t k = 0; k < n; ++k) {
      const uint64_t old_chunk = last.old_chunk - k;
      std::optional<uint32_t> slot = table_.Lookup(old_chunk);
      if (!slot || geo_.SlotToChunk(*slot) != last.new_chunk - k)
        return absl::FailedPreconditionError(absl::StrFormat(
            "%s: cannot merge: origin chunk %d has a second record (area %d "
            "record %d, COW chunk %d) besides the one the snapshot uses; run "
            "'nbdsnap check %s'",
            file_->name(), old_chunk, cur_area_, end - 1 - k,
            last.new_chunk - k, file_->name()));
    }
    runs.push_back({last.old_chunk - (n - 1), last.new_chunk - (n - 1), n});
    taken += n;
    end -= n;
  }
  if (!runs.empty()) prepared_ = PreparedStep{cur_area_, cur_count_, taken, next_slot_};
  return runs;
}

absl::Status PersistentStore::CommitMerge(uint32_t count) {
  snap::MutexLock l(&mu_);
  if (!valid_)
    return absl::FailedPreconditionError(absl::StrFormat(
        "%s: snapshot is invalid: %s", file_->name(), invalid_reason_));
  if (!prepared_)
    return absl::FailedPreconditionError(absl::StrFormat(
        "%s: no merge step is prepared: nothing to commit", file_->name()));
  // Removes the last records of the area: only if they are still the ones
  // the caller copied.
  if (prepared_->area != cur_area_ || prepared_->count != cur_count_ ||
      prepared_->next_slot != next_slot_)
    return absl::FailedPreconditionError(absl::StrFormat(
        "%s: the store changed since the merge step was prepared: its "
        "records are kept; prepare the step again",
        file_->name()));
  if (count == 0 || count > prepared_->records)
    return absl::FailedPreconditionError(absl::StrFormat(
        "%s: commit of %d merged records, but the step prepared %d",
        file_->name(), count, prepared_->records));
  const uint64_t cb = geo_.chunk_bytes();
  std::vector<DiskRecord> gone;
  for (uint32_t i = 0; i < count; ++i) {
    char* p = area_buf_.data() + (cur_count_ - 1 - i) * kRecordBytes;
    gone.push_back(DiskRecord::Decode(p));
    std::memset(p, 0, kRecordBytes);
  }
  std::vector<char> buf = area_buf_;
  const uint64_t area = cur_area_;
  mu_.Unlock();
  absl::Status st = file_->PWrite(buf, geo_.AreaChunk(area) * cb);
  absl::Status sync = st.ok() ? file_->Sync() : absl::OkStatus();
  mu_.Lock();
  if (!st.ok() || !sync.ok()) {
    // Put the records back: the on-disk area may or may not have them, and
    // both are fine, since the COW still holds the data.
    for (uint32_t i = 0; i < count; ++i)
      gone[i].Encode(area_buf_.data() + (cur_count_ - 1 - i) * kRecordBytes);
    if (!sync.ok()) FailLocked("merge step commit", sync);
    return st.ok() ? sync : st;
  }
  prepared_.reset();
  cur_count_ -= count;
  for (const DiskRecord& r : gone) {
    std::optional<uint32_t> slot = table_.Lookup(r.old_chunk);
    if (slot && geo_.SlotToChunk(*slot) == r.new_chunk) table_.Erase(r.old_chunk);
  }
  // dm: next_free = area_location(current_area) + committed + 1.
  const uint64_t next_free = geo_.AreaChunk(cur_area_) + cur_count_ + 1;
  next_slot_ = buffered_upto_ = data_durable_upto_ = ready_upto_ =
      durable_upto_ = committed_upto_ =
          static_cast<uint32_t>(*geo_.ChunkToSlot(next_free));
  // Abandoned slots past it (the only kind a quiet store has) are gone.
  pending_.clear();
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<std::unique_ptr<ExceptionStore>> OpenPersistentStore(
    std::unique_ptr<BlockFile> file, const StoreOptions& opts) {
  if (!opts.read_only)
    if (absl::Status st = file->LockExclusive(); !st.ok()) return st;
  // The chunk size comes from the header when there is one.
  uint32_t cs = opts.chunk_sectors != 0 ? opts.chunk_sectors : kDefaultChunkSectors;
  if (absl::Status st = ValidateChunkSectors(cs); !st.ok()) return st;
  {
    absl::StatusOr<uint64_t> size = file->Size();
    if (!size.ok()) return size.status();
    if (*size >= kHeaderBytes) {
      char hdr[kHeaderBytes];
      if (absl::Status st = file->PRead(hdr, 0); !st.ok()) return st;
      DiskHeader h = DiskHeader::Decode(hdr);
      if (h.magic == kSnapMagic && ValidateChunkSectors(h.chunk_sectors).ok())
        cs = h.chunk_sectors;
      if (h.magic == 0 && !opts.read_only) {
        absl::StatusOr<std::optional<uint64_t>> used = FirstUsedByte(*file);
        if (!used.ok()) return used.status();
        if (used->has_value())
          return absl::FailedPreconditionError(absl::StrFormat(
              "%s is not a snapshot store (no SnAp magic) and holds data "
              "(byte %d is not zero): refusing to overwrite it; use a new or "
              "empty file",
              file->name(), **used));
      }
    }
  }
  absl::StatusOr<uint64_t> limit = CowLimit(*file, opts.size_cap);
  if (!limit.ok()) return limit.status();
  auto store = std::make_unique<PersistentStore>(std::move(file), opts, cs, *limit);
  if (absl::Status st = store->Load(opts); !st.ok()) return st;
  return store;
}

}  // namespace snap
