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
from pycompress.convert import converted_layers
from pycompress.io import file_metadata
from pycompress.nn import Int8Conv2d, Int8Linear, SparseInt8Linear
from pycompress.nn.int8_conv import Im2colConv2d


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
    """Edits a saved file and writes it with fresh checksums (file_metadata), so the check under test is
    the validation behind them; test_a_flipped_bit_* below corrupt files without restamping."""
    with safetensors.safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    manifest = json.loads(metadata["pycompress"])
    if edit_tensors:
        edit_tensors(tensors)
    if edit_manifest:
        edit_manifest(manifest)
    safetensors.torch.save_file(tensors, str(path), metadata=file_metadata(manifest, tensors))


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


# ---------------------------------------------------------------- sparse layers


def _zero_out(layer: nn.Module, keep: float, gen: torch.Generator) -> None:
    with torch.no_grad():
        layer.weight[torch.rand(layer.weight.shape, generator=gen) > keep] = 0


def _sparse_model(static: bool = True) -> nn.Sequential:
    """Every sparse format: a sparse-int8 conv, sparse-int8 with K % 4 != 0 (static activations),
    nm24 and csr fp32 Linears."""
    gen = torch.Generator().manual_seed(7)
    torch.manual_seed(7)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(128, 30), nn.ReLU(),
                          nn.Linear(30, 64), nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 40)).eval()
    for i, keep in ((0, 0.2), (3, 0.1), (5, 0.1), (8, 0.05)):
        _zero_out(model[i], keep, gen)
    with torch.no_grad():
        model[6].weight.view(48, 16, 4)[..., 1::2] = 0  # 2:4: SparseLinear picks nm24
        model[8].weight[0, :4] = 0.5  # not 2:4: csr
    if static:
        pc.quantize(model, [torch.randn(16, 3, 4, 4, generator=gen) for _ in range(2)], activations="static",
                    exclude=["6", "8"])
    pc.convert(model, policy="state", overrides={"0": "sparse-int8", "3": "sparse-int8", "5": "sparse-int8",
                                                 "6": "sparse-fp32", "8": "sparse-fp32"})
    return model


def _sparse_layers(model):
    return {name: (m.gemm if isinstance(m, Im2colConv2d) else m) for name, m in converted_layers(model)}


def test_sparse_layers_round_trip_bit_identical(tmp_path):
    model = _sparse_model()
    layers = _sparse_layers(model)
    assert isinstance(layers["0"], SparseInt8Linear) and layers["0"].act_scale is not None
    assert isinstance(layers["5"], SparseInt8Linear) and layers["5"].in_features == 30
    assert (layers["6"].format, layers["8"].format) == ("nm24", "csr")
    path = tmp_path / "sparse.safetensors"
    pc.save(model, path)
    for loaded in (pc.load(path), pc.load(path, model=_sparse_float_skeleton())):
        loaded.eval()
        got = _sparse_layers(loaded)
        for name, layer in layers.items():
            assert type(got[name]) is type(layer) and got[name].name == name
            for buf_name, buf in layer.named_buffers():  # the persistent pack
                if buf_name.startswith(("panel_", "byte_", "sliced_")):
                    continue  # derived layouts built by the first call that uses them
                assert torch.equal(getattr(got[name], buf_name), buf), (name, buf_name)
        for batch in (1, 3, 40):  # sliced kernel (M <= 16 on AVX-512) and bsr1x4 kernel
            x = torch.randn(batch, 3, 4, 4)
            assert torch.equal(loaded(x), model(x)), batch
        assert [r.format for r in pc.summary(loaded).rows] == [r.format for r in pc.summary(model).rows]


def _sparse_float_skeleton():
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(128, 30), nn.ReLU(),
                         nn.Linear(30, 64), nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 40))


@pytest.fixture(scope="module")
def sparse_saved(tmp_path_factory):
    path = tmp_path_factory.mktemp("sparse") / "s.safetensors"
    pc.save(_sparse_model(static=False), path)
    return path


def _row_ptr_decreasing(t):
    t = t.clone()
    t[2] = t[3] + 1
    return t


def _last_block_padding(t):
    t = t.clone()
    t.view(-1, 4)[:, 2:] = 1  # K = 30: the last block's k = 30, 31 are padding (blocks with g = 7)
    return t


BAD_SPARSE = [
    ("3.blk_idx", lambda t: torch.full_like(t, 40), r"3: sparse_int8_linear: corrupt sparse pack: .*index 40 out of "
                                                   r"range"),
    ("8.col_idx", lambda t: torch.full_like(t, 48), r"corrupt sparse pack: .*column index 48 out of range for K=48"),
    ("8.row_ptr", _row_ptr_decreasing, "row_ptr decreases at row"),
    ("3.row_ptr", lambda t: torch.cat([t[:-1], t[-1:] - 1]), r"row_ptr\[N\] = \d+ but \d+ indices/values"),
    ("8.row_ptr", lambda t: torch.cat([t[:1] + 1, t[1:]]), r"row_ptr\[0\] = 1, expected 0"),
    ("8.col_idx", lambda t: t[:-1].clone(), r"8.values is torch.float32 \(\d+,\), expected"),
    ("3.row_ptr", lambda t: t[:-1].clone(), r"3.row_ptr must be 1-D torch.int32 of 31"),
    ("0.gemm.row_ptr", lambda t: t.to(torch.int64), r"0.gemm.row_ptr must be 1-D torch.int32"),
    ("6.values", lambda t: t[:-1].clone(), r"nm24 with K=64, N=48 needs 1536 values"),
    ("6.nm_idx", lambda t: t.view(torch.int32).bitwise_not().view(torch.uint32), "nm24 indices are not two ascending"),
    ("6.values", lambda t: t * float("nan"), "sparse values have NaN or Inf"),
    ("3.values", lambda t: torch.full_like(t, -128), "symmetric int8 range"),
    ("5.values", _last_block_padding, "nonzeros past K=30|col_sum"),
    ("3.col_sum", lambda t: t + 1, "col_sum does not match the sparse int8 values"),
    ("3.w_scale", lambda t: -t, "w_scale must be finite and > 0"),
    ("8.bias", lambda t: t * float("inf"), "bias has NaN or Inf"),
]


@pytest.mark.parametrize("key,fn,message", BAD_SPARSE)
def test_corrupt_sparse_packs_are_refused(sparse_saved, tmp_path, key, fn, message):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(sparse_saved.read_bytes())
    _rewrite(path, edit_tensors=_set(key, fn))
    with pytest.raises(ValueError, match=message):
        pc.load(path)
    with pytest.raises(ValueError, match=message):
        pc.load(path, model=_sparse_float_skeleton())


def test_bad_sparse_manifests_are_refused(sparse_saved, tmp_path):
    path = tmp_path / "bad.safetensors"
    for edit, message in (
        (lambda m: m["layers"]["8"]["config"].update(format="coo"), r"format 'coo' not in \('csr', 'nm24'\)"),
        (lambda m: m["layers"]["3"]["config"].update(out_features=1 << 20), r"3.row_ptr must be 1-D torch.int32 of"),
        (lambda m: m["layers"]["0"]["config"]["gemm"].update(type="Int8Linear"), "needs a 'gemm' entry"),
        (lambda m: m["layers"]["3"].update(type="SparseConv3d"), "has type 'SparseConv3d'"),
    ):
        path.write_bytes(sparse_saved.read_bytes())
        _rewrite(path, edit_manifest=edit)
        with pytest.raises(ValueError, match=message):
            pc.load(path)
