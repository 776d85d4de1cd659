"""pycompress.save / load: round trips, and every kind of bad file refused before a kernel runs."""

from __future__ import annotations

import copy
import hashlib
import json
import os
import pathlib
import re

import pytest
import safetensors
import safetensors.torch
import torch
from torch import nn

import pycompress as pc
from pycompress.examples import ResNet18
from pycompress.nn.registry import compressed_layers as converted_layers
import pycompress.io as pcio
from pycompress.io import FORMAT_VERSIONS, MANIFEST_VERSION, file_metadata
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


# ---------------------------------------------------------------- format versions and checksums


def _raw_tensors(path) -> tuple[dict, dict[str, bytes]]:
    """(safetensors metadata, each tensor's bytes) read straight from the file, as a reader without
    pycompress sees them."""
    data = path.read_bytes()
    header_len = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + header_len])
    metadata = header.pop("__metadata__")
    base = 8 + header_len
    return metadata, {k: data[base + v["data_offsets"][0]: base + v["data_offsets"][1]] for k, v in header.items()}


def _flip_bit(path, key: str, byte: int = 0, bit: int = 0) -> None:
    """Flips one bit of one tensor's bytes in the file (the manifest and its checksums untouched)."""
    data = bytearray(path.read_bytes())
    header_len = int.from_bytes(data[:8], "little")
    start, end = json.loads(data[8:8 + header_len])[key]["data_offsets"]
    assert byte < end - start
    data[8 + header_len + start + byte] ^= 1 << bit
    path.write_bytes(bytes(data))


def test_saved_file_holds_the_sha256_of_every_stored_tensor_and_of_the_manifest(saved):
    metadata, raw = _raw_tensors(saved)
    manifest = json.loads(metadata["pycompress"])
    assert manifest["version"] == MANIFEST_VERSION == max(FORMAT_VERSIONS)
    assert metadata["pycompress_sha256"] == hashlib.sha256(metadata["pycompress"].encode()).hexdigest()
    assert sorted(manifest["checksums"]) == sorted(raw)
    for key, data in raw.items():
        assert manifest["checksums"][key] == hashlib.sha256(data).hexdigest(), key


@pytest.fixture(scope="module")
def coded_saved(tmp_path_factory):
    path = tmp_path_factory.mktemp("coded") / "c.safetensors"
    pc.save(_sparse_model(static=False), path, entropy_coding=True)
    manifest = json.loads(_raw_tensors(path)[0]["pycompress"])
    assert {"3.integer_weight/nonzeros", "3.integer_weight/zero_runs"} <= set(manifest["entropy"])
    assert "3." in manifest["zero_runs"]
    return path


FLIPS = [  # (file, tensor, the owner the error names)
    ("saved", "4.w_scale", "layer 4"),  # a scale: the flipped value is still finite and > 0
    ("saved", "4.w_packed", "layer 4"),  # int8 weights
    ("saved", "0.gemm.w_packed", "layer 0"),  # an Int8Conv2d's weights
    ("saved", "2.weight", "module 2"),  # the float depthwise conv
    ("sparse_saved", "8.col_idx", "layer 8"),  # csr column index: still < K
    ("sparse_saved", "3.blk_idx", "layer 3"),  # bsr1x4 block index
    ("sparse_saved", "0.gemm.row_ptr", "layer 0"),
    ("sparse_saved", "6.values", "layer 6"),  # nm24 fp32 weight values
    ("sparse_saved", "6.nm_idx", "layer 6"),
    ("coded_saved", "3.integer_weight/nonzeros", "layer 3"),  # a Huffman payload, checked before decoding
    ("coded_saved", "3.integer_weight/zero_runs/huffman_lengths", "layer 3"),
]


@pytest.mark.parametrize("file,key,owner", FLIPS)
def test_a_flipped_bit_is_refused_naming_the_tensor_and_its_layer(request, tmp_path, monkeypatch, file, key, owner):
    path = tmp_path / "flipped.safetensors"
    path.write_bytes(request.getfixturevalue(file).read_bytes())
    with safetensors.safe_open(str(path), framework="pt") as f:
        t = f.get_tensor(key)
    _flip_bit(path, key)
    # Nothing may read the tensors before their checksums are checked.
    for reader in ("_decode_entropy", "_rebuild_zero_runs", "_build_layer"):
        monkeypatch.setattr(pcio, reader, lambda *a, reader=reader: pytest.fail(f"{reader} ran before the checksums"))
    for cls in pc.nn.LAYER_TYPES.values():  # every format's readers of a file's tensors
        for reader in ("from_config", "validate_tensors", "derive_from_integer_weight"):
            monkeypatch.setattr(cls, reader, lambda *a, reader=f"{cls.__name__}.{reader}": pytest.fail(
                f"{reader} ran before the checksums"))
    described = f"{str(t.dtype).removeprefix('torch.')} {tuple(t.shape)}"
    message = re.escape(f"tensor {key} of {owner} ({described}) fails its sha256 checksum: its bytes are not the "
                        "bytes save wrote (corrupt file)")
    with pytest.raises(ValueError, match=message + "$"):
        pc.load(path)


def test_a_flipped_scale_bit_would_load_without_its_checksum(saved, tmp_path):
    """Why the checksums: this flip passes every validator and changes the outputs."""
    model = pc.load(saved)
    path = tmp_path / "flipped.safetensors"
    path.write_bytes(saved.read_bytes())
    _flip_bit(path, "4.w_scale")
    _rewrite(path)  # the same flipped bytes with fresh checksums
    x = torch.randn(3, 1, 8, 8)
    assert not torch.equal(pc.load(path)(x), model(x))


def test_an_edited_manifest_is_refused(saved):
    data = saved.read_bytes()
    relu = b'\\"activation\\": \\"relu\\"'  # the conv's fused ReLU, as the manifest text sits in the header
    assert data.count(relu) == 1
    saved.write_bytes(data.replace(relu, relu.replace(b"relu", b"gelu")))  # a valid config, another model
    with pytest.raises(ValueError, match=r"the manifest fails its checksum: sha256 [0-9a-f]{64}, the file says "
                                         r"'[0-9a-f]{64}' \(corrupt file\)"):
        pc.load(saved)


def test_newer_format_version_is_refused(saved):
    newer = MANIFEST_VERSION + 1
    _rewrite(saved, edit_manifest=lambda m: m.update(version=newer))
    message = f"file format version {newer}, this pycompress ({pc.__version__}) reads versions 1-{MANIFEST_VERSION}; " \
              "upgrade pycompress"
    with pytest.raises(ValueError, match=re.escape(message) + "$"):
        pc.load(saved)


@pytest.mark.parametrize("version", [0, -1, "2", None, True, 2.0])
def test_malformed_format_version_is_refused(saved, version):
    _rewrite(saved, edit_manifest=lambda m: m.update(version=version))
    message = f"manifest version {version!r} is not a format version; this pycompress ({pc.__version__}) reads " \
              f"versions 1-{MANIFEST_VERSION}"
    with pytest.raises(ValueError, match=re.escape(message) + "$"):
        pc.load(saved)


def _write_with_metadata(path, edit):
    with safetensors.safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    edit(metadata)
    safetensors.torch.save_file(tensors, str(path), metadata=metadata)


def _with_manifest(edit):
    def apply(metadata):
        manifest = json.loads(metadata["pycompress"])
        edit(manifest)
        metadata["pycompress"] = json.dumps(manifest)
        metadata["pycompress_sha256"] = hashlib.sha256(metadata["pycompress"].encode()).hexdigest()
    return apply


_MALFORMED = (f"manifest field 'checksums' is missing or malformed (format version {MANIFEST_VERSION} stores one "
              "sha256 per tensor)")
CHECKSUMS_MISSING = [
    (lambda md: md.pop("pycompress_sha256"), f"format version {MANIFEST_VERSION} needs the manifest checksum "
                                              "(metadata 'pycompress_sha256'); the file has none (corrupt file)"),
    (_with_manifest(lambda m: m.pop("checksums")), _MALFORMED),
    (_with_manifest(lambda m: m["checksums"].update({"4.bias": 7})), _MALFORMED),
    (_with_manifest(lambda m: m["checksums"].pop("4.bias")),
     "the checksums do not list the file's tensors: tensors without a checksum ['4.bias'], checksums of no "
     "tensor [] (corrupt file)"),
    (_with_manifest(lambda m: m["checksums"].update({"9.weight": "00"})),
     "the checksums do not list the file's tensors: tensors without a checksum [], checksums of no tensor "
     "['9.weight'] (corrupt file)"),
]


@pytest.mark.parametrize("edit,message", CHECKSUMS_MISSING)
def test_version_2_file_without_its_checksums_is_refused(saved, edit, message):
    _write_with_metadata(saved, edit)
    with pytest.raises(ValueError, match=re.escape(message) + "$"):
        pc.load(saved)


GOLDEN_V1 = pathlib.Path(__file__).resolve().parent / "data" / "golden" / "v1" / "int8_dynamic.safetensors"


def test_version_1_file_loads_without_checksums_and_is_still_validated(tmp_path):
    metadata, _ = _raw_tensors(GOLDEN_V1)
    manifest = json.loads(metadata["pycompress"])
    assert manifest["version"] == 1 and "checksums" not in manifest and set(metadata) == {"pycompress"}
    io = safetensors.torch.load_file(str(GOLDEN_V1).replace(".safetensors", ".io.safetensors"))
    with torch.no_grad():
        assert torch.equal(pc.load(GOLDEN_V1)(io["input.1"]), io["output.1"])
    path = tmp_path / "v1.safetensors"
    path.write_bytes(GOLDEN_V1.read_bytes())
    _write_with_metadata(path, lambda md: None)  # rewritten as it was: version 1, no checksums
    assert pc.load(path) is not None
    with safetensors.safe_open(str(path), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    tensors["0.w_scale"] = -tensors["0.w_scale"]
    safetensors.torch.save_file(tensors, str(path), metadata=metadata)
    with pytest.raises(ValueError, match=re.escape("load: 0: w_scale must be finite and > 0")):
        pc.load(path)


def test_a_directory_or_a_missing_path_is_refused_naming_it(tmp_path):
    with pytest.raises(IsADirectoryError, match=rf"load\({re.escape(str(tmp_path))}\): a directory; pass the "
                                                r"\.safetensors file"):
        pc.load(tmp_path)
    missing = tmp_path / "nope.safetensors"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        pc.load(missing)
