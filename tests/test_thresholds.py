"""The per-ISA-level thresholds of the untimed convert (pycompress/thresholds.py)."""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

import pycompress as pc
from pycompress import thresholds


def test_every_level_has_a_row_with_its_source():
    assert set(thresholds.TIERS) == set(pc.build_info()["isa_levels"])
    for level, row in thresholds.TIERS.items():
        assert row.int8_min_weights is None or row.int8_min_weights > 0, level
        for density in (row.sparse_int8_max_block_density, row.sparse_int8_byte_layout_max_density,
                        row.sparse_fp32_max_density):
            assert 0.0 <= density < 1.0, level
        assert row.measured, level
    # The byte sliced layout runs on avx512vbmi and amx (VBMI) only: no other row gives it a limit.
    assert sorted(lv for lv, row in thresholds.TIERS.items() if row.sparse_int8_byte_layout_max_density > 0) == \
        ["amx", "avx512vbmi"]


def test_current_follows_the_active_isa(monkeypatch, isa, pinned_thresholds):
    monkeypatch.setattr(thresholds, "current", pinned_thresholds)  # the real function, not the suite's pin
    assert thresholds.current() is thresholds.TIERS[isa]


def test_convert_reads_the_active_row(monkeypatch):
    torch.manual_seed(3)
    layer = nn.Linear(128, 128)
    pc.prune.prune(nn.Sequential(layer), 0.75, method="block")  # 1x4-block density 0.25
    base = thresholds.Thresholds(16384, 0.30, 0.0, 0.0, "test")
    for limit, sparse in ((0.30, True), (0.20, False)):
        row = dataclasses.replace(base, sparse_int8_max_block_density=limit)
        monkeypatch.setattr(thresholds, "current", lambda row=row: row)
        model = pc.convert(nn.Sequential(_copy(layer)), policy="auto")
        assert isinstance(model[0], pc.nn.SparseInt8Linear) == sparse, limit
        if not sparse:
            reason = pc.conversion_record(model).layers[0].not_considered["sparse-int8"]
            assert f"1x4 block density 0.25 > {limit}" in reason and pc.get_isa() in reason
    small = thresholds.Thresholds(64 * 64 + 1, 0.0, 0.0, 0.0, "test")
    monkeypatch.setattr(thresholds, "current", lambda: small)
    model = pc.convert(nn.Sequential(nn.Linear(64, 64)), policy="auto")
    assert type(model[0]) is nn.Linear
    assert "4096 weights < 4097" in pc.conversion_record(model).layers[0].reason
    # A level whose kernels lose to float (scalar) keeps every layer float without timing.
    never = thresholds.Thresholds(None, 0.5, 0.5, 0.5, "test")
    monkeypatch.setattr(thresholds, "current", lambda: never)
    model = pc.convert(nn.Sequential(nn.Linear(512, 512)), policy="auto")
    assert type(model[0]) is nn.Linear
    assert f"the {pc.get_isa()} kernels are slower than float torch" in pc.conversion_record(model).layers[0].reason


def _copy(layer: nn.Linear) -> nn.Linear:
    import copy

    return copy.deepcopy(layer)
