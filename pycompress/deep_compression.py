"""Deep Compression's size report (Han, Mao & Dally, 2016): the bytes of a model's Linear / Conv2d
weights after each stage, float32 -> pruning -> quantization -> Huffman coding, as in their Table 1.

Per layer (a row for every nn.Linear / nn.Conv2d of the float model, shared layers once):

- ``float32``: the float layer's weight and bias as dense float32;
- ``pruned``: what the compressed model's format stores, with the stored weights still at 4 bytes:
  a sparse layer keeps its stored values (csr: the nonzeros; bsr1x4: 4 per stored 1x4 block; nm24:
  K/2 per row) plus its index arrays; a layer stored dense keeps every weight;
- ``quantized``: the compressed layer's tensors as they are in memory and in ``pycompress.save``'s
  file (int8 weights with their padding, per-channel scales, ``col_sum``, indices, bias);
- ``huffman``: what ``save(..., entropy_coding=True)`` stores for the layer (``pycompress.io.code_layer``):
  its integer weights as Huffman-coded zero runs and nonzeros in place of the kernel's buffers where that
  is smaller, the other integer and index buffers Huffman-coded where that is smaller (each layer
  class's ``ENTROPY_CODED``), code lengths included.

Everything else in the model (embeddings, norms, ...) is outside the table; with ``path`` the
report also writes the entropy-coded file there and gives its size on disk (the whole model,
manifest included).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import nn

from pycompress.io import code_layer, save
from pycompress.nn.registry import float_kind

STAGES = ("float32", "pruned", "quantized", "huffman")


@dataclass
class LayerSizes:
    name: str
    format: str
    density: float  # nonzero fraction of the float model's (masked) weight
    float32: int
    pruned: int
    quantized: int
    huffman: int


@dataclass
class CompressionReport:
    layers: list[LayerSizes]
    path: str | None = None
    file_bytes: int | None = None  # the entropy-coded file on disk (whole model), when a path was given

    def total(self, stage: str) -> int:
        return sum(getattr(row, stage) for row in self.layers)

    def ratio(self, stage: str) -> float:
        """How many times smaller than float32 the layers are after ``stage``."""
        return self.total("float32") / max(1, self.total(stage))

    def __str__(self) -> str:
        width = max([len("total")] + [len(r.name) for r in self.layers])
        head = (f"{'layer':<{width}}  {'format':<12} {'density':>7}  {'float32':>10}  {'pruned':>10}  "
                f"{'quantized':>10}  {'huffman':>10}  {'ratio':>6}")
        lines = [head, "-" * len(head)]
        for r in self.layers:
            lines.append(f"{r.name:<{width}}  {r.format:<12} {r.density:>7.1%}  {r.float32:>10,}  {r.pruned:>10,}  "
                         f"{r.quantized:>10,}  {r.huffman:>10,}  {r.float32 / max(1, r.huffman):>5.1f}x")
        lines.append("-" * len(head))
        totals = "  ".join(f"{self.total(stage):>10,}" for stage in STAGES)
        lines.append(f"{'total':<{width}}  {'':<12} {'':>7}  {totals}  {self.ratio('huffman'):>5.1f}x")
        lines.append("ratio vs float32: " + ", ".join(f"{s} {self.ratio(s):.1f}x" for s in STAGES[1:]))
        if self.file_bytes is not None:
            lines.append(f"file on disk (whole model, entropy-coded): {self.file_bytes:,} bytes ({self.path})")
        return "\n".join(lines)


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def compression_report(model_float: nn.Module, model_compressed: nn.Module,
                       path: str | os.PathLike | None = None) -> CompressionReport:
    """Sizes of every Linear / Conv2d layer per Deep Compression stage (see the module docstring).

    ``model_float``: the float model before ``pycompress.convert`` (keep ``copy.deepcopy(model)``
    first; pruning masks and fake quantization on it are fine). ``model_compressed``: the converted
    model. ``path``: also write ``save(model_compressed, path, entropy_coding=True)`` and report
    the file's size. ``print(report)`` shows the table.
    """
    model_compressed = getattr(model_compressed, "_orig_mod", model_compressed)
    compressed_state = model_compressed.state_dict()
    rows, seen = [], set()
    for name, float_layer in model_float.named_modules():  # shared layers once
        if float_kind(float_layer) is None:
            continue
        try:
            compressed = model_compressed.get_submodule(name)
        except AttributeError:
            raise ValueError(f"compression_report: the compressed model has no layer {name} (is it the same "
                             "architecture?)") from None
        if id(compressed) in seen:
            continue
        seen.add(id(compressed))
        weight = float_layer.weight.detach()
        float_bytes = weight.numel() * 4 + (float_layer.bias.numel() * 4 if float_layer.bias is not None else 0)
        is_float = float_kind(compressed) is not None
        fmt = "float" if is_float else compressed.format_name
        tensors = {k: v for k, v in compressed_state.items() if k.startswith(f"{name}.") and isinstance(v, torch.Tensor)}
        quantized = sum(_nbytes(t) for t in tensors.values())
        huffman = quantized if is_float else sum(_nbytes(t) for t in code_layer(name, compressed, tensors)[0].values())
        # A format that stores every weight saves nothing by pruning alone.
        pruned = float_bytes if is_float or compressed.pruned_bytes() is None else compressed.pruned_bytes()
        density = float((weight != 0).sum()) / max(1, weight.numel())
        rows.append(LayerSizes(name, fmt, density, float_bytes, pruned, quantized, huffman))
    report = CompressionReport(rows)
    if path is not None:
        save(model_compressed, path, entropy_coding=True)
        report.path, report.file_bytes = os.fspath(path), os.path.getsize(path)
    return report


__all__ = ["CompressionReport", "LayerSizes", "STAGES", "compression_report"]
