"""torch.ops.pycompress.int4_linear: W4A8, y = act(dequant(quant(x) @ W4^T) + bias) (csrc/q4/q4_gemm.h)."""

from __future__ import annotations

import torch

from pycompress import _C, _cuda
from pycompress._native import num_threads
from pycompress.ops._library import LIB
from pycompress.ops.q8 import CUDA_DTYPES, check_activation_args, check_same_device, eager_rows, kernel_dtype
from pycompress.reference.q4 import KBLOCK
from pycompress.reference.q8 import MAX_K, PANEL, act_qmax, round_up

LIB.define(
    "int4_linear(Tensor x, Tensor w4, Tensor g_scale, Tensor corr, Tensor? bias, int out_features, int groups, "
    "int activation=0, float? act_scale=None, int act_zero_point=0, int act_bits=8) -> Tensor"
)


def check_int4_weights(k, w4, g_scale, corr, bias, n, groups, activation, act_scale, act_zero_point, act_bits=8) -> None:
    """Validates the weight-side operands of a W4A8 linear of K input features and N outputs (sizes, dtypes,
    the group split); what the kernel reads is then in bounds."""
    if not 1 <= k <= MAX_K:
        raise ValueError(f"int4_linear: K={k} features is outside [1, {MAX_K}]")
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"int4_linear: out_features must be >= 1, got {n!r}")
    kp, np_ = round_up(k, KBLOCK), round_up(n, PANEL)
    if not isinstance(groups, int) or groups < 1 or kp % groups or (kp // groups) % KBLOCK or (groups > 1 and k % groups):
        raise ValueError(f"int4_linear: {groups!r} weight groups do not split K={k} into groups of a multiple of "
                         f"{KBLOCK}")
    if w4.dtype != torch.uint8 or w4.dim() != 1 or w4.numel() != np_ * kp // 2:
        raise ValueError(f"int4_linear: packed weight must be 1-D uint8 of {np_ * kp // 2} bytes for K={k}, N={n}; got "
                         f"{w4.dtype} {tuple(w4.shape)} (does x have the layer's in_features?)")
    if g_scale.dtype != torch.float32 or g_scale.dim() != 1 or g_scale.numel() != np_ * groups:
        raise ValueError(f"int4_linear: g_scale must be 1-D float32 of {np_ * groups}, got {g_scale.dtype} "
                         f"{tuple(g_scale.shape)}")
    if corr.dtype != torch.float32 or corr.dim() != 1 or corr.numel() != np_:
        raise ValueError(f"int4_linear: corr must be 1-D float32 of {np_}, got {corr.dtype} {tuple(corr.shape)}")
    if bias is not None and (bias.dtype != torch.float32 or bias.dim() != 1 or bias.numel() != n):
        raise ValueError(f"int4_linear: bias must be 1-D float32 of {n}, got {bias.dtype} {tuple(bias.shape)}")
    check_activation_args("int4_linear", activation, act_scale, act_zero_point, act_bits)


def _check(x, w4, g_scale, corr, bias, n, groups, activation, act_scale, act_zero_point, act_bits) -> int:
    if not kernel_dtype(x):
        raise TypeError(f"int4_linear: x must be float32 (on CUDA also float16 or bfloat16), got {x.dtype} on "
                        f"{x.device.type}")
    if x.dim() < 1:
        raise ValueError("int4_linear: x must have at least one dimension")
    check_int4_weights(x.shape[-1], w4, g_scale, corr, bias, n, groups, activation, act_scale, act_zero_point,
                       act_bits)
    return x.shape[-1]


def _contiguous_cpu(*tensors) -> bool:
    return all(t is None or (t.is_contiguous() and t.device.type == "cpu") for t in tensors)


@torch.library.register_fake("pycompress::int4_linear")
def _int4_linear_fake(x, w4, g_scale, corr, bias, out_features, groups, activation=0, act_scale=None,
                      act_zero_point=0, act_bits=8):
    _check(x, w4, g_scale, corr, bias, out_features, groups, activation, act_scale, act_zero_point, act_bits)
    return x.new_empty((*x.shape[:-1], out_features))


def int4_linear_cpu(x, w4, g_scale, corr, bias, out_features, groups, activation=0, act_scale=None, act_zero_point=0,
                    act_bits=8):
    n = out_features
    k = _check(x, w4, g_scale, corr, bias, n, groups, activation, act_scale, act_zero_point, act_bits)
    if not _contiguous_cpu(w4, g_scale, corr, bias):
        raise ValueError("int4_linear: weight operands must be contiguous (build them with pycompress.nn modules)")
    x2, m, ldx = eager_rows(x, k)
    y = torch.empty((m, n), dtype=torch.float32)
    _C.q8_linear(
        x2.data_ptr(), m, k, ldx, 0, 0, 0, 0 if bias is None else bias.data_ptr(), n, y.data_ptr(), n, activation,
        act_scale is not None, 1.0 if act_scale is None else act_scale, act_zero_point, num_threads(), act_bits,
        w4=w4.data_ptr(), g_scale=g_scale.data_ptr(), corr=corr.data_ptr(), groups=groups,
    )
    return y if x.dim() == 2 else y.view(*x.shape[:-1], n)


LIB.impl("int4_linear", int4_linear_cpu, "CPU")


def int4_linear_cuda(x, w4, g_scale, corr, bias, out_features, groups, activation=0, act_scale=None,
                     act_zero_point=0, act_bits=8):
    """The CUDA kernel (csrc/cuda/q4_gemm_mma__sm80.cu) over the same 4-bit pack as the CPU, bit for bit; groups
    of a multiple of 32 k or one group per channel (other group sizes are refused, naming the shape)."""
    n = out_features
    k = _check(x, w4, g_scale, corr, bias, n, groups, activation, act_scale, act_zero_point, act_bits)
    check_same_device("int4_linear", x, w4=w4, g_scale=g_scale, corr=corr, bias=bias)
    if not all(t is None or t.is_contiguous() for t in (w4, g_scale, corr, bias)):
        raise ValueError("int4_linear: weight operands must be contiguous (build them with pycompress.nn modules)")
    x2, m, ldx = eager_rows(x, k)
    try:  # the kernel's own plan (csrc/cuda/q4_cuda_tiling.h), before anything is launched
        _C.cuda_q4_plan(m, n, k, groups)
    except ValueError as err:
        raise ValueError(f"int4_linear (CUDA): {err} (layer of K={k}, N={n}, {groups} groups)") from None
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)

    def run(cuda, scratch, stream, _):
        if w4.data_ptr() % 4:
            raise ValueError("int4_linear: on CUDA the packed weights must start 4-byte aligned: pass w4.clone()")
        cuda.q4_linear(x2.data_ptr(), CUDA_DTYPES[x.dtype], m, k, ldx, w4.data_ptr(), g_scale.data_ptr(),
                       corr.data_ptr(), groups, 0 if bias is None else bias.data_ptr(), n, y.data_ptr(), n,
                       activation, act_scale is not None, 1.0 if act_scale is None else act_scale, act_zero_point,
                       act_qmax(act_bits), scratch.data_ptr(), scratch.numel(), stream)

    if m > 0:
        _cuda.launch("int4_linear", x, run, scratch_for=(m, n, k))
    return y if x.dim() == 2 else y.view(*x.shape[:-1], n)


LIB.impl("int4_linear", int4_linear_cuda, "CUDA")


def int4_linear_plan(k, n, groups, w4, g_scale, corr, bias, activation=0, act_scale=None, act_zero_point=0,
                     act_bits=8):
    """The weight-side operands of one W4A8 linear, checked once and bound into a native plan
    (``plan.run(x_ptr, m, ldx, y_ptr, threads)``), as ``int8_linear_plan`` for int8 weights."""
    check_int4_weights(k, w4, g_scale, corr, bias, n, groups, activation, act_scale, act_zero_point, act_bits)
    if not _contiguous_cpu(w4, g_scale, corr, bias):
        raise ValueError("int4_linear: weight operands must be contiguous CPU tensors "
                         "(build them with pycompress.nn modules)")
    return _C.Q8LinearPlan(0, 0, 0, 0 if bias is None else bias.data_ptr(), k, n, activation, act_scale is not None,
                           1.0 if act_scale is None else act_scale, act_zero_point, act_bits, w4=w4.data_ptr(),
                           g_scale=g_scale.data_ptr(), corr=corr.data_ptr(), groups=groups)


def int4_linear(x, w4, g_scale, corr, bias, out_features, groups, activation=0, act_scale=None, act_zero_point=0,
                act_bits=8):
    return torch.ops.pycompress.int4_linear(x, w4, g_scale, corr, bias, out_features, groups, activation, act_scale,
                                            act_zero_point, act_bits)
