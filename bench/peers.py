"""The implementations a single Linear (M, K, N) is timed with, ours and its peers.

Every builder takes the same float ``nn.Linear`` and returns a callable
``f(x: torch.Tensor)`` that computes y = x @ W^T + b the way a user of that
library would call it. The int8 ones quantize the activations inside the call
(dynamic quantization), so the timed call includes that pass for all of them.

Threads: torch and pycompress follow ``torch.set_num_threads`` (the caller sets
it); ONNX Runtime gets the same count as ``intra_op_num_threads``.
"""

from __future__ import annotations

import functools
import logging
import tempfile
import warnings
from pathlib import Path
from collections.abc import Callable

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


def build_ours(linear: nn.Linear, threads: int) -> Runner:
    return pycompress.nn.Int8Linear.from_float(linear).eval()


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


def check_output(name: str, shape: LinearShape, runner: Runner, x: torch.Tensor, layer: int = 0) -> float:
    """Relative max error of one runner against the float64 layer; raises when it is
    beyond what int8 quantization explains (a broken build, not a slow one)."""
    y = runner(x)
    y = torch.as_tensor(y).double()
    ref = reference_output(shape, x, layer)
    err = ((y - ref).abs().max() / ref.abs().max().clamp_min(1e-12)).item()
    limit = 1e-4 if name.endswith("fp32") else 5e-2
    if not err <= limit:
        raise AssertionError(f"{IMPLEMENTATIONS[name]} at {shape.label}: relative error {err:.3g} > {limit}")
    return err
