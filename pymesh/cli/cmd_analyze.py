"""``pymesh analyze DIR_OR_FILES``: validate a mesh config directory like ``istioctl analyze``.

Prints each issue as ``Error [file:doc kind/ns/name] field: message``; exit code 1 when any
issue is an error, 0 otherwise.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

__all__ = ["register"]


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "analyze", help="validate Istio config files like istioctl analyze"
    )
    parser.add_argument("paths", nargs="+", type=Path, help="YAML files or directories")
    parser.add_argument(
        "--errors-only", action="store_true", help="print errors only (not warnings/info)"
    )
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from pymesh.controlplane.config import IssueLevel, load_config

    config, issues = load_config(list(args.paths))
    shown = [i for i in issues if not args.errors_only or i.level is IssueLevel.ERROR]
    for issue in shown:
        print(issue)
    errors = sum(1 for i in issues if i.is_error)
    if errors:
        print(f"\n{errors} error(s) found.")
        return 1
    if config is not None and not shown:
        print(
            f"\u2714 No validation issues found when analyzing {len(config.files)} file(s) "
            f"({len(config.services)} services)."
        )
    return 0
