// Origin writes that copy out are acknowledged before their copy-outs are
// durable and reach the origin afterwards (filter/origin_write_behind.h).
// These tests hold the COW file's syncs at a gate, so what is queued and
// what has reached the origin is known exactly at each step:
//
// - no origin write is issued before every snapshot's exception for its
//   chunks is durable (checked inside the origin's Write);
// - an acknowledged write is not on the origin while its copy-out waits,
//   and is after a flush; the snapshot keeps the old data;
// - a queued write that fails for good fails every later flush; one
//   that fails for a moment is tried again;
// - a snapshot taken while writes are queued includes them: later
//   copy-outs to it save their data, not the data before them;
// - the buffers of written data are reused for the next writes, within
//   the queue's bound, and given back once writes stop; a thread keeps
//   its copy buffer between requests.
#include <stdlib.h>

#include <chrono>
#include <cstring>
#include <thread>

#include "filter/buffer_pool.h"
#include "filter/origin_write_behind.h"
#include "filter/scratch_buffer.h"
#include "tests/engine_rig.h"  // last: it includes check.h

namespace {

using namespace snap_test;

START_TEST(write_waits_for_durable_copy_out) {
  Rig r;
  std::shared_ptr<Snapshot> s = r.NewSnapshot("s");
  r.Take(s);
  r.gate.Close();
  // 8 KiB across chunks 1..3, not chunk-aligned: three copy-outs.
  ASSERT_OK(r.engine.OriginWrite(Fill(8192, 'A'), kChunk + 100, false));
  // Acknowledged, but held: its copy-outs are not durable yet.
  ck_assert(r.Origin(kChunk + 100, 8192) == Fill(8192, 'o'));
  std::optional<snap::Exception> e = s->store->Lookup(2);
  ck_assert(e.has_value() && !e->durable);
  ck_assert(r.SnapRead(*s, kChunk, 3 * kChunk) == Fill(3 * kChunk, 'o'));
  r.gate.Open();
  ASSERT_OK(r.engine.OriginFlush());
  ck_assert(r.Origin(kChunk + 100, 8192) == Fill(8192, 'A'));
  std::vector<char> got(8192);
  ASSERT_OK(r.engine.OriginRead(got, kChunk + 100));
  ck_assert(got == Fill(8192, 'A'));
  ck_assert(r.SnapRead(*s, kChunk, 3 * kChunk) == Fill(3 * kChunk, 'o'));
  ck_assert_int_eq(r.early_writes.load(), 0);
  // A durable exception needs no queue: the write goes straight through.
  ASSERT_OK(r.engine.OriginWrite(Fill(100, 'B'), kChunk + 200, false));
  ck_assert(r.Origin(kChunk + 200, 100) == Fill(100, 'B'));
  ck_assert_int_eq(r.early_writes.load(), 0);
}
END_TEST

START_TEST(reads_and_writes_after_queued_writes_see_them) {
  Rig r;
  std::shared_ptr<Snapshot> s = r.NewSnapshot("s");
  r.Take(s);
  // Many small writes, some to the same chunks, in order: the last wins.
  for (int i = 0; i < 200; ++i) {
    const uint64_t off = static_cast<uint64_t>(i % 37) * 1000;
    ASSERT_OK(r.engine.OriginWrite(Fill(1500, static_cast<char>('a' + i % 26)), off, false));
    std::vector<char> got(1500);
    ASSERT_OK(r.engine.OriginRead(got, off));
    ck_assert_msg(got == Fill(1500, static_cast<char>('a' + i % 26)),
                  "write %d at %llu not read back", i, static_cast<unsigned long long>(off));
  }
  ASSERT_OK(r.engine.OriginFlush());
  ck_assert_int_eq(r.early_writes.load(), 0);
  ck_assert(r.SnapRead(*s, 0, 64 * kChunk) == Fill(64 * kChunk, 'o'));
}
END_TEST

START_TEST(failed_queued_write_fails_every_later_flush) {
  Rig r;
  std::shared_ptr<Snapshot> s = r.NewSnapshot("s");
  r.Take(s);
  r.origin.fail_writes = true;
  ASSERT_OK(r.engine.OriginWrite(Fill(kChunk, 'A'), 5 * kChunk, false));
  absl::Status st = r.engine.OriginFlush();
  ck_assert_msg(!st.ok() && st.message().find("acknowledged origin write failed") !=
                                std::string::npos,
                "flush after a failed queued write: %s", st.ToString().c_str());
  // The write is lost for good: no later flush may claim it durable, not
  // even once the origin works again, and FUA writes fail the same way.
  r.origin.fail_writes = false;
  for (int i = 0; i < 3; ++i) ck_assert(!r.engine.OriginFlush().ok());
  ck_assert(!r.engine.OriginWrite(Fill(kChunk, 'B'), 9 * kChunk, true).ok());
  // The snapshot lost nothing; the origin still has its old data there.
  ck_assert(r.SnapRead(*s, 5 * kChunk, kChunk) == Fill(kChunk, 'o'));
  ck_assert(r.Origin(5 * kChunk, kChunk) == Fill(kChunk, 'o'));
}
END_TEST

START_TEST(passing_origin_write_failure_is_retried) {
  Rig r;
  std::shared_ptr<Snapshot> s = r.NewSnapshot("s");
  r.Take(s);
  // Two failures in a row, then the origin answers: the queued write goes
  // through, in order with the one after it to the same chunk.
  r.origin.fail_next_writes = 2;
  ASSERT_OK(r.engine.OriginWrite(Fill(kChunk, 'A'), 5 * kChunk, false));
  ASSERT_OK(r.engine.OriginWrite(Fill(100, 'B'), 5 * kChunk + 10, false));
  ASSERT_OK(r.engine.OriginFlush());
  std::vector<char> want = Fill(kChunk, 'A');
  std::fill(want.begin() + 10, want.begin() + 110, 'B');
  ck_assert(r.Origin(5 * kChunk, kChunk) == want);
  ck_assert(r.SnapRead(*s, 5 * kChunk, kChunk) == Fill(kChunk, 'o'));
}
END_TEST

START_TEST(take_includes_queued_writes) {
  Rig r;
  std::shared_ptr<Snapshot> s1 = r.NewSnapshot("s1");
  r.Take(s1);
  r.gate.Close();
  ASSERT_OK(r.engine.OriginWrite(Fill(kChunk, 'A'), 7 * kChunk, false));
  std::shared_ptr<Snapshot> s2 = r.NewSnapshot("s2");
  std::atomic<bool> added{false};
  std::thread taker([&] {
    r.Take(s2);
    added = true;
  });
  // The take waits for the queued write (which waits at the gate).
  std::this_thread::sleep_for(std::chrono::milliseconds(200));
  ck_assert_msg(!added.load(), "a take finished while an acknowledged write was queued");
  r.gate.Open();
  taker.join();
  // s2's point in time includes the write; the next write copies it out.
  ASSERT_OK(r.engine.OriginWrite(Fill(kChunk, 'B'), 7 * kChunk, false));
  ASSERT_OK(r.engine.OriginFlush());
  ck_assert(r.SnapRead(*s1, 7 * kChunk, kChunk) == Fill(kChunk, 'o'));
  ck_assert(r.SnapRead(*s2, 7 * kChunk, kChunk) == Fill(kChunk, 'A'));
  ck_assert(r.Origin(7 * kChunk, kChunk) == Fill(kChunk, 'B'));
  ck_assert_int_eq(r.early_writes.load(), 0);
}
END_TEST

// DESIGN.md: after a FUA write succeeds, every write acknowledged before
// it is durable, queued origin writes included, whatever the plugin's own
// FUA covers. Found by test-crash-kill9.sh.
START_TEST(fua_makes_earlier_queued_writes_durable) {
  Rig r;
  std::shared_ptr<Snapshot> s = r.NewSnapshot("s");
  r.Take(s);
  for (int kind = 0; kind < 3; ++kind) {
    const uint64_t queued_at = (10 + 3 * kind) * kChunk, fua_at = queued_at + kChunk;
    r.gate.Close();
    ASSERT_OK(r.engine.OriginWrite(Fill(kChunk, 'Q'), queued_at, false));
    ck_assert(r.Origin(queued_at, kChunk) == Fill(kChunk, 'o'));  // held
    std::thread fua([&] {
      // A FUA write (copying out), a FUA zero, a FUA write that needs no copy.
      if (kind == 0) ASSERT_OK(r.engine.OriginWrite(Fill(kChunk, 'F'), fua_at, true));
      if (kind == 1) ASSERT_OK(r.engine.OriginZero(kChunk, fua_at, false, true, false));
      if (kind == 2) {
        ASSERT_OK(r.engine.SnapWrite(*s, Fill(kChunk, 's'), fua_at, true));
        ASSERT_OK(r.engine.OriginWrite(Fill(kChunk, 'F'), fua_at, true));
      }
    });
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
    r.gate.Open();
    fua.join();
    ck_assert_msg(r.origin.Durable(queued_at, kChunk) == Fill(kChunk, 'Q'),
                  "kind %d: a write acknowledged before a FUA write is not durable", kind);
    ck_assert(r.origin.Durable(fua_at, kChunk) == Fill(kChunk, kind == 1 ? 0 : 'F'));
  }
  ck_assert_int_eq(r.early_writes.load(), 0);
}
END_TEST

START_TEST(written_buffers_are_reused_then_given_back) {
  snap_test::MemoryOrigin origin(Fill(kSize, 'o'));
  std::vector<char> model(kSize, 'o');
  const uint64_t max_bytes = 64 * 1024;
  // Long enough that a slow machine does not clear the kept buffers
  // between WaitIdle and the check after it.
  snap::OriginWriteBehind behind(origin, max_bytes, absl::Seconds(2));
  // Sizes that grow and shrink, so a reused buffer is sometimes too small
  // and sometimes larger than the data.
  const size_t sizes[] = {5000, 300, 12000, 4096, 1, 9000};
  for (int round = 0; round < 3; ++round) {
    for (int i = 0; i < 30; ++i) {
      const size_t n = sizes[i % 6];
      const uint64_t off = static_cast<uint64_t>((i * 7919 + round * 31) % 200) * 4096;
      const char v = static_cast<char>('a' + (i + round) % 26);
      behind.Queue(Fill(n, v), off, {});
      std::fill_n(model.begin() + static_cast<ptrdiff_t>(off), n, v);
    }
    behind.WaitIdle();
    ck_assert_msg(behind.kept_bytes() > 0 && behind.kept_bytes() <= max_bytes,
                  "round %d: %llu bytes kept", round,
                  static_cast<unsigned long long>(behind.kept_bytes()));
    std::vector<char> got(kSize);
    ASSERT_OK(origin.Read(got, 0));
    ck_assert_msg(got == model, "round %d: the origin differs from the model", round);
  }
  // No writes for the idle period: the buffers go back to the system.
  for (int i = 0; i < 1500 && behind.kept_bytes() != 0; ++i)
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  ck_assert_uint_eq(behind.kept_bytes(), 0);
}
END_TEST

START_TEST(buffer_pool_matches_sizes_within_its_room) {
  snap::BufferPool pool;
  std::vector<char> a(8192, 'a');
  const char* a_mem = a.data();
  pool.Give(std::move(a), 1 << 20);
  ck_assert_uint_eq(pool.kept_bytes(), 8192);
  // Too small a buffer for 9000 bytes, too big for 100: neither is served.
  ck_assert_uint_eq(pool.Take(9000).capacity(), 0);
  ck_assert_uint_eq(pool.Take(100).capacity(), 0);
  // 5000 bytes fit, and not twice over: the same memory, empty.
  std::vector<char> got = pool.Take(5000);
  ck_assert_ptr_eq(got.data(), a_mem);
  ck_assert_uint_eq(got.size(), 0);
  ck_assert_uint_eq(pool.kept_bytes(), 0);
  // Room is honoured: a second 8 KiB buffer does not fit in 12 KiB.
  pool.Give(std::move(got), 12288);
  pool.Give(std::vector<char>(8192), 12288);
  ck_assert_uint_eq(pool.kept_bytes(), 8192);
  pool.Clear();
  ck_assert_uint_eq(pool.kept_bytes(), 0);
  ck_assert_uint_eq(pool.Take(5000).capacity(), 0);
}
END_TEST

START_TEST(scratch_buffer_is_kept_per_thread) {
  char* kept;
  {
    snap::ScratchBuffer a(8192);
    kept = a.first(8192).data();
    std::memset(kept, 1, 8192);
  }
  {
    // The next one on this thread, no larger, is the same memory.
    snap::ScratchBuffer b(4096);
    ck_assert_ptr_eq(b.first(4096).data(), kept);
    // One asked for while it is in use is another.
    snap::ScratchBuffer nested(4096);
    ck_assert_ptr_ne(nested.first(4096).data(), kept);
  }
  {
    // Too big to keep: it does not displace the kept one.
    snap::ScratchBuffer big(snap::ScratchBuffer::kKeepBytes * 2);
    std::memset(big.first(1).data(), 2, 1);
  }
  {
    snap::ScratchBuffer c(8192);
    ck_assert_ptr_eq(c.first(8192).data(), kept);
  }
  // Another thread has its own.
  char* other = nullptr;
  std::thread([&] {
    snap::ScratchBuffer d(8192);
    other = d.first(8192).data();
    std::memset(other, 3, 8192);
  }).join();
  snap::ScratchBuffer e(8192);
  ck_assert_ptr_eq(e.first(8192).data(), kept);
  ck_assert_ptr_ne(other, kept);
}
END_TEST

}  // namespace

int main() {
  Suite* s = suite_create("write_behind");
  TCase* tc = tcase_create("queue");
  tcase_set_timeout(tc, 120);
  tcase_add_test(tc, write_waits_for_durable_copy_out);
  tcase_add_test(tc, reads_and_writes_after_queued_writes_see_them);
  tcase_add_test(tc, failed_queued_write_fails_every_later_flush);
  tcase_add_test(tc, passing_origin_write_failure_is_retried);
  tcase_add_test(tc, take_includes_queued_writes);
  tcase_add_test(tc, fua_makes_earlier_queued_writes_durable);
  tcase_add_test(tc, written_buffers_are_reused_then_given_back);
  tcase_add_test(tc, buffer_pool_matches_sizes_within_its_room);
  tcase_add_test(tc, scratch_buffer_is_kept_per_thread);
  suite_add_tcase(s, tc);
  return snaptest::RunSuites({s});
}
