// A rank's compute, send and receive streams on a device that has streams (CUDA), and the
// events that order them. Written against c10's device-generic Stream/Event interface, so it
// compiles in every build; on CPU there are no streams and the executor orders by host waits.
//
//   compute  ──F(mb)──●─────────────────────F(mb+1)──●── ... ──▶ I(mb) waits on ◆
//                     │ mark                          │
//   send     ─────────▼ wait ── SEND_F(mb) ───────────▼ wait ── SEND_F(mb+1)
//   recv     ── (buffer free ✱) ── RECV_B(mb) ──◆
//
// ✱ a pooled receive buffer is reused only after the compute that last read it (an event
// recorded when it went back to the pool). Receive buffers are allocated on the compute
// stream, and the compute stream always waits for a receive before reading it, so the caching
// allocator never hands out a block a transfer still writes.
#pragma once

#include <c10/core/Device.h>
#include <c10/core/Event.h>
#include <c10/core/Stream.h>
#include <c10/core/impl/VirtualGuardImpl.h>

#include <memory>
#include <mutex>
#include <vector>

namespace ppfast {

inline bool device_has_streams(const c10::Device& device) {
  return device.type() == c10::DeviceType::CUDA;
}

// The stream current on this thread for `device` (what user code launched on).
inline c10::Stream current_stream(const c10::Device& device) {
  return c10::impl::VirtualGuardImpl(device.type()).getStream(device);
}

// Events made once and recorded again and again: creating a CUDA event per use costs a driver
// call each time, and destroying one that is still pending can stall. An event may be recorded
// again as soon as every wait on it has been enqueued, since a wait binds to the record made
// before it (cudaStreamWaitEvent), so an ordering event returns to the pool when its last
// holder drops it. Thread-safe: the in-process transport's rank threads share one.
class EventPool {
 public:
  // An ordering (non-timing) event recorded now on `stream`.
  std::shared_ptr<c10::Event> mark(const c10::Stream& stream) {
    std::unique_ptr<c10::Event> ev;
    {
      std::lock_guard<std::mutex> lock(free_->mu);
      if (!free_->events.empty()) {
        ev = std::move(free_->events.back());
        free_->events.pop_back();
      }
    }
    if (!ev) ev = std::make_unique<c10::Event>(stream.device_type(), c10::EventFlag::PYTORCH_DEFAULT);
    ev->record(stream);
    std::weak_ptr<Free> home = free_;
    return std::shared_ptr<c10::Event>(ev.release(), [home](c10::Event* e) {
      if (auto free = home.lock()) {
        std::lock_guard<std::mutex> lock(free->mu);
        free->events.emplace_back(e);
      } else {
        delete e;
      }
    });
  }
  // Events made so far and now free (for tests).
  size_t free_events() const {
    std::lock_guard<std::mutex> lock(free_->mu);
    return free_->events.size();
  }

 private:
  struct Free {
    std::mutex mu;
    std::vector<std::unique_ptr<c10::Event>> events;
  };
  std::shared_ptr<Free> free_ = std::make_shared<Free>();
};

// Timing events for every action of a step, made once per executor and recorded each step.
// Two sets alternate, so a step's times can still be read while the next step runs; reading
// them waits for the device (the only host synchronisation timing costs).
struct StepEvents {
  StepEvents(c10::DeviceType type, int num_actions)
      : origin(type, c10::EventFlag::BACKEND_DEFAULT), done(type, c10::EventFlag::BACKEND_DEFAULT) {
    start.reserve(num_actions);
    end.reserve(num_actions);
    for (int i = 0; i < num_actions; ++i) {
      start.emplace_back(type, c10::EventFlag::BACKEND_DEFAULT);
      end.emplace_back(type, c10::EventFlag::BACKEND_DEFAULT);
    }
    started.assign(num_actions, 0);
    ended.assign(num_actions, 0);
  }
  c10::Event origin, done;  // the step's start and end on the compute stream
  std::vector<c10::Event> start, end;
  std::vector<char> started, ended;  // which were recorded in this set's step
  int64_t step = -1;                 // the step recorded into this set
};

struct DeviceStreams {
  explicit DeviceStreams(const c10::Device& device)
      : compute(current_stream(device)),
        // High priority: a transfer that compute waits for is scheduled ahead of queued compute.
        // The pool hands out its streams round robin, so two requests give two streams.
        send(c10::impl::VirtualGuardImpl(device.type()).getStreamFromGlobalPool(device, true)),
        recv(c10::impl::VirtualGuardImpl(device.type()).getStreamFromGlobalPool(device, true)) {}

  c10::Stream compute;  // the stream current when the step started: the user's
  c10::Stream send;
  c10::Stream recv;
};

}  // namespace ppfast
