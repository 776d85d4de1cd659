"""Inference modules that run pycompress kernels. Each holds only packed buffers
and what its kernel needs; build them with ``from_float``. Each class owns its
format and registers it in ``pycompress.nn.registry`` (pycompress/nn/README.md: adding a format)."""

from pycompress.nn.int8_conv import Im2colConv2d, Int8Conv2d
from pycompress.nn.int4_linear import Int4Linear
from pycompress.nn.int8_linear import Int8Linear, SharedInputGroup
from pycompress.nn.registry import FORMATS, LAYER_TYPES, CompressedLayer, Format, QuantParams, compressed_layers
from pycompress.nn.sparse_linear import SparseInt8Linear, SparseLinear

__all__ = ["FORMATS", "LAYER_TYPES", "CompressedLayer", "Format", "Im2colConv2d", "Int4Linear", "Int8Conv2d", "Int8Linear",
           "QuantParams", "SharedInputGroup", "SparseInt8Linear", "SparseLinear", "compressed_layers"]
