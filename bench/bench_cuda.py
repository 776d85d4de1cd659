"""The CUDA int8 linear beside cuBLAS and cuBLASLt on one GPU (issue 15), run by bench/gpu_check.sh.

    python bench/bench_cuda.py            # bench/shapes.py CUDA_SHAPES, median of CUDA-event timings
    python bench/bench_cuda.py --quick    # fewer repetitions

Per shape (M, K, N), each a stack of `layers` distinct weights called in turn (time per layer):
- ours: torch.ops.pycompress.int8_linear, activation quantization + int8 GEMM + epilogue, fp16 in and out;
- cuBLAS fp16 and bf16: torch.nn.functional.linear;
- cuBLASLt int8: torch._int_mm on activations already quantized, plus a separate dequantize (the goal's peer;
  torch._int_mm needs M > 16 and K, N multiples of 8: '-' elsewhere).
- ours sparse int8: torch.ops.pycompress.sparse_int8_linear over bsr1x4 weights at 90% unstructured sparsity, for
  M <= 16 (fp16 in and out).
- ours int4: torch.ops.pycompress.int4_linear (W4A8, groups of 128) for M <= 16, a quarter of fp16's weight bytes.
- ours 2:4 int8: the int8 linear over 2:4-pruned weights (the 2 largest of every 4 along K) on the sparse
  tensor-core kernel (csrc/cuda/q8_nm24_mma__sm80.cu) at every M (the op takes it up to 16 rows); its peer: the same fp16 weights as
  torch.sparse.to_sparse_semi_structured (cuSPARSELt / CUTLASS 2:4) through torch.nn.functional.linear ('-' where
  torch refuses the shape).
Before timing, each shape's output is checked against the CPU kernel bit for bit (fp32 in and out); a mismatch
stops the run. Ratios are peer time / our time (> 1: we are faster). Goals (issue 15, H100/H200): M >= 256
int8 >= 1.0x the cuBLASLt int8 peer; M <= 16 on the HBM-bound stack >= 1.6x fp16; sparse at M = 1 on that
stack >= 2x fp16.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from shapes import CUDA_SHAPES  # noqa: E402

import pycompress as pc  # noqa: E402
from pycompress import _C, _cuda  # noqa: E402
from pycompress.ops.q8 import _int8_linear_cuda, int8_linear_cpu, nm24_pack  # noqa: E402
from pycompress.ops.sparse import sparse_int8_linear_cpu  # noqa: E402
from pycompress.ops.q4 import int4_linear_cpu  # noqa: E402
from pycompress.reference.q4 import pack_int4_weights, quantize_weight_grouped  # noqa: E402
from pycompress.reference.q8 import pack_int8_weights, quantize_weight_per_channel  # noqa: E402
from pycompress.reference.sparse import pack_bsr1x4  # noqa: E402

SPARSE_DENSITY = 0.1  # the sparse column: 90% unstructured sparsity, for M <= SPARSE_MAX_ROWS
SPARSE_MAX_ROWS = 16


def cuda_time(fn, layers: int, reps: int) -> float:
    """Median microseconds per layer call: `reps` timed rounds of one call per layer, after a warm-up round."""
    for i in range(layers):
        fn(i)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(reps):
        start.record()
        for i in range(layers):
            fn(i)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1000 / layers)
    return statistics.median(times)


def layer(k: int, n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) / k ** 0.5
    q, scale = quantize_weight_per_channel(w)
    packed, col_sum = pack_int8_weights(q)
    bias = torch.randn(n, generator=g) * 0.1
    return w, q, packed, col_sum, scale, bias


def prune_2_4(w: torch.Tensor) -> torch.Tensor:
    """w with the 2 smallest |w| of every 4 consecutive k zeroed (K a multiple of 4 here)."""
    groups = w.reshape(w.shape[0], -1, 4)
    keep = groups.abs().topk(2, dim=-1).indices
    return torch.zeros_like(groups).scatter(-1, keep, groups.gather(-1, keep)).reshape(w.shape)


def semi_structured_time(x16, w24, b16, layers, reps):
    """to_sparse_semi_structured fp16 weights through F.linear, or None (with the reason) where torch refuses."""
    try:
        from torch.sparse import to_sparse_semi_structured
        ws = [to_sparse_semi_structured(w.to("cuda", torch.float16)) for w in w24]
        return cuda_time(lambda i: torch.nn.functional.linear(x16, ws[i], b16[i]), layers, reps), ""
    except (RuntimeError, ValueError, NotImplementedError) as err:
        return None, f"{type(err).__name__}: {str(err).splitlines()[0][:120]}"


def check(shape, w_cpu) -> None:
    _, _, packed, col_sum, scale, bias = w_cpu
    x = torch.randn(min(shape.m, 512), shape.k)
    want = int8_linear_cpu(x, packed, col_sum, scale, bias)
    dev = [t.cuda() for t in (packed, col_sum, scale, bias)]
    got = torch.ops.pycompress.int8_linear(x.cuda(), *dev, 0, None, 0, 8).cpu()
    if not torch.equal(got.view(torch.int32), want.view(torch.int32)):
        bad = (got.view(torch.int32) != want.view(torch.int32)).sum().item()
        raise SystemExit(f"bench_cuda: {shape.label}: CUDA output differs from the CPU kernel in {bad} of "
                         f"{want.numel()} values")


def run(reps: int) -> list[dict]:
    rows = []
    for shape in CUDA_SHAPES:
        m, k, n = shape.m, shape.k, shape.n
        weights = [layer(k, n, seed) for seed in range(shape.layers)]
        check(shape, weights[0])
        x16 = torch.randn(m, k, device="cuda", dtype=torch.float16)
        ours = [tuple(t.cuda() for t in wt[2:]) for wt in weights]
        w16 = [wt[0].to("cuda", torch.float16) for wt in weights]
        wbf = [wt[0].to("cuda", torch.bfloat16) for wt in weights]
        b16 = [wt[5].to("cuda", torch.float16) for wt in weights]
        xbf = x16.to(torch.bfloat16)
        row = {"shape": shape.label, "source": shape.source}
        plan = _C.cuda_q8_plan(m, n, k, *_cuda.device(torch.cuda.current_device()))
        row["plan"] = plan["tile"] + (f" x{plan['splits']} splits" if plan["splits"] > 1 else "")
        row["weight_bytes"] = plan["panels"] * 16 * plan["kp"]  # the packed int8 weights one call reads
        row["ours"] = cuda_time(lambda i: torch.ops.pycompress.int8_linear(x16, *ours[i], 0, None, 0, 8),
                                shape.layers, reps)
        row["fp16"] = cuda_time(lambda i: torch.nn.functional.linear(x16, w16[i], b16[i]), shape.layers, reps)
        row["bf16"] = cuda_time(lambda i: torch.nn.functional.linear(xbf, wbf[i], b16[i].bfloat16()), shape.layers,
                                reps)
        if m > 16 and k % 8 == 0 and n % 8 == 0:
            xq = torch.randint(-128, 127, (m, k), device="cuda", dtype=torch.int8)
            wq = [wt[1].cuda().t() for wt in weights]  # [K, N] column-major, as cuBLASLt wants it
            row_scale = torch.rand(m, 1, device="cuda")
            col_scale = [wt[4].cuda() for wt in weights]

            def int_mm(i):
                acc = torch._int_mm(xq, wq[i])
                return (acc.float() * row_scale * col_scale[i] + b16[i].float()).half()

            row["int_mm"] = cuda_time(int_mm, shape.layers, reps)
        else:
            row["int_mm"] = None
        row["sparse"] = None
        if m <= SPARSE_MAX_ROWS:
            packs = []
            for seed in range(shape.layers):
                g = torch.Generator().manual_seed(seed)
                w = torch.randn(n, k, generator=g) * (torch.rand(n, k, generator=g) < SPARSE_DENSITY)
                q, scale = quantize_weight_per_channel(w)
                row_ptr, blk_idx, values, col_sum = pack_bsr1x4(q)
                packs.append((row_ptr, blk_idx, values, col_sum, scale, weights[seed][5]))
            xs = torch.randn(m, k)
            want = sparse_int8_linear_cpu(xs, *packs[0])
            sparse = [tuple(t.cuda() for t in p) for p in packs]
            got = torch.ops.pycompress.sparse_int8_linear(xs.cuda(), *sparse[0], 0, None, 0).cpu()
            if not torch.equal(got.view(torch.int32), want.view(torch.int32)):
                raise SystemExit(f"bench_cuda: {shape.label}: the sparse CUDA output differs from the CPU kernel")
            row["sparse"] = cuda_time(lambda i: torch.ops.pycompress.sparse_int8_linear(x16, *sparse[i], 0, None, 0),
                                      shape.layers, reps)
        row["int4"] = None
        if m <= SPARSE_MAX_ROWS:  # W4A8, groups of 128: checked against the CPU kernel first
            packs4 = []
            for wt in weights:
                q4, s4 = quantize_weight_grouped(wt[0], 4, 128)
                packs4.append(pack_int4_weights(q4, s4, 128))
            x4 = torch.randn(m, k)
            want = int4_linear_cpu(x4, *packs4[0], weights[0][5], n, k // 128)
            dev4 = [tuple(t.cuda() for t in p + (weights[i][5],)) for i, p in enumerate(packs4)]
            got = torch.ops.pycompress.int4_linear(x4.cuda(), *dev4[0], n, k // 128, 0, None, 0, 8).cpu()
            if not torch.equal(got.view(torch.int32), want.view(torch.int32)):
                raise SystemExit(f"bench_cuda: {shape.label}: the int4 CUDA output differs from the CPU kernel")
            row["int4"] = cuda_time(lambda i: torch.ops.pycompress.int4_linear(x16, *dev4[i], n, k // 128, 0, None, 0,
                                                                                8), shape.layers, reps)
        # 2:4: the same op over 2:4-pruned weights (the sparse tensor-core kernel), checked first, and its peer.
        w24 = [prune_2_4(wt[0]) for wt in weights]
        packs24 = []
        for w in w24:
            q, scale = quantize_weight_per_channel(w)
            packed, col_sum = pack_int8_weights(q)
            packs24.append((packed, col_sum, scale))
        x24 = torch.randn(min(m, 512), k)
        want = int8_linear_cpu(x24, *packs24[0], weights[0][5])
        dev24 = [tuple(t.cuda() for t in p + (weights[i][5],)) for i, p in enumerate(packs24)]
        got = _int8_linear_cuda(x24.cuda(), *dev24[0], sparse24=True).cpu()
        if nm24_pack(dev24[0][0], n, k) is None:
            raise SystemExit(f"bench_cuda: {shape.label}: 2:4 weights did not run the 2:4 kernel")
        if not torch.equal(got.view(torch.int32), want.view(torch.int32)):
            raise SystemExit(f"bench_cuda: {shape.label}: the 2:4 CUDA output differs from the CPU kernel")
        row["nm24"] = cuda_time(lambda i: _int8_linear_cuda(x16, *dev24[i], sparse24=True), shape.layers, reps)
        row["semi"], why = semi_structured_time(x16, w24, b16, shape.layers, reps)
        if why:
            print(f"  ({shape.label}: to_sparse_semi_structured refused: {why})", flush=True)
        rows.append(row)
        print(format_row(row), flush=True)
    return rows


HEADER = ("| Linear (M,K,N) | ours: tile (split-K) | ours int8 us | ours weight GB/s | cuBLAS fp16 us | cuBLAS bf16 us | "
          "cuBLASLt int8 + dequant us | fp16 / ours | int8 peer / ours | ours sparse int8 90% us | fp16 / sparse | "
          "ours 2:4 int8 us | fp16 2:4 (semi-structured) us | fp16 / ours 2:4 | fp16 2:4 / ours 2:4 | ours int4 us | "
          "fp16 / int4 |\n"
          "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")


def format_row(r: dict) -> str:
    def us(v):
        return "-" if v is None else f"{v:.1f}"

    def ratio(a, b):
        return "-" if a is None or b is None else f"{a / b:.2f}"

    return (f"| {r['shape']} | {r['plan']} | {r['ours']:.1f} | {r['weight_bytes'] / r['ours'] / 1e3:.0f} | "
            f"{r['fp16']:.1f} | {r['bf16']:.1f} | {us(r['int_mm'])} | {ratio(r['fp16'], r['ours'])} | "
            f"{ratio(r['int_mm'], r['ours'])} | {us(r['sparse'])} | {ratio(r['fp16'], r['sparse'])} | "
            f"{us(r['nm24'])} | {us(r['semi'])} | {ratio(r['fp16'], r['nm24'])} | {ratio(r['semi'], r['nm24'])} | "
            f"{us(r['int4'])} | {ratio(r['fp16'], r['int4'])} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="5 repetitions instead of 30")
    args = parser.parse_args()
    info = pc.build_info()["cuda"]
    if not info["usable"]:
        raise SystemExit(f"bench_cuda: {info['reason']}")
    print(f"GPU: {torch.cuda.get_device_name()} (capability {torch.cuda.get_device_capability()}), torch "
          f"{torch.__version__} (CUDA {torch.version.cuda}), pycompress {pc.__version__} built for sm_"
          f"{', sm_'.join(info['archs'])}")
    print(HEADER)
    run(5 if args.quick else 30)
    print("Not measured yet: sparse fp32 weights.")


if __name__ == "__main__":
    main()
