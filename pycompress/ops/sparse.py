"""Sparse linears as torch ops (formats: csrc/sparse/sparse.h, pycompress/reference/sparse.py).

- ``torch.ops.pycompress.sparse_linear_csr(x, row_ptr, col_idx, values, bias, activation)``
- ``torch.ops.pycompress.sparse_linear_nm24(x, nm_idx, values, bias, activation)``
- ``torch.ops.pycompress.sparse_int8_linear(x, row_ptr, blk_idx, values, col_sum, w_scale, bias,
  activation, act_scale, act_zero_point)``

Safety: every call checks dtypes and sizes (O(1)); the structure a kernel trusts (row_ptr[0] == 0,
monotonic, row_ptr[N] == nnz, every index < K) is checked in C++ before the first kernel call on a pack
and again whenever a structural tensor changes: the check is memoized per (data_ptr, version counter,
K), and every in-place write through torch (``copy_``, ``load_state_dict``, indexing) bumps the version.
A corrupt pack therefore raises a ValueError instead of reaching a kernel. (Writes that bypass torch's
version counter, e.g. through a numpy view, are not seen; pycompress never does that.) nm24 packs need
no structural check: any 2-bit index of a K % 4 == 0 row is in range.
"""

from __future__ import annotations

import threading

import torch
from torch.utils.weak import WeakIdKeyDictionary

from pycompress import _C, _cuda
from pycompress._native import num_threads
from pycompress.ops._library import LIB
from pycompress.ops.q8 import CUDA_DTYPES, check_same_device, eager_rows, kernel_dtype
from pycompress.reference.q8 import round_up
from pycompress.reference.sparse import MAX_K, NM_PER_WORD

LIB.define("sparse_linear_csr(Tensor x, Tensor row_ptr, Tensor col_idx, Tensor values, Tensor? bias, "
           "int activation=0) -> Tensor")
LIB.define("sparse_linear_nm24(Tensor x, Tensor nm_idx, Tensor values, Tensor? bias, int activation=0) -> Tensor")
LIB.define("sparse_int8_linear(Tensor x, Tensor row_ptr, Tensor blk_idx, Tensor values, Tensor col_sum, "
           "Tensor w_scale, Tensor? bias, int activation=0, float? act_scale=None, int act_zero_point=0) -> Tensor")
LIB.define("sparse_int8_linear_sliced(Tensor x, Tensor slice_ptr, Tensor step_base, Tensor step_lane, Tensor values, "
           "Tensor col_sum, Tensor w_scale, Tensor? bias, int activation=0, float? act_scale=None, "
           "int act_zero_point=0) -> Tensor")

SLICE_LANES = 16

_FORMAT_CSR, _FORMAT_NM24 = 0, 1


def _check_common(op: str, x, bias, n: int, activation: int, cuda_dtypes: bool = False) -> int:
    """``cuda_dtypes``: the op's CUDA kernel also takes float16 / bfloat16 x."""
    if x.dtype != torch.float32 and not (cuda_dtypes and kernel_dtype(x)):
        if cuda_dtypes and x.device.type == "cuda":
            raise TypeError(f"{op}: x must be float32 (on CUDA also float16 or bfloat16), got {x.dtype} on cuda")
        raise TypeError(f"{op}: x must be float32, got {x.dtype}")
    if x.dim() < 1:
        raise ValueError(f"{op}: x must have at least one dimension")
    k = x.shape[-1]
    if not 1 <= k <= MAX_K:
        raise ValueError(f"{op}: K={k} features is outside [1, {MAX_K}] (uint16 column indices)")
    if bias is not None and (bias.dtype != torch.float32 or bias.dim() != 1 or bias.numel() != n):
        raise ValueError(f"{op}: bias must be 1-D float32 of {n}, got {bias.dtype} {tuple(bias.shape)}")
    if activation not in (0, 1, 2):
        raise ValueError(f"{op}: activation code {activation} not in (0, 1, 2)")
    return k


def _check_csr_like(op: str, row_ptr, idx, values, values_per_entry: int, value_dtype) -> int:
    if row_ptr.dtype != torch.int32 or row_ptr.dim() != 1 or row_ptr.numel() < 2:
        raise ValueError(f"{op}: row_ptr must be 1-D int32 with N+1 >= 2 entries, got {row_ptr.dtype} "
                         f"{tuple(row_ptr.shape)}")
    if idx.dtype != torch.uint16 or idx.dim() != 1:
        raise ValueError(f"{op}: indices must be 1-D uint16, got {idx.dtype} {tuple(idx.shape)}")
    if values.dtype != value_dtype or values.dim() != 1 or values.numel() != values_per_entry * idx.numel():
        raise ValueError(f"{op}: values must be 1-D {value_dtype} of {values_per_entry} x {idx.numel()} entries, "
                         f"got {values.dtype} {tuple(values.shape)}")
    return row_ptr.numel() - 1


def _check_csr(x, row_ptr, col_idx, values, bias, activation) -> tuple[int, int]:
    n = _check_csr_like("sparse_linear_csr", row_ptr, col_idx, values, 1, torch.float32)
    return _check_common("sparse_linear_csr", x, bias, n, activation, cuda_dtypes=True), n


def _check_nm24(x, nm_idx, values, bias, activation) -> tuple[int, int]:
    op = "sparse_linear_nm24"
    if values.dtype != torch.float32 or values.dim() != 2:
        raise ValueError(f"{op}: values must be 2-D float32 [N, K/2], got {values.dtype} {tuple(values.shape)}")
    n = values.shape[0]
    k = _check_common(op, x, bias, n, activation, cuda_dtypes=True)
    if k % 4 or values.shape[1] != k // 2:
        raise ValueError(f"{op}: x has K={k} features; 2:4 values [N, K/2] = {tuple(values.shape)} expect "
                         f"K={2 * values.shape[1]} (a multiple of 4)")
    words = (k // 2 + NM_PER_WORD - 1) // NM_PER_WORD
    if nm_idx.dtype != torch.uint32 or tuple(nm_idx.shape) != (n, words):
        raise ValueError(f"{op}: nm_idx must be uint32 [{n}, {words}], got {nm_idx.dtype} {tuple(nm_idx.shape)}")
    return k, n


def _check_int8(x, row_ptr, blk_idx, values, col_sum, w_scale, bias, activation, act_scale,
                act_zero_point) -> tuple[int, int]:
    op = "sparse_int8_linear"
    n = _check_csr_like(op, row_ptr, blk_idx, values, 4, torch.int8)
    k = _check_common(op, x, bias, n, activation, cuda_dtypes=True)
    for name, t, dtype in (("col_sum", col_sum, torch.int32), ("w_scale", w_scale, torch.float32)):
        if t.dtype != dtype or t.dim() != 1 or t.numel() != n:
            raise ValueError(f"{op}: {name} must be 1-D {dtype} of {n}, got {t.dtype} {tuple(t.shape)}")
    if act_scale is not None and not (0 < act_scale < float("inf") and 0 <= act_zero_point <= 255):
        raise ValueError(f"{op}: static scale {act_scale} must be finite > 0, zero point {act_zero_point} in [0, 255]")
    return k, n


def _check_sliced(x, slice_ptr, step_base, step_lane, values, col_sum, w_scale, bias, activation, act_scale,
                  act_zero_point) -> tuple[int, int]:
    op = "sparse_int8_linear_sliced"
    n = col_sum.numel()
    if col_sum.dtype != torch.int32 or col_sum.dim() != 1 or n < 1:
        raise ValueError(f"{op}: col_sum must be 1-D int32 of N >= 1, got {col_sum.dtype} {tuple(col_sum.shape)}")
    if w_scale.dtype != torch.float32 or w_scale.dim() != 1 or w_scale.numel() != n:
        raise ValueError(f"{op}: w_scale must be 1-D float32 of {n}, got {w_scale.dtype} {tuple(w_scale.shape)}")
    slices = (n + SLICE_LANES - 1) // SLICE_LANES
    if slice_ptr.dtype != torch.int32 or tuple(slice_ptr.shape) != (slices + 1,):
        raise ValueError(f"{op}: slice_ptr must be int32 [{slices + 1}] for N={n}, got {slice_ptr.dtype} "
                         f"{tuple(slice_ptr.shape)}")
    if step_base.dtype != torch.uint16 or step_base.dim() != 1:
        raise ValueError(f"{op}: step_base must be 1-D uint16, got {step_base.dtype} {tuple(step_base.shape)}")
    steps = step_base.numel()
    if not _is_byte_layout(step_lane, steps) and (step_lane.dtype != torch.uint32 or tuple(step_lane.shape) != (steps, 2)):
        raise ValueError(f"{op}: step_lane must be uint32 [{steps}, 2] (group layout) or uint8 [{steps}, "
                         f"{4 * SLICE_LANES}] (byte layout), got {step_lane.dtype} {tuple(step_lane.shape)}")
    if values.dtype != torch.int8 or tuple(values.shape) != (steps, 4 * SLICE_LANES):
        raise ValueError(f"{op}: values must be int8 [{steps}, {4 * SLICE_LANES}], got {values.dtype} "
                         f"{tuple(values.shape)}")
    k = _check_common(op, x, bias, n, activation)
    if act_scale is not None and not (0 < act_scale < float("inf") and 0 <= act_zero_point <= 255):
        raise ValueError(f"{op}: static scale {act_scale} must be finite > 0, zero point {act_zero_point} in [0, 255]")
    return k, n


def _is_byte_layout(step_lane: torch.Tensor, steps: int) -> bool:
    """A sliced pack's kind is its step_lane: uint32 [steps, 2] nibbles (groups) or uint8 [steps, 64]
    positions (bytes)."""
    return step_lane.dtype == torch.uint8 and tuple(step_lane.shape) == (steps, 4 * SLICE_LANES)


def sliced_steps(row_ptr: torch.Tensor, blk_idx: torch.Tensor, values: torch.Tensor, k: int, byte_layout: bool) -> int:
    """Steps the sliced layout (``byte_layout``: the byte layout) of a bsr1x4 pack would have, without building it."""
    op = "sliced_steps"
    n = _check_csr_like(op, row_ptr, blk_idx, values, 4, torch.int8)
    ensure_valid_structure(op, row_ptr, blk_idx, k, _C.sparse_validate_bsr1x4)
    _require_contiguous(op, values)
    return _C.sparse_sliced_steps(row_ptr.data_ptr(), n, blk_idx.data_ptr(), values.data_ptr(), k, byte_layout)


def build_sliced(row_ptr: torch.Tensor, blk_idx: torch.Tensor, values: torch.Tensor, k: int, byte_layout: bool = False):
    """The sliced layout (csrc/sparse/sparse.h) of a bsr1x4 pack: (slice_ptr, step_base, step_lane, values);
    ``byte_layout=True`` builds the byte layout, whose step_lane is uint8 [steps, 64] window positions.

    The bsr1x4 structure is validated first, so the builder only reads in bounds; its output is validated
    again by the op like any pack handed to it.
    """
    op = "build_sliced"
    n = _check_csr_like(op, row_ptr, blk_idx, values, 4, torch.int8)
    ensure_valid_structure(op, row_ptr, blk_idx, k, _C.sparse_validate_bsr1x4)
    _require_contiguous(op, values)
    steps = _C.sparse_sliced_steps(row_ptr.data_ptr(), n, blk_idx.data_ptr(), values.data_ptr(), k, byte_layout)
    slice_ptr = torch.empty((n + SLICE_LANES - 1) // SLICE_LANES + 1, dtype=torch.int32)
    step_base = torch.empty(steps, dtype=torch.uint16)
    step_lane = (torch.empty((steps, 4 * SLICE_LANES), dtype=torch.uint8) if byte_layout
                 else torch.empty((steps, 2), dtype=torch.uint32))
    sliced_values = torch.empty((steps, 4 * SLICE_LANES), dtype=torch.int8)
    _C.sparse_build_sliced(row_ptr.data_ptr(), n, blk_idx.data_ptr(), values.data_ptr(), k, slice_ptr.data_ptr(),
                           step_base.data_ptr(), step_lane.data_ptr(), byte_layout, sliced_values.data_ptr(), steps)
    return slice_ptr, step_base, step_lane, sliced_values


def csr_panels_supported(k: int) -> bool:
    """Whether a K-feature csr pack has a panel layout (the pad index K must fit uint16)."""
    return 1 <= k <= _C.SPARSE_PANEL_MAX_K


def build_csr_panels(row_ptr: torch.Tensor, col_idx: torch.Tensor, values: torch.Tensor, k: int):
    """The csr panel layout (csrc/sparse/sparse.h) of a csr pack: (sub, idx, values).

    The csr structure is validated first, so the builder only reads in bounds; its output is validated again
    by the op like any layout handed to it.
    """
    op = "build_csr_panels"
    n = _check_csr_like(op, row_ptr, col_idx, values, 1, torch.float32)
    if not csr_panels_supported(k):
        raise ValueError(f"{op}: K={k} is outside [1, {_C.SPARSE_PANEL_MAX_K}] (the pad index K must fit uint16)")
    ensure_valid_structure(op, row_ptr, col_idx, k, _C.sparse_validate_csr)
    _require_contiguous(op, values)
    entries = _C.sparse_csr_panel_entries(row_ptr.data_ptr(), n, col_idx.data_ptr(), k)
    panels = (k + _C.SPARSE_PANEL_COLS - 1) // _C.SPARSE_PANEL_COLS
    sub = torch.empty(n * panels + 1, dtype=torch.int32)
    idx = torch.empty(entries, dtype=torch.uint16)
    panel_values = torch.empty(entries, dtype=torch.float32)
    _C.sparse_build_csr_panels(row_ptr.data_ptr(), n, col_idx.data_ptr(), values.data_ptr(), k, sub.data_ptr(),
                               idx.data_ptr(), panel_values.data_ptr(), entries)
    return sub, idx, panel_values


# values tensor of a csr pack -> (stamp of the pack, its panel layout): one layout per pack, whoever asks.
_CSR_PANELS: WeakIdKeyDictionary = WeakIdKeyDictionary()
_CSR_PANELS_LOCK = threading.Lock()
# The kernels read the csr panel layout from M = 2 (M = 1 runs the gather kernel): sparse.h kF32GatherMaxRows.
CSR_PANEL_MIN_ROWS = 2


def _csr_pack_stamp(row_ptr: torch.Tensor, col_idx: torch.Tensor, values: torch.Tensor, k: int) -> tuple:
    """Addresses and version counters of a csr pack (addresses only for inference tensors, which have no version
    counter; SparseLinear stamps its pack the same way)."""
    tensors = (row_ptr, col_idx, values)
    if any(t.is_inference() for t in tensors):
        return (*(t.data_ptr() for t in tensors), k)
    return (*(x for t in tensors for x in (t.data_ptr(), t._version)), k)


def csr_panels_for(row_ptr: torch.Tensor, col_idx: torch.Tensor, values: torch.Tensor, k: int):
    """The csr panel layout of a csr pack (build_csr_panels), built once per pack and version and shared: the op
    (eager, or called from a torch.compile / torch.export graph) and SparseLinear's eager calls read the same
    layout, so they run the same kernel and sum in the same order (the panel kernels sum per K panel, the plain
    cols kernel per row: fp32 results differ in their last bits). Kept while ``values`` lives."""
    stamp = _csr_pack_stamp(row_ptr, col_idx, values, k)
    with _CSR_PANELS_LOCK:
        hit = _CSR_PANELS.get(values)
    if hit is not None and hit[0] == stamp:
        return hit[1]
    # Normal tensors even under inference_mode: their structural check is then memoized per version.
    with torch.inference_mode(False):
        panels = build_csr_panels(row_ptr, col_idx, values, k)
    with _CSR_PANELS_LOCK:
        _CSR_PANELS[values] = (stamp, panels)
    return panels


def build_bsr1x4_panels(row_ptr: torch.Tensor, blk_idx: torch.Tensor, values: torch.Tensor, k: int):
    """The bsr1x4 panel layout (csrc/sparse/sparse.h: the csr panel layout over k/4 groups, one 1x4 block per
    entry) of a bsr1x4 pack: (sub, idx, values int8 [entries * 4]). Validated input, like build_csr_panels."""
    op = "build_bsr1x4_panels"
    n = _check_csr_like(op, row_ptr, blk_idx, values, 4, torch.int8)
    ensure_valid_structure(op, row_ptr, blk_idx, k, _C.sparse_validate_bsr1x4)
    _require_contiguous(op, values)
    entries = _C.sparse_bsr1x4_panel_entries(row_ptr.data_ptr(), n, blk_idx.data_ptr(), k)
    groups = (k + 3) // 4
    panels = (groups + _C.SPARSE_PANEL_COLS - 1) // _C.SPARSE_PANEL_COLS
    sub = torch.empty(n * panels + 1, dtype=torch.int32)
    idx = torch.empty(entries, dtype=torch.uint16)
    panel_values = torch.empty(4 * entries, dtype=torch.int8)
    _C.sparse_build_bsr1x4_panels(row_ptr.data_ptr(), n, blk_idx.data_ptr(), values.data_ptr(), k, sub.data_ptr(),
                                  idx.data_ptr(), panel_values.data_ptr(), entries)
    return sub, idx, panel_values


def _bsr1x4_panel_ptrs(op: str, panels, n: int, k: int) -> tuple[int, int, int]:
    """Checks a bsr1x4 panel layout handed to an op (dtypes, sizes, memoized structure) and returns its pointers."""
    if panels is None:
        return 0, 0, 0
    sub, idx, panel_values = panels
    if (sub.dtype != torch.int32 or sub.dim() != 1 or idx.dtype != torch.uint16 or idx.dim() != 1
            or panel_values.dtype != torch.int8 or panel_values.shape != (4 * idx.numel(),)):
        raise ValueError(f"{op}: panels must be (int32 sub, uint16 idx, int8 values of 4 per index) 1-D tensors, got "
                         f"{sub.dtype} {idx.dtype} {panel_values.dtype} {tuple(panel_values.shape)}")
    _require_contiguous(op, panel_values)
    validator = (lambda sub_ptr, nsub_minus_1, idx_ptr, entries, kk:
                 _C.sparse_validate_bsr1x4_panels(sub_ptr, nsub_minus_1 + 1, idx_ptr, entries, n, kk))
    ensure_valid_structure(op, sub, idx, k, validator)
    return sub.data_ptr(), idx.data_ptr(), panel_values.data_ptr()


def _panels_validator(n: int):
    # ensure_valid_structure passes len(sub) - 1; the C++ check wants the pointer count and N.
    return lambda sub, nsub_minus_1, idx, entries, k: _C.sparse_validate_csr_panels(sub, nsub_minus_1 + 1, idx,
                                                                                     entries, n, k)


def _stamp(row_ptr: torch.Tensor, idx: torch.Tensor, k: int, kind: str):
    return (row_ptr.data_ptr(), row_ptr._version, idx.data_ptr(), idx._version, k, kind)


def ensure_valid_structure(op: str, row_ptr: torch.Tensor, idx: torch.Tensor, k: int, validate, kind: str = "") -> None:
    """Runs the C++ structural check unless it already passed for these exact tensors and versions (and
    ``kind``: the sliced layouts bound step_base differently for groups and bytes)."""
    memo = not (row_ptr.is_inference() or idx.is_inference())  # inference tensors have no version counter
    if memo and getattr(row_ptr, "_pycompress_valid", None) == _stamp(row_ptr, idx, k, kind):
        return
    if not (row_ptr.is_contiguous() and idx.is_contiguous()):
        raise ValueError(f"{op}: row_ptr and indices must be contiguous")
    try:
        validate(row_ptr.data_ptr(), row_ptr.numel() - 1, idx.data_ptr(), idx.numel(), k)
    except ValueError as e:
        raise ValueError(f"{op}: corrupt sparse pack: {e}") from None
    if memo:
        row_ptr._pycompress_valid = _stamp(row_ptr, idx, k, kind)


def _require_contiguous(op: str, *tensors) -> None:
    if not all(t is None or t.is_contiguous() for t in tensors):
        raise ValueError(f"{op}: weight operands must be contiguous (build them with pycompress.nn modules)")


def _out(x, y, n):
    return y if x.dim() == 2 else y.view(*x.shape[:-1], n)


def sparse_linear_csr_cpu(x, row_ptr, col_idx, values, bias=None, activation=0, panels=None):
    """``panels``: the pack's csr panel layout (build_csr_panels); the AVX-512 and AVX2 kernels use it for
    M >= 2. None (the op's own calls): the layout of csr_panels_for, built on the first call with M >= 2, so
    a traced or compiled call runs the kernel an eager SparseLinear call runs and gives the same bits (the
    panel kernels sum per K panel of 512 columns, the plain cols kernel per row)."""
    op = "sparse_linear_csr"
    k, n = _check_csr(x, row_ptr, col_idx, values, bias, activation)
    _require_contiguous(op, values, bias)
    ensure_valid_structure(op, row_ptr, col_idx, k, _C.sparse_validate_csr)
    panel_ptrs = (0, 0, 0)
    if panels is None and x.numel() >= CSR_PANEL_MIN_ROWS * k and csr_panels_supported(k):
        panels = csr_panels_for(row_ptr, col_idx, values, k)
    if panels is not None:
        sub, idx, panel_values = panels
        if (sub.dtype != torch.int32 or sub.dim() != 1 or idx.dtype != torch.uint16 or idx.dim() != 1
                or panel_values.dtype != torch.float32 or panel_values.shape != idx.shape):
            raise ValueError(f"{op}: panels must be (int32 sub, uint16 idx, float32 values) 1-D tensors, got "
                             f"{sub.dtype} {idx.dtype} {panel_values.dtype}")
        _require_contiguous(op, panel_values)
        ensure_valid_structure(op, sub, idx, k, _panels_validator(n))
        panel_ptrs = (sub.data_ptr(), idx.data_ptr(), panel_values.data_ptr())
    x2, m, ldx = eager_rows(x, k)
    y = torch.empty((m, n), dtype=torch.float32)
    _C.sparse_f32_linear(_FORMAT_CSR, n, k, row_ptr.data_ptr(), col_idx.data_ptr(), 0, 0, values.data_ptr(),
                         x2.data_ptr(), m, ldx, 0 if bias is None else bias.data_ptr(),
                         activation, y.data_ptr(), n, num_threads(), *panel_ptrs)
    return _out(x, y, n)


def sparse_linear_nm24_cpu(x, nm_idx, values, bias=None, activation=0):
    k, n = _check_nm24(x, nm_idx, values, bias, activation)
    _require_contiguous("sparse_linear_nm24", nm_idx, values, bias)
    x2, m, ldx = eager_rows(x, k)
    y = torch.empty((m, n), dtype=torch.float32)
    _C.sparse_f32_linear(_FORMAT_NM24, n, k, 0, 0, nm_idx.data_ptr(), nm_idx.shape[1], values.data_ptr(),
                         x2.data_ptr(), m, ldx, 0 if bias is None else bias.data_ptr(),
                         activation, y.data_ptr(), n, num_threads())
    return _out(x, y, n)


def sparse_int8_linear_cpu(x, row_ptr, blk_idx, values, col_sum, w_scale, bias=None, activation=0,
                           act_scale=None, act_zero_point=0, panels=None):
    """``panels``: the pack's bsr1x4 panel layout (build_bsr1x4_panels) or None; the AVX-512 kernels use it for
    M >= 4 (bit-identical results: exact int32 accumulation)."""
    k, n = _check_int8(x, row_ptr, blk_idx, values, col_sum, w_scale, bias, activation, act_scale, act_zero_point)
    _require_contiguous("sparse_int8_linear", values, col_sum, w_scale, bias)
    ensure_valid_structure("sparse_int8_linear", row_ptr, blk_idx, k, _C.sparse_validate_bsr1x4)
    panel_ptrs = _bsr1x4_panel_ptrs("sparse_int8_linear", panels, n, k)
    x2, m, ldx = eager_rows(x, k)
    y = torch.empty((m, n), dtype=torch.float32)
    _C.sparse_q8_linear(n, k, row_ptr.data_ptr(), blk_idx.data_ptr(), values.data_ptr(), col_sum.data_ptr(),
                        w_scale.data_ptr(), x2.data_ptr(), m, ldx,
                        0 if bias is None else bias.data_ptr(), activation, act_scale is not None,
                        1.0 if act_scale is None else act_scale, act_zero_point, y.data_ptr(), n, num_threads(),
                        *panel_ptrs)
    return _out(x, y, n)


def _ensure_valid_sliced(op: str, slice_ptr, step_base, n: int, k: int, byte_layout: bool) -> None:
    # ensure_valid_structure passes len(slice_ptr) - 1 = number of slices; the C++ check wants N.
    ensure_valid_structure(op, slice_ptr, step_base, k,
                           lambda sp, _slices, sb, nsteps, kk: _C.sparse_validate_sliced(sp, n, sb, nsteps, kk, byte_layout),
                           kind="sliced bytes" if byte_layout else "sliced")


def sparse_int8_linear_sliced_cpu(x, slice_ptr, step_base, step_lane, values, col_sum, w_scale, bias=None,
                                  activation=0, act_scale=None, act_zero_point=0):
    op = "sparse_int8_linear_sliced"
    k, n = _check_sliced(x, slice_ptr, step_base, step_lane, values, col_sum, w_scale, bias, activation, act_scale,
                         act_zero_point)
    _require_contiguous(op, step_lane, values, col_sum, w_scale, bias)
    byte_layout = _is_byte_layout(step_lane, step_base.numel())
    _ensure_valid_sliced(op, slice_ptr, step_base, n, k, byte_layout)
    x2, m, ldx = eager_rows(x, k)
    y = torch.empty((m, n), dtype=torch.float32)
    _C.sparse_sliced_linear(n, k, slice_ptr.data_ptr(), step_base.data_ptr(), step_lane.data_ptr(), byte_layout,
                            values.data_ptr(),
                            col_sum.data_ptr(), w_scale.data_ptr(), x2.data_ptr(), m, ldx,
                            0 if bias is None else bias.data_ptr(), activation, act_scale is not None,
                            1.0 if act_scale is None else act_scale, act_zero_point, y.data_ptr(), n, num_threads())
    return _out(x, y, n)


def sliced_linear_plan(k, slice_ptr, step_base, step_lane, values, col_sum, w_scale, bias=None, activation=0,
                       act_scale=None, act_zero_point=0):
    """A sliced pack (either layout) and its weight-side operands, checked and validated once and
    bound into a native plan: ``plan.run(x_ptr, m, ldx, y_ptr, threads)`` computes what
    ``sparse_int8_linear_sliced_cpu`` does for float32 rows x of K features into a contiguous y [m, N].
    The caller keeps the operands alive and unchanged while it uses the plan (SparseInt8Linear rebuilds
    it whenever one of them changes)."""
    op = "sparse_int8_linear_sliced"
    _, n = _check_sliced(torch.empty(0, k), slice_ptr, step_base, step_lane, values, col_sum, w_scale, bias,
                         activation, act_scale, act_zero_point)
    _require_contiguous(op, step_lane, values, col_sum, w_scale, bias)
    byte_layout = _is_byte_layout(step_lane, step_base.numel())
    _ensure_valid_sliced(op, slice_ptr, step_base, n, k, byte_layout)
    return _C.SlicedLinearPlan(n, k, slice_ptr.data_ptr(), step_base.data_ptr(), step_lane.data_ptr(), byte_layout,
                               values.data_ptr(), col_sum.data_ptr(), w_scale.data_ptr(),
                               0 if bias is None else bias.data_ptr(), activation, act_scale is not None,
                               1.0 if act_scale is None else act_scale, act_zero_point)


@torch.library.register_fake("pycompress::sparse_linear_csr")
def _sparse_linear_csr_fake(x, row_ptr, col_idx, values, bias=None, activation=0):
    _, n = _check_csr(x, row_ptr, col_idx, values, bias, activation)
    return x.new_empty((*x.shape[:-1], n))


@torch.library.register_fake("pycompress::sparse_linear_nm24")
def _sparse_linear_nm24_fake(x, nm_idx, values, bias=None, activation=0):
    _, n = _check_nm24(x, nm_idx, values, bias, activation)
    return x.new_empty((*x.shape[:-1], n))


@torch.library.register_fake("pycompress::sparse_int8_linear")
def _sparse_int8_linear_fake(x, row_ptr, blk_idx, values, col_sum, w_scale, bias=None, activation=0,
                             act_scale=None, act_zero_point=0):
    _, n = _check_int8(x, row_ptr, blk_idx, values, col_sum, w_scale, bias, activation, act_scale, act_zero_point)
    return x.new_empty((*x.shape[:-1], n))


def sparse_int8_linear_cuda(x, row_ptr, blk_idx, values, col_sum, w_scale, bias=None, activation=0,
                            act_scale=None, act_zero_point=0):
    return _sparse_int8_linear_cuda(x, row_ptr, blk_idx, values, col_sum, w_scale, bias, activation, act_scale,
                                    act_zero_point)


def _sparse_int8_linear_cuda(x, row_ptr, blk_idx, values, col_sum, w_scale, bias=None, activation=0,
                             act_scale=None, act_zero_point=0, raw=False):
    """The CUDA kernel (csrc/cuda/q8_sparse_rows__sm61.cu) over the same bsr1x4 pack as the CPU: bit-identical to
    the dense int8 linear of the same weights. The pack's structure is checked on a host copy before the first
    launch and again whenever a tensor of it changes; ``raw``: int32 accumulators instead of y (tests)."""
    op = "sparse_int8_linear"
    k, n = _check_int8(x, row_ptr, blk_idx, values, col_sum, w_scale, bias, activation, act_scale, act_zero_point)
    check_same_device(op, x, row_ptr=row_ptr, blk_idx=blk_idx, values=values, col_sum=col_sum, w_scale=w_scale,
                      bias=bias)
    _require_contiguous(op, row_ptr, blk_idx, values, col_sum, w_scale, bias)
    x2, m, ldx = eager_rows(x, k)
    y = torch.empty((m, n), dtype=torch.int32 if raw else x.dtype, device=x.device)
    def run(cuda, scratch, stream, _):
        order = _validated_row_order(op, row_ptr, blk_idx, k, _C.sparse_validate_bsr1x4)
        cuda.q8_sparse_linear(x2.data_ptr(), CUDA_DTYPES[x.dtype], m, k, ldx, row_ptr.data_ptr(), blk_idx.data_ptr(),
                              values.data_ptr(), col_sum.data_ptr(), w_scale.data_ptr(),
                              0 if bias is None else bias.data_ptr(), n, 0 if raw else y.data_ptr(), n, activation,
                              act_scale is not None, 1.0 if act_scale is None else act_scale, act_zero_point, 255,
                              scratch.data_ptr(), scratch.numel(), y.data_ptr() if raw else 0, stream,
                              order.data_ptr())

    if m > 0:
        _cuda.launch(op, x, run, scratch_for=(m, n, k))
    return _out(x, y, n)


def row_order(row_ptr: torch.Tensor) -> torch.Tensor:
    """The output channels in the order the CUDA sparse kernels' warps take them: nonzero (block) counts
    decreasing, ties in channel order (Sputnik's row swizzle: the 8 warps of a block get near-equal work and the
    longest channels start first). int32, on row_ptr's device; row_ptr must be validated."""
    counts = row_ptr[1:] - row_ptr[:-1]
    return torch.argsort(counts, descending=True, stable=True).to(torch.int32)


def _validated_row_order(op: str, row_ptr, idx, k: int, validate) -> torch.Tensor:
    """The C++ structural check of a CUDA pack, on a host copy, and the kernel's row order (on the device) from
    the validated row_ptr; both once per tensor version (as ensure_valid_structure does for CPU packs)."""
    stamp = _stamp(row_ptr, idx, k, "cuda")
    cached = getattr(row_ptr, "_pycompress_cuda_order", None)
    if cached is not None and cached[0] == stamp:
        return cached[1]
    host_row_ptr = row_ptr.cpu()
    ensure_valid_structure(op, host_row_ptr, idx.cpu(), k, validate)
    order = row_order(host_row_ptr).to(row_ptr.device)
    if not (row_ptr.is_inference() or idx.is_inference()):
        row_ptr._pycompress_cuda_order = (stamp, order)
    return order


def sparse_linear_csr_cuda(x, row_ptr, col_idx, values, bias=None, activation=0):
    """The CUDA kernel (csrc/cuda/sparse_f32_rows__sm61.cu) over the same csr pack as the CPU; float32 sums in
    the kernel's order (not bit-identical to the CPU kernels, which sum in theirs)."""
    op = "sparse_linear_csr"
    k, n = _check_csr(x, row_ptr, col_idx, values, bias, activation)
    check_same_device(op, x, row_ptr=row_ptr, col_idx=col_idx, values=values, bias=bias)
    _require_contiguous(op, row_ptr, col_idx, values, bias)
    x2, m, ldx = eager_rows(x, k)
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    def run(cuda, _, stream, __):
        order = _validated_row_order(op, row_ptr, col_idx, k, _C.sparse_validate_csr)
        cuda.f32_sparse_linear(x2.data_ptr(), CUDA_DTYPES[x.dtype], m, k, ldx, row_ptr.data_ptr(), col_idx.data_ptr(),
                               values.data_ptr(), 0 if bias is None else bias.data_ptr(), n, y.data_ptr(), n,
                               activation, stream, order.data_ptr())

    if m > 0:
        _cuda.launch(op, x, run)
    return _out(x, y, n)


def sparse_linear_nm24_cuda(x, nm_idx, values, bias=None, activation=0):
    """The CUDA kernel (csrc/cuda/sparse_f32_rows__sm61.cu) over the same nm24 pack as the CPU (every index it
    decodes is below K, so the shapes are the whole check); float32 sums in the kernel's order."""
    op = "sparse_linear_nm24"
    k, n = _check_nm24(x, nm_idx, values, bias, activation)
    check_same_device(op, x, nm_idx=nm_idx, values=values, bias=bias)
    _require_contiguous(op, nm_idx, values, bias)
    x2, m, ldx = eager_rows(x, k)
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    def run(cuda, _, stream, __):
        cuda.f32_nm24_linear(x2.data_ptr(), CUDA_DTYPES[x.dtype], m, k, ldx, nm_idx.data_ptr(), nm_idx.shape[1],
                             values.data_ptr(), 0 if bias is None else bias.data_ptr(), n, y.data_ptr(), n,
                             activation, stream)

    if m > 0:
        _cuda.launch(op, x, run)
    return _out(x, y, n)


LIB.impl("sparse_linear_csr", sparse_linear_csr_cpu, "CPU")
LIB.impl("sparse_linear_nm24", sparse_linear_nm24_cpu, "CPU")
LIB.impl("sparse_int8_linear", sparse_int8_linear_cpu, "CPU")
LIB.impl("sparse_int8_linear_sliced", sparse_int8_linear_sliced_cpu, "CPU")
LIB.impl("sparse_int8_linear", sparse_int8_linear_cuda, "CUDA")
LIB.impl("sparse_linear_csr", sparse_linear_csr_cuda, "CUDA")
LIB.impl("sparse_linear_nm24", sparse_linear_nm24_cuda, "CUDA")


def sparse_linear_csr(x, row_ptr, col_idx, values, bias=None, activation=0):
    return torch.ops.pycompress.sparse_linear_csr(x, row_ptr, col_idx, values, bias, activation)


def sparse_linear_nm24(x, nm_idx, values, bias=None, activation=0):
    return torch.ops.pycompress.sparse_linear_nm24(x, nm_idx, values, bias, activation)


def sparse_int8_linear(x, row_ptr, blk_idx, values, col_sum, w_scale, bias=None, activation=0, act_scale=None,
                       act_zero_point=0):
    return torch.ops.pycompress.sparse_int8_linear(x, row_ptr, blk_idx, values, col_sum, w_scale, bias, activation,
                                                   act_scale, act_zero_point)


@torch.library.register_fake("pycompress::sparse_int8_linear_sliced")
def _sparse_int8_linear_sliced_fake(x, slice_ptr, step_base, step_lane, values, col_sum, w_scale, bias=None,
                                    activation=0, act_scale=None, act_zero_point=0):
    _, n = _check_sliced(x, slice_ptr, step_base, step_lane, values, col_sum, w_scale, bias, activation, act_scale,
                         act_zero_point)
    return x.new_empty((*x.shape[:-1], n))


def sparse_int8_linear_sliced(x, slice_ptr, step_base, step_lane, values, col_sum, w_scale, bias=None, activation=0,
                              act_scale=None, act_zero_point=0):
    return torch.ops.pycompress.sparse_int8_linear_sliced(x, slice_ptr, step_base, step_lane, values, col_sum, w_scale,
                                                          bias, activation, act_scale, act_zero_point)


def sparse_sliced_accumulate_raw(q: torch.Tensor, slice_ptr, step_base, step_lane, values, n: int,
                                 k: int) -> torch.Tensor:
    """Test hook: raw int32 accumulators of quantized rows q uint8 [M, round_up(K, 4)] against a sliced pack."""
    op = "sparse_sliced_accumulate_raw"
    kp = round_up(k, 4)
    if q.dtype != torch.uint8 or q.dim() != 2 or q.shape[1] != kp:
        raise ValueError(f"{op}: q must be uint8 [M, {kp}], got {q.dtype} {tuple(q.shape)}")
    if values.dtype != torch.int8 or tuple(values.shape) != (step_base.numel(), 4 * SLICE_LANES):
        raise ValueError(f"{op}: values must be int8 [steps, {4 * SLICE_LANES}]")
    byte_layout = _is_byte_layout(step_lane, step_base.numel())
    if not byte_layout and (step_lane.dtype != torch.uint32 or tuple(step_lane.shape) != (step_base.numel(), 2)):
        raise ValueError(f"{op}: step_lane must be uint32 [steps, 2] or uint8 [steps, {4 * SLICE_LANES}]")
    _ensure_valid_sliced(op, slice_ptr, step_base, n, k, byte_layout)
    # Rows zero padded to the window reach (sparse.h: sliced_row_bytes).
    padded = torch.zeros((q.shape[0], max(kp, 4 * SLICE_LANES)), dtype=torch.uint8)
    padded[:, :kp] = q
    out = torch.empty((q.shape[0], n), dtype=torch.int32)
    _C.sparse_sliced_accumulate_raw(n, k, slice_ptr.data_ptr(), step_base.data_ptr(), step_lane.contiguous().data_ptr(),
                                    byte_layout, values.contiguous().data_ptr(), padded.data_ptr(), q.shape[0], out.data_ptr(),
                                    num_threads())
    return out


def sparse_q8_accumulate_raw(q: torch.Tensor, row_ptr, blk_idx, values, k: int, panels=None) -> torch.Tensor:
    """Test hook: raw int32 accumulators of quantized rows q uint8 [M, round_up(K, 4)] on the active ISA (with the
    bsr1x4 panel layout ``panels`` when given)."""
    n = row_ptr.numel() - 1
    ensure_valid_structure("sparse_q8_accumulate_raw", row_ptr, blk_idx, k, _C.sparse_validate_bsr1x4)
    panel_ptrs = _bsr1x4_panel_ptrs("sparse_q8_accumulate_raw", panels, n, k)
    kp = round_up(k, 4)
    if q.dtype != torch.uint8 or q.dim() != 2 or q.shape[1] != kp or not q.is_contiguous():
        raise ValueError(f"sparse_q8_accumulate_raw: q must be contiguous uint8 [M, {kp}], got {q.dtype} "
                         f"{tuple(q.shape)}")
    if values.numel() != 4 * blk_idx.numel():
        raise ValueError("sparse_q8_accumulate_raw: values must hold 4 bytes per block")
    out = torch.empty((q.shape[0], n), dtype=torch.int32)
    _C.sparse_q8_accumulate_raw(n, k, row_ptr.data_ptr(), blk_idx.data_ptr(), values.data_ptr(), q.data_ptr(),
                                q.shape[0], out.data_ptr(), num_threads(), *panel_ptrs)
    return out
