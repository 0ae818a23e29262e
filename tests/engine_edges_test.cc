// The engine at the edges of its requests: a merge that finishes or a
// snapshot that goes away while a request is in flight, and requests that
// fail twice over. Each case was a bug:
//
// - a snapshot taken while another merges would have saved the raw origin,
//   not the merged view the origin export shows: it is refused;
// - a write to a merging snapshot (from a connection opened before the
//   merge) was acknowledged, then lost as the merge moved on: refused;
// - an origin read racing the end of a merge failed with EIO;
// - a snapshot read served from the origin while the snapshot was dropped
//   returned data written after the drop;
// - a snapshot write whose origin read and COW write both failed left a
//   COW slot pending for good, and every later flush of that store (so
//   every queued origin write) waited for it.
#include <atomic>
#include <chrono>
#include <future>
#include <thread>

#include "tests/engine_rig.h"  // last: it includes check.h

namespace {

using namespace snap_test;

START_TEST(take_during_merge_is_refused) {
  Rig r;
  std::shared_ptr<Snapshot> m = r.NewSnapshot("m");
  r.Take(m);
  ASSERT_OK(r.engine.SnapWrite(*m, Fill(kChunk, 'M'), 0, true));
  r.engine.StartMerge(m);
  std::vector<char> view(kChunk);
  ASSERT_OK(r.engine.OriginRead(view, 0));
  ck_assert(view == Fill(kChunk, 'M'));
  std::shared_ptr<Snapshot> s = r.NewSnapshot("s");
  absl::Status st = r.engine.Add(s);
  ck_assert_msg(!st.ok() && st.message().find("m is merging") != std::string::npos,
                "take during a merge: %s", st.ToString().c_str());
  ck_assert(!r.engine.CanTake().ok());
  r.MergeToEnd();
  ASSERT_OK(r.engine.CanTake());
  r.Take(s);
  ck_assert(r.SnapRead(*s, 0, kChunk) == Fill(kChunk, 'M'));
}
END_TEST

START_TEST(merging_snapshot_refuses_writes) {
  Rig r;
  std::shared_ptr<Snapshot> m = r.NewSnapshot("m");
  r.Take(m);
  ASSERT_OK(r.engine.SnapWrite(*m, Fill(kChunk, 'M'), 0, true));
  r.engine.StartMerge(m);
  absl::Status st = r.engine.SnapWrite(*m, Fill(kChunk, 'N'), 5 * kChunk, false);
  ck_assert_msg(!st.ok() && st.message().find("merging") != std::string::npos,
                "write to a merging snapshot: %s", st.ToString().c_str());
  ck_assert(!r.engine.SnapZero(*m, kChunk, 6 * kChunk, false, false).ok());
  ck_assert(!r.engine.SnapTrim(*m, kChunk, 0).ok());
  // Reads still show the snapshot, which is what the origin becomes.
  ck_assert(r.SnapRead(*m, 0, kChunk) == Fill(kChunk, 'M'));
  r.MergeToEnd();
  ck_assert(r.Origin(0, kChunk) == Fill(kChunk, 'M'));
  ck_assert(r.Origin(5 * kChunk, 2 * kChunk) == Fill(2 * kChunk, 'o'));
}
END_TEST

START_TEST(origin_reads_go_on_as_a_merge_finishes) {
  // The race is narrow: many short merges, a reader hammering the origin.
  int failed = 0;
  for (int round = 0; round < 60 && failed == 0; ++round) {
    Rig r;
    std::shared_ptr<Snapshot> m = r.NewSnapshot("m");
    r.Take(m);
    ASSERT_OK(r.engine.SnapWrite(*m, Fill(kChunk, 'M'), 3 * kChunk, true));
    r.engine.StartMerge(m);
    std::atomic<bool> stop{false};
    std::atomic<int> bad{0};
    std::thread reader([&] {
      std::vector<char> b(2 * kChunk);
      while (!stop.load()) {
        // Before, during and after the merge, chunk 3 reads as m's data.
        if (!r.engine.OriginRead(b, 2 * kChunk).ok() ||
            !std::equal(b.begin() + kChunk, b.end(), Fill(kChunk, 'M').begin()))
          ++bad;
      }
    });
    std::this_thread::sleep_for(std::chrono::microseconds(200));
    r.MergeToEnd();
    std::this_thread::sleep_for(std::chrono::microseconds(200));
    stop = true;
    reader.join();
    failed += bad.load();
  }
  ck_assert_int_eq(failed, 0);
}
END_TEST

START_TEST(snapshot_read_fails_if_the_snapshot_is_dropped_meanwhile) {
  Rig r;
  std::shared_ptr<Snapshot> s = r.NewSnapshot("s");
  r.Take(s);
  // The snapshot's read of chunk 3 (from the origin) stops inside the
  // origin read; meanwhile s is dropped and the origin written.
  std::promise<void> in_read, go;
  std::shared_future<void> go_f = go.get_future().share();
  std::atomic<bool> armed{true};
  r.origin.before_read = [&](uint64_t) {
    if (armed.exchange(false)) {
      in_read.set_value();
      go_f.wait();
    }
  };
  std::vector<char> got(kChunk);
  absl::Status read;
  std::thread reader([&] { read = r.engine.SnapRead(*s, got, 3 * kChunk); });
  in_read.get_future().wait();
  ASSERT_OK(r.engine.Remove("s"));
  ASSERT_OK(r.engine.OriginWrite(Fill(kChunk, 'X'), 3 * kChunk, false));
  go.set_value();
  reader.join();
  ck_assert_msg(!read.ok() || got == Fill(kChunk, 'o'),
                "a read of dropped snapshot s returned data written after the drop");
  ck_assert(!read.ok());
}
END_TEST

START_TEST(failed_snapshot_write_leaves_no_slot_pending) {
  Rig r;
  std::shared_ptr<Snapshot> s = r.NewSnapshot("s");
  r.Take(s);
  // Chunk 0 whole and the first byte of chunk 1: chunk 0 is written in a
  // run after chunk 1's old data is read. The read fails, and so does the
  // COW write of the run before it.
  r.origin.fail_reads_in = {kChunk, 2 * kChunk};
  snaptest::Fault f;
  f.op = snaptest::Op::kWrite;
  f.kind = snaptest::FaultKind::kEIO;
  r.disks.back()->AddFault(f);
  ck_assert(!r.engine.SnapWrite(*s, Fill(kChunk + 1, 'S'), 0, false).ok());
  r.origin.fail_reads_in = {0, 0};
  // An origin write that copies out is queued behind a flush of s's store:
  // that flush, and the origin flush after it, must not wait for a slot
  // nobody will commit.
  ASSERT_OK(r.engine.OriginWrite(Fill(kChunk, 'A'), 10 * kChunk, false));
  std::future<absl::Status> flush =
      std::async(std::launch::async, [&] { return r.engine.OriginFlush(); });
  ck_assert_msg(flush.wait_for(std::chrono::seconds(20)) == std::future_status::ready,
                "origin flush still waiting after 20 s");
  ASSERT_OK(flush.get());
  ck_assert(r.Origin(10 * kChunk, kChunk) == Fill(kChunk, 'A'));
  ck_assert(r.SnapRead(*s, 10 * kChunk, kChunk) == Fill(kChunk, 'o'));
  ASSERT_OK(r.engine.SnapFlush(*s));
}
END_TEST

}  // namespace

int main() {
  Suite* s = suite_create("engine_edges");
  TCase* tc = tcase_create("edges");
  tcase_set_timeout(tc, 120);
  tcase_add_test(tc, take_during_merge_is_refused);
  tcase_add_test(tc, merging_snapshot_refuses_writes);
  tcase_add_test(tc, origin_reads_go_on_as_a_merge_finishes);
  tcase_add_test(tc, snapshot_read_fails_if_the_snapshot_is_dropped_meanwhile);
  tcase_add_test(tc, failed_snapshot_write_leaves_no_slot_pending);
  suite_add_tcase(s, tc);
  return snaptest::RunSuites({s});
}
