// nbdsnap -c SOCKET ...: the live commands, spoken to a running filter's
// control socket (snapshot-control=SOCKET).
#pragma once

#include <string>

namespace snap {

// argv holds what follows "-c SOCKET": COMMAND [ARGS...]. Exit codes:
// 0 done, 1 the server refused or the merge failed, 2 usage, 3 the
// server cannot be reached.
int RunOnline(const char* socket_path, int argc, char** argv);
// status, list, take, drop, merge: what RunOnline runs.
bool IsLiveCommand(const std::string& command);

}  // namespace snap
