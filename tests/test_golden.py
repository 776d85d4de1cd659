"""Golden artifacts (tests/data/golden/): files saved by earlier pycompress versions load and give
exactly the outputs they gave when they were saved, bit for bit, on every ISA path. These files are
never regenerated; a failure here means a file a user saved would no longer load or would compute
something else."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import pathlib

import pytest
import safetensors
import safetensors.torch
import torch

import pycompress as pc
from pycompress.nn.registry import compressed_layers as converted_layers
from pycompress.nn import Int4Linear, Int8Conv2d, Int8Linear, SparseInt8Linear, SparseLinear
from pycompress.nn.int8_conv import Im2colConv2d

GOLDEN = pathlib.Path(__file__).resolve().parent / "data" / "golden"

_spec = importlib.util.spec_from_file_location("make_golden", GOLDEN / "make_golden.py")
make_golden = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(make_golden)

# folder -> artifact -> every converted layer as _describe gives it. Spelled out here, not read from the
# files: a loader that built another format (or a float layer) from a golden file fails the test.
# Each version's folder holds the same models (make_golden.py), saved by the pycompress of that version.
GOLDEN_MODELS = {
    "int8_dynamic": {"0": "Int8Linear int8 dynamic relu", "2": "Int8Linear int8 dynamic gelu",
                     "4": "Int8Linear int8 dynamic none"},
    "int8_static": {"0": "Int8Linear int8 static relu", "2": "Int8Linear int8 static none"},
    "sparse_csr_fp32": {"0": "SparseLinear csr none", "2": "SparseLinear csr none"},
    "sparse_nm24_fp32": {"0": "SparseLinear nm24 none", "2": "SparseLinear nm24 none"},
    "sparse_int8_unstructured": {"0": "Im2colConv2d/SparseInt8Linear int8 dynamic none",
                                 "3": "SparseInt8Linear int8 dynamic none",
                                 "5": "SparseInt8Linear int8 dynamic none"},
    "sparse_int8_block": {"0": "SparseInt8Linear int8 static none", "2": "SparseInt8Linear int8 static none",
                          "4": "SparseInt8Linear int8 static none"},
    "int8_conv": {"0": "Int8Conv2d int8 dynamic relu", "2": "Int8Conv2d int8 dynamic relu",
                  "4": "Int8Conv2d int8 dynamic none", "6": "Int8Linear int8 dynamic none"},
    "entropy_coded": {"0": "SparseLinear csr none", "2": "SparseInt8Linear int4 dynamic none",
                      "4": "Int8Linear int4 dynamic none"},
    "shared_input": {"query": "Int8Linear int8 dynamic none", "key": "Int8Linear int8 dynamic none",
                     "value": "Int8Linear int8 dynamic none", "out": "Int8Linear int8 dynamic none"},
}
# Added to v2 after its other files (make_golden.py --add): the int4 format is newer than v1.
INT4_MODELS = {
    "int4_grouped": {"0": "Im2colConv2d/Int4Linear int4 g16 dynamic none", "2": "Int4Linear int4 g16 dynamic relu",
                     "4": "Int4Linear int3 per-channel dynamic none", "5": "Int4Linear int4 g16 dynamic none"},
}
EXPECTED_LAYERS = {"v1": GOLDEN_MODELS, "v2": {**GOLDEN_MODELS, **INT4_MODELS}, "v3": {**GOLDEN_MODELS, **INT4_MODELS}}
FORMAT_VERSIONS = {"v1": 1, "v2": 2, "v3": 3}
CHECKSUMS_SINCE = 2  # the files of this version on carry sha256 checksums (pycompress.io)
# The tensors each entropy-coded golden file stores Huffman-coded.
ENTROPY_CODED = {(folder, "entropy_coded"): ["0.col_idx", "0.row_ptr", "2.blk_idx", "2.values", "4.w_packed"]
                 for folder in ("v1", "v2")}
# Only the 3-bit layer's nibble pairs code smaller (save keeps a tensor raw where Huffman does not pay).
ENTROPY_CODED[("v2", "int4_grouped")] = ["4.w4"]
# Version 3: integer weights as zero runs and nonzeros where that is smaller than their kernel buffers coded
# one by one (the sparse int8 and dense int8 layers of entropy_coded, the last int4 layer of int4_grouped).
_RUNS = ("integer_weight/nonzeros", "integer_weight/zero_runs")
ENTROPY_CODED[("v3", "entropy_coded")] = ["0.col_idx", "0.row_ptr"] + [f"{i}.{s}" for i in (2, 4) for s in _RUNS]
ENTROPY_CODED[("v3", "int4_grouped")] = ["4.w4"] + [f"5.{s}" for s in _RUNS]
ZERO_RUNS = {("v3", "entropy_coded"): ["2.", "4."], ("v3", "int4_grouped"): ["5."]}
ARTIFACTS = [(folder, name) for folder, names in EXPECTED_LAYERS.items() for name in names]


def _describe(module: torch.nn.Module) -> str:
    outer = type(module).__name__
    gemm = module.gemm if isinstance(module, (Im2colConv2d, Int8Conv2d)) else module
    kind = outer if gemm is module or isinstance(module, Int8Conv2d) else f"{outer}/{type(gemm).__name__}"
    if isinstance(gemm, SparseLinear):
        return f"{kind} {gemm.format} {gemm.activation}"
    if isinstance(gemm, Int4Linear):
        group = "per-channel" if gemm.group_size is None else f"g{gemm.group_size}"
        acts = "dynamic" if gemm.act_scale is None else "static"
        return f"{kind} int{gemm.weight_bits} {group} {acts} {gemm.activation}"
    assert isinstance(gemm, (Int8Linear, SparseInt8Linear)), type(gemm)
    acts = "dynamic" if gemm.act_scale is None else "static"
    return f"{kind} int{gemm.weight_bits} {acts} {gemm.activation}"


def _manifest(path: pathlib.Path) -> dict:
    with safetensors.safe_open(str(path), framework="pt") as f:
        return json.loads(f.metadata()["pycompress"])


def _io(path: pathlib.Path) -> tuple[dict, list[torch.Tensor], list[torch.Tensor]]:
    with safetensors.safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()["golden"])
        keys = set(f.keys())
        count = len(keys) // 2
        assert keys == {f"{kind}.{i}" for kind in ("input", "output") for i in range(count)}, sorted(keys)
        inputs = [f.get_tensor(f"input.{i}") for i in range(count)]
        outputs = [f.get_tensor(f"output.{i}") for i in range(count)]
    return meta, inputs, outputs


@pytest.mark.parametrize("folder", sorted(EXPECTED_LAYERS))
def test_golden_files_are_the_committed_bytes(folder):
    directory = GOLDEN / folder
    listed = {}
    for line in (directory / "SHA256SUMS").read_text().splitlines():
        digest, name = line.split("  ")
        listed[name] = digest
    expected_files = {f"{name}{suffix}" for name in EXPECTED_LAYERS[folder] for suffix in (".safetensors",
                                                                                          ".io.safetensors")}
    assert set(listed) == expected_files
    assert {p.name for p in directory.iterdir()} == expected_files | {"SHA256SUMS"}
    for name, digest in listed.items():
        assert hashlib.sha256((directory / name).read_bytes()).hexdigest() == digest, name


@pytest.mark.parametrize("mmap", [False, True], ids=["copied", "mmap"])
@pytest.mark.parametrize("folder,name", ARTIFACTS)
def test_golden_model_loads_and_gives_its_outputs(isa, folder, name, mmap):
    path = GOLDEN / folder / f"{name}.safetensors"
    manifest = _manifest(path)
    assert manifest["version"] == FORMAT_VERSIONS[folder]
    assert ("checksums" in manifest) == (FORMAT_VERSIONS[folder] >= CHECKSUMS_SINCE)
    assert sorted(manifest["entropy"]) == ENTROPY_CODED.get((folder, name), [])
    assert sorted(manifest.get("zero_runs", [])) == ZERO_RUNS.get((folder, name), [])
    meta, inputs, outputs = _io(GOLDEN / folder / f"{name}.io.safetensors")
    assert meta["format_version"] == FORMAT_VERSIONS[folder]
    skeleton = None if meta["skeleton"] is None else make_golden.SKELETONS[meta["skeleton"]]()
    model = pc.load(path, model=skeleton, mmap=mmap).eval()
    assert {n: _describe(m) for n, m in converted_layers(model)} == EXPECTED_LAYERS[folder][name]
    assert len(inputs) >= 2
    with torch.no_grad():
        for i, (x, want) in enumerate(zip(inputs, outputs)):
            got = model(x)
            assert got.dtype == torch.float32 and got.shape == want.shape, (i, got.dtype, got.shape)
            assert torch.equal(got, want), (isa, i, (got - want).abs().max().item())


@pytest.mark.parametrize("folder", sorted(EXPECTED_LAYERS))
def test_golden_shared_input_group_is_restored(folder):
    model = pc.load(GOLDEN / folder / "shared_input.safetensors", model=make_golden.AttentionLike()).eval()
    group = model.query._shared_input
    assert group is not None and group.members == [model.query, model.key, model.value]
    assert model.out._shared_input is None
    assert pc.conversion_record(model).shared_input == [{"layers": ["query", "key", "value"], "adjacent": False}]
