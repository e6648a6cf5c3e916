// Runs the registered C++ test cases: all of them, or those whose name contains argv[1].
// Every case runs even after a failure, so one ctest run shows all that broke.
#include <cstdio>
#include <cstring>
#include <exception>

#include "harness.h"

int main(int argc, char** argv) {
  const char* filter = argc > 1 ? argv[1] : "";
  int ran = 0, failed = 0;
  for (const auto& c : ppfast_test::registry()) {
    if (std::strstr(c.name, filter) == nullptr) continue;
    ++ran;
    try {
      c.fn();
      std::printf("ok    %s\n", c.name);
    } catch (const std::exception& e) {
      ++failed;
      std::printf("FAIL  %s\n      %s\n", c.name, e.what());
    }
  }
  std::printf("%d of %d passed\n", ran - failed, ran);
  if (ran == 0) {
    std::printf("no test matches '%s'\n", filter);
    return 1;
  }
  return failed == 0 ? 0 : 1;
}
