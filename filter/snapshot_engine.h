// The origin and snapshot I/O paths of dm-snapshot, without nbdkit:
// copy-out on origin writes, COW redirection for snapshot I/O, and the
// pending-exception interlock between them.
#pragma once

#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "store/sync.h"
#include "filter/chunk_locks.h"
#include "filter/origin_io.h"
#include "filter/origin_write_behind.h"
#include "store/exception_store.h"

namespace snap {

struct Snapshot {
  Snapshot(std::string name, std::string path,
           std::unique_ptr<ExceptionStore> store);

  const std::string name;
  const std::string path;
  const std::unique_ptr<ExceptionStore> store;
  const uint64_t chunk_bytes;
  const int shift;  // log2(chunk_bytes)
  ChunkLocks locks;
  std::atomic<bool> merging{false};
  std::atomic<bool> dropped{false};  // removed live; open connections fail
  std::atomic<int> clients{0};       // connections open on its export

  // One line for nbdinfo --list and logs: the dm status and the store type.
  std::string Description() const;
};

// 4 MiB of zeros, for writing zeros in bounded pieces.
const std::vector<char>& ZeroBuffer();

class SnapshotEngine {
 public:
  // Origin writes that must copy out wait for their commits in a queue of
  // at most this many bytes, acknowledged already (origin_write_behind.h).
  static constexpr uint64_t kWriteBehindBytes = 32 << 20;

  explicit SnapshotEngine(OriginIo& origin)
      : origin_(origin), behind_(origin, kWriteBehindBytes) {}

  // Snapshots are kept largest chunk first (dm: "sort by chunk size to fix
  // race"). Refused while a merge runs: the origin's chunks that the merge
  // has not reached yet are not what the origin export shows (lvm2 too
  // refuses to snapshot an origin that is merging).
  absl::Status Add(std::shared_ptr<Snapshot> snap);
  // EIO with the reason when s was dropped or is invalid (dm fails I/O to
  // an invalid snapshot).
  absl::Status CheckUsable(const Snapshot& s) const;
  // Why a snapshot cannot be taken now (a merge runs), or OK.
  absl::Status CanTake() const;
  // Why a snapshot of chunk_bytes chunks cannot copy from this origin, or OK.
  absl::Status CheckChunkBytes(std::string_view name, uint64_t chunk_bytes) const;
  bool origin_writable() const { return origin_.can_write(); }
  std::shared_ptr<Snapshot> Find(std::string_view name) const;
  // Removes a snapshot (not while it merges): origin writes stop copying
  // out to it, and I/O still open on it fails.
  absl::Status Remove(std::string_view name);
  std::vector<std::shared_ptr<Snapshot>> List() const;

  OriginIo& origin() { return origin_; }
  uint64_t size() const { return origin_.size(); }

  // The origin export.
  absl::Status OriginRead(std::span<char> buf, uint64_t offset);
  absl::Status OriginWrite(std::span<const char> buf, uint64_t offset, bool fua);
  absl::Status OriginZero(uint64_t length, uint64_t offset, bool may_trim,
                          bool fua, bool fast);
  absl::Status OriginTrim(uint64_t length, uint64_t offset, bool fua);
  absl::Status OriginFlush();
  // Returns once no acknowledged origin write overlapping the range is
  // still queued: for origin I/O that bypasses the engine (extents).
  void WaitOriginWrites(uint64_t offset, uint64_t length) {
    behind_.WaitFor(offset, length);
  }

  // A snapshot export.
  absl::Status SnapRead(Snapshot& s, std::span<char> buf, uint64_t offset);
  absl::Status SnapWrite(Snapshot& s, std::span<const char> buf,
                         uint64_t offset, bool fua);
  absl::Status SnapZero(Snapshot& s, uint64_t length, uint64_t offset,
                        bool fua, bool fast);
  absl::Status SnapTrim(Snapshot& s, uint64_t length, uint64_t offset);
  absl::Status SnapFlush(Snapshot& s);
  // Splits [offset, offset+length) into pieces that live in the COW
  // (in_cow) or still on the origin, holding the chunks still (no copy-out,
  // so the origin does not change under them) until every piece is handled.
  void SnapClassify(Snapshot& s, uint64_t length, uint64_t offset,
                    const std::function<void(uint64_t off, uint64_t len,
                                             bool in_cow)>& piece);

  // Makes sure every snapshot that takes copy-outs holds the old contents
  // of [offset, offset+length) before the origin changes there. With
  // wait, durably; without, it names in *pending the stores that must
  // still commit before the origin may change.
  absl::Status CopyOutAll(uint64_t length, uint64_t offset, bool wait = true,
                          std::vector<std::shared_ptr<ExceptionStore>>* pending = nullptr);

  // Merge (dm's snapshot-merge): while a snapshot merges, the origin
  // export shows the merged view, the snapshot takes no copy-outs, and
  // MergeStep moves its newest run of exceptions into the origin.
  void StartMerge(std::shared_ptr<Snapshot> snap);
  std::shared_ptr<Snapshot> merging() const;
  // One step; true when nothing is left to merge.
  absl::StatusOr<bool> MergeStep();
  // After the last step: the empty snapshot goes away (as LVM removes a
  // merged snapshot) and the origin is served directly again.
  void FinishMerge();

 private:
  // The origin export's I/O while a merge runs (merge.cc); merged is the
  // merge the caller saw.
  absl::Status MergedRead(Snapshot& m, std::span<char> buf, uint64_t offset);
  absl::Status MergedWrite(Snapshot& merged, std::span<const char> data,
                           uint64_t length, uint64_t offset, bool fua);
  // st, or with FUA and st OK, an origin flush: FUA on the origin export.
  absl::Status FlushIfFua(absl::Status st, bool fua);
  absl::Status OriginZeroLocked(uint64_t length, uint64_t offset, bool may_trim,
                                bool fua, bool fast)
      ABSL_SHARED_LOCKS_REQUIRED(origin_gate_);
  absl::Status CopyOut(Snapshot& s, uint64_t length, uint64_t offset,
                       bool wait, bool* pending);
  // Writes data (or zeros when data is empty and zero is set) into s.
  absl::Status SnapModify(Snapshot& s, std::span<const char> data,
                          uint64_t length, uint64_t offset, bool zero,
                          bool fua);
  // CheckUsable, and not merging.
  absl::Status CheckWritable(const Snapshot& s) const;
  // s's contents, without checking that s may be read.
  absl::Status ReadView(Snapshot& s, std::span<char> buf, uint64_t offset);

  OriginIo& origin_;
  // Origin writes hold it shared; taking a snapshot live holds it
  // exclusively, so in-flight origin writes drain first.
  mutable snap::Mutex origin_gate_;
  mutable snap::Mutex list_mu_;
  std::vector<std::shared_ptr<Snapshot>> snaps_ ABSL_GUARDED_BY(list_mu_);
  std::shared_ptr<Snapshot> merging_ ABSL_GUARDED_BY(list_mu_);
  // Declared last: destroyed first, it writes out what it holds while the
  // snapshots are still there.
  OriginWriteBehind behind_;
};

}  // namespace snap
