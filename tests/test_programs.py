"""Exported programs (pycompress.programs): a converted model exported with export_program / compiled with
compile_program loads in a fresh process and computes the eager bits; a program that calls an op this
pycompress lacks, or was saved by another release, or with another op schema, is refused by name before torch
reads it."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import textwrap
import zipfile

import pytest
import torch

import pycompress as pc
from pycompress import programs


def _converted():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 96),
                                torch.nn.GELU(), torch.nn.Linear(96, 10)).eval()
    return pc.convert(model, policy="int8")


def _run_fresh(script: str) -> str:
    """Runs ``script`` in a fresh interpreter outside the source tree (so the installed pycompress is imported,
    not ./pycompress); returns its stdout."""
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], capture_output=True, text=True,
                            timeout=300, cwd=tempfile.gettempdir())
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def _with_record(src, dst, edit) -> None:
    """A copy of the torch.export archive ``src`` whose pycompress record ``edit(record)`` changed."""
    with zipfile.ZipFile(src) as old, zipfile.ZipFile(dst, "w") as new:
        for item in old.infolist():
            data = old.read(item)
            if item.filename.endswith(f"/extra/{programs.RECORD_FILE}"):
                record = json.loads(data)
                edit(record)
                data = json.dumps(record).encode()
            new.writestr(item, data)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    model = _converted()
    directory = tmp_path_factory.mktemp("programs")
    path = directory / "model.pt2"
    batch = torch.export.Dim("batch", min=1, max=64)
    pc.export_program(model, (torch.randn(4, 64),), path, dynamic_shapes=({0: batch},))
    return model, path


def test_export_program_records_the_ops_and_the_release(exported):
    _, path = exported
    info = pc.program_info(path)
    assert info.kind == "export"
    assert info.pycompress == pc.__version__ and info.torch == torch.__version__
    assert info.ops == {"pycompress::int8_linear.default": str(torch.ops.pycompress.int8_linear.default._schema)}


# once_per_ci: a fresh interpreter (imports torch and pycompress); exported == eager on every ISA path is test_ops.py's
@pytest.mark.once_per_ci
def test_exported_program_loads_in_a_fresh_process_with_the_eager_bits(exported, tmp_path):
    model, path = exported
    inputs = {n: torch.randn(n, 64) for n in (1, 5, 33)}  # other batch sizes than the export's: a dynamic batch
    with torch.inference_mode():
        outputs = {n: model(x) for n, x in inputs.items()}
    torch.save({"inputs": inputs, "outputs": outputs}, tmp_path / "io.pt")
    out = _run_fresh(f"""
        import torch, pycompress as pc
        io = torch.load({str(tmp_path / 'io.pt')!r})
        program = pc.load_program({str(path)!r}).module()
        for n, x in io["inputs"].items():
            assert torch.equal(program(x), io["outputs"][n]), n
        print("equal", len(io["inputs"]))
    """)
    assert out.split() == ["equal", "3"]


def test_program_of_a_newer_release_with_an_op_this_one_lacks_is_refused_naming_it(tmp_path):
    """A newer release's program (its version written as 99.0.0) calls an op this pycompress does not register:
    the exporting process defines it, this one does not."""
    path = tmp_path / "newer.pt2"
    _run_fresh(f"""
        import torch, pycompress as pc
        from pycompress import programs

        lib = torch.library.Library("pycompress", "FRAGMENT")
        lib.define("future_linear(Tensor x) -> Tensor")
        lib.impl("future_linear", lambda x: x * 2, "CompositeExplicitAutograd")
        lib.impl("future_linear", lambda x: torch.empty_like(x), "Meta")

        class Future(torch.nn.Module):
            def forward(self, x):
                return torch.ops.pycompress.future_linear(x)

        programs.build_info = lambda: {{"version": "99.0.0"}}
        pc.export_program(Future(), (torch.randn(2, 3),), {str(path)!r})
    """)
    assert pc.program_info(path).ops.keys() == {"pycompress::future_linear.default"}
    with pytest.raises(ValueError, match=r"calls pycompress::future_linear\.default, which this pycompress "
                                         r"\(.*\) does not register: saved by pycompress 99\.0\.0, a newer release: "
                                         r"upgrade pycompress"):
        pc.load_program(path)


def test_program_of_another_release_is_refused_unless_allowed(exported, tmp_path, monkeypatch):
    model, _ = exported
    path = tmp_path / "older.pt2"
    with monkeypatch.context() as m:
        m.setattr(programs, "build_info", lambda: {"version": "0.0.9"})
        pc.export_program(model, (torch.randn(2, 64),), path)
    with pytest.raises(ValueError, match=rf"saved by pycompress 0\.0\.9, this is pycompress {pc.__version__}\. The "
                                         r"program's constants are packed weights"):
        pc.load_program(path)
    x = torch.randn(2, 64)
    with torch.inference_mode():
        assert torch.equal(pc.load_program(path, allow_version_mismatch=True).module()(x), model(x))


def test_program_whose_op_schema_differs_is_refused(exported, tmp_path):
    _, path = exported
    changed = tmp_path / "changed.pt2"
    old_schema = "pycompress::int8_linear(Tensor x, Tensor w_packed) -> Tensor"
    _with_record(path, changed, lambda r: r["ops"].update({"pycompress::int8_linear.default": old_schema}))
    with pytest.raises(ValueError, match=r"op pycompress::int8_linear\.default is `pycompress::int8_linear\(Tensor x, "
                                         r"Tensor w_packed\) -> Tensor` in the program .* but `pycompress::int8_linear"
                                         r"\(Tensor x, Tensor w_packed, Tensor col_sum"):
        pc.load_program(changed)


def test_not_a_program_is_refused(tmp_path):
    path = tmp_path / "model.pt2"
    path.write_bytes(b"not a zip")
    with pytest.raises(ValueError, match=r"not a \.pt2 archive"):
        pc.program_info(path)


# once_per_ci: AOTInductor compiles C++ (about 15 s on 2 cores) and a fresh interpreter loads the package.
@pytest.mark.once_per_ci
@pytest.mark.filterwarnings("ignore:.*LeafSpec.*:FutureWarning")  # torch's own pytree deprecation, from inductor
def test_aoti_package_runs_in_a_fresh_process_with_the_eager_bits(exported, tmp_path):
    model, exported_path = exported
    x = torch.randn(4, 64)
    with torch.inference_mode():
        y = model(x)
    path = tmp_path / "model.aoti.pt2"
    assert pc.compile_program(model, (x,), path) == str(path)
    info = pc.program_info(path)
    assert info.kind == "aoti" and info.ops.keys() == {"pycompress::int8_linear.default"}
    with pytest.raises(ValueError, match="an AOTInductor package; load it with load_compiled_program"):
        pc.load_program(path)
    with pytest.raises(ValueError, match="a torch.export archive; load it with load_program"):
        pc.load_compiled_program(exported_path)
    torch.save({"x": x, "y": y}, tmp_path / "io.pt")
    out = _run_fresh(f"""
        import torch, pycompress as pc
        io = torch.load({str(tmp_path / 'io.pt')!r})
        package = pc.load_compiled_program({str(path)!r})
        assert torch.equal(package(io["x"]), io["y"])
        print("equal")
    """)
    assert out.split() == ["equal"]
