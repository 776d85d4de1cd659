"""Several linears of one input in one native call (x quantized once): int8 and 4-bit weights alike."""

from __future__ import annotations

import torch

from pycompress import _C
from pycompress._native import num_threads
from pycompress.ops.q4 import check_int4_weights
from pycompress.ops.q8 import check_int8_args, eager_rows


def int8_linear_shared_input_cpu(x, outputs, act_scale=None, act_zero_point=0, tuner=None,
                                 act_bits=8) -> list[torch.Tensor]:
    """Several int8-activation linears of one input, eager CPU only: ``outputs`` is a sequence of
    ``(w_packed, col_sum, w_scale, bias, activation)`` (int8 weights) or ``(w4, g_scale, corr, bias,
    activation, out_features, groups)`` (4-bit weights, pycompress.ops.q4). x is quantized once and every
    output's tiles run in one parallel pass; each result equals the op of that output alone.
    ``tuner``: a ``_C.ThreadTuner`` kept by the caller across calls of the same group, which
    then learns the thread count of its small calls (csrc/common/thread_tuner.h)."""
    if not outputs:
        raise ValueError("int8_linear_shared_input: no outputs")
    if x.dtype != torch.float32 or x.dim() < 1:
        raise ValueError(f"int8_linear_shared_input: x must be float32 with at least one dimension, got {x.dtype} "
                         f"{tuple(x.shape)}")
    k = x.shape[-1]
    sizes, native = [], []
    for out in outputs:
        if len(out) == 7:
            w4, g_scale, corr, bias, act, n, groups = out
            check_int4_weights(k, w4, g_scale, corr, bias, n, groups, act, act_scale, act_zero_point, act_bits)
            tensors = (w4, g_scale, corr, bias)
        else:
            n = check_int8_args(x, *out, act_scale, act_zero_point, act_bits)[1]
            tensors = out[:4]
        if not all(t is None or t.is_contiguous() for t in tensors):
            raise ValueError("int8_linear_shared_input: weight operands must be contiguous")
        sizes.append(n)
    x2, m, ldx = eager_rows(x, k)
    ys = [torch.empty((m, n), dtype=torch.float32) for n in sizes]
    for out, n, y in zip(outputs, sizes, ys):
        bias, act = out[3], out[4]
        head = (0 if bias is None else bias.data_ptr(), n, y.data_ptr(), n, act)
        if len(out) == 7:
            native.append((0, 0, 0) + head + (out[0].data_ptr(), out[1].data_ptr(), out[2].data_ptr(), out[6]))
        else:
            native.append((out[0].data_ptr(), out[1].data_ptr(), out[2].data_ptr()) + head)
    _C.q8_linear_shared_input(
        x2.data_ptr(), m, k, ldx, native,
        act_scale is not None, 1.0 if act_scale is None else act_scale, act_zero_point, num_threads(), tuner,
        act_bits,
    )
    return ys if x.dim() == 2 else [y.view(*x.shape[:-1], n) for y, n in zip(ys, sizes)]
