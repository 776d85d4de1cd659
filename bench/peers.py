"""The implementations a single Linear (M, K, N) is timed with, ours and its peers.

Every builder takes the same float ``nn.Linear`` and returns a callable
``f(x: torch.Tensor)`` that computes y = x @ W^T + b the way a user of that
library would call it. The int8 ones quantize the activations inside the call
(dynamic quantization), so the timed call includes that pass for all of them.

Threads: torch and pycompress follow ``torch.set_num_threads`` (the caller sets
it); ONNX Runtime gets the same count as ``intra_op_num_threads``.

This module is also the one home of "is an output right": the error limits, the
check every bench script runs on every implementation before timing it, and the
way a table shows the error beside the time. A peer over its limit is still timed
and shown as WRONG on this CPU (ONNX Runtime int8 on AVX2-only CPUs: vpmaddubsw
saturates int16 pair sums, ~9% error); pycompress over its limit aborts the run
(a broken build, not a slow one).

Test hook, not for reporting: PYCOMPRESS_BENCH_PEER_ERROR_LIMIT=<x> replaces
every peer's limit by x (ours keeps its own), so the "wrong on this CPU" path can
be run on a CPU where every peer is exact (e.g. x=0.004 marks the int8 peers of
bench_q8_linear.py wrong on an AVX-512 VNNI machine).
"""

from __future__ import annotations

import functools
import logging
import math
import os
import sys
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

import pycompress
from shapes import LinearShape

Runner = Callable[[torch.Tensor], object]

# Column order of the tables: fp32 baselines, int8 peers, ours.
IMPLEMENTATIONS: dict[str, str] = {
    "torch_fp32": "torch fp32",
    "ort_fp32": "ORT fp32",
    "torch_int8": "torch int8 (FBGEMM)",
    "ort_int8": "ORT int8",
    "ours": "pycompress int8",
}
PEERS = tuple(name for name in IMPLEMENTATIONS if name != "ours")
INT8_IMPLEMENTATIONS = ("torch_int8", "ort_int8", "ours")


def make_linear(shape: LinearShape, layer: int = 0) -> nn.Linear:
    """The float layer every implementation is built from. Seeded by (K, N, layer):
    every build of it agrees, and shapes differing only in M share it."""
    return _make_linear(shape.k, shape.n, layer)


def _make_linear(k: int, n: int, layer: int) -> nn.Linear:
    gen = torch.Generator().manual_seed(1_000_003 * layer + 7 * k + n)
    lin = nn.Linear(k, n)
    with torch.no_grad():
        # nn.Linear's default init range, drawn from a fixed generator.
        bound = 1.0 / k ** 0.5
        lin.weight.uniform_(-bound, bound, generator=gen)
        lin.bias.uniform_(-bound, bound, generator=gen)
    return lin.eval()


def build_torch_fp32(linear: nn.Linear, threads: int) -> Runner:
    weight, bias = linear.weight.detach().contiguous(), linear.bias.detach().contiguous()

    def run(x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, weight, bias)

    return run


def build_torch_int8(linear: nn.Linear, threads: int) -> Runner:
    """torch.ao dynamic quantization: FBGEMM's per-tensor int8 weights, activations
    quantized per call (quantized::linear_dynamic)."""
    previous_engine = torch.backends.quantized.engine
    torch.backends.quantized.engine = "fbgemm"
    try:
        with warnings.catch_warnings():
            # torch.ao.quantization is deprecated in favour of torchao; it is still
            # the FBGEMM path PyTorch users have, which is what we compare with.
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.simplefilter("ignore", FutureWarning)
            warnings.filterwarnings("ignore", message=".*deprecated.*", category=UserWarning)
            model = torch.ao.quantization.quantize_dynamic(nn.Sequential(linear), {nn.Linear}, dtype=torch.qint8)
    finally:
        torch.backends.quantized.engine = previous_engine
    layer = model[0]

    def run(x: torch.Tensor) -> torch.Tensor:
        return layer(x)

    return run


# The activation width of "ours" (bench_q8_linear.py --act-bits): 8, or 7 for the u7 format.
OURS_ACT_BITS = 8


def build_ours(linear: nn.Linear, threads: int) -> Runner:
    return pycompress.nn.Int8Linear.from_float(linear, act_bits=OURS_ACT_BITS).eval()


@functools.lru_cache(maxsize=4)
def _onnx_models(k: int, n: int, layer: int) -> tuple[bytes, bytes]:
    """(fp32 model, dynamically quantized int8 model) of one Linear, as bytes.

    Cached per layer: exporting and quantizing a 4096x4096 layer takes seconds,
    and the model depends neither on M nor on the thread count.
    """
    linear = _make_linear(k, n, layer)
    with tempfile.TemporaryDirectory() as tmp:
        fp32_path, int8_path = Path(tmp) / "linear.onnx", Path(tmp) / "linear.int8.onnx"
        with warnings.catch_warnings():
            # The TorchScript exporter is deprecated but fast and exact for one
            # Linear (a single Gemm node); the dynamo exporter takes seconds per shape.
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", UserWarning)
            torch.onnx.export(linear, (torch.zeros(1, k),), str(fp32_path), dynamo=False, input_names=["x"],
                              output_names=["y"], dynamic_axes={"x": {0: "m"}, "y": {0: "m"}})
        from onnxruntime.quantization import QuantType, quantize_dynamic

        # quantize_dynamic logs a "consider pre-processing" hint through the root logger.
        root = logging.getLogger()
        level = root.level
        root.setLevel(logging.ERROR)
        try:
            quantize_dynamic(str(fp32_path), str(int8_path), weight_type=QuantType.QInt8)
        finally:
            root.setLevel(level)
        return fp32_path.read_bytes(), int8_path.read_bytes()


def _ort_session(model: bytes, threads: int, expect_int8: bool):
    import onnx
    import onnxruntime as ort

    ops = {node.op_type for node in onnx.load_from_string(model).graph.node}
    if expect_int8 and "MatMulInteger" not in ops:
        raise RuntimeError(f"ORT int8 peer: quantize_dynamic produced {sorted(ops)}, no MatMulInteger; "
                           "the peer would silently run in fp32")
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    # ORT_ENABLE_ALL fuses DynamicQuantizeLinear + MatMulInteger + scale/bias into
    # DynamicQuantizeMatMul, the fast path an ORT user gets by default.
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(model, sess_options=opts, providers=["CPUExecutionProvider"])


def ort_int8_model(model: nn.Module, inputs: tuple[torch.Tensor, ...], names: list[str], workdir: str,
                   dynamic_axes: dict[int, str] | None = None) -> str:
    """A whole model as ONNX Runtime dynamic int8, the way an ORT user quantizes one (torch.onnx.export,
    quantize_dynamic with QInt8 weights): the path of the int8 .onnx in ``workdir``, with ``names`` as its
    inputs and "out" as its output, the ``dynamic_axes`` of each ({0: "batch"} by default). ``ort_int8_session``
    runs it."""
    axes = dynamic_axes or {0: "batch"}
    from onnxruntime.quantization import QuantType, quantize_dynamic

    float_path, int8_path = os.path.join(workdir, "float.onnx"), os.path.join(workdir, "int8.onnx")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the legacy exporter's deprecation notice
        torch.onnx.export(model, inputs, float_path, input_names=names, output_names=["out"],
                          dynamic_axes={n: axes for n in [*names, "out"]}, opset_version=17, dynamo=False)
    quantize_dynamic(float_path, int8_path, weight_type=QuantType.QInt8)
    return int8_path


def ort_int8_session(path: str, threads: int):
    """The InferenceSession of an ``ort_int8_model`` file (refused if quantize_dynamic left no MatMulInteger)."""
    with open(path, "rb") as f:
        return _ort_session(f.read(), threads, expect_int8=True)


def _build_ort(shape: LinearShape, layer: int, threads: int, int8: bool) -> Runner:
    fp32_model, int8_model = _onnx_models(shape.k, shape.n, layer)
    session = _ort_session(int8_model if int8 else fp32_model, threads, expect_int8=int8)

    def run(x: torch.Tensor):
        # x.numpy() shares memory (no copy); sess.run is how ORT is called from Python.
        return session.run(None, {"x": x.numpy()})[0]

    return run


BUILDERS = {
    "torch_fp32": build_torch_fp32,
    "torch_int8": build_torch_int8,
    "ours": build_ours,
}


def build(name: str, shape: LinearShape, threads: int, layer: int = 0) -> Runner:
    """The runner of implementation `name` for layer `layer` of `shape` at `threads` threads.

    The caller sets torch.set_num_threads(threads) before timing.
    """
    if name in ("ort_fp32", "ort_int8"):
        return _build_ort(shape, layer, threads, int8=name == "ort_int8")
    return BUILDERS[name](make_linear(shape, layer), threads)


def reference_output(shape: LinearShape, x: torch.Tensor, layer: int = 0) -> torch.Tensor:
    linear = make_linear(shape, layer)
    return F.linear(x.double(), linear.weight.double(), linear.bias.double())


def check_output(name: str, shape: LinearShape, runner: Runner, x: torch.Tensor, layer: int = 0) -> "Accuracy":
    """The output error of one Linear runner against the float64 layer, judged
    (see judge: raises for ours over the limit, marks a peer WRONG)."""
    y = torch.as_tensor(runner(x))
    return judge(IMPLEMENTATIONS[name], relative_error(y, reference_output(shape, x, layer)),
                 kind=kind_of(name), ours=name == "ours", where=shape.label)


# ---- output error: limits, the check, and how tables show it -------------------

# Relative max error against the float64 computation, max |y - ref| / max |ref|,
# that a correct implementation of each number format stays within: fp32 round-off
# (different summation orders), and what int8 weights and activations explain
# (0.3-2% on the bench layers). Over the limit, an output is wrong, not rounded.
# 4-bit weights (group 128, symmetric) leave ~8x the int8 weight error: 0.25 per layer.
ERROR_LIMITS: dict[str, float] = {"fp32": 1e-4, "int8": 5e-2, "int4": 0.25}
PEER_LIMIT_ENV = "PYCOMPRESS_BENCH_PEER_ERROR_LIMIT"


def kind_of(name: str) -> str:
    """'fp32' or 'int8': the number format of an implementation of IMPLEMENTATIONS (bench_q4_linear.py has
    its own int4 ones)."""
    return "fp32" if name.endswith("fp32") else "int8"


def error_limit(kind: str, ours: bool, layers: int = 1) -> float:
    """The limit for one output of `kind` ('fp32' | 'int8' | 'int4') after `layers` chained
    layers (errors add up along a chain: the limit grows with it). A peer's limit
    is replaced by $PYCOMPRESS_BENCH_PEER_ERROR_LIMIT when set (test hook)."""
    if not ours and os.environ.get(PEER_LIMIT_ENV):
        return float(os.environ[PEER_LIMIT_ENV])
    return ERROR_LIMITS[kind] * layers


def relative_error(y: object, reference: torch.Tensor) -> float:
    """max |y - reference| / max |reference|, in float64 (NaN anywhere: NaN)."""
    y = torch.as_tensor(y).double()
    ref = reference.double()
    return ((y - ref).abs().max() / ref.abs().max().clamp_min(1e-12)).item()


@dataclass(frozen=True)
class Accuracy:
    """One implementation's output error against float64, and its limit."""

    error: float
    limit: float

    @property
    def ok(self) -> bool:
        return self.error <= self.limit  # NaN is not ok

    @property
    def wrong(self) -> bool:
        return not self.ok

    def cell(self) -> str:
        """The error as a table shows it: '0.52%', '<0.01%', '9.2% WRONG'."""
        if math.isnan(self.error):
            text = "NaN"
        elif self.error < 1e-4:
            text = "<0.01%"
        else:
            text = f"{100 * self.error:.2g}%"
        return f"{text} WRONG" if self.wrong else text


class WrongOutput(AssertionError):
    """pycompress's own output is beyond the error limit: a broken build."""


def judge(label: str, error: float, kind: str, ours: bool, where: str = "", layers: int = 1) -> Accuracy:
    """The check every bench script runs before timing an implementation.

    Ours over the limit raises WrongOutput (a broken build must not be timed);
    a peer over its limit is reported on stderr and returned as wrong: the table
    still times it and shows it as WRONG on this CPU.
    """
    accuracy = Accuracy(error, error_limit(kind, ours, layers))
    at = f" at {where}" if where else ""
    if accuracy.wrong:
        message = f"{label}{at}: relative error {error:.3g} > {accuracy.limit:g}"
        if ours:
            raise WrongOutput(message)
        print(f"note: {message}: WRONG on this CPU; still timed, shown with its error", file=sys.stderr)
    return accuracy


def timed_cell(time_text: str, accuracy: Accuracy | None) -> str:
    """A table cell with the time and, beside it, the output error: '17.1 (0.52%)'."""
    return time_text if accuracy is None else f"{time_text} ({accuracy.cell()})"


def best_of(seconds: Mapping[str, float], accuracy: Mapping[str, Accuracy],
            exact_only: bool) -> tuple[str, float] | None:
    """(name, seconds) of the fastest implementation in `seconds`; with exact_only,
    of the fastest whose output is within its limit (None when none is)."""
    pool = {n: t for n, t in seconds.items() if not exact_only or accuracy[n].ok}
    if not pool:
        return None
    name = min(pool, key=pool.__getitem__)
    return name, pool[name]


def ratio_cells(ours_s: float, peer_seconds: Mapping[str, float],
                accuracy: Mapping[str, Accuracy]) -> tuple[str, str]:
    """('best peer / ours', 'best exact peer / ours') as table cells. The first is
    marked with '*' when that fastest peer is WRONG on this CPU; the second is '-'
    when no peer is exact."""
    best = best_of(peer_seconds, accuracy, exact_only=False)
    exact = best_of(peer_seconds, accuracy, exact_only=True)
    first = "-" if best is None else f"{best[1] / ours_s:.2f}" + ("*" if accuracy[best[0]].wrong else "")
    second = "-" if exact is None else f"{exact[1] / ours_s:.2f}"
    return first, second


def error_legend(limits: str = "fp32 1e-4, int8 5e-2 per layer", best: str = "best peer / ours",
                 exact: str = "best exact peer / ours") -> str:
    """The line under a table that explains its error cells and its two ratio columns
    (named `best` and `exact` in that table)."""
    override = os.environ.get(PEER_LIMIT_ENV)
    text = ("(x%): the output's relative max error against float64, max |y - y_ref| / max |y_ref|, on one input. "
            f"WRONG: over the limit ({limits}): wrong on this CPU, still timed. "
            f"{best} counts every peer ('*': the fastest one is WRONG); {exact} only the peers within the limit.")
    if override:
        text += f" TEST HOOK: ${PEER_LIMIT_ENV}={override} replaced every peer's limit: not for reporting."
    return text
