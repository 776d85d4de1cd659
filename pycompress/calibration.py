"""Calibration for the one-shot methods (GPTQ, SparseGPT, Wanda): batches, layer inputs, Hessians.

One home for what ``pycompress.quantize(method="gptq")`` and ``pycompress.prune(criterion=...)`` share:

- ``run_batch`` / ``materialize_batches``: a batch is a tensor (``model(x)``), a tuple or list
  (``model(*batch)``) or a dict (``model(**batch)``, e.g. a tokenizer's output).
- ``layer_input_rows``: a Linear's or Conv2d's input as the GEMM's rows ``X [rows, K]``: a Linear's
  vectors along the last dim; a Conv2d's im2col patches (``F.unfold``), K in PyTorch's weight order
  ``(in, kh, kw)`` (``order="torch"``) or the kernels' im2col order ``(kh, kw, in)`` (``order="gemm"``).
- ``InputStats``: ``X^T X`` summed in float64 over every calibration row (or only its diagonal,
  the squared column norms ``||x_j||^2`` that Wanda needs), and the row count ``n``. The layer-wise
  objective ``||X W^T - X Q^T||^2`` has Hessian ``H = 2 X^T X / n`` (``hessian()``).
- ``sequential_walk``: the layers in forward order, one group at a time (layers that read the same
  input tensor, e.g. query/key/value, form one group); the group's inputs are captured with forward
  pre-hooks while the calibration batches run through the model as it is *now*, so earlier layers are
  already quantized or pruned when a later layer is calibrated (the sequential scheme of GPTQ and
  SparseGPT). The captured input is the layer's float input, before its own activation fake
  quantization (the kernels' per-row rounding of X is not part of the layer-wise objective). A pass
  stops early, once the group's last layer has its input, when every layer runs once per forward.
- ``inverse_hessian_factor``: the dead-input handling, dampening and Cholesky factor of ``H^-1`` that
  the OBS updates of GPTQ and SparseGPT use.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

_F64 = torch.float64


def run_batch(model: nn.Module, batch: object) -> object:
    """``model(**batch)`` for a dict, ``model(*batch)`` for a tuple or list, else ``model(batch)``."""
    if isinstance(batch, dict):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    return model(batch)


def materialize_batches(batches: Iterable | None, what: str) -> list | None:
    """The calibration batches as a list (None stays None); one bare tensor or an empty iterable is refused."""
    if batches is None:
        return None
    if isinstance(batches, torch.Tensor):
        raise TypeError(f"{what}: calibration_batches must be an iterable of batches (e.g. a list of "
                        "tensors or a DataLoader), not one tensor; wrap it: [x]")
    if isinstance(batches, dict):
        raise TypeError(f"{what}: calibration_batches must be an iterable of batches, not one dict; wrap it: "
                        "[batch]")
    out = list(batches)
    if not out:
        raise ValueError(f"{what}: calibration_batches is empty; pass at least one batch of sample inputs")
    return out


def check_oneshot_layer(module: nn.Module, name: str, what: str) -> None:
    """The one-shot methods handle nn.Linear and dense (groups=1) zero-padded nn.Conv2d."""
    if isinstance(module, nn.Linear):
        return
    if isinstance(module, nn.Conv2d):
        if module.groups != 1:
            raise ValueError(f"{what}({name}): a grouped/depthwise Conv2d (groups={module.groups}) has one small "
                             "Hessian per group, which the one-shot methods do not handle; exclude it "
                             f"(exclude=[{name!r}])")
        if module.padding_mode != "zeros":
            raise ValueError(f"{what}({name}): Conv2d padding_mode={module.padding_mode!r}: only zero padding "
                             f"is supported by the one-shot methods; exclude it (exclude=[{name!r}])")
        return
    raise ValueError(f"{what}({name}): {type(module).__name__} is not supported by the one-shot methods "
                     "(nn.Linear and nn.Conv2d are)")


def layer_input_rows(module: nn.Module, x: torch.Tensor, order: str = "torch") -> torch.Tensor:
    """The GEMM rows ``[rows, K]`` of a Linear's or Conv2d's input ``x`` (see the module docstring)."""
    if isinstance(module, nn.Linear):
        return x.reshape(-1, x.shape[-1])
    kh, kw = module.kernel_size
    padding = module.padding
    if isinstance(padding, str):  # "same" / "valid" with stride 1: what F.conv2d pads
        if padding == "valid":
            padding = (0, 0)
        else:
            total = [d * (k - 1) for d, k in zip(module.dilation, module.kernel_size)]
            x = F.pad(x, (total[1] // 2, total[1] - total[1] // 2, total[0] // 2, total[0] - total[0] // 2))
            padding = (0, 0)
    cols = F.unfold(x, (kh, kw), dilation=module.dilation, padding=padding, stride=module.stride)  # [B, C*kh*kw, L]
    b, _, positions = cols.shape
    if order == "gemm":
        cols = cols.reshape(b, module.in_channels, kh * kw, positions).transpose(1, 2)
    return cols.reshape(b, -1, positions).transpose(1, 2).reshape(-1, module.in_channels * kh * kw)


class InputStats:
    """Sum over calibration rows of ``x^T x`` (float64, ``full``) or of ``x_j^2`` (diagonal only), and n."""

    def __init__(self, k: int, full: bool) -> None:
        self.k = k
        self.full = full
        self.rows = 0
        self.xtx = torch.zeros(k, k, dtype=_F64) if full else None
        self.sq = torch.zeros(k, dtype=_F64)

    def add(self, rows: torch.Tensor) -> None:
        r = rows.detach().to(device="cpu", dtype=_F64)
        if r.shape[-1] != self.k:
            raise ValueError(f"InputStats: rows have {r.shape[-1]} features, expected {self.k}")
        self.rows += r.shape[0]
        if self.full:
            self.xtx.addmm_(r.t(), r)
        else:
            self.sq.add_((r * r).sum(dim=0))

    def hessian(self) -> torch.Tensor:
        """``H = 2 X^T X / n``, float64 [K, K]."""
        return self.xtx * (2.0 / self.rows)

    def column_norms(self) -> torch.Tensor:
        """``||x_j||_2`` over all calibration rows, float64 [K]."""
        sq = torch.diagonal(self.xtx).clone() if self.full else self.sq
        return torch.sqrt(sq)

    def check_rank(self, name: str, what: str) -> None:
        """Refuse a calibration set with fewer rows than live input features.

        ``X^T X`` has rank at most ``n`` (the rows): with ``n < K_live`` (inputs that are not always 0)
        at least ``K_live - n`` directions of the layer's input space were never seen, and only the
        dampening term would decide how the weights move along them: the one-shot update would fit the
        calibration rows and generalize poorly. This is the rank deficit dampening does not fix."""
        live = int((torch.diagonal(self.xtx) > 0).sum()) if self.full else int((self.sq > 0).sum())
        if self.rows < live:
            raise ValueError(f"{what}({name}): the calibration batches gave {self.rows} input rows for {live} live "
                             f"input features, so the Hessian X^T X has rank <= {self.rows}, a rank deficit of at "
                             f"least {live - self.rows}; pass more calibration data (at least {live} rows, i.e. "
                             "tokens or conv positions, must reach this layer)")


class _StopForward(Exception):
    """Raised by a capture hook once a group's inputs are all captured, to end the pass early."""


def _forward_order(model: nn.Module, layers: list[tuple[str, nn.Module]], batches: list
                   ) -> tuple[list[list[str]], bool]:
    """Groups of layer names in first-call order (consecutive layers reading the same input tensor share
    a group) and whether every layer runs exactly once per batch (then a pass may stop early)."""
    names = {id(m): n for n, m in layers}
    order: list[str] = []
    inputs: dict[str, int] = {}
    calls: dict[str, int] = {}
    once = True
    hooks = []

    def hook(module, args):
        name = names[id(module)]
        calls[name] = calls.get(name, 0) + 1
        if name not in inputs:
            order.append(name)
            inputs[name] = id(args[0]) if args else -1
        return None

    for _, m in layers:
        hooks.append(m.register_forward_pre_hook(hook, prepend=True))  # before fake quant: the raw input
    try:
        with torch.no_grad():
            for batch in batches:
                calls.clear()
                run_batch(model, batch)
                if any(c != 1 for c in calls.values()) or len(calls) != len(order):
                    once = False
    finally:
        for h in hooks:
            h.remove()
    groups: list[list[str]] = []
    for name in order:
        if groups and inputs[name] == inputs[groups[-1][-1]] and inputs[name] != -1:
            groups[-1].append(name)
        else:
            groups.append([name])
    return groups, once


def sequential_walk(model: nn.Module, layers: list[tuple[str, nn.Module]], batches: list, full: bool,
                    order: str, process: Callable[[str, nn.Module, InputStats], None], what: str,
                    progress: Callable[[Iterable], Iterable] | None = None) -> None:
    """Calls ``process(name, module, stats)`` for every layer in forward order, its ``InputStats`` gathered
    with the layers before it already processed (see the module docstring). A layer that no calibration
    batch reaches is an error naming it."""
    modules = dict(layers)
    was_training = model.training
    model.eval()
    try:
        groups, once = _forward_order(model, layers, batches)
        missing = [n for n, _ in layers if not any(n in g for g in groups)]
        if missing:
            raise ValueError(f"{what}({missing[0]}): the calibration batches never reached this layer; "
                             "exclude it or pass batches that run it")
        for group in (progress(groups) if progress is not None else groups):
            stats: dict[str, InputStats] = {}
            last = group[-1]

            def capture(module, args, _names={id(modules[n]): n for n in group}):
                name = _names[id(module)]
                rows = layer_input_rows(module, args[0].detach(), order)
                if name not in stats:
                    stats[name] = InputStats(rows.shape[1], full)
                stats[name].add(rows)
                if once and name == last:
                    raise _StopForward
                return None

            hooks = [modules[n].register_forward_pre_hook(capture, prepend=True) for n in group]
            try:
                with torch.no_grad():
                    for batch in batches:
                        try:
                            run_batch(model, batch)
                        except _StopForward:
                            pass
            finally:
                for h in hooks:
                    h.remove()
            for name in group:
                if name not in stats or stats[name].rows == 0:
                    raise ValueError(f"{what}({name}): the calibration batches gave this layer no input rows")
                process(name, modules[name], stats[name])
    finally:
        model.train(was_training)


def inverse_hessian_factor(h: torch.Tensor, w: torch.Tensor, percdamp: float, name: str, what: str
                           ) -> torch.Tensor:
    """The upper Cholesky factor ``U`` of ``(H + lambda I)^-1`` (``U^T U = (H + lambda I)^-1``), float64.

    As the reference implementations of GPTQ and SparseGPT: a dead input (``H_jj = 0``: always 0 on the
    calibration set) gets ``H_jj = 1`` and its weights ``w[:, j]`` set to 0 in place (they multiply an
    input never seen); ``lambda = percdamp * mean(diag(H))``. Row ``i`` of ``U`` holds the OBS update
    of the columns after ``i`` when column ``i`` is fixed, and ``U_ii^2`` its ``[H^-1]_ii`` given the
    earlier columns fixed."""
    h = h.clone()
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0
    damp = percdamp * float(torch.diagonal(h).mean())
    h.diagonal().add_(damp)
    chol, info = torch.linalg.cholesky_ex(h)
    if int(info) != 0:
        raise ValueError(f"{what}({name}): the dampened Hessian (percdamp={percdamp}) is not positive definite "
                         f"(Cholesky failed at column {int(info) - 1}); the calibration inputs hold non-finite "
                         "values or are degenerate: raise percdamp or check the calibration data")
    hinv = torch.cholesky_inverse(chol)
    u, info = torch.linalg.cholesky_ex(hinv, upper=True)
    if int(info) != 0:
        raise ValueError(f"{what}({name}): the inverse Hessian lost positive definiteness in float64 (column "
                         f"{int(info) - 1}); raise percdamp (now {percdamp})")
    return u
