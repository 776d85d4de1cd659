"""Calibration across processes (``torch.distributed``): one shard of the calibration batches per rank,
statistics reduced so every rank ends with what one process gets on all the data.

``pycompress.quantize``, ``pycompress.prepare_qat`` and ``pycompress.prune`` take ``process_group`` and
``dist_timeout``:

- ``process_group="auto"`` (the default): the default group when ``torch.distributed`` is initialized
  with more than one rank, else this process alone; a ``ProcessGroup``: that group; ``None``: this
  process alone (no collective), e.g. to quantize on rank 0 only in a distributed job.
- A call *calibrates* when it has calibration batches and uses them (static activation ranges, GPTQ,
  Wanda, SparseGPT). Under a group of several ranks such a call is collective: every rank of the group
  calls it with the same model and arguments and its own shard of the batches (a rank may pass ``[]``).
- Agreement: first of all the ranks exchange a fingerprint (every parameter's and buffer's name, shape,
  dtype and an exact integer checksum of its bits; every module's name and type; the call's arguments)
  and each rank compares every rank's with rank 0's: any difference raises
  ``DistributedCalibrationError`` naming the rank and the first difference, on every rank.
- Reductions: observers' min / max with ``all_reduce(MIN / MAX)`` (in float64, exact); row counts in
  int64 (exact); ``X^T X`` and squared column norms (float64) with ``all_reduce(SUM)``, so they equal the
  single-process sums within float summation error; the percentile / MSE observers' samples are gathered
  in rank order (with contiguous shards, the same values as one process: within their sample cap).
- Identical results: each one-shot layer solve (GPTQ, SparseGPT, Wanda's mask) runs on one rank (the
  group's layers spread over the ranks) and its result is broadcast, so every rank applies the same
  bits, whatever the CPU or thread count of each rank.
- Failures do not hang: a rank whose own step fails (a bad batch, a Cholesky failure) sends its error to
  the others, which raise ``DistributedCalibrationError`` naming it; a rank that dies or stalls makes
  the others' next collective fail: at once when its connection closes (gloo), else after
  ``dist_timeout`` seconds (each collective is waited on with it), or the group's own timeout
  (``torch.distributed.init_process_group(timeout=...)``: 30 minutes by default for gloo; set one).
  With gloo, the first step is a ``monitored_barrier`` that names the ranks that did not arrive.
  The timeout must exceed the longest single layer solve (a rank waits for the owner's result).
"""

from __future__ import annotations

import datetime
import io
import pickle
import sys
import time

import torch
from torch import nn

AUTO = "auto"


class DistributedCalibrationError(RuntimeError):
    """Calibration across ranks failed: the ranks disagree, another rank failed, died or timed out."""


def _timedelta(timeout: float | datetime.timedelta | None) -> datetime.timedelta | None:
    if timeout is None or isinstance(timeout, datetime.timedelta):
        return timeout
    if not isinstance(timeout, (int, float)) or timeout <= 0:
        raise ValueError(f"dist_timeout must be a positive number of seconds (or a timedelta), got {timeout!r}")
    return datetime.timedelta(seconds=float(timeout))


class Comm:
    """The collectives of one calibrating call; ``group=None`` is this process alone (every method is then
    local and free)."""

    def __init__(self, group=None, timeout: datetime.timedelta | None = None, what: str = "calibration") -> None:
        self.group = group
        self.timeout = timeout
        self.what = what
        if group is None:
            self.rank, self.world = 0, 1
        else:
            import torch.distributed as dist

            self.rank, self.world = dist.get_rank(group), dist.get_world_size(group)
            self.backend = dist.get_backend(group)

    @property
    def active(self) -> bool:
        return self.world > 1

    # -- raw collectives, each waited on with the timeout and its failure explained -----------------------
    def _fail(self, step: str, err: BaseException) -> DistributedCalibrationError:
        timeout = (f"dist_timeout={self.timeout.total_seconds():g} s" if self.timeout is not None
                   else "the process group's timeout")
        return DistributedCalibrationError(
            f"{self.what}: rank {self.rank} of {self.world}: the collective step '{step}' failed: another rank "
            f"died, stopped calling {self.what}, or did not reach this step within {timeout} "
            f"({type(err).__name__}: {err})")

    def _call(self, step: str, fn, *args, **kwargs):
        try:
            return fn(*args, group=self.group, async_op=True, **kwargs)
        except Exception as err:
            raise self._fail(step, err) from err

    def _run(self, step: str, fn, *args, **kwargs) -> None:
        """One collective, waited on with the timeout; every tensor argument (or list of them) is the
        collective's. Returns once the backend has released them too (_until_released), failed or not."""
        tensors = tuple(t for a in args for t in (a if isinstance(a, list) else [a]))
        before = _python_refs(tensors)
        work = self._call(step, fn, *args, **kwargs)
        error = None
        try:
            if self.timeout is None:
                work.wait()
            else:
                work.wait(timeout=self.timeout)
        except Exception as err:  # gloo: "Connection closed by peer", "Timed out", ...
            error = err
        del work  # this frame (which the error's traceback keeps) must not keep the work alive
        _until_released(tensors, before)
        if error is not None:
            raise self._fail(step, error) from error

    def all_reduce_(self, tensor: torch.Tensor, op: str, step: str) -> torch.Tensor:
        """In place; ``op`` is "sum", "min" or "max"."""
        if not self.active:
            return tensor
        import torch.distributed as dist

        red = {"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX}[op]
        self._run(step, dist.all_reduce, tensor, op=red)
        return tensor

    def all_gather_object(self, obj: object, step: str) -> list:
        """Every rank's ``obj`` in rank order (pickled through two tensor all_gathers: sizes, then bytes)."""
        if not self.active:
            return [obj]
        import torch.distributed as dist

        buf = io.BytesIO()
        pickle.dump(obj, buf, protocol=pickle.HIGHEST_PROTOCOL)
        data = torch.frombuffer(bytearray(buf.getbuffer()), dtype=torch.uint8)
        size = torch.tensor([data.numel()], dtype=torch.int64)
        sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(self.world)]
        self._run(step, dist.all_gather, sizes, size)
        longest = int(max(int(s) for s in sizes))
        padded = torch.zeros(longest, dtype=torch.uint8)
        padded[:data.numel()] = data
        out = [torch.zeros(longest, dtype=torch.uint8) for _ in range(self.world)]
        self._run(step, dist.all_gather, out, padded)
        return [pickle.loads(o[:int(s)].numpy().tobytes()) for o, s in zip(out, sizes)]

    def broadcast_object(self, obj: object, src: int, step: str) -> object:
        """``obj`` of rank ``src`` on every rank."""
        if not self.active:
            return obj
        import torch.distributed as dist

        if self.rank == src:
            buf = io.BytesIO()
            pickle.dump(obj, buf, protocol=pickle.HIGHEST_PROTOCOL)
            data = torch.frombuffer(bytearray(buf.getbuffer()), dtype=torch.uint8)
            size = torch.tensor([data.numel()], dtype=torch.int64)
        else:
            size = torch.zeros(1, dtype=torch.int64)
        self._run(step, dist.broadcast, size, group_src=src)
        if self.rank != src:
            data = torch.zeros(int(size), dtype=torch.uint8)
        self._run(step, dist.broadcast, data, group_src=src)
        return obj if self.rank == src else pickle.loads(data.numpy().tobytes())

    # -- protocol ---------------------------------------------------------------------------------------
    def raise_if_any_failed(self, error: BaseException | None, step: str) -> None:
        """Every rank learns whether any rank's local ``step`` failed; all raise if one did (the failing
        rank its own exception, the others a DistributedCalibrationError naming it)."""
        if not self.active:
            if error is not None:
                raise error
            return
        message = None if error is None else f"{type(error).__name__}: {error}"
        messages = self.all_gather_object(message, step)
        if error is not None:
            raise error
        failed = [(r, m) for r, m in enumerate(messages) if m is not None]
        if failed:
            r, m = failed[0]
            raise DistributedCalibrationError(f"{self.what}: rank {r} of {self.world} failed while {step} "
                                              f"(so rank {self.rank} stops too): {m}")

    def solve_on(self, owner: int, solve, step: str):
        """``solve()`` on rank ``owner``, its result broadcast to every rank (errors too: every rank raises)."""
        if not self.active:
            return solve()
        result, error = None, None
        if self.rank == owner:
            try:
                result = solve()
            except Exception as err:  # sent to the other ranks, then raised here
                error = err
        message = None if error is None else f"{type(error).__name__}: {error}"
        result, message = self.broadcast_object((result, message), owner, step)
        if error is not None:
            raise error
        if message is not None:
            raise DistributedCalibrationError(f"{self.what}: rank {owner} of {self.world} failed while {step} "
                                              f"(so rank {self.rank} stops too): {message}")
        return result

    def start(self, fingerprint: dict, local_error: BaseException | None, batch_count: int) -> int:
        """The first collective of a calibrating call: a monitored barrier (gloo), then every rank's
        fingerprint, local validation error and batch count. Raises on every rank if the fingerprints
        differ or a rank failed; returns the total number of batches over the ranks."""
        if not self.active:
            if local_error is not None:
                raise local_error
            return batch_count
        import torch.distributed as dist

        if self.backend == "gloo":
            try:
                dist.monitored_barrier(group=self.group, timeout=self.timeout, wait_all_ranks=True)
            except Exception as err:
                raise DistributedCalibrationError(
                    f"{self.what}: rank {self.rank} of {self.world}: not every rank of the process group started "
                    f"{self.what} (each rank must call it with its shard of the calibration batches): "
                    f"{err}") from err
        message = None if local_error is None else f"{type(local_error).__name__}: {local_error}"
        infos = self.all_gather_object((fingerprint, message, batch_count), "comparing the ranks' models")
        if local_error is not None:
            raise local_error
        for r, (_, m, _) in enumerate(infos):
            if m is not None:
                raise DistributedCalibrationError(f"{self.what}: rank {r} of {self.world} failed before calibration "
                                                  f"(so rank {self.rank} stops too): {m}")
        for r in range(1, self.world):
            diff = fingerprint_difference(infos[0][0], infos[r][0])
            if diff is not None:
                raise DistributedCalibrationError(
                    f"{self.what}: the ranks disagree on the model or the arguments, rank {r} differs from rank 0: "
                    f"{diff}; every rank must call {self.what} with the same model and arguments (only the "
                    "calibration batches differ)")
        return sum(c for _, _, c in infos)


def _python_refs(tensors: tuple) -> list[int]:
    return [sys.getrefcount(t) for t in tensors]


def _until_released(tensors: tuple, before: list[int], limit_s: float = 1.0) -> None:
    """Waits (GIL released, at most ``limit_s``) until the backend has dropped its references to a finished
    collective's tensors. The backend's worker thread drops them a moment after ``wait`` returns, and that
    drop takes the GIL (torch holds a Python reference to a tensor while C++ shares it); if the process
    exits in that moment, the thread takes the GIL during interpreter finalization and is ended through a
    noexcept destructor: std::terminate, SIGABRT at exit (seen with gloo after a failed collective, ~3% of
    runs of tests/test_calibration_distributed.py). A collective that never finishes (a stalled rank) is
    given up after ``limit_s``."""
    deadline = time.monotonic() + limit_s
    while _python_refs(tensors) != before and time.monotonic() < deadline:
        time.sleep(0.0005)


def resolve_process_group(process_group, dist_timeout, what: str) -> Comm:
    """``process_group`` ("auto", None or a ProcessGroup) as a Comm (see the module docstring)."""
    timeout = _timedelta(dist_timeout)
    if process_group is None:
        return Comm(None, timeout, what)
    import torch.distributed as dist

    if isinstance(process_group, str):
        if process_group != AUTO:
            raise ValueError(f"{what}: process_group must be 'auto', None or a torch.distributed ProcessGroup, "
                             f"got {process_group!r}")
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return Comm(None, timeout, what)
        return _checked(Comm(dist.group.WORLD, timeout, what))
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError(f"{what}: process_group was given but torch.distributed is not initialized")
    if not isinstance(process_group, dist.ProcessGroup):
        raise TypeError(f"{what}: process_group must be 'auto', None or a torch.distributed ProcessGroup, got "
                        f"{type(process_group).__name__}")
    if dist.get_rank(process_group) < 0:
        raise ValueError(f"{what}: this process (global rank {dist.get_rank()}) is not a member of process_group")
    return _checked(Comm(process_group, timeout, what))


def _checked(comm: Comm) -> Comm:
    if comm.backend == "nccl":
        raise ValueError(f"{comm.what}: calibration exchanges CPU tensors, which the nccl backend cannot; pass a gloo "
                         "group (process_group=torch.distributed.new_group(backend='gloo')) or process_group=None")
    return comm


# -- fingerprint ---------------------------------------------------------------------------------------

_INT_VIEW = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int32}


def _bit_checksum(t: torch.Tensor) -> int:
    """An exact, order-independent integer sum of the tensor's bit patterns (equal bits -> equal sum, on
    any CPU or thread count; a differing value changes it)."""
    flat = t.detach().to("cpu").contiguous().reshape(-1)
    if flat.numel() == 0:
        return 0
    if flat.dtype == torch.bool:
        return int(flat.sum())
    if flat.is_complex():
        flat = torch.view_as_real(flat).reshape(-1)
    ints = flat.view(_INT_VIEW[flat.element_size()]).to(torch.int64)
    weights = torch.arange(ints.numel(), dtype=torch.int64) % 251 + 1  # position-sensitive too
    return int(ints.sum()) * 1_000_003 + int((ints * weights).sum())


def model_fingerprint(model: nn.Module, arguments: dict) -> dict:
    """What every rank must agree on: the call's arguments, the module tree and every tensor's bits."""
    return {
        "arguments": {k: repr(v) for k, v in arguments.items()},
        "modules": [(n or "model", type(m).__name__) for n, m in model.named_modules()],
        "tensors": [(n, tuple(t.shape), str(t.dtype), _bit_checksum(t))
                    for n, t in list(model.named_parameters()) + list(model.named_buffers())],
    }


def fingerprint_difference(a: dict, b: dict) -> str | None:
    """The first difference between two fingerprints, in words (None if equal)."""
    for key in sorted(a["arguments"].keys() | b["arguments"].keys()):
        va, vb = a["arguments"].get(key, "<absent>"), b["arguments"].get(key, "<absent>")
        if va != vb:
            return f"argument {key}={vb} (rank 0: {key}={va})"
    ma, mb = dict(a["modules"]), dict(b["modules"])
    for name in [n for n, _ in a["modules"]] + [n for n, _ in b["modules"] if n not in ma]:
        if ma.get(name) != mb.get(name):
            return (f"module '{name}' is {mb.get(name, '<absent>')} (rank 0: {ma.get(name, '<absent>')})")
    ta = {n: rest for n, *rest in a["tensors"]}
    tb = {n: rest for n, *rest in b["tensors"]}
    for name in [n for n, *_ in a["tensors"]] + [n for n, *_ in b["tensors"] if n not in ta]:
        if name not in tb or name not in ta:
            return f"tensor '{name}' is {'absent' if name not in tb else 'present'} (rank 0: the opposite)"
        (sa, da, ca), (sb, db, cb) = ta[name], tb[name]
        if sa != sb or da != db:
            return f"tensor '{name}' has shape {sb} {db} (rank 0: {sa} {da})"
        if ca != cb:
            return f"tensor '{name}' holds different values (same shape {sb}; rank 0 loaded other weights?)"
    return None

