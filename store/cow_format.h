// The kernel's persistent exception store format (dm-snap-persistent.c):
// chunk 0 holds the header, metadata areas of chunk_bytes/16 records are
// interleaved with their data chunks. Everything on disk is little-endian.
#pragma once

#include <cstdint>
#include <optional>
#include <span>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace snap {

inline constexpr uint32_t kSnapMagic = 0x70416e53;  // "SnAp" on disk
inline constexpr uint32_t kDiskVersion = 1;
inline constexpr uint32_t kSectorBytes = 512;
inline constexpr uint32_t kHeaderBytes = 16;
inline constexpr uint32_t kRecordBytes = 16;
// dm's limits: a power of two, at most INT_MAX >> 9 sectors (1 GiB).
inline constexpr uint32_t kMaxChunkSectors = 1u << 21;
// 64 KiB, chosen from bench/RESULTS.md: against 4 KiB chunks it keeps
// flushes of small writes near passthrough (one sync instead of two per
// new chunk) and sequential writes faster, at some cost to the first
// random 4 KiB write. (LVM's default is 4 KiB, the kernel's 16 KiB.)
inline constexpr uint32_t kDefaultChunkSectors = 128;

struct DiskHeader {
  uint32_t magic = 0;
  uint32_t valid = 0;
  uint32_t version = 0;
  uint32_t chunk_sectors = 0;

  static DiskHeader Decode(std::span<const char> bytes);  // >= 16 bytes
  void Encode(std::span<char> bytes) const;                // >= 16 bytes
};

struct DiskRecord {
  uint64_t old_chunk = 0;  // chunk on the origin
  uint64_t new_chunk = 0;  // chunk in the COW file; 0 ends the list

  static DiskRecord Decode(const char* p);
  void Encode(char* p) const;
};

// OK when chunk_sectors is a legal dm chunk size; else says why not.
absl::Status ValidateChunkSectors(uint64_t chunk_sectors);
// Parses "4096", "4k", "64K", "1M", "1G" (bytes) into sectors, validated.
absl::StatusOr<uint32_t> ParseChunkSize(std::string_view text);
// Parses a byte size with optional k/M/G/T suffix (powers of 1024).
absl::StatusOr<uint64_t> ParseByteSize(std::string_view text);

// Where things live in a persistent COW of a given chunk size. A "slot" is
// the index of a data chunk counting only data chunks (slot 0 is chunk 2):
// the bijection lets the exception table hold 32-bit slots, not 64-bit
// chunk numbers.
class Geometry {
 public:
  explicit Geometry(uint32_t chunk_sectors)
      : chunk_sectors_(chunk_sectors),
        chunk_bytes_(uint64_t{chunk_sectors} * kSectorBytes),
        epa_(chunk_bytes_ / kRecordBytes) {}

  uint32_t chunk_sectors() const { return chunk_sectors_; }
  uint64_t chunk_bytes() const { return chunk_bytes_; }
  uint64_t exceptions_per_area() const { return epa_; }

  uint64_t AreaChunk(uint64_t area) const { return 1 + area * (epa_ + 1); }
  bool IsMetadataChunk(uint64_t chunk) const {
    return chunk == 0 || (chunk - 1) % (epa_ + 1) == 0;
  }
  uint64_t SlotToChunk(uint64_t slot) const { return 2 + slot + slot / epa_; }
  // nullopt for the header and area chunks.
  std::optional<uint64_t> ChunkToSlot(uint64_t chunk) const {
    if (IsMetadataChunk(chunk)) return std::nullopt;
    return (chunk - 2) - (chunk - 2) / (epa_ + 1);
  }
  // The area whose data region holds this slot in allocation order.
  uint64_t AreaOfSlot(uint64_t slot) const { return slot / epa_; }

 private:
  uint32_t chunk_sectors_;
  uint64_t chunk_bytes_;
  uint64_t epa_;
};

}  // namespace snap
