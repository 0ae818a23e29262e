#include "filter/control_server.h"

#include <errno.h>
#include <glib-unix.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <cstring>
#include <system_error>
#include <utility>

#include "absl/strings/str_format.h"
#include "filter/config.h"
#include "filter/log.h"

namespace snap {
namespace {

// ErrnoToStatus appends the OS's words for err itself.
absl::Status SysError(int err, const std::string& what) {
  return absl::ErrnoToStatus(err, what);
}

void DestroySource(GSource*& source) {
  if (source == nullptr) return;
  g_source_destroy(source);
  g_source_unref(source);
  source = nullptr;
}

}  // namespace

absl::Status ControlServer::Bind(const std::string& path) {
  struct sockaddr_un addr = {};
  addr.sun_family = AF_UNIX;
  if (path.empty() || path.size() >= sizeof addr.sun_path)
    return absl::InvalidArgumentError(absl::StrFormat(
        "snapshot-control=%s: a socket path must be 1 to %d bytes", path,
        sizeof addr.sun_path - 1));
  std::memcpy(addr.sun_path, path.c_str(), path.size());
  struct stat st;
  if (::lstat(path.c_str(), &st) == 0) {
    if (!S_ISSOCK(st.st_mode))
      return absl::FailedPreconditionError(absl::StrFormat(
          "snapshot-control=%s exists and is not a socket: refusing to "
          "replace it; choose another path",
          path));
    int probe = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    bool live = probe >= 0 &&
                ::connect(probe, reinterpret_cast<sockaddr*>(&addr), sizeof addr) == 0;
    if (probe >= 0) ::close(probe);
    if (live)
      return absl::FailedPreconditionError(absl::StrFormat(
          "snapshot-control=%s is in use by a running server", path));
    ::unlink(path.c_str());  // a stale socket from an earlier run
  }
  // Non-blocking: a client that leaves between poll and accept must not
  // block the server's thread.
  int fd = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
  if (fd < 0) return SysError(errno, "snapshot-control: socket");
  // 0600 from the start: no window where others could connect.
  mode_t old = ::umask(0177);
  int r = ::bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr);
  int err = errno;
  ::umask(old);
  if (r != 0) {
    ::close(fd);
    return SysError(err, absl::StrFormat("snapshot-control=%s: bind", path));
  }
  if (::listen(fd, 16) != 0) {
    err = errno;
    ::close(fd);
    ::unlink(path.c_str());
    return SysError(err, absl::StrFormat("snapshot-control=%s: listen", path));
  }
  listen_fd_ = fd;
  // Absolute: nbdkit moves to / when it forks, and must still remove it.
  path_ = AbsolutePath(path);
  return absl::OkStatus();
}

void ControlServer::Start(ControlContext ctx) {
  if (listen_fd_ < 0) return;
  ctx_ = std::move(ctx);
  started_ = true;
  context_ = g_main_context_new();
  loop_ = g_main_loop_new(context_, FALSE);
  ResumeAccept();
  try {
    changer_ = std::thread([this] { RunChanges(); });
  } catch (const std::system_error&) {
    // No thread to be had: changes run in the main loop, as they did.
    LogMessage("control: no thread for take, drop and merge: they hold up "
               "status and list while they run");
  }
  thread_ = std::thread([this] {
    g_main_context_push_thread_default(context_);
    g_main_loop_run(loop_);
    g_main_context_pop_thread_default(context_);
  });
}

void ControlServer::Stop() {
  // The loop first: it reads changer_ (RunLine) and queues changes. A
  // reply the changer hands over after that is freed with the context.
  if (thread_.joinable()) {
    g_main_loop_quit(loop_);
    g_main_context_wakeup(context_);
    thread_.join();
  }
  if (changer_.joinable()) {
    {
      snap::MutexLock l(&changes_mu_);
      changes_stop_ = true;
      changes_cv_.SignalAll();
    }
    changer_.join();
  }
  while (!clients_.empty()) Drop(clients_.begin()->first);
  PauseAccept();
  if (loop_ != nullptr) g_main_loop_unref(loop_);
  if (context_ != nullptr) g_main_context_unref(context_);
  loop_ = nullptr;
  context_ = nullptr;
  if (listen_fd_ >= 0) {
    ::close(listen_fd_);
    // Only the server removes the socket: nbdkit's parent process, which
    // exits after forking into the background, must leave it alone.
    if (started_) ::unlink(path_.c_str());
    listen_fd_ = -1;
  }
}

void ControlServer::RemoveSocketFile() {
  if (started_ && listen_fd_ >= 0) ::unlink(path_.c_str());
}

void ControlServer::PauseAccept() {
  DestroySource(listen_source_);
  DestroySource(retry_source_);
}

void ControlServer::ResumeAccept() {
  DestroySource(retry_source_);
  if (listen_source_ != nullptr || clients_.size() >= kMaxControlClients) return;
  listen_source_ = g_unix_fd_source_new(listen_fd_, G_IO_IN);
  g_source_set_callback(listen_source_, G_SOURCE_FUNC(OnAccept), this, nullptr);
  g_source_attach(listen_source_, context_);
}

gboolean ControlServer::OnAcceptRetry(gpointer data) {
  static_cast<ControlServer*>(data)->ResumeAccept();
  return G_SOURCE_REMOVE;
}

gboolean ControlServer::OnAccept(gint fd, GIOCondition, gpointer data) {
  auto* self = static_cast<ControlServer*>(data);
  int c = ::accept4(fd, nullptr, nullptr, SOCK_CLOEXEC | SOCK_NONBLOCK);
  int err = errno;
  if (c >= 0) {
    try {
      auto client = std::make_unique<Client>();
      client->fd = c;
      client->id = ++self->next_id_;
      Client& added = *client;
      self->clients_.emplace(c, std::move(client));
      self->Watch(added);
    } catch (...) {  // out of memory: as if accept had failed
      ::close(c);
      c = -1;
      err = ENOMEM;
    }
  }
  if (c >= 0) {
    self->accept_failing_ = false;
    if (self->clients_.size() < kMaxControlClients) return G_SOURCE_CONTINUE;
    // At the cap: the next client waits in the backlog until one leaves.
    self->PauseAccept();
    return G_SOURCE_REMOVE;
  }
  if (err == EAGAIN || err == EWOULDBLOCK || err == EINTR || err == ECONNABORTED)
    return G_SOURCE_CONTINUE;  // nothing to accept after all
  // Out of file descriptors or memory: the connection stays pending and
  // the socket readable, so watching it would spin. Wait for a client to
  // leave, or a moment.
  if (!self->accept_failing_) {
    self->accept_failing_ = true;
    try {
      LogMessage(absl::StrFormat(
          "control: cannot accept a client: %s; trying again when one "
          "leaves or in %d ms",
          strerror(err), kAcceptRetryMs));
    } catch (...) {
    }
  }
  self->PauseAccept();
  self->retry_source_ = g_timeout_source_new(kAcceptRetryMs);
  g_source_set_callback(self->retry_source_, OnAcceptRetry, self, nullptr);
  g_source_attach(self->retry_source_, self->context_);
  return G_SOURCE_REMOVE;
}

void ControlServer::Watch(Client& c) {
  // Nothing is read or sent until a command's reply is back, but a client
  // that hangs up meanwhile must not keep its place (and fd) till then.
  int want = c.busy ? 0 : (c.eof ? 0 : G_IO_IN) | (c.out.empty() ? 0 : G_IO_OUT);
  if (c.source != nullptr && want == c.watching) return;
  DestroySource(c.source);
  c.watching = static_cast<GIOCondition>(want);
  // HUP and ERR are always reported, so a vanished client is noticed even
  // while only output is watched.
  c.source = g_unix_fd_source_new(c.fd, static_cast<GIOCondition>(want | G_IO_HUP | G_IO_ERR));
  g_source_set_callback(c.source, G_SOURCE_FUNC(OnClient), this, nullptr);
  g_source_attach(c.source, context_);
}

bool ControlServer::SendReplies(Client& c) {
  while (!c.out.empty()) {
    ssize_t n = ::send(c.fd, c.out.data(), c.out.size(), MSG_NOSIGNAL);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) break;
    if (n <= 0) return false;  // the client went away
    c.out.erase(0, static_cast<size_t>(n));
  }
  if (c.out.size() > kMaxControlBacklog) {
    LogMessage(absl::StrFormat(
        "control: dropped a client that left %d bytes of replies unread",
        c.out.size()));
    return false;
  }
  return true;
}

void ControlServer::RunLine(Client& c, std::string line) {
  if (!line.empty() && line.back() == '\r') line.pop_back();
  if (!changer_.joinable() || !ControlCommandChanges(line)) {
    c.out += RunControlCommand(ctx_, line);
    return;
  }
  auto change = std::make_unique<Change>(Change{this, c.fd, c.id, std::move(line), {}});
  {
    snap::MutexLock l(&changes_mu_);
    changes_.push_back(std::move(change));
    changes_cv_.Signal();
  }
  c.busy = true;
}

void ControlServer::RunChanges() {
  for (;;) {
    std::unique_ptr<Change> change;
    {
      snap::MutexLock l(&changes_mu_);
      while (changes_.empty() && !changes_stop_) changes_cv_.Wait(&changes_mu_);
      if (changes_stop_) return;  // the clients are going too
      change = std::move(changes_.front());
      changes_.pop_front();
    }
    try {
      change->reply = RunControlCommand(ctx_, change->line);
    } catch (...) {  // out of memory
      change->failed = true;
    }
    // Run in the main loop, which owns the clients; freed there, or when
    // the loop's context goes if the server stops first.
    g_main_context_invoke_full(
        context_, G_PRIORITY_DEFAULT, OnChanged, change.release(),
        [](gpointer p) { delete static_cast<Change*>(p); });
  }
}

gboolean ControlServer::OnChanged(gpointer data) {
  auto* change = static_cast<Change*>(data);
  ControlServer* self = change->server;
  auto it = self->clients_.find(change->fd);
  // The client left while its command ran: the reply has nowhere to go.
  if (it == self->clients_.end() || it->second->id != change->id)
    return G_SOURCE_REMOVE;
  Client& c = *it->second;
  bool keep = !change->failed;
  try {
    c.busy = false;
    c.out += change->reply;
    if (keep) self->RunLines(c);  // the lines that waited behind it
  } catch (...) {
    keep = false;
  }
  self->Settle(c, keep, false);
  return G_SOURCE_REMOVE;
}

bool ControlServer::ReadCommands(Client& c) {
  char buf[4096];
  ssize_t n = ::recv(c.fd, buf, sizeof buf, 0);
  if (n < 0) return errno == EINTR || errno == EAGAIN || errno == EWOULDBLOCK;
  if (n == 0)
    c.eof = true;
  else
    c.in.append(buf, static_cast<size_t>(n));
  RunLines(c);
  return true;
}

void ControlServer::RunLines(Client& c) {
  while (!c.busy) {
    size_t nl = c.in.find('\n');
    if (nl == std::string::npos) {
      if (c.eof) {
        // A last command without its newline still gets its reply.
        std::string last = std::exchange(c.in, {});
        if (!last.empty() && !c.skipping) RunLine(c, std::move(last));
      } else if (c.in.size() > kMaxControlLine) {
        if (!c.skipping) c.out += "ERR line too long\n";
        c.skipping = true;
        c.in.clear();
      }
      return;
    }
    std::string line = c.in.substr(0, nl);
    c.in.erase(0, nl + 1);
    if (c.skipping) {  // the tail of an overlong line
      c.skipping = false;
      continue;
    }
    RunLine(c, std::move(line));
  }
}

gboolean ControlServer::OnClient(gint fd, GIOCondition cond, gpointer data) {
  auto* self = static_cast<ControlServer*>(data);
  auto it = self->clients_.find(fd);
  if (it == self->clients_.end()) return G_SOURCE_REMOVE;
  Client& c = *it->second;
  // Only a hang-up wakes a busy client: its command runs on, and the reply
  // finds no client with its id.
  if (c.busy) {
    self->Settle(c, false, true);
    return G_SOURCE_REMOVE;
  }
  GSource* before = c.source;
  bool keep = true;
  try {
    if (!c.eof && (cond & (G_IO_IN | G_IO_HUP | G_IO_ERR)) != 0) keep = self->ReadCommands(c);
  } catch (...) {
    keep = false;  // out of memory: this client goes, the server stays
  }
  if (!self->Settle(c, keep, (cond & (G_IO_HUP | G_IO_ERR)) != 0))
    return G_SOURCE_REMOVE;
  return c.source == before ? G_SOURCE_CONTINUE : G_SOURCE_REMOVE;
}

bool ControlServer::Settle(Client& c, bool keep, bool hung_up) {
  try {
    if (keep) keep = SendReplies(c);
  } catch (...) {
    keep = false;
  }
  // Done (end of file, every reply sent), or gone (a hang-up with nothing
  // left to read); a client whose command still runs waits for its reply.
  if (keep && c.eof && !c.busy && (c.out.empty() || hung_up)) keep = false;
  if (!keep) {
    Drop(c.fd);
    // A place is free: accept again if the cap or an error stopped it.
    ResumeAccept();
    return false;
  }
  Watch(c);
  return true;
}

void ControlServer::Drop(int fd) {
  auto it = clients_.find(fd);
  if (it == clients_.end()) return;
  DestroySource(it->second->source);
  ::close(fd);
  clients_.erase(it);
}

}  // namespace snap
