// Python bindings of the runtime: transports, the executor, and the error it raises.
#pragma once

#include <torch/csrc/distributed/c10d/ProcessGroup.hpp>
#include <torch/csrc/distributed/c10d/Store.hpp>
#include <torch/extension.h>

#include "runtime/executor.h"
#include "runtime/shm_transport.h"
#include "runtime/transport.h"

namespace ppfast {

// Calls the Python stage object's forward / backward / weight, holding the GIL only for the
// call itself.
class PyCompute : public Compute {
 public:
  explicit PyCompute(pybind11::object obj) : obj_(std::move(obj)) {
    pybind11::gil_scoped_acquire gil;
    forward_ = obj_.attr("forward");
    backward_ = obj_.attr("backward");
    weight_ = obj_.attr("weight");
    if (pybind11::hasattr(obj_, "device")) device_ = obj_.attr("device").cast<at::Device>();
  }
  ~PyCompute() override {
    pybind11::gil_scoped_acquire gil;
    forward_ = backward_ = weight_ = obj_ = pybind11::object();
  }
  std::pair<std::vector<at::Tensor>, bool> forward(int stage, int mb,
                                                   const std::vector<at::Tensor>* inputs) override {
    pybind11::gil_scoped_acquire gil;
    pybind11::object in = inputs ? pybind11::cast(*inputs) : pybind11::none();
    pybind11::tuple res = forward_(stage, mb, in);
    return {res[0].cast<std::vector<at::Tensor>>(), res[1].cast<bool>()};
  }
  std::vector<at::Tensor> backward(int stage, int mb, const std::vector<at::Tensor>* grads,
                                   bool full) override {
    pybind11::gil_scoped_acquire gil;
    pybind11::object g = grads ? pybind11::cast(*grads) : pybind11::none();
    return backward_(stage, mb, g, full).cast<std::vector<at::Tensor>>();
  }
  void weight(int stage, int mb) override {
    pybind11::gil_scoped_acquire gil;
    weight_(stage, mb);
  }
  at::Device device() const override { return device_; }

 private:
  pybind11::object obj_, forward_, backward_, weight_;
  at::Device device_{at::kCPU};
};

inline pybind11::dict step_dict(const StepTimes& t) {
  pybind11::dict out;
  out["start"] = t.start;
  out["end"] = t.end;
  out["comm"] = t.comm;
  out["wall"] = t.wall;
  out["epoch"] = t.epoch;
  out["index"] = t.index;
  out["on_device"] = t.on_device;
  return out;
}

inline void register_runtime(pybind11::module_& m) {
  namespace py = pybind11;
  static py::exception<CommError> comm_error(m, "CommError", PyExc_RuntimeError);
  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const CommError& e) {
      // ppfast.runtime.errors.PipelineCommError carries rank, action and peer as attributes
      py::object cls = py::module_::import("ppfast.runtime.errors").attr("PipelineCommError");
      py::object exc = cls(e.what(), e.rank, e.action, e.peer, e.timed_out);
      PyErr_SetObject(cls.ptr(), exc.ptr());
    }
  });

  py::class_<Handle, std::shared_ptr<Handle>>(m, "Handle")
      .def("done", &Handle::done, py::call_guard<py::gil_scoped_release>(),
           "Has the operation completed?")
      .def(
          "wait",
          [](Handle& h, double timeout_s) {
            h.wait(std::chrono::milliseconds(static_cast<int64_t>(timeout_s * 1000)));
          },
          py::arg("timeout"), py::call_guard<py::gil_scoped_release>(),
          "Block until the operation completes; raises RuntimeError on failure or timeout.");
  // send/recv are here for tests and micro-benchmarks; the executor is what trains.
  py::class_<Transport, std::shared_ptr<Transport>>(m, "Transport")
      .def_property_readonly("rank", &Transport::rank)
      .def_property_readonly("size", &Transport::size)
      .def_property_readonly("name", &Transport::name)
      .def("send", &Transport::send, py::arg("tensor"), py::arg("peer"), py::arg("tag"),
           py::call_guard<py::gil_scoped_release>())
      .def("recv", &Transport::recv, py::arg("tensor"), py::arg("peer"), py::arg("tag"),
           py::call_guard<py::gil_scoped_release>())
      .def("abort", &Transport::abort, py::arg("why"), py::call_guard<py::gil_scoped_release>(),
           "Give up: pending operations fail, and peers are told where the transport can.");
  py::class_<ShmTransport, Transport, std::shared_ptr<ShmTransport>>(m, "ShmTransport")
      .def(py::init<const std::string&, int, int>(), py::arg("name"), py::arg("rank"),
           py::arg("size"),
           "Ranks as processes of one host, over shared memory; every rank constructs it with "
           "the same name, then connect(), then unlink_names() once all have connected.")
      .def(
          "connect",
          [](ShmTransport& t, double timeout_s) {
            t.connect(std::chrono::milliseconds(static_cast<int64_t>(timeout_s * 1000)));
          },
          py::arg("timeout"), py::call_guard<py::gil_scoped_release>())
      .def("unlink_names", &ShmTransport::unlink_names);
  py::class_<C10dTransport, Transport, std::shared_ptr<C10dTransport>>(m, "C10dTransport")
      .def(py::init([](const c10::intrusive_ptr<c10d::ProcessGroup>& group, const std::string& device,
                       std::shared_ptr<Transport> negotiation,
                       c10::intrusive_ptr<c10d::Store> store, const std::string& abort_key) {
             return std::make_shared<C10dTransport>(group, c10::Device(device).type(),
                                                    std::move(negotiation), std::move(store),
                                                    abort_key);
           }),
           py::arg("group"), py::arg("device_type"), py::arg("negotiation") = nullptr,
           py::arg("store") = nullptr, py::arg("abort_key") = "",
           "Send and receive over a c10d ProcessGroup (its backend for device_type). Steps that "
           "agree shapes go over `negotiation` (a transport whose messages are matched by tag, "
           "such as one over a gloo group of the same ranks) where it is given. With a `store`, abort() "
           "leaves a notice at `abort_key` that fails every other rank's pending operations at "
           "once.");
  py::class_<Hub, std::shared_ptr<Hub>>(m, "Hub")
      .def(py::init<int>(), py::arg("size"))
      .def_property_readonly("size", &Hub::size)
      .def("abort", &Hub::abort, py::arg("rank"), py::arg("why"));
  py::class_<InProcessTransport, Transport, std::shared_ptr<InProcessTransport>>(
      m, "InProcessTransport")
      .def(py::init<std::shared_ptr<Hub>, int>(), py::arg("hub"), py::arg("rank"),
           "Ranks as threads of this process, meeting at a shared Hub.");

  py::class_<Executor, std::shared_ptr<Executor>>(m, "Executor")
      .def(py::init([](int rank, std::vector<int32_t> stage_to_rank, int32_t num_mb,
                       std::vector<int32_t> parts, std::vector<std::string> names,
                       std::shared_ptr<Transport> transport, py::object compute,
                       int64_t timeout_ms, bool dynamic_shapes, bool checksum) {
             ExecutorOptions opt;
             opt.timeout_ms = timeout_ms;
             opt.dynamic_shapes = dynamic_shapes;
             opt.checksum = checksum;
             return std::make_shared<Executor>(rank, std::move(stage_to_rank), num_mb,
                                               std::move(parts), std::move(names),
                                               std::move(transport),
                                               std::make_shared<PyCompute>(std::move(compute)), opt);
           }),
           py::arg("rank"), py::arg("stage_to_rank"), py::arg("num_mb"), py::arg("parts"),
           py::arg("names"), py::arg("transport"), py::arg("compute"), py::arg("timeout_ms"),
           py::arg("dynamic_shapes"), py::arg("checksum") = false)
      .def(
          "step",
          [](Executor& ex) {
            StepTimes t;
            {
              py::gil_scoped_release nogil;
              t = ex.step();
            }
            return step_dict(t);
          },
          "Run the program once; returns per-action start/end, comm post/complete times, wall, "
          "the step's index, and on_device: whether device_times(index) holds the device's times.")
      .def(
          "device_times",
          [](Executor& ex, int64_t index) {
            StepTimes t;
            {
              py::gil_scoped_release nogil;
              t = ex.device_times(index);
            }
            return step_dict(t);
          },
          py::arg("index"),
          "Step `index`'s compute actions and wall time as the device ran them (waits for it).")
      .def("set_timeout_ms", &Executor::set_timeout_ms)
      .def_property_readonly("rank", &Executor::rank);
}

}  // namespace ppfast
