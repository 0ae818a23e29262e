// Buffers for the copies queued origin writes keep, recycled.
//
// Each origin write that waits in the queue keeps a copy of its data.
// Allocated afresh, that copy came back from glibc as new pages (it hands
// freed 64 KiB blocks back to the kernel), and copying into it faulted in
// every 4 KiB page: most of the page faults of origin writes. Buffers the
// issuer is done with wait here for the next writes instead, up to the
// queue's own bound, and go back to the system when the writes stop.
#pragma once

#include <cstdint>
#include <vector>

#include "store/sync.h"

namespace snap {

class BufferPool {
 public:
  explicit BufferPool(uint64_t max_bytes) : max_bytes_(max_bytes) {}

  // A kept buffer, empty but with room, or a new empty one.
  std::vector<char> Take();
  // Keeps buf for a later Take if the pool has room for it.
  void Give(std::vector<char> buf);
  // Gives every kept buffer back to the system.
  void Clear();
  uint64_t kept_bytes() const;

 private:
  const uint64_t max_bytes_;
  mutable snap::Mutex mu_;
  std::vector<std::vector<char>> kept_ ABSL_GUARDED_BY(mu_);
  uint64_t bytes_ ABSL_GUARDED_BY(mu_) = 0;
};

}  // namespace snap
