"""Pure-PyTorch references for every kernel: the same math in exact integer or
float32-step-by-step arithmetic (bit-exact targets) or float64 (accuracy targets).

Tests compare the native kernels to these. They are never used as a silent
fallback at run time.
"""

from pycompress.reference.attention import attention_ref
from pycompress.reference.conv import int8_conv2d_ref
from pycompress.reference.q8 import (
    gelu_exact,
    gelu_spec,
    int8_linear_ref,
    pack_int8_weights,
    q8_accumulate_ref,
    quantize_rows_ref,
    quantize_weight_per_channel,
    unpack_int8_weights,
)
from pycompress.reference.sparse import (
    fp32_error_bound,
    is_nm24,
    pack_bsr1x4,
    pack_csr,
    pack_nm24,
    sparse_linear_ref,
    unpack_bsr1x4,
    unpack_csr,
    unpack_nm24,
)

__all__ = [
    "attention_ref",
    "fp32_error_bound",
    "is_nm24",
    "pack_bsr1x4",
    "pack_csr",
    "pack_nm24",
    "sparse_linear_ref",
    "unpack_bsr1x4",
    "unpack_csr",
    "unpack_nm24",
    "gelu_exact",
    "gelu_spec",
    "int8_conv2d_ref",
    "int8_linear_ref",
    "pack_int8_weights",
    "q8_accumulate_ref",
    "quantize_rows_ref",
    "quantize_weight_per_channel",
    "unpack_int8_weights",
]
