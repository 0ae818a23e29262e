// The locks the store and the filter use: abseil's, except in a TSan
// build. Debian's abseil is not built with TSan, which therefore cannot see
// absl::Mutex's lock operations and reports races on everything it guards;
// the TSan build uses an equivalent over std:: primitives, which it does
// see, so that it checks our locking rather than abseil's.
#pragma once

#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"

#if defined(__SANITIZE_THREAD__)
#include <condition_variable>
#include <shared_mutex>

namespace snap {

class ABSL_LOCKABLE Mutex {
 public:
  void Lock() ABSL_EXCLUSIVE_LOCK_FUNCTION() { mu_.lock(); }
  void Unlock() ABSL_UNLOCK_FUNCTION() {
    mu_.unlock();
    changed_.notify_all();  // Await conditions may hold now
  }
  void ReaderLock() ABSL_SHARED_LOCK_FUNCTION() { mu_.lock_shared(); }
  void ReaderUnlock() ABSL_UNLOCK_FUNCTION() {
    mu_.unlock_shared();
    changed_.notify_all();
  }
  // Called with the lock held; returns with it held and cond true.
  void Await(const absl::Condition& cond) {
    while (!cond.Eval()) changed_.wait(mu_);
  }
  std::shared_mutex& native() { return mu_; }
  std::condition_variable_any& changed() { return changed_; }

 private:
  std::shared_mutex mu_;
  std::condition_variable_any changed_;
};

class ABSL_SCOPED_LOCKABLE MutexLock {
 public:
  explicit MutexLock(Mutex* mu) ABSL_EXCLUSIVE_LOCK_FUNCTION(mu) : mu_(mu) { mu_->Lock(); }
  ~MutexLock() ABSL_UNLOCK_FUNCTION() { mu_->Unlock(); }
  MutexLock(const MutexLock&) = delete;
  MutexLock& operator=(const MutexLock&) = delete;

 private:
  Mutex* mu_;
};

class ABSL_SCOPED_LOCKABLE ReaderMutexLock {
 public:
  explicit ReaderMutexLock(Mutex* mu) ABSL_SHARED_LOCK_FUNCTION(mu) : mu_(mu) {
    mu_->ReaderLock();
  }
  ~ReaderMutexLock() ABSL_UNLOCK_FUNCTION() { mu_->ReaderUnlock(); }
  ReaderMutexLock(const ReaderMutexLock&) = delete;
  ReaderMutexLock& operator=(const ReaderMutexLock&) = delete;

 private:
  Mutex* mu_;
};

class CondVar {
 public:
  void Wait(Mutex* mu) { cv_.wait(mu->native()); }
  // True if the time ran out, as absl::CondVar's.
  bool WaitWithTimeout(Mutex* mu, absl::Duration timeout) {
    if (timeout == absl::InfiniteDuration()) {  // now + max would overflow
      Wait(mu);
      return false;
    }
    return cv_.wait_for(mu->native(), absl::ToChronoNanoseconds(timeout)) ==
           std::cv_status::timeout;
  }
  void SignalAll() { cv_.notify_all(); }
  void Signal() { cv_.notify_one(); }

 private:
  std::condition_variable_any cv_;
};

}  // namespace snap

#else

namespace snap {
using Mutex = absl::Mutex;
using MutexLock = absl::MutexLock;
using ReaderMutexLock = absl::ReaderMutexLock;
using CondVar = absl::CondVar;
}  // namespace snap

#endif
