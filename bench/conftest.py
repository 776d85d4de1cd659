"""pytest configuration of bench/ (run it explicitly: `pytest bench/`).

The main test run never collects this folder: pyproject.toml's testpaths is
["tests"]. Benchmark files are named bench_*.py, which pytest's default
python_files pattern (test_*.py) does not match, so they are collected here.
"""

from __future__ import annotations

import pytest


def pytest_collect_file(file_path, parent):
    # A file named on the command line is already collected by pytest itself.
    if file_path.suffix == ".py" and file_path.name.startswith("bench_") and not parent.session.isinitpath(file_path):
        return pytest.Module.from_parent(parent, path=file_path)
    return None
