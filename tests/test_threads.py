"""The thread-count tuner of small repeated calls (csrc/common/thread_tuner.h).

The tuner is driven here by made-up timings, so every decision is checked exactly;
the module tests check that whatever it decides, the outputs do not change."""

import threading

import pytest
import torch

import pycompress as pc
from pycompress import _C
from pycompress.reference import int8_linear_ref, quantize_weight_per_channel

T = _C.ThreadTuner
ONE, TEAM = 0, 1


def tuned_work(team: int = 2) -> int:
    """A work size inside the tuned band for `team` threads."""
    return team * T.MIN_WORK_PER_THREAD * 2


def tuned(one_ns=6500, team_ns=4000):
    """A tuner that warmed up and timed each choice once on two threads: (tuner, work)."""
    t = T()
    work = tuned_work(2)
    # The first call of each choice only warms it up: untimed. Then each is timed once.
    assert t.choose(2, work) == (1, -1)
    assert t.choose(2, work) == (2, -1)
    for threads, slot, ns in ((1, ONE, one_ns), (2, TEAM, team_ns)):
        assert t.choose(2, work) == (threads, slot)
        t.record(threads, slot, ns)
    return t, work


def test_fixed_outside_the_band():
    t = T()
    assert t.choose(1, 10**9) == (1, -1)  # one thread asked for
    assert t.choose(2, 2 * T.MIN_WORK_PER_THREAD - 1) == (1, -1)  # too small for two
    assert t.choose(2, 2 * T.SURE_WORK_PER_THREAD) == (2, -1)  # a second thread surely pays
    assert t.choose(4, 4 * T.SURE_WORK_PER_THREAD) == (4, -1)
    assert t.tuning() == {"team": 0, "one_thread_ns": 0, "team_ns": 0}  # nothing was tuned
    # Small work on many threads: the team is only as large as the work allows.
    work = 3 * T.MIN_WORK_PER_THREAD
    assert t.choose(16, work) == (1, -1) and t.choose(16, work) == (3, -1)
    assert t.tuning()["team"] == 3


def test_times_both_then_keeps_the_faster_and_reprobes():
    t, work = tuned(one_ns=6500, team_ns=4000)
    picks = []
    for _ in range(3 * T.REPROBE):
        threads, slot = t.choose(2, work)
        picks.append(threads)
        t.record(threads, slot, 4000 if threads == 2 else 6500)
    # The team is faster: one call in REPROBE re-times the single thread, the rest use the team.
    assert picks.count(1) == 3 and picks.count(2) == 3 * T.REPROBE - 3
    assert t.tuning() == {"team": 2, "one_thread_ns": 6500, "team_ns": 4000}


def test_follows_a_change_of_the_machine():
    t, work = tuned(one_ns=6500, team_ns=4000)

    def run(calls, team_ns, one_ns=6500):
        picks = []
        for _ in range(calls):
            threads, slot = t.choose(2, work)
            picks.append(threads)
            t.record(threads, slot, team_ns if threads == 2 else one_ns)
        return picks

    # The cores move apart: the team now takes 8500 ns. Every team call is timed, so the
    # estimate passes the single thread's within a few calls and stays there.
    picks = run(2 * T.REPROBE, 8500)
    assert picks[:2] == [2, 2] and picks[-T.REPROBE:].count(2) == 1
    assert t.tuning()["team_ns"] > 6500
    # They come back together: the re-probes see it and the team wins again.
    picks = run(12 * T.REPROBE, 4000)
    assert picks[-T.REPROBE:].count(2) == T.REPROBE - 1


def test_one_preempted_call_does_not_flip_the_choice():
    t, work = tuned(one_ns=6500, team_ns=4000)
    t.record(2, TEAM, 10**9)  # a call that lost its core for a second
    assert t.tuning()["team_ns"] == (3 * 4000 + 2 * 4000) // 4
    assert t.choose(2, work)[0] == 2


def test_a_new_thread_count_forgets_the_team_timing():
    t, _ = tuned(one_ns=6500, team_ns=4000)
    work3 = tuned_work(3)
    assert t.choose(3, work3) == (1, -1)  # warm-up again: a new team
    assert t.choose(3, work3) == (3, -1)
    assert t.tuning() == {"team": 3, "one_thread_ns": 6500, "team_ns": 0}
    assert t.choose(3, work3) == (3, TEAM)
    t.record(2, TEAM, 100)  # a late record of the old team is dropped
    assert t.tuning()["team_ns"] == 0
    t.record(3, TEAM, 3000)
    assert t.tuning()["team_ns"] == 3000


def _layer(k, n, gen):
    lin = torch.nn.Linear(k, n)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(n, k, generator=gen) * 0.05)
        lin.bias.copy_(torch.randn(n, generator=gen))
    return lin


@pytest.mark.parametrize("k,n", [(768, 768), (384, 1536)])
def test_a_tuned_layer_gives_the_same_outputs_whatever_it_picks(isa, k, n):
    # A GEMV in the tuned band on two threads: the calls alternate between one thread and
    # two while the layer learns; every output must equal the exact reference.
    gen = torch.Generator().manual_seed(k + n)
    lin = _layer(k, n, gen)
    q, scale = quantize_weight_per_channel(lin.weight)
    mod = pc.nn.Int8Linear.from_float(lin)
    xs = [torch.randn(1, k, generator=gen) for _ in range(4)]
    refs = [int8_linear_ref(x, q, scale, lin.bias.detach()) for x in xs]
    pc.set_num_threads(2)
    try:
        for i in range(3 * T.REPROBE):
            assert torch.equal(mod(xs[i % 4]), refs[i % 4]), i
        tuning = mod._native_plan().thread_tuning()
    finally:
        pc.set_num_threads(None)
    assert tuning["team"] == 2 and tuning["one_thread_ns"] > 0 and tuning["team_ns"] > 0


def test_a_tuned_layer_called_from_many_threads(isa):
    gen = torch.Generator().manual_seed(7)
    lin = _layer(768, 768, gen)
    mod = pc.nn.Int8Linear.from_float(lin)
    xs = [torch.randn(1, 768, generator=gen) for _ in range(6)]
    serial = [mod(x) for x in xs]
    results = [None] * len(xs)
    failures = []

    def worker(i):
        for _ in range(50):
            y = mod(xs[i])
            if not torch.equal(y, serial[i]):
                failures.append(i)
        results[i] = y

    pc.set_num_threads(2)
    try:
        threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(xs))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
    finally:
        pc.set_num_threads(None)
    assert not any(t.is_alive() for t in threads)
    assert not failures
    assert all(torch.equal(a, b) for a, b in zip(serial, results))


def test_a_shared_input_group_learns_its_thread_count(isa):
    # Query / key / value of one token: 3 x 768 x 768 multiply-adds, inside the tuned band on
    # two threads. Every shared output equals the member's own call, whatever the tuner picks.
    gen = torch.Generator().manual_seed(11)
    mods = [pc.nn.Int8Linear.from_float(_layer(768, 768, gen)) for _ in range(3)]
    xs = [torch.randn(1, 768, generator=gen) for _ in range(3)]
    alone = [[m(x) for m in mods] for x in xs]
    group = pc.nn.SharedInputGroup(mods)
    pc.set_num_threads(2)
    try:
        for i in range(3 * T.REPROBE):
            x = xs[i % 3]
            assert all(torch.equal(m(x), y) for m, y in zip(mods, alone[i % 3])), i
    finally:
        pc.set_num_threads(None)
    tuning = group._tuner.tuning()
    assert tuning["team"] == 2 and tuning["one_thread_ns"] > 0 and tuning["team_ns"] > 0


def test_a_tuned_sparse_layer_gives_the_same_outputs_whatever_it_picks(isa):
    # A 1024x1024 int8 layer at 30% density, one row: its sliced steps put the call inside the tuned band on
    # two threads. Outputs equal dense Int8Linear's (the sparse int8 contract) on every call.
    gen = torch.Generator().manual_seed(5)
    lin = _layer(1024, 1024, gen)
    with torch.no_grad():
        lin.weight.mul_(torch.rand(lin.weight.shape, generator=gen) < 0.3)
    sparse = pc.nn.SparseInt8Linear.from_float(lin)
    dense = pc.nn.Int8Linear.from_float(lin)
    xs = [torch.randn(1, 1024, generator=gen) for _ in range(4)]
    refs = [dense(x) for x in xs]
    pc.set_num_threads(2)
    try:
        for i in range(3 * T.REPROBE):
            assert torch.equal(sparse(xs[i % 4]), refs[i % 4]), i
    finally:
        pc.set_num_threads(None)
    (record,) = sparse._plans.values()  # the sliced layout this ISA runs at M = 1
    tuning = record[2].thread_tuning()
    assert tuning["team"] == 2 and tuning["one_thread_ns"] > 0 and tuning["team_ns"] > 0
