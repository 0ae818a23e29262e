#include "store/dm_repeats.h"

#include <vector>

#include "absl/container/flat_hash_set.h"

namespace snap {
namespace {

constexpr int kBucketShift = 8;  // dm's DM_CHUNK_CONSECUTIVE_BITS

struct Entry {
  uint64_t old_chunk;
  uint64_t new_chunk;
  uint64_t more;  // chunks in the run after the first
};

// dm_insert_exception, for a table that folds runs.
void Insert(std::vector<Entry>& bucket, uint64_t old_chunk, uint64_t new_chunk) {
  size_t i = 0;
  for (; i < bucket.size(); ++i) {
    Entry& e = bucket[i];
    if (old_chunk == e.old_chunk + e.more + 1 && new_chunk == e.new_chunk + e.more + 1) {
      ++e.more;
      return;
    }
    if (old_chunk + 1 == e.old_chunk && new_chunk + 1 == e.new_chunk) {
      ++e.more;
      --e.old_chunk;
      --e.new_chunk;
      return;
    }
    if (old_chunk < e.old_chunk) break;
  }
  bucket.insert(bucket.begin() + static_cast<std::ptrdiff_t>(i),
                Entry{old_chunk, new_chunk, 0});
}

}  // namespace

absl::flat_hash_map<uint64_t, uint64_t> DmRepeatedChunkTargets(
    std::span<const DiskRecord> records) {
  absl::flat_hash_set<uint64_t> seen, repeated;
  for (const DiskRecord& r : records)
    if (!seen.insert(r.old_chunk).second) repeated.insert(r.old_chunk);
  absl::flat_hash_map<uint64_t, uint64_t> targets;
  if (repeated.empty()) return targets;
  // Only the buckets that hold a repeated chunk matter: runs never leave
  // their bucket.
  absl::flat_hash_map<uint64_t, std::vector<Entry>> buckets;
  for (uint64_t c : repeated) buckets[c >> kBucketShift];
  for (const DiskRecord& r : records)
    if (auto it = buckets.find(r.old_chunk >> kBucketShift); it != buckets.end())
      Insert(it->second, r.old_chunk, r.new_chunk);
  for (uint64_t c : repeated)
    for (const Entry& e : buckets[c >> kBucketShift])
      if (c >= e.old_chunk && c - e.old_chunk <= e.more) {
        targets[c] = e.new_chunk + (c - e.old_chunk);
        break;
      }
  return targets;
}

}  // namespace snap
