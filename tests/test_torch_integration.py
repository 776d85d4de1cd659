"""Converted models under no_grad / inference_mode, torch.export in a fresh process, threads, state_dict.
(torch.compile and torch.export of every op: tests/test_ops.py; of every format's layers: tests/test_formats.py.)"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading

import pytest
import torch

import pycompress as pc
from pycompress.examples import ResNet18, SmallCNN


def _converted_cnn():
    torch.manual_seed(0)
    return pc.convert(SmallCNN().eval(), policy="int8")


def test_no_grad_and_inference_mode():
    model = _converted_cnn()
    x = torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        a = model(x)
    with torch.inference_mode():
        b = model(x)
    assert torch.equal(a, b)


# once_per_ci: the exported program's file loads in a fresh process; exported == eager on every path is test_ops.py's
@pytest.mark.once_per_ci
def test_torch_export_runs_after_save_and_load_in_a_fresh_process(tmp_path):
    model = _converted_cnn()
    x = torch.randn(3, 1, 8, 8)
    program = torch.export.export(model, (x,))
    targets = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert "pycompress.int8_linear.default" in targets
    path = tmp_path / "cnn.pt2"
    torch.export.save(program, str(path))
    torch.save(x, tmp_path / "x.pt")
    torch.save(model(x), tmp_path / "y.pt")
    script = textwrap.dedent(f"""
        import torch, pycompress
        program = torch.export.load({str(path)!r})
        x = torch.load({str(tmp_path / 'x.pt')!r})
        y = torch.load({str(tmp_path / 'y.pt')!r})
        assert torch.equal(program.module()(x), y)
        print("ok")
    """)
    # Outside the source tree, so the installed package is imported and not ./pycompress.
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                            cwd=tmp_path)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


def test_four_threads_match_serial_calls():
    torch.manual_seed(0)
    model = pc.convert(ResNet18(num_classes=10, width=16).eval(), policy="int8")
    inputs = [torch.randn(2, 3, 32, 32) for _ in range(8)]
    with torch.no_grad():
        serial = [model(x) for x in inputs]
    results: dict[int, torch.Tensor] = {}
    errors: list[BaseException] = []

    def worker(tid: int) -> None:
        try:
            with torch.no_grad():
                for i in range(tid, len(inputs), 4):
                    for _ in range(3):
                        y = model(inputs[i])
                        if i in results and not torch.equal(results[i], y):
                            raise AssertionError(f"input {i}: outputs differ between calls")
                        results[i] = y
        except BaseException as exc:  # reported to the main thread below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert all(torch.equal(results[i], serial[i]) for i in range(len(inputs)))


def test_state_dict_round_trips_into_a_freshly_converted_model():
    torch.manual_seed(0)
    a = pc.convert(ResNet18(num_classes=10, width=8).eval(), policy="int8")
    torch.manual_seed(1)
    b = pc.convert(ResNet18(num_classes=10, width=8).eval(), policy="int8")
    x = torch.randn(2, 3, 32, 32)
    assert not torch.equal(a(x), b(x))
    b.load_state_dict(a.state_dict())
    assert torch.equal(a(x), b(x))
