"""Shared fixtures. ``isa`` runs a test once per ISA path this CPU supports, or only on the path
that PYCOMPRESS_ISA forced (.ci/run reruns the suite per forced path; the unforced run already
covers every path through this fixture)."""

from __future__ import annotations

import os

import pytest

import pycompress as pc

ISA_PATHS = [pc.get_isa()] if os.environ.get("PYCOMPRESS_ISA") else pc.supported_isas()


@pytest.fixture(params=ISA_PATHS)
def isa(request):
    previous = pc.get_isa()
    pc.set_isa(request.param)
    yield request.param
    pc.set_isa(previous)


@pytest.fixture
def gen():
    import torch

    return torch.Generator().manual_seed(1234)
