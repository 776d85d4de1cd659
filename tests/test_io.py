"""pycompress.save / load: round trips, and every kind of bad file refused before a kernel runs."""

from __future__ import annotations

import copy
import json
import os

import pytest
import safetensors
import safetensors.torch
import torch
from torch import nn

import pycompress as pc
from pycompress.examples import ResNet18
from pycompress.nn import Int8Conv2d, Int8Linear


def _sequential():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, groups=8, padding=1),
                         nn.Flatten(), nn.Linear(8 * 8 * 8, 32), nn.GELU(), nn.Dropout(0.1), nn.Linear(32, 10)).eval()


def test_sequential_round_trip_without_code(tmp_path):
    model = pc.convert(_sequential(), policy="int8")
    path = tmp_path / "m.safetensors"
    pc.save(model, path)
    loaded = pc.load(path).eval()
    x = torch.randn(3, 1, 8, 8)
    assert torch.equal(loaded(x), model(x))
    assert isinstance(loaded[0], Int8Conv2d) and isinstance(loaded[4], Int8Linear)
    assert type(loaded[2]) is nn.Conv2d  # depthwise stayed float
    assert loaded[4].name == "4"
    assert [r.format for r in pc.summary(loaded).rows] == [r.format for r in pc.summary(model).rows]


def test_custom_architecture_needs_a_skeleton(tmp_path):
    model = ResNet18(num_classes=10, width=8).eval()
    skeleton = copy.deepcopy(model)
    with torch.no_grad():
        for p in skeleton.parameters():
            p.normal_()  # the skeleton's own weights must not matter
    pc.convert(model, policy="int8")
    path = tmp_path / "r.safetensors"
    pc.save(model, path)
    with pytest.raises(ValueError, match="pass model="):
        pc.load(path)
    loaded = pc.load(path, model=skeleton).eval()
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(loaded(x), model(x))


def test_shared_layers_stay_shared(tmp_path):
    lin = nn.Linear(16, 16)
    model = pc.convert(nn.Sequential(lin, nn.ReLU(), lin), policy="int8")
    path = tmp_path / "s.safetensors"
    pc.save(model, path)
    loaded = pc.load(path)
    assert loaded[0] is loaded[2]
    x = torch.randn(2, 16)
    assert torch.equal(loaded(x), model(x))


def _rewrite(path, edit_tensors=None, edit_manifest=None):
    with safetensors.safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    manifest = json.loads(metadata["pycompress"])
    if edit_tensors:
        edit_tensors(tensors)
    if edit_manifest:
        edit_manifest(manifest)
    safetensors.torch.save_file(tensors, str(path), metadata={"pycompress": json.dumps(manifest)})


@pytest.fixture
def saved(tmp_path):
    path = tmp_path / "m.safetensors"
    pc.save(pc.convert(_sequential(), policy="int8"), path)
    return path


def _set(key, fn):
    def edit(tensors):
        tensors[key] = fn(tensors[key])
    return edit


BAD_TENSORS = [
    ("4.col_sum", lambda t: t + 1, "col_sum does not match"),
    ("4.w_packed", lambda t: torch.full_like(t, -128), "symmetric int8 range"),
    ("4.w_scale", lambda t: t * float("nan"), "w_scale must be finite"),
    ("4.w_scale", lambda t: -t, "w_scale must be finite and > 0"),
    ("4.bias", lambda t: t * float("inf"), "bias has NaN or Inf"),
    ("4.w_packed", lambda t: t[:-4].clone(), r"needs 16384 packed weight bytes, the file has 16380 bytes"),
    ("4.col_sum", lambda t: t[:-1].clone(), r"4.col_sum is torch.int32 \(31,\), expected"),
    ("4.w_scale", lambda t: t.double(), "expected torch.float32"),
    ("0.gemm.w_packed", lambda t: torch.ones_like(t), "nonzero padding|col_sum"),
]


@pytest.mark.parametrize("key,fn,message", BAD_TENSORS)
def test_corrupt_tensors_are_refused(saved, key, fn, message):
    _rewrite(saved, edit_tensors=_set(key, fn))
    with pytest.raises(ValueError, match=message):
        pc.load(saved)


def test_missing_and_extra_tensors_are_refused(saved):
    _rewrite(saved, edit_tensors=lambda t: t.pop("7.bias"))
    with pytest.raises(ValueError, match=r"missing \['7.bias'\]"):
        pc.load(saved)


BAD_CONFIGS = [
    ({"act_zero_point": 300}, "act_zero_point 300"),
    ({"act_scale": -1.0}, "act_scale -1.0"),
    ({"activation": "swish"}, "activation 'swish'"),
    ({"weight_bits": 9}, "weight_bits 9"),
    ({"in_features": 0}, "in_features / out_features"),
    ({"out_features": 1 << 24}, r"needs \d+ packed weight bytes, the file has 16384 bytes"),
]


@pytest.mark.parametrize("change,message", BAD_CONFIGS)
def test_bad_manifest_configs_are_refused(saved, change, message):
    _rewrite(saved, edit_manifest=lambda m: m["layers"]["4"]["config"].update(change))
    with pytest.raises(ValueError, match=message):
        pc.load(saved)


def test_bad_manifest_structure_is_refused(saved, tmp_path):
    _rewrite(saved, edit_manifest=lambda m: m["architecture"].update(type="os.system"))
    with pytest.raises(ValueError, match="has type 'os.system'"):
        pc.load(saved)
    _rewrite(saved, edit_manifest=lambda m: m.update(version=99))
    with pytest.raises(ValueError, match="manifest version 99"):
        pc.load(saved)
    garbage = tmp_path / "g.safetensors"
    garbage.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}      ")
    with pytest.raises(ValueError, match="not a valid safetensors file"):
        pc.load(garbage)
    plain = tmp_path / "p.safetensors"
    safetensors.torch.save_file({"a": torch.zeros(2)}, str(plain))
    with pytest.raises(ValueError, match="no pycompress manifest"):
        pc.load(plain)


def test_wrong_skeleton_is_refused(tmp_path):
    model = pc.convert(ResNet18(num_classes=10, width=8).eval(), policy="int8")
    path = tmp_path / "r.safetensors"
    pc.save(model, path)
    with pytest.raises(ValueError, match="layer fc: the model's Linear"):
        pc.load(path, model=ResNet18(num_classes=7, width=8))


def test_save_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "m.safetensors"
    model = pc.convert(_sequential(), policy="int8")
    pc.save(model, path)
    before = path.read_bytes()

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", fail)
    with pytest.raises(OSError, match="disk full"):
        pc.save(model, path)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["m.safetensors"]


class BertIntermediate(nn.Module):
    """Named like Hugging Face's block, whose forward is act(dense(x)) (convert.FUSIBLE_PARENTS)."""

    def __init__(self):
        super().__init__()
        self.dense = nn.Linear(16, 64)
        self.intermediate_act_fn = nn.GELU()

    def forward(self, x):
        return self.intermediate_act_fn(self.dense(x))


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.intermediate = BertIntermediate()
        self.out = nn.Linear(64, 16)

    def forward(self, x):
        return self.out(self.intermediate(x))


def test_fused_activations_survive_a_skeleton_load(tmp_path):
    torch.manual_seed(0)
    model = pc.convert(Block(), policy="int8")
    assert pc.conversion_record(model).fused == ["intermediate.intermediate_act_fn"]
    path = tmp_path / "b.safetensors"
    pc.save(model, path)
    loaded = pc.load(path, model=Block())
    assert isinstance(loaded.intermediate.intermediate_act_fn, nn.Identity)
    x = torch.randn(3, 16)
    assert torch.equal(loaded(x), model(x))
    _rewrite(path, edit_manifest=lambda m: m.update(fused=["out"]))
    with pytest.raises(ValueError, match="fused the activation 'out'"):
        pc.load(path, model=Block())
