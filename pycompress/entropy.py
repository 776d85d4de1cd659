"""Entropy coding of stored weights: the last stage of Deep Compression.

Han, Mao & Dally prune, quantize, then Huffman-code the quantized weights and
the sparse indices: after pruning and 8-bit quantization the symbols are far
from uniform (most weights sit near zero), so a canonical Huffman code stores
them in close to their Shannon entropy. The codec itself is C++
(csrc/entropy/huffman.h); this module picks the code lengths and carries the
result.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass

import torch

from pycompress import _C

MAX_CODE_LENGTH = _C.huffman_max_code_length()


@dataclass(frozen=True)
class HuffmanCoded:
    """A byte tensor coded with a canonical Huffman code.

    ``lengths`` (uint8 [256]) alone defines the code; ``payload`` (uint8) holds
    the bits MSB first; ``count`` symbols of ``dtype`` (int8 or uint8) were coded.
    """

    lengths: torch.Tensor
    payload: torch.Tensor
    count: int
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return self.payload.numel() + self.lengths.numel()


def _as_bytes(t: torch.Tensor) -> torch.Tensor:
    if t.dtype not in (torch.int8, torch.uint8):
        raise TypeError(f"huffman: expected an int8 or uint8 tensor, got {t.dtype}")
    return t.detach().reshape(-1).contiguous().view(torch.uint8)


def code_lengths(frequencies: torch.Tensor, max_length: int = MAX_CODE_LENGTH) -> torch.Tensor:
    """Huffman code lengths (uint8 [256]) for symbol counts, limited to ``max_length`` bits.

    A symbol that never occurs gets length 0. When the optimal code is deeper than
    ``max_length``, counts are flattened (halved, kept >= 1) until it fits: a few
    tenths of a percent of size on extreme distributions, in exchange for a
    bounded decoder table.
    """
    counts = [int(c) for c in frequencies.tolist()]
    if len(counts) != 256:
        raise ValueError(f"huffman: expected 256 frequencies, got {len(counts)}")
    present = [s for s in range(256) if counts[s] > 0]
    lengths = [0] * 256
    if len(present) == 1:
        lengths[present[0]] = 1
        return torch.tensor(lengths, dtype=torch.uint8)
    while present:
        heap = [(counts[s], s, (s,)) for s in present]
        heapq.heapify(heap)
        depth = dict.fromkeys(present, 0)
        tiebreak = 256
        while len(heap) > 1:
            c1, _, g1 = heapq.heappop(heap)
            c2, _, g2 = heapq.heappop(heap)
            for s in g1 + g2:
                depth[s] += 1
            heapq.heappush(heap, (c1 + c2, tiebreak, g1 + g2))
            tiebreak += 1
        if max(depth.values()) <= max_length:
            for s, d in depth.items():
                lengths[s] = d
            break
        counts = [(c + 1) // 2 if c > 0 else 0 for c in counts]
    return torch.tensor(lengths, dtype=torch.uint8)


def huffman_encode(t: torch.Tensor) -> HuffmanCoded:
    """Code an int8/uint8 tensor (any shape; it is flattened)."""
    symbols = _as_bytes(t)
    n = symbols.numel()
    lengths = code_lengths(torch.bincount(symbols.to(torch.int64), minlength=256))
    nbytes = _C.huffman_encoded_bytes(symbols.data_ptr(), n, lengths.data_ptr())
    payload = torch.empty(nbytes, dtype=torch.uint8)
    _C.huffman_encode(symbols.data_ptr(), n, lengths.data_ptr(), payload.data_ptr(), nbytes)
    return HuffmanCoded(lengths=lengths, payload=payload, count=n, dtype=t.dtype)


def huffman_decode(coded: HuffmanCoded, shape: tuple[int, ...] | None = None) -> torch.Tensor:
    """Decode to a tensor of ``coded.dtype`` and ``shape`` (flat by default).

    Raises ValueError on anything inconsistent (lengths, payload, count, shape)
    before or while decoding; never reads outside the payload.
    """
    lengths, payload = coded.lengths, coded.payload
    if lengths.dtype != torch.uint8 or lengths.shape != (256,):
        raise ValueError(f"huffman: code lengths must be uint8 [256], got {lengths.dtype} {tuple(lengths.shape)}")
    if payload.dtype != torch.uint8 or payload.dim() != 1:
        raise ValueError(f"huffman: payload must be 1-D uint8, got {payload.dtype} {tuple(payload.shape)}")
    if coded.dtype not in (torch.int8, torch.uint8) or coded.count < 0:
        raise ValueError(f"huffman: cannot decode {coded.count} symbols of {coded.dtype}")
    if shape is not None and math.prod(shape) != coded.count:
        raise ValueError(f"huffman: shape {tuple(shape)} holds {math.prod(shape)} values, the stream {coded.count}")
    lengths, payload = lengths.contiguous(), payload.contiguous()
    out = torch.empty(coded.count, dtype=torch.uint8)
    _C.huffman_decode(payload.data_ptr(), payload.numel(), lengths.data_ptr(), out.data_ptr(), coded.count)
    out = out.view(coded.dtype)
    return out.view(shape) if shape is not None else out


def entropy_bits_per_symbol(t: torch.Tensor) -> float:
    """Shannon entropy of the tensor's byte histogram (the bound Huffman approaches)."""
    counts = torch.bincount(_as_bytes(t).to(torch.int64), minlength=256).double()
    p = counts[counts > 0] / counts.sum()
    return float(-(p * p.log2()).sum()) if p.numel() else 0.0
