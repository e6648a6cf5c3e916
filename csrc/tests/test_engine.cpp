// Tests of ppfast::run_program: the simulator's timings and memory, and the validator's strict
// dry run (rendezvous sends, coalesced groups, deadlock reports, program errors).
#include <cctype>
#include <stdexcept>
#include <string>
#include <vector>

#include "program/engine.h"
#include "harness.h"

namespace {

using ppfast::CostModel;
using ppfast::Mode;
using ppfast::Part;
using ppfast::ProgramView;
using ppfast::Result;

// Parses one action in torch's text form ("2F0", "1SEND_B3"); "1F1+1B0" is a compound action
// whose parts share one action index. Programs in the tests read like the schedules they are.
std::vector<Part> parse_rank(const std::vector<std::string>& actions) {
  static const char* kinds[] = {"F", "I", "W", "B", "SEND_F", "RECV_F", "SEND_B", "RECV_B"};
  std::vector<Part> parts;
  for (size_t a = 0; a < actions.size(); ++a) {
    std::string rest = actions[a];
    while (!rest.empty()) {
      const size_t plus = rest.find('+');
      const std::string one = rest.substr(0, plus);
      rest = plus == std::string::npos ? "" : rest.substr(plus + 1);
      size_t i = 0;
      while (i < one.size() && std::isdigit(static_cast<unsigned char>(one[i]))) ++i;
      size_t j = one.size();
      while (j > i && std::isdigit(static_cast<unsigned char>(one[j - 1]))) --j;
      const std::string name = one.substr(i, j - i);
      int kind = -1;
      for (int k = 0; k < 8; ++k)
        if (name == kinds[k]) kind = k;
      if (i == 0 || j == one.size() || kind < 0)
        throw std::invalid_argument("test program has a malformed action: " + one);
      parts.push_back(Part{std::stoi(one.substr(0, i)), std::stoi(one.substr(j)),
                           static_cast<int8_t>(kind), static_cast<int32_t>(a)});
    }
  }
  return parts;
}

ProgramView program(std::vector<int32_t> stage_to_rank, int32_t num_mb,
                    const std::vector<std::vector<std::string>>& ranks) {
  ProgramView p;
  p.num_stages = static_cast<int32_t>(stage_to_rank.size());
  p.num_mb = num_mb;
  p.stage_to_rank = std::move(stage_to_rank);
  for (const auto& r : ranks) p.ranks.push_back(parse_rank(r));
  return p;
}

// Same cost for every stage; cost[] is indexed by kind F, I, W, B.
CostModel costs(int num_stages, double f, double i, double w, double b, double comm) {
  CostModel c;
  for (int s = 0; s < num_stages; ++s) c.cost.insert(c.cost.end(), {f, i, w, b});
  c.comm = comm;
  return c;
}

Result strict(const ProgramView& p) { return ppfast::run_program(p, Mode::kStrict, CostModel{}); }

// 1F1B, p = 2, m = 2, lowered with the sends and receives a real run posts.
ProgramView lowered_1f1b() {
  return program({0, 1}, 2,
                 {{"0F0", "0SEND_F0", "0F1", "0SEND_F1", "0RECV_B0", "0B0", "0RECV_B1", "0B1"},
                  {"1RECV_F0", "1F0", "1B0", "1SEND_B0", "1RECV_F1", "1F1", "1B1", "1SEND_B1"}});
}

void check_times(const Result& r, int rank, const std::vector<double>& start,
                 const std::vector<double>& end) {
  REQUIRE_EQ(r.start[rank].size(), start.size(), "actions on rank " << rank);
  for (size_t a = 0; a < start.size(); ++a) {
    REQUIRE_NEAR(r.start[rank][a], start[a], 1e-12, "start of rank " << rank << " action " << a);
    REQUIRE_NEAR(r.end[rank][a], end[a], 1e-12, "end of rank " << rank << " action " << a);
  }
}

}  // namespace

TEST(timed_1f1b_p2_m2) {
  // F = 1, B = 2, and a transfer between ranks takes 0.5:
  //   rank 0  F0 [0,1]  F1 [1,2]  ........  B0 [5,7]  .  B1 [8,10]
  //   rank 1  .  F0 [1.5,2.5]  B0 [2.5,4.5]  F1 [4.5,5.5]  B1 [5.5,7.5]
  const ProgramView p = program({0, 1}, 2, {{"0F0", "0F1", "0B0", "0B1"},
                                            {"1F0", "1B0", "1F1", "1B1"}});
  const Result r = ppfast::run_program(p, Mode::kTimed, costs(2, 1, 0, 0, 2, 0.5));
  REQUIRE(r.error.empty(), r.error);
  REQUIRE(r.finished, "a valid 1F1B program must finish");
  check_times(r, 0, {0, 1, 5, 8}, {1, 2, 7, 10});
  check_times(r, 1, {1.5, 2.5, 4.5, 5.5}, {2.5, 4.5, 5.5, 7.5});
  for (int rank = 0; rank < 2; ++rank) {
    REQUIRE_NEAR(r.busy[rank], 6.0, 1e-12, "busy time of rank " << rank);
    REQUIRE_NEAR(r.final_mem[rank], 0.0, 1e-12, "every activation is freed by its B");
  }
  // 1F1B holds p - rank microbatches of activations.
  REQUIRE_NEAR(r.peak_mem[0], 2.0, 1e-12, "rank 0 holds both microbatches before its first B");
  REQUIRE_NEAR(r.peak_mem[1], 1.0, 1e-12, "rank 1 frees each microbatch before the next F");
}

TEST(timed_comm_actions_take_no_time) {
  const Result r = ppfast::run_program(lowered_1f1b(), Mode::kTimed, costs(2, 1, 0, 0, 2, 0.5));
  REQUIRE(r.finished, r.error);
  // Sends and receives sit at the clock of their rank; compute times match the plain program.
  check_times(r, 0, {0, 1, 1, 2, 2, 5, 7, 8}, {1, 1, 2, 2, 2, 7, 7, 10});
}

TEST(timed_split_backward_memory) {
  // I frees the share of a stage's activations that W does not need; W frees the rest.
  CostModel c = costs(1, 1, 1, 1, 2, 0);
  c.act = {4.0};
  c.w_keep = 0.25;
  const Result r =
      ppfast::run_program(program({0}, 2, {{"0F0", "0F1", "0I0", "0I1", "0W0", "0W1"}}),
                          Mode::kTimed, c);
  REQUIRE(r.finished, r.error);
  REQUIRE_NEAR(r.peak_mem[0], 8.0, 1e-12, "two microbatches of 4 units");
  REQUIRE_NEAR(r.final_mem[0], 0.0, 1e-12, "I and W together free what F added");
  REQUIRE_NEAR(r.end[0][3], 4.0, 1e-12, "I costs its own entry, not B's");
  REQUIRE_NEAR(r.busy[0], 6.0, 1e-12, "2 F + 2 I + 2 W at cost 1");
}

TEST(timed_compound_action_sums_its_parts) {
  // Rank 1's second action overlaps F of microbatch 1 with B of microbatch 0 (OVERLAP_F_B):
  // it starts when both parts are ready and lasts F + B.
  const ProgramView p = program({0, 1}, 2, {{"0F0", "0F1", "0B0", "0B1"},
                                            {"1F0", "1F1+1B0", "1B1"}});
  const Result r = ppfast::run_program(p, Mode::kTimed, costs(2, 1, 0, 0, 2, 0));
  REQUIRE(r.finished, r.error);
  check_times(r, 1, {1, 2, 5}, {2, 5, 7});
  check_times(r, 0, {0, 1, 5, 7}, {1, 2, 7, 9});
  REQUIRE_NEAR(r.busy[1], 6.0, 1e-12, "a compound action is busy for the sum of its parts");
  REQUIRE_NEAR(r.peak_mem[1], 2.0, 1e-12, "the compound's F adds before its B frees");
}

TEST(timed_compound_waits_for_its_latest_part) {
  // Stage 0's F costs 3, so 1F1 can start only at 6 while 1B0 could start at 4: the compound
  // starts when its latest part is ready.
  CostModel c;
  c.cost = {3, 0, 0, 2, 1, 0, 0, 2};
  const ProgramView p = program({0, 1}, 2, {{"0F0", "0F1", "0B0", "0B1"},
                                            {"1F0", "1F1+1B0", "1B1"}});
  const Result r = ppfast::run_program(p, Mode::kTimed, c);
  REQUIRE(r.finished, r.error);
  check_times(r, 1, {3, 6, 9}, {4, 9, 11});
}

TEST(strict_lowered_1f1b_finishes) {
  const Result r = strict(lowered_1f1b());
  REQUIRE(r.error.empty(), r.error);
  REQUIRE(r.finished, "a correctly lowered 1F1B program must finish");
  REQUIRE(r.stuck.empty(), "no rank may be left waiting");
}

// Both ranks send first and receive later: rank 0 the activation of microbatch 1, rank 1 the
// gradient of microbatch 0. In separate groups each blocking send waits for a receive the other
// rank posts only after its own send: a deadlock. Moving the compute that splits the groups
// ahead of them makes each send and the receive after it one coalesced group, which finishes.
ProgramView exchange(bool coalesced) {
  std::vector<std::string> r0 =
      coalesced ? std::vector<std::string>{"0F0", "0SEND_F0", "0F1", "0F2", "0SEND_F1", "0RECV_B0"}
                : std::vector<std::string>{"0F0", "0SEND_F0", "0F1", "0SEND_F1", "0F2", "0RECV_B0"};
  std::vector<std::string> r1 =
      coalesced ? std::vector<std::string>{"1RECV_F0", "1F0", "1I0", "1W0", "1SEND_B0", "1RECV_F1"}
                : std::vector<std::string>{"1RECV_F0", "1F0", "1I0", "1SEND_B0", "1W0", "1RECV_F1"};
  r0.insert(r0.end(), {"0B0", "0SEND_F2", "0RECV_B1", "0B1", "0RECV_B2", "0B2"});
  r1.insert(r1.end(), {"1F1", "1B1", "1SEND_B1", "1RECV_F2", "1F2", "1B2", "1SEND_B2"});
  return program({0, 1}, 3, {r0, r1});
}

TEST(strict_coalesced_exchange_finishes) {
  const Result r = strict(exchange(true));
  REQUIRE(r.error.empty(), r.error);
  REQUIRE(r.finished, "a send and the receive after it post as one group");
}

TEST(strict_separate_sends_deadlock) {
  const Result r = strict(exchange(false));
  REQUIRE(r.error.empty(), r.error);
  REQUIRE(!r.finished, "two blocking sends to each other must deadlock");
  REQUIRE_EQ(r.stuck.size(), size_t{2}, "both ranks are stuck");
  const ppfast::Wait& w0 = r.stuck[0];
  REQUIRE_EQ(w0.rank, 0, "stuck ranks come in rank order");
  REQUIRE_EQ(w0.action, 3, "rank 0 waits in 0SEND_F1");
  REQUIRE_EQ(w0.part, 3, "rank 0's part");
  REQUIRE_EQ(w0.need_kind, ppfast::kWaitRecvFPosted, "a rendezvous send waits for its receive");
  REQUIRE_EQ(w0.need_stage, 1, "the receiving stage");
  REQUIRE_EQ(w0.need_mb, 1, "the microbatch");
  REQUIRE_EQ(w0.peer, 1, "the rank that should post it");
  const ppfast::Wait& w1 = r.stuck[1];
  REQUIRE_EQ(w1.rank, 1, "second stuck rank");
  REQUIRE_EQ(w1.action, 3, "rank 1 waits in 1SEND_B0");
  REQUIRE_EQ(w1.need_kind, ppfast::kWaitRecvBPosted, "its send waits for rank 0's RECV_B");
  REQUIRE_EQ(w1.need_stage, 0, "the receiving stage");
  REQUIRE_EQ(w1.need_mb, 0, "the microbatch");
  REQUIRE_EQ(w1.peer, 0, "the rank that should post it");
}

TEST(strict_missing_send_reports_the_receive) {
  // Rank 0 never sends microbatch 1's activation: rank 1's receive waits for it, and rank 0
  // waits for the gradient rank 1 can then never send.
  const Result r = strict(program(
      {0, 1}, 2,
      {{"0F0", "0SEND_F0", "0F1", "0RECV_B0", "0B0", "0RECV_B1", "0B1"},
       {"1RECV_F0", "1F0", "1B0", "1SEND_B0", "1RECV_F1", "1F1", "1B1", "1SEND_B1"}}));
  REQUIRE(r.error.empty(), r.error);
  REQUIRE(!r.finished, "a receive without its send never completes");
  REQUIRE_EQ(r.stuck.size(), size_t{2}, "both ranks are stuck");
  REQUIRE_EQ(r.stuck[0].action, 5, "rank 0 waits in 0RECV_B1");
  REQUIRE_EQ(r.stuck[0].need_kind, ppfast::kWaitSendBPosted, "for rank 1's SEND_B");
  REQUIRE_EQ(r.stuck[0].peer, 1, "peer of rank 0");
  REQUIRE_EQ(r.stuck[1].action, 4, "rank 1 waits in 1RECV_F1");
  REQUIRE_EQ(r.stuck[1].need_kind, ppfast::kWaitSendFPosted, "for rank 0's SEND_F");
  REQUIRE_EQ(r.stuck[1].need_stage, 0, "the sending stage");
  REQUIRE_EQ(r.stuck[1].need_mb, 1, "the microbatch never sent");
  REQUIRE_EQ(r.stuck[1].peer, 0, "peer of rank 1");
}

TEST(strict_compute_without_receive_waits_on_itself) {
  // Rank 1 computes F of stage 1 without receiving its input: in a dry run it waits for its
  // own RECV_F, and rank 0's rendezvous send waits for that receive.
  const Result r = strict(program({0, 1}, 1, {{"0F0", "0SEND_F0", "0RECV_B0", "0B0"},
                                              {"1F0", "1B0", "1SEND_B0"}}));
  REQUIRE(!r.finished, "the input of 1F0 never arrives");
  REQUIRE_EQ(r.stuck.size(), size_t{2}, "both ranks are stuck");
  REQUIRE_EQ(r.stuck[1].action, 0, "rank 1 waits in 1F0");
  REQUIRE_EQ(r.stuck[1].need_kind, ppfast::kWaitRecvFDone, "for its own receive");
  REQUIRE_EQ(r.stuck[1].peer, 1, "which only rank 1 can post");
  REQUIRE_EQ(r.stuck[0].need_kind, ppfast::kWaitRecvFPosted, "rank 0's send has no receive");
}

TEST(strict_send_before_compute_is_an_error) {
  const Result r = strict(program({0, 1}, 1, {{"0SEND_F0", "0F0", "0RECV_B0", "0B0"},
                                              {"1RECV_F0", "1F0", "1B0", "1SEND_B0"}}));
  REQUIRE(!r.finished, "an invalid program does not finish");
  REQUIRE_EQ(r.error_rank, 0, "the rank that sends too early");
  REQUIRE_EQ(r.error_action, 0, "its first action");
  REQUIRE(r.error.find("0SEND_F0") != std::string::npos, "error names the action: " << r.error);
  REQUIRE(r.error.find("before this rank has computed it") != std::string::npos,
        "error says why: " << r.error);
}

TEST(stage_on_wrong_rank_is_an_error) {
  // Stage 1 is placed on rank 1, but rank 0 runs its forward.
  const ProgramView p = program({0, 1}, 1, {{"0F0", "1F0"}, {"1B0", "0B0"}});
  for (Mode mode : {Mode::kTimed, Mode::kStrict}) {
    const Result r = ppfast::run_program(p, mode, costs(2, 1, 0, 0, 2, 0));
    REQUIRE(!r.finished, "an invalid program does not finish");
    REQUIRE(r.error.find("stage 1 runs on rank 1") != std::string::npos,
          "error says where the stage runs: " << r.error);
    REQUIRE(r.error.find("1F0") != std::string::npos, "error names the action: " << r.error);
    REQUIRE_EQ(r.error_rank, 0, "the rank that runs a foreign stage");
    REQUIRE_EQ(r.error_action, 1, "its second action");
  }
}

TEST(send_to_a_stage_on_the_same_rank_is_an_error) {
  const Result r = strict(program({0, 0}, 1, {{"0F0", "0SEND_F0", "1RECV_F0", "1F0"}}));
  REQUIRE_EQ(r.error_action, 1, "the send");
  REQUIRE(r.error.find("same rank") != std::string::npos, r.error);
}

TEST(malformed_programs_are_rejected_up_front) {
  ProgramView p = program({0, 1}, 1, {{"0F0"}, {"1F0"}});
  p.stage_to_rank = {0};
  REQUIRE(ppfast::run_program(p, Mode::kTimed, CostModel{}).error.find("stage_to_rank") !=
            std::string::npos,
        "placement must cover every stage");
  p = program({0, 1}, 1, {{"0F0"}, {"1F0"}});
  REQUIRE(ppfast::run_program(p, Mode::kTimed, costs(1, 1, 1, 1, 1, 0)).error.find("cost table") !=
            std::string::npos,
        "cost table must have 4 entries per stage");
  p.ranks[0][0].action = 1;
  REQUIRE(!ppfast::run_program(p, Mode::kTimed, CostModel{}).error.empty(),
        "action indices must start at 0");
}

TEST(part_name_matches_torch_text_form) {
  REQUIRE_EQ(ppfast::part_name(Part{2, 3, ppfast::kRecvF, 0}), std::string("2RECV_F3"), "");
  REQUIRE_EQ(ppfast::part_name(Part{0, 5, ppfast::kB, 0}), std::string("0B5"), "");
  REQUIRE_EQ(ppfast::part_name(Part{1, 0, ppfast::kW, 0}), std::string("1W0"), "");
}

TEST(check_structure_accepts_compute_only_and_lowered_programs) {
  const ProgramView plain = program({0, 1}, 2, {{"0F0", "0F1", "0B0", "0B1"},
                                                {"1F0", "1B0", "1F1", "1B1"}});
  const ppfast::Fault a = ppfast::check_structure(plain);
  REQUIRE(a.ok, a.label << ": " << a.reason);
  const ppfast::Fault b = ppfast::check_structure(lowered_1f1b());
  REQUIRE(b.ok, b.label << ": " << b.reason);
}

TEST(check_structure_names_a_missing_send) {
  // Lowered 1F1B without 0SEND_F1: rank 1 receives what nothing sends.
  const ProgramView p = program(
      {0, 1}, 2,
      {{"0F0", "0SEND_F0", "0F1", "0RECV_B0", "0B0", "0RECV_B1", "0B1"},
       {"1RECV_F0", "1F0", "1B0", "1SEND_B0", "1RECV_F1", "1F1", "1B1", "1SEND_B1"}});
  const ppfast::Fault f = ppfast::check_structure(p);
  REQUIRE(!f.ok, "a receive without its send is a structural fault");
  REQUIRE_EQ(f.rank, 0, "the rank that should send");
  REQUIRE_EQ(f.label, std::string("0SEND_F1"), "the missing action");
}

TEST(lowering_1f1b_gives_a_program_that_runs) {
  const ProgramView plain = program({0, 1}, 2, {{"0F0", "0F1", "0B0", "0B1"},
                                                {"1F0", "1B0", "1F1", "1B1"}});
  ppfast::Result timing;
  const auto lowered = ppfast::lower_program(plain, costs(2, 1, 0, 0, 2, 0), &timing);
  REQUIRE(timing.finished, timing.error);
  ProgramView p = plain;
  for (size_t r = 0; r < lowered.size(); ++r) {
    p.ranks[r].clear();
    std::vector<int32_t> compute;
    for (size_t i = 0; i < lowered[r].size(); i += 4) {
      const auto* q = &lowered[r][i];
      p.ranks[r].push_back(Part{q[1], q[2], static_cast<int8_t>(q[0]),
                                static_cast<int32_t>(i / 4)});
      if (q[3] >= 0) compute.push_back(q[3]);
    }
    REQUIRE_EQ(compute.size(), plain.ranks[r].size(), "rank " << r << " keeps its compute");
    for (size_t k = 0; k < compute.size(); ++k)
      REQUIRE_EQ(compute[k], static_cast<int32_t>(k), "rank " << r << " keeps its order");
  }
  const ppfast::Fault f = ppfast::check_structure(p);
  REQUIRE(f.ok, f.label << ": " << f.reason);
  const Result r = strict(p);
  REQUIRE(r.error.empty(), r.error);
  REQUIRE(r.finished, "a lowered 1F1B must pass the dry run");
}
