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

 private:
  struct Client {
    int fd = -1;
    std::string in;
    bool skipping = false;  // inside an overlong line
    GSource* source = nullptr;
  };
  static gboolean OnAccept(gint fd, GIOCondition cond, gpointer self);
  static gboolean OnClient(gint fd, GIOCondition cond, gpointer self);
  void Drop(int fd);
  void Reply(Client& c, const std::string& text);

  std::string path_;
  int listen_fd_ = -1;
  bool started_ = false;  // Start ran in this process
  ControlContext ctx_;
  GMainContext* context_ = nullptr;
  GMainLoop* loop_ = nullptr;
  GSource* listen_source_ = nullptr;
  std::thread thread_;
  std::map<int, std::unique_ptr<Client>> clients_;
};

}  // namespace snap
