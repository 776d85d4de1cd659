"""What ``pycompress.convert`` decides without timing, per ISA level: the one home of those thresholds.

convert without ``example_inputs`` cannot time a layer, so it compares the layer's density with the
break-even points the sparse benchmark (``bench/bench_sparse.py``) measured against the dense int8 kernel
that would run instead, and keeps GEMMs below a minimum size in float. Those points move with the CPU:
the dense kernel of each ISA level runs at a different fraction of the sparse kernels' speed (AVX2's
dense u7 kernel is 1.3-1.9x its u8 one while its sparse kernels stay u8; AVX-512 VBMI has the byte sliced
layout that makes unstructured sparsity pay by its nonzeros). So each level has its own row, with where
its numbers were measured. ``pycompress.thresholds.current()`` is the active level's row (``pc.summary``
and the conversion record name it); with ``example_inputs`` convert times the candidates instead.

Sparse break-even points are those of the worst batch size among M <= 16 (the heuristic assumes
decode-size inputs), on one thread, 4096x4096, against the dense int8 layer convert would otherwise build.
"""

from __future__ import annotations

from dataclasses import dataclass

from pycompress._native import get_isa


@dataclass(frozen=True)
class Thresholds:
    int8_min_weights: int | None  # a dense int8 layer of fewer weights stays float; None: every layer does
    sparse_int8_max_block_density: float  # sparse-int8 candidate at or below this 1x4-block density
    sparse_int8_byte_layout_max_density: float  # ... or this density, where the byte sliced layout runs
    sparse_fp32_max_density: float  # sparse-fp32 (csr) candidate at or below this density
    measured: str  # where the numbers come from


_MIN_WEIGHTS_SOURCE = ("int8_min_weights: Zen 4, 2026-11-25 (`pycompress bench`: a 768x768 GEMV's few us of "
                       "kernel beside ~10-25 us of call overhead; fp32 MKL wins at batch 1 below ~16K weights)")

TIERS: dict[str, Thresholds] = {
    "amx": Thresholds(
        16384, 0.26, 0.17, 0.0,
        "bench_sparse on an Intel Xeon with AMX (2026-12-03 08:10), against the AMX dense kernel at M = 16, "
        "1 thread (at M <= 4 the AVX-512 one runs: break-even ~50%, as on avx512vbmi): 1x4 blocks break even "
        "at 73% sparsity, the byte sliced layout at 83% (density 0.17); csr never beats dense int8. "
        + _MIN_WEIGHTS_SOURCE),
    "avx512vbmi": Thresholds(
        16384, 0.26, 0.29, 0.0,
        "bench_sparse, Zen 4 (2026-11-25) and Zen 5 (2026-12-02 16:15), the lower of the two: 1x4 blocks "
        "break even with dense int8 at 74% sparsity (Zen 5, M = 4), the byte sliced layout at 71% "
        "(density 0.29); csr never beat dense int8 up to 95% on Zen 5 (0.0: never untimed). " + _MIN_WEIGHTS_SOURCE),
    "avx512vnni": Thresholds(
        16384, 0.30, 0.0, 0.06,
        "bench_sparse on Zen 4's AVX-512 VNNI path before the byte layout (2026-11-25): 1x4 blocks break "
        "even at 70% sparsity (M = 16); no byte layout without VBMI; csr at ~94%. " + _MIN_WEIGHTS_SOURCE),
    "avxvnni": Thresholds(
        16384, 0.20, 0.0, 0.0,
        "bench_sparse forced to avx2 on Zen 5 (2026-12-02; no AVX-VNNI-only CPU measured yet) against the "
        "avxvnni dense kernel (2.3-3.1x the AVX2 u8 one in bench_q8_linear): 1x4 blocks win from 80% (M = 4, "
        "2.5x the AVX2 dense), unstructured 90% does not (1.6x); csr loses. " + _MIN_WEIGHTS_SOURCE),
    "avx2": Thresholds(
        16384, 0.20, 0.0, 0.05,
        "bench_sparse forced to avx2 on Zen 5 (2026-12-02; not yet on an AVX2-only CPU) against the dense "
        "u7 kernel convert picks there (~1.5x the u8 one): 1x4 blocks win from 80% sparsity (M = 4: 980 "
        "against ~1650 us; 70%: 1742, a loss), unstructured 90% (block density 0.34) does not; csr breaks "
        "even at ~95% (M = 1). " + _MIN_WEIGHTS_SOURCE),
    "scalar": Thresholds(
        None, 0.0, 0.0, 0.0,
        "bench_untimed.py on Zen 5 (2026-12-02): the scalar kernels (the specification, not a speed tier) run "
        "the bench shapes 3-11x slower than float torch, so the untimed convert keeps every layer float there"),
}


def current() -> Thresholds:
    """The active ISA level's thresholds."""
    return TIERS[get_isa()]
