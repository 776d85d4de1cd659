"""Inference modules that run pycompress kernels. Each holds only packed buffers
and what its kernel needs; build them with ``from_float``."""

from pycompress.nn.int8_linear import Int8Linear

__all__ = ["Int8Linear"]
