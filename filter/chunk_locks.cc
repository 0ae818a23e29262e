#include "filter/chunk_locks.h"

namespace snap {

void ChunkLocks::LockShared(uint64_t first, uint64_t last) {
  snap::MutexLock l(&mu_);
  auto free_of_writers = [&]() ABSL_NO_THREAD_SAFETY_ANALYSIS {
    if (held_.empty()) return true;
    for (uint64_t c = first; c <= last; ++c) {
      auto it = held_.find(c);
      if (it != held_.end() && it->second.exclusive) return false;
    }
    return true;
  };
  mu_.Await(absl::Condition(&free_of_writers));
  for (uint64_t c = first; c <= last; ++c) ++held_[c].shared;
}

void ChunkLocks::UnlockShared(uint64_t first, uint64_t last) {
  snap::MutexLock l(&mu_);
  for (uint64_t c = first; c <= last; ++c) {
    auto it = held_.find(c);
    if (--it->second.shared == 0 && !it->second.exclusive) held_.erase(it);
  }
}

void ChunkLocks::LockExclusive(uint64_t first, uint64_t last) {
  snap::MutexLock l(&mu_);
  for (uint64_t c = first; c <= last; ++c) {
    auto is_free = [&]() ABSL_NO_THREAD_SAFETY_ANALYSIS {
      auto it = held_.find(c);
      return it == held_.end() || (!it->second.exclusive && it->second.shared == 0);
    };
    mu_.Await(absl::Condition(&is_free));
    held_[c].exclusive = true;
  }
}

void ChunkLocks::UnlockExclusive(uint64_t first, uint64_t last) {
  snap::MutexLock l(&mu_);
  for (uint64_t c = first; c <= last; ++c) held_.erase(c);
}

}  // namespace snap
