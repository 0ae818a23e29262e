#include "store/cow_format.h"

#include <bit>
#include <cctype>
#include <cstring>

#include "absl/strings/numbers.h"
#include "absl/strings/str_format.h"

namespace snap {
namespace {

uint32_t Le32(const char* p) {
  uint32_t v = 0;
  for (int i = 3; i >= 0; --i) v = (v << 8) | static_cast<uint8_t>(p[i]);
  return v;
}
uint64_t Le64(const char* p) {
  uint64_t v = 0;
  for (int i = 7; i >= 0; --i) v = (v << 8) | static_cast<uint8_t>(p[i]);
  return v;
}
void PutLe32(char* p, uint32_t v) {
  for (int i = 0; i < 4; ++i) p[i] = static_cast<char>((v >> (8 * i)) & 0xff);
}
void PutLe64(char* p, uint64_t v) {
  for (int i = 0; i < 8; ++i) p[i] = static_cast<char>((v >> (8 * i)) & 0xff);
}

}  // namespace

DiskHeader DiskHeader::Decode(std::span<const char> b) {
  return {Le32(b.data()), Le32(b.data() + 4), Le32(b.data() + 8),
          Le32(b.data() + 12)};
}

void DiskHeader::Encode(std::span<char> b) const {
  PutLe32(b.data(), magic);
  PutLe32(b.data() + 4, valid);
  PutLe32(b.data() + 8, version);
  PutLe32(b.data() + 12, chunk_sectors);
}

DiskRecord DiskRecord::Decode(const char* p) { return {Le64(p), Le64(p + 8)}; }

void DiskRecord::Encode(char* p) const {
  PutLe64(p, old_chunk);
  PutLe64(p + 8, new_chunk);
}

absl::Status ValidateChunkSectors(uint64_t cs) {
  if (cs == 0 || !std::has_single_bit(cs))
    return absl::InvalidArgumentError(absl::StrFormat(
        "chunk size %d sectors is not a power of two", cs));
  if (cs > kMaxChunkSectors)
    return absl::InvalidArgumentError(absl::StrFormat(
        "chunk size %d sectors is too large (at most %d sectors = 1 GiB)", cs,
        kMaxChunkSectors));
  return absl::OkStatus();
}

absl::StatusOr<uint64_t> ParseByteSize(std::string_view text) {
  std::string_view digits = text;
  uint64_t mult = 1;
  if (!digits.empty() && std::isalpha(static_cast<unsigned char>(digits.back()))) {
    switch (std::tolower(static_cast<unsigned char>(digits.back()))) {
      case 'b': mult = 1; break;
      case 'k': mult = 1ull << 10; break;
      case 'm': mult = 1ull << 20; break;
      case 'g': mult = 1ull << 30; break;
      case 't': mult = 1ull << 40; break;
      default:
        return absl::InvalidArgumentError(absl::StrFormat(
            "'%s' is not a size: use bytes with an optional k, M, G or T suffix",
            text));
    }
    digits.remove_suffix(1);
  }
  uint64_t n = 0;
  if (digits.empty() || !absl::SimpleAtoi(absl::string_view(digits.data(), digits.size()), &n) ||
      (n != 0 && mult > UINT64_MAX / n))
    return absl::InvalidArgumentError(absl::StrFormat(
        "'%s' is not a size: use bytes with an optional k, M, G or T suffix",
        text));
  return n * mult;
}

absl::StatusOr<uint32_t> ParseChunkSize(std::string_view text) {
  absl::StatusOr<uint64_t> bytes = ParseByteSize(text);
  if (!bytes.ok()) return bytes.status();
  if (*bytes % kSectorBytes != 0 || *bytes == 0)
    return absl::InvalidArgumentError(absl::StrFormat(
        "chunk size '%s' is not a multiple of 512 bytes", text));
  uint64_t sectors = *bytes / kSectorBytes;
  if (absl::Status st = ValidateChunkSectors(sectors); !st.ok()) return st;
  return static_cast<uint32_t>(sectors);
}

}  // namespace snap
