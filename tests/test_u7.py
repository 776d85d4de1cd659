"""The u7 activation format (act_bits=7) through the layers, convert, save/load and shared inputs.

The kernels' u7 numbers are checked bit for bit in test_q8_linear.py; here the layers carry the
setting everywhere it matters and compute exactly what the reference computes."""

from __future__ import annotations

import copy
import os
import tempfile

import pytest
import torch
from torch import nn

import pycompress as pc
from pycompress.nn import Int8Conv2d, Int8Linear
from pycompress.reference import int8_linear_ref, quantize_weight_per_channel


def _linear(k, n, gen):
    lin = nn.Linear(k, n)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(n, k, generator=gen) / k**0.5)
        lin.bias.copy_(torch.randn(n, generator=gen))
    return lin


@pytest.mark.parametrize("static", [None, (0.03, 60)])
def test_int8_linear_u7_bit_exact_eager_and_traced(isa, static, gen):
    lin = _linear(67, 45, gen)
    mod = Int8Linear.from_float(lin, activation="gelu", act_scale=static and static[0],
                                act_zero_point=static[1] if static else 0, act_bits=7)
    q, scale = quantize_weight_per_channel(lin.weight)
    for m in (1, 3, 9, 40):
        x = torch.randn(m, 67, generator=gen)
        ref = int8_linear_ref(x, q, scale, lin.bias.detach(), "gelu", static, act_bits=7)
        assert torch.equal(mod(x), ref), m  # the eager native plan
        assert torch.equal(torch.compile(mod, fullgraph=True)(x), ref), m  # the op
    assert "activations=uint7" in repr(mod)


def test_int8_linear_refuses_other_activation_widths():
    with pytest.raises(ValueError, match=r"activation bits must be one of \(7, 8\), got 6"):
        Int8Linear(8, 8, act_bits=6)


def test_int8_conv2d_u7_matches_the_linear_over_im2col(isa, gen):
    conv = nn.Conv2d(5, 18, 3, padding=1, stride=2)
    mod = Int8Conv2d.from_float(conv, act_bits=7)
    x = torch.randn(2, 5, 11, 9, generator=gen)
    cols = nn.functional.unfold(x, 3, padding=1, stride=2)  # [B, C*9, L] in (c, i, j) order
    ho, wo = 6, 5
    cols = cols.view(2, 5, 9, ho * wo).permute(0, 3, 2, 1).reshape(2 * ho * wo, 45)  # (i, j, c) order
    q, scale = quantize_weight_per_channel(conv.weight.detach().permute(0, 2, 3, 1).reshape(18, 45))
    ref = int8_linear_ref(cols, q, scale, conv.bias.detach(), act_bits=7).view(2, ho, wo, 18).permute(0, 3, 1, 2)
    assert torch.equal(mod(x), ref)


def test_quantize_act_bits_7_converts_to_u7_layers_close_to_the_simulated_model(gen):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 96), nn.ReLU(), nn.Linear(96, 32)).eval()
    calibration = [torch.randn(16, 64, generator=gen) for _ in range(3)]
    for activations in ("dynamic", "static"):
        m = copy.deepcopy(model)
        pc.quantize(m, calibration, activations=activations, act_bits=7)
        simulated = copy.deepcopy(m)
        pc.convert(m, policy="int8")
        assert [layer.act_bits for layer in (m[0], m[2])] == [7, 7]
        x = torch.randn(8, 64, generator=gen)
        report = pc.verify(m, simulated, x)
        assert report.ok, str(report)


def test_convert_act_bits_option(gen):
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 16))
    converted = pc.convert(copy.deepcopy(model), policy="int8", act_bits=7)
    assert [converted[0].act_bits, converted[2].act_bits] == [7, 7]
    exact = pc.convert(copy.deepcopy(model), policy="int8", act_bits=8)
    assert [exact[0].act_bits, exact[2].act_bits] == [8, 8]
    x = torch.randn(4, 64, generator=gen)
    assert not torch.equal(converted(x), exact(x))  # a coarser activation grid
    # Unquantized layers default to u7 exactly where it has the faster kernel (AVX2 without VNNI).
    default = pc.convert(copy.deepcopy(model), policy="int8")
    expected = 7 if pc.get_isa() == "avx2" else 8
    assert pc.build_info()["u7_kernel"] == (expected == 7)
    assert [default[0].act_bits, default[2].act_bits] == [expected, expected]
    # A layer pycompress.quantize simulated at 8 bits stays at 8 on every tier.
    quantized = copy.deepcopy(model)
    pc.quantize(quantized, [torch.randn(8, 64, generator=gen)])
    pc.convert(quantized, policy="int8")
    assert [quantized[0].act_bits, quantized[2].act_bits] == [8, 8]
    with pytest.raises(ValueError, match=r"act_bits must be None or one of \(7, 8\), got 4"):
        pc.convert(copy.deepcopy(model), act_bits=4)


def test_convert_refuses_a_static_zero_point_beyond_u7(gen):
    model = nn.Sequential(nn.Linear(16, 16))
    # Inputs that are all negative calibrate an 8-bit zero point of 255.
    pc.quantize(model, [-torch.rand(8, 16, generator=gen) - 1.0], activations="static")
    with pytest.raises(ValueError, match="zero point 255 cannot run 7-bit activations"):
        pc.convert(model, policy="int8", act_bits=7)


def test_u7_survives_save_load_and_state_dict(gen):
    model = nn.Sequential(nn.Linear(40, 48), nn.GELU(), nn.Linear(48, 8))
    pc.convert(model, policy="int8", act_bits=7)
    x = torch.randn(5, 40, generator=gen)
    path = os.path.join(tempfile.mkdtemp(), "u7.safetensors")
    pc.save(model, path)
    restored = pc.load(path)
    assert [restored[0].act_bits, restored[2].act_bits] == [7, 7]
    assert torch.equal(restored(x), model(x))
    fresh = Int8Linear(40, 48, activation="gelu")
    fresh.load_state_dict(model[0].state_dict())
    assert fresh.act_bits == 7 and torch.equal(fresh(x), model[0](x))


def test_shared_input_group_runs_u7_members_together(gen):
    from pycompress.nn import SharedInputGroup

    a = Int8Linear.from_float(_linear(32, 24, gen), act_bits=7)
    b = Int8Linear.from_float(_linear(32, 40, gen), act_bits=7)
    alone = [copy.deepcopy(a), copy.deepcopy(b)]
    SharedInputGroup([a, b], adjacent=True)
    x = torch.randn(6, 32, generator=gen)
    assert torch.equal(a(x), alone[0](x)) and torch.equal(b(x), alone[1](x))
    assert not SharedInputGroup.compatible([a, Int8Linear.from_float(_linear(32, 8, gen))])
