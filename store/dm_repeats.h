// Which record dm-snapshot uses for an origin chunk that several records
// of a COW file name (COW files from old kernels, or damaged ones).
//
// The kernel loads records, in their on-disk order, into hash buckets of
// 256 origin chunks, each kept in origin-chunk order, and folds a record
// that continues an entry's run (its origin and COW chunks both one past
// the run's end, or both one before its start) into that entry. A lookup
// takes the bucket's first entry that covers the chunk. So a repeated
// chunk is usually served by its earliest record, but by a later one when
// that was folded into a run ahead of the earliest.
#pragma once

#include <cstdint>
#include <span>

#include "absl/container/flat_hash_map.h"
#include "store/cow_format.h"

namespace snap {

// records: as on disk, in order. For every origin chunk named more than
// once, the COW chunk the kernel reads it from.
absl::flat_hash_map<uint64_t, uint64_t> DmRepeatedChunkTargets(
    std::span<const DiskRecord> records);

}  // namespace snap
