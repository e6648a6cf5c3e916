// A transport for tests that wraps any other and does one chosen thing wrong, to check that
// every fault a network or a peer can produce ends in an error naming rank, action and peer.
//
//   FaultyTransport t(inner);
//   t.arm("corrupt", "send", 2, -1, 0.0);   // the third send from now, to any peer
//
// Faults (on the chosen send unless said otherwise):
//   delay      posts it `seconds` late (on a receive: waits that long first); a long delay is
//              a stall: the rank stops for that time
//   drop       never posts it, and says it completed: the receiver never gets it
//   duplicate  posts it twice
//   reorder    holds it back and posts it after the next send to the same peer (or when its
//              sender waits for it)
//   corrupt    sends a copy with one bit flipped in its middle byte
//   kill       ends the process at once (_exit(1)) instead of posting it (send or receive)
//   freeze     stops the process (SIGSTOP) before posting it (send or receive): alive, its
//              locks and connections held, silent
// `nth` counts sends (or receives) from the arm() call on, over this transport and its
// negotiation channel together (so a fault can hit the first, shape-agreeing step); `peer`
// limits it to one peer (-1: any). One fault is armed at a time; it fires once.
#pragma once

#include <memory>
#include <mutex>
#include <string>

#include "runtime/transport.h"

namespace ppfast::testing {

struct FaultState;

class FaultyTransport : public Transport {
 public:
  explicit FaultyTransport(std::shared_ptr<Transport> inner);
  void arm(const std::string& fault, const std::string& op, int nth, int peer, double seconds);
  bool fired() const;
  int64_t sends() const;  // sends and receives posted so far, over both channels
  int64_t recvs() const;

  int rank() const override { return inner_->rank(); }
  int size() const override { return inner_->size(); }
  std::string name() const override { return inner_->name(); }  // matching as the inner one's
  std::shared_ptr<Handle> send(const at::Tensor& tensor, int peer, int64_t tag) override;
  std::shared_ptr<Handle> recv(const at::Tensor& tensor, int peer, int64_t tag) override;
  void begin_group() override { inner_->begin_group(); }
  void end_group() override { inner_->end_group(); }
  void abort(const std::string& why) override { inner_->abort(why); }
  Transport& negotiation() override { return side_ ? *side_ : *this; }

 private:
  FaultyTransport(std::shared_ptr<Transport> inner, std::shared_ptr<FaultState> state);
  std::shared_ptr<Transport> inner_;
  std::shared_ptr<FaultState> state_;          // shared with the negotiation channel's wrapper
  std::shared_ptr<FaultyTransport> side_;      // wraps inner's negotiation channel, if its own
};

}  // namespace ppfast::testing
