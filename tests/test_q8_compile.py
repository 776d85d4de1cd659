"""torch.compile and torch.export see through Int8Linear (no graph breaks)."""

from __future__ import annotations

import torch

import pycompress as pc


def _model():
    torch.manual_seed(0)
    float_model = torch.nn.Sequential(torch.nn.Linear(32, 48), torch.nn.ReLU(), torch.nn.Linear(48, 8))
    return torch.nn.Sequential(pc.nn.Int8Linear.from_float(float_model[0], activation="relu"),
                               pc.nn.Int8Linear.from_float(float_model[2])).eval()


def test_compile_fullgraph_matches_eager():
    model = _model()
    compiled = torch.compile(model, fullgraph=True, dynamic=True)
    for m in (1, 5, 17):
        x = torch.randn(m, 32)
        assert torch.equal(compiled(x), model(x))


def test_export_holds_pycompress_ops_and_round_trips(tmp_path):
    model = _model()
    x = torch.randn(4, 32)
    batch = torch.export.Dim("batch", min=1, max=1024)
    exported = torch.export.export(model, (x,), dynamic_shapes=({0: batch},))
    targets = {str(node.target) for node in exported.graph.nodes if node.op == "call_function"}
    assert "pycompress.int8_linear.default" in targets
    path = tmp_path / "model.pt2"
    torch.export.save(exported, path)
    loaded = torch.export.load(path)
    for m in (1, 9):
        xi = torch.randn(m, 32)
        assert torch.equal(loaded.module()(xi), model(xi))
