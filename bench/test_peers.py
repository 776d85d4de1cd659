"""Checks of the bench's output-error handling and table formatting, with fake
runners and fake timings: no timing, no peak program, a second or two.

    pytest bench/test_peers.py

A peer over the error limit (ONNX Runtime int8 on AVX2-only CPUs saturates
int16: ~9% error) must be timed and shown as WRONG, never abort the run; our own
output over the limit must abort. On a CPU where every peer is exact, these
tests are what exercises that path (or PYCOMPRESS_BENCH_PEER_ERROR_LIMIT, see
peers.py).
"""

from __future__ import annotations

import pytest
import torch

from pycompress.ops import OPS

import bench_attention
import bench_q4_linear
import bench_q8_linear
import bench_sparse
import machine
import peers
from shapes import LinearShape
from timing import Timing, ops_measured

SHAPE = LinearShape(16, 64, 32, "test shape")


def _runner_with_error(relative: float):
    """A runner whose output is the exact layer's plus `relative` x max |y| on one element."""

    def run(x: torch.Tensor) -> torch.Tensor:
        y = peers.reference_output(SHAPE, x).float()
        y[0, 0] += relative * y.abs().max()
        return y

    return run


def test_exact_peer_is_ok():
    x = torch.randn(SHAPE.m, SHAPE.k)
    accuracy = peers.check_output("ort_int8", SHAPE, _runner_with_error(0.01), x)
    assert accuracy.ok and not accuracy.wrong
    assert accuracy.cell() == "1%"


def test_wrong_peer_is_marked_not_raised(capsys):
    x = torch.randn(SHAPE.m, SHAPE.k)
    accuracy = peers.check_output("ort_int8", SHAPE, _runner_with_error(0.092), x)
    assert accuracy.wrong
    assert accuracy.cell() == "9.2% WRONG"
    assert "WRONG on this CPU" in capsys.readouterr().err


def test_our_wrong_output_aborts():
    x = torch.randn(SHAPE.m, SHAPE.k)
    with pytest.raises(peers.WrongOutput):
        peers.check_output("ours", SHAPE, _runner_with_error(0.092), x)


def test_fp32_limit_and_nan():
    assert peers.judge("torch fp32", 3e-7, "fp32", ours=False).cell() == "<0.01%"
    assert peers.judge("torch fp32", 2e-4, "fp32", ours=False).cell() == "0.02% WRONG"
    assert peers.judge("ORT int8", float("nan"), "int8", ours=False).wrong
    with pytest.raises(peers.WrongOutput):
        peers.judge("ours", float("nan"), "int8", ours=True)


def test_stack_limit_grows_with_layers():
    assert peers.judge("our i8", 0.08, "int8", ours=True, layers=4).ok
    with pytest.raises(peers.WrongOutput):
        peers.judge("our i8", 0.08, "int8", ours=True, layers=1)


def test_env_limit_applies_to_peers_only(monkeypatch):
    monkeypatch.setenv(peers.PEER_LIMIT_ENV, "0.001")
    assert peers.judge("ORT int8", 0.005, "int8", ours=False).wrong
    assert peers.judge("ours", 0.005, "int8", ours=True).ok
    assert "TEST HOOK" in peers.error_legend()


def test_ratio_cells_best_and_best_exact():
    ok, wrong = peers.Accuracy(0.01, 0.05), peers.Accuracy(0.09, 0.05)
    # The wrong peer is the fastest: marked, and left out of the exact ratio.
    assert peers.ratio_cells(1.0, {"a": 0.8, "b": 1.2}, {"a": wrong, "b": ok}) == ("0.80*", "1.20")
    assert peers.ratio_cells(1.0, {"a": 0.8, "b": 1.2}, {"a": ok, "b": wrong}) == ("0.80", "0.80")
    assert peers.ratio_cells(1.0, {"a": 0.8}, {"a": wrong}) == ("0.80*", "-")


def _timing(us: float) -> Timing:
    return Timing(us * 1e-6, 0.05, 5, 10)


def test_main_table_shows_errors_and_both_ratios(monkeypatch):
    monkeypatch.setattr(bench_q8_linear, "HAVE_ORT", True)
    monkeypatch.setattr(machine, "measure_peaks",
                        lambda: {("vpmaddwd_ymm", 1): 200.0, ("vpmaddubsw_ymm", 1): 230.0})
    monkeypatch.setattr(machine, "measure_read_bandwidth", lambda: {("L3", 1): 60.0, ("L2", 1): 100.0})
    ok, wrong = peers.Accuracy(0.009, 0.05), peers.Accuracy(0.092, 0.05)
    fp32 = peers.Accuracy(1e-7, 1e-4)
    shape = LinearShape(16, 4096, 4096, "compute-bound row")
    gemv = LinearShape(1, 768, 768, "GEMV row")
    timings = {"torch_fp32": _timing(11600), "ort_fp32": _timing(7000), "torch_int8": _timing(3243),
               "ort_int8": _timing(3206), "ours": _timing(5795)}
    accuracy = {"torch_fp32": fp32, "ort_fp32": fp32, "torch_int8": ok, "ort_int8": wrong, "ours": ok}
    records = [{"shape": shape, "threads": 1, "timings": timings, "accuracy": accuracy},
               {"shape": gemv, "threads": 1, "timings": {**timings, "ours": _timing(40.5)}, "accuracy": accuracy}]
    table = bench_q8_linear.format_main_table(records, "avx2")
    row = next(line for line in table.splitlines() if line.startswith("| (16,4096,4096)"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[6] == "3206 (9.2% WRONG)"   # ORT int8: timed, error beside the time
    assert cells[7] == "5795 (0.9%)"         # ours
    assert cells[8] == "0.55*"               # best peer (ORT, wrong) / ours
    assert cells[9] == "0.56"                # best exact peer (FBGEMM) / ours
    assert cells[12] == "46% of 200 vpmaddwd, 40% of 230 u7 vpmaddubsw"  # 92.6 GOPS
    gemv_row = next(line for line in table.splitlines() if line.startswith("| (1,768,768)"))
    assert "GB/s (" in gemv_row and "% of L2 100)" in gemv_row
    assert "WRONG: over the limit" in table


@pytest.mark.parametrize("isa, kernel", [("avx512", "vpdpbusd_zmm"), ("avx512vnni", "vpdpbusd_zmm"),
                                         ("avx512vbmi", "vpdpbusd_zmm"), ("avxvnni", "vpdpbusd_ymm"),
                                         ("avx2", "vpmaddwd_ymm")])
def test_isa_ceiling_names_old_and_new(monkeypatch, isa, kernel):
    monkeypatch.setattr(machine, "measure_peaks", lambda: {(kernel, 2): 123.0})
    assert machine.int8_peak_gops(2, isa) == 123.0
    assert machine.int8_ceiling_kernels("scalar") == ()


# Ops of pycompress.ops.OPS no bench times yet, and why.
NOT_BENCHED = {"sparse_linear_nm24": "2:4 fp32 (SparseLinear nm24) has no bench"}


def test_every_op_of_the_one_list_has_a_bench():
    measured = [*bench_q8_linear.OPS_MEASURED, *bench_q4_linear.OPS_MEASURED, *bench_sparse.OPS_MEASURED,
                *bench_attention.OPS_MEASURED]
    assert len(measured) == len(set(measured))
    assert set(measured) | set(NOT_BENCHED) == set(OPS) and not set(measured) & set(NOT_BENCHED)
    with pytest.raises(ValueError, match="not in pycompress.ops.OPS"):
        ops_measured("int8_linear", "no_such_op")
