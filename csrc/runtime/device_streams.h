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

namespace ppfast {

inline bool device_has_streams(const c10::Device& device) {
  return device.type() == c10::DeviceType::CUDA;
}

// The stream current on this thread for `device` (what user code launched on).
inline c10::Stream current_stream(const c10::Device& device) {
  return c10::impl::VirtualGuardImpl(device.type()).getStream(device);
}

// An event recorded now on `stream`. `timing` events can be compared with elapsedTime.
inline std::shared_ptr<c10::Event> mark(const c10::Stream& stream, bool timing = false) {
  auto ev = std::make_shared<c10::Event>(
      stream.device_type(),
      timing ? c10::EventFlag::BACKEND_DEFAULT : c10::EventFlag::PYTORCH_DEFAULT);
  ev->record(stream);
  return ev;
}

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
