// Python bindings of the test backends: NcclEmuBackend, registered as "nccl_emu" by
// ppfast.testing.
#pragma once

#include <pybind11/chrono.h>
#include <torch/extension.h>

#include "testing/nccl_emu.h"

namespace ppfast::testing {

inline void register_testing(pybind11::module_& m) {
  namespace py = pybind11;
  py::class_<NcclEmu, c10d::Backend, c10::intrusive_ptr<NcclEmu>>(
      m, "NcclEmuBackend",
      "A c10d backend for CPU tensors with NCCL's point-to-point semantics, over an inner "
      "backend (gloo); see csrc/testing/nccl_emu.h.")
      .def(py::init([](c10::intrusive_ptr<c10d::Backend> inner, int rank, int size,
                       std::chrono::milliseconds timeout) {
             return c10::make_intrusive<NcclEmu>(std::move(inner), rank, size, timeout);
           }),
           py::arg("inner"), py::arg("rank"), py::arg("size"), py::arg("timeout"))
      .def_property_readonly("items_run", &NcclEmu::items_run,
                             "operations and groups run on the emulated stream so far");
}

}  // namespace ppfast::testing
