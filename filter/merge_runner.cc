#include "filter/merge_runner.h"

#include <system_error>

#include "absl/cleanup/cleanup.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "filter/log.h"

namespace snap {

absl::Status MergeRunner::Start(SnapshotEngine& engine,
                                std::shared_ptr<Snapshot> snap, DoneFn done) {
  if (thread_.joinable()) thread_.join();  // an earlier, finished merge
  stop_.store(false);
  running_.store(true);
  engine_ = &engine;
  snap_ = std::move(snap);
  done_ = std::move(done);
  initial_ = snap_->store->exception_count();
  {
    snap::MutexLock l(&mu_);
    state_ = absl::StrFormat("merging %s, 0%%", snap_->name);
  }
  LogMessage(absl::StrFormat("merge of %s started: %d exceptions", snap_->name,
                             initial_));
  try {
    thread_ = std::thread([this] { Run(); });
  } catch (const std::system_error& e) {  // no thread to be had (EAGAIN)
    absl::Status why = absl::ResourceExhaustedError(
        absl::StrCat("cannot start the merge thread: ", e.what()));
    Fail(why);
    return why;
  }
  return absl::OkStatus();
}

void MergeRunner::Fail(const absl::Status& why) {
  // Nothing is lost: unmerged chunks still live in the COW and the origin
  // export still shows them. A restart resumes the merge.
  // A merge taken up live has no snapshot-merge= in the command line: the
  // restart needs it (and the snapshot=) to resume, or the origin export
  // would show a half-merged disk.
  snap_->store->set_merge_failed(true);
  const std::string state = absl::StrFormat(
      "merge of %s failed: %s; restart nbdkit with snapshot=%s=%s "
      "snapshot-merge=%s to resume it",
      snap_->name, why.message(), snap_->name, snap_->path, snap_->name);
  {
    snap::MutexLock l(&mu_);
    state_ = state;
  }
  LogError(state);
  running_.store(false);
  if (done_) done_(false);
}

void MergeRunner::Stop() {
  stop_.store(true);
  if (thread_.joinable()) thread_.join();
}

std::string MergeRunner::Describe() const {
  snap::MutexLock l(&mu_);
  return state_;
}

void MergeRunner::Run() {
  int last_tenth = 0;
  absl::Cleanup stopped = [this] { running_.store(false); };
  while (!stop_.load()) {
    absl::StatusOr<bool> done = [&]() -> absl::StatusOr<bool> {
      try {  // an exception would end the process from this thread
        return engine_->MergeStep();
      } catch (const std::exception& e) {
        return absl::InternalError(e.what());
      }
    }();
    if (!done.ok()) {
      Fail(done.status());
      return;
    }
    if (*done) {
      {
        snap::MutexLock l(&mu_);
        state_ = absl::StrFormat("merged %s", snap_->name);
      }
      LogMessage(absl::StrFormat("merge of %s complete", snap_->name));
      engine_->FinishMerge();
      snap_.reset();  // the last hold on its store: the file is let go of
      running_.store(false);
      if (done_) done_(true);
      return;
    }
    const uint64_t left = snap_->store->exception_count();
    const int pct = initial_ == 0 ? 100
                                  : static_cast<int>(100 * (initial_ - std::min(left, initial_)) /
                                                     initial_);
    {
      snap::MutexLock l(&mu_);
      state_ = absl::StrFormat("merging %s, %d%%", snap_->name, pct);
    }
    if (pct / 10 > last_tenth) {
      last_tenth = pct / 10;
      LogMessage(absl::StrFormat("merge of %s: %d%%, %d exceptions left (%s)",
                                 snap_->name, pct, left,
                                 snap_->store->StatusLine()));
    }
  }
}

}  // namespace snap
