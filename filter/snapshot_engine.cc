#include "filter/snapshot_engine.h"

#include <errno.h>

#include <algorithm>
#include <bit>
#include <cstring>
#include <optional>
#include <utility>

#include "absl/cleanup/cleanup.h"
#include "absl/strings/str_format.h"
#include "filter/errno_status.h"
#include "filter/log.h"
#include "filter/scratch_buffer.h"

namespace snap {
namespace {

// Copies are done in pieces of at most this many bytes, so a 1 GiB chunk
// does not need a 1 GiB buffer.
constexpr uint64_t kCopyBuffer = 4 << 20;

}  // namespace

const std::vector<char>& ZeroBuffer() {
  static const std::vector<char> zeros(kCopyBuffer, 0);
  return zeros;
}

Snapshot::Snapshot(std::string n, std::string p,
                   std::unique_ptr<ExceptionStore> s)
    : name(std::move(n)),
      path(std::move(p)),
      store(std::move(s)),
      chunk_bytes(store->chunk_bytes()),
      shift(std::countr_zero(chunk_bytes)) {}

std::string Snapshot::Description() const {
  return absl::StrFormat("snapshot %s (%s, %s store, chunk %d): %s", name,
                         path, StoreTypeName(store->type()), chunk_bytes,
                         store->StatusLine());
}

absl::Status SnapshotEngine::Add(std::shared_ptr<Snapshot> snap) {
  snap::MutexLock gate(&origin_gate_);
  if (absl::Status st = CanTake(); !st.ok()) return st;
  if (absl::Status st = CheckChunkBytes(snap->name, snap->chunk_bytes); !st.ok())
    return st;
  // Acknowledged writes are part of the point in time: they reach the
  // origin before the new snapshot starts taking copy-outs from it.
  behind_.WaitIdle();
  snap::MutexLock l(&list_mu_);
  snaps_.push_back(std::move(snap));
  std::stable_sort(snaps_.begin(), snaps_.end(), [](const auto& a, const auto& b) {
    return a->chunk_bytes > b->chunk_bytes;
  });
  return absl::OkStatus();
}

absl::Status SnapshotEngine::CheckChunkBytes(std::string_view name,
                                             uint64_t chunk_bytes) const {
  // Copy-outs read whole chunks from the origin.
  if (chunk_bytes < origin_.block_min())
    return absl::FailedPreconditionError(absl::StrFormat(
        "snapshot %s: its chunk size %d is under the origin's minimum block "
        "size %d: use a chunk size of at least %d",
        name, chunk_bytes, origin_.block_min(), origin_.block_min()));
  return absl::OkStatus();
}

absl::Status SnapshotEngine::CanTake() const {
  if (std::shared_ptr<Snapshot> m = merging())
    return absl::FailedPreconditionError(absl::StrFormat(
        "snapshot %s is merging into the origin: take the new snapshot once "
        "the merge is done",
        m->name));
  return absl::OkStatus();
}

std::shared_ptr<Snapshot> SnapshotEngine::Find(std::string_view name) const {
  snap::MutexLock l(&list_mu_);
  for (const auto& s : snaps_)
    if (s->name == name) return s;
  return nullptr;
}

absl::Status SnapshotEngine::Remove(std::string_view name) {
  snap::MutexLock gate(&origin_gate_);
  snap::MutexLock l(&list_mu_);
  for (auto it = snaps_.begin(); it != snaps_.end(); ++it) {
    if ((*it)->name != name) continue;
    if ((*it)->merging.load())
      return absl::FailedPreconditionError(absl::StrFormat(
          "snapshot %s is merging: it cannot be dropped until the merge is done",
          std::string(name)));
    (*it)->dropped.store(true);
    snaps_.erase(it);
    return absl::OkStatus();
  }
  return absl::NotFoundError(
      absl::StrFormat("no snapshot named %s", std::string(name)));
}

std::vector<std::shared_ptr<Snapshot>> SnapshotEngine::List() const {
  snap::MutexLock l(&list_mu_);
  return snaps_;
}

absl::Status SnapshotEngine::CheckUsable(const Snapshot& s) const {
  if (s.dropped.load())
    return ErrnoError(EIO, absl::StrFormat("snapshot %s was dropped", s.name));
  if (!s.store->valid())
    return ErrnoError(EIO, absl::StrFormat("snapshot %s is invalid: %s", s.name,
                                           s.store->invalid_reason()));
  return absl::OkStatus();
}

absl::Status SnapshotEngine::CheckWritable(const Snapshot& s) const {
  // The merge moves the COW's chunks into the origin and forgets them: a
  // write there now would be acknowledged and then lost.
  if (s.merging.load())
    return ErrnoError(EROFS, absl::StrFormat(
        "snapshot %s is merging into the origin: it takes no more writes",
        s.name));
  return CheckUsable(s);
}

// ------------------------------------------------------------------ origin

absl::Status SnapshotEngine::OriginRead(std::span<char> buf, uint64_t offset) {
  if (std::shared_ptr<Snapshot> m = merging()) return MergedRead(*m, buf, offset);
  behind_.WaitFor(offset, buf.size());
  return origin_.Read(buf, offset);
}

absl::Status SnapshotEngine::CopyOut(Snapshot& s, uint64_t length,
                                     uint64_t offset, bool wait, bool* pending) {
  if (length == 0 || s.merging.load() || !s.store->valid())
    return absl::OkStatus();
  ExceptionStore& store = *s.store;
  const uint64_t first = offset >> s.shift;
  const uint64_t last = (offset + length - 1) >> s.shift;
  // Fast path, no lock: every chunk already has a durable exception, and an
  // exception never goes away while the snapshot takes copy-outs.
  bool done = true;
  for (uint64_t c = first; c <= last && done; ++c) {
    std::optional<Exception> ex = store.Lookup(c);
    done = ex && ex->durable;
  }
  if (done) return absl::OkStatus();

  ChunkLockGuard guard(s.locks, ChunkLockGuard::kExclusive, first, last);
  std::vector<uint64_t> need;
  bool lazy = false;
  for (uint64_t c = first; c <= last; ++c) {
    std::optional<Exception> ex = store.Lookup(c);
    if (!ex)
      need.push_back(c);
    else if (!ex->durable)
      lazy = true;
  }
  // An exception may not be on disk yet (a snapshot write's, or another
  // queued origin write's): it must be before the origin changes under it.
  if (lazy) {
    if (!wait)
      *pending = true;
    else if (!store.Flush().ok())
      return absl::OkStatus();  // now invalid
  }

  if (need.empty()) return absl::OkStatus();
  const uint64_t size = origin_.size();
  // Filled before use: not zeroed (a memset per copy-out is measurable).
  ScratchBuffer mem(std::min<uint64_t>(s.chunk_bytes, kCopyBuffer));
  std::span<char> buf;
  for (size_t i = 0; i < need.size(); ++i) {
    const uint64_t c = need[i];
    const uint64_t start = c << s.shift;
    const uint64_t end = std::min(start + s.chunk_bytes, size);
    // Read the old data before taking a chunk of the COW, so a failing
    // origin costs no space (the chunk lock keeps the data still).
    const bool read_first = end - start <= kCopyBuffer;
    if (read_first) {
      buf = mem.first(end - start);
      if (absl::Status st = origin_.Read(buf, start); !st.ok()) return st;
    }
    // The filesystem under the COW file is full (not the COW's own limit):
    // refuse the origin write rather than lose the snapshot's old data or
    // the snapshot.
    auto no_space = [&](const absl::Status& why) {
      return ErrnoError(ENOSPC, absl::StrFormat(
          "snapshot %s: no space to save the old data: %s", s.name, why.message()));
    };
    absl::StatusOr<uint64_t> cow = store.Allocate(c, WriteSource::kOrigin);
    if (!cow.ok() && absl::IsResourceExhausted(cow.status()) && store.valid())
      return no_space(cow.status());
    if (!cow.ok()) {
      // Full: the store invalidated itself (dm); the origin write goes on.
      LogError(absl::StrFormat("snapshot %s: %s", s.name,
                                      cow.status().message()));
      return absl::OkStatus();
    }
    // Given back on every way out but its commit, an exception included: a
    // slot left pending would hold back every later flush of the store.
    bool committing = false;
    absl::Cleanup abandon = [&] {
      if (!committing) store.Abandon(*cow);
    };
    // Copy the old chunk, cut at the origin's end, in bounded pieces.
    absl::Status st;
    if (read_first) st = store.WriteChunk(*cow, 0, buf);
    for (uint64_t pos = start; !read_first && pos < end && st.ok();) {
      const uint64_t n = std::min(end - pos, kCopyBuffer);
      buf = mem.first(n);
      st = origin_.Read(buf, pos);
      if (!st.ok()) return st;  // the origin failed: so does the write, nothing lost
      st = store.WriteChunk(*cow, pos - start, buf);
      pos += n;
    }
    if (!st.ok()) {
      if (absl::IsResourceExhausted(st)) return no_space(st);
      LogError(absl::StrFormat("snapshot %s: invalidated: copy to %s failed: %s",
                                 s.name, s.path, st.message()));
      store.Invalidate(absl::StrCat("copy to the COW file failed: ", st.message()));
      return absl::OkStatus();
    }
    // Only the last commit waits: records are durable in allocation order.
    const bool last = i + 1 == need.size();
    committing = true;
    if (absl::Status cst = store.Commit(*cow, wait && last); !cst.ok())
      return absl::OkStatus();  // the store is invalid now, as in dm
    if (!wait) *pending = true;
  }
  return absl::OkStatus();
}

absl::Status SnapshotEngine::CopyOutAll(
    uint64_t length, uint64_t offset, bool wait,
    std::vector<std::shared_ptr<ExceptionStore>>* pending) {
  for (const auto& s : List()) {
    bool uncommitted = false;
    if (absl::Status st = CopyOut(*s, length, offset, wait, &uncommitted); !st.ok())
      return st;
    // The store lives as long as the snapshot that owns it.
    if (uncommitted) pending->emplace_back(s, s->store.get());
  }
  return absl::OkStatus();
}

absl::Status SnapshotEngine::OriginWrite(std::span<const char> buf,
                                         uint64_t offset, bool fua) {
  std::shared_ptr<Snapshot> m;
  {
    snap::ReaderMutexLock gate(&origin_gate_);
    // Checked under the gate: a merge that starts now waits for this write.
    m = merging();
    if (!m) {
      std::vector<std::shared_ptr<ExceptionStore>> pending;
      if (absl::Status st = CopyOutAll(buf.size(), offset, false, &pending); !st.ok())
        return st;
      if (!pending.empty()) {
        // Acknowledged now, written once the copy-outs are durable (with
        // FUA, the flush below waits for that).
        behind_.Queue(buf, offset, std::move(pending));
        return FlushIfFua(absl::OkStatus(), fua);
      }
      behind_.WaitFor(offset, buf.size());
      return FlushIfFua(origin_.Write(buf, offset, false), fua);
    }
  }
  // The merge may finish before MergedWrite takes the gate: it looks again.
  return MergedWrite(*m, buf, buf.size(), offset, fua);
}

absl::Status SnapshotEngine::OriginZero(uint64_t length, uint64_t offset,
                                        bool may_trim, bool fua, bool fast) {
  std::shared_ptr<Snapshot> m;
  {
    snap::ReaderMutexLock gate(&origin_gate_);
    m = merging();
    if (!m) return OriginZeroLocked(length, offset, may_trim, fua, fast);
  }
  if (fast) return ErrnoError(ENOTSUP, "no fast zero while merging");
  return MergedWrite(*m, {}, length, offset, fua);
}

absl::Status SnapshotEngine::OriginZeroLocked(uint64_t length, uint64_t offset,
                                              bool may_trim, bool fua, bool fast) {
  if (fast) {
    if (!origin_.can_fast_zero())
      return ErrnoError(ENOTSUP, "the origin has no fast zero");
    // A zero that must first copy chunks out is not fast.
    for (const auto& s : List()) {
      if (s->merging.load() || !s->store->valid()) continue;
      for (uint64_t c = offset >> s->shift; c <= (offset + length - 1) >> s->shift; ++c)
        if (!s->store->Lookup(c))
          return ErrnoError(ENOTSUP, "fast zero would need a copy-out");
    }
  }
  if (absl::Status st = CopyOutAll(length, offset); !st.ok()) return st;
  behind_.WaitFor(offset, length);
  absl::Status st;
  if (origin_.can_zero()) {
    st = origin_.Zero(length, offset, may_trim, false, fast);
  } else {
    for (uint64_t done = 0; done < length && st.ok();) {
      uint64_t n = std::min<uint64_t>(length - done, kCopyBuffer);
      st = origin_.Write({ZeroBuffer().data(), n}, offset + done, false);
      done += n;
    }
  }
  return FlushIfFua(st, fua);
}

absl::Status SnapshotEngine::OriginTrim(uint64_t length, uint64_t offset,
                                        bool fua) {
  // Advisory; while merging, discards change nothing (dm does the same).
  if (!origin_.can_trim()) return absl::OkStatus();
  snap::ReaderMutexLock gate(&origin_gate_);
  if (merging()) return absl::OkStatus();
  if (absl::Status st = CopyOutAll(length, offset); !st.ok()) return st;
  behind_.WaitFor(offset, length);
  absl::Status st = origin_.Trim(length, offset, false);
  return FlushIfFua(st, fua);
}

absl::Status SnapshotEngine::FlushIfFua(absl::Status st, bool fua) {
  // FUA here means what DESIGN.md promises: every write acknowledged
  // before this one is durable too, queued ones included. A plugin's own
  // FUA may cover only the one write (the nbd plugin's does).
  if (!st.ok() || !fua) return st;
  return OriginFlush();
}

absl::Status SnapshotEngine::OriginFlush() {
  // Acknowledged writes first. Once one is lost, no flush may succeed.
  if (absl::Status st = behind_.Drain(); !st.ok())
    return ErrnoError(EIO, absl::StrCat(
        "an acknowledged origin write failed and is lost; origin flushes "
        "fail until nbdkit restarts: ", st.message()));
  // While merging, the merged view lives in both the origin and the COW.
  if (std::shared_ptr<Snapshot> m = merging())
    if (absl::Status st = m->store->Flush(); !st.ok())
      return ErrnoError(EIO, st.message());
  if (!origin_.can_flush()) return absl::OkStatus();
  return origin_.Flush();
}

// --------------------------------------------------------------- snapshot

absl::Status SnapshotEngine::SnapRead(Snapshot& s, std::span<char> buf,
                                      uint64_t offset) {
  if (absl::Status st = CheckUsable(s); !st.ok()) return st;
  if (absl::Status st = ReadView(s, buf, offset); !st.ok()) return st;
  // Dropped or invalidated meanwhile: origin writes stopped waiting for
  // this read, so what it took from the origin may be newer than the
  // snapshot. dm fails I/O to an invalid snapshot; so does this.
  return CheckUsable(s);
}

absl::Status SnapshotEngine::ReadView(Snapshot& s, std::span<char> buf,
                                      uint64_t offset) {
  if (buf.empty()) return absl::OkStatus();
  const uint64_t first = offset >> s.shift;
  const uint64_t last = (offset + buf.size() - 1) >> s.shift;
  // Shared: origin writes to these chunks wait until the read is done.
  ChunkLockGuard guard(s.locks, ChunkLockGuard::kShared, first, last);
  const uint64_t end = offset + buf.size();
  uint64_t pos = offset;
  while (pos < end) {
    // A run of chunks all on the origin, or all in consecutive COW chunks,
    // is one read.
    uint64_t c = pos >> s.shift;
    std::optional<Exception> ex = s.store->Lookup(c);
    uint64_t run_end = std::min((c + 1) << s.shift, end);
    while (run_end < end) {
      std::optional<Exception> next = s.store->Lookup(c + 1);
      if (ex.has_value() != next.has_value() ||
          (ex && next->cow_chunk != ex->cow_chunk + (c + 1 - (pos >> s.shift))))
        break;
      ++c;
      run_end = std::min((c + 1) << s.shift, end);
    }
    std::span<char> piece = buf.subspan(pos - offset, run_end - pos);
    absl::Status st =
        ex ? s.store->ReadChunk(ex->cow_chunk,
                                pos - ((pos >> s.shift) << s.shift), piece)
           : origin_.Read(piece, pos);
    if (!st.ok()) return ex ? ErrnoError(EIO, st.message()) : st;
    pos = run_end;
  }
  return absl::OkStatus();
}

absl::Status SnapshotEngine::SnapModify(Snapshot& s, std::span<const char> data,
                                        uint64_t length, uint64_t offset,
                                        bool zero, bool fua) {
  if (absl::Status st = CheckWritable(s); !st.ok()) return st;
  if (s.store->overflowed())
    return ErrnoError(ENOSPC, absl::StrFormat(
        "snapshot %s overflowed: its COW file is full, writes fail until "
        "restart (reads still work)", s.name));
  if (length == 0) return absl::OkStatus();
  ExceptionStore& store = *s.store;
  const uint64_t size = origin_.size();
  const uint64_t first = offset >> s.shift;
  const uint64_t last = (offset + length - 1) >> s.shift;
  ChunkLockGuard guard(s.locks, ChunkLockGuard::kExclusive, first, last);

  // Pieces that go straight to the COW are gathered into runs of
  // consecutive COW chunks, so a sequential write is one pwrite, not one
  // per chunk. New exceptions are committed once their data is written.
  // New exceptions' slots, committed in order once their data is written.
  // The rest are given back on every way out, an exception included: a
  // slot left pending would hold back every later flush of the store.
  std::vector<uint64_t> fresh;
  fresh.reserve(last - first + 1);  // no throw between Allocate and here
  size_t committed = 0;
  absl::Cleanup abandon = [&] {
    for (size_t i = committed; i < fresh.size(); ++i) store.Abandon(fresh[i]);
  };
  // With wait (FUA), waiting for the last record covers the ones before it.
  auto commit_fresh = [&](bool wait) -> absl::Status {
    while (committed < fresh.size()) {
      const uint64_t cow = fresh[committed++];
      if (absl::Status st = store.Commit(cow, wait && committed == fresh.size());
          !st.ok())
        return st;
    }
    return absl::OkStatus();
  };
  uint64_t run_cow = 0, run_in = 0, run_len = 0, run_src = 0;
  auto write_run = [&]() -> absl::Status {
    if (run_len == 0) return absl::OkStatus();
    const uint64_t len = std::exchange(run_len, 0);
    if (zero) return store.ZeroChunk(run_cow, run_in, len);
    return store.WriteChunk(run_cow, run_in, data.subspan(run_src, len));
  };
  auto fail = [&](absl::Status st) {
    // A full filesystem fails the write and keeps the snapshot valid.
    return ErrnoError(absl::IsResourceExhausted(st) ? ENOSPC : EIO, st.message());
  };
  std::optional<ScratchBuffer> mem;  // for the first chunk that needs it
  std::span<char> tmp;
  auto scratch = [&](uint64_t n) {
    if (!mem) mem.emplace(std::min<uint64_t>(s.chunk_bytes, kCopyBuffer));
    return mem->first(n);
  };
  for (uint64_t c = first; c <= last; ++c) {
    const uint64_t cstart = c << s.shift;
    const uint64_t cend = std::min(cstart + s.chunk_bytes, size);
    const uint64_t a = std::max(cstart, offset);
    const uint64_t b = std::min(cend, offset + length);
    const bool whole = a == cstart && b == cend;
    uint64_t cow;
    if (std::optional<Exception> ex = store.Lookup(c)) {
      cow = ex->cow_chunk;
    } else {
      // A partial chunk needs the old contents: read them before taking a
      // COW chunk, so a failing origin costs no space.
      const bool read_first = !whole && cend - cstart <= kCopyBuffer;
      if (read_first) {
        tmp = scratch(cend - cstart);
        if (absl::Status st = origin_.Read(tmp, cstart); !st.ok()) {
          // The chunks before this one keep their new data.
          if (write_run().ok()) (void)commit_fresh(false);
          return st;
        }
      }
      absl::StatusOr<uint64_t> got = store.Allocate(c, WriteSource::kSnapshot);
      if (!got.ok()) {
        if (write_run().ok()) (void)commit_fresh(false);
        if (!store.valid())
          return ErrnoError(EIO, absl::StrFormat("snapshot %s is invalid: %s",
                                                 s.name, store.invalid_reason()));
        return ErrnoError(ENOSPC, absl::StrFormat("snapshot %s: %s", s.name,
                                                  got.status().message()));
      }
      cow = *got;
      fresh.push_back(cow);
      if (read_first) {
        if (absl::Status st = store.WriteChunk(cow, 0, tmp); !st.ok()) return fail(st);
      } else if (!whole) {
        // Partial chunk: the old contents first (dm copies the chunk, then
        // lets the write through).
        if (absl::Status st = write_run(); !st.ok()) return fail(st);
        for (uint64_t p = cstart; p < cend;) {
          uint64_t n = std::min(cend - p, kCopyBuffer);
          tmp = scratch(n);
          absl::Status st = origin_.Read(tmp, p);
          if (st.ok()) st = store.WriteChunk(cow, p - cstart, tmp);
          if (!st.ok()) return fail(st);
          p += n;
        }
      }
    }
    if (zero && !whole) {
      // Zeros inside a chunk are written, not punched.
      if (absl::Status st = write_run(); !st.ok()) return fail(st);
      for (uint64_t p = a; p < b;) {
        uint64_t n = std::min(b - p, kCopyBuffer);
        if (absl::Status st = store.WriteChunk(cow, p - cstart, {ZeroBuffer().data(), n});
            !st.ok())
          return fail(st);
        p += n;
      }
      continue;
    }
    // Extend the run when this piece continues it on disk and in data.
    if (run_len != 0 && cow == run_cow + ((run_in + run_len) >> s.shift) &&
        a == cstart && ((run_in + run_len) & (s.chunk_bytes - 1)) == 0) {
      run_len += b - a;
      continue;
    }
    if (absl::Status st = write_run(); !st.ok()) return fail(st);
    run_cow = cow;
    run_in = a - cstart;
    run_len = b - a;
    run_src = a - offset;
  }
  if (absl::Status st = write_run(); !st.ok()) return fail(st);
  if (absl::Status st = commit_fresh(fua); !st.ok()) return ErrnoError(EIO, st.message());
  if (fua)
    if (absl::Status st = store.Flush(); !st.ok()) return ErrnoError(EIO, st.message());
  return absl::OkStatus();
}

absl::Status SnapshotEngine::SnapWrite(Snapshot& s, std::span<const char> buf,
                                       uint64_t offset, bool fua) {
  return SnapModify(s, buf, buf.size(), offset, false, fua);
}

absl::Status SnapshotEngine::SnapZero(Snapshot& s, uint64_t length,
                                      uint64_t offset, bool fua, bool fast) {
  if (fast && length > 0) {
    // Partial chunks without an exception would need a copy first.
    const uint64_t size = origin_.size();
    for (uint64_t c = offset >> s.shift; c <= (offset + length - 1) >> s.shift; ++c) {
      const uint64_t cstart = c << s.shift;
      const uint64_t cend = std::min(cstart + s.chunk_bytes, size);
      const bool whole = offset <= cstart && offset + length >= cend;
      if (!whole && !s.store->Lookup(c))
        return ErrnoError(ENOTSUP, "fast zero would need a chunk copy");
    }
  }
  return SnapModify(s, {}, length, offset, true, fua);
}

absl::Status SnapshotEngine::SnapTrim(Snapshot& s, uint64_t length,
                                      uint64_t offset) {
  // Advisory: free the space of whole chunks already in the COW; never
  // touch the origin.
  if (absl::Status st = CheckWritable(s); !st.ok()) return st;
  // Overflowed, it keeps what it has, as dm keeps it (failing every write).
  if (length == 0 || s.store->overflowed()) return absl::OkStatus();
  const uint64_t size = origin_.size();
  const uint64_t first = offset >> s.shift;
  const uint64_t last = (offset + length - 1) >> s.shift;
  ChunkLockGuard guard(s.locks, ChunkLockGuard::kExclusive, first, last);
  for (uint64_t c = first; c <= last; ++c) {
    const uint64_t cstart = c << s.shift;
    const uint64_t cend = std::min(cstart + s.chunk_bytes, size);
    if (offset > cstart || offset + length < cend) continue;
    if (std::optional<Exception> ex = s.store->Lookup(c))
      (void)s.store->ZeroChunk(ex->cow_chunk, 0, cend - cstart);
  }
  return absl::OkStatus();
}

absl::Status SnapshotEngine::SnapFlush(Snapshot& s) {
  if (absl::Status st = CheckUsable(s); !st.ok()) return st;
  if (absl::Status st = s.store->Flush(); !st.ok()) return ErrnoError(EIO, st.message());
  return absl::OkStatus();
}

void SnapshotEngine::SnapClassify(
    Snapshot& s, uint64_t length, uint64_t offset,
    const std::function<void(uint64_t, uint64_t, bool)>& piece) {
  if (length == 0) return;
  // Held until every piece is handled, as a read holds them: an origin
  // write would otherwise copy a chunk out and change the origin between
  // "on the origin" and the origin's extents, which would then call the
  // snapshot's old data a hole (and nbdcopy would skip it).
  ChunkLockGuard guard(s.locks, ChunkLockGuard::kShared, offset >> s.shift,
                       (offset + length - 1) >> s.shift);
  const uint64_t end = offset + length;
  uint64_t pos = offset;
  while (pos < end) {
    uint64_t c = pos >> s.shift;
    const bool in_cow = s.store->Lookup(c).has_value();
    uint64_t run_end = std::min((c + 1) << s.shift, end);
    while (run_end < end && s.store->Lookup(c + 1).has_value() == in_cow) {
      ++c;
      run_end = std::min((c + 1) << s.shift, end);
    }
    piece(pos, run_end - pos, in_cow);
    pos = run_end;
  }
}

}  // namespace snap
