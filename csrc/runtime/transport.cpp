// Transports: c10d process groups and the in-process hub. See transport.h.
#include "runtime/transport.h"

#include <atomic>
#include <thread>

#include <torch/csrc/distributed/c10d/Backend.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroup.hpp>
#include <torch/csrc/distributed/c10d/Work.hpp>

namespace ppfast {

// ---------------------------------------------------------------------------- c10d

namespace {

class C10dHandle : public Handle {
 public:
  explicit C10dHandle(c10::intrusive_ptr<c10d::Work> work) : work_(std::move(work)) {}
  void wait(std::chrono::milliseconds timeout) override {
    if (finished_) return;
    bool ok = false;
    try {
      ok = work_->wait(timeout);
    } catch (const std::exception& e) {
      const std::string why = e.what();
      const bool timed_out = why.find("imed out") != std::string::npos ||
                             why.find("imeout") != std::string::npos;
      throw TransportError(why, timed_out);
    }
    if (!ok) throw TransportError("timed out", true);
    finished_ = true;
  }
  bool done() override { return finished_ || work_->isCompleted(); }

 private:
  c10::intrusive_ptr<c10d::Work> work_;
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
}

C10dTransport::~C10dTransport() = default;

std::string C10dTransport::name() const { return "c10d:" + backend_->getBackendName(); }

std::shared_ptr<Handle> C10dTransport::send(const at::Tensor& tensor, int peer, int64_t tag) {
  std::vector<at::Tensor> t{tensor};
  return std::make_shared<C10dHandle>(backend_->send(t, peer, static_cast<int>(tag)));
}

std::shared_ptr<Handle> C10dTransport::recv(const at::Tensor& tensor, int peer, int64_t tag) {
  std::vector<at::Tensor> t{tensor};
  return std::make_shared<C10dHandle>(backend_->recv(t, peer, static_cast<int>(tag)));
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
  explicit InProcessOp(at::Tensor t) : tensor(std::move(t)) {}
  void wait(std::chrono::milliseconds timeout) override {
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
  bool done() override { return flag.load(std::memory_order_acquire); }
  void finish(const std::string& why = "") {
    {
      std::lock_guard<std::mutex> lock(mu);
      if (finished) return;
      finished = true;
      error = why;
      flag.store(true, std::memory_order_release);
    }
    cv.notify_all();
  }

  at::Tensor tensor;
  std::mutex mu;
  std::condition_variable cv;
  bool finished = false;
  std::atomic<bool> flag{false};  // finished, readable without the lock
  std::string error;
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
  try {
    if (!recv->tensor.sizes().equals(send->tensor.sizes()) ||
        recv->tensor.scalar_type() != send->tensor.scalar_type()) {
      why = "the receive buffer (" + std::string(c10::toString(recv->tensor.scalar_type())) +
            " " + c10::str(recv->tensor.sizes()) + ") does not match the tensor sent (" +
            std::string(c10::toString(send->tensor.scalar_type())) + " " +
            c10::str(send->tensor.sizes()) + ")";
    } else {
      recv->tensor.copy_(send->tensor);
    }
  } catch (const std::exception& e) {
    why = e.what();
  }
  send->finish(why);
  recv->finish(why);
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
