"""Huffman coding of stored weights (Deep Compression's last stage)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from pycompress.entropy import (
    MAX_CODE_LENGTH,
    code_lengths,
    entropy_bits_per_symbol,
    huffman_decode,
    huffman_encode,
)


def _quantized_weights(n, gen, sparsity=0.0):
    w = torch.randn(n, generator=gen)
    q = torch.clamp(torch.round(w / w.abs().max() * 127), -127, 127).to(torch.int8)
    if sparsity:
        q[torch.rand(n, generator=gen) < sparsity] = 0
    return q


@pytest.mark.parametrize("case", ["gaussian", "pruned", "uniform", "constant", "two", "empty", "uint8"])
def test_round_trip(case, gen):
    t = {
        "gaussian": lambda: _quantized_weights(100_003, gen),
        "pruned": lambda: _quantized_weights(50_000, gen, sparsity=0.9),
        "uniform": lambda: torch.randint(-128, 128, (4096,), dtype=torch.int8, generator=gen),
        "constant": lambda: torch.full((777,), -5, dtype=torch.int8),
        "two": lambda: torch.tensor([0, 1, 1, 0, 1], dtype=torch.int8),
        "empty": lambda: torch.zeros(0, dtype=torch.int8),
        "uint8": lambda: torch.randint(0, 256, (999,), dtype=torch.uint8, generator=gen),
    }[case]()
    coded = huffman_encode(t.view(-1, 1) if t.numel() else t)
    assert torch.equal(huffman_decode(coded), t)


def test_size_is_within_one_bit_of_entropy(gen):
    for sparsity in (0.0, 0.5, 0.9):
        t = _quantized_weights(200_000, gen, sparsity)
        h = entropy_bits_per_symbol(t)
        coded = huffman_encode(t)
        bits_per_symbol = coded.payload.numel() * 8 / t.numel()
        # Huffman's bound: H <= L < H + 1.
        assert h <= bits_per_symbol + 8 / t.numel() and bits_per_symbol < h + 1, (sparsity, h, bits_per_symbol)
    # Pruned 8-bit weights are far from uniform: 90% zeros store in well under 8 bits.
    assert huffman_encode(_quantized_weights(200_000, gen, 0.9)).nbytes < 200_000 * 0.25


def test_code_lengths_are_limited_and_prefix_free():
    fib = [1, 1]
    while len(fib) < 40:
        fib.append(fib[-1] + fib[-2])  # Fibonacci counts force the deepest optimal codes
    freqs = torch.zeros(256, dtype=torch.int64)
    freqs[:40] = torch.tensor(fib)
    lengths = code_lengths(freqs)
    assert int(lengths.max()) <= MAX_CODE_LENGTH
    assert sum(2.0 ** -int(v) for v in lengths.tolist() if v) <= 1.0
    symbols = torch.repeat_interleave(torch.arange(40, dtype=torch.uint8), torch.tensor(fib).clamp(max=5000))
    assert torch.equal(huffman_decode(huffman_encode(symbols)), symbols)


def test_corrupt_streams_are_refused(gen):
    t = _quantized_weights(10_000, gen, 0.5)
    coded = huffman_encode(t)
    with pytest.raises(ValueError, match="stream ends before"):
        huffman_decode(dataclasses.replace(coded, payload=coded.payload[: coded.payload.numel() // 2]))
    with pytest.raises(ValueError, match="stream ends before"):
        huffman_decode(dataclasses.replace(coded, count=coded.count + 1000))
    too_short = coded.lengths.clone()
    too_short[too_short > 0] = 1  # many symbols of length 1
    with pytest.raises(ValueError, match="Kraft"):
        huffman_decode(dataclasses.replace(coded, lengths=too_short))
    too_long = coded.lengths.clone()
    too_long[0] = MAX_CODE_LENGTH + 1
    with pytest.raises(ValueError, match="exceeds 16"):
        huffman_decode(dataclasses.replace(coded, lengths=too_long))
    sparse_code = torch.zeros(256, dtype=torch.uint8)
    sparse_code[7] = 2  # only code '00' assigned: other codes are holes
    with pytest.raises(ValueError, match="unassigned code"):
        huffman_decode(dataclasses.replace(coded, lengths=sparse_code, payload=torch.full((4,), 0xFF, dtype=torch.uint8),
                                           count=3))
    with pytest.raises(ValueError, match="shape"):
        huffman_decode(coded, shape=(3, 3))
    with pytest.raises(TypeError, match="int8 or uint8"):
        huffman_encode(torch.zeros(3))
