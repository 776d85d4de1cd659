"""Unstructured, block, N:M and gradual pruning with parametrized masks."""

import math

import pytest
import torch
from torch import nn

import pycompress as pc
from pycompress.prune import GradualPruner, agp_sparsity, allocate_sparsity, get_mask, sensitivity_analysis


def mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 16))


def cnn(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(4, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
                         nn.Flatten(), nn.Linear(16 * 6 * 6, 8))


def zeros_of(module):
    return int((module.weight == 0).sum())


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_masks_survive_optimizer_steps_and_gradients_do_not_revive(optimizer):
    model = pc.prune(mlp(), 0.7)
    masks = {n: get_mask(m).clone() for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    opt = (torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9, weight_decay=0.1) if optimizer == "sgd"
           else torch.optim.AdamW(model.parameters(), lr=0.1, weight_decay=0.1))
    for _ in range(5):
        loss = model(torch.randn(8, 32)).pow(2).sum()
        opt.zero_grad()
        loss.backward()
        for name, mod in model.named_modules():
            if name in masks:
                grad = mod.parametrizations.weight.original.grad
                assert (grad[~masks[name]] == 0).all()
        opt.step()
    for name, mod in model.named_modules():
        if name in masks:
            assert torch.equal(get_mask(mod), masks[name])
            assert (mod.weight[~masks[name]] == 0).all()
            assert (mod.weight[masks[name]] != 0).any()


def test_layer_scope_prunes_each_layer_exactly():
    model = pc.prune(cnn(), 0.6)
    for mod in model.modules():
        if isinstance(mod, (nn.Conv2d, nn.Linear)):
            assert zeros_of(mod) == round(0.6 * mod.weight.numel())
            assert int((~get_mask(mod)).sum()) == round(0.6 * mod.weight.numel())


@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.9, 0.999])
def test_global_scope_hits_requested_sparsity_exactly(sparsity):
    model = cnn()
    total = sum(m.weight.numel() for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))
    pc.prune(model, sparsity, scope="global")
    zeros = sum(zeros_of(m) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))
    assert zeros == round(sparsity * total)
    assert pc.prune.sparsity_report(model)["__total__"] == pytest.approx(round(sparsity * total) / total)


def test_global_threshold_is_shared_across_layers():
    model = mlp()
    before = {n: m.weight.detach().abs().clone() for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    pc.prune(model, 0.5, scope="global")
    kept_min = min(float(before[n][get_mask(m)].min()) for n, m in model.named_modules() if n in before)
    pruned_max = max(float(before[n][~get_mask(m)].max()) for n, m in model.named_modules() if n in before)
    assert pruned_max <= kept_min


def test_exclude_and_overrides():
    model = mlp()
    n4 = model[4].weight.numel()
    pc.prune(model, 0.8, scope="global", exclude=["0"], overrides={"4": 0.25})
    assert get_mask(model[0]) is None and zeros_of(model[0]) == 0
    assert zeros_of(model[4]) == round(0.25 * n4)
    assert zeros_of(model[2]) == round(0.8 * model[2].weight.numel())  # the only layer left in the global pool


@pytest.mark.parametrize("block", [(1, 4), (4, 1), (8, 1), (16, 1)])
def test_block_pruning_zeroes_whole_blocks(block):
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Conv2d(8, 16, 3))
    pc.prune(model, 0.75, method="block", block=block)
    bn, bk = block
    for mod in (model[0], model[2]):
        w = mod.weight.detach().reshape(mod.weight.shape[0], -1)
        n, k = w.shape
        blocks = w.reshape(n // bn, bn, k // bk, bk).permute(0, 2, 1, 3).reshape(n // bn, k // bk, -1)
        all_zero = (blocks == 0).all(dim=-1)
        assert ((blocks != 0).all(dim=-1) | all_zero).all()  # no half-pruned block
        assert int(all_zero.sum()) == round(0.75 * all_zero.numel())


def test_nm_pruning_keeps_n_of_every_m_along_k():
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(64, 24), nn.Conv2d(4, 8, 2))
    pc.prune(model, method="nm", n=2, m=4)
    for mod in model:
        w = mod.weight.detach().reshape(mod.weight.shape[0], -1)
        groups = w.reshape(w.shape[0], -1, 4)
        assert ((groups != 0).sum(dim=-1) == 2).all()
        # the two kept are the two largest of each group
        kept_min = torch.where(groups != 0, groups.abs(), torch.full_like(groups, math.inf)).amin(dim=-1)
        pruned_max = get_mask(mod).reshape(groups.shape).logical_not().float().mul(
            mod.parametrizations.weight.original.detach().reshape(groups.shape).abs()).amax(dim=-1)
        assert (pruned_max <= kept_min).all()


def test_remove_makes_masks_permanent():
    model = pc.prune(mlp(), 0.5)
    zeros = [zeros_of(m) for m in model if isinstance(m, nn.Linear)]
    x = torch.randn(4, 32)
    ref = model(x)
    pc.prune.remove(model)
    assert all(get_mask(m) is None and type(m) is nn.Linear for m in model if isinstance(m, (nn.Linear,)))
    assert [zeros_of(m) for m in model if isinstance(m, nn.Linear)] == zeros
    assert torch.equal(model(x), ref)
    assert set(model.state_dict()) == set(mlp().state_dict())
    pc.prune(model, 0.6)  # pruning again after remove is allowed, and keeps the old zeros
    assert all(zeros_of(m) == round(0.6 * m.weight.numel()) for m in model if isinstance(m, nn.Linear))


@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5])
def test_sparsity_outside_unit_interval_is_rejected(bad):
    model = mlp()
    with pytest.raises(ValueError, match=r"sparsity must be in \[0, 1\), got"):
        pc.prune(model, bad)
    with pytest.raises(ValueError, match=r"sparsity must be in \[0, 1\)"):
        pc.prune(model, 0.5, overrides={"0": bad})
    with pytest.raises(ValueError, match=r"GradualPruner\(target\): sparsity must be in \[0, 1\)"):
        GradualPruner(model, bad, 0, 10)
    assert all(get_mask(m) is None for m in model if isinstance(m, nn.Linear))


def test_pruning_a_layer_twice_is_rejected_and_nothing_changes():
    model = mlp()
    pc.prune(model, 0.5, exclude=["2"])
    snapshot = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"prune\(0\): layer is already pruned; call pycompress.prune.remove"):
        pc.prune(model, 0.7)
    assert get_mask(model[2]) is None  # layer 2 was validated but not pruned: no half-pruned model
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in snapshot.items())


def test_other_bad_arguments():
    model = mlp()
    with pytest.raises(ValueError, match="unknown method 'l0'"):
        pc.prune(model, 0.5, method="l0")
    with pytest.raises(ValueError, match="exclude pattern 'fc9' matches no Linear/Conv layer"):
        pc.prune(model, 0.5, exclude=["fc9"])
    with pytest.raises(ValueError, match=r"block \(2, 2\) is not a kernel block shape"):
        pc.prune(model, 0.5, method="block", block=(2, 2))
    odd = nn.Sequential(nn.Linear(30, 8))
    with pytest.raises(ValueError, match=r"prune\(0\): N:M 2:4 needs K divisible by 4; weight \(8, 30\) has K=30. "
                                         r"Leave this layer dense with exclude=\['0'\]"):
        pc.prune(odd, method="nm")
    with pytest.raises(ValueError, match=r"prune\(0\): weight \(8, 30\) viewed as \[N=8, K=30\] is not divisible.*"
                                         r"Leave this layer dense with exclude=\['0'\]"):
        pc.prune(odd, 0.5, method="block", block=(1, 4))
    with pytest.raises(ValueError, match="method='nm' with n=2, m=4 prunes 0.5, not sparsity=0.9"):
        pc.prune(model, 0.9, method="nm")


def test_agp_schedule_is_cubic():
    assert agp_sparsity(0, 0.0, 0.8, 0, 100) == 0.0
    assert agp_sparsity(50, 0.0, 0.8, 0, 100) == pytest.approx(0.8 * (1 - 0.5 ** 3))
    assert agp_sparsity(100, 0.0, 0.8, 0, 100) == pytest.approx(0.8)
    assert agp_sparsity(500, 0.0, 0.8, 0, 100) == pytest.approx(0.8)
    assert agp_sparsity(10, 0.0, 0.8, 20, 100) == 0.0


def test_gradual_pruner_raises_sparsity_monotonically_while_training():
    model = mlp()
    pruner = GradualPruner(model, target=0.9, start_step=2, end_step=20, frequency=3, scope="global")
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    total = sum(m.weight.numel() for m in model if isinstance(m, nn.Linear))
    previous = {i: get_mask(m).clone() for i, m in enumerate(model) if isinstance(m, nn.Linear)}
    seen = []
    for _ in range(30):
        loss = model(torch.randn(8, 32)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        s = pruner.step()
        zeros = sum(zeros_of(m) for m in model if isinstance(m, nn.Linear))
        assert zeros == round(s * total)
        for i, mask in previous.items():
            now = get_mask(model[i])
            assert not (now & ~mask).any(), "a pruned weight came back"
            previous[i] = now.clone()
        seen.append(s)
    assert seen == sorted(seen) and seen[-1] == pytest.approx(0.9) and len(set(seen)) > 4


def test_gradual_block_pruning_ends_at_target_per_layer():
    model = mlp()
    pruner = GradualPruner(model, 0.5, 0, 4, method="block", block=(4, 1), scope="layer", overrides={"4": 0.25})
    for _ in range(6):
        pruner.step()
    assert zeros_of(model[2]) == round(0.5 * model[2].weight.numel())
    assert zeros_of(model[4]) == round(0.25 * model[4].weight.numel())


def test_sensitivity_analysis_restores_the_model_and_allocates_a_budget():
    torch.manual_seed(0)
    model = mlp()
    x = torch.randn(64, 32)
    target = model(x).detach()
    state = {k: v.clone() for k, v in model.state_dict().items()}

    def loss(m):
        with torch.no_grad():
            return float((m(x) - target).pow(2).mean())

    table = sensitivity_analysis(model, loss, sparsities=(0.5, 0.9))
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    assert set(table) == {"0", "2", "4"}
    for curve in table.values():
        assert curve[0.0] == 0.0 and curve[0.9] >= curve[0.5] > 0.0
    chosen = allocate_sparsity(model, table, budget=0.6)
    sizes = {n: model.get_submodule(n).weight.numel() for n in table}
    removed = sum(chosen[n] * sizes[n] for n in table) / sum(sizes.values())
    assert removed >= 0.6
    pc.prune(model, 0.0, overrides=chosen)
    assert pc.prune.sparsity_report(model)["__total__"] == pytest.approx(removed, abs=1e-3)
    with pytest.raises(ValueError, match="budget 0.95 exceeds the largest measured sparsity"):
        allocate_sparsity(model, table, budget=0.95)


def test_a_weight_normed_layer_is_refused_naming_its_parametrization_and_exclude():
    model = nn.Sequential(nn.Conv1d(4, 8, 3), nn.ReLU(), nn.Conv1d(8, 8, 1))
    nn.utils.parametrizations.weight_norm(model[0])
    with pytest.raises(ValueError, match=r"prune\(0\): the layer's weight is computed by parametrizations "
                                         r"\['_WeightNorm'\] .*exclude=\['0'\]"):
        pc.prune(model, 0.5)
    pc.prune(model, 0.5, exclude=["0"])
    assert pc.prune.get_mask(model[2]) is not None
