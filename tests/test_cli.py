"""`pycompress bench`: runs, prints the table with the peers, rejects bad arguments (no timing asserts)."""

from __future__ import annotations

import re

import pytest

from pycompress.cli import STANDARD_SHAPES, main


def test_bench_custom_shapes_prints_every_peer(capsys):
    assert main(["bench", "--shapes", "2,16,8;1,33,17", "--repeats", "2", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert "torch fp32 us" in out and "torch dyn int8 us" in out and "pycompress us" in out
    rows = [line for line in out.splitlines() if line.startswith("linear M=")]
    assert [r.split("  ")[0] for r in rows] == ["linear M=2 K=16 N=8", "linear M=1 K=33 N=17"]
    for row in rows:
        numbers = re.findall(r"\d+\.\d+", row)
        assert len(numbers) == 5 and all(float(v) > 0 for v in numbers)


def test_bench_model_shapes_cover_convs_and_skip_depthwise(capsys):
    assert main(["bench", "--model", "mobilenetv3", "--input-shape", "1,3,32,32", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    assert "skipped blocks.0.block.0: groups=16" in out
    assert "conv 3->16 k=(3, 3) s=(2, 2) in=(1, 3, 32, 32)" in out
    assert "linear M=1 K=576 N=1024" in out


def test_standard_shapes_say_where_they_come_from():
    assert all(len(s) == 4 and s[3] for s in STANDARD_SHAPES)


@pytest.mark.parametrize("argv", [["bench", "--shapes", "1,2"], ["bench", "--input-shape", "1,x"], ["frobnicate"]])
def test_bad_arguments_exit_with_usage(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert "usage: pycompress" in capsys.readouterr().err


def test_unknown_model_is_a_clear_error():
    with pytest.raises(SystemExit, match="neither one of"):
        main(["bench", "--model", "vgg16"])
