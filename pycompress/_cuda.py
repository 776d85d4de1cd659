"""The optional CUDA module, ``pycompress._C_cuda``: built with ``PYCOMPRESS_CUDA=ON pip install .`` (README,
"CUDA"), never needed to import pycompress. It links the static CUDA runtime, so it imports on a machine
without CUDA; whether a device is usable is asked once, on first use."""

from __future__ import annotations

import functools
import importlib
import importlib.util
import typing

import torch

_C_cuda, _IMPORT_ERROR = None, ""
if importlib.util.find_spec("pycompress._C_cuda") is not None:  # else: built without CUDA (the default)
    try:
        _C_cuda = importlib.import_module("pycompress._C_cuda")
    except ImportError as err:  # built, but it cannot load: say why instead of hiding the module
        _IMPORT_ERROR = f"{type(err).__name__}: {err}"

BUILD_HINT = ("rebuild with the CUDA kernels: PYCOMPRESS_CUDA=ON pip install . (nvcc on PATH; README.md, "
              "'CUDA')")


@functools.cache
def status() -> dict:
    """``built``: the module is installed; ``archs``: the architectures it holds; ``devices``: [(name, major,
    minor)] it can see; ``usable``: built and at least one device of an architecture it holds (sm_80 or later);
    ``reason``: why not, when not."""
    if _C_cuda is None:
        reason = (f"the CUDA module is installed but does not load ({_IMPORT_ERROR})" if _IMPORT_ERROR
                  else f"pycompress was built without CUDA: {BUILD_HINT}")
        return {"built": False, "archs": [], "devices": [], "usable": False, "reason": reason}
    archs = [a for a in _C_cuda.archs().split(",") if a]
    dev = _C_cuda.device_status()
    devices = [tuple(d) for d in dev["devices"]]
    reason = ""
    if dev["count"] < 0:
        reason = f"the CUDA runtime cannot start ({dev['reason']})"
    elif not devices:
        reason = "no CUDA device"
    elif not any(major >= 8 for _, major, _ in devices):
        reason = f"no device of compute capability 8.0 or later (int8 mma.sync); found {devices}"
    return {"built": True, "archs": archs, "devices": devices, "usable": not reason, "reason": reason}


def module(op: str):
    """The CUDA module when it is usable, else a RuntimeError naming ``op`` and what is missing."""
    st = status()
    if not st["usable"]:
        raise RuntimeError(f"{op}: got CUDA tensors, but {st['reason']}")
    return _C_cuda


class Device(typing.NamedTuple):
    """What the int8 kernels' launch plan needs of a device (csrc/cuda/q8_cuda_tiling.h, plan): its multiprocessor
    count (split-K fills them) and whether it runs the Hopper wgmma tile (compute capability 9.0 and this module
    built for sm_90a)."""
    sms: int
    wgmma: bool


@functools.cache
def device(device_index: int) -> Device:
    props = torch.cuda.get_device_properties(device_index)
    hopper_code = any(a.startswith("90a") for a in status()["archs"])
    return Device(props.multi_processor_count, (props.major, props.minor) == (9, 0) and hopper_code)


def launch(op: str, x: torch.Tensor, run, scratch_for: tuple[int, int, int] | None = None) -> None:
    """One call of a CUDA kernel on x's device: ``run(module, scratch, stream, dev)`` under a device guard, with
    torch's current stream there, the device's ``Device`` and, for the int8 kernels (``scratch_for`` = (m, n, k)),
    the scratch of an (m x k) @ (n x k)^T call (else None). ``run`` makes the checks that need real device memory
    before it launches."""
    cuda = module(op)
    dev = device(x.device.index if x.device.index is not None else torch.cuda.current_device())
    scratch = (None if scratch_for is None else
               torch.empty(cuda.q8_scratch_bytes(*scratch_for, dev.sms, dev.wgmma), dtype=torch.uint8,
                           device=x.device))
    with torch.cuda.device(x.device):
        run(cuda, scratch, torch.cuda.current_stream(x.device).cuda_stream, dev)
