#include "store/cow_scan.h"

#include <algorithm>

#include "absl/container/flat_hash_set.h"
#include "absl/strings/str_format.h"

namespace snap {

absl::StatusOr<std::optional<uint64_t>> FirstUsedByte(BlockFile& file) {
  absl::StatusOr<uint64_t> size = file.Size();
  if (!size.ok()) return size.status();
  return file.FirstNonZeroByte(file.is_block_device() ? std::min<uint64_t>(*size, 4096)
                                                      : *size);
}

void KeepBounded(std::vector<std::string>& list, uint64_t& more, std::string text,
                 size_t max) {
  if (list.size() < max)
    list.push_back(std::move(text));
  else
    ++more;
}

absl::StatusOr<CowScan> ScanCow(
    BlockFile& file, const std::function<void(const ScannedRecord&)>& on_record,
    const std::function<bool(uint64_t)>& seen_before, const ScanOptions& options) {
  CowScan scan;
  // Records one problem; true when the scan should stop.
  auto problem = [&](std::string text) {
    KeepBounded(scan.problems, scan.more_problems, std::move(text),
                options.max_problems);
    return options.stop_at_first_problem;
  };
  absl::StatusOr<uint64_t> size = file.Size();
  if (!size.ok()) return size.status();
  scan.file_size = *size;
  const std::string& name = file.name();
  // Whether the file ends before byte end. A running nbdkit may be growing
  // it: it writes a record (or fills the area before a new one) only once
  // the file holds what the record names, so a size read after the record
  // never falls short of it. The size read first can: it is read again,
  // once per read of metadata, before anything is judged past the end.
  bool size_read_since_metadata = true;
  auto past_end = [&](uint64_t end) -> absl::StatusOr<bool> {
    if (end <= scan.file_size) return false;
    if (!size_read_since_metadata) {
      absl::StatusOr<uint64_t> now = file.Size();
      if (!now.ok()) return now.status();
      scan.file_size = std::max(scan.file_size, *now);
      size_read_since_metadata = true;
    }
    return end > scan.file_size;
  };

  if (scan.file_size < kHeaderBytes) {
    absl::StatusOr<std::optional<uint64_t>> used = FirstUsedByte(file);
    if (!used.ok()) return used.status();
    if (!used->has_value()) {
      scan.is_new = true;
      return scan;
    }
    // Data, in a file too short for a header, or a store made since.
    size_read_since_metadata = false;
    absl::StatusOr<bool> short_header = past_end(kHeaderBytes);
    if (!short_header.ok()) return short_header.status();
    if (*short_header) {
      (void)problem(absl::StrFormat(
          "%s: truncated in the header (%d bytes, a header needs %d)", name,
          scan.file_size, kHeaderBytes));
      return scan;
    }
  }
  char hdr[kHeaderBytes];
  if (absl::Status st = file.PRead(hdr, 0); !st.ok()) return st;
  size_read_since_metadata = false;
  scan.header = DiskHeader::Decode(hdr);
  const DiskHeader& h = scan.header;
  if (h.magic == 0) {
    scan.is_new = true;
    return scan;
  }
  if (h.magic != kSnapMagic) {
    (void)problem(absl::StrFormat(
        "%s: not a dm-snapshot COW file (magic 0x%08x, expected 0x%08x "
        "\"SnAp\")",
        name, h.magic, kSnapMagic));
    return scan;
  }
  if (h.version != kDiskVersion) {
    (void)problem(absl::StrFormat(
        "%s: unsupported COW format version %d (only version 1 exists)", name,
        h.version));
    return scan;
  }
  if (absl::Status st = ValidateChunkSectors(h.chunk_sectors); !st.ok()) {
    (void)problem(
        absl::StrFormat("%s: bad header: %s", name, st.message()));
    return scan;
  }
  const Geometry geo(h.chunk_sectors);
  const uint64_t cb = geo.chunk_bytes();
  absl::StatusOr<bool> short_chunk = past_end(cb);
  if (!short_chunk.ok()) return short_chunk.status();
  if (*short_chunk) {
    (void)problem(absl::StrFormat(
        "%s: truncated in the header chunk (%d bytes, chunk size is %d)", name,
        scan.file_size, cb));
    return scan;
  }
  if (h.valid == 0) return scan;  // invalid: the kernel reads no further

  const uint64_t epa = geo.exceptions_per_area();
  absl::flat_hash_set<uint64_t> seen;
  std::vector<char> buf(cb);
  uint64_t prev_new = 0;
  for (uint64_t area = 0;; ++area) {
    const uint64_t chunk = geo.AreaChunk(area);
    absl::StatusOr<bool> short_area = past_end((chunk + 1) * cb);
    if (!short_area.ok()) return short_area.status();
    if (*short_area) {
      (void)problem(absl::StrFormat(
          "%s: truncated in metadata area %d (chunk %d ends at byte %d, the "
          "file has %d)",
          name, area, chunk, (chunk + 1) * cb, scan.file_size));
      scan.current_area = area;
      return scan;
    }
    if (absl::Status st = file.PRead(buf, chunk * cb); !st.ok()) return st;
    size_read_since_metadata = false;
    uint64_t i = 0;
    for (; i < epa; ++i) {
      DiskRecord r = DiskRecord::Decode(buf.data() + i * kRecordBytes);
      if (r.new_chunk == 0) break;
      ++scan.exceptions;
      ScannedRecord sr{area, i, r, false};
      if (geo.IsMetadataChunk(r.new_chunk)) {
        if (problem(absl::StrFormat(
                "%s: area %d record %d maps origin chunk %d to chunk %d, "
                "which is %s",
                name, area, i, r.old_chunk, r.new_chunk,
                r.new_chunk == 1 || r.new_chunk == 0 ? "the header or area 0"
                                                     : "a metadata area")))
          return scan;
        continue;
      }
      // new_chunk is anything a damaged file holds: no overflow.
      absl::StatusOr<bool> short_data = past_end(
          r.new_chunk < UINT64_MAX / cb - 1 ? (r.new_chunk + 1) * cb : UINT64_MAX);
      if (!short_data.ok()) return short_data.status();
      if (*short_data) {
        if (problem(absl::StrFormat(
                "%s: area %d record %d points at chunk %d, past the end of "
                "the file (%d whole chunks): the file is truncated",
                name, area, i, r.new_chunk, scan.file_size / cb)))
          return scan;
        continue;
      }
      uint64_t slot = *geo.ChunkToSlot(r.new_chunk);
      if (slot >= UINT32_MAX) {
        if (problem(absl::StrFormat(
                "%s: area %d record %d: COW chunk %d is beyond what this "
                "tool supports (2^32 data chunks)",
                name, area, i, r.new_chunk)))
          return scan;
        continue;
      }
      if (r.new_chunk <= prev_new) scan.allocation_ordered = false;
      prev_new = r.new_chunk;
      scan.max_slot_plus_one = std::max(scan.max_slot_plus_one, slot + 1);
      if (seen_before ? seen_before(r.old_chunk) : !seen.insert(r.old_chunk).second) {
        sr.duplicate = true;
        ++scan.duplicates;
      }
      if (on_record) on_record(sr);
    }
    if (i < epa) {
      scan.current_area = area;
      scan.current_count = i;
      const auto tail = buf.begin() + static_cast<ptrdiff_t>(i * kRecordBytes);
      scan.tail_garbage =
          !std::all_of(tail, buf.end(), [](char c) { return c == 0; });
      if (scan.tail_garbage)
        scan.warnings.push_back(absl::StrFormat(
            "%s: area %d has non-zero bytes after its last record (%d); they "
            "are ignored and cleared on the next commit",
            name, area, i));
      std::fill(tail, buf.end(), 0);
      scan.current_area_buf = std::move(buf);
      break;
    }
  }
  if (scan.duplicates > 0)
    scan.warnings.push_back(absl::StrFormat(
        "%s: %d records repeat an origin chunk; each is read, as by the "
        "kernel, from the earliest record, unless a later one continues a "
        "run of consecutive chunks",
        name, scan.duplicates));
  if (!scan.allocation_ordered)
    scan.warnings.push_back(absl::StrFormat(
        "%s: records are not in allocation order (made by a kernel older "
        "than dm-snapshot 1.12?)",
        name));
  return scan;
}

}  // namespace snap
