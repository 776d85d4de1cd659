"""Huffman coding of stored weights (Deep Compression's last stage)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from pycompress.entropy import (
    MAX_CODE_LENGTH,
    RUN_ESCAPE,
    HuffmanCoded,
    code_lengths,
    entropy_bits_per_symbol,
    huffman_decode,
    huffman_encode,
    lengths_from_stored,
    stored_lengths,
    zero_run_bytes,
    zero_run_decode,
    zero_run_encode,
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


# ---------------------------------------------------------------- code lengths as stored


@pytest.mark.parametrize("symbols", [1, 2, 16, 127, 128, 256])
def test_stored_lengths_round_trip_and_take_the_shorter_form(symbols, gen):
    t = torch.randint(0, symbols, (5000,), dtype=torch.uint8, generator=gen)
    t[:symbols] = torch.arange(symbols, dtype=torch.uint8)  # every symbol present
    coded = huffman_encode(t)
    stored, pairs = stored_lengths(coded.lengths)
    assert pairs == (symbols < 128)  # pairs cost 2 bytes a present symbol, the full table 256
    assert stored.numel() == (2 * symbols if pairs else 256)
    assert coded.nbytes == coded.payload.numel() + stored.numel()
    assert torch.equal(lengths_from_stored(stored, pairs), coded.lengths)
    back = HuffmanCoded(lengths_from_stored(stored, pairs), coded.payload, coded.count, torch.uint8)
    assert torch.equal(huffman_decode(back), t)


@pytest.mark.parametrize("stored,message", [
    (torch.tensor([3, 2, 1], dtype=torch.uint8), "not a list of at most 256"),
    (torch.tensor([5, 1, 5, 2], dtype=torch.uint8), "strictly increasing symbols"),
    (torch.tensor([5, 1, 4, 2], dtype=torch.uint8), "strictly increasing symbols"),
    (torch.tensor([5, 0, 6, 1], dtype=torch.uint8), "lengths 1..16"),
    (torch.tensor([5, 17, 6, 1], dtype=torch.uint8), "lengths 1..16"),
    (torch.zeros(2, 2, dtype=torch.uint8), "must be 1-D uint8"),
])
def test_malformed_stored_lengths_are_refused(stored, message):
    with pytest.raises(ValueError, match=message):
        lengths_from_stored(stored, pairs=True)


# ---------------------------------------------------------------- integer weights as zero runs and nonzeros


def _sparse_int8(shape, density, gen):
    q = torch.randint(-127, 128, shape, dtype=torch.int8, generator=gen)
    q[torch.rand(shape, generator=gen) >= density] = 0
    return q


ZERO_RUN_CASES = {
    "dense": lambda gen: torch.randint(1, 128, (7, 33), dtype=torch.int8, generator=gen),
    "90%": lambda gen: _sparse_int8((64, 100), 0.1, gen),
    "99.9%": lambda gen: _sparse_int8((300, 1000), 0.001, gen),  # runs of hundreds: escapes
    "all zero": lambda gen: torch.zeros(40, 40, dtype=torch.int8),  # one run of 1600: 6 escapes
    "one row": lambda gen: _sparse_int8((1, 777), 0.3, gen),
    "extremes": lambda gen: torch.tensor([[-128, 0, 127], [0, 0, 0], [1, -1, 0]], dtype=torch.int8),
}


@pytest.mark.parametrize("case", sorted(ZERO_RUN_CASES))
def test_zero_run_coding_round_trips(case, gen):
    q = ZERO_RUN_CASES[case](gen)
    runs, values = zero_run_bytes(q)
    assert values.dtype == torch.int8 and values.numel() == int(q.count_nonzero())
    assert torch.equal(values, q[q != 0])  # row-major order
    assert int((runs != RUN_ESCAPE).sum()) == values.numel() + 1
    assert torch.equal(zero_run_decode(runs, values, tuple(q.shape)), q)
    coded = zero_run_encode(q)
    assert coded.nnz == values.numel() and coded.shape == tuple(q.shape)
    assert torch.equal(zero_run_decode(huffman_decode(coded.runs), huffman_decode(coded.values), coded.shape), q)


def test_zero_runs_at_the_escape_boundaries():
    """Runs of 254, 255 and 510 zeros: one byte, an escape and a 0, two escapes and a 0."""
    q = torch.zeros(1, 254 + 1 + 255 + 1 + 510 + 1, dtype=torch.int8)
    q[0, 254], q[0, 254 + 1 + 255], q[0, -1] = 3, -4, 5
    runs, values = zero_run_bytes(q)
    assert runs.tolist() == [254, 255, 0, 255, 255, 0, 0]
    assert values.tolist() == [3, -4, 5]
    assert torch.equal(zero_run_decode(runs, values, tuple(q.shape)), q)


def test_zero_runs_of_a_90_percent_sparse_4_bit_layer_store_in_under_9_bits_a_nonzero(gen):
    """Deep Compression's point: the size follows the nonzeros. 4-bit values (15 symbols) and the runs
    between 10%-dense weights (geometric: ~4.7 bits of entropy) in < 9 bits a nonzero (entropy 3.9 + 4.7), where
    1x4 blocks of int8 spend ~4 x 8 + 16 index bits on most nonzeros."""
    q = torch.randint(-7, 8, (256, 1024), dtype=torch.int8, generator=gen)
    q[torch.rand(q.shape, generator=gen) >= 0.1] = 0
    coded = zero_run_encode(q)
    assert coded.nbytes * 8 / coded.nnz < 9, coded.nbytes * 8 / coded.nnz


@pytest.mark.parametrize("runs,values,shape,message", [
    ([3, 3], [5], (2, 3), "cover 7 weights, the layer's 2x3 matrix has 6"),
    ([3], [5], (2, 3), "1 runs for 1 nonzeros"),
    ([0, 0, 0], [5], (1, 2), "3 runs for 1 nonzeros"),
    ([1, 255], [5], (1, 300), "the last ending the stream"),
    ([0, 0], [0], (1, 1), "a stored nonzero value is 0"),
    ([255, 255, 255, 255, 255, 255, 10], [], (10**6, 10**6), "cover 1540 weights"),  # never allocates 10^12
])
def test_malformed_zero_runs_are_refused(runs, values, shape, message):
    with pytest.raises(ValueError, match=message):
        zero_run_decode(torch.tensor(runs, dtype=torch.uint8), torch.tensor(values, dtype=torch.int8), shape)
