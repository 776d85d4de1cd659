"""``pycompress.prune(model, ...)`` and ``GradualPruner``: weight pruning with masks."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import torch
from torch import nn

import pycompress.prune.masks as _masks
import pycompress.prune.unstructured as _u
from pycompress.calibration import start_calibration
from pycompress.distributed import AUTO
from pycompress.progress import progress_bar
from pycompress.prune.oneshot import check_criterion, prune_oneshot
from pycompress.prune.structured import prune_channels

METHODS = ("magnitude", "block", "nm", "channel")
SCOPES = ("layer", "global")


def _check_patterns_used(model: nn.Module, patterns: Iterable[str], what: str) -> None:
    names = [n for n, mod in model.named_modules() if isinstance(mod, _masks.PRUNABLE_TYPES)]
    for p in patterns:
        if not any(_masks.matches_any(n, [p]) for n in names):
            raise ValueError(f"prune: {what} pattern {p!r} matches no Linear/Conv layer; layers are {names}")


def resolve_layer_sparsities(
    model: nn.Module, sparsity: float, exclude: Iterable[str], overrides: Mapping[str, float] | None
) -> tuple[list[tuple[str, nn.Module]], dict[str, float]]:
    """The layers to prune and the per-layer sparsity of those with an override."""
    exclude = list(exclude)
    overrides = dict(overrides or {})
    _check_patterns_used(model, exclude, "exclude")
    _check_patterns_used(model, overrides, "overrides")
    for pattern, s in overrides.items():
        _u.check_sparsity(s, f"prune(overrides[{pattern!r}])")
    layers = list(_masks.prunable_layers(model, exclude))
    if not layers:
        raise ValueError("prune: the model has no Linear/Conv layer left to prune (after exclude)")
    per_layer = {}
    for name, _ in layers:
        for pattern, s in overrides.items():
            if _masks.matches_any(name, [pattern]):
                per_layer[name] = float(s)
                break
    return layers, per_layer


def compute_masks(
    layers: list[tuple[str, nn.Module]],
    sparsity: float,
    per_layer: Mapping[str, float],
    method: str,
    scope: str,
    block: tuple[int, int],
    norm: str,
) -> dict[str, torch.Tensor]:
    """Boolean keep-masks for ``layers``; layers in ``per_layer`` use their own sparsity,
    the others ``sparsity`` (one threshold across them when ``scope == "global"``).
    Units already masked stay masked (their score is forced below every live unit)."""
    scores = {}
    for name, module in layers:
        s = _u.unit_scores(module.weight, method, block, name, norm).to(torch.float64)
        prev = _masks.get_mask(module)
        if prev is not None:
            prev_units = prev if method == "magnitude" else _u.block_scores(prev.float(), block, name) > 0
            s = torch.where(prev_units, s, torch.full_like(s, -1.0))
        scores[name] = s
    keep = {}
    shared = [n for n, _ in layers if n not in per_layer]
    if scope == "global" and shared:
        flat = torch.cat([scores[n].reshape(-1) for n in shared])
        flat_keep = _u.keep_all_but_smallest(flat, round(sparsity * flat.numel()))
        offset = 0
        for n in shared:
            size = scores[n].numel()
            keep[n] = flat_keep[offset:offset + size].reshape(scores[n].shape)
            offset += size
    for name, _ in layers:
        if name not in keep:
            s = per_layer.get(name, sparsity)
            keep[name] = _u.keep_all_but_smallest(scores[name], round(s * scores[name].numel()))
    modules = dict(layers)
    return {n: _u.units_to_mask(k, method, block, modules[n].weight.shape) for n, k in keep.items()}


def _check_block(block: tuple[int, int]) -> tuple[int, int]:
    block = tuple(block)
    if block not in _u.SUPPORTED_BLOCKS:
        raise ValueError(f"prune: block {block} is not a kernel block shape; supported: {list(_u.SUPPORTED_BLOCKS)}")
    return block


def prune(
    model: nn.Module,
    sparsity: float | None = None,
    method: str = "magnitude",
    scope: str = "layer",
    n: int = 2,
    m: int = 4,
    block: tuple[int, int] = (1, 4),
    exclude: Iterable[str] = (),
    overrides: Mapping[str, float] | None = None,
    norm: str = "l1",
    example_inputs: object = None,
    criterion: str = "magnitude",
    calibration_batches: Iterable | None = None,
    percdamp: float = 0.01,
    progress: bool | None = None,
    process_group: object = AUTO,
    dist_timeout: float | None = None,
) -> nn.Module:
    """Prune every Linear/Conv layer of ``model`` (in place) and return it.

    method: ``"magnitude"`` (unstructured, smallest |w|), ``"block"`` (whole ``block``
      tiles, see pycompress.prune.unstructured), ``"nm"`` (n of every m along K; the
      sparsity is n/m and ``sparsity`` may be omitted), ``"channel"`` (structured:
      removes output channels and physically shrinks the model, see
      pycompress.prune.structured; needs ``example_inputs`` when a conv feeds a Flatten).
    sparsity: fraction in [0, 1) of weights (blocks, channels) to remove; default 0.9.
    scope: ``"layer"`` prunes each layer to ``sparsity``; ``"global"`` uses one threshold
      across all layers so that exactly ``round(sparsity * total)`` weights go.
    exclude: layer names or fnmatch patterns left dense (e.g. the first and last layer).
    overrides: ``{pattern: sparsity}`` for layers that get their own sparsity.
    norm: ``"l1"`` or ``"l2"`` importance of a block or channel.
    criterion: which weights go, for the "magnitude" / "block" / "nm" patterns:
      ``"magnitude"`` (smallest |w|, no data), or one-shot from ``calibration_batches`` (each a
      tensor, a tuple of positional inputs or a dict of keyword inputs), layer by layer in
      forward order (pycompress.prune.oneshot): ``"wanda"`` (smallest |w| * ||x_j||, compared
      per output row) or ``"sparsegpt"`` (OBS saliency with the layer's Hessian, masks chosen
      per block of 128 columns, the kept weights updated to compensate; ``percdamp`` its
      dampening). Both need ``scope="layer"`` and Linear / dense Conv2d layers.
    process_group / dist_timeout: one-shot pruning across processes, as in ``pycompress.quantize``
      (pycompress.distributed): with several ranks, a Wanda / SparseGPT call is collective, each rank
      passes its shard of ``calibration_batches`` and every rank ends with the same masks and weights,
      those of one process on all the batches.
    Masks are parametrizations on ``weight`` (pycompress.prune.masks): fine-tuning keeps
    pruned weights at exactly zero; ``pycompress.prune.remove(model)`` bakes them in.
    Nothing is modified if any layer fails validation.
    """
    exclude = list(exclude)
    arguments = dict(sparsity=sparsity, method=method, scope=scope, n=n, m=m, block=block, exclude=exclude,
                     overrides=overrides, norm=norm, criterion=criterion, percdamp=percdamp)
    calibrates = calibration_batches is not None and criterion in ("wanda", "sparsegpt")
    batches, comm = start_calibration(model, calibration_batches if calibrates else None, calibrates,
                                      process_group, dist_timeout, arguments, "prune")
    if method not in METHODS:
        raise ValueError(f"prune: unknown method {method!r}; expected one of {METHODS}")
    if scope not in SCOPES:
        raise ValueError(f"prune: unknown scope {scope!r}; expected one of {SCOPES}")
    if norm not in ("l1", "l2"):
        raise ValueError(f"prune: unknown norm {norm!r}; expected 'l1' or 'l2'")
    if method == "nm":
        if sparsity is not None and not math.isclose(sparsity, 1 - n / m):
            raise ValueError(f"prune: method='nm' with n={n}, m={m} prunes {1 - n / m:g}, not sparsity={sparsity}")
    else:
        sparsity = _u.check_sparsity(0.9 if sparsity is None else sparsity, "prune")
    check_criterion(criterion, method, scope, calibration_batches, percdamp)
    if method == "channel":
        if scope != "layer":
            raise ValueError("prune: method='channel' supports scope='layer' only (each channel group keeps "
                             "1 - sparsity of its channels)")
        return prune_channels(model, sparsity, example_inputs=example_inputs, exclude=exclude,
                              overrides=overrides, norm=norm)
    if method == "block":
        block = _check_block(block)
    layers, per_layer = resolve_layer_sparsities(model, sparsity if sparsity is not None else 0.0, exclude, overrides)
    for name, module in layers:
        if _masks.weight_parametrizations(module):
            kinds = [type(p).__name__ for p in _masks.weight_parametrizations(module)]
            if _masks.get_pruning_mask_module(module) is not None:
                raise ValueError(f"prune({name}): layer is already pruned; call pycompress.prune.remove(model) "
                                 "first, or use GradualPruner to raise sparsity step by step")
            if "WeightFakeQuant" in kinds:
                raise ValueError(f"prune({name}): layer already has parametrizations {kinds} on weight; "
                                 "prune before quantize/prepare_qat")
            raise ValueError(f"prune({name}): the layer's weight is computed by parametrizations {kinds} (weight "
                             "norm or the model's own), which a pruning mask cannot sit on: leave the layer dense "
                             f"with exclude=[{name!r}], or remove them first "
                             "(torch.nn.utils.parametrize.remove_parametrizations)")
    if criterion != "magnitude":
        if method == "nm":
            for name, module in layers:
                _u.nm_mask(module.weight, n, m, name)  # validate every layer before anything changes
        elif method == "block":
            for name, module in layers:
                _u.block_scores(module.weight, block, name)
        prune_oneshot(model, layers, batches, criterion, sparsity if sparsity is not None else 1 - n / m,
                      per_layer, method, n, m, block, percdamp,
                      progress=lambda it: progress_bar(it, desc=f"prune: {criterion}", enabled=progress), comm=comm)
        return model
    if method == "nm":
        new_masks = {name: _u.nm_mask(module.weight, n, m, name) for name, module in layers}
    else:
        new_masks = compute_masks(layers, sparsity, per_layer, method, scope, block, norm)
    for name, module in layers:
        _masks.attach_mask(module, new_masks[name], name)
    return model


def agp_sparsity(step: int, initial: float, target: float, start_step: int, end_step: int) -> float:
    """Cubic schedule of Zhu & Gupta (2017): s_t = s_f + (s_i - s_f) * (1 - progress)^3."""
    if step <= start_step:
        return initial if step == start_step else 0.0
    progress = min(1.0, (step - start_step) / max(1, end_step - start_step))
    return target + (initial - target) * (1.0 - progress) ** 3


class GradualPruner:
    """Gradual magnitude pruning from ``initial_sparsity`` to ``target`` with the cubic
    AGP schedule, driven from the user's loop::

        pruner = GradualPruner(model, target=0.8, start_step=0, end_step=300, frequency=20)
        for batch in loader:
            loss.backward(); optimizer.step()
            pruner.step()

    Masks (all ones at construction) are recomputed from the current weights at
    ``start_step`` and every ``frequency`` steps until ``end_step``; between updates
    and afterwards training keeps the pruned weights at zero. Already-pruned weights
    never come back. ``method`` is ``"magnitude"`` or ``"block"``; ``scope``,
    ``exclude``, ``overrides`` (final per-layer targets) as in ``pycompress.prune``.
    """

    def __init__(
        self,
        model: nn.Module,
        target: float,
        start_step: int,
        end_step: int,
        frequency: int = 1,
        initial_sparsity: float = 0.0,
        method: str = "magnitude",
        scope: str = "global",
        block: tuple[int, int] = (1, 4),
        exclude: Iterable[str] = (),
        overrides: Mapping[str, float] | None = None,
        norm: str = "l1",
    ) -> None:
        self.target = _u.check_sparsity(target, "GradualPruner(target)")
        self.initial_sparsity = _u.check_sparsity(initial_sparsity, "GradualPruner(initial_sparsity)")
        if method not in ("magnitude", "block"):
            raise ValueError(f"GradualPruner: method must be 'magnitude' or 'block', got {method!r}")
        if scope not in SCOPES:
            raise ValueError(f"GradualPruner: unknown scope {scope!r}; expected one of {SCOPES}")
        if not 0 <= start_step < end_step:
            raise ValueError(f"GradualPruner: need 0 <= start_step < end_step, got {start_step}, {end_step}")
        if frequency < 1:
            raise ValueError(f"GradualPruner: frequency must be >= 1, got {frequency}")
        self.method, self.scope, self.norm = method, scope, norm
        self.block = _check_block(block) if method == "block" else tuple(block)
        self.start_step, self.end_step, self.frequency = start_step, end_step, frequency
        self.layers, self.final_per_layer = resolve_layer_sparsities(model, self.target, exclude, overrides)
        for name, module in self.layers:
            if _masks.weight_parametrizations(module):
                raise ValueError(f"GradualPruner({name}): layer already has parametrizations on weight "
                                 f"({[type(p).__name__ for p in _masks.weight_parametrizations(module)]}); "
                                 "start from an unpruned, unquantized model")
        for name, module in self.layers:
            _masks.attach_mask(module, torch.ones_like(module.weight, dtype=torch.bool), name)
        self.step_count = 0
        self.current_sparsity = 0.0
        self._apply(self.step_count)

    def _sparsity_at(self, step: int, final: float) -> float:
        return agp_sparsity(step, min(self.initial_sparsity, final), final, self.start_step, self.end_step)

    def _apply(self, step: int) -> None:
        due = step >= self.start_step and (
            (step - self.start_step) % self.frequency == 0 or step == self.end_step
        ) and step <= self.end_step
        if not due:
            return
        sparsity = self._sparsity_at(step, self.target)
        per_layer = {n: self._sparsity_at(step, s) for n, s in self.final_per_layer.items()}
        new_masks = compute_masks(self.layers, sparsity, per_layer, self.method, self.scope, self.block, self.norm)
        for name, module in self.layers:
            _masks.update_mask(module, new_masks[name])
        self.current_sparsity = sparsity

    def step(self) -> float:
        """Advance one training step; returns the scheduled sparsity now in force."""
        self.step_count += 1
        self._apply(self.step_count)
        return self.current_sparsity
