// Origin writes that had to copy chunks out, acknowledged before their
// copy-outs are durable. NBD lets a server acknowledge a write that is not
// yet durable (until a flush, or with FUA), so such a write need not hold
// its client for two syncs: it waits here, in order, until one group
// commit per store makes the copy-outs durable, and only then reaches the
// origin. The durability contract is kept (the copy-out is durable before
// the origin write is issued); the waiting moves off the client's path.
//
// Reads of the origin and other origin I/O that overlap a queued write
// wait for it, so every client sees its acknowledged writes.
#pragma once

#include <atomic>
#include <cstdint>
#include <deque>
#include <map>
#include <memory>
#include <span>
#include <thread>
#include <vector>

#include "absl/status/status.h"
#include "absl/time/time.h"
#include "filter/buffer_pool.h"
#include "filter/origin_io.h"
#include "store/exception_store.h"
#include "store/sync.h"

namespace snap {

class OriginWriteBehind {
 public:
  // Queues hold at most max_bytes of data; the writer thread starts here.
  // Buffers of written data are kept for the next writes (while they and
  // the queued data fit in max_bytes) until none is queued for idle_release.
  OriginWriteBehind(OriginIo& origin, uint64_t max_bytes,
                    absl::Duration idle_release = absl::Seconds(1));
  // Issues every queued write, then stops the writer thread.
  ~OriginWriteBehind();
  OriginWriteBehind(const OriginWriteBehind&) = delete;
  OriginWriteBehind& operator=(const OriginWriteBehind&) = delete;

  // Queues a copy of data for offset, to be written once every store in
  // stores has its committed exceptions durable. Writes reach the origin in
  // the order queued. Blocks while the queue is full.
  void Queue(std::span<const char> data, uint64_t offset,
             std::vector<std::shared_ptr<ExceptionStore>> stores);
  // Returns once no queued write overlaps [offset, offset + length).
  void WaitFor(uint64_t offset, uint64_t length);
  // Returns once nothing is queued.
  void WaitIdle();
  // Bytes of buffers kept for the next writes.
  uint64_t kept_bytes() const { return spare_.kept_bytes(); }
  // Returns once every write queued before the call has been written
  // (later ones, from other clients, do not hold it up), with the error of
  // the first queued write that failed for good. That error stays: the
  // write was acknowledged and is lost, and a flush that succeeded later
  // would promise it durable, whichever client flushes.
  absl::Status Drain();

 private:
  struct Item {
    uint64_t seq;  // queue order: the issuer finishes items in this order
    uint64_t offset;
    std::vector<char> data;
    std::vector<std::shared_ptr<ExceptionStore>> stores;
  };
  // The committer makes a batch's copy-outs durable and hands it to the
  // issuer, which writes it to the origin while the next batch commits.
  void Commit();
  void Issue();
  // Writes item to the origin, trying again after a failure.
  absl::Status WriteWithRetries(const Item& item);
  bool OverlapsLocked(uint64_t offset, uint64_t length) const
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  OriginIo& origin_;
  const uint64_t max_bytes_;
  const absl::Duration idle_release_;
  BufferPool spare_;
  mutable snap::Mutex mu_;
  // One condition per kind of waiter, so a queued write wakes only the
  // committer, not the issuer and every client waiting for an overlap.
  snap::CondVar queued_cv_;     // the committer: queue_ has work, or stop_
  snap::CondVar committed_cv_;  // the issuer: committed_ has work, or done
  snap::CondVar done_cv_;       // clients: writes finished, space freed
  std::deque<Item> queue_ ABSL_GUARDED_BY(mu_);  // waiting for the committer
  std::deque<std::vector<Item>> committed_ ABSL_GUARDED_BY(mu_);  // for the issuer
  // Every write queued or being written: start -> end, for overlap checks.
  std::multimap<uint64_t, uint64_t> ranges_ ABSL_GUARDED_BY(mu_);
  uint64_t longest_ ABSL_GUARDED_BY(mu_) = 0;  // longest write ever queued
  uint64_t bytes_ ABSL_GUARDED_BY(mu_) = 0;    // buffers queued or being written
  uint64_t queued_seq_ ABSL_GUARDED_BY(mu_) = 0;  // the last write queued
  uint64_t issued_seq_ ABSL_GUARDED_BY(mu_) = 0;  // every one to here written
  absl::Status error_ ABSL_GUARDED_BY(mu_);
  bool stop_ ABSL_GUARDED_BY(mu_) = false;
  bool committer_done_ ABSL_GUARDED_BY(mu_) = false;
  // ranges_.size(), readable without the lock: most reads find it zero.
  std::atomic<uint64_t> pending_{0};
  std::thread committer_;
  std::thread issuer_;
};

}  // namespace snap
