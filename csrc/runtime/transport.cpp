// Transports: c10d process groups and the in-process hub. See transport.h.
#include "runtime/transport.h"

#include <atomic>
#include <thread>

#include <c10/core/StreamGuard.h>

#include "runtime/device_streams.h"

#include <torch/csrc/distributed/c10d/Backend.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroup.hpp>
#include <torch/csrc/distributed/c10d/Work.hpp>

namespace ppfast {

// ---------------------------------------------------------------------------- c10d

namespace {

class C10dHandle : public Handle {
 public:
  // stream_ordered: the backend runs the operation on a device stream of its own and its wait()
  // orders the current stream after it instead of blocking the host (NCCL).
  C10dHandle(c10::intrusive_ptr<c10d::Work> work, bool stream_ordered)
      : work_(std::move(work)), stream_ordered_(stream_ordered) {}

  void wait(std::chrono::milliseconds timeout) override {
    if (finished_) return;
    if (stream_ordered_) {
      // The host must know the transfer is over (a sent buffer is about to be freed): poll.
      const auto deadline = std::chrono::steady_clock::now() + timeout;
      while (!work_->isCompleted()) {
        if (std::chrono::steady_clock::now() > deadline) throw TransportError("timed out", true);
        std::this_thread::sleep_for(std::chrono::microseconds(20));
      }
      rethrow_failure();
      finished_ = true;
      return;
    }
    bool ok = false;
    try {
      ok = work_->wait(timeout);
    } catch (const std::exception& e) {
      throw as_transport_error(e);
    }
    if (!ok) throw TransportError("timed out", true);
    finished_ = true;
  }

  void wait_stream(const c10::Stream& stream, std::chrono::milliseconds timeout) override {
    if (!stream_ordered_) return wait(timeout);
    if (finished_) return;
    c10::StreamGuard guard(stream);
    try {
      work_->wait();  // the current stream (`stream`) waits for the backend's; the host does not
    } catch (const std::exception& e) {
      throw as_transport_error(e);
    }
  }

  bool done() override { return finished_ || work_->isCompleted(); }

 private:
  static TransportError as_transport_error(const std::exception& e) {
    const std::string why = e.what();
    const bool timed_out =
        why.find("imed out") != std::string::npos || why.find("imeout") != std::string::npos;
    return TransportError(why, timed_out);
  }

  void rethrow_failure() {
    std::exception_ptr failure = work_->exception();
    if (!failure) return;
    try {
      std::rethrow_exception(failure);
    } catch (const std::exception& e) {
      throw as_transport_error(e);
    }
  }

  c10::intrusive_ptr<c10d::Work> work_;
  bool stream_ordered_;
  bool finished_ = false;
};

}  // namespace

C10dTransport::C10dTransport(c10::intrusive_ptr<c10d::ProcessGroup> group,
                             c10::DeviceType device)
    : group_(std::move(group)), device_(device) {
  rank_ = group_->getRank();
  size_ = group_->getSize();
  // Talk to the backend directly: ProcessGroup::send goes through the dispatcher on every call.
  backend_ = group_->getBackend(device_);
  can_coalesce_ = backend_->getBackendName() == "nccl";
  stream_ordered_ = backend_->getBackendName() == "nccl";
}

C10dTransport::~C10dTransport() = default;

std::string C10dTransport::name() const { return "c10d:" + backend_->getBackendName(); }

std::shared_ptr<Handle> C10dTransport::send(const at::Tensor& tensor, int peer, int64_t tag) {
  std::vector<at::Tensor> t{tensor};
  return std::make_shared<C10dHandle>(backend_->send(t, peer, static_cast<int>(tag)),
                                      stream_ordered_ && device_has_streams(tensor.device()));
}

std::shared_ptr<Handle> C10dTransport::recv(const at::Tensor& tensor, int peer, int64_t tag) {
  std::vector<at::Tensor> t{tensor};
  return std::make_shared<C10dHandle>(backend_->recv(t, peer, static_cast<int>(tag)),
                                      stream_ordered_ && device_has_streams(tensor.device()));
}

void C10dTransport::begin_group() {
  // gloo has no coalescing (and raises if asked); its sends are asynchronous anyway
  if (can_coalesce_ && !coalescing_) {
    backend_->startCoalescing();
    coalescing_ = true;
  }
}

void C10dTransport::end_group() {
  if (coalescing_) {
    auto work = backend_->endCoalescing();
    coalescing_ = false;
    // the individual handles complete with the group; nothing else to keep
    (void)work;
  }
}

// ---------------------------------------------------------------------------- in process

class InProcessOp : public Handle {
 public:
  explicit InProcessOp(at::Tensor t) : tensor(std::move(t)) {
    // Device tensors: the copy runs on the stream of whichever rank posts second, so it must
    // wait for the stream of the one that posted first (its data, or its free buffer).
    if (tensor.defined() && device_has_streams(tensor.device())) {
      posted = mark(current_stream(tensor.device()));
    }
  }

  void wait(std::chrono::milliseconds timeout) override {
    wait_matched(timeout);
    if (copied) {
      const auto deadline = std::chrono::steady_clock::now() + timeout;
      while (!copied->query()) {
        if (std::chrono::steady_clock::now() > deadline) throw TransportError("timed out", true);
        std::this_thread::sleep_for(std::chrono::microseconds(20));
      }
    }
  }

  void wait_stream(const c10::Stream& stream, std::chrono::milliseconds timeout) override {
    wait_matched(timeout);
    if (copied) copied->block(stream);
  }

  bool done() override {
    return flag.load(std::memory_order_acquire) && (!copied || copied->query());
  }

  void finish(const std::string& why = "", std::shared_ptr<c10::Event> copy_done = nullptr) {
    {
      std::lock_guard<std::mutex> lock(mu);
      if (finished) return;
      finished = true;
      error = why;
      copied = std::move(copy_done);
      flag.store(true, std::memory_order_release);
    }
    cv.notify_all();
  }

  at::Tensor tensor;
  std::shared_ptr<c10::Event> posted;  // device tensors: recorded on the poster's stream
  std::shared_ptr<c10::Event> copied;  // device tensors: recorded after the copy
  std::mutex mu;
  std::condition_variable cv;
  bool finished = false;
  std::atomic<bool> flag{false};  // finished, readable without the lock
  std::string error;

 private:
  // Until both sides are there and the copy is done (host) or queued (device).
  void wait_matched(std::chrono::milliseconds timeout) {
    // The peer thread often posts within microseconds; a short spin avoids paying a sleep and a
    // wake-up (tens of microseconds on a busy machine) for every such hand-off.
    const auto spin_until = std::chrono::steady_clock::now() + std::chrono::microseconds(50);
    while (!flag.load(std::memory_order_acquire) && std::chrono::steady_clock::now() < spin_until) {
      std::this_thread::yield();
    }
    std::unique_lock<std::mutex> lock(mu);
    if (!cv.wait_for(lock, timeout, [&] { return finished; })) {
      throw TransportError("timed out", true);
    }
    if (!error.empty()) throw TransportError(error, false);
  }
};

std::shared_ptr<Handle> Hub::post(int src, int dst, int64_t tag, const at::Tensor& tensor,
                                  bool is_send) {
  auto op = std::make_shared<InProcessOp>(tensor);
  std::shared_ptr<InProcessOp> send, recv;
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (!aborted_.empty()) {
      op->finish(aborted_);
      return op;
    }
    auto key = std::make_tuple(src, dst, tag);
    Slot& slot = slots_[key];
    auto& mine = is_send ? slot.send : slot.recv;
    if (mine) {
      op->finish("a second " + std::string(is_send ? "send" : "receive") + " with tag " +
                 std::to_string(tag) + " between ranks " + std::to_string(src) + " and " +
                 std::to_string(dst) + " was posted before the first completed");
      return op;
    }
    mine = op;
    if (!slot.send || !slot.recv) return op;
    send = slot.send;
    recv = slot.recv;
    slots_.erase(key);
  }
  // Both sides are there: copy outside the lock so other pairs are not held up.
  std::string why;
  std::shared_ptr<c10::Event> copied;
  try {
    if (!recv->tensor.sizes().equals(send->tensor.sizes()) ||
        recv->tensor.scalar_type() != send->tensor.scalar_type()) {
      why = "the receive buffer (" + std::string(c10::toString(recv->tensor.scalar_type())) +
            " " + c10::str(recv->tensor.sizes()) + ") does not match the tensor sent (" +
            std::string(c10::toString(send->tensor.scalar_type())) + " " +
            c10::str(send->tensor.sizes()) + ")";
    } else if (recv->posted || send->posted) {
      // Device tensors: the copy goes on this thread's current stream (the send or receive
      // stream of the rank posting second), after the other side's stream reached its post.
      const c10::Device dst = recv->tensor.device();
      const c10::Stream stream = current_stream(dst);
      if (send->tensor.device() == dst) {
        (op == send ? recv : send)->posted->block(stream);
      } else {
        // Between devices ATen copies on the source's current stream: settle both sides first.
        for (auto* side : {send.get(), recv.get()}) {
          if (side->posted) side->posted->synchronize();
        }
      }
      recv->tensor.copy_(send->tensor, /*non_blocking=*/true);
      copied = mark(stream);
    } else {
      recv->tensor.copy_(send->tensor);
    }
  } catch (const std::exception& e) {
    why = e.what();
  }
  send->finish(why, copied);
  recv->finish(why, copied);
  return op;
}

void Hub::abort(int rank, const std::string& why) {
  std::vector<std::shared_ptr<InProcessOp>> pending;
  const std::string msg = "rank " + std::to_string(rank) + " failed: " + why;
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (aborted_.empty()) aborted_ = msg;
    for (auto& [key, slot] : slots_) {
      if (slot.send) pending.push_back(slot.send);
      if (slot.recv) pending.push_back(slot.recv);
    }
    slots_.clear();
  }
  for (auto& op : pending) op->finish(msg);
}

}  // namespace ppfast
