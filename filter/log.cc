#include "filter/log.h"

#include <atomic>
#include <cstdio>

namespace snap {
namespace {
void ToStderr(bool, const std::string& m) { std::fprintf(stderr, "%s\n", m.c_str()); }
std::atomic<LogSink> g_sink{&ToStderr};
}  // namespace

void SetLogSink(LogSink sink) { g_sink.store(sink); }
void LogMessage(const std::string& message) { g_sink.load()(false, message); }
void LogError(const std::string& message) { g_sink.load()(true, message); }

}  // namespace snap
