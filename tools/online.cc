#include "tools/online.h"

#include <glib.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <optional>
#include <string>
#include <vector>

#include "absl/strings/escaping.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "store/cow_format.h"
#include "store/exception_store.h"
#include "tools/cli.h"
#include "tools/json.h"

namespace snap {
namespace {

using cli::kOk;
using cli::kUnreachable;
constexpr int kRefused = cli::kFail;

struct Reply {
  std::vector<std::string> lines;  // data lines
  bool ok = false;
  std::string error;  // after "ERR "
};

class Connection {
 public:
  ~Connection() {
    if (fd_ >= 0) ::close(fd_);
  }
  bool Open(const char* path) {
    struct sockaddr_un addr = {};
    addr.sun_family = AF_UNIX;
    if (std::strlen(path) >= sizeof addr.sun_path) {
      error_ = "socket path too long";
      return false;
    }
    std::strcpy(addr.sun_path, path);
    fd_ = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd_ < 0 || ::connect(fd_, reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0) {
      error_ = std::strerror(errno);
      return false;
    }
    return true;
  }
  const std::string& error() const { return error_; }

  // Sends one command and reads its reply; false if the connection broke.
  bool Call(const std::string& command, Reply* reply) {
    std::string line = command + "\n";
    for (size_t done = 0; done < line.size();) {
      ssize_t n = ::send(fd_, line.data() + done, line.size() - done, MSG_NOSIGNAL);
      if (n <= 0) {
        error_ = std::strerror(errno);
        return false;
      }
      done += static_cast<size_t>(n);
    }
    *reply = Reply{};
    for (;;) {
      size_t nl = buf_.find('\n');
      if (nl == std::string::npos) {
        char tmp[4096];
        ssize_t n = ::recv(fd_, tmp, sizeof tmp, 0);
        if (n <= 0) {
          error_ = n == 0 ? "the server closed the connection" : std::strerror(errno);
          return false;
        }
        buf_.append(tmp, static_cast<size_t>(n));
        continue;
      }
      std::string l = buf_.substr(0, nl);
      buf_.erase(0, nl + 1);
      if (l == "OK") {
        reply->ok = true;
        return true;
      }
      // The server's error line is "ERR " and why (control_commands.cc
      // Err). Data lines start with a snapshot name, which may be ERRATA.
      if (l == "ERR" || l.rfind("ERR ", 0) == 0) {
        reply->error = l.size() > 4 ? l.substr(4) : "error";
        return true;
      }
      reply->lines.push_back(l);
    }
  }

 private:
  int fd_ = -1;
  std::string buf_;
  std::string error_;
};

// The merge of NAME in status's "origin: SIZE bytes; STATE" line, where
// STATE is the server's (merge_runner.cc Describe): "merging NAME, 42%"
// -> 42, "merged NAME" -> *merged, "merge of NAME failed: WHY" ->
// *failed. Only NAME's merge counts: a snapshot may be called
// failed-upgrade. -1 if NAME is not merging.
int MergePercent(const Reply& r, const std::string& name, bool* merged,
                 bool* failed) {
  *merged = *failed = false;
  for (const std::string& l : r.lines) {
    if (l.rfind("origin: ", 0) != 0) continue;
    size_t semi = l.find("; ");
    if (semi == std::string::npos) return -1;
    const std::string state = l.substr(semi + 2);
    *merged = state == "merged " + name;
    *failed = state.rfind("merge of " + name + " failed:", 0) == 0;
    const std::string running = "merging " + name + ", ";
    if (state.rfind(running, 0) != 0) return -1;
    return std::atoi(state.c_str() + running.size());
  }
  return -1;
}

struct LiveCommand {
  const char* name;
  const char* params;
  const char* summary;
};

constexpr LiveCommand kLiveCommands[] = {
    {"status", "", "The origin (with a merge's progress) and each snapshot's dm status."},
    {"list", "", "One line per snapshot: name, file, store type, chunk size, status."},
    {"take", "NAME FILE", "A new snapshot NAME of the running origin, in FILE (new or empty)."},
    {"drop", "NAME", "Remove snapshot NAME; its file is kept."},
    {"merge", "NAME", "Start merging snapshot NAME into the origin."},
};

const LiveCommand* FindLiveCommand(const std::string& name) {
  for (const LiveCommand& c : kLiveCommands)
    if (name == c.name) return &c;
  return nullptr;
}

}  // namespace

bool IsLiveCommand(const std::string& command) {
  return FindLiveCommand(command) != nullptr;
}

int RunOnline(const char* socket_path, int argc, char** argv) {
  if (argc < 1) return cli::UsageError("-c SOCKET needs a live command");
  const std::string cmd = argv[0];
  const LiveCommand* spec = FindLiveCommand(cmd);
  if (spec == nullptr)
    return cli::UsageError(absl::StrFormat("unknown live command '%s'", cmd));
  cli::CommandLine cl(absl::StrFormat("-c %s %s", socket_path, cmd), spec->params,
                      spec->summary);
  if (cmd == "status") cl.AddFlag("json", "Print one JSON object");
  if (cmd == "take") {
    cl.AddString("chunk-size", "SIZE", "Chunk size (default: nbdkit's snapshot-chunk-size)");
    cl.AddString("store", "TYPE", "P, PO or N (default: nbdkit's snapshot-store)");
  }
  if (cmd == "merge") cl.AddFlag("wait", "Wait for the end, showing progress");
  if (std::optional<int> rc = cl.Parse(argc, argv)) return *rc;
  const bool json = cl.flag("json"), wait = cl.flag("wait");
  const std::vector<std::string>& args = cl.args();
  // The protocol is one line of words: a space would split an argument, a
  // newline would start another command.
  for (const std::string& a : args)
    for (unsigned char c : a)
      if (c <= ' ' || c == 0x7f)
        return cl.UsageError(absl::StrFormat(
            "'%s' contains a space or a control character, which the control "
            "socket cannot carry: rename it",
            absl::CHexEscape(a)));
  std::string line;
  if (cmd == "status" || cmd == "list") {
    if (!args.empty()) return cl.UsageError(cmd + " takes no arguments");
    line = cmd;
  } else if (cmd == "take") {
    if (args.size() != 2) return cl.UsageError("take needs NAME FILE");
    const std::optional<std::string> chunk = cl.string("chunk-size");
    const std::optional<std::string> store = cl.string("store");
    // The server resolves nothing against our working directory.
    std::error_code ec;
    std::filesystem::path file = std::filesystem::absolute(args[1], ec);
    if (ec)
      return cl.UsageError(absl::StrFormat("cannot make %s absolute: %s", args[1],
                                           ec.message()));
    line = absl::StrCat("take ", args[0], " ", file.lexically_normal().string());
    // Read as create reads them, and sent as read: the server gets one
    // word it accepts, never the text as typed.
    if (chunk) {
      absl::StatusOr<uint32_t> cs = ParseChunkSize(*chunk);
      if (!cs.ok()) return cl.UsageError(std::string(cs.status().message()));
      absl::StrAppend(&line, " ", uint64_t{*cs} * kSectorBytes);
    }
    if (store) {
      absl::StatusOr<StoreType> type = ParseStoreType(*store);
      if (!type.ok()) return cl.UsageError(std::string(type.status().message()));
      absl::StrAppend(&line, " ", std::string(StoreTypeName(*type)));
    }
  } else {
    if (args.size() != 1) return cl.UsageError(cmd + " needs NAME");
    line = absl::StrCat(cmd, " ", args[0]);
  }

  Connection conn;
  if (!conn.Open(socket_path)) {
    std::fprintf(stderr,
                 "nbdsnap: cannot reach %s: %s (is nbdkit running with "
                 "snapshot-control=%s?)\n",
                 socket_path, conn.error().c_str(), socket_path);
    return kUnreachable;
  }
  Reply r;
  if (!conn.Call(line, &r)) {
    std::fprintf(stderr, "nbdsnap: %s: %s\n", socket_path, conn.error().c_str());
    return kUnreachable;
  }
  if (!r.ok) {
    std::fprintf(stderr, "nbdsnap: %s\n", r.error.c_str());
    return kRefused;
  }
  if (cmd == "status" && json) {
    std::string out = "{";
    std::vector<std::string> snaps;
    for (const std::string& l : r.lines) {
      size_t colon = l.find(": ");
      if (colon == std::string::npos) continue;
      std::string name = l.substr(0, colon), rest = l.substr(colon + 2);
      if (name == "origin") {
        absl::StrAppend(&out, "\"origin\": ", JsonString(rest), ", ");
        continue;
      }
      bool merging = false;
      if (const std::string tag = " (merging)";
          rest.size() > tag.size() && rest.ends_with(tag)) {
        merging = true;
        rest.resize(rest.size() - tag.size());
      }
      snaps.push_back(absl::StrFormat("{\"name\": %s, \"status\": %s, \"merging\": %s}",
                                      JsonString(name), JsonString(rest),
                                      merging ? "true" : "false"));
    }
    absl::StrAppend(&out, "\"snapshots\": [", absl::StrJoin(snaps, ", "), "]}");
    std::printf("%s\n", out.c_str());
    return kOk;
  }
  for (const std::string& l : r.lines) std::printf("%s\n", l.c_str());
  if (cmd != "merge" || !wait) return kOk;

  // merge --wait: a bar on a terminal, a line per change otherwise.
  const bool tty = isatty(STDOUT_FILENO);
  int last = -2;
  for (;;) {
    Reply st;
    if (!conn.Call("status", &st) || !st.ok) {
      std::fprintf(stderr, "nbdsnap: lost the server while waiting\n");
      return kUnreachable;
    }
    bool merged, failed;
    int pct = MergePercent(st, args[0], &merged, &failed);
    if (failed) {
      if (tty) std::printf("\n");
      for (const std::string& l : st.lines)
        if (l.rfind("origin:", 0) == 0) std::fprintf(stderr, "nbdsnap: %s\n", l.c_str());
      return kRefused;
    }
    if (merged || pct < 0) {
      if (tty) std::printf("\r[%s] 100%%\n", std::string(40, '#').c_str());
      else std::printf("merge complete\n");
      return kOk;
    }
    if (pct != last) {
      if (tty) {
        int fill = pct * 40 / 100;
        std::printf("\r[%s%s] %3d%%", std::string(fill, '#').c_str(),
                    std::string(40 - fill, '.').c_str(), pct);
      } else {
        std::printf("merging: %d%%\n", pct);
      }
      std::fflush(stdout);
      last = pct;
    }
    g_usleep(200 * 1000);
  }
}

}  // namespace snap
