"""The one `adaspec-eagle` entry point. Each feature module contributes its subcommands through a
`register_cli(subparsers)` function; this file only assembles them and turns `AdaspecError` into a clear
message and exit status 2."""

from __future__ import annotations

import argparse
import importlib
import sys

from adaspec_eagle import AdaspecError, __version__

# Modules that contribute subcommands, in help order. Each defines register_cli(subparsers).
COMMAND_MODULES = (
    "adaspec_eagle.cli.demo",
    "adaspec_eagle.cli.models",
    "adaspec_eagle.cli.data",
    "adaspec_eagle.training.draft_lm",
    "adaspec_eagle.training.head",
    "adaspec_eagle.cli.generate",
    "adaspec_eagle.bench.runner",
    "adaspec_eagle.export.layouts",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="adaspec-eagle",
        description="Train speculative-decoding drafters with AdaSPEC selective distillation and run them.")
    parser.add_argument("--version", action="version", version=f"adaspec-eagle {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register_cli(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 1
    try:
        result = args.func(args)
    except AdaspecError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
