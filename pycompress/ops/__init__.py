"""The kernels as torch ops: ``torch.ops.pycompress.*``.

Each op is declared once with ``torch.library``; its fake (meta) implementation
sits beside the CPU one so torch.compile and torch.export trace through
converted models without running the kernels.
"""

import torch

from pycompress.ops._library import LIB
from pycompress.ops import attention  # the module: registers torch.ops.pycompress.attention
from pycompress.ops.q8 import int8_linear
from pycompress.ops.q4 import int4_linear
from pycompress.ops.sparse import sparse_int8_linear, sparse_int8_linear_sliced, sparse_linear_csr, sparse_linear_nm24

# Every op of the namespace: the one list the op tests (tests/test_ops.py: opcheck on every ISA path) iterate;
# a test checks it against the schemas torch has registered under pycompress::.
OPS = ("int8_linear", "int4_linear", "sparse_linear_csr", "sparse_linear_nm24", "sparse_int8_linear", "sparse_int8_linear_sliced",
       "attention")


def _without_cuda_kernel(op: str, with_kernel: tuple[str, ...]):
    def refuse(*args, **kwargs):
        raise NotImplementedError(f"pycompress::{op} has no CUDA kernel yet (these ops have one: "
                                  f"{', '.join(with_kernel)}): keep this layer on CPU, or convert a CUDA model, "
                                  "which picks the formats that have one")
    return refuse


# The ops without a CUDA kernel refuse CUDA tensors with that explanation instead of the dispatcher's.
_WITH_CUDA = tuple(op for op in OPS if torch._C._dispatch_has_kernel_for_dispatch_key(f"pycompress::{op}", "CUDA"))
for _op in OPS:
    if _op not in _WITH_CUDA:
        LIB.impl(_op, _without_cuda_kernel(_op, _WITH_CUDA), "CUDA")

__all__ = ["LIB", "OPS", "attention", "int4_linear", "int8_linear", "sparse_int8_linear", "sparse_int8_linear_sliced", "sparse_linear_csr", "sparse_linear_nm24"]
