// BlockFile over a POSIX file descriptor.
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/falloc.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <fstream>
#include <mutex>
#include <string>
#include <vector>

#include "absl/strings/str_format.h"
#include "store/block_file.h"

namespace snap {
namespace {

class PosixFile final : public BlockFile {
 public:
  PosixFile(int fd, std::string name, bool regular, bool block_device)
      : fd_(fd), name_(std::move(name)), serialize_writes_(regular),
        block_device_(block_device) {}
  ~PosixFile() override { ::close(fd_); }
  PosixFile(const PosixFile&) = delete;
  PosixFile& operator=(const PosixFile&) = delete;

  absl::Status PRead(std::span<char> buf, uint64_t offset) override {
    size_t done = 0;
    while (done < buf.size()) {
      ssize_t r = ::pread(fd_, buf.data() + done, buf.size() - done,
                          static_cast<off_t>(offset + done));
      if (r < 0) {
        if (errno == EINTR) continue;
        return Err(errno, "read", offset + done);
      }
      if (r == 0)
        return absl::OutOfRangeError(absl::StrFormat(
            "%s: read at offset %d is past the end of the file", name_,
            offset + done));
      done += static_cast<size_t>(r);
    }
    return absl::OkStatus();
  }

  absl::Status PWrite(std::span<const char> buf, uint64_t offset) override {
    // Buffered writes to one regular file serialize on its inode lock
    // anyway; waiting here sleeps where the kernel's lock would spin, and
    // on two cores the spinning took a fifth of the CPU under parallel
    // copy-outs. Block devices have no such lock and write in parallel.
    std::unique_lock<std::mutex> serial(write_mu_, std::defer_lock);
    if (serialize_writes_) serial.lock();
    size_t done = 0;
    while (done < buf.size()) {
      ssize_t r = ::pwrite(fd_, buf.data() + done, buf.size() - done,
                           static_cast<off_t>(offset + done));
      if (r < 0) {
        if (errno == EINTR) continue;
        return Err(errno, "write", offset + done);
      }
      if (r == 0) return Err(ENOSPC, "write", offset + done);
      done += static_cast<size_t>(r);
    }
    return absl::OkStatus();
  }

  absl::Status Sync() override {
    if (::fdatasync(fd_) != 0) return Err(errno, "sync", 0);
    return absl::OkStatus();
  }

  absl::StatusOr<uint64_t> Size() override {
    struct stat st;
    if (::fstat(fd_, &st) != 0) return Err(errno, "stat", 0);
    if (S_ISBLK(st.st_mode)) {
      off_t end = ::lseek(fd_, 0, SEEK_END);
      if (end < 0) return Err(errno, "seek", 0);
      return static_cast<uint64_t>(end);
    }
    return static_cast<uint64_t>(st.st_size);
  }

  absl::Status GrowTo(uint64_t size) override {
    absl::StatusOr<uint64_t> cur = Size();
    if (!cur.ok()) return cur.status();
    if (*cur >= size || size == 0) return absl::OkStatus();
    // fallocate of the last byte extends the file and can never shrink it,
    // unlike ftruncate, which would cut off data another thread has just
    // written past the size we read.
    if (::fallocate(fd_, 0, static_cast<off_t>(size - 1), 1) == 0)
      return absl::OkStatus();
    if (errno != EOPNOTSUPP) return Err(errno, "grow", size);
    // A filesystem without fallocate: ftruncate, re-checking the size just
    // before. It can still race a write past the old end on such a
    // filesystem; every filesystem nbdkit users run on has fallocate.
    cur = Size();
    if (!cur.ok()) return cur.status();
    if (*cur < size && ::ftruncate(fd_, static_cast<off_t>(size)) != 0)
      return Err(errno, "grow", size);
    return absl::OkStatus();
  }

  absl::Status Reserve(uint64_t offset, uint64_t length) override {
    if (::fallocate(fd_, FALLOC_FL_KEEP_SIZE, static_cast<off_t>(offset),
                    static_cast<off_t>(length)) == 0 ||
        (errno != ENOSPC && errno != EDQUOT))
      return absl::OkStatus();
    return Err(errno, "reserve", offset);
  }

  void ReleaseReserve() override {
    // Truncating to the same size drops the blocks kept past the end;
    // only called when no other thread writes the file any more.
    struct stat st;
    if (::fstat(fd_, &st) == 0 && S_ISREG(st.st_mode))
      (void)::ftruncate(fd_, st.st_size);
  }

  bool HoldsSpacePastEnd() override {
    struct stat st;
    if (::fstat(fd_, &st) != 0 || !S_ISREG(st.st_mode) || st.st_blksize <= 0)
      return false;
    const uint64_t bs = static_cast<uint64_t>(st.st_blksize);
    const uint64_t in_size = (static_cast<uint64_t>(st.st_size) + bs - 1) / bs * bs;
    return uint64_t{512} * static_cast<uint64_t>(st.st_blocks) > in_size;
  }

  absl::Status ZeroRange(uint64_t offset, uint64_t length) override {
    if (::fallocate(fd_, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                    static_cast<off_t>(offset), static_cast<off_t>(length)) == 0)
      return absl::OkStatus();
    if (::fallocate(fd_, FALLOC_FL_ZERO_RANGE, static_cast<off_t>(offset),
                    static_cast<off_t>(length)) == 0)
      return absl::OkStatus();
    std::vector<char> zeros(std::min<uint64_t>(length, 1 << 20));
    for (uint64_t done = 0; done < length;) {
      uint64_t n = std::min<uint64_t>(zeros.size(), length - done);
      if (absl::Status st = PWrite({zeros.data(), n}, offset + done); !st.ok())
        return st;
      done += n;
    }
    return absl::OkStatus();
  }

  absl::Status LockExclusive() override {
    // An OFD lock: it belongs to this open file, so it survives nbdkit's
    // fork into the background and is dropped when the file is closed.
    struct flock fl = {};
    fl.l_type = F_WRLCK;
    fl.l_whence = SEEK_SET;
    if (::fcntl(fd_, F_OFD_SETLK, &fl) == 0) return absl::OkStatus();
    if (errno != EAGAIN && errno != EACCES) return Err(errno, "lock", 0);
    const std::string pid = LockHolder();
    if (pid == std::to_string(::getpid()))
      return absl::UnavailableError(absl::StrFormat(
          "%s is in use by this very process already (a store of it is still "
          "open here): use another file",
          name_));
    return absl::UnavailableError(absl::StrFormat(
        "%s is in use by another process%s (a running nbdkit or nbdsnap): "
        "stop it first, or use another file",
        name_, pid.empty() ? "" : " (pid " + pid + ")"));
  }

  const std::string& name() const override { return name_; }
  bool is_block_device() const override { return block_device_; }

  absl::StatusOr<std::optional<uint64_t>> FirstNonZeroByte(uint64_t end) override {
    uint64_t pos = 0;
    while (pos < end) {
      // Holes read as zeros: only the data between them is read.
      off_t data = ::lseek(fd_, static_cast<off_t>(pos), SEEK_DATA);
      if (data < 0) {
        if (errno == ENXIO) break;  // nothing but a hole up to the end
        if (errno != EINVAL && errno != EOPNOTSUPP) return Err(errno, "seek", pos);
        data = static_cast<off_t>(pos);  // no SEEK_DATA here: read it all
      }
      if (static_cast<uint64_t>(data) >= end) break;
      const off_t hole = ::lseek(fd_, data, SEEK_HOLE);
      uint64_t stop = hole < 0 ? end : std::min<uint64_t>(end, static_cast<uint64_t>(hole));
      if (stop <= static_cast<uint64_t>(data)) stop = end;  // always move on
      absl::StatusOr<std::optional<uint64_t>> found =
          FirstNonZeroIn(static_cast<uint64_t>(data), stop);
      if (!found.ok() || found->has_value()) return found;
      pos = stop;
    }
    return std::nullopt;
  }

 private:
  // OFD locks record no owner (/proc/locks says pid -1), but a process's
  // /proc/PID/fdinfo/FD lists the locks of the open file behind FD. The
  // holder is the process (this one included, through another open) with
  // our file's write lock there; failing that (no access to it), the first
  // process found with the file open.
  std::string LockHolder() const {
    struct stat st;
    if (::fstat(fd_, &st) != 0) return "";
    const std::string self = std::to_string(::getpid());
    const std::string own_fd = std::to_string(fd_);
    DIR* proc = ::opendir("/proc");
    if (proc == nullptr) return "";
    std::string holder, opener;
    struct dirent* d;
    while (holder.empty() && (d = ::readdir(proc)) != nullptr) {
      if (!std::isdigit(static_cast<unsigned char>(d->d_name[0]))) continue;
      const std::string pid_dir = std::string("/proc/") + d->d_name;
      DIR* fds = ::opendir((pid_dir + "/fd").c_str());
      if (fds == nullptr) continue;
      while (struct dirent* f = ::readdir(fds)) {
        if (self == d->d_name && own_fd == f->d_name) continue;  // this open
        struct stat fst;
        if (::stat((pid_dir + "/fd/" + f->d_name).c_str(), &fst) != 0 ||
            fst.st_dev != st.st_dev || fst.st_ino != st.st_ino)
          continue;
        if (opener.empty()) opener = d->d_name;
        if (HoldsWriteLock(pid_dir + "/fdinfo/" + f->d_name)) {
          holder = d->d_name;
          break;
        }
      }
      ::closedir(fds);
    }
    ::closedir(proc);
    return holder.empty() ? opener : holder;
  }

  // An fdinfo file with a line such as
  // "lock:\t1: OFDLCK ADVISORY  WRITE -1 fe:00:1234 0 EOF".
  static bool HoldsWriteLock(const std::string& fdinfo) {
    std::ifstream in(fdinfo);
    for (std::string line; std::getline(in, line);)
      if (line.starts_with("lock:") && line.find(" OFDLCK ") != std::string::npos &&
          line.find(" WRITE ") != std::string::npos)
        return true;
    return false;
  }

  absl::Status Err(int err, const char* what, uint64_t offset) const {
    return absl::ErrnoToStatus(
        err, absl::StrFormat("%s: %s at offset %d failed", name_, what, offset));
  }

  int fd_;
  std::string name_;
  const bool serialize_writes_;
  const bool block_device_;
  std::mutex write_mu_;
};

absl::Status SyncParentDirectory(const std::string& path) {
  const size_t slash = path.rfind('/');
  const std::string dir = slash == std::string::npos ? "."
                          : slash == 0               ? "/"
                                                     : path.substr(0, slash);
  const int dfd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (dfd < 0 || ::fsync(dfd) != 0) {
    const int err = errno;
    if (dfd >= 0) ::close(dfd);
    return absl::ErrnoToStatus(
        err, absl::StrFormat("created %s but cannot sync its directory %s",
                             path, dir));
  }
  ::close(dfd);
  return absl::OkStatus();
}

}  // namespace

absl::Status CheckStoreFileKind(const std::string& path, unsigned mode) {
  if (S_ISDIR(mode))
    return absl::InvalidArgumentError(
        absl::StrFormat("%s is a directory, not a COW file", path));
  if (!S_ISREG(mode) && !S_ISBLK(mode))
    return absl::InvalidArgumentError(absl::StrFormat(
        "%s is not a regular file or a block device", path));
  return absl::OkStatus();
}

absl::StatusOr<std::unique_ptr<BlockFile>> OpenPosixFile(const std::string& path,
                                                         OpenMode mode) {
  // Before opening: a FIFO opened for reading would wait for a writer.
  if (struct stat st; ::stat(path.c_str(), &st) == 0)
    if (absl::Status kind = CheckStoreFileKind(path, st.st_mode); !kind.ok())
      return kind;
  int flags = O_CLOEXEC;
  switch (mode) {
    case OpenMode::kReadOnly: flags |= O_RDONLY; break;
    case OpenMode::kReadWrite: flags |= O_RDWR; break;
    case OpenMode::kReadWriteCreate: flags |= O_RDWR | O_CREAT; break;
  }
  int fd = ::open(path.c_str(), flags & ~O_CREAT);
  if (fd < 0 && errno == ENOENT && (flags & O_CREAT)) {
    fd = ::open(path.c_str(), flags | O_EXCL, 0644);
    if (fd < 0 && errno == EEXIST) {
      fd = ::open(path.c_str(), flags & ~O_CREAT);  // made meanwhile
    } else if (fd >= 0) {
      // A new name is durable only once its directory is synced: without
      // it, a power loss could take the COW file, and every flush it
      // served, away.
      if (absl::Status st = SyncParentDirectory(path); !st.ok()) {
        ::close(fd);
        return st;
      }
    }
  }
  if (fd < 0)
    return absl::ErrnoToStatus(errno, absl::StrFormat("cannot open %s", path));
  struct stat st;
  const bool known = ::fstat(fd, &st) == 0;
  return std::unique_ptr<BlockFile>(new PosixFile(
      fd, path, known && S_ISREG(st.st_mode), known && S_ISBLK(st.st_mode)));
}

}  // namespace snap
