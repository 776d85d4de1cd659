"""Sparse linear kernels vs the peers, in one run (issue 3).

    python bench/bench_sparse.py            # full table + bench/sparse_time_vs_sparsity.png
    python bench/bench_sparse.py --quick    # fewer shapes (a smoke run; writes no plot unless --plot)
    pytest bench/bench_sparse.py            # pytest-benchmark: one representative shape

Shapes (where they come from): 4096x4096 is an LLM-7B-class projection (decode M=1, small batch M=16,
prefill M=128); (768, 3072) / (3072, 768) are BERT-base / MiniLM MLP up / down projections; the 4-layer
4096 stack holds 256 MiB of fp32 weights (64 MiB int8): it does not fit the 32 MiB L3, a single 4096x4096
int8 matrix (16 MiB) does.

Peers, same threads: torch fp32 dense (F.linear), ONNX Runtime fp32 dense (Gemm), torch.sparse CSR
(``to_sparse_csr``), our dense int8 (pycompress.nn.Int8Linear), ONNX Runtime dynamic int8
(quantize_dynamic). Ours: SparseLinear csr (fp32, unstructured), SparseInt8Linear bsr1x4 with unstructured
sparsity ("i8 unstr") and with 1x4-block sparsity ("i8 1x4", the block-pruning target).
Medians of repeated calls; inputs rotate among 8 tensors so x is not always hot in L1.
Every implementation's output is checked against the float64 layers first (bench/peers.py, judge):
each time is printed with its relative error beside it, a peer over the limit is timed and marked
WRONG (on this CPU), ours over the limit aborts. "x besti8" counts every dense int8 implementation
('*': the fastest one is WRONG), "x exact" only those within the limit.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

import pycompress as pc
from pycompress.nn import Int8Linear, SparseInt8Linear, SparseLinear

sys.path.insert(0, str(Path(__file__).parent))
import peers  # noqa: E402
from peers import Accuracy  # noqa: E402
from timing import ops_measured, settle  # noqa: E402

# SparseLinear csr and SparseInt8Linear (bsr1x4, its panels and sliced layouts); nm24 has no bench yet.
OPS_MEASURED = ops_measured("sparse_linear_csr", "sparse_int8_linear", "sparse_int8_linear_sliced")
SPARSITIES = (0.5, 0.7, 0.8, 0.9, 0.95)
SWEEP_M = (1, 4, 16, 128)
THREADS = (1, 2)
OUT_PNG = Path(__file__).with_name("sparse_time_vs_sparsity.png")


def median_us(fn, inputs, budget_s=0.25, min_reps=5, max_reps=400):
    # The previous peer's spinning threads go to sleep, then the cores warm up again (bench/timing.py).
    settle(lambda: fn(inputs[0]))
    times = []
    start = time.perf_counter()
    i = 0
    while len(times) < min_reps or (time.perf_counter() - start < budget_s and len(times) < max_reps):
        x = inputs[i % len(inputs)]
        t0 = time.perf_counter()
        fn(x)
        times.append(time.perf_counter() - t0)
        i += 1
    return statistics.median(times) * 1e6


def masked_linear(k, n, sparsity, pattern, gen):
    lin = torch.nn.Linear(k, n)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(n, k, generator=gen) * k**-0.5)
        if pattern == "unstructured":
            mask = torch.rand(n, k, generator=gen) >= sparsity
        else:  # 1x4 blocks along K
            mask = (torch.rand(n, k // 4, generator=gen) >= sparsity).repeat_interleave(4, 1)
        lin.weight.mul_(mask)
    return lin


class OrtPeers:
    """ONNX Runtime fp32 Gemm chain and its quantize_dynamic int8 version."""

    def __init__(self, linears, threads):
        import onnx
        import onnxruntime as ort
        from onnx import TensorProto, helper, numpy_helper
        from onnxruntime.quantization import QuantType, quantize_dynamic

        k = linears[0].in_features
        nodes, inits = [], []
        prev = "x"
        for i, lin in enumerate(linears):
            inits.append(numpy_helper.from_array(lin.weight.detach().t().contiguous().numpy(), f"w{i}"))
            inits.append(numpy_helper.from_array(lin.bias.detach().numpy(), f"b{i}"))
            out = "y" if i == len(linears) - 1 else f"h{i}"
            nodes.append(helper.make_node("MatMul", [prev, f"w{i}"], [f"mm{i}"]))
            nodes.append(helper.make_node("Add", [f"mm{i}", f"b{i}"], [out]))
            prev = out
        graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["m", k])],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["m", linears[-1].out_features])],
                                  inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        model.ir_version = 8
        self._dir = tempfile.TemporaryDirectory()
        f32_path = os.path.join(self._dir.name, "f32.onnx")
        i8_path = os.path.join(self._dir.name, "i8.onnx")
        onnx.save(model, f32_path)
        quantize_dynamic(f32_path, i8_path, weight_type=QuantType.QInt8)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        self.f32 = ort.InferenceSession(f32_path, opts, providers=["CPUExecutionProvider"])
        self.i8 = ort.InferenceSession(i8_path, opts, providers=["CPUExecutionProvider"])

    @staticmethod
    def runner(session):
        return lambda x: session.run(None, {"x": x})[0]


def _kind(name: str) -> str:
    return "int8" if "i8" in name else "fp32"


def _is_ours(name: str) -> bool:
    return name.startswith("our")


@dataclass
class Run:
    """The median us of each implementation of one case, and its output accuracy."""

    us: dict[str, float] = field(default_factory=dict)
    accuracy: dict[str, Accuracy] = field(default_factory=dict)

    def __getitem__(self, name: str) -> float:
        return self.us[name]

    def cell(self, name: str) -> str:
        """'276 (0.95%)': the time with the output error beside it."""
        return peers.timed_cell(f"{self.us[name]:.0f}", self.accuracy.get(name))

    def line(self) -> str:
        return ", ".join(f"{name} {self.cell(name)}" for name in self.us)


def _reference(linears, x: torch.Tensor) -> torch.Tensor:
    y = x.double()
    for lin in linears:
        y = F.linear(y, lin.weight.double(), lin.bias.double())
    return y


def run_stack(linears, sparse_mods, threads, m, gen, peers_too=True) -> Run:
    """Times a chain of layers. sparse_mods: {name: (modules, the float linears they
    stand for)}; the dense peers are built from `linears`. Every output is judged
    against its float64 chain first (ours over the limit raises)."""
    torch.set_num_threads(threads)
    k = linears[0].in_features
    inputs = [torch.randn(m, k, generator=gen) for _ in range(8)]
    np_inputs = [x.numpy() for x in inputs]
    references: dict[int, torch.Tensor] = {}

    def chain(mods):
        def run(x):
            for mod in mods:
                x = mod(x)
            return x
        return run

    run = Run()

    def measure(name, fn, float_linears, feeds):
        key = id(float_linears[0])
        if key not in references:
            references[key] = _reference(float_linears, inputs[0])
        error = peers.relative_error(fn(feeds[0]), references[key])
        run.accuracy[name] = peers.judge(name, error, _kind(name), _is_ours(name),
                                         where=f"{k}x{linears[0].out_features} M={m}", layers=len(float_linears))
        run.us[name] = median_us(fn, feeds)

    with torch.inference_mode():
        if peers_too:
            measure("torch f32", chain(linears), linears, inputs)
            ort = OrtPeers(linears, threads)
            measure("ort f32", OrtPeers.runner(ort.f32), linears, np_inputs)
            measure("ort i8", OrtPeers.runner(ort.i8), linears, np_inputs)
            measure("our i8 dense", chain([Int8Linear.from_float(lin) for lin in linears]), linears, inputs)
        for name, (mods, float_linears) in sparse_mods.items():
            measure(name, chain(mods), float_linears, inputs)
    return run


def sweep(k, n, gen, threads_list, ms, sparsities):
    """4096x4096 sparsity sweep: {(threads, m): {"dense": {...}, sparsity: {...}}}."""
    dense = masked_linear(k, n, 0.0, "unstructured", gen)
    results = {}
    for sp in sparsities:
        unstr = masked_linear(k, n, sp, "unstructured", gen)
        block = masked_linear(k, n, sp, "block", gen)
        csr_w = unstr.weight.detach().to_sparse_csr()
        bias = unstr.bias.detach()
        mods = {
            "our f32 csr": ([SparseLinear.from_float(unstr, format="csr")], [unstr]),
            "our i8 unstr": ([SparseInt8Linear.from_float(unstr)], [unstr]),
            "our i8 1x4": ([SparseInt8Linear.from_float(block)], [block]),
            "torch csr": ([lambda x, w=csr_w, b=bias: torch.sparse.mm(w, x.t()).t() + b], [unstr]),
        }
        for threads in threads_list:
            for m in ms:
                results.setdefault((threads, m), {})[sp] = run_stack([unstr], mods, threads, m, gen, peers_too=False)
    for threads in threads_list:
        for m in ms:
            results[(threads, m)]["dense"] = run_stack([dense], {}, threads, m, gen)
    return results


def print_layout_bytes(k, n, sparsity, gen):
    """Memory of the packs (the state_dict) and of the derived layouts the kernels build on first use."""
    unstr = masked_linear(k, n, sparsity, "unstructured", gen)
    f32 = SparseLinear.from_float(unstr, format="csr")
    i8 = SparseInt8Linear.from_float(unstr)
    with torch.inference_mode():
        x = torch.randn(16, k, generator=gen)
        f32(x)  # builds the csr panel layout (AVX-512, M >= 4)
        i8(x)  # builds the byte sliced layout (AVX-512 VBMI), else the bsr1x4 panel layout (AVX-512, M > 8)
    mib = 1 << 20
    print(f"\n## Bytes at {sparsity:.0%} ({k}x{n}; dense fp32 {4 * k * n / mib:.1f} MiB): "
          f"f32 csr pack {f32.packed_bytes() / mib:.1f} MiB + panel copy {f32.panel_bytes() / mib:.1f} MiB; "
          f"int8 bsr1x4 pack {i8.packed_bytes() / mib:.1f} MiB + sliced copy {i8.sliced_bytes() / mib:.1f} MiB "
          f"+ panel copy {i8.panel_bytes() / mib:.1f} MiB + byte sliced copy {i8.byte_sliced_bytes() / mib:.1f} MiB "
          "(each derived copy exists once a call used it)")


def break_even(points):
    """Lowest sparsity where sparse time <= dense time, linear between measured points (None: never)."""
    prev = None
    for sp, ratio in points:  # ratio = sparse / dense
        if ratio <= 1.0:
            if prev is None:
                return f"<= {sp:.0%}"
            (sp0, r0) = prev
            return f"{sp0 + (sp - sp0) * (r0 - 1.0) / (r0 - ratio):.0%}"
        prev = (sp, ratio)
    return f"> {points[-1][0]:.0%}"


def _ratio(numerator: float, ours: float, wrong: bool = False) -> str:
    return f"{numerator / ours:.2f}" + ("*" if wrong else "")


def dense_bests(d: Run) -> dict[str, tuple[str, float] | None]:
    """The fastest dense fp32 and dense int8 implementation, over all and over the exact ones."""
    f32 = {n: d[n] for n in ("torch f32", "ort f32")}
    i8 = {n: d[n] for n in ("our i8 dense", "ort i8")}
    return {"f32": peers.best_of(f32, d.accuracy, exact_only=False),
            "i8": peers.best_of(i8, d.accuracy, exact_only=False),
            "i8 exact": peers.best_of(i8, d.accuracy, exact_only=True)}


def print_sweep(results, sparsities):
    print("\n## 4096x4096 sweep, median us (relative error against float64); ratio = peer / ours")
    print(peers.error_legend(best="x besti8 (best dense int8, ours included)", exact="x exact"))
    for (threads, m), res in sorted(results.items()):
        d = res["dense"]
        bests = dense_bests(d)
        (f32_name, best_f32), (i8_name, best_i8) = bests["f32"], bests["i8"]
        exact_i8 = bests["i8 exact"]  # our dense int8 is always exact (else the run aborted)
        f32_wrong, i8_wrong = d.accuracy[f32_name].wrong, d.accuracy[i8_name].wrong
        print(f"\nthreads={threads} M={m}: dense {d.line()}")
        print(f"{'sparsity':>8} {'torch csr':>16} {'our f32 csr':>16} {'x csr':>6} {'x bestf32':>9} "
              f"{'our i8 unstr':>14} {'x besti8':>8} {'x exact':>7} {'our i8 1x4':>14} {'x besti8':>8} {'x exact':>7}")
        for sp in sparsities:
            r = res[sp]
            csr_wrong = r.accuracy["torch csr"].wrong
            print(f"{sp:>8.0%} {r.cell('torch csr'):>16} {r.cell('our f32 csr'):>16} "
                  f"{_ratio(r['torch csr'], r['our f32 csr'], csr_wrong):>6} "
                  f"{_ratio(best_f32, r['our f32 csr'], f32_wrong):>9} "
                  f"{r.cell('our i8 unstr'):>14} {_ratio(best_i8, r['our i8 unstr'], i8_wrong):>8} "
                  f"{_ratio(exact_i8[1], r['our i8 unstr']):>7} "
                  f"{r.cell('our i8 1x4'):>14} {_ratio(best_i8, r['our i8 1x4'], i8_wrong):>8} "
                  f"{_ratio(exact_i8[1], r['our i8 1x4']):>7}")
        for name in ("our i8 unstr", "our i8 1x4"):
            points = [(sp, res[sp][name] / exact_i8[1]) for sp in sparsities]
            print(f"break-even sparsity of {name} vs best exact dense int8 (M={m}, threads={threads}): "
                  f"{break_even(points)}")


def _verdict(x: float, goal: float, x_exact: float | None = None) -> str:
    """'2.31x MET', or with a WRONG peer faster than every exact one, both verdicts."""
    text = f"{x:.2f}x {'MET' if x >= goal else 'NOT MET'}"
    if x_exact is not None and abs(x_exact - x) > 1e-9:
        text += f" (against exact peers only: {x_exact:.2f}x {'MET' if x_exact >= goal else 'NOT MET'})"
    return text


def goals(results, extra):
    print("\n## Goals (issue 3)")
    for (threads, m), res in sorted(results.items()):
        d, r = res["dense"], res[0.9]
        bests = dense_bests(d)
        best_f32, best_i8, exact_i8 = bests["f32"][1], bests["i8"][1], bests["i8 exact"][1]
        x_csr = r["torch csr"] / r["our f32 csr"]
        print(f"threads={threads} M={m}: fp32 90% vs torch CSR (goal >= 3): {_verdict(x_csr, 3)}")
        if m <= 16:
            for sp in [sp for sp in res if sp != "dense" and sp >= 0.7]:
                ok = res[sp]["our f32 csr"] < best_f32
                print(f"    fp32 {sp:.0%} faster than best dense fp32: {best_f32 / res[sp]['our f32 csr']:.2f}x "
                      f"{'MET' if ok else 'NOT MET'}")
            for name in ("our i8 unstr", "our i8 1x4"):
                print(f"    {name} 90% vs best dense int8 (goal >= 2): "
                      f"{_verdict(best_i8 / r[name], 2, exact_i8 / r[name])}")
    for (threads, m), res in sorted(extra.items()):
        if m != 1:
            continue
        best_f32 = min(res["torch f32"], res["ort f32"])
        for name in ("our i8 unstr", "our i8 1x4"):
            print(f"4-layer stack 90% M=1 threads={threads}: {name} vs best dense fp32 (goal >= 5): "
                  f"{_verdict(best_f32 / res[name], 5)}")


def plot(results, sparsities, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ms = sorted({m for (_, m) in results})
    fig, axes = plt.subplots(1, len(ms), figsize=(5 * len(ms), 4.2))
    threads = max(t for (t, _) in results)
    for ax, m in zip(axes if len(ms) > 1 else [axes], ms):
        res = results[(threads, m)]
        for name, style in (("our f32 csr", "o-"), ("our i8 unstr", "s-"), ("our i8 1x4", "^-"), ("torch csr", "x--")):
            ax.plot([100 * sp for sp in sparsities], [res[sp][name] for sp in sparsities], style, label=name)
        for name, color in (("torch f32", "grey"), ("ort f32", "black"), ("our i8 dense", "tab:red"),
                            ("ort i8", "tab:purple")):
            ax.axhline(res["dense"][name], color=color, linestyle=":", label=f"{name} (dense)")
        ax.set_yscale("log")
        ax.set_xlabel("sparsity (%)")
        ax.set_ylabel("median time per call (us)")
        ax.set_title(f"4096x4096, M={m}, {threads} threads")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=7) if len(ms) > 1 else axes.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"\nplot written to {path}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer sparsities, M and threads")
    parser.add_argument("--plot", type=Path, default=None,
                        help=f"where to write the plot (default: {OUT_PNG.name} beside this file; none with --quick)")
    args = parser.parse_args(argv)
    plot_path = args.plot or (None if args.quick else OUT_PNG)
    warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
    logging.getLogger().setLevel(logging.ERROR)  # ORT quantize_dynamic's pre-processing advice
    gen = torch.Generator().manual_seed(0)
    sparsities = (0.7, 0.9) if args.quick else SPARSITIES
    ms = (1, 16) if args.quick else SWEEP_M
    threads_list = (2,) if args.quick else THREADS
    print(f"pycompress {pc.__version__}, ISA {pc.get_isa()}, torch {torch.__version__}")

    results = sweep(4096, 4096, gen, threads_list, ms, sparsities)
    print_sweep(results, sparsities)
    print_layout_bytes(4096, 4096, 0.9, gen)

    print("\n## Other shapes at 90% sparsity, median us (relative error against float64)")
    extra = {}
    shapes = [] if args.quick else [(768, 3072, m) for m in SWEEP_M] + [(3072, 768, m) for m in SWEEP_M]
    for k, n, m in shapes:
        for threads in threads_list:
            unstr = masked_linear(k, n, 0.9, "unstructured", gen)
            block = masked_linear(k, n, 0.9, "block", gen)
            csr_w, bias = unstr.weight.detach().to_sparse_csr(), unstr.bias.detach()
            mods = {"our f32 csr": ([SparseLinear.from_float(unstr)], [unstr]),
                    "our i8 unstr": ([SparseInt8Linear.from_float(unstr)], [unstr]),
                    "our i8 1x4": ([SparseInt8Linear.from_float(block)], [block]),
                    "torch csr": ([lambda x, w=csr_w, b=bias: torch.sparse.mm(w, x.t()).t() + b], [unstr])}
            r = run_stack([unstr], mods, threads, m, gen)
            print(f"(K={k}, N={n}) M={m} threads={threads}: {r.line()}")
    for m in (1, 16):
        for threads in threads_list:
            unstr = [masked_linear(4096, 4096, 0.9, "unstructured", gen) for _ in range(4)]
            block = [masked_linear(4096, 4096, 0.9, "block", gen) for _ in range(4)]
            mods = {"our f32 csr": ([SparseLinear.from_float(lin) for lin in unstr], unstr),
                    "our i8 unstr": ([SparseInt8Linear.from_float(lin) for lin in unstr], unstr),
                    "our i8 1x4": ([SparseInt8Linear.from_float(lin) for lin in block], block)}
            r = run_stack(unstr, mods, threads, m, gen)
            extra[(threads, m)] = r
            print(f"4-layer 4096 stack M={m} threads={threads}: {r.line()}")

    goals(results, extra)
    if plot_path is not None:
        plot(results, sparsities, plot_path)


def test_sparse_int8_4096_m16_90pct(benchmark):
    """pytest-benchmark entry: sparse int8 (1x4 blocks, 90%) at M=16 on 4096x4096, 2 threads."""
    gen = torch.Generator().manual_seed(0)
    mod = SparseInt8Linear.from_float(masked_linear(4096, 4096, 0.9, "block", gen))
    x = torch.randn(16, 4096, generator=gen)
    torch.set_num_threads(2)
    with torch.inference_mode():
        benchmark(mod, x)


if __name__ == "__main__":
    sys.exit(main())
