// A few macros for the C++ tests, so they build offline with nothing but the compiler and
// torch: TEST(name) { ... } registers a case, REQUIRE* throw on failure with file, line and the
// values involved, and main.cpp runs every case (or those whose name contains argv[1]).
#pragma once

#include <cmath>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

namespace ppfast_test {

struct Case {
  const char* name;
  void (*fn)();
};

// A function-local static, so cases in any file may register before main runs.
inline std::vector<Case>& registry() {
  static std::vector<Case> cases;
  return cases;
}

struct Register {
  Register(const char* name, void (*fn)()) { registry().push_back(Case{name, fn}); }
};

struct Failure : std::runtime_error {
  using std::runtime_error::runtime_error;
};

[[noreturn]] inline void fail(const char* file, int line, const std::string& what) {
  std::ostringstream os;
  os << file << ":" << line << ": " << what;
  throw Failure(os.str());
}

}  // namespace ppfast_test

#define TEST(name)                                                                                 \
  static void name();                                                                              \
  static const ::ppfast_test::Register name##_registered(#name, &name);                            \
  static void name()

// REQUIRE(cond, msg): msg is anything that can be streamed, e.g. "rank " << r.
#define REQUIRE(cond, msg)                                                                         \
  do {                                                                                             \
    if (!(cond)) {                                                                                 \
      std::ostringstream os_;                                                                      \
      os_ << "REQUIRE(" #cond ") failed: " << msg;                                                 \
      ::ppfast_test::fail(__FILE__, __LINE__, os_.str());                                          \
    }                                                                                              \
  } while (0)

#define REQUIRE_EQ(a, b, msg)                                                                      \
  do {                                                                                             \
    const auto& a_ = (a);                                                                          \
    const auto& b_ = (b);                                                                          \
    if (!(a_ == b_)) {                                                                             \
      std::ostringstream os_;                                                                      \
      os_ << #a " == " #b " failed: " << a_ << " != " << b_ << " (" << msg << ")";                 \
      ::ppfast_test::fail(__FILE__, __LINE__, os_.str());                                          \
    }                                                                                              \
  } while (0)

#define REQUIRE_NEAR(a, b, tol, msg)                                                               \
  do {                                                                                             \
    const double a_ = (a);                                                                         \
    const double b_ = (b);                                                                         \
    if (!(std::fabs(a_ - b_) <= (tol))) {                                                          \
      std::ostringstream os_;                                                                      \
      os_ << #a " ~= " #b " failed: " << a_ << " vs " << b_ << " (" << msg << ")";                 \
      ::ppfast_test::fail(__FILE__, __LINE__, os_.str());                                          \
    }                                                                                              \
  } while (0)
