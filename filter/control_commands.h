// The control socket's line protocol, without the socket: one command line
// in, the reply out. Replies are data lines, then "OK" or "ERR <why>".
//
//   status                                one dm status line per snapshot
//   list                                  name, file, store, chunk, status
//   take NAME FILE [CHUNK-SIZE] [STORE]   new snapshot of the running origin
//   drop NAME                             remove a snapshot (not merging)
//   merge NAME                            start merging NAME into the origin
//
// A command with the wrong number of words gets "ERR usage: " and its usage.
#pragma once

#include <functional>
#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "filter/merge_runner.h"
#include "filter/snapshot_engine.h"
#include "store/exception_store.h"

namespace snap {

struct ControlContext {
  SnapshotEngine* engine = nullptr;
  MergeRunner* merge = nullptr;
  StoreOptions defaults;  // store type, chunk size, cap for `take`
  MergeRunner::DoneFn merge_done;
};

inline constexpr size_t kMaxControlLine = 4096;

// Runs one command line (without its newline) and returns the reply,
// newline-terminated lines ending in "OK\n" or "ERR ...\n".
std::string RunControlCommand(ControlContext& ctx, std::string_view line);

// The line is a command that changes the snapshots (take, drop, merge):
// these run one at a time, and may wait on the origin.
bool ControlCommandChanges(std::string_view line);

}  // namespace snap
