// The stage executor: runs one rank's lowered program, one step at a time.
//
// Per action:
//   RECV_F / RECV_B  post the receive at once into a pooled buffer and keep the handle; only
//                    the compute that reads it waits (with a timeout), never the posting.
//   F / I / B / W    call back into Python for the stage's compute. Outputs stay here until
//                    sent or handed to the next stage on this rank.
//   SEND_F / SEND_B  post the send; the tensor stays alive until the send completes. An
//                    activation the stage marked as not needed by backward has its storage
//                    released as soon as its send completes.
//   back-to-back communication is posted as one group (coalesced where the backend can).
//
// Shapes: the first step (every step with dynamic_shapes) sends a small metadata message
// ahead of each tensor list; the receiver allocates from it. Later steps reuse the agreed
// shapes and pooled buffers, and a sender whose output changed shape stops with an error.
//
// Every wait has a timeout; a timeout or a failed peer raises an error naming this rank, the
// action and the peer. The GIL is released whenever the executor waits.
//
// On a device with streams (CUDA) receives and sends go on streams of their own, ordered
// against the compute stream by events (device_streams.h): the host never waits for a transfer
// inside a step, only for sends still in flight at its end, and action times come from events.
#pragma once

#include <ATen/ATen.h>

#include <chrono>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <unordered_map>
#include <vector>

#include "runtime/device_streams.h"
#include "runtime/transport.h"

namespace ppfast {

// Raised to Python as ppfast.PipelineCommError.
struct CommError : std::runtime_error {
  CommError(const std::string& what, int rank, std::string action, int peer, bool timed_out)
      : std::runtime_error(what),
        rank(rank),
        action(std::move(action)),
        peer(peer),
        timed_out(timed_out) {}
  int rank;
  std::string action;
  int peer;
  bool timed_out;
};

// The stage compute the executor calls back into (Python's PipelineStage through the bindings,
// or a C++ test double). Received tensors stay valid until the action that ends the backward of
// their (stage, microbatch) has run (in a forward-only program, until their F has); after that
// their buffers are reused.
class Compute {
 public:
  virtual ~Compute() = default;
  // inputs is null for the first stage. Returns the outputs for the next stage and whether
  // their storage may be freed once sent (autograd does not need their values).
  virtual std::pair<std::vector<at::Tensor>, bool> forward(int stage, int mb,
                                                           const std::vector<at::Tensor>* inputs) = 0;
  // grads is null for the last stage (the loss starts the backward). Returns the gradients of
  // the stage's inputs (empty for the first stage). full: B, else I (W comes separately).
  virtual std::vector<at::Tensor> backward(int stage, int mb, const std::vector<at::Tensor>* grads,
                                           bool full) = 0;
  virtual void weight(int stage, int mb) = 0;
  virtual at::Device device() const { return at::kCPU; }
};

// What one step did: per action start and end (seconds from the step's start; NaN for none),
// per communication action when it was posted and when it was seen complete. On a device with
// streams step() returns host times at once, without waiting for the device; the device's own
// times come from device_times(index), which waits for the step to finish there.
struct StepTimes {
  std::vector<double> start, end;
  std::vector<std::tuple<int, double, double>> comm;
  double wall = 0.0;
  double epoch = 0.0;  // the step's start on the steady clock, seconds (shared by processes)
  int64_t index = 0;   // which step of this executor (0, 1, ...)
  bool on_device = false;  // device times are to be read with device_times(index)
};

// The shapes a step that agrees them sends ahead of each tensor list (wire/meta.h).
struct Meta {
  std::vector<std::pair<c10::ScalarType, std::vector<int64_t>>> tensors;
  int64_t flags = 0;  // how the sender sends (wire::kFlagChecksum)
  bool operator==(const Meta& o) const { return tensors == o.tensors; }
};
// The header of `tensors` (an int64 CPU tensor); std::invalid_argument past the header's limits.
at::Tensor encode_meta(const std::vector<at::Tensor>& tensors, int64_t flags = 0);
// A received header's shapes; std::invalid_argument saying what is wrong with a malformed one.
Meta decode_meta(const at::Tensor& header);

struct ExecutorOptions {
  int64_t timeout_ms = 300000;
  bool dynamic_shapes = false;
  // Each message is followed by a trailer with the hash of its bytes, the message's tag and
  // the step (wire/checksum.h); the receiver checks it before the data is used. Every rank
  // must agree (the first step's headers say it). Device tensors are hashed through a host
  // copy, which waits for them.
  bool checksum = false;
};

class Executor {
 public:
  // parts: this rank's lowered program, [kind, stage, mb, action] per part (csrc/engine.h
  // codes); names: each action's text form, for errors and traces.
  Executor(int rank, std::vector<int32_t> stage_to_rank, int32_t num_mb,
           std::vector<int32_t> parts, std::vector<std::string> names,
           std::shared_ptr<Transport> transport, std::shared_ptr<Compute> compute,
           ExecutorOptions options);

  // Runs the program once. A failure aborts the transport (so peers fail fast) and rethrows;
  // the executor cannot run again after one.
  StepTimes step();
  // Step `index`'s compute actions as the device ran them, and its wall time there: waits for
  // the device to finish the step. Events are reused, so this works for the latest two steps.
  StepTimes device_times(int64_t index);

  void set_timeout_ms(int64_t ms) { options_.timeout_ms = ms; }
  int rank() const { return rank_; }

 private:
  struct Inbox {
    int peer = -1;
    int action = -1;
    at::Tensor meta;
    std::shared_ptr<Handle> meta_handle;
    std::vector<at::Tensor> buffers;
    std::vector<std::shared_ptr<Handle>> handles;
    at::Tensor trailer;  // with checksums: the payload's trailer
    std::shared_ptr<Handle> trailer_handle;
    size_t comm_index = 0;
  };
  struct Outbox {
    int action = -1;
    int peer = -1;
    std::vector<at::Tensor> tensors;
    std::vector<std::shared_ptr<Handle>> handles;
    bool release_storage = false;
    size_t comm_index = 0;
  };
  struct Part {
    int32_t kind, stage, mb, action;
  };

  static int64_t key(int dir, int stage, int mb) { return (int64_t(dir) << 40) | (int64_t(stage) << 20) | mb; }
  int64_t tag(int dir, int producer_stage, int mb, int index, bool meta) const;
  std::chrono::milliseconds timeout() const { return std::chrono::milliseconds(options_.timeout_ms); }
  double now() const;

  void post_recv(const Part& p);
  void post_send(const Part& p);
  std::vector<at::Tensor> take_input(const Part& p, int dir);
  void run_compute(size_t begin, size_t end);
  void finish_outbox(Outbox& box, bool block);
  void poll_sends();
  void release_inputs(int stage, int mb);
  // With checksums: the trailer of a payload, and the check of a received one.
  at::Tensor trailer_of(const std::vector<at::Tensor>& payload, size_t n, int64_t tag) const;
  void post_trailer_recv(Inbox& box, int dir, int producer, int mb);
  void check_trailer(Inbox& box, int dir, int producer, int mb, int action, const std::string& what);
  // The program's checks (constructor): std::invalid_argument naming the part at fault.
  void check_program(const std::vector<int32_t>& parts);
  [[noreturn]] void fail(const std::string& why, int action, int peer, bool timed_out);
  // Posts on the step's transport; a transport that refuses (its peer is gone) fails the step
  // naming the action and the peer, as a failed wait does.
  std::shared_ptr<Handle> post_op(bool send, const at::Tensor& t, int peer, int64_t tag, int action);
  void guard_transport(const std::function<void()>& call, int action, int peer, const char* what);
  // Waits with the timeout; with `stream`, only orders that stream after the operation.
  void wait_handle(Handle& h, int action, int peer, const std::string& what,
                   const c10::Stream* stream = nullptr);
  // Records an action's start or end: host clock, and an event on streams.
  void mark_time(bool start, int action);

  std::vector<at::Tensor> allocate(const Meta& meta, int dir, int stage);
  // The transport of this step: a step that agrees shapes may need one matched by tag.
  Transport& comm() const { return negotiate_ ? transport_->negotiation() : *transport_; }

  int rank_;
  std::vector<int32_t> stage_to_rank_;
  int32_t num_stages_, num_mb_;
  std::vector<Part> parts_;
  std::vector<std::string> names_;
  std::vector<std::string> ranges_;  // torch.profiler range per action
  int num_actions_ = 0;
  std::shared_ptr<Transport> transport_;
  std::shared_ptr<Compute> compute_;
  ExecutorOptions options_;
  bool broken_ = false;
  at::Device device_{at::kCPU};

  // (stage, mb) -> index of the action that ends its backward on this rank (B or W)
  std::unordered_map<int64_t, int> last_backward_;

  // agreed shapes: (dir, receiving stage) for receives, (dir, producing stage) for sends
  std::map<std::pair<int, int>, Meta> recv_meta_, send_meta_;
  bool negotiate_ = true;
  // free receive buffers per (dir, receiving stage); on streams, with the event after which the
  // compute that last read them is done
  struct Pooled {
    std::vector<at::Tensor> tensors;
    std::shared_ptr<c10::Event> free;
  };
  std::map<std::pair<int, int>, std::vector<Pooled>> pool_;
  std::unique_ptr<DeviceStreams> streams_;  // null on CPU
  EventPool events_;                         // on streams: ordering events
  std::unique_ptr<StepEvents> timing_[2];    // on streams: the last two steps' timing events
  int64_t steps_ = 0;                        // steps started

  // per-step state
  std::unordered_map<int64_t, Inbox> inbox_;
  std::unordered_map<int64_t, std::vector<at::Tensor>> produced_;  // (dir, stage, mb) -> outputs
  std::unordered_map<int64_t, std::vector<at::Tensor>> held_;      // buffers to free after backward
  std::unordered_map<int64_t, bool> release_after_send_;            // (F, stage, mb) -> bool
  std::vector<Outbox> outbox_;
  std::chrono::steady_clock::time_point t0_;
  std::vector<double> start_, end_;
  std::vector<std::tuple<int, double, double>> comm_;
};

}  // namespace ppfast
