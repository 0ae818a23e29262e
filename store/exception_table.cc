#include "store/exception_table.h"

#include <bit>

namespace snap {

namespace {
constexpr uint64_t kMinBuckets = 16;
}  // namespace

ExceptionTable::ExceptionTable() { Clear(); }

uint64_t ExceptionTable::BucketsFor(uint64_t singles) {
  uint64_t buckets = kMinBuckets;
  while (buckets * kMaxLoad < singles) buckets *= 2;
  return buckets;
}

size_t ExceptionTable::Bucket(uint64_t old_chunk) const {
  // Fibonacci hashing: the top bits of the product spread sequential and
  // strided chunk numbers alike.
  return (old_chunk * 0x9E3779B97F4A7C15ull) >> bucket_shift_;
}

void ExceptionTable::SetOld(uint32_t slot, uint64_t old_chunk) {
  while ((slot >> kBlockBits) >= old_lo_.size())
    old_lo_.push_back(std::make_unique<uint32_t[]>(size_t{1} << kBlockBits));
  OldLo(slot) = static_cast<uint32_t>(old_chunk);
  if (uint32_t hi = static_cast<uint32_t>(old_chunk >> 32); hi != 0)
    old_hi_[slot] = hi;
  else if (!old_hi_.empty())
    old_hi_.erase(slot);
}

uint64_t ExceptionTable::OldOf(uint32_t slot) const {
  uint64_t lo = OldLo(slot);
  if (old_hi_.empty()) return lo;
  auto it = old_hi_.find(slot);
  return it == old_hi_.end() ? lo : (uint64_t{it->second} << 32) | lo;
}

uint32_t ExceptionTable::FindSingle(uint64_t old_chunk) const {
  uint32_t slot = heads_[Bucket(old_chunk)];
  while (slot != kNone && OldOf(slot) != old_chunk) slot = Next(slot);
  return slot;
}

void ExceptionTable::LinkSingle(uint64_t old_chunk, uint32_t slot) {
  if (singles_ + 1 > heads_.size() * kMaxLoad) Rehash(heads_.size() * 2);
  const size_t block = slot >> kLinkBits;
  if (next_.size() <= block) {
    next_.resize(block + 1);
    next_used_.resize(block + 1);
  }
  if (next_used_[block]++ == 0)
    next_[block] = std::make_unique_for_overwrite<uint32_t[]>(size_t{1} << kLinkBits);
  uint32_t& head = heads_[Bucket(old_chunk)];
  Next(slot) = head;
  head = slot;
  ++singles_;
}

uint32_t ExceptionTable::UnlinkSingle(uint64_t old_chunk, uint32_t only) {
  for (uint32_t* link = &heads_[Bucket(old_chunk)]; *link != kNone; link = &Next(*link)) {
    const uint32_t slot = *link;
    if (OldOf(slot) != old_chunk) continue;
    if (only != kNone && slot != only) return kNone;
    *link = Next(slot);
    --singles_;
    if (--next_used_[slot >> kLinkBits] == 0) next_[slot >> kLinkBits].reset();
    return slot;
  }
  return kNone;
}

void ExceptionTable::Rehash(uint64_t buckets) {
  std::vector<uint32_t> old_heads(buckets, kNone);
  old_heads.swap(heads_);
  bucket_shift_ = 64 - std::countr_zero(buckets);
  for (uint32_t slot : old_heads) {
    while (slot != kNone) {
      uint32_t next = Next(slot);
      uint32_t& head = heads_[Bucket(OldOf(slot))];
      Next(slot) = head;
      head = slot;
      slot = next;
    }
  }
}

void ExceptionTable::Reserve(uint64_t n) {
  if (uint64_t want = BucketsFor(n); want > heads_.size()) Rehash(want);
}

void ExceptionTable::FitToSize() {
  // The bucket count inserting one by one would have reached: more than
  // that is room that runs left unused.
  if (uint64_t want = BucketsFor(singles_); want < heads_.size()) Rehash(want);
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
             OldOf(slot - 1) == old_chunk - 1 &&
             UnlinkSingle(old_chunk - 1, slot - 1) != kNone) {
    // The previous chunk is a lone exception in the previous slot: the two
    // start a run. The chunk array rules out most random inserts without
    // walking a chain (a cache miss per exception when a big store loads).
    SetOld(slot, old_chunk);
    runs_[group] = Run{slot - 1, static_cast<uint8_t>(off - 1), 2};
    return;
  }
  SetOld(slot, old_chunk);
  LinkSingle(old_chunk, slot);
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
  uint32_t slot = FindSingle(old_chunk);
  if (slot == kNone) return std::nullopt;
  return slot;
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
  const uint32_t slot = UnlinkSingle(old_chunk);
  if (slot == kNone) return false;
  old_hi_.erase(slot);
  --size_;
  return true;
}

void ExceptionTable::Clear() {
  old_lo_.clear();
  next_.clear();
  next_used_.clear();
  old_hi_.clear();
  heads_.assign(kMinBuckets, kNone);
  heads_.shrink_to_fit();
  bucket_shift_ = 64 - std::countr_zero(kMinBuckets);
  singles_ = 0;
  runs_.clear();
  size_ = 0;
}

uint64_t ExceptionTable::MemoryBytes() const {
  uint64_t bytes = old_lo_.size() * (sizeof(uint32_t) << kBlockBits) +
                   old_lo_.capacity() * sizeof(old_lo_[0]);
  for (const auto& block : next_)
    if (block) bytes += sizeof(uint32_t) << kLinkBits;
  bytes += next_.capacity() * sizeof(next_[0]) + next_used_.capacity() * sizeof(uint16_t);
  bytes += heads_.capacity() * sizeof(uint32_t);
  bytes += runs_.capacity() * (sizeof(std::pair<uint64_t, Run>) + 1);
  bytes += old_hi_.capacity() * (sizeof(std::pair<uint32_t, uint32_t>) + 1);
  return bytes;
}

}  // namespace snap
