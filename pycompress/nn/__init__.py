"""Inference modules that run pycompress kernels. Each holds only packed buffers
and what its kernel needs; build them with ``from_float``."""

from pycompress.nn.int8_linear import Int8Linear
from pycompress.nn.sparse_linear import SparseInt8Linear, SparseLinear

__all__ = ["Int8Linear", "SparseInt8Linear", "SparseLinear"]
