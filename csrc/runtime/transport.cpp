// Transports: c10d process groups and the in-process hub. See transport.h.
#include "runtime/transport.h"

#include <algorithm>
#include <atomic>
#include <future>
#include <thread>

#include <c10/core/StreamGuard.h>

#include "runtime/device_streams.h"

#include <torch/csrc/distributed/c10d/Backend.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroup.hpp>
#include <torch/csrc/distributed/c10d/Store.hpp>
#include <torch/csrc/distributed/c10d/Work.hpp>

namespace ppfast {

// ---------------------------------------------------------------------------- c10d

// The Work of an operation posted inside a coalesced group. NCCL returns no Work per operation
// there, only the group's one from endCoalescing, which completes when all of the group's
// operations have: every handle of the group shares this slot, filled when the group ends.
struct GroupWork {
  c10::intrusive_ptr<c10d::Work> work;
  bool ended = false;
};

// Why this transport gave up, once it has (abort(), or the watcher that saw another rank's
// notice), and what must fail then. Shared by the transport, its handles and its watcher
// thread, so that the transport may go while the watcher still runs: the watcher can be the
// last owner of a pending operation, whose destruction may need the GIL that the thread
// destroying the transport holds, so the transport never waits for it.
struct AbortState {
  std::atomic<bool> set{false};
  std::mutex mutex;
  std::string why;
  bool stopping = false;  // the transport is gone: the watcher ends
  std::mutex live_mutex;
  std::vector<std::weak_ptr<C10dHandle>> live;  // operations that may still be pending
  c10::intrusive_ptr<c10d::Backend> backend;    // aborted as a whole where it coalesces (NCCL)
  std::shared_ptr<Transport> negotiation;       // the tag-matched channel beside it, if any
  // liveness: the peers this rank has exchanged messages with, watched through their beats
  int rank = -1;
  std::mutex peers_mutex;
  std::vector<char> peers;

  std::weak_ptr<AbortState> watched_by;  // a side channel's peers are watched by its main one

  void add_peer(int peer) {
    if (auto main = watched_by.lock()) return main->add_peer(peer);
    std::lock_guard<std::mutex> lock(peers_mutex);
    if (peer >= 0 && peer < static_cast<int>(peers.size())) peers[peer] = 1;
  }

  void raise_if_set() {
    if (!set.load()) return;
    std::lock_guard<std::mutex> lock(mutex);
    throw TransportError(why, false);
  }

  void fail_pending(const std::string& reason);
  bool pending_with(int peer);
};

class C10dHandle : public Handle {
 public:
  // stream_ordered: the backend runs the operation on a device stream of its own and its wait()
  // orders the current stream after it instead of blocking the host (NCCL).
  C10dHandle(c10::intrusive_ptr<c10d::Work> work, std::shared_ptr<GroupWork> group,
             bool stream_ordered, std::shared_ptr<AbortState> abort, int peer)
      : own_(std::move(work)),
        group_(std::move(group)),
        stream_ordered_(stream_ordered),
        abort_(std::move(abort)),
        peer_(peer) {}

  int peer() const { return peer_; }

  // Not over yet, as another thread (the watcher) sees it: an operation whose completion
  // cannot be read (a coalesced group not yet ended) counts as pending.
  bool pending() {
    if (finished_) return false;
    try {
      return !done();
    } catch (const std::exception&) {
      return true;
    }
  }

  void wait(std::chrono::milliseconds timeout) override {
    if (finished_) return;
    abort_->raise_if_set();
    c10d::Work& work = this->work();
    if (stream_ordered_) {
      // The host must know the transfer is over (a sent buffer is about to be freed): poll.
      const auto deadline = std::chrono::steady_clock::now() + timeout;
      while (!work.isCompleted()) {
        abort_->raise_if_set();
        if (std::chrono::steady_clock::now() > deadline) throw TransportError("timed out", true);
        std::this_thread::sleep_for(std::chrono::microseconds(20));
      }
      rethrow_failure(work);
      finished_ = true;
      return;
    }
    bool ok = false;
    try {
      ok = work.wait(timeout);
    } catch (const std::exception& e) {
      abort_->raise_if_set();  // woken by an abort: say why, not what the backend saw
      throw as_transport_error(e);
    }
    if (!ok) {
      abort_->raise_if_set();
      throw TransportError("timed out", true);
    }
    finished_ = true;
  }

  // Wake a thread blocked in wait(): the backend's abort of this one operation.
  void cancel() {
    if (finished_) return;
    c10d::Work* w = own_ ? own_.get() : (group_ && group_->work ? group_->work.get() : nullptr);
    if (w == nullptr) return;
    try {
      w->abort();
    } catch (const std::exception&) {
    }
  }

  void wait_stream(const c10::Stream& stream, std::chrono::milliseconds timeout) override {
    if (!stream_ordered_) return wait(timeout);
    if (finished_) return;
    c10::StreamGuard guard(stream);
    try {
      work().wait();  // the current stream (`stream`) waits for the backend's; the host does not
    } catch (const std::exception& e) {
      throw as_transport_error(e);
    }
  }

  bool done() override {
    if (finished_) return true;
    if (!own_ && !(group_ && group_->work)) return group_ && group_->ended;
    return work().isCompleted();
  }

 private:
  c10d::Work& work() {
    if (own_) return *own_;
    if (group_ && group_->work) return *group_->work;
    // endCoalescing gave no work for a group that holds this operation, or it is not over yet
    throw TransportError(
        group_ && group_->ended
            ? "the backend returned no work for a coalesced group holding this operation"
            : "an operation of a coalesced group was waited on before the group ended",
        false);
  }

  static TransportError as_transport_error(const std::exception& e) {
    const std::string why = e.what();
    // gloo: "Timed out waiting ..."; NCCL's watchdog: "Watchdog caught collective operation
    // timeout"; not "Timeout(ms)=", which NCCL's description of every operation holds
    const bool timed_out = why.find("imed out") != std::string::npos ||
                           why.find("operation timeout") != std::string::npos ||
                           why.find("before timing out") != std::string::npos;
    return TransportError(why, timed_out);
  }

  static void rethrow_failure(c10d::Work& work) {
    std::exception_ptr failure = work.exception();
    if (!failure) return;
    try {
      std::rethrow_exception(failure);
    } catch (const std::exception& e) {
      throw as_transport_error(e);
    }
  }

  c10::intrusive_ptr<c10d::Work> own_;
  std::shared_ptr<GroupWork> group_;
  bool stream_ordered_;
  std::shared_ptr<AbortState> abort_;
  int peer_;
  std::atomic<bool> finished_{false};
};

namespace {

// A send or receive of a device tensor through a host copy (host_only_ backends). A receive
// copies the host buffer into the device tensor once it is in, on the stream it is waited for.
class StagedHandle : public Handle {
 public:
  StagedHandle(std::shared_ptr<Handle> inner, at::Tensor device_dst, at::Tensor host)
      : inner_(std::move(inner)), dst_(std::move(device_dst)), host_(std::move(host)) {}

  void wait(std::chrono::milliseconds timeout) override {
    inner_->wait(timeout);
    land();
  }

  void wait_stream(const c10::Stream& stream, std::chrono::milliseconds timeout) override {
    inner_->wait(timeout);
    c10::StreamGuard guard(stream);
    land();
  }

  bool done() override { return inner_->done(); }

 private:
  void land() {
    if (dst_.defined()) {
      dst_.copy_(host_);
      dst_ = at::Tensor();
    }
  }

  std::shared_ptr<Handle> inner_;
  at::Tensor dst_;
  at::Tensor host_;  // kept until the transfer is over
};

}  // namespace

namespace {

// How often a rank beats, and how long a peer may be silent before it is taken for dead. A
// beat comes from this thread, not from compute or Python, so a rank that computes for minutes
// still beats; only a process that died or froze falls silent.
constexpr auto kBeatEvery = std::chrono::milliseconds(200);
constexpr auto kSilentFor = std::chrono::milliseconds(1200);

std::string beat_key(const std::string& key, int rank) { return key + "/beat/" + std::to_string(rank); }

const std::vector<uint8_t> kClosed{'c', 'l', 'o', 's', 'e', 'd'};  // a beat that says goodbye

// Every 50 ms: has another rank left a notice? Then fail what is pending here. Every 200 ms:
// beat (a counter under this rank's key), and read the beats of the peers this rank has
// exchanged messages with. A peer silent for 1.2 s is dead (or frozen): what is pending here
// with it fails, naming it. Nothing else fails: a silent peer this rank needs nothing from
// breaks nothing here, least of all a backend that the failure would abort (NCCL's). A peer
// whose beat says "closed" dropped its transport on purpose (its run ended first, its schedule
// was rebuilt) and is not judged at all. A rank that dies cannot leave a notice: without
// beats, its peers would learn of it only from their backend (gloo: a closed connection;
// NCCL: nothing until its watchdog) or at their timeout.
void watch(std::shared_ptr<AbortState> state, c10::intrusive_ptr<c10d::Store> store,
           std::string key) {
  using clock = std::chrono::steady_clock;
  struct Heard {
    std::vector<uint8_t> beat;
    clock::time_point changed;
  };
  std::map<int, Heard> heard;
  int64_t beats = 0;
  auto next_beat = clock::now();
  while (true) {
    for (int i = 0; i < 5; ++i) {  // 10 ms between checks for the end
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
      bool closed;
      {
        std::lock_guard<std::mutex> lock(state->mutex);
        if (state->set.load()) return;
        closed = state->stopping;
      }
      if (closed) {  // the transport is gone: say so, so that no peer waits on it
        try {
          store->set(beat_key(key, state->rank), kClosed);
        } catch (const std::exception&) {
        }
        return;
      }
    }
    try {
      if (store->check({key})) {
        auto bytes = store->get(key);
        state->fail_pending(std::string(bytes.begin(), bytes.end()));
        return;
      }
      const auto now = clock::now();
      if (now < next_beat) continue;
      next_beat = now + kBeatEvery;
      const std::string mine = std::to_string(++beats);
      store->set(beat_key(key, state->rank), std::vector<uint8_t>(mine.begin(), mine.end()));
      std::vector<int> peers;
      {
        std::lock_guard<std::mutex> lock(state->peers_mutex);
        for (int r = 0; r < static_cast<int>(state->peers.size()); ++r) {
          if (state->peers[r]) peers.push_back(r);
        }
      }
      for (int r : peers) {
        const std::string k = beat_key(key, r);
        // no key: its transport does not exist yet (it has not reached its first step)
        if (!store->check({k})) continue;
        auto beat = store->get(k);
        auto [it, fresh] = heard.try_emplace(r, Heard{beat, now});
        if (!fresh && it->second.beat != beat) it->second = Heard{std::move(beat), now};
        // It left on purpose, its part done: what it sent is on its way or here, and what
        // still waits on it (behind other operations, as NCCL orders them) may yet complete.
        if (it->second.beat == kClosed) continue;
        const auto silent = now - it->second.changed;
        if (silent <= kSilentFor) continue;
        if (!state->pending_with(r)) continue;  // nothing here waits on it
        state->fail_pending(
            "rank " + std::to_string(r) + " has not been heard from for " +
            std::to_string(std::chrono::duration_cast<std::chrono::milliseconds>(silent).count()) +
            " ms: its process died or froze");
        return;
      }
    } catch (const std::exception&) {
      // the store went away (the job ends): nothing to watch any more
      return;
    }
  }
}

}  // namespace

C10dTransport::C10dTransport(c10::intrusive_ptr<c10d::ProcessGroup> group,
                             c10::DeviceType device, std::shared_ptr<Transport> negotiation,
                             c10::intrusive_ptr<c10d::Store> store, std::string abort_key)
    : group_pg_(std::move(group)),
      device_(device),
      negotiation_(std::move(negotiation)),
      store_(std::move(store)),
      abort_key_(std::move(abort_key)),
      abort_(std::make_shared<AbortState>()) {
  rank_ = group_pg_->getRank();
  size_ = group_pg_->getSize();
  // Talk to the backend directly: ProcessGroup::send goes through the dispatcher on every call.
  backend_ = group_pg_->getBackend(device_);
  const std::string name = backend_->getBackendName();
  // NCCL (and backends with its semantics) coalesce; gloo raises if asked
  can_coalesce_ = backend_->supportsCoalescing() || name == "nccl";
  stream_ordered_ = name == "nccl";
  host_only_ = name == "gloo";
  if (can_coalesce_) abort_->backend = backend_;
  abort_->negotiation = negotiation_;
  abort_->rank = rank_;
  abort_->peers.assign(size_, 0);
  if (auto side = std::dynamic_pointer_cast<C10dTransport>(negotiation_)) {
    side->abort_->watched_by = abort_;
  }
  if (store_ && !abort_key_.empty()) {
    // A first beat now, not from the watcher 200 ms on: a peer sees this rank's key as soon as
    // the transport exists, so a rank that froze (or died) before its watcher ever beat is
    // still noticed, by its silence, rather than waited for until the timeout.
    try {
      store_->set(beat_key(abort_key_, rank_), std::vector<uint8_t>{'0'});
    } catch (const std::exception&) {
      // the store is gone: the watcher finds out and ends
    }
    watcher_ = std::thread(watch, abort_, store_, abort_key_);
  }
}

C10dTransport::~C10dTransport() {
  {
    std::lock_guard<std::mutex> lock(abort_->mutex);
    abort_->stopping = true;
  }
  // never joined: see AbortState
  if (watcher_.joinable()) watcher_.detach();
}

// How long abort() waits for its notice to reach the store: a few milliseconds as a rule. A
// store that does not answer (its host, rank 0 as a rule, froze) must not hold up the error
// this rank is about to raise; the write goes on in the background, and peers that never read
// it fail at their own timeout.
constexpr auto kNoticeWait = std::chrono::seconds(1);

void C10dTransport::abort(const std::string& why) {
  if (store_ && !abort_key_.empty()) {
    const std::string text = "rank " + std::to_string(rank_) + " gave up: " + why;
    auto written = std::make_shared<std::promise<void>>();
    auto landed = written->get_future();
    std::thread([store = store_, key = abort_key_, text, written] {
      try {
        // the first notice stays: peers are told why this rank gave up first, not what failed
        // after it (compareSet with nothing expected sets only a key that does not exist)
        store->compareSet(key, {}, std::vector<uint8_t>(text.begin(), text.end()));
      } catch (const std::exception&) {
        // the store is gone with the job: peers learn from the connections instead
      }
      written->set_value();
    }).detach();
    landed.wait_for(kNoticeWait);
  }
  abort_->fail_pending("this rank gave up: " + why);
}

void C10dTransport::fail_pending(const std::string& why) { abort_->fail_pending(why); }

bool C10dTransport::pending_with(int peer) const { return abort_->pending_with(peer); }

bool AbortState::pending_with(int peer) {
  std::vector<std::shared_ptr<C10dHandle>> handles;
  {
    std::lock_guard<std::mutex> lock(live_mutex);
    for (auto& w : live) {
      if (auto h = w.lock(); h && h->peer() == peer) handles.push_back(std::move(h));
    }
  }
  for (auto& h : handles) {
    if (h->pending()) return true;
  }
  auto side = std::dynamic_pointer_cast<C10dTransport>(negotiation);
  return side && side->pending_with(peer);
}

void AbortState::fail_pending(const std::string& reason) {
  {
    std::lock_guard<std::mutex> lock(mutex);
    if (set.load()) return;
    why = reason;
    set.store(true);
  }
  // Wake every wait: a backend with its own communicator state (NCCL) aborts as a whole, and
  // each of gloo's pending operations is aborted one by one.
  if (backend) {
    try {
      backend->abort();
    } catch (const std::exception&) {
    }
  }
  std::vector<std::shared_ptr<C10dHandle>> pending;
  {
    std::lock_guard<std::mutex> lock(live_mutex);
    for (auto& w : live) {
      if (auto h = w.lock()) pending.push_back(std::move(h));
    }
  }
  for (auto& h : pending) h->cancel();
  // the channel of steps that agree shapes has waits of its own, failed for the same reason
  if (auto side = std::dynamic_pointer_cast<C10dTransport>(negotiation)) {
    side->fail_pending(reason);
  } else if (negotiation) {
    negotiation->abort(reason);
  }
}

std::string C10dTransport::name() const { return "c10d:" + backend_->getBackendName(); }

std::shared_ptr<Handle> C10dTransport::post(bool is_send, const at::Tensor& tensor, int peer,
                                            int64_t tag) {
  if (host_only_ && !tensor.is_cpu()) {
    // gloo moves host memory: a device tensor goes through a host copy of itself
    at::Tensor host = is_send ? tensor.to(at::kCPU) : at::empty_like(tensor, at::device(at::kCPU));
    auto inner = post(is_send, host, peer, tag);
    return std::make_shared<StagedHandle>(std::move(inner), is_send ? at::Tensor() : tensor,
                                          std::move(host));
  }
  abort_->add_peer(peer);
  std::vector<at::Tensor> t{tensor};
  auto work = is_send ? backend_->send(t, peer, static_cast<int>(tag))
                      : backend_->recv(t, peer, static_cast<int>(tag));
  if (!work && !group_) {
    throw TransportError(std::string("the backend returned no work for a ") +
                             (is_send ? "send to " : "receive from ") + std::to_string(peer) +
                             " outside a coalesced group",
                         false);
  }
  auto handle = std::make_shared<C10dHandle>(
      std::move(work), group_, stream_ordered_ && device_has_streams(tensor.device()), abort_,
      peer);
  {
    std::lock_guard<std::mutex> lock(abort_->live_mutex);
    auto& live = abort_->live;
    // forget operations that are over, so the list stays as short as what is in flight
    live.erase(std::remove_if(live.begin(), live.end(),
                              [](const std::weak_ptr<C10dHandle>& w) { return w.expired(); }),
               live.end());
    live.push_back(handle);
  }
  return handle;
}

std::shared_ptr<Handle> C10dTransport::send(const at::Tensor& tensor, int peer, int64_t tag) {
  return post(true, tensor, peer, tag);
}

std::shared_ptr<Handle> C10dTransport::recv(const at::Tensor& tensor, int peer, int64_t tag) {
  return post(false, tensor, peer, tag);
}

void C10dTransport::begin_group() {
  // gloo has no coalescing (and raises if asked); its operations progress on their own anyway
  if (can_coalesce_ && !group_) {
    backend_->startCoalescing();
    group_ = std::make_shared<GroupWork>();
  }
}

void C10dTransport::end_group() {
  if (group_) {
    // the group's one Work: every handle posted in it completes with it
    group_->work = backend_->endCoalescing();
    group_->ended = true;
    group_.reset();
  }
}

// ---------------------------------------------------------------------------- in process

class InProcessOp : public Handle {
 public:
  InProcessOp(at::Tensor t, EventPool& events) : tensor(std::move(t)) {
    // Device tensors: the copy runs on the stream of whichever rank posts second, so it must
    // wait for the stream of the one that posted first (its data, or its free buffer).
    if (tensor.defined() && device_has_streams(tensor.device())) {
      posted = events.mark(current_stream(tensor.device()));
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
  auto op = std::make_shared<InProcessOp>(tensor, events_);
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
      copied = events_.mark(stream);
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
