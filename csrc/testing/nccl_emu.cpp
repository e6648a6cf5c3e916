// nccl_emu: NCCL's point-to-point semantics over an inner CPU backend. See nccl_emu.h.
#include "testing/nccl_emu.h"

#include <c10/util/Exception.h>

namespace ppfast::testing {

using WorkPtr = c10::intrusive_ptr<c10d::Work>;

namespace {

// Every inner point-to-point operation uses this one tag, so the inner backend matches a
// pair's messages in the order they are posted, as NCCL does.
constexpr int kTag = 0;

}  // namespace

// ---------------------------------------------------------------------------- EmuWork

EmuWork::EmuWork(c10d::OpType type, std::string what, std::vector<at::Tensor> result)
    : Work(-1, type),
      what_(std::move(what)),
      result_(std::move(result)),
      future_(c10::make_intrusive<c10::ivalue::Future>(c10::ListType::ofTensors())) {}

bool EmuWork::isCompleted() {
  std::lock_guard<std::mutex> lock(mutex_);
  return completed_;
}

bool EmuWork::isSuccess() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return completed_ && !exception_;
}

std::exception_ptr EmuWork::exception() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return exception_;
}

bool EmuWork::wait(std::chrono::milliseconds timeout) {
  std::unique_lock<std::mutex> lock(mutex_);
  if (timeout == kNoTimeout) {
    cv_.wait(lock, [&] { return completed_; });
  } else if (!cv_.wait_for(lock, timeout, [&] { return completed_; })) {
    C10_THROW_ERROR(DistBackendError,
                    "Watchdog caught collective operation timeout: WorkNCCL(" + what_ +
                        ", Timeout(ms)=" + std::to_string(timeout.count()) + ") ran for " +
                        std::to_string(timeout.count()) +
                        " milliseconds before timing out (nccl_emu)");
  }
  if (exception_) std::rethrow_exception(exception_);
  return true;
}

void EmuWork::complete(std::exception_ptr failure) {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    if (completed_) return;
    completed_ = true;
    exception_ = failure;
  }
  cv_.notify_all();
  if (failure) {
    future_->setError(failure);
  } else {
    future_->markCompleted(c10::IValue(result_));
  }
}

// ---------------------------------------------------------------------------- NcclEmu

NcclEmu::NcclEmu(c10::intrusive_ptr<c10d::Backend> inner, int rank, int size,
                 std::chrono::milliseconds timeout)
    : Backend(rank, size), inner_(std::move(inner)), timeout_(timeout) {
  progress_ = std::thread([this] { run(); });
}

NcclEmu::~NcclEmu() { shutdown(); }

void NcclEmu::shutdown() {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    if (stopping_) return;
    stopping_ = true;
  }
  cv_.notify_all();
  if (progress_.joinable()) progress_.join();
}

void NcclEmu::abort() {
  std::deque<Item> dropped;
  std::vector<WorkPtr> inflight;
  c10::intrusive_ptr<EmuWork> running;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    if (!broken_) {
      broken_ = std::make_exception_ptr(c10::DistBackendError(
          {__func__, __FILE__, static_cast<uint32_t>(__LINE__)},
          "NCCL communicator was aborted on rank " + std::to_string(rank_) + " (nccl_emu)"));
    }
    dropped.swap(queue_);
    inflight = inflight_;
    running = running_;
  }
  // NCCL's abort fails what is pending at once, the operation on the stream included
  if (running) running->complete(broken_);
  for (auto& item : dropped) item.work->complete(broken_);
  // wake the progress thread from the item it waits for: gloo aborts each operation
  for (auto& w : inflight) {
    try {
      w->abort();
    } catch (...) {
    }
  }
}

std::exception_ptr NcclEmu::watchdog_error(const std::string& what, const std::string& why,
                                           bool timed_out) const {
  // ProcessGroupNCCL's two words for a failed operation: its watchdog's timeout, or an NCCL
  // error such as a peer that went away (ncclRemoteError)
  const std::string head =
      timed_out ? "] Watchdog caught collective operation timeout: WorkNCCL("
                : "] NCCL error: remote process exited or there was a network error: WorkNCCL(";
  return std::make_exception_ptr(c10::DistBackendError(
      {__func__, __FILE__, static_cast<uint32_t>(__LINE__)},
      "[Rank " + std::to_string(rank_) + head + what + ", Timeout(ms)=" +
          std::to_string(timeout_.count()) + ") failed: " + why + " (nccl_emu)"));
}

WorkPtr NcclEmu::enqueue(c10d::OpType type, std::string what, Post post,
                         std::vector<at::Tensor> result) {
  auto work = c10::make_intrusive<EmuWork>(type, what, std::move(result));
  {
    std::lock_guard<std::mutex> lock(mutex_);
    if (broken_) {
      work->complete(broken_);
      return work;
    }
    queue_.push_back(Item{std::move(post), work});
  }
  cv_.notify_all();
  return work;
}

void NcclEmu::run() {
  while (true) {
    Item item;
    {
      std::unique_lock<std::mutex> lock(mutex_);
      cv_.wait(lock, [&] { return stopping_ || !queue_.empty(); });
      if (queue_.empty()) return;  // stopping, nothing left
      item = std::move(queue_.front());
      queue_.pop_front();
      running_ = item.work;
      ++seq_;
    }
    // Post every operation of the item at once (a group progresses together), then wait for
    // all of them: only then may the next item start, as on one stream.
    std::exception_ptr failure;
    try {
      std::vector<WorkPtr> inner = item.post();
      {
        std::lock_guard<std::mutex> lock(mutex_);
        inflight_ = inner;
        if (broken_) {
          // aborted while posting: what was posted is aborted here, the rest never waited
          for (auto& w : inner) {
            if (w) w->abort();
          }
        }
      }
      const auto deadline = std::chrono::steady_clock::now() + timeout_;
      for (auto& w : inner) {
        if (!w) continue;
        auto left = std::chrono::duration_cast<std::chrono::milliseconds>(
            deadline - std::chrono::steady_clock::now());
        try {
          if (!w->wait(std::max(left, std::chrono::milliseconds(1)))) {
            if (!failure) failure = watchdog_error(item.work->what(), "timed out", true);
          }
        } catch (const std::exception& e) {
          // keep waiting for the rest: gloo breaks a pair whose work is dropped unwaited
          if (!failure) failure = watchdog_error(item.work->what(), e.what(), left.count() <= 0);
        }
      }
    } catch (const std::exception& e) {
      failure = watchdog_error(item.work->what(), e.what(), false);
    }
    {
      std::lock_guard<std::mutex> lock(mutex_);
      inflight_.clear();
      running_.reset();
      if (!failure && broken_) failure = broken_;  // aborted while it ran
    }
    if (failure) {
      // NCCL's communicator is unusable after an error: everything queued fails with it
      std::deque<Item> dropped;
      {
        std::lock_guard<std::mutex> lock(mutex_);
        if (!broken_) broken_ = failure;
        dropped.swap(queue_);
      }
      item.work->complete(failure);
      for (auto& d : dropped) d.work->complete(failure);
      continue;
    }
    item.work->complete(nullptr);
  }
}

// ---------------------------------------------------------------------------- point to point

void NcclEmu::startCoalescing() {
  std::lock_guard<std::mutex> lock(mutex_);
  TORCH_CHECK(!coalescing_, "nccl_emu: startCoalescing inside a coalesced group");
  coalescing_ = true;
  group_.clear();
  group_what_.clear();
}

WorkPtr NcclEmu::endCoalescing() {
  std::vector<Post> ops;
  std::string what;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    TORCH_CHECK(coalescing_, "nccl_emu: endCoalescing without startCoalescing");
    coalescing_ = false;
    ops.swap(group_);
    what.swap(group_what_);
  }
  if (ops.empty()) return WorkPtr();  // NCCL: nothing was coalesced, no work
  return enqueue(c10d::OpType::COALESCED, "OpType=COALESCED, " + what,
                 [ops = std::move(ops)]() {
                   std::vector<WorkPtr> out;
                   for (const auto& post : ops) {
                     auto more = post();
                     out.insert(out.end(), more.begin(), more.end());
                   }
                   return out;
                 });
}

WorkPtr NcclEmu::p2p(bool is_send, std::vector<at::Tensor>& tensors, int peer) {
  TORCH_CHECK(tensors.size() == 1, "nccl_emu: point-to-point takes one tensor, as NCCL does");
  TORCH_CHECK(peer >= 0 && peer < size_ && peer != rank_, "nccl_emu: bad peer ", peer);
  auto inner = inner_;
  std::vector<at::Tensor> held = tensors;
  Post post = [inner, held, peer, is_send]() mutable {
    return std::vector<WorkPtr>{is_send ? inner->send(held, peer, kTag)
                                        : inner->recv(held, peer, kTag)};
  };
  const std::string what = std::string(is_send ? "SEND to " : "RECV from ") +
                           std::to_string(peer) + " numel " + std::to_string(held[0].numel());
  {
    std::lock_guard<std::mutex> lock(mutex_);
    if (coalescing_) {
      group_.push_back(std::move(post));
      group_what_ += (group_what_.empty() ? "" : "; ") + what;
      return WorkPtr();  // NCCL: inside a group, per-operation calls return no work
    }
  }
  return enqueue(is_send ? c10d::OpType::SEND : c10d::OpType::RECV, "OpType=" + what,
                 std::move(post));
}

WorkPtr NcclEmu::send(std::vector<at::Tensor>& tensors, int dst, int /* tag: ignored */) {
  return p2p(true, tensors, dst);
}

WorkPtr NcclEmu::recv(std::vector<at::Tensor>& tensors, int src, int /* tag: ignored */) {
  return p2p(false, tensors, src);
}

// ---------------------------------------------------------------------------- collectives

// Each collective runs on the inner backend, in its turn on the emulated stream. Arguments are
// copied into the item (tensor handles, not data): the caller's vectors may be gone by then.
#define PPFAST_EMU_COLLECTIVE_RESULT(TYPE, CALL, RESULT)                                  \
  return enqueue(                                                                          \
      c10d::OpType::TYPE, "OpType=" #TYPE,                                                 \
      [inner = inner_, this_args]() mutable { return std::vector<WorkPtr>{CALL}; }, RESULT)
#define PPFAST_EMU_COLLECTIVE(TYPE, CALL) PPFAST_EMU_COLLECTIVE_RESULT(TYPE, CALL, {})

WorkPtr NcclEmu::broadcast(std::vector<at::Tensor>& tensors, const c10d::BroadcastOptions& opts) {
  auto this_args = std::make_tuple(tensors, opts);
  PPFAST_EMU_COLLECTIVE_RESULT(
      BROADCAST, inner->broadcast(std::get<0>(this_args), std::get<1>(this_args)), tensors);
}

WorkPtr NcclEmu::allreduce(std::vector<at::Tensor>& tensors, const c10d::AllreduceOptions& opts) {
  auto this_args = std::make_tuple(tensors, opts);
  PPFAST_EMU_COLLECTIVE_RESULT(
      ALLREDUCE, inner->allreduce(std::get<0>(this_args), std::get<1>(this_args)), tensors);
}

WorkPtr NcclEmu::allreduce_coalesced(std::vector<at::Tensor>& tensors,
                                     const c10d::AllreduceCoalescedOptions& opts) {
  auto this_args = std::make_tuple(tensors, opts);
  PPFAST_EMU_COLLECTIVE(ALLREDUCE_COALESCED, inner->allreduce_coalesced(std::get<0>(this_args),
                                                                       std::get<1>(this_args)));
}

WorkPtr NcclEmu::reduce(std::vector<at::Tensor>& tensors, const c10d::ReduceOptions& opts) {
  auto this_args = std::make_tuple(tensors, opts);
  PPFAST_EMU_COLLECTIVE(REDUCE, inner->reduce(std::get<0>(this_args), std::get<1>(this_args)));
}

WorkPtr NcclEmu::allgather(std::vector<std::vector<at::Tensor>>& outputs,
                           std::vector<at::Tensor>& inputs, const c10d::AllgatherOptions& opts) {
  auto this_args = std::make_tuple(outputs, inputs, opts);
  PPFAST_EMU_COLLECTIVE(ALLGATHER, inner->allgather(std::get<0>(this_args), std::get<1>(this_args),
                                                   std::get<2>(this_args)));
}

WorkPtr NcclEmu::_allgather_base(at::Tensor& output, at::Tensor& input,
                                 const c10d::AllgatherOptions& opts) {
  auto this_args = std::make_tuple(output, input, opts);
  PPFAST_EMU_COLLECTIVE(_ALLGATHER_BASE,
                        inner->_allgather_base(std::get<0>(this_args), std::get<1>(this_args),
                                               std::get<2>(this_args)));
}

WorkPtr NcclEmu::allgather_into_tensor_coalesced(std::vector<at::Tensor>& outputs,
                                                 std::vector<at::Tensor>& inputs,
                                                 const c10d::AllgatherOptions& opts) {
  auto this_args = std::make_tuple(outputs, inputs, opts);
  PPFAST_EMU_COLLECTIVE(COALESCED, inner->allgather_into_tensor_coalesced(
                                       std::get<0>(this_args), std::get<1>(this_args),
                                       std::get<2>(this_args)));
}

WorkPtr NcclEmu::gather(std::vector<std::vector<at::Tensor>>& outputs,
                        std::vector<at::Tensor>& inputs, const c10d::GatherOptions& opts) {
  auto this_args = std::make_tuple(outputs, inputs, opts);
  PPFAST_EMU_COLLECTIVE(GATHER, inner->gather(std::get<0>(this_args), std::get<1>(this_args),
                                             std::get<2>(this_args)));
}

WorkPtr NcclEmu::scatter(std::vector<at::Tensor>& outputs,
                         std::vector<std::vector<at::Tensor>>& inputs,
                         const c10d::ScatterOptions& opts) {
  auto this_args = std::make_tuple(outputs, inputs, opts);
  PPFAST_EMU_COLLECTIVE(SCATTER, inner->scatter(std::get<0>(this_args), std::get<1>(this_args),
                                               std::get<2>(this_args)));
}

WorkPtr NcclEmu::reduce_scatter(std::vector<at::Tensor>& outputs,
                                std::vector<std::vector<at::Tensor>>& inputs,
                                const c10d::ReduceScatterOptions& opts) {
  auto this_args = std::make_tuple(outputs, inputs, opts);
  PPFAST_EMU_COLLECTIVE(REDUCE_SCATTER,
                        inner->reduce_scatter(std::get<0>(this_args), std::get<1>(this_args),
                                              std::get<2>(this_args)));
}

WorkPtr NcclEmu::_reduce_scatter_base(at::Tensor& output, at::Tensor& input,
                                      const c10d::ReduceScatterOptions& opts) {
  auto this_args = std::make_tuple(output, input, opts);
  PPFAST_EMU_COLLECTIVE(_REDUCE_SCATTER_BASE,
                        inner->_reduce_scatter_base(std::get<0>(this_args), std::get<1>(this_args),
                                                    std::get<2>(this_args)));
}

WorkPtr NcclEmu::reduce_scatter_tensor_coalesced(std::vector<at::Tensor>& outputs,
                                                 std::vector<at::Tensor>& inputs,
                                                 const c10d::ReduceScatterOptions& opts) {
  auto this_args = std::make_tuple(outputs, inputs, opts);
  PPFAST_EMU_COLLECTIVE(COALESCED, inner->reduce_scatter_tensor_coalesced(
                                       std::get<0>(this_args), std::get<1>(this_args),
                                       std::get<2>(this_args)));
}

WorkPtr NcclEmu::alltoall_base(at::Tensor& output, at::Tensor& input,
                               std::vector<int64_t>& output_split_sizes,
                               std::vector<int64_t>& input_split_sizes,
                               const c10d::AllToAllOptions& opts) {
  auto this_args = std::make_tuple(output, input, output_split_sizes, input_split_sizes, opts);
  PPFAST_EMU_COLLECTIVE(ALLTOALL_BASE,
                        inner->alltoall_base(std::get<0>(this_args), std::get<1>(this_args),
                                             std::get<2>(this_args), std::get<3>(this_args),
                                             std::get<4>(this_args)));
}

WorkPtr NcclEmu::alltoall(std::vector<at::Tensor>& outputs, std::vector<at::Tensor>& inputs,
                          const c10d::AllToAllOptions& opts) {
  auto this_args = std::make_tuple(outputs, inputs, opts);
  PPFAST_EMU_COLLECTIVE(ALLTOALL, inner->alltoall(std::get<0>(this_args), std::get<1>(this_args),
                                                 std::get<2>(this_args)));
}

WorkPtr NcclEmu::barrier(const c10d::BarrierOptions& opts) {
  auto this_args = std::make_tuple(opts);
  PPFAST_EMU_COLLECTIVE(BARRIER, inner->barrier(std::get<0>(this_args)));
}

#undef PPFAST_EMU_COLLECTIVE
#undef PPFAST_EMU_COLLECTIVE_RESULT

}  // namespace ppfast::testing
