// Unit tests of the kernel COW format helpers (store/cow_format.h), the
// table/status parsers and the in-memory exception table.
#include <algorithm>
#include <cstdio>
#include <cstring>
#include <map>
#include <random>
#include <string>
#include <vector>

#include "store/cow_format.h"
#include "store/exception_store.h"
#include "store/exception_table.h"

// Last: check.h defines a macro named fail.
#include "tests/check_util.h"

// ck_assert* records a mark point (a write to the test runner) on every
// success, which is slow in loops: loops use these, which act only on failure.
#define EXPECT_MSG(cond, ...)               \
  do {                                      \
    if (!(cond)) ck_abort_msg(__VA_ARGS__); \
  } while (0)
#define EXPECT(cond) EXPECT_MSG(cond, "%s", "Assertion '" #cond "' failed")

using snap::DiskHeader;
using snap::DiskRecord;
using snap::ExceptionTable;
using snap::Geometry;

// ck_assert_str_eq evaluates its arguments into const char* first, so a
// temporary std::string would dangle: keep it alive in a local.
#define ASSERT_STR_EQ(got, want)                       \
  do {                                                 \
    const std::string got_s_ = (got);                  \
    const std::string want_s_ = (want);                \
    ck_assert_str_eq(got_s_.c_str(), want_s_.c_str()); \
  } while (0)

namespace {

std::string Hex(const char* p, size_t n) {
  std::string s;
  char b[4];
  for (size_t i = 0; i < n; ++i) {
    std::snprintf(b, sizeof b, "%s%02x", i ? " " : "", static_cast<uint8_t>(p[i]));
    s += b;
  }
  return s;
}

// ------------------------------------------------------------- format

START_TEST(header_encodes_little_endian_snap_magic) {
  std::vector<char> buf(4096, 'x');
  DiskHeader{snap::kSnapMagic, 1, snap::kDiskVersion, 8}.Encode(buf);
  ASSERT_STR_EQ(Hex(buf.data(), 16), "53 6e 41 70 01 00 00 00 01 00 00 00 08 00 00 00");
  ck_assert_int_eq(std::memcmp(buf.data(), "SnAp", 4), 0);
  // Encode touches only the 16 header bytes.
  ck_assert_int_eq(buf[16], 'x');
  ck_assert_int_eq(buf[4095], 'x');
  // Odd values in every field, to catch byte-order slips.
  DiskHeader{0x01020304, 0xa0b0c0d0, 0x00000002, 1u << 21}.Encode(buf);
  ASSERT_STR_EQ(Hex(buf.data(), 16), "04 03 02 01 d0 c0 b0 a0 02 00 00 00 00 00 20 00");
}
END_TEST

START_TEST(header_decodes_little_endian) {
  const unsigned char raw[16] = {0x53, 0x6e, 0x41, 0x70, 0x00, 0x00, 0x00, 0x00,
                                 0x01, 0x00, 0x00, 0x00, 0x80, 0x00, 0x00, 0x00};
  DiskHeader h =
      DiskHeader::Decode(std::span<const char>(reinterpret_cast<const char*>(raw), sizeof raw));
  ck_assert_uint_eq(h.magic, snap::kSnapMagic);
  ck_assert_uint_eq(h.valid, 0);
  ck_assert_uint_eq(h.version, 1);
  ck_assert_uint_eq(h.chunk_sectors, 128);
  // Round trip with high bits set.
  char buf[16];
  DiskHeader in{0xfffffffe, 0x80000001, 0x7fffffff, 0x00010000};
  in.Encode(buf);
  DiskHeader out = DiskHeader::Decode(buf);
  ck_assert_uint_eq(out.magic, in.magic);
  ck_assert_uint_eq(out.valid, in.valid);
  ck_assert_uint_eq(out.version, in.version);
  ck_assert_uint_eq(out.chunk_sectors, in.chunk_sectors);
}
END_TEST

START_TEST(record_encode_decode) {
  char buf[20];
  std::memset(buf, 'z', sizeof buf);
  DiskRecord{0x0102030405060708ull, 0x1112131415161718ull}.Encode(buf);
  ASSERT_STR_EQ(Hex(buf, 16), "08 07 06 05 04 03 02 01 18 17 16 15 14 13 12 11");
  ck_assert_int_eq(buf[16], 'z');
  DiskRecord r = DiskRecord::Decode(buf);
  ck_assert_uint_eq(r.old_chunk, 0x0102030405060708ull);
  ck_assert_uint_eq(r.new_chunk, 0x1112131415161718ull);
  // The kernel example: old 3 -> new 2.
  DiskRecord{3, 2}.Encode(buf);
  ASSERT_STR_EQ(Hex(buf, 16), "03 00 00 00 00 00 00 00 02 00 00 00 00 00 00 00");
  // Top bit set survives (no sign games).
  DiskRecord{~0ull, 0x8000000000000000ull}.Encode(buf);
  r = DiskRecord::Decode(buf);
  ck_assert_uint_eq(r.old_chunk, ~0ull);
  ck_assert_uint_eq(r.new_chunk, 0x8000000000000000ull);
}
END_TEST

START_TEST(geometry_slot_chunk_bijection) {
  const uint32_t sizes[] = {1, 8, 16, 128};
  for (uint32_t cs : sizes) {
    Geometry g(cs);
    const uint64_t epa = uint64_t{cs} * 32;
    ck_assert_uint_eq(g.chunk_bytes(), uint64_t{cs} * 512);
    ck_assert_uint_eq(g.exceptions_per_area(), epa);
    // Areas at 1, epa+2, 2*epa+3, ...
    ck_assert_uint_eq(g.AreaChunk(0), 1);
    ck_assert_uint_eq(g.AreaChunk(1), epa + 2);
    ck_assert_uint_eq(g.AreaChunk(2), 2 * epa + 3);
    ck_assert_uint_eq(g.AreaChunk(3), 3 * epa + 4);
    ck_assert(g.IsMetadataChunk(0));
    ck_assert(g.IsMetadataChunk(1));
    ck_assert(!g.IsMetadataChunk(2));
    ck_assert(g.IsMetadataChunk(epa + 2));
    ck_assert(!g.IsMetadataChunk(epa + 1));
    ck_assert(!g.IsMetadataChunk(epa + 3));
    // Slot 0 is chunk 2; the last slot of region 0 is chunk epa+1; the
    // next one skips area 1.
    ck_assert_uint_eq(g.SlotToChunk(0), 2);
    ck_assert_uint_eq(g.SlotToChunk(epa - 1), epa + 1);
    ck_assert_uint_eq(g.SlotToChunk(epa), epa + 3);
    ck_assert_uint_eq(g.SlotToChunk(2 * epa - 1), 2 * epa + 2);
    ck_assert_uint_eq(g.SlotToChunk(2 * epa), 2 * epa + 4);
    ck_assert_uint_eq(g.AreaOfSlot(0), 0);
    ck_assert_uint_eq(g.AreaOfSlot(epa - 1), 0);
    ck_assert_uint_eq(g.AreaOfSlot(epa), 1);
    ck_assert(!g.ChunkToSlot(0).has_value());
    ck_assert(!g.ChunkToSlot(1).has_value());
    ck_assert(!g.ChunkToSlot(epa + 2).has_value());
    // Every chunk of the first few regions is metadata or exactly one slot.
    uint64_t expect_slot = 0;
    for (uint64_t c = 0; c < 5 * (epa + 1) + 1; ++c) {
      bool meta = (c == 0) || ((c - 1) % (epa + 1) == 0);
      EXPECT_MSG(g.IsMetadataChunk(c) == meta, "cs %u chunk %llu", cs,
                 static_cast<unsigned long long>(c));
      std::optional<uint64_t> s = g.ChunkToSlot(c);
      EXPECT(s.has_value() == !meta);
      if (!meta) {
        EXPECT(*s == expect_slot);
        EXPECT(g.SlotToChunk(*s) == c);
        // The slot's data lies in its own area's region.
        EXPECT(g.AreaOfSlot(*s) == (c - 2) / (epa + 1));
        ++expect_slot;
      }
    }
    // Far out (64-bit chunk numbers).
    std::mt19937_64 rng(cs);
    for (int i = 0; i < 1000; ++i) {
      uint64_t slot = rng() >> 8;
      uint64_t c = g.SlotToChunk(slot);
      EXPECT(!g.IsMetadataChunk(c));
      EXPECT(*g.ChunkToSlot(c) == slot);
    }
  }
}
END_TEST

START_TEST(validate_chunk_sectors_rules) {
  ck_assert(snap::ValidateChunkSectors(1).ok());
  ck_assert(snap::ValidateChunkSectors(8).ok());
  ck_assert(snap::ValidateChunkSectors(1u << 21).ok());
  ck_assert(!snap::ValidateChunkSectors(0).ok());
  ck_assert(!snap::ValidateChunkSectors(3).ok());
  ck_assert(!snap::ValidateChunkSectors(65).ok());
  ck_assert(!snap::ValidateChunkSectors(1u << 22).ok());
  ck_assert(!snap::ValidateChunkSectors(uint64_t{1} << 40).ok());
}
END_TEST

START_TEST(parse_chunk_size_accepts_and_refuses) {
  struct {
    const char* text;
    uint32_t sectors;
  } good[] = {{"512", 1},       {"4096", 8},         {"4k", 8},    {"4K", 8},
              {"8k", 16},       {"64K", 128},        {"1M", 2048}, {"1m", 2048},
              {"1G", 1u << 21}, {"1024M", 1u << 21}, {"4096b", 8}};
  for (const auto& g : good) {
    absl::StatusOr<uint32_t> cs = snap::ParseChunkSize(g.text);
    ck_assert_msg(cs.ok(), "'%s' refused: %s", g.text, cs.status().ToString().c_str());
    ck_assert_msg(*cs == g.sectors, "'%s' gave %u sectors, want %u", g.text, *cs, g.sectors);
  }
  const char* bad[] = {"",   "0", "3k",  "1536", "100", "513",  "2G",  "2048M",
                       "4x", "k", "-4k", "4kk",  "1T",  "3072", "12k", "99999999999999999999"};
  for (const char* b : bad) {
    absl::StatusOr<uint32_t> cs = snap::ParseChunkSize(b);
    ck_assert_msg(!cs.ok(), "'%s' accepted as %u sectors", b, cs.ok() ? *cs : 0);
  }
  // 2^22 sectors is refused as too large, with a reason.
  absl::StatusOr<uint32_t> big = snap::ParseChunkSize("2G");
  ck_assert(!big.ok());
  ck_assert_msg(big.status().message().find("large") != std::string_view::npos, "%s",
                big.status().ToString().c_str());
  absl::StatusOr<uint32_t> odd = snap::ParseChunkSize("3k");
  ck_assert_msg(odd.status().message().find("power of two") != std::string_view::npos, "%s",
                odd.status().ToString().c_str());
}
END_TEST

// Exactly P, PO or N, in either case: dm's first-letter rule would make
// "nope", "no" or "nonpersistent" a transient store (lost at restart) and
// "poo" PO.
START_TEST(parse_store_type_exact_names) {
  struct {
    const char* text;
    snap::StoreType type;
  } good[] = {{"P", snap::StoreType::kPersistent},
              {"p", snap::StoreType::kPersistent},
              {"PO", snap::StoreType::kPersistentOverflow},
              {"po", snap::StoreType::kPersistentOverflow},
              {"Po", snap::StoreType::kPersistentOverflow},
              {"pO", snap::StoreType::kPersistentOverflow},
              {"N", snap::StoreType::kTransient},
              {"n", snap::StoreType::kTransient}};
  for (const auto& g : good) {
    absl::StatusOr<snap::StoreType> t = snap::ParseStoreType(g.text);
    ck_assert_msg(t.ok(), "'%s' refused: %s", g.text, t.status().ToString().c_str());
    ck_assert_msg(*t == g.type, "'%s' parsed to the wrong type", g.text);
  }
  const char* bad[] = {"",     "persistent", "Px",   "PN",  "X",     "O", "transient-ish",
                       " P",   "P ",         "Nxyz", "nope", "no",   "nonpersistent",
                       "poo",  "POO",        "pox",  "NP"};
  for (const char* b : bad) {
    absl::StatusOr<snap::StoreType> t = snap::ParseStoreType(b);
    ck_assert_msg(!t.ok(), "'%s' accepted", b);
    ck_assert_msg(t.status().message().find("P, PO or N") != std::string_view::npos, "%s",
                  t.status().ToString().c_str());
  }
  ASSERT_STR_EQ(std::string(snap::StoreTypeName(snap::StoreType::kPersistent)), "P");
  ASSERT_STR_EQ(std::string(snap::StoreTypeName(snap::StoreType::kPersistentOverflow)), "PO");
  ASSERT_STR_EQ(std::string(snap::StoreTypeName(snap::StoreType::kTransient)), "N");
}
END_TEST

START_TEST(parse_byte_size) {
  ck_assert_uint_eq(*snap::ParseByteSize("0"), 0);
  ck_assert_uint_eq(*snap::ParseByteSize("123"), 123);
  ck_assert_uint_eq(*snap::ParseByteSize("2k"), 2048);
  ck_assert_uint_eq(*snap::ParseByteSize("3M"), 3ull << 20);
  ck_assert_uint_eq(*snap::ParseByteSize("5G"), 5ull << 30);
  ck_assert_uint_eq(*snap::ParseByteSize("7T"), 7ull << 40);
  ck_assert(!snap::ParseByteSize("").ok());
  ck_assert(!snap::ParseByteSize("G").ok());
  ck_assert(!snap::ParseByteSize("1Q").ok());
  ck_assert(!snap::ParseByteSize("20000000T").ok());  // overflows 64 bits
}
END_TEST

// ------------------------------------------------------ exception table

void CheckAgainstModel(const ExceptionTable& t, const std::map<uint64_t, uint32_t>& model,
                       std::mt19937_64& rng, uint64_t absent_range) {
  EXPECT_MSG(t.size() == model.size(), "size %llu, model %zu",
             static_cast<unsigned long long>(t.size()), model.size());
  for (const auto& [old_chunk, slot] : model) {
    std::optional<uint32_t> got = t.Lookup(old_chunk);
    EXPECT_MSG(got.has_value(), "chunk %llu missing",
               static_cast<unsigned long long>(old_chunk));
    EXPECT_MSG(*got == slot, "chunk %llu -> slot %u, want %u",
               static_cast<unsigned long long>(old_chunk), *got, slot);
  }
  for (int i = 0; i < 20000; ++i) {
    uint64_t c = rng() % absent_range;
    auto it = model.find(c);
    std::optional<uint32_t> got = t.Lookup(c);
    if (it == model.end()) {
      EXPECT_MSG(!got.has_value(), "absent chunk %llu found (slot %u)",
                 static_cast<unsigned long long>(c), got.value_or(0));
    } else {
      EXPECT(got.has_value() && *got == it->second);
    }
  }
}

START_TEST(table_random_inserts_match_model) {
  ExceptionTable t;
  std::map<uint64_t, uint32_t> model;
  std::mt19937_64 rng(42);
  uint32_t slot = 0;
  while (model.size() < 50000) {
    uint64_t c = rng() % 1000000;
    if (model.count(c)) continue;
    t.Insert(c, slot);
    model[c] = slot++;
  }
  CheckAgainstModel(t, model, rng, 1100000);
  // Neighbours of present keys are the likeliest false hits.
  for (const auto& [c, s] : model) {
    (void)s;
    for (uint64_t n : {c - 1, c + 1, c + 64, c - 64}) {
      if (model.count(n)) continue;
      EXPECT_MSG(!t.Lookup(n).has_value(), "neighbour %llu found",
                 static_cast<unsigned long long>(n));
    }
  }
  // Erasing them all gives back their chain links (4 bytes each); the
  // slot-indexed chunk array and the bucket heads stay.
  const uint64_t full = t.MemoryBytes();
  for (const auto& [c, s] : model) EXPECT(t.Erase(c));
  ck_assert_uint_eq(t.size(), 0);
  ck_assert_msg(t.MemoryBytes() + 4 * model.size() <= full, "%llu bytes before, %llu after",
                static_cast<unsigned long long>(full),
                static_cast<unsigned long long>(t.MemoryBytes()));
  for (const auto& [c, s] : model) EXPECT(!t.Lookup(c).has_value());
}
END_TEST

START_TEST(table_sequential_inserts_fold_into_runs) {
  ExceptionTable t;
  std::map<uint64_t, uint32_t> model;
  const uint64_t n = 64 * 100;
  for (uint64_t i = 0; i < n; ++i) {
    t.Insert(1000 * 64 + i, static_cast<uint32_t>(i));  // group-aligned start
    model[1000 * 64 + i] = static_cast<uint32_t>(i);
  }
  // One run per 64-chunk group, like dm's consecutive count per bucket.
  ck_assert_uint_eq(t.runs(), n / 64);
  std::mt19937_64 rng(1);
  CheckAgainstModel(t, model, rng, 2 * 64000 + n);
  // Unaligned start, and slots not equal to chunks: still folds.
  ExceptionTable u;
  for (uint64_t i = 0; i < 1000; ++i) u.Insert(37 + i, static_cast<uint32_t>(500 + i));
  ck_assert_uint_le(u.runs(), 1000 / 64 + 2);
  for (uint64_t i = 0; i < 1000; ++i) EXPECT(*u.Lookup(37 + i) == 500 + i);
  ck_assert(!u.Lookup(36).has_value());
  ck_assert(!u.Lookup(1037).has_value());
  // Consecutive chunks but non-consecutive slots do not fold.
  ExceptionTable v;
  for (uint64_t i = 0; i < 64; ++i) v.Insert(i, static_cast<uint32_t>(2 * i));
  ck_assert_uint_eq(v.runs(), 0);
  for (uint64_t i = 0; i < 64; ++i) EXPECT(*v.Lookup(i) == 2 * i);
}
END_TEST

START_TEST(table_mixed_runs_and_singles_match_model) {
  ExceptionTable t;
  std::map<uint64_t, uint32_t> model;
  std::mt19937_64 rng(7);
  uint32_t slot = 0;
  while (model.size() < 40000) {
    uint64_t start = rng() % 2000000;
    uint64_t len = (rng() % 4 == 0) ? 1 + rng() % 150 : 1;
    for (uint64_t i = 0; i < len; ++i) {
      if (model.count(start + i)) break;
      t.Insert(start + i, slot);
      model[start + i] = slot++;
    }
  }
  ck_assert_uint_gt(t.runs(), 0);
  CheckAgainstModel(t, model, rng, 2100000);
}
END_TEST

START_TEST(table_erase_run_ends_and_middles) {
  ExceptionTable t;
  std::map<uint64_t, uint32_t> model;
  // Three full groups and a partial one, all sequential.
  for (uint32_t i = 0; i < 64 * 3 + 20; ++i) {
    t.Insert(640 + i, 10 + i);
    model[640 + i] = 10 + i;
  }
  // Plus some singles.
  for (uint32_t i = 0; i < 30; ++i) {
    t.Insert(100000 + 7 * i, 5000 + 3 * i);
    model[100000 + 7 * i] = 5000 + 3 * i;
  }
  std::mt19937_64 rng(3);
  CheckAgainstModel(t, model, rng, 200000);
  // Last of a run (merge takes the newest first), first of a run, middles.
  const uint64_t erase[] = {640 + 64 * 3 + 19,
                            640 + 64 * 3 + 18,
                            640,
                            641,
                            640 + 30,
                            640 + 64 + 5,
                            640 + 64 + 6,
                            640 + 64 + 63,
                            640 + 128 + 32,
                            100000,
                            100000 + 7 * 29};
  for (uint64_t c : erase) {
    ck_assert_msg(t.Erase(c), "erase %llu failed", static_cast<unsigned long long>(c));
    model.erase(c);
    CheckAgainstModel(t, model, rng, 200000);
  }
  // Erasing absent keys is refused and harmless.
  ck_assert(!t.Erase(640));
  ck_assert(!t.Erase(99));
  ck_assert(!t.Erase(100000 + 1));
  ck_assert_uint_eq(t.size(), model.size());
  // Erase everything left, in random order.
  std::vector<uint64_t> keys;
  for (const auto& [c, s] : model) keys.push_back(c);
  std::shuffle(keys.begin(), keys.end(), rng);
  for (size_t i = 0; i < keys.size(); ++i) {
    EXPECT(t.Erase(keys[i]));
    model.erase(keys[i]);
    if (i % 25 == 0) CheckAgainstModel(t, model, rng, 200000);
  }
  ck_assert_uint_eq(t.size(), 0);
  ck_assert_uint_eq(t.runs(), 0);
  // And it can be refilled (merge then new exceptions).
  t.Insert(640, 10);
  ck_assert_uint_eq(*t.Lookup(640), 10);
  t.Clear();
  ck_assert_uint_eq(t.size(), 0);
  ck_assert(!t.Lookup(640).has_value());
}
END_TEST

START_TEST(table_erase_newest_first_like_merge) {
  ExceptionTable t;
  std::map<uint64_t, uint32_t> model;
  std::mt19937_64 rng(11);
  std::vector<uint64_t> order;
  uint32_t slot = 0;
  while (order.size() < 3000) {
    uint64_t start = rng() % 100000;
    uint64_t len = 1 + rng() % 40;
    for (uint64_t i = 0; i < len; ++i) {
      if (model.count(start + i)) break;
      t.Insert(start + i, slot);
      model[start + i] = slot++;
      order.push_back(start + i);
    }
  }
  const uint64_t runs_before = t.runs();
  ck_assert_uint_gt(runs_before, 0);
  while (!order.empty()) {
    EXPECT(t.Erase(order.back()));
    model.erase(order.back());
    order.pop_back();
    if (order.size() % 100 == 0) CheckAgainstModel(t, model, rng, 110000);
  }
  ck_assert_uint_eq(t.size(), 0);
}
END_TEST

START_TEST(table_chunks_above_2_32) {
  ExceptionTable t;
  std::map<uint64_t, uint32_t> model;
  uint32_t slot = 0;
  auto add = [&](uint64_t c) {
    t.Insert(c, slot);
    model[c] = slot++;
  };
  // Same low halves, different high halves.
  for (uint64_t hi : {0ull, 1ull, 2ull, 0xffffull, 0xffffffffull, 0x7fffffffull})
    for (uint64_t lo : {5ull, 6ull, 7ull, 1000ull}) add((hi << 32) | lo);
  // A run that sits above 2^32, and one that straddles 2^32.
  for (uint64_t i = 0; i < 100; ++i) add((3ull << 32) + 64 * 10 + i);
  for (uint64_t i = 0; i < 100; ++i) add((1ull << 34) - 50 + i);
  // The largest chunk numbers.
  add(~0ull);
  add(~0ull - 1);
  std::mt19937_64 rng(5);
  CheckAgainstModel(t, model, rng, 100);
  for (uint64_t probe : {4ull, 8ull, (1ull << 32) | 4, (1ull << 32) | 8, (5ull << 32) | 5,
                         (0x1ffffffffull << 8) | 5})
    ck_assert_msg(!t.Lookup(probe).has_value(), "%llx found",
                  static_cast<unsigned long long>(probe));
  // Erase the high ones; the low twins stay.
  for (uint64_t hi : {1ull, 0xffffffffull})
    for (uint64_t lo : {5ull, 6ull}) {
      uint64_t c = (hi << 32) | lo;
      ck_assert(t.Erase(c));
      model.erase(c);
    }
  ck_assert(t.Erase((3ull << 32) + 64 * 10 + 50));
  model.erase((3ull << 32) + 64 * 10 + 50);
  ck_assert(t.Erase(~0ull));
  model.erase(~0ull);
  CheckAgainstModel(t, model, rng, 100);
  ck_assert_uint_eq(*t.Lookup(5), model[5]);
  ck_assert(!t.Lookup((1ull << 32) | 5).has_value());
}
END_TEST

START_TEST(table_memory_per_exception) {
  const uint64_t n = 262144;
  double random_bpe, seq_bpe;
  {
    ExceptionTable t;
    std::mt19937_64 rng(99);
    // Random distinct origin chunks over a 1 TiB origin at 4 KiB chunks.
    std::vector<uint64_t> chunks;
    chunks.reserve(n);
    {
      std::map<uint64_t, bool> seen;
      while (chunks.size() < n) {
        uint64_t c = rng() % (1ull << 28);
        if (seen.emplace(c, true).second) chunks.push_back(c);
      }
    }
    for (uint64_t i = 0; i < n; ++i) t.Insert(chunks[i], static_cast<uint32_t>(i));
    ck_assert_uint_eq(t.size(), n);
    for (uint64_t i = 0; i < n; i += 97) EXPECT(*t.Lookup(chunks[i]) == i);
    random_bpe = static_cast<double>(t.MemoryBytes()) / static_cast<double>(t.size());
    std::printf(
        "exception table: %llu random exceptions: %llu bytes, %.2f B/exception (%llu runs)\n",
        static_cast<unsigned long long>(n), static_cast<unsigned long long>(t.MemoryBytes()),
        random_bpe, static_cast<unsigned long long>(t.runs()));
  }
  {
    ExceptionTable t;
    for (uint64_t i = 0; i < n; ++i) t.Insert(i, static_cast<uint32_t>(i));
    ck_assert_uint_eq(t.size(), n);
    for (uint64_t i = 0; i < n; i += 97) EXPECT(*t.Lookup(i) == i);
    seq_bpe = static_cast<double>(t.MemoryBytes()) / static_cast<double>(t.size());
    std::printf(
        "exception table: %llu sequential exceptions: %llu bytes, %.2f B/exception (%llu "
        "runs)\n",
        static_cast<unsigned long long>(n), static_cast<unsigned long long>(t.MemoryBytes()),
        seq_bpe, static_cast<unsigned long long>(t.runs()));
  }
  std::fflush(stdout);
  ck_assert_msg(random_bpe < 12.5, "random: %.2f B/exception", random_bpe);
  {
    // Just past a doubling of the bucket heads, the dearest point: 2^18
    // exceptions fill 2^17 buckets twice over, 2^18 + 2^16 need 2^18.
    ExceptionTable t;
    const uint64_t m = n + n / 4;
    for (uint64_t i = 0; i < m; ++i) t.Insert(i * 7919 % (1ull << 30) * 3, static_cast<uint32_t>(i));
    const double bpe = static_cast<double>(t.MemoryBytes()) / static_cast<double>(t.size());
    std::printf("exception table: %llu scattered exceptions: %.2f B/exception\n",
                static_cast<unsigned long long>(m), bpe);
    ck_assert_uint_eq(t.runs(), 0);
    ck_assert_msg(bpe < 12.5, "just past a doubling: %.2f B/exception", bpe);
  }
  ck_assert_msg(seq_bpe < 8.0, "sequential: %.2f B/exception", seq_bpe);
}
END_TEST

// A store's load reserves a slot per data chunk up front, then gives back
// what runs left unused: the table must end as small as when it grew one
// insert at a time, and answer the same.
START_TEST(table_reserved_for_loading_ends_as_small) {
  const uint64_t n = 100000;
  std::mt19937_64 rng(7);
  // Random, sequential (all runs), and half in runs of two.
  for (int pattern = 0; pattern < 3; ++pattern) {
    std::vector<uint64_t> chunks;
    for (uint64_t i = 0; i < n; ++i) {
      if (pattern == 0) chunks.push_back(rng() % (1ull << 40));
      if (pattern == 1) chunks.push_back(i);
      if (pattern == 2) chunks.push_back(i % 4 < 2 ? i : (i * 7919) % (1ull << 30) + (1ull << 31));
    }
    ExceptionTable grown, loaded;
    loaded.Reserve(n);
    for (uint64_t i = 0; i < n; ++i) {
      if (grown.Lookup(chunks[i])) continue;  // the earliest record wins
      grown.Insert(chunks[i], static_cast<uint32_t>(i));
      loaded.Insert(chunks[i], static_cast<uint32_t>(i));
    }
    loaded.FitToSize();
    ck_assert_uint_eq(loaded.size(), grown.size());
    ck_assert_uint_eq(loaded.runs(), grown.runs());
    ck_assert_msg(loaded.MemoryBytes() <= grown.MemoryBytes(),
                  "pattern %d: %llu bytes after loading, %llu grown", pattern,
                  static_cast<unsigned long long>(loaded.MemoryBytes()),
                  static_cast<unsigned long long>(grown.MemoryBytes()));
    for (uint64_t i = 0; i < n; i += 7) EXPECT(loaded.Lookup(chunks[i]) == grown.Lookup(chunks[i]));
    EXPECT(!loaded.Lookup((1ull << 41) + 5));
  }
}
END_TEST

Suite* FormatSuite() {
  Suite* s = suite_create("cow_format");
  TCase* tc = tcase_create("encoding");
  tcase_add_test(tc, header_encodes_little_endian_snap_magic);
  tcase_add_test(tc, header_decodes_little_endian);
  tcase_add_test(tc, record_encode_decode);
  suite_add_tcase(s, tc);
  tc = tcase_create("geometry");
  tcase_add_test(tc, geometry_slot_chunk_bijection);
  suite_add_tcase(s, tc);
  tc = tcase_create("parsing");
  tcase_add_test(tc, validate_chunk_sectors_rules);
  tcase_add_test(tc, parse_chunk_size_accepts_and_refuses);
  tcase_add_test(tc, parse_store_type_exact_names);
  tcase_add_test(tc, parse_byte_size);
  suite_add_tcase(s, tc);
  return s;
}

Suite* TableSuite() {
  Suite* s = suite_create("exception_table");
  TCase* tc = tcase_create("model");
  tcase_set_timeout(tc, 120);
  tcase_add_test(tc, table_random_inserts_match_model);
  tcase_add_test(tc, table_sequential_inserts_fold_into_runs);
  tcase_add_test(tc, table_mixed_runs_and_singles_match_model);
  tcase_add_test(tc, table_erase_run_ends_and_middles);
  tcase_add_test(tc, table_erase_newest_first_like_merge);
  tcase_add_test(tc, table_chunks_above_2_32);
  suite_add_tcase(s, tc);
  tc = tcase_create("memory");
  tcase_set_timeout(tc, 120);
  tcase_add_test(tc, table_memory_per_exception);
  tcase_add_test(tc, table_reserved_for_loading_ends_as_small);
  suite_add_tcase(s, tc);
  return s;
}

}  // namespace

int main() { return snaptest::RunSuites({FormatSuite(), TableSuite()}); }
