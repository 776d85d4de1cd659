"""Is convert's untimed choice ever slower than float? On every ISA level this CPU can force.

    python bench/bench_untimed.py            # every bench shape (shapes.py), every supported level, 1 thread
    python bench/bench_untimed.py --quick    # fewer samples: a smoke run, not for reporting

``pc.convert(model)`` without example inputs cannot time a layer: it follows the active level's row of
pycompress/thresholds.py (a minimum GEMM size for int8, sparse density limits). This runs that choice
for one Linear of each bench shape on each level and times the converted layer beside the float one
(timing.py's method), printing the format chosen, both times and their ratio; a row where the
converted layer is slower than float is marked SLOWER. Dense weights (the bench shapes' nn.Linear), so
the sparse limits are not exercised here: bench_sparse.py measures their break-even points. On a
forced lower level torch's float keeps its own best path (MKL_ENABLE_INSTRUCTIONS=AVX2 holds MKL to
AVX2): the ratios then overstate what an AVX2 CPU would see, while a SLOWER row stays meaningful.
Speed is measured here only; tests check the choices' numbers.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time

import torch
from torch import nn

import pycompress as pc
from pycompress.conversion import conversion_record

import machine
import peers
from shapes import SHAPES
from timing import make_inputs, make_step, time_interleaved, torch_threads


def run(levels: list[str], rounds: int, batch_s: float) -> list[dict]:
    rows = []
    previous = pc.get_isa()
    try:
        for level in levels:
            pc.set_isa(level)
            for shape in SHAPES:
                if shape.layers != 1:
                    continue
                linear = peers.make_linear(shape)
                model = pc.convert(nn.Sequential(copy.deepcopy(linear)))  # untimed: the level's thresholds
                record = conversion_record(model).layers[0]
                inputs = make_inputs(shape.m, shape.k)
                with torch_threads(1), torch.inference_mode():
                    timings = time_interleaved({"float": make_step([linear], inputs),
                                                "converted": make_step([model], inputs)}, rounds, batch_s)
                rows.append({"level": level, "shape": shape, "format": record.format,
                             "act_bits": getattr(model[0], "act_bits", None),
                             "float": timings["float"], "converted": timings["converted"]})
                print(f"  measured {level} {shape.label}", file=sys.stderr, flush=True)
    finally:
        pc.set_isa(previous)
    return rows


def _slower(row: dict) -> bool:
    # A layer kept float is the float layer itself: its two timings differ by noise only.
    return row["format"] != "float" and row["converted"].median_s > row["float"].median_s


def format_table(rows: list[dict]) -> str:
    lines = ["| level | shape (M,K,N) | untimed choice | float us | converted us | float / converted | |",
             "|---|---|---|---:|---:|---:|---|"]
    for r in rows:
        fmt = r["format"] + (f" (u{r['act_bits']})" if r["act_bits"] is not None else "")
        f_us, c_us = r["float"].median_s * 1e6, r["converted"].median_s * 1e6
        flag = "SLOWER" if _slower(r) else ("(kept float: the same layer)" if r["format"] == "float" else "")
        lines.append(f"| {r['level']} | {r['shape'].label} | {fmt} | {f_us:.1f} | {c_us:.1f} | {f_us / c_us:.2f} | {flag} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="5 rounds of 10 ms: a smoke run, not for reporting")
    parser.add_argument("--levels", nargs="+", default=None, help="ISA levels (default: every supported one)")
    args = parser.parse_args(argv)
    rounds, batch_s = (5, 0.01) if args.quick else (9, 0.03)
    levels = args.levels or pc.supported_isas()
    started = time.perf_counter()
    print(f"CPU: {machine.cpu_model()}; load average {machine.load_average()}; 1 thread; "
          f"median of {rounds} samples of ~{batch_s * 1e3:g} ms, float and converted interleaved\n")
    rows = run(levels, rounds, batch_s)
    print(format_table(rows))
    slower = [r for r in rows if _slower(r)]
    print(f"\n{len(slower)} of {len(rows)} untimed choices slower than float; total {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
