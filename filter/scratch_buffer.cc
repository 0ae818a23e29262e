#include "filter/scratch_buffer.h"

#include <utility>

namespace snap {
namespace {

struct Kept {
  std::unique_ptr<char[]> mem;
  size_t size = 0;
};
thread_local Kept kept;

}  // namespace

ScratchBuffer::ScratchBuffer(size_t bytes) {
  if (kept.mem && kept.size >= bytes) {
    mem_ = std::move(kept.mem);
    size_ = kept.size;
  } else {
    mem_ = std::make_unique_for_overwrite<char[]>(bytes);
    size_ = bytes;
  }
}

ScratchBuffer::~ScratchBuffer() {
  if (size_ <= kKeepBytes && (!kept.mem || kept.size < size_)) {
    kept.mem = std::move(mem_);
    kept.size = size_;
  }
}

}  // namespace snap
