// Python bindings of the test backends: NcclEmuBackend, registered as "nccl_emu" by
// ppfast.testing.
#pragma once

#include <pybind11/chrono.h>
#include <torch/extension.h>

#include "runtime/executor.h"
#include "testing/faulty_transport.h"
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
  py::class_<FaultyTransport, Transport, std::shared_ptr<FaultyTransport>>(
      m, "FaultyTransport",
      "Wraps a transport and does one chosen thing wrong (delay, drop, duplicate, reorder, "
      "corrupt, kill, freeze); see csrc/testing/faulty_transport.h.")
      .def(py::init<std::shared_ptr<Transport>>(), py::arg("inner"))
      .def("arm", &FaultyTransport::arm, py::arg("fault"), py::arg("op") = "send",
           py::arg("nth") = 0, py::arg("peer") = -1, py::arg("seconds") = 0.0,
           "Fault the nth send (or recv) from now, to `peer` (-1: any).")
      .def_property_readonly("fired", &FaultyTransport::fired)
      .def_property_readonly("sends", &FaultyTransport::sends)
      .def_property_readonly("recvs", &FaultyTransport::recvs);
  // The executor's shape header, for the fuzz tests: what a peer's bytes decode to, or
  // ValueError saying why they do not.
  m.def(
      "decode_meta",
      [](const at::Tensor& header) {
        std::vector<std::pair<at::ScalarType, std::vector<int64_t>>> out;
        ppfast::Meta meta = ppfast::decode_meta(header);
        for (auto& [dtype, shape] : meta.tensors) out.emplace_back(dtype, shape);
        return py::make_tuple(out, meta.flags);
      },
      py::arg("header"), "(the tensors' dtypes and shapes, the sender's flags)");
  m.def("encode_meta", &ppfast::encode_meta, py::arg("tensors"), py::arg("flags") = 0);
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
