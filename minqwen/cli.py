"""The `minqwen` command line: one subcommand per job, each a thin layer over the Python API.

Every error a user can cause ends as a one-line message and a non-zero exit code, never a
traceback: MinqwenError is caught here and printed.
"""

from __future__ import annotations

import argparse
import sys

from . import __version__, golden
from .errors import MinqwenError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="minqwen", description="Qwen3.5 in readable NumPy.")
    parser.add_argument("--version", action="version", version=f"minqwen {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    golden.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.run(args) or 0)
    except MinqwenError as e:
        print(f"minqwen: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
