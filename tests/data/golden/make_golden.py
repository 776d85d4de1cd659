"""Writes the golden artifacts that tests/test_golden.py loads: files saved by ``pycompress.save``
that every later pycompress must load and run to exactly the same outputs.

    PYTHONPATH=. python tests/data/golden/make_golden.py     # from the repository root: writes tests/data/golden/v<N>/

(without ``PYTHONPATH=.`` it runs whichever pycompress is installed.)

``N`` is the manifest format version of the pycompress that runs this script
(``pycompress.io.MANIFEST_VERSION``). The script refuses to write into a folder that already
exists: golden files are written once and committed, never regenerated (a regenerated file would
prove nothing about the files users already hold). A new format version gets a new folder.

For each model ``NAME`` the folder holds

- ``NAME.safetensors``: the converted model as ``pycompress.save`` wrote it;
- ``NAME.io.safetensors`` (plain safetensors, no pickle): ``input.<i>`` and ``output.<i>``, float32, the
  fixed inputs and the exact outputs the converted model gave before it was saved. Its metadata
  ``golden`` names the skeleton class ``load(path, model=...)`` needs (null for models ``load`` rebuilds
  on its own) and the pycompress that wrote it;
- ``SHA256SUMS`` (``sha256sum -c`` format): the test checks every file against it, so a golden file is
  never silently replaced.

The outputs are bit-identical on every ISA path (the script checks it before writing anything):
int8 formats are bit-exact by contract (``csrc/q8/q8_gemm.h``), and the fp32 sparse kernels, whose
summation order differs between ISAs, are given weights, biases and inputs that are small multiples
of powers of two, so every product and partial sum is exact in float32 and the order cannot matter
(checked against a float64 computation). Outside the pycompress layers the models use only ReLU,
Flatten and elementwise products and sums, which torch computes exactly the same way everywhere.

Everything is seeded: running it twice writes the same tensors and manifests (the file bytes may still
differ: safetensors orders the header's metadata keys as its hash map does).
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import pathlib
import sys

import safetensors.torch
import torch
from torch import nn

import pycompress as pc
from pycompress.io import MANIFEST_VERSION

HERE = pathlib.Path(__file__).resolve().parent


# ---------------------------------------------------------------- skeletons (never change these)
# load(path, model=...) needs a float model of the architecture that was saved; the golden files of
# every version were saved from these classes, so they stay exactly as they are.


class AttentionLike(nn.Module):
    """Query / key / value projections of one input (a shared-input group) mixed elementwise."""

    def __init__(self, dim: int = 32) -> None:
        super().__init__()
        self.query, self.key, self.value = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.query(x) * self.key(x)) + self.value(x)


SKELETONS: dict[str, type[nn.Module]] = {"AttentionLike": AttentionLike}


# ---------------------------------------------------------------- models


def _dyadic(shape, gen: torch.Generator, num: int, den: int) -> torch.Tensor:
    """Values k / den with |k| <= num: exact in float32, and so are their products and short sums."""
    return torch.randint(-num, num + 1, shape, generator=gen).float() / den


def _set_dyadic(layer: nn.Linear, gen: torch.Generator) -> None:
    with torch.no_grad():
        layer.weight.copy_(_dyadic(layer.weight.shape, gen, 7, 8))
        layer.bias.copy_(_dyadic(layer.bias.shape, gen, 16, 16))


def int8_dynamic():
    """Dense Int8Linear, activations quantized per row at run time; fused ReLU and GELU; a layer without bias."""
    torch.manual_seed(101)
    gen = torch.Generator().manual_seed(101)
    model = nn.Sequential(nn.Linear(64, 96), nn.ReLU(), nn.Linear(96, 48, bias=False), nn.GELU(),
                          nn.Linear(48, 10)).eval()
    pc.convert(model, policy="int8")
    return model, [torch.randn(1, 64, generator=gen), torch.randn(33, 64, generator=gen)], None


def int8_static():
    """Int8Linear with the calibrated static activation scale / zero point of pycompress.quantize."""
    torch.manual_seed(102)
    gen = torch.Generator().manual_seed(102)
    model = nn.Sequential(nn.Linear(64, 80), nn.ReLU(), nn.Linear(80, 10)).eval()
    pc.quantize(model, [torch.randn(16, 64, generator=gen) for _ in range(4)], activations="static")
    pc.convert(model, policy="int8")
    return model, [torch.randn(1, 64, generator=gen), torch.randn(33, 64, generator=gen)], None


def _fp32_sparse(seed: int, prune_kwargs: dict):
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 16)).eval()
    for layer in (model[0], model[2]):
        _set_dyadic(layer, gen)
    pc.prune(model, **prune_kwargs)
    inputs = [_dyadic((1, 64), gen, 15, 8), _dyadic((33, 64), gen, 15, 8)]
    exact = _outputs(copy.deepcopy(model).double(), [x.double() for x in inputs])
    pc.convert(model, policy="sparse-fp32")
    for x, want in zip(inputs, exact):  # every product and sum exact: no summation order can change a bit
        if not (torch.equal(want.float().double(), want) and torch.equal(_outputs(model, [x])[0], want.float())):
            raise SystemExit(f"make_golden: seed {seed}: the fp32 sparse output is not the exact float64 sum")
    return model, inputs, None


def sparse_csr_fp32():
    """SparseLinear csr (fp32 values, uint16 column indices) from unstructured magnitude pruning."""
    return _fp32_sparse(103, {"sparsity": 0.8, "method": "magnitude"})


def sparse_nm24_fp32():
    """SparseLinear nm24 (2:4: two fp32 values and 2-bit indices per group of 4) from N:M pruning."""
    return _fp32_sparse(104, {"method": "nm", "n": 2, "m": 4})


def sparse_int8_unstructured():
    """SparseInt8Linear (bsr1x4) from unstructured pruning, dynamic activations, and a conv lowered onto it
    (Im2colConv2d). Three batch sizes: the sliced kernels (small M) and the bsr1x4 kernel."""
    torch.manual_seed(105)
    gen = torch.Generator().manual_seed(105)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(256, 64), nn.ReLU(),
                          nn.Linear(64, 10)).eval()
    pc.prune(model, sparsity=0.85, method="magnitude")
    pc.convert(model, policy="sparse-int8")
    inputs = [torch.randn(m, 3, 4, 4, generator=gen) for m in (1, 3, 40)]
    return model, inputs, None


def sparse_int8_block():
    """SparseInt8Linear from 1x4 block pruning, static activations; a layer with K = 30 (K % 4 != 0, so not
    block-prunable: pruned unstructured, stored with a partial last block)."""
    torch.manual_seed(106)
    gen = torch.Generator().manual_seed(106)
    model = nn.Sequential(nn.Linear(128, 30), nn.ReLU(), nn.Linear(30, 64), nn.ReLU(), nn.Linear(64, 10)).eval()
    pc.prune(model, sparsity=0.75, method="block", block=(1, 4), exclude=["2"])
    pc.prune(model, sparsity=0.75, method="magnitude", exclude=["0", "4"])
    pc.quantize(model, [torch.randn(16, 128, generator=gen) for _ in range(4)], activations="static")
    pc.convert(model, policy="sparse-int8")
    inputs = [torch.randn(m, 128, generator=gen) for m in (1, 3, 40)]
    return model, inputs, None


def int8_conv():
    """Int8Conv2d: 3x3 with padding, 1x1 (lowered to a plain GEMM), 3x3 with stride 2; fused ReLUs."""
    torch.manual_seed(107)
    gen = torch.Generator().manual_seed(107)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 1), nn.ReLU(),
                          nn.Conv2d(16, 8, 3, stride=2), nn.Flatten(), nn.Linear(72, 10)).eval()
    pc.convert(model, policy="int8")
    return model, [torch.randn(1, 3, 8, 8, generator=gen), torch.randn(5, 3, 8, 8, generator=gen)], None


def entropy_coded():
    """Deep Compression's storage: pruned, 4-bit weights, saved with entropy_coding=True (the integer
    weights and the sparse indices Huffman-coded). A csr fp32 layer first (dyadic, exact on every ISA),
    then sparse int8 and dense int8."""
    torch.manual_seed(108)
    gen = torch.Generator().manual_seed(108)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 96), nn.ReLU(), nn.Linear(96, 10)).eval()
    _set_dyadic(model[0], gen)
    pc.prune(model, sparsity=0.8, method="magnitude", exclude=["4"])
    pc.quantize(model, weight_bits=4, activations="dynamic", exclude=["0"])
    pc.convert(model, policy="int8", overrides={"0": "sparse-fp32", "2": "sparse-int8"})
    inputs = [_dyadic((1, 64), gen, 15, 8), _dyadic((33, 64), gen, 15, 8)]
    return model, inputs, None


def shared_input():
    """Query / key / value Int8Linears grouped by pycompress.convert into one SharedInputGroup (found
    from example_inputs); needs the AttentionLike skeleton to load."""
    torch.manual_seed(109)
    gen = torch.Generator().manual_seed(109)
    model = AttentionLike().eval()
    pc.convert(model, example_inputs=torch.randn(4, 32, generator=gen), policy="int8")
    return model, [torch.randn(1, 1, 32, generator=gen), torch.randn(2, 5, 32, generator=gen)], "AttentionLike"


def int4_grouped():
    """Int4Linear (W4A8): GPTQ 4-bit weights in groups of 16 with a fused ReLU, 3-bit per channel, 4-bit groups
    of 16 on a conv lowered onto it (K = 32); saved with entropy coding (the packed nibbles Huffman-coded). Added to v2
    after its other files (``--add``): the format is newer than v1."""
    torch.manual_seed(110)
    gen = torch.Generator().manual_seed(110)
    model = nn.Sequential(nn.Conv2d(8, 16, 2), nn.Flatten(), nn.Linear(144, 128), nn.ReLU(), nn.Linear(128, 96),
                          nn.Linear(96, 10)).eval()
    batches = [torch.randn(64, 8, 4, 4, generator=gen) for _ in range(4)]  # 256 rows: GPTQ needs >= K = 144
    pc.quantize(model, batches, weight_bits=4, group_size=16, method="gptq", exclude=["0", "4"], progress=False)
    pc.quantize(model, batches, weight_bits=3, group_size=None, exclude=["0", "2", "5"], progress=False)
    pc.quantize(model, batches, weight_bits=4, group_size=16, exclude=["2", "4", "5"], progress=False)
    pc.convert(model, policy="int4")
    return model, [torch.randn(1, 8, 4, 4, generator=gen), torch.randn(7, 8, 4, 4, generator=gen)], None


MODELS = {f.__name__: f for f in (int8_dynamic, int8_static, sparse_csr_fp32, sparse_nm24_fp32,
                                  sparse_int8_unstructured, sparse_int8_block, int8_conv, entropy_coded, shared_input,
                                  int4_grouped)}
ENTROPY_CODED = {"entropy_coded", "int4_grouped"}


# ---------------------------------------------------------------- checks and writing


def _outputs(model: nn.Module, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    with torch.no_grad():
        return [model(x) for x in inputs]


def _on_every_isa(model: nn.Module, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    """The outputs on the active ISA, after checking every other supported path gives the same bits."""
    previous = pc.get_isa()
    try:
        results = {}
        for isa in pc.supported_isas():
            pc.set_isa(isa)
            results[isa] = _outputs(model, inputs)
    finally:
        pc.set_isa(previous)
    first = results[previous]
    for isa, outs in results.items():
        if not all(torch.equal(a, b) for a, b in zip(outs, first)):
            raise SystemExit(f"make_golden: outputs on {isa} differ from {previous}; not a golden model")
    return first


def write(out_dir: pathlib.Path, add: bool = False) -> None:
    """Writes every model into a new folder; with ``add``, only the models an existing folder lacks (a format
    newer than the folder's other files), never touching a file already there."""
    if out_dir.exists() and not add:
        raise SystemExit(f"make_golden: {out_dir} exists; golden files are never overwritten (see the docstring)")
    if add and not out_dir.exists():
        raise SystemExit(f"make_golden: --add needs the existing folder {out_dir}")
    staged = {}
    for name, build in MODELS.items():
        if add and (out_dir / f"{name}.safetensors").exists():
            continue
        model, inputs, skeleton = build()
        outputs = _on_every_isa(model, inputs)
        staged[name] = (model, inputs, outputs, skeleton)
    out_dir.mkdir(parents=True, exist_ok=add)
    for name, (model, inputs, outputs, skeleton) in staged.items():
        path = out_dir / f"{name}.safetensors"
        pc.save(model, path, entropy_coding=name in ENTROPY_CODED)
        loaded = pc.load(path, model=None if skeleton is None else SKELETONS[skeleton]()).eval()
        if not all(torch.equal(a, b) for a, b in zip(_on_every_isa(loaded, inputs), outputs)):
            raise SystemExit(f"make_golden: {name}: the loaded model does not reproduce its outputs")
        io = {f"input.{i}": x.contiguous() for i, x in enumerate(inputs)}
        io.update({f"output.{i}": y.contiguous() for i, y in enumerate(outputs)})
        meta = {"skeleton": skeleton, "format_version": MANIFEST_VERSION, "pycompress": pc.build_info()["version"]}
        safetensors.torch.save_file(io, str(out_dir / f"{name}.io.safetensors"), metadata={"golden": json.dumps(meta)})
        print(f"{name}: {path.stat().st_size} bytes")
    new_files = [out_dir / f"{name}{suffix}" for name in staged for suffix in (".safetensors", ".io.safetensors")]
    sums = [f"{hashlib.sha256(f.read_bytes()).hexdigest()}  {f.name}\n" for f in sorted(new_files)]
    old_sums = (out_dir / "SHA256SUMS").read_text() if add else ""
    (out_dir / "SHA256SUMS").write_text(old_sums + "".join(sums))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=pathlib.Path, default=HERE / f"v{MANIFEST_VERSION}",
                        help="folder to create (default: tests/data/golden/v<format version>)")
    parser.add_argument("--add", action="store_true",
                        help="write only the models the existing folder lacks (a newer layer format)")
    args = parser.parse_args(argv)
    write(args.out, add=args.add)


if __name__ == "__main__":
    main(sys.argv[1:])
