"""`pycompress demo --quick` end to end: every stage runs and the numbers hold together."""

from __future__ import annotations

import pytest

from pycompress.demo import run_demo


@pytest.mark.once_per_ci
def test_quick_demo_end_to_end(capsys):
    result = run_demo(quick=True, seed=0, progress=False)
    rows = {r.stage: r for r in result["rows"]}
    assert result["report"].ok
    kernels, reloaded = rows["pycompress kernels"], rows["saved file, reloaded"]
    # The demo converts the more accurate of its QAT and PTQ students; the converted model computes what
    # that fake-quant simulation computed; save/load changes nothing.
    qat, ptq = rows["student, int8 QAT (sim)"], rows["student, int8 PTQ (sim)"]
    chosen, name = (qat, "qat_w8") if qat.accuracy >= ptq.accuracy else (ptq, "ptq_w8")
    assert kernels.note.startswith(f"convert({name})")
    assert kernels.accuracy == chosen.accuracy
    assert reloaded.accuracy == kernels.accuracy and "identical" in reloaded.note
    # Smaller at every compression step that stores something new.
    assert kernels.stored_bytes < rows["student, distilled"].stored_bytes < rows["teacher (float)"].stored_bytes
    sizes = result["sizes"]
    assert sizes.total("huffman") < sizes.total("quantized") < sizes.total("float32")
    # The 4-bit student on the int4 kernels computes what its simulation computed, survives save/load, and its
    # Huffman-coded file is smaller than the int8 one.
    w4 = rows["4-bit kernels, saved"]
    assert result["report4"].ok and "identical" in w4.note
    assert w4.accuracy == result["accuracy_w4_sim"] == rows["student, 4-bit QAT (sim)"].accuracy
    assert w4.stored_bytes == result["file4_bytes"] < reloaded.stored_bytes
    # The 90%-sparse 4-bit student: the same guarantees; its accuracy is what its simulation gave.
    w4_90 = rows["90%, 4-bit kernels, saved"]
    assert result["report90"].ok and "identical" in w4_90.note
    assert w4_90.accuracy == result["accuracy_w4_90_sim"] == rows["student, 90%, 4-bit QAT (sim)"].accuracy
    assert w4_90.params < w4.params and w4_90.stored_bytes == result["file90_bytes"]
    assert result["sizes90"].total("huffman") < result["sizes90"].total("float32")
    out = capsys.readouterr().out
    assert "verify: ok" in out and "saved file, reloaded" in out
