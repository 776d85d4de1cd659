"""Per-layer sensitivity analysis and sparsity allocation under a global budget."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch
from torch import nn

import pycompress.prune.masks as _masks
import pycompress.prune.unstructured as _u


def sensitivity_analysis(
    model: nn.Module,
    evaluate: Callable[[nn.Module], float],
    sparsities: Sequence[float] = (0.25, 0.5, 0.7, 0.8, 0.9, 0.95),
    exclude: Iterable[str] = (),
    progress: bool | None = None,
) -> dict[str, dict[float, float]]:
    """For each Linear/Conv layer alone, magnitude-prune it to each sparsity and record
    ``evaluate(model)`` (e.g. validation loss; lower must be better). The layer's weight
    is restored afterwards, so the model comes back unchanged.

    Returns ``{layer: {sparsity: metric}}``, with sparsity 0.0 holding the unpruned metric.
    """
    from pycompress.progress import progress_bar

    for s in sparsities:
        _u.check_sparsity(s, "sensitivity_analysis")
    layers = list(_masks.prunable_layers(model, exclude))
    for name, module in layers:
        if _masks.weight_parametrizations(module):
            raise ValueError(f"sensitivity_analysis({name}): layer has parametrizations on weight; "
                             "analyse the plain float model")
    baseline = float(evaluate(model))
    result: dict[str, dict[float, float]] = {}
    for name, module in progress_bar(layers, desc="sensitivity", enabled=progress):
        saved = module.weight.detach().clone()
        curve = {0.0: baseline}
        for s in sorted(sparsities):
            keep = _u.keep_all_but_smallest(saved.abs(), round(s * saved.numel()))
            with torch.no_grad():
                module.weight.copy_(saved * keep)
            curve[float(s)] = float(evaluate(model))
        with torch.no_grad():
            module.weight.copy_(saved)
        result[name] = curve
    return result


def allocate_sparsity(
    model: nn.Module, sensitivity: dict[str, dict[float, float]], budget: float
) -> dict[str, float]:
    """Per-layer sparsities (from each layer's measured grid) that remove at least
    ``budget`` of the analysed layers' weights, chosen greedily: repeatedly raise the
    layer whose next grid step costs the least metric increase per weight removed.

    The result is ready for ``pycompress.prune(model, overrides=...)``. Raises if the
    budget cannot be met with the measured grids.
    """
    _u.check_sparsity(budget, "allocate_sparsity(budget)")
    modules = dict(model.named_modules())
    sizes = {}
    for name in sensitivity:
        if name not in modules:
            raise ValueError(f"allocate_sparsity: layer {name} from the sensitivity table is not in the model")
        sizes[name] = modules[name].weight.numel()
    total = sum(sizes.values())
    grids = {n: sorted(curve) for n, curve in sensitivity.items()}
    level = {n: 0 for n in sensitivity}
    removed = 0.0
    while removed < budget * total - 1e-9:
        best, best_cost = None, None
        for n, grid in grids.items():
            if level[n] + 1 >= len(grid):
                continue
            s0, s1 = grid[level[n]], grid[level[n] + 1]
            gain = (s1 - s0) * sizes[n]
            cost = (sensitivity[n][s1] - sensitivity[n][s0]) / gain
            if best_cost is None or cost < best_cost:
                best, best_cost = n, cost
        if best is None:
            reachable = sum(grids[n][-1] * sizes[n] for n in grids) / total
            raise ValueError(f"allocate_sparsity: budget {budget} exceeds the largest measured sparsity "
                             f"({reachable:.3f} overall); analyse higher sparsities")
        s0, s1 = grids[best][level[best]], grids[best][level[best] + 1]
        removed += (s1 - s0) * sizes[best]
        level[best] += 1
    return {n: grids[n][level[n]] for n in grids}
