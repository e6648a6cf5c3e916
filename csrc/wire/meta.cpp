// The shape header; see meta.h.
#include "wire/meta.h"

namespace ppfast::wire {

int64_t check_word(const int64_t* d) {
  // FNV-1a over the words' bytes, then a final mix: any change of a word changes it.
  uint64_t h = 0xcbf29ce484222325ULL;
  for (int64_t i = 0; i < kMetaLen - 1; ++i) {
    uint64_t w = static_cast<uint64_t>(d[i]);
    for (int b = 0; b < 8; ++b, w >>= 8) h = (h ^ (w & 0xff)) * 0x100000001b3ULL;
  }
  h ^= h >> 33;
  h *= 0xff51afd7ed558ccdULL;
  h ^= h >> 33;
  return static_cast<int64_t>(h);
}

std::string encode(const std::vector<TensorMeta>& tensors, int64_t flags, int64_t* out) {
  if (tensors.size() > static_cast<size_t>(kMaxTensors)) {
    return "a stage may pass at most " + std::to_string(kMaxTensors) +
           " tensors to its neighbour, not " + std::to_string(tensors.size());
  }
  for (int64_t i = 0; i < kMetaLen; ++i) out[i] = 0;
  out[0] = kMetaMagic;
  out[1] = static_cast<int64_t>(tensors.size()) | (flags << 32);
  int64_t pos = 2;
  for (const auto& t : tensors) {
    if (t.shape.size() > static_cast<size_t>(kMaxDims)) {
      return "tensors passed between stages may have at most " + std::to_string(kMaxDims) +
             " dimensions, not " + std::to_string(t.shape.size());
    }
    out[pos] = t.dtype;
    out[pos + 1] = static_cast<int64_t>(t.shape.size());
    for (size_t k = 0; k < t.shape.size(); ++k) out[pos + 2 + k] = t.shape[k];
    pos += 2 + kMaxDims;
  }
  out[kMetaLen - 1] = check_word(out);
  return "";
}

std::string decode(const int64_t* d, int64_t n, ItemSize itemsize, std::vector<TensorMeta>* out,
                   int64_t* flags) {
  const auto s = [](int64_t v) { return std::to_string(v); };
  out->clear();
  std::vector<TensorMeta> tensors;  // handed out only once the whole header has passed
  if (d == nullptr || n != kMetaLen) {
    return "a shape header has " + s(kMetaLen) + " words, this message " + s(n);
  }
  if (d[0] != kMetaMagic) {
    return "word 0 is not the shape header's mark (the message is something else, or corrupted)";
  }
  if (d[kMetaLen - 1] != check_word(d)) {
    return "its check word does not match its contents (corrupted in transit)";
  }
  const int64_t count = d[1] & 0xffffffff;
  *flags = d[1] >> 32;
  if (*flags < 0 || (*flags & ~kKnownFlags) != 0) {
    return "word 1 holds flags " + s(*flags) + "; this version knows " + s(kKnownFlags);
  }
  if (count > kMaxTensors) {
    return "it announces " + s(count) + " tensors; at most " + s(kMaxTensors) + " may be sent";
  }
  for (int64_t i = 0; i < kMaxTensors; ++i) {
    const int64_t pos = 2 + i * (2 + kMaxDims);
    const int64_t ndim = d[pos + 1];
    if (i >= count) {
      for (int64_t k = pos; k < pos + 2 + kMaxDims; ++k) {
        if (d[k] != 0) return "word " + s(k) + ", past the " + s(count) + " tensors, is not 0";
      }
      continue;
    }
    const std::string which = "tensor " + s(i) + ": ";
    const int64_t item = itemsize(d[pos]);
    if (item <= 0) return which + "dtype code " + s(d[pos]) + " names no dtype that may be sent";
    if (ndim < 0 || ndim > kMaxDims) return which + s(ndim) + " dimensions (0 to " + s(kMaxDims) + ")";
    int64_t bytes = item;
    TensorMeta t;
    t.dtype = d[pos];
    for (int64_t k = 0; k < kMaxDims; ++k) {
      const int64_t size = d[pos + 2 + k];
      if (k >= ndim) {
        if (size != 0) return which + "size word " + s(k) + ", past its " + s(ndim) + " dimensions, is not 0";
        continue;
      }
      if (size < 0) return which + "dimension " + s(k) + " has size " + s(size);
      // The product of the sizes, zeros taken as ones (an empty tensor still has strides that
      // must not overflow), may not pass the limit; divide rather than multiply, which could.
      const int64_t span = size == 0 ? 1 : size;
      if (bytes > kMaxTensorBytes / span) {
        return which + "its sizes claim more than " + s(kMaxTensorBytes) + " bytes";
      }
      bytes *= span;
      t.shape.push_back(size);
    }
    tensors.push_back(std::move(t));
  }
  *out = std::move(tensors);
  return "";
}

}  // namespace ppfast::wire
