"""Mask selection for weight pruning: magnitude (per layer or global), blocks, N:M.

Layouts: a weight is viewed as 2-D ``[N, K]`` = ``[out_channels, in_features]``
(a conv as ``[out, in * kh * kw]``, the im2col order the kernels use). A block
``(bn, bk)`` spans ``bn`` consecutive output channels and ``bk`` consecutive k;
``(1, 4)`` is a run of 4 along K, ``(4, 1)``/``(8, 1)``/``(16, 1)`` a column of
output channels. N:M keeps the ``n`` largest of every ``m`` consecutive k.

Counts are exact: pruning ``s`` of ``u`` units removes ``round(s * u)`` of them,
the smallest by score, ties broken by position (a stable sort), so the result is
deterministic.
"""

from __future__ import annotations

import torch

SUPPORTED_BLOCKS = ((1, 4), (4, 1), (8, 1), (16, 1))


def weight_2d(weight: torch.Tensor) -> torch.Tensor:
    return weight.reshape(weight.shape[0], -1)


def check_sparsity(sparsity: float, what: str) -> float:
    if not isinstance(sparsity, (int, float)) or isinstance(sparsity, bool):
        raise TypeError(f"{what}: sparsity must be a float in [0, 1), got {sparsity!r}")
    if not 0.0 <= float(sparsity) < 1.0:
        raise ValueError(f"{what}: sparsity must be in [0, 1), got {sparsity}")
    return float(sparsity)


KEEP_DENSE = "Leave this layer dense with exclude=[{name!r}]"


def check_blocks_fit(name: str, shape: tuple, n: int, k: int, block: tuple[int, int]) -> None:
    """Refuses a weight (viewed as [N, K]) that blocks of ``block`` do not tile, naming the layer."""
    bn, bk = block
    if n % bn or k % bk:
        raise ValueError(f"prune({name}): weight {shape} viewed as [N={n}, K={k}] is not divisible into blocks of "
                         f"{bn}x{bk} (N must be a multiple of {bn}, K of {bk}). {KEEP_DENSE.format(name=name)}")


def block_scores(weight: torch.Tensor, block: tuple[int, int], name: str, norm: str = "l1") -> torch.Tensor:
    """Score of each block, shape [N / bn, K / bk]."""
    bn, bk = block
    w = weight_2d(weight.detach().abs() if norm == "l1" else weight.detach() ** 2)
    n, k = w.shape
    check_blocks_fit(name, tuple(weight.shape), n, k, block)
    return w.reshape(n // bn, bn, k // bk, bk).sum(dim=(1, 3))


def expand_block_mask(block_keep: torch.Tensor, block: tuple[int, int], shape: torch.Size) -> torch.Tensor:
    bn, bk = block
    full = block_keep.repeat_interleave(bn, dim=0).repeat_interleave(bk, dim=1)
    return full.reshape(shape)


def keep_all_but_smallest(scores: torch.Tensor, num_pruned: int) -> torch.Tensor:
    """Boolean keep-mask (shape of ``scores``) with exactly ``num_pruned`` smallest entries False."""
    flat = scores.reshape(-1)
    keep = torch.ones_like(flat, dtype=torch.bool)
    if num_pruned > 0:
        order = torch.sort(flat, stable=True).indices
        keep[order[:num_pruned]] = False
    return keep.reshape(scores.shape)


def unit_scores(weight: torch.Tensor, method: str, block: tuple[int, int], name: str, norm: str) -> torch.Tensor:
    if method == "magnitude":
        w = weight.detach()
        return w.abs() if norm == "l1" else w * w
    return block_scores(weight, block, name, norm)


def units_to_mask(keep_units: torch.Tensor, method: str, block: tuple[int, int], shape: torch.Size) -> torch.Tensor:
    if method == "magnitude":
        return keep_units
    return expand_block_mask(keep_units, block, shape)


def nm_mask(weight: torch.Tensor, n: int, m: int, name: str) -> torch.Tensor:
    """Keep the ``n`` largest-magnitude of every ``m`` consecutive weights along K."""
    if not (isinstance(n, int) and isinstance(m, int) and 0 < n < m):
        raise ValueError(f"prune({name}): N:M needs integers 0 < n < m, got n={n}, m={m}")
    w = weight_2d(weight.detach().abs())
    rows, k = w.shape
    if k % m:
        raise ValueError(f"prune({name}): N:M {n}:{m} needs K divisible by {m}; weight {tuple(weight.shape)} "
                         f"has K={k}. {KEEP_DENSE.format(name=name)}")
    groups = w.reshape(rows, k // m, m)
    # Stable sort so equal magnitudes are resolved by position, deterministically.
    order = torch.sort(groups, dim=-1, descending=True, stable=True).indices
    keep = torch.zeros_like(groups, dtype=torch.bool)
    keep.scatter_(-1, order[..., :n], True)
    return keep.reshape(weight.shape)
