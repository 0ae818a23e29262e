// The in-memory map of completed exceptions: origin chunk -> COW data slot.
//
// Memory is what limits dm-snapshot on big stores, so the layout is tight:
//  - the origin chunk of every slot sits in a flat array indexed by slot
//    (4 bytes; the rare high halves of chunks >= 2^32 live in a side map);
//  - lone exceptions are chained from a power-of-two array of 4-byte
//    bucket heads, one bucket per one or two exceptions, through a second
//    array indexed by slot (4 bytes, in blocks kept only where lone
//    exceptions are); dm's own table is chained the same way, at 32 bytes
//    and more an exception;
//  - a run of consecutive chunks mapped to consecutive slots inside one
//    64-chunk group is folded into one entry keyed by the group (dm's
//    "consecutive count"), so sequential patterns cost ~4.5 bytes each.
// So a random exception costs 10 to 12 bytes. Lookups are O(1): one probe
// of the run map, then a chain of one or two slots on average.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <vector>

#include "absl/container/flat_hash_map.h"

namespace snap {

class ExceptionTable {
 public:
  static constexpr uint32_t kGroupBits = 6;  // 64 chunks per run group
  static constexpr uint64_t kMaxSlots = UINT32_MAX;

  ExceptionTable();
  ExceptionTable(const ExceptionTable&) = delete;
  ExceptionTable& operator=(const ExceptionTable&) = delete;

  // Adds old_chunk -> slot. The caller makes sure old_chunk is absent.
  void Insert(uint64_t old_chunk, uint32_t slot);
  std::optional<uint32_t> Lookup(uint64_t old_chunk) const;
  // Removes old_chunk; true if it was there.
  bool Erase(uint64_t old_chunk);
  void Clear();
  // Room for n lone exceptions, so that loading a big store inserts
  // without rehashing; FitToSize gives back what loading did not use.
  void Reserve(uint64_t n);
  void FitToSize();

  uint64_t size() const { return size_; }
  uint64_t runs() const { return runs_.size(); }
  // Heap bytes held, for the tests' and benchmarks' figures.
  uint64_t MemoryBytes() const;

 private:
  static constexpr uint32_t kNone = UINT32_MAX;  // end of a chain
  static constexpr uint32_t kBlockBits = 16;     // 2^16 slots per chunk-array block
  static constexpr uint64_t kMaxLoad = 2;        // lone exceptions per bucket

  struct Run {
    uint32_t first_slot;
    uint8_t first_offset;  // within the group
    uint8_t length;
  };
  using Blocks = std::vector<std::unique_ptr<uint32_t[]>>;  // by slot

  uint32_t& OldLo(uint32_t slot) const {
    return old_lo_[slot >> kBlockBits][slot & ((1u << kBlockBits) - 1)];
  }
  // Chain links come in small blocks that live only while they hold a
  // lone exception: a run's first slot is lone only until the run grows.
  static constexpr uint32_t kLinkBits = 10;
  uint32_t& Next(uint32_t slot) const {
    return next_[slot >> kLinkBits][slot & ((1u << kLinkBits) - 1)];
  }
  void SetOld(uint32_t slot, uint64_t old_chunk);
  uint64_t OldOf(uint32_t slot) const;
  size_t Bucket(uint64_t old_chunk) const;
  uint32_t FindSingle(uint64_t old_chunk) const;  // its slot, or kNone
  void LinkSingle(uint64_t old_chunk, uint32_t slot);
  // Unlinks old_chunk's lone exception (only if it is in slot only, when
  // given); its slot, or kNone.
  uint32_t UnlinkSingle(uint64_t old_chunk, uint32_t only = kNone);
  void Rehash(uint64_t buckets);
  static uint64_t BucketsFor(uint64_t singles);

  Blocks old_lo_;                                    // low 32 bits of each slot's chunk
  Blocks next_;                                      // each lone slot's chain link
  std::vector<uint16_t> next_used_;                  // lone slots per link block
  absl::flat_hash_map<uint32_t, uint32_t> old_hi_;   // slot -> high 32 bits
  std::vector<uint32_t> heads_;                      // bucket -> first slot
  uint32_t bucket_shift_ = 60;                       // 64 - log2(buckets)
  uint64_t singles_ = 0;
  absl::flat_hash_map<uint64_t, Run> runs_;          // group -> its run
  uint64_t size_ = 0;
};

}  // namespace snap
