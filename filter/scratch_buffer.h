// A buffer for copying chunks that a thread keeps between requests.
//
// A copy-out used to allocate its chunk buffer afresh, and glibc gives a
// freed 64 KiB block back to the kernel, so the origin read into the next
// one faulted in every 4 KiB page again: most of the page faults of
// origin writes that copy out. Each thread now keeps the largest buffer
// it has used, up to kKeepBytes (16 worker threads at 64 KiB chunks:
// 1 MiB; at 1 MiB chunks and more, 16 MiB); bigger ones, and one asked
// for while the thread's is in use, are allocated for the occasion.
#pragma once

#include <cassert>
#include <cstddef>
#include <memory>
#include <span>

namespace snap {

class ScratchBuffer {
 public:
  static constexpr size_t kKeepBytes = 1 << 20;

  explicit ScratchBuffer(size_t bytes);
  ~ScratchBuffer();
  ScratchBuffer(const ScratchBuffer&) = delete;
  ScratchBuffer& operator=(const ScratchBuffer&) = delete;

  // The first n bytes (n at most the size asked for), not zeroed.
  std::span<char> first(size_t n) {
    assert(n <= size_);
    return {mem_.get(), n};
  }

 private:
  std::unique_ptr<char[]> mem_;
  size_t size_;
};

}  // namespace snap
