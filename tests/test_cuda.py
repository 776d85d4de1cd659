"""The CUDA int8 linear (csrc/cuda): what runs without a GPU, and the GPU tests (marked ``cuda``).

Without a GPU: the launch plan, the fragment layouts' coverage and bank conflicts, and the kernel's algorithm
run on the CPU through the kernel's own index math (``_C.cuda_q8_emulate``: staging, tails, padding, each
lane's fragments, the epilogue), bit for bit against the reference on shapes around every tile size, and likewise
the Hopper, 2:4, 4-bit and sparse kernels (the sparse float one in its own float32 order, which the GPU tests then
require of the kernel bit for bit); the checks made before any launch, on fake CUDA tensors. With a GPU (bench/gpu_check.sh): the kernel itself
against the CPU kernel, bit for bit, in float32, float16 and bfloat16, under CUDA graphs and streams.
"""

from __future__ import annotations

import collections
import copy
import pathlib
import re
import shutil
import sys

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import pycompress as pc
from pycompress import _C, _cuda
from pycompress.ops.q4 import int4_linear_cpu, int4_linear_cuda
from pycompress.ops.q8 import _int8_linear_cuda, int8_linear_cpu
from pycompress.ops.sparse import _sparse_int8_linear_cuda, sparse_int8_linear_cpu
from pycompress.ops.sparse import row_order, sparse_linear_csr_cuda, sparse_linear_nm24_cuda
from pycompress.reference.sparse import fp32_error_bound, pack_bsr1x4, pack_csr, pack_nm24, sparse_linear_ref
from pycompress.reference.q4 import int4_linear_ref, pack_int4_weights, quantize_weight_grouped
from pycompress.reference.q8 import (act_qmax, int8_linear_ref, pack_int8_weights, q8_accumulate_ref,
                                     quantize_rows_ref, quantize_weight_per_channel)

# Nothing here depends on the CPU's ISA path (the emulation is plain C++): once per CI run.
pytestmark = pytest.mark.once_per_ci

ACT = {"none": 0, "relu": 1, "gelu": 2}
SMALL_ROWS = 16  # csrc/cuda/q8_cuda_tiling.h kSmallRows: up to this many rows run the small tile


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int32)


def layer(n: int, k: int, seed: int = 0, bias: bool = True):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g)
    q, scale = quantize_weight_per_channel(w)
    packed, col_sum = pack_int8_weights(q)
    b = torch.randn(n, generator=g) if bias else None
    return q, scale, packed, col_sum, b


def emulate(x, packed, col_sum, scale, b, n, act="none", static=None, act_bits=8, raw=False, sms=0, wgmma=False):
    """(y or the raw int32 sums, the plan it ran) on a device of ``sms`` multiprocessors (0: no split-K) that runs
    the Hopper tile (``wgmma``) or not."""
    m, k = x.shape
    y = torch.empty(m, n, dtype=torch.int32 if raw else torch.float32)
    plan = _C.cuda_q8_emulate(x.data_ptr(), m, k, x.stride(0) if m > 1 else k, packed.data_ptr(), col_sum.data_ptr(),
                              scale.data_ptr(), 0 if b is None else b.data_ptr(), n, 0 if raw else y.data_ptr(),
                              y.data_ptr() if raw else 0, ACT[act], static is not None,
                              1.0 if static is None else static[0], 0 if static is None else static[1],
                              act_qmax(act_bits), sms, wgmma)
    return y, plan


# (M, N, K) around the tiles: M across the small tile (16 rows) and the large one (128), N across a panel
# (16), the small tile (64) and the large one (128), K across a k group (4), an mma step (32) and a stage (64).
SHAPES = [(1, 1, 1), (1, 16, 64), (2, 17, 33), (5, 64, 65), (16, 65, 128), (16, 130, 3), (17, 8, 4),
          (17, 129, 31), (64, 128, 64), (100, 1, 129), (128, 127, 63), (129, 128, 65), (130, 200, 100),
          (257, 33, 7), (15, 256, 192)]


@pytest.mark.parametrize("m,n,k", SHAPES)
def test_emulated_kernel_equals_the_reference_bit_for_bit(m, n, k):
    q, scale, packed, col_sum, b = layer(n, k, seed=m * 1000 + n)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(k)) * 3
    y, plan = emulate(x, packed, col_sum, scale, b, n)
    assert plan["tile"] == ("small" if m <= SMALL_ROWS else "large") and plan["splits"] == 1
    assert torch.equal(bits(y), bits(int8_linear_ref(x, q, scale, b)))
    raw, _ = emulate(x, packed, col_sum, scale, b, n, raw=True)
    qa, _, _, _ = quantize_rows_ref(x)
    assert torch.equal(raw.to(torch.int64), q8_accumulate_ref(qa, q))


# The Hopper tile (128 x 256, 64-k steps, two warpgroups of 64 rows): M across the warpgroups and the tile, N across a
# panel (16) and the tile (256), K across a k group, a wgmma (32) and a step (64).
WGMMA_SHAPES = [(17, 1, 1), (17, 16, 64), (64, 17, 33), (65, 255, 65), (128, 256, 128), (129, 257, 7),
                (200, 300, 200), (40, 40, 96)]


@pytest.mark.parametrize("m,n,k", WGMMA_SHAPES)
def test_emulated_wgmma_tile_equals_the_reference_bit_for_bit(m, n, k):
    q, scale, packed, col_sum, b = layer(n, k, seed=m * 1000 + n)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(k)) * 3
    y, plan = emulate(x, packed, col_sum, scale, b, n, "gelu", wgmma=True)
    assert plan["tile"] == "wgmma" and plan["splits"] == 1 and plan["grid"] == (-(-n // 256), -(-m // 128))
    assert torch.equal(bits(y), bits(int8_linear_ref(x, q, scale, b, "gelu")))
    raw, _ = emulate(x, packed, col_sum, scale, b, n, raw=True, wgmma=True)
    assert torch.equal(raw.to(torch.int64), q8_accumulate_ref(quantize_rows_ref(x)[0], q))


def test_emulated_wgmma_split_k_and_the_tile_choice():
    """On a Hopper-class device the wgmma tile takes every call of more than 16 rows and splits K until each SM has
    a block; the splits' sums give the same bits in any arrival order."""
    assert _C.cuda_q8_plan(16, 4096, 4096, 132, True)["tile"] == "small"
    assert _C.cuda_q8_plan(17, 4096, 4096, 132, True)["tile"] == "wgmma"
    assert _C.cuda_q8_plan(4096, 4096, 4096, 132, True)["splits"] == 1  # 512 tiles fill 132 SMs
    p = _C.cuda_q8_plan(256, 4096, 4096, 132, True)  # 32 tiles: 5 splits of 13 steps (the last 12)
    assert (p["grid"], p["splits"], p["steps_per_split"], p["threads"]) == ((16, 2), 5, 13, 256)
    assert p["smem_bytes"] == 4 * (128 + 256) * 64
    m, n, k = 40, 300, 1000
    q, scale, packed, col_sum, b = layer(n, k, seed=9)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(3)) * 2
    y, plan = emulate(x, packed, col_sum, scale, b, n, "relu", sms=132, wgmma=True)
    assert plan["tile"] == "wgmma" and plan["splits"] == 16
    assert torch.equal(bits(y), bits(int8_linear_ref(x, q, scale, b, "relu")))


def test_wgmma_operands_cover_each_element_once_and_accumulators_each_output_once():
    """The kernel's descriptors, decoded with the PTX canonical K-major layout, address each staged byte of a
    32-k step once; the accumulator layout maps the 128 threads' registers onto the 64 x 256 tile once."""
    a_addr, b_addr = _C.cuda_wgmma_operand_addresses()
    assert len(set(a_addr)) == len(a_addr) == 64 * 32 * 4 and len(set(b_addr)) == len(b_addr) == 256 * 32 * 2
    staged_a, staged_b = _C.cuda_wgmma_staged_offsets()
    assert sorted(a_addr) == sorted(staged_a) and sorted(b_addr) == sorted(staged_b)
    cells = collections.Counter(_C.cuda_wgmma_accumulators())
    assert cells == collections.Counter((r, c) for r in range(64) for c in range(256))


@pytest.mark.parametrize("act", ["relu", "gelu"])
@pytest.mark.parametrize("static", [None, (0.05, 77)])
@pytest.mark.parametrize("act_bits", [7, 8])
@pytest.mark.parametrize("m", [3, 40])
def test_emulated_epilogue_options_equal_the_cpu_kernel(act, static, act_bits, m):
    n, k = 70, 96
    q, scale, packed, col_sum, b = layer(n, k, seed=5)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(1)) * 2
    zp = None if static is None else min(static[1], act_qmax(act_bits))
    static = None if static is None else (static[0], zp)
    y, _ = emulate(x, packed, col_sum, scale, b, n, act, static, act_bits)
    want = int8_linear_ref(x, q, scale, b, act, static, act_bits)
    assert torch.equal(bits(y), bits(want))
    cpu = int8_linear_cpu(x, packed, col_sum, scale, b, ACT[act], None if static is None else static[0],
                          0 if static is None else static[1], act_bits)
    assert torch.equal(bits(y), bits(cpu))


def test_emulated_non_finite_rows_are_nan_and_leave_the_others_exact():
    n, k = 24, 40
    q, scale, packed, col_sum, b = layer(n, k)
    x = torch.randn(20, k)
    x[3, 7] = float("nan")
    x[11, 0] = float("inf")
    x[12, 39] = -float("inf")
    x[14] = 3e38  # finite, but hi - lo overflows: a non-finite scale
    x[14, 0] = -3e38
    y, _ = emulate(x, packed, col_sum, scale, b, n)
    want = int8_linear_ref(x, q, scale, b)
    assert torch.equal(bits(y), bits(want))
    assert torch.isnan(y[[3, 11, 12, 14]]).all() and not torch.isnan(y[[0, 1, 2, 4, 13, 15]]).any()


def test_emulated_strided_rows():
    n, k = 40, 50
    q, scale, packed, col_sum, b = layer(n, k)
    base = torch.randn(30, 80)
    x = base[:, 5:5 + k]  # row stride 80
    assert not x.is_contiguous()
    y, _ = emulate(x, packed, col_sum, scale, b, n)
    assert torch.equal(bits(y), bits(int8_linear_ref(x.contiguous(), q, scale, b)))


def test_emulated_extremes_at_the_largest_k():
    """K = 65536 with every product 255 x -128: the int32 accumulator at its bound, exact."""
    k, n = 65536, 16
    q = torch.full((n, k), -128, dtype=torch.int8)
    q[1::2] = 127
    scale = torch.full((n,), 0.5)
    packed, col_sum = pack_int8_weights(q)
    x = torch.ones(3, k)  # scale 1/255, zero point 0: every q = 255
    for sms in (0, 132):  # one block over all of K, and K in 32 splits of 32 steps
        raw, plan = emulate(x, packed, col_sum, scale, None, n, raw=True, sms=sms)
        assert plan["tile"] == "small" and plan["splits"] == (1 if sms == 0 else 32)
        assert raw[0, 0].item() == 255 * -128 * k and raw[0, 1].item() == 255 * 127 * k
        y, _ = emulate(x, packed, col_sum, scale, None, n, sms=sms)
        assert torch.equal(bits(y), bits(int8_linear_ref(x, q, scale)))


def test_emulated_empty_batch():
    q, scale, packed, col_sum, b = layer(8, 8)
    y, plan = emulate(torch.empty(0, 8), packed, col_sum, scale, b, 8, sms=132)
    assert y.shape == (0, 8) and plan["tile"] == "small"


# (M, N, K, SMs) of decode steps whose K the small tile splits: the splits' partial sums meet in the last block to
# arrive (the emulation runs odd column tiles' splits backwards), k steps not a multiple of the split, a split of
# one step, tails in M, N and K.
SPLIT_SHAPES = [(1, 64, 4096, 132), (1, 130, 1000, 4), (3, 130, 1000, 4), (16, 200, 777, 108), (5, 17, 129, 80),
                (16, 65, 320, 1), (2, 300, 2000, 132)]


@pytest.mark.parametrize("m,n,k,sms", SPLIT_SHAPES)
def test_emulated_split_k_equals_the_reference_bit_for_bit(m, n, k, sms):
    q, scale, packed, col_sum, b = layer(n, k, seed=m + n + k)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(sms)) * 2
    y, plan = emulate(x, packed, col_sum, scale, b, n, "gelu", sms=sms)
    assert plan == _C.cuda_q8_plan(m, n, k, sms) and plan["splits"] > 1
    assert torch.equal(bits(y), bits(int8_linear_ref(x, q, scale, b, "gelu")))
    raw, _ = emulate(x, packed, col_sum, scale, b, n, raw=True, sms=sms)
    qa, _, _, _ = quantize_rows_ref(x)
    assert torch.equal(raw.to(torch.int64), q8_accumulate_ref(qa, q))


def test_plan_split_k():
    """The small tile splits K until each SM has 4 blocks (at most 32 splits, at least one 64-k step each)."""
    p = _C.cuda_q8_plan(1, 4096, 4096, 132)  # 64 column tiles, 64 k steps: 9 splits wanted, 8 of 8 steps
    assert (p["grid"], p["splits"], p["steps"], p["steps_per_split"]) == ((64, 1), 8, 64, 8)
    p = _C.cuda_q8_plan(16, 4096, 11008, 132)  # 172 k steps: 9 splits of 20 (the last 12)
    assert (p["splits"], p["steps"], p["steps_per_split"]) == (9, 172, 20)
    assert _C.cuda_q8_plan(1, 64, 65536, 132)["splits"] == 32
    assert _C.cuda_q8_plan(1, 64, 64, 132)["splits"] == 1  # one k step
    assert _C.cuda_q8_plan(1, 11008, 4096, 132)["splits"] == 4  # 172 column tiles: 528 / 172 -> 4 splits of 16
    assert _C.cuda_q8_plan(17, 4096, 4096, 132)["splits"] == 1  # the large tile has enough blocks
    assert _C.cuda_q8_plan(1, 4096, 4096, 0)["splits"] == 1  # SM count unknown
    split, whole = _C.cuda_q8_plan(1, 4096, 4096, 132), _C.cuda_q8_plan(1, 4096, 4096, 0)
    # the partial sums (8 x 1 x 4096 int32) and 64 counters on top of the quantized row's scratch
    assert split["scratch_bytes"] - whole["scratch_bytes"] == 8 * 4096 * 4 + 64 * 4
    with pytest.raises(ValueError, match=r"multiprocessor count must be >= 0"):
        _C.cuda_q8_plan(1, 4, 4, -1)


def test_plan_tiles_and_refusals():
    small, large = _C.cuda_q8_plan(16, 100, 70), _C.cuda_q8_plan(17, 100, 70)
    assert small["tile"] == "small" and small["grid"] == (2, 1) and small["threads"] == 128
    assert large["tile"] == "large" and large["grid"] == (1, 1) and large["threads"] == 256
    assert small["ldq"] == 128 and small["kp"] == 72 and small["panels"] == 7
    assert _C.cuda_q8_plan(1000, 4096, 4096)["grid"] == (32, 8)
    assert large["smem_bytes"] <= 48 * 1024  # no opt-in launch attribute needed
    with pytest.raises(ValueError, match=r"K outside \[1, 65536\]"):
        _C.cuda_q8_plan(4, 4, 65537)
    with pytest.raises(ValueError, match=r"K outside"):
        _C.cuda_q8_plan(4, 4, 0)
    with pytest.raises(ValueError, match=r"M above 65535 row tiles"):
        _C.cuda_q8_plan(65536 * 128, 4, 4)


def test_fragments_cover_each_mma_operand_once():
    """The a/b/c fragment coordinates of the 32 lanes cover A (16 x 32), B (32 x 8) and C (16 x 8) exactly once."""
    a, b, c = collections.Counter(), collections.Counter(), collections.Counter()
    for lane_a, lane_b, lane_c in _C.cuda_q8_fragments():
        a.update((row, kk + j) for row, kk in lane_a for j in range(4))
        b.update((kk + j, col) for kk, col in lane_b for j in range(4))
        c.update(lane_c)
    assert a == collections.Counter((r, kk) for r in range(16) for kk in range(32))
    assert b == collections.Counter((kk, col) for kk in range(32) for col in range(8))
    assert c == collections.Counter((r, col) for r in range(16) for col in range(8))


@pytest.mark.parametrize("operand", ["a", "b"])
def test_fragment_loads_hit_32_different_banks(operand):
    """Each 32-bit fragment load of a warp reads 32 different shared-memory banks (the stage rows' padding)."""
    frags = _C.cuda_q8_fragments()
    for reg in range(4 if operand == "a" else 2):
        for base in (0, 16, 32, 48) if operand == "a" else (0, 8, 16, 24):
            banks = set()
            for lane_a, lane_b, _ in frags:
                if operand == "a":
                    row, kk = lane_a[reg]
                    offset = _C.cuda_q8_smem_offsets(base + row, kk, 0)[0]
                else:
                    kk, col = lane_b[reg]
                    offset = _C.cuda_q8_smem_offsets(0, kk, base + col)[1]
                assert offset % 4 == 0
                banks.add(offset // 4 % 32)
            assert len(banks) == 32, (operand, reg, base)


# ---- the 2:4 sparse tensor-core kernel (csrc/cuda/q8_nm24_mma__sm80.cu), emulated --------------------------

def nm24_weight(n: int, k: int, seed: int = 0) -> torch.Tensor:
    """float [n, k] with at most 2 non-zeros in every 4 consecutive k (k = 4g .. 4g + 3), each of the 11 such
    patterns (none, one at any of 4 places, two at any of 6 pairs) in turn, so every fill of the pack is used."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g)
    patterns = [()] + [(i,) for i in range(4)] + [(i, j) for i in range(4) for j in range(i + 1, 4)]
    table = torch.tensor([[i in p for i in range(4)] for p in patterns])
    kp = -(-k // 4) * 4
    which = (torch.arange(n)[:, None] * 7 + torch.arange(kp // 4)[None, :]) % len(patterns)
    mask = table[which].reshape(n, kp)
    return torch.where(mask[:, :k], w, torch.zeros(()))


def nm24_layer(n, k, seed=0, bias=True):
    g = torch.Generator().manual_seed(seed + 1)
    q, scale = quantize_weight_per_channel(nm24_weight(n, k, seed))
    packed, col_sum = pack_int8_weights(q)
    pack = torch.empty(_C.cuda_nm24_bytes(n, k), dtype=torch.uint8)
    _C.cuda_nm24_pack(packed.data_ptr(), n, k, pack.data_ptr())
    return q, scale, packed, col_sum, (torch.randn(n, generator=g) if bias else None), pack


def nm24_emulate(x, pack, col_sum, scale, b, n, act="none", static=None, act_bits=8, raw=False):
    m, k = x.shape
    y = torch.empty(m, n, dtype=torch.int32 if raw else torch.float32)
    plan = _C.cuda_nm24_emulate(x.data_ptr(), m, k, x.stride(0) if m > 1 else k, pack.data_ptr(), pack.numel(),
                                col_sum.data_ptr(), scale.data_ptr(), 0 if b is None else b.data_ptr(), n,
                                0 if raw else y.data_ptr(), y.data_ptr() if raw else 0, ACT[act], static is not None,
                                1.0 if static is None else static[0], 0 if static is None else static[1],
                                act_qmax(act_bits))
    return y, plan


# M across a column tile (8 rows) and the 1 / 2 / 4-tile blocks (8, 16, 32 rows), N across a panel (16), K across
# a k chunk (4), an mma.sp step (64) and the 8 warps' turns (more than 8 steps: 600, 1100).
NM24_SHAPES = [(1, 1, 1), (1, 16, 64), (2, 17, 65), (7, 40, 4), (8, 16, 130), (9, 33, 600), (16, 5, 63),
               (17, 48, 1100), (32, 16, 128), (33, 20, 200), (70, 31, 7), (1, 64, 4096)]


@pytest.mark.parametrize("m,n,k", NM24_SHAPES)
def test_emulated_nm24_kernel_equals_the_dense_reference_bit_for_bit(m, n, k):
    q, scale, packed, col_sum, b, pack = nm24_layer(n, k, seed=m + n)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(k)) * 3
    y, plan = nm24_emulate(x, pack, col_sum, scale, b, n)
    assert plan == {"grid": (-(-n // 16), -(-m // (8 * plan["tiles"]))), "tiles": 1 if m <= 8 else 2 if m <= 16 else 4,
                    "steps": -(-k // 64)}
    assert torch.equal(bits(y), bits(int8_linear_ref(x, q, scale, b)))
    assert torch.equal(bits(y), bits(int8_linear_cpu(x, packed, col_sum, scale, b)))
    raw, _ = nm24_emulate(x, pack, col_sum, scale, b, n, raw=True)
    assert torch.equal(raw.to(torch.int64), q8_accumulate_ref(quantize_rows_ref(x)[0], q))


@pytest.mark.parametrize("act,static,act_bits", [("relu", None, 7), ("gelu", (0.05, 77), 8), ("gelu", None, 8)])
def test_emulated_nm24_epilogue_options_non_finite_rows_and_strides(act, static, act_bits):
    n, k, m = 40, 200, 12
    q, scale, packed, col_sum, b, pack = nm24_layer(n, k, seed=3)
    base = torch.randn(m, k + 9, generator=torch.Generator().manual_seed(2)) * 2
    base[4, 7] = float("nan")
    base[9, 5] = float("inf")
    x = base[:, 5:5 + k]  # strided rows
    y, _ = nm24_emulate(x, pack, col_sum, scale, b, n, act, static, act_bits)
    cpu = int8_linear_cpu(x.contiguous(), packed, col_sum, scale, b, ACT[act], None if static is None else static[0],
                          0 if static is None else static[1], act_bits)
    assert torch.equal(bits(y), bits(cpu))
    assert y[4].isnan().all() and y[9].isnan().all() and not y[[0, 1, 2, 3, 5, 6, 7, 8, 10, 11]].isnan().any()


def test_emulated_nm24_empty_batch_and_extremes_at_the_largest_k():
    n, k = 16, 65536
    q = torch.zeros(n, k, dtype=torch.int8)
    q[:, 0::4] = -127
    q[:, 3::4] = 127
    q[::2, 3::4] = -127  # even channels: every kept product at the extreme
    scale = torch.full((n,), 1e-3)
    packed, col_sum = pack_int8_weights(q)
    pack = torch.empty(_C.cuda_nm24_bytes(n, k), dtype=torch.uint8)
    _C.cuda_nm24_pack(packed.data_ptr(), n, k, pack.data_ptr())
    x = torch.full((2, k), 5.0)
    x[1, 1::2] = -5.0
    raw, _ = nm24_emulate(x, pack, col_sum, scale, None, n, raw=True)
    assert torch.equal(raw.to(torch.int64), q8_accumulate_ref(quantize_rows_ref(x)[0], q))
    y, plan = nm24_emulate(torch.empty(0, k), pack, col_sum, scale, None, n)
    assert y.shape == (0, n) and plan["grid"] == (1, 0)


def test_nm24_pack_refuses_a_layer_that_is_not_2_4_naming_the_channel_and_k():
    q, scale = quantize_weight_per_channel(nm24_weight(20, 40))
    q[17, 8:12] = torch.tensor([1, 0, 2, 3], dtype=torch.int8)
    packed, _ = pack_int8_weights(q)
    out = torch.empty(_C.cuda_nm24_bytes(20, 40), dtype=torch.uint8)
    with pytest.raises(ValueError, match=r"output channel 17 has more than 2 non-zeros in k 8\.\.11"):
        _C.cuda_nm24_pack(packed.data_ptr(), 20, 40, out.data_ptr())


def test_nm24_fragments_cover_each_operand_once_and_carry_their_metadata():
    """The 32 lanes' compressed A bytes cover 16 x 32 once, their metadata nibbles 16 rows x 16 chunks once (each
    nibble in the lane of the two values it describes), and B 64 x 8 once."""
    a, e, b = collections.Counter(), collections.Counter(), collections.Counter()
    for lane_a, lane_e, lane_b in _C.cuda_nm24_fragments():
        a.update(lane_a)
        e.update(lane_e)
        b.update((kk + j, col) for kk, col in lane_b for j in range(4))
        for p, (row, ccol) in enumerate(lane_a):
            assert lane_e[p // 2] == (row, ccol // 2)
    assert a == collections.Counter((r, c) for r in range(16) for c in range(32))
    assert e == collections.Counter((r, c) for r in range(16) for c in range(16))
    assert b == collections.Counter((kk, col) for kk in range(64) for col in range(8))


# ---- the W4A8 kernel (csrc/cuda/q4_gemm_mma__sm80.cu), emulated --------------------------------------------

def q4_layer(n, k, group_size, seed=0, bits=4):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g)
    q, scale = quantize_weight_grouped(w, bits, group_size)
    w4, g_scale, corr = pack_int4_weights(q, scale, group_size)
    groups = 1 if group_size is None else k // group_size
    return q, scale, (w4, g_scale, corr), groups, torch.randn(n, generator=g)


def q4_emulate(x, pack, groups, b, n, act="none", static=None, act_bits=8):
    m, k = x.shape
    y = torch.empty(m, n)
    w4, g_scale, corr = pack
    grid = _C.cuda_q4_emulate(x.data_ptr(), m, k, x.stride(0) if m > 1 else k, w4.data_ptr(), g_scale.data_ptr(),
                              corr.data_ptr(), groups, 0 if b is None else b.data_ptr(), n, y.data_ptr(), ACT[act],
                              static is not None, 1.0 if static is None else static[0],
                              0 if static is None else static[1], act_qmax(act_bits))
    return y, grid


# (M, N, K, group size): M across the 8-row block, N across a panel (16), K across a packed block (8), a step (32)
# and the 8 warps' turns; groups of 32 / 64 / 128 (one a warp, batches of 8: 32 groups at K = 4096) and per channel
# (the warps share its steps; K not a multiple of 32).
Q4_SHAPES = [(1, 1, 1, None), (1, 16, 32, 32), (3, 17, 64, 32), (8, 40, 128, 64), (9, 33, 256, 128),
             (16, 20, 100, None), (7, 64, 1024, 128), (20, 5, 96, 32), (1, 48, 4096, 128), (2, 16, 2056, None),
             (5, 30, 320, 32)]


@pytest.mark.parametrize("m,n,k,group_size", Q4_SHAPES)
def test_emulated_int4_kernel_equals_the_cpu_kernel_bit_for_bit(m, n, k, group_size):
    q, scale, pack, groups, b = q4_layer(n, k, group_size, seed=m + n)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(k)) * 3
    y, grid = q4_emulate(x, pack, groups, b, n, "gelu")
    assert grid == (-(-n // 16), -(-m // 8))
    want = int4_linear_cpu(x, *pack, b, n, groups, ACT["gelu"])
    assert torch.equal(bits(y), bits(want))
    assert torch.equal(bits(y), bits(int4_linear_ref(x, q, scale, group_size, b, "gelu")))


@pytest.mark.parametrize("static,act_bits,weight_bits", [(None, 7, 4), ((0.05, 77), 8, 3), (None, 8, 2)])
def test_emulated_int4_options_non_finite_and_strided_rows(static, act_bits, weight_bits):
    n, k, m = 40, 256, 11
    q, scale, pack, groups, b = q4_layer(n, k, 64, seed=4, bits=weight_bits)
    base = torch.randn(m, k + 7, generator=torch.Generator().manual_seed(5)) * 2
    base[3, 9] = float("nan")
    x = base[:, 3:3 + k]
    y, _ = q4_emulate(x, pack, groups, b, n, "relu", static, act_bits)
    want = int4_linear_cpu(x.contiguous(), *pack, b, n, groups, ACT["relu"], None if static is None else static[0],
                           0 if static is None else static[1], act_bits)
    assert torch.equal(bits(y), bits(want)) and y[3].isnan().all() and not y[[0, 1, 2, 4]].isnan().any()
    y, _ = q4_emulate(torch.empty(0, k), pack, groups, b, n)
    assert y.shape == (0, n)


def test_int4_groups_the_cuda_kernel_cannot_step_through_are_refused_naming_the_rule():
    assert _C.cuda_q4_plan(1, 16, 4096, 32) == {"grid": (1, 1), "steps": 128, "steps_per_group": 4}
    with pytest.raises(ValueError, match=r"groups of a multiple of 32 k \(or one group per channel\) only on CUDA"):
        _C.cuda_q4_plan(1, 16, 64, 4)  # groups of 16 k
    q, scale = quantize_weight_grouped(torch.randn(16, 64), 4, 16)
    pack = pack_int4_weights(q, scale, 16)
    with FakeTensorMode():  # refused before any launch, so on any machine
        x = torch.empty(2, 64, device="cuda")
        ops = [torch.empty(t.shape, dtype=t.dtype, device="cuda") for t in pack]
        with pytest.raises(ValueError, match=r"int4_linear \(CUDA\): groups of a multiple of 32 k .* \(layer of "
                           r"K=64, N=16, 4 groups\)"):
            int4_linear_cuda(x, *ops, None, 16, 4)


def test_every_op_has_a_cuda_kernel_or_a_clear_refusal():
    for op in pc.ops.OPS:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"pycompress::{op}", "CUDA"), op


# ---- checks made before any launch, on fake CUDA tensors (no GPU needed) ------------------------------------

def fake_cuda_operands(m=4, n=20, k=12):
    _, scale, packed, col_sum, b = layer(n, k)
    mode = FakeTensorMode(allow_non_fake_inputs=False)
    with mode:
        x = torch.empty(m, k, device="cuda")
        ops = [torch.empty(t.shape, dtype=t.dtype, device="cuda") for t in (packed, col_sum, scale, b)]
    return mode, x, ops


def test_prelaunch_mixed_devices_are_refused_naming_the_operand():
    mode, x, (packed, col_sum, scale, b) = fake_cuda_operands()
    with mode:
        cpu_scale = torch.empty(scale.shape, dtype=torch.float32)
        with pytest.raises(ValueError, match=r"int8_linear: x is on cuda:0 but w_scale is on cpu: move the layer"):
            _int8_linear_cuda(x, packed, col_sum, cpu_scale, b)


def test_prelaunch_dtype_shape_and_layout_errors():
    mode, x, (packed, col_sum, scale, b) = fake_cuda_operands()
    with mode:
        with pytest.raises(TypeError, match=r"x must be float32 \(on CUDA also float16 or bfloat16\), got torch.int8"):
            _int8_linear_cuda(torch.empty(4, 12, dtype=torch.int8, device="cuda"), packed, col_sum, scale, b)
        with pytest.raises(ValueError, match=r"packed weight must be 1-D int8 of 512 bytes for K=13, N=20"):
            _int8_linear_cuda(torch.empty(4, 13, device="cuda"), packed, col_sum, scale, b)
        with pytest.raises(ValueError, match=r"K=70000 features is outside \[1, 65536\]"):
            _int8_linear_cuda(torch.empty(1, 70000, device="cuda"), packed, col_sum, scale, b)
        wide = torch.empty_strided((20,), (2,), device="cuda")  # every other float
        with pytest.raises(ValueError, match=r"weight operands must be contiguous"):
            _int8_linear_cuda(x, packed, col_sum, wide, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_prelaunch_empty_batch_returns_empty_in_the_input_dtype(dtype):
    mode, _, (packed, col_sum, scale, b) = fake_cuda_operands()
    with mode:
        y = _int8_linear_cuda(torch.empty(2, 0, 12, dtype=dtype, device="cuda"), packed, col_sum, scale, b)
        assert y.shape == (2, 0, 20) and y.dtype == dtype and y.is_cuda


@pytest.mark.skipif(_cuda.status()["usable"], reason="a CUDA device is usable here")
def test_without_a_usable_cuda_module_a_cuda_call_says_why():
    mode, x, (packed, col_sum, scale, b) = fake_cuda_operands()
    status = _cuda.status()
    if status["built"]:  # a CUDA build on a machine without a driver or device (CI)
        assert status["archs"] and status["reason"].startswith(("the CUDA runtime cannot start", "no CUDA device",
                                                                "no device of compute capability"))
    else:
        assert status["reason"] == ("pycompress was built without CUDA: rebuild with the CUDA kernels: "
                                    "PYCOMPRESS_CUDA=ON pip install . (nvcc on PATH; README.md, 'CUDA')")
    with mode, pytest.raises(RuntimeError, match="int8_linear: got CUDA tensors, but " + re.escape(status["reason"])):
        _int8_linear_cuda(x, packed, col_sum, scale, b)
    assert pc.build_info()["cuda"] == status


def test_fake_kernel_keeps_the_cuda_dtype():
    mode, _, (packed, col_sum, scale, b) = fake_cuda_operands()
    with mode:
        y = torch.ops.pycompress.int8_linear(torch.empty(3, 12, dtype=torch.bfloat16, device="cuda"), packed, col_sum,
                                             scale, b, 0, None, 0, 8)
        assert y.dtype == torch.bfloat16 and y.shape == (3, 20)


def test_sparse_row_order_is_sputniks_row_swizzle():
    """The CUDA sparse kernels' warps take the channels by nonzero count, decreasing, ties in channel order."""
    counts = torch.tensor([3, 0, 7, 3, 7, 1, 0, 12], dtype=torch.int32)
    row_ptr = torch.cat([torch.zeros(1, dtype=torch.int32), counts.cumsum(0).to(torch.int32)])
    order = row_order(row_ptr)
    assert order.dtype == torch.int32 and order.tolist() == [7, 2, 4, 0, 3, 5, 1, 6]
    assert row_order(torch.zeros(1, dtype=torch.int32)).tolist() == []  # no channels


def skewed_sparse_weight(n, k, seed=0):
    """A float weight whose channels hold very different nonzero counts (0 to k): rows of a magnitude-pruned
    layer differ like this, and Sputnik's row swizzle balances them."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g)
    keep = torch.rand(n, k, generator=g) < torch.linspace(0.0, 1.0, n).pow(3)[torch.randperm(n, generator=g)][:, None]
    return w * keep


def test_sparse_plan_grid_and_refusals():
    assert _C.cuda_q8_sparse_plan(1, 4096, 4096) == (512, 1)  # 8 channels (warps) a block, 8 rows a pass
    assert _C.cuda_q8_sparse_plan(17, 9, 5) == (2, 3)
    with pytest.raises(ValueError, match=r"K outside \[1, 65536\]"):
        _C.cuda_q8_sparse_plan(1, 4, 65537)
    with pytest.raises(ValueError, match=r"M above 65535 row groups"):
        _C.cuda_q8_sparse_plan(65536 * 8, 4, 4)


def sparse_layer(n, k, density=0.1, seed=0, bias=True):
    """(q int8 [n, k] with ~density nonzeros, scale, bsr1x4 (row_ptr, blk_idx, values), col_sum, bias)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * (torch.rand(n, k, generator=g) < density)
    q, scale = quantize_weight_per_channel(w)
    row_ptr, blk_idx, values, col_sum = pack_bsr1x4(q)
    b = torch.randn(n, generator=g) if bias else None
    return q, scale, (row_ptr, blk_idx, values), col_sum, b


def sparse_q8_emulate(x, pack, col_sum, scale, b, n, act="none", static=None, act_bits=8):
    m, k = x.shape
    row_ptr, blk_idx, values = pack
    y = torch.empty(m, n)
    order = row_order(row_ptr)
    _C.cuda_sparse_q8_emulate(x.data_ptr(), m, k, x.stride(0) if m > 1 else k, row_ptr.data_ptr(), blk_idx.data_ptr(),
                              values.data_ptr(), blk_idx.numel(), order.data_ptr(), col_sum.data_ptr(),
                              scale.data_ptr(), 0 if b is None else b.data_ptr(), n, y.data_ptr(), ACT[act],
                              static is not None, 1.0 if static is None else static[0],
                              0 if static is None else static[1], act_qmax(act_bits))
    return y


def sparse_f32_emulate(x, w, b, act="none", nm24=False):
    """The CUDA float kernel's algorithm over the csr (or nm24) pack of w, on the CPU, in its float32 order."""
    m, k = x.shape
    n = w.shape[0]
    y = torch.empty(m, n)
    if nm24:
        values, nm_idx = pack_nm24(w)
        args = (0, 0, nm_idx.data_ptr(), nm_idx.shape[1], values.data_ptr(), values.numel(), 0)
    else:
        row_ptr, col_idx, values = pack_csr(w)
        order = row_order(row_ptr)
        args = (row_ptr.data_ptr(), col_idx.data_ptr(), 0, 0, values.data_ptr(), values.numel(), order.data_ptr())
    _C.cuda_sparse_f32_emulate(x.data_ptr(), m, k, x.stride(0) if m > 1 else k, *args,
                               0 if b is None else b.data_ptr(), n, y.data_ptr(), ACT[act])
    return y


# M across the 8-row pass, N across the 8 warps of a block, K and densities giving channels of 0 to K blocks.
SPARSE_SHAPES = [(1, 64, 96, 0.1), (3, 130, 1000, 0.05), (9, 300, 512, None), (17, 5, 4, 0.5), (8, 17, 64, 1.0)]


@pytest.mark.parametrize("m,n,k,density", SPARSE_SHAPES)
def test_emulated_sparse_int8_kernel_equals_the_cpu_kernel_bit_for_bit(m, n, k, density):
    if density is None:
        q, scale = quantize_weight_per_channel(skewed_sparse_weight(n, k, seed=m))
        row_ptr, blk_idx, values, col_sum = pack_bsr1x4(q)
        pack, b = (row_ptr, blk_idx, values), torch.randn(n)
    else:
        q, scale, pack, col_sum, b = sparse_layer(n, k, density, seed=m)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(k)) * 2
    for act, static in (("gelu", None), ("relu", (0.04, 90))):
        y = sparse_q8_emulate(x, pack, col_sum, scale, b, n, act, static)
        want = sparse_int8_linear_cpu(x, *pack, col_sum, scale, b, ACT[act], None if static is None else static[0],
                                      0 if static is None else static[1])
        assert torch.equal(bits(y), bits(want))


@pytest.mark.parametrize("m,n,k,density", SPARSE_SHAPES)
@pytest.mark.parametrize("nm24", [False, True])
def test_emulated_sparse_float_kernel_within_the_float32_bound(m, n, k, density, nm24):
    w = skewed_sparse_weight(n, k, seed=m) if density is None else sparse_layer(n, k, density, seed=m)[0].float()
    if nm24:
        w = nm24_weight(n, k, seed=m)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(k))
    b = torch.randn(n)
    y = sparse_f32_emulate(x, w, b, "gelu", nm24)
    assert ((y.double() - sparse_linear_ref(x, w, b, "gelu")).abs() <= fp32_error_bound(x, w, b, "gelu")).all()


def test_prelaunch_sparse_checks_on_fake_cuda_tensors():
    _, scale, pack, col_sum, b = sparse_layer(20, 12)
    mode = FakeTensorMode()
    with mode:
        x = torch.empty(3, 12, device="cuda")
        ops = [torch.empty(t.shape, dtype=t.dtype, device="cuda") for t in (*pack, col_sum, scale, b)]
        with pytest.raises(ValueError, match=r"sparse_int8_linear: x is on cuda:0 but values is on cpu"):
            _sparse_int8_linear_cuda(x, ops[0], ops[1], torch.empty(pack[2].shape, dtype=torch.int8), *ops[3:])
        with pytest.raises(TypeError, match=r"x must be float32 \(on CUDA also float16 or bfloat16\), got torch.int32"):
            _sparse_int8_linear_cuda(torch.empty(3, 12, dtype=torch.int32, device="cuda"), *ops)
        y = _sparse_int8_linear_cuda(torch.empty(0, 12, dtype=torch.bfloat16, device="cuda"), *ops)
        assert y.shape == (0, 20) and y.dtype == torch.bfloat16
        if not _cuda.status()["usable"]:
            with pytest.raises(RuntimeError, match="sparse_int8_linear: got CUDA tensors, but "):
                _sparse_int8_linear_cuda(x, *ops)


def test_prelaunch_csr_checks_on_fake_cuda_tensors():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(20, 12, generator=g) * (torch.rand(20, 12, generator=g) < 0.3)
    pack = pack_csr(w)
    with FakeTensorMode():
        x = torch.empty(3, 12, device="cuda")
        ops = [torch.empty(t.shape, dtype=t.dtype, device="cuda") for t in pack]
        bias = torch.empty(20, device="cuda")
        with pytest.raises(ValueError, match=r"sparse_linear_csr: x is on cuda:0 but bias is on cpu"):
            sparse_linear_csr_cuda(x, *ops, torch.empty(20))
        y = sparse_linear_csr_cuda(torch.empty(2, 0, 12, dtype=torch.float16, device="cuda"), *ops, bias)
        assert y.shape == (2, 0, 20) and y.dtype == torch.float16
        if not _cuda.status()["usable"]:
            with pytest.raises(RuntimeError, match="sparse_linear_csr: got CUDA tensors, but "):
                sparse_linear_csr_cuda(x, *ops, bias)


def test_prelaunch_nm24_float_checks_on_fake_cuda_tensors():
    values, nm_idx = pack_nm24(nm24_weight(20, 12))
    with FakeTensorMode():
        x = torch.empty(3, 12, device="cuda")
        ops = [torch.empty(t.shape, dtype=t.dtype, device="cuda") for t in (nm_idx, values)]
        bias = torch.empty(20, device="cuda")
        with pytest.raises(ValueError, match=r"sparse_linear_nm24: x is on cuda:0 but bias is on cpu"):
            sparse_linear_nm24_cuda(x, *ops, torch.empty(20))
        with pytest.raises(ValueError, match=r"sparse_linear_nm24: x has K=16 features; 2:4 values \[N, K/2\] = "
                           r"\(20, 6\) expect K=12"):
            sparse_linear_nm24_cuda(torch.empty(3, 16, device="cuda"), *ops, bias)
        with pytest.raises(TypeError, match=r"sparse_linear_nm24: x must be float32 \(on CUDA also float16 or "
                           r"bfloat16\), got torch.float64"):
            sparse_linear_nm24_cuda(x.double(), *ops, bias)
        y = sparse_linear_nm24_cuda(torch.empty(2, 0, 12, dtype=torch.bfloat16, device="cuda"), *ops, bias)
        assert y.shape == (2, 0, 20) and y.dtype == torch.bfloat16
        if not _cuda.status()["usable"]:
            with pytest.raises(RuntimeError, match="sparse_linear_nm24: got CUDA tensors, but "):
                sparse_linear_nm24_cuda(x, *ops, bias)


# ---- on a GPU ----# ---- on a GPU ---------------------------------------------------------------------------------------------

GPU_SHAPES = SHAPES + [(1, 4096, 4096), (16, 11008, 4096), (333, 768, 3072), (1024, 1024, 1024)]


def cpu_and_cuda(m, n, k, seed=0, bias=True):
    q, scale, packed, col_sum, b = layer(n, k, seed=seed, bias=bias)
    cpu = (packed, col_sum, scale, b)
    return q, cpu, tuple(None if t is None else t.cuda() for t in cpu)


@pytest.mark.cuda
@pytest.mark.parametrize("m,n,k", GPU_SHAPES)
def test_cuda_kernel_equals_the_cpu_kernel_bit_for_bit(m, n, k):
    q, cpu, gpu = cpu_and_cuda(m, n, k, seed=m + n)
    x = torch.randn(m, k) * 2
    want = int8_linear_cpu(x, *cpu)
    got = torch.ops.pycompress.int8_linear(x.cuda(), *gpu, 0, None, 0, 8)
    assert torch.equal(bits(got.cpu()), bits(want))
    raw = _int8_linear_cuda(x.cuda(), *gpu, raw=True).cpu()
    if m * n * k <= 2e8:  # the int64 reference matmul is slow on the CPU beyond that; y above covers every shape
        assert torch.equal(raw.to(torch.int64), q8_accumulate_ref(quantize_rows_ref(x)[0], q))


@pytest.mark.cuda
@pytest.mark.parametrize("m,n,k", [(1, 4096, 4096), (16, 4096, 11008), (3, 130, 1000), (1, 64, 65536)])
def test_cuda_split_k_gives_the_unsplit_bits(m, n, k, monkeypatch):
    """Decode shapes split K over this GPU's SMs (an A100 / H100-class count): the same bits as one block over all of K and as the CPU, call
    after call (the quantizer zeroes the splits' arrival counters each time)."""
    dev = _cuda.device(torch.cuda.current_device())
    assert _C.cuda_q8_plan(m, n, k, dev.sms, dev.wgmma)["splits"] > 1
    q, cpu, gpu = cpu_and_cuda(m, n, k, seed=k)
    x = torch.randn(m, k) * 2
    split = [torch.ops.pycompress.int8_linear(x.cuda(), *gpu, 2, None, 0, 8).cpu() for _ in range(3)]
    monkeypatch.setattr(_cuda, "device", lambda index: _cuda.Device(0, dev.wgmma))  # no SM count: no split
    whole = torch.ops.pycompress.int8_linear(x.cuda(), *gpu, 2, None, 0, 8).cpu()
    want = int8_linear_cpu(x, *cpu, 2)
    for got in (*split, whole):
        assert torch.equal(bits(got), bits(want))


@pytest.mark.cuda
@pytest.mark.skipif(not (torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)),
                    reason="the wgmma tile runs on compute capability 9.0 (H100 / H200) only")
@pytest.mark.parametrize("m,n,k", WGMMA_SHAPES + [(256, 4096, 4096), (333, 768, 3072), (4096, 4096, 4096)])
def test_cuda_wgmma_tile_equals_the_mma_sync_tile_and_the_cpu(m, n, k, monkeypatch):
    dev = _cuda.device(torch.cuda.current_device())
    assert dev.wgmma, f"a compute capability 9.0 device, but the module holds {_cuda.status()['archs']} (no 90a)"
    q, cpu, gpu = cpu_and_cuda(m, n, k, seed=m)
    x = torch.randn(m, k) * 2
    got = torch.ops.pycompress.int8_linear(x.cuda(), *gpu, 2, None, 0, 8).cpu()
    monkeypatch.setattr(_cuda, "device", lambda index: _cuda.Device(dev.sms, False))
    mma_sync = torch.ops.pycompress.int8_linear(x.cuda(), *gpu, 2, None, 0, 8).cpu()
    assert torch.equal(bits(got), bits(mma_sync))
    assert torch.equal(bits(got), bits(int8_linear_cpu(x, *cpu, 2)))


@pytest.mark.cuda
@pytest.mark.parametrize("act", ["relu", "gelu"])
@pytest.mark.parametrize("static,act_bits", [(None, 8), (None, 7), (0.04, 8)])
def test_cuda_epilogue_options(act, static, act_bits):
    q, cpu, gpu = cpu_and_cuda(37, 300, 200)
    x = torch.randn(37, 200)
    args = (ACT[act], static, 0 if static is None else 90, act_bits)
    want = int8_linear_cpu(x, *cpu, *args)
    got = torch.ops.pycompress.int8_linear(x.cuda(), *gpu, *args).cpu()
    assert torch.equal(bits(got), bits(want))


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_half_inputs_and_outputs_are_the_cpu_result_rounded(dtype):
    _, cpu, gpu = cpu_and_cuda(50, 96, 128)
    x = (torch.randn(50, 128) * 3).to(dtype)
    want = int8_linear_cpu(x.float(), *cpu).to(dtype)
    got = torch.ops.pycompress.int8_linear(x.cuda(), *gpu, 0, None, 0, 8)
    assert got.dtype == dtype and torch.equal(got.cpu().view(torch.int16), want.view(torch.int16))


@pytest.mark.cuda
def test_cuda_non_finite_rows_strided_input_and_empty_batch():
    _, cpu, gpu = cpu_and_cuda(24, 40, 50)
    base = torch.randn(24, 64)
    base[5, 9] = float("nan")
    x = base[:, 3:53]
    want = int8_linear_cpu(x, *cpu)
    got = torch.ops.pycompress.int8_linear(base.cuda()[:, 3:53], *gpu, 0, None, 0, 8).cpu()
    assert torch.equal(bits(got), bits(want))
    assert torch.ops.pycompress.int8_linear(torch.empty(0, 50, device="cuda"), *gpu, 0, None, 0, 8).shape == (0, 40)


@pytest.mark.cuda
def test_cuda_graph_capture_and_a_side_stream():
    _, cpu, gpu = cpu_and_cuda(64, 256, 512)
    x = torch.randn(64, 512)
    want = int8_linear_cpu(x, *cpu)
    static_x = x.cuda()
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        on_stream = torch.ops.pycompress.int8_linear(static_x, *gpu, 0, None, 0, 8)
    stream.synchronize()
    assert torch.equal(bits(on_stream.cpu()), bits(want))
    torch.ops.pycompress.int8_linear(static_x, *gpu, 0, None, 0, 8)  # warm-up outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = torch.ops.pycompress.int8_linear(static_x, *gpu, 0, None, 0, 8)
    static_x.copy_((x * 2).cuda())
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(bits(out.cpu()), bits(int8_linear_cpu(x * 2, *cpu)))


@pytest.mark.cuda
def test_converted_model_moves_to_cuda_and_computes_the_same_bits():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.GELU(), torch.nn.Linear(128, 10))
    pc.convert(model, policy="int8")
    x = torch.randn(33, 64)
    want = model(x)
    model.to("cuda")
    got = model(x.cuda()).cpu()
    assert torch.equal(bits(got), bits(want))


@pytest.mark.cuda
def test_a_half_precision_model_on_cuda_rounds_each_layer_output_once():
    """model.half().cuda(): the converted layers keep their float32 scales (CompressedLayer._apply) and take the
    float16 activations; each layer's output is the CPU's float32 output rounded to float16."""
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Linear(64, 96), torch.nn.ReLU(), torch.nn.Linear(96, 10))
    pc.convert(model, policy="int8")
    x = torch.randn(9, 64).half()
    first, second = model[0], model[-1]
    want = second(torch.relu(first(x.float()).half()).float()).half()
    model.half().to("cuda")
    assert first.w_scale.dtype == torch.float32
    got = model(x.cuda()).cpu()
    assert got.dtype == torch.float16 and torch.equal(got.view(torch.int16), want.view(torch.int16))


@pytest.mark.cuda
def test_cuda_input_to_a_cpu_layer_is_a_clear_error():
    _, cpu, _ = cpu_and_cuda(4, 16, 16)
    with pytest.raises(ValueError, match=r"x is on cuda:0 but w_packed is on cpu"):
        torch.ops.pycompress.int8_linear(torch.randn(4, 16, device="cuda"), *cpu, 0, None, 0, 8)


# ---- ptxas: what the build machine can check of the device code ------------------------------------------

@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not on PATH")
@pytest.mark.skipif(not _cuda.status()["built"], reason="the CUDA kernels are not built here (PYCOMPRESS_CUDA=ON): "
                    "their ptxas report is checked with the build that uses them")
def test_kernels_compile_for_sm80_and_sm90_without_spills():
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "bench"))
    try:
        import cuda_resources
    finally:
        sys.path.pop(0)
    kernels = cuda_resources.resources(("80", "90a"))
    names = {k.name for k in kernels}
    assert {k.arch for k in kernels} == {"80", "90a"} and len(kernels) == 2 * len(names)
    assert sum(n.startswith("q8_gemm<") for n in names) == 6 and sum(n.startswith("quantize_rows<") for n in names) == 3
    assert sum(n.startswith("q8_sparse_rows<") for n in names) == 3 and sum(n.startswith("sparse_f32_rows<") for n in names) == 6
    assert sum(n.startswith("q8_nm24<") for n in names) == 9 and sum(n.startswith("q8_gemm_wgmma<") for n in names) == 3
    assert sum(n.startswith("q4_gemm<") for n in names) == 3
    for k in kernels:
        assert (k.spill_stores, k.spill_loads, k.stack) == (0, 0, 0), f"{k.name} on sm_{k.arch} spills: {k}"
        assert k.occupancy[0] >= 1, f"{k.name} on sm_{k.arch} cannot be resident: {k}"


@pytest.mark.cuda
@pytest.mark.parametrize("m", [1, 3, 8, 9, 40])
@pytest.mark.parametrize("n,k,density", [(64, 96, 0.1), (130, 1000, 0.05), (4096, 4096, 0.1), (17, 5, 0.5)])
def test_cuda_sparse_equals_cpu_sparse_and_dense_cuda_bit_for_bit(m, n, k, density):
    q, scale, pack, col_sum, b = sparse_layer(n, k, density, seed=m)
    x = torch.randn(m, k) * 2
    want = sparse_int8_linear_cpu(x, *pack, col_sum, scale, b)
    gpu = [t.cuda() for t in (*pack, col_sum, scale, b)]
    got = torch.ops.pycompress.sparse_int8_linear(x.cuda(), *gpu, 0, None, 0).cpu()
    assert torch.equal(bits(got), bits(want))
    packed, dense_col_sum = pack_int8_weights(q)
    dense = torch.ops.pycompress.int8_linear(x.cuda(), packed.cuda(), dense_col_sum.cuda(), scale.cuda(), b.cuda(),
                                             0, None, 0, 8).cpu()
    assert torch.equal(bits(dense), bits(want))
    raw = _sparse_int8_linear_cuda(x.cuda(), *gpu, raw=True).cpu()
    assert torch.equal(raw.to(torch.int64), q8_accumulate_ref(quantize_rows_ref(x)[0], q))


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_sparse_half_inputs_gelu_and_static(dtype):
    _, scale, pack, col_sum, b = sparse_layer(96, 160, 0.2)
    x = (torch.randn(11, 160) * 3).to(dtype)
    gpu = [t.cuda() for t in (*pack, col_sum, scale, b)]
    for args in ((2, None, 0), (1, 0.05, 100)):
        want = sparse_int8_linear_cpu(x.float(), *pack, col_sum, scale, b, *args).to(dtype)
        got = torch.ops.pycompress.sparse_int8_linear(x.cuda(), *gpu, *args).cpu()
        assert got.dtype == dtype and torch.equal(got.view(torch.int16), want.view(torch.int16))


@pytest.mark.cuda
def test_a_sparse_int8_model_moves_to_cuda_and_computes_the_same_bits():
    torch.manual_seed(2)
    model = torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.ReLU(), torch.nn.Linear(512, 64))
    pc.prune(model, sparsity=0.9)
    pc.convert(model, policy="sparse-int8")
    x = torch.randn(5, 256)
    want = model(x)
    model.to("cuda")
    assert torch.equal(bits(model(x.cuda()).cpu()), bits(want))


@pytest.mark.cuda
def test_a_corrupt_sparse_pack_is_refused_before_the_launch():
    _, scale, (row_ptr, blk_idx, values), col_sum, b = sparse_layer(32, 64)
    bad = blk_idx.clone()
    bad[0] = 1000  # block 1000 covers k = 4000.., far past K = 64
    gpu = [t.cuda() for t in (row_ptr, bad, values, col_sum, scale, b)]
    with pytest.raises(ValueError, match=r"sparse_int8_linear: corrupt sparse pack"):
        torch.ops.pycompress.sparse_int8_linear(torch.randn(2, 64, device="cuda"), *gpu, 0, None, 0)


@pytest.mark.cuda
@pytest.mark.parametrize("m,n,k", NM24_SHAPES + [(1, 4096, 4096), (16, 4096, 11008), (256, 1024, 1024)])
def test_cuda_nm24_kernel_equals_the_cpu_kernel_bit_for_bit(m, n, k):
    q, scale, packed, col_sum, b, _ = nm24_layer(n, k, seed=m)
    x = torch.randn(m, k) * 2
    want = int8_linear_cpu(x, packed, col_sum, scale, b)
    gpu = tuple(None if t is None else t.cuda() for t in (packed, col_sum, scale, b))
    got = _int8_linear_cuda(x.cuda(), *gpu, sparse24=True)  # the 2:4 kernel at every M
    assert gpu[0]._pycompress_nm24[1] is not None, "2:4 weights did not run the 2:4 kernel"
    assert torch.equal(bits(got.cpu()), bits(want))
    auto = torch.ops.pycompress.int8_linear(x.cuda(), *gpu, 0, None, 0, 8)  # the 2:4 kernel up to 16 rows
    assert torch.equal(bits(auto.cpu()), bits(want))
    dense = _int8_linear_cuda(x.cuda(), *gpu, sparse24=False)
    assert torch.equal(bits(dense.cpu()), bits(want))
    raw = _int8_linear_cuda(x.cuda(), *gpu, raw=True, sparse24=True).cpu()
    if m * n * k <= 2e8:
        assert torch.equal(raw.to(torch.int64), q8_accumulate_ref(quantize_rows_ref(x)[0], q))


def test_the_2_4_kernel_serves_decode_rows():
    assert _C.CUDA_NM24_MAX_ROWS == SMALL_ROWS


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_nm24_half_inputs_gelu_static_and_a_weight_edit(dtype):
    q, scale, packed, col_sum, b, _ = nm24_layer(96, 320, seed=4)
    x = (torch.randn(5, 320) * 2).to(dtype)
    gpu = [None if t is None else t.cuda() for t in (packed, col_sum, scale, b)]
    want = int8_linear_cpu(x.float(), packed, col_sum, scale, b, ACT["gelu"], 0.03, 100, 8).to(dtype)
    got = torch.ops.pycompress.int8_linear(x.cuda(), *gpu, ACT["gelu"], 0.03, 100, 8)
    assert got.dtype == dtype and torch.equal(got.cpu().view(torch.int16), want.view(torch.int16))
    # An in-place edit that breaks 2:4 is seen (the tensor's version): the dense kernel, the new bits.
    q[3, 0:4] = torch.tensor([5, 6, 7, 8], dtype=torch.int8)
    packed2, col_sum2 = pack_int8_weights(q)
    gpu[0].copy_(packed2)
    gpu[1].copy_(col_sum2)
    want = int8_linear_cpu(x.float(), packed2, col_sum2, scale, b, ACT["gelu"], 0.03, 100, 8).to(dtype)
    got = torch.ops.pycompress.int8_linear(x.cuda(), *gpu, ACT["gelu"], 0.03, 100, 8)
    assert gpu[0]._pycompress_nm24[1] is None
    assert torch.equal(got.cpu().view(torch.int16), want.view(torch.int16))


@pytest.mark.cuda
def test_nm24_under_cuda_graph_capture_before_and_after_a_warm_up_call():
    q, scale, packed, col_sum, b, _ = nm24_layer(64, 256, seed=8)
    x = torch.randn(3, 256)
    want = int8_linear_cpu(x, packed, col_sum, scale, b)
    for warm in (False, True):
        gpu = [t.cuda() for t in (packed, col_sum, scale, b)]
        xs = x.cuda()
        if warm:
            torch.ops.pycompress.int8_linear(xs, *gpu, 0, None, 0, 8)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = torch.ops.pycompress.int8_linear(xs, *gpu, 0, None, 0, 8)
        graph.replay()
        torch.cuda.synchronize()
        # Unwarmed, the capture keeps the dense kernel (no host sync while capturing); warmed, the 2:4 one.
        assert (getattr(gpu[0], "_pycompress_nm24", (None, None))[1] is not None) == warm
        assert torch.equal(bits(out.cpu()), bits(want))


@pytest.mark.cuda
def test_a_2_4_pruned_int8_model_on_cuda_runs_the_2_4_kernel_with_the_cpu_bits():
    torch.manual_seed(5)
    model = torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.ReLU(), torch.nn.Linear(512, 64))
    pc.prune(model, sparsity=0.5, method="nm")
    x = torch.randn(9, 256)
    pc.convert(model, x, policy="int8")
    want = model(x)
    model.cuda()
    assert torch.equal(bits(model(x.cuda()).cpu()), bits(want))
    layers = [m for m in model.modules() if isinstance(m, pc.nn.CompressedLayer)]
    assert layers and all(m.w_packed._pycompress_nm24[1] is not None for m in layers)


@pytest.mark.cuda
@pytest.mark.parametrize("policy", ["auto", "sparse-int8", "int4"])
def test_convert_of_a_cuda_model_gives_cuda_layers_with_the_cpu_bits(policy):
    torch.manual_seed(3)
    float_model = torch.nn.Sequential(torch.nn.Linear(128, 256), torch.nn.GELU(), torch.nn.Linear(256, 32))
    pc.prune(float_model, sparsity=0.9)
    x = torch.randn(7, 128)
    on_cpu = copy.deepcopy(float_model)
    pc.convert(on_cpu, policy="int8" if policy == "auto" else policy)
    model = float_model.cuda()
    pc.convert(model, x.cuda(), policy=policy)
    layers = [m for m in model.modules() if isinstance(m, pc.nn.CompressedLayer)]
    assert len(layers) == 2 and all(b.is_cuda for m in layers for b in m.buffers())
    assert torch.equal(bits(model(x.cuda()).cpu()), bits(on_cpu(x)))


@pytest.mark.cuda
def test_cuda_kernels_from_many_threads_and_under_torch_compile():
    """Server-style use: four Python threads calling one converted model on CUDA at once, and the model compiled;
    every output equals the serial call's bits."""
    from concurrent.futures import ThreadPoolExecutor

    torch.manual_seed(4)
    model = torch.nn.Sequential(torch.nn.Linear(96, 192), torch.nn.ReLU(), torch.nn.Linear(192, 24))
    pc.convert(model, policy="int8")
    model.cuda()
    inputs = [torch.randn(1 + i, 96, device="cuda") for i in range(16)]
    serial = [model(x).cpu() for x in inputs]
    with ThreadPoolExecutor(4) as pool:
        threaded = list(pool.map(lambda x: model(x).cpu(), inputs))
    assert all(torch.equal(bits(a), bits(b)) for a, b in zip(serial, threaded))
    compiled = torch.compile(model, fullgraph=True)
    assert all(torch.equal(bits(compiled(x).cpu()), bits(s)) for x, s in zip(inputs[:3], serial[:3]))


@pytest.mark.cuda
@pytest.mark.parametrize("act", ["none", "relu", "gelu"])
@pytest.mark.parametrize("m,n,k", [(1, 4096, 4096), (5, 130, 1000), (9, 64, 96), (40, 17, 5)])
def test_cuda_sparse_fp32_within_the_float32_bound_of_the_float64_reference(m, n, k, act):
    g = torch.Generator().manual_seed(m + n)
    w = torch.randn(n, k, generator=g) * (torch.rand(n, k, generator=g) < 0.1)
    b = torch.randn(n, generator=g)
    x = torch.randn(m, k, generator=g)
    pack = [t.cuda() for t in pack_csr(w)]
    got = torch.ops.pycompress.sparse_linear_csr(x.cuda(), *pack, b.cuda(), ACT[act]).cpu()
    assert torch.equal(bits(got), bits(sparse_f32_emulate(x, w, b, act)))  # the kernel's float order, exactly
    want = sparse_linear_ref(x, w, b, act)
    assert ((got.to(torch.float64) - want).abs() <= fp32_error_bound(x, w, b, act)).all()


@pytest.mark.cuda
@pytest.mark.parametrize("act", ["none", "gelu"])
@pytest.mark.parametrize("m,n,k", [(1, 4096, 4096), (5, 130, 1000), (9, 64, 96), (40, 17, 4), (3, 33, 36)])
def test_cuda_nm24_fp32_within_the_float32_bound_of_the_float64_reference(m, n, k, act):
    w = nm24_weight(n, k, seed=m + n)
    g = torch.Generator().manual_seed(m)
    b = torch.randn(n, generator=g)
    x = torch.randn(m, k, generator=g)
    values, nm_idx = pack_nm24(w)
    got = torch.ops.pycompress.sparse_linear_nm24(x.cuda(), nm_idx.cuda(), values.cuda(), b.cuda(), ACT[act])
    assert torch.equal(bits(got.cpu()), bits(sparse_f32_emulate(x, w, b, act, nm24=True)))
    want = sparse_linear_ref(x, w, b, act)
    assert ((got.cpu().to(torch.float64) - want).abs() <= fp32_error_bound(x, w, b, act)).all()


@pytest.mark.cuda
def test_an_op_without_a_cuda_kernel_says_which_ops_have_one():
    with pytest.raises(NotImplementedError, match=r"pycompress::sparse_int8_linear_sliced has no CUDA kernel yet "
                       r"\(these ops have one: int8_linear, int4_linear, sparse_linear_csr, sparse_linear_nm24, "
                       r"sparse_int8_linear, attention\)"):
        torch.ops.pycompress.sparse_int8_linear_sliced(*(torch.zeros(4, device="cuda") for _ in range(7)), None)


@pytest.mark.cuda
@pytest.mark.parametrize("m,n,k,group_size", Q4_SHAPES + [(1, 4096, 4096, 128), (16, 11008, 4096, 128),
                                                          (4, 4096, 11008, 64)])
def test_cuda_int4_kernel_equals_the_cpu_kernel_bit_for_bit(m, n, k, group_size):
    _, _, pack, groups, b = q4_layer(n, k, group_size, seed=m)
    x = torch.randn(m, k) * 2
    want = int4_linear_cpu(x, *pack, b, n, groups, ACT["gelu"])
    got = torch.ops.pycompress.int4_linear(x.cuda(), *(t.cuda() for t in pack), b.cuda(), n, groups, ACT["gelu"],
                                          None, 0, 8)
    assert torch.equal(bits(got.cpu()), bits(want))


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_a_4_bit_model_moves_to_cuda_with_the_cpu_bits(dtype):
    torch.manual_seed(7)
    model = torch.nn.Sequential(torch.nn.Linear(256, 128), torch.nn.GELU(), torch.nn.Linear(128, 64))
    x = torch.randn(5, 256)
    pc.convert(model, x, policy="int4")
    want = model(x)
    model.cuda()
    assert torch.equal(bits(model(x.cuda()).cpu()), bits(want))
    half = model(x.cuda().to(dtype))
    assert half.dtype == dtype and torch.isfinite(half).all()


@pytest.mark.cuda
@pytest.mark.parametrize("causal", [False, True])
def test_cuda_attention_agrees_with_the_cpu_kernel(causal):
    from pycompress.ops.attention import attention_cpu

    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(2, 12, 40, 32, generator=g) for _ in range(3))
    keep = torch.rand(2, 1, 40, 40, generator=g) > 0.3
    keep[1, 0, 7] = False  # a fully masked row: 0, as on the CPU
    got = torch.ops.pycompress.attention(q.cuda(), k.cuda(), v.cuda(), keep.cuda(), causal)
    want = attention_cpu(q, k, v, keep, causal)
    assert got.shape == want.shape and got.is_contiguous()
    assert torch.allclose(got.cpu(), want, atol=1e-5, rtol=1e-4) and torch.all(got[1, 7] == 0)


@pytest.mark.cuda
def test_a_2_4_float_sparse_model_moves_to_cuda():
    torch.manual_seed(6)
    model = torch.nn.Sequential(torch.nn.Linear(128, 64), torch.nn.ReLU(), torch.nn.Linear(64, 32))
    pc.prune(model, sparsity=0.5, method="nm")
    x = torch.randn(6, 128)
    pc.convert(model, x, policy="sparse-fp32")
    layers = [m for m in model.modules() if isinstance(m, pc.nn.CompressedLayer)]
    assert layers and all(m.format == "nm24" for m in layers)
    want = model(x).to(torch.float64)
    model.cuda()
    for dtype in (torch.float32, torch.float16):
        got = model(x.cuda().to(dtype))
        assert got.dtype == dtype
        assert torch.allclose(got.cpu().to(torch.float64), want, rtol=1e-2 if dtype == torch.float16 else 1e-5,
                              atol=1e-2 if dtype == torch.float16 else 1e-5)


@pytest.mark.cuda
@pytest.mark.parametrize("m", [1, 9])
def test_cuda_sparse_kernels_on_skewed_channels(m):
    """Channels of 0 to K nonzeros, taken in row-swizzle order: the int8 kernel equals the CPU bit for bit, the
    float one stays within the float32 bound."""
    n, k = 300, 512
    w = skewed_sparse_weight(n, k, seed=m)
    x = torch.randn(m, k) * 2
    b = torch.randn(n)
    csr = pack_csr(w)
    assert row_order(csr[0]).tolist() != list(range(n))  # the swizzle reorders these channels
    got = torch.ops.pycompress.sparse_linear_csr(x.cuda(), *[t.cuda() for t in csr], b.cuda(), 2).cpu()
    want = sparse_linear_ref(x, w, b, "gelu")
    assert ((got.to(torch.float64) - want).abs() <= fp32_error_bound(x, w, b, "gelu")).all()
    q, scale = quantize_weight_per_channel(w)
    pack = pack_bsr1x4(q)
    col_sum = pack[3]
    cpu = sparse_int8_linear_cpu(x, *pack[:3], col_sum, scale, b, 2)
    gpu = torch.ops.pycompress.sparse_int8_linear(x.cuda(), *[t.cuda() for t in (*pack[:3], col_sum, scale, b)], 2,
                                                  None, 0).cpu()
    assert torch.equal(bits(gpu), bits(cpu))


@pytest.mark.cuda
def test_a_sparse_fp32_model_moves_to_cuda_and_stays_within_the_bound():
    torch.manual_seed(5)
    model = torch.nn.Sequential(torch.nn.Linear(256, 128))
    pc.prune(model, sparsity=0.9)
    pc.convert(model, policy="sparse-fp32")
    x = torch.randn(6, 256)
    want = model(x)
    model.to("cuda")
    got = model(x.cuda()).cpu()
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-5)
