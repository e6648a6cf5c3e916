// Python bindings of ppfast._C: the program engine, the runtime and the test backends.
#include <torch/extension.h>

#include "program/bindings_program.h"
#include "runtime/bindings_runtime.h"
#include "testing/bindings_testing.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "ppfast native core: the program engine (checks, lowering, dry run, timing) and the runtime";
  ppfast::register_program(m);
  ppfast::register_runtime(m);
  ppfast::testing::register_testing(m);
}
