"""Sparse linear kernels vs the peers, in one run (issue 3).

    python bench/bench_sparse.py            # full table + bench/sparse_time_vs_sparsity.png
    python bench/bench_sparse.py --quick    # fewer shapes (a smoke run)
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
from pathlib import Path

import torch

import pycompress as pc
from pycompress.nn import Int8Linear, SparseInt8Linear, SparseLinear

sys.path.insert(0, str(Path(__file__).parent))
from timing import settle  # noqa: E402

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


def run_stack(linears, sparse_mods, threads, m, gen, peers=True):
    """Times a chain of layers; returns {name: us}."""
    torch.set_num_threads(threads)
    k = linears[0].in_features
    inputs = [torch.randn(m, k, generator=gen) for _ in range(8)]
    np_inputs = [x.numpy() for x in inputs]

    def chain(mods):
        def run(x):
            for mod in mods:
                x = mod(x)
            return x
        return run

    res = {}
    with torch.inference_mode():
        if peers:
            res["torch f32"] = median_us(chain(linears), inputs)
            ort = OrtPeers(linears, threads)
            res["ort f32"] = median_us(OrtPeers.runner(ort.f32), np_inputs)
            res["ort i8"] = median_us(OrtPeers.runner(ort.i8), np_inputs)
            res["our i8 dense"] = median_us(chain([Int8Linear.from_float(lin) for lin in linears]), inputs)
        for name, mods in sparse_mods.items():
            res[name] = median_us(chain(mods), inputs)
    return res


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
            "our f32 csr": [SparseLinear.from_float(unstr, format="csr")],
            "our i8 unstr": [SparseInt8Linear.from_float(unstr)],
            "our i8 1x4": [SparseInt8Linear.from_float(block)],
            "torch csr": [lambda x, w=csr_w, b=bias: torch.sparse.mm(w, x.t()).t() + b],
        }
        for threads in threads_list:
            for m in ms:
                results.setdefault((threads, m), {})[sp] = run_stack([unstr], mods, threads, m, gen, peers=False)
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


def print_sweep(results, sparsities):
    print("\n## 4096x4096 sweep, median us (ratio = peer / ours)")
    for (threads, m), res in sorted(results.items()):
        d = res["dense"]
        best_f32 = min(d["torch f32"], d["ort f32"])
        best_i8 = min(d["our i8 dense"], d["ort i8"])
        print(f"\nthreads={threads} M={m}: torch f32 {d['torch f32']:.0f}, ort f32 {d['ort f32']:.0f}, "
              f"our i8 dense {d['our i8 dense']:.0f}, ort i8 {d['ort i8']:.0f}")
        print(f"{'sparsity':>8} {'torch csr':>10} {'our f32 csr':>12} {'x csr':>6} {'x bestf32':>9} "
              f"{'our i8 unstr':>12} {'x besti8':>8} {'our i8 1x4':>10} {'x besti8':>8}")
        for sp in sparsities:
            r = res[sp]
            print(f"{sp:>8.0%} {r['torch csr']:>10.0f} {r['our f32 csr']:>12.0f} "
                  f"{r['torch csr'] / r['our f32 csr']:>6.2f} {best_f32 / r['our f32 csr']:>9.2f} "
                  f"{r['our i8 unstr']:>12.0f} {best_i8 / r['our i8 unstr']:>8.2f} "
                  f"{r['our i8 1x4']:>10.0f} {best_i8 / r['our i8 1x4']:>8.2f}")
        for name in ("our i8 unstr", "our i8 1x4"):
            points = [(sp, res[sp][name] / best_i8) for sp in sparsities]
            print(f"break-even sparsity of {name} vs best dense int8 (M={m}, threads={threads}): "
                  f"{break_even(points)}")


def goals(results, extra):
    print("\n## Goals (issue 3)")
    for (threads, m), res in sorted(results.items()):
        d, r = res["dense"], res[0.9]
        best_f32 = min(d["torch f32"], d["ort f32"])
        best_i8 = min(d["our i8 dense"], d["ort i8"])
        x_csr = r["torch csr"] / r["our f32 csr"]
        print(f"threads={threads} M={m}: fp32 90% vs torch CSR {x_csr:.2f}x (goal >= 3): "
              f"{'MET' if x_csr >= 3 else 'NOT MET'}")
        if m <= 16:
            for sp in [sp for sp in res if sp != "dense" and sp >= 0.7]:
                ok = res[sp]["our f32 csr"] < best_f32
                print(f"    fp32 {sp:.0%} faster than best dense fp32: {best_f32 / res[sp]['our f32 csr']:.2f}x "
                      f"{'MET' if ok else 'NOT MET'}")
            for name in ("our i8 unstr", "our i8 1x4"):
                x = best_i8 / r[name]
                print(f"    {name} 90% vs best dense int8 {x:.2f}x (goal >= 2): {'MET' if x >= 2 else 'NOT MET'}")
    for (threads, m), res in sorted(extra.items()):
        if m != 1:
            continue
        best_f32 = min(res["torch f32"], res["ort f32"])
        for name in ("our i8 unstr", "our i8 1x4"):
            x = best_f32 / res[name]
            print(f"4-layer stack 90% M=1 threads={threads}: {name} vs best dense fp32 {x:.2f}x (goal >= 5): "
                  f"{'MET' if x >= 5 else 'NOT MET'}")


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
    args = parser.parse_args(argv)
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

    print("\n## Other shapes at 90% sparsity, median us")
    extra = {}
    shapes = [] if args.quick else [(768, 3072, m) for m in SWEEP_M] + [(3072, 768, m) for m in SWEEP_M]
    for k, n, m in shapes:
        for threads in threads_list:
            unstr = masked_linear(k, n, 0.9, "unstructured", gen)
            block = masked_linear(k, n, 0.9, "block", gen)
            csr_w, bias = unstr.weight.detach().to_sparse_csr(), unstr.bias.detach()
            mods = {"our f32 csr": [SparseLinear.from_float(unstr)], "our i8 unstr": [SparseInt8Linear.from_float(unstr)],
                    "our i8 1x4": [SparseInt8Linear.from_float(block)],
                    "torch csr": [lambda x, w=csr_w, b=bias: torch.sparse.mm(w, x.t()).t() + b]}
            r = run_stack([unstr], mods, threads, m, gen)
            print(f"(K={k}, N={n}) M={m} threads={threads}: " + ", ".join(f"{a} {v:.0f}" for a, v in r.items()))
    for m in (1, 16):
        for threads in threads_list:
            unstr = [masked_linear(4096, 4096, 0.9, "unstructured", gen) for _ in range(4)]
            block = [masked_linear(4096, 4096, 0.9, "block", gen) for _ in range(4)]
            mods = {"our f32 csr": [SparseLinear.from_float(lin) for lin in unstr],
                    "our i8 unstr": [SparseInt8Linear.from_float(lin) for lin in unstr],
                    "our i8 1x4": [SparseInt8Linear.from_float(lin) for lin in block]}
            r = run_stack(unstr, mods, threads, m, gen)
            extra[(threads, m)] = r
            print(f"4-layer 4096 stack M={m} threads={threads}: " + ", ".join(f"{a} {v:.0f}" for a, v in r.items()))

    goals(results, extra)
    plot(results, sparsities, OUT_PNG)


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
