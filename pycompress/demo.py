"""``pycompress demo``: the whole pipeline on real data, end to end.

On scikit-learn's 8x8 digits images: train a teacher CNN, distill a smaller
student, prune it gradually with fine-tuning, quantize it (PTQ and QAT, 8-bit and 4-bit weights),
convert it to pycompress's kernels, verify it against its float twin, save it,
load it back, and print one table: accuracy, parameters, bytes and latency of
every stage beside the float teacher. Deterministic for a seed; every number is
measured, and a stage that loses accuracy shows it.
"""

from __future__ import annotations

import copy
import os
import tempfile
import time
from dataclasses import dataclass

import torch
from torch import nn

import pycompress as pc
from pycompress.examples import digits
from pycompress.examples.models import StudentCNN


@dataclass
class Row:
    stage: str
    accuracy: float
    params: int
    stored_bytes: int
    latency_b1_us: float
    latency_batch_us: float
    note: str


def latency_us(model: nn.Module, x: torch.Tensor, repeats: int) -> float:
    """Median wall time of one forward (after warm-up), in microseconds."""
    with torch.inference_mode():
        for _ in range(max(3, repeats // 10)):
            model(x)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            model(x)
            times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2] * 1e6


def float_bytes(model: nn.Module) -> int:
    """Bytes of a float model's weights stored densely as float32 (pruning masks and
    fake-quant observers are training-time state, not part of what is stored)."""
    return 4 * digits.count_parameters(model)


@dataclass
class Saved:
    """A simulated (fake-quant) stage converted to the kernels, verified, saved Huffman-coded and reloaded."""
    converted: nn.Module
    report: object      # pc.verify's report against the simulation
    file_bytes: int
    sizes: object       # pc.compression_report against the pruned float model
    reloaded: nn.Module
    same: bool          # reloaded outputs == converted outputs, bit for bit


def _convert_save_reload(simulated: nn.Module, pruned: nn.Module, x: torch.Tensor, path: str) -> Saved:
    simulated = simulated.eval()
    converted = pc.convert(copy.deepcopy(simulated), policy="state")
    report = pc.verify(converted, simulated, x)
    pc.save(converted, path, entropy_coding=True)  # Deep Compression's last stage: Huffman-coded weights
    # The student is a custom nn.Module: load rebuilds it from a fresh float instance of the same
    # architecture, BatchNorm folded as quantization left it.
    skeleton = StudentCNN().eval()
    pc.quant.fold_conv_bn(skeleton)
    reloaded = pc.load(path, model=skeleton)
    with torch.inference_mode():
        same = torch.equal(reloaded(x), converted(x))
    return Saved(converted, report, os.path.getsize(path), pc.compression_report(pruned, converted), reloaded, same)


def _print_table(rows: list[Row], batch: int) -> None:
    teacher = rows[0]
    header = (f"{'stage':<26} {'accuracy':>8} {'params':>8} {'bytes':>9} {'vs teacher':>10} "
              f"{'batch 1 us':>10} {f'batch {batch} us':>13} {'speed':>6}  note")
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r.stage:<26} {r.accuracy:>8.4f} {r.params:>8,} {r.stored_bytes:>9,} "
              f"{teacher.stored_bytes / r.stored_bytes:>9.1f}x {r.latency_b1_us:>10.1f} "
              f"{r.latency_batch_us:>13.1f} {teacher.latency_batch_us / r.latency_batch_us:>5.1f}x  {r.note}")


def run_demo(quick: bool = False, seed: int = 0, progress: bool = True, out: str | None = None) -> dict:
    """Runs the pipeline and prints the tables; returns the rows, the verify report and the size report."""
    start = time.perf_counter()
    say = print if progress else (lambda *a, **k: None)
    say(f"pycompress {pc.__version__} on {pc.get_isa()}, {torch.get_num_threads()} threads; "
        f"digits: 8x8 images, seed {seed}{' (quick run)' if quick else ''}")
    # Bars only on a terminal (tqdm through pycompress.progress); messages unless quiet.
    stages = digits.run_pipeline(seed=seed, quick=quick, progress=None if progress else False)
    data = digits.load_data(seed)
    x, y = data.x_test, data.y_test

    int8_name = "qat_w8" if stages["qat_w8"].accuracy >= stages["ptq_w8"].accuracy else "ptq_w8"
    with tempfile.TemporaryDirectory() as tmp:
        say(f"converting the {int8_name} model to pycompress kernels, then verifying it")
        w8 = _convert_save_reload(stages[int8_name].model, stages["pruned"].model, x,
                                  out or os.path.join(tmp, "digits_student.safetensors"))
        # Deep Compression's whole recipe: the pruned student with 4-bit weights (QAT), on the int4 kernels,
        # saved Huffman-coded; its size against its own float32 weights. Then the same at 90% sparsity: Deep
        # Compression's size, and the accuracy it costs.
        say("converting the 4-bit QAT model to the int4 kernels, then verifying it")
        w4 = _convert_save_reload(stages["qat_w4"].model, stages["pruned"].model, x,
                                  os.path.join(tmp, "digits_student_w4.safetensors"))
        say("converting the 90%-sparse 4-bit QAT model, then verifying it")
        w4_90 = _convert_save_reload(stages["qat_w4_90"].model, stages["pruned90"].model, x,
                                     os.path.join(tmp, "digits_student_w4_90.safetensors"))
    student_fp32 = float_bytes(stages["student_distilled"].model)

    repeats = 30 if quick else 200
    labels = {
        "teacher": ("teacher (float)", "trained on labels"),
        "student_distilled": ("student, distilled", "KD from the teacher (T=4)"),
        "pruned": ("student, pruned", "gradual AGP; masks kept while fine-tuning"),
        "ptq_w8": ("student, int8 PTQ (sim)", "static activations, fake-quant in float"),
        "qat_w8": ("student, int8 QAT (sim)", "quantization-aware fine-tuning, fake-quant"),
        "qat_w4": ("student, 4-bit QAT (sim)", "4-bit weights (per channel / groups of 128), fake-quant"),
        "pruned90": ("student, pruned to 90%", "pruned on from 80% with fine-tuning"),
        "qat_w4_90": ("student, 90%, 4-bit QAT (sim)", "4-bit weights, fake-quant"),
    }
    rows = []
    rows_by = {}
    for key, (stage, note) in labels.items():
        model = stages[key].model.eval()
        rows.append(Row(stage, stages[key].accuracy, digits.count_parameters(model, nonzero=True),
                        float_bytes(model), latency_us(model, x[:1], repeats), latency_us(model, x, repeats), note))
        rows_by[key] = rows[-1]
    summary = pc.summary(w8.converted)
    rows.append(Row("pycompress kernels", digits.evaluate(w8.converted, x, y), rows_by[int8_name].params,
                    summary.model_bytes, latency_us(w8.converted, x[:1], repeats),
                    latency_us(w8.converted, x, repeats), f"convert({int8_name}); verify {'ok' if w8.report.ok else 'FAILED'}"))
    rows.append(Row("saved file, reloaded", digits.evaluate(w8.reloaded, x, y), rows[-1].params, w8.file_bytes,
                    latency_us(w8.reloaded, x[:1], repeats), latency_us(w8.reloaded, x, repeats),
                    "Huffman-coded safetensors; outputs " + ("identical" if w8.same else "DIFFER")))

    def saved_row(stage: str, saved: Saved, sim_key: str, what: str) -> Row:
        return Row(stage, digits.evaluate(saved.reloaded, x, y), rows_by[sim_key].params, saved.file_bytes,
                   latency_us(saved.reloaded, x[:1], repeats), latency_us(saved.reloaded, x, repeats),
                   f"{what}weights {saved.sizes.total('float32') / saved.sizes.total('huffman'):.1f}x smaller than "
                   f"float32 (file {student_fp32 / saved.file_bytes:.1f}x, with its manifest); verify "
                   f"{'ok' if saved.report.ok else 'FAILED'}, reload " + ("identical" if saved.same else "DIFFERS"))

    rows.append(saved_row("4-bit kernels, saved", w4, "qat_w4", "int4 + Huffman: "))
    rows.append(saved_row("90%, 4-bit kernels, saved", w4_90, "qat_w4_90", ""))

    print()
    print(summary)
    print()
    print(w8.report)
    print()
    print(w8.sizes)
    print()
    print("4-bit:")
    print(w4.sizes)
    print()
    print("90% sparse, 4-bit:")
    print(w4_90.sizes)
    print()
    _print_table(rows, len(x))
    print(f"\n{len(x)} held-out test images; params = nonzero weights; bytes = float32 weights stored densely for "
          f"the float stages, the kernels' packed buffers for pycompress, the file size for the saved model.")
    print(f"total {time.perf_counter() - start:.1f} s")
    if not all(saved.report.ok and saved.same for saved in (w8, w4, w4_90)):
        raise RuntimeError("demo: a converted model failed verification or did not survive save/load")
    return {"rows": rows, "report": w8.report, "sizes": w8.sizes, "report4": w4.report, "file4_bytes": w4.file_bytes,
            "student_fp32_bytes": student_fp32, "accuracy_w4_sim": stages["qat_w4"].accuracy, "sizes4": w4.sizes,
            "report90": w4_90.report, "file90_bytes": w4_90.file_bytes, "sizes90": w4_90.sizes,
            "accuracy_w4_90_sim": stages["qat_w4_90"].accuracy}
