// CUDA definitions of streams.h. Compiled only in CUDA builds; the guard keeps a stray compile
// elsewhere from clashing with the header's fallbacks.
#ifdef PPFAST_WITH_CUDA

#include "cuda/streams.h"

#include <ATen/cuda/CUDAEvent.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <limits>

namespace ppfast::cuda {

CommStreams comm_streams(c10::DeviceIndex device) {
  // The pool hands out its streams round robin, so back-to-back requests give two distinct
  // streams.
  c10::cuda::CUDAStream send = c10::cuda::getStreamFromPool(/*isHighPriority=*/true, device);
  c10::cuda::CUDAStream recv = c10::cuda::getStreamFromPool(/*isHighPriority=*/true, device);
  return CommStreams{send.unwrap(), recv.unwrap()};
}

struct ActionTimer::Events {
  // at::cuda::CUDAEvent defaults to cudaEventDisableTiming; timing needs cudaEventDefault.
  at::cuda::CUDAEvent origin{cudaEventDefault};
  std::vector<at::cuda::CUDAEvent> start, end;
  // Events are reused from step to step; these say which were recorded in this one.
  std::vector<char> started, ended;
};

ActionTimer::ActionTimer(size_t num_actions) : events_(std::make_unique<Events>()) {
  // The CUDA events themselves are created lazily, on their first record.
  events_->start.reserve(num_actions);
  events_->end.reserve(num_actions);
  for (size_t i = 0; i < num_actions; ++i) {
    events_->start.emplace_back(cudaEventDefault);
    events_->end.emplace_back(cudaEventDefault);
  }
  events_->started.assign(num_actions, 0);
  events_->ended.assign(num_actions, 0);
}

ActionTimer::~ActionTimer() = default;

void ActionTimer::begin(const c10::Stream& stream) {
  events_->origin.record(c10::cuda::CUDAStream(stream));
  std::fill(events_->started.begin(), events_->started.end(), 0);
  std::fill(events_->ended.begin(), events_->ended.end(), 0);
}

void ActionTimer::start(size_t action, const c10::Stream& stream) {
  events_->start.at(action).record(c10::cuda::CUDAStream(stream));
  events_->started[action] = 1;
}

void ActionTimer::end(size_t action, const c10::Stream& stream) {
  events_->end.at(action).record(c10::cuda::CUDAStream(stream));
  events_->ended[action] = 1;
}

ActionTimes ActionTimer::read() {
  Events& e = *events_;
  TORCH_CHECK(e.origin.isCreated(), "ActionTimer::read() before begin()");
  const size_t n = e.start.size();
  const double nan = std::numeric_limits<double>::quiet_NaN();
  ActionTimes out{std::vector<double>(n, nan), std::vector<double>(n, nan)};
  e.origin.synchronize();
  for (size_t i = 0; i < n; ++i) {
    if (e.started[i]) {
      e.start[i].synchronize();
      out.start[i] = e.origin.elapsed_time(e.start[i]);
    }
    if (e.ended[i]) {
      e.end[i].synchronize();
      out.end[i] = e.origin.elapsed_time(e.end[i]);
    }
  }
  return out;
}

}  // namespace ppfast::cuda

#endif  // PPFAST_WITH_CUDA
