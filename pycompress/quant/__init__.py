"""Training-time quantization: PTQ (``quantize``), QAT (``prepare_qat``), Conv+BN folding.

Contract with ``pycompress.convert`` (implemented here, tested in tests/test_quant*.py):

- After ``quantize(model, ...)`` or ``prepare_qat(model, ...)`` (and training), each
  quantized ``nn.Linear`` / ``nn.Conv2d`` stays that type and
  ``get_quant_state(module)`` returns a ``QuantState`` (None for layers that were not
  quantized):

  - ``weight_bits: int``, ``group_size: int | None`` (None: per channel)
  - ``weight_scale``: symmetric, ``q in [-(2^(b-1)-1), 2^(b-1)-1]``; per channel float32
    ``[out_channels]``, exactly
    ``pycompress.reference.q8.quantize_weight_per_channel(W, weight_bits)`` for ``W`` the
    layer's float weight with its pruning mask applied (``pycompress.prune.masked_float_weight``)
    viewed as ``[out, in * kh * kw]``; grouped float32 ``[out_channels, K / group_size]``, exactly
    ``pycompress.reference.q4.quantize_weight_grouped(W, weight_bits, group_size, scale)`` with W
    viewed as ``[out, K]`` (a Conv2d in the im2col order ``[out, kh * kw * in]``). The scales are
    max|w| / qmax (round to nearest) or fixed by GPTQ (``method="gptq"``, pycompress.quant.gptq,
    which also sets the float weight to exactly ``q * scale``). ``quantized_weight(module)``
    returns ``(q, scale)``.
  - ``activations: "dynamic" | "static"``
  - ``act_scale: float | None``, ``act_zero_point: int``: uint8 asymmetric,
    ``q = clamp(round(x / scale) + zp, 0, 255)`` as in csrc/q8/q8_gemm.h (static only;
    dynamic has ``None`` / 0 and quantizes per row at run time).
  - ``act_bits: int`` (8, or 7 for the u7 format that AVX2 runs faster; convert runs other widths on 8).

- The model's float forward simulates exactly that arithmetic (fake quant), so its
  accuracy before convert is what the kernels should give (up to float summation order).
  Dynamic activations are simulated per row for a Linear (each vector along the last
  dim) and per im2col row for a Conv2d (each output position's receptive field, zero
  padding included), as the kernels quantize them (``fake_quant.im2col_conv_forward``).
- Pruning masks (pycompress.prune) are kept below the weight fake-quant: pruned weights
  quantize to exact zeros.
- Quantization state lives in parametrizations (``WeightFakeQuant`` on ``weight``) and
  in a ``activation_fake_quant`` submodule applied by a forward pre-hook; convert must
  drop both (it reads only ``get_quant_state`` and ``quantized_weight``).
- Weight bits below 8 are simulated; the int8 kernels run per-channel ones as int8 values in
  the reduced range. Grouped scales need a grouped (4-bit) format.
- QAT on a converted model (one holding ``pycompress.nn`` modules) is a ValueError.
"""

from pycompress.quant.api import (
    QuantState,
    freeze_ranges,
    get_quant_state,
    prepare_qat,
    quantize,
    quantized_weight,
    remove_fake_quant,
)
from pycompress.quant.fake_quant import ActivationFakeQuant, WeightFakeQuant
from pycompress.quant.fold import fold_conv_bn
from pycompress.quant.gptq import gptq_quantize
from pycompress.quant.observers import (
    MinMaxObserver,
    MSEObserver,
    PercentileObserver,
    affine_qparams,
    fake_quantize_affine,
)

__all__ = [
    "ActivationFakeQuant",
    "MSEObserver",
    "MinMaxObserver",
    "PercentileObserver",
    "QuantState",
    "WeightFakeQuant",
    "affine_qparams",
    "fake_quantize_affine",
    "fold_conv_bn",
    "freeze_ranges",
    "get_quant_state",
    "gptq_quantize",
    "prepare_qat",
    "quantize",
    "quantized_weight",
    "remove_fake_quant",
]
