// Merging a snapshot into the origin, and the origin's merged view while
// it runs: dm-snapshot's snapshot-merge target (reference §1.10, §4.9).
#include <errno.h>

#include <algorithm>

#include "absl/strings/str_format.h"
#include "filter/errno_status.h"
#include "filter/log.h"
#include "filter/snapshot_engine.h"

namespace snap {
namespace {
constexpr uint64_t kMergeBuffer = 4 << 20;
}

void SnapshotEngine::StartMerge(std::shared_ptr<Snapshot> snap) {
  // Like an origin write: nothing may be copying out while the snapshot
  // stops taking copy-outs.
  snap::MutexLock gate(&origin_gate_);
  snap->merging.store(true);
  snap::MutexLock l(&list_mu_);
  merging_ = std::move(snap);
}

void SnapshotEngine::FinishMerge() {
  snap::MutexLock gate(&origin_gate_);
  snap::MutexLock l(&list_mu_);
  if (!merging_) return;
  merging_->dropped.store(true);
  std::erase(snaps_, merging_);
  merging_.reset();
}

std::shared_ptr<Snapshot> SnapshotEngine::merging() const {
  snap::MutexLock l(&list_mu_);
  return merging_;
}

absl::StatusOr<bool> SnapshotEngine::MergeStep() {
  std::shared_ptr<Snapshot> mp = merging();
  if (!mp) return true;
  Snapshot& m = *mp;
  absl::StatusOr<MergeRun> run = m.store->PrepareMerge();
  if (!run.ok()) return run.status();
  if (run->count == 0) return true;
  const uint64_t size = origin_.size();
  const uint64_t first = run->old_chunk;
  const uint64_t last = run->old_chunk + run->count - 1;
  const uint64_t start = std::min(first << m.shift, size);
  const uint64_t end = std::min((last + 1) << m.shift, size);
  if (start < end) {
    // The other snapshots keep the origin's old contents of the range.
    snap::ReaderMutexLock gate(&origin_gate_);
    if (absl::Status st = CopyOutAll(end - start, start); !st.ok()) return st;
  }
  // Writes to these chunks wait until the step is done.
  ChunkLockGuard guard(m.locks, ChunkLockGuard::kExclusive, first, last);
  std::vector<char> buf;
  for (uint64_t pos = start; pos < end;) {
    const uint64_t n = std::min(end - pos, kMergeBuffer);
    buf.resize(n);
    if (absl::Status st = m.store->ReadChunk(run->cow_chunk, pos - start, buf);
        !st.ok())
      return st;
    if (absl::Status st = origin_.Write(buf, pos, false); !st.ok()) return st;
    pos += n;
  }
  // The origin holds the data durably before the records go.
  if (absl::Status st = origin_.Flush(); !st.ok()) return st;
  if (absl::Status st = m.store->CommitMerge(run->count); !st.ok()) return st;
  return false;
}

absl::Status SnapshotEngine::MergedRead(Snapshot& m, std::span<char> buf,
                                        uint64_t offset) {
  // The merged view is the merging snapshot's view.
  return SnapRead(m, buf, offset);
}

absl::Status SnapshotEngine::MergedWrite(Snapshot& m, std::span<const char> data,
                                         uint64_t length, uint64_t offset,
                                         bool fua) {
  if (length == 0) return absl::OkStatus();
  snap::ReaderMutexLock gate(&origin_gate_);
  const uint64_t size = origin_.size();
  const uint64_t first = offset >> m.shift;
  const uint64_t last = (offset + length - 1) >> m.shift;
  ChunkLockGuard guard(m.locks, ChunkLockGuard::kExclusive, first, last);
  std::vector<char> zeros;
  auto piece_of = [&](uint64_t a, uint64_t n) -> std::span<const char> {
    if (!data.empty()) return data.subspan(a - offset, n);
    zeros.assign(n, 0);
    return zeros;
  };
  bool cow_written = false;
  for (uint64_t c = first; c <= last; ++c) {
    const uint64_t cstart = c << m.shift;
    const uint64_t a = std::max(cstart, offset);
    const uint64_t b = std::min({cstart + m.chunk_bytes, offset + length, size});
    if (std::optional<Exception> ex = m.store->Lookup(c)) {
      // Not merged yet: the COW chunk is the merged view's copy.
      if (absl::Status st = m.store->WriteChunk(ex->cow_chunk, a - cstart,
                                                piece_of(a, b - a));
          !st.ok())
        return ErrnoError(EIO, st.message());
      cow_written = true;
      continue;
    }
    // Already on the origin: an origin write, copy-outs included.
    if (absl::Status st = CopyOutAll(b - a, a); !st.ok()) return st;
    if (absl::Status st = origin_.Write(piece_of(a, b - a), a, fua); !st.ok())
      return st;
  }
  if (fua && cow_written)
    if (absl::Status st = m.store->Flush(); !st.ok()) return ErrnoError(EIO, st.message());
  return absl::OkStatus();
}

}  // namespace snap
