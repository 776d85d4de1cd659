"""Conv2d + BatchNorm2d (and Linear + BatchNorm1d) folding before quantization.

A BatchNorm in eval mode is a per-channel affine map; folding it into the preceding
layer's weight and bias means the quantized weight already includes it (one kernel
call instead of two, and the int8 scales see the real weight range). Uses the running
statistics: fold after training, or freeze BN statistics for QAT.
"""

from __future__ import annotations

import torch
import torch.fx
from torch import nn

from pycompress.prune.masks import original_weight

_PAIRS = ((nn.Conv2d, nn.BatchNorm2d), (nn.Linear, nn.BatchNorm1d))


def _set_submodule(model: nn.Module, qualified: str, new: nn.Module) -> None:
    parent_name, _, attr = qualified.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, new)


@torch.no_grad()
def fold_bn_into(layer: nn.Module, bn: nn.modules.batchnorm._BatchNorm) -> None:
    """layer <- bn(layer(.)) using bn's running statistics; the layer gains a bias if needed."""
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError(f"fold_conv_bn: {bn} has no running statistics (track_running_stats=False)")
    std = torch.sqrt(bn.running_var + bn.eps)
    gamma = bn.weight if bn.weight is not None else torch.ones_like(std)
    beta = bn.bias if bn.bias is not None else torch.zeros_like(std)
    factor = gamma / std
    weight = original_weight(layer)  # the stored tensor: a pruning mask stays valid under row scaling
    weight.mul_(factor.reshape(-1, *([1] * (weight.dim() - 1))))
    bias = layer.bias if layer.bias is not None else torch.zeros_like(std)
    new_bias = (bias - bn.running_mean) * factor + beta
    layer.bias = nn.Parameter(new_bias.to(weight.dtype))


def fold_conv_bn(model: nn.Module) -> list[tuple[str, str]]:
    """Fold every BatchNorm that directly follows a Conv2d/Linear whose output feeds only
    that BatchNorm; the BatchNorm becomes ``nn.Identity``. Returns the folded
    (layer, batchnorm) names. A model with no BatchNorm is returned untouched without
    tracing; otherwise it must be traceable by torch.fx."""
    if not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        return []
    try:
        gm = torch.fx.symbolic_trace(model)
    except Exception as exc:  # fx raises many types; the message is what the user needs
        raise ValueError(f"fold_conv_bn: the model has BatchNorm layers but cannot be traced by torch.fx "
                         f"({exc}); pass fold_bn=False or fold them yourself") from exc
    modules = dict(gm.named_modules())
    pairs = []
    for node in gm.graph.nodes:
        if node.op != "call_module" or not isinstance(modules[node.target], nn.modules.batchnorm._BatchNorm):
            continue
        src = node.args[0]
        if not (isinstance(src, torch.fx.Node) and src.op == "call_module" and len(src.users) == 1):
            continue
        layer, bn = modules[src.target], modules[node.target]
        if any(isinstance(layer, lt) and isinstance(bn, bt) for lt, bt in _PAIRS):
            pairs.append((src.target, node.target))
    for layer_name, bn_name in pairs:
        fold_bn_into(model.get_submodule(layer_name), model.get_submodule(bn_name))
        _set_submodule(model, bn_name, nn.Identity())
    return pairs
