"""The bsr1x4 panel layout (K tiling of the int8 cols kernel, csrc/sparse/sparse.h): the C++ builder against the
plain-Python specification, the panel kernel bit-exact against the exact integer reference and the other int8
kernels on every ISA path (the layout runs on AVX-512; other paths ignore it), and corrupt layouts refused."""

from __future__ import annotations

import pytest
import torch

from pycompress import _C
from pycompress._native import isa_at_least
from pycompress.nn import Int8Linear, SparseInt8Linear
from pycompress.ops.sparse import build_bsr1x4_panels, sparse_int8_linear_cpu, sparse_q8_accumulate_raw
from pycompress.reference import (
    int8_linear_ref,
    pack_bsr1x4,
    q8_accumulate_ref,
    quantize_weight_per_channel,
    unpack_bsr1x4,
)
from pycompress.reference.sparse import bsr1x4_panels_ref

P = _C.SPARSE_PANEL_COLS  # in k/4 groups: 4 * P features per panel
ROWS_PER_BLOCK = _C.SPARSE_PANEL_ROWS
# Around the panel width (in features: 4 groups each), a K that is not a multiple of 4, one short panel.
PANEL_KS = (1, 6, 4 * (P // 4) + 2, 4 * P - 1, 4 * P, 4 * P + 1, 8 * P + 13)
# Around the 16-row vectors, the 32-row blocks of x^T, and the 4-row limit of the gather kernel.
PANEL_MS = (0, 3, 4, 15, 16, 17, 31, 32, 33, 48, 70)


def int8_weight(n, k, gen, density=0.15):
    """Random int8 sparsity plus rows that stress the layout: all-zero rows, a dense row, a row whose blocks sit
    in the last group only, and (when K spans two panels) an empty panel for every row."""
    w = torch.randint(-127, 128, (n, k), generator=gen, dtype=torch.int8)
    w = w * (torch.rand(n, k, generator=gen) < density).to(torch.int8)
    if k > 4 * P:
        w[:, 4 * P:min(k, 8 * P)] = 0
    if n > 2:
        w[0] = 0
        w[1] = torch.randint(1, 127, (k,), generator=gen, dtype=torch.int8)
        w[2] = 0
        w[2, k - 1] = -128
    return w


def linear_from(weight_int8, gen):
    n, k = weight_int8.shape
    lin = torch.nn.Linear(k, n)
    with torch.no_grad():
        lin.weight.copy_(weight_int8.to(torch.float32) * 0.01)
        lin.bias.copy_(torch.randn(n, generator=gen))
    return lin


def quantized_rows(m, k, gen):
    kp = (k + 3) // 4 * 4
    q = torch.zeros(m, kp, dtype=torch.uint8)
    q[:, :k] = torch.randint(0, 256, (m, k), generator=gen, dtype=torch.uint8)
    return q


@pytest.mark.parametrize("k", PANEL_KS)
@pytest.mark.parametrize("n", (1, 5, ROWS_PER_BLOCK + 3))
def test_builder_matches_the_specification(n, k, gen):
    row_ptr, blk_idx, values, _ = pack_bsr1x4(int8_weight(n, k, gen))
    built = build_bsr1x4_panels(row_ptr, blk_idx, values, k)
    spec = bsr1x4_panels_ref(row_ptr, blk_idx, values, k, ROWS_PER_BLOCK, P)
    for got, want in zip(built, spec):
        assert got.dtype == want.dtype and torch.equal(got, want)


@pytest.mark.parametrize("k", (6, 4 * P, 4 * P + 1, 8 * P + 13))
def test_panel_accumulators_bit_exact(isa, k, gen):
    n = ROWS_PER_BLOCK + 3  # two channel blocks, the second one short
    w = int8_weight(n, k, gen)
    row_ptr, blk_idx, values, _ = pack_bsr1x4(w)
    panels = build_bsr1x4_panels(row_ptr, blk_idx, values, k)
    for m in PANEL_MS:
        q = quantized_rows(m, k, gen)
        got = sparse_q8_accumulate_raw(q, row_ptr, blk_idx, values, k, panels=panels)
        assert torch.equal(got.to(torch.int64), q8_accumulate_ref(q[:, :k], w)), (k, m)
        assert torch.equal(got, sparse_q8_accumulate_raw(q, row_ptr, blk_idx, values, k))


def test_panel_extremes_never_saturate(isa):
    k, n = 4 * P + 8, 20
    w = torch.full((n, k), -128, dtype=torch.int8)
    w[1::2] = 127
    row_ptr, blk_idx, values, _ = pack_bsr1x4(w)
    panels = build_bsr1x4_panels(row_ptr, blk_idx, values, k)
    q = torch.full((17, k), 255, dtype=torch.uint8)
    got = sparse_q8_accumulate_raw(q, row_ptr, blk_idx, values, k, panels=panels)
    assert torch.equal(got.to(torch.int64), q8_accumulate_ref(q, w))


@pytest.mark.parametrize("activation", ("none", "relu", "gelu"))
@pytest.mark.parametrize("static", (None, (0.05, 128)))
def test_module_bit_exact_and_equal_to_dense_int8(isa, activation, static, gen):
    n, k = 37, 4 * P + 37  # two panels (channel blocks: test_panel_accumulators_bit_exact)
    lin = linear_from(int8_weight(n, k, gen), gen)
    kwargs = dict(activation=activation, act_scale=None if static is None else static[0],
                  act_zero_point=0 if static is None else static[1])
    mod = SparseInt8Linear.from_float(lin, **kwargs)
    dense = Int8Linear.from_float(lin, **kwargs)
    q, scale = quantize_weight_per_channel(lin.weight.detach())
    for m in (0, 3, 8, 16, 17, 33):  # gather, sliced, one 16-row vector, two, two 32-row blocks
        x = torch.randn(m, k, generator=gen)
        y = mod(x)
        assert torch.equal(y, int8_linear_ref(x, q, scale, lin.bias, activation, static)), m
        assert torch.equal(y, dense(x)), m
    # Built lazily, on AVX-512 only, by a call that runs the panel kernel.
    assert (mod.panel_bytes() > 0) == isa_at_least("avx512vnni")


def test_panel_kernel_noncontiguous_input_and_nonfinite_rows(isa, gen):
    n, k, m = 40, 4 * P + 9, 20
    lin = linear_from(int8_weight(n, k, gen), gen)
    mod = SparseInt8Linear.from_float(lin)
    dense = Int8Linear.from_float(lin)
    wide = torch.randn(m, 2 * k + 3, generator=gen)
    x = wide[:, 3:3 + 2 * k:2]  # strided columns
    x[5, 7] = float("nan")
    x[9, k - 1] = float("inf")
    y = mod(x)
    torch.testing.assert_close(y, dense(x.contiguous()), rtol=0, atol=0, equal_nan=True)
    assert torch.isnan(y[5]).all() and torch.isnan(y[9]).all()  # the dense int8 contract for non-finite rows
    others = [r for r in range(m) if r not in (5, 9)]
    assert torch.isfinite(y[others]).all()


def test_panel_results_do_not_depend_on_thread_count(gen):
    if not isa_at_least("avx512vnni"):
        pytest.skip("the panel layout runs on the AVX-512 path only")
    lin = linear_from(int8_weight(3 * ROWS_PER_BLOCK + 1, 8 * P + 5, gen), gen)
    mod = SparseInt8Linear.from_float(lin)
    x = torch.randn(40, lin.in_features, generator=gen)
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = mod(x)
        torch.set_num_threads(2)
        two = mod(x)
    finally:
        torch.set_num_threads(previous)
    assert torch.equal(one, two)


def test_panel_copy_is_lazy_follows_in_place_changes_and_stays_out_of_state_dict(gen):
    if not isa_at_least("avx512vnni"):
        pytest.skip("the panel layout runs on the AVX-512 path only")
    k = 4 * P + 3
    lin = linear_from(int8_weight(24, k, gen), gen)
    mod = SparseInt8Linear.from_float(lin)
    x = torch.randn(20, k, generator=gen)
    mod(x[:2])
    assert mod.panel_bytes() == 0  # decode-only users never pay for it
    mod(x)
    assert mod.panel_bytes() > 0
    assert not any(name.startswith("panel_") for name in mod.state_dict())
    with torch.no_grad():
        mod.values.mul_(-1)  # same structure, negated weights (col_sum stale on purpose: raw accumulators)
    q = quantized_rows(20, k, gen)
    panels = mod._panels_for(20)
    raw = sparse_q8_accumulate_raw(q, mod.row_ptr, mod.blk_idx, mod.values, k, panels=panels)
    negated = unpack_bsr1x4(mod.row_ptr, mod.blk_idx, mod.values, k)
    assert torch.equal(raw.to(torch.int64), q8_accumulate_ref(q[:, :k], negated))


def test_corrupt_panel_layout_is_refused(gen):
    k = 4 * P + 3
    row_ptr, blk_idx, values, col_sum = pack_bsr1x4(int8_weight(10, k, gen))
    x = torch.randn(8, k, generator=gen)
    w_scale = torch.ones(10)

    def run(sub, idx, vals):
        return sparse_int8_linear_cpu(x, row_ptr, blk_idx, values, col_sum, w_scale, None, 0, panels=(sub, idx, vals))

    sub, idx, vals = build_bsr1x4_panels(row_ptr, blk_idx, values, k)
    run(sub, idx, vals)  # the intact layout runs
    bad_idx = idx.clone()
    bad_idx[0] = (k + 3) // 4 + 1
    with pytest.raises(ValueError, match="bsr1x4 panels.*beyond the pad row"):
        run(sub, bad_idx, vals)
    bad_sub = sub.clone()
    bad_sub[2] = bad_sub[1] - 1 if int(bad_sub[1]) > 0 else -1
    with pytest.raises(ValueError, match="corrupt"):
        run(bad_sub, idx, vals)
    with pytest.raises(ValueError, match="pointers"):
        run(sub[:-1].clone(), idx, vals)
    with pytest.raises(ValueError, match="panels must be"):
        run(sub, idx, vals[:-4].clone())
    with pytest.raises(ValueError, match="panels must be"):
        run(sub, idx, vals.view(torch.uint8))
