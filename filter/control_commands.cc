#include "filter/control_commands.h"

#include <vector>

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

std::string Status(ControlContext& ctx) {
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

std::string List(ControlContext& ctx) {
  std::string out;
  for (const auto& s : ctx.engine->List())
    absl::StrAppend(&out,
                    absl::StrFormat("%s %s %s %d %s%s\n", s->name, s->path,
                                    StoreTypeName(s->store->type()),
                                    s->chunk_bytes, s->store->StatusLine(),
                                    s->merging.load() ? " merging" : ""));
  return out + "OK\n";
}

std::string Take(ControlContext& ctx, const std::vector<std::string>& w) {
  if (w.size() < 3 || w.size() > 5)
    return Err("usage: take NAME FILE [CHUNK-SIZE] [P|PO|N]");
  const std::string& name = w[1];
  if (absl::Status st = ValidateSnapshotName(name); !st.ok()) return Err(st.message());
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
  StoreOptions opts = ctx.defaults;
  if (w.size() >= 4) {
    absl::StatusOr<uint32_t> cs = ParseChunkSize(w[3]);
    if (!cs.ok()) return Err(cs.status().message());
    opts.chunk_sectors = *cs;
  }
  if (w.size() == 5) {
    absl::StatusOr<StoreType> t = ParseStoreType(w[4]);
    if (!t.ok()) return Err(t.status().message());
    opts.type = *t;
  }
  if (opts.type == StoreType::kTransient && opts.chunk_sectors == 0)
    opts.chunk_sectors = kDefaultChunkSectors;
  absl::StatusOr<std::unique_ptr<ExceptionStore>> store = OpenStoreFile(w[2], opts);
  if (!store.ok()) return Err(store.status().message());
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
  if (absl::Status st = ctx.engine->Add(snap); !st.ok()) return Err(st.message());
  LogMessage(absl::StrFormat("took snapshot %s in %s", name, w[2]));
  return absl::StrFormat("%s: %s\nOK\n", name, snap->store->StatusLine());
}

std::string Drop(ControlContext& ctx, const std::vector<std::string>& w) {
  if (w.size() != 2) return Err("usage: drop NAME");
  std::shared_ptr<Snapshot> s = ctx.engine->Find(w[1]);
  if (absl::Status st = ctx.engine->Remove(w[1]); !st.ok()) return Err(st.message());
  if (s) (void)s->store->Flush();
  LogMessage(absl::StrFormat("dropped snapshot %s (its file %s is kept)", w[1],
                             s ? s->path : std::string("?")));
  return "OK\n";
}

std::string Merge(ControlContext& ctx, const std::vector<std::string>& w) {
  if (w.size() != 2) return Err("usage: merge NAME");
  std::shared_ptr<Snapshot> s = ctx.engine->Find(w[1]);
  if (!s) return Err(absl::StrFormat("no snapshot named %s", w[1]));
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
  ctx.merge->Start(*ctx.engine, s, ctx.merge_done);
  return absl::StrFormat("%s\nOK\n", ctx.merge->Describe());
}

}  // namespace

std::string RunControlCommand(ControlContext& ctx, std::string_view line) {
  if (line.size() > kMaxControlLine) return Err("line too long");
  std::vector<std::string> w =
      absl::StrSplit(absl::string_view(line.data(), line.size()), ' ',
                     absl::SkipWhitespace());
  if (w.empty()) return Err("empty command: use status, list, take, drop or merge");
  try {
    if (w[0] == "status" && w.size() == 1) return Status(ctx);
    if (w[0] == "list" && w.size() == 1) return List(ctx);
    if (w[0] == "take") return Take(ctx, w);
    if (w[0] == "drop") return Drop(ctx, w);
    if (w[0] == "merge") return Merge(ctx, w);
  } catch (const std::exception& e) {
    return Err(absl::StrCat("internal error: ", e.what()));
  }
  std::string shown = w[0].substr(0, 40);
  for (char& c : shown)
    if (!std::isprint(static_cast<unsigned char>(c))) c = '?';
  return Err(absl::StrFormat(
      "unknown command '%s': use status, list, take, drop or merge", shown));
}

}  // namespace snap
