"""int8 Linear (issue 2): pycompress against its peers, same run, same threads.

    pytest bench/bench_q8_linear.py              # pytest-benchmark, grouped per shape and threads
    python bench/bench_q8_linear.py              # the tables of bench/README.md (about 2-3 minutes)
    python bench/bench_q8_linear.py --quick      # fewer samples, for a smoke run

Every timed call of an int8 implementation includes the dynamic quantization
of its activations. Shapes and their origin: bench/shapes.py; peers:
bench/peers.py; timing method: bench/timing.py.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import sys
import time
from dataclasses import asdict

import pytest
import torch

import machine
import peers
import pycompress
from pycompress import _C
from pycompress.ops.q8 import int8_linear_cpu
from pycompress.reference.q8 import KGROUP
from shapes import ALL_SHAPES, MINILM_SHAPES, OVERHEAD_SHAPE, SHAPES, THREADS, LinearShape
from timing import (Step, Timing, calls_for, make_inputs, make_step, ops_measured, summarize, time_interleaved,
                    torch_threads)

try:
    import onnxruntime  # noqa: F401  (a benchmark-only dependency: the bench extra)

    HAVE_ORT = True
except ImportError:
    HAVE_ORT = False

OPS_MEASURED = ops_measured("int8_linear")


def available_implementations() -> list[str]:
    return [name for name in peers.IMPLEMENTATIONS if HAVE_ORT or not name.startswith("ort_")]


def build_step(name: str, shape: LinearShape, threads: int,
               inputs: list[torch.Tensor]) -> tuple[Step, peers.Accuracy]:
    """Builds every layer of `shape` for one implementation, checks its output
    (peers.judge: ours over the limit aborts, a peer is marked WRONG), returns its
    step and the worst layer's accuracy."""
    runners = [peers.build(name, shape, threads, layer) for layer in range(shape.layers)]
    checks = [peers.check_output(name, shape, runner, inputs[0], layer) for layer, runner in enumerate(runners)]
    worst = max(checks, key=lambda a: (a.wrong, a.error))
    return make_step(runners, inputs), worst


# ---- pytest-benchmark ----------------------------------------------------------

@pytest.mark.parametrize("impl", list(peers.IMPLEMENTATIONS))
@pytest.mark.parametrize("threads", THREADS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: s.id)
def test_q8_linear(benchmark, shape: LinearShape, threads: int, impl: str) -> None:
    if impl.startswith("ort_"):
        pytest.importorskip("onnxruntime")
    with torch_threads(threads):
        inputs = make_inputs(shape.m, shape.k)
        step, accuracy = build_step(impl, shape, threads, inputs)
        benchmark.group = f"{shape.label} threads={threads}"
        benchmark.extra_info.update(shape=shape.label, source=shape.source, threads=threads,
                                    implementation=peers.IMPLEMENTATIONS[impl], macs=shape.macs,
                                    relative_error=accuracy.error, wrong_on_this_cpu=accuracy.wrong)
        benchmark.pedantic(step, rounds=25, iterations=calls_for(step, 0.01), warmup_rounds=2)


# ---- the printed tables -------------------------------------------------------

def _us(seconds: float) -> str:
    us = seconds * 1e6
    return f"{us:.0f}" if us >= 100 else f"{us:.1f}"


def _markdown(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |",
             "|" + "|".join("---" if i == 0 else "---:" for i in range(len(header))) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def run_main_table(shapes: list[LinearShape], threads_list: list[int], rounds: int, batch_s: float) -> list[dict]:
    """Times every implementation on every (shape, threads); returns one record per case."""
    names = available_implementations()
    records = []
    for shape in shapes:
        inputs = make_inputs(shape.m, shape.k)
        for threads in threads_list:
            with torch_threads(threads):
                built = {name: build_step(name, shape, threads, inputs) for name in names}
                steps = {name: step for name, (step, _) in built.items()}
                timings = time_interleaved(steps, rounds, batch_s)
            records.append({"shape": shape, "threads": threads, "timings": timings,
                            "accuracy": {name: accuracy for name, (_, accuracy) in built.items()}})
            del built
            del steps
            print(f"  measured {shape.label} threads={threads}", file=sys.stderr, flush=True)
    return records


def format_main_table(records: list[dict], isa: str) -> str:
    """One row per (shape, threads): each implementation's time with its output error
    beside it, ours against the best peer and the best exact peer, and our fraction
    of the ceiling that bounds the row (bench/peak: the int8 multiply ceiling of the
    active ISA for compute-bound rows, the read loop's bandwidth from where the
    weights live for GEMV rows)."""
    names = available_implementations()
    header = (["shape (M,K,N)", "thr", "weights int8 / fp32"]
              + [peers.IMPLEMENTATIONS[n] + " us (err)" for n in names]
              + ["best peer / ours", "best exact peer / ours", "FBGEMM / ours", "ours GOPS",
                 "ours: % of int8 ceiling, or weight GB/s (% of read loop)", "spread"])
    rows = []
    for rec in records:
        shape, threads, timings, accuracy = rec["shape"], rec["threads"], rec["timings"], rec["accuracy"]
        per_layer_int8 = shape.weight_bytes(1) // shape.layers
        where = machine.where_weights_fit(shape.weight_bytes(1), threads)
        fits = f"{machine.format_bytes(shape.weight_bytes(1))} {where} / {machine.where_weights_fit(shape.weight_bytes(4), threads)}"
        ours = timings["ours"].median_s
        peer_s = {n: timings[n].median_s for n in names if n != "ours"}
        vs_best, vs_exact = peers.ratio_cells(ours, peer_s, accuracy)
        gops = 2 * shape.macs / ours * 1e-9
        if shape.compute_bound:
            bound = machine.int8_ceiling_cell(gops, threads, isa)
        else:
            bound = machine.bandwidth_cell(per_layer_int8 / ours * 1e-9, where, threads)
        rows.append([shape.label, str(threads), fits]
                    + [peers.timed_cell(_us(timings[n].median_s), accuracy[n]) for n in names]
                    + [vs_best, vs_exact, f"{timings['torch_int8'].median_s / ours:.2f}", f"{gops:.0f}", bound,
                       f"{100 * max(t.spread for t in timings.values()):.0f}%"])
    return _markdown(header, rows) + "\n\n" + peers.error_legend()


def _q8_args(module: pycompress.nn.Int8Linear, x: torch.Tensor, y: torch.Tensor, nthreads: int) -> tuple:
    """The positional arguments of _C.q8_linear for module(x) written into y."""
    m, k = x.shape
    return (x.data_ptr(), m, k, k, module.w_packed.data_ptr(), module.col_sum.data_ptr(),
            module.w_scale.data_ptr(), module.bias.data_ptr(), module.out_features, y.data_ptr(),
            module.out_features, 0, False, 1.0, 0, nthreads)


def _kernel_stage_steps(shape: LinearShape) -> dict[str, Step]:
    """Calls straight into pycompress._C, with every buffer preallocated."""
    module = peers.build("ours", shape, 1)
    x = torch.randn(shape.m, shape.k)
    y = torch.empty(shape.m, shape.n)
    kp = (shape.k + KGROUP - 1) // KGROUP * KGROUP
    q = torch.empty(shape.m, kp, dtype=torch.uint8)
    scale, zp = torch.empty(shape.m), torch.empty(shape.m, dtype=torch.int32)
    nonfinite = torch.empty(shape.m, dtype=torch.uint8)
    acc = torch.empty(shape.m, shape.n, dtype=torch.int32)
    steps: dict[str, Step] = {
        "quantize": functools.partial(_C.q8_quantize_rows, x.data_ptr(), shape.m, shape.k, shape.k, q.data_ptr(),
                                      scale.data_ptr(), zp.data_ptr(), nonfinite.data_ptr(), False, 1.0, 0),
    }
    steps["quantize"]()  # q now holds real quantized rows for the raw GEMM
    for t in (1, 2):
        steps[f"gemm_raw t{t}"] = functools.partial(_C.q8_gemm_raw, q.data_ptr(), shape.m, kp,
                                                    module.w_packed.data_ptr(), shape.n, acc.data_ptr(), t)
        steps[f"linear t{t}"] = functools.partial(_C.q8_linear, *_q8_args(module, x, y, t))
    # The partials hold raw pointers: keep the tensors alive as long as the steps.
    steps["quantize"].keepalive = (module, x, y, q, scale, zp, nonfinite, acc)
    return steps


def run_kernel_scaling(shapes: list[LinearShape], rounds: int, batch_s: float) -> list[dict]:
    """The native kernel alone (no Python layer), 1 vs 2 threads, and its stages:
    activation quantization (single-threaded test hook) and the raw int32 GEMM."""
    records = []
    for shape in shapes:
        if shape.layers != 1:
            continue
        records.append({"shape": shape, "timings": time_interleaved(_kernel_stage_steps(shape), rounds, batch_s)})
        print(f"  measured kernel stages {shape.label}", file=sys.stderr, flush=True)
    return records


def format_kernel_scaling(records: list[dict]) -> str:
    header = ["shape (M,K,N)", "quantize x (1 thr) us", "raw GEMM 1 thr us", "raw GEMM 2 thr us",
              "q8_linear 1 thr us", "q8_linear 2 thr us", "2-thread speedup"]
    rows = []
    for rec in records:
        t = rec["timings"]
        rows.append([rec["shape"].label, _us(t["quantize"].median_s), _us(t["gemm_raw t1"].median_s),
                     _us(t["gemm_raw t2"].median_s), _us(t["linear t1"].median_s), _us(t["linear t2"].median_s),
                     f"{t['linear t1'].median_s / t['linear t2'].median_s:.2f}x"])
    return _markdown(header, rows)


def _overhead_steps(shape: LinearShape, threads: int,
                    inputs: list[torch.Tensor]) -> tuple[dict[str, Step], dict[str, peers.Accuracy]]:
    module = peers.build("ours", shape, threads)
    x = inputs[0]
    y = torch.empty(shape.m, shape.n)
    args = (x, module.w_packed, module.col_sum, module.w_scale, module.bias, 0, None, 0)
    kernel_call = functools.partial(_C.q8_linear, *_q8_args(module, x, y, threads))
    kernel_call.keepalive = y  # the partial holds y's raw pointer
    plan_call = functools.partial(module._native_plan().run, x.data_ptr(), shape.m, shape.k, y.data_ptr(), threads)
    plan_call.keepalive = (x, y)
    steps: dict[str, Step] = {
        "torch.empty((M, N)) (allocation floor)": functools.partial(torch.empty, (shape.m, shape.n)),
        "_C.q8_linear (kernel + pybind11, preallocated y)": kernel_call,
        "Int8Linear's native plan .run (what a module call runs)": plan_call,
        "int8_linear_cpu (op body: checks, alloc, pointers)": functools.partial(int8_linear_cpu, *args),
        "torch.ops.pycompress.int8_linear (dispatcher)": functools.partial(torch.ops.pycompress.int8_linear, *args),
        "Int8Linear module call": functools.partial(module, x),
    }
    accuracy: dict[str, peers.Accuracy] = {}
    for name in available_implementations():
        if name != "ours":
            label = f"peer: {peers.IMPLEMENTATIONS[name]}"
            steps[label], accuracy[label] = build_step(name, shape, threads, inputs)
    return steps, accuracy


def run_overhead(shape: LinearShape, threads_list: list[int], rounds: int, batch_s: float) -> list[dict]:
    """One small Linear through each layer of our stack, and the peers' whole calls."""
    records = []
    inputs = make_inputs(shape.m, shape.k)
    for threads in threads_list:
        with torch_threads(threads):
            steps, accuracy = _overhead_steps(shape, threads, inputs)
            timings = time_interleaved(steps, rounds, batch_s)
            timings[f"_C.q8_linear, one call after {IDLE_S * 1e6:.0f} us idle (pool asleep)"] = \
                time_after_idle(steps["_C.q8_linear (kernel + pybind11, preallocated y)"], rounds * 20)
            records.append({"threads": threads, "timings": timings, "accuracy": accuracy})
    return records


# Longer than the pool's spin-before-sleep (csrc/common/thread_pool.cpp), as when
# other layers run between two calls: the next call must wake a sleeping worker.
IDLE_S = 200e-6


def time_after_idle(step: Step, samples: int) -> Timing:
    """Single calls, each after IDLE_S of busy-waiting (which keeps this core,
    so a helper thread that wants to run must be woken on the other)."""
    values = []
    for _ in range(samples):
        deadline = time.perf_counter() + IDLE_S
        while time.perf_counter() < deadline:
            pass
        start = time.perf_counter()
        step()
        values.append(time.perf_counter() - start)
    return summarize(values, 1)


def format_overhead(shape: LinearShape, records: list[dict]) -> str:
    """Our stack layer by layer and each peer's whole call (peers: time (error))."""
    names = list(records[0]["timings"])
    header = [f"{shape.label}: what is called"] + [f"{r['threads']} thr us" for r in records]
    rows = [[name] + [peers.timed_cell(_us(r["timings"][name].median_s), r["accuracy"].get(name)) for r in records]
            for name in names]
    return _markdown(header, rows) + "\n\n(x%) beside a peer: its output error against float64, as in the main table."


def format_peaks() -> str:
    """The ceilings of this CPU (bench/peak), as machine.py prints them."""
    return machine.format_ceilings()


def environment() -> str:
    import platform

    versions = [f"torch {torch.__version__}", f"pycompress {pycompress.__version__} (ISA {pycompress.get_isa()})"]
    if HAVE_ORT:
        import onnxruntime

        versions.append(f"onnxruntime {onnxruntime.__version__}")
    return "\n".join([
        f"date: {datetime.datetime.now().astimezone().strftime('%Y-%m-%d %H:%M %Z')}",
        f"CPU: {machine.cpu_model()}; {machine.describe_caches()}",
        f"SIMD flags: {machine.simd_flags()}",
        f"python {platform.python_version()}, " + ", ".join(versions),
        f"load average at start: {machine.load_average()} (a quiet 2-core machine is below 0.3)",
    ])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", choices=("issue", "gemv", "minilm", "all"), default="issue",
                        help="issue: the shapes of issue 2 (default); gemv: its M = 1 shapes (focused reruns); "
                             "minilm: all-MiniLM-L6-v2 layers; all: issue + minilm")
    parser.add_argument("--threads", type=int, nargs="+", default=list(THREADS))
    parser.add_argument("--rounds", type=int, default=15, help="samples per implementation and case (median)")
    parser.add_argument("--batch-ms", type=float, default=30.0, help="duration of one sample")
    parser.add_argument("--quick", action="store_true", help="5 rounds of 10 ms: a smoke run, not for reporting")
    parser.add_argument("--only", choices=("main", "kernel", "overhead", "peak"), nargs="+",
                        default=["peak", "main", "kernel", "overhead"], help="which tables to print")
    parser.add_argument("--json", help="also write the raw medians to this file")
    parser.add_argument("--act-bits", type=int, choices=(8, 7), default=8,
                        help="activation width of pycompress's layers: 8, or 7 (the u7 format, AVX2's fast path)")
    args = parser.parse_args(argv)
    peers.OURS_ACT_BITS = args.act_bits
    if args.quick:
        args.rounds, args.batch_ms = 5, 10.0
    shapes = {"issue": list(SHAPES), "gemv": [s for s in SHAPES if s.m == 1], "minilm": list(MINILM_SHAPES),
              "all": list(ALL_SHAPES)}[args.shapes]
    batch_s = args.batch_ms / 1000
    started = time.perf_counter()
    print(environment())
    print(f"pycompress activations: {args.act_bits}-bit" + (" (u7 format)" if args.act_bits == 7 else ""))
    if not HAVE_ORT:
        print("onnxruntime is not installed (pip install .[bench]): ORT columns left out")
    print(f"method: median of {args.rounds} samples of ~{args.batch_ms:g} ms each, implementations interleaved; "
          "activations rotated over a pool > 2x L2; int8 timings include activation quantization\n")
    dump: dict[str, object] = {}
    if "peak" in args.only:
        print("## ceilings of this CPU: multiply-add peaks and read-loop bandwidth\n")
        print(format_peaks() + "\n", flush=True)
        dump["peaks"] = {f"{k} t{t}": v for (k, t), v in machine.measure_peaks().items()}
        dump["read_loop_gbs"] = {f"{level} t{t}": v for (level, t), v in machine.measure_read_bandwidth().items()}
    if "main" in args.only:
        records = run_main_table(shapes, args.threads, args.rounds, batch_s)
        print("## int8 Linear vs peers: median us per call (per layer for stacks)\n")
        print(format_main_table(records, pycompress.get_isa()) + "\n", flush=True)
        dump["main"] = [{"shape": r["shape"].label, "threads": r["threads"],
                         "timings": {n: asdict(t) for n, t in r["timings"].items()},
                         "accuracy": {n: asdict(a) for n, a in r["accuracy"].items()}} for r in records]
    if "kernel" in args.only:
        records = run_kernel_scaling(shapes, args.rounds, batch_s / 2)
        print("## the native kernel alone (pycompress._C): stages and thread scaling, median us\n")
        print(format_kernel_scaling(records) + "\n", flush=True)
        dump["kernel"] = [{"shape": r["shape"].label, "timings": {n: asdict(t) for n, t in r["timings"].items()}}
                          for r in records]
    if "overhead" in args.only:
        records = run_overhead(OVERHEAD_SHAPE, args.threads, args.rounds, batch_s / 2)
        print("## per-call overhead, layer by layer, median us\n")
        print(format_overhead(OVERHEAD_SHAPE, records) + "\n", flush=True)
        dump["overhead"] = [{"threads": r["threads"], "timings": {n: asdict(t) for n, t in r["timings"].items()}}
                            for r in records]
    print(f"(total {time.perf_counter() - started:.0f} s; load average at the end: {machine.load_average()})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dump, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
