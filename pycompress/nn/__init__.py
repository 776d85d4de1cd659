"""Inference modules that run pycompress kernels. Each holds only packed buffers
and what its kernel needs; build them with ``from_float``."""

from pycompress.nn.int8_conv import Im2colConv2d, Int8Conv2d
from pycompress.nn.int8_linear import Int8Linear, SharedInputGroup
from pycompress.nn.sparse_linear import SparseInt8Linear, SparseLinear

__all__ = ["Im2colConv2d", "Int8Conv2d", "Int8Linear", "SharedInputGroup", "SparseInt8Linear", "SparseLinear"]
