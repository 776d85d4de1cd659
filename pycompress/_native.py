"""Loads the compiled CPU module and answers questions about the build."""

from __future__ import annotations

import torch

from pycompress import _C

ACTIVATIONS = {"none": 0, "relu": 1, "gelu": 2}


def num_threads(explicit: int | None = None) -> int:
    """Threads a kernel call may use: pycompress.set_num_threads, else torch's setting."""
    if explicit is not None:
        return explicit
    return _thread_override if _thread_override is not None else torch.get_num_threads()


_thread_override: int | None = None


def set_num_threads(n: int | None) -> None:
    """Fix the kernels' thread count (None: follow torch.get_num_threads())."""
    global _thread_override
    if n is not None and (not isinstance(n, int) or n < 1):
        raise ValueError(f"set_num_threads: expected a positive int or None, got {n!r}")
    _thread_override = n


def activation_code(name: str) -> int:
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"unknown activation {name!r}: expected one of {sorted(ACTIVATIONS)}") from None


def supported_isas() -> list[str]:
    return list(_C.build_info()["supported_isas"])


def set_isa(name: str) -> None:
    """Switch every kernel to the named ISA level: 'scalar', 'avx2', 'avxvnni' (AVX2 with the ymm
    vpdpbusd of AVX-VNNI), 'avx512vnni', 'avx512vbmi' (AVX-512 VNNI with vpermb), 'amx'
    (avx512vbmi with the AMX int8 tile GEMM), or 'avx512' (the highest AVX-512 level of this CPU). ``supported_isas()`` lists this CPU's, lowest first.

    Raises ValueError when the CPU or the build lacks it. The environment
    variable PYCOMPRESS_ISA does the same at import time.
    """
    _C.set_isa(name)


def get_isa() -> str:
    return _C.get_isa()


_ISA_LEVELS = tuple(_C.build_info()["isa_levels"])


def isa_at_least(name: str) -> bool:
    """Whether the active ISA level is ``name`` or above it (csrc/common/isa.h orders them)."""
    return _ISA_LEVELS.index(get_isa()) >= _ISA_LEVELS.index(name)


def build_info() -> dict:
    info = dict(_C.build_info())
    from pycompress import _cuda

    info["cuda"] = _cuda.status()  # built, archs, devices, usable, reason
    info["threads"] = num_threads()
    info["torch"] = torch.__version__
    # Whether unstructured sparse int8 layers run the byte sliced layout now (AVX-512 VBMI, active ISA).
    info["sparse_byte_layout"] = bool(_C.sparse_sliced_bytes_vectorized())
    # Whether u7 activations have a faster kernel than u8 on the active ISA (AVX2's vpmaddubsw).
    info["u7_kernel"] = bool(_C.q8_u7_kernel())
    return info
