// The program engine: walks every rank's action list against the pipeline's data
// dependencies, either timed (the simulator) or untimed with blocking receives and rendezvous
// sends (the validator's dry run). Pure C++17; no torch, no device.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace ppfast {

// Codes shared with python/ppfast/_engine.py.
enum Kind : int8_t {
  kF = 0,
  kI = 1,
  kW = 2,
  kB = 3,
  kSendF = 4,
  kRecvF = 5,
  kSendB = 6,
  kRecvB = 7,
};

inline bool is_comm(int k) { return k >= kSendF; }

// One simple action. Consecutive parts of a rank that share `action` form one compound action
// (OVERLAP_F_B): they start together and take the sum of their costs.
struct Part {
  int32_t stage;
  int32_t mb;
  int8_t kind;
  int32_t action;
};

struct ProgramView {
  int32_t num_stages = 0;
  int32_t num_mb = 0;
  std::vector<int32_t> stage_to_rank;
  std::vector<std::vector<Part>> ranks;
  int num_ranks() const { return static_cast<int>(ranks.size()); }
};

enum class Mode { kTimed, kStrict };

struct CostModel {
  // cost[stage * 4 + kind] for kind in F, I, W, B
  std::vector<double> cost;
  // time between the end of a producing action and the data being usable on another rank
  double comm = 0.0;
  // activations one F of a stage adds (memory units); size num_stages
  std::vector<double> act;
  // share of a stage's activations that a pending W still holds after I
  double w_keep = 0.5;
};

// Why a rank cannot take its next action.
struct Wait {
  int rank = -1;
  int action = -1;   // index in the rank's action list
  int part = -1;     // index in the rank's part list
  int need_kind = -1;  // the event it waits for (see WaitWhat)
  int need_stage = -1;
  int need_mb = -1;
  int peer = -1;  // rank that would produce the event
};

// What a Wait waits for.
enum WaitWhat : int {
  kWaitForwardDone = 0,   // F(stage, mb) has run (on `peer`)
  kWaitGradDone = 1,      // I or B(stage, mb) has run (on `peer`)
  kWaitRecvFPosted = 2,   // `peer` posts RECV_F(stage, mb) (a rendezvous send waits for it)
  kWaitSendFPosted = 3,   // `peer` posts SEND_F(stage, mb)
  kWaitRecvBPosted = 4,
  kWaitSendBPosted = 5,
  kWaitRecvFDone = 6,     // this rank's own RECV_F(stage, mb) has completed
  kWaitRecvBDone = 7,
};

struct Result {
  bool finished = false;
  // a program error found while walking (e.g. a send before the compute it carries)
  std::string error;
  int error_rank = -1;
  int error_action = -1;
  // per rank, per action: start and end (timed mode only)
  std::vector<std::vector<double>> start, end;
  // per rank: peak and final activation memory, busy time
  std::vector<double> peak_mem, final_mem, busy;
  // ranks left waiting forever, in rank order, when !finished
  std::vector<Wait> stuck;
};

// Limits of a program the engine and the executor take: stages and microbatches are packed
// into 20 bits each of a message key, and stages x microbatches sizes the engine's tables.
constexpr int32_t kMaxStages = (1 << 20) - 1;
constexpr int32_t kMaxMicrobatches = (1 << 20) - 1;
constexpr int64_t kMaxStageMicrobatches = int64_t(1) << 22;
constexpr int32_t kMaxRanks = 1 << 16;

Result run_program(const ProgramView& program, Mode mode, const CostModel& costs);

// The first structural fault of a program, if any.
struct Fault {
  bool ok = true;
  int rank = -1;
  int action = -1;     // index in the rank's action list, -1 for a missing action
  std::string label;   // the action concerned, e.g. "1W3"
  std::string reason;  // what is wrong and what to change
};

// Every (stage, mb) has one F and either one B or one I and one W, in that order on the rank
// that holds the stage (a program with no backward action at all runs forwards only); every action's stage lives on its rank; and, once the program holds
// communication, every cross-rank hand-off has exactly one send and one receive.
Fault check_structure(const ProgramView& program);

// Is the program something the engine can walk at all? The fault, if not: counts within the
// limits above, stage_to_rank naming existing ranks, every part's kind, stage and microbatch
// in range, action indices counting up from 0 in steps of one, compound actions (parts sharing
// an index) made of compute parts only, and `costs` (if given) sized for the stages. Every
// entry point here checks this first, so no input makes the engine read out of bounds; whether
// the program is correct is check_structure's to say.
Fault check_view(const ProgramView& program, const CostModel* costs = nullptr);
// A fault as one line: "rank 1, action 2F3 (#7): why", or the reason alone for the whole program.
std::string describe(const Fault& fault);

// Matching without tags (NCCL): between every ordered pair of ranks, the receiver posts its
// receives in the order the sender posts its sends. A structurally sound lowered program that
// breaks this runs where messages are matched by tag and mis-pairs where they are matched by
// order; the fault names the receiving rank, its receive and the peer.
Fault check_pair_order(const ProgramView& program);

// Lowering: per rank, the new action list as [kind, stage, mb, source] quadruples, where
// source is the index of the original (compute) action, or -1 for an inserted SEND/RECV.
// Sends follow the compute that produces them; a receive goes before the first action of its
// rank that starts, in a step timed with `costs` (comm ignored), no earlier than its producer
// ends. Comm ops between two compute actions are sorted by one global key, so two peers post
// their shared messages in the same order. Takes a compute-only program that finishes; for any
// other, `timing->error` says why and the rows are empty.
std::vector<std::vector<int32_t>> lower_program(const ProgramView& program,
                                                const CostModel& costs, Result* timing);

// Human-readable name of a part ("2RECV_F3").
std::string part_name(const Part& p);

}  // namespace ppfast
