"""pycompress.conversion (``pycompress.convert``): swap a trained model's nn.Linear / nn.Conv2d layers for pycompress modules.

Each layer gets one format from a small registry (``FORMATS``):

  float         the layer as it was (masks baked into the weight)
  int8-dynamic  Int8Linear / Int8Conv2d, activations quantized per row at run time
  int8-static   the same with the calibrated activation scale / zero point of ``pycompress.quantize``
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

from pycompress import _C
import pycompress.nn as pcnn
from pycompress._native import get_isa
from pycompress.nn.int8_conv import Im2colConv2d, Int8Conv2d, conv2d_unsupported_reason, int8_linear_from_weight
from pycompress.attention import use_fused_attention
from pycompress.nn.int8_linear import Int8Linear, SharedInputGroup
import pycompress.quant as quant_state  # looked up per call: tests substitute get_quant_state
from pycompress.reference.q8 import MAX_K
from pycompress.reference.sparse import pack_bsr1x4
from pycompress.verification import ErrorStats, call_model, layer_budget_db

FORMATS = ("float", "int8-dynamic", "int8-static", "sparse-fp32", "sparse-int8")
POLICIES = ("auto", "state", "int8") + FORMATS

# auto: a candidate must beat float by this factor (timings on a shared CPU are noisy).
# Candidates are built one layer at a time, so timing adds one layer's packed copies at most.
AUTO_MIN_SPEEDUP = 1.05
AUTO_WARMUP, AUTO_REPEATS = 2, 7

# auto without example inputs. int8-dynamic pays for itself when the GEMM is large enough to
# hide the per-call cost of quantizing the activations and of the Python call (measured with
# `pycompress bench`: a few microseconds of kernel per 768x768 GEMV beside ~10-25 us of call
# overhead; below ~16K weights fp32 MKL wins at batch 1).
HEURISTIC_MIN_WEIGHTS = 16384
# Sparse candidates, from the break-even points of the sparse benchmark against the best dense
# int8 kernel (bench/README.md "## Sparse kernels", 4096x4096, 1 thread, Zen 4). The heuristic
# has no batch size, so it assumes decode-size inputs, M <= 16, and takes the break-even of the
# worst M in that range (M = 16; at M = 1 sparsity pays earlier, at M = 128 it never beat dense
# int8 up to 95% sparsity).
# - sparse-int8 (bsr1x4): its time follows the stored 1x4 blocks (along K), not the nonzeros.
#   M = 16 breaks even at 70% sparsity with 1x4-block pruning (block density 0.30, 1.03x) and at
#   ~90.5% unstructured sparsity (block density 1 - 0.905^4 = 0.33; 0.96x at 90%); M = 1 at
#   <= 70% / ~80%. A weight whose 1x4-block density is at or below 0.30 is a candidate.
#   On AVX-512 VBMI CPUs unstructured packs run the byte sliced layout instead, whose time follows
#   the nonzeros: it breaks even with dense int8 at 56-64% sparsity for M = 1, 16 and 128 (1.29-1.45x
#   at 70%), so there a weight of density <= 0.30 is a candidate too, whatever its block density.
# - sparse-fp32 (csr): against dense int8, csr breaks even at ~94% sparsity for M = 1 (0.85x of
#   dense int8's time at 95%, 1.7x at 90%) and ~92.5% for M = 16: density <= 0.06.
SPARSE_INT8_MAX_BLOCK_DENSITY = 0.30
SPARSE_INT8_BYTE_LAYOUT_MAX_DENSITY = 0.30
SPARSE_FP32_MAX_DENSITY = 0.06
# auto WITH example inputs times the sparse formats at the layer's real input instead of
# trusting the M <= 16 break-even above (at M = 1 unstructured int8 wins from ~80% sparsity, block
# density ~0.59). These looser limits only skip building packs that cannot win at any M in the
# sparse benchmark: no sparse format beat dense int8 at 50% sparsity (block density 0.94 when
# unstructured, 0.5 with 1x4 blocks), and csr needs density well below 0.5 to beat dense fp32.
TIMED_SPARSE_INT8_MAX_BLOCK_DENSITY = 0.75
TIMED_SPARSE_INT8_BYTE_LAYOUT_MAX_DENSITY = 0.50  # the byte layout lost to dense int8 at 50% sparsity
TIMED_SPARSE_FP32_MAX_DENSITY = 0.30

_CONVERTED_TYPES: tuple[type, ...] = (Int8Linear, Im2colConv2d)

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


def _base_type(module: nn.Module) -> type:
    return parametrize.type_before_parametrizations(module)


def _target_kind(module: nn.Module) -> str | None:
    t = _base_type(module)
    if issubclass(t, nn.Linear):
        return "Linear"
    if issubclass(t, nn.Conv2d):
        return "Conv2d"
    return None


def _block_density(gemm_weight: torch.Tensor) -> float:
    """Fraction of the 1x4 blocks along K (K padded to a multiple of 4) holding a nonzero."""
    n, k = gemm_weight.shape
    nonzero = torch.nn.functional.pad(gemm_weight.detach() != 0, (0, -k % 4))
    return float(nonzero.view(n, -1, 4).any(dim=2).sum()) / max(1, nonzero.numel() // 4)


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
    if density_limits is None:
        return reasons
    if reasons["sparse-fp32"] is None and state.quant is not None:
        reasons["sparse-fp32"] = ("the layer is quantized by pycompress.quantize: a policy keeps its int8 numbers "
                                  "(sparse-int8); an override can ask for sparse-fp32 to drop them")
    if density_limits == "timed":
        int8_limit, byte_limit, fp32_limit = (TIMED_SPARSE_INT8_MAX_BLOCK_DENSITY,
                                              TIMED_SPARSE_INT8_BYTE_LAYOUT_MAX_DENSITY, TIMED_SPARSE_FP32_MAX_DENSITY)
        because = "no sparse kernel wins there at any batch size"
    else:
        int8_limit, byte_limit, fp32_limit = (SPARSE_INT8_MAX_BLOCK_DENSITY, SPARSE_INT8_BYTE_LAYOUT_MAX_DENSITY,
                                              SPARSE_FP32_MAX_DENSITY)
        because = "dense int8 wins for M <= 16"
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
    int8 = _int8_variant(state)
    if candidates[int8] is None:
        why = "calibrated by pycompress.quantize" if state.quant is not None else "no quantization state: dynamic"
        return int8, why
    return "float", candidates[int8] or "no pycompress format applies"


def heuristic_format(state: LayerState, candidates: dict[str, str | None], weight_numel: int) -> tuple[str, str]:
    """auto without example inputs: the state's format, unless the GEMM is too small to gain."""
    fmt, why = state_format(state, candidates)
    if fmt.startswith("int8") and weight_numel < HEURISTIC_MIN_WEIGHTS:
        return "float", (f"{weight_numel} weights < {HEURISTIC_MIN_WEIGHTS}: per-call overhead beats the int8 gain "
                         "(pass example_inputs to time it)")
    return fmt, why + " (heuristic: no example inputs)"


# ---------------------------------------------------------------- building modules


def _linear_like(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    lin = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    lin.weight = nn.Parameter(weight.detach(), requires_grad=False)
    if bias is not None:
        lin.bias = nn.Parameter(bias.detach(), requires_grad=False)
    return lin


def sparse_int8_from_weight(weight: torch.Tensor, bias: torch.Tensor | None, *,
                            weight_scale: torch.Tensor | None = None, name: str | None = None,
                            **kwargs) -> nn.Module:
    """SparseInt8Linear for a 2-D float weight; ``weight_scale`` [out] uses a calibrated per-channel
    scale (from ``pycompress.quantize``) as ``int8_linear_from_weight`` does, so both int8 formats
    quantize a layer to the same integers."""
    if weight_scale is None:
        return pcnn.SparseInt8Linear.from_float(_linear_like(weight, bias), name=name, **kwargs)
    label = f"SparseInt8Linear({name or ''})"
    n, k = weight.shape
    scale = torch.as_tensor(weight_scale, dtype=torch.float32).detach().cpu().reshape(-1)
    if scale.numel() != n:
        raise ValueError(f"{label}: weight_scale has {scale.numel()} entries, weight has {n} output channels")
    if not (torch.isfinite(scale).all() and (scale > 0).all()):
        raise ValueError(f"{label}: weight_scale must be finite and > 0")
    qmax = 2 ** (kwargs.get("weight_bits", 8) - 1) - 1
    q = torch.clamp(torch.round(weight.detach().float().cpu() / scale[:, None]), -qmax, qmax).to(torch.int8)
    row_ptr, blk_idx, values, col_sum = pack_bsr1x4(q)
    mod = pcnn.SparseInt8Linear(k, n, nblocks=blk_idx.numel(), bias=bias is not None, name=name, **kwargs)
    for buf, src in ((mod.row_ptr, row_ptr), (mod.blk_idx, blk_idx), (mod.values, values), (mod.col_sum, col_sum),
                     (mod.w_scale, scale)):
        buf.copy_(src)
    if bias is not None:
        mod.bias.copy_(bias.detach().to(torch.float32))
    mod.validate()
    return mod


def build_module(module: nn.Module, fmt: str, name: str, state: LayerState) -> nn.Module:
    """The pycompress module for ``module`` in format ``fmt`` (``module`` itself for float)."""
    if fmt == "float":
        return module
    weight = module.weight.detach()
    bias = module.bias.detach() if module.bias is not None else None
    if fmt in ("int8-dynamic", "int8-static", "sparse-int8"):
        kwargs = {"weight_bits": int(_quant_attr(state.quant, "weight_bits", 8)),
                  "weight_scale": _quant_attr(state.quant, "weight_scale")}
        # sparse-int8 has one format for both activation modes: a calibrated layer gets its static scale.
        if fmt == "int8-static" or (fmt == "sparse-int8" and _int8_variant(state) == "int8-static"):
            kwargs["act_scale"] = float(state.quant.act_scale)
            kwargs["act_zero_point"] = int(state.quant.act_zero_point)
    if fmt.startswith("int8"):
        if state.kind == "Linear":
            return int8_linear_from_weight(weight, bias, name=name, **kwargs)
        return Int8Conv2d.from_float(module, name=name, **kwargs)
    gemm_weight = weight if state.kind == "Linear" else Im2colConv2d.gemm_weight(module)
    if fmt == "sparse-int8":
        gemm = sparse_int8_from_weight(gemm_weight, bias, name=name, **kwargs)
    else:
        gemm = pcnn.SparseLinear.from_float(_linear_like(gemm_weight, bias), name=name)
    return gemm if state.kind == "Linear" else Im2colConv2d.from_gemm(module, gemm, name=name)


def _bake_float(module: nn.Module) -> nn.Module:
    """A float layer keeps no training-time state at inference: pycompress.quant's fake quantization
    (weight parametrization, ``activation_fake_quant`` submodule and its forward pre-hook) is dropped,
    so the layer computes in float, and its masked weight becomes a plain parameter."""
    quant_state.remove_fake_quant(module)
    if parametrize.is_parametrized(module):
        for tensor_name in list(module.parametrizations.keys()):
            parametrize.remove_parametrizations(module, tensor_name, leave_parametrized=True)
    return module


def _kernel_name(fmt: str, kind: str, module: nn.Module) -> str:
    if fmt == "float":
        return "torch (float32)"
    if fmt.startswith("int8"):
        lowering = "" if kind == "Linear" else ("1x1 as GEMM + " if module._pointwise else "im2col + ")
        return f"{lowering}q8 GEMM ({get_isa()})"
    gemm = module.gemm if isinstance(module, Im2colConv2d) else module
    return getattr(gemm, "kernel_name", type(gemm).__name__)


def module_bytes(module: nn.Module) -> int:
    """Bytes of the distinct tensors (parameters and buffers) a module holds."""
    seen, total = set(), 0
    for t in list(module.parameters()) + list(module.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


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
            call_model(model, inputs)
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
    """Groups the converted dense int8 layers that read one tensor (SHARED_INPUT_PARENTS, then the
    captured sources) into SharedInputGroups; returns them as ConversionRecord.shared_input entries."""
    names = {id(m): n for n, m in model.named_modules()}
    uses = _use_counts(model)

    def eligible(m) -> bool:
        return type(m) is Int8Linear and m._shared_input is None and uses[id(m)] == 1

    def compatible(members: list[Int8Linear]) -> bool:
        first = members[0]
        return all(m.in_features == first.in_features and m.act_scale == first.act_scale
                   and m.act_zero_point == first.act_zero_point for m in members)

    groups: list[dict] = []
    for parent in model.modules():
        attrs = SHARED_INPUT_PARENTS.get(type(parent).__name__)
        if attrs is None:
            continue
        members = [getattr(parent, a, None) for a in attrs]
        if all(eligible(m) for m in members) and compatible(members):
            SharedInputGroup(members, adjacent=True)
            groups.append({"layers": [names[id(m)] for m in members], "adjacent": True})
    by_source: dict[int, list[Int8Linear]] = {}
    for rec in records:
        m = model.get_submodule(rec.name)
        source = input_sources.get(original_ids.get(id(m), -1))
        if source is not None and eligible(m):
            by_source.setdefault(source, []).append(m)
    for members in by_source.values():
        if len(members) >= 2 and compatible(members):
            SharedInputGroup(members)
            groups.append({"layers": [names[id(m)] for m in members], "adjacent": False})
    return groups


def _local_error(new: nn.Module, args: tuple, float_out: torch.Tensor) -> ErrorStats:
    stats = ErrorStats()
    with torch.no_grad():
        stats.update(new(*args), float_out)
    return stats


# ---------------------------------------------------------------- activation fusion


def fusible_activation(module: nn.Module) -> str | None:
    """The kernel epilogue that computes ``module`` exactly ("relu" / "gelu"), or None."""
    if type(module) is nn.ReLU:
        return "relu"
    if type(module) is nn.GELU and module.approximate == "none":
        return "gelu"
    # transformers.activations.GELUActivation with the exact erf GELU
    if type(module).__name__ == "GELUActivation" and getattr(module, "act", None) is torch.nn.functional.gelu:
        return "gelu"
    return None


def epilogue_gemm(module: nn.Module) -> Int8Linear | None:
    """The Int8Linear whose epilogue a converted layer runs (None for other formats)."""
    gemm = module.gemm if isinstance(module, Im2colConv2d) else module
    return gemm if isinstance(gemm, Int8Linear) else None


def set_epilogue_activation(gemm: Int8Linear, activation: str) -> None:
    gemm.set_activation(activation)


def _fuse_activations(model: nn.Module, records: list[LayerRecord]) -> list[str]:
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
        gemm = epilogue_gemm(layer) if id(layer) in by_module else None
        kind = fusible_activation(act)
        if gemm is None or kind is None or gemm.activation != "none" or uses[id(layer)] > 1 or uses[id(act)] > 1:
            continue
        set_epilogue_activation(gemm, kind)
        parent_name = names[id(parent)]
        qualified = f"{parent_name}.{act_attr}" if parent_name else act_attr
        setattr(parent, act_attr, nn.Identity())
        by_module[id(layer)].fused_activation = kind
        by_module[id(layer)].kernel += f" + fused {kind}"
        fused.append(qualified)
    return fused


# ---------------------------------------------------------------- public API


def restore_shared_inputs(model: nn.Module, groups: list[dict]) -> None:
    """Re-forms the SharedInputGroups of a conversion record on a model rebuilt from it (load)."""
    for group in groups:
        members = [model.get_submodule(n) for n in group["layers"]]
        SharedInputGroup(members, adjacent=bool(group["adjacent"]))


def is_converted(model: nn.Module) -> bool:
    return hasattr(model, "_pycompress_conversion") or any(isinstance(m, _converted_types()) for m in model.modules())


def _converted_types() -> tuple[type, ...]:
    return _CONVERTED_TYPES + (pcnn.SparseLinear, pcnn.SparseInt8Linear)


def converted_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(qualified name, module) of every pycompress layer (a conv's inner GEMM is part of its conv)."""
    types = _converted_types()
    out, inside = [], set()
    for name, module in model.named_modules(remove_duplicate=False):
        if isinstance(module, types) and id(module) not in inside:
            out.append((name, module))
            if isinstance(module, Im2colConv2d):
                inside.update(id(m) for m in module.modules() if m is not module)
    return out


def layer_format(module: nn.Module) -> tuple[str, int]:
    """(format name, weight bits) of a pycompress layer."""
    gemm = module.gemm if isinstance(module, Im2colConv2d) else module
    if isinstance(gemm, Int8Linear):
        return ("int8-dynamic" if gemm.act_scale is None else "int8-static"), gemm.weight_bits
    if isinstance(gemm, pcnn.SparseInt8Linear):
        return "sparse-int8", int(getattr(gemm, "weight_bits", 8))
    if isinstance(gemm, pcnn.SparseLinear):
        return "sparse-fp32", 32
    return "float", 32


def _matches(name_list: list[str], patterns) -> str | None:
    for pattern in patterns:
        if any(fnmatch.fnmatchcase(n, pattern) for n in name_list):
            return pattern
    return None


def convert(model: nn.Module, example_inputs=None, policy: str = "auto", *, overrides: dict[str, str] | None = None,
            exclude: list[str] | tuple[str, ...] = (), verify_inputs=None,
            layer_min_sqnr_db: float | None = None, fuse_activations: bool = True,
            share_inputs: bool = True, fused_attention: bool = True) -> nn.Module:
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
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"convert: expected an nn.Module, got {type(model).__name__}")
    if hasattr(model, "_orig_mod"):
        raise TypeError("convert: got a torch.compile'd module; convert the original model, then compile it")
    if policy not in POLICIES:
        raise ValueError(f"convert: policy {policy!r} is not one of {POLICIES}")
    overrides = dict(overrides or {})
    for pattern, fmt in overrides.items():
        if fmt not in ("int8",) + FORMATS:
            raise ValueError(f"convert: override {pattern!r} -> {fmt!r} is not a format: {('int8',) + FORMATS}")
    if is_converted(model):
        raise RuntimeError("convert: this model is already converted (it holds pycompress layers); convert the "
                           "float model once. To change formats, start again from the float model.")

    notes: list[str] = []

    # Every target layer once (shared modules appear under several names).
    targets: dict[int, tuple[list[str], nn.Module]] = {}
    mha_children = {id(m) for mha in model.modules() if isinstance(mha, nn.MultiheadAttention) for m in mha.modules()}
    for name, module in model.named_modules(remove_duplicate=False):
        if _target_kind(module) is None:
            continue
        if id(module) in targets:
            targets[id(module)][0].append(name)
        else:
            targets[id(module)] = ([name], module)
    for names, module in targets.values():
        device = module.weight.device
        if device.type != "cpu":
            raise RuntimeError(f"convert: layer {names[0]} is on {device}, but this pycompress build has no CUDA "
                               "kernels: its kernels run on CPU; move the model there with model.cpu()")
    if not targets:
        notes.append("no nn.Linear or nn.Conv2d layers: the model is returned unchanged")

    def state_of(key: int, module: nn.Module) -> LayerState:
        state = _layer_state(module, _target_kind(module))
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
        built = {cand: build_module(module, cand, names[0], state) for cand in FORMATS if candidates[cand] is None}
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
        kind = _target_kind(module)
        state = state_of(key, module)
        timed = policy == "auto" and key in timings
        candidates = _candidate_reasons(state, "timed" if timed else "heuristic")
        record = LayerRecord(name, names, kind, "float", "", "", state.density, 32, module_bytes(module),
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

        new = module if fmt == "float" else build_module(module, fmt, name, state)
        if fmt != "float" and checked_io is not None:
            fmt_name, bits = layer_format(new)
            budget = layer_budget_db(fmt_name, bits) if layer_min_sqnr_db is None else layer_min_sqnr_db
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
        record.weight_bits = layer_format(new)[1] if fmt != "float" else 32
        record.kernel = _kernel_name(fmt, kind, new)
        records.append(record)
        if new is not module:
            original_ids[id(new)] = key
            for qualified in names:
                _set_submodule(model, qualified, new)
    fused = _fuse_activations(model, records) if fuse_activations else []
    shared = _share_inputs(model, records, input_sources, original_ids) if share_inputs else []
    attention = use_fused_attention(model) if fused_attention else []
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


__all__ = ["FORMATS", "POLICIES", "ConversionRecord", "LayerRecord", "convert", "converted_layers", "conversion_record",
           "is_converted", "layer_format", "module_bytes"]
