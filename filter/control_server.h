// snapshot-control=SOCKET: a Unix socket (mode 0600) served by a GLib main
// loop in its own thread; each line is a command for RunControlCommand.
#pragma once

#include <glib.h>

#include <map>
#include <memory>
#include <string>
#include <thread>

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
    std::string in;
    std::string out;        // replies the client has not read yet
    bool skipping = false;  // inside an overlong line
    bool eof = false;       // the client sent all it will send
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
  // Reads what the client sent and runs each complete line (and, at end
  // of file, an unterminated last one). False: drop the client.
  bool ReadCommands(Client& c);
  void RunLine(Client& c, std::string line);
  // Sends what it can without blocking. False: drop the client.
  bool SendReplies(Client& c);
  // Watches for input until end of file, for output while replies wait.
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
};

}  // namespace snap
