// Point-to-point transports the executor posts its sends and receives on.
//
// A transport moves lists of tensors between ranks, matched by (peer, tag). Every operation is
// asynchronous: it returns a Handle at once and the caller waits on the handle with a timeout
// when it needs the data (or needs the send buffer back). Two implementations:
//   C10dTransport      any c10d ProcessGroup (gloo, NCCL), ranks are processes (torchrun)
//   InProcessTransport ranks are threads of one process, sharing a Hub
#pragma once

#include <ATen/ATen.h>
#include <c10/core/Stream.h>

#include <chrono>
#include <condition_variable>
#include <map>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>
#include <tuple>
#include <vector>

#include "runtime/device_streams.h"

namespace c10d {
class Backend;
class ProcessGroup;
class Store;
class Work;
}  // namespace c10d

namespace ppfast {

// A transport failed or timed out; what() says why (the executor adds rank, action, peer).
struct TransportError : std::runtime_error {
  TransportError(const std::string& why, bool timed_out)
      : std::runtime_error(why), timed_out(timed_out) {}
  bool timed_out;
};

class Handle {
 public:
  virtual ~Handle() = default;
  // Blocks until the operation is complete; throws TransportError on failure or timeout.
  virtual void wait(std::chrono::milliseconds timeout) = 0;
  // Non-blocking: has it completed (successfully or not)?
  virtual bool done() = 0;
  // Orders `stream` after the operation: device work queued on it from now on sees the data.
  // The host waits only as long as the transport needs (NCCL: not at all; a host transport:
  // until the data is there), at most `timeout`. Host tensors: the same as wait().
  virtual void wait_stream(const c10::Stream& stream, std::chrono::milliseconds timeout) {
    (void)stream;
    wait(timeout);
  }
};

class Transport {
 public:
  virtual ~Transport() = default;
  virtual int rank() const = 0;
  virtual int size() const = 0;
  virtual std::string name() const = 0;
  virtual std::shared_ptr<Handle> send(const at::Tensor& tensor, int peer, int64_t tag) = 0;
  virtual std::shared_ptr<Handle> recv(const at::Tensor& tensor, int peer, int64_t tag) = 0;
  // Operations posted between begin_group and end_group form one coalesced group where the
  // backend supports it (NCCL); elsewhere these do nothing.
  virtual void begin_group() {}
  virtual void end_group() {}
  // Tell peers that this rank gave up, so they fail at once instead of waiting out a timeout.
  virtual void abort(const std::string& why) {}
  // Where a step that agrees shapes sends its messages. Such a step sends each message's shape
  // before its data and posts the data's receive only once the shape is in; where messages are
  // matched by issue order (NCCL), that needs a channel matched by tag instead.
  virtual Transport& negotiation() { return *this; }
};

// ---------------------------------------------------------------------------- c10d

struct GroupWork;
struct AbortState;
class C10dHandle;

class C10dTransport : public Transport {
 public:
  // `negotiation`: the transport for steps that agree shapes (see Transport::negotiation);
  // null: this one. Device tensors on a host-only backend (gloo) are staged through host memory.
  // `store` and `abort_key`: where a rank that gives up says so (abort); a thread polls the
  // key and, when another rank has set it, fails this rank's pending operations at once, so
  // that a stalled or failed peer is noticed in well under a second, not at the timeout. The
  // same thread beats under the key and watches the peers' beats: a peer silent for 1.2 s (dead
  // or frozen), or whose transport is gone, fails what waits on it, and only that.
  C10dTransport(c10::intrusive_ptr<c10d::ProcessGroup> group, c10::DeviceType device,
                std::shared_ptr<Transport> negotiation = nullptr,
                c10::intrusive_ptr<c10d::Store> store = {}, std::string abort_key = "");
  ~C10dTransport() override;
  int rank() const override { return rank_; }
  int size() const override { return size_; }
  std::string name() const override;
  std::shared_ptr<Handle> send(const at::Tensor& tensor, int peer, int64_t tag) override;
  std::shared_ptr<Handle> recv(const at::Tensor& tensor, int peer, int64_t tag) override;
  void begin_group() override;
  void end_group() override;
  void abort(const std::string& why) override;
  // Fails this transport's waits with `why` as given, telling no peer (the side channel of a
  // transport that already did).
  void fail_pending(const std::string& why);
  // Whether an operation with `peer` is posted here (or on the side channel) and not over.
  bool pending_with(int peer) const;
  Transport& negotiation() override { return negotiation_ ? *negotiation_ : *this; }

 private:
  std::shared_ptr<Handle> post(bool is_send, const at::Tensor& tensor, int peer, int64_t tag);

  c10::intrusive_ptr<c10d::ProcessGroup> group_pg_;
  c10::intrusive_ptr<c10d::Backend> backend_;
  c10::DeviceType device_;
  int rank_, size_;
  std::shared_ptr<GroupWork> group_;  // the open coalesced group, if any
  std::shared_ptr<Transport> negotiation_;
  bool can_coalesce_ = false;
  bool host_only_ = false;  // gloo: device tensors go through host memory
  // giving up: this rank's or another's, seen through the store by a watcher thread
  c10::intrusive_ptr<c10d::Store> store_;
  std::string abort_key_;
  std::shared_ptr<AbortState> abort_;
  std::thread watcher_;
  bool stream_ordered_ = false;  // NCCL: device work on streams of its own
};

// ---------------------------------------------------------------------------- in process

class InProcessOp;

// The meeting point of the ranks of one in-process pipeline. A message moves when both its
// send and its receive are posted: the later of the two copies the tensor into the receive
// buffer. abort() fails every pending and future operation, naming the rank that gave up.
class Hub {
 public:
  explicit Hub(int size) : size_(size) {}
  int size() const { return size_; }
  std::shared_ptr<Handle> post(int src, int dst, int64_t tag, const at::Tensor& tensor,
                               bool is_send);
  void abort(int rank, const std::string& why);

 private:
  struct Slot {
    std::shared_ptr<InProcessOp> send, recv;
  };
  std::mutex mu_;
  int size_;
  std::map<std::tuple<int, int, int64_t>, Slot> slots_;
  std::string aborted_;
  EventPool events_;  // device tensors: the order between the two sides' streams
};

class InProcessTransport : public Transport {
 public:
  InProcessTransport(std::shared_ptr<Hub> hub, int rank) : hub_(std::move(hub)), rank_(rank) {}
  int rank() const override { return rank_; }
  int size() const override { return hub_->size(); }
  std::string name() const override { return "in-process"; }
  std::shared_ptr<Handle> send(const at::Tensor& tensor, int peer, int64_t tag) override {
    return hub_->post(rank_, peer, tag, tensor, true);
  }
  std::shared_ptr<Handle> recv(const at::Tensor& tensor, int peer, int64_t tag) override {
    return hub_->post(peer, rank_, tag, tensor, false);
  }
  void abort(const std::string& why) override { hub_->abort(rank_, why); }

 private:
  std::shared_ptr<Hub> hub_;
  int rank_;
};

}  // namespace ppfast
