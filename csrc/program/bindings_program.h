// Python bindings of the program engine: checks, lowering, the dry run and timing.
#pragma once

#include <torch/extension.h>

#include "program/engine.h"

namespace ppfast {

namespace py = pybind11;

namespace detail {

// ranks: per rank a flat list [kind, stage, mb, action, kind, stage, mb, action, ...]. Every
// engine entry point checks the view (check_view) before it reads anything out of it.
inline ppfast::ProgramView make_view(const std::vector<int32_t>& stage_to_rank, int32_t num_mb,
                              const std::vector<std::vector<int32_t>>& ranks) {
  ppfast::ProgramView view;
  view.num_stages = static_cast<int32_t>(stage_to_rank.size());
  view.num_mb = num_mb;
  view.stage_to_rank = stage_to_rank;
  view.ranks.resize(ranks.size());
  for (size_t r = 0; r < ranks.size(); ++r) {
    const auto& flat = ranks[r];
    if (flat.size() % 4 != 0) throw std::invalid_argument("each rank needs 4 ints per part");
    auto& parts = view.ranks[r];
    parts.reserve(flat.size() / 4);
    for (size_t i = 0; i < flat.size(); i += 4) {
      // an out-of-range code must not wrap into a valid one
      const int32_t kind = flat[i] >= 0 && flat[i] <= ppfast::kRecvB ? flat[i] : -1;
      parts.push_back(ppfast::Part{flat[i + 1], flat[i + 2], static_cast<int8_t>(kind),
                                   flat[i + 3]});
    }
  }
  return view;
}

inline py::dict result_dict(const ppfast::Result& res) {
  py::dict out;
  out["finished"] = res.finished;
  out["error"] = res.error;
  out["error_rank"] = res.error_rank;
  out["error_action"] = res.error_action;
  out["start"] = res.start;
  out["end"] = res.end;
  out["peak_mem"] = res.peak_mem;
  out["final_mem"] = res.final_mem;
  out["busy"] = res.busy;
  py::list stuck;
  for (const auto& w : res.stuck) {
    stuck.append(py::make_tuple(w.rank, w.action, w.part, w.need_kind, w.need_stage, w.need_mb,
                                w.peer));
  }
  out["stuck"] = stuck;
  return out;
}

inline py::dict run_program_py(const std::vector<int32_t>& stage_to_rank, int32_t num_mb,
                        const std::vector<std::vector<int32_t>>& ranks, bool strict,
                        std::vector<double> cost, double comm, std::vector<double> act,
                        double w_keep) {
  auto view = make_view(stage_to_rank, num_mb, ranks);
  ppfast::CostModel costs{std::move(cost), comm, std::move(act), w_keep};
  ppfast::Result res;
  {
    py::gil_scoped_release nogil;
    res = ppfast::run_program(view, strict ? ppfast::Mode::kStrict : ppfast::Mode::kTimed,
                              costs);
  }
  return result_dict(res);
}

inline py::object check_structure_py(const std::vector<int32_t>& stage_to_rank, int32_t num_mb,
                              const std::vector<std::vector<int32_t>>& ranks, bool pair_order) {
  auto view = make_view(stage_to_rank, num_mb, ranks);
  ppfast::Fault f;
  {
    py::gil_scoped_release nogil;
    f = pair_order ? ppfast::check_pair_order(view) : ppfast::check_structure(view);
  }
  if (f.ok) return py::none();
  return py::make_tuple(f.rank, f.action, f.label, f.reason);
}

// Returns (encoded, sources, comms, timing): per rank the lowered program's engine encoding
// [kind, stage, mb, action], the original index of each new action (-1 for an inserted
// SEND/RECV), and [kind, stage, mb] of each inserted SEND/RECV in order. Splitting it here
// lets Python rebuild the actions without walking every part itself.
inline py::tuple lower_program_py(const std::vector<int32_t>& stage_to_rank, int32_t num_mb,
                           const std::vector<std::vector<int32_t>>& ranks,
                           std::vector<double> cost) {
  auto view = make_view(stage_to_rank, num_mb, ranks);
  ppfast::CostModel costs{std::move(cost), 0.0, {}, 0.5};
  ppfast::Result timing;
  std::vector<std::vector<int32_t>> enc, src, comm;
  {
    py::gil_scoped_release nogil;
    auto rows = ppfast::lower_program(view, costs, &timing);
    enc.resize(rows.size());
    src.resize(rows.size());
    comm.resize(rows.size());
    for (size_t r = 0; r < rows.size(); ++r) {
      const auto& q = rows[r];
      int32_t last = -1, index = -1;
      for (size_t j = 0; j < q.size(); j += 4) {
        const int32_t source = q[j + 3];
        if (source < 0 || source != last) {
          ++index;
          src[r].push_back(source);
          if (source < 0) comm[r].insert(comm[r].end(), {q[j], q[j + 1], q[j + 2]});
        }
        last = source;
        enc[r].insert(enc[r].end(), {q[j], q[j + 1], q[j + 2], index});
      }
    }
  }
  return py::make_tuple(enc, src, comm, result_dict(timing));
}

}  // namespace detail

inline void register_program(pybind11::module_& m) {
  using namespace detail;
  m.attr("MAX_STAGES") = ppfast::kMaxStages;
  m.attr("MAX_MICROBATCHES") = ppfast::kMaxMicrobatches;
  m.def("run_program", &run_program_py, py::arg("stage_to_rank"), py::arg("num_mb"),
        py::arg("ranks"), py::arg("strict"), py::arg("cost"), py::arg("comm"), py::arg("act"),
        py::arg("w_keep"),
        "Walk a program: strict=True is the validator's dry run (blocking receives, rendezvous "
        "sends, coalesced groups); strict=False times it with the given costs.");
  m.def("check_structure", &check_structure_py, py::arg("stage_to_rank"), py::arg("num_mb"),
        py::arg("ranks"), py::arg("pair_order") = false,
        "None if the program is well formed, else (rank, action index, label, reason). With "
        "pair_order: instead, does every receiver post a pair's messages in the sender's order "
        "(matching without tags, as NCCL does)?");
  m.def("lower_program", &lower_program_py, py::arg("stage_to_rank"), py::arg("num_mb"),
        py::arg("ranks"), py::arg("cost"),
        "Insert SEND/RECV; returns (encoded, sources, comms, timing), each per rank.");
}

}  // namespace ppfast
