#include "filter/errno_status.h"

#include <errno.h>

#include <optional>
#include <string>

#include "absl/strings/cord.h"
#include "absl/strings/numbers.h"

namespace snap {
namespace {
constexpr char kErrnoUrl[] = "snapshot/errno";
}

absl::Status ErrnoError(int err, absl::string_view message) {
  absl::Status st(absl::ErrnoToStatusCode(err), message);
  st.SetPayload(kErrnoUrl, absl::Cord(std::to_string(err)));
  return st;
}

int StatusToErrno(const absl::Status& st) {
  if (auto p = st.GetPayload(kErrnoUrl)) {
    int err = 0;
    if (absl::SimpleAtoi(std::string(*p), &err) && err > 0) return err;
  }
  switch (st.code()) {
    case absl::StatusCode::kOk: return 0;
    case absl::StatusCode::kResourceExhausted: return ENOSPC;
    case absl::StatusCode::kInvalidArgument:
    case absl::StatusCode::kOutOfRange: return EINVAL;
    case absl::StatusCode::kPermissionDenied: return EPERM;
    case absl::StatusCode::kUnimplemented: return ENOTSUP;
    case absl::StatusCode::kUnavailable: return EBUSY;
    default: return EIO;
  }
}

}  // namespace snap
