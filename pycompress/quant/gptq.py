"""GPTQ: one-shot weight quantization with second-order error compensation (Frantar et al., 2022).

For a layer with weight ``W [N, K]`` and calibration inputs ``X [n, K]`` (its GEMM rows, see
pycompress.calibration), GPTQ minimizes ``||X W^T - X Q^T||^2`` over quantized ``Q`` row by row,
whose Hessian is ``H = 2 X^T X / n`` (accumulated in float64). It quantizes the columns of W one at a
time; after column ``j`` is rounded to ``q_j``, the optimal (OBS) update of the columns not yet
quantized is ``W[:, j+1:] -= (w_j - q_j) / [H^-1]_jj * [H^-1]_{j, j+1:}``, where ``H^-1`` is the
inverse Hessian of the columns not yet quantized. All of these come from one upper Cholesky factor
``U`` of ``(H + lambda I)^-1`` (``U^T U``): the update of column j is ``err_j = (w_j - q_j) / U_jj``,
``W[:, j+1:] -= err_j U_{j, j+1:}``. Updates are applied lazily: within a block of 128 columns at
once, to the columns after the block by one matrix product per block.

Details (as the reference implementation, github.com/IST-DASLab/gptq):

- dampening: ``lambda = percdamp * mean(diag(H))`` (default 1%);
- dead inputs (``H_jj = 0``, always 0 on the calibration set): ``H_jj = 1`` and ``W[:, j] = 0``;
- ``act_order``: columns are quantized by decreasing ``H_jj`` (the most active inputs first, while
  the most columns are left to absorb their error);
- scales: symmetric, ``scale = max|w| / qmax`` over each (output channel, group of ``group_size``
  consecutive k) (``pycompress.reference.q4.quantize_weight_grouped``), and
  ``q = clamp(round(w / scale), -qmax, qmax)`` in float32, the kernels' rounding. Without
  ``act_order`` each group's scales are computed from the current, already updated, weights when its
  first column comes up (a group never straddles a lazy block: the block is 128 columns when the group
  divides 128, else the group). With ``act_order`` the columns leave their groups' order, so the
  scales are *static*: computed from the weights before any update, for the contiguous groups along the
  original K that the kernels store; each column then uses its own group's scale wherever it comes in
  the permuted order. Per channel (``group_size=None``) the scale is likewise computed once, before
  any update.
- pruned weights (a pruning mask on the layer) are quantized to exactly 0 and their error is
  compensated like any other, so GPTQ composes with pycompress.prune (prune first, then quantize).

The result: the layer's float weight becomes exactly ``q * scale`` and the scales are fixed in its
``WeightFakeQuant``, so the fake-quant forward and ``quantized_weight`` give GPTQ's integers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

from pycompress.calibration import (
    Comm,
    InputStats,
    check_oneshot_layer,
    inverse_hessian_factor,
    sequential_walk,
)
from pycompress.prune.masks import get_mask, original_weight
from pycompress.quant.fake_quant import WeightFakeQuant, weight_from_matrix, weight_matrix
from pycompress.reference.q4 import check_group_size, group_count, quantize_weight_grouped

_F32 = torch.float32
_F64 = torch.float64
BLOCK_SIZE = 128  # columns per lazy batch update


def _round_column(w: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """clamp(round(w / scale), -qmax, qmax) of one column in float32, as quantize_weight_grouped rounds."""
    q, _ = quantize_weight_grouped(w.to(_F32)[:, None], bits, None, scale=scale[:, None])
    return q[:, 0]


def gptq_quantize(weight: torch.Tensor, hessian: torch.Tensor, bits: int, group_size: int | None = 128,
                  percdamp: float = 0.01, act_order: bool = False, mask: torch.Tensor | None = None,
                  name: str = "weight", what: str = "gptq") -> tuple[torch.Tensor, torch.Tensor]:
    """GPTQ of one weight matrix ``[N, K]`` with Hessian ``[K, K]`` (see the module docstring).

    ``mask``: optional boolean keep-mask [N, K]; dropped weights quantize to 0.
    Returns (q int8 [N, K] in [-qmax, qmax], scale float32 [N, groups]) (groups = 1 per channel).
    """
    if not 2 <= bits <= 8:
        raise ValueError(f"{what}({name}): weight bits must be in [2, 8], got {bits}")
    w = weight.detach().to(device="cpu", dtype=_F64).clone()
    n, k = w.shape
    if tuple(hessian.shape) != (k, k):
        raise ValueError(f"{what}({name}): Hessian has shape {tuple(hessian.shape)}, expected {(k, k)} for "
                         f"a weight {(n, k)}")
    check_group_size(k, group_size, f"{what}({name})")
    keep = None if mask is None else mask.reshape(n, k).to(device="cpu", dtype=torch.bool)
    h = hessian.to(_F64)
    if keep is not None:
        w[~keep] = 0
    gs = k if group_size is None else group_size
    groups = group_count(k, group_size)
    if act_order:
        perm = torch.sort(torch.diagonal(h), descending=True, stable=True).indices
    else:
        perm = torch.arange(k)
    w[:, torch.diagonal(h) == 0] = 0  # dead inputs, before the static scales see the weights
    u = inverse_hessian_factor(h[perm][:, perm], w[:, perm], percdamp, name, what)
    static = act_order or group_size is None
    scale = torch.ones(n, groups, dtype=_F32)
    if static:
        _, scale = quantize_weight_grouped(w.to(_F32), bits, group_size)
    w = w[:, perm]
    keep_p = None if keep is None else keep[:, perm]
    group_of = (perm // gs).tolist()
    q = torch.zeros(n, k, dtype=torch.int8)
    block = BLOCK_SIZE if group_size is None or act_order or BLOCK_SIZE % gs == 0 else gs
    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        w1 = w[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        u1 = u[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            g = group_of[col]
            if not static and col % gs == 0:  # a group's first column: scales from the current weights
                cur = w1[:, i:i + gs]
                if keep_p is not None:
                    cur = cur * keep_p[:, col:col + gs]
                _, s = quantize_weight_grouped(cur.to(_F32), bits, None)
                scale[:, g] = s[:, 0]
            qc = _round_column(w1[:, i], scale[:, g], bits)
            if keep_p is not None:
                qc = torch.where(keep_p[:, col], qc, torch.zeros_like(qc))
            q[:, col] = qc
            deq = qc.to(_F32).to(_F64) * scale[:, g].to(_F64)
            e = (w1[:, i] - deq) / u1[i, i]
            w1[:, i:].sub_(e[:, None] * u1[i, i:][None, :])
            err1[:, i] = e
        w[:, i2:].sub_(err1 @ u[i1:i2, i2:])
    inv = torch.argsort(perm)
    return q[:, inv].contiguous(), scale.contiguous()


def check_gptq_layer(module: nn.Module, name: str, what: str) -> None:
    check_oneshot_layer(module, name, what)


def _fake_quant(module: nn.Module) -> WeightFakeQuant:
    return next(p for p in module.parametrizations.weight if isinstance(p, WeightFakeQuant))


def gptq_layer(model: nn.Module, layers: list[tuple[str, nn.Module]], batches: list, percdamp: float = 0.01,
               act_order: bool = False, what: str = "quantize",
               progress: Callable[[Iterable], Iterable] | None = None, comm: Comm | None = None,
               round_short: bool = False) -> list[str]:
    """GPTQ on ``layers`` of ``model`` (each already holding a ``WeightFakeQuant``), sequentially in
    forward order on ``batches``: each layer's Hessian comes from its float inputs with the layers before
    it already quantized. In place. With ``comm`` (pycompress.distributed) the Hessians are summed over
    the ranks and each layer's integers are solved on one rank and broadcast. A layer whose calibration
    rows are fewer than its live inputs (a rank-deficient Hessian) raises, or with ``round_short`` keeps
    round-to-nearest; returns the names of those layers."""
    short: list[str] = []

    def check(name: str, module: nn.Module, stats: InputStats) -> None:
        try:
            stats.check_rank(name, what)
        except ValueError:
            if not round_short:
                raise
            short.append(name)  # the same on every rank: the check sees the summed stats

    def solve(name: str, module: nn.Module, stats: InputStats) -> tuple[torch.Tensor, torch.Tensor] | None:
        if name in short:
            return None
        wfq = _fake_quant(module)
        mask = get_mask(module)
        w2 = weight_matrix(original_weight(module).detach(), True)  # a Conv2d in the im2col order (the Hessian's)
        m2 = None if mask is None else weight_matrix(mask, True)
        return gptq_quantize(w2, stats.hessian(), wfq.bits, wfq.group_size, percdamp, act_order, m2, name, what)

    def apply(name: str, module: nn.Module, result: tuple[torch.Tensor, torch.Tensor] | None) -> None:
        if result is None:  # rounded to nearest (round_short)
            return
        q, scale = result
        wfq = _fake_quant(module)
        stored = original_weight(module)
        per_k = scale.repeat_interleave(q.shape[1] // scale.shape[1], dim=1)
        deq = weight_from_matrix(q.to(_F32) * per_k, stored.shape, True)
        with torch.no_grad():
            stored.copy_(deq.to(stored.dtype))
        wfq.scale = scale if wfq.group_size is not None else scale.reshape(-1, 1)

    sequential_walk(model, layers, batches, full=True, order="gemm", solve=solve, apply=apply, what=what,
                    progress=progress, comm=comm, check=check)
    return short
