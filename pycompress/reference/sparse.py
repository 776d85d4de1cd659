"""Sparse formats in pure PyTorch: pack / unpack (the layouts of csrc/sparse/sparse.h)
and the references the sparse kernels are tested against.

- fp32 formats (csr, nm24): the reference is the dense float64 product of the
  unpacked weights, an accuracy target with a derived tolerance
  (:func:`fp32_error_bound`), since summation order differs between ISA paths.
- int8 format (bsr1x4): the numbers contract is exactly the dense int8 GEMM's, so
  the bit-exact reference is :func:`pycompress.reference.q8.int8_linear_ref` on
  the unpacked int8 weights, and :func:`q8_accumulate_ref` for raw accumulators.
"""

from __future__ import annotations

import torch

from pycompress.reference.q8 import gelu_exact

MAX_K = 65536  # uint16 column indices
BLOCK_K = 4  # bsr1x4: one output channel x 4 consecutive k (a VNNI 32-bit operand)
NM_GROUP = 4  # nm24: 2 nonzeros in every group of 4 consecutive k
NM_KEEP = 2
NM_PER_WORD = 16  # 2-bit indices per uint32 word

FORMATS_FP32 = ("csr", "nm24")
FORMATS_INT8 = ("bsr1x4",)


def _check_k(k: int, what: str) -> None:
    if not 1 <= k <= MAX_K:
        raise ValueError(f"{what}: K={k} input features is outside [1, {MAX_K}]; uint16 column indices cover at "
                         f"most {MAX_K} (split the layer along K)")


def _check_weight(weight: torch.Tensor, what: str) -> None:
    if weight.dim() != 2:
        raise ValueError(f"{what}: expected a 2-D weight [N, K], got shape {tuple(weight.shape)}")
    if weight.shape[0] < 1:
        raise ValueError(f"{what}: weight has no output channels")
    if weight.is_floating_point() and not torch.isfinite(weight).all():
        raise ValueError(f"{what}: weight holds NaN or Inf; a sparse pack stores only finite weights")
    _check_k(weight.shape[1], what)


def pack_csr(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """fp32 [N, K] -> (row_ptr int32 [N+1], col_idx uint16 [nnz], values float32 [nnz]).

    The nonzeros of ``weight`` are the mask: an exact 0.0 (or -0.0) is dropped.
    """
    _check_weight(weight, "pack_csr")
    w = weight.detach().to(torch.float32).cpu()
    mask = w != 0
    counts = mask.sum(dim=1)
    if int(counts.sum()) >= 2**31:
        raise ValueError(f"pack_csr: {int(counts.sum())} nonzeros exceed the int32 row pointers")
    row_ptr = torch.zeros(w.shape[0] + 1, dtype=torch.int32)
    row_ptr[1:] = torch.cumsum(counts, 0).to(torch.int32)
    rows, cols = mask.nonzero(as_tuple=True)  # row-major order, columns ascending
    return row_ptr, cols.to(torch.uint16), w[rows, cols].contiguous()


def unpack_csr(row_ptr: torch.Tensor, col_idx: torch.Tensor, values: torch.Tensor, k: int) -> torch.Tensor:
    n = row_ptr.numel() - 1
    counts = (row_ptr[1:].to(torch.int64) - row_ptr[:-1].to(torch.int64))
    rows = torch.repeat_interleave(torch.arange(n), counts)
    dense = torch.zeros(n, k, dtype=values.dtype)
    dense.index_put_((rows, col_idx.to(torch.int64)), values, accumulate=True)
    return dense


def is_nm24(weight: torch.Tensor) -> bool:
    """True when K % 4 == 0 and every group of 4 consecutive k holds at most 2 nonzeros."""
    n, k = weight.shape
    if k % NM_GROUP:
        return False
    return bool(((weight != 0).view(n, k // NM_GROUP, NM_GROUP).sum(dim=2) <= NM_KEEP).all())


def pack_nm24(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 [N, K] with <= 2 nonzeros per group of 4 -> (values float32 [N, K/2], nm_idx uint32 [N, ceil(K/32)]).

    Stored value j of row n sits at k = 4*(j//2) + ((nm_idx[n, j//16] >> 2*(j%16)) & 3). A group with fewer
    than 2 nonzeros stores zeros at the lowest free positions, so the indices of a group are distinct and
    ascending.
    """
    _check_weight(weight, "pack_nm24")
    w = weight.detach().to(torch.float32).cpu()
    n, k = w.shape
    if k % NM_GROUP:
        raise ValueError(f"pack_nm24: K={k} must be a multiple of {NM_GROUP} for 2:4 sparsity")
    groups = w.view(n, k // NM_GROUP, NM_GROUP)
    nonzero = groups != 0
    per_group = nonzero.sum(dim=2)
    if (per_group > NM_KEEP).any():
        bad = int((per_group > NM_KEEP).nonzero()[0, 0])
        raise ValueError(f"pack_nm24: weight is not 2:4 sparse (row {bad} has a group of 4 with more than 2 "
                         "nonzeros); prune it with method='nm' first or use format='csr'")
    # Rank positions: nonzeros first (in k order), then zeros; keep the first two, ascending.
    position = torch.arange(NM_GROUP).expand_as(nonzero)
    key = torch.where(nonzero, position, position + NM_GROUP)
    keep = key.argsort(dim=2)[..., :NM_KEEP].sort(dim=2).values  # [N, K/4, 2]
    values = groups.gather(2, keep).reshape(n, k // 2).contiguous()
    idx = keep.reshape(n, k // 2).to(torch.int64)
    words = (k // 2 + NM_PER_WORD - 1) // NM_PER_WORD
    padded = torch.zeros(n, words * NM_PER_WORD, dtype=torch.int64)
    padded[:, : k // 2] = idx
    shifts = 2 * torch.arange(NM_PER_WORD, dtype=torch.int64)
    packed = (padded.view(n, words, NM_PER_WORD) << shifts).sum(dim=2)
    return values, packed.to(torch.uint32)


def nm24_columns(nm_idx: torch.Tensor, k: int) -> torch.Tensor:
    """Column index of every stored nm24 value: int64 [N, K/2]."""
    n, words = nm_idx.shape
    shifts = 2 * torch.arange(NM_PER_WORD, dtype=torch.int64)
    bits = (nm_idx.to(torch.int64)[:, :, None] >> shifts) & 3
    j = torch.arange(k // 2, dtype=torch.int64)
    return 4 * (j // 2) + bits.reshape(n, words * NM_PER_WORD)[:, : k // 2]


def unpack_nm24(values: torch.Tensor, nm_idx: torch.Tensor, k: int) -> torch.Tensor:
    n = values.shape[0]
    dense = torch.zeros(n, k, dtype=values.dtype)
    dense.scatter_add_(1, nm24_columns(nm_idx, k), values)
    return dense


def pack_bsr1x4(q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """int8 [N, K] -> (row_ptr int32 [N+1], blk_idx uint16 [nb], values int8 [nb * 4], col_sum int32 [N]).

    A block (output channel n, k in [4g, 4g+4)) is stored when any of its 4 weights is nonzero; K is
    padded with zeros to a multiple of 4. blk_idx holds g.
    """
    if q.dtype != torch.int8:
        raise ValueError(f"pack_bsr1x4: expected int8 weights, got {q.dtype}")
    _check_weight(q, "pack_bsr1x4")
    n, k = q.shape
    kp = (k + BLOCK_K - 1) // BLOCK_K * BLOCK_K
    padded = torch.zeros(n, kp, dtype=torch.int8)
    padded[:, :k] = q.cpu()
    blocks = padded.view(n, kp // BLOCK_K, BLOCK_K)
    present = (blocks != 0).any(dim=2)
    row_ptr = torch.zeros(n + 1, dtype=torch.int32)
    row_ptr[1:] = torch.cumsum(present.sum(dim=1), 0).to(torch.int32)
    rows, groups = present.nonzero(as_tuple=True)
    values = blocks[rows, groups].reshape(-1).contiguous()
    col_sum = padded.sum(dim=1, dtype=torch.int32)
    return row_ptr, groups.to(torch.uint16), values, col_sum


def unpack_bsr1x4(row_ptr: torch.Tensor, blk_idx: torch.Tensor, values: torch.Tensor, k: int) -> torch.Tensor:
    n = row_ptr.numel() - 1
    kp = (k + BLOCK_K - 1) // BLOCK_K * BLOCK_K
    counts = row_ptr[1:].to(torch.int64) - row_ptr[:-1].to(torch.int64)
    rows = torch.repeat_interleave(torch.arange(n), counts)
    dense = torch.zeros(n, kp // BLOCK_K, BLOCK_K, dtype=torch.int8)
    dense[rows, blk_idx.to(torch.int64)] = values.view(-1, BLOCK_K)
    return dense.view(n, kp)[:, :k].contiguous()


def sparse_linear_ref(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, activation: str = "none"
) -> torch.Tensor:
    """Dense float64 reference of the fp32 sparse linear (weight: the unpacked dense matrix)."""
    y = x.to(torch.float64) @ weight.to(torch.float64).t()
    if bias is not None:
        y = y + bias.to(torch.float64)
    if activation == "relu":
        return torch.relu(y)
    if activation == "gelu":
        return gelu_exact(y)
    if activation != "none":
        raise ValueError(f"unknown activation {activation!r}")
    return y


def fp32_error_bound(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                     activation: str = "none") -> torch.Tensor:
    """Worst-case |kernel - float64 reference| for a float32 sum of nonzero products in any order.

    A sum of n float32 products (fused or not) is within gamma_{n+1} * sum|x_k w_k| of the exact value
    (Higham, Accuracy and Stability of Numerical Algorithms, 3.1), gamma_m = m u / (1 - m u), u = 2^-24; the
    bias add adds one more rounding of |y|. ReLU is 1-Lipschitz; the kernels' GELU is ~1.13-Lipschitz plus
    its own approximation error (< 2e-7 relative, 1e-7 absolute, see csrc/common/epilogue_math.h).
    """
    u = 2.0**-24
    x64, w64 = x.to(torch.float64), weight.to(torch.float64)
    nnz_row = (weight != 0).sum(dim=1).to(torch.float64)
    m = nnz_row + 2
    gamma = m * u / (1 - m * u)
    magnitude = x64.abs() @ w64.abs().t()
    if bias is not None:
        magnitude = magnitude + bias.to(torch.float64).abs()
    bound = gamma * magnitude + u * magnitude
    if activation == "gelu":
        y = sparse_linear_ref(x, weight, bias)
        bound = 1.13 * bound + 4e-7 * y.abs() + 1e-7
    return bound


def csr_panels_ref(row_ptr: torch.Tensor, col_idx: torch.Tensor, values: torch.Tensor, k: int, panel_rows: int,
                   panel_cols: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The csr panel layout of csrc/sparse/sparse.h, written out plainly (the specification of
    build_csr_panels): (sub int32, idx uint16, values float32). Loops in Python: for test-sized packs."""
    n = row_ptr.numel() - 1
    panels = (k + panel_cols - 1) // panel_cols
    rp, cols, vals = row_ptr.tolist(), col_idx.to(torch.int64).tolist(), values.tolist()
    sub, idx, out = [], [], []
    for n0 in range(0, n, panel_rows):
        for o in range(panels):
            for row in range(n0, min(n, n0 + panel_rows)):
                sub.append(len(idx))
                lo = o * panel_cols
                for j in range(rp[row], rp[row + 1]):  # csr order within a segment
                    if lo <= cols[j] < lo + panel_cols:
                        idx.append(cols[j])
                        out.append(vals[j])
                while (len(idx) - sub[-1]) % 4:  # zero pads to a multiple of 4; index K reads a zero row
                    idx.append(k)
                    out.append(0)
    sub.append(len(idx))
    return (torch.tensor(sub, dtype=torch.int32), torch.tensor(idx, dtype=torch.int64).to(torch.uint16),
            torch.tensor(out, dtype=values.dtype))


def bsr1x4_panels_ref(row_ptr: torch.Tensor, blk_idx: torch.Tensor, values: torch.Tensor, k: int, panel_rows: int,
                      panel_cols: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The bsr1x4 panel layout of csrc/sparse/sparse.h (the specification of build_bsr1x4_panels): the csr
    panel layout over the ceil(K/4) block columns, each entry one 1x4 int8 block, a pad four zero bytes and the
    index ceil(K/4). Returns (sub int32, idx uint16, values int8 [entries * 4])."""
    blocks = values.reshape(-1, 4).view(torch.int32).reshape(-1)  # a block's 4 bytes travel as one 32-bit word
    sub, idx, words = csr_panels_ref(row_ptr, blk_idx, blocks, (k + 3) // 4, panel_rows, panel_cols)
    return sub, idx, words.view(torch.int8).reshape(-1)
