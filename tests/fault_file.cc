#include "tests/fault_file.h"

#include <errno.h>

#include <algorithm>
#include <cstring>
#include <mutex>
#include <random>
#include <thread>

#include "absl/status/status.h"
#include "absl/strings/str_format.h"

namespace snaptest {

struct Unsynced {
  Event ev;
  std::vector<char> data;  // kWrite only
};

struct Disk {
  mutable std::mutex mu;
  std::vector<char> cur;
  std::vector<char> durable;
  std::vector<Unsynced> unsynced;
  uint64_t synced_ops = 0;  // ops ever moved from unsynced to durable
  std::vector<Fault> faults;
  Counters n;
  std::vector<Event> events;
  bool frozen = false;
  bool block_device = false;
  std::optional<uint64_t> crash_at;
  std::chrono::microseconds sync_delay{0};
  std::function<void(uint64_t)> sync_hook;
};

namespace {

void Apply(std::vector<char>& img, const Event& ev, const std::vector<char>& data) {
  switch (ev.op) {
    case Op::kWrite:
      if (img.size() < ev.offset + ev.length) img.resize(ev.offset + ev.length, 0);
      std::memcpy(img.data() + ev.offset, data.data(), ev.length);
      break;
    case Op::kGrow:
      if (img.size() < ev.offset) img.resize(ev.offset, 0);
      break;
    case Op::kZero:
      if (ev.offset < img.size()) {
        uint64_t end = std::min<uint64_t>(img.size(), ev.offset + ev.length);
        std::fill(img.begin() + static_cast<ptrdiff_t>(ev.offset),
                  img.begin() + static_cast<ptrdiff_t>(end), 0);
      }
      break;
    default:
      break;
  }
}

bool Overlaps(const Fault& f, uint64_t off, uint64_t len) {
  if (f.lo == 0 && f.hi == UINT64_MAX) return true;
  if (len == 0) return off >= f.lo && off < f.hi;
  return off < f.hi && off + len > f.lo;
}

// Finds a fault for this call; removes it unless sticky. Caller holds mu.
std::optional<Fault> TakeFault(Disk& d, Op op, uint64_t index, uint64_t off, uint64_t len) {
  for (auto it = d.faults.begin(); it != d.faults.end(); ++it) {
    if (it->op != op) continue;
    if (it->nth && *it->nth != index) continue;
    if (op != Op::kSync && !Overlaps(*it, off, len)) continue;
    Fault f = *it;
    if (!f.sticky) d.faults.erase(it);
    ++d.n.faults_fired;
    if (f.freeze) d.frozen = true;
    return f;
  }
  return std::nullopt;
}

absl::Status Errno(int err, const std::string& name, const char* what, uint64_t off) {
  return absl::ErrnoToStatus(
      err, absl::StrFormat("%s: %s at offset %d failed (injected)", name, what, off));
}

absl::Status FaultStatus(const Fault& f, const std::string& name, const char* what,
                         uint64_t off) {
  return Errno(f.kind == FaultKind::kENOSPC ? ENOSPC : EIO, name, what, off);
}

// A block device has a fixed size: nothing lands past its end.
std::optional<absl::Status> PastDeviceEnd(const Disk& d, const std::string& name,
                                          const char* what, uint64_t end) {
  if (!d.block_device || end <= d.cur.size()) return std::nullopt;
  return absl::ErrnoToStatus(
      ENOSPC, absl::StrFormat("%s: %s up to byte %d failed: the device has %d bytes",
                              name, what, end, d.cur.size()));
}

absl::Status FrozenStatus(const std::string& name, const char* what) {
  return absl::ErrnoToStatus(
      EIO, absl::StrFormat("%s: %s failed: the disk is frozen (simulated crash)", name, what));
}

}  // namespace

FaultFile::FaultFile(std::string name)
    : disk_(std::make_shared<Disk>()), name_(std::move(name)) {}

FaultFile::FaultFile(std::vector<char> contents, std::string name)
    : disk_(std::make_shared<Disk>()), name_(std::move(name)) {
  disk_->durable = contents;
  disk_->cur = std::move(contents);
}

FaultFile::FaultFile(std::shared_ptr<Disk> disk, std::string name)
    : disk_(std::move(disk)), name_(std::move(name)) {}

FaultFile::~FaultFile() = default;

std::unique_ptr<FaultFile> FaultFile::Handle() const {
  return std::unique_ptr<FaultFile>(new FaultFile(disk_, name_));
}

absl::Status FaultFile::PRead(std::span<char> buf, uint64_t offset) {
  std::lock_guard<std::mutex> l(disk_->mu);
  Disk& d = *disk_;
  uint64_t index = d.n.reads++;
  if (std::optional<Fault> f = TakeFault(d, Op::kRead, index, offset, buf.size()))
    return FaultStatus(*f, name_, "read", offset);
  if (offset + buf.size() > d.cur.size())
    return absl::OutOfRangeError(absl::StrFormat(
        "%s: read of %d bytes at offset %d is past the end of the file (%d bytes)", name_,
        buf.size(), offset, d.cur.size()));
  if (!buf.empty()) std::memcpy(buf.data(), d.cur.data() + offset, buf.size());
  return absl::OkStatus();
}

absl::Status FaultFile::PWrite(std::span<const char> buf, uint64_t offset) {
  std::lock_guard<std::mutex> l(disk_->mu);
  Disk& d = *disk_;
  uint64_t index = d.n.writes++;
  Event ev{Op::kWrite,
           offset,
           buf.size(),
           false,
           std::all_of(buf.begin(), buf.end(), [](char c) { return c == 0; }),
           d.n.ok_syncs};
  if (d.frozen) {
    d.events.push_back(ev);
    return FrozenStatus(name_, "write");
  }
  if (std::optional<absl::Status> st = PastDeviceEnd(d, name_, "write", offset + buf.size())) {
    d.events.push_back(ev);
    return *st;
  }
  std::optional<Fault> f = TakeFault(d, Op::kWrite, index, offset, buf.size());
  if (f && f->kind != FaultKind::kShortWrite) {
    d.events.push_back(ev);
    return FaultStatus(*f, name_, "write", offset);
  }
  uint64_t len = buf.size();
  if (f) len = std::min<uint64_t>(len, f->short_bytes);
  Event landed = ev;
  landed.length = len;
  landed.ok = true;
  std::vector<char> data(buf.begin(), buf.begin() + static_cast<ptrdiff_t>(len));
  if (len > 0) {
    Apply(d.cur, landed, data);
    d.unsynced.push_back({landed, std::move(data)});
  }
  if (f) {
    d.events.push_back(landed);  // the part that landed
    return absl::ErrnoToStatus(EIO,
                               absl::StrFormat("%s: short write at offset %d: %d of %d bytes "
                                               "written (injected)",
                                               name_, offset, len, buf.size()));
  }
  d.events.push_back(landed);
  return absl::OkStatus();
}

absl::Status FaultFile::Sync() {
  std::chrono::microseconds delay;
  uint64_t covers;  // a sync makes durable only what was written before it began
  std::function<void(uint64_t)> hook;
  uint64_t index0;
  {
    std::lock_guard<std::mutex> l(disk_->mu);
    delay = disk_->sync_delay;
    covers = disk_->synced_ops + disk_->unsynced.size();
    hook = disk_->sync_hook;
    index0 = disk_->n.syncs;
  }
  if (hook) hook(index0);
  if (delay.count() > 0) std::this_thread::sleep_for(delay);
  std::lock_guard<std::mutex> l(disk_->mu);
  Disk& d = *disk_;
  uint64_t index = d.n.syncs++;
  Event ev{Op::kSync, 0, 0, false, false, d.n.ok_syncs};
  if (d.frozen) {
    d.events.push_back(ev);
    return FrozenStatus(name_, "sync");
  }
  if (d.crash_at && *d.crash_at == index) {
    d.frozen = true;
    d.events.push_back(ev);
    return absl::ErrnoToStatus(
        EIO, absl::StrFormat("%s: sync #%d failed: simulated crash", name_, index));
  }
  const uint64_t k = std::min<uint64_t>(
      d.unsynced.size(), covers > d.synced_ops ? covers - d.synced_ops : 0);
  if (std::optional<Fault> f = TakeFault(d, Op::kSync, index, 0, 0)) {
    d.events.push_back(ev);
    if (f->lose_writeback) {
      d.unsynced.erase(d.unsynced.begin(), d.unsynced.begin() + static_cast<ptrdiff_t>(k));
      d.synced_ops += k;
    }
    return FaultStatus(*f, name_, "sync", 0);
  }
  for (uint64_t i = 0; i < k; ++i) Apply(d.durable, d.unsynced[i].ev, d.unsynced[i].data);
  d.unsynced.erase(d.unsynced.begin(), d.unsynced.begin() + static_cast<ptrdiff_t>(k));
  d.synced_ops += k;
  ++d.n.ok_syncs;
  ev.ok = true;
  d.events.push_back(ev);
  return absl::OkStatus();
}

absl::StatusOr<uint64_t> FaultFile::Size() {
  std::lock_guard<std::mutex> l(disk_->mu);
  return disk_->cur.size();
}

absl::Status FaultFile::GrowTo(uint64_t size) {
  std::lock_guard<std::mutex> l(disk_->mu);
  Disk& d = *disk_;
  uint64_t index = d.n.grows++;
  uint64_t old = d.cur.size();
  Event ev{Op::kGrow, size, size > old ? size - old : 0, false, false, d.n.ok_syncs};
  if (d.frozen) {
    d.events.push_back(ev);
    return FrozenStatus(name_, "grow");
  }
  if (std::optional<absl::Status> st = PastDeviceEnd(d, name_, "grow", size)) {
    d.events.push_back(ev);
    return *st;
  }
  // Like ftruncate or fallocate over what is there, a grow that does not
  // grow needs no space and cannot fail for want of it.
  if (std::optional<Fault> f =
          size > old ? TakeFault(d, Op::kGrow, index, old, ev.length) : std::nullopt) {
    d.events.push_back(ev);
    return FaultStatus(*f, name_, "grow", size);
  }
  ev.ok = true;
  d.events.push_back(ev);
  if (size > old) {
    Apply(d.cur, ev, {});
    d.unsynced.push_back({ev, {}});
  }
  return absl::OkStatus();
}

absl::Status FaultFile::ZeroRange(uint64_t offset, uint64_t length) {
  std::lock_guard<std::mutex> l(disk_->mu);
  Disk& d = *disk_;
  uint64_t index = d.n.zeros++;
  Event ev{Op::kZero, offset, length, false, true, d.n.ok_syncs};
  if (d.frozen) {
    d.events.push_back(ev);
    return FrozenStatus(name_, "zero");
  }
  if (std::optional<absl::Status> st = PastDeviceEnd(d, name_, "zero", offset + length)) {
    d.events.push_back(ev);
    return *st;
  }
  if (std::optional<Fault> f = TakeFault(d, Op::kZero, index, offset, length)) {
    d.events.push_back(ev);
    return FaultStatus(*f, name_, "zero", offset);
  }
  ev.ok = true;
  d.events.push_back(ev);
  Apply(d.cur, ev, {});
  d.unsynced.push_back({ev, {}});
  return absl::OkStatus();
}

absl::Status FaultFile::Reserve(uint64_t offset, uint64_t length) {
  std::lock_guard<std::mutex> l(disk_->mu);
  Disk& d = *disk_;
  uint64_t index = d.n.reserves++;
  if (std::optional<Fault> f = TakeFault(d, Op::kReserve, index, offset, length))
    return FaultStatus(*f, name_, "reserve", offset);
  return absl::OkStatus();
}

void FaultFile::AddFault(const Fault& f) {
  std::lock_guard<std::mutex> l(disk_->mu);
  disk_->faults.push_back(f);
}

void FaultFile::ClearFaults() {
  std::lock_guard<std::mutex> l(disk_->mu);
  disk_->faults.clear();
}

void FaultFile::CrashAt(uint64_t sync_index) {
  std::lock_guard<std::mutex> l(disk_->mu);
  disk_->crash_at = sync_index;
}

void FaultFile::Freeze() {
  std::lock_guard<std::mutex> l(disk_->mu);
  disk_->frozen = true;
}

bool FaultFile::frozen() const {
  std::lock_guard<std::mutex> l(disk_->mu);
  return disk_->frozen;
}

void FaultFile::set_sync_hook(std::function<void(uint64_t)> hook) {
  std::lock_guard<std::mutex> l(disk_->mu);
  disk_->sync_hook = std::move(hook);
}

bool FaultFile::is_block_device() const {
  std::lock_guard<std::mutex> l(disk_->mu);
  return disk_->block_device;
}

void FaultFile::set_block_device(bool b) {
  std::lock_guard<std::mutex> l(disk_->mu);
  disk_->block_device = b;
}

void FaultFile::set_sync_delay(std::chrono::microseconds d) {
  std::lock_guard<std::mutex> l(disk_->mu);
  disk_->sync_delay = d;
}

std::unique_ptr<FaultFile> FaultFile::PowerLossWith(
    const std::function<bool(const Event&, uint64_t)>& keep) const {
  std::vector<char> img;
  {
    std::lock_guard<std::mutex> l(disk_->mu);
    img = disk_->durable;
    for (uint64_t i = 0; i < disk_->unsynced.size(); ++i) {
      const Unsynced& u = disk_->unsynced[i];
      if (keep(u.ev, i)) Apply(img, u.ev, u.data);
    }
  }
  auto f = std::make_unique<FaultFile>(std::move(img), name_);
  f->set_block_device(is_block_device());
  return f;
}

std::unique_ptr<FaultFile> FaultFile::Clone() const {
  auto f = std::make_unique<FaultFile>(Contents(), name_);
  f->set_block_device(is_block_device());
  return f;
}

std::unique_ptr<FaultFile> FaultFile::PowerLoss() const {
  return PowerLossWith([](const Event&, uint64_t) { return false; });
}

std::unique_ptr<FaultFile> FaultFile::PowerLossTorn(uint64_t seed) const {
  std::mt19937_64 rng(seed);
  return PowerLossWith([&](const Event&, uint64_t) { return (rng() & 1) != 0; });
}

std::unique_ptr<FaultFile> FaultFile::PowerLossKeeping(
    const std::function<bool(const Event&)>& keep) const {
  return PowerLossWith([&](const Event& ev, uint64_t) { return keep(ev); });
}

std::vector<char> FaultFile::Contents() const {
  std::lock_guard<std::mutex> l(disk_->mu);
  return disk_->cur;
}

std::vector<char> FaultFile::Durable() const {
  std::lock_guard<std::mutex> l(disk_->mu);
  return disk_->durable;
}

Counters FaultFile::counters() const {
  std::lock_guard<std::mutex> l(disk_->mu);
  return disk_->n;
}

std::vector<Event> FaultFile::events() const {
  std::lock_guard<std::mutex> l(disk_->mu);
  return disk_->events;
}

size_t FaultFile::unsynced_ops() const {
  std::lock_guard<std::mutex> l(disk_->mu);
  return disk_->unsynced.size();
}

void FaultFile::Poke(uint64_t offset, std::span<const char> bytes) {
  std::lock_guard<std::mutex> l(disk_->mu);
  for (std::vector<char>* img : {&disk_->cur, &disk_->durable}) {
    if (img->size() < offset + bytes.size()) img->resize(offset + bytes.size(), 0);
    if (!bytes.empty()) std::memcpy(img->data() + offset, bytes.data(), bytes.size());
  }
}

}  // namespace snaptest
