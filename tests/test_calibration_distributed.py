"""Calibration across processes (pycompress.distributed): two CPU ranks on gloo, started with
torch.multiprocessing.spawn as users start them, each with its shard of the batches, against one process
on all of them; ranks that disagree on the model or the arguments, a rank that stalls, a rank that dies.

One spawn runs every scenario in order (each rank writes what it got to a file; the last scenario kills
rank 1), then the tests compare. Tolerances: Hessians (float64 sums in another order) to 1e-12 relative;
the quantized integers, masks, static ranges and scales bit-equal to one process; every rank's results
bit-equal to rank 0's."""

from __future__ import annotations

import datetime
import os
import time

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

import pycompress as pc
import pycompress.quant.gptq as gptq_mod
from pycompress.distributed import DistributedCalibrationError
from pycompress.quant import get_quant_state, quantized_weight

WORLD = 2
SHARD = 4  # rank 0 gets batches[:SHARD], rank 1 the rest (shards need not be equal)
TIMEOUT_S = 2.0  # dist_timeout of the stall scenario


class Block(nn.Module):
    def __init__(self, d: int, h: int) -> None:
        super().__init__()
        self.q = nn.Linear(d, d)  # q and k read the same tensor: one group
        self.k = nn.Linear(d, d)
        self.up = nn.Linear(d, h)
        self.down = nn.Linear(h, d)
        self.die_at = None  # (rank 1 of the last scenario) exit the process on this call

    def forward(self, x, gain):
        if self.die_at is not None:
            self.die_at -= 1
            if self.die_at == 0:
                os._exit(0)
        x = x + torch.tanh(self.q(x)) * torch.sigmoid(self.k(x)) * gain
        return x + self.down(torch.relu(self.up(x)))


class Net(nn.Module):
    """A layer before the blocks, three blocks in a ModuleList (calibrated block by block), a head after."""

    def __init__(self, seed: int = 0, d: int = 32, h: int = 64) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.inp = nn.Linear(32, d)
        self.blocks = nn.ModuleList(Block(d, h) for _ in range(3))
        self.head = nn.Linear(d, 16)
        self.register_buffer("gain", torch.linspace(0.5, 1.5, d))

    def forward(self, x):
        x = self.inp(x)
        for block in self.blocks:
            x = block(x, gain=self.gain)
        return self.head(x)


def batches():
    g = torch.Generator().manual_seed(7)
    mix = torch.randn(32, 32, generator=g) / 32 ** 0.5
    return [(torch.randn(4, 24, 32, generator=g) @ mix) * torch.linspace(0.3, 2.0, 32) for _ in range(6)]


def shard(rank: int) -> list:
    data = batches()
    return data[:SHARD] if rank == 0 else data[SHARD:]


LAYERS = ["inp"] + [f"blocks.{i}.{n}" for i in range(3) for n in ("q", "k", "up", "down")] + ["head"]


def _modules(model):
    mods = dict(model.named_modules())
    return [(n, mods[n]) for n in LAYERS]


def run_gptq(data, process_group, hessians):
    model = Net()
    real = gptq_mod.gptq_quantize

    def spy(w, h, *a, **k):
        hessians[k.get("name", a[5] if len(a) > 5 else "?")] = h.clone()
        return real(w, h, *a, **k)

    gptq_mod.gptq_quantize = spy
    try:
        pc.quantize(model, data, weight_bits=4, group_size=16, method="gptq", progress=False,
                    process_group=process_group)
    finally:
        gptq_mod.gptq_quantize = real
    return {n: quantized_weight(m) for n, m in _modules(model)}


def run_static(data, process_group, observer):
    model = Net()
    pc.quantize(model, data, weight_bits=8, activations="static", observer=observer, progress=False,
                process_group=process_group)
    out = {}
    for n, m in _modules(model):
        st = get_quant_state(m)
        afq = m.activation_fake_quant
        out[n] = (st.act_scale, st.act_zero_point, float(afq.range_min), float(afq.range_max),
                  quantized_weight(m)[0])
    return out


def run_prune(data, process_group, criterion):
    model = Net()
    pc.prune(model, 0.5, criterion=criterion, calibration_batches=data, progress=False, process_group=process_group)
    return {n: (pc.prune.get_mask(m).clone(), m.weight.detach().clone()) for n, m in _modules(model)}


def _timed_error(fn):
    t0 = time.monotonic()
    try:
        fn()
    except Exception as err:  # the scenarios expect one; recorded, compared by the tests
        return type(err).__name__, str(err), time.monotonic() - t0
    return None, None, time.monotonic() - t0


def worker(rank: int, store: str, out_dir: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=30))
    res: dict = {}
    path = os.path.join(out_dir, f"rank{rank}.pt")
    data = shard(rank)
    res["gptq_hessians"] = {}
    res["gptq"] = run_gptq(data, "auto", res["gptq_hessians"])
    res["minmax"] = run_static(data, "auto", "minmax")
    res["percentile"] = run_static(data, dist.group.WORLD, "percentile")
    res["wanda"] = run_prune(data, "auto", "wanda")
    res["sparsegpt"] = run_prune(data, "auto", "sparsegpt")
    # rank 1 holds other weights (same shapes)
    res["other_model"] = _timed_error(lambda: pc.quantize(Net(seed=rank), data, weight_bits=4, group_size=16,
                                                          method="gptq", progress=False))
    # rank 1 asks for other bits
    res["other_args"] = _timed_error(lambda: pc.prune(Net(), 0.5 + 0.1 * rank, criterion="wanda",
                                                      calibration_batches=data, progress=False))
    # rank 1's first batch is malformed: its own error there, a DistributedCalibrationError naming it on rank 0
    bad = data if rank == 0 else [torch.randn(4, 24, 31)] + data
    res["bad_batch"] = _timed_error(lambda: pc.quantize(Net(), bad, weight_bits=4, group_size=16, method="gptq",
                                                        progress=False))
    # 20 rows on each rank: 40 in all, short of the 64 features of layer 2 (the summed rows are checked, on every rank)
    torch.manual_seed(3)
    small = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 4))
    res["rank_deficit"] = _timed_error(lambda: pc.quantize(small, [torch.randn(20, 16)], weight_bits=4, group_size=16,
                                                           method="gptq", progress=False))
    # rank 1 stalls (never calls): rank 0 fails after dist_timeout, on a group of its own
    stall_group = dist.new_group(backend="gloo")
    if rank == 0:
        res["stall"] = _timed_error(lambda: pc.quantize(Net(), data, method="gptq", weight_bits=4, group_size=16,
                                                        progress=False, process_group=stall_group,
                                                        dist_timeout=TIMEOUT_S))
    dead_group = dist.new_group(backend="gloo")
    if rank == 1:
        torch.save(res, path)
    model = Net()
    if rank == 1:
        # block 2 runs twice in the first pass (2 batches), then is replayed: exit in its first group's replay,
        # after rank 1 took part in the collectives of the layers before
        model.blocks[2].die_at = 4
    res["dead"] = _timed_error(lambda: pc.quantize(model, data, weight_bits=4, group_size=16, method="gptq",
                                                   progress=False, process_group=dead_group))
    torch.save(res, path)


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dist")
    t0 = time.monotonic()
    mp.spawn(worker, args=(str(tmp / "store"), str(tmp)), nprocs=WORLD, join=True)
    elapsed = time.monotonic() - t0
    out = [torch.load(tmp / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    out[0]["spawn_s"] = elapsed
    return out


@pytest.fixture(scope="module")
def single():
    """One process on every batch."""
    hessians = {}
    return {"gptq": run_gptq(batches(), None, hessians), "gptq_hessians": hessians,
            "minmax": run_static(batches(), None, "minmax"), "percentile": run_static(batches(), None, "percentile"),
            "wanda": run_prune(batches(), None, "wanda"), "sparsegpt": run_prune(batches(), None, "sparsegpt")}


def _assert_equal_results(a, b, where):
    assert a.keys() == b.keys()
    for name in a:
        for x, y in zip(a[name], b[name]):
            if isinstance(x, torch.Tensor):
                assert torch.equal(x, y), f"{where}: {name}"
            else:
                assert x == y, f"{where}: {name}: {x} != {y}"


pytestmark = pytest.mark.once_per_ci


def test_gptq_across_two_ranks_equals_one_process_on_all_batches(ranks, single):
    for r in range(WORLD):
        _assert_equal_results(ranks[r]["gptq"], single["gptq"], f"rank {r} vs one process")
    # each Hessian was solved on one rank (a group's layers are spread over the ranks): all were seen once
    seen = {**ranks[0]["gptq_hessians"], **ranks[1]["gptq_hessians"]}
    assert sorted(seen) == sorted(LAYERS) and ranks[0]["gptq_hessians"] and ranks[1]["gptq_hessians"]
    for name, h in seen.items():
        torch.testing.assert_close(h, single["gptq_hessians"][name], rtol=1e-12, atol=1e-12 * float(h.abs().max()))


@pytest.mark.parametrize("observer", ["minmax", "percentile"])
def test_static_ranges_across_ranks_are_bit_equal_to_one_process(ranks, single, observer):
    for r in range(WORLD):
        _assert_equal_results(ranks[r][observer], single[observer], f"{observer}: rank {r} vs one process")


@pytest.mark.parametrize("criterion", ["wanda", "sparsegpt"])
def test_one_shot_pruning_across_ranks(ranks, single, criterion):
    _assert_equal_results(ranks[1][criterion], ranks[0][criterion], f"{criterion}: rank 1 vs rank 0")
    for name, (mask, weight) in ranks[0][criterion].items():
        ref_mask, ref_weight = single[criterion][name]
        assert torch.equal(mask, ref_mask), f"{criterion}: {name}: masks differ from one process"
        torch.testing.assert_close(weight, ref_weight, rtol=1e-5, atol=1e-6)  # SparseGPT's float updates
        assert abs(float((~mask).float().mean()) - 0.5) < 0.01


def test_ranks_with_other_weights_fail_on_every_rank_naming_the_difference(ranks):
    for r in range(WORLD):
        kind, message, seconds = ranks[r]["other_model"]
        assert kind == DistributedCalibrationError.__name__, message
        assert "rank 1 differs from rank 0" in message and "tensor 'inp.weight' holds different values" in message
        assert seconds < 3.0


def test_ranks_with_other_arguments_fail_on_every_rank(ranks):
    for r in range(WORLD):
        kind, message, seconds = ranks[r]["other_args"]
        assert kind == DistributedCalibrationError.__name__
        assert "argument sparsity=0.6 (rank 0: sparsity=0.5)" in message and seconds < 3.0


def test_a_rank_whose_batch_fails_stops_every_rank(ranks):
    kind, message, _ = ranks[1]["bad_batch"]
    assert kind == "RuntimeError" and "31" in message  # its own shape error
    kind, message, seconds = ranks[0]["bad_batch"]
    assert kind == DistributedCalibrationError.__name__ and "rank 1 of 2 failed while running the calibration" in message
    assert seconds < 3.0


def test_too_few_rows_over_all_ranks_is_the_rank_deficit_error_on_every_rank(ranks):
    for r in range(WORLD):
        kind, message, _ = ranks[r]["rank_deficit"]
        assert kind == "ValueError"
        assert "quantize(2): the calibration batches gave 40 input rows for 64 live input features" in message


def test_a_stalled_rank_makes_the_other_fail_after_the_timeout(ranks):
    kind, message, seconds = ranks[0]["stall"]
    assert kind == DistributedCalibrationError.__name__ and "not every rank of the process group started" in message
    assert "Ranks 1 failed to pass monitoredBarrier" in message  # torch names the missing ranks
    assert TIMEOUT_S - 0.5 < seconds < TIMEOUT_S + 3.0


def test_a_rank_that_dies_mid_calibration_makes_the_other_fail(ranks):
    assert "dead" not in ranks[1]  # rank 1 exited inside block 2's replay
    kind, message, seconds = ranks[0]["dead"]
    assert kind == DistributedCalibrationError.__name__, message
    assert "rank 0 of 2: the collective step" in message and "another rank died" in message
    assert seconds < 10.0


def test_process_group_argument_checks():
    x = batches()
    with pytest.raises(ValueError, match="process_group must be 'auto', None or a torch.distributed"):
        pc.quantize(Net(), x, method="gptq", weight_bits=4, group_size=16, process_group="world")
    with pytest.raises(ValueError, match="torch.distributed is not initialized"):
        pc.prune(Net(), 0.5, criterion="wanda", calibration_batches=x, process_group=object())
    with pytest.raises(ValueError, match="dist_timeout must be a positive"):
        pc.quantize(Net(), x, activations="static", dist_timeout=-1)

