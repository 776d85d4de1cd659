"""pycompress.verify: the report's numbers, tolerances, worst layer, table and plot."""

from __future__ import annotations

import copy
import importlib
import math

import pytest
import torch
from torch import nn

import pycompress as pc

verify_mod = importlib.import_module("pycompress.verification")


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10)).eval()


def test_per_layer_numbers_match_a_direct_computation():
    model = _mlp()
    ref = copy.deepcopy(model)
    pc.convert(model, policy="int8")
    x = torch.randn(16, 32)
    report = pc.verify(model, ref, x)
    assert [r.name for r in report.layers] == ["0", "2", "4"]
    assert model[0].activation == "relu" and isinstance(model[1], nn.Identity)  # ReLU fused into the kernel
    # Layer 0 sees the raw input in both models: local and accumulated errors coincide.
    with torch.no_grad():
        out, expected = model[0](x).double(), torch.relu(ref[0](x)).double()
    err = out - expected
    row = report.layers[0]
    assert row.local.max_abs == pytest.approx(float(err.abs().max()), rel=1e-9)
    assert row.local.rel_l2 == pytest.approx(float(err.norm() / expected.norm()), rel=1e-9)
    assert row.local.sqnr_db == pytest.approx(float(10 * torch.log10(expected.pow(2).sum() / err.pow(2).sum())), rel=1e-9)
    cos = float((out * expected).sum() / (out.norm() * expected.norm()))
    assert row.local.cosine == pytest.approx(cos, rel=1e-12)
    assert row.accumulated.sqnr_db == pytest.approx(row.local.sqnr_db, rel=1e-9)
    # Deeper layers: the local error isolates the layer, the accumulated one includes upstream error.
    assert report.layers[2].accumulated.sqnr_db < report.layers[2].local.sqnr_db
    end = report.outputs[0].stats
    with torch.no_grad():
        final = model(x).double() - ref(x).double()
    assert end.max_abs == pytest.approx(float(final.abs().max()), rel=1e-9)
    assert report.ok, str(report)


def test_default_budgets_are_derived_from_the_formats():
    # int8 x int8 with crest factor 16: each quantizer 6.02*8 + 4.77 - 24.08 = 28.85 dB; two sources -3.01 dB
    assert verify_mod.layer_budget_db("int8-dynamic") == pytest.approx(25.84, abs=0.01)
    assert verify_mod.layer_budget_db("int8-dynamic", weight_bits=4) < verify_mod.layer_budget_db("int8-dynamic")
    assert verify_mod.layer_budget_db("sparse-fp32") == 80.0
    three = verify_mod.output_budget_db([25.84] * 3)
    assert three == pytest.approx(25.84 - 10 * math.log10(3), abs=0.01)
    assert verify_mod.cosine_for_sqnr(20.0) == pytest.approx(1 / math.sqrt(1.01))


def test_overridden_tolerances_fail_and_name_the_worst_layer():
    model = _mlp()
    ref = copy.deepcopy(model)
    pc.convert(model, policy="int8")
    report = pc.verify(model, ref, torch.randn(8, 32), layer_min_sqnr_db=200.0, output_min_cosine=1.0)
    assert not report.ok
    assert set(report.failed()) == {"0", "2", "4", "output"}
    worst = min(report.layers, key=lambda r: r.local.sqnr_db)
    assert report.worst is worst
    text = str(report)
    assert "FAILED" in text and f"worst layer {worst.name}" in text and "SQNR dB" in text


def test_a_broken_layer_is_found():
    model = _mlp()
    ref = copy.deepcopy(model)
    pc.convert(model, policy="int8")
    with torch.no_grad():
        model[2].w_scale.mul_(1.5)  # a wrong dequantization scale in the middle layer
    report = pc.verify(model, ref, torch.randn(8, 32))
    assert not report.ok
    assert report.worst.name == "2" and not report.layers[1].ok
    assert report.layers[0].ok and report.layers[2].ok  # the layers after it add no error of their own


def test_nan_output_fails():
    model = _mlp()
    ref = copy.deepcopy(model)
    pc.convert(model, policy="int8")
    x = torch.randn(4, 32)
    x[0, 0] = float("nan")
    report = pc.verify(model, ref, x)
    assert not report.ok


def test_dict_inputs_and_structured_outputs():
    class TwoHeads(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 3)

        def forward(self, x, scale=1.0):
            h = self.a(x) * scale
            return {"hidden": h, "logits": (self.b(h),)}

    model = TwoHeads()
    ref = copy.deepcopy(model)
    pc.convert(model, policy="int8")
    report = pc.verify(model, ref, {"x": torch.randn(4, 8), "scale": 2.0})
    assert [o.name for o in report.outputs] == ["output.hidden", "output.logits[0]"]


def test_same_object_and_missing_twin_are_errors():
    model = _mlp()
    pc.convert(model, policy="int8")
    with pytest.raises(ValueError, match="same object"):
        pc.verify(model, model, torch.randn(2, 32))
    with pytest.raises(ValueError, match="converted layer 0 has no twin"):
        pc.verify(model, nn.Sequential(), torch.randn(2, 32))


def test_plot_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    model = _mlp()
    ref = copy.deepcopy(model)
    pc.convert(model, policy="int8")
    path = tmp_path / "verify.png"
    pc.verify(model, ref, torch.randn(4, 32)).plot(str(path))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
