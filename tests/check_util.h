// What the Check unit tests share: an assertion on absl::Status, and a
// main that runs suites. check.h comes last among a test's includes (it
// defines macros that clash with the C++ library), so this header does too.
#pragma once

#include <initializer_list>

#include "absl/status/status.h"

#include <check.h>

// Fails the test with the status when expr is not OK.
#define ASSERT_OK(expr)                                                      \
  do {                                                                       \
    const absl::Status st_ = (expr);                                         \
    ck_assert_msg(st_.ok(), "%s failed: %s", #expr, st_.ToString().c_str()); \
  } while (0)

namespace snaptest {

// Runs the suites, in order; the process's exit status.
inline int RunSuites(std::initializer_list<Suite*> suites) {
  SRunner* sr = nullptr;
  for (Suite* s : suites) {
    if (sr == nullptr)
      sr = srunner_create(s);
    else
      srunner_add_suite(sr, s);
  }
  srunner_run_all(sr, CK_NORMAL);
  const int failed = srunner_ntests_failed(sr);
  srunner_free(sr);
  return failed == 0 ? 0 : 1;
}

}  // namespace snaptest
