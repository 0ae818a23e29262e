#include "filter/control_commands.h"

#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <vector>

#include "absl/cleanup/cleanup.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_split.h"
#include "filter/config.h"
#include "filter/log.h"
#include "store/cow_format.h"

namespace snap {
namespace {

std::string Err(absl::string_view why) {
  std::string line(why);
  for (char& c : line)
    if (c == '\n' || c == '\r') c = ' ';
  return absl::StrCat("ERR ", line, "\n");
}

using Words = std::vector<std::string>;

constexpr char kTakeParams[] = " NAME FILE [CHUNK-SIZE] [P|PO|N]";

std::string Status(ControlContext& ctx, const Words&) {
  std::string out;
  std::string merge = ctx.merge->Describe();
  absl::StrAppend(&out, "origin: ", ctx.engine->size(), " bytes",
                  merge.empty() ? "" : "; ", merge, "\n");
  if (std::shared_ptr<Snapshot> m = ctx.engine->merging())
    absl::StrAppend(&out, m->name, ": ", m->store->StatusLine(), " (merging)\n");
  for (const auto& s : ctx.engine->List())
    if (!s->merging.load())
      absl::StrAppend(&out, s->name, ": ", s->store->StatusLine(), "\n");
  return out + "OK\n";
}

std::string List(ControlContext& ctx, const Words&) {
  std::string out;
  for (const auto& s : ctx.engine->List())
    absl::StrAppend(&out,
                    absl::StrFormat("%s %s %s %d %s%s\n", s->name, s->path,
                                    StoreTypeName(s->store->type()),
                                    s->chunk_bytes, s->store->StatusLine(),
                                    s->merging.load() ? " merging" : ""));
  return out + "OK\n";
}

std::string Take(ControlContext& ctx, const Words& w) {
  const std::string& name = w[1];
  if (absl::Status st = ValidateSnapshotName(name); !st.ok()) return Err(st.message());
  if (ctx.merge->failed())
    return Err(absl::StrCat("no snapshot can be taken until the failed merge "
                            "completes: ", ctx.merge->Describe()));
  if (absl::Status st = ctx.engine->CanTake(); !st.ok()) return Err(st.message());
  if (ctx.engine->Find(name))
    return Err(absl::StrFormat("a snapshot named %s exists already", name));
  const std::string& file = w[2];
  for (unsigned char c : file)
    if (c < ' ' || c == 0x7f)
      return Err("FILE contains a control character: choose another file name");
  // The server's working directory is not the client's (a daemonized
  // nbdkit's is /): a relative name would land somewhere unexpected.
  if (file.front() != '/')
    return Err(absl::StrFormat(
        "FILE %s is relative: give an absolute path (nbdsnap -c does that "
        "for you)", file));
  // Its lock would only say "in use by this very process".
  for (const auto& s : ctx.engine->List())
    if (SameFile(s->path, file))
      return Err(absl::StrFormat(
          "%s is already snapshot '%s': each snapshot needs its own COW file",
          file, s->name));
  StoreOptions opts = ctx.defaults;
  // Either optional word may be left out: no store type is a size, so
  // "take NAME FILE N" keeps the default chunk size.
  size_t next = 3;
  if (next < w.size() && !ParseStoreType(w[next]).ok()) {
    absl::StatusOr<uint32_t> cs = ParseChunkSize(w[next++]);
    if (!cs.ok()) return Err(cs.status().message());
    opts.chunk_sectors = *cs;
  }
  if (next < w.size()) {
    absl::StatusOr<StoreType> t = ParseStoreType(w[next++]);
    if (!t.ok()) return Err(t.status().message());
    opts.type = *t;
  }
  if (next < w.size()) return Err(absl::StrCat("usage: take", kTakeParams));
  if (opts.type == StoreType::kTransient && opts.chunk_sectors == 0)
    opts.chunk_sectors = kDefaultChunkSectors;
  auto refuse = [&](const absl::Status& st) {
    return Err(absl::StrCat(file, ": ", st.message()));
  };
  struct stat sb;
  // lstat: a dangling symlink (which the open refuses) is the user's, not
  // a file this take made and may remove.
  const bool existed = ::lstat(file.c_str(), &sb) == 0;
  // A file without a store yet (missing, empty or all zero) gets the chunk
  // size asked for: whatever refuses that is checked before a header goes
  // into it, so a refused take leaves the file as it was.
  if (std::optional<uint64_t> chunk = NewStoreChunkBytes(file, opts)) {
    // snapshot-cow-size binds take as it binds startup.
    if (absl::Status st = CheckCowSizeChunks(opts.size_cap, *chunk); !st.ok())
      return refuse(st);
    if (absl::Status st = ctx.engine->CheckChunkBytes(name, *chunk); !st.ok())
      return Err(st.message());
  }
  absl::StatusOr<std::unique_ptr<ExceptionStore>> store = OpenStoreFile(file, opts);
  // A file this take made goes again if the take fails (as with nbdsnap
  // create): a full disk, say, leaves nothing behind.
  bool taken = false;
  absl::Cleanup remove_new_file = [&] {
    if (existed || taken) return;
    if (store.ok()) store->reset();
    ::unlink(file.c_str());
  };
  if (!store.ok()) return Err(store.status().message());
  // An existing store's header may hold another chunk size.
  if (absl::Status st = CheckCowSize(opts.size_cap, **store); !st.ok())
    return refuse(st);
  // A snapshot of the origin now must start empty: old exceptions would
  // describe another moment.
  if ((*store)->exception_count() != 0 || !(*store)->valid())
    return Err(absl::StrFormat(
        "%s already holds a snapshot (%d exceptions, %s): take needs a new or "
        "empty file",
        w[2], (*store)->exception_count(), (*store)->StatusLine()));
  auto snap = std::make_shared<Snapshot>(name, w[2], std::move(*store));
  // Waits for in-flight origin writes; checks again for a merge that
  // started since the check above.
  if (absl::Status st = ctx.engine->Add(snap); !st.ok()) {
    snap.reset();  // the store closes before its new file goes
    return Err(st.message());
  }
  taken = true;
  LogMessage(absl::StrFormat("took snapshot %s in %s", name, w[2]));
  return absl::StrFormat("%s: %s\nOK\n", name, snap->store->StatusLine());
}

std::string Drop(ControlContext& ctx, const Words& w) {
  std::shared_ptr<Snapshot> s = ctx.engine->Find(w[1]);
  if (s && s->merging.load() && ctx.merge->failed())
    return Err(absl::StrCat(w[1], " cannot be dropped: ", ctx.merge->Describe()));
  if (absl::Status st = ctx.engine->Remove(w[1]); !st.ok()) return Err(st.message());
  if (s) (void)s->store->Flush();
  LogMessage(absl::StrFormat("dropped snapshot %s (its file %s is kept)", w[1],
                             s ? s->path : std::string("?")));
  return "OK\n";
}

std::string Merge(ControlContext& ctx, const Words& w) {
  std::shared_ptr<Snapshot> s = ctx.engine->Find(w[1]);
  if (!s) return Err(absl::StrFormat("no snapshot named %s", w[1]));
  if (ctx.merge->failed()) return Err(ctx.merge->Describe());
  // Asked again for the merge that runs: its progress, as the first reply
  // gave it, so that nbdsnap merge NAME --wait can wait for it.
  if (ctx.merge->running() && ctx.engine->merging() == s)
    return absl::StrFormat("%s\nOK\n", ctx.merge->Describe());
  if (ctx.merge->running() || ctx.engine->merging())
    return Err(absl::StrFormat("%s; only one merge per origin",
                               ctx.merge->Describe()));
  if (s->store->type() == StoreType::kTransient)
    return Err(absl::StrFormat("%s is a transient (N) store: it cannot be merged",
                               w[1]));
  if (!ctx.engine->origin_writable())
    return Err("the origin is read-only (the plugin below cannot write): "
               "nothing can be merged into it");
  if (!s->store->valid())
    return Err(absl::StrFormat("%s is invalid: nothing consistent to merge", w[1]));
  // Their writes would land in chunks the merge has already moved.
  if (int n = s->clients.load(); n > 0)
    return Err(absl::StrFormat(
        "%s is open by %d client(s): merge it once they disconnect", w[1], n));
  if (absl::Status st = s->store->Flush(); !st.ok()) return Err(st.message());
  ctx.engine->StartMerge(s);
  if (!ctx.merge->Start(*ctx.engine, s, ctx.merge_done).ok())
    return Err(ctx.merge->Describe());
  return absl::StrFormat("%s\nOK\n", ctx.merge->Describe());
}

struct Command {
  const char* name;
  const char* params;           // for the usage line
  size_t min_args, max_args;    // words after the name
  std::string (*run)(ControlContext&, const Words&);
  bool changes;                 // changes the snapshots (not status or list)
};

constexpr Command kCommands[] = {
    {"status", "", 0, 0, Status, false},
    {"list", "", 0, 0, List, false},
    {"take", kTakeParams, 2, 4, Take, true},
    {"drop", " NAME", 1, 1, Drop, true},
    {"merge", " NAME", 1, 1, Merge, true},
};
constexpr char kCommandNames[] = "use status, list, take, drop or merge";

// The command a line starts with, or null.
const Command* FindCommand(absl::string_view first_word) {
  for (const Command& c : kCommands)
    if (first_word == c.name) return &c;
  return nullptr;
}

}  // namespace

bool ControlCommandChanges(std::string_view line) {
  // The first word as RunControlCommand splits it (at spaces).
  absl::string_view rest(line.data(), line.size());
  rest.remove_prefix(std::min(rest.find_first_not_of(' '), rest.size()));
  const Command* c = FindCommand(rest.substr(0, rest.find(' ')));
  return c != nullptr && c->changes;
}

std::string RunControlCommand(ControlContext& ctx, std::string_view line) {
  if (line.size() > kMaxControlLine) return Err("line too long");
  std::vector<std::string> w =
      absl::StrSplit(absl::string_view(line.data(), line.size()), ' ',
                     absl::SkipWhitespace());
  if (w.empty()) return Err(absl::StrCat("empty command: ", kCommandNames));
  if (const Command* c = FindCommand(w[0])) {
    if (w.size() - 1 < c->min_args || w.size() - 1 > c->max_args)
      return Err(absl::StrCat("usage: ", c->name, c->params));
    try {
      return c->run(ctx, w);
    } catch (const std::exception& e) {
      return Err(absl::StrCat("internal error: ", e.what()));
    }
  }
  std::string shown = w[0].substr(0, 40);
  for (char& c : shown)
    if (!std::isprint(static_cast<unsigned char>(c))) c = '?';
  return Err(absl::StrFormat("unknown command '%s': %s", shown, kCommandNames));
}

}  // namespace snap
