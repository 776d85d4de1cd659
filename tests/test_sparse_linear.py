"""Sparse linears (csrc/sparse): fp32 csr / nm24 against a float64 dense reference with a derived bound,
int8 bsr1x4 bit-exact against the exact integer reference, on every ISA path."""

from __future__ import annotations

import copy
import threading

import pytest
import torch

import pycompress as pc
from pycompress import _C
from pycompress.nn import Int8Linear, SparseInt8Linear, SparseLinear
from pycompress.ops.sparse import build_sliced, sparse_int8_linear_sliced, sparse_q8_accumulate_raw, sparse_sliced_accumulate_raw
from pycompress.reference import (
    fp32_error_bound,
    int8_linear_ref,
    pack_bsr1x4,
    pack_csr,
    pack_nm24,
    q8_accumulate_ref,
    quantize_rows_ref,
    quantize_weight_per_channel,
    sparse_linear_ref,
    unpack_bsr1x4,
    unpack_csr,
    unpack_nm24,
)

ACTIVATIONS = ("none", "relu", "gelu")
# Around the kernels' tiles: 16-nonzero gather chunks, 4-row gather limit, 16-row vectors, 128-row blocks,
# 4-wide k groups, 32-k nm24 index words.
ROWS = (1, 2, 3, 4, 5, 15, 16, 17, 33, 129)
SHAPES = ((1, 1), (3, 7), (16, 64), (17, 100), (40, 132), (33, 260))


def sparse_linear(n, k, density, gen, bias=True, pattern="unstructured"):
    lin = torch.nn.Linear(k, n, bias=bias)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(n, k, generator=gen))
        if bias:
            lin.bias.copy_(torch.randn(n, generator=gen))
        if pattern == "unstructured":
            mask = torch.rand(n, k, generator=gen) < density
        elif pattern == "block1x4":
            mask = (torch.rand(n, (k + 3) // 4, generator=gen) < density).repeat_interleave(4, 1)[:, :k]
        elif pattern == "nm24":
            order = torch.rand(n, k // 4, 4, generator=gen).argsort(dim=2)
            keep = order < torch.randint(0, 3, (n, k // 4, 1), generator=gen)  # 0, 1 or 2 per group
            mask = keep.view(n, k)
        lin.weight.mul_(mask)
    return lin


def check_fp32(y, x, weight, bias, activation):
    ref = sparse_linear_ref(x, weight, bias, activation)
    bound = fp32_error_bound(x, weight, bias, activation)
    err = (y.to(torch.float64) - ref).abs()
    assert (err <= bound).all(), f"max error {err.max():.3g}, bound there {bound.flatten()[err.argmax()]:.3g}"


# ---- formats ---------------------------------------------------------------------------------------------

def test_pack_round_trips(gen):
    for pattern, density in (("unstructured", 0.2), ("block1x4", 0.3), ("nm24", 0.5)):
        w = sparse_linear(9, 68, density, gen, pattern=pattern).weight.detach()
        assert torch.equal(unpack_csr(*pack_csr(w), 68), w)
        q, _ = quantize_weight_per_channel(w)
        row_ptr, blk_idx, values, col_sum = pack_bsr1x4(q)
        assert torch.equal(unpack_bsr1x4(row_ptr, blk_idx, values, 68), q)
        assert torch.equal(col_sum, q.sum(dim=1, dtype=torch.int32))
        if pattern == "nm24":
            values, nm_idx = pack_nm24(w)
            assert values.shape == (9, 34) and nm_idx.shape == (9, 3)
            assert torch.equal(unpack_nm24(values, nm_idx, 68), w)


def test_block_pattern_packs_only_its_blocks(gen):
    w = sparse_linear(32, 256, 0.1, gen, pattern="block1x4").weight.detach()
    q, _ = quantize_weight_per_channel(w)
    _, blk_idx, _, _ = pack_bsr1x4(q)
    assert blk_idx.numel() == int((q.view(32, 64, 4) != 0).any(dim=2).sum())
    assert blk_idx.numel() * 4 == int((w != 0).sum())


def test_nm24_pack_refuses_denser_groups(gen):
    w = torch.randn(4, 16, generator=gen)
    with pytest.raises(ValueError, match="not 2:4 sparse"):
        pack_nm24(w)
    with pytest.raises(ValueError, match="multiple of 4"):
        pack_nm24(torch.zeros(2, 6))


# ---- fp32 ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_csr_matches_float64_reference(isa, activation, gen):
    for (n, k), density in zip(SHAPES, (0.5, 0.3, 0.1, 0.05, 0.2, 0.02)):
        lin = sparse_linear(n, k, density, gen, bias=n % 2 == 1)
        mod = SparseLinear.from_float(lin, format="csr", activation=activation)
        for m in ROWS:
            x = torch.randn(m, k, generator=gen)
            check_fp32(mod(x), x, lin.weight.detach(), lin.bias, activation)


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_nm24_matches_float64_reference(isa, activation, gen):
    for n, k in ((1, 4), (5, 28), (16, 32), (17, 100), (40, 132)):
        lin = sparse_linear(n, k, 0.5, gen, pattern="nm24")
        mod = SparseLinear.from_float(lin, activation=activation)
        assert mod.format == "nm24"
        for m in ROWS:
            x = torch.randn(m, k, generator=gen)
            check_fp32(mod(x), x, lin.weight.detach(), lin.bias, activation)


def test_fp32_epilogue_is_bit_identical_across_isas(gen):
    # A single nonzero per output: the products are exact, so every path must give the same bits
    # after the shared bias + GELU epilogue.
    lin = torch.nn.Linear(64, 48)
    with torch.no_grad():
        lin.weight.zero_()
        lin.weight[torch.arange(48), torch.randint(0, 64, (48,), generator=gen)] = 1.0
    mod = SparseLinear.from_float(lin, activation="gelu")
    x = torch.randn(37, 64, generator=gen)
    previous = pc.get_isa()
    try:
        outs = []
        for isa in pc.supported_isas():
            pc.set_isa(isa)
            outs.append(mod(x))
    finally:
        pc.set_isa(previous)
    for out in outs[1:]:
        assert torch.equal(out, outs[0])


# ---- int8 ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("pattern", ("unstructured", "block1x4"))
def test_int8_accumulators_bit_exact(isa, pattern, gen):
    for (n, k), density in zip(SHAPES, (0.5, 0.3, 0.1, 0.05, 0.2, 0.02)):
        w = torch.randint(-127, 128, (n, k), generator=gen, dtype=torch.int8)
        w = w * (torch.rand(n, k, generator=gen) < density).to(torch.int8)
        row_ptr, blk_idx, values, _ = pack_bsr1x4(w)
        kp = (k + 3) // 4 * 4
        for m in ROWS:
            q = torch.zeros(m, kp, dtype=torch.uint8)
            q[:, :k] = torch.randint(0, 256, (m, k), generator=gen, dtype=torch.uint8)
            got = sparse_q8_accumulate_raw(q, row_ptr, blk_idx, values, k)
            assert torch.equal(got.to(torch.int64), q8_accumulate_ref(q[:, :k], w)), (isa, n, k, m)


def test_int8_extremes_never_saturate(isa):
    # 255 * -128 pairs: any int16 pair sum (vpmaddubsw) would saturate; the sum must stay exact.
    k, n = 4096, 20
    w = torch.full((n, k), -128, dtype=torch.int8)
    w[1::2] = 127
    row_ptr, blk_idx, values, _ = pack_bsr1x4(w)
    for m in (1, 17):
        q = torch.full((m, k), 255, dtype=torch.uint8)
        got = sparse_q8_accumulate_raw(q, row_ptr, blk_idx, values, k)
        assert torch.equal(got.to(torch.int64), q8_accumulate_ref(q, w))


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("static", (None, (0.05, 128)))
def test_int8_linear_bit_exact_and_equal_to_dense_int8(isa, activation, static, gen):
    for (n, k), density in zip(SHAPES, (0.5, 0.3, 0.1, 0.05, 0.2, 0.02)):
        lin = sparse_linear(n, k, density, gen, bias=n % 2 == 0)
        kwargs = dict(activation=activation, act_scale=None if static is None else static[0],
                      act_zero_point=0 if static is None else static[1])
        mod = SparseInt8Linear.from_float(lin, **kwargs)
        dense = Int8Linear.from_float(lin, **kwargs)
        q, scale = quantize_weight_per_channel(lin.weight.detach())
        for m in ROWS:
            x = torch.randn(m, k, generator=gen)
            y = mod(x)
            assert torch.equal(y, int8_linear_ref(x, q, scale, lin.bias, activation, static)), (n, k, m)
            assert torch.equal(y, dense(x))  # same numbers contract as the dense int8 GEMM


# ---- int8 sliced layout (16 channel lanes, 16-group windows) ------------------------------------------

# Around the sliced tiles: 16 channel lanes (N), 64-byte windows (K), 4-row groups and 8-slice blocks.
SLICED_SHAPES = ((1, 1), (15, 63), (16, 64), (17, 65), (33, 4), (40, 132), (129, 260), (20, 1000))


# Both sliced layouts: "groups" (one 1x4 block per lane and step, vpermd) and "bytes" (up to 4 single
# nonzeros per lane anywhere in a 64-byte window, vpermb; the scalar spec below AVX-512 VBMI).
LAYOUTS = ("groups", "bytes")


def sliced_args(mod, layout="groups"):
    return (*mod._sliced_layout(layout == "bytes"), mod.col_sum, mod.w_scale, mod.bias)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("pattern", ("unstructured", "block1x4"))
def test_sliced_accumulators_bit_exact(isa, pattern, layout, gen):
    for (n, k), density in zip(SLICED_SHAPES, (1.0, 0.3, 0.1, 0.5, 0.9, 0.2, 0.05, 0.1)):
        w = torch.randint(-127, 128, (n, k), generator=gen, dtype=torch.int8)
        if pattern == "unstructured":
            mask = torch.rand(n, k, generator=gen) < density
        else:
            mask = (torch.rand(n, (k + 3) // 4, generator=gen) < density).repeat_interleave(4, 1)[:, :k]
        w = w * mask.to(torch.int8)
        sliced = build_sliced(*pack_bsr1x4(w)[:3], k, byte_layout=layout == "bytes")
        kp = (k + 3) // 4 * 4
        for m in (1, 2, 3, 4, 5, 8, 16, 17):
            q = torch.zeros(m, kp, dtype=torch.uint8)
            q[:, :k] = torch.randint(0, 256, (m, k), generator=gen, dtype=torch.uint8)
            got = sparse_sliced_accumulate_raw(q, *sliced, n, k)
            assert torch.equal(got.to(torch.int64), q8_accumulate_ref(q[:, :k], w)), (isa, n, k, m)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_sliced_layout_of_unsorted_blocks_is_still_exact(isa, layout, gen):
    # A valid bsr1x4 pack need not list a channel's blocks in k order; the slicer must still place them all.
    n, k = 20, 300
    w = torch.randint(-127, 128, (n, k), generator=gen, dtype=torch.int8)
    w = w * (torch.rand(n, k, generator=gen) < 0.2).to(torch.int8)
    row_ptr, blk_idx, values, _ = pack_bsr1x4(w)
    for c in range(n):
        lo, hi = int(row_ptr[c]), int(row_ptr[c + 1])
        order = torch.arange(hi - 1, lo - 1, -1)
        blk_idx[lo:hi] = blk_idx[order].clone()
        values.view(-1, 4)[lo:hi] = values.view(-1, 4)[order].clone()
    q = torch.randint(0, 256, (3, k), generator=gen, dtype=torch.uint8)
    got = sparse_sliced_accumulate_raw(q, *build_sliced(row_ptr, blk_idx, values, k, layout == "bytes"), n, k)
    assert torch.equal(got.to(torch.int64), q8_accumulate_ref(q, w))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_sliced_extremes_never_saturate(isa, layout):
    k, n = 4096, 20
    w = torch.full((n, k), -128, dtype=torch.int8)
    w[1::2] = 127
    sliced = build_sliced(*pack_bsr1x4(w)[:3], k, byte_layout=layout == "bytes")
    for m in (1, 5):
        q = torch.full((m, k), 255, dtype=torch.uint8)
        assert torch.equal(sparse_sliced_accumulate_raw(q, *sliced, n, k).to(torch.int64), q8_accumulate_ref(q, w))


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("static", (None, (0.05, 128)))
def test_sliced_linear_bit_exact_and_equal_to_dense_int8(isa, activation, static, layout, gen):
    for (n, k), density in zip(SLICED_SHAPES, (1.0, 0.3, 0.1, 0.5, 0.9, 0.2, 0.05, 0.0)):
        lin = sparse_linear(n, k, density, gen, bias=n % 2 == 1)
        kwargs = dict(activation=activation, act_scale=None if static is None else static[0],
                      act_zero_point=0 if static is None else static[1])
        mod = SparseInt8Linear.from_float(lin, **kwargs)
        dense = Int8Linear.from_float(lin, **kwargs)
        q, scale = quantize_weight_per_channel(lin.weight.detach())
        for m in (0, 1, 3, 4, 7, 16):
            x = torch.randn(m, k, generator=gen)
            y = sparse_int8_linear_sliced(x, *sliced_args(mod, layout), activation_code(activation),
                                          *kwargs_static(static))
            assert torch.equal(y, int8_linear_ref(x, q, scale, lin.bias, activation, static)), (n, k, m)
            assert torch.equal(y, dense(x))


def kwargs_static(static):
    return (None, 0) if static is None else static


def activation_code(name):
    return ACTIVATIONS.index(name)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_sliced_all_zero_rows_and_noncontiguous_input(isa, layout, gen):
    lin = sparse_linear(37, 200, 0.1, gen)
    with torch.no_grad():
        lin.weight[5:22] = 0  # a whole slice of zero channels and parts of two others
    mod = SparseInt8Linear.from_float(lin)
    wide = torch.randn(6, 400, generator=gen)
    x = wide[:, ::2]
    y = sparse_int8_linear_sliced(x, *sliced_args(mod, layout))
    assert torch.equal(y, sparse_int8_linear_sliced(x.contiguous(), *sliced_args(mod, layout)))
    assert torch.equal(y, Int8Linear.from_float(lin)(x.contiguous()))
    assert torch.equal(y[:, 5:22], lin.bias.detach().expand(6, -1)[:, 5:22])


def test_sliced_kernel_is_chosen_for_small_batches(gen):
    mod = SparseInt8Linear.from_float(sparse_linear(64, 256, 0.1, gen))
    assert mod._use_sliced(1)
    assert not mod._use_sliced(mod._SLICED_MAX_ROWS + 1)
    assert not mod._use_sliced(0)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_sliced_copy_follows_in_place_changes_and_stays_out_of_state_dict(layout, gen):
    lin = sparse_linear(24, 64, 0.3, gen)
    mod = SparseInt8Linear.from_float(lin)
    assert mod.sliced_bytes() == 0 and mod.byte_sliced_bytes() == 0  # built by the first call that needs one
    x = torch.randn(1, 64, generator=gen)
    before = mod(x)
    assert mod.sliced_bytes() + mod.byte_sliced_bytes() > 0
    assert not any(key.startswith(("sliced_", "byte_")) for key in mod.state_dict())
    first = [t.clone() for t in mod._sliced_layout(layout == "bytes")]
    with torch.no_grad():
        mod.values.mul_(-1)  # same structure, negated weights (col_sum is stale on purpose: raw path below)
    q = torch.randint(0, 256, (1, 64), generator=gen, dtype=torch.uint8)
    layout_now = mod._sliced_layout(layout == "bytes")  # rebuilt from the changed pack
    assert torch.equal(layout_now[3], -first[3])
    raw = sparse_sliced_accumulate_raw(q, *layout_now, 24, 64)
    expected = q8_accumulate_ref(q, unpack_bsr1x4(mod.row_ptr, mod.blk_idx, mod.values, 64))
    assert torch.equal(raw.to(torch.int64), expected)
    assert not torch.equal(mod(x), before)


def test_corrupt_sliced_pack_is_refused(gen):
    mod = SparseInt8Linear.from_float(sparse_linear(40, 132, 0.3, gen))
    x = torch.randn(2, 132, generator=gen)
    base_args = sliced_args(mod)

    def run(slice_ptr=None, step_base=None, step_lane=None, values=None):
        args = list(base_args)
        for i, t in enumerate((slice_ptr, step_base, step_lane, values)):
            if t is not None:
                args[i] = t
        return sparse_int8_linear_sliced(x, *args)

    sliced_ptr, sliced_base, sliced_lane, sliced_values = mod._sliced_layout(False)
    far = sliced_base.clone()
    far[0] = 132 // 4 - 16 + 1  # window would end past the row
    with pytest.raises(ValueError, match="window starts at group"):
        run(step_base=far)
    bad_ptr = sliced_ptr.clone()
    bad_ptr[1], bad_ptr[2] = bad_ptr[2], bad_ptr[1] - 1
    with pytest.raises(ValueError, match="decreases"):
        run(slice_ptr=bad_ptr)
    short_ptr = sliced_ptr.clone()
    short_ptr[-1] -= 1
    with pytest.raises(ValueError, match="steps are stored"):
        run(slice_ptr=short_ptr)
    with pytest.raises(ValueError, match="slice_ptr must be int32"):
        run(slice_ptr=sliced_ptr[:-1])
    with pytest.raises(ValueError, match="values must be int8"):
        run(values=sliced_values[:-1])
    with pytest.raises(ValueError, match="step_lane must be uint32"):
        run(step_lane=sliced_lane[:, :1])


def test_corrupt_byte_sliced_pack_is_refused(gen):
    mod = SparseInt8Linear.from_float(sparse_linear(40, 132, 0.3, gen))
    x = torch.randn(2, 132, generator=gen)
    slice_ptr, step_base, step_pos, values, *rest = sliced_args(mod, "bytes")
    far = step_base.clone()
    far[0] = 132 - 64 + 1  # the 64-byte window would end past the (132-byte) row
    with pytest.raises(ValueError, match="window starts at byte 69"):
        sparse_int8_linear_sliced(x, slice_ptr, far, step_pos, values, *rest)
    y = sparse_int8_linear_sliced(x, slice_ptr, step_base, step_pos, values, *rest)
    assert torch.equal(y, sparse_int8_linear_sliced(x, *sliced_args(mod, "groups")))
    # The structural check is memoized per tensor version and per kind: byte offsets that passed as a
    # byte layout are checked again when the same tensors come as a group layout (4x further).
    assert int(step_base.to(torch.int32).max()) > 132 // 4 - 16
    lanes = torch.zeros((step_base.numel(), 2), dtype=torch.uint32)
    with pytest.raises(ValueError, match="window starts at group"):
        sparse_int8_linear_sliced(x, slice_ptr, step_base, lanes, values, *rest)
    with pytest.raises(ValueError, match="window starts at byte 100"):
        sparse_int8_linear_sliced(x, slice_ptr, step_base.fill_(100), step_pos, values, *rest)


def test_byte_layout_is_chosen_for_unstructured_packs_where_vectorized(gen):
    unstructured = SparseInt8Linear.from_float(sparse_linear(64, 512, 0.1, gen))
    blocks = SparseInt8Linear.from_float(sparse_linear(64, 512, 0.1, gen, pattern="block1x4"))
    x = torch.randn(3, 512, generator=gen)
    vectorized = _C.sparse_sliced_bytes_vectorized()
    assert vectorized == (pc.get_isa() in ("avx512vbmi", "amx"))  # vpermb: VBMI, which every AMX CPU has
    for mod in (unstructured, blocks):
        assert mod.byte_sliced_bytes() == 0  # built by the first call that uses it
        assert torch.equal(mod(x), int8_linear_ref(x, *int8_weights(mod), mod.bias))
    assert (unstructured.byte_sliced_bytes() > 0) == vectorized
    assert blocks.byte_sliced_bytes() == 0  # 1x4 blocks: as many steps, in more bytes
    assert not any(key.startswith("byte_") for key in unstructured.state_dict())
    if vectorized:
        # An in-place change of the pack rebuilds the layout.
        before = unstructured.byte_values.clone()
        with torch.no_grad():
            unstructured.values.mul_(-1)
            unstructured.col_sum.mul_(-1)
        assert torch.equal(unstructured(x), int8_linear_ref(x, *int8_weights(unstructured), unstructured.bias))
        assert torch.equal(unstructured.byte_values, -before)


def int8_weights(mod):
    """The int8 weights [N, K] and per-channel scales of an int8 sparse layer."""
    return unpack_bsr1x4(mod.row_ptr, mod.blk_idx, mod.values, mod.in_features), mod.w_scale


@pytest.mark.parametrize("pattern", ("unstructured", "block1x4"))
def test_int8_module_follows_every_change_to_its_operands(isa, pattern, gen):
    # Small-M eager calls run a native plan bound to the sliced layout and the weight-side buffers;
    # any later change must be seen by the next call, and a bad replacement refused.
    mod = SparseInt8Linear.from_float(sparse_linear(40, 132, 0.1, gen, pattern=pattern))
    x = torch.randn(1, 132, generator=gen)
    w, scale = (t.clone() for t in int8_weights(mod))
    bias = mod.bias.clone()
    assert torch.equal(mod(x), int8_linear_ref(x, w, scale, bias))
    mod.w_scale.mul_(2)  # in place
    assert torch.equal(mod(x), int8_linear_ref(x, w, scale * 2, bias))
    mod.w_scale = scale.clone()  # a replaced buffer
    mod.bias = torch.zeros(40)
    assert torch.equal(mod(x), int8_linear_ref(x, w, scale, torch.zeros(40)))
    mod.bias = bias
    mod.act_scale, mod.act_zero_point = 0.05, 128
    assert torch.equal(mod(x), int8_linear_ref(x, w, scale, bias, "none", (0.05, 128)))
    mod.act_scale, mod.act_zero_point = None, 0
    # (plain pickle of uint16 tensors fails inside torch itself; pycompress.save uses safetensors)
    assert torch.equal(copy.deepcopy(mod)(x), int8_linear_ref(x, w, scale, bias))
    mod.share_memory()  # every storage moves
    assert torch.equal(mod(x), int8_linear_ref(x, w, scale, bias))
    mod.w_scale = torch.ones(39)
    with pytest.raises(ValueError, match="w_scale must be 1-D float32 of 40"):
        mod(x)


def test_int8_nonfinite_rows_become_nan_and_spare_the_others(isa, gen):
    mod = SparseInt8Linear.from_float(sparse_linear(24, 40, 0.3, gen))
    for m in (3, 20):
        x = torch.randn(m, 40, generator=gen)
        x[1, 5] = float("nan")
        x[2, 7] = float("inf")
        y = mod(x)
        assert torch.isnan(y[1:3]).all()
        assert torch.isfinite(y[0]).all() and torch.isfinite(y[3:]).all()


# ---- shapes, strides, edge cases -------------------------------------------------------------------------

def all_modules(lin):
    mods = [SparseLinear.from_float(lin, format="csr"), SparseInt8Linear.from_float(lin)]
    if lin.in_features % 4 == 0:
        mods.append(SparseLinear.from_float(lin, format="nm24") if _is_nm24(lin) else mods[0])
    return mods


def _is_nm24(lin):
    from pycompress.reference import is_nm24
    return is_nm24(lin.weight.detach())


def test_leading_dims_and_noncontiguous_inputs(isa, gen):
    lin = sparse_linear(24, 64, 0.5, gen, pattern="nm24")
    for mod in all_modules(lin):
        wide = torch.randn(20, 3, 100, generator=gen)
        for x in (wide[:, 1, 10:74], wide[::2, :, 20:84].transpose(0, 1), wide[:, :, :64]):
            expected = mod(x.contiguous())
            assert torch.equal(mod(x), expected)
            assert mod(x).shape == (*x.shape[:-1], 24)


@pytest.mark.parametrize("shape", ((0, 64), (2, 0, 64)))
def test_empty_batch(isa, shape, gen):
    for mod in all_modules(sparse_linear(8, 64, 0.5, gen, pattern="nm24")):
        y = mod(torch.randn(*shape))
        assert y.shape == (*shape[:-1], 8)


@pytest.mark.parametrize("density", (0.0, 1.0))
def test_density_0_and_100_percent(isa, density, gen):
    lin = sparse_linear(19, 36, density, gen)
    x = torch.randn(21, 36, generator=gen)
    for m in (1, 21):
        csr = SparseLinear.from_float(lin, format="csr", activation="relu")
        check_fp32(csr(x[:m]), x[:m], lin.weight.detach(), lin.bias, "relu")
        i8 = SparseInt8Linear.from_float(lin)
        q, scale = quantize_weight_per_channel(lin.weight.detach())
        assert torch.equal(i8(x[:m]), int8_linear_ref(x[:m], q, scale, lin.bias))
    if density == 0.0:
        assert csr.values.numel() == 0 and i8.blk_idx.numel() == 0
        assert torch.equal(csr(x), torch.relu(lin.bias.detach()).expand(21, 19))


def test_all_zero_rows(isa, gen):
    lin = sparse_linear(33, 50, 0.4, gen)
    with torch.no_grad():
        lin.weight[::3] = 0
    x = torch.randn(20, 50, generator=gen)
    for m in (1, 20):
        check_fp32(SparseLinear.from_float(lin)(x[:m]), x[:m], lin.weight.detach(), lin.bias, "none")
        q, scale = quantize_weight_per_channel(lin.weight.detach())
        assert torch.equal(SparseInt8Linear.from_float(lin)(x[:m]), int8_linear_ref(x[:m], q, scale, lin.bias))


def test_k_beyond_uint16_index_range_is_refused():
    lin = torch.nn.Linear(65537, 2, bias=False)
    for cls in (SparseLinear, SparseInt8Linear):
        with pytest.raises(ValueError, match="65536"):
            cls.from_float(lin)
    with pytest.raises(ValueError, match="65536"):
        pack_csr(torch.zeros(2, 65537))


def test_k_at_uint16_index_limit_works(gen):
    k = 65536
    w = torch.zeros(3, k)
    w[0, k - 1], w[1, 0], w[2, k - 5] = 2.0, -1.0, 0.5
    lin = torch.nn.Linear(k, 3, bias=False)
    lin.weight.data.copy_(w)
    x = torch.randn(2, k, generator=gen)
    check_fp32(SparseLinear.from_float(lin)(x), x, w, None, "none")
    q, scale = quantize_weight_per_channel(w)
    assert torch.equal(SparseInt8Linear.from_float(lin)(x), int8_linear_ref(x, q, scale))
    # Both sliced layouts at the limit: windows clamped to the row's last 64 bytes (uint16 step_base).
    qx = torch.randint(0, 256, (2, k), generator=gen, dtype=torch.uint8)
    for byte_layout in (False, True):
        sliced = build_sliced(*pack_bsr1x4(q)[:3], k, byte_layout)
        got = sparse_sliced_accumulate_raw(qx, *sliced, 3, k)
        assert torch.equal(got.to(torch.int64), q8_accumulate_ref(qx, q)), byte_layout


def test_nan_weights_are_refused(gen):
    lin = sparse_linear(4, 8, 0.5, gen)
    with torch.no_grad():
        lin.weight[1, 2] = float("nan")
    for cls in (SparseLinear, SparseInt8Linear):
        with pytest.raises(ValueError, match="NaN"):
            cls.from_float(lin, name="fc1")


def test_wrong_inputs_get_clear_errors(gen):
    mod = SparseLinear.from_float(sparse_linear(8, 16, 0.5, gen), name="fc1")
    with pytest.raises(ValueError, match=r"SparseLinear\(fc1\): input has shape \(2, 15\)"):
        mod(torch.randn(2, 15))
    with pytest.raises(TypeError, match="float32"):
        mod(torch.randn(2, 16, dtype=torch.float64))
    with pytest.raises(ValueError, match="not 2:4"):
        SparseLinear.from_float(sparse_linear(8, 16, 0.9, gen), format="nm24")


# ---- corrupt packs ---------------------------------------------------------------------------------------

def test_corrupt_csr_pack_is_refused_before_any_kernel_runs(gen):
    lin = sparse_linear(16, 40, 0.3, gen)
    x = torch.randn(3, 40, generator=gen)
    mod = SparseLinear.from_float(lin, name="fc1")
    mod(x)  # validated and memoized
    with torch.no_grad():
        mod.col_idx[5] = 40  # in-place write bumps the version: re-validated on the next call
    with pytest.raises(ValueError, match="out of range"):
        mod(x)
    mod = SparseLinear.from_float(lin)
    with torch.no_grad():
        mod.row_ptr[3] = mod.row_ptr[5] + 1
    with pytest.raises(ValueError, match="decreases"):
        mod(x)
    mod = SparseLinear.from_float(lin)
    with torch.no_grad():
        mod.row_ptr[-1] += 1
    with pytest.raises(ValueError, match=r"row_ptr\[N\]"):
        mod(x)
    with pytest.raises(ValueError, match="values must be"):
        pc.ops.sparse_linear_csr(x, mod.row_ptr, mod.col_idx, mod.values[:-1])


def test_corrupt_int8_pack_is_refused(gen):
    lin = sparse_linear(16, 40, 0.3, gen)
    x = torch.randn(3, 40, generator=gen)
    mod = SparseInt8Linear.from_float(lin)
    with torch.no_grad():
        mod.blk_idx[0] = 10  # K=40 has 10 groups: index 10 is one past the end
    with pytest.raises(ValueError, match="out of range"):
        mod(x)
    sd = SparseInt8Linear.from_float(lin).state_dict()
    sd["row_ptr"][0] = 1
    fresh = SparseInt8Linear(40, 16)
    with pytest.raises(ValueError, match=r"row_ptr\[0\]"):
        fresh.load_state_dict(sd)


def test_state_dict_round_trip_resizes_nnz_buffers(gen):
    for cls in (SparseLinear, SparseInt8Linear):
        src = cls.from_float(sparse_linear(12, 30, 0.3, gen), activation="relu")
        dst = cls(30, 12, activation="relu")
        dst.load_state_dict(src.state_dict())
        x = torch.randn(5, 30, generator=gen)
        assert torch.equal(dst(x), src(x))


def test_extra_repr_is_informative(gen):
    text = repr(SparseInt8Linear.from_float(sparse_linear(8, 16, 0.25, gen)))
    assert "format=bsr1x4" in text and "density=" in text and "bytes=" in text
    text = repr(SparseLinear.from_float(sparse_linear(8, 16, 0.5, gen, pattern="nm24")))
    assert "format=nm24" in text and "density=" in text and "bytes=" in text


# ---- threads, compile ------------------------------------------------------------------------------------

def test_results_do_not_depend_on_thread_count(gen):
    lin = sparse_linear(300, 256, 0.2, gen)
    mods = [SparseLinear.from_float(lin), SparseInt8Linear.from_float(lin)]
    inputs = [torch.randn(m, 256, generator=gen) for m in (40, 2)]  # M=2: the sliced int8 kernel
    try:
        pc.set_num_threads(1)
        serial = [[mod(x) for x in inputs] for mod in mods]
        pc.set_num_threads(2)
        for mod, ys in zip(mods, serial):
            for x, y in zip(inputs, ys):
                assert torch.equal(mod(x), y)  # each output is computed by one thread, in one order
    finally:
        pc.set_num_threads(None)


def test_many_python_threads_match_serial(isa, gen):
    lin = sparse_linear(200, 128, 0.2, gen)
    mods = [SparseLinear.from_float(lin), SparseInt8Linear.from_float(lin)]
    inputs = [torch.randn(m, 128, generator=gen) for m in (1, 3, 17, 70)]
    # From copies: the threads' first calls build the derived layouts and plans concurrently.
    expected = [[copy.deepcopy(mod)(x) for x in inputs] for mod in mods]
    failures = []

    def worker(seed):
        for rep in range(10):
            i = (seed + rep) % len(inputs)
            for mod, exp in zip(mods, expected):
                if not torch.equal(mod(inputs[i]), exp[i]):
                    failures.append((seed, rep))

    threads = [threading.Thread(target=worker, args=(s,)) for s in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures
