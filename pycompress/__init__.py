"""pycompress: native-accelerated model compression for PyTorch.

The CPU kernels live in ``pycompress._C`` (torch-free C++); ``pycompress.ops``
registers them as ``torch.ops.pycompress.*``; ``pycompress.nn`` holds the
inference modules that use them.
"""

from pycompress import distill, nn, ops, prune, quant, reference
from pycompress.attention import use_fused_attention
from pycompress._native import build_info, get_isa, set_isa, set_num_threads, supported_isas
from pycompress.conversion import conversion_record, convert
from pycompress.deep_compression import compression_report
from pycompress.io import load, save
from pycompress.programs import compile_program, export_program, load_compiled_program, load_program, program_info
from pycompress.quant import prepare_qat, quantize
from pycompress.summaries import summary
from pycompress.verification import verify

__version__ = build_info()["version"]

__all__ = [
    "build_info",
    "compile_program",
    "compression_report",
    "conversion_record",
    "convert",
    "distill",
    "export_program",
    "get_isa",
    "load",
    "load_compiled_program",
    "load_program",
    "nn",
    "ops",
    "prepare_qat",
    "program_info",
    "prune",
    "quant",
    "quantize",
    "reference",
    "save",
    "set_isa",
    "set_num_threads",
    "summary",
    "supported_isas",
    "use_fused_attention",
    "verify",
]
