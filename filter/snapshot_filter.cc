// nbdkit glue: parameters, exports and callbacks. The I/O logic lives in
// SnapshotEngine; every callback catches everything (an exception escaping
// into nbdkit would abort the server) and maps errors to an errno.
#include <nbdkit-filter.h>

#include <errno.h>
#include <unistd.h>
#include <inttypes.h>

#include <memory>
#include <mutex>
#include <new>
#include <string>
#include <unordered_set>

#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "filter/config.h"
#include "filter/control_server.h"
#include "filter/errno_status.h"
#include "filter/log.h"
#include "filter/merge_runner.h"
#include "filter/nbdkit_origin.h"
#include "filter/snapshot_engine.h"
#include "store/cow_format.h"

namespace snap {
namespace {

FilterConfig g_config;
std::vector<std::shared_ptr<Snapshot>> g_opened;  // from config_complete
int g_thread_model = NBDKIT_THREAD_MODEL_PARALLEL;
NbdkitOrigin g_origin;
std::unique_ptr<SnapshotEngine> g_engine;
MergeRunner g_merge;
ControlServer g_control;
std::string g_unusable;  // why after_fork could not start: opens are refused

struct Handle {
  std::shared_ptr<Snapshot> snap;  // null: the origin export
  bool readonly;
};

// Handles not yet closed. nbdkit 1.32 can run .cleanup while a connection
// that has finished (.finalize done) has yet to call .close, and then exit
// before it does (about one exit in four under --run; waiting for the
// .close in .cleanup only waits: it comes after). Such a handle kept its
// snapshot, and so its store, open until the process was gone: a
// transient store's file was never zeroed, and a persistent one kept the
// space set aside past its end. Cleanup lets go of their snapshots.
std::mutex g_handles_mu;
std::unordered_set<Handle*> g_handles;

Handle* Opened(Handle* h) {
  std::lock_guard<std::mutex> l(g_handles_mu);
  try {
    g_handles.insert(h);
  } catch (...) {
    delete h;
    throw;
  }
  return h;
}

void LogToNbdkit(bool error, const std::string& m) {
  if (error)
    nbdkit_error("snapshot: %s", m.c_str());
  else
    nbdkit_debug("snapshot: %s", m.c_str());
}

// Runs body; turns a failed status or any exception into -1 and *err.
template <typename F>
int Guarded(int* err, F&& body, int expected_errno = 0) {
  try {
    absl::Status st = body();
    if (st.ok()) return 0;
    *err = StatusToErrno(st);
    // An answer the client asked for (ENOTSUP to a fast zero) is no error.
    if (*err == expected_errno)
      nbdkit_debug("snapshot: %s", std::string(st.message()).c_str());
    else
      nbdkit_error("snapshot: %s", std::string(st.message()).c_str());
    return -1;
  } catch (const std::bad_alloc&) {
    *err = ENOMEM;
    nbdkit_error("snapshot: out of memory");
  } catch (const std::exception& e) {
    *err = EIO;
    nbdkit_error("snapshot: internal error: %s", e.what());
  } catch (...) {
    *err = EIO;
    nbdkit_error("snapshot: internal error");
  }
  return -1;
}

std::string ExportNames() {
  std::vector<std::string> names = {kOriginExport};
  for (const auto& s : g_engine ? g_engine->List() : g_opened)
    if (!s->merging.load()) names.push_back(s->name);
  return absl::StrJoin(names, ", ");
}

std::string OriginDescription() {
  std::string d = absl::StrFormat("origin with %d snapshot(s)",
                                  g_engine ? g_engine->List().size() : g_opened.size());
  if (std::string merge = g_merge.Describe(); !merge.empty()) {
    absl::StrAppend(&d, "; ", merge);
    if (std::shared_ptr<Snapshot> m = g_engine ? g_engine->merging() : nullptr)
      absl::StrAppend(&d, " (", m->store->StatusLine(), ")");
  }
  return d;
}

void FlushAll() {
  if (!g_engine) return;
  // Acknowledged origin writes still queued go out first.
  if (absl::Status st = g_engine->OriginFlush(); !st.ok())
    nbdkit_error("snapshot: final flush of the origin: %s",
                 std::string(st.message()).c_str());
  for (const auto& s : g_engine->List())
    if (absl::Status st = s->store->Flush(); !st.ok() && s->store->valid())
      nbdkit_error("snapshot %s: final flush: %s", s->name.c_str(),
                   std::string(st.message()).c_str());
}

// snapshot-merge-exit: the merge thread ends the server.
void MergeDone(bool ok) {
  if (!g_config.merge_exit) return;
  if (ok) {
    nbdkit_shutdown();
    return;
  }
  // nbdkit 1.32 has no way to choose its exit status: everything is
  // durable already, so flush once more and leave with status 1.
  nbdkit_error("snapshot: merge failed; exiting (restart to resume it): %s",
               g_merge.Describe().c_str());
  FlushAll();
  g_control.RemoveSocketFile();
  _exit(1);
}

void snapshot_load() { SetLogSink(&LogToNbdkit); }

int snapshot_config(nbdkit_next_config* next, nbdkit_backend* nxdata,
                    const char* key, const char* value) {
  try {
    absl::StatusOr<bool> ours = g_config.Set(key, value);
    if (!ours.ok()) {
      nbdkit_error("snapshot: %s", std::string(ours.status().message()).c_str());
      return -1;
    }
    if (*ours) return 0;
  } catch (...) {
    nbdkit_error("snapshot: out of memory parsing %s", key);
    return -1;
  }
  return next(nxdata, key, value);
}

int snapshot_config_complete(nbdkit_next_config_complete* next,
                             nbdkit_backend* nxdata) {
  try {
    if (absl::Status st = g_config.Finish(); !st.ok()) {
      nbdkit_error("snapshot: %s", std::string(st.message()).c_str());
      return -1;
    }
    // Open the stores now, so a bad COW file is a clean startup error.
    for (size_t i = 0; i < g_config.snapshots.size(); ++i) {
      const SnapshotSpec& spec = g_config.snapshots[i];
      StoreOptions opts;
      opts.type = g_config.store_type;
      opts.chunk_sectors = g_config.chunk_sectors;
      opts.size_cap = g_config.cow_size;
      if (opts.type == StoreType::kTransient && opts.chunk_sectors == 0)
        opts.chunk_sectors = kDefaultChunkSectors;
      // Checked again now that the earlier files exist: a symlink to one
      // made just now is the same file.
      if (absl::Status st = CheckOwnFile(
              spec.path, spec.path,
              std::span<const SnapshotSpec>(g_config.snapshots).first(i));
          !st.ok()) {
        nbdkit_error("%s", std::string(st.message()).c_str());
        return -1;
      }
      // A new store's chunk size must fit the cap before its file is made
      // or a header goes into it (an existing header is checked once open).
      if (std::optional<uint64_t> chunk = NewStoreChunkBytes(spec.path, opts))
        if (absl::Status st = CheckCowSizeChunks(opts.size_cap, *chunk); !st.ok()) {
          nbdkit_error("snapshot=%s: %s", spec.path.c_str(),
                       std::string(st.message()).c_str());
          return -1;
        }
      absl::StatusOr<std::unique_ptr<ExceptionStore>> store =
          OpenStoreFile(spec.path, opts);
      if (!store.ok()) {
        nbdkit_error("snapshot=%s: %s", spec.path.c_str(),
                     std::string(store.status().message()).c_str());
        return -1;
      }
      // Checked per store: the chunk size may come from its header.
      if (absl::Status st = CheckCowSize(g_config.cow_size, **store); !st.ok()) {
        nbdkit_error("snapshot=%s: %s", spec.path.c_str(),
                     std::string(st.message()).c_str());
        return -1;
      }
      // Shown without -v: bytes past an area's last record, duplicate
      // records, a header overriding the chunk size asked for. (nbdkit
      // 1.32 has no warning level.)
      for (const std::string& note : (*store)->notes())
        nbdkit_error("snapshot: warning: %s", note.c_str());
      auto snap = std::make_shared<Snapshot>(spec.name, spec.path, std::move(*store));
      if (!snap->store->valid())
        nbdkit_debug("snapshot: %s is invalid: %s", spec.name.c_str(),
                     snap->store->invalid_reason().c_str());
      if (g_config.merge && *g_config.merge == spec.name && !snap->store->valid()) {
        nbdkit_error("snapshot-merge=%s: the snapshot is invalid (%s): there is "
                     "nothing consistent to merge",
                     spec.name.c_str(), snap->store->invalid_reason().c_str());
        return -1;
      }
      g_opened.push_back(std::move(snap));
    }
    if (!g_config.control_socket.empty())  // empty: none given
      if (absl::Status st = g_control.Bind(g_config.control_socket); !st.ok()) {
        nbdkit_error("snapshot: %s", std::string(st.message()).c_str());
        return -1;
      }
  } catch (const std::exception& e) {
    nbdkit_error("snapshot: %s", e.what());
    return -1;
  }
  return next(nxdata);
}

int snapshot_thread_model() { return NBDKIT_THREAD_MODEL_PARALLEL; }

int snapshot_get_ready(int thread_model) {
  g_thread_model = thread_model;
  return 0;
}

// Opens the origin and starts serving; an error leaves the server up but
// refusing every connection (see snapshot_after_fork).
absl::Status StartServing(nbdkit_backend* backend) {
  if (!g_origin.Open(backend, g_thread_model < NBDKIT_THREAD_MODEL_PARALLEL))
    return absl::UnavailableError("cannot open the origin (see the error above)");
  auto engine = std::make_unique<SnapshotEngine>(g_origin);
  for (auto& s : g_opened)
    if (absl::Status st = engine->Add(s); !st.ok()) return st;  // no merge yet
  if (g_config.merge && !g_origin.can_write())
    return absl::FailedPreconditionError(absl::StrFormat(
        "snapshot-merge=%s: the origin is read-only (the plugin below cannot "
        "write), so nothing can be merged into it",
        *g_config.merge));
  g_engine = std::move(engine);
  // The engine holds them now: one dropped later lets go of its file.
  g_opened.clear();
  if (g_config.merge) {
    std::shared_ptr<Snapshot> m = g_engine->Find(*g_config.merge);
    g_engine->StartMerge(m);
    // A merge that cannot start fails as in a step (logged, Merge failed,
    // resumed by a restart); the exports are served all the same.
    g_merge.Start(*g_engine, m, &MergeDone).IgnoreError();
  }
  return absl::OkStatus();
}

int snapshot_after_fork(nbdkit_backend* backend) {
  try {
    // Failing here would stop the server without a word to --run's command,
    // which then waits for ever: stay up and refuse every connection.
    if (absl::Status st = StartServing(backend); !st.ok()) {
      g_unusable = std::string(st.message());
      nbdkit_error("snapshot: %s", g_unusable.c_str());
      return 0;
    }
    ControlContext control;
    control.engine = g_engine.get();
    control.merge = &g_merge;
    control.defaults.type = g_config.store_type;
    control.defaults.chunk_sectors = g_config.chunk_sectors;
    control.defaults.size_cap = g_config.cow_size;
    control.merge_done = &MergeDone;
    g_control.Start(control);
    nbdkit_debug("snapshot: origin %" PRIu64 " bytes, %zu snapshot(s)%s",
                 g_origin.size(), g_engine->List().size(),
                 g_thread_model < NBDKIT_THREAD_MODEL_PARALLEL
                     ? ", origin calls serialized"
                     : "");
    return 0;
  } catch (const std::exception& e) {
    nbdkit_error("snapshot: %s", e.what());
    return -1;
  }
}

void snapshot_cleanup(nbdkit_backend*) {
  try {
    {
      // Their connections are finalized: no request runs on them now.
      std::lock_guard<std::mutex> l(g_handles_mu);
      for (Handle* h : g_handles) h->snap.reset();
    }
    g_control.Stop();
    g_merge.Stop();
    FlushAll();
    g_engine.reset();
    g_origin.Close();
    g_opened.clear();
  } catch (...) {
  }
}

int snapshot_list_exports(nbdkit_next_list_exports*, nbdkit_backend*, int, int,
                          nbdkit_exports* exports) {
  try {
    if (nbdkit_add_export(exports, kOriginExport, OriginDescription().c_str()) == -1)
      return -1;
    for (const auto& s : g_engine ? g_engine->List() : g_opened) {
      if (s->merging.load()) continue;
      if (nbdkit_add_export(exports, s->name.c_str(), s->Description().c_str()) == -1)
        return -1;
    }
    return 0;
  } catch (...) {
    nbdkit_error("snapshot: out of memory listing exports");
    return -1;
  }
}

const char* snapshot_default_export(nbdkit_next_default_export*, nbdkit_backend*,
                                    int, int) {
  try {
    return nbdkit_strdup_intern(g_config.DefaultExport().c_str());
  } catch (...) {
    return nullptr;
  }
}

void* snapshot_open(nbdkit_next_open*, nbdkit_context*, int readonly,
                    const char* exportname, int) {
  try {
    if (!g_unusable.empty()) {
      nbdkit_error("snapshot: not serving: %s", g_unusable.c_str());
      return nullptr;
    }
    std::string name = exportname;
    if (name.empty()) name = g_config.DefaultExport();
    auto* h = new Handle{nullptr, readonly != 0};
    if (name == kOriginExport) return Opened(h);
    h->snap = g_engine->Find(name);
    if (h->snap) {
      // Counted first: a merge refuses a snapshot with clients, and one
      // that starts anyway finds its writes refused (CheckWritable).
      ++h->snap->clients;
      if (!h->snap->merging.load()) return Opened(h);
      --h->snap->clients;
    }
    delete h;
    if (*exportname == '\0')
      nbdkit_error("snapshot: the default export is snapshot '%s', which was "
                   "dropped or is merging: ask for one of %s",
                   name.c_str(), ExportNames().c_str());
    else
      nbdkit_error("snapshot: unknown export '%s': this server exports %s",
                   name.c_str(), ExportNames().c_str());
  } catch (...) {
    nbdkit_error("snapshot: out of memory");
  }
  return nullptr;
}

void snapshot_close(void* handle) {
  auto* h = static_cast<Handle*>(handle);
  {
    std::lock_guard<std::mutex> l(g_handles_mu);
    g_handles.erase(h);
  }
  if (h->snap) --h->snap->clients;
  delete h;
}

Handle& H(void* handle) { return *static_cast<Handle*>(handle); }

int64_t snapshot_get_size(nbdkit_next*, void*) {
  return static_cast<int64_t>(g_origin.size());
}

const char* snapshot_export_description(nbdkit_next*, void* handle) {
  try {
    Handle& h = H(handle);
    std::string d = h.snap ? h.snap->Description() : OriginDescription();
    return nbdkit_strdup_intern(d.c_str());
  } catch (...) {
    return nullptr;
  }
}

int snapshot_block_size(nbdkit_next*, void* handle, uint32_t* minimum,
                        uint32_t* preferred, uint32_t* maximum) {
  Handle& h = H(handle);
  uint64_t chunk = 0;
  if (h.snap) {
    chunk = h.snap->chunk_bytes;
  } else {
    try {  // List copies: it may throw
      for (const auto& s : g_engine->List())
        chunk = chunk == 0 ? s->chunk_bytes : std::min(chunk, s->chunk_bytes);
    } catch (...) {
      chunk = 0;  // a hint only: fall back to the default
    }
  }
  // Unaligned requests reach the plugin (snapshot reads of chunks without
  // an exception, origin writes), so its minimum is ours; larger requests
  // are split at its maximum.
  *minimum = g_origin.block_min();
  *preferred = static_cast<uint32_t>(std::clamp<uint64_t>(
      std::max<uint64_t>(chunk, g_origin.block_preferred()), 512, 32 << 20));
  *preferred = std::max(*preferred, *minimum);
  *maximum = 0xffffffff;
  return 0;
}

int snapshot_can_write(nbdkit_next*, void* handle) {
  Handle& h = H(handle);
  if (h.readonly) return 0;
  return h.snap ? 1 : g_origin.can_write();
}
int snapshot_can_flush(nbdkit_next*, void*) { return 1; }
int snapshot_is_rotational(nbdkit_next*, void*) {
  return g_origin.is_rotational();
}
int snapshot_can_trim(nbdkit_next*, void*) { return 1; }
int snapshot_can_zero(nbdkit_next*, void*) { return NBDKIT_ZERO_NATIVE; }
int snapshot_can_fast_zero(nbdkit_next*, void*) { return 1; }
int snapshot_can_extents(nbdkit_next*, void*) { return 1; }
int snapshot_can_fua(nbdkit_next*, void*) { return NBDKIT_FUA_NATIVE; }
// Every connection sees the one shared origin and store, and a flush
// covers every connection's writes.
int snapshot_can_multi_conn(nbdkit_next*, void*) { return 1; }
int snapshot_can_cache(nbdkit_next*, void*) { return NBDKIT_CACHE_EMULATE; }

int snapshot_pread(nbdkit_next*, void* handle, void* buf, uint32_t count,
                   uint64_t offset, uint32_t, int* err) {
  return Guarded(err, [&] {
    std::span<char> b(static_cast<char*>(buf), count);
    Handle& h = H(handle);
    return h.snap ? g_engine->SnapRead(*h.snap, b, offset)
                  : g_engine->OriginRead(b, offset);
  });
}

int snapshot_pwrite(nbdkit_next*, void* handle, const void* buf, uint32_t count,
                    uint64_t offset, uint32_t flags, int* err) {
  return Guarded(err, [&] {
    std::span<const char> b(static_cast<const char*>(buf), count);
    const bool fua = flags & NBDKIT_FLAG_FUA;
    Handle& h = H(handle);
    return h.snap ? g_engine->SnapWrite(*h.snap, b, offset, fua)
                  : g_engine->OriginWrite(b, offset, fua);
  });
}

int snapshot_zero(nbdkit_next*, void* handle, uint32_t count, uint64_t offset,
                  uint32_t flags, int* err) {
  const bool fast = flags & NBDKIT_FLAG_FAST_ZERO;
  return Guarded(err, [&] {
    const bool fua = flags & NBDKIT_FLAG_FUA;
    Handle& h = H(handle);
    return h.snap ? g_engine->SnapZero(*h.snap, count, offset, fua, fast)
                  : g_engine->OriginZero(count, offset,
                                         flags & NBDKIT_FLAG_MAY_TRIM, fua, fast);
  }, fast ? ENOTSUP : 0);
}

int snapshot_trim(nbdkit_next*, void* handle, uint32_t count, uint64_t offset,
                  uint32_t flags, int* err) {
  return Guarded(err, [&] {
    Handle& h = H(handle);
    return h.snap ? g_engine->SnapTrim(*h.snap, count, offset)
                  : g_engine->OriginTrim(count, offset, flags & NBDKIT_FLAG_FUA);
  });
}

int snapshot_flush(nbdkit_next*, void* handle, uint32_t, int* err) {
  return Guarded(err, [&] {
    Handle& h = H(handle);
    return h.snap ? g_engine->SnapFlush(*h.snap) : g_engine->OriginFlush();
  });
}

int snapshot_extents(nbdkit_next*, void* handle, uint32_t count, uint64_t offset,
                     uint32_t flags, nbdkit_extents* extents, int* err) {
  return Guarded(err, [&]() -> absl::Status {
    Handle& h = H(handle);
    // The origin export shows the merged view while a merge runs: chunks
    // still in the merging COW are data, whatever the origin says.
    if (h.snap)  // as reads do
      if (absl::Status st = g_engine->CheckUsable(*h.snap); !st.ok()) return st;
    std::shared_ptr<Snapshot> view = h.snap ? h.snap : g_engine->merging();
    if (!view) {
      g_engine->WaitOriginWrites(offset, count);
      if (g_origin.Extents(count, offset, flags, extents, err) == -1)
        return OriginError("extents", offset, *err);
      return absl::OkStatus();
    }
    absl::Status st;
    g_engine->SnapClassify(*view, count, offset,
                           [&](uint64_t off, uint64_t len, bool in_cow) {
      if (!st.ok()) return;
      if (in_cow || !g_origin.can_extents()) {
        if (nbdkit_add_extent(extents, off, len, 0) == -1)
          st = ErrnoError(ENOMEM, "cannot add extent");
        return;
      }
      // The origin's own map for this piece, clipped to it.
      nbdkit_extents* tmp = nbdkit_extents_new(off, off + len);
      if (tmp == nullptr) {
        st = ErrnoError(ENOMEM, "cannot allocate extents");
        return;
      }
      int e = 0;
      if (g_origin.Extents(static_cast<uint32_t>(len), off, 0, tmp, &e) == -1) {
        st = OriginError("extents", off, e);
      } else {
        uint64_t covered = off;
        for (size_t i = 0; i < nbdkit_extents_count(tmp) && covered < off + len; ++i) {
          nbdkit_extent x = nbdkit_get_extent(tmp, i);
          uint64_t a = std::max(x.offset, covered);
          uint64_t b = std::min(x.offset + x.length, off + len);
          if (b <= a) continue;
          if (nbdkit_add_extent(extents, a, b - a, x.type) == -1) {
            st = ErrnoError(ENOMEM, "cannot add extent");
            break;
          }
          covered = b;
        }
        if (st.ok() && covered < off + len &&
            nbdkit_add_extent(extents, covered, off + len - covered, 0) == -1)
          st = ErrnoError(ENOMEM, "cannot add extent");
      }
      nbdkit_extents_free(tmp);
    });
    return st;
  });
}

int snapshot_cache(nbdkit_next*, void* handle, uint32_t count, uint64_t offset,
                   uint32_t, int* err) {
  // Reading is the only way to warm both the origin and the COW.
  return Guarded(err, [&] {
    std::vector<char> buf(count);
    Handle& h = H(handle);
    return h.snap ? g_engine->SnapRead(*h.snap, buf, offset)
                  : g_engine->OriginRead(buf, offset);
  });
}

}  // namespace
}  // namespace snap

#define CONFIG_HELP                                                            \
  "snapshot=[NAME=]COWFILE   (repeatable) A snapshot kept in COWFILE; NAME\n"  \
  "                          defaults to the file's basename.\n"              \
  "snapshot-chunk-size=SIZE  Chunk size of new stores (512 .. 1G, power\n"     \
  "                          of 2; default 64k). An existing header wins.\n" \
  "snapshot-store=P|PO|N     Persistent, persistent with overflow, or\n"      \
  "                          transient (default P).\n"                        \
  "snapshot-cow-size=SIZE    Cap on each COW file's size (default none).\n"  \
  "snapshot-export=origin|NAME  What the default export \"\" serves.\n"      \
  "snapshot-merge=NAME       Merge that snapshot into the origin in the\n"   \
  "                          background; resumes after a restart.\n"        \
  "snapshot-merge-exit=true  Exit when the merge is done (status 1 if it\n"   \
  "                          fails).\n"                                       \
  "snapshot-control=SOCKET   Unix socket for live commands: status, list,\n" \
  "                          take, drop, merge."

static struct nbdkit_filter filter = [] {
  struct nbdkit_filter f = {};
  f.name = "snapshot";
  f.longname = "nbdkit dm-snapshot filter";
  f.load = snap::snapshot_load;
  f.config = snap::snapshot_config;
  f.config_complete = snap::snapshot_config_complete;
  f.config_help = CONFIG_HELP;
  f.thread_model = snap::snapshot_thread_model;
  f.get_ready = snap::snapshot_get_ready;
  f.after_fork = snap::snapshot_after_fork;
  f.cleanup = snap::snapshot_cleanup;
  f.list_exports = snap::snapshot_list_exports;
  f.default_export = snap::snapshot_default_export;
  f.open = snap::snapshot_open;
  f.close = snap::snapshot_close;
  f.get_size = snap::snapshot_get_size;
  f.export_description = snap::snapshot_export_description;
  f.block_size = snap::snapshot_block_size;
  f.can_write = snap::snapshot_can_write;
  f.can_flush = snap::snapshot_can_flush;
  f.is_rotational = snap::snapshot_is_rotational;
  f.can_trim = snap::snapshot_can_trim;
  f.can_zero = snap::snapshot_can_zero;
  f.can_fast_zero = snap::snapshot_can_fast_zero;
  f.can_extents = snap::snapshot_can_extents;
  f.can_fua = snap::snapshot_can_fua;
  f.can_multi_conn = snap::snapshot_can_multi_conn;
  f.can_cache = snap::snapshot_can_cache;
  f.pread = snap::snapshot_pread;
  f.pwrite = snap::snapshot_pwrite;
  f.flush = snap::snapshot_flush;
  f.trim = snap::snapshot_trim;
  f.zero = snap::snapshot_zero;
  f.extents = snap::snapshot_extents;
  f.cache = snap::snapshot_cache;
  return f;
}();

NBDKIT_REGISTER_FILTER(filter)
