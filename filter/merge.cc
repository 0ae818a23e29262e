// Merging a snapshot into the origin, and the origin's merged view while
// it runs: dm-snapshot's snapshot-merge target (reference §1.10, §4.9).
#include <errno.h>

#include <algorithm>
#include <memory>
#include <system_error>
#include <thread>
#include <vector>

#include "absl/strings/str_format.h"
#include "filter/errno_status.h"
#include "filter/log.h"
#include "filter/snapshot_engine.h"

namespace snap {
namespace {
constexpr uint64_t kMergeBuffer = 4 << 20;
constexpr uint64_t kMergeThreads = 4;
constexpr uint64_t kMergeBatch = 64 << 20;
}

void SnapshotEngine::StartMerge(std::shared_ptr<Snapshot> snap) {
  // Like an origin write: nothing may be copying out while the snapshot
  // stops taking copy-outs, and acknowledged writes reach the origin
  // before the merge reads or writes it.
  snap::MutexLock gate(&origin_gate_);
  behind_.WaitIdle();
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
  // Several runs per step, up to kMergeBatch bytes: one origin flush and
  // one area write serve them all (dm takes one run per step and pays two
  // flushes for each).
  const uint32_t max_records =
      static_cast<uint32_t>(std::max<uint64_t>(1, kMergeBatch / m.chunk_bytes));
  absl::StatusOr<std::vector<MergeRun>> runs = m.store->PrepareMergeRuns(max_records);
  if (!runs.ok()) return runs.status();
  if (runs->empty()) return true;
  const uint64_t size = origin_.size();
  // Every run must lie inside the origin, or the chunk's offset may wrap
  // (old_chunk << shift) onto another chunk, which the merge would then
  // overwrite. The filter never makes such a record: the COW file is
  // damaged or belongs to another origin. The step fails before writing
  // anything (Merge failed), as the kernel's does for a chunk that starts
  // past the end (its write there fails); the kernel cuts a run that
  // starts inside the origin at its end, and skips one starting exactly
  // there, which here fail too: they are damage all the same.
  const uint64_t chunks = (size + m.chunk_bytes - 1) >> m.shift;
  for (const MergeRun& r : *runs)
    if (r.old_chunk >= chunks || r.count > chunks - r.old_chunk)
      return absl::OutOfRangeError(absl::StrFormat(
          "%s: cannot merge: origin chunk %d is past the origin's end (%d "
          "chunks of %d bytes): the COW file is damaged or belongs to "
          "another origin; see its records with 'nbdsnap dump %s'",
          m.path, std::max(r.old_chunk, chunks), chunks, m.chunk_bytes, m.path));
  uint32_t records = 0;
  for (const MergeRun& r : *runs) records += r.count;
  // The other snapshots keep the origin's old contents of every range.
  {
    ReaderMutexLock gate(&origin_gate_);
    for (const MergeRun& r : *runs) {
      const uint64_t start = r.old_chunk << m.shift;
      const uint64_t end = std::min((r.old_chunk + r.count) << m.shift, size);
      if (absl::Status st = CopyOutAll(end - start, start); !st.ok()) return st;
    }
  }
  // Writes to these chunks wait until the step is done. Ranges are locked
  // in ascending order, like every other locker does.
  std::vector<MergeRun> sorted = *runs;
  std::sort(sorted.begin(), sorted.end(),
            [](const MergeRun& a, const MergeRun& b) { return a.old_chunk < b.old_chunk; });
  std::vector<std::unique_ptr<ChunkLockGuard>> guards;
  for (const MergeRun& r : sorted)
    guards.push_back(std::make_unique<ChunkLockGuard>(
        m.locks, ChunkLockGuard::kExclusive, r.old_chunk, r.old_chunk + r.count - 1));
  // Copy every run, a few at a time, in bounded pieces.
  auto copy = [&](const MergeRun& r) -> absl::Status {
    const uint64_t start = r.old_chunk << m.shift;  // inside: see above
    const uint64_t end = std::min((r.old_chunk + r.count) << m.shift, size);
    std::vector<char> buf;
    for (uint64_t pos = start; pos < end;) {
      const uint64_t n = std::min(end - pos, kMergeBuffer);
      buf.resize(n);
      if (absl::Status st = m.store->ReadChunk(r.cow_chunk, pos - start, buf); !st.ok())
        return st;
      if (absl::Status st = origin_.Write(buf, pos, false); !st.ok()) return st;
      pos += n;
    }
    return absl::OkStatus();
  };
  const size_t workers = std::min<size_t>(kMergeThreads, sorted.size());
  std::vector<absl::Status> results(workers);
  std::vector<std::thread> threads;
  threads.reserve(workers);
  for (size_t w = 0; w < workers; ++w) {
    auto work = [&, w] {
      try {  // an exception would end the process from a worker thread
        for (size_t i = w; i < sorted.size() && results[w].ok(); i += workers)
          results[w] = copy(sorted[i]);
      } catch (const std::exception& e) {
        results[w] = absl::ResourceExhaustedError(e.what());
      }
    };
    // A worker without a thread (none to be had) copies its share here.
    bool spawned = false;
    if (w + 1 < workers) {
      try {
        threads.emplace_back(work);
        spawned = true;
      } catch (const std::system_error&) {
      }
    }
    if (!spawned) work();
  }
  for (std::thread& t : threads) t.join();
  for (const absl::Status& st : results)
    if (!st.ok()) return st;
  // The origin holds the data durably before the records go.
  if (absl::Status st = origin_.Flush(); !st.ok()) return st;
  if (absl::Status st = m.store->CommitMerge(records); !st.ok()) return st;
  return false;
}

absl::Status SnapshotEngine::MergedRead(Snapshot& m, std::span<char> buf,
                                        uint64_t offset) {
  // The merged view is the merging snapshot's view. A merge that finishes
  // meanwhile leaves m dropped and empty: reading through it then reads
  // the origin, which is right, so only a failed store is refused.
  if (!m.store->valid()) return CheckUsable(m);
  return ReadView(m, buf, offset);
}

absl::Status SnapshotEngine::MergedWrite(Snapshot& merged, std::span<const char> data,
                                         uint64_t length, uint64_t offset,
                                         bool fua) {
  if (length == 0) return absl::OkStatus();
  snap::ReaderMutexLock gate(&origin_gate_);
  // The gate keeps the merge from changing now; one may have finished, or
  // even another started, since the caller looked. A finished one is empty,
  // and writing through it writes the origin, which is right.
  std::shared_ptr<Snapshot> now = merging();
  Snapshot& m = now ? *now : merged;
  const uint64_t size = origin_.size();
  const uint64_t first = offset >> m.shift;
  const uint64_t last = (offset + length - 1) >> m.shift;
  ChunkLockGuard guard(m.locks, ChunkLockGuard::kExclusive, first, last);
  // Writes [a, a + n) of the request with write(pos, bytes): a zero
  // request in pieces of one bounded zero buffer (a chunk may be 1 GiB).
  auto write_range = [&](uint64_t a, uint64_t n, auto&& write) -> absl::Status {
    if (!data.empty()) return write(a, data.subspan(a - offset, n));
    const std::vector<char>& zeros = ZeroBuffer();
    for (uint64_t done = 0; done < n;) {
      const uint64_t k = std::min<uint64_t>(n - done, zeros.size());
      if (absl::Status st = write(a + done, std::span<const char>(zeros.data(), k));
          !st.ok())
        return st;
      done += k;
    }
    return absl::OkStatus();
  };
  for (uint64_t c = first; c <= last; ++c) {
    const uint64_t cstart = c << m.shift;
    const uint64_t a = std::max(cstart, offset);
    const uint64_t b = std::min({cstart + m.chunk_bytes, offset + length, size});
    if (std::optional<Exception> ex = m.store->Lookup(c)) {
      // Not merged yet: the COW chunk is the merged view's copy.
      if (absl::Status st = write_range(
              a, b - a,
              [&](uint64_t pos, std::span<const char> bytes) {
                return m.store->WriteChunk(ex->cow_chunk, pos - cstart, bytes);
              });
          !st.ok())
        return ErrnoError(EIO, st.message());
      continue;
    }
    // Already on the origin: an origin write, copy-outs included.
    if (absl::Status st = CopyOutAll(b - a, a); !st.ok()) return st;
    behind_.WaitFor(a, b - a);  // queued before the merge finished
    if (absl::Status st = write_range(
            a, b - a,
            [&](uint64_t pos, std::span<const char> bytes) {
              return origin_.Write(bytes, pos, false);
            });
        !st.ok())
      return st;
  }
  // FUA: this and every earlier write durable, in the COW and the origin.
  return FlushIfFua(absl::OkStatus(), fua);
}

}  // namespace snap
