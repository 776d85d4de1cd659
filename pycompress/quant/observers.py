"""Activation range observers and the uint8-with-zero-point parameters they produce.

The parameters follow the int8 kernels exactly (csrc/q8/q8_gemm.h): the range is
widened to include 0, ``scale = max((hi - lo) / qmax, FLT_MIN)`` and
``zero_point = clamp(round(-lo * (1 / scale)), 0, qmax)``, every step in float32,
with ``qmax = 2^bits - 1`` (255 for the kernels).
"""

from __future__ import annotations

import torch

_F32 = torch.float32
_FLT_MIN = torch.finfo(torch.float32).tiny
# Percentile and MSE observers keep at most this many values per batch (an even
# stride through the batch) and in total, so calibration memory stays bounded.
_SAMPLES_PER_BATCH = 1 << 16
_MAX_SAMPLES = 1 << 22


def affine_qparams(lo: float, hi: float, bits: int = 8) -> tuple[float, int]:
    """(scale, zero_point) of the uint8 range covering [lo, hi] (and 0)."""
    qmax = torch.tensor(float(2 ** bits - 1), dtype=_F32)
    lo_t = torch.minimum(torch.tensor(lo, dtype=_F32), torch.zeros((), dtype=_F32))
    hi_t = torch.maximum(torch.tensor(hi, dtype=_F32), torch.zeros((), dtype=_F32))
    scale = (hi_t - lo_t) / qmax
    scale = torch.clamp(scale, min=_FLT_MIN)
    inv = torch.tensor(1.0, dtype=_F32) / scale
    zp = torch.clamp(torch.round(-lo_t * inv), 0, qmax)
    return float(scale), int(zp)


def fake_quantize_affine(x: torch.Tensor, scale: torch.Tensor | float, zp: torch.Tensor | int, bits: int = 8):
    """x -> (clamp(round(clamp(x / scale, -256, 256)) + zp, 0, qmax) - zp) * scale, with
    ``1 / scale`` taken once in float32 as the kernels do. No gradient logic here."""
    qmax = 2 ** bits - 1
    scale = torch.as_tensor(scale, dtype=_F32)
    zp = torch.as_tensor(zp, dtype=_F32)
    inv = torch.tensor(1.0, dtype=_F32) / scale
    # The kernels clamp x/scale to [-256, 256] before rounding (int32 safety); keep it
    # for bit-compatibility: anything beyond already saturates at 0 or qmax.
    v = torch.clamp(x.to(_F32) * inv, -256.0, 256.0)
    q = torch.clamp(torch.round(v) + zp, 0, qmax)
    return ((q - zp) * scale).to(x.dtype)


class Observer:
    """Accumulates the range of the values it sees; ``qparams()`` returns (scale, zp)."""

    name = "base"

    def __init__(self, bits: int = 8) -> None:
        self.bits = bits
        self.lo: float | None = None
        self.hi: float | None = None
        self.batches = 0

    def update(self, x: torch.Tensor) -> None:
        x = x.detach()
        finite = x[torch.isfinite(x)]
        if finite.numel() == 0:
            return
        lo, hi = float(finite.min()), float(finite.max())
        self.lo = lo if self.lo is None else min(self.lo, lo)
        self.hi = hi if self.hi is None else max(self.hi, hi)
        self.batches += 1
        self._collect(finite)

    def _collect(self, x: torch.Tensor) -> None:
        pass

    def range(self) -> tuple[float, float]:
        return self.lo, self.hi

    def qparams(self) -> tuple[float, int]:
        if self.lo is None:
            raise ValueError("observer saw no finite values")
        lo, hi = self.range()
        return affine_qparams(lo, hi, self.bits)


class MinMaxObserver(Observer):
    """The full observed range [min, max]."""

    name = "minmax"


class _SamplingObserver(Observer):
    def __init__(self, bits: int = 8) -> None:
        super().__init__(bits)
        self.samples: list[torch.Tensor] = []
        self.kept = 0

    def _collect(self, x: torch.Tensor) -> None:
        flat = x.reshape(-1).to(_F32)
        if flat.numel() > _SAMPLES_PER_BATCH:
            stride = -(-flat.numel() // _SAMPLES_PER_BATCH)
            flat = flat[::stride]
        if self.kept + flat.numel() <= _MAX_SAMPLES:
            self.samples.append(flat.clone())
            self.kept += flat.numel()

    def values(self) -> torch.Tensor:
        return torch.cat(self.samples)


class PercentileObserver(_SamplingObserver):
    """[q(100 - p), q(p)] of the observed values (linear interpolation, as torch.quantile)."""

    name = "percentile"

    def __init__(self, bits: int = 8, percentile: float = 99.99) -> None:
        super().__init__(bits)
        if not 50.0 < percentile <= 100.0:
            raise ValueError(f"percentile must be in (50, 100], got {percentile}")
        self.percentile = percentile

    def range(self) -> tuple[float, float]:
        v = self.values().to(torch.float64)
        q = torch.tensor([1.0 - self.percentile / 100.0, self.percentile / 100.0], dtype=torch.float64)
        lo, hi = torch.quantile(v, q).tolist()
        return lo, hi


class MSEObserver(_SamplingObserver):
    """The range [a * min, b * max] minimizing the mean squared fake-quantization error
    on the observed values, with a, b on a grid of ``steps`` values in (0, 1], found by
    coordinate search (the max end, then the min end, twice); ties go to the widest
    range. The two ends are searched separately so that clipping a long positive
    tail does not also clip the negative side."""

    name = "mse"

    def __init__(self, bits: int = 8, steps: int = 100) -> None:
        super().__init__(bits)
        self.steps = steps

    def _error(self, v: torch.Tensor, lo: float, hi: float) -> float:
        scale, zp = affine_qparams(lo, hi, self.bits)
        return float(((fake_quantize_affine(v, scale, zp, self.bits) - v).double() ** 2).mean())

    def range(self) -> tuple[float, float]:
        v = self.values()
        lo, hi = self.lo, self.hi
        grid = [1.0 - i / self.steps for i in range(self.steps)]
        for _ in range(2):
            hi = min((self._error(v, lo, a * self.hi), -a, a * self.hi) for a in grid)[2]
            lo = min((self._error(v, a * self.lo, hi), -a, a * self.lo) for a in grid)[2]
        return lo, hi


def reduce_observers(observers: list[Observer], comm) -> None:
    """Make each rank's observers hold what one observer gets on every rank's values (in place;
    ``comm``: a pycompress.distributed.Comm). Min and max: ``all_reduce`` MIN / MAX in float64 (exact: the
    ranges are float32 values); counts: int64 sums; the percentile / MSE samples: every rank's, in rank
    order, kept under the same cap as one observer keeps them (with contiguous shards, rank r holding
    the batches after rank r - 1's, exactly the values one observer keeps)."""
    if not comm.active or not observers:
        return
    inf = float("inf")
    ends = torch.tensor([inf if o.lo is None else o.lo for o in observers]
                        + [inf if o.hi is None else -o.hi for o in observers], dtype=torch.float64)
    comm.all_reduce_(ends, "min", "reducing the observed activation ranges")
    counts = comm.all_reduce_(torch.tensor([o.batches for o in observers], dtype=torch.int64), "sum",
                              "reducing the observed activation ranges")
    k = len(observers)
    for i, o in enumerate(observers):
        lo, neg_hi = float(ends[i]), float(ends[k + i])
        o.lo, o.hi = (None, None) if lo == inf else (lo, -neg_hi)
        o.batches = int(counts[i])
    sampling = [o for o in observers if isinstance(o, _SamplingObserver)]
    if sampling:
        gathered = comm.all_gather_object([o.samples for o in sampling], "gathering the observers' samples")
        for i, o in enumerate(sampling):
            o.samples, o.kept = [], 0
            for rank_lists in gathered:
                for chunk in rank_lists[i]:
                    if o.kept + chunk.numel() <= _MAX_SAMPLES:
                        o.samples.append(chunk)
                        o.kept += chunk.numel()


OBSERVERS = {cls.name: cls for cls in (MinMaxObserver, PercentileObserver, MSEObserver)}


def make_observer(kind: str, bits: int = 8, percentile: float = 99.99) -> Observer:
    if kind not in OBSERVERS:
        raise ValueError(f"unknown observer {kind!r}; expected one of {sorted(OBSERVERS)}")
    if kind == "percentile":
        return PercentileObserver(bits, percentile)
    return OBSERVERS[kind](bits)
