// Canonical Huffman coding of byte streams: the entropy-coding stage of Deep
// Compression (Han, Mao, Dally) for stored int8 weights and sparse indices.
//
// A code is given by 256 code lengths (0 = symbol absent, 1..kMaxCodeLength).
// Codes are assigned canonically (by length, then symbol value) and written
// MSB first, so the lengths alone describe the code and the encoder and
// decoder cannot disagree. Everything read from a stream is checked: lengths
// must satisfy Kraft's inequality, every code read must be assigned, and the
// decoder never reads past the payload; violations throw std::invalid_argument.
#pragma once

#include <cstdint>

namespace pycompress {
namespace entropy {

constexpr int kMaxCodeLength = 16;  // keeps the decoder's lookup table at 64 Ki entries

// Bytes needed to encode n symbols with these lengths (exact, rounded up).
int64_t huffman_encoded_bytes(const uint8_t* symbols, int64_t n, const uint8_t* lengths);

// Writes the bitstream to out (out_bytes from huffman_encoded_bytes); returns bits written.
int64_t huffman_encode(const uint8_t* symbols, int64_t n, const uint8_t* lengths, uint8_t* out,
                       int64_t out_bytes);

// Decodes exactly n symbols from in[0, in_bytes).
void huffman_decode(const uint8_t* in, int64_t in_bytes, const uint8_t* lengths, uint8_t* out, int64_t n);

}  // namespace entropy
}  // namespace pycompress
