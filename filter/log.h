// Where the engine's messages go: nbdkit's log in the filter, stderr in
// tests. Kept as a plain function pointer so the engine needs no nbdkit.
#pragma once

#include <string>

namespace snap {

// error: something the user must hear about (nbdkit_error), not only with
// -v (nbdkit_debug).
using LogSink = void (*)(bool error, const std::string& message);
void SetLogSink(LogSink sink);
void LogMessage(const std::string& message);
void LogError(const std::string& message);

}  // namespace snap
