"""Knowledge distillation: KD loss by hand, multi-teacher fusion, feature hints, the epoch helper."""

import math

import pytest
import torch
from torch import nn

import pycompress as pc
from pycompress.distill import FeatureDistiller, KDLoss, distill_epoch, soft_targets


def softmax(v):
    e = [math.exp(x) for x in v]
    return [x / sum(e) for x in e]


def test_kd_loss_on_a_hand_example():
    student = torch.tensor([[1.0, 2.0, 0.0]])
    teacher = torch.tensor([[2.0, 0.0, 0.0]])
    labels = torch.tensor([1])
    t, alpha = 2.0, 0.7
    p = softmax([2.0 / t, 0.0, 0.0])  # teacher, softened
    q = softmax([0.5, 1.0, 0.0])  # student, softened
    kl = sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))
    ce = -math.log(softmax([1.0, 2.0, 0.0])[1])
    expected = alpha * t * t * kl + (1 - alpha) * ce
    assert float(KDLoss(t, alpha)(student, teacher, labels)) == pytest.approx(expected, rel=1e-6)


def test_kd_loss_is_batch_mean_and_zero_for_identical_logits():
    torch.manual_seed(0)
    s, t = torch.randn(4, 5), torch.randn(4, 5)
    loss = KDLoss(3.0, 1.0)
    per_row = torch.stack([loss(s[i:i + 1], t[i:i + 1]) for i in range(4)])
    assert float(loss(s, t)) == pytest.approx(float(per_row.mean()), rel=1e-6)
    assert float(loss(s, s)) == pytest.approx(0.0, abs=1e-6)
    s.requires_grad_(True)
    KDLoss(3.0, 0.5)(s, t, torch.tensor([0, 1, 2, 3])).backward()
    assert s.grad.abs().sum() > 0


def test_multi_teacher_soft_targets_are_weighted_averages():
    a, b = torch.tensor([[3.0, 0.0]]), torch.tensor([[0.0, 3.0]])
    avg = soft_targets([a, b], 1.0)
    torch.testing.assert_close(avg, torch.tensor([[0.5, 0.5]]))
    weighted = soft_targets([a, b], 1.0, weights=[3, 1])
    expected = 0.75 * torch.softmax(a, -1) + 0.25 * torch.softmax(b, -1)
    torch.testing.assert_close(weighted, expected)
    s = torch.tensor([[1.0, -1.0]])
    fused = KDLoss(1.0, 1.0, teacher_weights=[3, 1])(s, [a, b])
    kl = (expected * (expected.log() - torch.log_softmax(s, -1))).sum()
    assert float(fused) == pytest.approx(float(kl), rel=1e-6)


def test_kd_bad_input():
    with pytest.raises(ValueError, match="temperature must be > 0"):
        KDLoss(0.0)
    with pytest.raises(ValueError, match=r"alpha must be in \[0, 1\]"):
        KDLoss(2.0, 1.5)
    with pytest.raises(ValueError, match=r"labels are required when alpha < 1"):
        KDLoss(2.0, 0.5)(torch.randn(2, 3), torch.randn(2, 3))
    with pytest.raises(ValueError, match=r"student logits \(2, 3\) vs teacher \(2, 4\)"):
        KDLoss()(torch.randn(2, 3), torch.randn(2, 4), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"teacher 1 logits have shape \(2, 4\), teacher 0 \(2, 3\)"):
        soft_targets([torch.randn(2, 3), torch.randn(2, 4)], 1.0)


@pytest.fixture
def one_thread():
    """Tiny models: one intra-op thread is as fast, and immune to OpenMP barrier stalls
    when the CI cores are shared (see pycompress/examples/digits.py)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_task(seed=0):
    torch.manual_seed(seed)
    x = torch.randn(256, 6)
    y = (x[:, 0] + x[:, 1] * x[:, 2] > 0).long()
    return x, y


def test_distill_epoch_from_an_ensemble_reduces_loss_and_calls_on_step(one_thread):
    x, y = make_task()
    teachers = []
    for seed in range(2):
        torch.manual_seed(seed)
        t = nn.Sequential(nn.Linear(6, 32), nn.ReLU(), nn.Linear(32, 2))
        opt = torch.optim.Adam(t.parameters(), lr=0.02)
        for _ in range(100):
            loss = nn.functional.cross_entropy(t(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        teachers.append(t)
    torch.manual_seed(5)
    student = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 2))
    opt = torch.optim.Adam(student.parameters(), lr=0.02)
    batches = list(zip(x.split(32), y.split(32)))
    steps = []
    losses = [distill_epoch(student, teachers, batches, opt, KDLoss(2.0, 0.5), on_step=lambda: steps.append(1),
                            progress=False) for _ in range(8)]
    assert len(steps) == 8 * len(batches)
    assert losses[-1] < 0.7 * losses[0]
    assert all(not t.training for t in teachers)
    with pytest.raises(ValueError, match="the loader yielded no batches"):
        distill_epoch(student, teachers, [], opt)


def test_feature_distillation_with_learned_projection(one_thread):
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(16 * 16, 4))
    student = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 16, 4))
    x = torch.randn(8, 1, 4, 4)
    hints = FeatureDistiller(student, teacher, {"1": "1"}, example_inputs=x)
    assert isinstance(hints.projections["1"], nn.Conv2d) and hints.projections["1"].in_channels == 4
    opt = torch.optim.Adam(list(student.parameters()) + list(hints.parameters()), lr=0.05)
    batches = [(x, torch.randint(0, 4, (8,)))] * 30
    first = None
    for xb, yb in batches:
        with torch.no_grad():
            teacher(xb)
        student(xb)
        loss = hints()
        first = float(loss.detach()) if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(loss.detach()) < 0.5 * first
    mlp_hints = FeatureDistiller(student, teacher, {"3": "3"}, example_inputs=x)
    assert isinstance(mlp_hints.projections["3"], nn.Linear)
    epoch_loss = distill_epoch(student, teacher, batches[:2], opt, feature_distiller=hints, progress=False)
    assert math.isfinite(epoch_loss)
    hints.remove_hooks()
    mlp_hints.remove_hooks()
    with pytest.raises(ValueError, match=r"student has no module 'nope'"):
        FeatureDistiller(student, teacher, {"nope": "1"}, example_inputs=x)
    pooled = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.MaxPool2d(2))
    with pytest.raises(ValueError, match=r"differ in spatial size"):
        FeatureDistiller(pooled, teacher, {"1": "1"}, example_inputs=x)


def test_public_names():
    assert pc.distill.KDLoss is KDLoss
