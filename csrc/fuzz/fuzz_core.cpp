// Random and mutated inputs into the code that reads what it did not write: the program engine
// (check_view, check_structure, check_pair_order, run_program, lower_program) and the shape
// header's decoder. Built with AddressSanitizer and UBSan where the compiler has them, so an
// out-of-bounds read, an overflow or a leak fails the run; every input must end in a verdict.
//
//   ppfast_fuzz [cases] [seed]     (defaults: 50000 of each, seed 1)
//
// Properties checked besides memory safety: an input check_view refuses is refused by every
// entry point; a header decode() accepts encodes back to the same words.
#include <cstdint>
#include <cstdio>
#include <algorithm>
#include <cstdlib>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "program/engine.h"
#include "wire/meta.h"

namespace {

using ppfast::CostModel;
using ppfast::Part;
using ppfast::ProgramView;

std::mt19937_64 rng;

int64_t pick(int64_t lo, int64_t hi) { return std::uniform_int_distribution<int64_t>(lo, hi)(rng); }
bool chance(int percent) { return pick(0, 99) < percent; }

[[noreturn]] void die(const std::string& why) {
  std::fprintf(stderr, "ppfast_fuzz: %s\n", why.c_str());
  std::exit(1);
}

// A value a corrupted field might hold: in range, at an edge, or far out.
int32_t odd_value(int64_t in_range_max) {
  const auto clamp = [](int64_t x) {
    return static_cast<int32_t>(std::min<int64_t>(std::max<int64_t>(x, INT32_MIN), INT32_MAX));
  };
  switch (pick(0, 7)) {
    case 0: return -1;
    case 1: return 0;
    case 2: return clamp(in_range_max);
    case 3: return clamp(in_range_max + 1);
    case 4: return std::numeric_limits<int32_t>::max();
    case 5: return std::numeric_limits<int32_t>::min();
    case 6: return static_cast<int32_t>(pick(-3, 300));
    default: return clamp(pick(0, std::max<int64_t>(0, std::min<int64_t>(in_range_max, 1000))));
  }
}

// GPipe over `p` ranks with `v` stages each, in a loop: all forwards, then all backwards
// (B, or I and W). A valid compute-only program to mutate, and to lower for lowered ones.
ProgramView gpipe(int p, int v, int m, bool split) {
  ProgramView view;
  view.num_stages = p * v;
  view.num_mb = m;
  view.ranks.resize(p);
  for (int s = 0; s < p * v; ++s) view.stage_to_rank.push_back(s % p);
  std::vector<int32_t> next(p, 0);
  auto add = [&](int r, int8_t kind, int s, int mb) { view.ranks[r].push_back(Part{s, mb, kind, next[r]++}); };
  for (int s = 0; s < p * v; ++s)
    for (int mb = 0; mb < m; ++mb) add(s % p, ppfast::kF, s, mb);
  for (int s = p * v - 1; s >= 0; --s) {
    for (int mb = 0; mb < m; ++mb) {
      if (split) {
        add(s % p, ppfast::kI, s, mb);
        add(s % p, ppfast::kW, s, mb);
      } else {
        add(s % p, ppfast::kB, s, mb);
      }
    }
  }
  return view;
}

ProgramView lowered(const ProgramView& view) {
  ppfast::Result timing;
  CostModel costs;
  auto rows = ppfast::lower_program(view, costs, &timing);
  if (!timing.error.empty() || !timing.finished) die("the base program does not lower: " + timing.error);
  ProgramView out = view;
  for (size_t r = 0; r < rows.size(); ++r) {
    out.ranks[r].clear();
    int32_t index = -1, last = -2;
    for (size_t j = 0; j < rows[r].size(); j += 4) {
      const int32_t source = rows[r][j + 3];
      if (source < 0 || source != last) ++index;
      last = source;
      out.ranks[r].push_back(Part{rows[r][j + 1], rows[r][j + 2], static_cast<int8_t>(rows[r][j]), index});
    }
  }
  return out;
}

void mutate(ProgramView& v) {
  const int times = static_cast<int>(pick(1, 3));
  for (int t = 0; t < times; ++t) {
    const int r = v.ranks.empty() ? 0 : static_cast<int>(pick(0, v.num_ranks() - 1));
    auto& parts = v.ranks.empty() ? v.ranks.emplace_back() : v.ranks[r];
    const size_t i = parts.empty() ? 0 : static_cast<size_t>(pick(0, parts.size() - 1));
    switch (pick(0, 11)) {
      case 0: if (!parts.empty()) parts[i].kind = static_cast<int8_t>(odd_value(7)); break;
      case 1: if (!parts.empty()) parts[i].stage = odd_value(int64_t(v.num_stages) - 1); break;
      case 2: if (!parts.empty()) parts[i].mb = odd_value(int64_t(v.num_mb) - 1); break;
      case 3: if (!parts.empty()) parts[i].action = odd_value(static_cast<int32_t>(parts.size())); break;
      case 4: if (!parts.empty()) parts.erase(parts.begin() + i); break;
      case 5: if (!parts.empty()) parts.insert(parts.begin() + i, parts[i]); break;
      case 6: if (parts.size() > 1) std::swap(parts[i], parts[pick(0, parts.size() - 1)]); break;
      case 7: v.num_mb = odd_value(v.num_mb); break;
      case 8: v.num_stages = odd_value(v.num_stages); break;
      case 9:
        if (!v.stage_to_rank.empty()) v.stage_to_rank[pick(0, v.stage_to_rank.size() - 1)] = odd_value(v.num_ranks());
        break;
      case 10:
        if (chance(50)) {
          v.ranks.pop_back();
        } else {
          v.ranks.emplace_back();
        }
        break;
      default:
        if (!parts.empty()) parts.resize(pick(0, parts.size() - 1));
        break;
    }
  }
}

ProgramView random_program() {
  ProgramView v;
  const int R = static_cast<int>(pick(1, 4));
  v.num_stages = static_cast<int32_t>(pick(1, 8));
  v.num_mb = static_cast<int32_t>(pick(1, 4));
  v.ranks.resize(R);
  for (int s = 0; s < v.num_stages; ++s) v.stage_to_rank.push_back(static_cast<int32_t>(pick(0, R - 1)));
  for (auto& parts : v.ranks) {
    const int n = static_cast<int>(pick(0, 24));
    int32_t action = 0;
    for (int k = 0; k < n; ++k) {
      parts.push_back(Part{static_cast<int32_t>(pick(0, v.num_stages - 1)), static_cast<int32_t>(pick(0, v.num_mb - 1)),
                           static_cast<int8_t>(pick(0, 7)), action});
      if (!chance(15)) ++action;
    }
  }
  return v;
}

CostModel random_costs(const ProgramView& v) {
  CostModel c;
  const int64_t S = std::max<int64_t>(0, std::min<int64_t>(v.num_stages, 64));
  const int64_t n = chance(80) ? 4 * S : pick(0, 4 * S + 4);
  for (int64_t k = 0; k < n; ++k) c.cost.push_back(chance(90) ? pick(1, 5) : -1.0);
  if (chance(50)) c.act.assign(chance(80) ? S : pick(0, S + 2), 1.0);
  c.comm = chance(90) ? 0.5 : -1.0;
  return c;
}

// Every entry point on one program; returns whether check_view took it.
bool drive(const ProgramView& v) {
  const CostModel costs = random_costs(v);
  const ppfast::Fault view = ppfast::check_view(v, &costs);
  const ppfast::Fault shape = ppfast::check_view(v);
  const ppfast::Fault structure = ppfast::check_structure(v);
  const ppfast::Fault order = ppfast::check_pair_order(v);
  const ppfast::Result strict = ppfast::run_program(v, ppfast::Mode::kStrict, CostModel{});
  const ppfast::Result timed = ppfast::run_program(v, ppfast::Mode::kTimed, costs);
  ppfast::Result timing;
  const auto rows = ppfast::lower_program(v, costs, &timing);
  if (!shape.ok && (structure.ok || order.ok || strict.error.empty())) {
    die("check_view refused a program another entry point took: " + ppfast::describe(shape));
  }
  if (!view.ok && (timed.error.empty() || timing.error.empty())) {
    die("check_view refused a program with its costs, and the timed walk took it: " +
        ppfast::describe(view));
  }
  if (ppfast::describe(shape).empty() != shape.ok) die("a fault without a description");
  return shape.ok;
}

int64_t fake_itemsize(int64_t code) { return code >= 0 && code < 12 ? int64_t(1) << (code % 4) : 0; }

void drive_meta(std::vector<int64_t> words) {
  std::vector<ppfast::wire::TensorMeta> metas;
  int64_t flags = 0;
  const std::string why = ppfast::wire::decode(words.data(), static_cast<int64_t>(words.size()),
                                               fake_itemsize, &metas, &flags);
  if (!why.empty()) {
    if (!metas.empty()) die("a refused header left tensors behind");
    return;
  }
  std::vector<int64_t> again(ppfast::wire::kMetaLen);
  if (!ppfast::wire::encode(metas, flags, again.data()).empty() || again != words) {
    die("a header decode() took does not encode back to the same words");
  }
}

}  // namespace

int main(int argc, char** argv) {
  const int cases = argc > 1 ? std::atoi(argv[1]) : 50000;
  rng.seed(argc > 2 ? std::strtoull(argv[2], nullptr, 10) : 1);
  std::vector<ProgramView> bases;
  for (int p : {1, 2, 3}) {
    for (int v : {1, 2}) {
      for (bool split : {false, true}) {
        bases.push_back(gpipe(p, v, p + 1, split));
        bases.push_back(lowered(bases.back()));
      }
    }
  }
  int accepted = 0;
  for (const auto& b : bases) {
    if (!drive(b)) die("a base program was refused");
  }
  for (int k = 0; k < cases; ++k) {
    ProgramView v = chance(70) ? bases[pick(0, bases.size() - 1)] : random_program();
    if (chance(90)) mutate(v);
    accepted += drive(v);
  }
  int meta_ok = 0;
  for (int k = 0; k < cases; ++k) {
    std::vector<ppfast::wire::TensorMeta> tensors(pick(0, ppfast::wire::kMaxTensors));
    for (auto& t : tensors) {
      t.dtype = pick(0, 11);
      t.shape.resize(pick(0, ppfast::wire::kMaxDims));
      for (auto& d : t.shape) d = pick(0, 64);
    }
    std::vector<int64_t> words(ppfast::wire::kMetaLen);
    if (!ppfast::wire::encode(tensors, pick(0, 1), words.data()).empty()) {
      die("a valid header does not encode");
    }
    const int edits = static_cast<int>(pick(0, 3));
    for (int e = 0; e < edits; ++e) {
      int64_t& w = words[pick(0, words.size() - 1)];
      switch (pick(0, 4)) {
        case 0: w = -w - 1; break;
        case 1: w ^= int64_t(1) << pick(0, 63); break;
        case 2: w = std::numeric_limits<int64_t>::max(); break;
        case 3: w = pick(-2, 40); break;
        default: w = static_cast<int64_t>(rng()); break;
      }
    }
    // half the time the check word is made to match, as a sender that wrote these words
    // would have: the fields' own checks must then hold on their own
    if (chance(50)) words.back() = ppfast::wire::check_word(words.data());
    if (chance(5)) words.resize(pick(0, words.size() + 4));
    if (edits == 0 && words.size() == static_cast<size_t>(ppfast::wire::kMetaLen)) ++meta_ok;
    drive_meta(words);
  }
  std::printf("ppfast_fuzz: %d programs (%d passed check_view), %d headers (%d intact): no crash, "
              "every verdict consistent\n",
              cases + static_cast<int>(bases.size()), accepted, cases, meta_ok);
  return 0;
}
