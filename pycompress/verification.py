"""pycompress.verification (``pycompress.verify``): how far a converted model is from its float reference, layer by layer.

Every converted layer is hooked. Two errors are measured for each:
- *local*: the converted layer's output against its float twin run on the **same input** the
  converted layer saw. This is the error the layer itself adds; ``report.worst`` is the layer
  with the lowest local SQNR, i.e. the one that contributes most.
- *accumulated*: the converted layer's output against the float model's output at that layer
  (everything upstream included).
End-to-end: every tensor the two models return.

Default tolerances are derived from the formats, not guessed (``layer_budget_db``):
a b-bit uniform quantizer over a signal whose peak is ``c`` times its RMS (crest factor) has
SQNR = 6.02 b + 4.77 - 20 log10(c) dB (step = 2 peak / 2^b, noise power step^2 / 12). An int8
layer quantizes weights (int8 symmetric per channel: 2^b - 1 levels) and activations (uint8
over [min, max]) independently, so the two noise powers add. With crest factor 16 (a Gaussian
has ~4; transformer activations have outliers well past that) an int8 x int8 layer is expected
at >= 25.8 dB. fp32 sparse formats only reorder float32 sums: 80 dB. End to end, with L
converted layers each at its budget adding independent noise, the output budget is the layer
budget minus 10 log10(L) dB, and the cosine budget is the one implied by that SQNR:
cos = 1 / sqrt(1 + 10^(-SQNR/10)).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from pycompress.calibration import run_batch
from pycompress.nn.registry import FORMATS, compressed_layers

CREST_FACTOR = 16.0
FLOAT_FORMAT_SQNR_DB = 80.0


def quantizer_sqnr_db(bits: int, crest_factor: float = CREST_FACTOR) -> float:
    return 6.02 * bits + 4.77 - 20.0 * math.log10(crest_factor)


def layer_budget_db(fmt: str, weight_bits: int = 8, act_bits: int = 8) -> float:
    """The default minimum local SQNR (dB) of one layer in format ``fmt``."""
    if fmt == "float" or not FORMATS[fmt].int8_numbers:
        return FLOAT_FORMAT_SQNR_DB
    noise = 10 ** (-quantizer_sqnr_db(weight_bits) / 10) + 10 ** (-quantizer_sqnr_db(act_bits) / 10)
    return -10.0 * math.log10(noise)


def output_budget_db(layer_budgets: list[float]) -> float:
    """End-to-end SQNR budget: the layers' noise powers add (each at its budget)."""
    if not layer_budgets:
        return FLOAT_FORMAT_SQNR_DB
    return -10.0 * math.log10(sum(10 ** (-b / 10) for b in layer_budgets))


def cosine_for_sqnr(sqnr_db: float) -> float:
    return 1.0 / math.sqrt(1.0 + 10 ** (-sqnr_db / 10))


@dataclass
class ErrorStats:
    """Streaming error statistics of ``out`` against ``ref`` (accumulated over calls, in float64)."""

    numel: int = 0
    sum_sq_err: float = 0.0
    sum_sq_ref: float = 0.0
    sum_sq_out: float = 0.0
    dot: float = 0.0
    max_abs: float = 0.0
    nonfinite: bool = False

    def update(self, out: torch.Tensor, ref: torch.Tensor) -> None:
        if out.shape != ref.shape:
            raise ValueError(f"verify: output shape {tuple(out.shape)} differs from the reference's {tuple(ref.shape)}")
        o, r = out.detach().double().reshape(-1), ref.detach().double().reshape(-1)
        self.numel += o.numel()
        if o.numel() == 0:
            return
        if not (torch.isfinite(o).all() and torch.isfinite(r).all()):
            self.nonfinite = True
            return
        d = o - r
        self.sum_sq_err += float(d @ d)
        self.sum_sq_ref += float(r @ r)
        self.sum_sq_out += float(o @ o)
        self.dot += float(o @ r)
        self.max_abs = max(self.max_abs, float(d.abs().max()))

    @property
    def rel_l2(self) -> float:
        if self.nonfinite:
            return math.nan
        if self.sum_sq_ref == 0:
            return 0.0 if self.sum_sq_err == 0 else math.inf
        return math.sqrt(self.sum_sq_err / self.sum_sq_ref)

    @property
    def sqnr_db(self) -> float:
        if self.nonfinite:
            return math.nan
        if self.sum_sq_err == 0:
            return math.inf
        if self.sum_sq_ref == 0:
            return -math.inf
        return 10.0 * math.log10(self.sum_sq_ref / self.sum_sq_err)

    @property
    def cosine(self) -> float:
        if self.nonfinite:
            return math.nan
        denom = math.sqrt(self.sum_sq_ref * self.sum_sq_out)
        if denom == 0:
            return 1.0 if self.sum_sq_err == 0 else 0.0
        return self.dot / denom


@dataclass
class LayerReport:
    name: str
    format: str
    local: ErrorStats
    accumulated: ErrorStats
    min_sqnr_db: float

    @property
    def ok(self) -> bool:
        return self.local.numel > 0 and self.local.sqnr_db >= self.min_sqnr_db  # NaN compares False


@dataclass
class OutputReport:
    name: str
    stats: ErrorStats
    min_sqnr_db: float
    min_cosine: float

    @property
    def ok(self) -> bool:
        return self.stats.sqnr_db >= self.min_sqnr_db and self.stats.cosine >= self.min_cosine


@dataclass
class VerifyReport:
    layers: list[LayerReport]
    outputs: list[OutputReport]
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(r.ok for r in self.layers) and all(o.ok for o in self.outputs)

    @property
    def worst(self) -> LayerReport | None:
        """The layer that adds the most error itself (lowest local SQNR; NaN ranks worst)."""
        if not self.layers:
            return None
        return min(self.layers, key=lambda r: -math.inf if math.isnan(r.local.sqnr_db) else r.local.sqnr_db)

    def failed(self) -> list[str]:
        return [r.name for r in self.layers if not r.ok] + [o.name for o in self.outputs if not o.ok]

    def __str__(self) -> str:
        head = ("layer", "format", "max|err|", "rel L2", "SQNR dB", "cosine", "accum dB", "budget dB", "ok")
        rows = [(r.name, r.format, f"{r.local.max_abs:.3g}", f"{r.local.rel_l2:.3g}", f"{r.local.sqnr_db:.1f}",
                 f"{r.local.cosine:.5f}", f"{r.accumulated.sqnr_db:.1f}", f"{r.min_sqnr_db:.1f}",
                 "yes" if r.ok else "NO") for r in self.layers]
        rows += [(f"[output] {o.name}", "end-to-end", f"{o.stats.max_abs:.3g}", f"{o.stats.rel_l2:.3g}",
                  f"{o.stats.sqnr_db:.1f}", f"{o.stats.cosine:.5f}", "", f"{o.min_sqnr_db:.1f}/cos {o.min_cosine:.4f}",
                  "yes" if o.ok else "NO") for o in self.outputs]
        widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(head)]
        fmt = lambda r: "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))  # noqa: E731
        lines = [fmt(head), fmt(tuple("-" * w for w in widths))] + [fmt(r) for r in rows]
        worst = self.worst
        verdict = "ok" if self.ok else f"FAILED: {', '.join(self.failed())}"
        lines.append(f"verify: {verdict}" + (f"; worst layer {worst.name} ({worst.local.sqnr_db:.1f} dB)" if worst else ""))
        lines += self.notes
        return "\n".join(lines)

    def plot(self, path: str) -> None:
        """Bar chart of each layer's local SQNR against its budget (needs matplotlib: pip install pycompress[plot])."""
        import importlib.util

        if importlib.util.find_spec("matplotlib") is None:
            raise ImportError("VerifyReport.plot needs matplotlib: pip install 'pycompress[plot]'")
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        names = [r.name for r in self.layers]
        sqnr = [min(r.local.sqnr_db, 120.0) if not math.isnan(r.local.sqnr_db) else 0.0 for r in self.layers]
        fig, ax = plt.subplots(figsize=(max(6.0, 0.25 * len(names) + 2), 4.5))
        colors = ["tab:green" if r.ok else "tab:red" for r in self.layers]
        ax.bar(range(len(names)), sqnr, color=colors)
        ax.plot(range(len(names)), [r.min_sqnr_db for r in self.layers], "k_", markersize=12, label="budget")
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(names, rotation=90, fontsize=7)
        ax.set_ylabel("local SQNR (dB, higher is better)")
        ax.set_title("pycompress.verify: per-layer error (red: over budget)")
        ax.legend()
        fig.tight_layout()
        fig.savefig(path)
        plt.close(fig)


def flatten_tensors(value, prefix: str = "output") -> list[tuple[str, torch.Tensor]]:
    """Every tensor in a model's return value (tensor, tuple/list, dict, HF ModelOutput), with a path name."""
    if isinstance(value, torch.Tensor):
        return [(prefix, value)]
    if isinstance(value, Mapping):
        return [t for k, v in value.items() for t in flatten_tensors(v, f"{prefix}.{k}")]
    if isinstance(value, (list, tuple)):
        return [t for i, v in enumerate(value) for t in flatten_tensors(v, f"{prefix}[{i}]")]
    return []


def _activation_fn(module: nn.Module):
    kind = module.activation  # what the layer's kernel applies after its GEMM
    if kind == "relu":
        return torch.relu
    if kind == "gelu":
        return torch.nn.functional.gelu
    return lambda t: t


def verify(model: nn.Module, reference: nn.Module, inputs, *, layer_min_sqnr_db: float | None = None,
           output_min_sqnr_db: float | None = None, output_min_cosine: float | None = None) -> VerifyReport:
    """Run ``model`` (converted) and ``reference`` (its float original) on ``inputs``; see the module docstring.

    Overrides: ``layer_min_sqnr_db`` replaces every layer's format-derived budget;
    ``output_min_sqnr_db`` / ``output_min_cosine`` replace the end-to-end budgets.
    """
    layers = compressed_layers(model)
    if model is reference:
        raise ValueError("verify: model and reference are the same object; keep a float copy "
                         "(copy.deepcopy(model)) before pycompress.convert, which converts in place")
    reports: dict[int, LayerReport] = {}
    twins: dict[int, nn.Module] = {}
    for name, module in layers:
        try:
            twin = reference.get_submodule(name)
        except AttributeError:
            raise ValueError(f"verify: converted layer {name} has no twin of that name in the reference model") from None
        budget = (layer_budget_db(module.format_name, module.weight_bits, module.act_bits) if layer_min_sqnr_db is None
                  else layer_min_sqnr_db)
        reports[id(module)] = LayerReport(name, module.format_name, ErrorStats(), ErrorStats(), budget)
        twins[id(module)] = twin

    reference_outputs: dict[str, list[torch.Tensor]] = {name: [] for name, _ in layers}
    # A layer that runs a fused activation is compared with act(float twin).
    epilogues = {id(m): _activation_fn(m) for _, m in layers}

    def capture_reference(name, epilogue):
        def hook(_mod, _args, out):
            reference_outputs[name].append(epilogue(out.detach()))
        return hook

    call_index: dict[int, int] = {}

    def compare_converted(_mod, args, out):
        key = id(_mod)
        report = reports[key]
        with torch.no_grad():
            report.local.update(out, epilogues[key](twins[key](*args)))
        i = call_index.get(key, 0)
        call_index[key] = i + 1
        seen = reference_outputs[report.name]
        if i < len(seen):
            report.accumulated.update(out, seen[i])

    handles = []
    try:
        with torch.no_grad():
            for name, module in layers:
                handles.append(reference.get_submodule(name).register_forward_hook(
                    capture_reference(name, epilogues[id(module)])))
            ref_out = run_batch(reference, inputs, "verify: the reference model's inputs")
            for h in handles:
                h.remove()
            handles = [m.register_forward_hook(compare_converted) for _, m in {id(m): (n, m) for n, m in layers}.values()]
            out = run_batch(model, inputs, "verify: the converted model's inputs")
    finally:
        for h in handles:
            h.remove()

    ref_flat, out_flat = flatten_tensors(ref_out), flatten_tensors(out)
    if [n for n, _ in ref_flat] != [n for n, _ in out_flat]:
        raise ValueError(f"verify: the models return different structures: {[n for n, _ in out_flat]} vs "
                         f"{[n for n, _ in ref_flat]} (reference)")
    layer_reports = list(reports.values())
    e2e_db = output_budget_db([r.min_sqnr_db for r in layer_reports]) if output_min_sqnr_db is None else output_min_sqnr_db
    e2e_cos = cosine_for_sqnr(e2e_db) if output_min_cosine is None else output_min_cosine
    outputs = []
    for (name, o), (_, r) in zip(out_flat, ref_flat):
        stats = ErrorStats()
        if o.is_floating_point():
            stats.update(o, r)
        elif not torch.equal(o, r):
            stats.nonfinite = True  # an integer output (e.g. token ids) must match exactly
        outputs.append(OutputReport(name, stats, e2e_db, e2e_cos))
    notes = []
    if not layers:
        notes.append("verify: the model has no converted layers; only the end-to-end outputs were compared")
    return VerifyReport(layer_reports, outputs, notes)
