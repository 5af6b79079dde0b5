"""``pymesh`` entry point.

Each subcommand lives in its own module ``pymesh/cli/cmd_<name>.py`` exposing
``register(subparsers) -> None``; the module adds one parser and sets ``func`` on it
(``func(args) -> int`` returns the exit code). Modules are discovered, so adding a command
never edits this file.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys
from collections.abc import Sequence

import pymesh
from pymesh.errors import PymeshError

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pymesh", description="Istio's data plane as a Python library."
    )
    parser.add_argument("--version", action="version", version=f"pymesh {pymesh.__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    package = importlib.import_module("pymesh.cli")
    for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda m: m.name):
        if info.name.startswith("cmd_"):
            module = importlib.import_module(f"pymesh.cli.{info.name}")
            module.register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    func = getattr(args, "func", None)
    if func is None:
        parser.print_help()
        return 2
    try:
        return int(func(args))
    except PymeshError as exc:
        # Configuration and mesh errors carry a complete message: no traceback for users.
        print(f"pymesh {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
