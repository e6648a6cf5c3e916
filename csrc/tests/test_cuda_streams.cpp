// The CUDA helpers of csrc/cuda: on a CPU build, that they raise and say why; on a CUDA build
// with a device, that the communication streams are dedicated and the timer's events line up.
#include <cmath>
#include <cstdio>
#include <stdexcept>
#include <string>

#include "cuda/streams.h"
#include "harness.h"

#ifdef PPFAST_WITH_CUDA
#include <ATen/ATen.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

namespace {

// The message of the exception `fn` throws, or "" when it returns.
template <typename Fn>
std::string thrown(Fn fn) {
  try {
    fn();
  } catch (const std::runtime_error& e) {
    return e.what();
  }
  return "";
}

}  // namespace

#ifndef PPFAST_WITH_CUDA

TEST(cuda_helpers_say_the_build_has_no_cuda) {
  REQUIRE(!ppfast::cuda::kBuiltWithCuda, "this build has no PPFAST_WITH_CUDA");
  const std::string streams = thrown([] { ppfast::cuda::comm_streams(0); });
  REQUIRE(streams.find("built without CUDA") != std::string::npos,
          "comm_streams must raise and say why, got: '" << streams << "'");
  const std::string timer = thrown([] { ppfast::cuda::ActionTimer t(1); });
  REQUIRE(timer.find("built without CUDA") != std::string::npos,
          "ActionTimer must raise and say why, got: '" << timer << "'");
}

#else

namespace {
bool have_device() {
  if (c10::cuda::device_count() > 0) return true;
  std::printf("      (no CUDA device: nothing to check)\n");
  return false;
}
}  // namespace

TEST(cuda_comm_streams_are_dedicated) {
  if (!have_device()) return;
  const ppfast::cuda::CommStreams s = ppfast::cuda::comm_streams(0);
  const c10::Stream current = c10::cuda::getCurrentCUDAStream(0).unwrap();
  REQUIRE(s.send.device_type() == c10::DeviceType::CUDA, "send stream " << s.send);
  REQUIRE(s.send != s.recv, "sends and receives need a stream each: " << s.send);
  REQUIRE(s.send != current && s.recv != current, "communication must not use compute's stream");
}

TEST(cuda_action_timer_orders_events) {
  if (!have_device()) return;
  const c10::cuda::CUDAStream compute = c10::cuda::getStreamFromPool(false, 0);
  ppfast::cuda::ActionTimer timer(2);
  timer.begin(compute.unwrap());
  timer.start(0, compute.unwrap());
  {
    c10::cuda::CUDAStreamGuard guard(compute);
    at::Tensor a = at::randn({512, 512}, at::TensorOptions().device(at::kCUDA, 0));
    for (int i = 0; i < 20; ++i) a = at::tanh(a.matmul(a));
  }
  timer.end(0, compute.unwrap());
  const ppfast::cuda::ActionTimes t = timer.read();
  REQUIRE(t.start[0] >= 0.0, "start after begin: " << t.start[0]);
  REQUIRE(t.end[0] > t.start[0], "the work takes time: " << t.start[0] << " .. " << t.end[0]);
  REQUIRE(std::isnan(t.start[1]) && std::isnan(t.end[1]), "action 1 was never recorded");
}

#endif  // PPFAST_WITH_CUDA
