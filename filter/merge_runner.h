// The background merge: a thread that runs SnapshotEngine::MergeStep until
// the snapshot is empty, and reports progress and the outcome.
#pragma once

#include <atomic>
#include <functional>
#include <memory>
#include <string>
#include <thread>

#include "absl/status/status.h"
#include "store/sync.h"
#include "filter/snapshot_engine.h"

namespace snap {

class MergeRunner {
 public:
  using DoneFn = std::function<void(bool ok)>;
  ~MergeRunner() { Stop(); }

  // Starts merging snap (already marked merging in the engine). Without a
  // thread to merge in, the merge fails as a failed step would (Merge
  // failed, done called, nothing lost) and the reason comes back.
  absl::Status Start(SnapshotEngine& engine, std::shared_ptr<Snapshot> snap,
                     DoneFn done);
  // Asks the thread to stop after its current step, and joins it. A
  // stopped merge resumes on the next start.
  void Stop();
  // "merging NAME, 42%", "merged NAME", "merge of NAME failed: WHY;
  // restart nbdkit with ... to resume it".
  std::string Describe() const;
  // The merge failed, and the origin shows its merged view until a
  // restart resumes it.
  bool failed() const { return !running() && engine_ != nullptr && engine_->merging(); }
  // A merge thread is running now.
  bool running() const { return running_.load(); }

 private:
  void Run();
  // Marks the merge failed, says why, and tells done.
  void Fail(const absl::Status& why);

  SnapshotEngine* engine_ = nullptr;
  std::shared_ptr<Snapshot> snap_;
  DoneFn done_;
  std::thread thread_;
  std::atomic<bool> stop_{false};
  std::atomic<bool> running_{false};
  uint64_t initial_ = 0;
  mutable snap::Mutex mu_;
  std::string state_ ABSL_GUARDED_BY(mu_);
};

}  // namespace snap
