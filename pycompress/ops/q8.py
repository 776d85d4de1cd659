"""torch.ops.pycompress.int8_linear: y = act(dequant(quant(x) @ W^T) + bias)."""

from __future__ import annotations

import torch

from pycompress import _C, _cuda
from pycompress._native import num_threads
from pycompress.ops._library import LIB
from pycompress.reference.q8 import ACT_BITS, KGROUP, MAX_K, PANEL, act_qmax, round_up

# Activation dtypes of the CUDA kernel (x and y alike; the CPU kernels take float32) and their codes in
# csrc/cuda/q8_cuda.h (DType).
CUDA_DTYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


def kernel_dtype(x: torch.Tensor) -> bool:
    """Whether the int8 and sparse kernels take x's dtype on its device: float32, and on CUDA also float16 and
    bfloat16 (on the CPU the layers widen those first: nn.registry.half_on_cpu)."""
    return x.dtype is torch.float32 or (x.device.type == "cuda" and x.dtype in CUDA_DTYPES)

LIB.define(
    "int8_linear(Tensor x, Tensor w_packed, Tensor col_sum, Tensor w_scale, Tensor? bias, "
    "int activation=0, float? act_scale=None, int act_zero_point=0, int act_bits=8) -> Tensor"
)


def check_int8_args(x, w_packed, col_sum, w_scale, bias, activation, act_scale, act_zero_point, act_bits=8) -> tuple[int, int]:
    """Validates every operand the kernel will read; returns (K, N).

    Plain comparisons, not torch._check: this runs on every eager call and must
    stay in the low microseconds. Only static sizes (K, N) are inspected, so
    dynamic batch dimensions trace without guards.
    """
    if not kernel_dtype(x):
        raise TypeError(f"int8_linear: x must be float32 (on CUDA also float16 or bfloat16), got {x.dtype} "
                        f"on {x.device.type}")
    if x.dim() < 1:
        raise ValueError("int8_linear: x must have at least one dimension")
    return x.shape[-1], _check_weights(x.shape[-1], w_packed, col_sum, w_scale, bias, activation, act_scale,
                                       act_zero_point, act_bits)


def _check_weights(k, w_packed, col_sum, w_scale, bias, activation, act_scale, act_zero_point, act_bits=8) -> int:
    """Validates the weight-side operands for K input features; returns N."""
    if w_scale.dtype != torch.float32 or w_scale.dim() != 1:
        raise ValueError(f"int8_linear: w_scale must be 1-D float32, got {w_scale.dtype} {tuple(w_scale.shape)}")
    n = w_scale.shape[0]
    if not 1 <= k <= MAX_K:
        raise ValueError(f"int8_linear: K={k} features is outside [1, {MAX_K}]; beyond {MAX_K} an int32 "
                         "accumulator of uint8*int8 products can overflow")
    kp, np_ = round_up(k, KGROUP), round_up(n, PANEL)
    if w_packed.dtype != torch.int8 or w_packed.dim() != 1 or w_packed.numel() != np_ * kp:
        raise ValueError(f"int8_linear: packed weight must be 1-D int8 of {np_ * kp} bytes for K={k}, N={n}; got "
                         f"{w_packed.dtype} {tuple(w_packed.shape)} (does x have the layer's in_features?)")
    if col_sum.dtype != torch.int32 or col_sum.dim() != 1 or col_sum.numel() != np_:
        raise ValueError(f"int8_linear: col_sum must be 1-D int32 of {np_}, got {col_sum.dtype} {tuple(col_sum.shape)}")
    if bias is not None and (bias.dtype != torch.float32 or bias.dim() != 1 or bias.numel() != n):
        raise ValueError(f"int8_linear: bias must be 1-D float32 of {n}, got {bias.dtype} {tuple(bias.shape)}")
    check_activation_args("int8_linear", activation, act_scale, act_zero_point, act_bits)
    return n


def check_activation_args(op: str, activation, act_scale, act_zero_point, act_bits) -> None:
    """The epilogue activation code and the activation format (bits, static scale / zero point) of an
    int8-activation op."""
    if activation not in (0, 1, 2):
        raise ValueError(f"{op}: activation code {activation} not in (0, 1, 2)")
    if act_bits not in ACT_BITS:
        raise ValueError(f"{op}: activation bits {act_bits!r} not in {ACT_BITS}")
    qmax = act_qmax(act_bits)
    if act_scale is not None and not (0 < act_scale < float("inf") and 0 <= act_zero_point <= qmax):
        raise ValueError(f"{op}: static scale {act_scale} must be finite > 0, "
                         f"zero point {act_zero_point} in [0, {qmax}]")


@torch.library.register_fake("pycompress::int8_linear")
def _int8_linear_fake(x, w_packed, col_sum, w_scale, bias, activation=0, act_scale=None, act_zero_point=0,
                      act_bits=8):
    _, n = check_int8_args(x, w_packed, col_sum, w_scale, bias, activation, act_scale, act_zero_point, act_bits)
    return x.new_empty((*x.shape[:-1], n))


def int8_linear_cpu(x, w_packed, col_sum, w_scale, bias, activation=0, act_scale=None, act_zero_point=0,
                    act_bits=8):
    k, n = check_int8_args(x, w_packed, col_sum, w_scale, bias, activation, act_scale, act_zero_point, act_bits)
    x2, m, ldx = eager_rows(x, k)
    if not (w_packed.is_contiguous() and col_sum.is_contiguous() and w_scale.is_contiguous()
            and (bias is None or bias.is_contiguous())):
        raise ValueError("int8_linear: weight operands must be contiguous (build them with pycompress.nn modules)")
    y = torch.empty((m, n), dtype=torch.float32)
    _C.q8_linear(
        x2.data_ptr(), m, k, ldx,
        w_packed.data_ptr(), col_sum.data_ptr(), w_scale.data_ptr(), 0 if bias is None else bias.data_ptr(),
        n, y.data_ptr(), n, activation,
        act_scale is not None, 1.0 if act_scale is None else act_scale, act_zero_point, num_threads(), act_bits,
    )
    return y if x.dim() == 2 else y.view(*x.shape[:-1], n)


LIB.impl("int8_linear", int8_linear_cpu, "CPU")


def check_same_device(op: str, x: torch.Tensor, **operands) -> None:
    """Every operand on x's device, or an error naming the first that is not."""
    for name, t in operands.items():
        if t is not None and t.device != x.device:
            raise ValueError(f"{op}: x is on {x.device} but {name} is on {t.device}: move the layer to the input's "
                             "device first (module.to(x.device))")


def int8_linear_cuda(x, w_packed, col_sum, w_scale, bias, activation=0, act_scale=None, act_zero_point=0,
                     act_bits=8):
    return _int8_linear_cuda(x, w_packed, col_sum, w_scale, bias, activation, act_scale, act_zero_point, act_bits)


def nm24_pack(w_packed: torch.Tensor, n: int, k: int) -> torch.Tensor | None:
    """The 2:4 GPU pack (csrc/cuda/q8_nm24_tiling.h) of a CUDA int8 layer's packed weights when every 4
    consecutive k of each channel hold at most 2 non-zeros (a 2:4-pruned layer), else None: the int8 linear then
    runs on sparse tensor cores, with the same bits as the dense kernel. Decided once per tensor version (one
    check on the device; the pack is made on the host) and cached on the tensor; tensors made in inference mode
    have no version counter, so they keep the dense kernel, and so does a first call while a CUDA graph is being
    captured (the check needs a host sync): call the layer once before capturing to capture the 2:4 kernel."""
    if w_packed.is_inference():
        return None
    stamp = (w_packed.data_ptr(), w_packed._version, tuple(w_packed.shape), n, k)
    cached = getattr(w_packed, "_pycompress_nm24", None)
    if cached is not None and cached[0] == stamp:
        return cached[1]
    if torch.cuda.is_current_stream_capturing():
        return None
    pack = None
    if bool(((w_packed.view(-1, KGROUP) != 0).sum(1, dtype=torch.int8) <= 2).all()):
        host = w_packed.cpu()
        out = torch.empty(_C.cuda_nm24_bytes(n, k), dtype=torch.uint8)
        _C.cuda_nm24_pack(host.data_ptr(), n, k, out.data_ptr())
        pack = out.to(w_packed.device)
    w_packed._pycompress_nm24 = (stamp, pack)
    return pack


def _int8_linear_cuda(x, w_packed, col_sum, w_scale, bias, activation=0, act_scale=None, act_zero_point=0,
                      act_bits=8, raw=False, sparse24="auto"):
    """The CUDA kernel (csrc/cuda): every operand checked before anything is launched; ``raw``: the int32
    accumulators instead of y (tests). x's rows may be strided (elements contiguous), y is contiguous in x's
    dtype. 2:4-sparse weights run the sparse tensor-core kernel (nm24_pack) for up to _C.CUDA_NM24_MAX_ROWS rows
    (``sparse24`` "auto"; True: at any M, False: never, for tests and benchmarks): the same bits either way."""
    k, n = check_int8_args(x, w_packed, col_sum, w_scale, bias, activation, act_scale, act_zero_point, act_bits)
    check_same_device("int8_linear", x, w_packed=w_packed, col_sum=col_sum, w_scale=w_scale, bias=bias)
    if not (w_packed.is_contiguous() and col_sum.is_contiguous() and w_scale.is_contiguous()
            and (bias is None or bias.is_contiguous())):
        raise ValueError("int8_linear: weight operands must be contiguous (build them with pycompress.nn modules)")
    x2, m, ldx = eager_rows(x, k)
    y = torch.empty((m, n), dtype=torch.int32 if raw else x.dtype, device=x.device)
    def run(cuda, scratch, stream, dev):
        if w_packed.data_ptr() % 16:
            raise ValueError("int8_linear: on CUDA the packed weights must start 16-byte aligned; this one is a view "
                             "at an odd offset: pass w_packed.clone()")
        epilogue = (col_sum.data_ptr(), w_scale.data_ptr(), 0 if bias is None else bias.data_ptr(), n,
                    0 if raw else y.data_ptr(), n, activation, act_scale is not None,
                    1.0 if act_scale is None else act_scale, act_zero_point, act_qmax(act_bits), scratch.data_ptr(),
                    scratch.numel(), y.data_ptr() if raw else 0, stream)
        use24 = sparse24 is True or (sparse24 == "auto" and m <= _C.CUDA_NM24_MAX_ROWS)
        pack = nm24_pack(w_packed, n, k) if use24 else None
        if pack is not None:
            cuda.q8_nm24_linear(x2.data_ptr(), CUDA_DTYPES[x.dtype], m, k, ldx, pack.data_ptr(), *epilogue)
        else:
            cuda.q8_linear(x2.data_ptr(), CUDA_DTYPES[x.dtype], m, k, ldx, w_packed.data_ptr(), *epilogue, dev.sms,
                           dev.wgmma)

    if m > 0:
        _cuda.launch("int8_linear", x, run, scratch_for=(m, n, k))
    return y if x.dim() == 2 else y.view(*x.shape[:-1], n)


LIB.impl("int8_linear", int8_linear_cuda, "CUDA")


def eager_rows(x: torch.Tensor, k: int) -> tuple[torch.Tensor, int, int]:
    """(x2, m, ldx): x [..., k] as m rows of a native call, row stride ldx; strided rows are kept,
    a copy is made only when elements within a row are not contiguous. Cheap for the common
    contiguous x (no reshape): the eager paths of the modules call it on every forward."""
    if x.is_contiguous():
        return x, x.numel() // k, k
    x2 = x if x.dim() == 2 else x.reshape(-1, k)
    m = x2.shape[0]
    if m > 0 and (x2.stride(1) != 1 or (m > 1 and x2.stride(0) < k)):
        x2 = x2.contiguous()
    return x2, m, x2.stride(0) if m > 1 else k


def int8_linear_plan(k, n, w_packed, col_sum, w_scale, bias, activation=0, act_scale=None, act_zero_point=0,
                     act_bits=8):
    """The weight-side operands of one int8 linear of K input features, checked once and bound
    into a native plan: ``plan.run(x_ptr, m, ldx, y_ptr, threads)`` then computes what
    ``int8_linear_cpu`` does for float32 rows x (contiguous within a row) into a contiguous y [m, N]
    (N = n, the layer's output features).
    The caller keeps the operands alive and rebuilds the plan when any of them is replaced or its
    storage moves (``Int8Linear`` does)."""
    if w_scale.dim() != 1 or w_scale.shape[0] != n:
        raise ValueError(f"int8_linear: w_scale must be 1-D float32 of {n}, got {w_scale.dtype} {tuple(w_scale.shape)}")
    _check_weights(k, w_packed, col_sum, w_scale, bias, activation, act_scale, act_zero_point, act_bits)
    if not (w_packed.is_contiguous() and col_sum.is_contiguous() and w_scale.is_contiguous()
            and (bias is None or bias.is_contiguous())
            and all(t.device.type == "cpu" for t in (w_packed, col_sum, w_scale) + (() if bias is None else (bias,)))):
        raise ValueError("int8_linear: weight operands must be contiguous CPU tensors "
                         "(build them with pycompress.nn modules)")
    return _C.Q8LinearPlan(w_packed.data_ptr(), col_sum.data_ptr(), w_scale.data_ptr(),
                           0 if bias is None else bias.data_ptr(), k, n, activation, act_scale is not None,
                           1.0 if act_scale is None else act_scale, act_zero_point, act_bits)


def int8_linear(x, w_packed, col_sum, w_scale, bias=None, activation=0, act_scale=None, act_zero_point=0,
                act_bits=8):
    return torch.ops.pycompress.int8_linear(x, w_packed, col_sum, w_scale, bias, activation, act_scale, act_zero_point,
                                            act_bits)


def int8_conv2d_nhwc_cpu(x_nhwc, geometry, w_packed, col_sum, w_scale, bias, activation=0, act_scale=None,
                         act_zero_point=0, act_bits=8) -> torch.Tensor:
    """int8 conv2d (groups=1), eager CPU: ``x_nhwc`` [B, H, W, C] float32 with contiguous channels
    (any other strides), ``geometry`` = (kh, kw, sh, sw, ph, pw, dh, dw). The im2col rows are quantized
    straight from x (no float im2col copy) and are exactly the rows of the float im2col, so the result
    is bit-identical to ``int8_linear_cpu`` of that copy. Returns y [B * Ho * Wo, N] (NHWC order)."""
    if x_nhwc.dtype != torch.float32 or x_nhwc.dim() != 4 or (x_nhwc.stride(3) != 1 and x_nhwc.shape[3] != 1):
        raise ValueError(f"int8_conv2d: x must be 4-D NHWC float32 with contiguous channels, got {x_nhwc.dtype} "
                         f"{tuple(x_nhwc.shape)} strides {x_nhwc.stride()}")
    b, h, w, c = x_nhwc.shape
    kh, kw, sh, sw, ph, pw, dh, dw = geometry
    ho, wo = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1, (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    n = _check_weights(kh * kw * c, w_packed, col_sum, w_scale, bias, activation, act_scale, act_zero_point, act_bits)
    y = torch.empty((b * ho * wo, n), dtype=torch.float32)
    _C.q8_conv2d_nhwc(
        x_nhwc.data_ptr(), list(x_nhwc.stride()[:3]), [b, h, w, c], [ho, wo, kh, kw, sh, sw, ph, pw, dh, dw],
        w_packed.data_ptr(), col_sum.data_ptr(), w_scale.data_ptr(), 0 if bias is None else bias.data_ptr(),
        n, y.data_ptr(), activation, act_scale is not None, 1.0 if act_scale is None else act_scale,
        act_zero_point, num_threads(), act_bits,
    )
    return y
