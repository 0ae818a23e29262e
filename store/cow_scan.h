// Reads a persistent COW file the way the kernel does, but checks every
// record, so the same pass serves opening a store (refuse on any problem)
// and `nbdsnap check` (list them all).
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "store/block_file.h"
#include "store/cow_format.h"

namespace snap {

struct ScannedRecord {
  uint64_t area = 0;
  uint64_t index = 0;  // within the area
  DiskRecord record;
  bool duplicate = false;  // an earlier record has the same old_chunk
};

struct CowScan {
  uint64_t file_size = 0;
  DiskHeader header;
  bool is_new = false;  // magic 0: no store yet (the kernel makes a new one)
  // Problems make the file unusable as it is; open refuses on the first.
  // At most ScanOptions::max_problems are kept; more_problems counts the
  // rest.
  std::vector<std::string> problems;
  uint64_t more_problems = 0;
  // Oddities the kernel accepts (duplicates, garbage after the list, holes).
  std::vector<std::string> warnings;
  uint64_t exceptions = 0;   // records read, duplicates included
  uint64_t duplicates = 0;
  uint64_t current_area = 0;
  uint64_t current_count = 0;  // records in the current area
  uint64_t max_slot_plus_one = 0;  // next_free as a slot
  bool allocation_ordered = true;   // new_chunk rises through the records
  bool tail_garbage = false;  // non-zero bytes after the list's end
  std::vector<char> current_area_buf;  // the last, partly filled area
};

// A damaged 100 GiB COW can hold millions of bad records: a scan keeps
// the text of a few.
inline constexpr size_t kMaxKeptProblems = 100;

// Adds text to list while it holds fewer than max lines; counts it in more
// otherwise.
void KeepBounded(std::vector<std::string>& list, uint64_t& more, std::string text,
                 size_t max = kMaxKeptProblems);

struct ScanOptions {
  // Opening a store refuses on the first problem: no need to read on.
  bool stop_at_first_problem = false;
  size_t max_problems = kMaxKeptProblems;
};

// Reads the header and every area up to the first one that is not full,
// calling on_record for each record. Fails only when the file cannot be
// read at all; everything else lands in problems/warnings. seen_before
// tells whether an origin chunk had a record already (a caller that keeps
// its own table saves the scan a second one); without it a set is kept.
absl::StatusOr<CowScan> ScanCow(
    BlockFile& file,
    const std::function<void(const ScannedRecord&)>& on_record = {},
    const std::function<bool(uint64_t old_chunk)>& seen_before = {},
    const ScanOptions& options = {});

// Where a file that holds no store shows it holds data, or nullopt: then
// a new store may be made in it. A regular file must be all zero, since a
// new store writes two whole chunks (up to 2 GiB); a block device only in
// its first 4 KiB, which is all LVM zeroes of a new COW volume.
absl::StatusOr<std::optional<uint64_t>> FirstUsedByte(BlockFile& file);

}  // namespace snap
