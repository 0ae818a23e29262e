// Where the engine's messages go: nbdkit's log in the filter, stderr in
// tests. Kept as a plain function pointer so the engine needs no nbdkit.
#pragma once

#include <string>

namespace snap {

using LogSink = void (*)(const std::string& message);
void SetLogSink(LogSink sink);
void LogMessage(const std::string& message);

}  // namespace snap
