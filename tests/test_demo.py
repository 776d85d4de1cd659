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
    # The converted model computes what its fake-quant simulation computed; save/load changes nothing.
    assert kernels.accuracy == rows["student, int8 QAT (sim)"].accuracy or kernels.note.startswith("convert(ptq")
    assert reloaded.accuracy == kernels.accuracy and "identical" in reloaded.note
    # Smaller at every compression step that stores something new.
    assert kernels.stored_bytes < rows["student, distilled"].stored_bytes < rows["teacher (float)"].stored_bytes
    sizes = result["sizes"]
    assert sizes.total("huffman") < sizes.total("quantized") < sizes.total("float32")
    out = capsys.readouterr().out
    assert "verify: ok" in out and "saved file, reloaded" in out
