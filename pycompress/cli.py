"""The ``pycompress`` command line: ``pycompress demo | info``."""

from __future__ import annotations

import argparse
import json
import sys


def cmd_demo(args: argparse.Namespace) -> int:
    from pycompress.demo import run_demo

    run_demo(quick=args.quick, seed=args.seed, progress=not args.quiet)
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    import pycompress

    print(json.dumps(pycompress.build_info(), indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pycompress", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="compress a digits classifier end to end and print the table")
    demo.add_argument("--quick", action="store_true", help="a short run (seconds), as CI uses")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--quiet", action="store_true", help="no progress output")
    demo.set_defaults(func=cmd_demo)
    info = sub.add_parser("info", help="print build_info(): version, ISAs, threads, CUDA")
    info.set_defaults(func=cmd_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
