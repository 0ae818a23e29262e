#include "filter/config.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cctype>
#include <filesystem>

#include "absl/strings/ascii.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "store/cow_format.h"

namespace snap {
namespace {

std::string DefaultName(std::string_view path) {
  std::string_view base = path.substr(path.find_last_of('/') + 1);
  if (size_t dot = base.find_last_of('.'); dot != std::string_view::npos && dot > 0)
    base = base.substr(0, dot);
  return std::string(base);
}

absl::StatusOr<bool> ParseBool(std::string_view key, std::string_view v) {
  std::string s = absl::AsciiStrToLower(absl::string_view(v.data(), v.size()));
  if (s == "1" || s == "true" || s == "yes" || s == "on") return true;
  if (s == "0" || s == "false" || s == "no" || s == "off") return false;
  return absl::InvalidArgumentError(
      absl::StrFormat("%s=%s: expected true or false", std::string(key), std::string(v)));
}

}  // namespace

std::string AbsolutePath(const std::string& path) {
  std::error_code ec;
  std::filesystem::path p = std::filesystem::absolute(path, ec);
  return ec ? path : p.lexically_normal().string();
}

bool SameFile(const std::string& a, const std::string& b) {
  if (a == b) return true;
  std::error_code ec, ec2;
  if (std::filesystem::equivalent(a, b, ec) && !ec) return true;
  const std::filesystem::path ca = std::filesystem::weakly_canonical(a, ec);
  const std::filesystem::path cb = std::filesystem::weakly_canonical(b, ec2);
  return !ec && !ec2 && ca == cb;
}

absl::Status CheckOwnFile(std::string_view given, const std::string& path,
                          std::span<const SnapshotSpec> others) {
  for (const SnapshotSpec& s : others)
    if (SameFile(s.path, path))
      return absl::InvalidArgumentError(absl::StrFormat(
          "snapshot=%s: %s is given twice (it is already snapshot '%s'); "
          "each snapshot needs its own COW file",
          given, path, s.name));
  return absl::OkStatus();
}

absl::Status ValidateSnapshotName(std::string_view name) {
  if (name.empty() || name.size() > 64)
    return absl::InvalidArgumentError(absl::StrFormat(
        "snapshot name '%s' must be 1 to 64 characters", std::string(name)));
  for (char c : name)
    if (!std::isalnum(static_cast<unsigned char>(c)) && c != '-' && c != '_' &&
        c != '.')
      return absl::InvalidArgumentError(absl::StrFormat(
          "snapshot name '%s' may hold only letters, digits, '-', '_' and '.'",
          std::string(name)));
  if (name == kOriginExport)
    return absl::InvalidArgumentError(
        "'origin' is the origin's export: choose another snapshot name");
  // The control socket's replies end with a line OK or ERR ...: a snapshot
  // so named would start a list line that reads as one.
  if (name == "OK" || name == "ERR")
    return absl::InvalidArgumentError(absl::StrFormat(
        "'%s' ends the control socket's replies: choose another snapshot name",
        std::string(name)));
  return absl::OkStatus();
}

absl::Status CheckCowSizeChunks(uint64_t cap, uint64_t chunk_bytes) {
  if (cap != 0 && cap < 3 * chunk_bytes)
    return absl::InvalidArgumentError(absl::StrFormat(
        "snapshot-cow-size=%d is under 3 chunks of %d bytes (header, area, "
        "data): make it larger",
        cap, chunk_bytes));
  return absl::OkStatus();
}

std::optional<uint64_t> NewStoreChunkBytes(const std::string& path,
                                           const StoreOptions& opts) {
  // Non-blocking, and only a regular file or a block device is read: a
  // FIFO would wait for a writer (the open then refuses it).
  const int fd = ::open(path.c_str(), O_RDONLY | O_NONBLOCK | O_CLOEXEC);
  bool has_header = false;
  if (fd >= 0) {
    struct stat sb;
    char header[kHeaderBytes];
    has_header = ::fstat(fd, &sb) == 0 && (S_ISREG(sb.st_mode) || S_ISBLK(sb.st_mode)) &&
                 ::pread(fd, header, sizeof header, 0) == sizeof header &&
                 DiskHeader::Decode(header).magic == kSnapMagic;
    ::close(fd);
  }
  if (has_header) return std::nullopt;
  return uint64_t{opts.chunk_sectors != 0 ? opts.chunk_sectors : kDefaultChunkSectors} *
         kSectorBytes;
}

absl::Status CheckCowSize(uint64_t cap, const ExceptionStore& store) {
  if (absl::Status st = CheckCowSizeChunks(cap, store.chunk_bytes()); !st.ok())
    return st;
  const uint64_t used = store.Usage().used_sectors * kSectorBytes;
  if (cap != 0 && used > cap)
    return absl::InvalidArgumentError(absl::StrFormat(
        "the COW file already uses %d bytes, more than snapshot-cow-size=%d: "
        "raise the cap",
        used, cap));
  return absl::OkStatus();
}

absl::StatusOr<bool> FilterConfig::Set(std::string_view key,
                                       std::string_view value) {
  const std::string v(value);
  // A key that takes one value, given twice with different values: the
  // last would silently win.
  if (key.starts_with("snapshot-") && key != "snapshot-merge") {
    auto [it, fresh] = given.emplace(key, v);
    if (!fresh && it->second != v)
      return absl::InvalidArgumentError(absl::StrFormat(
          "%s is given twice (%s, then %s): give it once", key, it->second, v));
  }
  if (key == "snapshot") {
    SnapshotSpec spec;
    // NAME=FILE when the part before '=' is a valid name; else all is FILE.
    size_t eq = v.find('=');
    if (eq != std::string::npos) {
      // Reserved names are refused, not taken as part of a file name.
      const std::string prefix = v.substr(0, eq);
      if (prefix == kOriginExport || prefix == "OK" || prefix == "ERR")
        return absl::InvalidArgumentError(absl::StrFormat(
            "snapshot=%s: %s", v, ValidateSnapshotName(prefix).message()));
    }
    if (eq != std::string::npos && ValidateSnapshotName(v.substr(0, eq)).ok()) {
      spec.name = v.substr(0, eq);
      spec.path = v.substr(eq + 1);
    } else {
      spec.path = v;
      spec.name = DefaultName(v);
    }
    if (spec.path.empty())
      return absl::InvalidArgumentError(
          absl::StrFormat("snapshot=%s: no COW file given", v));
    // nbdkit runs in / once in the background: name the file as the user
    // meant it, in list, status and logs.
    spec.path = AbsolutePath(spec.path);
    if (absl::Status st = ValidateSnapshotName(spec.name); !st.ok())
      return absl::InvalidArgumentError(absl::StrFormat(
          "snapshot=%s: %s; give one as snapshot=NAME=FILE", v, st.message()));
    if (absl::Status st = CheckOwnFile(v, spec.path, snapshots); !st.ok()) return st;
    for (const SnapshotSpec& s : snapshots)
      if (s.name == spec.name)
        return absl::InvalidArgumentError(absl::StrFormat(
            "snapshot=%s: the name '%s' is already used by %s; give one as "
            "snapshot=NAME=FILE",
            v, spec.name, s.path));
    snapshots.push_back(std::move(spec));
    return true;
  }
  if (key == "snapshot-chunk-size") {
    absl::StatusOr<uint32_t> cs = ParseChunkSize(v);
    if (!cs.ok())
      return absl::InvalidArgumentError(
          absl::StrFormat("snapshot-chunk-size=%s: %s", v, cs.status().message()));
    chunk_sectors = *cs;
    return true;
  }
  if (key == "snapshot-store") {
    absl::StatusOr<StoreType> t = ParseStoreType(v);
    if (!t.ok())
      return absl::InvalidArgumentError(
          absl::StrFormat("snapshot-store=%s: %s", v, t.status().message()));
    store_type = *t;
    return true;
  }
  if (key == "snapshot-cow-size") {
    absl::StatusOr<uint64_t> n = ParseByteSize(v);
    if (!n.ok())
      return absl::InvalidArgumentError(
          absl::StrFormat("snapshot-cow-size=%s: %s", v, n.status().message()));
    cow_size = *n;
    return true;
  }
  if (key == "snapshot-export") {
    default_export = v;
    return true;
  }
  if (key == "snapshot-merge") {
    if (merge && *merge != v)
      return absl::InvalidArgumentError(absl::StrFormat(
          "snapshot-merge=%s: already merging %s; only one merge per origin",
          v, *merge));
    merge = v;
    return true;
  }
  if (key == "snapshot-merge-exit") {
    absl::StatusOr<bool> b = ParseBool(key, v);
    if (!b.ok()) return b.status();
    merge_exit = *b;
    return true;
  }
  if (key == "snapshot-control") {
    // Empty would quietly mean no socket: a typo the user should hear of.
    if (v.empty())
      return absl::InvalidArgumentError("snapshot-control= needs a socket path");
    control_socket = v;
    return true;
  }
  return false;
}

absl::Status FilterConfig::Finish() {
  std::vector<std::string> names;
  for (const SnapshotSpec& s : snapshots) names.push_back(s.name);
  auto known = [&](const std::string& n) {
    for (const std::string& x : names)
      if (x == n) return true;
    return false;
  };
  if (default_export && *default_export != kOriginExport && !known(*default_export))
    return absl::InvalidArgumentError(absl::StrFormat(
        "snapshot-export=%s: no such snapshot; use origin or one of: %s",
        *default_export, names.empty() ? "(none given)" : absl::StrJoin(names, ", ")));
  if (merge && !known(*merge))
    return absl::InvalidArgumentError(absl::StrFormat(
        "snapshot-merge=%s: no such snapshot; give one of: %s", *merge,
        names.empty() ? "(none given)" : absl::StrJoin(names, ", ")));
  if (merge && default_export && *default_export == *merge)
    return absl::InvalidArgumentError(absl::StrFormat(
        "snapshot-export=%s: that snapshot is merging (snapshot-merge=%s), "
        "and a merging snapshot is not exported; use origin",
        *default_export, *merge));
  if (merge && store_type == StoreType::kTransient)
    return absl::InvalidArgumentError(absl::StrFormat(
        "snapshot-merge=%s: a transient (N) store keeps nothing across "
        "restarts, so it cannot be merged; use snapshot-store=P",
        *merge));
  if (merge_exit && !merge)
    return absl::InvalidArgumentError(
        "snapshot-merge-exit=true needs snapshot-merge=NAME");
  // Before any store is made; each store is checked again once open.
  if (chunk_sectors != 0)
    return CheckCowSizeChunks(cow_size, uint64_t{chunk_sectors} * kSectorBytes);
  return absl::OkStatus();
}

std::string FilterConfig::DefaultExport() const {
  if (default_export) return *default_export;
  if (snapshots.size() == 1 && !merge) return snapshots[0].name;
  return kOriginExport;
}

}  // namespace snap
