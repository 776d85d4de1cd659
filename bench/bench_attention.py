"""Fused attention: torch.ops.pycompress.attention against PyTorch's, same run, same threads.

    python bench/bench_attention.py            # the table (about 1-2 minutes)
    python bench/bench_attention.py --quick    # fewer samples, a smoke run
    pytest bench/bench_attention.py            # pytest-benchmark, grouped per shape and threads

Every implementation gets q, k, v as transformers passes them (transposed views of
[B, S, H*D] Linear outputs) and returns the [B, Sq, H, D] contiguous tensor that
transformers reshapes next: the peers' outputs are transposed and made contiguous,
as transformers' sdpa_attention_forward does. Peers:
  sdpa       torch.nn.functional.scaled_dot_product_attention, default backend
             (the CPU flash-attention kernel for these float32 inputs)
  sdpa math  the same, forced to the math backend (SDPBackend.MATH)
  eager      softmax(q @ k^T * scale) @ v with torch ops (transformers' "eager")
Timing: bench/timing.py (interleaved samples, medians, inputs rotated over a pool
larger than twice the L2 of both cores, a pause before each sample).
Every output is checked against float64 attention first (bench/peers.py, judge):
times are printed with their relative error beside them; a peer over the fp32
limit is timed and marked WRONG, ours over it aborts.
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import machine
import peers
import pycompress  # noqa: F401  (loads the ops)
from pycompress.ops.attention import attention_cpu
from timing import Step, calls_for, ops_measured, time_interleaved, torch_threads

OPS_MEASURED = ops_measured("attention")
THREADS = (1, 2)


@dataclass(frozen=True)
class AttentionShape:
    batch: int
    heads: int
    seq: int
    head_dim: int
    source: str

    @property
    def label(self) -> str:
        return f"[{self.batch},{self.heads},{self.seq},{self.head_dim}]"

    @property
    def macs(self) -> int:
        return 2 * self.batch * self.heads * self.seq * self.seq * self.head_dim


SHAPES = [
    AttentionShape(1, 12, 128, 32, "all-MiniLM-L6-v2, batch 1 x seq 128 (issue 4's latency case)"),
    AttentionShape(32, 12, 128, 32, "all-MiniLM-L6-v2, batch 32 x seq 128"),
    AttentionShape(1, 12, 512, 64, "BERT-base at its longest sequence, 512"),
]


def make_qkv_pool(shape: AttentionShape, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    one = 3 * shape.batch * shape.seq * shape.heads * shape.head_dim * 4
    count = min(16, max(2, math.ceil(4 * machine.cache_sizes().get("L2", 1 << 20) / one)))

    def view():
        return torch.randn(shape.batch, shape.seq, shape.heads, shape.head_dim, generator=gen).transpose(1, 2)

    return [(view(), view(), view()) for _ in range(count)]


def _pycompress(q, k, v):
    return attention_cpu(q, k, v)


def _sdpa(q, k, v):
    return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).contiguous()


def _sdpa_math(q, k, v):
    with sdpa_kernel(SDPBackend.MATH):
        return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).contiguous()


def _eager(q, k, v):
    scores = torch.matmul(q, k.transpose(2, 3)) * q.shape[-1] ** -0.5
    return torch.matmul(torch.softmax(scores, dim=-1), v).transpose(1, 2).contiguous()


IMPLEMENTATIONS = {"pycompress": _pycompress, "sdpa": _sdpa, "sdpa math": _sdpa_math, "eager": _eager}


def make_step(fn, pool) -> Step:
    state = {"i": 0}

    def step():
        q, k, v = pool[state["i"] % len(pool)]
        state["i"] += 1
        return fn(q, k, v)

    return step


def _reference(q, k, v) -> torch.Tensor:
    q, k, v = q.double(), k.double(), v.double()
    scores = torch.matmul(q, k.transpose(2, 3)) * q.shape[-1] ** -0.5
    return torch.matmul(torch.softmax(scores, dim=-1), v).transpose(1, 2).contiguous()


def check_outputs(pool) -> dict[str, peers.Accuracy]:
    """Each implementation's error against float64 attention (peers.judge: ours
    over the fp32 limit raises, a peer is marked WRONG)."""
    q, k, v = pool[0]
    ref = _reference(q, k, v)
    return {name: peers.judge(name, peers.relative_error(fn(q, k, v), ref), "fp32", ours=name == "pycompress",
                              where=str(tuple(q.shape)))
            for name, fn in IMPLEMENTATIONS.items()}


@pytest.mark.parametrize("impl", list(IMPLEMENTATIONS))
@pytest.mark.parametrize("threads", THREADS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: s.label)
def test_attention(benchmark, shape: AttentionShape, threads: int, impl: str) -> None:
    pool = make_qkv_pool(shape)
    with torch_threads(threads):
        accuracy = check_outputs(pool)[impl]
        step = make_step(IMPLEMENTATIONS[impl], pool)
        benchmark.group = f"{shape.label} threads={threads}"
        benchmark.extra_info.update(shape=shape.label, source=shape.source, threads=threads,
                                    relative_error=accuracy.error, wrong_on_this_cpu=accuracy.wrong)
        benchmark.pedantic(step, rounds=25, iterations=calls_for(step, 0.01), warmup_rounds=2)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="5 rounds of 10 ms: a smoke run, not for reporting")
    args = parser.parse_args(argv)
    rounds, batch_s = (5, 0.01) if args.quick else (15, 0.03)
    print(f"{machine.cpu_model()}; pycompress ISA {pycompress.get_isa()}; torch {torch.__version__}; "
          f"load average at start: {machine.load_average()}")
    others = [n for n in IMPLEMENTATIONS if n != "pycompress"]
    header = (["shape [B,H,S,D]", "thr", "pycompress us (err)"] + [f"{n} us (err)" for n in others]
              + ["sdpa / ours", "best peer / ours", "best exact peer / ours", "ours GFLOPS", "spread"])
    print("| " + " | ".join(header) + " |")
    print("|---" + "|---:" * (len(header) - 1) + "|")
    for shape in SHAPES:
        pool = make_qkv_pool(shape)
        for threads in THREADS:
            with torch_threads(threads):
                accuracy = check_outputs(pool)
                steps = {n: make_step(fn, pool) for n, fn in IMPLEMENTATIONS.items()}
                t = time_interleaved(steps, rounds, batch_s)
            ours = t["pycompress"].median_s
            vs_best, vs_exact = peers.ratio_cells(ours, {n: t[n].median_s for n in others}, accuracy)
            row = [shape.label, str(threads)] + [peers.timed_cell(f"{t[n].median_s * 1e6:.0f}", accuracy[n])
                                                 for n in IMPLEMENTATIONS]
            row += [f"{t['sdpa'].median_s / ours:.2f}" + ("*" if accuracy["sdpa"].wrong else ""), vs_best, vs_exact]
            row += [f"{2 * shape.macs / ours * 1e-9:.0f}", f"{100 * max(x.spread for x in t.values()):.0f}%"]
            print("| " + " | ".join(row) + " |", flush=True)
    print("\n" + peers.error_legend(limits="fp32 1e-4"))
    print(f"load average at the end: {machine.load_average()}")


if __name__ == "__main__":
    main(sys.argv[1:])
