"""Shared fixtures. ``isa`` runs a test once per ISA path this CPU supports, or only on the path
that PYCOMPRESS_ISA forced (.ci/run reruns the suite per forced path; the unforced run already
covers every path through this fixture)."""

from __future__ import annotations

import os

import pytest

import pycompress as pc
from pycompress import _cuda, thresholds

# Under pytest-xdist (README's `pytest -q -n auto`: a worker per core, at most 8) the workers share the cores:
# each runs torch and the kernels on its share. Tests that are about thread counts set their own.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    import torch

    torch.set_num_threads(max(1, torch.get_num_threads() // _WORKERS))

FORCED_ISA = bool(os.environ.get("PYCOMPRESS_ISA"))
ISA_PATHS = [pc.get_isa()] if FORCED_ISA else pc.supported_isas()


ISA_FIXTURES = ("isa", "isa_paths")


def pytest_collection_modifyitems(config, items):
    # A test that runs each ISA path through the isa / isa_paths fixtures is marked every_isa: the unforced
    # run already ran it on every path (pc.set_isa), so .ci/run's reruns per forced path deselect it
    # (-m "not every_isa") and run the rest of the suite, which takes the forced path.
    for item in items:
        if any(name in getattr(item, "fixturenames", ()) for name in ISA_FIXTURES):
            item.add_marker(pytest.mark.every_isa)
    # GPU tests (marked cuda) run where the CUDA module is built and a device is usable (bench/gpu_check.sh);
    # elsewhere they are skipped with the reason.
    cuda = _cuda.status()
    if not cuda["usable"]:
        skip_cuda = pytest.mark.skip(reason=f"cuda: {cuda['reason']}")
        for item in items:
            if "cuda" in item.keywords:
                item.add_marker(skip_cuda)
    # Checks marked once_per_ci run in the unforced run only: .ci/run repeats the suite per forced path for
    # the kernels, and these (training, the loader fuzz, which compares the paths itself) would only repeat.
    if not FORCED_ISA:
        return
    skip = pytest.mark.skip(reason="once_per_ci: ran in the unforced run (PYCOMPRESS_ISA forces a path here)")
    for item in items:
        if "once_per_ci" in item.keywords:
            item.add_marker(skip)


# The untimed convert thresholds the tests assume, whatever the CPU's row in pycompress/thresholds.py
# (test_thresholds.py checks the rows themselves and that convert reads the active one).
PINNED_THRESHOLDS = thresholds.Thresholds(16384, 0.30, 0.30, 0.06, "pinned by tests/conftest.py")


@pytest.fixture(scope="session", autouse=True)
def pinned_thresholds():
    """Pins thresholds.current for the whole session (before any module-scoped fixture converts a model);
    yields the real function for the tests of the rows themselves."""
    real = thresholds.current
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(thresholds, "current", lambda: PINNED_THRESHOLDS)
        yield real


@pytest.fixture(params=ISA_PATHS)
def isa(request):
    previous = pc.get_isa()
    pc.set_isa(request.param)
    yield request.param
    pc.set_isa(previous)


@pytest.fixture
def isa_paths():
    """The ISA paths of this run (as ``isa``), for a test whose setup is the expensive part and does not depend on
    the path (a compile, an export): it sets up once and runs each path itself with ``pc.set_isa``. The path
    active before is restored."""
    previous = pc.get_isa()
    yield ISA_PATHS
    pc.set_isa(previous)


@pytest.fixture
def gen():
    import torch

    return torch.Generator().manual_seed(1234)
