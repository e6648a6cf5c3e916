// Python bindings of the CUDA helpers, for bindings.cpp. They are registered in every build so
// that Python can ask `cuda_built()` and get a clear error from the rest on a CPU build.
#pragma once

#include <torch/extension.h>

#include "cuda/streams.h"

namespace ppfast::cuda {

inline void register_cuda(pybind11::module_& m) {
  namespace py = pybind11;
  m.def(
      "cuda_built", [] { return kBuiltWithCuda; },
      "Whether ppfast._C was built with its CUDA parts.");
  m.def(
      "comm_streams",
      [](int device) {
        const CommStreams s = comm_streams(static_cast<c10::DeviceIndex>(device));
        auto pack = [](const c10::Stream& stream) {
          const c10::StreamData3 d = stream.pack3();
          return py::make_tuple(d.stream_id, d.device_index, static_cast<int>(d.device_type));
        };
        return py::make_tuple(pack(s.send), pack(s.recv));
      },
      py::arg("device"),
      "The send and receive streams of a CUDA device, each as (stream_id, device_index, "
      "device_type), the arguments of torch.cuda.Stream. Raises on a build without CUDA.");
}

}  // namespace ppfast::cuda
