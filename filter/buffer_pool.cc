#include "filter/buffer_pool.h"

#include <utility>

namespace snap {

std::vector<char> BufferPool::Take(size_t n) {
  snap::MutexLock l(&mu_);
  // Newest first: a steady stream of one size finds its match at once.
  for (size_t i = kept_.size(); i-- > 0;) {
    const size_t cap = kept_[i].capacity();
    if (cap < n || cap / 2 > n) continue;
    std::vector<char> buf = std::move(kept_[i]);
    kept_[i] = std::move(kept_.back());
    kept_.pop_back();
    bytes_ -= cap;
    return buf;
  }
  return {};
}

void BufferPool::Give(std::vector<char> buf, uint64_t room) {
  buf.clear();  // keeps the capacity
  snap::MutexLock l(&mu_);
  if (buf.capacity() == 0 || bytes_ + buf.capacity() > room) return;
  bytes_ += buf.capacity();
  kept_.push_back(std::move(buf));
}

void BufferPool::Clear() {
  std::vector<std::vector<char>> gone;
  {
    snap::MutexLock l(&mu_);
    gone.swap(kept_);
    bytes_ = 0;
  }
}

uint64_t BufferPool::kept_bytes() const {
  snap::MutexLock l(&mu_);
  return bytes_;
}

}  // namespace snap
