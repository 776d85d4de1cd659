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
        """Bytes as stored: the payload and the code lengths in their stored form (``stored_lengths``)."""
        return self.payload.numel() + stored_lengths(self.lengths)[0].numel()


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


def stored_lengths(lengths: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """The code lengths as a file stores them, and whether that is the pairs form: the 256 lengths, or
    (symbol, length) byte pairs of the symbols present where that is shorter (a 4-bit weight stream has
    at most 16 symbols: 32 bytes instead of 256)."""
    present = lengths.nonzero().reshape(-1)
    if 2 * present.numel() >= lengths.numel():
        return lengths, False
    return torch.stack([present.to(torch.uint8), lengths[present]], dim=1).reshape(-1).contiguous(), True


def lengths_from_stored(stored: torch.Tensor, pairs: bool) -> torch.Tensor:
    """The 256 code lengths from their stored form (``stored_lengths``). Raises ValueError on a malformed
    pairs list (odd size, symbols not strictly increasing, a zero or overlong length); the codec checks
    the code itself (Kraft's inequality) when it decodes."""
    if stored.dtype != torch.uint8 or stored.dim() != 1:
        raise ValueError(f"huffman: stored code lengths must be 1-D uint8, got {stored.dtype} {tuple(stored.shape)}")
    if not pairs:
        return stored
    if stored.numel() % 2 or stored.numel() > 512:
        raise ValueError(f"huffman: {stored.numel()} bytes are not a list of at most 256 (symbol, length) pairs")
    symbols, lengths = stored.view(-1, 2).to(torch.int64).unbind(1)
    if symbols.numel() and not (bool((symbols.diff() > 0).all()) and int(lengths.min()) >= 1
                                and int(lengths.max()) <= MAX_CODE_LENGTH):
        raise ValueError("huffman: the (symbol, length) pairs need strictly increasing symbols and lengths "
                         f"1..{MAX_CODE_LENGTH}")
    full = torch.zeros(256, dtype=torch.uint8)
    full[symbols] = lengths.to(torch.uint8)
    return full


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


# ---------------------------------------------------------------- integer weights as zero runs and nonzeros

RUN_ESCAPE = 255  # a run byte of 255 adds 255 zeros and continues the run; 0..254 ends it


@dataclass(frozen=True)
class ZeroRunCoded:
    """An integer weight matrix as Deep Compression stores a pruned layer: the lengths of the zero runs
    before each nonzero (and after the last), row-major over the whole matrix, and the nonzero values,
    each stream Huffman-coded. Its size follows the nonzeros, whatever layout the kernel unpacks them to."""

    runs: HuffmanCoded    # run bytes: r // 255 escapes (255) then r % 255, one run per nonzero plus the tail
    values: HuffmanCoded  # the nonzeros, int8, row-major
    shape: tuple[int, int]
    nnz: int

    @property
    def nbytes(self) -> int:
        return self.runs.nbytes + self.values.nbytes


def zero_run_bytes(q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(run bytes, nonzero values) of an int8 matrix, row-major (``ZeroRunCoded``)."""
    flat = q.detach().reshape(-1)
    where = flat.nonzero().reshape(-1)
    ends = torch.cat([where, torch.tensor([flat.numel()])])
    runs = ends - torch.cat([torch.tensor([-1]), where]) - 1
    per_run = runs // RUN_ESCAPE + 1
    out = torch.full((int(per_run.sum()),), RUN_ESCAPE, dtype=torch.uint8)
    out[per_run.cumsum(0) - 1] = (runs % RUN_ESCAPE).to(torch.uint8)
    return out, flat[where].contiguous()


def zero_run_encode(q: torch.Tensor) -> ZeroRunCoded:
    """Code an int8 matrix as zero runs and nonzero values (``ZeroRunCoded``)."""
    if q.dtype != torch.int8 or q.dim() != 2:
        raise TypeError(f"zero_run_encode: expected a 2-D int8 tensor, got {q.dtype} {tuple(q.shape)}")
    runs, values = zero_run_bytes(q)
    return ZeroRunCoded(huffman_encode(runs), huffman_encode(values), tuple(q.shape), values.numel())


def zero_run_decode(runs: torch.Tensor, values: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """The int8 matrix of ``shape`` from its decoded run bytes and nonzero values. Raises ValueError when
    the streams do not describe exactly that many weights (a run count other than nonzeros + 1, a zero
    among the values, an escape with no end, runs that cover more or fewer than rows x columns); the
    matrix is allocated only after that, so its size is bounded by the streams (255 weights a run byte)."""
    if runs.dtype != torch.uint8 or runs.dim() != 1 or values.dtype != torch.int8 or values.dim() != 1:
        raise ValueError(f"zero runs: expected 1-D uint8 runs and int8 values, got {runs.dtype} "
                         f"{tuple(runs.shape)} and {values.dtype} {tuple(values.shape)}")
    ends = (runs != RUN_ESCAPE).nonzero().reshape(-1)
    if ends.numel() != values.numel() + 1 or ends[-1] != runs.numel() - 1:
        raise ValueError(f"zero runs: {ends.numel()} runs{' and a trailing escape' if ends.numel() and ends[-1] != runs.numel() - 1 else ''}"
                         f" for {values.numel()} nonzeros (expected nonzeros + 1, the last ending the stream)")
    if bool((values == 0).any()):
        raise ValueError("zero runs: a stored nonzero value is 0")
    escapes = ends - torch.cat([torch.tensor([-1]), ends[:-1]]) - 1
    lengths = escapes * RUN_ESCAPE + runs[ends].to(torch.int64)
    total = int(lengths.sum()) + values.numel()
    rows, cols = shape
    if total != rows * cols:
        raise ValueError(f"zero runs: the runs and nonzeros cover {total} weights, the layer's {rows}x{cols} "
                         f"matrix has {rows * cols}")
    q = torch.zeros(rows * cols, dtype=torch.int8)
    q[(lengths[:-1] + 1).cumsum(0) - 1] = values
    return q.view(rows, cols)


def entropy_bits_per_symbol(t: torch.Tensor) -> float:
    """Shannon entropy of the tensor's byte histogram (the bound Huffman approaches)."""
    counts = torch.bincount(_as_bytes(t).to(torch.int64), minlength=256).double()
    p = counts[counts > 0] / counts.sum()
    return float(-(p * p.log2()).sum()) if p.numel() else 0.0
