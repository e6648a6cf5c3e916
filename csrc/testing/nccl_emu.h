// nccl_emu: a c10d backend for CPU tensors with ProcessGroupNCCL's point-to-point semantics.
//
// The bytes move over an inner backend (gloo), but what a caller sees is NCCL's behaviour, so
// that a pipeline which would break on NCCL breaks here, on a CPU, in a test:
//   - tags are ignored: between two ranks the k-th send meets the k-th receive, in issue order
//     (every inner operation uses one tag, and gloo delivers one tag of one pair in order);
//   - between startCoalescing and endCoalescing, send/recv return a null Work; endCoalescing
//     returns the group's one Work (null when nothing was coalesced);
//   - a group's operations start together and complete together;
//   - groups (and single operations and collectives) run one after another, in issue order,
//     like kernels on the communicator's one stream: a group that cannot finish holds every
//     later one;
//   - a send completes only once its receive runs on the peer (gloo's sends are rendezvous);
//   - a wait that runs out of time throws DistBackendError with NCCL's watchdog text, and the
//     communicator stays broken afterwards, as NCCL's does.
// Collectives are delegated to the inner backend, in the same one-at-a-time order.
//
//     caller thread                      progress thread (the "stream")
//     send/recv/collective ──enqueue──▶  [item 1] [item 2] ...   one at a time:
//     endCoalescing ─────────enqueue──▶  post the item's inner ops, wait for all of them,
//                                        then complete its Work (or fail it, and all after)
#pragma once

#include <ATen/ATen.h>
#include <ATen/core/ivalue.h>

#include <chrono>
#include <condition_variable>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include <torch/csrc/distributed/c10d/Backend.hpp>
#include <torch/csrc/distributed/c10d/Work.hpp>

namespace ppfast::testing {

// The one Work of an item on the emulated stream; complete when every inner operation is.
class EmuWork : public c10d::Work {
 public:
  // `result`: what the operation's future holds once it completes (a collective's output
  // tensors, as NCCL's future does; DDP's reducer reads it)
  EmuWork(c10d::OpType type, std::string what, std::vector<at::Tensor> result = {});
  bool isCompleted() override;
  bool isSuccess() const override;
  std::exception_ptr exception() const override;
  // Blocks the host until the item completed (a CPU tensor has no stream to order instead);
  // throws DistBackendError when it failed, or when `timeout` runs out first.
  bool wait(std::chrono::milliseconds timeout = kNoTimeout) override;
  c10::intrusive_ptr<c10::ivalue::Future> getFuture() override { return future_; }
  // The first call completes it; later ones (an abort got there first) change nothing.
  void complete(std::exception_ptr failure);
  const std::string& what() const { return what_; }

 private:
  std::string what_;
  std::vector<at::Tensor> result_;
  c10::intrusive_ptr<c10::ivalue::Future> future_;
};

class NcclEmu : public c10d::Backend {
 public:
  NcclEmu(c10::intrusive_ptr<c10d::Backend> inner, int rank, int size,
          std::chrono::milliseconds timeout);
  ~NcclEmu() override;

  const std::string getBackendName() const override { return "nccl_emu"; }
  bool supportsCoalescing() const override { return true; }
  void startCoalescing() override;
  c10::intrusive_ptr<c10d::Work> endCoalescing() override;

  c10::intrusive_ptr<c10d::Work> send(std::vector<at::Tensor>& tensors, int dst,
                                      int tag) override;
  c10::intrusive_ptr<c10d::Work> recv(std::vector<at::Tensor>& tensors, int src,
                                      int tag) override;

  c10::intrusive_ptr<c10d::Work> broadcast(std::vector<at::Tensor>& tensors,
                                           const c10d::BroadcastOptions& opts) override;
  c10::intrusive_ptr<c10d::Work> allreduce(std::vector<at::Tensor>& tensors,
                                           const c10d::AllreduceOptions& opts) override;
  c10::intrusive_ptr<c10d::Work> allreduce_coalesced(
      std::vector<at::Tensor>& tensors, const c10d::AllreduceCoalescedOptions& opts) override;
  c10::intrusive_ptr<c10d::Work> reduce(std::vector<at::Tensor>& tensors,
                                        const c10d::ReduceOptions& opts) override;
  c10::intrusive_ptr<c10d::Work> allgather(std::vector<std::vector<at::Tensor>>& outputs,
                                           std::vector<at::Tensor>& inputs,
                                           const c10d::AllgatherOptions& opts) override;
  c10::intrusive_ptr<c10d::Work> _allgather_base(at::Tensor& output, at::Tensor& input,
                                                 const c10d::AllgatherOptions& opts) override;
  c10::intrusive_ptr<c10d::Work> allgather_into_tensor_coalesced(
      std::vector<at::Tensor>& outputs, std::vector<at::Tensor>& inputs,
      const c10d::AllgatherOptions& opts) override;
  c10::intrusive_ptr<c10d::Work> gather(std::vector<std::vector<at::Tensor>>& outputs,
                                        std::vector<at::Tensor>& inputs,
                                        const c10d::GatherOptions& opts) override;
  c10::intrusive_ptr<c10d::Work> scatter(std::vector<at::Tensor>& outputs,
                                         std::vector<std::vector<at::Tensor>>& inputs,
                                         const c10d::ScatterOptions& opts) override;
  c10::intrusive_ptr<c10d::Work> reduce_scatter(std::vector<at::Tensor>& outputs,
                                                std::vector<std::vector<at::Tensor>>& inputs,
                                                const c10d::ReduceScatterOptions& opts) override;
  c10::intrusive_ptr<c10d::Work> _reduce_scatter_base(
      at::Tensor& output, at::Tensor& input, const c10d::ReduceScatterOptions& opts) override;
  c10::intrusive_ptr<c10d::Work> reduce_scatter_tensor_coalesced(
      std::vector<at::Tensor>& outputs, std::vector<at::Tensor>& inputs,
      const c10d::ReduceScatterOptions& opts) override;
  c10::intrusive_ptr<c10d::Work> alltoall_base(at::Tensor& output, at::Tensor& input,
                                               std::vector<int64_t>& output_split_sizes,
                                               std::vector<int64_t>& input_split_sizes,
                                               const c10d::AllToAllOptions& opts) override;
  c10::intrusive_ptr<c10d::Work> alltoall(std::vector<at::Tensor>& outputs,
                                          std::vector<at::Tensor>& inputs,
                                          const c10d::AllToAllOptions& opts) override;
  c10::intrusive_ptr<c10d::Work> barrier(const c10d::BarrierOptions& opts) override;

  void setSequenceNumberForGroup() override {}
  uint64_t getSequenceNumberForGroup() override { return seq_; }
  void setTimeout(std::chrono::milliseconds timeout) override { timeout_ = timeout; }
  // Fails every queued and later operation at once; the inner backend is aborted too.
  void abort() override;
  void shutdown() override;

  // How many items ran on the emulated stream (for tests of the emulation itself).
  uint64_t items_run() const { return seq_; }

 private:
  using Post = std::function<std::vector<c10::intrusive_ptr<c10d::Work>>()>;
  struct Item {
    Post post;
    c10::intrusive_ptr<EmuWork> work;
  };

  c10::intrusive_ptr<c10d::Work> enqueue(c10d::OpType type, std::string what, Post post,
                                         std::vector<at::Tensor> result = {});
  c10::intrusive_ptr<c10d::Work> p2p(bool is_send, std::vector<at::Tensor>& tensors, int peer);
  void run();
  std::exception_ptr watchdog_error(const std::string& what, const std::string& why,
                                    bool timed_out) const;

  c10::intrusive_ptr<c10d::Backend> inner_;
  std::chrono::milliseconds timeout_;
  std::mutex mutex_;
  std::condition_variable cv_;
  std::deque<Item> queue_;
  std::vector<c10::intrusive_ptr<c10d::Work>> inflight_;  // the running item's inner operations
  c10::intrusive_ptr<EmuWork> running_;                     // the running item's Work
  std::exception_ptr broken_;  // set once an item failed: the communicator is unusable
  bool stopping_ = false;
  uint64_t seq_ = 0;
  // the open coalesced group: its operations are posted together when it ends
  bool coalescing_ = false;
  std::vector<Post> group_;
  std::string group_what_;
  std::thread progress_;
};

}  // namespace ppfast::testing
