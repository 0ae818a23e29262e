// A BlockFile test double: the file lives in memory as two images, what is
// durable (survives a power loss) and what is current (what reads see).
// Every PWrite / GrowTo / ZeroRange lands in the current image and is logged
// as unsynced; Sync() applies the log to the durable image. Faults can be
// injected (EIO, ENOSPC, short writes) by op index or byte range, the disk
// can be frozen at a sync point (CrashAt), and PowerLoss() gives a new disk
// holding only the durable image (optionally plus a random subset of the
// unsynced writes, which is legal because the store never writes more than
// a chunk at once and a disk may persist completed writes in any order).
//
// Several FaultFile handles can share one disk (Handle()), so a store can be
// closed and reopened on the same "device".
#pragma once

#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "store/block_file.h"

namespace snaptest {

// kReserve calls are counted and can fail, but are not logged as events.
enum class Op { kRead, kWrite, kSync, kGrow, kZero, kReserve };
enum class FaultKind { kEIO, kENOSPC, kShortWrite };

struct Fault {
  Op op = Op::kWrite;
  FaultKind kind = FaultKind::kEIO;
  // Fires on the call with this 0-based index among the calls of `op` made
  // on the disk so far (failed calls count too); unset: any call.
  std::optional<uint64_t> nth;
  // ... and only when the call touches bytes [lo, hi). A Sync has no range.
  uint64_t lo = 0;
  uint64_t hi = UINT64_MAX;
  // kShortWrite: this many bytes of the write land, then it fails (EIO).
  uint64_t short_bytes = 0;
  bool sticky = false;  // keeps firing; otherwise fires once
  bool freeze = false;  // once fired, nothing more lands (a dead disk)
  // kSync: Linux's writeback error. The writes the failed sync covered
  // never reach the disk (reads still see them, as from the page cache),
  // and the error is reported once: the next sync succeeds.
  bool lose_writeback = false;
};

// One call on the disk, as logged.
struct Event {
  Op op = Op::kWrite;
  uint64_t offset = 0;  // kGrow: the new size
  uint64_t length = 0;
  bool ok = true;
  bool all_zero = false;    // kWrite: the data was all zero bytes
  uint64_t sync_epoch = 0;  // successful syncs before this call
};

struct Counters {
  uint64_t reads = 0, writes = 0, syncs = 0, grows = 0, zeros = 0, reserves = 0;
  uint64_t ok_syncs = 0;  // sync points reached
  uint64_t faults_fired = 0;
};

struct Disk;

class FaultFile final : public snap::BlockFile {
 public:
  // An empty file.
  explicit FaultFile(std::string name = "fault.cow");
  // A file that already holds `contents`, all of it durable.
  FaultFile(std::vector<char> contents, std::string name);
  ~FaultFile() override;

  // Another handle on the same disk (to reopen a store after closing one).
  std::unique_ptr<FaultFile> Handle() const;

  absl::Status PRead(std::span<char> buf, uint64_t offset) override;
  absl::Status PWrite(std::span<const char> buf, uint64_t offset) override;
  absl::Status Sync() override;
  absl::StatusOr<uint64_t> Size() override;
  absl::Status GrowTo(uint64_t size) override;
  absl::Status ZeroRange(uint64_t offset, uint64_t length) override;
  // Changes nothing; fails only as an injected fault says (a full disk).
  absl::Status Reserve(uint64_t offset, uint64_t length) override;
  const std::string& name() const override { return name_; }
  bool is_block_device() const override;

  void AddFault(const Fault& f);
  void ClearFaults();
  // The Sync call with this 0-based index (counting every Sync call on the
  // disk) fails with EIO and freezes the disk: it and every later write,
  // grow, zero or sync fail without landing. Reads still work.
  void CrashAt(uint64_t sync_index);
  void Freeze();
  bool frozen() const;
  // Says it is a block device (which a new store may use when its first
  // 4 KiB are zero, as LVM leaves a new COW volume). A device has a fixed
  // size: writes, grows and zeroing past its end fail with ENOSPC.
  void set_block_device(bool b);
  // Sleeps this long in every Sync (outside the disk's lock), like a disk.
  void set_sync_delay(std::chrono::microseconds d);
  // Runs at the start of every Sync, outside the disk's lock, with the
  // number of Sync calls made before it: to act while a sync is under way.
  // A sync makes durable only what was written before it began.
  void set_sync_hook(std::function<void(uint64_t)> hook);

  // A new disk (no faults, fresh counters, the same kind) holding the
  // current image, all of it durable: the file as it is now, without
  // sharing it.
  std::unique_ptr<FaultFile> Clone() const;
  // A new disk (with no faults and fresh counters) holding only what was
  // durable: every unsynced write, grow and zero is lost.
  std::unique_ptr<FaultFile> PowerLoss() const;
  // The same, but each unsynced op survives with probability 1/2 (applied in
  // issue order on top of the durable image).
  std::unique_ptr<FaultFile> PowerLossTorn(uint64_t seed) const;
  // The same, keeping exactly the unsynced ops for which keep() is true.
  std::unique_ptr<FaultFile> PowerLossKeeping(
      const std::function<bool(const Event&)>& keep) const;

  std::vector<char> Contents() const;  // the current image
  std::vector<char> Durable() const;   // the durable image
  Counters counters() const;
  std::vector<Event> events() const;  // every call but reads, in order
  size_t unsynced_ops() const;
  // Overwrites bytes of both images directly (no log, no faults): for
  // crafting corrupt files.
  void Poke(uint64_t offset, std::span<const char> bytes);

 private:
  FaultFile(std::shared_ptr<Disk> disk, std::string name);
  std::unique_ptr<FaultFile> PowerLossWith(
      const std::function<bool(const Event&, uint64_t index)>& keep) const;

  std::shared_ptr<Disk> disk_;
  std::string name_;
};

}  // namespace snaptest
