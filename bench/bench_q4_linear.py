"""4-bit weights (issue 14): decode-shaped Linears, W4A8 against our int8 and the peers, same run, same threads.

    python bench/bench_q4_linear.py              # the tables of bench/README.md (a few minutes)
    python bench/bench_q4_linear.py --quick      # fewer samples, for a smoke run
    pytest bench/bench_q4_linear.py              # pytest-benchmark, grouped per shape and threads

Implementations (each computes y = x @ W^T + b from the same float layer; int8 activations are quantized
inside every timed call):

- torch fp32 (F.linear), torch int8 (FBGEMM dynamic), ORT int8 (MatMulInteger, bench/peers.py);
- ORT int4: ``MatMulNBits`` (4-bit symmetric weights, block 128, ``accuracy_level=4``: int8 activations,
  MLAS's fastest CPU path), made by onnxruntime's own MatMulNBitsQuantizer;
- pycompress int8 (Int8Linear) and pycompress int4 (Int4Linear, group 128).

Tables: per (shape, threads) the time of each with its output error against float64, ours int4 against the
best peer, against our int8, and the packed weight bytes moved per call as GB/s beside the read loop of the
memory level they live in (bench/machine.py). Then the decode stack of a 7B-class decoder layer (q, k, v, o,
gate, up, down at one token; hidden 4096, MLP 11008): tokens/s of its Linears and the weight bytes per token.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import logging
import sys
import tempfile
import warnings
from pathlib import Path

import pytest
import torch

import machine
import peers
import pycompress
from shapes import DECODE_SHAPES, DECODER_LAYER, LinearShape, THREADS
from timing import calls_for, make_inputs, make_step, ops_measured, time_interleaved, torch_threads

GROUP = 128
OPS_MEASURED = ops_measured("int4_linear")

try:
    import onnxruntime  # noqa: F401

    HAVE_ORT = True
except ImportError:
    HAVE_ORT = False

IMPLEMENTATIONS: dict[str, str] = {
    "torch_fp32": "torch fp32",
    "torch_int8": "torch int8 (FBGEMM)",
    "ort_int8": "ORT int8",
    "ort_int4": "ORT int4 (MatMulNBits)",
    "ours_int8": "pycompress int8",
    "ours_int4": "pycompress int4",
}
OURS = ("ours_int8", "ours_int4")


def available() -> list[str]:
    return [n for n in IMPLEMENTATIONS if HAVE_ORT or not n.startswith("ort_")]


@functools.lru_cache(maxsize=4)
def _matmul_nbits_model(k: int, n: int, layer: int) -> bytes:
    """One Linear as ONNX MatMul + Add, its weight quantized by onnxruntime's MatMulNBitsQuantizer."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    linear = peers._make_linear(k, n, layer)
    w = numpy_helper.from_array(linear.weight.detach().t().contiguous().numpy(), "w")
    b = numpy_helper.from_array(linear.bias.detach().numpy(), "b")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["xw"], name="matmul"), helper.make_node("Add", ["xw", "b"], ["y"])],
        "linear", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["m", k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["m", n])], initializer=[w, b])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        quant = MatMulNBitsQuantizer(model, bits=4, block_size=GROUP, is_symmetric=True, accuracy_level=4)
        quant.process()
    finally:
        root.setLevel(level)
    out = quant.model.model
    if "MatMulNBits" not in {node.op_type for node in out.graph.node}:
        raise RuntimeError("ORT int4 peer: MatMulNBitsQuantizer produced no MatMulNBits node")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "m.onnx"
        onnx.save(out, str(path))
        return path.read_bytes()


def build(name: str, shape: LinearShape, threads: int, layer: int = 0):
    if name in ("torch_fp32", "torch_int8", "ort_int8"):
        return peers.build(name, shape, threads, layer)
    if name == "ort_int4":
        session = peers._ort_session(_matmul_nbits_model(shape.k, shape.n, layer), threads, expect_int8=False)
        return lambda x: session.run(None, {"x": x.numpy()})[0]
    linear = peers.make_linear(shape, layer)
    if name == "ours_int8":
        return pycompress.nn.Int8Linear.from_float(linear).eval()
    return pycompress.nn.Int4Linear.from_float(linear, group_size=GROUP).eval()


def kind(name: str) -> str:
    return "fp32" if name.endswith("fp32") else "int4" if name.endswith("int4") else "int8"


def build_step(name: str, shape: LinearShape, threads: int, inputs: list[torch.Tensor]):
    runners = [build(name, shape, threads, layer) for layer in range(shape.layers)]
    worst = None
    for layer, run in enumerate(runners):
        y = torch.as_tensor(run(inputs[0]))
        acc = peers.judge(IMPLEMENTATIONS[name], peers.relative_error(y, peers.reference_output(shape, inputs[0], layer)),
                          kind=kind(name), ours=name in OURS, where=shape.label)
        worst = acc if worst is None or acc.error > worst.error else worst
    return make_step(runners, inputs), worst


# ---- pytest-benchmark ----------------------------------------------------------

@pytest.mark.parametrize("impl", list(IMPLEMENTATIONS))
@pytest.mark.parametrize("threads", THREADS)
@pytest.mark.parametrize("shape", DECODE_SHAPES, ids=lambda s: s.id)
def test_q4_linear(benchmark, shape: LinearShape, threads: int, impl: str) -> None:
    if impl.startswith("ort_"):
        pytest.importorskip("onnxruntime")
    with torch_threads(threads):
        inputs = make_inputs(shape.m, shape.k)
        step, accuracy = build_step(impl, shape, threads, inputs)
        benchmark.group = f"{shape.label} threads={threads}"
        benchmark.extra_info.update(shape=shape.label, threads=threads, implementation=IMPLEMENTATIONS[impl],
                                    relative_error=accuracy.error, wrong_on_this_cpu=accuracy.wrong)
        benchmark.pedantic(step, rounds=25, iterations=calls_for(step, 0.01), warmup_rounds=2)


# ---- the printed tables -------------------------------------------------------

def _us(seconds: float) -> str:
    us = seconds * 1e6
    return f"{us:.0f}" if us >= 100 else f"{us:.1f}"


def _markdown(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" if i == 0 else "---:" for i in range(len(header))) + "|"]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def int4_bytes(shape: LinearShape) -> int:
    """Packed bytes our int4 layer reads per layer: nibbles, one float scale per group, corr and bias."""
    return shape.k * shape.n // 2 + 4 * shape.n * (shape.k // GROUP) + 8 * shape.n


def run_table(shapes, threads_list, rounds, batch_s) -> str:
    names = available()
    header = (["shape (M,K,N)", "thr", "int4 weights (where)"] + [IMPLEMENTATIONS[n] + " us (err)" for n in names]
              + ["best peer / ours int4", "ORT int4 / ours int4", "our int8 / our int4", "ours int4 weight GB/s"])
    rows = []
    for shape in shapes:
        inputs = make_inputs(shape.m, shape.k)
        for threads in threads_list:
            with torch_threads(threads):
                built = {n: build_step(n, shape, threads, inputs) for n in names}
                timings = time_interleaved({n: s for n, (s, _) in built.items()}, rounds, batch_s)
            accuracy = {n: a for n, (_, a) in built.items()}
            del built
            ours = timings["ours_int4"].median_s
            peer_s = {n: timings[n].median_s for n in names if n not in OURS}
            vs_best, _ = peers.ratio_cells(ours, peer_s, accuracy)
            per_layer = int4_bytes(shape)
            where = machine.where_weights_fit(per_layer * shape.layers, threads)
            ort4 = f"{timings['ort_int4'].median_s / ours:.2f}" if "ort_int4" in timings else "-"
            rows.append([shape.label, str(threads), f"{machine.format_bytes(per_layer * shape.layers)} {where}"]
                        + [peers.timed_cell(_us(timings[n].median_s), accuracy[n]) for n in names]
                        + [vs_best, ort4, f"{timings['ours_int8'].median_s / ours:.2f}",
                           machine.bandwidth_cell(per_layer / ours * 1e-9, where, threads)])
            print(f"  measured {shape.label} threads={threads}", file=sys.stderr, flush=True)
    return _markdown(header, rows) + "\n\n" + peers.error_legend(
        limits="fp32 1e-4, int8 5e-2, int4 " + f"{peers.ERROR_LIMITS['int4']:g}", best="best peer / ours int4",
        exact="-")


def run_decode_stack(threads_list, rounds, batch_s) -> str:
    """The Linears of one 7B-class decoder layer at one token, in turn: q, k, v, o, gate, up, down."""
    names = available()
    header = ["threads"] + [IMPLEMENTATIONS[n] + " tokens/s" for n in names] + ["best peer / ours int4",
                                                                                 "int4 weight MB / token"]
    rows = []
    x = make_inputs(1, DECODER_LAYER[0].k)
    mlp_down = make_inputs(1, DECODER_LAYER[-1].k)
    for threads in threads_list:
        with torch_threads(threads):
            steps = {}
            for n in names:
                runners = [build(n, s, threads) for s in DECODER_LAYER]
                for run, s in zip(runners, DECODER_LAYER):
                    ref = peers.reference_output(s, (x if s.k == DECODER_LAYER[0].k else mlp_down)[0])
                    y = torch.as_tensor(run((x if s.k == DECODER_LAYER[0].k else mlp_down)[0]))
                    peers.judge(IMPLEMENTATIONS[n], peers.relative_error(y, ref), kind=kind(n), ours=n in OURS,
                                where=s.label)

                def token(runners=runners):
                    for run, s in zip(runners, DECODER_LAYER):
                        run((x if s.k == DECODER_LAYER[0].k else mlp_down)[0])

                steps[n] = token
            timings = time_interleaved(steps, rounds, batch_s)
        ours = timings["ours_int4"].median_s
        best = min(timings[n].median_s for n in names if n not in OURS)
        mb = sum(int4_bytes(s) for s in DECODER_LAYER) / 1e6
        rows.append([str(threads)] + [f"{1 / timings[n].median_s:.1f}" for n in names]
                    + [f"{best / ours:.2f}", f"{mb:.1f}"])
    return _markdown(header, rows)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--threads", type=int, nargs="*", default=list(THREADS))
    args = parser.parse_args(argv)
    rounds, batch_s = (5, 0.02) if args.quick else (15, 0.05)
    warnings.simplefilter("ignore")
    print(f"# 4-bit weights, {datetime.date.today()}, {machine.cpu_model()}, {machine.simd_flags()}, "
          f"{machine.describe_caches()}, pycompress ISA {pycompress.get_isa()}, torch {torch.__version__}")
    print()
    print(run_table(DECODE_SHAPES, args.threads, rounds, batch_s))
    print()
    print("Decode stack of one 7B-class decoder layer (7 Linears at one token):")
    print()
    print(run_decode_stack(args.threads, rounds, batch_s))


if __name__ == "__main__":
    main()
