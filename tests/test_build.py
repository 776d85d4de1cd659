"""The build, the ISA dispatch and the thread settings."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile

import pytest
import torch

import pycompress as pc


def test_build_info_fields():
    info = pc.build_info()
    assert info["version"] == pc.__version__
    assert info["compiled_isas"][0] == "scalar"
    assert info["active_isa"] in info["supported_isas"]
    assert set(info["supported_isas"]) <= set(info["compiled_isas"])
    assert info["threads"] == torch.get_num_threads()
    assert isinstance(info["cuda"], bool)
    # The byte sliced layout runs exactly when the active path is AVX-512 on a CPU with VBMI.
    assert isinstance(info["avx512_vbmi"], bool)
    assert info["sparse_byte_layout"] == (info["active_isa"] == "avx512" and info["avx512_vbmi"])


def test_sparse_byte_layout_follows_the_active_isa(isa):
    info = pc.build_info()
    assert info["sparse_byte_layout"] == (isa == "avx512" and info["avx512_vbmi"])


def test_set_isa_rejects_unknown_name():
    with pytest.raises(ValueError, match="unknown ISA 'sse9'"):
        pc.set_isa("sse9")


def test_set_isa_round_trip(isa):
    assert pc.get_isa() == isa


def _run(code: str, **env) -> subprocess.CompletedProcess:
    # Run outside the source tree so the installed package is imported, not ./pycompress.
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=120, cwd=tempfile.gettempdir())


def test_env_var_forces_lower_path():
    out = _run("import pycompress as pc; print(pc.get_isa())", PYCOMPRESS_ISA="scalar")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "scalar"


def test_env_var_unknown_isa_is_a_clear_error():
    out = _run("import pycompress", PYCOMPRESS_ISA="neon")
    assert out.returncode != 0
    assert "unknown ISA 'neon'" in out.stderr


def test_env_var_unsupported_isa_is_a_clear_error():
    compiled = pc.build_info()["compiled_isas"]
    missing = [i for i in compiled if i not in pc.supported_isas()]
    if not missing:
        pytest.skip("this CPU supports every compiled ISA; nothing to refuse")
    out = _run("import pycompress", PYCOMPRESS_ISA=missing[0])
    assert out.returncode != 0
    assert "not supported by this CPU" in out.stderr


def test_set_num_threads_validates():
    with pytest.raises(ValueError, match="positive int"):
        pc.set_num_threads(0)
    pc.set_num_threads(1)
    try:
        assert pc.build_info()["threads"] == 1
    finally:
        pc.set_num_threads(None)
    assert pc.build_info()["threads"] == torch.get_num_threads()

