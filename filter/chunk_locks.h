// Per-snapshot chunk locks: the pending-exception interlock of dm-snapshot.
// Exclusive: an exception is being made for the chunk, or data is written
// into it. Shared: a snapshot read is using the chunk (perhaps from the
// origin), so an origin write must not overwrite it yet.
// Deadlock-free as used: a thread holds locks of one table at a time,
// takes exclusive locks in ascending order and a shared range all at once.
#pragma once

#include <cstdint>

#include "absl/container/flat_hash_map.h"
#include "store/sync.h"

namespace snap {

class ChunkLocks {
 public:
  void LockShared(uint64_t first, uint64_t last);  // inclusive
  void UnlockShared(uint64_t first, uint64_t last);
  void LockExclusive(uint64_t first, uint64_t last);  // inclusive, ascending
  void UnlockExclusive(uint64_t first, uint64_t last);

 private:
  struct State {
    uint32_t shared = 0;
    bool exclusive = false;
  };
  snap::Mutex mu_;
  absl::flat_hash_map<uint64_t, State> held_ ABSL_GUARDED_BY(mu_);
};

// Scoped form.
class ChunkLockGuard {
 public:
  enum Mode { kShared, kExclusive };
  ChunkLockGuard(ChunkLocks& locks, Mode mode, uint64_t first, uint64_t last)
      : locks_(locks), mode_(mode), first_(first), last_(last) {
    if (mode_ == kShared)
      locks_.LockShared(first_, last_);
    else
      locks_.LockExclusive(first_, last_);
  }
  ~ChunkLockGuard() {
    if (mode_ == kShared)
      locks_.UnlockShared(first_, last_);
    else
      locks_.UnlockExclusive(first_, last_);
  }
  ChunkLockGuard(const ChunkLockGuard&) = delete;
  ChunkLockGuard& operator=(const ChunkLockGuard&) = delete;

 private:
  ChunkLocks& locks_;
  Mode mode_;
  uint64_t first_, last_;
};

}  // namespace snap
