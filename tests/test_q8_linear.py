"""The int8 linear kernel against its exact reference, on every ISA path."""

from __future__ import annotations

import threading
import warnings

import pytest
import torch

import pycompress as pc
from pycompress import _C
from pycompress.ops.q8 import int8_conv2d_nhwc_cpu
from pycompress.ops.shared_input import int8_linear_shared_input_cpu
from pycompress.reference.q8 import (
    KGROUP,
    MAX_K,
    PANEL,
    gelu_exact,
    gelu_spec,
    int8_linear_ref,
    pack_int8_weights,
    q8_accumulate_ref,
    quantize_rows_ref,
    quantize_weight_per_channel,
    unpack_int8_weights,
)

# Sizes around the tiles: panels of 16 columns, driver tiles of 64, k-groups of 4,
# vector widths of 8/16 floats, AVX-512 microkernel rows of 6 and AVX2 rows of 2.
K_SIZES = [1, 3, 4, 5, 15, 16, 17, 63, 64, 65, 129, 768]
N_SIZES = [1, 7, 15, 16, 17, 63, 64, 65, 130]
M_SIZES = [1, 2, 5, 6, 7, 13, 200]


def _round_up(v, m):
    return (v + m - 1) // m * m


def native_quantize(x: torch.Tensor, static=None, act_bits=8):
    m, k = x.shape
    kp = _round_up(k, KGROUP)
    q = torch.empty(m, kp, dtype=torch.uint8)
    scale = torch.empty(m, dtype=torch.float32)
    zp = torch.empty(m, dtype=torch.int32)
    nonfinite = torch.empty(m, dtype=torch.uint8)
    _C.q8_quantize_rows(x.data_ptr(), m, k, x.stride(0), q.data_ptr(), scale.data_ptr(), zp.data_ptr(),
                        nonfinite.data_ptr(), static is not None, static[0] if static else 1.0,
                        static[1] if static else 0, act_bits)
    return q, scale, zp, nonfinite.bool()


def native_gemm_raw(q: torch.Tensor, w: torch.Tensor, threads: int = 2, u7: bool = False):
    m, kp = q.shape
    n = w.shape[0]
    packed, _ = pack_int8_weights(w)
    out = torch.empty(m, n, dtype=torch.int32)
    _C.q8_gemm_raw(q.data_ptr(), m, kp, packed.data_ptr(), n, out.data_ptr(), threads, u7)
    return out


def make_linear(k, n, gen, bias=True):
    lin = torch.nn.Linear(k, n, bias=bias)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(n, k, generator=gen) / k**0.5)
        if bias:
            lin.bias.copy_(torch.randn(n, generator=gen))
    return lin


def test_pack_round_trip(gen):
    for n, k in [(1, 1), (17, 5), (64, 64), (65, 130)]:
        w = torch.randint(-128, 128, (n, k), dtype=torch.int8, generator=gen)
        packed, col_sum = pack_int8_weights(w)
        assert packed.numel() == _round_up(n, PANEL) * _round_up(k, KGROUP)
        assert torch.equal(unpack_int8_weights(packed, n, k), w)
        assert torch.equal(col_sum[:n], w.sum(1, dtype=torch.int32))
        assert not col_sum[n:].any()


# Around the quantize loops' steps too: 32 floats per AVX2 step, 64 per AVX-512 step.
QUANTIZE_K_SIZES = sorted(set(K_SIZES + [31, 32, 33, 95, 96, 97, 127, 128, 191, 192, 193]))


@pytest.mark.parametrize("act_bits", [8, 7])
@pytest.mark.parametrize("k", QUANTIZE_K_SIZES)
def test_quantize_rows_bit_exact(isa, k, act_bits, gen):
    x = torch.randn(7, k, generator=gen) * torch.logspace(-3, 3, 7)[:, None]
    x[1] = 0.0                      # all-zero row: scale clamps to FLT_MIN, zp 0
    x[2] = x[2].abs() + 1.0         # positive-only row: zp 0
    x[3] = -x[3].abs() - 1.0        # negative-only row: zp qmax
    x[4] = 3.25                     # constant row
    qmax = 2 ** act_bits - 1
    for static in (None, (0.05, qmax // 2 + 1), (1e-3, 0), (7.0, qmax)):
        q, scale, zp, nonfinite = native_quantize(x, static, act_bits)
        rq, rscale, rzp, rnonfinite = quantize_rows_ref(x, static, act_bits)
        assert int(rq.max()) <= qmax and int(rzp[3]) == (qmax if static is None else static[1])
        assert torch.equal(q[:, :k], rq), (isa, k, static)
        assert not q[:, k:].any()
        assert torch.equal(scale, rscale) and torch.equal(zp, rzp)
        assert not nonfinite.any() and not rnonfinite.any()


def test_quantize_rows_flags_a_nonfinite_value_anywhere_in_the_row(isa, gen):
    # One row per position: each lane of each independent range chain and the tails.
    k = 203
    positions = [0, 1, 7, 8, 15, 16, 31, 32, 47, 48, 63, 64, 100, 127, 128, 191, 192, 199, 202]
    for bad in (float("nan"), float("inf"), -float("inf")):
        x = torch.randn(len(positions) + 1, k, generator=gen)
        for row, pos in enumerate(positions):
            x[row, pos] = bad
        q, scale, zp, nonfinite = native_quantize(x, None)
        assert nonfinite[:-1].all() and not nonfinite[-1], (isa, bad)
        assert not q[:-1].any()                       # non-finite rows quantize to zeros
        rq, _, _, _ = quantize_rows_ref(x[-1:], None)
        assert torch.equal(q[-1:, :k], rq)


@pytest.mark.parametrize("n", N_SIZES)
@pytest.mark.parametrize("k", [1, 4, 5, 64, 67, 300])
def test_gemm_accumulators_bit_exact(isa, n, k, gen):
    kp = _round_up(k, KGROUP)
    # Every row remainder of the 6-row microkernels (and the 5-row groups of the AVX-512 one), 1 and 2 rows
    # taking several panels at once on AVX-VNNI.
    for m in (1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 13):
        q = torch.zeros(m, kp, dtype=torch.uint8)
        q[:, :k] = torch.randint(0, 256, (m, k), dtype=torch.uint8, generator=gen)
        w = torch.randint(-128, 128, (n, k), dtype=torch.int8, generator=gen)
        assert torch.equal(native_gemm_raw(q, w), q8_accumulate_ref(q[:, :k], w).to(torch.int32))


def _assert_raw_bit_exact_on_1_and_2_threads(m, k, n, gen):
    kp = _round_up(k, KGROUP)
    q = torch.zeros(m, kp, dtype=torch.uint8)
    q[:, :k] = torch.randint(0, 256, (m, k), dtype=torch.uint8, generator=gen)
    w = torch.randint(-128, 128, (n, k), dtype=torch.int8, generator=gen)
    ref = q8_accumulate_ref(q[:, :k], w).to(torch.int32)
    for threads in (1, 2):
        assert torch.equal(native_gemm_raw(q, w, threads=threads), ref), (m, k, n, threads)


@pytest.mark.parametrize("m", [13, 20, 25, 27, 31, 128, 129])
def test_gemm_row_groups_bit_exact(isa, m, gen):
    # Enough columns (5 tiles of 64) that one tile holds all m rows: rows go to the microkernel 6 at a
    # time, with a remainder of 1-3 rows taken as groups of 5 where m allows (20 = 4 x 5, 31 = 6 + 5 x 5,
    # 128 = 18 x 6 + 4 x 5) and left as a short group where it does not (13 = 6 + 6 + 1).
    _assert_raw_bit_exact_on_1_and_2_threads(m, 67, 5 * 64 - 3, gen)


@pytest.mark.parametrize("m", [7, 13, 20])
def test_gemm_k_blocks_bit_exact(isa, m, gen):
    # The AVX-512 kernel takes a tile of several row blocks 64 k groups (256 k) at a time through all its row
    # blocks, their partial sums parked between blocks: K at one block (256, not blocked), one past it, two
    # whole blocks and a ragged last one; an odd panel count.
    for k in (256, 257, 512, 1000):
        _assert_raw_bit_exact_on_1_and_2_threads(m, k, 130, gen)


@pytest.mark.parametrize("m", [8, 15, 16, 17, 31, 32, 33, 47, 48, 65, 200, 400])
def test_gemm_amx_tile_edges_bit_exact(isa, m, gen):
    # The AMX kernel's tiles: 16 rows x 64 k, in blocks of 2 x 2 tiles (32 rows x 2 panels); rows, k and
    # columns at, below and above each, a k tail (zero-padded weight copy), an odd panel, rows past m in
    # the packed 16-row blocks, tiles starting at multiples of 16 rows, 1 and 2 threads. The other levels
    # run the same shapes through their own row groups.
    for k, n in ((4, 16), (60, 17), (64, 32), (68, 33), (128, 48), (132, 65), (1000, 130)):
        _assert_raw_bit_exact_on_1_and_2_threads(m, k, n, gen)


@pytest.mark.parametrize("n", N_SIZES)
@pytest.mark.parametrize("k", [1, 4, 5, 64, 67, 300])
def test_u7_gemm_accumulators_bit_exact(isa, n, k, gen):
    # The u7 kernel (AVX2's vpmaddubsw; every other path runs its u8 kernel) on u7 rows: every row
    # remainder of its 4-row blocks, 1 and 2 rows taking several panels at once.
    kp = _round_up(k, KGROUP)
    for m in (1, 2, 3, 4, 5, 6, 7, 8, 9, 13):
        q = torch.zeros(m, kp, dtype=torch.uint8)
        q[:, :k] = torch.randint(0, 128, (m, k), dtype=torch.uint8, generator=gen)
        w = torch.randint(-128, 128, (n, k), dtype=torch.int8, generator=gen)
        assert torch.equal(native_gemm_raw(q, w, u7=True), q8_accumulate_ref(q[:, :k], w).to(torch.int32)), m


@pytest.mark.parametrize("activation", ["none", "gelu"])
@pytest.mark.parametrize("static", [None, (0.02, 65)])
def test_u7_int8_linear_bit_exact(isa, activation, static, gen):
    """act_bits=7 through the op, the shared-input entry and the conv entry, against the reference."""
    act = {"none": 0, "gelu": 2}[activation]
    for k, n, m in [(5, 7, 1), (17, 65, 13), (64, 16, 6), (129, 130, 7), (768, 63, 200)]:
        lin = make_linear(k, n, gen)
        q, scale = quantize_weight_per_channel(lin.weight)
        packed, col_sum = pack_int8_weights(q)
        bias = lin.bias.detach()
        x = torch.randn(m, k, generator=gen)
        ref = int8_linear_ref(x, q, scale, bias, activation, static, act_bits=7)
        args = (packed, col_sum, scale, bias, act, static and static[0], static[1] if static else 0)
        assert torch.equal(torch.ops.pycompress.int8_linear(x, *args, 7), ref), (isa, k, n, m)
        # u7 differs from u8 (a coarser grid): the flag reaches the kernel.
        assert not torch.equal(ref, int8_linear_ref(x, q, scale, bias, activation, static)), (k, n, m)
        shared = int8_linear_shared_input_cpu(x, [(packed, col_sum, scale, bias, act)] * 2,
                                              static and static[0], static[1] if static else 0, act_bits=7)
        assert all(torch.equal(y, ref) for y in shared)
    conv = torch.nn.Conv2d(6, 20, 3, padding=1)
    xc = torch.randn(2, 6, 9, 9, generator=gen)
    q, scale = quantize_weight_per_channel(conv.weight.detach().permute(0, 2, 3, 1).reshape(20, -1))
    packed, col_sum = pack_int8_weights(q)
    nhwc = xc.permute(0, 2, 3, 1).contiguous()
    y = int8_conv2d_nhwc_cpu(nhwc, (3, 3, 1, 1, 1, 1, 1, 1), packed, col_sum, scale, conv.bias.detach(), act,
                             static and static[0], static[1] if static else 0, act_bits=7)
    cols = torch.nn.functional.unfold(xc, 3, padding=1)  # [B, C*9, L] in (c, i, j) order
    cols = cols.view(2, 6, 9, -1).permute(0, 3, 2, 1).reshape(2 * 81, 54)  # (i, j, c) order
    assert torch.equal(y, int8_linear_ref(cols, q, scale, conv.bias.detach(), activation, static, act_bits=7))


def test_act_bits_are_validated(gen):
    lin = make_linear(8, 4, gen)
    q, scale = quantize_weight_per_channel(lin.weight)
    packed, col_sum = pack_int8_weights(q)
    x = torch.randn(2, 8, generator=gen)
    with pytest.raises(ValueError, match=r"activation bits 6 not in \(7, 8\)"):
        torch.ops.pycompress.int8_linear(x, packed, col_sum, scale, None, 0, None, 0, 6)
    with pytest.raises(ValueError, match=r"zero point 128 in \[0, 127\]"):
        torch.ops.pycompress.int8_linear(x, packed, col_sum, scale, None, 0, 0.1, 128, 7)
    with pytest.raises(ValueError, match="activation bits must be 7 or 8, got 6"):
        native_quantize(x, None, 6)
    with pytest.raises(ValueError, match=r"zero point in \[0, 127\]"):
        native_quantize(x, (0.1, 128), 7)


def test_gemm_raw_refuses_unpadded_rows():
    with pytest.raises(ValueError, match="multiple of 4"):
        native_gemm_raw(torch.zeros(1, 6, dtype=torch.uint8), torch.zeros(16, 6, dtype=torch.int8))


@pytest.mark.parametrize("u7", [False, True])
def test_gemm_extremes_never_saturate(isa, u7):
    # u8 rows (u7=False): the pairs AVX2's vpmaddubsw would saturate, 255*127 + 255*127 > 32767, and the most
    # negative sum, 255*(-128) in every term. u7 rows on the u7 kernel: the largest pair sums vpmaddubsw forms
    # there, 127*127*2 and 127*(-128)*2 = -32512. Up to the K limit.
    a = 127 if u7 else 255
    for k, m in ((2, 3), (64, 3), (4096, 3), (MAX_K, 3), (MAX_K, 17)):  # 17 rows: the AMX tiles too
        n = 16
        q = torch.zeros(m, _round_up(k, KGROUP), dtype=torch.uint8)
        q[:, :k] = a
        w = torch.empty(n, k, dtype=torch.int8)
        w[: n // 2] = 127
        w[n // 2:] = -128
        out = native_gemm_raw(q, w, threads=1, u7=u7)
        assert (out[:, : n // 2] == a * 127 * k).all()
        assert (out[:, n // 2:] == -a * 128 * k).all()


@pytest.mark.parametrize("activation", ["none", "relu", "gelu"])
@pytest.mark.parametrize("static", [None, (0.02, 131)])
def test_int8_linear_bit_exact(isa, activation, static, gen):
    for k, n, m in [(5, 7, 1), (17, 65, 13), (64, 16, 6), (129, 130, 7), (768, 63, 200)]:
        for bias in (True, False):
            lin = make_linear(k, n, gen, bias)
            mod = pc.nn.Int8Linear.from_float(lin, activation=activation,
                                              act_scale=static and static[0],
                                              act_zero_point=static[1] if static else 0)
            x = torch.randn(m, k, generator=gen)
            q, scale = quantize_weight_per_channel(lin.weight)
            ref = int8_linear_ref(x, q, scale, lin.bias.detach() if bias else None, activation, static)
            assert torch.equal(mod(x), ref), (isa, k, n, m, bias)


def test_fused_activations_bit_exact_over_the_whole_gelu_table(isa, gen):
    # Pre-activations spread over [-9, 9] by the bias reach every interval of the GELU
    # table (and its saturated end), not only the |x| < 4 that random layers produce.
    lin = make_linear(48, 160, gen)
    with torch.no_grad():
        lin.bias.copy_(torch.linspace(-9, 9, 160))
    x = torch.randn(7, 48, generator=gen) * 0.5
    x[3, 5] = float("nan")
    q, scale = quantize_weight_per_channel(lin.weight)
    for activation in ("gelu", "relu"):
        mod = pc.nn.Int8Linear.from_float(lin, activation=activation)
        ref = int8_linear_ref(x, q, scale, lin.bias.detach(), activation)
        assert torch.equal(mod(x).view(torch.int32), ref.view(torch.int32)), activation


def test_gelu_approximation_accuracy():
    v = torch.linspace(-12, 12, 200001, dtype=torch.float32)
    exact = gelu_exact(v)
    err = (gelu_spec(v).double() - exact).abs()
    # GELU = x * Phi. bench/gelu_coefficients.py derives the error of Phi: the piecewise fit of
    # E(u) = Phi(-u) (and its saturation at |x| >= 5.78) is off by at most 7.8e-9 (allow 1e-8);
    # Higham's running bound puts the float32 Horner rounding below 0.35 eps and 1 - E adds
    # eps/2, so |Phi error| <= 1e-8 + 0.85 eps; the final product x * phi adds eps/2 |GELU|
    # and eps/2 of the Phi error (0.85 eps (1 + eps/2) < eps).
    eps = torch.finfo(torch.float32).eps
    bound = (1e-8 + eps) * v.double().abs() + eps / 2 * exact.abs() + 1e-30
    assert (err <= bound).all(), float((err - bound).max())
    # Negative x, where GELU(x) = x * E(|x|) is tiny, keeps relative accuracy down to x = -5.5
    # (E = 1.9e-8): relative fit error <= 7.6e-5, Horner rounding <= 3.8e-6, the product eps/2.
    tail = (v < 0) & (v > -5.5)
    assert (err[tail] <= 1e-4 * exact[tail].abs()).all(), float((err[tail] / exact[tail].abs()).max())


def test_leading_batch_dims_and_noncontiguous_inputs(isa, gen):
    lin = make_linear(40, 33, gen)
    mod = pc.nn.Int8Linear.from_float(lin)
    q, scale = quantize_weight_per_channel(lin.weight)
    ref = lambda x: int8_linear_ref(x.contiguous(), q, scale, lin.bias.detach())  # noqa: E731
    wide = torch.randn(9, 100, generator=gen)
    cases = {
        "3-D": torch.randn(2, 5, 40, generator=gen),
        "strided rows": wide[:, 10:50],
        "transposed": torch.randn(40, 9, generator=gen).t(),
        "every other column": torch.randn(9, 80, generator=gen)[:, ::2],
        "expanded": torch.randn(1, 40, generator=gen).expand(4, 40),
        "4-D permuted": torch.randn(3, 40, 2, 2, generator=gen).permute(0, 2, 3, 1),
    }
    for name, x in cases.items():
        assert torch.equal(mod(x), ref(x)), name


@pytest.mark.parametrize("shape", [(0, 40), (0, 3, 40), (2, 0, 40)])
def test_empty_batch(isa, shape, gen):
    mod = pc.nn.Int8Linear.from_float(make_linear(40, 12, gen))
    y = mod(torch.randn(*shape))
    assert y.shape == (*shape[:-1], 12)


def test_nonfinite_rows_become_nan_and_spare_the_others(isa, gen):
    lin = make_linear(70, 20, gen)
    mod = pc.nn.Int8Linear.from_float(lin)
    x = torch.randn(6, 70, generator=gen)
    x[1, 3] = float("nan")
    x[3, 69] = float("inf")
    x[4, 0] = -float("inf")
    y = mod(x)
    bad = torch.tensor([False, True, False, True, True, False])
    assert torch.isnan(y[bad]).all()
    q, scale = quantize_weight_per_channel(lin.weight)
    assert torch.equal(y[~bad], int8_linear_ref(x[~bad], q, scale, lin.bias.detach()))


def test_huge_but_finite_activations_are_not_corrupted(isa, gen):
    mod = pc.nn.Int8Linear.from_float(make_linear(16, 16, gen), act_scale=1e-3, act_zero_point=128)
    x = torch.tensor([[3e38, -3e38] + [1.0] * 14])
    y = mod(x)
    q, scale = quantize_weight_per_channel(torch.nn.Linear(16, 16).weight)
    assert torch.isfinite(y).all()
    # Dynamic mode: the row range overflows float32 and is reported as non-finite.
    dyn = pc.nn.Int8Linear.from_float(make_linear(16, 16, gen))
    assert torch.isnan(dyn(x)).all()
    del q, scale


def test_wrong_inputs_get_clear_errors(gen):
    mod = pc.nn.Int8Linear.from_float(make_linear(768, 64, gen), name="encoder.fc1")
    with pytest.raises(ValueError, match=r"Int8Linear\(encoder.fc1\): input has shape \(2, 512\), expected \(\.\.\., 768\)"):
        mod(torch.randn(2, 512))
    # float16 / bfloat16 inputs run in float32 (tests/test_formats.py: the output rounded once); others are refused.
    for dtype in (torch.float64, torch.int32, torch.int8):
        with pytest.raises(TypeError, match=f"Int8Linear\\(encoder.fc1\\): input dtype {dtype}, expected torch.float32"):
            mod(torch.zeros(2, 768, dtype=dtype))


def test_op_validates_every_operand(gen):
    mod = pc.nn.Int8Linear.from_float(make_linear(20, 17, gen))
    x = torch.randn(3, 20)
    good = dict(w_packed=mod.w_packed, col_sum=mod.col_sum, w_scale=mod.w_scale, bias=mod.bias)
    bad_cases = {
        "packed weight must be 1-D int8 of": dict(w_packed=mod.w_packed[:-1]),
        "col_sum must be 1-D int32": dict(col_sum=mod.col_sum.long()),
        "bias must be 1-D float32 of 17": dict(bias=torch.zeros(16)),
        "w_scale must be 1-D float32": dict(w_scale=mod.w_scale.double()),
    }
    for message, change in bad_cases.items():
        args = {**good, **change}
        with pytest.raises(ValueError, match=message):
            torch.ops.pycompress.int8_linear(x, args["w_packed"], args["col_sum"], args["w_scale"], args["bias"])
    with pytest.raises(ValueError, match="activation code 5"):
        torch.ops.pycompress.int8_linear(x, *good.values(), 5)
    with pytest.raises(ValueError, match="static scale"):
        torch.ops.pycompress.int8_linear(x, *good.values(), 0, -1.0, 0)
    with pytest.raises(ValueError, match="zero point 300"):
        torch.ops.pycompress.int8_linear(x, *good.values(), 0, 0.1, 300)


def test_k_beyond_int32_safe_limit_is_refused():
    with pytest.raises(ValueError, match="in_features=65537 must be in \\[1, 65536\\]"):
        pc.nn.Int8Linear(MAX_K + 1, 4)
    x = torch.zeros(1, MAX_K + 1)
    with pytest.raises(ValueError, match="K=65537 features is outside"):
        torch.ops.pycompress.int8_linear(x, torch.zeros(1, dtype=torch.int8), torch.zeros(16, dtype=torch.int32),
                                         torch.ones(4), None)


def test_nan_weights_are_refused():
    lin = torch.nn.Linear(8, 4)
    with torch.no_grad():
        lin.weight[1, 2] = float("nan")
    with pytest.raises(ValueError, match="weight has NaN or Inf"):
        pc.nn.Int8Linear.from_float(lin, name="fc")


def test_low_bit_weights_run_on_the_same_kernel(isa, gen):
    lin = make_linear(50, 20, gen)
    for bits in (4, 2):
        mod = pc.nn.Int8Linear.from_float(lin, weight_bits=bits)
        q, scale = quantize_weight_per_channel(lin.weight, bits=bits)
        assert q.abs().max() <= 2 ** (bits - 1) - 1
        x = torch.randn(5, 50, generator=gen)
        assert torch.equal(mod(x), int8_linear_ref(x, q, scale, lin.bias.detach()))


def _relative_l2(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


def test_quantization_error_no_worse_than_pytorch_dynamic_int8(gen):
    # PyTorch's own dynamic int8 Linear is the yardstick (per-tensor uint8 activations,
    # reduce_range on x86); ours quantizes per row with the full 8 bits.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from torch.ao.quantization import quantize_dynamic
    for k, n, m in [(768, 768, 32), (768, 3072, 16), (3072, 768, 8)]:
        lin = make_linear(k, n, gen)
        x = torch.randn(m, k, generator=gen) * torch.linspace(0.1, 3, m)[:, None]
        with torch.no_grad():
            ref = lin(x)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                torch_q = quantize_dynamic(torch.nn.Sequential(lin), {torch.nn.Linear}, dtype=torch.qint8)(x)
        ours = pc.nn.Int8Linear.from_float(lin)(x)
        assert _relative_l2(ours, ref) <= _relative_l2(torch_q, ref), (k, n, m)


def test_results_do_not_depend_on_thread_count(gen):
    mod = pc.nn.Int8Linear.from_float(make_linear(300, 500, gen))
    x = torch.randn(97, 300, generator=gen)
    outs = []
    for threads in (1, 2, 3):
        pc.set_num_threads(threads)
        try:
            outs.append(mod(x))
        finally:
            pc.set_num_threads(None)
    assert all(torch.equal(outs[0], o) for o in outs[1:])


def test_many_python_threads_match_serial(isa, gen):
    mod = pc.nn.Int8Linear.from_float(make_linear(256, 200, gen), activation="gelu")
    inputs = [torch.randn(1 + 7 * i, 256, generator=gen) for i in range(8)]
    serial = [mod(x) for x in inputs]
    results: list = [None] * len(inputs)

    def worker(i):
        for _ in range(20):
            results[i] = mod(inputs[i])

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(inputs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads)
    assert all(torch.equal(a, b) for a, b in zip(serial, results))


def test_state_dict_round_trip(gen):
    src = pc.nn.Int8Linear.from_float(make_linear(33, 21, gen), activation="relu")
    dst = pc.nn.Int8Linear(33, 21, activation="relu")
    dst.load_state_dict(src.state_dict())
    x = torch.randn(4, 33, generator=gen)
    assert torch.equal(src(x), dst(x))
    # Same padded buffer sizes (K 33 and 34 both pad to 36): the configuration catches it.
    with pytest.raises(ValueError, match="state_dict has in_features=33, this module expects 34"):
        pc.nn.Int8Linear(34, 21).load_state_dict(src.state_dict())
    with pytest.raises(ValueError, match="state_dict has in_features=33, this module expects 40"):
        pc.nn.Int8Linear(40, 21).load_state_dict(src.state_dict())
    # The activation settings travel with the state.
    plain = pc.nn.Int8Linear(33, 21)
    plain.load_state_dict(src.state_dict())
    assert plain.activation == "relu" and torch.equal(plain(x), src(x))


def test_tall_inputs_run_in_passes_bit_exact(isa, gen):
    # Rows are quantized and multiplied in passes of ~2 MiB of uint8 activations (csrc/q8/q8_linear.cpp):
    # 3000 x 1000 is two passes; non-finite rows in both keep NaN outputs in their own rows only.
    lin = make_linear(1000, 40, gen)
    q, scale = quantize_weight_per_channel(lin.weight)
    x = torch.randn(3000, 1000, generator=gen)
    x[5, 7] = float("nan")
    x[2900, 0] = float("inf")
    bad = torch.zeros(3000, dtype=torch.bool)
    bad[[5, 2900]] = True
    for static in (None, (0.02, 131)):
        mod = pc.nn.Int8Linear.from_float(lin, act_scale=static and static[0],
                                          act_zero_point=static[1] if static else 0)
        y = mod(x)
        ref = int8_linear_ref(x[~bad], q, scale, lin.bias.detach(), "none", static)
        assert torch.equal(y[~bad], ref), static
        if static is None:
            assert torch.isnan(y[bad]).all()


def test_module_follows_every_change_to_its_buffers_and_settings(gen):
    # The eager call binds the layer's operands once (a native plan); any later change must be
    # seen on the next call, and a bad replacement refused, never read out of bounds.
    lin = make_linear(40, 24, gen)
    mod = pc.nn.Int8Linear.from_float(lin)
    x = torch.randn(5, 40, generator=gen)
    q, scale = quantize_weight_per_channel(lin.weight)
    bias = lin.bias.detach()
    assert torch.equal(mod(x), int8_linear_ref(x, q, scale, bias))
    mod.w_scale.mul_(2)  # in place: same storage
    assert torch.equal(mod(x), int8_linear_ref(x, q, scale * 2, bias))
    mod.w_scale = scale.clone()  # a replaced buffer
    assert torch.equal(mod(x), int8_linear_ref(x, q, scale, bias))
    mod.bias = torch.zeros(24)
    assert torch.equal(mod(x), int8_linear_ref(x, q, scale, torch.zeros(24)))
    mod.bias = bias.clone()
    mod.set_activation("relu")
    assert torch.equal(mod(x), int8_linear_ref(x, q, scale, bias, "relu"))
    mod.set_activation("none")
    mod.act_scale, mod.act_zero_point = 0.02, 131
    assert torch.equal(mod(x), int8_linear_ref(x, q, scale, bias, "none", (0.02, 131)))
    mod.act_scale, mod.act_zero_point = None, 0
    mod.share_memory()  # every storage moves to shared memory
    assert torch.equal(mod(x), int8_linear_ref(x, q, scale, bias))
    for copy in (copy_module(mod, "deepcopy"), copy_module(mod, "pickle")):
        assert torch.equal(copy(x), int8_linear_ref(x, q, scale, bias))
    other = make_linear(40, 24, gen)
    mod.load_state_dict(pc.nn.Int8Linear.from_float(other).state_dict())
    q2, scale2 = quantize_weight_per_channel(other.weight)
    assert torch.equal(mod(x), int8_linear_ref(x, q2, scale2, other.bias.detach()))
    mod.w_scale = torch.ones(23)
    with pytest.raises(ValueError, match="w_scale must be 1-D float32"):
        mod(x)
    mod.w_scale = scale2.clone()
    mod.w_packed = mod.w_packed[:-4]
    with pytest.raises(ValueError, match="packed weight must be 1-D int8"):
        mod(x)


def copy_module(mod, how):
    import copy
    import io
    import pickle

    if how == "deepcopy":
        return copy.deepcopy(mod)
    buf = io.BytesIO()
    pickle.dump(mod, buf)
    return pickle.loads(buf.getvalue())


def test_extra_repr_is_informative(gen):
    text = repr(pc.nn.Int8Linear.from_float(make_linear(64, 32, gen), activation="gelu"))
    for part in ("in_features=64", "out_features=32", "int8 per-channel", "dynamic per-row", "gelu", "bytes="):
        assert part in text
