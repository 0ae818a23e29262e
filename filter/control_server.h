// snapshot-control=SOCKET: a Unix socket (mode 0600) served by a GLib main
// loop in its own thread; each line is a command for RunControlCommand.
// Commands that change the snapshots (take, drop, merge) run one at a time
// in a second thread: a take waits for the origin's queued writes, and
// status and list from other clients are answered meanwhile.
#pragma once

#include <glib.h>

#include <cstdint>
#include <deque>
#include <map>
#include <memory>
#include <string>
#include <thread>

#include "store/sync.h"

#include "absl/status/status.h"
#include "filter/control_commands.h"

namespace snap {

// Replies a client may leave unread before it is dropped: the server never
// blocks on a client, and one that never reads cannot make it hold more.
inline constexpr size_t kMaxControlBacklog = 1 << 20;
// Clients served at once: each holds a file descriptor that nbdkit also
// needs for NBD connections. More wait in the listen backlog.
inline constexpr size_t kMaxControlClients = 32;
// After accept fails (out of file descriptors, say), when to try again if
// no client leaves first.
inline constexpr guint kAcceptRetryMs = 100;

class ControlServer {
 public:
  ~ControlServer() { Stop(); }
  // Binds and listens, before nbdkit forks, so errors stop the start. An
  // existing path is replaced only if it is a socket nobody answers on.
  absl::Status Bind(const std::string& path);
  // Serves in a thread (after the fork).
  void Start(ControlContext ctx);
  // Stops the thread, closes every client, removes the socket.
  void Stop();
  // Only removes the socket file: for a process about to _exit, where
  // joining the server's thread could wait on the caller.
  void RemoveSocketFile();

 private:
  struct Client {
    int fd = -1;
    uint64_t id = 0;  // fds are reused: a reply finds its client by both
    std::string in;
    std::string out;        // replies the client has not read yet
    bool skipping = false;  // inside an overlong line
    bool eof = false;       // the client sent all it will send
    // A command runs in the changer thread: the client's later lines wait
    // unread, so replies keep their order and its input stays bounded.
    // Only a hang-up is watched for meanwhile.
    bool busy = false;
    GSource* source = nullptr;
    GIOCondition watching = static_cast<GIOCondition>(0);
  };
  static gboolean OnAccept(gint fd, GIOCondition cond, gpointer self);
  static gboolean OnAcceptRetry(gpointer self);
  // A pending connection keeps the listen socket readable, so it is only
  // watched while a client can be accepted: not at the cap, and not
  // while accept fails.
  void PauseAccept();
  void ResumeAccept();
  static gboolean OnClient(gint fd, GIOCondition cond, gpointer self);
  // Reads what the client sent and runs its lines. False: drop the client.
  bool ReadCommands(Client& c);
  // Runs each complete line (and, at end of file, an unterminated last
  // one) until one goes to the changer thread.
  void RunLines(Client& c);
  void RunLine(Client& c, std::string line);
  // After input or a reply: sends what waits, drops a client that is done
  // or gone, watches the rest. False: the client was dropped.
  bool Settle(Client& c, bool keep, bool hung_up);
  // The changer thread: runs queued commands in order, and hands each
  // reply back to the main loop (OnChanged).
  void RunChanges();
  // A command for the changer thread, and its reply for the client.
  struct Change {
    ControlServer* server;
    int fd;
    uint64_t id;
    std::string line;
    std::string reply;
    bool failed = false;  // no reply could be made: the client is dropped
  };
  static gboolean OnChanged(gpointer change);
  // Sends what it can without blocking. False: drop the client.
  bool SendReplies(Client& c);
  // Watches for input until end of file, for output while replies wait;
  // for a hang-up alone while a command runs.
  void Watch(Client& c);
  void Drop(int fd);

  std::string path_;
  int listen_fd_ = -1;
  bool started_ = false;  // Start ran in this process
  ControlContext ctx_;
  GMainContext* context_ = nullptr;
  GMainLoop* loop_ = nullptr;
  GSource* listen_source_ = nullptr;  // null: not accepting for now
  GSource* retry_source_ = nullptr;   // the timer after an accept error
  bool accept_failing_ = false;       // logged once per spell of errors
  std::thread thread_;
  std::map<int, std::unique_ptr<Client>> clients_;
  uint64_t next_id_ = 0;

  snap::Mutex changes_mu_;
  snap::CondVar changes_cv_;
  std::deque<std::unique_ptr<Change>> changes_ ABSL_GUARDED_BY(changes_mu_);
  bool changes_stop_ ABSL_GUARDED_BY(changes_mu_) = false;
  std::thread changer_;
};

}  // namespace snap
