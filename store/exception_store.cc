#include "store/exception_store.h"

#include <algorithm>

#include "absl/strings/match.h"
#include "absl/strings/str_format.h"
#include "store/store_status.h"

namespace snap {

absl::StatusOr<StoreType> ParseStoreType(std::string_view text) {
  // Exactly the names, unlike dm's first-letter rule: there "nope" or
  // "no" would be N, and a typo would lose every exception at restart.
  for (StoreType t : {StoreType::kPersistent, StoreType::kPersistentOverflow,
                      StoreType::kTransient})
    if (std::string_view name = StoreTypeName(t);
        absl::EqualsIgnoreCase(absl::string_view(text.data(), text.size()),
                               absl::string_view(name.data(), name.size())))
      return t;
  return absl::InvalidArgumentError(absl::StrFormat(
      "store type '%s' is not one of P, PO or N (upper or lower case)",
      std::string(text)));
}

std::string_view StoreTypeName(StoreType type) {
  switch (type) {
    case StoreType::kPersistent: return "P";
    case StoreType::kPersistentOverflow: return "PO";
    case StoreType::kTransient: return "N";
  }
  return "?";
}

std::string FormatStatusLine(bool valid, bool merge_failed, bool overflowed,
                             const StoreUsage& u) {
  if (!valid) return "Invalid";
  if (merge_failed) return "Merge failed";
  if (overflowed) return "Overflow";
  return absl::StrFormat("%d/%d %d", u.used_sectors, u.total_sectors,
                         u.metadata_sectors);
}

absl::StatusOr<uint64_t> CowLimit(BlockFile& file, uint64_t size_cap) {
  const uint64_t cap = size_cap != 0 ? size_cap : kNoLimit;
  if (!file.is_block_device()) return cap;
  absl::StatusOr<uint64_t> size = file.Size();
  if (!size.ok()) return size.status();
  return std::min(cap, *size);
}

absl::StatusOr<std::unique_ptr<ExceptionStore>> OpenStore(
    std::unique_ptr<BlockFile> file, const StoreOptions& options) {
  if (options.type == StoreType::kTransient)
    return OpenTransientStore(std::move(file), options);
  return OpenPersistentStore(std::move(file), options);
}

absl::StatusOr<std::unique_ptr<ExceptionStore>> OpenStoreFile(
    const std::string& path, const StoreOptions& options) {
  absl::StatusOr<std::unique_ptr<BlockFile>> file = OpenPosixFile(
      path, options.read_only ? OpenMode::kReadOnly : OpenMode::kReadWriteCreate);
  if (!file.ok()) return file.status();
  return OpenStore(std::move(*file), options);
}

}  // namespace snap
