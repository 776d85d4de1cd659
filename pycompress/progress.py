"""tqdm progress bars that stay quiet when stderr is not a terminal or when asked."""

from __future__ import annotations

import sys
from collections.abc import Iterable


def progress_bar(iterable: Iterable, desc: str, enabled: bool | None = None, total: int | None = None):
    """``enabled=None`` shows the bar only on an interactive terminal; True/False force it."""
    from tqdm.auto import tqdm  # here, not at import: `import pycompress` needs only torch

    show = sys.stderr.isatty() if enabled is None else enabled
    return tqdm(iterable, desc=desc, total=total, disable=not show, leave=False, file=sys.stderr)
