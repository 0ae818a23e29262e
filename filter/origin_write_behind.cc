#include "filter/origin_write_behind.h"

#include <algorithm>
#include <iterator>
#include <system_error>
#include <utility>

#include "absl/cleanup/cleanup.h"
#include "absl/strings/str_format.h"
#include "absl/time/clock.h"
#include "filter/log.h"

namespace snap {

OriginWriteBehind::OriginWriteBehind(OriginIo& origin, uint64_t max_bytes,
                                     absl::Duration idle_release)
    : origin_(origin), max_bytes_(max_bytes), idle_release_(idle_release) {
  committer_ = std::thread([this] { Commit(); });
  issuer_ = std::thread([this] { Issue(); });
}

OriginWriteBehind::~OriginWriteBehind() {
  {
    snap::MutexLock l(&mu_);
    stop_ = true;
    queued_cv_.Signal();
  }
  committer_.join();
  issuer_.join();
}

void OriginWriteBehind::Queue(std::span<const char> data, uint64_t offset,
                              std::vector<std::shared_ptr<ExceptionStore>> stores) {
  const uint64_t n = data.size();
  {
    snap::MutexLock l(&mu_);
    // A full queue holds the client back before it copies anything: memory
    // stays bounded however many clients wait, and a write larger than the
    // whole queue still goes once the queue is empty.
    while (bytes_ != 0 && bytes_ + n > max_bytes_) done_cv_.Wait(&mu_);
    bytes_ += n;
  }
  bool queued = false;
  absl::Cleanup unreserve = [&] {
    if (queued) return;
    snap::MutexLock l(&mu_);
    bytes_ -= n;
    done_cv_.SignalAll();
  };
  std::vector<char> copy = spare_.Take(n);
  copy.assign(data.begin(), data.end());
  Item item{0, offset, std::move(copy), std::move(stores)};
  const uint64_t held = item.data.capacity();  // a reused buffer may be larger
  snap::MutexLock l(&mu_);
  ranges_.emplace(offset, offset + n);
  longest_ = std::max(longest_, n);
  item.seq = ++queued_seq_;
  pending_.store(ranges_.size());
  queue_.push_back(std::move(item));
  bytes_ += held - n;
  queued = true;
  queued_cv_.Signal();
}

bool OriginWriteBehind::OverlapsLocked(uint64_t offset, uint64_t length) const {
  const uint64_t end = offset + length;
  // Writes starting at or past end cannot overlap; walk back from there
  // until a write would have to be longer than any queued to reach offset.
  auto it = ranges_.lower_bound(end);
  while (it != ranges_.begin()) {
    --it;
    if (it->first + longest_ <= offset) break;
    if (it->second > offset) return true;
  }
  return false;
}

void OriginWriteBehind::WaitFor(uint64_t offset, uint64_t length) {
  if (pending_.load() == 0 || length == 0) return;
  snap::MutexLock l(&mu_);
  while (OverlapsLocked(offset, length)) done_cv_.Wait(&mu_);
}

void OriginWriteBehind::WaitIdle() {
  snap::MutexLock l(&mu_);
  while (!ranges_.empty()) done_cv_.Wait(&mu_);
}

absl::Status OriginWriteBehind::Drain() {
  snap::MutexLock l(&mu_);
  const uint64_t target = queued_seq_;
  while (issued_seq_ < target) done_cv_.Wait(&mu_);
  return error_;
}

absl::Status OriginWriteBehind::WriteWithRetries(const Item& item) {
  // The client was told the write succeeded, so a failure here cannot be
  // handed back: a passing fault (a timeout, a busy server behind the nbd
  // plugin) gets a few more tries, in place, so later writes stay behind it.
  absl::Status st = origin_.Write(item.data, item.offset, false);
  for (absl::Duration pause : {absl::Milliseconds(1), absl::Milliseconds(10),
                               absl::Milliseconds(100)}) {
    if (st.ok()) break;
    absl::SleepFor(pause);
    st = origin_.Write(item.data, item.offset, false);
  }
  return st;
}

void OriginWriteBehind::Commit() {
  snap::MutexLock l(&mu_);
  for (;;) {
    while (queue_.empty() && !stop_) queued_cv_.Wait(&mu_);
    if (queue_.empty()) {  // stopping, and everything is committed
      committer_done_ = true;
      committed_cv_.Signal();
      return;
    }
    std::vector<Item> batch(std::make_move_iterator(queue_.begin()),
                            std::make_move_iterator(queue_.end()));
    queue_.clear();
    mu_.Unlock();
    // One group commit per store makes every copy-out of the batch durable
    // (pipelined with the copies of the next batch). A store that fails it
    // is invalid now and, as in dm, no longer holds the origin back.
    std::vector<ExceptionStore*> stores;
    for (const Item& item : batch)
      for (const auto& s : item.stores)
        if (std::find(stores.begin(), stores.end(), s.get()) == stores.end())
          stores.push_back(s.get());
    // Stores are separate files: their syncs overlap. Without a thread
    // (none to be had), a store is flushed here instead.
    std::vector<std::thread> others;
    for (size_t i = 1; i < stores.size(); ++i) {
      try {
        others.emplace_back([s = stores[i]] { (void)s->Flush(); });
      } catch (const std::system_error&) {
        (void)stores[i]->Flush();
      }
    }
    if (!stores.empty()) (void)stores[0]->Flush();
    for (std::thread& t : others) t.join();
    mu_.Lock();
    committed_.push_back(std::move(batch));
    committed_cv_.Signal();
  }
}

void OriginWriteBehind::Issue() {
  snap::MutexLock l(&mu_);
  for (;;) {
    while (committed_.empty() && !committer_done_) {
      // The buffers this thread kept serve a stream of writes; a quiet
      // spell, with nothing queued either, ends it.
      if (spare_.kept_bytes() == 0) {
        committed_cv_.Wait(&mu_);
      } else if (committed_cv_.WaitWithTimeout(&mu_, idle_release_) &&
                 committed_.empty() && queue_.empty()) {
        mu_.Unlock();  // freeing 32 MiB need not hold up the queue
        spare_.Clear();
        mu_.Lock();
      }
    }
    if (committed_.empty()) return;  // the committer is done, and so are we
    std::vector<Item> batch = std::move(committed_.front());
    committed_.pop_front();
    mu_.Unlock();
    absl::Status first;
    for (const Item& item : batch) {
      absl::Status st = WriteWithRetries(item);
      if (st.ok()) continue;
      LogError(absl::StrFormat(
          "origin write of %d bytes at %d failed after it was acknowledged, "
          "and its data is lost: every flush of the origin fails from now "
          "on; restart nbdkit once the origin is repaired: %s",
          item.data.size(), item.offset, st.message()));
      if (first.ok()) first = st;
    }
    mu_.Lock();
    for (Item& item : batch) {
      auto [lo, hi] = ranges_.equal_range(item.offset);
      for (auto it = lo; it != hi; ++it)
        if (it->second == item.offset + item.data.size()) {
          ranges_.erase(it);
          break;
        }
      bytes_ -= item.data.capacity();
      // Kept only while the queue and the kept buffers fit in its bound.
      spare_.Give(std::move(item.data), max_bytes_ - std::min(bytes_, max_bytes_));
    }
    if (!batch.empty()) issued_seq_ = batch.back().seq;
    pending_.store(ranges_.size());
    if (!first.ok() && error_.ok()) error_ = first;
    done_cv_.SignalAll();
  }
}

}  // namespace snap
