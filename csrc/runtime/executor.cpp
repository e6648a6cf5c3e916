// The stage executor; see executor.h for what each action does.
#include "runtime/executor.h"

#include <ATen/record_function.h>
#include <c10/core/StreamGuard.h>

#include <cmath>
#include <functional>
#include <limits>
#include <optional>

#include "program/engine.h"
#include "wire/checksum.h"
#include "wire/meta.h"

namespace ppfast {
namespace {

using wire::kMaxTensors;
using wire::kMetaLen;
constexpr int kFwd = 0, kBwd = 1;

// Frees a tensor's memory but keeps its shape: autograd may still need the tensor as the root
// of its stage's graph, not its values.
void release_storage(const at::Tensor& t) {
  if (!t.defined() || !t.has_storage()) return;
  c10::StorageImpl* impl = t.storage().unsafeGetStorageImpl();
  if (!impl->resizable() || impl->allocator() == nullptr) return;
  impl->set_data_ptr_noswap(impl->allocator()->allocate(0));
  impl->set_nbytes(0);
}

}  // namespace

Executor::Executor(int rank, std::vector<int32_t> stage_to_rank, int32_t num_mb,
                   std::vector<int32_t> parts, std::vector<std::string> names,
                   std::shared_ptr<Transport> transport, std::shared_ptr<Compute> compute,
                   ExecutorOptions options)
    : rank_(rank),
      stage_to_rank_(std::move(stage_to_rank)),
      num_stages_(static_cast<int32_t>(stage_to_rank_.size())),
      num_mb_(num_mb),
      names_(std::move(names)),
      transport_(std::move(transport)),
      compute_(std::move(compute)),
      options_(options) {
  check_program(parts);
  for (const Part& p : parts_) {
    if (p.kind == kB || p.kind == kW) last_backward_[key(0, p.stage, p.mb)] = p.action;
    if (p.kind == kI && !last_backward_.count(key(0, p.stage, p.mb)))
      last_backward_[key(0, p.stage, p.mb)] = p.action;
  }
  // torch.profiler ranges, one per action: "ppfast:1F3". The prefix is not decoration: the
  // profiler demangles names, and "2F0" reads as a mangled length-2 name (it shows "F0").
  for (const auto& n : names_) ranges_.push_back("ppfast:" + n);
  device_ = compute_->device();
  if (device_has_streams(device_)) streams_ = std::make_unique<DeviceStreams>(device_);
}

void Executor::check_program(const std::vector<int32_t>& flat) {
  const auto n = [](int64_t v) { return std::to_string(v); };
  const auto bad = [&](const std::string& why) {
    throw std::invalid_argument("rank " + n(rank_) + ": cannot run this program: " + why);
  };
  if (!transport_) bad("no transport");
  if (!compute_) bad("no compute");
  const int size = transport_->size();
  if (rank_ < 0 || rank_ >= size) bad("the rank is not one of the transport's " + n(size));
  if (flat.size() % 4 != 0) bad("parts must be [kind, stage, mb, action] quadruples");
  // The engine's checks of ranges and action indices, on this rank's row alone.
  ProgramView view;
  view.num_stages = num_stages_;
  view.num_mb = num_mb_;
  view.stage_to_rank = stage_to_rank_;
  view.ranks.resize(size);
  for (size_t i = 0; i < flat.size(); i += 4) {
    const int32_t kind = flat[i] >= 0 && flat[i] <= kRecvB ? flat[i] : -1;
    view.ranks[rank_].push_back(
        ppfast::Part{flat[i + 1], flat[i + 2], static_cast<int8_t>(kind), flat[i + 3]});
    parts_.push_back(Part{kind, flat[i + 1], flat[i + 2], flat[i + 3]});
  }
  if (Fault f = check_view(view); !f.ok) bad(describe(f));
  num_actions_ = parts_.empty() ? 0 : parts_.back().action + 1;
  if (static_cast<int>(names_.size()) != num_actions_) {
    bad(n(names_.size()) + " names for " + n(num_actions_) + " actions: give one text per action");
  }
  const double max_tag = 2.0 * num_stages_ * num_mb_ * 2 * kMaxTensors;
  if (max_tag >= static_cast<double>(std::numeric_limits<int32_t>::max())) {
    bad("too many stages x microbatches to tag every message");
  }
  std::unordered_map<int64_t, int> seen;  // (kind, stage, mb) -> part
  for (size_t i = 0; i < parts_.size(); ++i) {
    const Part& p = parts_[i];
    const std::string here = names_[p.action] + " (#" + n(p.action) + "): ";
    if (stage_to_rank_[p.stage] != rank_) {
      bad(here + "stage " + n(p.stage) + " is placed on rank " + n(stage_to_rank_[p.stage]));
    }
    auto [it, fresh] = seen.emplace((int64_t(p.kind) << 40) | key(0, p.stage, p.mb), int(i));
    if (!fresh) bad(here + "appears twice on this rank");
    if (!is_comm(p.kind)) continue;
    // the stage on the other end of the message
    const int other = p.kind == kSendF || p.kind == kRecvB ? p.stage + 1 : p.stage - 1;
    if (other < 0 || other >= num_stages_) bad(here + "stage " + n(other) + " does not exist");
    if (stage_to_rank_[other] == rank_) {
      bad(here + "stages " + n(p.stage) + " and " + n(other) +
          " are both on this rank, which hands their tensors over in memory; remove it");
    }
  }
}

int64_t Executor::tag(int dir, int producer_stage, int mb, int index, bool meta) const {
  return ((((int64_t(dir) * num_stages_ + producer_stage) * num_mb_ + mb) * 2 + (meta ? 1 : 0)) *
          kMaxTensors) +
         index;
}

double Executor::now() const {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0_).count();
}

void Executor::fail(const std::string& why, int action, int peer, bool timed_out) {
  const std::string label =
      action >= 0 ? names_[action] + " (#" + std::to_string(action) + ")" : std::string("step");
  std::string msg = "rank " + std::to_string(rank_) + ", action " + label + ": " + why;
  if (peer >= 0) msg += " (peer: rank " + std::to_string(peer) + ")";
  transport_->abort(msg);
  throw CommError(msg, rank_, label, peer, timed_out);
}

std::shared_ptr<Handle> Executor::post_op(bool send, const at::Tensor& t, int peer, int64_t tag,
                                          int action) {
  std::shared_ptr<Handle> h;
  guard_transport([&] { h = send ? comm().send(t, peer, tag) : comm().recv(t, peer, tag); },
                  action, peer, send ? "posting a send" : "posting a receive");
  return h;
}

void Executor::guard_transport(const std::function<void()>& call, int action, int peer,
                               const char* what) {
  try {
    call();
  } catch (const CommError&) {
    throw;
  } catch (const std::exception& e) {
    // a transport whose peer is gone may refuse new operations outright (gloo: "Connection
    // closed by peer"); that is the peer's failure, told like any other
    fail(std::string(what) + " failed: " + e.what(), action, peer, false);
  }
}

void Executor::wait_handle(Handle& h, int action, int peer, const std::string& what,
                           const c10::Stream* stream) {
  try {
    if (stream != nullptr) {
      h.wait_stream(*stream, timeout());
    } else {
      h.wait(timeout());
    }
  } catch (const TransportError& e) {
    if (e.timed_out) {
      fail("timed out after " + std::to_string(options_.timeout_ms / 1000.0).substr(0, 6) +
               " s waiting for " + what,
           action, peer, true);
    }
    fail(what + " failed: " + e.what(), action, peer, false);
  }
}

static int64_t torch_itemsize(int64_t code) {
  if (code < 0 || code >= static_cast<int64_t>(c10::ScalarType::Undefined)) {
    return 0;
  }
  const auto t = static_cast<c10::ScalarType>(code);
  if (!c10::isFloatingType(t) && !c10::isComplexType(t) && !c10::isIntegralType(t, true)) return 0;
  return static_cast<int64_t>(c10::elementSize(t));
}

at::Tensor encode_meta(const std::vector<at::Tensor>& tensors, int64_t flags) {
  std::vector<wire::TensorMeta> metas;
  for (const auto& t : tensors) {
    metas.push_back({static_cast<int64_t>(t.scalar_type()), t.sizes().vec()});
  }
  at::Tensor m = at::empty({kMetaLen}, at::TensorOptions().dtype(at::kLong));
  if (std::string why = wire::encode(metas, flags, m.data_ptr<int64_t>()); !why.empty()) {
    throw std::invalid_argument(why);
  }
  return m;
}

Meta decode_meta(const at::Tensor& t) {
  if (t.scalar_type() != at::kLong || !t.is_contiguous()) {
    throw std::invalid_argument("a shape header is a contiguous int64 tensor");
  }
  at::Tensor c = t.to(at::kCPU);
  std::vector<wire::TensorMeta> metas;
  int64_t flags = 0;
  if (std::string why =
          wire::decode(c.data_ptr<int64_t>(), c.numel(), torch_itemsize, &metas, &flags);
      !why.empty()) {
    throw std::invalid_argument(why);
  }
  Meta meta;
  meta.flags = flags;
  for (auto& m : metas) meta.tensors.emplace_back(static_cast<c10::ScalarType>(m.dtype), std::move(m.shape));
  return meta;
}

std::vector<at::Tensor> Executor::allocate(const Meta& meta, int dir, int stage) {
  auto& free = pool_[{dir, stage}];
  if (!options_.dynamic_shapes && !free.empty()) {
    Pooled out = std::move(free.back());
    free.pop_back();
    // the receive into it must not start before the compute that last read it is done
    if (streams_ && out.free) out.free->block(streams_->recv);
    return std::move(out.tensors);
  }
  // New buffers belong to the compute stream, which reads them (see device_streams.h). Their
  // memory may have served compute work still queued there: the receive into them waits.
  std::vector<at::Tensor> out;
  for (const auto& [dtype, shape] : meta.tensors) {
    out.push_back(at::empty(shape, at::TensorOptions().dtype(dtype).device(device_)));
  }
  if (streams_) events_.mark(streams_->compute)->block(streams_->recv);
  return out;
}

void Executor::post_recv(const Part& p) {
  const int dir = p.kind == kRecvF ? kFwd : kBwd;
  const int producer = dir == kFwd ? p.stage - 1 : p.stage + 1;
  const int peer = stage_to_rank_[producer];
  Inbox& box = inbox_[key(dir, p.stage, p.mb)];
  box.peer = peer;
  box.action = p.action;
  box.comm_index = comm_.size();
  comm_.emplace_back(p.action, now(), std::nan(""));
  if (negotiate_) {
    box.meta = at::empty({kMetaLen}, at::TensorOptions().dtype(at::kLong).device(device_));
    std::optional<c10::StreamGuard> on_recv;
    if (streams_) {
      events_.mark(streams_->compute)->block(streams_->recv);  // a fresh buffer, as in allocate()
      on_recv.emplace(streams_->recv);
    }
    box.meta_handle = post_op(false, box.meta, peer, tag(dir, producer, p.mb, 0, true), p.action);
    return;
  }
  box.buffers = allocate(recv_meta_.at({dir, p.stage}), dir, p.stage);
  std::optional<c10::StreamGuard> on_recv;
  if (streams_) on_recv.emplace(streams_->recv);
  for (size_t i = 0; i < box.buffers.size(); ++i) {
    box.handles.push_back(
        post_op(false, box.buffers[i], peer, tag(dir, producer, p.mb, static_cast<int>(i), false),
                p.action));
  }
  if (options_.checksum) post_trailer_recv(box, dir, producer, p.mb);
}

void Executor::post_send(const Part& p) {
  const int dir = p.kind == kSendF ? kFwd : kBwd;
  const int consumer = dir == kFwd ? p.stage + 1 : p.stage - 1;
  const int peer = stage_to_rank_[consumer];
  auto it = produced_.find(key(dir, p.stage, p.mb));
  if (it == produced_.end()) {
    fail("nothing to send: the compute that produces it has not run on this rank", p.action,
         peer, false);
  }
  Outbox box;
  box.action = p.action;
  box.peer = peer;
  box.tensors = std::move(it->second);
  produced_.erase(it);
  for (auto& t : box.tensors) {
    if (!t.is_contiguous()) t = t.contiguous();
  }
  if (dir == kFwd) {
    auto r = release_after_send_.find(key(dir, p.stage, p.mb));
    box.release_storage = r != release_after_send_.end() && r->second;
  }
  box.comm_index = comm_.size();
  comm_.emplace_back(p.action, now(), std::nan(""));
  Meta mine;
  for (const auto& t : box.tensors) mine.tensors.emplace_back(t.scalar_type(), t.sizes().vec());
  auto agreed = send_meta_.find({dir, p.stage});
  if (agreed != send_meta_.end() && !(agreed->second == mine) && !options_.dynamic_shapes) {
    auto describe = [](const Meta& m) {
      std::string s = "[";
      for (const auto& [dt, shape] : m.tensors) s += std::string(c10::toString(dt)) + c10::str(shape) + " ";
      return s + "]";
    };
    fail("stage " + std::to_string(p.stage) + " now produces " + describe(mine) +
             " where earlier microbatches or steps produced " + describe(agreed->second) +
             "; pass dynamic_shapes=True to the stage for shapes that change",
         p.action, peer, false);
  }
  if (!options_.dynamic_shapes) send_meta_[{dir, p.stage}] = mine;
  std::optional<c10::StreamGuard> on_send;
  if (streams_) {
    // the send starts once the compute that produced the tensors has, not after later compute
    events_.mark(streams_->compute)->block(streams_->send);
    on_send.emplace(streams_->send);
  }
  at::Tensor trailer;
  if (options_.checksum) trailer = trailer_of(box.tensors, box.tensors.size(), tag(dir, p.stage, p.mb, 0, false));
  if (negotiate_) {
    at::Tensor meta = encode_meta(box.tensors, options_.checksum ? wire::kFlagChecksum : 0).to(device_);
    box.handles.push_back(post_op(true, meta, peer, tag(dir, p.stage, p.mb, 0, true), p.action));
    box.tensors.push_back(meta);  // kept alive until the send completes
  }
  const size_t n = negotiate_ ? box.tensors.size() - 1 : box.tensors.size();
  for (size_t i = 0; i < n; ++i) {
    box.handles.push_back(
        post_op(true, box.tensors[i], peer, tag(dir, p.stage, p.mb, static_cast<int>(i), false),
                p.action));
  }
  if (trailer.defined()) {
    box.handles.push_back(post_op(true, trailer, peer, tag(dir, p.stage, p.mb, 1, true), p.action));
    box.tensors.push_back(trailer);  // kept alive until the send completes
  }
  outbox_.push_back(std::move(box));
}

std::vector<at::Tensor> Executor::take_input(const Part& p, int dir) {
  const int producer = dir == kFwd ? p.stage - 1 : p.stage + 1;
  if (stage_to_rank_[producer] == rank_) {
    auto it = produced_.find(key(dir, producer, p.mb));
    if (it == produced_.end()) {
      fail(std::string("needs the ") + (dir == kFwd ? "output of stage " : "gradient from stage ") +
               std::to_string(producer) + ", which this rank has not computed yet",
           p.action, -1, false);
    }
    auto out = std::move(it->second);
    produced_.erase(it);
    return out;
  }
  auto it = inbox_.find(key(dir, p.stage, p.mb));
  if (it == inbox_.end()) {
    fail(std::string("needs ") + std::to_string(p.stage) + (dir == kFwd ? "RECV_F" : "RECV_B") +
             std::to_string(p.mb) + " posted before it",
         p.action, stage_to_rank_[producer], false);
  }
  Inbox& box = it->second;
  const std::string what = std::string(dir == kFwd ? "the activation of stage " : "the gradient from stage ") +
                           std::to_string(producer) + " for microbatch " + std::to_string(p.mb);
  if (box.meta_handle) {
    wait_handle(*box.meta_handle, p.action, box.peer, what + " (its shape)");
    box.meta_handle.reset();
    Meta meta;
    {
      // reading the shapes back to the host waits for the receive stream, not for compute
      std::optional<c10::StreamGuard> on_recv;
      if (streams_) on_recv.emplace(streams_->recv);
      try {
        meta = decode_meta(box.meta);
      } catch (const std::invalid_argument& e) {
        fail("the shape header of " + what + " is malformed: " + e.what() +
                 " (corrupted in transit, or the pair's messages matched in different orders)",
             p.action, box.peer, false);
      }
    }
    const bool sender_checksums = (meta.flags & wire::kFlagChecksum) != 0;
    if (sender_checksums != options_.checksum) {
      fail(std::string("rank ") + std::to_string(box.peer) + " sends " +
               (sender_checksums ? "with" : "without") + " payload checksums and this rank expects " +
               (options_.checksum ? "them" : "none") + ": set PPFAST_CHECKSUM alike on every rank",
           p.action, box.peer, false);
    }
    if (!options_.dynamic_shapes) recv_meta_[{dir, p.stage}] = meta;
    try {
      box.buffers = allocate(meta, dir, p.stage);
    } catch (const c10::Error& e) {
      fail("cannot allocate the buffers the shape header of " + what + " announces: " +
               e.what_without_backtrace(),
           p.action, box.peer, false);
    }
    const int producer_stage = producer;
    std::optional<c10::StreamGuard> on_recv;
    if (streams_) on_recv.emplace(streams_->recv);
    for (size_t i = 0; i < box.buffers.size(); ++i) {
      box.handles.push_back(post_op(false, box.buffers[i], box.peer,
                                    tag(dir, producer_stage, p.mb, static_cast<int>(i), false),
                                    p.action));
    }
    if (options_.checksum) post_trailer_recv(box, dir, producer_stage, p.mb);
  }
  for (auto& h : box.handles) {
    wait_handle(*h, p.action, box.peer, what, streams_ ? &streams_->compute : nullptr);
  }
  if (options_.checksum) check_trailer(box, dir, producer, p.mb, p.action, what);
  std::get<2>(comm_[box.comm_index]) = now();
  std::vector<at::Tensor> out = std::move(box.buffers);
  held_[key(dir, p.stage, p.mb)] = out;
  inbox_.erase(it);
  return out;
}

at::Tensor Executor::trailer_of(const std::vector<at::Tensor>& payload, size_t n,
                                int64_t message_tag) const {
  uint64_t h = 0;
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor c = payload[i].is_cpu() ? payload[i].contiguous() : payload[i].cpu();
    h = wire::hash_bytes(c.data_ptr(), c.nbytes(), h);
  }
  at::Tensor t = at::empty({wire::kTrailerLen}, at::TensorOptions().dtype(at::kLong));
  int64_t* d = t.data_ptr<int64_t>();
  d[0] = wire::kTrailerMark;
  d[1] = message_tag;
  d[2] = steps_ - 1;  // the step being run
  d[3] = static_cast<int64_t>(h);
  return t.to(device_);
}

void Executor::post_trailer_recv(Inbox& box, int dir, int producer, int mb) {
  box.trailer = at::empty({wire::kTrailerLen}, at::TensorOptions().dtype(at::kLong).device(device_));
  box.trailer_handle =
      post_op(false, box.trailer, box.peer, tag(dir, producer, mb, 1, true), box.action);
}

void Executor::check_trailer(Inbox& box, int dir, int producer, int mb, int action,
                             const std::string& what) {
  wait_handle(*box.trailer_handle, action, box.peer, what + " (its checksum)");
  const at::Tensor t = box.trailer.cpu();
  const int64_t* d = t.data_ptr<int64_t>();
  const int64_t want_tag = tag(dir, producer, mb, 0, false);
  const std::string where = " (corrupted, duplicated or reordered in transit)";
  if (d[0] != wire::kTrailerMark) {
    fail("the checksum trailer of " + what + " is not one" + where, action, box.peer, false);
  }
  if (d[1] != want_tag || d[2] != steps_ - 1) {
    fail("the checksum trailer of " + what + " belongs to another message (tag " +
             std::to_string(d[1]) + " of step " + std::to_string(d[2]) + ", not tag " +
             std::to_string(want_tag) + " of step " + std::to_string(steps_ - 1) + ")" + where,
         action, box.peer, false);
  }
  const at::Tensor mine = trailer_of(box.buffers, box.buffers.size(), want_tag).cpu();
  if (mine.data_ptr<int64_t>()[3] != d[3]) {
    fail("the payload of " + what + " does not match its checksum" + where, action, box.peer,
         false);
  }
}

void Executor::release_inputs(int stage, int mb) {
  for (int dir : {kFwd, kBwd}) {
    auto it = held_.find(key(dir, stage, mb));
    if (it == held_.end()) continue;
    if (!options_.dynamic_shapes) {
      pool_[{dir, stage}].push_back(
          Pooled{std::move(it->second), streams_ ? events_.mark(streams_->compute) : nullptr});
    }
    held_.erase(it);
  }
}

void Executor::run_compute(size_t begin, size_t end) {
  const int action = parts_[begin].action;
  RECORD_USER_SCOPE(ranges_[action]);
  bool started = false;
  auto mark_start = [&] {
    if (!started) mark_time(true, action), started = true;
  };
  for (size_t i = begin; i < end; ++i) {
    const Part& p = parts_[i];
    if (p.kind == kF) {
      std::vector<at::Tensor> inputs;
      if (p.stage > 0) inputs = take_input(p, kFwd);
      mark_start();
      auto [outputs, release] = compute_->forward(p.stage, p.mb, p.stage > 0 ? &inputs : nullptr);
      if (p.stage + 1 < num_stages_) {
        produced_[key(kFwd, p.stage, p.mb)] = std::move(outputs);
        release_after_send_[key(kFwd, p.stage, p.mb)] = release;
      }
      // forward only (evaluation): nothing reads the received activation after its F
      if (!last_backward_.count(key(0, p.stage, p.mb))) release_inputs(p.stage, p.mb);
    } else if (p.kind == kI || p.kind == kB) {
      std::vector<at::Tensor> grads;
      const bool has_grads = p.stage + 1 < num_stages_;
      if (has_grads) grads = take_input(p, kBwd);
      mark_start();
      auto input_grads = compute_->backward(p.stage, p.mb, has_grads ? &grads : nullptr, p.kind == kB);
      if (p.stage > 0) produced_[key(kBwd, p.stage, p.mb)] = std::move(input_grads);
      grads.clear();
      if (last_backward_[key(0, p.stage, p.mb)] == action) release_inputs(p.stage, p.mb);
    } else if (p.kind == kW) {
      mark_start();
      compute_->weight(p.stage, p.mb);
      if (last_backward_[key(0, p.stage, p.mb)] == action) release_inputs(p.stage, p.mb);
    }
  }
  mark_time(false, action);
}

void Executor::mark_time(bool start, int action) {
  (start ? start_ : end_)[action] = now();
  if (streams_) {
    StepEvents& ev = *timing_[(steps_ - 1) % 2];
    (start ? ev.start : ev.end)[action].record(streams_->compute);
    (start ? ev.started : ev.ended)[action] = 1;
  }
}

void Executor::finish_outbox(Outbox& box, bool block) {
  for (auto& h : box.handles) {
    if (block) {
      wait_handle(*h, box.action, box.peer, "the send to complete");
    } else {
      // done() was true for all; wait returns at once and surfaces a failed send
      wait_handle(*h, box.action, box.peer, "the send to complete");
    }
  }
  std::get<2>(comm_[box.comm_index]) = now();
  if (box.release_storage) {
    for (size_t i = 0; i < box.tensors.size(); ++i) release_storage(box.tensors[i]);
  }
  box.tensors.clear();
  box.handles.clear();
}

void Executor::poll_sends() {
  size_t keep = 0;
  for (size_t i = 0; i < outbox_.size(); ++i) {
    bool all = true;
    for (auto& h : outbox_[i].handles) {
      if (!h->done()) {
        all = false;
        break;
      }
    }
    if (all) {
      finish_outbox(outbox_[i], false);
    } else {
      if (keep != i) outbox_[keep] = std::move(outbox_[i]);
      ++keep;
    }
  }
  outbox_.resize(keep);
}

StepTimes Executor::step() {
  if (broken_) {
    throw std::runtime_error("rank " + std::to_string(rank_) +
                             ": this executor failed in an earlier step; build a new one");
  }
  inbox_.clear();
  produced_.clear();
  held_.clear();
  release_after_send_.clear();
  outbox_.clear();
  comm_.clear();
  start_.assign(num_actions_, std::nan(""));
  end_.assign(num_actions_, std::nan(""));
  t0_ = std::chrono::steady_clock::now();
  const int64_t index = steps_++;
  if (streams_) {
    streams_->compute = current_stream(device_);  // the user's stream of this step
    auto& ev = timing_[index % 2];
    if (!ev) ev = std::make_unique<StepEvents>(device_.type(), num_actions_);
    ev->step = index;
    std::fill(ev->started.begin(), ev->started.end(), 0);
    std::fill(ev->ended.begin(), ev->ended.end(), 0);
    ev->origin.record(streams_->compute);
  }
  try {
    size_t i = 0;
    while (i < parts_.size()) {
      const Part& p = parts_[i];
      size_t j = i + 1;
      if (is_comm(p.kind)) {
        while (j < parts_.size() && is_comm(parts_[j].kind)) ++j;
        guard_transport([&] { comm().begin_group(); }, parts_[i].action, -1, "opening a group");
        for (size_t k = i; k < j; ++k) {
          const Part& q = parts_[k];
          RECORD_USER_SCOPE(ranges_[q.action]);
          start_[q.action] = now();
          if (q.kind == kRecvF || q.kind == kRecvB) {
            post_recv(q);
          } else {
            post_send(q);
          }
          end_[q.action] = now();
        }
        guard_transport([&] { comm().end_group(); }, parts_[j - 1].action, -1, "posting a group");
      } else {
        while (j < parts_.size() && parts_[j].action == p.action) ++j;
        run_compute(i, j);
      }
      poll_sends();
      i = j;
    }
    for (auto& box : outbox_) finish_outbox(box, true);
    outbox_.clear();
    if (!inbox_.empty()) {
      const Inbox& left = inbox_.begin()->second;
      fail("a receive was posted but no action consumed it", left.action, left.peer, false);
    }
  } catch (const CommError&) {
    broken_ = true;
    throw;
  } catch (const std::exception& e) {
    broken_ = true;
    transport_->abort("rank " + std::to_string(rank_) + " raised: " + e.what());
    throw;
  }
  negotiate_ = options_.dynamic_shapes;
  // No host synchronisation here: on a device the step may still be running, and its times are
  // read only if someone asks (device_times).
  if (streams_) timing_[index % 2]->done.record(streams_->compute);
  StepTimes out;
  out.start = start_;
  out.end = end_;
  out.comm = comm_;
  out.wall = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0_).count();
  out.epoch = std::chrono::duration<double>(t0_.time_since_epoch()).count();
  out.index = index;
  out.on_device = streams_ != nullptr;
  return out;
}

StepTimes Executor::device_times(int64_t index) {
  StepTimes out;
  out.index = index;
  out.on_device = true;
  if (!streams_) throw std::logic_error("device_times: this executor runs on the host");
  StepEvents* ev = nullptr;
  for (auto& set : timing_) {
    if (set && set->step == index) ev = set.get();
  }
  if (!ev) {
    throw std::runtime_error("rank " + std::to_string(rank_) + ": the device times of step " +
                             std::to_string(index) + " were recorded over by later steps; " +
                             "read a step's metrics before two more steps have run");
  }
  const double nan = std::nan("");
  out.start.assign(num_actions_, nan);
  out.end.assign(num_actions_, nan);
  // Compute actions as the device ran them, in seconds from the step's start there.
  ev->done.synchronize();
  for (int a = 0; a < num_actions_; ++a) {
    if (ev->started[a]) out.start[a] = ev->origin.elapsedTime(ev->start[a]) / 1000.0;
    if (ev->ended[a]) out.end[a] = ev->origin.elapsedTime(ev->end[a]) / 1000.0;
  }
  out.wall = ev->origin.elapsedTime(ev->done) / 1000.0;
  return out;
}

}  // namespace ppfast
