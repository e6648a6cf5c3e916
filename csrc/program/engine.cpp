// Walks a program rank by rank with a worklist: a rank runs until its next action needs an event
// that has not happened, parks on that one event, and is woken when it fires. Every action is
// looked at a bounded number of times, so a program of N actions costs O(N) plus wake-ups.
#include "program/engine.h"

#include <algorithm>
#include <deque>
#include <limits>

namespace ppfast {
namespace {

// Events, one slot per (stage, microbatch, event).
enum Event : int {
  kEvF = 0,         // F(stage, mb) finished
  kEvG = 1,         // I or B(stage, mb) finished: the input gradient exists
  kEvRecvFPosted = 2,
  kEvSendFPosted = 3,
  kEvRecvBPosted = 4,
  kEvSendBPosted = 5,
  kEvRecvFDone = 6,
  kEvRecvBDone = 7,
  kNumEvents = 8,
};

const char* kKindNames[] = {"F", "I", "W", "B", "SEND_F", "RECV_F", "SEND_B", "RECV_B"};

class Walker {
 public:
  Walker(const ProgramView& p, Mode mode, const CostModel& c) : p_(p), mode_(mode), c_(c) {
    const int R = p.num_ranks();
    const size_t slots = static_cast<size_t>(p.num_stages) * p.num_mb * kNumEvents;
    happened_.assign(slots, 0);
    when_.assign(slots, 0.0);
    head_.assign(slots, -1);
    next_.assign(R, -1);
    pc_.assign(R, 0);
    clock_.assign(R, 0.0);
    posted_.assign(R, 0);
    waits_.assign(R, Wait{});
    res_.start.resize(R);
    res_.end.resize(R);
    res_.peak_mem.assign(R, 0.0);
    res_.final_mem.assign(R, 0.0);
    res_.busy.assign(R, 0.0);
    for (int r = 0; r < R; ++r) {
      int n = p.ranks[r].empty() ? 0 : p.ranks[r].back().action + 1;
      res_.start[r].assign(n, 0.0);
      res_.end[r].assign(n, 0.0);
    }
  }

  Result run() {
    const int R = p_.num_ranks();
    std::deque<int> work;
    for (int r = 0; r < R; ++r) work.push_back(r);
    std::vector<char> queued(R, 1);
    while (!work.empty() && res_.error.empty()) {
      int r = work.front();
      work.pop_front();
      queued[r] = 0;
      advance(r);
      for (int w : woken_) {
        if (!queued[w]) {
          queued[w] = 1;
          work.push_back(w);
        }
      }
      woken_.clear();
    }
    if (!res_.error.empty()) return std::move(res_);
    res_.finished = true;
    for (int r = 0; r < R; ++r) {
      if (pc_[r] < static_cast<int>(p_.ranks[r].size())) {
        res_.finished = false;
        res_.stuck.push_back(waits_[r]);
      }
    }
    return std::move(res_);
  }

 private:
  size_t slot(int stage, int mb, int ev) const {
    return (static_cast<size_t>(stage) * p_.num_mb + mb) * kNumEvents + ev;
  }

  void fire(size_t s, double t) {
    happened_[s] = 1;
    when_[s] = t;
    for (int w = head_[s]; w != -1;) {
      int nxt = next_[w];
      next_[w] = -1;
      woken_.push_back(w);
      w = nxt;
    }
    head_[s] = -1;
  }

  // Park rank r on slot s; record why for the report.
  void park(int r, size_t s, const Part& part, int what, int stage, int mb, int peer) {
    next_[r] = head_[s];
    head_[s] = r;
    waits_[r] = Wait{r, part.action, pc_[r], what, stage, mb, peer};
  }

  bool fail(int r, const Part& part, const std::string& why) {
    res_.error = "rank " + std::to_string(r) + ", action " + part_name(part) + " (#" +
                 std::to_string(part.action) + "): " + why;
    res_.error_rank = r;
    res_.error_action = part.action;
    return false;
  }

  bool in_range(int stage, int mb) const {
    return stage >= 0 && stage < p_.num_stages && mb >= 0 && mb < p_.num_mb;
  }

  // A dependency of a compute part on data made by stage `src` (event ev of (src, mb)).
  // Returns false and parks the rank if it is not there yet; else raises *ready.
  bool need_data(int r, const Part& part, int src, int mb, int ev, int recv_ev, int recv_stage,
                 double* ready) {
    const int src_rank = p_.stage_to_rank[src];
    if (src_rank == r || mode_ == Mode::kTimed) {
      size_t s = slot(src, mb, ev);
      if (!happened_[s]) {
        park(r, s, part, ev == kEvF ? kWaitForwardDone : kWaitGradDone, src, mb, src_rank);
        return false;
      }
      *ready = std::max(*ready, when_[s] + (src_rank == r ? 0.0 : c_.comm));
      return true;
    }
    size_t s = slot(recv_stage, mb, recv_ev);
    if (!happened_[s]) {
      park(r, s, part, recv_ev == kEvRecvFDone ? kWaitRecvFDone : kWaitRecvBDone, recv_stage,
           mb, r);
      return false;
    }
    return true;
  }

  bool deps_ready(int r, const Part& part, double* ready) {
    const int S = p_.num_stages;
    const int s = part.stage, mb = part.mb;
    switch (part.kind) {
      case kF:
        return s == 0 || need_data(r, part, s - 1, mb, kEvF, kEvRecvFDone, s, ready);
      case kI:
      case kB: {
        size_t f = slot(s, mb, kEvF);
        if (!happened_[f]) {
          park(r, f, part, kWaitForwardDone, s, mb, r);
          return false;
        }
        *ready = std::max(*ready, when_[f]);
        return s == S - 1 || need_data(r, part, s + 1, mb, kEvG, kEvRecvBDone, s, ready);
      }
      case kW: {
        size_t g = slot(s, mb, kEvG);
        if (!happened_[g]) {
          park(r, g, part, kWaitGradDone, s, mb, r);
          return false;
        }
        *ready = std::max(*ready, when_[g]);
        return true;
      }
    }
    return true;
  }

  // Strict mode: post a run of back-to-back communication as one group, then wait until every
  // op in it has met its peer's matching op.
  bool comm_group(int r, int begin, int end) {
    const auto& parts = p_.ranks[r];
    const int S = p_.num_stages;
    if (!posted_[r]) {
      for (int i = begin; i < end; ++i) {
        const Part& q = parts[i];
        const bool fwd = q.kind == kSendF || q.kind == kRecvF;
        const bool send = q.kind == kSendF || q.kind == kSendB;
        const int peer_stage = q.stage + ((q.kind == kSendF || q.kind == kRecvB) ? 1 : -1);
        if (!in_range(q.stage, q.mb) || peer_stage < 0 || peer_stage >= S) {
          return fail(r, q, "has no peer stage (stage " + std::to_string(peer_stage) +
                                " does not exist)");
        }
        if (p_.stage_to_rank[q.stage] != r) {
          return fail(r, q, "stage " + std::to_string(q.stage) + " runs on rank " +
                                std::to_string(p_.stage_to_rank[q.stage]) + ", not here");
        }
        if (p_.stage_to_rank[peer_stage] == r) {
          return fail(r, q, "its peer stage " + std::to_string(peer_stage) +
                                " is on the same rank; local hand-offs need no communication");
        }
        if (send && !happened_[slot(q.stage, q.mb, fwd ? kEvF : kEvG)]) {
          return fail(r, q,
                      std::string("sends the result of ") + std::to_string(q.stage) +
                          (fwd ? "F" : "I/B") + std::to_string(q.mb) +
                          " before this rank has computed it");
        }
        int ev = q.kind == kSendF   ? kEvSendFPosted
                 : q.kind == kRecvF ? kEvRecvFPosted
                 : q.kind == kSendB ? kEvSendBPosted
                                    : kEvRecvBPosted;
        fire(slot(q.stage, q.mb, ev), clock_[r]);
      }
      posted_[r] = 1;
    }
    for (int i = begin; i < end; ++i) {
      const Part& q = parts[i];
      int peer_stage, ev, what;
      switch (q.kind) {
        case kSendF:
          peer_stage = q.stage + 1, ev = kEvRecvFPosted, what = kWaitRecvFPosted;
          break;
        case kRecvF:
          peer_stage = q.stage - 1, ev = kEvSendFPosted, what = kWaitSendFPosted;
          break;
        case kSendB:
          peer_stage = q.stage - 1, ev = kEvRecvBPosted, what = kWaitRecvBPosted;
          break;
        default:
          peer_stage = q.stage + 1, ev = kEvSendBPosted, what = kWaitSendBPosted;
          break;
      }
      size_t s = slot(peer_stage, q.mb, ev);
      if (!happened_[s]) {
        // the group stays posted; report its first unmatched op
        park(r, s, q, what, peer_stage, q.mb, p_.stage_to_rank[peer_stage]);
        waits_[r].part = i;
        return false;
      }
    }
    for (int i = begin; i < end; ++i) {
      const Part& q = parts[i];
      if (q.kind == kRecvF) fire(slot(q.stage, q.mb, kEvRecvFDone), clock_[r]);
      if (q.kind == kRecvB) fire(slot(q.stage, q.mb, kEvRecvBDone), clock_[r]);
      res_.start[r][q.action] = res_.end[r][q.action] = clock_[r];
    }
    posted_[r] = 0;
    return true;
  }

  void memory(int r, const Part& q) {
    double a = c_.act.empty() ? 1.0 : c_.act[q.stage];
    double& cur = res_.final_mem[r];
    switch (q.kind) {
      case kF:
        cur += a;
        break;
      case kI:
        cur -= (1.0 - c_.w_keep) * a;
        break;
      case kW:
        cur -= c_.w_keep * a;
        break;
      case kB:
        cur -= a;
        break;
    }
    res_.peak_mem[r] = std::max(res_.peak_mem[r], cur);
  }

  void advance(int r) {
    const auto& parts = p_.ranks[r];
    const int n = static_cast<int>(parts.size());
    while (pc_[r] < n) {
      const int begin = pc_[r];
      const Part& first = parts[begin];
      if (is_comm(first.kind)) {
        int end = begin;
        while (end < n && is_comm(parts[end].kind)) ++end;
        if (mode_ == Mode::kTimed) {
          for (int i = begin; i < end; ++i)
            res_.start[r][parts[i].action] = res_.end[r][parts[i].action] = clock_[r];
          pc_[r] = end;
          continue;
        }
        if (!comm_group(r, begin, end)) return;
        pc_[r] = end;
        continue;
      }
      int end = begin;
      while (end < n && parts[end].action == first.action) ++end;
      double ready = clock_[r];
      double dur = 0.0;
      for (int i = begin; i < end; ++i) {
        const Part& q = parts[i];
        if (is_comm(q.kind) || !in_range(q.stage, q.mb)) {
          fail(r, q, "is out of range or mixes communication into a compound action");
          return;
        }
        if (p_.stage_to_rank[q.stage] != r) {
          fail(r, q, "stage " + std::to_string(q.stage) + " runs on rank " +
                         std::to_string(p_.stage_to_rank[q.stage]) + ", not here");
          return;
        }
        if (!deps_ready(r, q, &ready)) return;
        if (!c_.cost.empty()) dur += c_.cost[static_cast<size_t>(q.stage) * 4 + q.kind];
      }
      const double t_end = ready + dur;
      res_.start[r][first.action] = ready;
      res_.end[r][first.action] = t_end;
      res_.busy[r] += dur;
      clock_[r] = t_end;
      for (int i = begin; i < end; ++i) {
        const Part& q = parts[i];
        memory(r, q);
        if (q.kind == kF) fire(slot(q.stage, q.mb, kEvF), t_end);
        if (q.kind == kI || q.kind == kB) fire(slot(q.stage, q.mb, kEvG), t_end);
      }
      pc_[r] = end;
    }
  }

  const ProgramView& p_;
  Mode mode_;
  const CostModel& c_;
  std::vector<char> happened_;
  std::vector<double> when_;
  std::vector<int> head_, next_, pc_;
  std::vector<double> clock_;
  std::vector<char> posted_;
  std::vector<Wait> waits_;
  std::vector<int> woken_;
  Result res_;
};

}  // namespace

std::string part_name(const Part& p) {
  const char* k = (p.kind >= 0 && p.kind < 8) ? kKindNames[p.kind] : "?";
  return std::to_string(p.stage) + k + std::to_string(p.mb);
}

Fault check_view(const ProgramView& p, const CostModel* costs) {
  const auto n = [](int64_t v) { return std::to_string(v); };
  const auto whole = [](std::string reason) { return Fault{false, -1, -1, "", std::move(reason)}; };
  const int R = p.num_ranks();
  if (R < 1 || R > kMaxRanks) return whole("a program needs 1 to " + n(kMaxRanks) + " ranks, not " + n(R));
  if (p.num_stages < 1 || p.num_stages > kMaxStages) {
    return whole("a program needs 1 to " + n(kMaxStages) + " stages, not " + n(p.num_stages));
  }
  if (p.num_mb < 1 || p.num_mb > kMaxMicrobatches) {
    return whole("a program needs 1 to " + n(kMaxMicrobatches) + " microbatches, not " + n(p.num_mb));
  }
  if (int64_t(p.num_stages) * p.num_mb > kMaxStageMicrobatches) {
    return whole(n(p.num_stages) + " stages x " + n(p.num_mb) + " microbatches is more than the " +
                 n(kMaxStageMicrobatches) + " (stage, microbatch) pairs a program may hold");
  }
  if (static_cast<int64_t>(p.stage_to_rank.size()) != p.num_stages) {
    return whole("stage_to_rank has " + n(p.stage_to_rank.size()) + " entries for " +
                 n(p.num_stages) + " stages");
  }
  for (int s = 0; s < p.num_stages; ++s) {
    if (p.stage_to_rank[s] < 0 || p.stage_to_rank[s] >= R) {
      return whole("stage_to_rank places stage " + n(s) + " on rank " + n(p.stage_to_rank[s]) +
                   ", which is not one of the program's " + n(R) + " ranks");
    }
  }
  for (int r = 0; r < R; ++r) {
    const auto& parts = p.ranks[r];
    for (size_t i = 0; i < parts.size(); ++i) {
      const Part& q = parts[i];
      const auto fault = [&](std::string reason) {
        return Fault{false, r, q.action, part_name(q) + " (#" + n(q.action) + ")", std::move(reason)};
      };
      if (q.stage < 0 || q.stage >= p.num_stages || q.mb < 0 || q.mb >= p.num_mb) {
        return fault("stage must be in [0, " + n(p.num_stages) + ") and microbatch in [0, " +
                     n(p.num_mb) + ")");
      }
      if (q.kind < 0 || q.kind > kRecvB) return fault("its kind is none of F, I, W, B, SEND_F, RECV_F, SEND_B, RECV_B");
      const int32_t prev = i == 0 ? -1 : parts[i - 1].action;
      if ((i > 0 && q.action != prev && q.action != prev + 1) || (i == 0 && q.action != 0)) {
        return fault("action index " + n(q.action) + " after " + n(prev) +
                     ": action indices of a rank count up from 0 in steps of one");
      }
      const bool shared = (i > 0 && q.action == prev) ||
                          (i + 1 < parts.size() && parts[i + 1].action == q.action);
      if (shared && is_comm(q.kind)) {
        return fault("a compound action (parts sharing one index) holds compute parts only");
      }
    }
  }
  if (costs != nullptr) {
    if (!costs->cost.empty() && costs->cost.size() != static_cast<size_t>(p.num_stages) * 4) {
      return whole("the cost table needs 4 entries (F, I, W, B) per stage, " +
                   n(4 * p.num_stages) + " in all, not " + n(costs->cost.size()));
    }
    if (!costs->act.empty() && costs->act.size() != static_cast<size_t>(p.num_stages)) {
      return whole("the activation table needs one entry per stage, " + n(p.num_stages) +
                   " in all, not " + n(costs->act.size()));
    }
  }
  return Fault{};
}

std::string describe(const Fault& f) {
  if (f.ok) return "";
  if (f.rank < 0) return f.reason;
  return "rank " + std::to_string(f.rank) + ", action " + f.label + ": " + f.reason;
}

Result run_program(const ProgramView& program, Mode mode, const CostModel& costs) {
  Result bad;
  const Fault f = check_view(program, &costs);
  if (!f.ok) {
    bad.error = describe(f);
    bad.error_rank = f.rank;
    bad.error_action = f.action;
    return bad;
  }
  return Walker(program, mode, costs).run();
}

}  // namespace ppfast
