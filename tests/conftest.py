"""Shared fixtures. ``isa`` runs a test once per ISA path this CPU supports."""

from __future__ import annotations

import pytest

import pycompress as pc


@pytest.fixture(params=pc.supported_isas())
def isa(request):
    previous = pc.get_isa()
    pc.set_isa(request.param)
    yield request.param
    pc.set_isa(previous)


@pytest.fixture
def gen():
    import torch

    return torch.Generator().manual_seed(1234)
