"""Timing helpers shared by the bench/ scripts.

How a number is made (PERF.md, "How to measure"):
- every implementation is warmed up first (first-call allocations, thread-pool
  start, lazy packing);
- a sample is the mean of a batch of back-to-back calls (long enough to swamp
  the timer), and the reported figure is the median of many samples;
- the implementations of one case are interleaved sample by sample, with the
  order rotated every round, so a drift in machine load (other jobs, frequency)
  hits all of them alike instead of whichever ran last;
- inputs rotate over a pool larger than the L2 caches where one input would
  otherwise sit in L1/L2 across calls, which no layer of a real model enjoys;
- each sample starts after a pause that lets the previous implementation's
  spinning threads stop, followed by 20 ms of untimed calls (SETTLE_S, WARM_S).
"""

from __future__ import annotations

import contextlib
import itertools
import math
import statistics
import time
from dataclasses import dataclass
from collections.abc import Callable, Iterator, Sequence

import torch

from machine import cache_sizes

Step = Callable[[], object]


def ops_measured(*names: str) -> tuple[str, ...]:
    """The ops of pycompress.ops.OPS (the one list of ops) whose kernels a bench times, through the op or the
    layer over it: a name not in OPS is an error, and bench/test_peers.py checks that every op has a bench."""
    from pycompress.ops import OPS

    unknown = [name for name in names if name not in OPS]
    if unknown:
        raise ValueError(f"ops_measured: {unknown} not in pycompress.ops.OPS {OPS}")
    return names


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """torch.set_num_threads(n) for the block (pycompress follows torch's setting)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def make_inputs(m: int, k: int, seed: int = 0) -> list[torch.Tensor]:
    """A pool of activations whose total exceeds twice the L2 of both cores, capped
    at 16 tensors (a 1 x 768 row cannot be pushed out of L2 by rotation alone)."""
    gen = torch.Generator().manual_seed(seed)
    one = max(1, m * k * 4)
    l2_total = 2 * cache_sizes().get("L2", 1 << 20)
    count = min(16, max(2, math.ceil(2 * l2_total / one)))
    return [torch.randn(m, k, generator=gen) for _ in range(count)]


def make_step(runners: Sequence[Callable[[torch.Tensor], object]], inputs: Sequence[torch.Tensor]) -> Step:
    """A no-argument call that runs the next (layer, input) pair, cycling through both."""
    pairs = itertools.cycle([(runners[i % len(runners)], inputs[i % len(inputs)])
                             for i in range(math.lcm(len(runners), len(inputs)))])

    def step() -> object:
        run, x = next(pairs)
        return run(x)

    return step


@dataclass
class Timing:
    median_s: float
    spread: float          # interquartile range / median of the samples
    samples: int
    calls_per_sample: int


def _time_batch(step: Step, calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        step()
    return (time.perf_counter() - start) / calls


def calls_for(step: Step, batch_s: float) -> int:
    """Calls per sample so that a sample lasts about batch_s (after a warm-up)."""
    warm_deadline = time.perf_counter() + max(0.02, batch_s / 2)
    calls = 0
    while calls < 3 or time.perf_counter() < warm_deadline:
        step()
        calls += 1
    per_call = min(_time_batch(step, 1) for _ in range(3))
    return max(1, min(100_000, round(batch_s / max(per_call, 1e-9))))


# A pause before each sample. Another runtime's worker threads (ORT's pool, torch's
# OpenMP team) keep spinning for tens of milliseconds after their last call and take
# the second core from whoever runs next: measured at (128,768,3072), 2 threads,
# pycompress took 1379 us right after ORT had run, 724 us 200 ms later, and FBGEMM
# 1507 us vs 808 us. A real server runs one runtime; so must each sample.
SETTLE_S = 0.15
# Untimed calls after the pause, before the sample. The pause leaves the second
# vCPU idle, and for the first ~10-20 ms after it wakes a 2-thread call runs
# near its 1-thread time: (1,4096,4096) int8 on 2 threads, batches of 100 calls
# right after a 150 ms pause took a median 166-215 us per call, 107 us after
# 20 ms of untimed calls (same process, 40 batches each; 1 ms pauses: 121-123).
# A server under load never idles its cores between two calls; neither may a sample.
WARM_S = 0.02


def settle(step: Step) -> None:
    """The pause before a sample, then WARM_S of untimed calls (at least one)."""
    time.sleep(SETTLE_S)
    deadline = time.perf_counter() + WARM_S
    step()
    while time.perf_counter() < deadline:
        step()


def time_interleaved(steps: dict[str, Step], rounds: int, batch_s: float) -> dict[str, Timing]:
    """Median seconds per call of each step, sampled in rotating interleaved order."""
    names = list(steps)
    calls = {name: calls_for(steps[name], batch_s) for name in names}
    samples: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            settle(steps[name])
            samples[name].append(_time_batch(steps[name], calls[name]))
    return {name: summarize(samples[name], calls[name]) for name in names}


def summarize(values: list[float], calls: int) -> Timing:
    med = statistics.median(values)
    if len(values) >= 4:
        q = statistics.quantiles(values, n=4)
        spread = (q[2] - q[0]) / med
    else:
        spread = float("nan")
    return Timing(med, spread, len(values), calls)
