"""pycompress.conversion (``pycompress.convert``): swap a trained model's nn.Linear / nn.Conv2d layers for pycompress modules.

Each layer gets one format: ``float`` or one that a ``pycompress.nn`` class registered
(``pycompress.nn.registry.FORMATS``; ``FORMATS`` here lists them after ``float``):

  float         the layer as it was (masks baked into the weight)
  int8-dynamic  Int8Linear / Int8Conv2d, activations quantized per row at run time
  int8-static   the same with the calibrated activation scale / zero point of ``pycompress.quantize``
  int4          Int4Linear (a conv lowered onto it): 2-4-bit weights in groups along K, int8 activations
  sparse-fp32   pycompress.nn.SparseLinear (masked / mostly-zero weights)
  sparse-int8   pycompress.nn.SparseInt8Linear

The layer's state says which formats are candidates: zeros (a pruning mask or plain zeros)
make the sparse formats candidates, quantization state from ``pycompress.quantize`` makes
int8 use its calibrated scales (static activations -> int8-static), neither -> int8-dynamic.

Choosing among the candidates (``policy``):
- ``"auto"`` with ``example_inputs``: each candidate is timed at the layer's real input shape
  (captured with forward hooks) and the fastest wins; float stays unless a candidate is at
  least ``AUTO_MIN_SPEEDUP`` faster, so a converted model is not slower because of pycompress.
  Sparse formats are timed for any layer below the loose ``TIMED_SPARSE_*`` density limits
  (the timing, not the M <= 16 break-even, decides).
- ``"auto"`` without example inputs: the heuristic below (``heuristic_format``).
- ``"state"``: the state-preferred format for every layer, no timing, no size heuristic
  (a layer is sparse when it is below the untimed sparse density thresholds, as for ``"auto"``
  without example inputs).
- a format name (or ``"int8"``: int8-static where calibrated, else int8-dynamic): that format
  wherever it applies, whatever the layer's density; layers where it does not apply stay float,
  with the reason.
``overrides={pattern: format}`` and ``exclude=[pattern]`` (fnmatch on qualified names) win over the policy.
``verify_inputs``: every converted layer is checked on the captured inputs against its float
twin; a layer over its budget (``pycompress.verify.layer_budget_db``) stays float, with its SQNR.

convert works in place (a converted model must not need twice the float model's memory) and
returns the model. Keep ``copy.deepcopy(model)`` first if you want the float reference.
Converting an already converted model raises RuntimeError.
"""

from __future__ import annotations

import fnmatch
import time
import weakref
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn
from torch.nn.utils import parametrize

import pycompress.quant as quant_state  # looked up per call: tests substitute get_quant_state
from pycompress import _C, thresholds
from pycompress._native import get_isa
from pycompress.attention import use_fused_attention
from pycompress.calibration import run_batch
from pycompress.nn.int8_conv import conv2d_unsupported_reason
from pycompress.nn.int8_linear import SharedInputGroup
from pycompress.nn.registry import FORMATS as REGISTERED_FORMATS
from pycompress.prune import masks
from pycompress.nn.registry import (
    QuantParams,
    float_kind,
    fusible_activation,
    is_compressed,
    linearize_transposed,
    module_bytes,
)
from pycompress.reference.q4 import W4_BITS
from pycompress.reference.q8 import ACT_BITS, MAX_K, act_qmax
from pycompress.verification import ErrorStats, layer_budget_db

# Modules of pycompress's training-time state: a layer's "bytes before" leaves their buffers out (a pruning mask
# is as large as the weight; the float model a user deploys has neither).
TRAINING_STATE = (masks.PruningMask, quant_state.ActivationFakeQuant, quant_state.WeightFakeQuant)

# "float" keeps the layer; the others are pycompress.nn's registered formats.
FORMATS = ("float",) + tuple(REGISTERED_FORMATS)
POLICIES = ("auto", "state", "int8") + FORMATS

# auto: a candidate must beat float by this factor (timings on a shared CPU are noisy).
# Candidates are built one layer at a time, so timing adds one layer's packed copies at most.
AUTO_MIN_SPEEDUP = 1.05
AUTO_WARMUP, AUTO_REPEATS = 2, 7

# auto without example inputs: the thresholds of the active ISA level (pycompress/thresholds.py,
# measured per tier by bench/bench_sparse.py): a minimum GEMM size for int8, and the densities at or
# below which the sparse formats are candidates.
# auto WITH example inputs times the sparse formats at the layer's real input instead of
# trusting the M <= 16 break-even above (at M = 1 unstructured int8 wins from ~80% sparsity, block
# density ~0.59). These looser limits only skip building packs that cannot win at any M in the
# sparse benchmark: no sparse format beat dense int8 at 50% sparsity (block density 0.94 when
# unstructured, 0.5 with 1x4 blocks), and csr needs density well below 0.5 to beat dense fp32.
TIMED_SPARSE_INT8_MAX_BLOCK_DENSITY = 0.75
TIMED_SPARSE_INT8_BYTE_LAYOUT_MAX_DENSITY = 0.50  # the byte layout lost to dense int8 at 50% sparsity
TIMED_SPARSE_FP32_MAX_DENSITY = 0.30

# Activation fusion: the int8 kernel applies ReLU or exact (erf) GELU in its epilogue, saving a
# pass over the output. Fused where the code is known to compute act(layer(x)) and nothing else
# reads the layer's pre-activation output: consecutive children of a plain nn.Sequential, and
# these parents (name -> (layer attribute, activation attribute)), whose forward is exactly that.
FUSIBLE_PARENTS = {
    "BertIntermediate": ("dense", "intermediate_act_fn"),
    "RobertaIntermediate": ("dense", "intermediate_act_fn"),
}

# Shared-input groups (pycompress.nn.SharedInputGroup): int8 layers that read the same tensor are
# computed in one kernel call (x quantized once, one parallel pass). Found two ways:
# - these parents (name -> layer attributes), whose forward calls the layers back to back on one
#   tensor with nothing in between (transformers 5.x source), so their outputs may be shared
#   even for inference tensors, which have no version counter;
# - with example inputs, any int8 layers whose first call received the very same tensor object
#   (shared only for tensors whose version counter proves x unchanged between the calls).
SHARED_INPUT_PARENTS = {
    "BertSelfAttention": ("query", "key", "value"),
    "RobertaSelfAttention": ("query", "key", "value"),
    "LlamaAttention": ("q_proj", "k_proj", "v_proj"),
    "MistralAttention": ("q_proj", "k_proj", "v_proj"),
    "Qwen2Attention": ("q_proj", "k_proj", "v_proj"),
    "LlamaMLP": ("gate_proj", "up_proj"),
    "MistralMLP": ("gate_proj", "up_proj"),
    "Qwen2MLP": ("gate_proj", "up_proj"),
}


@dataclass
class LayerState:
    """What a layer carries that decides its format."""

    kind: str  # "Linear" | "Conv2d"
    density: float
    block_density: float  # stored fraction of 1x4 blocks along K of the GEMM weight (what sparse-int8 stores)
    masked: bool
    quant: object | None  # pycompress.quant's state (weight_bits, weight_scale, activations, act_scale, act_zero_point)
    unsupported: str | None  # why no pycompress kernel can run this layer


@dataclass
class LayerRecord:
    """One converted (or deliberately kept) layer: what it became and why."""

    name: str
    aliases: list[str]
    kind: str
    format: str
    reason: str
    kernel: str
    density: float
    weight_bits: int
    bytes_before: int
    input_shape: tuple | None = None
    timings_us: dict[str, float] = field(default_factory=dict)
    not_considered: dict[str, str] = field(default_factory=dict)
    fused_activation: str | None = None


@dataclass
class ConversionRecord:
    policy: str
    layers: list[LayerRecord]
    notes: list[str]
    fused: list[str] = field(default_factory=list)  # activation modules replaced by nn.Identity (qualified names)
    # SharedInputGroups: {"layers": qualified names, "adjacent": bool} (see SharedInputGroup)
    shared_input: list[dict] = field(default_factory=list)
    # attention modules switched to pycompress's fused attention kernel (pycompress.attention)
    attention: list[str] = field(default_factory=list)


# ---------------------------------------------------------------- layer state


def _block_density(gemm_weight: torch.Tensor) -> float:
    """Fraction of the 1x4 blocks along K (K padded to a multiple of 4) holding a nonzero."""
    n, k = gemm_weight.shape
    nonzero = torch.nn.functional.pad(gemm_weight.detach() != 0, (0, -k % 4))
    return float(nonzero.view(n, -1, 4).any(dim=2).sum()) / max(1, nonzero.numel() // 4)


def _base_type(module: nn.Module) -> type:
    return parametrize.type_before_parametrizations(module)


def _layer_state(module: nn.Module, kind: str) -> LayerState:
    weight = module.weight  # parametrized: the masked / fake-quantized weight
    density = float((weight != 0).sum()) / max(1, weight.numel())
    gemm_weight = weight.detach()
    if kind == "Conv2d":  # the im2col GEMM's K order (kh, kw, C), as Im2colConv2d.gemm_weight
        gemm_weight = gemm_weight.permute(0, 2, 3, 1).reshape(weight.shape[0], -1)
    block_density = _block_density(gemm_weight)
    masked = parametrize.is_parametrized(module, "weight")
    quant = quant_state.get_quant_state(module)
    unsupported = None
    if weight.dtype != torch.float32:
        unsupported = f"weight dtype {weight.dtype}: the kernels take float32 layers"
    elif kind == "Conv2d":
        unsupported = conv2d_unsupported_reason(module)
    if unsupported is None:
        k = weight[0].numel()
        if k > MAX_K:
            unsupported = f"{k} input features exceed the int8 kernel's K limit of {MAX_K} (int32 accumulator)"
    return LayerState(kind, density, block_density, masked, quant, unsupported)


def _quant_attr(quant, name: str, default=None):
    return getattr(quant, name, default) if quant is not None else default


def _int8_variant(state: LayerState) -> str:
    return "int8-static" if _quant_attr(state.quant, "activations") == "static" else "int8-dynamic"


def _candidate_reasons(state: LayerState, density_limits: str | None = "heuristic") -> dict[str, str | None]:
    """For each format: None when it is a candidate for this layer, else why not. ``density_limits``:
    which sparse density thresholds apply: "heuristic" (untimed choice, M <= 16 break-even), "timed"
    (the looser limits of a timed choice), None (an explicit request skips them)."""
    reasons: dict[str, str | None] = {"float": None}
    for fmt in FORMATS[1:]:
        reasons[fmt] = state.unsupported
    if reasons["int8-static"] is None and _quant_attr(state.quant, "activations") != "static":
        reasons["int8-static"] = "no calibrated static activation scale (run pycompress.quantize(activations='static'))"
    if reasons["int8-dynamic"] is None and _quant_attr(state.quant, "activations") == "static":
        reasons["int8-dynamic"] = "the layer is calibrated for static activations; int8-static is used"
    low_bits = _quant_attr(state.quant, "weight_bits", 8) in W4_BITS
    scale = _quant_attr(state.quant, "weight_scale")
    if scale is not None and scale.dim() == 2 and scale.shape[1] > 1:  # grouped scales: only int4 holds them
        for fmt in ("int8-dynamic", "int8-static", "sparse-int8"):
            if reasons[fmt] is None:
                reasons[fmt] = (f"its weights are quantized in groups of {state.quant.group_size} along K, which "
                                "only int4 stores; quantize per channel (group_size=None) for int8")
    if density_limits is None:
        return reasons
    # A policy runs a layer pycompress.quantize'd to 2-4 bits on int4 (its packed size), others on int8.
    for fmt in ("int8-dynamic", "int8-static"):
        if reasons[fmt] is None and low_bits:
            reasons[fmt] = (f"the layer is quantized to {state.quant.weight_bits} bits: int4 stores them packed "
                            "(an override can ask for int8)")
    if reasons["int4"] is None and not low_bits:
        reasons["int4"] = ("not quantized to 2-4 bits (pycompress.quantize(weight_bits=4)); an override or "
                           "policy='int4' asks for it")
    if reasons["sparse-fp32"] is None and state.quant is not None:
        reasons["sparse-fp32"] = ("the layer is quantized by pycompress.quantize: a policy keeps its int8 numbers "
                                  "(sparse-int8); an override can ask for sparse-fp32 to drop them")
    if density_limits == "timed":
        int8_limit, byte_limit, fp32_limit = (TIMED_SPARSE_INT8_MAX_BLOCK_DENSITY,
                                              TIMED_SPARSE_INT8_BYTE_LAYOUT_MAX_DENSITY, TIMED_SPARSE_FP32_MAX_DENSITY)
        because = "no sparse kernel wins there at any batch size"
    else:
        tier = thresholds.current()
        int8_limit, byte_limit, fp32_limit = (tier.sparse_int8_max_block_density,
                                              tier.sparse_int8_byte_layout_max_density, tier.sparse_fp32_max_density)
        because = f"dense int8 wins for M <= 16 on {get_isa()}"
    # The byte sliced layout (AVX-512 VBMI) makes unstructured sparsity pay by its nonzeros.
    byte_layout = _C.sparse_sliced_bytes_vectorized()
    if reasons["sparse-int8"] is None and state.block_density > int8_limit and not (
            byte_layout and state.density <= byte_limit):
        reasons["sparse-int8"] = (f"1x4 block density {state.block_density:.2f} > {int8_limit}"
                                  + (f" and density {state.density:.2f} > {byte_limit}" if byte_layout else "")
                                  + f" ({because})")
    if reasons["sparse-fp32"] is None and state.density > fp32_limit:
        reasons["sparse-fp32"] = f"density {state.density:.2f} > {fp32_limit} ({because})"
    return reasons


def state_format(state: LayerState, candidates: dict[str, str | None]) -> tuple[str, str]:
    """The format the layer's state asks for, and why."""
    for fmt, why in (("sparse-int8", "sparse weights"), ("sparse-fp32", "sparse weights")):
        if candidates[fmt] is None:
            return fmt, f"{why} (density {state.density:.2f})"
    if candidates["int4"] is None:
        return "int4", f"quantized to {state.quant.weight_bits} bits by pycompress.quantize"
    int8 = _int8_variant(state)
    if candidates[int8] is None:
        why = "calibrated by pycompress.quantize" if state.quant is not None else "no quantization state: dynamic"
        return int8, why
    return "float", candidates[int8] or "no pycompress format applies"


def heuristic_format(state: LayerState, candidates: dict[str, str | None], weight_numel: int) -> tuple[str, str]:
    """auto without example inputs: the state's format, unless the GEMM is too small to gain."""
    fmt, why = state_format(state, candidates)
    min_weights = thresholds.current().int8_min_weights
    if fmt != "float" and min_weights is None:
        return "float", (f"the {get_isa()} kernels are slower than float torch (pycompress/thresholds.py; "
                         "pass example_inputs to time it)")
    if fmt in ("int8-dynamic", "int8-static", "int4") and weight_numel < min_weights:
        return "float", (f"{weight_numel} weights < {min_weights}: per-call overhead beats the int8 gain "
                         "(pass example_inputs to time it)")
    return fmt, why + " (heuristic: no example inputs)"


# ---------------------------------------------------------------- building modules


def _act_bits(state: LayerState, act_bits: int | None, fmt: str = "int8-dynamic") -> int:
    """The layer's activation width: convert's ``act_bits``; else, for a layer pycompress.quantize'd, 7 when
    it was simulated with ``act_bits=7`` (the u7 format) and 8 otherwise (the kernels have no narrower
    activations: fewer simulated bits run, more precisely, on 8); else (no quantization state) 7 where the
    active ISA runs u7 on a faster kernel than u8 (AVX2: vpmaddubsw, exact for u7; 1.35-1.9x; it is also
    FBGEMM's choice on x86, reduce_range), 8 elsewhere."""
    if act_bits is not None:
        return act_bits
    if state.quant is not None:
        return 7 if _quant_attr(state.quant, "act_bits", 8) == 7 else 8
    # int4's AVX2 kernel is exact on vpmaddubsw for u8 already (its products are 4-bit): u7 gains it nothing.
    return 7 if _C.q8_u7_kernel() and fmt != "int4" else 8


def _quant_params(state: LayerState, fmt: str, act_bits: int | None = None) -> QuantParams:
    """What ``pycompress.quantize`` decided for the layer, as format ``fmt`` uses it: a calibrated static
    activation scale for int8-static and for sparse-int8 (one format for both activation modes)."""
    bits = int(_quant_attr(state.quant, "weight_bits", 8))
    scale = _quant_attr(state.quant, "weight_scale")
    group_size = _quant_attr(state.quant, "group_size")
    abits = _act_bits(state, act_bits, fmt)
    if fmt != "int8-dynamic" and _int8_variant(state) == "int8-static":
        zp = int(state.quant.act_zero_point)
        if zp > act_qmax(abits):
            raise ValueError(f"convert: layer calibrated with zero point {zp} cannot run {abits}-bit activations; "
                             f"calibrate with pycompress.quantize(act_bits={abits})")
        return QuantParams(bits, scale, act_scale=float(state.quant.act_scale), act_zero_point=zp, act_bits=abits,
                           group_size=group_size)
    return QuantParams(bits, scale, act_bits=abits, group_size=group_size)


def build_module(module: nn.Module, fmt: str, name: str, state: LayerState, act_bits: int | None = None) -> nn.Module:
    """The pycompress module for ``module`` in format ``fmt`` (``module`` itself for float)."""
    if fmt == "float":
        return module
    return REGISTERED_FORMATS[fmt].build(module, name, _quant_params(state, fmt, act_bits))


def _bake_float(module: nn.Module) -> nn.Module:
    """A float layer keeps no training-time state at inference: pycompress.quant's fake quantization
    (weight parametrization, ``activation_fake_quant`` submodule and its forward pre-hook) is dropped,
    so the layer computes in float, and its masked weight becomes a plain parameter."""
    quant_state.remove_fake_quant(module)
    if parametrize.is_parametrized(module):
        for tensor_name in list(module.parametrizations.keys()):
            masks.remove_parametrizations(module, tensor_name, leave_parametrized=True)
    return module


def _bake_other_layers(model: nn.Module) -> list[str]:
    """Layers that pc.prune / pc.quantize marked but convert has no kernel for (nn.Conv1d...): like a float layer
    convert keeps, each computes in float with its mask baked into a plain weight, so the converted model
    holds no training-time state (save / load rebuild it as an nn layer). Their names."""
    baked = []
    for name, module in model.named_modules():
        if masks.training_state(module):
            quant_state.remove_fake_quant(module)
            masks.remove(module)
            baked.append(name)
    return baked


# ---------------------------------------------------------------- timing and checks


def _time_candidates_us(modules: dict[str, nn.Module], args: tuple) -> dict[str, float]:
    """Microseconds per call of each module on ``args``: round-robin rounds so machine noise hits
    every candidate alike, and the minimum over rounds (noise only ever adds time)."""
    samples: dict[str, list[float]] = {name: [] for name in modules}
    with torch.no_grad():
        for _ in range(AUTO_WARMUP):
            for module in modules.values():
                module(*args)
        for _ in range(AUTO_REPEATS):
            for name, module in modules.items():
                t0 = time.perf_counter()
                module(*args)
                samples[name].append((time.perf_counter() - t0) * 1e6)
    return {name: min(v) for name, v in samples.items()}


def _capture_layer_io(model: nn.Module, targets: dict[int, tuple[list[str], nn.Module]], inputs,
                      keep_outputs: bool, input_sources: dict[int, int] | None = None,
                      keep_args: bool = True, on_first_call: Callable | None = None
                      ) -> dict[int, tuple[tuple, torch.Tensor | None]]:
    """Each target layer's first call during model(inputs): (args, output); ``keep_args=False`` keeps
    neither (only ``input_sources``). ``input_sources``, when given, receives id(layer) -> a token naming
    the tensor object of that call's first argument: equal tokens only for the very same, still live,
    tensor object (weak references: a later tensor that reuses a dead one's id and address gets a new
    token; keying by id and address grouped unrelated layers of MiniLM, whose shared calls then
    computed outputs nobody took). ``on_first_call(layer, args)`` runs inside that first call (convert
    times the layer's candidates there, so no layer's input outlives its call). With ``keep_args=False``
    nothing is held beyond what the model holds."""
    captured: dict[int, tuple[tuple, torch.Tensor | None]] = {}
    live: list[tuple[weakref.ref, int]] = []  # (weak reference to a first argument, its token)

    def token_of(t: torch.Tensor) -> int:
        for ref, token in live:
            if ref() is t:
                return token
        live.append((weakref.ref(t), len(live)))
        return len(live) - 1

    def hook(mod, args, out):
        # A layer called with keyword or non-tensor arguments is not captured: it is decided by the heuristic.
        if id(mod) not in captured and args and all(isinstance(a, torch.Tensor) for a in args):
            captured[id(mod)] = ((tuple(a.detach() for a in args), out.detach() if keep_outputs else None)
                                 if keep_args else ((), None))
            if input_sources is not None:
                input_sources[id(mod)] = token_of(args[0])
            if on_first_call is not None:
                on_first_call(mod, args)

    handles = [m.register_forward_hook(hook) for _, m in targets.values()]
    try:
        with torch.no_grad():
            run_batch(model, inputs, "convert: example_inputs / verify_inputs")
    finally:
        for h in handles:
            h.remove()
    return captured


def _use_counts(model: nn.Module) -> dict[int, int]:
    """id(module) -> how many places of the model hold it (a shared module counts once per place)."""
    uses: dict[int, int] = {}
    for _, m in model.named_modules(remove_duplicate=False):
        uses[id(m)] = uses.get(id(m), 0) + 1
    return uses


def _share_inputs(model: nn.Module, records: list[LayerRecord], input_sources: dict[int, int],
                  original_ids: dict[int, int]) -> list[dict]:
    """The groups of converted dense int8 layers that read one tensor (SHARED_INPUT_PARENTS, then the
    captured sources), as ConversionRecord.shared_input entries (apply_plan forms them)."""
    names = {id(m): n for n, m in model.named_modules()}
    uses = _use_counts(model)
    grouped: set[int] = set()

    def eligible(m) -> bool:
        return SharedInputGroup.can_join(m) and uses[id(m)] == 1 and id(m) not in grouped

    compatible = SharedInputGroup.compatible

    groups: list[dict] = []
    for parent in model.modules():
        attrs = SHARED_INPUT_PARENTS.get(type(parent).__name__)
        if attrs is None:
            continue
        members = [getattr(parent, a, None) for a in attrs]
        if all(eligible(m) for m in members) and compatible(members):
            grouped.update(id(m) for m in members)
            groups.append({"layers": [names[id(m)] for m in members], "adjacent": True})
    by_source: dict[int, list[nn.Module]] = {}
    for rec in records:
        m = model.get_submodule(rec.name)
        source = input_sources.get(original_ids.get(id(m), -1))
        if source is not None and eligible(m):
            by_source.setdefault(source, []).append(m)
    for members in by_source.values():
        if len(members) >= 2 and compatible(members):
            groups.append({"layers": [names[id(m)] for m in members], "adjacent": False})
    return groups


def _local_error(new: nn.Module, args: tuple, float_out: torch.Tensor) -> ErrorStats:
    stats = ErrorStats()
    with torch.no_grad():
        stats.update(new(*args), float_out)
    return stats


# ---------------------------------------------------------------- activation fusion


def _fuse_activations(model: nn.Module, records: list[LayerRecord]) -> list[str]:
    """Sets the fused activation of each layer whose ReLU / GELU its kernel applies, and returns the
    activations' paths (apply_plan replaces them by Identity)."""
    uses = _use_counts(model)
    by_module = {}
    for rec in records:
        by_module[id(model.get_submodule(rec.name))] = rec
    names = {id(m): n for n, m in model.named_modules()}
    pairs: list[tuple[nn.Module, str, nn.Module, nn.Module]] = []  # (parent, activation attribute, layer, activation)
    for parent in model.modules():
        if type(parent) is nn.Sequential:
            children = list(parent._modules.items())
            for (_, layer), (act_name, act) in zip(children, children[1:]):
                pairs.append((parent, act_name, layer, act))
        elif type(parent).__name__ in FUSIBLE_PARENTS:
            layer_attr, act_attr = FUSIBLE_PARENTS[type(parent).__name__]
            layer, act = getattr(parent, layer_attr, None), getattr(parent, act_attr, None)
            if isinstance(layer, nn.Module) and isinstance(act, nn.Module):
                pairs.append((parent, act_attr, layer, act))
    fused = []
    for parent, act_attr, layer, act in pairs:
        fuses = id(layer) in by_module and is_compressed(layer) and layer.fuses_activation()
        kind = fusible_activation(act)
        if not fuses or kind is None or layer.activation != "none" or uses[id(layer)] > 1 or uses[id(act)] > 1:
            continue
        layer.set_activation(kind)
        parent_name = names[id(parent)]
        qualified = f"{parent_name}.{act_attr}" if parent_name else act_attr
        by_module[id(layer)].fused_activation = kind
        by_module[id(layer)].kernel += f" + fused {kind}"
        fused.append(qualified)
    return fused


# ---------------------------------------------------------------- public API


def apply_plan(model: nn.Module, fused: list[str], shared_input: list[dict], attention: bool) -> list[str]:
    """The model edits of a conversion beyond its layers, in one place: convert applies them once it has
    chosen the layers (and set the fused activations in their kernels), load applies the recorded ones to
    a model rebuilt from a file. ``fused``: paths of the ReLU / GELU modules the layers before them now
    apply (replaced by Identity); ``shared_input``: ConversionRecord.shared_input groups (formed as
    SharedInputGroups); ``attention``: route Hugging Face sdpa attention to the fused kernel. Returns the
    attention modules switched. Raises ValueError when the model does not fit the plan."""
    for act_path in fused:
        try:
            act = model.get_submodule(act_path) if isinstance(act_path, str) else None
        except AttributeError:
            act = None
        if act is None or fusible_activation(act) is None:
            raise ValueError(f"the conversion fused the activation {act_path!r} into its layer, but the model has "
                             "no such ReLU / GELU there (is it the same architecture?)")
        _set_submodule(model, act_path, nn.Identity())
    for group in shared_input:
        try:
            members = [model.get_submodule(n) for n in group["layers"]]
            SharedInputGroup(members, adjacent=bool(group["adjacent"]))
        except (AttributeError, KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"a shared-input group of the conversion record does not fit the model: {exc}") from None
    return use_fused_attention(model) if attention else []


def is_converted(model: nn.Module) -> bool:
    return hasattr(model, "_pycompress_conversion") or any(is_compressed(m) for m in model.modules())


def _matches(name_list: list[str], patterns) -> str | None:
    for pattern in patterns:
        if any(fnmatch.fnmatchcase(n, pattern) for n in name_list):
            return pattern
    return None


# Formats with a CUDA kernel bit-identical to the CPU's (csrc/cuda), and what each policy converts to on a CUDA model:
# "auto" times the CPU kernels, so on CUDA it is dense int8 everywhere. (sparse-fp32 runs on CUDA too, but its float
# sums are not the CPU's bits: convert on the CPU and move it.)
CUDA_FORMATS = ("float", "int8-dynamic", "int8-static", "sparse-int8", "int4")
CUDA_POLICIES = {"auto": "int8", "int8": "int8", **{f: f for f in CUDA_FORMATS}}


def _cuda_device_of(model: nn.Module) -> torch.device | None:
    """The CUDA device of the model's Linear / Conv2d layers (None when they are not on CUDA)."""
    devices = {m.weight.device for m in model.modules() if float_kind(m) is not None}
    if not any(d.type == "cuda" for d in devices):
        return None
    if len(devices) > 1:
        raise RuntimeError(f"convert: the model's layers are on several devices ({', '.join(sorted(map(str, devices)))}):"
                           " move it to one first")
    return devices.pop()


def _convert_for_cuda(model: nn.Module, device: torch.device, example_inputs, policy: str, *, overrides, **kwargs):
    """A CUDA model: converted on the CPU to the formats with a CUDA kernel (CUDA_POLICIES), verified there, then
    moved back to ``device``, where those layers run the CUDA kernels (bit-identical to the CPU's)."""
    from torch.utils._pytree import tree_map

    from pycompress import _cuda

    status = _cuda.status()
    if not status["usable"]:
        raise RuntimeError(f"convert: the model is on {device}, but {status['reason']}")
    if policy not in CUDA_POLICIES:
        raise ValueError(f"convert: policy {policy!r} makes formats without a CUDA kernel of the CPU's bits; on {device} "
                         f"use one of {tuple(CUDA_POLICIES)} (formats with one: {CUDA_FORMATS}), or convert on the CPU "
                         "and move the model")
    for pattern, fmt in (overrides or {}).items():
        if fmt != "int8" and fmt not in CUDA_FORMATS:
            raise ValueError(f"convert: override {pattern!r} -> {fmt!r} has no CUDA kernel of the CPU's bits; on "
                             f"{device}: {('int8',) + CUDA_FORMATS}")
    to_cpu = lambda inputs: tree_map(lambda t: t.cpu() if isinstance(t, torch.Tensor) else t, inputs)  # noqa: E731
    verify_inputs = kwargs.pop("verify_inputs")
    model.cpu()
    try:
        convert(model, to_cpu(example_inputs), CUDA_POLICIES[policy], overrides=overrides,
                verify_inputs=to_cpu(verify_inputs), fused_attention=False, **kwargs)
    finally:
        model.to(device)
    return model


def convert(model: nn.Module, example_inputs=None, policy: str = "auto", *, overrides: dict[str, str] | None = None,
            exclude: list[str] | tuple[str, ...] = (), verify_inputs=None,
            layer_min_sqnr_db: float | None = None, fuse_activations: bool = True,
            share_inputs: bool = True, fused_attention: bool = True, act_bits: int | None = None) -> nn.Module:
    """Swap ``model``'s Linear / Conv2d layers for pycompress modules, in place (see the module docstring).

    example_inputs / verify_inputs: a tensor, a tuple of positional args, or a dict of keyword args.
    layer_min_sqnr_db: overrides the per-format budget used with ``verify_inputs``.
    fuse_activations: fold a ReLU / exact GELU that follows an int8 layer into its kernel (FUSIBLE_PARENTS).
    share_inputs: compute int8 layers that read the same tensor in one kernel call
      (pycompress.nn.SharedInputGroup; SHARED_INPUT_PARENTS, or the same input tensor in example_inputs).
    fused_attention: switch a Hugging Face transformers model on the default sdpa attention to
      pycompress's fused fp32 attention kernel (``pycompress.use_fused_attention``; what the kernel
      cannot serve still goes to sdpa). It is fp32 math as before, not a compression format: the
      summary notes it, and ``verify`` compares the whole model against the float reference.
    act_bits: the dense int8 layers' activation width, 8 or 7 (the u7 format: a coarser grid, and on AVX2
      CPUs 1.35-1.9x faster, since vpmaddubsw is exact for it; csrc/q8/q8_gemm.h). None: what
      pycompress.quantize simulated (7 or 8); for layers it did not quantize, 7 where the active ISA has the
      faster u7 kernel (AVX2 without VNNI), else 8. sparse-int8 layers always run 8-bit activations.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"convert: expected an nn.Module, got {type(model).__name__}")
    if hasattr(model, "_orig_mod"):
        raise TypeError("convert: got a torch.compile'd module; convert the original model, then compile it")
    if policy not in POLICIES:
        raise ValueError(f"convert: policy {policy!r} is not one of {POLICIES}")
    if act_bits is not None and act_bits not in ACT_BITS:
        raise ValueError(f"convert: act_bits must be None or one of {ACT_BITS}, got {act_bits!r}")
    overrides = dict(overrides or {})
    for pattern, fmt in overrides.items():
        if fmt not in ("int8",) + FORMATS:
            raise ValueError(f"convert: override {pattern!r} -> {fmt!r} is not a format: {('int8',) + FORMATS}")
    if is_converted(model):
        raise RuntimeError("convert: this model is already converted (it holds pycompress layers); convert the "
                           "float model once. To change formats, start again from the float model.")
    device = _cuda_device_of(model)
    if device is not None:
        return _convert_for_cuda(model, device, example_inputs, policy, overrides=overrides, exclude=exclude,
                                 verify_inputs=verify_inputs, layer_min_sqnr_db=layer_min_sqnr_db,
                                 fuse_activations=fuse_activations, share_inputs=share_inputs, act_bits=act_bits)

    notes: list[str] = []
    transposed = linearize_transposed(model)
    if transposed:
        notes.append(f"{len(transposed)} transformers Conv1D layers (a Linear with its weight transposed) became "
                     "nn.Linear views of the same weights, so they convert like any Linear")

    # Every target layer once (shared modules appear under several names).
    targets: dict[int, tuple[list[str], nn.Module]] = {}
    mha_children = {id(m) for mha in model.modules() if isinstance(mha, nn.MultiheadAttention) for m in mha.modules()}
    for name, module in model.named_modules(remove_duplicate=False):
        if float_kind(module) is None:
            continue
        if id(module) in targets:
            targets[id(module)][0].append(name)
        else:
            targets[id(module)] = ([name], module)
    for names, module in targets.values():
        device = module.weight.device
        if device.type != "cpu":
            raise RuntimeError(f"convert: layer {names[0]} is on {device}: convert takes CPU and CUDA models")
    if not targets:
        notes.append("no nn.Linear or nn.Conv2d layers: the model is returned unchanged")

    def state_of(key: int, module: nn.Module) -> LayerState:
        state = _layer_state(module, float_kind(module))
        if key in mha_children:
            state.unsupported = "nn.MultiheadAttention reads its projections' weights directly, not through forward"
        elif _base_type(module) not in (nn.Linear, nn.Conv2d):
            state.unsupported = f"{_base_type(module).__name__} subclasses nn.{state.kind}; its forward may differ"
        return state

    def decided_without_timing(names: list[str]) -> bool:
        return _matches(names, exclude) is not None or any(_matches(names, [p]) for p in overrides)

    # auto with example inputs: each layer's candidates are built and timed inside the layer's first
    # call, on its real input, and only the timings are kept: the peak is the model's own forward plus
    # one layer's candidates, never every layer's input at once.
    timings: dict[int, tuple[tuple, dict[str, float]]] = {}

    def time_layer(module: nn.Module, args: tuple) -> None:
        names = targets[id(module)][0]
        if decided_without_timing(names):
            return
        state = state_of(id(module), module)
        candidates = _candidate_reasons(state, "timed")
        built = {cand: build_module(module, cand, names[0], state, act_bits) for cand in FORMATS
                 if candidates[cand] is None}
        timings[id(module)] = (tuple(tuple(a.shape) for a in args), _time_candidates_us(built, args))

    timing = policy == "auto" and example_inputs is not None
    input_sources: dict[int, int] = {}
    capture = example_inputs is not None and (timing or share_inputs)
    captured = _capture_layer_io(model, targets, example_inputs, keep_outputs=False, input_sources=input_sources,
                                 keep_args=False, on_first_call=time_layer if timing else None) if capture else {}
    original_ids: dict[int, int] = {}  # id(converted module) -> id(the float layer it replaced)
    checked = _capture_layer_io(model, targets, verify_inputs, keep_outputs=True) if verify_inputs is not None else {}

    records: list[LayerRecord] = []
    # Pop each layer as it is converted so its float weights can be freed right after the swap:
    # the peak stays near the float model plus one layer's scratch.
    for key in list(targets):
        names, module = targets.pop(key)
        checked_io = checked.pop(key, None)
        name = names[0]
        kind = float_kind(module)
        state = state_of(key, module)
        timed = policy == "auto" and key in timings
        candidates = _candidate_reasons(state, "timed" if timed else "heuristic")
        record = LayerRecord(name, names, kind, "float", "", "", state.density, 32, module_bytes(module, TRAINING_STATE),
                             not_considered={f: r for f, r in candidates.items() if r is not None})
        excluded = _matches(names, exclude)
        override = next(((p, f) for p, f in overrides.items() if _matches(names, [p])), None)
        if excluded is not None:
            fmt, why = "float", f"excluded by pattern {excluded!r}"
        elif override is not None or policy not in ("auto", "state"):
            requested = override[1] if override is not None else policy
            source = f"override {override[0]!r}" if override is not None else f"policy {policy!r}"
            fmt = _int8_variant(state) if requested == "int8" else requested
            applicable = _candidate_reasons(state, density_limits=None)
            if applicable[fmt] is None:
                why = f"{source}"
            else:
                why = f"{source} asked for {fmt}, which does not apply: {applicable[fmt]}"
                fmt = "float"
        elif policy == "state":
            fmt, why = state_format(state, candidates)
        elif timed:
            record.input_shape, record.timings_us = timings.pop(key)
            fmt, why, best = "float", "no candidate beat float by 5%", record.timings_us["float"] / AUTO_MIN_SPEEDUP
            for cand, us in record.timings_us.items():
                if cand != "float" and us < best:
                    best, fmt = us, cand
                    why = f"fastest at input {record.input_shape[0]} (timed)"
        elif timing:
            fmt, why = heuristic_format(state, candidates, module.weight.numel())
            why += "; not called by example_inputs"
        else:
            fmt, why = heuristic_format(state, candidates, module.weight.numel())

        new = module if fmt == "float" else build_module(module, fmt, name, state, act_bits)
        if fmt != "float" and checked_io is not None:
            budget = (layer_budget_db(new.format_name, new.weight_bits, new.act_bits) if layer_min_sqnr_db is None
                      else layer_min_sqnr_db)
            args, float_out = checked_io
            err = _local_error(new, args, float_out)
            if not err.sqnr_db >= budget:
                why = f"kept float: {fmt} measured {err.sqnr_db:.1f} dB SQNR < {budget:.1f} dB budget on verify_inputs"
                fmt, new = "float", module
            else:
                why += f"; verified {err.sqnr_db:.1f} dB >= {budget:.1f} dB"
        if fmt == "float":
            new = _bake_float(module)
        record.format, record.reason = fmt, why
        record.weight_bits = new.weight_bits if fmt != "float" else 32
        record.kernel = new.kernel_name() if fmt != "float" else "torch (float32)"
        records.append(record)
        if new is not module:
            original_ids[id(new)] = key
            for qualified in names:
                _set_submodule(model, qualified, new)
    baked = _bake_other_layers(model)
    if baked:
        notes.append(f"{len(baked)} layers convert has no kernel for keep float, their pruning masks baked into "
                     f"their weights: {', '.join(baked[:4])}{', ...' if len(baked) > 4 else ''}")
    fused = _fuse_activations(model, records) if fuse_activations else []
    shared = _share_inputs(model, records, input_sources, original_ids) if share_inputs else []
    attention = apply_plan(model, fused, shared, fused_attention)
    if attention:
        notes.append(f"attention: {len(attention)} modules run pycompress's fused fp32 attention kernel "
                     "(fused_attention=False keeps sdpa)")
    converted = ConversionRecord(policy, records, notes, fused, shared, attention)
    model._pycompress_conversion = converted
    return model


def _set_submodule(model: nn.Module, qualified: str, new: nn.Module) -> None:
    parent_name, _, child = qualified.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def conversion_record(model: nn.Module) -> ConversionRecord | None:
    model = getattr(model, "_orig_mod", model)
    return getattr(model, "_pycompress_conversion", None)


__all__ = ["FORMATS", "POLICIES", "ConversionRecord", "LayerRecord", "convert", "conversion_record", "is_converted"]
