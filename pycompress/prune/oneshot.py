"""One-shot pruning from calibration data: Wanda and SparseGPT (``pycompress.prune(criterion=...)``).

Both run sequentially in forward order (pycompress.calibration.sequential_walk): a layer's statistics
come from its inputs with the layers before it already pruned. Weights are viewed as ``[N, K]``
(a conv as ``[out, in * kh * kw]``, as everywhere in pycompress.prune), ``X [rows, K]`` are the
layer's GEMM input rows, and the patterns are the ones of ``pycompress.prune``: ``"magnitude"``
(unstructured), ``"nm"`` (keep n of every m consecutive k), ``"block"`` (whole ``(bn, bk)`` tiles).
The result is an ordinary pruning mask (pycompress.prune.masks), so convert and the rest see the same
state as after magnitude pruning.

Wanda (Sun et al., 2023): score ``S_ij = |W_ij| * ||X_:,j||_2`` (the input column's norm over every
calibration row); no weight update. Unstructured: each output row drops its
``sparsity * K`` lowest scores (Wanda's per-output comparison; the counts are rounded so that the
rows differ by at most one and the layer drops exactly ``round(sparsity * N * K)``); N:M: the m - n
lowest of each group of m; blocks: a block's score is the sum of its scores, and each row of blocks
(``bn`` output channels) drops ``sparsity`` of its blocks, counted the same way.

SparseGPT (Frantar & Alistarh, 2023): with ``H = 2 X^T X / n`` (dampened, dead inputs as in GPTQ) and
``U`` the upper Cholesky factor of ``H^-1`` (pycompress.calibration.inverse_hessian_factor), the
columns are processed left to right in blocks of 128. At the start of a block the mask of its columns
is chosen adaptively from the OBS saliency ``w_ij^2 / U_jj^2`` of the current (already updated)
weights: unstructured, the lowest saliencies of the block over all rows, as many as keep the layer's
running total at ``round(sparsity * (N * columns so far))`` (so the layer ends at exactly
``round(sparsity * N * K)``); blocks ``(bn, bk)``: the lowest summed saliencies, counted the same way in
blocks; N:M: chosen per group of m columns when the group comes up (the m - n lowest per row). Then
each column is set to its masked value and its error ``(w_j - w'_j) / U_jj`` is spread over the later
columns, ``W[:, j+1:] -= err_j U_{j, j+1:}`` (lazily per block, as GPTQ). The kept weights change.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import torch
from torch import nn
from torch.nn.utils import parametrize

import pycompress.prune.masks as _masks
import pycompress.prune.unstructured as _u
from pycompress.calibration import Comm, InputStats, check_oneshot_layer, inverse_hessian_factor, sequential_walk

CRITERIA = ("magnitude", "wanda", "sparsegpt")
BLOCK_SIZE = 128  # SparseGPT's columns per adaptive mask / lazy update block
_F64 = torch.float64


def _per_row_keep(scores: torch.Tensor, num_pruned: int | list[int]) -> torch.Tensor:
    """Keep-mask with the ``num_pruned`` lowest of every row (or ``num_pruned[r]`` of row r) False
    (stable: ties go by position)."""
    keep = torch.ones_like(scores, dtype=torch.bool)
    order = torch.sort(scores, dim=1, stable=True).indices
    if isinstance(num_pruned, int):
        keep.scatter_(1, order[:, :num_pruned], False)
        return keep
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(scores.shape[1]).expand_as(order).contiguous())
    return rank >= torch.tensor(num_pruned).reshape(-1, 1)


def _row_counts(sparsity: float, rows: int, units: int) -> list[int]:
    """Units to drop per row so that the layer drops exactly round(sparsity * rows * units): row r drops
    round(s * units * (r + 1)) - round(s * units * r) (the rows differ by at most one)."""
    return [round(sparsity * units * (r + 1)) - round(sparsity * units * r) for r in range(rows)]


def wanda_mask(weight: torch.Tensor, norms: torch.Tensor, sparsity: float, pattern: str, name: str,
               n: int = 2, m: int = 4, block: tuple[int, int] = (1, 4)) -> torch.Tensor:
    """Wanda's keep-mask (weight's shape) from ``|W| * ||x_j||`` (see the module docstring)."""
    w2 = _u.weight_2d(weight.detach()).to(_F64)
    if norms.numel() != w2.shape[1]:
        raise ValueError(f"prune({name}): {norms.numel()} input norms for a weight with K={w2.shape[1]}")
    scores = w2.abs() * norms.to(_F64).reshape(1, -1)
    if pattern == "nm":
        return _u.nm_mask(scores.reshape(weight.shape), n, m, name)
    if pattern == "magnitude":
        return _per_row_keep(scores, _row_counts(sparsity, *scores.shape)).reshape(weight.shape)
    bscores = _u.block_scores(scores.reshape(weight.shape), block, name)
    keep = _per_row_keep(bscores, _row_counts(sparsity, *bscores.shape))
    return _u.expand_block_mask(keep, block, weight.shape)


def _lowest(scores: torch.Tensor, count: int) -> torch.Tensor:
    """Boolean mask of the ``count`` lowest entries of ``scores`` (stable)."""
    return ~_u.keep_all_but_smallest(scores, count)


def sparsegpt_prune(weight: torch.Tensor, hessian: torch.Tensor, sparsity: float, pattern: str = "magnitude",
                    n: int = 2, m: int = 4, block: tuple[int, int] = (1, 4), percdamp: float = 0.01,
                    name: str = "weight", what: str = "prune") -> tuple[torch.Tensor, torch.Tensor]:
    """SparseGPT on one weight ``[N, K]`` (a conv's weight is viewed as [N, in * kh * kw]) with its Hessian
    ``[K, K]``. Returns (the updated weight, pruned entries exactly 0, in ``weight``'s shape and dtype;
    the keep-mask)."""
    w = _u.weight_2d(weight.detach()).to(device="cpu", dtype=_F64).clone()
    rows, k = w.shape
    if tuple(hessian.shape) != (k, k):
        raise ValueError(f"{what}({name}): Hessian has shape {tuple(hessian.shape)}, expected {(k, k)}")
    bn, bk = block if pattern == "block" else (1, 1)
    if pattern == "block":
        _u.check_blocks_fit(name, tuple(weight.shape), rows, k, (bn, bk))
    if pattern == "nm":
        _u.nm_mask(weight, n, m, name)  # validates n, m and K % m
    width = BLOCK_SIZE
    if pattern == "nm":
        width = m * max(1, BLOCK_SIZE // m)
    elif pattern == "block":
        width = bk * max(1, BLOCK_SIZE // bk)
    u = inverse_hessian_factor(hessian.to(_F64), w, percdamp, name, what)
    pruned_mask = torch.zeros(rows, k, dtype=torch.bool)
    pruned_so_far = 0
    total_units = (rows // bn) * (k // bk)
    units_seen = 0
    for i1 in range(0, k, width):
        i2 = min(i1 + width, k)
        w1 = w[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        u1 = u[i1:i2, i1:i2]
        d = torch.diagonal(u1)
        mask1 = torch.zeros(rows, i2 - i1, dtype=torch.bool)  # True = pruned
        if pattern in ("magnitude", "block"):
            sal = w1 ** 2 / (d ** 2)[None, :]
            bs = sal.reshape(rows // bn, bn, (i2 - i1) // bk, bk).sum(dim=(1, 3))
            units_seen += bs.numel()
            target = round(sparsity * units_seen) if units_seen < total_units else round(sparsity * total_units)
            chosen = _lowest(bs, target - pruned_so_far)
            pruned_so_far = target
            mask1 = _u.expand_block_mask(chosen, (bn, bk), (rows, i2 - i1))
        for i in range(i2 - i1):
            if pattern == "nm" and i % m == 0:
                sal = w1[:, i:i + m] ** 2 / (d[i:i + m] ** 2)[None, :]
                mask1[:, i:i + m] = ~_per_row_keep(sal, m - n)
            col = w1[:, i]
            newc = torch.where(mask1[:, i], torch.zeros_like(col), col)
            e = (col - newc) / u1[i, i]
            w1[:, i:].sub_(e[:, None] * u1[i, i:][None, :])
            w1[:, i] = newc
            err1[:, i] = e
        w[:, i1:i2] = w1
        w[:, i2:].sub_(err1 @ u[i1:i2, i2:])
        pruned_mask[:, i1:i2] = mask1
    keep = ~pruned_mask
    w[pruned_mask] = 0
    return w.to(weight.dtype).reshape(weight.shape), keep.reshape(weight.shape)


def check_criterion(criterion: str, pattern: str, scope: str, calibration_batches: object,
                    percdamp: float = 0.01) -> None:
    if criterion not in CRITERIA:
        raise ValueError(f"prune: unknown criterion {criterion!r}; expected one of {CRITERIA}")
    if criterion == "magnitude":
        return
    if pattern not in ("magnitude", "block", "nm"):
        raise ValueError(f"prune: criterion={criterion!r} works with method 'magnitude' (unstructured), 'block' or "
                         f"'nm', not {pattern!r}")
    if scope != "layer":
        raise ValueError(f"prune: criterion={criterion!r} prunes each layer to its sparsity (scope='layer'); "
                         f"scope={scope!r} is not supported")
    if calibration_batches is None:
        raise ValueError(f"prune: criterion={criterion!r} needs calibration_batches (a few batches of sample "
                         "inputs: its scores come from each layer's inputs)")
    if not (isinstance(percdamp, (int, float)) and 0 < percdamp <= 1):
        raise ValueError(f"prune: percdamp must be in (0, 1], got {percdamp!r}")


def prune_oneshot(model: nn.Module, layers: list[tuple[str, nn.Module]], batches: list, criterion: str,
                  sparsity: float, per_layer: Mapping[str, float], pattern: str, n: int, m: int,
                  block: tuple[int, int], percdamp: float = 0.01,
                  progress: Callable[[Iterable], Iterable] | None = None, comm: Comm | None = None) -> None:
    """Wanda or SparseGPT on ``layers`` (in place: masks attached, SparseGPT's weights updated). On an
    error every layer is restored as it was."""
    for name, module in layers:
        check_oneshot_layer(module, name, "prune")
    saved = {name: module.weight.detach().clone() for name, module in layers}
    done: list[nn.Module] = []

    def solve(name: str, module: nn.Module, stats: InputStats) -> tuple[torch.Tensor | None, torch.Tensor]:
        s = per_layer.get(name, sparsity)
        if criterion == "wanda":
            return None, wanda_mask(module.weight, stats.column_norms(), s, pattern, name, n, m, block)
        return sparsegpt_prune(module.weight, stats.hessian(), s, pattern, n, m, block, percdamp, name)

    def apply(name: str, module: nn.Module, result: tuple[torch.Tensor | None, torch.Tensor]) -> None:
        new_w, keep = result
        if new_w is not None:
            with torch.no_grad():
                module.weight.copy_(new_w)
        _masks.attach_mask(module, keep, name)
        done.append(module)

    def check(name: str, module: nn.Module, stats: InputStats) -> None:
        if criterion == "sparsegpt":
            stats.check_rank(name, "prune")

    try:
        sequential_walk(model, layers, batches, full=criterion == "sparsegpt", order="torch", solve=solve,
                        apply=apply, what="prune", progress=progress, comm=comm, check=check)
    except Exception:
        pruned = {id(mod) for mod in done}
        for name, module in layers:
            if id(module) in pruned:
                _masks.remove_parametrizations(module, "weight", leave_parametrized=False)
            with torch.no_grad():
                module.weight.copy_(saved[name])
        raise
