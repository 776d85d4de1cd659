"""pycompress.summaries (``pycompress.summary``): per-layer format, density, bits, bytes before/after, kernel and reason."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from pycompress.conversion import conversion_record
from pycompress.nn.registry import compressed_layers, float_kind, module_bytes


@dataclass
class SummaryRow:
    name: str
    kind: str
    format: str
    density: float
    weight_bits: int
    bytes_before: int
    bytes_after: int
    kernel: str
    reason: str


@dataclass
class Summary:
    rows: list[SummaryRow]
    model_bytes: int  # every distinct parameter and buffer the model holds now
    notes: list[str]

    @property
    def bytes_before(self) -> int:
        return sum(r.bytes_before for r in self.rows)

    @property
    def bytes_after(self) -> int:
        return sum(r.bytes_after for r in self.rows)

    def __str__(self) -> str:
        head = ("layer", "type", "format", "density", "bits", "bytes before", "bytes after", "kernel", "why")
        body = [(r.name, r.kind, r.format, f"{r.density:.3f}", str(r.weight_bits), f"{r.bytes_before:,}",
                 f"{r.bytes_after:,}", r.kernel, r.reason) for r in self.rows]
        widths = [max([len(h)] + [len(b[i]) for b in body]) for i, h in enumerate(head)]
        numeric = {3, 4, 5, 6}
        fmt = lambda r: "  ".join(c.rjust(w) if i in numeric else c.ljust(w)  # noqa: E731
                                  for i, (c, w) in enumerate(zip(r, widths))).rstrip()
        lines = [fmt(head), fmt(tuple("-" * w for w in widths))] + [fmt(b) for b in body]
        ratio = f" ({self.bytes_before / self.bytes_after:.2f}x smaller)" if self.bytes_after else ""
        lines.append(f"layers: {self.bytes_before:,} bytes before -> {self.bytes_after:,} after{ratio}; "
                     f"whole model now {self.model_bytes:,} bytes")
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


def summary(model: nn.Module) -> Summary:
    """The table for a converted (or float) model; bytes are measured from the tensors the layers hold now."""
    model = getattr(model, "_orig_mod", model)
    record = conversion_record(model)
    by_name = {alias: r for r in (record.layers if record else []) for alias in r.aliases}
    rows: list[SummaryRow] = []
    seen: set[int] = set()
    converted = {id(m) for _, m in compressed_layers(model)}
    inside_converted = {id(sub) for _, m in compressed_layers(model) for sub in m.modules() if sub is not m}
    for name, module in model.named_modules():
        if id(module) in seen or id(module) in inside_converted:
            continue
        kind = float_kind(module)
        if id(module) not in converted and kind is None:
            continue
        seen.add(id(module))
        rec = by_name.get(name)
        after = module_bytes(module)
        if id(module) in converted:
            fmt, bits = module.format_name, module.weight_bits
            density = rec.density if rec else float("nan")
            kind = rec.kind if rec else type(module).__name__
        else:
            fmt, bits = "float", 32
            weight = module.weight
            density = float((weight != 0).sum()) / max(1, weight.numel())
        kernel = rec.kernel if rec else ("torch (float32)" if fmt == "float" else type(module).__name__)
        group = getattr(module, "_shared_input", None)
        if group is not None:
            kernel += f" + input shared by {group.size} layers"
        rows.append(SummaryRow(name, kind, fmt, density, bits, rec.bytes_before if rec else after, after, kernel,
                               rec.reason if rec else ("not converted" if fmt == "float" else "")))
    return Summary(rows, module_bytes(model), list(record.notes) if record else [])
