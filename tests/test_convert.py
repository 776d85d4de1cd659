"""pycompress.convert: which layers become what, and why; bad input; memory; summary bytes."""

from __future__ import annotations

import copy
import gc
import importlib
import re
import weakref
from dataclasses import dataclass

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

import pycompress as pc
from pycompress import _C
convert_mod = importlib.import_module("pycompress.conversion")
from pycompress.nn import Int8Conv2d, Int8Linear
from pycompress.reference import unpack_int8_weights


class Shared(nn.Module):
    """One Linear reached by two paths, nested containers, a Conv2d."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(32, 32)
        self.blocks = nn.ModuleList([nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 32))])
        self.blocks[0].add_module("tied", self.proj)
        self.conv = nn.Conv2d(2, 4, 3, padding=1)

    def forward(self, x):
        h = self.proj(x)
        h = self.blocks[0][2](self.blocks[0][1](self.blocks[0][0](h)))
        h = self.blocks[0].tied(h)
        img = self.conv(h[:, :18].reshape(-1, 2, 3, 3))
        return h, img


def test_nested_and_shared_modules_convert_once():
    torch.manual_seed(0)
    model = Shared().eval()
    ref = copy.deepcopy(model)
    x = torch.randn(5, 32)
    pc.convert(model, policy="int8")
    assert isinstance(model.proj, Int8Linear) and model.proj is model.blocks[0].tied
    assert model.proj.name == "proj"
    assert isinstance(model.conv, Int8Conv2d)
    record = convert_mod.conversion_record(model)
    shared = next(r for r in record.layers if r.name == "proj")
    assert shared.aliases == ["proj", "blocks.0.tied"]
    report = pc.verify(model, ref, x)
    assert report.ok, str(report)


def test_policy_float_and_exclude_and_overrides():
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.Linear(64, 8))
    pc.convert(model, policy="int8", exclude=["2"], overrides={"3": "float"})
    assert isinstance(model[0], Int8Linear)
    assert type(model[2]) is nn.Linear and type(model[3]) is nn.Linear
    reasons = {r.name: r.reason for r in convert_mod.conversion_record(model).layers}
    assert reasons["2"] == "excluded by pattern '2'"
    assert reasons["3"] == "override '3'"
    untouched = nn.Sequential(nn.Linear(64, 64))
    pc.convert(untouched, policy="float")
    assert type(untouched[0]) is nn.Linear


def test_fnmatch_override_wins_over_policy():
    model = nn.Sequential(nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 16)), nn.Linear(16, 16))
    pc.convert(model, policy="float", overrides={"0.*": "int8"})
    assert isinstance(model[0][0], Int8Linear) and isinstance(model[0][1], Int8Linear)
    assert type(model[1]) is nn.Linear


def test_unknown_policy_and_format_are_rejected():
    with pytest.raises(ValueError, match="policy 'fast'"):
        pc.convert(nn.Linear(4, 4), policy="fast")
    with pytest.raises(ValueError, match="override '0' -> 'int3'"):
        pc.convert(nn.Sequential(nn.Linear(4, 4)), overrides={"0": "int3"})


def _timed_choice(rec) -> str:
    """The format the timed policy must pick from a layer's timings: the fastest candidate that beats float
    by the policy's documented margin (AUTO_MIN_SPEEDUP), else float."""
    limit = rec.timings_us["float"] / convert_mod.AUTO_MIN_SPEEDUP
    faster = {fmt: us for fmt, us in rec.timings_us.items() if fmt != "float" and us < limit}
    return min(faster, key=faster.get) if faster else "float"


def test_auto_with_example_inputs_picks_the_fastest_timed_candidate():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 512), nn.Linear(512, 512))
    x = torch.randn(8, 4)
    pc.convert(model, example_inputs=x)
    for rec in convert_mod.conversion_record(model).layers:
        assert set(rec.timings_us) == {"float", "int8-dynamic"}, rec
        assert rec.input_shape is not None
        assert rec.format == _timed_choice(rec), rec
    assert model(x).shape == (8, 512)


def test_auto_without_inputs_uses_the_size_heuristic():
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 4096), nn.Linear(4096, 8))
    pc.convert(model)
    assert type(model[0]) is nn.Linear
    assert isinstance(model[1], Int8Linear) and isinstance(model[2], Int8Linear)
    reasons = {r.name: r.reason for r in convert_mod.conversion_record(model).layers}
    assert "64 weights < 16384" in reasons["0"]


def test_verify_inputs_keeps_layers_over_budget_in_float():
    torch.manual_seed(0)
    bad = nn.Linear(64, 64)
    with torch.no_grad():
        bad.weight[:, 0] = 0  # the outlier feature contributes nothing; int8 per-row quantization flattens the rest
    model = nn.Sequential(bad, nn.Linear(64, 64))
    x = torch.randn(16, 64)
    x[:, 0] = 1e4
    pc.convert(model, policy="int8", verify_inputs=x)
    assert type(model[0]) is nn.Linear
    assert isinstance(model[1], Int8Linear)
    reasons = {r.name: r.reason for r in convert_mod.conversion_record(model).layers}
    assert reasons["0"].startswith("kept float: int8-dynamic measured")
    assert "verified" in reasons["1"]


def test_convert_twice_raises():
    model = nn.Sequential(nn.Linear(8, 8))
    pc.convert(model, policy="int8")
    with pytest.raises(RuntimeError, match="already converted"):
        pc.convert(model, policy="int8")


def test_model_without_linear_or_conv_is_returned_unchanged():
    model = nn.Sequential(nn.ReLU(), nn.LayerNorm(4))
    assert pc.convert(model) is model
    assert "no nn.Linear or nn.Conv2d" in str(pc.summary(model))


def test_unsupported_layers_stay_float_with_the_reason():
    model = nn.Sequential(nn.Conv2d(8, 8, 3, groups=8), nn.Conv2d(8, 16, 1), nn.Linear(4, 4).double())
    mha = nn.MultiheadAttention(16, 2)
    holder = nn.ModuleDict({"convs": model, "mha": mha})
    pc.convert(holder, policy="int8")
    reasons = {r.name: (r.format, r.reason) for r in convert_mod.conversion_record(holder).layers}
    assert reasons["convs.0"][0] == "float" and "depthwise conv (groups=8)" in reasons["convs.0"][1]
    assert reasons["convs.1"][0] == "int8-dynamic"
    assert reasons["convs.2"][0] == "float" and "torch.float64" in reasons["convs.2"][1]
    assert reasons["mha.out_proj"][0] == "float" and "MultiheadAttention" in reasons["mha.out_proj"][1]
    table = str(pc.summary(holder))
    assert "depthwise conv (groups=8)" in table


def test_model_not_on_cpu_is_a_clear_error():
    model = nn.Sequential(nn.Linear(4, 4, device="meta"))
    with pytest.raises(RuntimeError, match=r"layer 0 is on meta"):
        pc.convert(model)


def _fake_cuda_linear():
    """An nn.Linear whose parameters are fake CUDA tensors (no GPU needed: convert only reads their device before
    refusing)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        weight, bias = nn.Parameter(torch.empty(4, 4, device="cuda")), nn.Parameter(torch.empty(4, device="cuda"))
    layer = nn.Linear(4, 4, device="meta")
    layer.weight, layer.bias = weight, bias
    return layer


def test_a_cuda_model_without_a_usable_cuda_module_is_refused_with_the_reason():
    status = pc.build_info()["cuda"]
    if status["usable"]:
        pytest.skip("a CUDA device is usable here (tests/test_cuda.py converts on it)")
    with pytest.raises(RuntimeError, match="convert: the model is on cuda:0, but " + re.escape(status["reason"])):
        pc.convert(nn.Sequential(_fake_cuda_linear()))


def test_on_cuda_only_formats_with_a_cuda_kernel_are_accepted(monkeypatch):
    from pycompress import _cuda

    monkeypatch.setattr(_cuda, "status", lambda: {"usable": True, "reason": ""})
    model = nn.Sequential(_fake_cuda_linear())
    with pytest.raises(ValueError, match=r"policy 'sparse-fp32' makes formats without a CUDA kernel of the CPU's bits; "
                                         r"on cuda:0 use one of \('auto', 'int8', 'float', 'int8-dynamic', 'int8-static', 'sparse-int8', "
                                         r"'int4'\)"):
        pc.convert(model, policy="sparse-fp32")
    with pytest.raises(ValueError, match=r"override '0' -> 'sparse-fp32' has no CUDA kernel of the CPU's bits"):
        pc.convert(model, policy="int8", overrides={"0": "sparse-fp32"})
    with pytest.raises(RuntimeError, match=r"layers are on several devices \(cpu, cuda:0\): move it to one first"):
        pc.convert(nn.Sequential(nn.Linear(4, 4), _fake_cuda_linear()))


def test_runtime_shape_error_names_the_layer():
    model = nn.Sequential(nn.Sequential(nn.Linear(16, 8)))
    pc.convert(model, policy="int8")
    with pytest.raises(ValueError, match=r"Int8Linear\(0.0\): input has shape \(2, 12\)"):
        model(torch.randn(2, 12))


class _Mask(nn.Module):
    def __init__(self, mask):
        super().__init__()
        self.register_buffer("mask", mask)

    def forward(self, w):
        return w * self.mask


def test_parametrized_masks_are_read_and_baked():
    torch.manual_seed(0)
    lin, kept = nn.Linear(32, 16), nn.Linear(32, 16)
    mask = (torch.rand(16, 32) > 0.5).float()
    parametrize.register_parametrization(lin, "weight", _Mask(mask))
    parametrize.register_parametrization(kept, "weight", _Mask(mask))
    model = nn.Sequential(lin, kept)
    pc.convert(model, policy="int8", exclude=["1"])
    q = unpack_int8_weights(model[0].w_packed, 16, 32)
    assert torch.equal(q != 0, (lin.weight != 0) & (q != 0))  # masked weights quantize to 0
    assert (q[mask == 0] == 0).all()
    assert type(model[1]) is nn.Linear and not parametrize.is_parametrized(model[1])
    assert torch.equal(model[1].weight, kept.weight)


def test_sparse_formats_are_chosen_from_zeros():
    torch.manual_seed(0)
    sparse = nn.Linear(64, 64)
    with torch.no_grad():
        sparse.weight[torch.rand(64, 64) > 0.05] = 0
    model = nn.Sequential(sparse, nn.ReLU(), nn.Linear(64, 64))
    ref = copy.deepcopy(model)
    pc.convert(model, policy="state")
    assert isinstance(model[0], pc.nn.SparseInt8Linear) and model[0].name == "0"
    assert isinstance(model[2], Int8Linear)
    layers = convert_mod.conversion_record(model).layers
    assert layers[0].format == "sparse-int8" and "sparse weights" in layers[0].reason
    assert "density 1.00 > 0.06" in layers[1].not_considered["sparse-fp32"]
    assert "1x4 block density 1.00 > 0.3" in layers[1].not_considered["sparse-int8"]
    report = pc.verify(model, ref, torch.randn(8, 64))
    assert report.ok, str(report)
    fp32 = pc.convert(copy.deepcopy(ref), policy="state", overrides={"0": "sparse-fp32"})
    assert isinstance(fp32[0], pc.nn.SparseLinear)
    assert pc.verify(fp32, ref, torch.randn(8, 64)).layers[0].local.sqnr_db > 80


@dataclass
class _QuantState:
    weight_bits: int
    weight_scale: torch.Tensor
    activations: str
    act_scale: float | None
    act_zero_point: int
    act_bits: int = 8


def test_quant_state_gives_int8_static_with_calibrated_parameters(monkeypatch):
    lin = nn.Linear(16, 8)
    scale = lin.weight.detach().abs().amax(dim=1) / 100  # a calibrated scale that clips (not max-abs / 127)
    states = {id(lin): _QuantState(8, scale, "static", 0.05, 120)}
    # The states pycompress.quant.get_quant_state would report after a static calibration.
    monkeypatch.setattr(pc.quant, "get_quant_state", lambda module: states.get(id(module)))
    model = nn.Sequential(lin, nn.Linear(16, 8))
    pc.convert(model, policy="state")
    assert model[0].act_scale == 0.05 and model[0].act_zero_point == 120
    assert torch.equal(model[0].w_scale, scale)
    q = unpack_int8_weights(model[0].w_packed, 8, 16)
    assert torch.equal(q, torch.clamp(torch.round(lin.weight.detach() / scale[:, None]), -127, 127).to(torch.int8))
    assert model[1].act_scale is None  # no state: dynamic
    formats = [r.format for r in convert_mod.conversion_record(model).layers]
    assert formats == ["int8-static", "int8-dynamic"]


def test_converted_model_releases_float_weights():
    model = nn.Sequential(nn.Linear(256, 256), nn.Linear(256, 256))
    weights = [weakref.ref(m.weight) for m in model]
    pc.convert(model, policy="int8")
    gc.collect()
    assert all(w() is None for w in weights)


def _storage_bytes(module: nn.Module) -> int:
    storages = {}
    for t in list(module.parameters()) + list(module.buffers()):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(storages.values())


def test_summary_bytes_match_real_buffers():
    from pycompress.examples import ResNet18

    model = ResNet18(num_classes=10, width=16).eval()
    before = {n: _storage_bytes(m) for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}
    pc.convert(model, policy="int8")
    table = pc.summary(model)
    assert len(table.rows) == len(before)
    for row in table.rows:
        module = model.get_submodule(row.name)
        assert row.bytes_after == _storage_bytes(module), row.name
        assert row.bytes_before == before[row.name], row.name
        assert row.format == "int8-dynamic" and row.weight_bits == 8
    assert table.model_bytes == _storage_bytes(model)
    # int8 weights + an int32 col_sum and a float32 scale per channel: 3-4x smaller than fp32
    assert 3.0 < table.bytes_before / table.bytes_after < 4.0
    text = str(table)
    assert "layer1.0.conv1" in text and "im2col + q8 GEMM" in text and "bytes before" in text


def test_relu_and_exact_gelu_fuse_into_the_kernel_epilogue():
    torch.manual_seed(0)
    shared_act = nn.ReLU()
    model = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 32), nn.GELU(approximate="tanh"),
                          nn.Linear(32, 32), shared_act, nn.Linear(32, 32), shared_act, nn.Linear(32, 4), nn.ReLU())
    ref = copy.deepcopy(model)
    pc.convert(model, policy="int8")
    assert model[0].activation == "gelu" and isinstance(model[1], nn.Identity)
    assert model[2].activation == "none" and type(model[3]) is nn.GELU  # tanh GELU: not the kernel's function
    assert model[4].activation == "none" and model[5] is shared_act  # a shared module is not rewritten
    assert model[8].activation == "relu"
    assert convert_mod.conversion_record(model).fused == ["1", "9"]
    assert "fused gelu" in str(pc.summary(model))
    report = pc.verify(model, ref, torch.randn(8, 16))
    assert report.ok, str(report)
    plain = pc.convert(copy.deepcopy(ref), policy="int8", fuse_activations=False)
    assert plain[0].activation == "none" and type(plain[1]) is nn.GELU


def _pruned_static_model():
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(64, 96), nn.ReLU(), nn.Linear(96, 32)).eval()
    pc.prune.prune(model, 0.8, method="block")
    pc.quantize(model, [torch.randn(16, 64) for _ in range(2)], activations="static")
    return model


def test_sparse_int8_uses_calibrated_static_activations():
    model = _pruned_static_model()
    states = [pc.quant.get_quant_state(model[i]) for i in (0, 2)]
    dense = pc.convert(copy.deepcopy(model), policy="int8")
    pc.convert(model, policy="state")
    for layer, state in zip((model[0], model[2]), states):
        assert isinstance(layer, pc.nn.SparseInt8Linear)
        assert (layer.act_scale, layer.act_zero_point) == (state.act_scale, state.act_zero_point)
        assert torch.equal(layer.w_scale, state.weight_scale)
        assert "static" in layer.extra_repr()
    assert isinstance(dense[0], Int8Linear) and dense[0].act_scale == states[0].act_scale
    for batch in (1, 24):  # same integers, same static activations: the same numbers as int8-static
        x = torch.randn(batch, 64)
        assert torch.equal(model(x), dense(x))


def test_sparse_thresholds_follow_block_density():
    torch.manual_seed(5)
    blocks, unstructured, half = nn.Linear(128, 128), nn.Linear(128, 128), nn.Linear(128, 128)
    pc.prune.prune(nn.Sequential(blocks), 0.75, method="block")  # block density 0.25
    pc.prune.prune(nn.Sequential(unstructured), 0.9)  # 90% of weights, 1 - 0.9^4 = 34% of the 1x4 blocks
    pc.prune.prune(nn.Sequential(half), 0.6)  # density 0.40, 87% of the 1x4 blocks
    model = pc.convert(nn.Sequential(blocks, unstructured, half), policy="auto")
    layers = convert_mod.conversion_record(model).layers
    assert isinstance(model[0], pc.nn.SparseInt8Linear) and layers[0].format == "sparse-int8"
    if _C.sparse_sliced_bytes_vectorized():
        # The byte sliced layout (AVX-512 VBMI) pays by nonzeros: density 0.10 <= 0.30 is sparse.
        assert isinstance(model[1], pc.nn.SparseInt8Linear) and layers[1].format == "sparse-int8"
        assert "density 0.40 > 0.3" in layers[2].not_considered["sparse-int8"]
    else:
        assert isinstance(model[1], Int8Linear)
        assert "1x4 block density 0.3" in layers[1].not_considered["sparse-int8"]
        assert "dense int8 wins for M <= 16" in layers[1].not_considered["sparse-int8"]
    assert isinstance(model[2], Int8Linear)
    assert "1x4 block density 0.8" in layers[2].not_considered["sparse-int8"]
    assert "dense int8 wins for M <= 16" in layers[2].not_considered["sparse-int8"]
    # An explicit request is honoured whatever the density.
    dense = pc.convert(nn.Sequential(nn.Linear(32, 16)), policy="auto", overrides={"0": "sparse-int8"})
    assert isinstance(dense[0], pc.nn.SparseInt8Linear)
    assert "override '0'" in convert_mod.conversion_record(dense).layers[0].reason


def test_timed_auto_times_sparse_formats_beyond_the_untimed_break_even():
    # Sparsity above the untimed M <= 16 limit, yet a candidate when example inputs let convert time
    # it: 85% unstructured (1x4 block density ~0.48 > 0.30) for the 1x4-block kernels, 60% (density
    # 0.40 > 0.30) where the byte sliced layout runs.
    torch.manual_seed(6)
    sparse, dense = nn.Linear(512, 512), nn.Linear(512, 512)
    byte_layout = _C.sparse_sliced_bytes_vectorized()
    pc.prune.prune(nn.Sequential(sparse), 0.6 if byte_layout else 0.85)
    untimed = pc.convert(copy.deepcopy(nn.Sequential(sparse, dense)), policy="auto")
    assert "dense int8 wins for M <= 16" in convert_mod.conversion_record(untimed).layers[0].not_considered["sparse-int8"]
    model = pc.convert(nn.Sequential(sparse, dense), example_inputs=torch.randn(1, 512))
    timed_sparse, timed_dense = convert_mod.conversion_record(model).layers
    # (csr stays out at density 0.40: above the timed fp32 limit, 0.30)
    assert set(timed_sparse.timings_us) == {"float", "int8-dynamic", "sparse-int8"} | (
        set() if byte_layout else {"sparse-fp32"}), timed_sparse
    assert timed_sparse.format == _timed_choice(timed_sparse), timed_sparse
    # A dense layer is never packed sparse just to be timed.
    assert set(timed_dense.timings_us) == {"float", "int8-dynamic"}
    assert "no sparse kernel wins there" in timed_dense.not_considered["sparse-int8"]


def test_float_layers_keep_no_fake_quant():
    from pycompress.quant import ActivationFakeQuant, WeightFakeQuant
    from pycompress.quant.fake_quant import quantize_input_hook

    model = _pruned_static_model()
    masked_weight = pc.prune.masked_float_weight(model[2]).detach().clone()
    pc.convert(model, policy="state", exclude=["2"])
    assert type(model[2]) is nn.Linear and not parametrize.is_parametrized(model[2])
    for name, module in model.named_modules():
        assert not isinstance(module, (ActivationFakeQuant, WeightFakeQuant)), name
        assert not hasattr(module, "activation_fake_quant"), name
        assert quantize_input_hook not in module._forward_pre_hooks.values(), name
    # The float layer computes in float: its masked float weight, no input quantization.
    assert torch.equal(model[2].weight, masked_weight)
    h = torch.randn(3, 96)
    assert torch.equal(model[2](h), torch.nn.functional.linear(h, masked_weight, model[2].bias))


def test_int8_linear_set_activation():
    torch.manual_seed(6)
    layer = Int8Linear.from_float(nn.Linear(16, 8))
    x = torch.randn(4, 16)
    plain = layer(x)
    layer.set_activation("relu")
    assert layer.activation == "relu" and torch.equal(layer(x), torch.relu(plain))
    layer.set_activation("none")
    assert torch.equal(layer(x), plain)
    with pytest.raises(ValueError, match="unknown activation 'swish'"):
        layer.set_activation("swish")
    assert layer.activation == "none"


def test_policies_keep_a_quantized_layer_in_int8_numbers():
    # Timed auto once picked sparse-fp32 for a pruned + PTQ layer, silently dropping the int8 numbers
    # the user asked for (verify then failed against the fake-quant reference).
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 10)).eval()
    calibration = [torch.randn(32, 256) for _ in range(2)]
    pc.prune(model, sparsity=0.8, method="block", block=(1, 4))
    pc.quantize(model, calibration, activations="static")
    keep = copy.deepcopy(model)
    pc.convert(model, example_inputs=(calibration[0],))
    for rec in convert_mod.conversion_record(model).layers:
        assert "sparse-fp32" not in rec.timings_us
        assert "quantized by pycompress.quantize" in rec.not_considered["sparse-fp32"]
        assert set(rec.timings_us) == {"float", "int8-static", "sparse-int8"}, rec
        assert rec.format == _timed_choice(rec), rec
    pc.convert(keep, overrides={"0": "sparse-fp32"})  # asked for explicitly: honoured
    assert isinstance(keep[0], pc.nn.SparseLinear)


def test_a_deepcopy_kept_as_the_reference_survives_convert_baking_its_twin():
    # torch gives a parametrized layer a class of its own and deepcopy shares it: baking the converted model's
    # float layers (excluded, depthwise) used to delete `weight` from the copy's class too.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.ReLU(), nn.Conv2d(8, 16, 1), nn.Flatten(),
                          nn.Linear(16 * 36, 10)).eval()
    x = torch.randn(2, 8, 6, 6)
    pc.prune(model, sparsity=0.75)
    pc.quantize(model, [x])
    reference = copy.deepcopy(model)
    want = reference(x)
    pc.convert(model, policy="int8", exclude=["4"])  # int8 has no depthwise kernel: 0 stays float too
    assert type(model[0]) is nn.Conv2d and type(model[4]) is nn.Linear  # kept float, baked
    assert {row.name: row.format for row in pc.summary(model).rows} == {"0": "float", "2": "int8-dynamic", "4": "float"}
    assert parametrize.is_parametrized(reference[0], "weight") and parametrize.is_parametrized(reference[4], "weight")
    assert torch.equal(reference(x), want)
    report = pc.verify(model, reference, x)
    assert report.ok, report


def test_layers_convert_has_no_kernel_for_are_baked_and_the_model_saves_and_loads(tmp_path):
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv1d(4, 8, 3)
            self.fc = nn.Linear(8 * 14, 5)

        def forward(self, x):
            return self.fc(torch.relu(self.conv(x)).flatten(1))

    torch.manual_seed(1)
    model = Net().eval()
    pc.prune(model, sparsity=0.5)
    x = torch.randn(3, 4, 16)
    mask = pc.prune.get_mask(model.conv).clone()
    pruned_conv = model.conv(x)
    pc.convert(model, policy="int8")
    assert type(model.conv) is nn.Conv1d and isinstance(model.conv.weight, nn.Parameter)
    assert torch.equal(model.conv.weight == 0, ~mask) and torch.equal(model.conv(x), pruned_conv)
    assert any("conv" in note and "baked" in note for note in model._pycompress_conversion.notes)
    path = tmp_path / "m.safetensors"
    pc.save(model, path)
    loaded = pc.load(path, model=Net()).eval()
    assert torch.equal(loaded(x), model(x))


@pytest.mark.parametrize("step", ["prune", "quantize"])
def test_save_refuses_a_model_still_carrying_training_state_naming_the_layer(tmp_path, step):
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4)).eval()
    if step == "prune":
        pc.prune(model, sparsity=0.5)
        what = "pruning mask"
    else:
        pc.quantize(model, [torch.randn(4, 16)])
        what = "fake quantization"
    path = tmp_path / "m.safetensors"
    with pytest.raises(ValueError, match=rf"save: layer 0 \(ParametrizedLinear\) still carries .*{what}.*pc.convert"):
        pc.save(model, path)
    assert not path.exists()


def test_bytes_before_leave_out_the_training_state_a_pruned_float_layer_carried():
    # A pruning mask is as large as the weight: counted, a layer kept float looked 1.9x smaller after convert.
    torch.manual_seed(3)
    model = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.ReLU(), nn.Linear(8, 4)).eval()
    float_bytes = [sum(t.numel() * 4 for t in layer.parameters()) for layer in (model[0], model[2])]
    pc.prune(model, sparsity=0.5)
    pc.quantize(model, [torch.randn(2, 8, 6, 8)], exclude=["0"])
    pc.convert(model, policy="state")
    rows = {row.name: row for row in pc.summary(model).rows}
    assert rows["0"].format == "float" and rows["0"].bytes_before == rows["0"].bytes_after == float_bytes[0]
    assert rows["2"].format != "float" and rows["2"].bytes_before == float_bytes[1]
