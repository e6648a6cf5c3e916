// Tests of the stage executor over the in-process transport, ranks as threads, with a C++
// stage compute (one Linear layer per stage, torch autograd): gradients equal a one-process
// run, and a missing or failed peer gives an error naming rank, action and peer, not a hang.
#include <torch/torch.h>

#include <atomic>
#include <chrono>
#include <map>
#include <thread>

#include "harness.h"
#include "runtime/executor.h"
#include "runtime/transport.h"

namespace {

using ppfast::CommError;
using ppfast::Compute;
using ppfast::Executor;
using ppfast::ExecutorOptions;
using ppfast::Hub;
using ppfast::InProcessTransport;

// One Linear stage: y = x W^T. The last stage's loss is sum(y^2) / 2.
class LinearStage : public Compute {
 public:
  LinearStage(int stage, int num_stages, torch::Tensor w, torch::Tensor x0)
      : stage_(stage), last_(stage == num_stages - 1), w_(w.clone().requires_grad_()), x0_(x0) {}

  std::pair<std::vector<at::Tensor>, bool> forward(int stage, int mb,
                                                   const std::vector<at::Tensor>* in) override {
    torch::Tensor x = in ? (*in)[0].detach().requires_grad_() : x0_[mb];
    torch::Tensor y = torch::matmul(x, w_.t());
    inputs_[mb] = x;
    if (last_) {
      outputs_[mb] = y.square().sum() / 2;
      return {{}, false};
    }
    outputs_[mb] = y;
    return {{y.detach()}, true};
  }
  std::vector<at::Tensor> backward(int stage, int mb, const std::vector<at::Tensor>* grads,
                                   bool full) override {
    if (last_) {
      torch::autograd::backward({outputs_[mb]});
    } else {
      torch::autograd::backward({outputs_[mb]}, {(*grads)[0]});
    }
    torch::Tensor x = inputs_[mb];
    inputs_.erase(mb);
    outputs_.erase(mb);
    if (stage_ == 0) return {};
    return {x.grad()};
  }
  void weight(int stage, int mb) override { ++weights; }

  torch::Tensor grad() const { return w_.grad(); }
  int weights = 0;

 private:
  int stage_;
  bool last_;
  torch::Tensor w_, x0_;
  std::map<int, torch::Tensor> inputs_, outputs_;
};

std::vector<int32_t> encode(const std::vector<std::tuple<int, int, int>>& actions) {
  std::vector<int32_t> out;
  for (size_t a = 0; a < actions.size(); ++a) {
    auto [kind, stage, mb] = actions[a];
    out.insert(out.end(), {kind, stage, mb, static_cast<int32_t>(a)});
  }
  return out;
}

// 1F1B, p = 2, m = 2, lowered (kind codes as in engine.h: F0 I1 W2 B3 SEND_F4 RECV_F5 SEND_B6
// RECV_B7).
const std::vector<std::tuple<int, int, int>> kRank0 = {
    {0, 0, 0}, {4, 0, 0}, {0, 0, 1}, {4, 0, 1}, {7, 0, 0}, {3, 0, 0}, {7, 0, 1}, {3, 0, 1}};
const std::vector<std::tuple<int, int, int>> kRank1 = {
    {5, 1, 0}, {0, 1, 0}, {3, 1, 0}, {6, 1, 0}, {5, 1, 1}, {0, 1, 1}, {3, 1, 1}, {6, 1, 1}};

std::vector<std::string> names(size_t n) {
  std::vector<std::string> out;
  for (size_t i = 0; i < n; ++i) out.push_back("a" + std::to_string(i));
  return out;
}

TEST(executor_two_ranks_match_one_process) {
  torch::manual_seed(0);
  auto w0 = torch::randn({4, 4}), w1 = torch::randn({4, 4}), x = torch::randn({2, 3, 4});
  auto hub = std::make_shared<Hub>(2);
  auto s0 = std::make_shared<LinearStage>(0, 2, w0, x);
  auto s1 = std::make_shared<LinearStage>(1, 2, w1, x);
  ExecutorOptions opt;
  opt.timeout_ms = 10000;
  Executor e0(0, {0, 1}, 2, encode(kRank0), names(kRank0.size()),
              std::make_shared<InProcessTransport>(hub, 0), s0, opt);
  Executor e1(1, {0, 1}, 2, encode(kRank1), names(kRank1.size()),
              std::make_shared<InProcessTransport>(hub, 1), s1, opt);
  for (int step = 0; step < 2; ++step) {  // the second step runs on agreed shapes and pooled buffers
    std::exception_ptr err;
    std::thread t([&] {
      try {
        e1.step();
      } catch (...) {
        err = std::current_exception();
      }
    });
    e0.step();
    t.join();
    if (err) std::rethrow_exception(err);
  }
  // reference: both microbatches through both layers, twice
  auto r0 = w0.clone().requires_grad_(), r1 = w1.clone().requires_grad_();
  for (int step = 0; step < 2; ++step) {
    for (int mb = 0; mb < 2; ++mb) {
      auto y = torch::matmul(torch::matmul(x[mb], r0.t()), r1.t());
      (y.square().sum() / 2).backward();
    }
  }
  REQUIRE(torch::allclose(s0->grad(), r0.grad()), "stage 0 weight gradient");
  REQUIRE(torch::allclose(s1->grad(), r1.grad()), "stage 1 weight gradient");
}

TEST(executor_times_out_naming_rank_action_and_peer) {
  auto x = torch::randn({2, 3, 4});
  auto hub = std::make_shared<Hub>(2);
  ExecutorOptions opt;
  opt.timeout_ms = 200;
  Executor e0(0, {0, 1}, 2, encode(kRank0), names(kRank0.size()),
              std::make_shared<InProcessTransport>(hub, 0),
              std::make_shared<LinearStage>(0, 2, torch::randn({4, 4}), x), opt);
  const auto t0 = std::chrono::steady_clock::now();
  bool raised = false;
  try {
    e0.step();  // rank 1 never runs: the first wait (the gradient of microbatch 0) expires
  } catch (const CommError& e) {
    raised = true;
    REQUIRE(e.timed_out, e.what());
    REQUIRE_EQ(e.rank, 0, e.what());
    REQUIRE_EQ(e.peer, 1, e.what());
    REQUIRE(std::string(e.what()).find("a5 (#5)") != std::string::npos, e.what());
  }
  const double waited = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  REQUIRE(raised, "no error");
  REQUIRE(waited < 2.0, "waited " << waited << " s");
}

TEST(executor_fails_fast_when_a_peer_aborts) {
  auto x = torch::randn({2, 3, 4});
  auto hub = std::make_shared<Hub>(2);
  ExecutorOptions opt;
  opt.timeout_ms = 60000;
  Executor e0(0, {0, 1}, 2, encode(kRank0), names(kRank0.size()),
              std::make_shared<InProcessTransport>(hub, 0),
              std::make_shared<LinearStage>(0, 2, torch::randn({4, 4}), x), opt);
  std::thread killer([&] {
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
    hub->abort(1, "killed");
  });
  const auto t0 = std::chrono::steady_clock::now();
  bool raised = false;
  try {
    e0.step();
  } catch (const CommError& e) {
    raised = true;
    REQUIRE(!e.timed_out, e.what());
    REQUIRE(std::string(e.what()).find("rank 1 failed: killed") != std::string::npos, e.what());
  }
  killer.join();
  const double waited = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  REQUIRE(raised, "no error");
  REQUIRE(waited < 5.0, "waited " << waited << " s for a 60 s timeout");
}

}  // namespace
