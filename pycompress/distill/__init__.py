"""Knowledge distillation and model fusion (ensemble of teachers -> one student).

``KDLoss`` is Hinton et al.'s loss done right: the KL divergence between the
temperature-softened teacher and student distributions, computed from the student's
log-probabilities (``F.kl_div(log_softmax(s / T), softmax(t / T), reduction="batchmean")``),
scaled by T^2 so its gradients keep their size as T changes, mixed with the
hard-label cross-entropy:

    loss = alpha * T^2 * KL(softmax(t / T) || softmax(s / T)) + (1 - alpha) * CE(s, labels)

Several teachers (model fusion) are combined by averaging their softened
distributions, optionally weighted.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from pycompress.progress import progress_bar

__all__ = ["FeatureDistiller", "KDLoss", "distill_epoch", "soft_targets"]


def soft_targets(
    teacher_logits: torch.Tensor | Sequence[torch.Tensor],
    temperature: float,
    weights: Sequence[float] | None = None,
) -> torch.Tensor:
    """softmax(t / T), averaged over teachers (weighted by ``weights``, normalized to sum 1)."""
    teachers = [teacher_logits] if isinstance(teacher_logits, torch.Tensor) else list(teacher_logits)
    if not teachers:
        raise ValueError("soft_targets: no teacher logits given")
    shape = teachers[0].shape
    for i, t in enumerate(teachers):
        if t.shape != shape:
            raise ValueError(f"soft_targets: teacher {i} logits have shape {tuple(t.shape)}, teacher 0 {tuple(shape)}")
    if weights is None:
        weights = [1.0] * len(teachers)
    if len(weights) != len(teachers):
        raise ValueError(f"soft_targets: {len(weights)} weights for {len(teachers)} teachers")
    w = torch.tensor([float(x) for x in weights], dtype=teachers[0].dtype)
    if (w < 0).any() or w.sum() <= 0:
        raise ValueError(f"soft_targets: teacher weights must be >= 0 with a positive sum, got {list(weights)}")
    w = w / w.sum()
    probs = torch.stack([F.softmax(t.detach() / temperature, dim=-1) for t in teachers])
    return (w.reshape(-1, *([1] * (probs.dim() - 1))).to(probs.device) * probs).sum(dim=0)


class KDLoss(nn.Module):
    """``alpha * T^2 * KL(p_teacher || p_student) + (1 - alpha) * CE(student, labels)``.

    ``forward(student_logits, teacher_logits, labels=None)``: ``teacher_logits`` is one
    tensor or a list (an ensemble; ``teacher_weights`` weight their soft targets).
    Logits are ``[batch, classes]`` (or ``[batch, ..., classes]``; KL is averaged over
    all leading positions). ``labels`` may be omitted only when ``alpha == 1``.
    """

    def __init__(self, temperature: float = 4.0, alpha: float = 0.9,
                 teacher_weights: Sequence[float] | None = None) -> None:
        super().__init__()
        if not temperature > 0:
            raise ValueError(f"KDLoss: temperature must be > 0, got {temperature}")
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"KDLoss: alpha must be in [0, 1], got {alpha}")
        self.temperature = float(temperature)
        self.alpha = float(alpha)
        self.teacher_weights = teacher_weights

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor | Sequence[torch.Tensor],
                labels: torch.Tensor | None = None) -> torch.Tensor:
        t = self.temperature
        targets = soft_targets(teacher_logits, t, self.teacher_weights)
        if targets.shape != student_logits.shape:
            raise ValueError(f"KDLoss: student logits {tuple(student_logits.shape)} vs teacher "
                             f"{tuple(targets.shape)}")
        classes = student_logits.shape[-1]
        log_student = F.log_softmax(student_logits.reshape(-1, classes) / t, dim=-1)
        soft = F.kl_div(log_student, targets.reshape(-1, classes), reduction="batchmean") * (t * t)
        if self.alpha == 1.0:
            return self.alpha * soft
        if labels is None:
            raise ValueError(f"KDLoss: labels are required when alpha < 1 (alpha={self.alpha})")
        hard = F.cross_entropy(student_logits.reshape(-1, classes), labels.reshape(-1))
        return self.alpha * soft + (1.0 - self.alpha) * hard

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, alpha={self.alpha}"


class FeatureDistiller(nn.Module):
    """Intermediate-feature distillation: MSE between a learned projection of student
    features and the teacher's features at named layers (FitNets-style hints).

    ``pairs`` maps a student module name to a teacher module name. Forward hooks record
    both outputs; ``example_inputs`` runs once to size the projections (a Linear over
    the last dim for ``[B, ..., C]`` features, a 1x1 conv for ``[B, C, H, W]``). Put
    the distiller's parameters in the optimizer with the student's.
    """

    def __init__(self, student: nn.Module, teacher: nn.Module, pairs: Mapping[str, str], example_inputs: object) -> None:
        super().__init__()
        if not pairs:
            raise ValueError("FeatureDistiller: pairs is empty")
        self.pairs = dict(pairs)
        self._student_feats: dict[str, torch.Tensor] = {}
        self._teacher_feats: dict[str, torch.Tensor] = {}
        self._hooks = []
        student_modules, teacher_modules = dict(student.named_modules()), dict(teacher.named_modules())
        for s_name, t_name in self.pairs.items():
            if s_name not in student_modules:
                raise ValueError(f"FeatureDistiller: student has no module {s_name!r}")
            if t_name not in teacher_modules:
                raise ValueError(f"FeatureDistiller: teacher has no module {t_name!r}")
            self._hooks.append(student_modules[s_name].register_forward_hook(self._recorder(self._student_feats, s_name)))
            self._hooks.append(teacher_modules[t_name].register_forward_hook(self._recorder(self._teacher_feats, t_name)))
        args = example_inputs if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
        with torch.no_grad():
            student_mode, teacher_mode = student.training, teacher.training
            student.eval(), teacher.eval()
            student(*args), teacher(*args)
            student.train(student_mode), teacher.train(teacher_mode)
        self.projections = nn.ModuleDict()
        for s_name, t_name in self.pairs.items():
            s, t = self._student_feats[s_name], self._teacher_feats[t_name]
            self.projections[s_name.replace(".", "__")] = self._projection(s_name, t_name, s, t)
        self._student_feats.clear()
        self._teacher_feats.clear()

    @staticmethod
    def _recorder(store: dict, name: str) -> Callable:
        def hook(module, args, output):
            store[name] = output
        return hook

    @staticmethod
    def _projection(s_name: str, t_name: str, s: torch.Tensor, t: torch.Tensor) -> nn.Module:
        if s.dim() == 4 and t.dim() == 4:
            if s.shape[2:] != t.shape[2:]:
                raise ValueError(f"FeatureDistiller: {s_name} features {tuple(s.shape)} and {t_name} "
                                 f"{tuple(t.shape)} differ in spatial size")
            return nn.Conv2d(s.shape[1], t.shape[1], kernel_size=1, bias=False)
        if s.shape[:-1] != t.shape[:-1]:
            raise ValueError(f"FeatureDistiller: {s_name} features {tuple(s.shape)} and {t_name} "
                             f"{tuple(t.shape)} differ outside the feature dim")
        return nn.Linear(s.shape[-1], t.shape[-1], bias=False)

    def forward(self) -> torch.Tensor:
        """The summed MSE of the features recorded by the last student and teacher forwards."""
        total = None
        for s_name, t_name in self.pairs.items():
            if s_name not in self._student_feats or t_name not in self._teacher_feats:
                raise RuntimeError(f"FeatureDistiller: run the student and the teacher forward first "
                                   f"(no features recorded for {s_name} / {t_name})")
            proj = self.projections[s_name.replace(".", "__")]
            loss = F.mse_loss(proj(self._student_feats[s_name]), self._teacher_feats[t_name].detach())
            total = loss if total is None else total + loss
        return total

    def remove_hooks(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()


def distill_epoch(
    student: nn.Module,
    teachers: nn.Module | Sequence[nn.Module],
    loader: Iterable,
    optimizer: torch.optim.Optimizer,
    loss_fn: KDLoss | None = None,
    feature_distiller: FeatureDistiller | None = None,
    feature_weight: float = 1.0,
    on_step: Callable[[], object] | None = None,
    progress: bool | None = None,
) -> float:
    """One epoch of distillation over ``loader`` (batches ``(inputs, labels)``): the
    teachers run in eval mode without gradients, the student trains on ``loss_fn``
    (default ``KDLoss()``) plus ``feature_weight`` times the feature loss. ``on_step`` is
    called after every optimizer step (e.g. ``GradualPruner.step``). Returns the mean loss.
    """
    teachers = [teachers] if isinstance(teachers, nn.Module) else list(teachers)
    if not teachers:
        raise ValueError("distill_epoch: no teacher given")
    loss_fn = loss_fn or KDLoss()
    student.train()
    for t in teachers:
        t.eval()
    total, count = 0.0, 0
    for inputs, labels in progress_bar(loader, desc="distill", enabled=progress):
        with torch.no_grad():
            teacher_logits = [t(inputs) for t in teachers]
        student_logits = student(inputs)
        loss = loss_fn(student_logits, teacher_logits if len(teachers) > 1 else teacher_logits[0], labels)
        if feature_distiller is not None:
            loss = loss + feature_weight * feature_distiller()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if on_step is not None:
            on_step()
        total += float(loss.detach()) * len(labels)
        count += len(labels)
    if count == 0:
        raise ValueError("distill_epoch: the loader yielded no batches")
    return total / count
