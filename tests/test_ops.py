"""Every op of pycompress.ops.OPS through torch.library.opcheck (schema, fake implementation, autograd
registration, AOT dispatch), torch.compile (fullgraph: no graph break) and torch.export, on every ISA
path, the compiled and exported calls bit-exact against the eager one: a new op joins OPS and gives its
cases here, or this file fails. (Layers and models under compile / export: tests/test_formats.py.)"""

from __future__ import annotations

import pytest
import torch

import pycompress as pc
from pycompress.nn import Int4Linear, Int8Linear, SparseInt8Linear, SparseLinear
from pycompress.ops import OPS


def _linear(n: int, k: int, gen: torch.Generator, two_of_four: bool = False) -> torch.nn.Linear:
    lin = torch.nn.Linear(k, n)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(n, k, generator=gen))
        if two_of_four:
            lin.weight.view(n, k // 4, 4)[..., 2:] = 0.0  # 2 nonzeros in every 4 along K
        else:
            lin.weight[torch.rand(n, k, generator=gen) < 0.5] = 0.0
        lin.bias.copy_(torch.randn(n, generator=gen))
    return lin


def _int8_linear(gen):
    mod = Int8Linear.from_float(_linear(20, 24, gen))
    w = (mod.w_packed, mod.col_sum, mod.w_scale, mod.bias)
    x, x3 = torch.randn(5, 24, generator=gen), torch.randn(2, 3, 24, generator=gen)
    return [(x, *w, 0, None, 0), (x3, *w, 2, 0.05, 7), (x[:0], *w, 1, None, 0), (x, *w, 0, None, 0, 7),
            (x3, *w, 1, 0.05, 100, 7)]


def _int4_linear(gen):
    grouped = Int4Linear.from_float(_linear(20, 64, gen), group_size=32)
    per_channel = Int4Linear.from_float(_linear(20, 13, gen), group_size=None, weight_bits=3)
    x, x3 = torch.randn(5, 64, generator=gen), torch.randn(2, 3, 13, generator=gen)

    def w(m):
        return (m.w4, m.g_scale, m.corr, m.bias, m.out_features, m.groups)

    return [(x, *w(grouped), 0, None, 0), (x3, *w(per_channel), 2, 0.05, 7), (x[:0], *w(grouped), 1, None, 0),
            (x, *w(grouped), 0, None, 0, 7)]


def _sparse_linear_csr(gen):
    csr = SparseLinear.from_float(_linear(8, 32, gen), format="csr")
    wide = SparseLinear.from_float(_linear(8, 1100, gen), format="csr")  # 3 K panels: the panel kernels' own order
    return [(torch.randn(3, 32, generator=gen), csr.row_ptr, csr.col_idx, csr.values, csr.bias, 1),
            (torch.randn(6, 1100, generator=gen), wide.row_ptr, wide.col_idx, wide.values, None, 0),
            (torch.randn(20, 1100, generator=gen), wide.row_ptr, wide.col_idx, wide.values, wide.bias, 2)]


def _sparse_linear_nm24(gen):
    nm = SparseLinear.from_float(_linear(8, 32, gen, two_of_four=True), format="nm24")
    return [(torch.randn(3, 32, generator=gen), nm.nm_idx, nm.values, nm.bias, 2)]


def _sparse_int8_linear(gen):
    i8 = SparseInt8Linear.from_float(_linear(8, 32, gen))
    return [(torch.randn(3, 32, generator=gen), i8.row_ptr, i8.blk_idx, i8.values, i8.col_sum, i8.w_scale, i8.bias,
             0, None, 0)]


def _sparse_int8_linear_sliced(gen):
    i8 = SparseInt8Linear.from_float(_linear(8, 32, gen))
    x = torch.randn(3, 32, generator=gen)
    return [(x, *i8._sliced_layout(False), i8.col_sum, i8.w_scale, i8.bias, 1, None, 0),
            (x, *i8._sliced_layout(True), i8.col_sum, i8.w_scale, i8.bias, 2, 0.05, 128)]


def _attention(gen):
    def heads(s, d):  # the transposed [B, S, H*D] view transformers passes
        return torch.randn(2, s, 3, d, generator=gen).transpose(1, 2)

    q, k, v = heads(9, 16), heads(11, 16), heads(11, 8)
    mask = torch.rand(2, 1, 9, 11, generator=gen) > 0.3
    return [(q, k, v, None, False, None), (q, k, v, mask, False, 0.5), (q, k, v, mask.float(), True, None),
            (q[:0], k[:0], v[:0], None, False, None)]


CASES = {
    "int8_linear": _int8_linear,
    "int4_linear": _int4_linear,
    "sparse_linear_csr": _sparse_linear_csr,
    "sparse_linear_nm24": _sparse_linear_nm24,
    "sparse_int8_linear": _sparse_int8_linear,
    "sparse_int8_linear_sliced": _sparse_int8_linear_sliced,
    "attention": _attention,
}


def test_ops_is_the_namespace():
    registered = {s.name.split("::", 1)[1] for s in torch._C._jit_get_all_schemas() if s.name.startswith("pycompress::")}
    assert set(OPS) == registered
    assert set(CASES) == set(OPS)  # every op has its cases here


@pytest.mark.parametrize("op", OPS)
def test_opcheck(isa, op, gen):
    for args in CASES[op](gen):
        torch.library.opcheck(getattr(torch.ops.pycompress, op).default, args)


class _OpCall(torch.nn.Module):
    """One call of an op with a case's arguments: its tensors are the inputs, the rest are constants."""

    def __init__(self, op: str, args: tuple) -> None:
        super().__init__()
        self.op = getattr(torch.ops.pycompress, op)
        self.args = args
        self.slots = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor)]

    def forward(self, *tensors):
        args = list(self.args)
        for i, t in zip(self.slots, tensors):
            args[i] = t
        return self.op(*args)


@pytest.mark.parametrize("op", OPS)
def test_compile_and_export_give_the_eager_bits(isa_paths, op, gen):
    for args in CASES[op](gen):
        call = _OpCall(op, args)
        tensors = tuple(args[i] for i in call.slots)
        torch._dynamo.reset()  # every case compiles afresh (one code object: no recompile limit)
        compiled = torch.compile(call, fullgraph=True)  # a graph break raises
        program = torch.export.export(call, tensors)
        targets = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
        assert targets == {f"pycompress.{op}.default"}, targets
        exported = program.module()
        for isa in isa_paths:
            pc.set_isa(isa)
            expected = call(*tensors)
            assert torch.equal(compiled(*tensors), expected), (isa, args)
            assert torch.equal(exported(*tensors), expected), (isa, args)
