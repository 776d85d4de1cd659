"""The benchmark shapes: the one list every bench/ script draws from.

A Linear call is (M, K, N): x is M x K, W is N x K, y is M x N. Each shape says
which real layer it stands for, so a number in a table can be traced to a model.
"""

from __future__ import annotations

from dataclasses import dataclass

MIB = 1 << 20


@dataclass(frozen=True)
class LinearShape:
    m: int
    k: int
    n: int
    source: str
    # Distinct layers of this shape called in turn. With layers > 1 the weights of
    # the whole stack exceed the last-level cache, so every call streams its
    # weights from DRAM, as in a deep model; the time reported is per layer.
    layers: int = 1

    @property
    def id(self) -> str:
        base = f"{self.m}x{self.k}x{self.n}"
        return base if self.layers == 1 else f"{base}_stack{self.layers}"

    @property
    def label(self) -> str:
        base = f"({self.m},{self.k},{self.n})"
        return base if self.layers == 1 else f"{base}x{self.layers} layers"

    @property
    def macs(self) -> int:
        return self.m * self.k * self.n

    def weight_bytes(self, bytes_per_weight: int) -> int:
        """Weight bytes of the whole stack (all layers)."""
        return self.layers * self.k * self.n * bytes_per_weight

    @property
    def compute_bound(self) -> bool:
        """True when the int8 GEMM should be limited by multiply-adds, not by weight traffic.

        Each int8 weight byte feeds M multiply-adds per call. The machine balance
        (peak int8 MAC/s over the L3 or DRAM bandwidth) is a few MACs per byte on a
        2-core Zen 4/5, so with M >= 16 the VNNI units set the speed and "fraction
        of int8 peak" is the figure to report; below that the weight stream does,
        and weight GB/s is the figure.
        """
        return self.m >= 16


# Required by issue 2. BERT-base / MiniLM-class encoders (hidden 768, MLP 3072)
# and a 7B-class decoder (hidden 4096).
SHAPES: tuple[LinearShape, ...] = (
    LinearShape(1, 768, 768, "BERT-base attention projection (Q/K/V/out), one token: per-call overhead dominates"),
    LinearShape(1, 4096, 4096, "LLaMA-7B-class decode, batch 1, attention projection: GEMV, weight-bandwidth bound"),
    LinearShape(1, 4096, 4096, "LLaMA-7B-class decode GEMV over a 4-layer stack: int8 weights 64 MiB > L3, "
                "streamed from DRAM every call (the cache-cold case)", layers=4),
    LinearShape(16, 4096, 4096, "LLaMA-7B-class decode, batch 16 (or 16 speculative tokens): skinny GEMM"),
    LinearShape(128, 768, 3072, "BERT-base MLP up-projection (fc1), one sequence of 128 tokens"),
    LinearShape(128, 3072, 768, "BERT-base MLP down-projection (fc2), one sequence of 128 tokens"),
    LinearShape(512, 768, 768, "BERT-base attention projection, 4 sequences x 128 tokens"),
)

# The real model of this project, all-MiniLM-L6-v2 (hidden 384, MLP 1536), at one
# sequence of 128 tokens. Not in the default run (the models benchmark times the
# whole network); `python bench/bench_q8_linear.py --shapes all` adds them.
MINILM_SHAPES: tuple[LinearShape, ...] = (
    LinearShape(128, 384, 384, "all-MiniLM-L6-v2 attention projection, 1 x 128 tokens"),
    LinearShape(128, 384, 1536, "all-MiniLM-L6-v2 MLP up-projection, 1 x 128 tokens"),
    LinearShape(128, 1536, 384, "all-MiniLM-L6-v2 MLP down-projection, 1 x 128 tokens"),
)

ALL_SHAPES: tuple[LinearShape, ...] = SHAPES + MINILM_SHAPES

# Thread counts: the machine has 2 cores (PERF.md).
THREADS: tuple[int, ...] = (1, 2)

# The shape of the per-call overhead breakdown: small enough that the Python
# layer, the dispatcher and the thread pool's wake-up are visible next to the kernel.
OVERHEAD_SHAPE = SHAPES[0]

# Decode (issue 14): a 7B-class decoder (hidden 4096, MLP 11008) one token at a time (M = 1), a few tokens
# (M = 4, 16: batched requests or speculative decoding), and weight stacks that leave the L3: 4 layers of
# 4096^2 (64 MiB int8, 32 MiB int4) and 8 layers (64 MiB int4).
DECODE_SHAPES: tuple[LinearShape, ...] = (
    LinearShape(1, 4096, 4096, "7B-class decode, attention projection, one token"),
    LinearShape(4, 4096, 4096, "7B-class decode, attention projection, 4 tokens"),
    LinearShape(16, 4096, 4096, "7B-class decode, attention projection, 16 tokens"),
    LinearShape(1, 4096, 11008, "7B-class decode, MLP gate / up projection, one token"),
    LinearShape(1, 11008, 4096, "7B-class decode, MLP down projection, one token"),
    LinearShape(1, 4096, 4096, "7B-class decode GEMV over a 4-layer stack (int8 64 MiB: DRAM)", layers=4),
    LinearShape(1, 4096, 4096, "7B-class decode GEMV over an 8-layer stack (int4 64 MiB: DRAM)", layers=8),
)

# CUDA (issue 15, bench/bench_cuda.py): the shapes above, M up to 4096, and decode over a 7B-class MLP stack whose
# fp16 weights (8 x 90 MB) exceed an H100/H200's 50-60 MB L2, so every call streams its weights from HBM.
CUDA_SHAPES: tuple[LinearShape, ...] = SHAPES + (
    LinearShape(256, 4096, 4096, "7B-class prefill, 256 tokens"),
    LinearShape(1024, 4096, 4096, "7B-class prefill, 1024 tokens"),
    LinearShape(4096, 4096, 4096, "7B-class prefill, 4096 tokens: compute bound"),
    LinearShape(4096, 4096, 11008, "7B-class prefill, MLP up-projection, 4096 tokens"),
    LinearShape(1, 4096, 11008, "7B-class decode, MLP up-projection over an 8-layer stack (fp16 720 MB: HBM)", layers=8),
    LinearShape(16, 4096, 11008, "7B-class decode, 16 tokens, over an 8-layer stack (fp16 720 MB: HBM)", layers=8),
)

# The Linears of one LLaMA-7B-class decoder layer at one token, in the order a forward calls them.
DECODER_LAYER: tuple[LinearShape, ...] = tuple(
    LinearShape(1, k, n, f"7B-class decoder layer {name}")
    for name, k, n in (("q_proj", 4096, 4096), ("k_proj", 4096, 4096), ("v_proj", 4096, 4096),
                       ("o_proj", 4096, 4096), ("gate_proj", 4096, 11008), ("up_proj", 4096, 11008),
                       ("down_proj", 11008, 4096)))
