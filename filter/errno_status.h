// Statuses that carry the errno nbdkit should send, both ways.
#pragma once

#include "absl/strings/string_view.h"

#include "absl/status/status.h"

namespace snap {

// A status whose errno survives the trip through the engine. Unlike
// absl::ErrnoToStatus it keeps MESSAGE as given: callers rewrap messages
// that already name the OS error, which would then name it twice.
absl::Status ErrnoError(int err, absl::string_view message);
// The errno for nbdkit: the one attached, else one that fits the code.
int StatusToErrno(const absl::Status& status);

}  // namespace snap
