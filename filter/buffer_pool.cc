#include "filter/buffer_pool.h"

#include <utility>

namespace snap {

std::vector<char> BufferPool::Take() {
  snap::MutexLock l(&mu_);
  if (kept_.empty()) return {};
  std::vector<char> buf = std::move(kept_.back());
  kept_.pop_back();
  bytes_ -= buf.capacity();
  return buf;
}

void BufferPool::Give(std::vector<char> buf) {
  buf.clear();  // keeps the capacity
  snap::MutexLock l(&mu_);
  if (buf.capacity() == 0 || bytes_ + buf.capacity() > max_bytes_) return;
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
