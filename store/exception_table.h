// The in-memory map of completed exceptions: origin chunk -> COW data slot.
//
// Memory is what limits dm-snapshot on big stores, so the layout is tight:
//  - the origin chunk of every slot sits in a flat array indexed by slot
//    (4 bytes; the rare high halves of chunks >= 2^32 live in a side map);
//  - a lone exception is one 4-byte slot number in a hash set that hashes
//    and compares through that array (about 10 bytes with the set's slack);
//  - a run of consecutive chunks mapped to consecutive slots inside one
//    64-chunk group is folded into one entry keyed by the group (dm's
//    "consecutive count"), so sequential patterns cost ~4 bytes each.
// Lookups are O(1): one probe of the run map, one of the set.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/container/flat_hash_set.h"

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
  void Reserve(uint64_t n) { singles_.reserve(n); }
  void FitToSize();

  uint64_t size() const { return size_; }
  uint64_t runs() const { return runs_.size(); }
  // Heap bytes held, for the figures in store/README.md.
  uint64_t MemoryBytes() const;

 private:
  struct OldKey {
    uint64_t chunk;
  };
  struct SlotHash {
    using is_transparent = void;
    const ExceptionTable* table;
    size_t operator()(uint32_t slot) const;
    size_t operator()(OldKey k) const;
  };
  struct SlotEq {
    using is_transparent = void;
    const ExceptionTable* table;
    bool operator()(uint32_t a, uint32_t b) const { return a == b; }
    bool operator()(uint32_t a, OldKey b) const;
    bool operator()(OldKey a, uint32_t b) const { return (*this)(b, a); }
  };
  struct Run {
    uint32_t first_slot;
    uint8_t first_offset;  // within the group
    uint8_t length;
  };

  void SetOld(uint32_t slot, uint64_t old_chunk);
  uint64_t OldOf(uint32_t slot) const;
  void AddSingle(uint64_t old_chunk, uint32_t slot);

  static constexpr uint32_t kBlockBits = 16;
  std::vector<std::unique_ptr<uint32_t[]>> old_lo_;   // by slot, in blocks
  absl::flat_hash_map<uint32_t, uint32_t> old_hi_;    // slot -> high 32 bits
  absl::flat_hash_set<uint32_t, SlotHash, SlotEq> singles_;
  absl::flat_hash_map<uint64_t, Run> runs_;           // group -> its run
  uint64_t size_ = 0;
};

}  // namespace snap
