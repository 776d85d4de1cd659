"""The W4A8 linear (csrc/q4/q4_gemm.h) against its bit-exact reference (pycompress/reference/q4.py) on every ISA
path: shapes around the tiles (rows 1-17: every row block and remainder, 16-column panels, 64-column driver tiles), every
group size, per channel with K not a multiple of 8, static and u7 activations, non-contiguous and empty
inputs, non-finite rows, the extremes of the integer sums, bad operands, many threads, and the layer's
format (convert / quantize / load)."""

from __future__ import annotations

import copy
import threading

import pytest
import torch
from torch import nn

import pycompress as pc
from pycompress.nn import Int4Linear, Int8Linear, SharedInputGroup
from pycompress.ops.q4 import int4_linear_cpu
from pycompress.ops.shared_input import int8_linear_shared_input_cpu
from pycompress.reference.q4 import (
    group_count,
    int4_linear_ref,
    pack_int4_weights,
    quantize_weight_grouped,
    unpack_group_scales,
    unpack_int4_weights,
)

ACTS = {"none": 0, "relu": 1, "gelu": 2}


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int32)


def _run(x, q, scale, group_size, bias=None, activation="none", static=None, act_bits=8):
    n, k = q.shape
    w4, g_scale, corr = pack_int4_weights(q, scale, group_size)
    return int4_linear_cpu(x, w4, g_scale, corr, bias, n, group_count(k, group_size), ACTS[activation],
                           static and static[0], static[1] if static else 0, act_bits)


@pytest.mark.parametrize("group_size", [32, 64, 128, None])
def test_int4_linear_bit_exact_around_tiles(isa, group_size, gen):
    ks = [128, 256, 384] if group_size else [8, 13, 100, 384]
    for k in ks:
        for n in (1, 15, 16, 17, 33, 64, 65, 130):
            for m in range(1, 18):  # every row block and remainder of the 8-row kernel, then 16 + 1
                w = torch.randn(n, k, generator=gen)
                q, scale = quantize_weight_grouped(w, 4, group_size)
                x = torch.randn(m, k, generator=gen) * 2
                bias = torch.randn(n, generator=gen)
                y = _run(x, q, scale, group_size, bias)
                assert torch.equal(_bits(y), _bits(int4_linear_ref(x, q, scale, group_size, bias))), (isa, k, n, m)


@pytest.mark.parametrize("m", [8, 16, 17, 32, 33, 200])
def test_int4_linear_bit_exact_around_amx_tiles(isa, m, gen):
    # The AMX kernel: 16-row x 64-k tiles in 2 x 2 blocks, groups of whole 64-k steps (64, 128) or the whole K
    # (per channel, with a k tail: 136, 200), other groups (32) on the AVX-512 kernel; odd panels, rows past m
    # in the packed blocks. The other levels run the same shapes through their own row blocks.
    for k, group_size in ((128, 64), (256, 128), (384, 128), (128, 32), (136, None), (200, None)):
        for n in (16, 17, 48, 65):
            w = torch.randn(n, k, generator=gen)
            q, scale = quantize_weight_grouped(w, 4, group_size)
            x = torch.randn(m, k, generator=gen) * 2
            bias = torch.randn(n, generator=gen)
            y = _run(x, q, scale, group_size, bias, "gelu")
            ref = int4_linear_ref(x, q, scale, group_size, bias, "gelu")
            assert torch.equal(_bits(y), _bits(ref)), (isa, m, k, n, group_size)


@pytest.mark.parametrize("activation", ["none", "relu", "gelu"])
@pytest.mark.parametrize("static", [None, (0.03, 117)])
@pytest.mark.parametrize("act_bits", [8, 7])
def test_int4_linear_epilogue_and_activation_formats(isa, activation, static, act_bits, gen):
    for k, n, m, group_size in [(64, 48, 7, 32), (256, 100, 13, 128), (40, 20, 4, None), (512, 64, 130, 64)]:
        for bits in (4, 3, 2):
            q, scale = quantize_weight_grouped(torch.randn(n, k, generator=gen), bits, group_size)
            x = torch.randn(m, k, generator=gen)
            bias = torch.randn(n, generator=gen) if bits != 3 else None
            y = _run(x, q, scale, group_size, bias, activation, static, act_bits)
            ref = int4_linear_ref(x, q, scale, group_size, bias, activation, static, act_bits)
            assert torch.equal(_bits(y), _bits(ref)), (isa, k, n, m, bits)


def test_int4_linear_extremes_are_exact(isa):
    # Every product at its largest magnitude, 255 * -8, through K = 65536 in one group (per channel): the
    # int32 group sum -133,693,440 is exact on every path, and so are AVX2's int16 pair sums (8160). 17 rows:
    # the AMX tiles too.
    for k in (8, 4096, 65536):
        n = 32
        q = torch.full((n, k), -8, dtype=torch.int8)
        q[n // 2:] = 7
        scale = torch.ones(n, 1)
        x = torch.full((17, k), 1.0)  # dynamic rows of 1.0: every activation quantizes to 255, zero point 0
        y = _run(x, q, scale, None)
        assert torch.equal(_bits(y), _bits(int4_linear_ref(x, q, scale, None)))
        # 255 * -8 * k rounds to float once; times the row scale 1/255 (itself rounded)
        expected = torch.tensor(float(255 * -8 * k)) * (torch.tensor(1.0) / torch.tensor(255.0))
        assert y[0, 0] == expected


def test_int4_linear_inputs_non_contiguous_empty_and_non_finite(isa, gen):
    k, n = 128, 40
    q, scale = quantize_weight_grouped(torch.randn(n, k, generator=gen), 4, 64)
    wide = torch.randn(6, 2 * k, generator=gen)
    strided = wide[:, ::2]  # elements not contiguous: copied; rows strided: read in place
    rows = wide[:, :k]
    for x in (strided, rows, torch.randn(2, 3, k, generator=gen).transpose(0, 1)):
        assert torch.equal(_bits(_run(x, q, scale, 64)), _bits(int4_linear_ref(x.contiguous(), q, scale, 64)))
    assert _run(torch.empty(0, k), q, scale, 64).shape == (0, n)
    x = torch.randn(4, k, generator=gen)
    x[1, 5] = float("nan")
    x[2, 0] = float("inf")
    y = _run(x, q, scale, 64)
    assert torch.isnan(y[1]).all() and torch.isnan(y[2]).all()
    assert torch.equal(_bits(y[[0, 3]]), _bits(int4_linear_ref(x[[0, 3]], q, scale, 64)))


def test_pack_round_trip_and_layout(gen):
    for n, k, gs in [(5, 24, 8), (33, 256, 128), (16, 13, None)]:
        q, scale = quantize_weight_grouped(torch.randn(n, k, generator=gen), 4, gs)
        w4, g_scale, corr = pack_int4_weights(q, scale, gs)
        assert torch.equal(unpack_int4_weights(w4, n, k), q)
        assert torch.equal(unpack_group_scales(g_scale, n, group_count(k, gs)), scale)
    # one panel, K = 8: byte (channel c, j) holds k = j in its low nibble and k = 4 + j in its high one, each
    # as the weight + 8
    q = torch.arange(-8, 8, dtype=torch.int8).repeat(16, 1)[:, :8]
    w4, _, _ = pack_int4_weights(q, torch.ones(16, 1), None)
    assert w4[:4].tolist() == [0 | (4 << 4), 1 | (5 << 4), 2 | (6 << 4), 3 | (7 << 4)]
    # padding weights are 0: nibble 8 (N = 5 of a 16-channel panel, K = 5 of 8)
    w4, _, _ = pack_int4_weights(torch.zeros(5, 5, dtype=torch.int8), torch.ones(5, 1), None)
    assert w4.tolist() == [0x88] * 64


def test_bad_operands_are_refused_naming_what_was_expected(gen):
    k, n = 64, 16
    q, scale = quantize_weight_grouped(torch.randn(n, k, generator=gen), 4, 32)
    w4, g_scale, corr = pack_int4_weights(q, scale, 32)
    x = torch.randn(2, k)
    with pytest.raises(ValueError, match="3 weight groups do not split K=64"):
        int4_linear_cpu(x, w4, g_scale, corr, None, n, 3)
    with pytest.raises(ValueError, match="packed weight must be 1-D uint8 of 512 bytes for K=64, N=16"):
        int4_linear_cpu(x, w4[:-1], g_scale, corr, None, n, 2)
    with pytest.raises(ValueError, match="g_scale must be 1-D float32 of 32"):
        int4_linear_cpu(x, w4, g_scale[:-1], corr, None, n, 2)
    with pytest.raises(ValueError, match="packed weight must be 1-D uint8 of 1024 bytes for K=128"):
        int4_linear_cpu(torch.randn(2, 128), w4, g_scale, corr, None, n, 2)
    with pytest.raises(TypeError, match="x must be float32"):
        int4_linear_cpu(x.double(), w4, g_scale, corr, None, n, 2)
    with pytest.raises(ValueError, match=r"group_size=48 does not divide in_features=64"):
        Int4Linear(64, 16, group_size=48, name="proj")
    with pytest.raises(ValueError, match=r"Int4Linear\(proj\): weight_bits=5 must be one of \(2, 3, 4\)"):
        Int4Linear(64, 16, weight_bits=5, name="proj")
    with pytest.raises(ValueError, match="group_size must be None .* or a positive multiple of 8, got 12"):
        quantize_weight_grouped(torch.randn(4, 48), 4, 12)


def test_layer_matches_reference_and_shares_input_with_int8(isa, gen):
    lin = nn.Linear(256, 96)
    a = Int4Linear.from_float(lin, group_size=64, activation="gelu")
    q, scale = quantize_weight_grouped(lin.weight.detach(), 4, 64)
    x = torch.randn(3, 5, 256, generator=gen)
    assert torch.equal(_bits(a(x)), _bits(int4_linear_ref(x, q, scale, 64, lin.bias.detach(), "gelu")))
    b = Int8Linear.from_float(nn.Linear(256, 40))
    c = Int4Linear.from_float(nn.Linear(256, 24), group_size=None, weight_bits=3)
    alone = [m(x) for m in (a, b, c)]
    shared = int8_linear_shared_input_cpu(x, [m._operands() for m in (a, b, c)])
    assert all(torch.equal(_bits(s), _bits(e)) for s, e in zip(shared, alone))
    group = SharedInputGroup([a, b, c])
    assert all(torch.equal(_bits(m(x)), _bits(e)) for m, e in zip((a, b, c), alone))
    group.dissolve()


def test_many_threads_one_layer(gen):
    layer = Int4Linear.from_float(nn.Linear(512, 256), group_size=128)
    xs = [torch.randn(m, 512, generator=gen) for m in (1, 3, 8, 17) * 4]
    expected = [layer(x) for x in xs]
    results = [None] * len(xs)

    def work(i):
        for _ in range(5):
            results[i] = layer(xs[i])

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(xs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(torch.equal(r, e) for r, e in zip(results, expected))


def test_convert_runs_4_bit_quantized_layers_on_int4(gen):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 32)).eval()
    x = torch.randn(16, 64, generator=gen)
    pc.quantize(model, [x], weight_bits=4)
    simulated = model(x)
    converted = pc.convert(copy.deepcopy(model), policy="state")
    layers = [m for m in converted.modules() if isinstance(m, Int4Linear)]
    assert [m.weight_bits for m in layers] == [4, 4]
    # the same integers and scales as the simulation; only the kernels' rounding differs
    for name, layer in (("0", layers[0]), ("2", layers[1])):
        q_sim, scale_sim = pc.quant.quantized_weight(model.get_submodule(name))
        q, scale = layer.quantized_weight()
        assert torch.equal(q, q_sim) and torch.equal(scale.reshape(-1), scale_sim.reshape(-1))
    y = converted(x)
    assert ((y - simulated).norm() / simulated.norm()) < 0.02
    report = pc.verify(converted, model, x)
    assert report.ok, str(report)


def test_convert_policy_int4_and_summary_bytes():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(384, 1536), nn.GELU(), nn.Linear(1536, 384)).eval()
    float_bytes = sum(p.numel() * 4 for p in model.parameters())
    pc.convert(model, policy="int4")
    layers = [m for m in model.modules() if isinstance(m, Int4Linear)]
    assert [(m.group_size, m.activation) for m in layers] == [(128, "gelu"), (128, "none")]
    rows = pc.summary(model).rows
    assert [r.format for r in rows] == ["int4", "int4"]
    packed = sum(m.packed_bytes() for m in layers)
    # 4 bits a weight plus a float scale per 128 weights and per-channel corr / bias
    assert packed == 2 * 384 * 1536 // 2 + 4 * (2 * 1536 * 384 // 128) + 4 * (1536 + 384) * 2
    assert 7.3 < float_bytes / packed < 32 / 4.25  # 4.25 bits a weight with g128 float scales, plus corr and bias


def test_load_refuses_inconsistent_int4_tensors(tmp_path, gen):
    model = nn.Sequential(nn.Linear(60, 30)).eval()  # per channel (no group size divides 60), K and N padded
    pc.convert(model, policy="int4")
    path = tmp_path / "m.safetensors"
    state = {k: v.clone() for k, v in model.state_dict().items() if torch.is_tensor(v)}
    layer = model[0]
    cases = {
        "corr": ("corr does not match", lambda t: t["0.corr"].add_(1.0)),
        "scale": ("g_scale must be finite and > 0", lambda t: t["0.g_scale"].__setitem__(0, -1.0)),
        "padding": ("nonzero padding", lambda t: t["0.w4"].fill_(0x11)),
    }
    for what, (message, corrupt) in cases.items():
        tensors = {k: v.clone() for k, v in state.items()}
        corrupt(tensors)
        with pytest.raises(ValueError, match=message):
            layer.validate_tensors(tensors, "0.", "0")
    pc.save(model, path)
    x = torch.randn(3, 60, generator=gen)
    assert torch.equal(pc.load(path)(x), model(x))
