// Python bindings of the test backends: NcclEmuBackend, registered as "nccl_emu" by
// ppfast.testing.
#pragma once

#include <pybind11/chrono.h>
#include <torch/extension.h>

#include "runtime/executor.h"
#include "testing/nccl_emu.h"
#include "wire/meta.h"

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
  // The executor's shape header, for the fuzz tests: what a peer's bytes decode to, or
  // ValueError saying why they do not.
  m.def(
      "decode_meta",
      [](const at::Tensor& header) {
        std::vector<std::pair<at::ScalarType, std::vector<int64_t>>> out;
        for (auto& [dtype, shape] : ppfast::decode_meta(header).tensors) out.emplace_back(dtype, shape);
        return out;
      },
      py::arg("header"));
  m.def("encode_meta", &ppfast::encode_meta, py::arg("tensors"));
  m.def(
      "seal_meta",
      [](at::Tensor header) {
        TORCH_CHECK(header.scalar_type() == at::kLong && header.numel() == wire::kMetaLen &&
                    header.is_contiguous() && header.is_cpu(), "not a shape header");
        int64_t* d = header.data_ptr<int64_t>();
        d[wire::kMetaLen - 1] = wire::check_word(d);
      },
      py::arg("header"),
      "Rewrite a header's check word in place, as a sender that wrote these words would.");
}

}  // namespace ppfast::testing
