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
- Block by block: where the layers sit in the blocks of an nn.ModuleList / nn.Sequential that the model
  runs one after the other (a transformers model's ``layers`` / ``h``, an nn.Sequential model), block 0's
  inputs are captured once and each block is replayed on its own: peak memory is one block's inputs for
  every batch plus one batch's activations in one block, and each block runs (its groups + 1) times per
  batch instead of a pass over the whole prefix per group (see ``sequential_walk``).
- Across processes (pycompress.distributed): each rank its shard of the batches; the statistics are summed
  over the ranks, each layer solved on one rank and its result broadcast, so every rank ends identical.
- ``inverse_hessian_factor``: the dead-input handling, dampening and Cholesky factor of ``H^-1`` that
  the OBS updates of GPTQ and SparseGPT use.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from pycompress.distributed import Comm, DistributedCalibrationError, model_fingerprint, resolve_process_group

_F64 = torch.float64


def run_batch(model: nn.Module, batch: object, what: str | None = None) -> object:
    """``model(**batch)`` for a mapping (a tokenizer's output), ``model(*batch)`` for a tuple or list, else
    ``model(batch)``. ``what`` (the step and the input, e.g. "quantize: calibration batch 3"): an exception the
    model raises gets a note naming it and the batch's shapes, so a model's own error (``mat1 and mat2 shapes
    cannot be multiplied``) says which input of which step caused it."""
    try:
        if isinstance(batch, Mapping):
            return model(**batch)
        if isinstance(batch, (tuple, list)):
            return model(*batch)
        return model(batch)
    except Exception as err:
        if what is not None and hasattr(err, "add_note"):  # Python 3.11+
            err.add_note(f"pycompress: raised by the model on {what}: {describe_batch(batch)}")
        raise


def describe_batch(batch: object) -> str:
    """A batch's structure and shapes, for messages: "a tensor (4, 30)", "a dict {input_ids: (2, 7), ...}"."""
    def one(v: object) -> str:
        return f"{tuple(v.shape)} {str(v.dtype).removeprefix('torch.')}" if isinstance(v, torch.Tensor) else type(v).__name__
    if isinstance(batch, Mapping):
        return "a dict {" + ", ".join(f"{k}: {one(v)}" for k, v in batch.items()) + "}"
    if isinstance(batch, (tuple, list)):
        return f"a {type(batch).__name__} (" + ", ".join(one(v) for v in batch) + ")"
    return f"a {one(batch)}" if not isinstance(batch, torch.Tensor) else f"a tensor {one(batch)}"


def materialize_batches(batches: Iterable | None, what: str, allow_empty: bool = False) -> list | None:
    """The calibration batches as a list (None stays None); one bare tensor or an empty iterable is refused
    (empty is allowed with ``allow_empty``: a rank's shard in distributed calibration)."""
    if batches is None:
        return None
    if isinstance(batches, torch.Tensor):
        raise TypeError(f"{what}: calibration_batches must be an iterable of batches (e.g. a list of "
                        "tensors or a DataLoader), not one tensor; wrap it: [x]")
    if isinstance(batches, dict):
        raise TypeError(f"{what}: calibration_batches must be an iterable of batches, not one dict; wrap it: "
                        "[batch]")
    out = list(batches)
    if not out and not allow_empty:
        raise ValueError(f"{what}: calibration_batches is empty; pass at least one batch of sample inputs")
    return out


def start_calibration(model: nn.Module, calibration_batches, calibrates: bool, process_group, dist_timeout,
                      arguments: dict, what: str) -> tuple[list | None, Comm]:
    """The calibration batches as a list and the Comm of the call (pycompress.distributed): a calibrating
    call under a process group of several ranks first checks, on every rank, that the ranks agree on the
    model and ``arguments`` (and that some rank has batches; a rank's own shard may be empty)."""
    comm = resolve_process_group(process_group, dist_timeout, what)
    if not (comm.active and calibrates):
        return materialize_batches(calibration_batches, what), Comm(None, what=what)
    batches, error = None, None
    try:
        batches = materialize_batches(calibration_batches, what, allow_empty=True)
    except Exception as err:  # told to every rank by comm.start
        error = err
    total = comm.start(model_fingerprint(model, arguments), error, len(batches or ()))
    if total == 0:
        raise ValueError(f"{what}: calibration_batches is empty on every rank of the process group; pass at least "
                         "one batch of sample inputs")
    return batches, comm


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
    cols, _ = conv_im2col(module, x)  # [B, C*kh*kw, L]
    b, _, positions = cols.shape
    if order == "gemm":
        cols = cols.reshape(b, module.in_channels, kh * kw, positions).transpose(1, 2)
    return cols.reshape(b, -1, positions).transpose(1, 2).reshape(-1, module.in_channels * kh * kw)


def conv_im2col(module: nn.Conv2d, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
    """A Conv2d's input as ``F.unfold``'s columns ``[B, C*kh*kw, L]`` (K in the weight's ``(in, kh, kw)``
    order) with the padding the conv applies ("same" / "valid", a padding_mode other than zeros), and the
    output's ``(H, W)``."""
    kh, kw = module.kernel_size
    padding = module.padding
    if module.padding_mode != "zeros":  # as nn.Conv2d pads before its conv
        x = F.pad(x, module._reversed_padding_repeated_twice, mode=module.padding_mode)
        padding = (0, 0)
    elif isinstance(padding, str):  # "same" / "valid" with stride 1: what F.conv2d pads
        if padding == "valid":
            padding = (0, 0)
        else:
            total = [d * (k - 1) for d, k in zip(module.dilation, module.kernel_size)]
            x = F.pad(x, (total[1] // 2, total[1] - total[1] // 2, total[0] // 2, total[0] - total[0] // 2))
            padding = (0, 0)
    h, w = x.shape[-2:]
    cols = F.unfold(x, (kh, kw), dilation=module.dilation, padding=padding, stride=module.stride)
    ho = (h + 2 * padding[0] - module.dilation[0] * (kh - 1) - 1) // module.stride[0] + 1
    wo = (w + 2 * padding[1] - module.dilation[1] * (kw - 1) - 1) // module.stride[1] + 1
    return cols, (ho, wo)


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
                             "tokens or conv positions, must reach this layer), or use a method that needs no "
                             "Hessian (pycompress.quantize(method='rtn'), pycompress.prune(criterion='magnitude' "
                             "or 'wanda'))")


class _StopForward(Exception):
    """Raised by a capture hook once a group's inputs are all captured, to end the pass early."""


# Block-by-block calibration is on where the model allows it (see sequential_walk); tests switch it off
# to compare with the whole-model passes.
BLOCKWISE = True


def find_blocks(model: nn.Module, layer_names: list[str]) -> list[tuple[str, nn.Module]]:
    """The children of the nn.ModuleList / nn.Sequential that holds the most of ``layer_names`` in at least
    two of its children (the outermost on a tie): a transformers model's ``layers`` / ``h``, or an
    nn.Sequential model's layers. Empty if there is none."""
    best: tuple[int, list[tuple[str, nn.Module]]] | None = None
    for name, mod in model.named_modules():
        if not isinstance(mod, (nn.ModuleList, nn.Sequential)):
            continue
        prefix = f"{name}." if name else ""
        children = [(prefix + c, m) for c, m in mod.named_children()]
        counts = [sum(1 for n in layer_names if n == c or n.startswith(c + ".")) for c, _ in children]
        if sum(1 for c in counts if c) < 2:
            continue
        if best is None or sum(counts) > best[0]:
            best = (sum(counts), children)
    return [] if best is None else best[1]


def _is_cache(value: object) -> bool:
    """A transformers KV cache (DynamicCache, ...): replays of a block must not append to it."""
    return type(value).__name__.endswith("Cache") and hasattr(value, "update")


def _same_value(a: object, b: object) -> bool:
    if a is b:
        return True
    return type(a) is type(b) and isinstance(a, (bool, int, float, str)) and a == b


def _hidden_of(output: object) -> torch.Tensor | None:
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    return None


class _Trace:
    """The first pass: layer groups in first-call order, whether every layer runs once per batch, and
    whether the blocks can be replayed one at a time (``blockwise``, with ``reason`` when not): per batch
    the blocks run once each, in order, none inside another; block j's first input is block j-1's output
    (the same tensor) and its other inputs are block 0's (the same objects); no block changes its input
    in place; every calibrated layer inside a block runs only within it, and no layer outside the blocks
    runs between the first and the last block."""

    def __init__(self, model: nn.Module, layers: list[tuple[str, nn.Module]], blocks: list[tuple[str, nn.Module]],
                 batches: list, what: str) -> None:
        self.names = {id(m): n for n, m in layers}
        self.layer_block = {n: j for n, _ in layers for j, (b, _) in enumerate(blocks)
                            if n == b or n.startswith(b + ".")}
        self.blocks = blocks
        self.order: list[str] = []
        self.joins: dict[str, bool] = {}  # at its first call, the layer read the tensor the layer before it read
        self.last: tuple[str, object] | None = None
        self.calls: dict[str, int] = {}
        self.once = True
        self.reason = None if blocks else "no nn.ModuleList / nn.Sequential of blocks holds the layers"
        hooks = []
        for _, m in layers:
            hooks.append(m.register_forward_pre_hook(self._layer_hook, prepend=True))  # before fake quant
        if blocks:
            for j, (_, b) in enumerate(blocks):
                hooks.append(b.register_forward_pre_hook(
                    lambda mod, args, kwargs, j=j: self._block_pre(j, args, kwargs), prepend=True, with_kwargs=True))
                hooks.append(b.register_forward_hook(
                    lambda mod, args, output, j=j: self._block_post(j, output), always_call=False))
        try:
            with torch.no_grad():
                for index, batch in enumerate(batches):
                    self.calls.clear()
                    self.seq: list[int] = []
                    self.current: int | None = None
                    self.prev_out = None
                    self.ref = None
                    run_batch(model, batch, f"{what}: calibration batch {index}")
                    self.last = None
                    if any(c != 1 for c in self.calls.values()) or len(self.calls) != len(self.order):
                        self.once = False
                    if blocks and self.seq != list(range(len(blocks))):
                        self._no("the blocks did not run once each, in order, per batch")
        finally:
            for h in hooks:
                h.remove()
        self.groups: list[list[str]] = []
        for name in self.order:
            if self.groups and self.joins[name]:
                self.groups[-1].append(name)
            else:
                self.groups.append([name])

    def _no(self, reason: str) -> None:
        if self.reason is None:
            self.reason = reason

    def _layer_hook(self, module, args):
        name = self.names[id(module)]
        self.calls[name] = self.calls.get(name, 0) + 1
        x = args[0] if args else None
        if name not in self.joins:
            # the same tensor object as the previous layer call's input (a reference, not an id: ids of freed
            # tensors are reused), and that call was the layer just before in the order
            self.joins[name] = (isinstance(x, torch.Tensor) and self.last is not None and bool(self.order)
                                and self.last[0] == self.order[-1] and self.last[1] is x
                                and self.last[2] == x._version)  # and not changed in place since
            self.order.append(name)
        self.last = (name, x, x._version if isinstance(x, torch.Tensor) else None)
        if self.blocks:
            j = self.layer_block.get(name)
            if j is not None and self.current != j:
                self._no(f"layer {name} of block {self.blocks[j][0]} ran outside that block's call")
            if j is None and self.current is None and 0 < len(self.seq) < len(self.blocks):
                self._no(f"layer {name} (outside the blocks) ran between two blocks")
        return None

    def _block_pre(self, j, args, kwargs):
        if self.current is not None:
            self._no(f"block {self.blocks[j][0]} ran inside block {self.blocks[self.current][0]}")
        self.seq.append(j)
        self.current = j
        self.input_version = None
        if not args or not isinstance(args[0], torch.Tensor):
            self._no(f"block {self.blocks[j][0]}'s first positional input is not a tensor")
            return None
        self.input_version = (args[0], args[0]._version)
        rest = (args[1:], kwargs)
        if j == 0:
            self.ref = rest
        elif self.ref is not None:
            if args[0] is not self.prev_out:
                self._no(f"block {self.blocks[j][0]}'s input is not the previous block's output")
            (ra, rk), (a, k) = self.ref, rest
            if len(ra) != len(a) or rk.keys() != k.keys() or not all(_same_value(x, y) for x, y in zip(ra, a)) \
                    or not all(_same_value(rk[key], k[key]) for key in rk):
                self._no(f"block {self.blocks[j][0]} gets other arguments than block {self.blocks[0][0]}")
        return None

    def _block_post(self, j, output):
        if self.input_version is not None and self.input_version[0]._version != self.input_version[1]:
            self._no(f"block {self.blocks[j][0]} changes its input in place")
        self.prev_out = _hidden_of(output)
        if self.prev_out is None:
            self._no(f"block {self.blocks[j][0]} returns no tensor (nor a tuple starting with one)")
        self.current = None
        return None


def _input_features(module: nn.Module) -> int:
    if isinstance(module, nn.Linear):
        return module.in_features
    return module.in_channels * module.kernel_size[0] * module.kernel_size[1]


def sequential_walk(model: nn.Module, layers: list[tuple[str, nn.Module]], batches: list, full: bool,
                    order: str, solve: Callable[[str, nn.Module, InputStats], object],
                    apply: Callable[[str, nn.Module, object], None], what: str,
                    progress: Callable[[Iterable], Iterable] | None = None, comm: Comm | None = None,
                    check: Callable[[str, nn.Module, InputStats], None] | None = None) -> None:
    """For every layer in forward order: its ``InputStats`` gathered with the layers before it already
    processed, ``check(name, module, stats)``, ``result = solve(name, module, stats)`` and
    ``apply(name, module, result)`` (see the module docstring). A layer that no calibration batch reaches
    is an error naming it.

    Block by block: where the layers sit in the blocks of a ModuleList / Sequential that the model runs
    one after the other (``find_blocks``; the conditions in ``_Trace``), block 0's inputs are captured
    once for every batch (a pass that stops there), each of a block's groups is calibrated by replaying
    only that block on them, and then the block (its layers processed) turns them into the next
    block's inputs, in place. Peak memory: the model, the stats, one block's inputs for all batches and
    one batch's activations inside one block; each block runs (groups in it + 1) times per batch. Layers
    outside the blocks (e.g. ``lm_head``), and every layer of a model without such blocks, are calibrated
    by whole-model passes that stop once the group's inputs are captured (one batch's activations at a
    time, but a pass over the model's prefix per group).

    ``comm`` (pycompress.distributed): the ranks' layer orders are compared, every rank's stats are
    summed over the ranks, ``solve`` runs on one rank per layer (the group's layers spread over the
    ranks) and its result is broadcast; ``check`` runs on every rank (on the summed stats)."""
    comm = comm if comm is not None else Comm(None, what=what)
    modules = dict(layers)
    was_training = model.training
    model.eval()
    blocks = find_blocks(model, [n for n, _ in layers]) if BLOCKWISE else []
    try:
        trace, error = None, None
        try:
            trace = _Trace(model, layers, blocks, batches, what)
        except Exception as err:
            error = err
        comm.raise_if_any_failed(error, "running the calibration batches through the model")
        groups, blockwise = _agree_on_groups(trace, comm, len(batches), what)
        blockwise = blockwise and bool(blocks)
        missing = [n for n, _ in layers if not any(n in g for g in groups)]
        if missing:
            raise ValueError(f"{what}({missing[0]}): the calibration batches never reached this layer; "
                             "exclude it or pass batches that run it")
        group_block = [_group_block(g, trace.layer_block) for g in groups]
        if blockwise and not _blocks_in_order(group_block):
            blockwise = False
        once = trace.once
        replay = _BlockReplay(model, blocks, batches) if blockwise else None
        for group, j in zip(progress(groups) if progress is not None else groups,
                            group_block if blockwise else [None] * len(groups)):
            if replay is not None and j is not None:
                replay.advance_to(j)
                run = lambda: replay.run_block(j)  # noqa: E731
            else:
                if replay is not None:
                    replay.release()  # past the blocks: whole-model passes on the quantized blocks
                run = lambda: _run_model(model, batches)  # noqa: E731
            _process_group(group, modules, run, once, full, order, solve, apply, check, comm, what)
    finally:
        model.train(was_training)


def _group_block(group: list[str], layer_block: dict[str, int]) -> int | None:
    blocks = {layer_block.get(n) for n in group}
    return blocks.pop() if len(blocks) == 1 else -1


def _blocks_in_order(group_block: list[int | None]) -> bool:
    """Groups: outside the blocks (None), then blocks in nondecreasing order, then outside again."""
    if -1 in group_block:
        return False
    inside = [i for i, j in enumerate(group_block) if j is not None]
    if not inside:
        return False
    span = group_block[inside[0]:inside[-1] + 1]
    return None not in span and span == sorted(span)


def _agree_on_groups(trace: _Trace, comm: Comm, batch_count: int, what: str) -> tuple[list[list[str]], bool]:
    """The layer groups and whether block replay works, agreed over the ranks (ranks without batches take
    those of the others)."""
    mine = (trace.groups, trace.reason is None, batch_count)
    if not comm.active:
        return trace.groups, trace.reason is None
    infos = comm.all_gather_object(mine, "comparing the ranks' layer orders")
    with_data = [r for r, (_, _, count) in enumerate(infos) if count > 0]
    if not with_data:
        return [], False
    first = with_data[0]
    for r in with_data[1:]:
        if infos[r][0] != infos[first][0]:
            a, b = infos[first][0], infos[r][0]
            i = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
            raise DistributedCalibrationError(
                f"{what}: the layers run in another order (or other layers run) on rank {r} than on rank {first}: "
                f"layer group {i} is {b[i] if i < len(b) else '<none>'} on rank {r}, "
                f"{a[i] if i < len(a) else '<none>'} on rank {first}; the model's path must not depend on the batch (or give every rank batches "
                "that reach every layer)")
    return infos[first][0], all(infos[r][1] for r in with_data)


def _run_model(model: nn.Module, batches: list) -> None:
    for batch in batches:
        try:
            run_batch(model, batch)
        except _StopForward:
            pass


class _BlockReplay:
    """Block j's inputs for every batch (``hidden``, and the other arguments captured at block 0), moved
    forward one block at a time."""

    def __init__(self, model: nn.Module, blocks: list[tuple[str, nn.Module]], batches: list) -> None:
        self.model, self.blocks, self.batches = model, blocks, batches
        self.hidden: list[torch.Tensor] | None = None
        self.rest: list[tuple[tuple, dict]] = []
        self.next = 0

    def _capture_first_inputs(self) -> None:
        def stop(module, args, kwargs):
            scrub = lambda v: None if _is_cache(v) else v  # noqa: E731
            rest = tuple(scrub(a) for a in args[1:])
            kw = {k: scrub(v) for k, v in kwargs.items()}
            if "use_cache" in kw:
                kw["use_cache"] = False
            self.hidden.append(args[0])
            self.rest.append((rest, kw))
            raise _StopForward

        self.hidden, self.rest = [], []
        hook = self.blocks[0][1].register_forward_pre_hook(stop, prepend=True, with_kwargs=True)
        try:
            with torch.no_grad():
                _run_model(self.model, self.batches)
        finally:
            hook.remove()
        self.next = 0

    def advance_to(self, j: int) -> None:
        if self.hidden is None:
            self._capture_first_inputs()
        with torch.no_grad():
            while self.next < j:
                block = self.blocks[self.next][1]
                for b, (args, kwargs) in enumerate(self.rest):
                    self.hidden[b] = _hidden_of(block(self.hidden[b], *args, **kwargs))
                self.next += 1

    def run_block(self, j: int) -> None:
        block = self.blocks[j][1]
        for h, (args, kwargs) in zip(self.hidden, self.rest):
            try:
                block(h, *args, **kwargs)
            except _StopForward:
                pass

    def release(self) -> None:
        self.hidden, self.rest = None, []


def _process_group(group: list[str], modules: dict[str, nn.Module], run: Callable[[], None], once: bool,
                   full: bool, order: str, solve, apply, check, comm: Comm, what: str) -> None:
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
    error = None
    try:
        with torch.no_grad():
            run()
    except Exception as err:
        error = err
    finally:
        for h in hooks:
            h.remove()
    comm.raise_if_any_failed(error, f"capturing the inputs of {group}")
    for name in group:
        if name not in stats:
            stats[name] = InputStats(_input_features(modules[name]), full)
    if comm.active:
        rows = comm.all_reduce_(torch.tensor([stats[n].rows for n in group], dtype=torch.int64), "sum",
                                f"summing the input rows of {group}")
        for name, r in zip(group, rows.tolist()):
            s = stats[name]
            s.rows = int(r)
            comm.all_reduce_(s.xtx if s.full else s.sq, "sum", f"summing the input statistics of {name}")
    for i, name in enumerate(group):
        module, s = modules[name], stats[name]
        if s.rows == 0:
            raise ValueError(f"{what}({name}): the calibration batches gave this layer no input rows")
        if check is not None:
            check(name, module, s)
        result = comm.solve_on(i % comm.world, lambda: solve(name, module, s), f"solving {name}")
        apply(name, module, result)


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
