// Proves the C++ tests build and link against the torch that ppfast runs on: tensors and
// autograd (the executor calls back into stage compute) and the c10d ProcessGroup interface
// (the transport). The wheel ships no gloo headers, so a loopback backend stands in for one.
#include <torch/autograd.h>
#include <torch/csrc/distributed/c10d/HashStore.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroup.hpp>

#include "harness.h"

namespace {

// A backend of one rank whose send keeps the tensor and whose recv hands it back.
class Loopback : public c10d::Backend {
 public:
  Loopback() : c10d::Backend(0, 1) {}
  const std::string getBackendName() const override { return "loopback"; }

  c10::intrusive_ptr<c10d::Work> send(std::vector<at::Tensor>& tensors, int, int) override {
    sent_ = tensors.at(0).clone();
    return done();
  }
  c10::intrusive_ptr<c10d::Work> recv(std::vector<at::Tensor>& tensors, int, int) override {
    tensors.at(0).copy_(sent_);
    return done();
  }

 private:
  static c10::intrusive_ptr<c10d::Work> done() {
    // A plain Work whose wait returns at once: the loopback finished the transfer already.
    struct Done : c10d::Work {
      bool wait(std::chrono::milliseconds) override { return true; }
      bool isCompleted() override { return true; }
    };
    return c10::make_intrusive<Done>();
  }
  at::Tensor sent_;
};

}  // namespace

TEST(torch_autograd_links) {
  auto x = at::tensor({1.0, 2.0, 3.0}).requires_grad_();
  auto y = (x * x).sum();
  auto g = torch::autograd::grad({y}, {x})[0];
  REQUIRE(at::allclose(g, 2 * x.detach()), "d(sum x^2)/dx = 2x, got " << g);
}

TEST(c10d_process_group_links) {
  auto store = c10::make_intrusive<c10d::HashStore>();
  store->set("key", std::vector<uint8_t>{7});
  REQUIRE_EQ(int(store->get("key").at(0)), 7, "HashStore round trip");

  auto pg = c10::make_intrusive<c10d::ProcessGroup>(store, 0, 1);
  pg->setBackend(c10::DeviceType::CPU, c10d::ProcessGroup::BackendType::CUSTOM,
                 c10::make_intrusive<Loopback>());
  // Through the dispatcher, as torch.distributed's own send and recv go.
  std::vector<at::Tensor> out{at::arange(4, at::kFloat)};
  pg->send(out, 0, 0)->wait();
  std::vector<at::Tensor> in{at::zeros({4})};
  pg->recv(in, 0, 0)->wait();
  REQUIRE(at::equal(in[0], out[0]), "loopback recv got " << in[0]);
}
