"""The one torch.library namespace every pycompress op is defined in."""

import torch

LIB = torch.library.Library("pycompress", "DEF")  # noqa: TOR901 (ops are defined below it)
