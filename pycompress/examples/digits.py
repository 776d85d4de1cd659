"""The compression pipeline on scikit-learn's digits (real 8x8 images, 1797 samples):

    train a teacher CNN -> distill a smaller student -> prune it gradually while
    fine-tuning -> quantize it (PTQ, and QAT to compare)

Each stage is a function that takes the previous stage's model (left untouched: it
works on a copy) and returns a ``StageResult`` with the new model and its test
accuracy. Everything is deterministic for a given ``seed`` (fixed split, seeded
init and shuffling, single process). ``run_pipeline(quick=True)`` is the
seconds-long version for tests.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

import pycompress.prune as pc_prune
from pycompress.distill import KDLoss, distill_epoch
from pycompress.examples.models import StudentCNN, TeacherCNN
from pycompress.quant import freeze_ranges, prepare_qat, quantize
from pycompress.progress import progress_bar

BATCH_SIZE = 64


def _one_thread(fn):
    """Run ``fn`` with one intra-op thread, restoring the caller's setting. These 8x8
    images give each op microseconds of work: a second thread gains nothing, and
    OpenMP barriers between two threads collapse when the cores are shared (measured
    here: 0.02 s/step with 1 thread vs 0.19 s/step with 2 on a loaded 2-core machine)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return fn(*args, **kwargs)
        finally:
            torch.set_num_threads(threads)

    return wrapper


@dataclass
class DigitsData:
    """Stratified split of sklearn's digits, pixels scaled to [0, 1], shape [N, 1, 8, 8]."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor

    def train_batches(self, generator: torch.Generator) -> list[tuple[torch.Tensor, torch.Tensor]]:
        order = torch.randperm(len(self.y_train), generator=generator)
        return [(self.x_train[i], self.y_train[i]) for i in order.split(BATCH_SIZE)]

    def calibration_batches(self, count: int = 4) -> list[torch.Tensor]:
        return list(self.x_train[: count * BATCH_SIZE].split(BATCH_SIZE))


@dataclass
class StageResult:
    name: str
    model: nn.Module
    accuracy: float  # on the held-out test split
    info: dict = field(default_factory=dict)


def load_data(seed: int = 0) -> DigitsData:
    """70% train, 10% validation, 20% test, stratified, shuffled by ``seed``."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(digits.target, dtype=torch.int64)
    idx = torch.arange(len(y)).numpy()
    rest, test = train_test_split(idx, test_size=0.2, random_state=seed, stratify=digits.target)
    train, val = train_test_split(rest, test_size=0.125, random_state=seed, stratify=digits.target[rest])
    t = torch.as_tensor
    return DigitsData(x[t(train)], y[t(train)], x[t(val)], y[t(val)], x[t(test)], y[t(test)])


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Top-1 accuracy in eval mode (the model's mode is restored)."""
    was_training = model.training
    model.eval()
    correct = sum(int((model(xb).argmax(dim=1) == yb).sum()) for xb, yb in zip(x.split(256), y.split(256)))
    model.train(was_training)
    return correct / len(y)


def count_parameters(model: nn.Module, nonzero: bool = False) -> int:
    """Parameters of the model as it computes (pruned weights count as zeros)."""
    total = 0
    for name, mod in model.named_modules():
        for pname, p in mod.named_parameters(recurse=False):
            if pname == "original":  # parametrized weight: count the effective one below
                continue
            total += int((p != 0).sum()) if nonzero else p.numel()
        if isinstance(mod, (nn.Linear, nn.Conv2d)) and hasattr(mod, "parametrizations"):
            w = mod.weight
            total += int((w != 0).sum()) if nonzero else w.numel()
    return total


def _train(model: nn.Module, data: DigitsData, epochs: int, lr: float, seed: int, loss_of, on_step=None,
           desc: str = "train", progress: bool | None = None) -> None:
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, epochs))
    model.train()
    for _ in progress_bar(range(epochs), desc=desc, enabled=progress):
        for xb, yb in data.train_batches(generator):
            loss = loss_of(model, xb, yb)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if on_step is not None:
                on_step()
        schedule.step()
    model.eval()


def _cross_entropy(model, xb, yb):
    return F.cross_entropy(model(xb), yb)


@_one_thread
def train_teacher(data: DigitsData, seed: int = 0, epochs: int = 12, progress: bool | None = None) -> StageResult:
    torch.manual_seed(seed)
    teacher = TeacherCNN()
    _train(teacher, data, epochs, 3e-3, seed, _cross_entropy, desc="teacher", progress=progress)
    return StageResult("teacher", teacher, evaluate(teacher, data.x_test, data.y_test), {"epochs": epochs})


@_one_thread
def train_student_from_scratch(data: DigitsData, seed: int = 0, epochs: int = 12,
                               progress: bool | None = None) -> StageResult:
    """The same student trained on hard labels only: the baseline distillation must beat."""
    torch.manual_seed(seed + 1)
    student = StudentCNN()
    _train(student, data, epochs, 3e-3, seed + 1, _cross_entropy, desc="student (labels)", progress=progress)
    return StageResult("student_scratch", student, evaluate(student, data.x_test, data.y_test), {"epochs": epochs})


@_one_thread
def distill_student(teacher: nn.Module, data: DigitsData, seed: int = 0, epochs: int = 12,
                    temperature: float = 4.0, alpha: float = 0.9, progress: bool | None = None) -> StageResult:
    torch.manual_seed(seed + 1)
    student = StudentCNN()
    teacher = copy.deepcopy(teacher).eval()
    generator = torch.Generator().manual_seed(seed + 1)
    optimizer = torch.optim.Adam(student.parameters(), lr=3e-3)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, epochs))
    loss_fn = KDLoss(temperature, alpha)
    for _ in progress_bar(range(epochs), desc="distill", enabled=progress):
        distill_epoch(student, teacher, data.train_batches(generator), optimizer, loss_fn, progress=False)
        schedule.step()
    student.eval()
    return StageResult("student_distilled", student, evaluate(student, data.x_test, data.y_test),
                       {"epochs": epochs, "temperature": temperature, "alpha": alpha})


@_one_thread
def _baked_copy(model: nn.Module) -> nn.Module:
    """A fresh instance of ``model``'s class holding its masked weights as plain parameters. (Not deepcopy +
    pycompress.prune.remove: a deep copy shares torch's parametrized module classes with the original, and
    removing the copy's parametrizations deletes the original's ``weight`` property too.)"""
    state = {k: v for k, v in model.state_dict().items() if ".parametrizations." not in k}
    for name, module in model.named_modules():
        if parametrize.is_parametrized(module, "weight"):
            state[f"{name}.weight"] = module.weight.detach().clone()
    fresh = type(model)()
    fresh.load_state_dict(state)
    return fresh.train(model.training)


def prune_gradually(model: nn.Module, data: DigitsData, target: float = 0.8, seed: int = 0, epochs: int = 8,
                    teacher: nn.Module | None = None, progress: bool | None = None) -> StageResult:
    """AGP magnitude pruning (global threshold) to ``target`` over the first 3/4 of
    ``epochs`` with fine-tuning (distilling from ``teacher`` when given); the first conv
    (9 weights per filter) stays dense. Masks stay attached for the next stages."""
    model = copy.deepcopy(model)
    steps_per_epoch = -(-len(data.y_train) // BATCH_SIZE)
    end_step = max(1, (3 * epochs * steps_per_epoch) // 4)
    pruner = pc_prune.GradualPruner(model, target=target, start_step=0, end_step=end_step,
                                    frequency=max(1, steps_per_epoch // 2), scope="global",
                                    exclude=["features.0"])
    if teacher is not None:
        teacher = copy.deepcopy(teacher).eval()
        kd = KDLoss(4.0, 0.5)

        def loss_of(m, xb, yb):
            with torch.no_grad():
                t = teacher(xb)
            return kd(m(xb), t, yb)
    else:
        loss_of = _cross_entropy
    _train(model, data, epochs, 1e-3, seed + 2, loss_of, on_step=pruner.step, desc="prune", progress=progress)
    report = pc_prune.sparsity_report(model)
    return StageResult("pruned", model, evaluate(model, data.x_test, data.y_test),
                       {"target": target, "sparsity": report["__total__"], "per_layer": report})


@_one_thread
def quantize_ptq(model: nn.Module, data: DigitsData, weight_bits: int = 8, activations: str = "static",
                 observer: str = "minmax", progress: bool | None = None, method: str = "auto") -> StageResult:
    model = quantize(copy.deepcopy(model).eval(), data.calibration_batches(), weight_bits=weight_bits,
                     activations=activations, observer=observer, progress=progress, method=method)
    return StageResult(f"ptq_w{weight_bits}", model, evaluate(model, data.x_test, data.y_test),
                       {"weight_bits": weight_bits, "activations": activations, "observer": observer,
                        "method": method})


@_one_thread
def quantize_qat(model: nn.Module, data: DigitsData, weight_bits: int = 8, seed: int = 0, epochs: int = 3,
                 lr: float = 5e-4, progress: bool | None = None) -> StageResult:
    """QAT fine-tuning from ``model`` (its pruning masks are kept): static uint8
    activations initialised on calibration batches; ranges frozen for the last epoch."""
    model = prepare_qat(copy.deepcopy(model).eval(), weight_bits=weight_bits, activations="static",
                        calibration_batches=data.calibration_batches(), progress=progress)
    generator = torch.Generator().manual_seed(seed + 3)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for epoch in progress_bar(range(epochs), desc="qat", enabled=progress):
        if epoch == epochs - 1:
            freeze_ranges(model)
        for xb, yb in data.train_batches(generator):
            loss = F.cross_entropy(model(xb), yb)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    model.eval()
    return StageResult(f"qat_w{weight_bits}", model, evaluate(model, data.x_test, data.y_test),
                       {"weight_bits": weight_bits, "epochs": epochs})


@_one_thread
def run_pipeline(seed: int = 0, quick: bool = False, progress: bool | None = None,
                 prune_target: float = 0.8) -> dict[str, StageResult]:
    """All stages in order; ``quick`` cuts the epochs for a seconds-long smoke run.
    Returns ``{stage name: StageResult}`` (teacher, student_distilled, pruned, ptq_w8, qat_w8, qat_w4: 4-bit
    weights, in groups of K where 128 divides it, else per channel; pruned90: pruned on to 90%, qat_w4_90: its
    4-bit QAT)."""
    epochs = dict(teacher=2, student=2, prune=2, qat=1) if quick else dict(teacher=12, student=15, prune=8, qat=3)
    data = load_data(seed)
    results = {}
    teacher = train_teacher(data, seed, epochs["teacher"], progress)
    results[teacher.name] = teacher
    student = distill_student(teacher.model, data, seed, epochs["student"], progress=progress)
    results[student.name] = student
    pruned = prune_gradually(student.model, data, prune_target, seed, epochs["prune"], teacher=teacher.model,
                             progress=progress)
    results[pruned.name] = pruned
    ptq = quantize_ptq(pruned.model, data, 8, progress=progress)
    results[ptq.name] = ptq
    qat = quantize_qat(pruned.model, data, 8, seed, epochs["qat"], progress=progress)
    results[qat.name] = qat
    qat4 = quantize_qat(pruned.model, data, 4, seed, epochs["qat"], progress=progress)
    results[qat4.name] = qat4
    # Deep Compression's sparsity: the pruned student pruned on to 90% (its 80% zeros made permanent first: they
    # are the smallest weights, so the schedule keeps them pruned), then 4-bit QAT.
    base = _baked_copy(pruned.model)
    pruned90 = prune_gradually(base, data, 0.9, seed, epochs["prune"], teacher=teacher.model, progress=progress)
    results["pruned90"] = dataclasses.replace(pruned90, name="pruned90")
    qat4_90 = quantize_qat(pruned90.model, data, 4, seed, epochs["qat"], progress=progress)
    results["qat_w4_90"] = dataclasses.replace(qat4_90, name="qat_w4_90")
    return results


if __name__ == "__main__":
    import time

    start = time.perf_counter()
    for name, r in run_pipeline().items():
        print(f"{name:20s} acc={r.accuracy:.4f} params={count_parameters(r.model)} "
              f"nonzero={count_parameters(r.model, nonzero=True)}")
    print(f"total {time.perf_counter() - start:.1f} s")
