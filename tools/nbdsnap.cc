// nbdsnap: create and inspect dm-snapshot COW files offline, and (with -c)
// drive a running filter through its control socket.
#include <cstdio>
#include <cstring>
#include <string>

#include "absl/strings/str_format.h"
#include "store/cow_format.h"
#include "tools/cli.h"
#include "tools/offline.h"
#include "tools/online.h"

namespace {

using snap::cli::kOk;
using snap::cli::UsageError;

void PrintHelp() {
  std::printf(
      "Usage:\n"
      "  nbdsnap COMMAND [OPTIONS] FILE\n"
      "  nbdsnap -c SOCKET LIVE-COMMAND [ARGS]\n"
      "\n"
      "Commands, on a dm-snapshot persistent COW file:\n"
      "  create [--chunk-size SIZE] [--store P|PO|N] [--force] FILE\n"
      "                        make a new, empty store (default chunk %d KiB)\n"
      "  info [--json] FILE    header, chunk size, exceptions, dm status\n"
      "  check FILE            verify the store: exit 0 clean, 1 damaged\n"
      "  dump FILE             one line per exception\n"
      "  help [COMMAND]        this help, or a command's (nbdsnap COMMAND --help)\n"
      "\n"
      "Live commands, to nbdkit running with snapshot-control=SOCKET:\n"
      "  status [--json]       every snapshot's status, merge progress\n"
      "  list                  one line per snapshot\n"
      "  take NAME FILE [--chunk-size SIZE] [--store P|PO|N]\n"
      "                        a new snapshot of the running origin\n"
      "  drop NAME             remove a snapshot (its file is kept)\n"
      "  merge NAME [--wait]   merge a snapshot into the origin\n"
      "\n"
      "Exit status: 0 success, 1 failure (for check: a damaged store), 2 usage\n"
      "error, 3 the control socket cannot be reached. See nbdsnap(1).\n",
      snap::kDefaultChunkSectors * snap::kSectorBytes / 1024);
}

int RunCommand(const std::string& cmd, int argc, char** argv) {
  if (cmd == "create") return snap::offline::Create(argc, argv);
  if (cmd == "info") return snap::offline::Info(argc, argv);
  if (cmd == "check") return snap::offline::Check(argc, argv);
  if (cmd == "dump") return snap::offline::Dump(argc, argv);
  if (snap::IsLiveCommand(cmd))
    return UsageError(absl::StrFormat("'%s' is a live command: nbdsnap -c SOCKET %s",
                                      cmd, cmd));
  return UsageError(absl::StrFormat("unknown command '%s'", cmd));
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2) return UsageError("no command given");
  const std::string cmd = argv[1];
  // -c SOCKET, -cSOCKET, --control SOCKET or --control=SOCKET; first.
  const char* socket = nullptr;
  int command_at = 2;
  if (cmd == "-c" || cmd == "--control") {
    socket = argc > 2 ? argv[2] : "";
    command_at = 3;
  } else if (cmd.starts_with("--control=")) {
    socket = argv[1] + std::strlen("--control=");
  } else if (cmd.starts_with("-c")) {
    socket = argv[1] + 2;
  }
  if (socket != nullptr) {
    if (*socket == '\0') return UsageError("-c needs a SOCKET and a live command");
    if (argc <= command_at) return UsageError("-c SOCKET needs a live command");
    return snap::RunOnline(socket, argc - command_at, argv + command_at);
  }
  if (cmd == "--help" || cmd == "-h" || cmd == "help") {
    if (cmd == "help" && argc == 3) {
      // nbdsnap help COMMAND = nbdsnap COMMAND --help, or for a live
      // command nbdsnap -c SOCKET COMMAND --help (as the man page shows it)
      const std::string of = argv[2];
      char help_flag[] = "--help";
      char* sub[] = {argv[2], help_flag, nullptr};
      if (snap::IsLiveCommand(of)) return snap::RunOnline("SOCKET", 2, sub);
      if (of != "help") return RunCommand(of, 2, sub);
    }
    if (argc > 2 && cmd != "help") return UsageError("--help takes no arguments");
    if (argc > 3) return UsageError("help takes at most one COMMAND");
    PrintHelp();
    return kOk;
  }
  // Each command parses its own options, from its name on.
  return RunCommand(cmd, argc - 1, argv + 1);
}
