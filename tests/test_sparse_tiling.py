"""The csr panel layout (K tiling of the fp32 cols kernel, csrc/sparse/sparse.h): the C++ builder against the
plain-Python specification, the kernel against the float64 reference on every ISA path (the layout runs on
AVX-512 and AVX2; the scalar path ignores it and must give the same answers), and corrupt layouts refused."""

from __future__ import annotations

import pytest
import torch

import pycompress as pc
from pycompress import _C
from pycompress.nn import SparseLinear
from pycompress.ops.sparse import build_csr_panels, sparse_linear_csr_cpu
from pycompress.reference import fp32_error_bound, pack_csr, sparse_linear_ref
from pycompress.reference.sparse import csr_panels_ref

P = _C.SPARSE_PANEL_COLS
ROWS_PER_BLOCK = _C.SPARSE_PANEL_ROWS
# Around the panel width, a single short panel and an odd K.
PANEL_KS = (1, 7, P // 4 + 1, P - 1, P, P + 1, 2 * P + 3, 3 * P - 5)
# The gather kernel's M = 1, the 8-row narrow panels (from M = 2), around the 16-row vectors, the 2-vector
# limit of whole-panel runs, and the 128-row blocks of x^T.
PANEL_MS = (0, 1, 2, 3, 7, 8, 9, 15, 16, 17, 32, 33, 48, 129)


def weight_with_structure(n, k, gen):
    """Random sparsity plus rows that stress the layout: all-zero rows, a row whose nonzeros all sit in one
    panel, a dense row, a row with one nonzero in the last column, and empty panels for most rows."""
    w = torch.randn(n, k, generator=gen) * (torch.rand(n, k, generator=gen) < 0.15)
    if k > P:
        w[:, P:min(k, 2 * P)] = 0  # an empty panel for every row
    special = [lambda r: r.zero_(), lambda r: r.copy_(torch.randn(k, generator=gen)),
               lambda r: (r.zero_(), r.__setitem__(slice(0, min(k, 5)), 1.5)),
               lambda r: (r.zero_(), r.__setitem__(k - 1, -2.0))]
    for i, fill in enumerate(special):
        if i < n:
            fill(w[(i * 7) % n])
    return w


def linear_from(weight, gen):
    lin = torch.nn.Linear(weight.shape[1], weight.shape[0])
    with torch.no_grad():
        lin.weight.copy_(weight)
        lin.bias.copy_(torch.randn(weight.shape[0], generator=gen))
    return lin


@pytest.mark.parametrize("k", PANEL_KS)
@pytest.mark.parametrize("n", (1, 5, ROWS_PER_BLOCK + 3))
def test_builder_matches_the_specification(n, k, gen):
    row_ptr, col_idx, values = pack_csr(weight_with_structure(n, k, gen))
    built = build_csr_panels(row_ptr, col_idx, values, k)
    spec = csr_panels_ref(row_ptr, col_idx, values, k, ROWS_PER_BLOCK, P)
    for got, want in zip(built, spec):
        assert got.dtype == want.dtype and torch.equal(got, want)


def test_builder_places_unsorted_rows_by_column(gen):
    """A valid csr pack need not keep a row's columns sorted; every entry must still land in its panel."""
    k = 2 * P + 9
    row_ptr, col_idx, values = pack_csr(weight_with_structure(6, k, gen))
    for r in range(6):  # reverse each row
        lo, hi = int(row_ptr[r]), int(row_ptr[r + 1])
        col_idx[lo:hi] = col_idx[lo:hi].to(torch.int32).flip(0).to(torch.uint16)
        values[lo:hi] = values[lo:hi].flip(0)
    built = build_csr_panels(row_ptr, col_idx, values, k)
    spec = csr_panels_ref(row_ptr, col_idx, values, k, ROWS_PER_BLOCK, P)
    for got, want in zip(built, spec):
        assert torch.equal(got, want)


@pytest.mark.parametrize("k", (P // 4 + 1, P, P + 1, 2 * P + 3))
@pytest.mark.parametrize("m", PANEL_MS)
def test_panel_kernel_matches_float64_reference(isa, m, k, gen):
    n = 37
    weight = weight_with_structure(n, k, gen)
    mod = SparseLinear.from_float(linear_from(weight, gen), format="csr", activation="relu")
    x = torch.randn(m, k, generator=gen)
    y = mod(x)
    ref = sparse_linear_ref(x, weight, mod.bias, "relu")
    bound = fp32_error_bound(x, weight, mod.bias, "relu")
    assert ((y.to(torch.float64) - ref).abs() <= bound).all()
    # Built lazily by the first call with M >= 2 (the kernels use it there, on AVX-512 and AVX2).
    assert (mod.panel_bytes() > 0) == (m >= SparseLinear._PANEL_MIN_ROWS)


def test_panel_kernel_noncontiguous_input_and_many_blocks(isa, gen):
    n, k, m = 2 * ROWS_PER_BLOCK + 5, P + 77, 20
    weight = weight_with_structure(n, k, gen)
    mod = SparseLinear.from_float(linear_from(weight, gen), format="csr")
    wide = torch.randn(m, 2 * k + 3, generator=gen)
    x = wide[:, 3:3 + 2 * k:2]  # strided columns
    y = mod(x)
    ref = sparse_linear_ref(x, weight, mod.bias)
    assert ((y.to(torch.float64) - ref).abs() <= fp32_error_bound(x, weight, mod.bias)).all()
    torch.testing.assert_close(mod(x.contiguous()), y, rtol=0, atol=0)


@pytest.mark.parametrize("m", (3, 16))  # narrow (8-float) and 16-float x^T rows
def test_pads_never_read_activations_of_unused_columns(isa, m, gen):
    """A pad multiplies the zero row K, so Inf / NaN in a column no weight of a row uses stays out of it."""
    n, k = 9, P + 40
    weight = weight_with_structure(n, k, gen)
    weight[:, 3] = 0
    weight[:, k - 2] = 0
    weight[0, 3] = 1.0  # only channel 0 reads column 3
    mod = SparseLinear.from_float(linear_from(weight, gen), format="csr")
    x = torch.randn(m, k, generator=gen)
    x[:, 3] = float("inf")
    x[:, k - 2] = float("nan")
    y = mod(x)
    assert torch.isinf(y[:, 0]).all()
    assert torch.isfinite(y[:, 1:]).all()
    x_used = x.clone()
    x_used[:, 3] = 0
    x_used[:, k - 2] = 0
    bound = fp32_error_bound(x_used, weight, mod.bias)[:, 1:]
    ref = sparse_linear_ref(x_used, weight, mod.bias)[:, 1:]
    assert ((y[:, 1:].to(torch.float64) - ref).abs() <= bound).all()


def test_panel_results_do_not_depend_on_thread_count(gen):
    if pc.get_isa() == "scalar":
        pytest.skip("the panel layout runs on the AVX-512 and AVX2 paths only")
    weight = weight_with_structure(3 * ROWS_PER_BLOCK + 1, 2 * P + 5, gen)
    mod = SparseLinear.from_float(linear_from(weight, gen), format="csr")
    x = torch.randn(40, weight.shape[1], generator=gen)
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = mod(x)
        torch.set_num_threads(2)
        two = mod(x)
    finally:
        torch.set_num_threads(previous)
    assert torch.equal(one, two)


def test_panel_copy_follows_in_place_changes_and_stays_out_of_state_dict(gen):
    if pc.get_isa() == "scalar":
        pytest.skip("the panel layout runs on the AVX-512 and AVX2 paths only")
    weight = weight_with_structure(12, P + 3, gen)
    mod = SparseLinear.from_float(linear_from(weight, gen), format="csr")
    x = torch.randn(8, P + 3, generator=gen)
    assert mod.panel_bytes() == 0  # decode-only users never pay for it
    mod(x[:1])
    assert mod.panel_bytes() == 0
    mod(x)
    assert mod.panel_bytes() > 0
    assert not any(name.startswith("panel_") for name in mod.state_dict())
    with torch.no_grad():
        mod.values.mul_(2)
    ref = sparse_linear_ref(x, 2 * weight, mod.bias)
    assert ((mod(x).to(torch.float64) - ref).abs() <= fp32_error_bound(x, 2 * weight, mod.bias)).all()


def test_corrupt_panel_layout_is_refused(gen):
    k = P + 3
    weight = weight_with_structure(10, k, gen)
    row_ptr, col_idx, values = pack_csr(weight)
    x = torch.randn(8, k, generator=gen)

    def run(sub, idx, vals):
        return sparse_linear_csr_cpu(x, row_ptr, col_idx, values, None, 0, panels=(sub, idx, vals))

    sub, idx, vals = build_csr_panels(row_ptr, col_idx, values, k)
    run(sub, idx, vals)  # the intact layout runs
    bad_idx = idx.clone()
    bad_idx[0] = k + 1
    with pytest.raises(ValueError, match="beyond the pad row"):
        run(sub, bad_idx, vals)
    bad_sub = sub.clone()
    bad_sub[2] = bad_sub[1] - 1 if int(bad_sub[1]) > 0 else -1
    with pytest.raises(ValueError, match="corrupt"):
        run(bad_sub, idx, vals)
    with pytest.raises(ValueError, match="pointers"):
        run(sub[:-1].clone(), idx, vals)
    shifted = sub.clone()
    starts = torch.arange(1, sub.numel() - 1)
    s = int(starts[sub[starts] > sub[starts - 1]][0])  # a segment after a non-empty one
    shifted[s] -= 1  # still monotonic, no longer on a multiple of 4
    with pytest.raises(ValueError, match="multiple of 4"):
        run(shifted, idx, vals)
    with pytest.raises(ValueError, match="panels must be"):
        run(sub, idx, vals[:-1].clone())


def test_k_beyond_the_pad_index_has_no_panels(gen):
    k = _C.SPARSE_PANEL_MAX_K + 1  # 65536: csr works, the pad index K would not fit uint16
    weight = torch.zeros(2, k)
    weight[0, k - 1] = 1.0
    weight[1, 0] = 2.0
    mod = SparseLinear.from_float(linear_from(weight, gen), format="csr")
    x = torch.randn(5, k, generator=gen)
    ref = sparse_linear_ref(x, weight, mod.bias)
    assert ((mod(x).to(torch.float64) - ref).abs() <= fp32_error_bound(x, weight, mod.bias)).all()
    assert mod.panel_bytes() == 0
    row_ptr, col_idx, values = pack_csr(weight)
    with pytest.raises(ValueError, match="pad index"):
        build_csr_panels(row_ptr, col_idx, values, k)


@pytest.mark.parametrize("m", (2, 5, 8, 9, 16))
def test_single_panel_rows_match_the_traced_op_bit_for_bit(isa, m, gen):
    """Eager calls run the panel kernels (8-float x^T rows up to 8 rows), traced calls the op's plain cols
    kernel: for K within one panel both sum each row's nonzeros in the same order on every path."""
    k = P - 37
    weight = weight_with_structure(21, k, gen)
    mod = SparseLinear.from_float(linear_from(weight, gen), format="csr", activation="relu")
    x = torch.randn(m, k, generator=gen)
    eager = mod(x)
    assert mod.panel_bytes() > 0
    traced = pc.ops.sparse_linear_csr(x, mod.row_ptr, mod.col_idx, mod.values, mod.bias, 1)
    assert torch.equal(eager, traced)
