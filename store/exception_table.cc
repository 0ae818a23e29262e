#include "store/exception_table.h"

#include "absl/hash/hash.h"

namespace snap {

ExceptionTable::ExceptionTable()
    : singles_(0, SlotHash{this}, SlotEq{this}) {}

size_t ExceptionTable::SlotHash::operator()(uint32_t slot) const {
  return absl::Hash<uint64_t>{}(table->OldOf(slot));
}
size_t ExceptionTable::SlotHash::operator()(OldKey k) const {
  return absl::Hash<uint64_t>{}(k.chunk);
}
bool ExceptionTable::SlotEq::operator()(uint32_t a, OldKey b) const {
  return table->OldOf(a) == b.chunk;
}

void ExceptionTable::SetOld(uint32_t slot, uint64_t old_chunk) {
  size_t block = slot >> kBlockBits;
  while (old_lo_.size() <= block)
    old_lo_.push_back(std::make_unique<uint32_t[]>(size_t{1} << kBlockBits));
  old_lo_[block][slot & ((1u << kBlockBits) - 1)] =
      static_cast<uint32_t>(old_chunk);
  if (uint32_t hi = static_cast<uint32_t>(old_chunk >> 32); hi != 0)
    old_hi_[slot] = hi;
  else
    old_hi_.erase(slot);
}

uint64_t ExceptionTable::OldOf(uint32_t slot) const {
  uint64_t lo = old_lo_[slot >> kBlockBits][slot & ((1u << kBlockBits) - 1)];
  if (old_hi_.empty()) return lo;
  auto it = old_hi_.find(slot);
  return it == old_hi_.end() ? lo : (uint64_t{it->second} << 32) | lo;
}

void ExceptionTable::AddSingle(uint64_t old_chunk, uint32_t slot) {
  SetOld(slot, old_chunk);
  singles_.insert(slot);
}

void ExceptionTable::Insert(uint64_t old_chunk, uint32_t slot) {
  ++size_;
  const uint64_t group = old_chunk >> kGroupBits;
  const uint32_t off = old_chunk & ((1u << kGroupBits) - 1);
  if (auto it = runs_.find(group); it != runs_.end()) {
    Run& r = it->second;
    if (off == uint32_t{r.first_offset} + r.length &&
        slot == r.first_slot + r.length) {
      SetOld(slot, old_chunk);
      ++r.length;
      return;
    }
  } else if (off > 0 && slot > 0 && ((slot - 1) >> kBlockBits) < old_lo_.size() &&
             OldOf(slot - 1) == old_chunk - 1) {
    // The previous chunk, mapped to the previous slot, starts a run. The
    // slot array rules out most random inserts without probing the set
    // (a cache miss per exception when a big store loads); the set then
    // confirms that slot is still a lone exception.
    auto prev = singles_.find(OldKey{old_chunk - 1});
    if (prev != singles_.end() && *prev + 1 == slot) {
      singles_.erase(prev);
      SetOld(slot, old_chunk);
      runs_[group] = Run{slot - 1, static_cast<uint8_t>(off - 1), 2};
      return;
    }
  }
  AddSingle(old_chunk, slot);
}

std::optional<uint32_t> ExceptionTable::Lookup(uint64_t old_chunk) const {
  if (!runs_.empty()) {
    auto it = runs_.find(old_chunk >> kGroupBits);
    if (it != runs_.end()) {
      const Run& r = it->second;
      uint32_t off = old_chunk & ((1u << kGroupBits) - 1);
      if (off >= r.first_offset && off < uint32_t{r.first_offset} + r.length)
        return r.first_slot + (off - r.first_offset);
    }
  }
  auto it = singles_.find(OldKey{old_chunk});
  if (it == singles_.end()) return std::nullopt;
  return *it;
}

bool ExceptionTable::Erase(uint64_t old_chunk) {
  const uint64_t group = old_chunk >> kGroupBits;
  const uint32_t off = old_chunk & ((1u << kGroupBits) - 1);
  if (auto it = runs_.find(group); it != runs_.end()) {
    Run r = it->second;
    if (off >= r.first_offset && off < uint32_t{r.first_offset} + r.length) {
      --size_;
      runs_.erase(it);
      // Whatever is left of the run goes back in as lone exceptions, and
      // folds again where it can (the common case, merging from the end,
      // keeps the run whole).
      const uint64_t base = (group << kGroupBits) + r.first_offset;
      for (uint32_t i = 0; i < r.length; ++i) {
        if (r.first_offset + i == off) continue;
        --size_;
        Insert(base + i, r.first_slot + i);
      }
      return true;
    }
  }
  auto it = singles_.find(OldKey{old_chunk});
  if (it == singles_.end()) return false;
  uint32_t slot = *it;
  singles_.erase(it);
  old_hi_.erase(slot);
  --size_;
  return true;
}

void ExceptionTable::FitToSize() {
  // The capacity inserting one by one would have reached (2^k - 1, at
  // most 7/8 full): more than that is room runs left unused. Shrinking is
  // a full rehash, so it is done only then.
  uint64_t want = 1;
  while (want - want / 8 < singles_.size()) want = want * 2 + 1;
  if (singles_.capacity() > want) singles_.rehash(0);
}

void ExceptionTable::Clear() {
  singles_.clear();
  runs_.clear();
  old_lo_.clear();
  old_hi_.clear();
  size_ = 0;
}

uint64_t ExceptionTable::MemoryBytes() const {
  uint64_t bytes = old_lo_.size() * (sizeof(uint32_t) << kBlockBits) +
                   old_lo_.capacity() * sizeof(old_lo_[0]);
  bytes += singles_.capacity() * (sizeof(uint32_t) + 1);
  bytes += runs_.capacity() * (sizeof(std::pair<uint64_t, Run>) + 1);
  bytes += old_hi_.capacity() * (sizeof(std::pair<uint32_t, uint32_t>) + 1);
  return bytes;
}

}  // namespace snap
