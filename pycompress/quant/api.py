"""``pycompress.quantize`` (PTQ), ``pycompress.prepare_qat`` (QAT) and ``get_quant_state``."""

from __future__ import annotations

import functools
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils import parametrize

from pycompress.calibration import run_batch, start_calibration
from pycompress.distributed import AUTO, Comm
from pycompress.nn.registry import linearize_transposed
from pycompress.prune.masks import masked_float_weight, matches_any, original_weight, remove_parametrizations
from pycompress.progress import progress_bar
from pycompress.quant.fake_quant import ActivationFakeQuant, WeightFakeQuant, im2col_conv_forward, quantize_input_hook
from pycompress.quant.fold import fold_conv_bn
from pycompress.quant.gptq import check_gptq_layer, gptq_layer
from pycompress.quant.observers import OBSERVERS, make_observer, reduce_observers
from pycompress.reference.q4 import check_group_size

QUANTIZABLE_TYPES = (nn.Linear, nn.Conv2d)
ACTIVATION_MODES = ("dynamic", "static")
METHODS = ("auto", "rtn", "gptq")
DEFAULT_GROUP_SIZE = 128  # the default group for 2-4-bit weights (where it divides K)


@dataclass
class QuantState:
    """What convert needs to build a kernel layer from a quantized nn.Linear / nn.Conv2d.

    weight_bits: bits of the symmetric weight integers (8 for the int8 kernels; fewer bits
      are simulated).
    weight_scale: float32 [out_channels] per channel (``group_size`` None), else
      [out_channels, K / group_size]; ``q = clamp(round(W / scale), -(2^(b-1)-1), 2^(b-1)-1)``
      for W the (masked) float weight viewed as [out, K] (a Linear's weight; a Conv2d's
      [out, in * kh * kw] per channel, [out, kh * kw * in] (the im2col order) when grouped),
      each scale applying to its channel's group of ``group_size`` consecutive k: exactly
      ``quantize_weight_grouped(W, weight_bits, group_size, scale)`` (pycompress.reference.q4);
      the scale is max|w| / qmax over the group, or GPTQ's. ``quantized_weight(module)`` returns
      (q, scale).
    activations: ``"dynamic"`` (per row at run time) or ``"static"``.
    act_scale / act_zero_point: the static uint8 parameters,
      ``q = clamp(round(x / act_scale) + act_zero_point, 0, 2^act_bits - 1)``;
      ``None`` / 0 for dynamic.
    act_bits: 8, or 7 (the u7 format: pycompress.convert then runs the layer on u7 kernels; other widths run on 8).
    """

    weight_bits: int
    weight_scale: torch.Tensor
    activations: str
    act_scale: float | None
    act_zero_point: int
    act_bits: int
    group_size: int | None = None


def _weight_fake_quant(module: nn.Module) -> WeightFakeQuant | None:
    if not parametrize.is_parametrized(module, "weight"):
        return None
    return next((p for p in module.parametrizations.weight if isinstance(p, WeightFakeQuant)), None)


def quantized_weight(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """(q int8 [out, K], scale float32 [out] per channel or [out, K / group_size] grouped) of a
    quantized layer, in the kernels' format (see ``QuantState``): the integer weights its fake-quant
    forward simulates (pruned entries are 0)."""
    wfq = _weight_fake_quant(module)
    if wfq is None:
        raise ValueError(f"quantized_weight: {type(module).__name__} is not quantized")
    return wfq.quantize(masked_float_weight(module).detach())


def get_quant_state(module: nn.Module) -> QuantState | None:
    """The quantization state of a Linear/Conv2d after ``quantize``/``prepare_qat``, else None.
    Scales are computed from the current weights and ranges, so after QAT they
    reflect the trained model."""
    wfq = _weight_fake_quant(module)
    afq = getattr(module, "activation_fake_quant", None)
    if wfq is None or not isinstance(afq, ActivationFakeQuant):
        return None
    _, scale = quantized_weight(module)
    static = afq.activations == "static"
    if static and not bool(afq.initialized):
        raise ValueError(f"get_quant_state: {type(module).__name__} has static activations whose range was "
                         "never observed (train or calibrate first)")
    return QuantState(
        weight_bits=wfq.bits,
        weight_scale=scale,
        activations=afq.activations,
        act_scale=float(afq.scale) if static else None,
        act_zero_point=int(afq.zero_point) if static else 0,
        act_bits=afq.bits,
        group_size=wfq.group_size,
    )


def _check_float_model(model: nn.Module, what: str) -> None:
    for name, mod in model.named_modules():
        if type(mod).__module__.startswith("pycompress.nn"):
            raise ValueError(f"{what}: the model is already converted ({name or 'model'} is "
                             f"{type(mod).__name__}); {what} needs the float model before pycompress.convert")


def _layers(model: nn.Module, exclude: Iterable[str], what: str) -> list[tuple[str, nn.Module]]:
    exclude = list(exclude)
    linearize_transposed(model)  # GPT-2's Conv1D layers become Linear views of their weights (as convert does)
    # nn.MultiheadAttention reads its projections' weights itself, never calling their forward: no input reaches
    # them (static ranges and GPTQ would have nothing to calibrate on) and convert keeps them float.
    in_mha = {id(m) for mha in model.modules() if isinstance(mha, nn.MultiheadAttention) for m in mha.modules()}
    layers = [(n, m) for n, m in model.named_modules()
              if isinstance(m, QUANTIZABLE_TYPES) and id(m) not in in_mha and not matches_any(n, exclude)]
    if not layers:
        raise ValueError(f"{what}: the model has no nn.Linear / nn.Conv2d layer to quantize")
    for name, mod in layers:
        if _is_quantized(mod):
            raise ValueError(f"{what}({name}): layer is already quantized")
        if isinstance(mod, nn.Conv2d) and mod.groups != 1 and mod.groups != mod.in_channels:
            raise ValueError(f"{what}({name}): grouped conv (groups={mod.groups}, neither 1 nor in_channels) has "
                             f"no pycompress kernel; leave it float with exclude=[{name!r}]")
    return layers


def _is_quantized(module: nn.Module) -> bool:
    return _weight_fake_quant(module) is not None or hasattr(module, "activation_fake_quant")


def _check_bits(weight_bits: int, act_bits: int, activations: str, what: str) -> None:
    if not isinstance(weight_bits, int) or not 2 <= weight_bits <= 8:
        raise ValueError(f"{what}: weight_bits must be an int in [2, 8], got {weight_bits!r}")
    if not isinstance(act_bits, int) or not 2 <= act_bits <= 8:
        raise ValueError(f"{what}: act_bits must be an int in [2, 8], got {act_bits!r}")
    if activations not in ACTIVATION_MODES:
        raise ValueError(f"{what}: activations must be one of {ACTIVATION_MODES}, got {activations!r}")


def _attach(mod: nn.Module, weight_bits: int, group_size: int | None, afq: ActivationFakeQuant) -> None:
    mod.activation_fake_quant = afq
    if afq.activations == "dynamic" and afq.rows == "im2col":
        mod._conv_forward = functools.partial(im2col_conv_forward, mod)  # an instance attribute: this layer only
    else:
        mod.register_forward_pre_hook(quantize_input_hook)
    parametrize.register_parametrization(mod, "weight", WeightFakeQuant(weight_bits, group_size))


def _layer_group_size(name: str, mod: nn.Module, weight_bits: int, group_size, what: str) -> int | None:
    """The layer's group: ``"auto"`` is 128 for 2-4-bit weights where 128 divides K (else per channel)
    and per channel for 5-8 bits; an explicit size must divide K (an error naming the layer otherwise)."""
    k = mod.weight[0].numel()
    if group_size == "auto":
        return DEFAULT_GROUP_SIZE if weight_bits <= 4 and k % DEFAULT_GROUP_SIZE == 0 else None
    check_group_size(k, group_size, f"{what}({name}): weight {tuple(mod.weight.shape)}, K={k}")
    return group_size


def _calibrate(model: nn.Module, modules: list[tuple[str, ActivationFakeQuant]], batches: list,
               observer: str, act_bits: int, percentile: float, progress: bool | None, what: str,
               comm: Comm | None = None) -> None:
    comm = comm if comm is not None else Comm(None, what=what)
    for _, afq in modules:
        afq.observer = make_observer(observer, act_bits, percentile)
        afq.mode = "observe"
    was_training = model.training
    model.eval()
    error = None
    try:
        with torch.no_grad():
            for index, batch in enumerate(progress_bar(batches, desc=f"{what}: calibration", enabled=progress)):
                run_batch(model, batch, f"{what}: calibration batch {index}")
    except Exception as err:
        error = err
    finally:
        model.train(was_training)
        for _, afq in modules:
            afq.mode = "quantize"
    comm.raise_if_any_failed(error, "observing the activation ranges")
    reduce_observers([afq.observer for _, afq in modules], comm)
    for name, afq in modules:
        if afq.observer.lo is None:
            raise ValueError(f"{what}({name}): the calibration batches never reached this layer (or held "
                             "no finite values); cannot set its static activation range")
        afq.set_range(*afq.observer.range())
        afq.observer = None


def _prepare(model, calibration_batches, weight_bits, activations, observer, act_bits, percentile, fold_bn,
             exclude, progress, learn_range, range_momentum, what, group_size="auto", method="rtn",
             percdamp=0.01, act_order=False, process_group=AUTO, dist_timeout=None):
    exclude = list(exclude)
    round_short = method == "auto"  # GPTQ where it beats rounding: 2-4 bits with calibration data (see quantize)
    if method == "auto":
        method = "gptq" if calibration_batches is not None and isinstance(weight_bits, int) and weight_bits <= 4 \
            else "rtn"
    arguments = dict(weight_bits=weight_bits, activations=activations, observer=observer, act_bits=act_bits,
                     percentile=percentile, fold_bn=fold_bn, exclude=list(exclude), learn_range=learn_range,
                     range_momentum=range_momentum, group_size=group_size, method=method, percdamp=percdamp,
                     act_order=act_order)
    calibrates = calibration_batches is not None and (activations == "static" or method == "gptq")
    batches, comm = start_calibration(model, calibration_batches, calibrates, process_group, dist_timeout,
                                      arguments, what)
    _check_bits(weight_bits, act_bits, activations, what)
    if observer not in OBSERVERS:
        raise ValueError(f"{what}: unknown observer {observer!r}; expected one of {sorted(OBSERVERS)}")
    if method not in METHODS:
        raise ValueError(f"{what}: unknown method {method!r}; expected one of {METHODS}")
    if not (isinstance(percdamp, (int, float)) and 0 < percdamp <= 1):
        raise ValueError(f"{what}: percdamp must be in (0, 1], got {percdamp!r}")
    _check_float_model(model, what)
    if what == "quantize" and activations == "static" and batches is None:
        raise ValueError("quantize: static activations need calibration_batches (a few batches of sample inputs)")
    if method == "gptq" and batches is None:
        raise ValueError(f"{what}: method='gptq' needs calibration_batches (its Hessians come from each layer's "
                         "calibration inputs)")
    groups = {name: _layer_group_size(name, mod, weight_bits, group_size, what)
              for name, mod in _layers(model, exclude, what)}  # validate before folding changes anything
    if method == "gptq":
        for name, mod in _layers(model, exclude, what):
            check_gptq_layer(mod, name, what)
    if fold_bn:
        fold_conv_bn(model)
    layers = _layers(model, exclude, what)
    static_modules = []
    saved = {name: original_weight(mod).detach().clone() for name, mod in layers} if method == "gptq" else {}
    for name, mod in layers:
        rows = "last_dim" if isinstance(mod, nn.Linear) else "im2col"
        afq = ActivationFakeQuant(activations, act_bits, rows, learn_range=learn_range,
                                  range_momentum=range_momentum)
        _attach(mod, weight_bits, groups[name], afq)
        if activations == "static":
            static_modules.append((name, afq))
    try:
        if static_modules and batches is not None:
            _calibrate(model, static_modules, batches, observer, act_bits, percentile, progress, what, comm)
        if method == "gptq":
            gptq_layer(model, layers, batches, percdamp=percdamp, act_order=act_order, what=what,
                       progress=lambda it: progress_bar(it, desc=f"{what}: GPTQ", enabled=progress), comm=comm,
                       round_short=round_short)
    except Exception:
        # Leave no half-quantized model behind: detach everything we attached, restore GPTQ's weights.
        for name, mod in layers:
            _detach(mod)
            if name in saved:
                with torch.no_grad():
                    original_weight(mod).copy_(saved[name])
        raise
    return model


def remove_fake_quant(module: nn.Module) -> nn.Module:
    """Drop ``quantize`` / ``prepare_qat``'s training-time state from one layer, in place: the weight
    fake quantization (other parametrizations such as a pruning mask stay), the
    ``activation_fake_quant`` submodule and its forward pre-hook. The layer computes in float again."""
    _detach(module)
    return module


def _detach(mod: nn.Module) -> None:
    if _weight_fake_quant(mod) is not None:
        parametrizations = [p for p in mod.parametrizations.weight if not isinstance(p, WeightFakeQuant)]
        remove_parametrizations(mod, "weight", leave_parametrized=False)
        for p in parametrizations:
            parametrize.register_parametrization(mod, "weight", p)
    if hasattr(mod, "activation_fake_quant"):
        del mod.activation_fake_quant
    mod.__dict__.pop("_conv_forward", None)
    for key, hook in list(mod._forward_pre_hooks.items()):
        if hook is quantize_input_hook:
            del mod._forward_pre_hooks[key]


def quantize(
    model: nn.Module,
    calibration_batches: Iterable | None = None,
    weight_bits: int = 8,
    activations: str = "dynamic",
    observer: str = "minmax",
    act_bits: int = 8,
    percentile: float = 99.99,
    fold_bn: bool = True,
    exclude: Iterable[str] = (),
    progress: bool | None = None,
    group_size: int | None | str = "auto",
    method: str = "auto",
    percdamp: float = 0.01,
    act_order: bool = False,
    process_group: object = AUTO,
    dist_timeout: float | None = None,
) -> nn.Module:
    """Post-training quantization of every nn.Linear / nn.Conv2d (in place; returns the model).

    Folds BatchNorm into the preceding Conv/Linear (``fold_bn``), calibrates static
    activation ranges on ``calibration_batches`` (each batch: a tensor, a tuple of
    positional inputs, or a dict of keyword inputs) with the ``observer``
    (``"minmax"``, ``"percentile"`` at ``percentile``, or ``"mse"``), then attaches
    fake quantization so the model's float forward simulates the quantized one.
    Weights: symmetric at ``weight_bits`` (8 runs on the int8 kernels; 2..7 are simulated),
    one scale per output channel (``group_size=None``) or per group of ``group_size``
    consecutive k (a positive multiple of 8 dividing K, e.g. 32, 64, 128). ``"auto"``: 128 for
    2-4-bit weights on layers whose K it divides, per channel otherwise.
    ``method``: ``"auto"`` (default) is GPTQ for 2-4-bit weights when ``calibration_batches`` are given (on the
    real all-MiniLM-L6-v2 it keeps a 0.964 minimum sentence cosine at 4 bits where round-to-nearest keeps
    0.925: bench/README.md), except on layers the batches give fewer rows than live input features (their
    Hessian is rank deficient: rounded to nearest there), and round-to-nearest otherwise (5-8 bits lose
    little to rounding);
    ``"rtn"`` rounds each weight to nearest; ``"gptq"`` runs GPTQ
    (pycompress.quant.gptq: layer by layer in forward order, error compensation with the
    Hessian of each layer's calibration inputs, dampening ``percdamp`` of its mean diagonal,
    ``act_order`` to quantize the columns by decreasing Hessian diagonal); it needs
    ``calibration_batches`` and replaces each float weight by its dequantized GPTQ weight.
    ``pycompress.convert`` reads each layer's ``get_quant_state``. ``progress=None``
    shows a bar only on a terminal.
    ``process_group`` / ``dist_timeout``: calibration across processes (pycompress.distributed): under
    ``torch.distributed`` with several ranks (``"auto"``: the default group if initialized; or a
    ProcessGroup; ``None``: this process alone), a call that calibrates (static activations or GPTQ) is
    collective: each rank passes its own shard of the batches, and every rank ends with the model one
    process gets on all of them; ``dist_timeout`` (seconds) bounds each wait on another rank.
    """
    return _prepare(model, calibration_batches, weight_bits, activations, observer, act_bits, percentile, fold_bn,
                    exclude, progress, learn_range=False, range_momentum=0.0, what="quantize",
                    group_size=group_size, method=method, percdamp=percdamp, act_order=act_order,
                    process_group=process_group, dist_timeout=dist_timeout)


def prepare_qat(
    model: nn.Module,
    weight_bits: int = 8,
    activations: str = "static",
    act_bits: int = 8,
    calibration_batches: Iterable | None = None,
    observer: str = "minmax",
    fold_bn: bool = True,
    exclude: Iterable[str] = (),
    range_momentum: float = 0.01,
    progress: bool | None = None,
    group_size: int | None | str = "auto",
    process_group: object = AUTO,
    dist_timeout: float | None = None,
) -> nn.Module:
    """Quantization-aware training: attach fake quantization (straight-through
    estimators) to every nn.Linear / nn.Conv2d, in place, and return the model; then
    train it in your own loop. Static activation ranges start from
    ``calibration_batches`` if given (else from the first training batch) and follow an
    exponential moving average (``range_momentum``) of batch min/max in training mode;
    eval mode and ``freeze_ranges(model)`` fix them. BatchNorm is folded first
    (``fold_bn``), so its statistics are frozen during QAT. Pruning masks already on the
    weights stay in force (sparse QAT). The result converts like a PTQ model. ``group_size`` as
    in ``quantize``; ``process_group`` / ``dist_timeout`` as in ``quantize`` (the initial ranges from
    every rank's calibration batches).
    """
    return _prepare(model, calibration_batches, weight_bits, activations, observer, act_bits, 99.99, fold_bn,
                    exclude, progress, learn_range=True, range_momentum=range_momentum, what="prepare_qat",
                    group_size=group_size, process_group=process_group, dist_timeout=dist_timeout)


def freeze_ranges(model: nn.Module) -> nn.Module:
    """Stop QAT activation-range updates (e.g. for the last epochs)."""
    for mod in model.modules():
        if isinstance(mod, ActivationFakeQuant):
            mod.freeze()
    return model
