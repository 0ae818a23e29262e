// dm's status line for a snapshot, shared by every store type.
#pragma once

#include <string>

#include "store/exception_store.h"

namespace snap {

// Priority as in dm (snapshot_status): Invalid, Merge failed, Overflow,
// then "<used>/<total> <metadata>" in sectors.
std::string FormatStatusLine(bool valid, bool merge_failed, bool overflowed,
                             const StoreUsage& usage);

}  // namespace snap
