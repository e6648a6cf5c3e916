// The shape header: what a step that agrees shapes sends ahead of each tensor list, so that
// the receiver can allocate the buffers for it (see runtime/executor.h).
//
// kMetaLen int64 words: [magic, count | flags << 32, then per tensor: dtype code, ndim,
// kMaxDims sizes, then a check word]. Flags say how the sender sends (kFlagChecksum: each
// message is followed by its checksum trailer, wire/checksum.h), so that ranks that disagree
// find out at the first step. Words past the tensors and past each tensor's dimensions are zero; the
// check word is a hash of all the others. The header comes from another process, so decode()
// trusts none of it: a wrong magic (a data message taken for a header, as when a pair's
// messages are matched in different orders), a check word that does not match (a header
// corrupted in transit), a count, rank, size or dtype code out of range, or a non-zero unused
// word is an error naming the word, never an out-of-bounds read or a huge allocation. Pure C++17, no torch: the fuzz tests drive it under
// the sanitizers, and the executor supplies the dtype table.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace ppfast::wire {

constexpr int kMaxTensors = 16;
constexpr int kMaxDims = 8;
constexpr int64_t kMetaLen = 2 + kMaxTensors * (2 + kMaxDims) + 1;
constexpr int64_t kMetaMagic = 0x7070666d65746102;  // "ppfmeta", version 2
// The most bytes one tensor of a header may claim (64 TiB): a corrupted size fails here, not
// in the allocator.
constexpr int64_t kMaxTensorBytes = int64_t(1) << 46;

struct TensorMeta {
  int64_t dtype = 0;
  std::vector<int64_t> shape;
  bool operator==(const TensorMeta& o) const { return dtype == o.dtype && shape == o.shape; }
};

constexpr int64_t kFlagChecksum = 1;
constexpr int64_t kKnownFlags = kFlagChecksum;

// Bytes per element of a dtype code, or 0 when the code names no dtype that may be sent.
using ItemSize = int64_t (*)(int64_t code);

// The check word of a header's first kMetaLen - 1 words.
int64_t check_word(const int64_t* words);

// Writes the header of `tensors` into out[0, kMetaLen). Empty on success, else why not (too
// many tensors or dimensions).
std::string encode(const std::vector<TensorMeta>& tensors, int64_t flags, int64_t* out);

// Reads a header of `n` words. Empty on success (with `out` filled), else what is wrong (and
// `out` empty).
std::string decode(const int64_t* words, int64_t n, ItemSize itemsize,
                   std::vector<TensorMeta>* out, int64_t* flags);

}  // namespace ppfast::wire
