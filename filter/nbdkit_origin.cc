#include "filter/nbdkit_origin.h"

#include <errno.h>

#include <algorithm>
#include <cstring>

#include "absl/strings/str_format.h"
#include "filter/errno_status.h"

namespace snap {
namespace {

// Requests to the plugin are split at this size (or at its maximum block
// size, when smaller).
constexpr uint64_t kMaxRequest = 64 << 20;

}  // namespace

// Where the plugin's errno is put into words (ErrnoError does not).
absl::Status OriginError(const char* what, uint64_t offset, int err) {
  if (err == 0) err = EIO;
  return ErrnoError(err, absl::StrFormat("origin %s at offset %d failed: %s",
                                         what, offset, strerror(err)));
}

bool NbdkitOrigin::Open(nbdkit_backend* backend, bool serialize) {
  serialize_ = serialize;
  next_ = nbdkit_next_context_open(backend, 0, "", 1);
  if (next_ == nullptr) {
    nbdkit_error("snapshot: cannot open the origin (the plugin below)");
    return false;
  }
  if (next_->prepare(next_) == -1) {
    nbdkit_error("snapshot: the origin plugin failed to start");
    nbdkit_next_context_close(next_);
    next_ = nullptr;
    return false;
  }
  int64_t size = next_->get_size(next_);
  if (size < 0) {
    nbdkit_error("snapshot: cannot get the origin's size");
    Close();
    return false;
  }
  size_ = static_cast<uint64_t>(size);
  // Every can_* the engine relies on must be asked before use (nbdkit
  // asserts it in backend.c).
  can_write_ = next_->can_write(next_) == 1;
  can_flush_ = next_->can_flush(next_) == 1;
  can_trim_ = can_write_ && next_->can_trim(next_) == 1;
  can_zero_ = can_write_ && next_->can_zero(next_) > NBDKIT_ZERO_NONE;
  can_fua_ = can_write_ && next_->can_fua(next_) > NBDKIT_FUA_NONE;
  can_fast_zero_ = can_zero_ && next_->can_fast_zero(next_) == 1;
  can_extents_ = next_->can_extents(next_) == 1;
  is_rotational_ = next_->is_rotational(next_) == 1;
  (void)next_->can_cache(next_);
  uint32_t min = 0, pref = 0, max = 0;
  if (next_->block_size(next_, &min, &pref, &max) == -1) {
    nbdkit_error("snapshot: cannot get the origin's block size");
    Close();
    return false;
  }
  if (min != 0) {  // nbdkit guarantees powers of two, min <= pref <= max
    block_min_ = min;
    block_preferred_ = pref;
    block_max_ = max;
  }
  max_request_ = std::min<uint64_t>(kMaxRequest, block_max_) / block_min_ * block_min_;
  return true;
}

void NbdkitOrigin::Close() {
  if (next_ == nullptr) return;
  next_->finalize(next_);
  nbdkit_next_context_close(next_);
  next_ = nullptr;
}

absl::Status NbdkitOrigin::Read(std::span<char> buf, uint64_t offset) {
  for (uint64_t done = 0; done < buf.size();) {
    uint32_t n = static_cast<uint32_t>(std::min<uint64_t>(buf.size() - done, max_request_));
    int err = 0;
    auto g = Guard();
    if (next_->pread(next_, buf.data() + done, n, offset + done, 0, &err) == -1)
      return OriginError("read", offset + done, err);
    done += n;
  }
  return absl::OkStatus();
}

absl::Status NbdkitOrigin::Write(std::span<const char> buf, uint64_t offset,
                                 bool fua) {
  if (!can_write_) return ErrnoError(EROFS, "the origin is read-only");
  for (uint64_t done = 0; done < buf.size();) {
    uint32_t n = static_cast<uint32_t>(std::min<uint64_t>(buf.size() - done, max_request_));
    int err = 0;
    auto g = Guard();
    uint32_t flags = fua && can_fua_ ? NBDKIT_FLAG_FUA : 0;
    if (next_->pwrite(next_, buf.data() + done, n, offset + done, flags, &err) == -1)
      return OriginError("write", offset + done, err);
    done += n;
  }
  if (fua && !can_fua_ && can_flush_) return Flush();
  return absl::OkStatus();
}

absl::Status NbdkitOrigin::Zero(uint64_t length, uint64_t offset, bool may_trim,
                                bool fua, bool fast) {
  for (uint64_t done = 0; done < length;) {
    uint32_t n = static_cast<uint32_t>(std::min<uint64_t>(length - done, max_request_));
    int err = 0;
    auto g = Guard();
    uint32_t flags = (may_trim ? NBDKIT_FLAG_MAY_TRIM : 0) |
                     (fua && can_fua_ ? NBDKIT_FLAG_FUA : 0) |
                     (fast ? NBDKIT_FLAG_FAST_ZERO : 0);
    if (next_->zero(next_, n, offset + done, flags, &err) == -1)
      return OriginError("zero", offset + done, err);
    done += n;
  }
  if (fua && !can_fua_ && can_flush_) return Flush();
  return absl::OkStatus();
}

absl::Status NbdkitOrigin::Trim(uint64_t length, uint64_t offset, bool fua) {
  for (uint64_t done = 0; done < length;) {
    uint32_t n = static_cast<uint32_t>(std::min<uint64_t>(length - done, max_request_));
    int err = 0;
    auto g = Guard();
    uint32_t flags = fua && can_fua_ ? NBDKIT_FLAG_FUA : 0;
    if (next_->trim(next_, n, offset + done, flags, &err) == -1)
      return OriginError("trim", offset + done, err);
    done += n;
  }
  return absl::OkStatus();
}

absl::Status NbdkitOrigin::Flush() {
  if (!can_flush_) return absl::OkStatus();
  int err = 0;
  auto g = Guard();
  if (next_->flush(next_, 0, &err) == -1) return OriginError("flush", 0, err);
  return absl::OkStatus();
}

int NbdkitOrigin::Extents(uint32_t length, uint64_t offset, uint32_t flags,
                          nbdkit_extents* out, int* err) {
  if (!can_extents_) return nbdkit_add_extent(out, offset, length, 0);
  auto g = Guard();
  return next_->extents(next_, length, offset, flags, out, err);
}

}  // namespace snap
