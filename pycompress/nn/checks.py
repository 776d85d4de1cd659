"""Checks a layer's ``from_config`` / ``validate_tensors`` run on a file's manifest entry and tensors
before anything is allocated from them or a kernel reads them. Errors name the layer."""

from __future__ import annotations

import math

import torch

from pycompress._native import ACTIVATIONS
from pycompress.ops.sparse import ensure_valid_structure
from pycompress.reference.q8 import ACT_BITS, KGROUP, MAX_K, PANEL, act_qmax, round_up


def is_int(v, lo: int, hi: int) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi


def pair_ok(v, lo: int) -> bool:
    return isinstance(v, list) and len(v) == 2 and all(is_int(x, lo, 1 << 20) for x in v)


def raise_problems(problems: list[str], where: str) -> None:
    if problems:
        raise ValueError(f"load: layer {where}: " + "; ".join(problems))


def gemm_config_problems(cfg: dict, quantized: bool) -> list[str]:
    problems = []
    if not isinstance(cfg.get("bias"), bool):
        problems.append("bias must be a bool")
    if not isinstance(cfg.get("activation"), str) or cfg["activation"] not in ACTIVATIONS:
        problems.append(f"activation {cfg.get('activation')!r} not in {sorted(ACTIVATIONS)}")
    if not isinstance(cfg.get("name"), (str, type(None))):
        problems.append("name must be a string or null")
    if quantized:
        scale = cfg.get("act_scale")
        if scale is not None and not (isinstance(scale, float) and math.isfinite(scale) and scale > 0):
            problems.append(f"act_scale {scale!r} must be null or a finite float > 0")
        act_bits = cfg.get("act_bits", 8)  # files before the u7 format hold none
        if act_bits not in ACT_BITS or isinstance(act_bits, bool):
            problems.append(f"act_bits {act_bits!r} must be one of {ACT_BITS}")
            act_bits = 8
        qmax = act_qmax(act_bits)
        if not is_int(cfg.get("act_zero_point"), 0, qmax):
            problems.append(f"act_zero_point {cfg.get('act_zero_point')!r} must be an int in [0, {qmax}]")
        if not is_int(cfg.get("weight_bits"), 2, 8):
            problems.append(f"weight_bits {cfg.get('weight_bits')!r} must be an int in [2, 8]")
    return problems


def features_problems(cfg: dict) -> list[str]:
    if not (is_int(cfg.get("in_features"), 1, MAX_K) and is_int(cfg.get("out_features"), 1, 1 << 24)):
        return ["in_features / out_features out of range"]
    return []


def geometry_problems(cfg: dict) -> list[str]:
    problems = []
    for f in ("kernel_size", "stride", "dilation"):
        if not pair_ok(cfg.get(f), 1):
            problems.append(f"{f} must be two ints >= 1")
    if not pair_ok(cfg.get("padding"), 0):
        problems.append("padding must be two ints >= 0")
    if not (is_int(cfg.get("in_channels"), 1, MAX_K) and is_int(cfg.get("out_channels"), 1, 1 << 24)):
        problems.append("in_channels / out_channels out of range")
    elif pair_ok(cfg.get("kernel_size"), 1) and cfg["in_channels"] * cfg["kernel_size"][0] * cfg["kernel_size"][1] > MAX_K:
        problems.append(f"kernel_size x in_channels exceeds K={MAX_K}")
    return problems


def check_packed_size(k: int, n: int, packed: torch.Tensor | None, where: str) -> None:
    """Before a layer is allocated: its config must describe the packed weights the file really holds
    (so a manifest cannot ask for more memory than the file's own tensors)."""
    kp, np_ = round_up(k, KGROUP), round_up(n, PANEL)
    if packed is None or packed.numel() != kp * np_:
        got = "none" if packed is None else f"{packed.numel()} bytes"
        raise ValueError(f"load: layer {where}: config K={k}, N={n} needs {kp * np_} packed weight bytes, the file has {got}")


def file_tensor(tensors: dict[str, torch.Tensor], key: str, dtype: torch.dtype, numel: int | None,
                where: str) -> torch.Tensor:
    """A 1-D tensor of the file, checked before a layer sized from it is allocated."""
    t = tensors.get(key)
    if t is None or t.dtype != dtype or t.dim() != 1 or (numel is not None and t.numel() != numel):
        got = "none" if t is None else f"{t.dtype} {tuple(t.shape)}"
        want = f"1-D {dtype}" + ("" if numel is None else f" of {numel}")
        raise ValueError(f"load: layer {where}: {key} must be {want}, the file has {got}")
    return t


def check_finite_bias(tensors: dict[str, torch.Tensor], prefix: str, where: str) -> None:
    bias = tensors.get(prefix + "bias")
    if bias is not None and not torch.isfinite(bias).all():
        raise ValueError(f"load: {where}: bias has NaN or Inf")


def check_scales(w_scale: torch.Tensor, where: str) -> None:
    if not (torch.isfinite(w_scale).all() and (w_scale > 0).all()):
        raise ValueError(f"load: {where}: w_scale must be finite and > 0")


def check_structure(op: str, row_ptr: torch.Tensor, idx: torch.Tensor, k: int, validate, where: str) -> None:
    """A sparse pack's structure, with the same C++ validator the ops run."""
    try:
        ensure_valid_structure(op, row_ptr.contiguous(), idx.contiguous(), k, validate)
    except ValueError as exc:
        raise ValueError(f"load: {where}: {exc}") from None
