// The executor's CUDA streams and event timers.
//
// Sends and receives each get a stream of their own from torch's pool, so communication queues
// neither behind compute nor behind the other direction; compute and communication order
// themselves with events, never with a host wait:
//
//   compute  ──F(mb)──●──────────────F(mb+1)──●──...
//                     │ event                 │
//   send     ─────────▼ wait ── SEND_F(mb) ───▼ wait ── SEND_F(mb+1)
//   recv     ── RECV_F(mb+1) ──●
//                              │ event: the compute that reads the buffer waits here
//
// The definitions live in streams.cpp, which is compiled only where nvcc and a CUDA build of
// torch are present (PPFAST_WITH_CUDA). Elsewhere the inline versions at the end raise, saying
// so, which lets callers keep one code path and decide at run time.
#pragma once

#include <c10/core/Stream.h>

#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

namespace ppfast::cuda {

#ifdef PPFAST_WITH_CUDA
inline constexpr bool kBuiltWithCuda = true;
#else
inline constexpr bool kBuiltWithCuda = false;
#endif

struct CommStreams {
  c10::Stream send;
  c10::Stream recv;
};

// Start and end of each action of one step, in milliseconds after ActionTimer::begin().
struct ActionTimes {
  std::vector<double> start, end;  // NaN for an action not recorded since begin()
};

// Times a step's actions with CUDA events recorded on the stream each action runs on, read
// back once the step is over, so timing adds no host synchronisation inside the step. All
// streams must be on one device.
class ActionTimer {
 public:
  explicit ActionTimer(size_t num_actions);
  ~ActionTimer();
  ActionTimer(const ActionTimer&) = delete;
  ActionTimer& operator=(const ActionTimer&) = delete;

  void begin(const c10::Stream& stream);
  void start(size_t action, const c10::Stream& stream);
  void end(size_t action, const c10::Stream& stream);
  // Waits for the step's events to complete.
  ActionTimes read();

 private:
  struct Events;
  std::unique_ptr<Events> events_;
};

#ifdef PPFAST_WITH_CUDA

// Two high-priority streams of `device` from torch's pool (never the current or default
// stream), so a transfer that compute waits for is scheduled ahead of queued compute.
CommStreams comm_streams(c10::DeviceIndex device);

#else

[[noreturn]] inline void no_cuda(const char* what) {
  throw std::runtime_error(std::string("ppfast was built without CUDA, so ") + what +
                           " is not available; rebuild where nvcc and a CUDA build of torch are"
                           " present (and PPFAST_CUDA is not 0)");
}

inline CommStreams comm_streams(c10::DeviceIndex) { no_cuda("comm_streams"); }

struct ActionTimer::Events {};
inline ActionTimer::ActionTimer(size_t) { no_cuda("ActionTimer"); }
inline ActionTimer::~ActionTimer() = default;
inline void ActionTimer::begin(const c10::Stream&) { no_cuda("ActionTimer"); }
inline void ActionTimer::start(size_t, const c10::Stream&) { no_cuda("ActionTimer"); }
inline void ActionTimer::end(size_t, const c10::Stream&) { no_cuda("ActionTimer"); }
inline ActionTimes ActionTimer::read() { no_cuda("ActionTimer"); }

#endif  // PPFAST_WITH_CUDA

}  // namespace ppfast::cuda
