// nbdsnap: inspect and create dm-snapshot COW files offline, and (with -c)
// drive a running filter through its control socket.
#include <glib.h>
#include <sys/stat.h>

#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include "absl/container/flat_hash_set.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "store/block_file.h"
#include "store/cow_format.h"
#include "store/cow_scan.h"
#include "store/exception_store.h"
#include "tools/json.h"
#include "tools/online.h"

namespace {

constexpr int kOk = 0, kFail = 1, kUsage = 2;

int Fail(const std::string& why) {
  std::fprintf(stderr, "nbdsnap: %s\n", why.c_str());
  return kFail;
}

int UsageError(const std::string& why) {
  std::fprintf(stderr, "nbdsnap: %s (see nbdsnap --help)\n", why.c_str());
  return kUsage;
}

const char kHelp[] =
    "usage: nbdsnap COMMAND [OPTIONS] FILE\n"
    "       nbdsnap -c SOCKET LIVE-COMMAND [ARGS]\n"
    "\n"
    "Offline commands, on a dm-snapshot persistent COW file:\n"
    "  create [--chunk-size SIZE] [--store P|PO|N] [--force] FILE\n"
    "                          make a new, empty store (default chunk 64k)\n"
    "  info [--json] FILE      header, chunk size, exceptions, dm status\n"
    "  check FILE              verify the store: exit 0 clean, 1 damaged\n"
    "  dump FILE               one line per exception\n"
    "\n"
    "Live commands, to nbdkit running with snapshot-control=SOCKET:\n"
    "  status [--json] | list | take NAME FILE [--chunk-size SIZE]\n"
    "  [--store P|PO|N] | drop NAME | merge NAME [--wait]\n"
    "\n"
    "Exit status: 0 success, 1 failure (or a damaged store for check, a\n"
    "refusal or failed merge for live commands), 2 usage error, 3 the\n"
    "control socket cannot be reached.\n";

// Parses OPTIONS for one command; leaves the rest in args.
bool Parse(const char* cmd, GOptionEntry* entries, int* argc, char*** argv,
           std::string* error) {
  GOptionContext* oc = g_option_context_new(cmd);
  g_option_context_add_main_entries(oc, entries, nullptr);
  GError* gerr = nullptr;
  bool ok = g_option_context_parse(oc, argc, argv, &gerr);
  if (!ok) {
    *error = gerr->message;
    g_error_free(gerr);
  }
  g_option_context_free(oc);
  return ok;
}

struct Scanned {
  snap::CowScan scan;
  std::vector<snap::ScannedRecord> records;
  uint64_t shared_data_chunks = 0;  // records sharing one COW chunk
};

absl::StatusOr<Scanned> Scan(const std::string& path, bool keep_records) {
  absl::StatusOr<std::unique_ptr<snap::BlockFile>> file =
      snap::OpenPosixFile(path, snap::OpenMode::kReadOnly);
  if (!file.ok()) return file.status();
  Scanned out;
  absl::flat_hash_set<uint64_t> data_chunks;
  absl::StatusOr<snap::CowScan> scan =
      snap::ScanCow(**file, [&](const snap::ScannedRecord& r) {
        if (!data_chunks.insert(r.record.new_chunk).second) ++out.shared_data_chunks;
        if (keep_records) out.records.push_back(r);
      });
  if (!scan.ok()) return scan.status();
  out.scan = std::move(*scan);
  return out;
}

// The tail of dmsetup status for the store, as the kernel would print it
// with the file as the COW device.
std::string StatusOf(const snap::CowScan& s) {
  if (s.header.valid == 0) return "Invalid";
  const snap::Geometry g(s.header.chunk_sectors);
  return absl::StrFormat("%d/%d %d", g.SlotToChunk(s.max_slot_plus_one) * g.chunk_sectors(),
                         s.file_size / 512, (s.current_area + 2) * g.chunk_sectors());
}

int Create(int argc, char** argv) {
  gchar* chunk = nullptr;
  gchar* store = nullptr;
  gboolean force = FALSE;
  GOptionEntry entries[] = {
      {"chunk-size", 0, 0, G_OPTION_ARG_STRING, &chunk, "chunk size (default 64k)", "SIZE"},
      {"store", 0, 0, G_OPTION_ARG_STRING, &store, "P, PO or N (default P)", "TYPE"},
      {"force", 0, 0, G_OPTION_ARG_NONE, &force, "overwrite a file that is not empty", nullptr},
      {nullptr, 0, 0, G_OPTION_ARG_NONE, nullptr, nullptr, nullptr}};
  std::string err;
  if (!Parse("create FILE - make a new, empty store", entries, &argc, &argv, &err))
    return UsageError(err);
  if (argc != 2) return UsageError("create needs exactly one FILE");
  const std::string path = argv[1];
  snap::StoreOptions opts;
  opts.chunk_sectors = snap::kDefaultChunkSectors;
  if (chunk != nullptr) {
    absl::StatusOr<uint32_t> cs = snap::ParseChunkSize(chunk);
    if (!cs.ok()) return UsageError(std::string(cs.status().message()));
    opts.chunk_sectors = *cs;
  }
  if (store != nullptr) {
    absl::StatusOr<snap::StoreType> t = snap::ParseStoreType(store);
    if (!t.ok()) return UsageError(std::string(t.status().message()));
    opts.type = *t;
  }
  struct stat st;
  if (::stat(path.c_str(), &st) == 0 && st.st_size > 0) {
    absl::StatusOr<std::unique_ptr<snap::BlockFile>> f =
        snap::OpenPosixFile(path, snap::OpenMode::kReadOnly);
    if (!f.ok()) return Fail(std::string(f.status().message()));
    absl::StatusOr<bool> unused = snap::LooksUnused(**f);
    if (!unused.ok()) return Fail(std::string(unused.status().message()));
    if (!*unused && !force)
      return Fail(absl::StrFormat(
          "%s exists and is not empty: refusing to overwrite it (use --force, "
          "or another file)", path));
    if (!*unused || force) {
      if (::truncate(path.c_str(), 0) != 0)
        return Fail(absl::StrFormat("cannot empty %s: %s", path, std::strerror(errno)));
    }
  }
  if (opts.type == snap::StoreType::kTransient) {
    absl::StatusOr<std::unique_ptr<snap::BlockFile>> f =
        snap::OpenPosixFile(path, snap::OpenMode::kReadWriteCreate);
    if (!f.ok()) return Fail(std::string(f.status().message()));
    std::printf("%s: empty file for a transient (N) store: N stores have no "
                "on-disk format and keep nothing across restarts\n",
                path.c_str());
    return kOk;
  }
  absl::StatusOr<std::unique_ptr<snap::ExceptionStore>> s = snap::OpenStoreFile(path, opts);
  if (!s.ok()) return Fail(std::string(s.status().message()));
  std::printf("%s: new %s store, chunk size %llu bytes, status %s\n", path.c_str(),
              std::string(snap::StoreTypeName(opts.type)).c_str(),
              static_cast<unsigned long long>((*s)->chunk_bytes()),
              (*s)->StatusLine().c_str());
  return kOk;
}

int Info(int argc, char** argv) {
  gboolean json = FALSE;
  GOptionEntry entries[] = {
      {"json", 0, 0, G_OPTION_ARG_NONE, &json, "print one JSON object", nullptr},
      {nullptr, 0, 0, G_OPTION_ARG_NONE, nullptr, nullptr, nullptr}};
  std::string err;
  if (!Parse("info FILE - describe a store", entries, &argc, &argv, &err))
    return UsageError(err);
  if (argc != 2) return UsageError("info needs exactly one FILE");
  const std::string path = argv[1];
  absl::StatusOr<Scanned> sc = Scan(path, false);
  if (!sc.ok()) return Fail(std::string(sc.status().message()));
  const snap::CowScan& s = sc->scan;
  if (!s.problems.empty() && !s.is_new) {
    for (const std::string& p : s.problems) std::fprintf(stderr, "nbdsnap: %s\n", p.c_str());
    return kFail;
  }
  const uint64_t cs = s.header.chunk_sectors;
  const uint64_t exceptions = s.exceptions - s.duplicates;
  const std::string status = s.is_new ? "" : StatusOf(s);
  if (json) {
    std::vector<std::string> warnings;
    for (const std::string& w : s.warnings) warnings.push_back(snap::JsonString(w));
    std::printf(
        "{\"file\": %s, \"new_store\": %s, \"magic\": %u, \"valid\": %s, "
        "\"version\": %u, \"chunk_size_bytes\": %llu, \"chunk_sectors\": %llu, "
        "\"store_type\": \"P\", \"exceptions\": %llu, \"areas\": %llu, "
        "\"file_size\": %llu, \"used_sectors\": %llu, \"total_sectors\": %llu, "
        "\"metadata_sectors\": %llu, \"status\": %s, \"warnings\": [%s]}\n",
        snap::JsonString(path).c_str(), s.is_new ? "true" : "false", s.header.magic,
        !s.is_new && s.header.valid != 0 ? "true" : "false", s.header.version,
        static_cast<unsigned long long>(cs * 512), static_cast<unsigned long long>(cs),
        static_cast<unsigned long long>(exceptions),
        static_cast<unsigned long long>(s.is_new ? 0 : s.current_area + 1),
        static_cast<unsigned long long>(s.file_size),
        static_cast<unsigned long long>(
            s.is_new ? 0 : snap::Geometry(cs).SlotToChunk(s.max_slot_plus_one) * cs),
        static_cast<unsigned long long>(s.file_size / 512),
        static_cast<unsigned long long>(s.is_new ? 0 : (s.current_area + 2) * cs),
        snap::JsonString(status).c_str(),
        absl::StrJoin(warnings, ", ").c_str());
    return kOk;
  }
  std::printf("file: %s\n", path.c_str());
  if (s.is_new) {
    std::printf("a new, uninitialised store (magic 0): the filter makes it a "
                "store when first used\nfile size: %llu bytes\n",
                static_cast<unsigned long long>(s.file_size));
    return kOk;
  }
  std::printf("magic: 0x%08x (SnAp)\nvalid: %s\nversion: %u\n", s.header.magic,
              s.header.valid ? "yes" : "no (the snapshot is Invalid)", s.header.version);
  std::printf("chunk size: %llu bytes (%llu sectors)\n",
              static_cast<unsigned long long>(cs * 512), static_cast<unsigned long long>(cs));
  std::printf("store type: P (persistent; PO is a mount option, not on disk)\n");
  std::printf("exceptions: %llu\nmetadata areas: %llu\nfile size: %llu bytes\n",
              static_cast<unsigned long long>(exceptions),
              static_cast<unsigned long long>(s.current_area + 1),
              static_cast<unsigned long long>(s.file_size));
  std::printf("status: %s\n", status.c_str());
  for (const std::string& w : s.warnings) std::printf("warning: %s\n", w.c_str());
  return kOk;
}

int Check(int argc, char** argv) {
  GOptionEntry entries[] = {{nullptr, 0, 0, G_OPTION_ARG_NONE, nullptr, nullptr, nullptr}};
  std::string err;
  if (!Parse("check FILE - verify a store", entries, &argc, &argv, &err))
    return UsageError(err);
  if (argc != 2) return UsageError("check needs exactly one FILE");
  const std::string path = argv[1];
  absl::StatusOr<Scanned> sc = Scan(path, false);
  if (!sc.ok()) return Fail(std::string(sc.status().message()));
  const snap::CowScan& s = sc->scan;
  int damage = 0;
  for (const std::string& p : s.problems) {
    std::printf("%s\n", p.c_str());
    ++damage;
  }
  if (s.duplicates > 0) {
    std::printf("%s: %llu records repeat an origin chunk (the kernel uses the "
                "earliest)\n",
                path.c_str(), static_cast<unsigned long long>(s.duplicates));
    ++damage;
  }
  if (sc->shared_data_chunks > 0) {
    std::printf("%s: %llu records share a COW chunk with another record\n",
                path.c_str(), static_cast<unsigned long long>(sc->shared_data_chunks));
    ++damage;
  }
  if (s.tail_garbage) {
    std::printf("%s: area %llu has non-zero bytes after its last record\n",
                path.c_str(), static_cast<unsigned long long>(s.current_area));
    ++damage;
  }
  for (const std::string& w : s.warnings)
    if (w.find("repeat an origin chunk") == std::string::npos &&
        w.find("non-zero bytes after") == std::string::npos)
      std::printf("warning: %s\n", w.c_str());
  if (damage > 0) return kFail;
  if (s.is_new) {
    std::printf("%s: clean, a new, uninitialised store\n", path.c_str());
  } else {
    std::printf("%s: clean, %llu exceptions in %llu areas%s\n", path.c_str(),
                static_cast<unsigned long long>(s.exceptions),
                static_cast<unsigned long long>(s.current_area + 1),
                s.header.valid ? "" : " (marked Invalid)");
  }
  return kOk;
}

int Dump(int argc, char** argv) {
  GOptionEntry entries[] = {{nullptr, 0, 0, G_OPTION_ARG_NONE, nullptr, nullptr, nullptr}};
  std::string err;
  if (!Parse("dump FILE - list the exceptions", entries, &argc, &argv, &err))
    return UsageError(err);
  if (argc != 2) return UsageError("dump needs exactly one FILE");
  absl::StatusOr<Scanned> sc = Scan(argv[1], true);
  if (!sc.ok()) return Fail(std::string(sc.status().message()));
  const snap::CowScan& s = sc->scan;
  if (!s.problems.empty() && !s.is_new) {
    for (const std::string& p : s.problems) std::fprintf(stderr, "nbdsnap: %s\n", p.c_str());
    return kFail;
  }
  std::printf("# chunk_size=%llu valid=%u exceptions=%llu status=%s\n",
              static_cast<unsigned long long>(s.header.chunk_sectors) * 512,
              s.header.valid, static_cast<unsigned long long>(s.exceptions),
              s.is_new ? "new" : StatusOf(s).c_str());
  for (const snap::ScannedRecord& r : sc->records)
    std::printf("area %llu index %llu: origin chunk %llu -> cow chunk %llu%s\n",
                static_cast<unsigned long long>(r.area),
                static_cast<unsigned long long>(r.index),
                static_cast<unsigned long long>(r.record.old_chunk),
                static_cast<unsigned long long>(r.record.new_chunk),
                r.duplicate ? " (duplicate, ignored)" : "");
  return kOk;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2) return UsageError("no command given");
  const std::string cmd = argv[1];
  if (cmd == "-c" || cmd == "--control") {
    if (argc < 4) return UsageError("-c SOCKET needs a live command");
    return snap::RunOnline(argv[2], argc - 3, argv + 3);
  }
  if (cmd == "--help" || cmd == "-h" || cmd == "help") {
    std::fputs(kHelp, stdout);
    return kOk;
  }
  // Each command parses its own options: pass "nbdsnap CMD" as argv[0].
  int sub_argc = argc - 1;
  char** sub_argv = argv + 1;
  if (cmd == "create") return Create(sub_argc, sub_argv);
  if (cmd == "info") return Info(sub_argc, sub_argv);
  if (cmd == "check") return Check(sub_argc, sub_argv);
  if (cmd == "dump") return Dump(sub_argc, sub_argv);
  return UsageError(absl::StrFormat("unknown command '%s'", cmd));
}
