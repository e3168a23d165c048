// The CHECK macro of the core's CTest programs: a failed condition prints where and why and counts
// into `failures`, so one run reports every failing check; main() returns non-zero if any failed.
#pragma once
#include <cstdio>

inline int failures = 0;

#define CHECK(cond, ...)                                          \
  do {                                                            \
    if (!(cond)) {                                                \
      ++failures;                                                 \
      std::printf("FAIL %s:%d: %s: ", __FILE__, __LINE__, #cond); \
      std::printf(__VA_ARGS__);                                   \
      std::printf("\n");                                          \
    }                                                             \
  } while (0)
