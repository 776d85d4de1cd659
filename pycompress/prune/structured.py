"""Structured (channel / neuron / filter) pruning that physically shrinks the model.

The model is traced with ``torch.fx`` only to read its data flow; the pruning then
slices the original modules' parameters in place (the model's own ``forward`` keeps
working, no GraphModule replaces it).

Every tensor that carries output channels of some Conv/Linear belongs to a
*channel group*: the channels are created by producers (Conv2d with groups=1,
Linear), pass through channel-wise ops (BatchNorm, activations, pooling, dropout,
depthwise conv, flatten) and are read by consumers (the input side of the next
Conv/Linear). An addition ties the groups of its operands (a residual block): their
producers are pruned together, by their summed importance, or not at all. A group
that reaches the model's output is left alone (the output size is part of the
model's contract); a group that reaches an op this module cannot follow (cat, view,
indexing, grouped conv, ...) is an error naming the layer and the op, raised before
anything is modified.
"""

from __future__ import annotations

import operator
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

import pycompress.prune.masks as _masks

_PASSTHROUGH_MODULES = (
    nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.LeakyReLU, nn.Hardswish, nn.Hardsigmoid,
    nn.ELU, nn.Mish, nn.Dropout, nn.Dropout2d, nn.Identity,
    nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d,
)
_PASSTHROUGH_FUNCTIONS = {
    F.relu, F.relu6, F.gelu, F.silu, F.sigmoid, F.tanh, F.leaky_relu, F.hardswish, F.elu, F.dropout,
    torch.relu, torch.sigmoid, torch.tanh,
    F.max_pool2d, F.avg_pool2d, F.adaptive_avg_pool2d, F.adaptive_max_pool2d,
}
_PASSTHROUGH_METHODS = {"relu", "sigmoid", "tanh", "contiguous", "clone"}
_ADD_OPS = {operator.add, torch.add, operator.iadd}


@dataclass
class ChannelGroup:
    """Channels that must be pruned together."""

    producers: list[tuple[str, nn.Module]] = field(default_factory=list)
    norms: list[nn.Module] = field(default_factory=list)  # BatchNorm and depthwise convs
    consumers: list[tuple[str, nn.Module, int]] = field(default_factory=list)  # (name, module, features/channel)
    fixed: str | None = None  # why it is left alone (model input / output)
    unsupported: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class _Value:
    """A traced tensor that carries a group's channels: at dim 1 of a feature map
    (``layout="map"``), at the last dim (``"vec"``), or flattened with ``factor``
    consecutive features per channel (``"flat"``)."""

    group: int
    layout: str
    factor: int = 1


class _UnionFind:
    def __init__(self) -> None:
        self.parent: list[int] = []

    def new(self) -> int:
        self.parent.append(len(self.parent))
        return len(self.parent) - 1

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def union(self, a: int, b: int) -> int:
        ra, rb = self.find(a), self.find(b)
        self.parent[max(ra, rb)] = min(ra, rb)
        return min(ra, rb)


def _as_tuple(example_inputs: object) -> tuple:
    if example_inputs is None:
        return ()
    return tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)


def _describe(node: torch.fx.Node) -> str:
    target = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))
    return f"{node.op} {target!s} (node {node.name})"


def analyze_channel_groups(model: nn.Module, example_inputs: object = None) -> list[ChannelGroup]:
    """Trace ``model`` and return its channel groups (see the module docstring)."""
    try:
        gm = torch.fx.symbolic_trace(model)
    except Exception as exc:  # fx raises many types; the message is what the user needs
        raise ValueError(f"prune(method='channel'): the model cannot be traced by torch.fx ({exc}); "
                         "structured pruning needs its data flow") from exc
    inputs = _as_tuple(example_inputs)
    if inputs:
        with torch.no_grad():
            ShapeProp(gm).propagate(*inputs)
    modules = dict(gm.named_modules())
    uf = _UnionFind()
    raw: dict[int, ChannelGroup] = {}
    values: dict[torch.fx.Node, _Value] = {}
    module_uses: dict[str, int] = {}

    def new_group(**kw) -> int:
        g = uf.new()
        raw[g] = ChannelGroup(**kw)
        return g

    def mark_unsupported(val: _Value, node: torch.fx.Node, why: str = "") -> None:
        raw[uf.find(val.group)].unsupported.append(_describe(node) + (f": {why}" if why else ""))

    for node in gm.graph.nodes:
        in_vals = [values[a] for a in node.all_input_nodes if a in values]
        if node.op == "placeholder":
            values[node] = _Value(new_group(fixed="model input"), "map")
            continue
        if node.op == "output":
            for v in in_vals:
                raw[uf.find(v.group)].fixed = raw[uf.find(v.group)].fixed or "model output"
            continue
        if node.op == "call_module":
            module_uses[node.target] = module_uses.get(node.target, 0) + 1
            mod = modules[node.target]
            val = in_vals[0] if len(in_vals) == 1 else None
            # A layer whose input is not traced channels (e.g. after an unsupported op)
            # still produces a group of its own.
            if isinstance(mod, nn.Conv2d) and mod.groups == 1:
                if val is not None and val.layout != "map":
                    mark_unsupported(val, node, "a conv reads a tensor whose channels are not at dim 1")
                elif val is not None:
                    raw[uf.find(val.group)].consumers.append((node.target, mod, 1))
                values[node] = _Value(new_group(producers=[(node.target, mod)]), "map")
                continue
            if isinstance(mod, nn.Conv2d) and val is not None:
                if mod.groups == mod.in_channels == mod.out_channels and val.layout == "map":
                    raw[uf.find(val.group)].norms.append(mod)
                    values[node] = val
                else:
                    mark_unsupported(val, node, f"grouped conv (groups={mod.groups})")
                continue
            if isinstance(mod, nn.Linear):
                if val is not None and val.layout == "map" and _rank(node.args[0]) != 2:
                    mark_unsupported(val, node, "a Linear reads a feature map (channels not at the last dim)")
                elif val is not None:
                    raw[uf.find(val.group)].consumers.append((node.target, mod, val.factor))
                values[node] = _Value(new_group(producers=[(node.target, mod)]), "vec")
                continue
            if isinstance(mod, (nn.BatchNorm1d, nn.BatchNorm2d)) and val is not None and val.factor == 1:
                raw[uf.find(val.group)].norms.append(mod)
                values[node] = val
                continue
            if isinstance(mod, _PASSTHROUGH_MODULES) and val is not None and val.factor == 1:
                values[node] = val
                continue
            if isinstance(mod, nn.Flatten) and val is not None:
                _store(values, node, _flatten(node, val, mod.start_dim, mod.end_dim, mark_unsupported))
                continue
        elif node.op == "call_function" and node.target in _PASSTHROUGH_FUNCTIONS and len(in_vals) == 1 \
                and in_vals[0].factor == 1 and node.args and node.args[0] in values:
            values[node] = in_vals[0]
            continue
        elif node.op == "call_method" and node.target in _PASSTHROUGH_METHODS and len(in_vals) == 1 \
                and node.args[0] in values:
            values[node] = in_vals[0]
            continue
        elif node.op == "call_function" and node.target is torch.flatten and len(in_vals) == 1:
            start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
            end = node.args[2] if len(node.args) > 2 else node.kwargs.get("end_dim", -1)
            _store(values, node, _flatten(node, in_vals[0], start, end, mark_unsupported))
            continue
        elif node.op == "call_method" and node.target == "flatten" and len(in_vals) == 1:
            start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
            end = node.args[2] if len(node.args) > 2 else node.kwargs.get("end_dim", -1)
            _store(values, node, _flatten(node, in_vals[0], start, end, mark_unsupported))
            continue
        elif _is_spatial_reduction(node) and len(in_vals) == 1 and in_vals[0].layout == "map" \
                and in_vals[0].factor == 1:
            keepdim = node.kwargs.get("keepdim", node.args[2] if len(node.args) > 2 else False)
            values[node] = _Value(in_vals[0].group, "map" if keepdim else "vec")
            continue
        elif node.op == "call_function" and node.target in _ADD_OPS and in_vals:
            if len(in_vals) == 2 and in_vals[0].layout == in_vals[1].layout and in_vals[0].factor == in_vals[1].factor:
                g = uf.union(in_vals[0].group, in_vals[1].group)
                values[node] = _Value(g, in_vals[0].layout, in_vals[0].factor)
                continue
            if len(in_vals) == 1 and in_vals[0].factor == 1 and _rank_of_others_is_scalar(node, values):
                values[node] = in_vals[0]
                continue
        if node.op == "get_attr":
            continue
        for v in in_vals:
            mark_unsupported(v, node)

    for target, uses in module_uses.items():
        if uses > 1 and isinstance(modules[target], (nn.Conv2d, nn.Linear, nn.BatchNorm1d, nn.BatchNorm2d)):
            raise ValueError(f"prune(method='channel'): layer {target} is called {uses} times in forward; "
                             "shared layers cannot be shrunk")
    merged: dict[int, ChannelGroup] = {}
    for g, grp in raw.items():
        root = merged.setdefault(uf.find(g), ChannelGroup())
        root.producers += grp.producers
        root.norms += grp.norms
        root.consumers += grp.consumers
        root.fixed = root.fixed or grp.fixed
        root.unsupported += grp.unsupported
    return list(merged.values())


def _is_spatial_reduction(node: torch.fx.Node) -> bool:
    """x.mean/amax/sum(dim=(2, 3)) on an NCHW map: global pooling, channels survive."""
    is_reduction = (node.op == "call_method" and node.target in ("mean", "amax", "sum")) or (
        node.op == "call_function" and node.target in (torch.mean, torch.amax, torch.sum))
    if not is_reduction:
        return False
    dims = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else None)
    dims = (dims,) if isinstance(dims, int) else dims
    return isinstance(dims, (tuple, list)) and sorted(dims) in ([2, 3], [-2, -1])


def _store(values: dict, node: torch.fx.Node, value: _Value | None) -> None:
    """Record a channel-carrying result; an unsupported flatten (None) was already reported."""
    if value is not None:
        values[node] = value


def _rank(arg: object) -> int | None:
    meta = getattr(arg, "meta", {}).get("tensor_meta") if isinstance(arg, torch.fx.Node) else None
    return len(meta.shape) if meta is not None else None


def _rank_of_others_is_scalar(node: torch.fx.Node, values: dict) -> bool:
    others = [a for a in node.args if a not in values]
    return all(isinstance(a, (int, float)) for a in others)


def _flatten(node: torch.fx.Node, val: _Value, start: int, end: int, mark_unsupported) -> _Value | None:
    src = node.args[0]
    meta = src.meta.get("tensor_meta") if isinstance(src, torch.fx.Node) else None
    if val.layout != "map" or start != 1 or end != -1:
        mark_unsupported(val, node, "only flatten(start_dim=1) of a feature map is supported")
        return None
    if meta is None:
        mark_unsupported(val, node, "flatten needs the spatial size: pass example_inputs")
        return None
    factor = 1
    for d in meta.shape[2:]:
        factor *= int(d)
    return _Value(val.group, "flat", factor)


def _channel_importance(group: ChannelGroup, norm: str) -> torch.Tensor:
    total = None
    for _, mod in group.producers:
        w = mod.weight.detach().reshape(mod.weight.shape[0], -1)
        imp = w.abs().sum(dim=1) if norm == "l1" else w.pow(2).sum(dim=1).sqrt()
        total = imp if total is None else total + imp
    return total


def _slice_param(mod: nn.Module, attr: str, index: torch.Tensor, dim: int) -> None:
    old = getattr(mod, attr)
    if old is None:
        return
    new = old.detach().index_select(dim, index).clone()
    if isinstance(old, nn.Parameter):
        setattr(mod, attr, nn.Parameter(new, requires_grad=old.requires_grad))
    else:
        setattr(mod, attr, new)


def _apply_keep(group: ChannelGroup, keep: torch.Tensor) -> None:
    c = len(keep)
    for _, mod in group.producers:
        _slice_param(mod, "weight", keep, 0)
        _slice_param(mod, "bias", keep, 0)
        if isinstance(mod, nn.Conv2d):
            mod.out_channels = c
        else:
            mod.out_features = c
    for mod in group.norms:
        if isinstance(mod, nn.Conv2d):  # depthwise
            _slice_param(mod, "weight", keep, 0)
            _slice_param(mod, "bias", keep, 0)
            mod.in_channels = mod.out_channels = mod.groups = c
        else:
            for attr in ("weight", "bias", "running_mean", "running_var"):
                _slice_param(mod, attr, keep, 0)
            mod.num_features = c
    for _, mod, factor in group.consumers:
        index = keep if factor == 1 else (keep[:, None] * factor + torch.arange(factor)).reshape(-1)
        _slice_param(mod, "weight", index, 1)
        if isinstance(mod, nn.Conv2d):
            mod.in_channels = c
        else:
            mod.in_features = c * factor


def prune_channels(
    model: nn.Module,
    sparsity: float,
    example_inputs: object = None,
    exclude: Iterable[str] = (),
    overrides: Mapping[str, float] | None = None,
    norm: str = "l1",
) -> nn.Module:
    """Remove the ``sparsity`` fraction of output channels (smallest L1/L2 filter norm,
    summed over tied producers) of every prunable channel group, in place.

    Groups whose producers are all excluded, or any producer excluded when tied, are
    left alone; so are groups reaching the model's output. At least one channel is kept.
    """
    exclude = list(exclude)
    overrides = dict(overrides or {})
    for name, mod in model.named_modules():
        if isinstance(mod, _masks.PRUNABLE_TYPES) and _masks.weight_parametrizations(mod):
            raise ValueError(f"prune(method='channel'): layer {name} has parametrizations on weight; channel "
                             "pruning needs plain weights (call pycompress.prune.remove(model) first, and prune "
                             "channels before quantize/prepare_qat)")
    groups = analyze_channel_groups(model, example_inputs)
    plan = []
    for group in groups:
        if not group.producers or group.fixed:
            continue
        names = [n for n, _ in group.producers]
        if any(_masks.matches_any(n, exclude) for n in names):
            continue
        if group.unsupported:
            raise ValueError(f"prune(method='channel'): cannot prune the output channels of {', '.join(names)}: "
                             f"they flow into {'; '.join(group.unsupported)}, which pycompress cannot follow. "
                             f"Exclude the layer (exclude={names!r}) to leave it dense. The model was not modified.")
        s = next((overrides[p] for n in names for p in overrides if _masks.matches_any(n, [p])), sparsity)
        imp = _channel_importance(group, norm)
        num_channels = imp.numel()
        num_removed = min(round(s * num_channels), num_channels - 1)
        if num_removed <= 0:
            continue
        order = torch.sort(imp, stable=True).indices
        keep = torch.sort(order[num_removed:]).values
        plan.append((group, keep))
    for group, keep in plan:
        _apply_keep(group, keep)
    return model
