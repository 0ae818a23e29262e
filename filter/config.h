// The filter's parameters, parsed and checked without nbdkit.
#pragma once

#include <cstdint>
#include <map>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "store/exception_store.h"

namespace snap {

struct SnapshotSpec {
  std::string name;
  std::string path;
};

struct FilterConfig {
  std::vector<SnapshotSpec> snapshots;
  uint32_t chunk_sectors = 0;  // 0: default for new stores
  StoreType store_type = StoreType::kPersistent;
  uint64_t cow_size = 0;       // 0: unlimited
  std::optional<std::string> default_export;  // "origin" or a snapshot name
  std::optional<std::string> merge;           // snapshot to merge
  bool merge_exit = false;
  std::string control_socket;
  // The single-value keys given so far, with their values.
  std::map<std::string, std::string, std::less<>> given;

  // Takes one key=value; false if the key is not ours.
  absl::StatusOr<bool> Set(std::string_view key, std::string_view value);
  // Cross-checks once every key is in.
  absl::Status Finish();
  // What the export "" serves: "origin" or a snapshot name.
  std::string DefaultExport() const;
};

inline constexpr char kOriginExport[] = "origin";

// One file under two names (a symlink, a hard link, a/../b): its second
// open would find it locked by this very process.
bool SameFile(const std::string& a, const std::string& b);
// An error naming the snapshot among others whose COW file path is.
absl::Status CheckOwnFile(std::string_view given, const std::string& path,
                          std::span<const SnapshotSpec> others);

// Names: letters, digits, '-', '_', '.', at most 64 bytes, not "origin",
// "OK" or "ERR".
absl::Status ValidateSnapshotName(std::string_view name);
// PATH against the current directory, normalized; PATH itself when the
// current directory cannot be had.
std::string AbsolutePath(const std::string& path);

// snapshot-cow-size=CAP must leave room for 3 chunks (header, metadata
// area, one data chunk), as lvm2 demands. OK when CAP is 0 (no cap).
absl::Status CheckCowSizeChunks(uint64_t cap, uint64_t chunk_bytes);
// The chunk size a store opened in path with opts would be made with:
// nullopt when path already begins with a store's header (whose chunk size
// counts), else opts' (or the default). What refuses a new store is
// checked with it before the open writes a header into the file.
std::optional<uint64_t> NewStoreChunkBytes(const std::string& path,
                                           const StoreOptions& opts);
// The same for an opened store (its header's chunk size counts), and CAP
// must hold what the store already uses. Startup and `take` both ask.
absl::Status CheckCowSize(uint64_t cap, const ExceptionStore& store);

}  // namespace snap
