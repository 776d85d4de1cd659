"""Training-time pruning.

``pycompress.prune(model, sparsity=0.9, method=..., scope=...)`` prunes a model (this
package is callable: it forwards to ``pycompress.prune.api.prune``), and the package
holds the rest of the pruning toolkit:

- masks: ``get_mask(module)``, ``remove(model)``, ``sparsity_report(model)``;
  masks are ``torch.nn.utils.parametrize`` parametrizations on ``weight``;
- ``GradualPruner``: cubic AGP schedule stepped from the user's training loop;
- one-shot criteria from calibration data, ``prune(..., criterion="wanda" | "sparsegpt",
  calibration_batches=...)`` (pycompress.prune.oneshot);
- structured channel pruning (``method="channel"``) that physically shrinks the model;
- ``sensitivity_analysis`` and ``allocate_sparsity`` for per-layer sparsities under a
  global budget.
"""

import sys
import types

from pycompress.prune.api import GradualPruner, agp_sparsity, prune
from pycompress.prune.masks import PruningMask, get_mask, masked_float_weight, remove, sparsity_report
from pycompress.prune.sensitivity import allocate_sparsity, sensitivity_analysis
from pycompress.prune.structured import analyze_channel_groups, prune_channels

__all__ = [
    "GradualPruner",
    "PruningMask",
    "agp_sparsity",
    "allocate_sparsity",
    "analyze_channel_groups",
    "get_mask",
    "masked_float_weight",
    "prune",
    "prune_channels",
    "remove",
    "sensitivity_analysis",
    "sparsity_report",
]


class _CallableModule(types.ModuleType):
    """Lets ``pycompress.prune`` be both the function of the public API
    (``pc.prune(model, ...)``) and the namespace of its tools (``pc.prune.remove``)."""

    def __call__(self, *args, **kwargs):
        return prune(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
