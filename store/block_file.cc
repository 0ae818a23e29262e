#include "store/block_file.h"

#include <algorithm>
#include <vector>

namespace snap {

absl::StatusOr<std::optional<uint64_t>> BlockFile::FirstNonZeroByte(uint64_t end) {
  return FirstNonZeroIn(0, end);
}

absl::StatusOr<std::optional<uint64_t>> BlockFile::FirstNonZeroIn(uint64_t begin,
                                                                  uint64_t end) {
  std::vector<char> buf(std::min<uint64_t>(end - std::min(begin, end), 1 << 20));
  for (uint64_t off = begin; off < end;) {
    const std::span<char> piece(buf.data(), std::min<uint64_t>(buf.size(), end - off));
    if (absl::Status st = PRead(piece, off); !st.ok()) {
      if (absl::IsOutOfRange(st)) return std::nullopt;  // it shrank under us
      return st;
    }
    auto it = std::find_if(piece.begin(), piece.end(), [](char c) { return c != 0; });
    if (it != piece.end()) return off + static_cast<uint64_t>(it - piece.begin());
    off += piece.size();
  }
  return std::nullopt;
}

}  // namespace snap
