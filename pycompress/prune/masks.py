"""Pruning masks as ``torch.nn.utils.parametrize`` parametrizations on ``weight``.

``module.weight`` is recomputed as ``original * mask`` on every access, so:
- a pruned weight is exactly zero in every forward pass, whatever the optimizer
  does to ``original`` (momentum, weight decay);
- its gradient is ``grad * mask`` = 0, so training never revives it;
- the model stays an ordinary ``nn.Module``: any training loop keeps working.

``remove(model)`` bakes ``original * mask`` into a plain ``weight`` Parameter.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Iterator

import torch
from torch import nn
from torch.nn.utils import parametrize

from pycompress.nn.registry import linearize_transposed

PRUNABLE_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d)


class PruningMask(nn.Module):
    """weight -> weight * mask; ``mask`` is a buffer (saved in ``state_dict``), 1 = kept."""

    def __init__(self, mask: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("mask", mask.detach().clone())

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight * self.mask.to(weight.dtype)


def remove_parametrizations(module: nn.Module, tensor_name: str, *, leave_parametrized: bool) -> None:
    """``torch.nn.utils.parametrize.remove_parametrizations`` for this module alone. torch gives a parametrized
    module a class of its own (``ParametrizedLinear``...) and removes the tensor's property from that class,
    but ``copy.deepcopy`` shares the class between the module and its copies: removing a parametrization
    from one (convert baking a float layer) took ``weight`` away from every copy (the simulated reference
    a user kept). The module gets a fresh copy of its class first."""
    cls = type(module)
    namespace = {k: v for k, v in vars(cls).items() if k not in ("__dict__", "__weakref__")}
    module.__class__ = type(cls.__name__, cls.__bases__, namespace)
    parametrize.remove_parametrizations(module, tensor_name, leave_parametrized=leave_parametrized)


def weight_parametrizations(module: nn.Module) -> list[nn.Module]:
    if not parametrize.is_parametrized(module, "weight"):
        return []
    return list(module.parametrizations.weight)


def training_state(module: nn.Module) -> list[str]:
    """What of pycompress's training-time state ``module`` itself carries: "pruning mask" (a PruningMask on
    ``weight``), "fake quantization" (quantize / prepare_qat's weight parametrization or activation
    fake-quant). Empty for a plain or converted layer; a user's own parametrizations (weight norm...) do not count."""
    kinds = {type(p).__name__ for p in weight_parametrizations(module)}
    state = ["pruning mask"] if "PruningMask" in kinds else []
    if "WeightFakeQuant" in kinds or "activation_fake_quant" in module._modules:
        state.append("fake quantization")
    return state


def get_pruning_mask_module(module: nn.Module) -> PruningMask | None:
    for p in weight_parametrizations(module):
        if isinstance(p, PruningMask):
            return p
    return None


def get_mask(module: nn.Module) -> torch.Tensor | None:
    """The boolean keep-mask (same shape as ``weight``) of a pruned layer, or None."""
    p = get_pruning_mask_module(module)
    return None if p is None else p.mask.bool()


def original_weight(module: nn.Module) -> torch.Tensor:
    """The stored (unmasked) weight tensor: ``parametrizations.weight.original`` or ``weight``."""
    if parametrize.is_parametrized(module, "weight"):
        return module.parametrizations.weight.original
    return module.weight


def masked_float_weight(module: nn.Module) -> torch.Tensor:
    """The weight with the pruning mask applied and no other parametrization (no fake-quant)."""
    w = original_weight(module)
    p = get_pruning_mask_module(module)
    return w if p is None else p(w)


def attach_mask(module: nn.Module, mask: torch.Tensor, name: str) -> None:
    """Attach a new mask; zeroes the pruned entries of the stored weight too, so the
    stored tensor and the effective one agree."""
    if get_pruning_mask_module(module) is not None:
        raise ValueError(f"prune({name}): layer is already pruned; call pycompress.prune.remove(model) "
                         "first, or use GradualPruner to raise sparsity step by step")
    if any(True for _ in weight_parametrizations(module)):
        raise ValueError(f"prune({name}): layer already has parametrizations on weight "
                         f"({[type(p).__name__ for p in weight_parametrizations(module)]}); prune before "
                         "quantize/prepare_qat")
    if mask.shape != module.weight.shape:
        raise ValueError(f"prune({name}): mask shape {tuple(mask.shape)} != weight shape {tuple(module.weight.shape)}")
    mask = mask.to(device=module.weight.device, dtype=module.weight.dtype)
    with torch.no_grad():
        module.weight.mul_(mask)
    parametrize.register_parametrization(module, "weight", PruningMask(mask))


def update_mask(module: nn.Module, mask: torch.Tensor) -> None:
    p = get_pruning_mask_module(module)
    assert p is not None, "update_mask on a layer without a PruningMask"
    with torch.no_grad():
        p.mask.copy_(mask.to(p.mask.dtype))
        module.parametrizations.weight.original.mul_(p.mask)


def remove(model: nn.Module) -> nn.Module:
    """Make every pruning mask in ``model`` permanent: plain ``weight`` Parameters with
    exact zeros. Other parametrizations (e.g. fake-quant) are kept, above the baked weight."""
    for _, module in list(model.named_modules()):
        plist = weight_parametrizations(module)
        if not any(isinstance(p, PruningMask) for p in plist):
            continue
        with torch.no_grad():
            baked = masked_float_weight(module).detach().clone()
        others = [p for p in plist if not isinstance(p, PruningMask)]
        remove_parametrizations(module, "weight", leave_parametrized=False)
        with torch.no_grad():
            module.weight.copy_(baked)
        for p in others:
            parametrize.register_parametrization(module, "weight", p)
    return model


def matches_any(name: str, patterns: Iterable[str]) -> bool:
    return any(name == p or fnmatch.fnmatchcase(name, p) for p in patterns)


def prunable_layers(model: nn.Module, exclude: Iterable[str] = ()) -> Iterator[tuple[str, nn.Module]]:
    """(qualified name, module) for every Linear/Conv layer not excluded by name or fnmatch pattern (GPT-2's
    transformers Conv1D layers first become Linear views of their weights, as convert makes them)."""
    exclude = list(exclude)
    linearize_transposed(model)
    for name, module in model.named_modules():
        if isinstance(module, PRUNABLE_TYPES) and not matches_any(name, exclude):
            yield name, module


def sparsity_report(model: nn.Module) -> dict[str, float]:
    """Fraction of exact zeros in the effective weight of every Linear/Conv layer, plus
    ``"__total__"`` over all of them."""
    report, zeros, total = {}, 0, 0
    for name, module in prunable_layers(model):
        w = module.weight.detach()
        z = int((w == 0).sum())
        report[name] = z / w.numel()
        zeros, total = zeros + z, total + w.numel()
    report["__total__"] = zeros / total if total else 0.0
    return report
