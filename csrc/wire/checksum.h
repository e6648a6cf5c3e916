// The payload check of PPFAST_CHECKSUM: a 64-bit hash of a message's bytes, sent after the
// message in a small trailer that also names the message and the step, so that a payload
// corrupted, duplicated, dropped or swapped with another in transit is caught by its receiver
// instead of training on. Pure C++17.
#pragma once

#include <cstddef>
#include <cstdint>

namespace ppfast::wire {

// Words of a trailer: [kTrailerMark, the message's tag, the step's index, the payload's hash].
constexpr int64_t kTrailerLen = 4;
constexpr int64_t kTrailerMark = 0x7070667461696c01;  // "ppftail", version 1

// Hash of `n` bytes, continuing from `seed` (hash a message's tensors one after another).
// Four independent lanes over 8-byte words, so it runs near memory speed; not cryptographic:
// it is meant to catch accidents, not an adversary.
uint64_t hash_bytes(const void* data, size_t n, uint64_t seed);

}  // namespace ppfast::wire
