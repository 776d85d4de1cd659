"""Grouped weight quantization and GPTQ (pc.quantize(method="gptq")): exact formats, error against
round-to-nearest, act_order, sequential calibration, batch kinds, bad input."""

import pytest
import torch
from torch import nn

import pycompress as pc
import pycompress.quant.gptq as gptq_mod
from pycompress.quant import get_quant_state, quantized_weight
from pycompress.quant.fake_quant import weight_from_matrix
from pycompress.quant.gptq import gptq_quantize
from pycompress.reference.q4 import quantize_weight_grouped
from pycompress.reference.q8 import quantize_weight_per_channel


def correlated_inputs(rows, k, seed):
    """Inputs with correlated features and unequal scales (a non-diagonal Hessian, as real activations)."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(k, k, generator=g) / k ** 0.5
    return torch.randn(rows, k, generator=g) @ mix * torch.linspace(0.2, 3.0, k)


def hadamard(n):
    h = torch.ones(1, 1)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def single_linear(k=64, n=32, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(k, n))


def output_error(layer, x, w_ref):
    q, scale = quantized_weight(layer)
    per_k = scale.reshape(q.shape[0], -1).repeat_interleave(q.shape[1] // scale.reshape(q.shape[0], -1).shape[1], 1)
    return float((x @ w_ref.t() - x @ (q.float() * per_k).t()).norm())


@pytest.mark.parametrize("bits,group_size", [(4, 32), (4, None), (8, None), (3, 16)])
def test_gptq_beats_round_to_nearest_on_the_calibration_inputs(bits, group_size):
    x = correlated_inputs(512, 64, seed=1)
    w = single_linear()[0].weight.detach().clone()
    errors = {}
    for method in ("rtn", "gptq"):
        model = single_linear()
        pc.quantize(model, [x[:256], x[256:]], weight_bits=bits, group_size=group_size, method=method)
        errors[method] = output_error(model[0], x, w)
    assert errors["gptq"] < errors["rtn"], errors


def test_gptq_weights_are_exactly_q_times_scale_in_the_kernel_format():
    x = correlated_inputs(256, 64, seed=2)
    model = single_linear()
    pc.quantize(model, [x], weight_bits=4, group_size=32, method="gptq")
    layer = model[0]
    q, scale = quantized_weight(layer)
    state = get_quant_state(layer)
    assert q.dtype == torch.int8 and q.shape == (32, 64)
    assert scale.dtype == torch.float32 and scale.shape == (32, 2)
    assert state.group_size == 32 and torch.equal(state.weight_scale, scale)
    assert int(q.abs().max()) <= 7
    per_k = scale.repeat_interleave(32, dim=1)
    assert torch.equal(layer.weight, q.float() * per_k)  # the fake-quant forward's weight
    # the stored integers re-quantize to themselves with the contract's function
    q2, _ = quantize_weight_grouped(layer.parametrizations.weight.original.detach(), 4, 32, scale=scale)
    assert torch.equal(q2, q)


def test_gptq_with_a_diagonal_hessian_equals_round_to_nearest_exactly():
    x = hadamard(64) * 0.5  # orthogonal rows: X^T X = 16 I, no error to compensate across columns
    for act_order in (False, True):
        for group_size in (32, None):
            model = single_linear(seed=3)
            w = model[0].weight.detach().clone()
            pc.quantize(model, [x], weight_bits=4, group_size=group_size, method="gptq", act_order=act_order)
            q, scale = quantized_weight(model[0])
            q_rtn, s_rtn = quantize_weight_grouped(w, 4, group_size)
            assert torch.equal(q, q_rtn)
            assert torch.equal(scale.reshape(32, -1), s_rtn)
    h = 2 * x.double().t() @ x.double() / 64
    q, s = gptq_quantize(w, h, 8, None)
    q_rtn, s_rtn = quantize_weight_per_channel(w, 8)
    assert torch.equal(q, q_rtn) and torch.equal(s[:, 0], s_rtn)


def test_act_order_uses_static_scales_of_the_original_groups_and_beats_rtn():
    x = correlated_inputs(512, 64, seed=4)
    model = single_linear(seed=4)
    w = model[0].weight.detach().clone()
    pc.quantize(model, [x], weight_bits=4, group_size=16, method="gptq", act_order=True)
    q, scale = quantized_weight(model[0])
    _, static = quantize_weight_grouped(w, 4, 16)
    assert torch.equal(scale, static)  # computed before the permutation and the updates
    assert int(q.abs().max()) <= 7
    rtn = single_linear(seed=4)
    pc.quantize(rtn, [x], weight_bits=4, group_size=16)
    assert output_error(model[0], x, w) < output_error(rtn[0], x, w)


def test_without_act_order_group_scales_come_from_the_updated_weights():
    x = correlated_inputs(512, 64, seed=5)
    model = single_linear(seed=5)
    w = model[0].weight.detach().clone()
    pc.quantize(model, [x], weight_bits=4, group_size=16, method="gptq")
    _, scale = quantized_weight(model[0])
    _, static = quantize_weight_grouped(w, 4, 16)
    assert torch.equal(scale[:, 0], static[:, 0])  # the first group sees no update yet
    assert not torch.equal(scale[:, 1:], static[:, 1:])  # the later ones do


def test_default_group_size_by_bits_and_k():
    model = nn.Sequential(nn.Linear(256, 32), nn.ReLU(), nn.Linear(32, 8))
    pc.quantize(model, weight_bits=4)
    assert get_quant_state(model[0]).group_size == 128 and get_quant_state(model[0]).weight_scale.shape == (32, 2)
    assert get_quant_state(model[2]).group_size is None  # 128 does not divide K=32: per channel
    assert get_quant_state(model[2]).weight_scale.shape == (8,)
    eight = nn.Sequential(nn.Linear(256, 32))
    pc.quantize(eight, weight_bits=8)
    assert get_quant_state(eight[0]).group_size is None and get_quant_state(eight[0]).weight_scale.shape == (32,)
    explicit = nn.Sequential(nn.Linear(256, 32))
    pc.quantize(explicit, weight_bits=8, group_size=64)
    assert get_quant_state(explicit[0]).weight_scale.shape == (32, 4)


def test_grouped_rtn_fake_quant_is_the_contract():
    model = single_linear(k=96, n=16, seed=6)
    pc.quantize(model, weight_bits=3, group_size=32)
    w = model[0].parametrizations.weight.original.detach()
    q_ref, s_ref = quantize_weight_grouped(w, 3, 32)
    q, s = quantized_weight(model[0])
    assert torch.equal(q, q_ref) and torch.equal(s, s_ref) and int(q.abs().max()) <= 3
    assert torch.equal(model[0].weight, q.float() * s.repeat_interleave(32, dim=1))


def test_grouped_conv_uses_the_im2col_order_and_gptq_beats_rtn():
    torch.manual_seed(7)
    conv = nn.Conv2d(8, 16, 3, padding=1)
    w = conv.weight.detach().clone()
    x = torch.randn(16, 8, 6, 6)
    x = x + 0.8 * x.roll(1, dims=1)  # correlated channels
    errors = {}
    for method in ("rtn", "gptq"):
        model = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1))
        model[0].load_state_dict(conv.state_dict())
        pc.quantize(model, [x], weight_bits=4, group_size=24, method=method)
        q, scale = quantized_weight(model[0])
        assert q.shape == (16, 72) and scale.shape == (16, 3)
        deq = weight_from_matrix(q.float() * scale.repeat_interleave(24, dim=1), w.shape, True)
        assert torch.equal(model[0].weight, deq)
        errors[method] = float((nn.functional.conv2d(x, w, padding=1) - nn.functional.conv2d(x, deq, padding=1)).norm())
    gemm = w.permute(0, 2, 3, 1).reshape(16, 72)  # (kh, kw, in): each group is 24 = 3 kw x 8 channels
    model = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1))
    model[0].load_state_dict(conv.state_dict())
    pc.quantize(model, weight_bits=4, group_size=24)
    assert torch.equal(quantized_weight(model[0])[1], quantize_weight_grouped(gemm, 4, 24)[1])
    assert errors["gptq"] < errors["rtn"], errors


def test_layers_are_calibrated_sequentially_on_the_quantized_earlier_layers(monkeypatch):
    torch.manual_seed(8)
    model = nn.Sequential(nn.Linear(32, 48), nn.ReLU(), nn.Linear(48, 8))
    x = correlated_inputs(256, 32, seed=8)
    seen = []
    real = gptq_mod.gptq_quantize
    monkeypatch.setattr(gptq_mod, "gptq_quantize",
                        lambda w, h, *a, **k: (seen.append(h.clone()), real(w, h, *a, **k))[1])
    with torch.no_grad():
        float_hidden = torch.relu(model[0](x)).double()
    pc.quantize(model, [x], weight_bits=4, group_size=16, method="gptq")
    with torch.no_grad():
        hidden = torch.relu(model[0](x)).double()  # the quantized first layer (its fake-quant forward)
    assert len(seen) == 2
    torch.testing.assert_close(seen[1], 2 * hidden.t() @ hidden / 256)
    assert not torch.allclose(seen[1], 2 * float_hidden.t() @ float_hidden / 256)


class KeywordModel(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(9)
        self.a = nn.Linear(32, 32)
        self.b = nn.Linear(32, 16)

    def forward(self, x, gain=None):
        h = torch.relu(self.a(x))
        return self.b(h if gain is None else h * gain)


def test_tensor_tuple_and_dict_batches_calibrate_alike():
    x = correlated_inputs(128, 32, seed=10)
    weights = []
    for batches in ([x], [(x,)], [{"x": x}]):
        model = KeywordModel()
        pc.quantize(model, batches, weight_bits=4, group_size=16, method="gptq")
        weights.append(model.b.weight.detach().clone())
    assert torch.equal(weights[0], weights[1]) and torch.equal(weights[0], weights[2])
    gained = KeywordModel()
    pc.quantize(gained, [{"x": x, "gain": torch.linspace(0.1, 4.0, 32)}], weight_bits=4, group_size=16,
                method="gptq")
    assert not torch.equal(gained.b.weight, weights[0])  # the keyword reached the model


def test_gptq_keeps_pruned_weights_at_zero():
    x = correlated_inputs(256, 64, seed=11)
    model = pc.prune(single_linear(seed=11), 0.6)
    mask = pc.prune.get_mask(model[0])
    pc.quantize(model, [x], weight_bits=4, group_size=32, method="gptq")
    q, _ = quantized_weight(model[0])
    assert (q[~mask] == 0).all() and (model[0].weight[~mask] == 0).all()


def test_dead_inputs_get_zero_weights_as_in_the_reference():
    x = correlated_inputs(256, 64, seed=12)
    x[:, 5] = 0
    model = single_linear(seed=12)
    pc.quantize(model, [x], weight_bits=4, group_size=32, method="gptq")
    q, _ = quantized_weight(model[0])
    assert (q[:, 5] == 0).all() and (q[:, 4] != 0).any()


def test_gptq_bad_input():
    x = correlated_inputs(256, 64, seed=13)
    with pytest.raises(ValueError, match="method='gptq' needs calibration_batches"):
        pc.quantize(single_linear(), weight_bits=4, method="gptq")
    with pytest.raises(ValueError, match="unknown method 'awq'"):
        pc.quantize(single_linear(), [x], method="awq")
    with pytest.raises(ValueError, match=r"quantize\(0\).*group_size=48 does not divide"):
        pc.quantize(single_linear(), [x], weight_bits=4, group_size=48)
    with pytest.raises(ValueError, match="positive multiple of 8"):
        pc.quantize(single_linear(), [x], weight_bits=4, group_size=12)
    with pytest.raises(ValueError, match="percdamp"):
        pc.quantize(single_linear(), [x], method="gptq", percdamp=0.0)
    depthwise = nn.Sequential(nn.Conv2d(4, 4, 3, groups=4))
    with pytest.raises(ValueError, match=r"quantize\(0\).*groups=4"):
        pc.quantize(depthwise, [torch.randn(2, 4, 8, 8)], method="gptq")


def test_too_few_calibration_rows_name_the_layer_and_the_rank_deficit():
    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 4))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match=r"quantize\(2\).*40 input rows for 64 live input features.*rank deficit "
                                         r"of at least 24"):
        pc.quantize(model, [torch.randn(40, 16)], weight_bits=4, group_size=16, method="gptq")
    # nothing is left half-quantized: no fake quant, the float weights restored
    assert get_quant_state(model[0]) is None and get_quant_state(model[2]) is None
    after = dict(model.named_parameters())
    assert before.keys() == after.keys() and all(torch.equal(before[n], after[n]) for n in before)


@pytest.mark.parametrize("conv", [
    dict(kernel_size=3, padding=1), dict(kernel_size=3, stride=2, dilation=2, padding=2, padding_mode="reflect"),
    dict(kernel_size=(3, 5), padding="same", padding_mode="circular"), dict(kernel_size=(2, 3), padding="same"),
    dict(kernel_size=3, padding="valid", groups=2)])
def test_a_convs_im2col_rows_times_its_weight_are_its_output(conv):
    # layer_input_rows / conv_im2col are the rows GPTQ's Hessians and the dynamic conv simulation use: with the
    # padding the conv applies (its padding_mode, "same" / "valid"), rows x weight^T is the conv's output.
    import warnings

    from pycompress.calibration import conv_im2col, layer_input_rows

    torch.manual_seed(7)
    layer = nn.Conv2d(4, 6, bias=False, **conv).double()
    x = torch.randn(2, 4, 9, 11, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torch's note on 'same' with an even kernel
        want = layer(x)
    rows = layer_input_rows(layer, x)
    _, (ho, wo) = conv_im2col(layer, x)
    assert (ho, wo) == want.shape[-2:] and rows.shape == (2 * ho * wo, 4 * layer.kernel_size[0] * layer.kernel_size[1])
    g = layer.groups
    k = rows.shape[1] // g
    got = torch.cat([rows[:, i * k:(i + 1) * k] @ layer.weight[i * 6 // g:(i + 1) * 6 // g].reshape(6 // g, -1).t()
                     for i in range(g)], dim=1)
    assert torch.allclose(got.reshape(2, ho, wo, 6).permute(0, 3, 1, 2), want, atol=1e-12)
