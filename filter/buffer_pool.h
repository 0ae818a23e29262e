// Buffers for the copies queued origin writes keep, recycled.
//
// Each origin write that waits in the queue keeps a copy of its data.
// Allocated afresh, that copy came back from glibc as new pages (it hands
// freed 64 KiB blocks back to the kernel), and copying into it faulted in
// every 4 KiB page: most of the page faults of origin writes. Buffers the
// issuer is done with wait here for the next writes of about their size
// instead, and go back to the system when the writes stop.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

#include "store/sync.h"

namespace snap {

class BufferPool {
 public:
  // A kept buffer with room for n bytes but not more than twice that
  // (so small writes do not pin big buffers), empty; else a new empty one.
  std::vector<char> Take(size_t n);
  // Keeps buf for a later Take if the pool then holds at most room bytes.
  void Give(std::vector<char> buf, uint64_t room);
  // Gives every kept buffer back to the system.
  void Clear();
  uint64_t kept_bytes() const;

 private:
  mutable snap::Mutex mu_;
  std::vector<std::vector<char>> kept_ ABSL_GUARDED_BY(mu_);
  uint64_t bytes_ ABSL_GUARDED_BY(mu_) = 0;  // their capacities
};

}  // namespace snap
