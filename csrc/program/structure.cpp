// Structural checks and lowering of programs; see engine.h.
#include <algorithm>
#include <limits>
#include <tuple>

#include "program/engine.h"

namespace ppfast {
namespace {

std::string name(int kind, int stage, int mb) {
  return part_name(Part{stage, mb, static_cast<int8_t>(kind), 0});
}

struct Seen {
  int rank = -1;
  int action = -1;
};

}  // namespace

Fault check_structure(const ProgramView& p) {
  if (Fault f = check_view(p); !f.ok) return f;
  const int S = p.num_stages, M = p.num_mb;
  std::vector<Seen> seen(static_cast<size_t>(S) * M * 8);
  auto at = [&](int kind, int s, int mb) -> Seen& {
    return seen[(static_cast<size_t>(s) * M + mb) * 8 + kind];
  };
  auto fault = [](int r, int action, std::string label, std::string reason) {
    return Fault{false, r, action, std::move(label), std::move(reason)};
  };
  auto here = [&](const Part& q) { return part_name(q) + " (#" + std::to_string(q.action) + ")"; };
  bool lowered = false;
  for (int r = 0; r < p.num_ranks(); ++r) {
    for (const Part& q : p.ranks[r]) {
      if (p.stage_to_rank[q.stage] != r) {
        return fault(r, q.action, here(q),
                     "stage " + std::to_string(q.stage) + " is placed on rank " +
                         std::to_string(p.stage_to_rank[q.stage]));
      }
      lowered |= is_comm(q.kind);
      Seen& e = at(q.kind, q.stage, q.mb);
      if (e.rank >= 0) {
        return fault(r, q.action, here(q),
                     "duplicate: rank " + std::to_string(e.rank) + " already has it at #" +
                         std::to_string(e.action));
      }
      e = Seen{r, q.action};
    }
  }
  // A program with no backward at all is a forward-only one (evaluation); otherwise every
  // forward needs its backward.
  bool any_backward = false;
  for (const auto& acts : p.ranks) {
    for (const Part& q : acts) any_backward |= q.kind != kF && q.kind != kSendF && q.kind != kRecvF;
  }
  auto label = [&](int kind, int s, int mb) {
    const Seen& e = at(kind, s, mb);
    return name(kind, s, mb) + (e.rank >= 0 ? " (#" + std::to_string(e.action) + ")" : "");
  };
  for (int s = 0; s < S; ++s) {
    const int r = p.stage_to_rank[s];
    for (int i = 0; i < M; ++i) {
      const Seen &f = at(kF, s, i), &b = at(kB, s, i), &in = at(kI, s, i), &w = at(kW, s, i);
      if (f.rank < 0)
        return fault(r, -1, name(kF, s, i), "missing: every stage runs F for every microbatch");
      if (!any_backward) continue;
      if (b.rank >= 0 && (in.rank >= 0 || w.rank >= 0)) {
        return fault(r, b.action, label(kB, s, i),
                     "runs both B and the split I/W for stage " + std::to_string(s) +
                         " microbatch " + std::to_string(i) + "; keep one");
      }
      if (b.rank < 0 && in.rank < 0) {
        return fault(r, -1, name(kB, s, i),
                     "missing: stage " + std::to_string(s) + " microbatch " + std::to_string(i) +
                         " needs a B, or an I and a W");
      }
      const Seen& back = b.rank >= 0 ? b : in;
      const int back_kind = b.rank >= 0 ? kB : kI;
      if (back.action < f.action) {
        return fault(r, back.action, label(back_kind, s, i),
                     "runs before its forward " + label(kF, s, i));
      }
      if (in.rank >= 0 && w.rank < 0)
        return fault(r, -1, name(kW, s, i), "missing: " + label(kI, s, i) + " has no W");
      if (w.rank >= 0 && w.action < in.action)
        return fault(r, w.action, label(kW, s, i), "runs before its I " + label(kI, s, i));
    }
  }
  if (!lowered) return Fault{};
  for (int s = 0; s < S; ++s) {
    for (int i = 0; i < M; ++i) {
      const bool cross = s + 1 < S && p.stage_to_rank[s] != p.stage_to_rank[s + 1];
      // the two hand-offs across the boundary between stages s and s+1
      const int pairs[2][4] = {{kSendF, s, kRecvF, s + 1}, {kSendB, s + 1, kRecvB, s}};
      for (const auto& pr : pairs) {
        if (pr[3] >= S || pr[1] >= S || (pr[0] == kSendB && !any_backward)) continue;
        const Seen& snd = at(pr[0], pr[1], i);
        const Seen& rcv = at(pr[2], pr[3], i);
        if (!cross) {
          for (auto [k, st] : {std::pair{pr[0], pr[1]}, std::pair{pr[2], pr[3]}}) {
            const Seen& e = at(k, st, i);
            if (e.rank >= 0)
              return fault(e.rank, e.action, label(k, st, i), "has no peer on another rank; remove it");
          }
          continue;
        }
        if (snd.rank >= 0 && rcv.rank < 0) {
          return fault(p.stage_to_rank[pr[3]], -1, name(pr[2], pr[3], i),
                       "missing: rank " + std::to_string(snd.rank) + " sends " +
                           label(pr[0], pr[1], i) + " and nothing receives it");
        }
        if (rcv.rank >= 0 && snd.rank < 0) {
          return fault(p.stage_to_rank[pr[1]], -1, name(pr[0], pr[1], i),
                       "missing: rank " + std::to_string(rcv.rank) + " receives " +
                           label(pr[2], pr[3], i) + " and nothing sends it");
        }
        if (snd.rank < 0) {
          return fault(p.stage_to_rank[pr[3]], -1, name(pr[2], pr[3], i),
                       "missing: the hand-off from stage " + std::to_string(pr[1]) +
                           " to stage " + std::to_string(pr[3]) + " for microbatch " +
                           std::to_string(i) + " crosses ranks and has no send/receive");
        }
      }
    }
  }
  // the first stage receives no activation and the last sends no gradient back
  for (int i = 0; i < M; ++i) {
    for (auto [k, st] : {std::pair{int(kRecvF), 0}, std::pair{int(kSendB), 0},
                         std::pair{int(kSendF), S - 1}, std::pair{int(kRecvB), S - 1}}) {
      const Seen& e = at(k, st, i);
      if (e.rank >= 0)
        return fault(e.rank, e.action, label(k, st, i), "has no peer stage; remove it");
    }
  }
  return Fault{};
}

std::vector<std::vector<int32_t>> lower_program(const ProgramView& p, const CostModel& costs,
                                                Result* timing) {
  std::vector<std::vector<int32_t>> out(p.num_ranks());
  for (const auto& parts : p.ranks) {
    for (const Part& q : parts) {
      if (is_comm(q.kind)) {
        timing->error = "lowering takes a compute-only program; this one holds " + part_name(q);
        return out;
      }
    }
  }
  *timing = run_program(p, Mode::kTimed, costs);
  if (!timing->error.empty() || !timing->finished) return out;
  const int S = p.num_stages;
  // (slot, key..., op) per rank; slot k = just before compute action k
  using Op = std::tuple<int, double, int, int, int, int8_t>;  // slot, t, stage, dir, mb, kind
  std::vector<std::vector<Op>> ops(p.num_ranks());
  auto slot_of = [&](int q, double t) {
    const auto& st = timing->start[q];
    return static_cast<int>(std::lower_bound(st.begin(), st.end(), t) - st.begin());
  };
  for (int r = 0; r < p.num_ranks(); ++r) {
    for (const Part& x : p.ranks[r]) {
      const double t = timing->end[r][x.action];
      if (x.kind == kF && x.stage + 1 < S && p.stage_to_rank[x.stage + 1] != r) {
        const int q = p.stage_to_rank[x.stage + 1];
        ops[r].emplace_back(x.action + 1, t, x.stage, 0, x.mb, kSendF);
        ops[q].emplace_back(slot_of(q, t), t, x.stage, 0, x.mb, kRecvF);
      } else if ((x.kind == kI || x.kind == kB) && x.stage > 0 &&
                 p.stage_to_rank[x.stage - 1] != r) {
        const int q = p.stage_to_rank[x.stage - 1];
        ops[r].emplace_back(x.action + 1, t, x.stage, 1, x.mb, kSendB);
        ops[q].emplace_back(slot_of(q, t), t, x.stage, 1, x.mb, kRecvB);
      }
    }
  }
  for (int r = 0; r < p.num_ranks(); ++r) {
    auto& o = ops[r];
    std::sort(o.begin(), o.end());
    auto& dst = out[r];
    const auto& parts = p.ranks[r];
    size_t next = 0;
    auto flush = [&](int slot) {
      for (; next < o.size() && std::get<0>(o[next]) <= slot; ++next) {
        const auto& [sl, t, stage, dir, mb, kind] = o[next];
        // a receive names the receiving stage; the key names the producer
        const int st = kind == kRecvF ? stage + 1 : kind == kRecvB ? stage - 1 : stage;
        dst.insert(dst.end(), {kind, st, mb, -1});
      }
    };
    int last = -1;
    for (const Part& x : parts) {
      if (x.action != last) {
        flush(x.action);
        last = x.action;
      }
      dst.insert(dst.end(), {x.kind, x.stage, x.mb, x.action});
    }
    flush(std::numeric_limits<int>::max());
  }
  return out;
}


Fault check_pair_order(const ProgramView& p) {
  if (Fault f = check_view(p); !f.ok) return f;
  // A message is (direction, producing stage, microbatch); per ordered pair, the sender's
  // list in send order and the receiver's in receive order, each with the action posting it.
  struct Msg {
    int dir, producer, mb, action;
    Part part;
  };
  const int R = p.num_ranks();
  std::vector<std::vector<Msg>> sent(static_cast<size_t>(R) * R), got(sent.size());
  for (int r = 0; r < R; ++r) {
    for (const Part& q : p.ranks[r]) {
      if (!is_comm(q.kind)) continue;
      const bool fwd = q.kind == kSendF || q.kind == kRecvF;
      const bool send = q.kind == kSendF || q.kind == kSendB;
      // the stage on the other end, and the stage that produced the message
      const int other = q.stage + (q.kind == kSendF || q.kind == kRecvB ? 1 : -1);
      if (other < 0 || other >= p.num_stages) continue;  // check_structure's to report
      const int peer = p.stage_to_rank[other];
      const int producer = send ? q.stage : other;
      Msg m{fwd ? 0 : 1, producer, q.mb, q.action, q};
      if (send) {
        sent[static_cast<size_t>(r) * R + peer].push_back(m);
      } else {
        got[static_cast<size_t>(peer) * R + r].push_back(m);
      }
    }
  }
  auto text = [](const Msg& m) {
    return std::string(m.dir == 0 ? "the activation of stage " : "the gradient from stage ") +
           std::to_string(m.producer) + " for microbatch " + std::to_string(m.mb);
  };
  for (int src = 0; src < R; ++src) {
    for (int dst = 0; dst < R; ++dst) {
      const auto& s = sent[static_cast<size_t>(src) * R + dst];
      const auto& g = got[static_cast<size_t>(src) * R + dst];
      for (size_t k = 0; k < std::min(s.size(), g.size()); ++k) {
        if (s[k].dir == g[k].dir && s[k].producer == g[k].producer && s[k].mb == g[k].mb) continue;
        return Fault{false, dst, g[k].action,
                     part_name(g[k].part) + " (#" + std::to_string(g[k].action) + ")",
                     "receives " + text(g[k]) + " as message " + std::to_string(k + 1) +
                         " from rank " + std::to_string(src) + ", but rank " +
                         std::to_string(src) + " sends " + text(s[k]) + " as its message " +
                         std::to_string(k + 1) + " to rank " + std::to_string(dst) + " (" +
                         part_name(s[k].part) + ", #" + std::to_string(s[k].action) +
                         "); where messages are matched by order, not tag (NCCL), the two "
                         "would pair up: post a pair's sends and receives in one order"};
      }
    }
  }
  return Fault{};
}

}  // namespace ppfast
