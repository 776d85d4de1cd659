#include "entropy/huffman.h"

#include <stdexcept>
#include <string>
#include <vector>

namespace pycompress {
namespace entropy {
namespace {

struct Code {
  uint32_t bits[256];
  uint8_t length[256];
};

// Canonical assignment; validates the lengths (range and Kraft's inequality).
Code canonical_code(const uint8_t* lengths) {
  Code code{};
  int count_per_length[kMaxCodeLength + 1] = {0};
  for (int s = 0; s < 256; ++s) {
    if (lengths[s] > kMaxCodeLength) {
      throw std::invalid_argument("huffman: code length " + std::to_string(lengths[s]) + " of symbol " +
                                  std::to_string(s) + " exceeds " + std::to_string(kMaxCodeLength));
    }
    if (lengths[s] > 0) ++count_per_length[lengths[s]];
  }
  // Kraft: sum 2^-len <= 1, in units of 2^-kMaxCodeLength.
  int64_t kraft = 0;
  for (int len = 1; len <= kMaxCodeLength; ++len) kraft += int64_t{count_per_length[len]} << (kMaxCodeLength - len);
  if (kraft > (int64_t{1} << kMaxCodeLength)) throw std::invalid_argument("huffman: code lengths violate Kraft's inequality");
  uint32_t next[kMaxCodeLength + 2] = {0};
  uint32_t c = 0;
  for (int len = 1; len <= kMaxCodeLength; ++len) {
    c = (c + count_per_length[len - 1]) << 1;
    next[len] = c;
  }
  for (int s = 0; s < 256; ++s) {
    code.length[s] = lengths[s];
    if (lengths[s] > 0) code.bits[s] = next[lengths[s]]++;
  }
  return code;
}

}  // namespace

int64_t huffman_encoded_bytes(const uint8_t* symbols, int64_t n, const uint8_t* lengths) {
  int64_t bits = 0;
  for (int64_t i = 0; i < n; ++i) {
    if (lengths[symbols[i]] == 0) {
      throw std::invalid_argument("huffman: symbol " + std::to_string(symbols[i]) + " has no code");
    }
    bits += lengths[symbols[i]];
  }
  return (bits + 7) / 8;
}

int64_t huffman_encode(const uint8_t* symbols, int64_t n, const uint8_t* lengths, uint8_t* out, int64_t out_bytes) {
  const Code code = canonical_code(lengths);
  uint64_t acc = 0;  // pending bits, MSB first, count in `pending`
  int pending = 0;
  int64_t pos = 0, bits = 0;
  for (int64_t i = 0; i < n; ++i) {
    const uint8_t s = symbols[i];
    const int len = code.length[s];
    if (len == 0) throw std::invalid_argument("huffman: symbol " + std::to_string(s) + " has no code");
    acc = (acc << len) | code.bits[s];
    pending += len;
    bits += len;
    while (pending >= 8) {
      if (pos >= out_bytes) throw std::invalid_argument("huffman: output buffer too small");
      out[pos++] = static_cast<uint8_t>(acc >> (pending - 8));
      pending -= 8;
    }
  }
  if (pending > 0) {
    if (pos >= out_bytes) throw std::invalid_argument("huffman: output buffer too small");
    out[pos++] = static_cast<uint8_t>(acc << (8 - pending));
  }
  return bits;
}

void huffman_decode(const uint8_t* in, int64_t in_bytes, const uint8_t* lengths, uint8_t* out, int64_t n) {
  const Code code = canonical_code(lengths);
  // Lookup table over the next kMaxCodeLength bits: (symbol << 8) | length, 0 = unassigned.
  std::vector<uint16_t> table(size_t{1} << kMaxCodeLength, 0);
  for (int s = 0; s < 256; ++s) {
    const int len = code.length[s];
    if (len == 0) continue;
    const uint32_t first = code.bits[s] << (kMaxCodeLength - len);
    const uint32_t span = uint32_t{1} << (kMaxCodeLength - len);
    for (uint32_t j = 0; j < span; ++j) table[first + j] = static_cast<uint16_t>((s << 8) | len);
  }
  uint64_t acc = 0;
  int have = 0;
  int64_t pos = 0;
  const int64_t total_bits = in_bytes * 8;
  int64_t consumed = 0;
  for (int64_t i = 0; i < n; ++i) {
    while (have <= 56 && pos < in_bytes) {
      acc |= static_cast<uint64_t>(in[pos++]) << (56 - have);
      have += 8;
    }
    const uint32_t window = static_cast<uint32_t>(acc >> (64 - kMaxCodeLength));
    const uint16_t entry = table[window];
    const int len = entry & 0xFF;
    if (len == 0) throw std::invalid_argument("huffman: stream holds an unassigned code");
    consumed += len;
    if (consumed > total_bits) throw std::invalid_argument("huffman: stream ends before " + std::to_string(n) + " symbols");
    out[i] = static_cast<uint8_t>(entry >> 8);
    acc <<= len;
    have -= len;
  }
}

}  // namespace entropy
}  // namespace pycompress
