// nbdsnap create, info, check, dump.
#include "tools/offline.h"

#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/cleanup/cleanup.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_format.h"
#include "store/block_file.h"
#include "store/cow_format.h"
#include "store/cow_scan.h"
#include "store/exception_store.h"
#include "tools/cli.h"
#include "tools/json.h"

namespace snap::offline {
namespace {

using cli::CommandLine;
using cli::Fail;
using cli::kFail;
using cli::kOk;

std::string Message(const absl::Status& st) { return std::string(st.message()); }

// A human size for messages: "64 KiB", "4096 bytes".
std::string Bytes(uint64_t n) {
  if (n >= 1024 && n % (1u << 30) == 0) return absl::StrFormat("%d GiB", n >> 30);
  if (n >= 1024 && n % (1u << 20) == 0) return absl::StrFormat("%d MiB", n >> 20);
  if (n >= 1024 && n % 1024 == 0) return absl::StrFormat("%d KiB", n >> 10);
  return absl::StrFormat("%d bytes", n);
}

struct Header {
  uint64_t file_size = 0;
  DiskHeader disk;
  // No store yet: magic 0 (or a file too short for a header, all zero).
  // The kernel and the filter make a new store in such a file.
  bool is_new = false;
};

absl::StatusOr<Header> ReadHeader(BlockFile& file) {
  Header h;
  absl::StatusOr<uint64_t> size = file.Size();
  if (!size.ok()) return size.status();
  h.file_size = *size;
  if (h.file_size < kHeaderBytes) {
    // ScanCow and the store report a short file that is not zero.
    absl::StatusOr<std::optional<uint64_t>> used = FirstUsedByte(file);
    if (!used.ok()) return used.status();
    h.is_new = !used->has_value();
    return h;
  }
  char buf[kHeaderBytes];
  if (absl::Status st = file.PRead(buf, 0); !st.ok()) return st;
  h.disk = DiskHeader::Decode(buf);
  h.is_new = h.disk.magic == 0;
  return h;
}

}  // namespace

// ------------------------------------------------------------------ create

int Create(int argc, char** argv) {
  CommandLine cl("create", "FILE",
                 "Make FILE a new, empty dm-snapshot store: a header chunk and an "
                 "empty\nmetadata area, as the kernel writes them. FILE may be missing, "
                 "empty or\nall zero; anything else needs --force.");
  const std::string chunk_help = absl::StrFormat(
      "Bytes, b/k/M/G/T suffixes; power of 2, 512..1G (default %s)",
      Bytes(uint64_t{kDefaultChunkSectors} * kSectorBytes));
  cl.AddString("chunk-size", "SIZE", chunk_help.c_str());
  cl.AddString("store", "TYPE", "P, PO or N (default P)");
  cl.AddFlag("force", "Replace whatever FILE holds");
  if (std::optional<int> rc = cl.Parse(argc, argv)) return *rc;
  if (cl.args().size() != 1) return cl.UsageError("create needs exactly one FILE");
  const std::string& path = cl.args()[0];

  StoreOptions opts;
  opts.chunk_sectors = kDefaultChunkSectors;
  if (std::optional<std::string> t = cl.string("store")) {
    absl::StatusOr<StoreType> type = ParseStoreType(*t);
    if (!type.ok()) return cl.UsageError(Message(type.status()));
    opts.type = *type;
  }
  if (std::optional<std::string> c = cl.string("chunk-size")) {
    if (opts.type == StoreType::kTransient)
      return cl.UsageError(
          "--chunk-size means nothing to an N store, which keeps no header: give "
          "nbdkit snapshot-chunk-size= instead");
    absl::StatusOr<uint32_t> cs = ParseChunkSize(*c);
    if (!cs.ok()) return cl.UsageError(Message(cs.status()));
    opts.chunk_sectors = *cs;
  }

  struct stat st;
  const bool existed = ::stat(path.c_str(), &st) == 0;
  if (existed) {
    if (absl::Status s = CheckStoreFileKind(path, st.st_mode); !s.ok()) return Fail(Message(s));
  } else if (errno != ENOENT) {
    return Fail(absl::StrFormat("cannot open %s: %s", path, std::strerror(errno)));
  }
  absl::StatusOr<std::unique_ptr<BlockFile>> file =
      OpenPosixFile(path, OpenMode::kReadWriteCreate);
  if (!file.ok()) return Fail(Message(file.status()));
  // Whatever goes wrong from here, a file this command made goes again.
  bool done = false;
  absl::Cleanup remove_new_file = [&] {
    if (!existed && !done) ::unlink(path.c_str());
  };
  // The same lock nbdkit holds: never touch a file in use. The store takes
  // it again below, on the same open file, which is allowed.
  if (absl::Status s = (*file)->LockExclusive(); !s.ok()) return Fail(Message(s));

  std::string replaced;
  absl::StatusOr<uint64_t> size = (*file)->Size();
  if (!size.ok()) return Fail(Message(size.status()));
  if (*size > 0) {
    absl::StatusOr<std::optional<uint64_t>> nonzero = (*file)->FirstNonZeroByte(*size);
    if (!nonzero.ok()) return Fail(Message(nonzero.status()));
    if (nonzero->has_value()) {
      if (!cl.flag("force")) {
        absl::StatusOr<Header> h = ReadHeader(**file);
        if (h.ok() && h->disk.magic == kSnapMagic)
          return Fail(absl::StrFormat(
              "%s is already a snapshot store: refusing to replace it (its "
              "exceptions would be lost); use --force to start it afresh",
              path));
        return Fail(absl::StrFormat(
            "%s holds data (byte %d is not zero): refusing to overwrite it; "
            "use another file, or --force",
            path, **nonzero));
      }
      if (S_ISREG(st.st_mode)) {
        if (::truncate(path.c_str(), 0) != 0)
          return Fail(absl::StrFormat("cannot empty %s: %s", path, std::strerror(errno)));
        replaced = ", replacing its old contents";
      } else {
        // A block device keeps its size: clearing the start is enough for
        // the store (and the kernel) to take it as new.
        std::vector<char> zeros(std::min<uint64_t>(*size, 4096), 0);
        if (absl::Status s = (*file)->PWrite(zeros, 0); !s.ok()) return Fail(Message(s));
        replaced = ", over its old contents";
      }
    }
  }

  if (opts.type == StoreType::kTransient) {
    done = true;
    std::printf("%s: ready for a transient (N) store%s: N stores keep their "
                "exceptions in memory, so the file has no header and nothing in it "
                "survives a restart\n",
                path.c_str(), replaced.c_str());
    return kOk;
  }
  absl::StatusOr<std::unique_ptr<ExceptionStore>> store = OpenStore(std::move(*file), opts);
  if (!store.ok()) return Fail(Message(store.status()));
  done = true;
  std::printf("%s: new %s store%s, chunk size %llu bytes (%u sectors), status %s\n",
              path.c_str(), std::string(StoreTypeName(opts.type)).c_str(), replaced.c_str(),
              static_cast<unsigned long long>((*store)->chunk_bytes()),
              (*store)->chunk_sectors(), (*store)->StatusLine().c_str());
  return kOk;
}

// -------------------------------------------------------------------- info

namespace {

// What info prints, text or JSON. nullopt fields are JSON null: not known
// (a new store has no chunk size yet; an invalid one's exceptions are never
// read, as in the kernel).
struct InfoReport {
  std::string file;
  bool new_store = false;
  uint32_t magic = 0;
  bool valid = false;
  uint32_t version = 0;
  std::optional<uint64_t> chunk_sectors;
  std::optional<std::string> store_type;
  std::optional<uint64_t> exceptions;
  std::optional<uint64_t> areas;
  std::optional<uint64_t> used_sectors, total_sectors, metadata_sectors;
  uint64_t file_size = 0;
  std::optional<std::string> status;
  std::vector<std::string> notes;
};

std::string ToJson(const InfoReport& r) {
  std::optional<uint64_t> chunk_bytes;
  if (r.chunk_sectors) chunk_bytes = *r.chunk_sectors * kSectorBytes;
  JsonObject o;
  o.String("file", r.file)
      .Bool("new_store", r.new_store)
      .Number("magic", uint64_t{r.magic})
      .Bool("valid", r.valid)
      .Number("version", uint64_t{r.version})
      .Number("chunk_size_bytes", chunk_bytes)
      .Number("chunk_sectors", r.chunk_sectors)
      .String("store_type", r.store_type)
      .Number("exceptions", r.exceptions)
      .Number("areas", r.areas)
      .Number("used_sectors", r.used_sectors)
      .Number("total_sectors", r.total_sectors)
      .Number("metadata_sectors", r.metadata_sectors)
      .Number("file_size", r.file_size)
      .String("status", r.status)
      .Strings("notes", r.notes);
  return o.Str();
}

std::string ToText(const InfoReport& r) {
  std::string out = absl::StrFormat("file: %s\n", r.file);
  if (r.new_store) {
    absl::StrAppendFormat(&out,
                          "a new, empty store (magic 0, uninitialised): the filter or "
                          "the kernel writes its header when first using it\n"
                          "file size: %d bytes\n",
                          r.file_size);
  } else {
    absl::StrAppendFormat(&out, "magic: 0x%08x (SnAp)\n", r.magic);
    absl::StrAppendFormat(&out, "valid: %s\n",
                          r.valid ? "yes" : "no (the snapshot is Invalid)");
    absl::StrAppendFormat(&out, "version: %d\n", r.version);
    absl::StrAppendFormat(&out, "chunk size: %d bytes (%d sectors)\n",
                          *r.chunk_sectors * kSectorBytes, *r.chunk_sectors);
    absl::StrAppendFormat(&out, "store type: %s (P and PO look the same on disk)\n",
                          *r.store_type);
    if (r.exceptions) {
      absl::StrAppendFormat(&out, "exceptions: %d\n", *r.exceptions);
      absl::StrAppendFormat(&out, "metadata areas: %d\n", *r.areas);
      absl::StrAppendFormat(&out, "used: %d sectors, of which metadata: %d sectors\n",
                            *r.used_sectors, *r.metadata_sectors);
    } else {
      out += "exceptions: not read (the kernel reads none from an invalid store)\n";
    }
    absl::StrAppendFormat(&out, "file size: %d bytes (%d sectors)\n", r.file_size,
                          r.file_size / kSectorBytes);
    absl::StrAppendFormat(&out, "status: %s\n", *r.status);
  }
  for (const std::string& n : r.notes) absl::StrAppendFormat(&out, "note: %s\n", n);
  return out;
}

}  // namespace

int Info(int argc, char** argv) {
  CommandLine cl("info", "FILE",
                 "Describe the snapshot store in FILE: its header, exceptions, and "
                 "the\nstatus dmsetup would print with FILE as the COW device.");
  cl.AddFlag("json", "Print one JSON object");
  if (std::optional<int> rc = cl.Parse(argc, argv)) return *rc;
  if (cl.args().size() != 1) return cl.UsageError("info needs exactly one FILE");
  const std::string& path = cl.args()[0];

  absl::StatusOr<std::unique_ptr<BlockFile>> file = OpenPosixFile(path, OpenMode::kReadOnly);
  if (!file.ok()) return Fail(Message(file.status()));
  absl::StatusOr<Header> h = ReadHeader(**file);
  if (!h.ok()) return Fail(Message(h.status()));

  InfoReport r;
  r.file = path;
  r.file_size = h->file_size;
  r.magic = h->disk.magic;
  r.version = h->disk.version;
  if (h->is_new) {
    r.new_store = true;
    r.exceptions = 0;
    r.areas = 0;
    absl::StatusOr<std::optional<uint64_t>> used = FirstUsedByte(**file);
    if (!used.ok()) return Fail(Message(used.status()));
    if (used->has_value())
      r.notes.push_back(absl::StrFormat(
          "the magic is 0 but byte %d is not zero: the kernel would make a "
          "store here, the filter refuses to (it would overwrite data)",
          **used));
  } else {
    // The store itself, read-only: the status is the filter's own.
    StoreOptions opts{.read_only = true};
    BlockFile& raw = **file;
    absl::StatusOr<std::unique_ptr<ExceptionStore>> store = OpenStore(std::move(*file), opts);
    if (!store.ok()) return Fail(Message(store.status()));
    // A running nbdkit may have grown the file since ReadHeader: the size
    // read after the store never falls short of what the store uses.
    absl::StatusOr<uint64_t> size = raw.Size();
    if (!size.ok()) return Fail(Message(size.status()));
    r.file_size = *size;
    const ExceptionStore& s = **store;
    r.valid = s.valid();
    r.chunk_sectors = s.chunk_sectors();
    r.store_type = "P";
    r.status = s.StatusLine();
    r.notes = s.notes();
    if (r.valid) {
      const StoreUsage u = s.Usage();
      r.exceptions = s.exception_count();
      r.areas = u.metadata_sectors / s.chunk_sectors() - 1;
      r.used_sectors = u.used_sectors;
      r.total_sectors = u.total_sectors;
      r.metadata_sectors = u.metadata_sectors;
    } else {
      r.notes.push_back(s.invalid_reason());
    }
  }
  if (cl.flag("json"))
    std::printf("%s\n", ToJson(r).c_str());
  else
    std::fputs(ToText(r).c_str(), stdout);
  return kOk;
}

// ------------------------------------------------------------------- check

int Check(int argc, char** argv) {
  CommandLine cl("check", "FILE",
                 "Verify the snapshot store in FILE, more strictly than the kernel "
                 "does.\nExit status 0: clean; 1: damaged.");
  if (std::optional<int> rc = cl.Parse(argc, argv)) return *rc;
  if (cl.args().size() != 1) return cl.UsageError("check needs exactly one FILE");
  const std::string& path = cl.args()[0];

  absl::StatusOr<std::unique_ptr<BlockFile>> file = OpenPosixFile(path, OpenMode::kReadOnly);
  if (!file.ok()) return Fail(Message(file.status()));
  absl::StatusOr<Header> h = ReadHeader(**file);
  if (!h.ok()) return Fail(Message(h.status()));

  // What the kernel does not check: two records for one origin chunk
  // (flagged by the scan) and two records sharing one data chunk. Like the
  // scan's, only the first few are kept as text.
  std::vector<std::string> damage;
  uint64_t more_damage = 0;
  auto add_damage = [&](auto... args) {
    KeepBounded(damage, more_damage, absl::StrFormat(args...));
  };
  std::vector<bool> slot_used;
  uint64_t slots_named = 0;
  std::optional<Geometry> geo;
  if (ValidateChunkSectors(h->disk.chunk_sectors).ok()) geo.emplace(h->disk.chunk_sectors);
  absl::StatusOr<CowScan> scan = ScanCow(**file, [&](const ScannedRecord& r) {
    if (r.duplicate)
      add_damage(
          "%s: area %d record %d: origin chunk %d already has an exception in "
          "an earlier record (the kernel reads it from the earliest, unless a "
          "later one continues a run of consecutive chunks; nbdsnap dump "
          "marks the ones ignored)",
          path, r.area, r.index, r.record.old_chunk);
    // The scan only hands over records whose chunk is a data chunk of a
    // header it accepted (the one read above, unless it just changed).
    if (!geo) return;
    const uint64_t slot = *geo->ChunkToSlot(r.record.new_chunk);
    if (slot >= slot_used.size()) slot_used.resize(std::max(slot + 1, 2 * slot_used.size()));
    if (slot_used[slot]) {
      add_damage(
          "%s: area %d record %d: COW chunk %d (origin chunk %d) is named by an "
          "earlier record too: two exceptions share a COW chunk",
          path, r.area, r.index, r.record.new_chunk, r.record.old_chunk);
    } else {
      slot_used[slot] = true;
      ++slots_named;
    }
  });
  if (!scan.ok()) return Fail(Message(scan.status()));
  const CowScan& s = *scan;

  std::vector<std::string> lines = s.problems;
  uint64_t more = s.more_problems + more_damage;
  for (std::string& d : damage) KeepBounded(lines, more, std::move(d));
  if (s.tail_garbage)
    lines.push_back(absl::StrFormat(
        "%s: area %d has non-zero bytes after its last record (%d): the "
        "end of the list was overwritten, or the area was never zeroed",
        path, s.current_area, s.current_count));
  if (s.is_new && s.problems.empty()) {
    absl::StatusOr<std::optional<uint64_t>> used = FirstUsedByte(**file);
    if (!used.ok()) return Fail(Message(used.status()));
    if (used->has_value())
      lines.push_back(absl::StrFormat(
          "%s: not a store: the magic is 0 but byte %d is not zero, so the "
          "filter refuses to make a store here",
          path, **used));
  }
  for (const std::string& l : lines) std::printf("%s\n", l.c_str());
  if (more > 0)
    std::printf("%s: ... and %llu more problems\n", path.c_str(),
                static_cast<unsigned long long>(more));
  const uint64_t problems = lines.size() + more;

  // Harmless oddities. The scan's own warnings about duplicates and bytes
  // after the list are damage here, already printed above.
  for (const std::string& w : s.warnings)
    if (!(s.duplicates > 0 && w.find("repeat an origin chunk") != std::string::npos) &&
        !(s.tail_garbage && w.find("non-zero bytes after") != std::string::npos))
      std::printf("warning: %s\n", w.c_str());
  if (problems == 0 && s.max_slot_plus_one > slots_named)
    std::printf("warning: %s: %llu data chunks below the last one in use are not "
                "named by any record (space lost to copies that never committed; "
                "harmless)\n",
                path.c_str(), static_cast<unsigned long long>(s.max_slot_plus_one - slots_named));

  if (problems > 0) {
    std::printf("%s: damaged: %llu problem%s\n", path.c_str(),
                static_cast<unsigned long long>(problems), problems == 1 ? "" : "s");
    return kFail;
  }
  if (s.is_new)
    std::printf("%s: clean, a new, empty store (magic 0, uninitialised)\n", path.c_str());
  else if (s.header.valid == 0)
    std::printf("%s: clean, marked Invalid (valid = 0): the kernel reads no "
                "exceptions from it\n",
                path.c_str());
  else
    std::printf("%s: clean, %llu exceptions in %llu areas\n", path.c_str(),
                static_cast<unsigned long long>(s.exceptions),
                static_cast<unsigned long long>(s.current_area + 1));
  return kOk;
}

// -------------------------------------------------------------------- dump

int Dump(int argc, char** argv) {
  CommandLine cl("dump", "FILE",
                 "List the exceptions of the snapshot store in FILE, one line each, "
                 "in\non-disk order, after a comment line describing the store.");
  if (std::optional<int> rc = cl.Parse(argc, argv)) return *rc;
  if (cl.args().size() != 1) return cl.UsageError("dump needs exactly one FILE");
  const std::string& path = cl.args()[0];

  absl::StatusOr<std::unique_ptr<BlockFile>> file = OpenPosixFile(path, OpenMode::kReadOnly);
  if (!file.ok()) return Fail(Message(file.status()));
  absl::StatusOr<Header> h = ReadHeader(**file);
  if (!h.ok()) return Fail(Message(h.status()));
  if (h->is_new) {
    std::printf("# new store (magic 0, uninitialised): no exceptions\n");
    return kOk;
  }
  // Opening the store checks it (and gives the status); the scan then
  // lists the records as they are on disk, duplicates included.
  StoreOptions opts{.read_only = true};
  absl::StatusOr<std::unique_ptr<ExceptionStore>> store = OpenStore(std::move(*file), opts);
  if (!store.ok()) return Fail(Message(store.status()));
  const ExceptionStore& s = **store;
  std::printf("# chunk_size=%llu chunk_sectors=%u valid=%u exceptions=%llu status=%s\n",
              static_cast<unsigned long long>(s.chunk_bytes()), s.chunk_sectors(),
              h->disk.valid, static_cast<unsigned long long>(s.exception_count()),
              s.StatusLine().c_str());
  if (!s.valid()) {
    std::printf("# the snapshot is invalid: the kernel reads no exceptions from it\n");
    return kOk;
  }
  file = OpenPosixFile(path, OpenMode::kReadOnly);
  if (!file.ok()) return Fail(Message(file.status()));
  absl::StatusOr<CowScan> scan = ScanCow(**file, [&](const ScannedRecord& r) {
    // Of the records of a repeated chunk, the one dm (and the store) reads
    // it from is used; the others are ignored.
    std::optional<Exception> used = s.Lookup(r.record.old_chunk);
    const bool ignored = !used || used->cow_chunk != r.record.new_chunk;
    std::printf("area %llu index %llu: origin chunk %llu -> cow chunk %llu%s\n",
                static_cast<unsigned long long>(r.area),
                static_cast<unsigned long long>(r.index),
                static_cast<unsigned long long>(r.record.old_chunk),
                static_cast<unsigned long long>(r.record.new_chunk),
                ignored ? " (duplicate, ignored)" : "");
  });
  if (!scan.ok()) return Fail(Message(scan.status()));
  if (!scan->problems.empty())  // it changed since the store read it
    return Fail(absl::StrFormat("%s (run nbdsnap check)", scan->problems.front()));
  // What the kernel accepts but check calls damage or odd (duplicates,
  // bytes after the last record, records out of allocation order): the
  // list is printed all the same, and this says so.
  for (const std::string& w : scan->warnings)
    std::fprintf(stderr, "nbdsnap: warning: %s (run nbdsnap check)\n", w.c_str());
  return kOk;
}

}  // namespace snap::offline
