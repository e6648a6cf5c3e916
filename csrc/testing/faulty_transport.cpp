// The fault-injecting transport; see faulty_transport.h.
#include "testing/faulty_transport.h"

#include <signal.h>
#include <unistd.h>

#include <map>
#include <stdexcept>
#include <thread>
#include <vector>

namespace ppfast::testing {
namespace {

enum class Fault { kNone, kDelay, kDrop, kDuplicate, kReorder, kCorrupt, kKill, kFreeze };

// Stops the whole process (SIGSTOP), as a hung host or a wedged device does: it stays alive,
// holds its locks and keeps its connections open, and says nothing more.
void freeze() { raise(SIGSTOP); }

Fault parse_fault(const std::string& s) {
  static const std::map<std::string, Fault> names = {
      {"delay", Fault::kDelay},     {"drop", Fault::kDrop},       {"duplicate", Fault::kDuplicate},
      {"reorder", Fault::kReorder}, {"corrupt", Fault::kCorrupt}, {"kill", Fault::kKill},
      {"freeze", Fault::kFreeze}};
  auto it = names.find(s);
  if (it == names.end()) {
    throw std::invalid_argument("fault is one of delay, drop, duplicate, reorder, corrupt, kill, freeze; not " + s);
  }
  return it->second;
}

class DoneHandle : public Handle {
 public:
  void wait(std::chrono::milliseconds) override {}
  bool done() override { return true; }
};

// Completes when all of its handles have.
class AllHandle : public Handle {
 public:
  explicit AllHandle(std::vector<std::shared_ptr<Handle>> hs, at::Tensor keep = {})
      : hs_(std::move(hs)), keep_(std::move(keep)) {}
  void wait(std::chrono::milliseconds timeout) override {
    for (auto& h : hs_) h->wait(timeout);
  }
  bool done() override {
    for (auto& h : hs_)
      if (!h->done()) return false;
    return true;
  }

 private:
  std::vector<std::shared_ptr<Handle>> hs_;
  at::Tensor keep_;  // a corrupted copy, alive until its send completes
};

}  // namespace

// A send held back by "reorder": posted after the next send to its peer, or when waited on.
struct Held {
  Transport* transport = nullptr;
  at::Tensor tensor;
  int peer = -1;
  int64_t tag = 0;
  std::shared_ptr<Handle> posted;
  std::mutex mu;
  std::shared_ptr<Handle> post() {
    std::lock_guard<std::mutex> lock(mu);
    if (!posted) posted = transport->send(tensor, peer, tag);
    return posted;
  }
};

namespace {
class HeldHandle : public Handle {
 public:
  explicit HeldHandle(std::shared_ptr<Held> held) : held_(std::move(held)) {}
  void wait(std::chrono::milliseconds timeout) override { held_->post()->wait(timeout); }
  bool done() override {
    std::shared_ptr<Handle> h;
    {
      std::lock_guard<std::mutex> lock(held_->mu);
      h = held_->posted;
    }
    return h && h->done();
  }

 private:
  std::shared_ptr<Held> held_;
};
}  // namespace

struct FaultState {
  std::mutex mu;
  Fault fault = Fault::kNone;
  bool on_send = true;
  int64_t at = 0;  // fires at this count of sends (or receives)
  int peer = -1;
  double seconds = 0.0;
  bool fired = false;
  int64_t sends = 0, recvs = 0;
  std::map<int, std::shared_ptr<Held>> held;  // per peer, a send held back

  // Counts one operation; returns the fault to apply to it (kNone mostly).
  Fault next(bool is_send, int peer_of_op) {
    std::lock_guard<std::mutex> lock(mu);
    const int64_t n = is_send ? sends++ : recvs++;
    if (fired || fault == Fault::kNone || is_send != on_send) return Fault::kNone;
    if (peer >= 0 && peer_of_op != peer) return Fault::kNone;
    if (n < at) return Fault::kNone;
    fired = true;
    return fault;
  }
};

FaultyTransport::FaultyTransport(std::shared_ptr<Transport> inner)
    : FaultyTransport(std::move(inner), std::make_shared<FaultState>()) {}

FaultyTransport::FaultyTransport(std::shared_ptr<Transport> inner, std::shared_ptr<FaultState> state)
    : inner_(std::move(inner)), state_(std::move(state)) {
  if (!inner_) throw std::invalid_argument("FaultyTransport needs a transport to wrap");
  Transport& side = inner_->negotiation();
  if (&side != inner_.get()) {
    // the side channel lives as long as the inner transport: share its ownership
    side_ = std::shared_ptr<FaultyTransport>(
        new FaultyTransport(std::shared_ptr<Transport>(inner_, &side), state_));
  }
}

void FaultyTransport::arm(const std::string& fault, const std::string& op, int nth, int peer,
                          double seconds) {
  if (op != "send" && op != "recv") throw std::invalid_argument("op is send or recv, not " + op);
  const Fault f = parse_fault(fault);
  if (op == "recv" && f != Fault::kDelay && f != Fault::kKill && f != Fault::kFreeze) {
    throw std::invalid_argument("a receive can only be delayed, killed or frozen at");
  }
  if (nth < 0) throw std::invalid_argument("nth counts from 0");
  std::lock_guard<std::mutex> lock(state_->mu);
  state_->fault = f;
  state_->on_send = op == "send";
  state_->at = (op == "send" ? state_->sends : state_->recvs) + nth;
  state_->peer = peer;
  state_->seconds = seconds;
  state_->fired = false;
}

bool FaultyTransport::fired() const {
  std::lock_guard<std::mutex> lock(state_->mu);
  return state_->fired;
}

int64_t FaultyTransport::sends() const {
  std::lock_guard<std::mutex> lock(state_->mu);
  return state_->sends;
}

int64_t FaultyTransport::recvs() const {
  std::lock_guard<std::mutex> lock(state_->mu);
  return state_->recvs;
}

std::shared_ptr<Handle> FaultyTransport::send(const at::Tensor& tensor, int peer, int64_t tag) {
  const Fault f = state_->next(true, peer);
  std::shared_ptr<Held> held;
  {
    std::lock_guard<std::mutex> lock(state_->mu);
    auto it = state_->held.find(peer);
    if (it != state_->held.end()) {
      held = it->second;
      state_->held.erase(it);
    }
  }
  std::shared_ptr<Handle> out;
  switch (f) {
    case Fault::kDelay:
      std::this_thread::sleep_for(std::chrono::duration<double>(state_->seconds));
      out = inner_->send(tensor, peer, tag);
      break;
    case Fault::kDrop:
      out = std::make_shared<DoneHandle>();
      break;
    case Fault::kDuplicate:
      out = std::make_shared<AllHandle>(std::vector<std::shared_ptr<Handle>>{
          inner_->send(tensor, peer, tag), inner_->send(tensor, peer, tag)});
      break;
    case Fault::kReorder: {
      auto h = std::make_shared<Held>();
      h->transport = inner_.get();
      h->tensor = tensor;
      h->peer = peer;
      h->tag = tag;
      {
        std::lock_guard<std::mutex> lock(state_->mu);
        state_->held[peer] = h;
      }
      out = std::make_shared<HeldHandle>(h);
      break;
    }
    case Fault::kCorrupt: {
      at::Tensor copy = tensor.clone().contiguous();
      if (copy.nbytes() > 0) {
        at::Tensor bytes = copy.view({-1}).view(at::kByte);
        const int64_t mid = bytes.numel() / 2;
        bytes.narrow(0, mid, 1).bitwise_xor_(1 << 3);
      }
      out = std::make_shared<AllHandle>(
          std::vector<std::shared_ptr<Handle>>{inner_->send(copy, peer, tag)}, copy);
      break;
    }
    case Fault::kKill:
      _exit(1);
    case Fault::kFreeze:
      freeze();
      out = inner_->send(tensor, peer, tag);  // if it is ever continued (SIGCONT)
      break;
    case Fault::kNone:
      out = inner_->send(tensor, peer, tag);
      break;
  }
  if (held) held->post();  // the send held back goes after this one
  return out;
}

std::shared_ptr<Handle> FaultyTransport::recv(const at::Tensor& tensor, int peer, int64_t tag) {
  const Fault f = state_->next(false, peer);
  if (f == Fault::kKill) _exit(1);
  if (f == Fault::kFreeze) freeze();
  if (f == Fault::kDelay) std::this_thread::sleep_for(std::chrono::duration<double>(state_->seconds));
  return inner_->recv(tensor, peer, tag);
}

}  // namespace ppfast::testing
