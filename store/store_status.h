// dm's status line for a snapshot, and the size limit behind its total,
// shared by every store type.
#pragma once

#include <cstdint>
#include <string>

#include "absl/status/statusor.h"
#include "store/block_file.h"
#include "store/exception_store.h"

namespace snap {

// Priority as in dm (snapshot_status): Invalid, Merge failed, Overflow,
// then "<used>/<total> <metadata>" in sectors.
std::string FormatStatusLine(bool valid, bool merge_failed, bool overflowed,
                             const StoreUsage& usage);

// No limit on a COW file's size: it grows as needed.
inline constexpr uint64_t kNoLimit = UINT64_MAX;

// The bytes a COW file may hold: the size cap (0: none) and, since a
// block device cannot grow, the device's size; the store is full at this
// limit, whichever sets it. kNoLimit for an uncapped regular file.
absl::StatusOr<uint64_t> CowLimit(BlockFile& file, uint64_t size_cap);

}  // namespace snap
