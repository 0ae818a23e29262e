#include "store/block_file.h"

#include <algorithm>
#include <vector>

namespace snap {

absl::StatusOr<std::optional<uint64_t>> BlockFile::FirstNonZeroByte(uint64_t end) {
  std::vector<char> buf(std::min<uint64_t>(end, 1 << 20));
  for (uint64_t off = 0; off < end;) {
    const std::span<char> piece(buf.data(), std::min<uint64_t>(buf.size(), end - off));
    if (absl::Status st = PRead(piece, off); !st.ok()) return st;
    auto it = std::find_if(piece.begin(), piece.end(), [](char c) { return c != 0; });
    if (it != piece.end()) return off + static_cast<uint64_t>(it - piece.begin());
    off += piece.size();
  }
  return std::nullopt;
}

}  // namespace snap
