"""The build, the ISA dispatch and the thread settings."""

from __future__ import annotations

import os
import pathlib
import re
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
    cuda = info["cuda"]
    assert set(cuda) == {"built", "archs", "devices", "usable", "reason"}
    assert cuda["usable"] == (cuda["built"] and not cuda["reason"])
    if not cuda["built"]:
        assert cuda["archs"] == [] and not cuda["usable"]
    assert info["isa_levels"] == ["scalar", "avx2", "avxvnni", "avx512vnni", "avx512vbmi", "amx"]
    # Supported levels keep the levels' order.
    levels = info["isa_levels"]
    assert info["supported_isas"] == sorted(info["supported_isas"], key=levels.index)
    assert info["avx512_vbmi"] == ("avx512vbmi" in info["supported_isas"])  # every AMX level CPU has VBMI


CSRC = pathlib.Path(__file__).resolve().parents[1] / "csrc"
# csrc/README.md: <op>_<tile>__<isa>.cpp, the tile rows x columns; a scalar specification may leave it out.
KERNEL_FILE = re.compile(r"[a-z][a-z0-9_]*?(?:_(?P<tile>[0-9]+x[0-9]+))?__(?P<isa>scalar|avx2|avxvnni|avx512vnni|avx512vbmi|amx)\.cpp")


# CUDA kernels: <op>__sm<arch>.cu, the oldest architecture they need; the tiles are templates the launch plan
# chooses between (csrc/cuda/q8_cuda_tiling.h), so the name holds none.
CUDA_KERNEL_FILE = re.compile(r"[a-z][a-z0-9_]*?__sm[0-9]+a?\.cu")  # sm90a: architecture-specific features


@pytest.mark.skipif(not CSRC.is_dir(), reason="needs the source tree's csrc/")
def test_kernel_files_follow_the_name_grammar():
    kernels = sorted(p for p in CSRC.glob("*/*.cpp") if "__" in p.name)
    assert kernels, CSRC
    for path in kernels:
        match = KERNEL_FILE.fullmatch(path.name)
        assert match, f"{path.relative_to(CSRC)}: not <op>_<tile>__<isa>.cpp"
        assert match["tile"] or match["isa"] == "scalar", f"{path.relative_to(CSRC)}: a vector kernel names its tile"
    cuda = sorted(CSRC.glob("*/*.cu"))
    assert cuda, CSRC
    for path in cuda:
        assert CUDA_KERNEL_FILE.fullmatch(path.name), f"{path.relative_to(CSRC)}: not <op>__sm<arch>.cu"


def test_u7_kernel_exactly_on_avx2(isa):
    # AVX-VNNI and AVX-512 VNNI multiply u8 exactly at the u7 rate: only AVX2 has a faster u7 kernel.
    assert pc.build_info()["u7_kernel"] == (isa == "avx2")


def test_sparse_byte_layout_follows_the_active_isa(isa):
    # The byte sliced layout's vector kernel (vpermb) runs on the avx512vbmi level and the amx level above it.
    assert pc.build_info()["sparse_byte_layout"] == (isa in ("avx512vbmi", "amx"))


def _cpu_flags() -> set[str] | None:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        return None
    return None


def test_supported_levels_match_the_cpu_flags():
    """Each level is supported exactly when the kernel's (Linux) CPU flags list that level's features."""
    flags = _cpu_flags()
    if flags is None or pc.build_info()["compiled_isas"] == ["scalar"]:
        pytest.skip("no /proc/cpuinfo flags, or a build without x86 paths")
    avx2 = {"avx2", "fma", "f16c", "bmi2"} <= flags
    avx512 = avx2 and {"avx512f", "avx512dq", "avx512bw", "avx512vl", "avx512_vnni"} <= flags
    expected = ["scalar"]
    expected += ["avx2"] if avx2 else []
    expected += ["avxvnni"] if avx2 and "avx_vnni" in flags else []
    expected += ["avx512vnni"] if avx512 else []
    expected += ["avx512vbmi"] if avx512 and "avx512vbmi" in flags else []
    # Linux lists amx_tile / amx_int8 only where it manages the tile state (the level's arch_prctl request).
    expected += ["amx"] if "avx512vbmi" in expected and {"amx_tile", "amx_int8"} <= flags else []
    assert pc.supported_isas() == expected


def test_avx512_names_the_highest_avx512_level():
    supported = pc.supported_isas()
    avx512 = [i for i in supported if i.startswith("avx512")]
    if not avx512:
        with pytest.raises(ValueError, match="not supported by this CPU"):
            pc.set_isa("avx512")
        return
    previous = pc.get_isa()
    try:
        pc.set_isa("avx512")
        assert pc.get_isa() == avx512[-1]
    finally:
        pc.set_isa(previous)


def test_set_isa_rejects_unknown_name():
    with pytest.raises(ValueError, match="unknown ISA 'sse9': expected one of scalar, avx2, avxvnni, avx512vnni, avx512vbmi, amx"):
        pc.set_isa("sse9")


def test_set_isa_round_trip():
    previous = pc.get_isa()
    try:
        for name in pc.supported_isas():
            pc.set_isa(name)
            assert pc.get_isa() == name
            assert pc.build_info()["active_isa"] == name
    finally:
        pc.set_isa(previous)
    assert pc.get_isa() == previous


def _run(code: str, **env) -> subprocess.CompletedProcess:
    # Run outside the source tree so the installed package is imported, not ./pycompress.
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=120, cwd=tempfile.gettempdir())


# once_per_ci: a child process with its own PYCOMPRESS_ISA: the same check whichever path the parent runs
@pytest.mark.once_per_ci
def test_env_var_forces_lower_path():
    out = _run("import pycompress as pc; print(pc.get_isa())", PYCOMPRESS_ISA="scalar")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "scalar"


# once_per_ci: a child process with its own PYCOMPRESS_ISA: the same check whichever path the parent runs
@pytest.mark.once_per_ci
def test_env_var_unknown_isa_is_a_clear_error():
    out = _run("import pycompress", PYCOMPRESS_ISA="neon")
    assert out.returncode != 0
    assert "unknown ISA 'neon'" in out.stderr


# once_per_ci: a child process with its own PYCOMPRESS_ISA: the same check whichever path the parent runs
@pytest.mark.once_per_ci
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

