"""The `armquant` command line. Each subcommand lives beside the code it drives.

A module listed in COMMAND_MODULES defines `add_cli(subparsers)`, which adds its subparser and
sets `handler=` to a function taking the parsed arguments and returning an exit code.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

COMMAND_MODULES = [
    "armquant.models",  # convert, info
    "armquant.evaluate",  # eval
    "armquant.calibrate",  # calibrate
    "armquant.quantize",  # quantize
    "armquant.compare",  # compare
    "armquant.generate",  # generate
    "armquant.serve",  # serve
    "armquant.onnx",  # export, ort-quantize, parity
]


def positive_int(text: str) -> int:
    """argparse type of a count that must be at least 1 (windows, say)."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not a count: give at least 1")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="armquant",
        description=(
            "Quantize, export and serve language models that carry ARM, the Activation "
            "Redistribution Module (arXiv 2510.01032)."
        ),
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).add_cli(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if not getattr(args, "handler", None):
        parser.print_help()
        return 2
    try:
        return args.handler(args) or 0
    except (ValueError, FileNotFoundError, FileExistsError, TypeError, RuntimeError) as error:
        # Library errors already say what is wrong and how to fix it.
        print(f"armquant {args.command}: error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
