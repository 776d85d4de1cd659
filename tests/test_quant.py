"""PTQ / QAT: observers, fake quant against the kernels' reference, QuantState, BN folding, errors."""

import copy

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

import pycompress as pc
from pycompress.quant import (
    MinMaxObserver,
    MSEObserver,
    PercentileObserver,
    affine_qparams,
    fold_conv_bn,
    get_quant_state,
    quantized_weight,
)
from pycompress.reference.q8 import int8_linear_ref, quantize_rows_ref, quantize_weight_per_channel


def mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(24, 40), nn.ReLU(), nn.Linear(40, 10))


def test_affine_qparams_hand_computed():
    assert affine_qparams(-1.0, 3.0) == (pytest.approx(4.0 / 255), 64)  # round(1 / (4/255)) = round(63.75)
    assert affine_qparams(0.5, 2.55) == (pytest.approx(0.01), 0)  # range widened to include 0
    assert affine_qparams(-2.55, -1.0) == (pytest.approx(0.01), 255)
    scale, zp = affine_qparams(0.0, 0.0)
    assert scale == torch.finfo(torch.float32).tiny and zp == 0


def test_minmax_observer_hand_computed():
    obs = MinMaxObserver()
    obs.update(torch.tensor([-1.0, 0.5, 2.0]))
    obs.update(torch.tensor([[0.0, 3.0], [float("nan"), -0.5]]))
    assert obs.range() == (-1.0, 3.0)
    assert obs.qparams() == affine_qparams(-1.0, 3.0)


def test_percentile_observer_hand_computed():
    obs = PercentileObserver(percentile=99.0)
    obs.update(torch.arange(0, 501, dtype=torch.float32))  # 0..500
    obs.update(torch.arange(501, 1001, dtype=torch.float32))  # ..1000
    lo, hi = obs.range()
    # linear interpolation on 1001 sorted values: position 0.01 * 1000 = 10, 0.99 * 1000 = 990
    assert (lo, hi) == (pytest.approx(10.0), pytest.approx(990.0))
    assert obs.qparams() == (pytest.approx(990.0 / 255), 0)


def test_mse_observer_clips_outliers_and_keeps_exact_ranges():
    exact = MSEObserver()
    exact.update(torch.tensor([0.0, 1.0, 0.0, 1.0]))  # representable exactly with the full range
    assert exact.qparams() == (pytest.approx(1.0 / 255), 0)
    # A long-tailed (Laplace) distribution at 4 bits: clipping the tail beats covering it.
    torch.manual_seed(0)
    data = torch.distributions.Laplace(0.0, 1.0).sample((50000,))
    mse, minmax = MSEObserver(bits=4), MinMaxObserver(bits=4)
    mse.update(data)
    minmax.update(data)
    s_mse, zp_mse = mse.qparams()
    s_mm, zp_mm = minmax.qparams()
    assert s_mse < 0.6 * s_mm
    err = lambda s, z: float((pc.quant.fake_quantize_affine(data, s, z, 4) - data).pow(2).mean())  # noqa: E731
    assert err(s_mse, zp_mse) < 0.5 * err(s_mm, zp_mm)


@pytest.mark.parametrize("activations", ["static", "dynamic"])
@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_linear_simulates_the_int8_kernel_reference(activations, bits):
    model = mlp()
    torch.manual_seed(1)
    calib = [torch.randn(16, 24) for _ in range(3)]
    pc.quantize(model, calib, weight_bits=bits, activations=activations)
    x = torch.randn(9, 24) * 1.5
    for layer, inp in ((model[0], x), (model[2], torch.relu(model[0](x)))):
        state = get_quant_state(layer)
        q, scale = quantized_weight(layer)
        assert torch.equal(scale, state.weight_scale)
        assert int(q.abs().max()) <= 2 ** (bits - 1) - 1
        static = (state.act_scale, state.act_zero_point) if activations == "static" else None
        expected = int8_linear_ref(inp, q, scale, layer.bias.detach(), static=static)
        torch.testing.assert_close(layer(inp), expected, rtol=1e-5, atol=1e-5)


def test_quant_state_fields_and_weight_convention():
    model = mlp()
    pc.quantize(model, [torch.randn(32, 24)], activations="static")
    state = get_quant_state(model[0])
    assert state.weight_bits == 8 and state.activations == "static" and state.act_bits == 8
    assert state.weight_scale.dtype == torch.float32 and state.weight_scale.shape == (40,)
    _, expected_scale = quantize_weight_per_channel(model[0].parametrizations.weight.original.detach(), 8)
    assert torch.equal(state.weight_scale, expected_scale)
    assert isinstance(state.act_scale, float) and 0 <= state.act_zero_point <= 255
    assert get_quant_state(model[1]) is None and get_quant_state(nn.Linear(2, 2)) is None
    dynamic = pc.quantize(mlp(), activations="dynamic")
    s = get_quant_state(dynamic[2])
    assert s.activations == "dynamic" and s.act_scale is None and s.act_zero_point == 0


def test_static_activation_fake_quant_matches_quantize_rows_ref():
    model = nn.Sequential(nn.Linear(8, 4))
    pc.quantize(model, [torch.randn(64, 8)], activations="static")
    state = get_quant_state(model[0])
    x = torch.randn(5, 8) * 3
    q, _, zp, _ = quantize_rows_ref(x, (state.act_scale, state.act_zero_point))
    expected = (q.float() - zp[:, None].float()) * torch.tensor(state.act_scale, dtype=torch.float32)
    assert torch.equal(model[0].activation_fake_quant(x), expected)


def test_pruned_weights_stay_zero_after_quantization():
    model = pc.prune(mlp(), 0.7)
    mask = pc.prune.get_mask(model[0])
    pc.quantize(model, [torch.randn(8, 24)], weight_bits=4, activations="static")
    q, _ = quantized_weight(model[0])
    assert (q[~mask] == 0).all()
    assert (model[0].weight[~mask] == 0).all()


def test_conv_bn_folding_preserves_the_function():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Flatten(), nn.Linear(8 * 4 * 4, 6), nn.BatchNorm1d(6))
    for bn in (model[1], model[5]):
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
        nn.init.uniform_(bn.weight, 0.5, 2)
        nn.init.uniform_(bn.bias, -1, 1)
    model.eval()
    x = torch.randn(4, 3, 6, 6)
    ref = model(x)
    assert fold_conv_bn(model) == [("0", "1"), ("4", "5")]
    assert isinstance(model[1], nn.Identity) and isinstance(model[5], nn.Identity)
    torch.testing.assert_close(model(x), ref, rtol=1e-4, atol=1e-5)


def test_qat_straight_through_gradients_and_range_learning():
    model = mlp()
    pc.prepare_qat(model, weight_bits=4)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x = torch.randn(32, 24)
    for _ in range(3):
        loss = model(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        grad = model[0].parametrizations.weight.original.grad
        assert grad is not None and grad.abs().sum() > 0
        opt.step()
    afq = model[0].activation_fake_quant
    assert bool(afq.initialized) and float(afq.range_min) < 0 < float(afq.range_max)
    model.eval()
    frozen = float(afq.scale)
    model(x * 10)  # eval forwards do not move the range
    assert float(afq.scale) == frozen
    assert get_quant_state(model[0]).act_scale == pytest.approx(frozen)


def test_qat_on_a_pruned_model_keeps_sparsity():
    model = pc.prune(mlp(), 0.8)
    mask = pc.prune.get_mask(model[2])
    pc.prepare_qat(model)
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    model.train()
    for _ in range(5):
        loss = model(torch.randn(16, 24)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert (model[2].weight[~mask] == 0).all()
    assert (quantized_weight(model[2])[0][~mask] == 0).all()


def test_empty_calibration_data_is_rejected():
    model = mlp()
    with pytest.raises(ValueError, match=r"quantize: calibration_batches is empty; pass at least one batch"):
        pc.quantize(model, [], activations="static")
    with pytest.raises(ValueError, match=r"quantize: calibration_batches is empty"):
        pc.quantize(model, iter([]), activations="dynamic")
    with pytest.raises(ValueError, match=r"static activations need calibration_batches"):
        pc.quantize(model, None, activations="static")
    with pytest.raises(TypeError, match=r"not one tensor; wrap it: \[x\]"):
        pc.quantize(model, torch.randn(4, 24), activations="static")
    assert all(get_quant_state(m) is None for m in model)


def test_calibration_failure_leaves_no_half_quantized_model():
    model = mlp()
    with pytest.raises(RuntimeError):
        pc.quantize(model, [torch.randn(4, 24), torch.randn(4, 23)], activations="static")
    assert all(get_quant_state(m) is None and not hasattr(m, "activation_fake_quant") for m in model)
    assert not any(m._forward_pre_hooks for m in model)
    pc.quantize(model, [torch.randn(4, 24)], activations="static")  # and it can be quantized afterwards
    assert get_quant_state(model[0]) is not None


def test_qat_on_a_converted_model_is_rejected():
    model = nn.Sequential(pc.nn.Int8Linear.from_float(nn.Linear(8, 8), name="fc1"), nn.ReLU(), nn.Linear(8, 2))
    with pytest.raises(ValueError, match=r"prepare_qat: the model is already converted \(0 is Int8Linear\); "
                                         r"prepare_qat needs the float model before pycompress.convert"):
        pc.prepare_qat(model)
    with pytest.raises(ValueError, match=r"quantize: the model is already converted"):
        pc.quantize(model)


def test_other_bad_arguments():
    model = mlp()
    with pytest.raises(ValueError, match=r"weight_bits must be an int in \[2, 8\], got 16"):
        pc.quantize(model, weight_bits=16)
    with pytest.raises(ValueError, match=r"activations must be one of \('dynamic', 'static'\), got 'int8'"):
        pc.quantize(model, activations="int8")
    with pytest.raises(ValueError, match=r"unknown observer 'histogram'"):
        pc.quantize(model, [torch.randn(2, 24)], activations="static", observer="histogram")
    pc.quantize(model)
    with pytest.raises(ValueError, match=r"quantize\(0\): layer is already quantized"):
        pc.quantize(model)
    with pytest.raises(ValueError, match=r"prune\(0\): layer already has parametrizations \['WeightFakeQuant'\] "
                                         r"on weight; prune before quantize/prepare_qat"):
        pc.prune(model, 0.5)
    with pytest.raises(RuntimeError, match=r"static activation range was never observed"):
        pc.prepare_qat(mlp()).eval()(torch.randn(2, 24))


def test_a_grouped_conv_is_refused_naming_exclude_which_keeps_it_float():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(8, 16, 3, groups=4), nn.ReLU(), nn.Conv2d(16, 4, 1)).eval()
    x = torch.randn(2, 8, 6, 6)
    with pytest.raises(ValueError, match=r"quantize\(0\): grouped conv \(groups=4, neither 1 nor in_channels\) has "
                                         r"no pycompress kernel; leave it float with exclude=\['0'\]"):
        pc.quantize(model, [x])
    assert not hasattr(model[2], "activation_fake_quant")  # nothing attached before the refusal
    pc.quantize(model, [x], exclude=["0"])
    assert not hasattr(model[0], "activation_fake_quant") and hasattr(model[2], "activation_fake_quant")


class _AttentionBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.mha = nn.MultiheadAttention(16, 2, batch_first=True)
        self.fc = nn.Linear(16, 8)

    def forward(self, x):
        return self.fc(self.mha(x, x, x, need_weights=False)[0])


@pytest.mark.parametrize("activations", ["static", "dynamic"])
def test_multihead_attention_projections_are_left_float_by_quantize(activations):
    # MHA reads out_proj.weight itself and never calls out_proj: no calibration input reaches it (static used
    # to fail: "the calibration batches never reached this layer"), and convert keeps it float.
    torch.manual_seed(1)
    model = _AttentionBlock().eval()
    batches = [torch.randn(2, 5, 16) for _ in range(2)]
    pc.quantize(model, batches, activations=activations)
    assert not hasattr(model.mha.out_proj, "activation_fake_quant")
    assert not parametrize.is_parametrized(model.mha.out_proj)
    assert hasattr(model.fc, "activation_fake_quant")
    reference = copy.deepcopy(model)
    pc.convert(model, policy="state")
    assert type(model.mha.out_proj) is nn.modules.linear.NonDynamicallyQuantizableLinear
    assert isinstance(model.fc, pc.nn.Int8Linear)
    assert pc.verify(model, reference, batches[0]).ok


def test_a_model_error_on_a_calibration_batch_names_the_step_and_the_batch():
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4)).eval()
    batches = [torch.randn(4, 16), torch.randn(4, 30)]
    with pytest.raises(RuntimeError, match="mat1 and mat2 shapes cannot be multiplied") as info:
        pc.quantize(model, batches, activations="static")
    assert info.value.__notes__ == ["pycompress: raised by the model on quantize: calibration batch 1: "
                                    "a tensor (4, 30) float32"]
    with pytest.raises(RuntimeError) as info:
        pc.quantize(model, [{"input": torch.randn(2, 30)}], method="gptq")
    assert info.value.__notes__[-1] == ("pycompress: raised by the model on quantize: calibration batch 0: "
                                        "a dict {input: (2, 30) float32}")


@pytest.mark.parametrize("geometry", [dict(kernel_size=3, padding=1), dict(kernel_size=3, stride=2, dilation=2, padding=2),
                                      dict(kernel_size=(3, 5), padding="same", dilation=(1, 2)), dict(kernel_size=1),
                                      dict(kernel_size=4, stride=4)])
@pytest.mark.parametrize("bits", [8, 4])
def test_dynamic_conv_simulation_quantizes_im2col_rows_as_the_kernels_do(geometry, bits):
    # The int8 / int4 conv kernels quantize each im2col row (an output position's receptive field, its zero
    # padding included); the simulated model did once per sample, ~1% away from the converted model.
    torch.manual_seed(5)
    model = nn.Sequential(nn.Conv2d(6, 32, **geometry)).eval()
    x = torch.randn(2, 6, 9, 11) * 3
    pc.quantize(model, [x], weight_bits=bits, group_size=None)
    simulated = copy.deepcopy(model)
    pc.convert(model, policy="int8" if bits == 8 else "int4")
    with torch.no_grad():
        want, got = simulated(x), model(x)
        assert (got - want).abs().max() <= 1e-5 * want.abs().max()
        assert simulated(x[:0]).shape == got[:0].shape == (0, *want.shape[1:])
    # The gradient flows straight through the quantization (QAT), to the input and the weight.
    xg = x.clone().requires_grad_()
    simulated(xg).sum().backward()
    assert xg.grad is not None and xg.grad.abs().sum() > 0
    assert pc.prune.masked_float_weight(simulated[0]).grad is not None or simulated[0].parametrizations.weight.original.grad is not None
    # remove_fake_quant gives the plain conv back.
    pc.quant.remove_fake_quant(simulated[0])
    assert "_conv_forward" not in vars(simulated[0])
    assert torch.equal(simulated(x), torch.nn.functional.conv2d(
        x, simulated[0].weight, simulated[0].bias, simulated[0].stride, simulated[0].padding, simulated[0].dilation))
