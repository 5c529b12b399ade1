"""argparse types for the scripts in tools/: each refuses a bad value before any work starts.

    parser.add_argument("--threads", type=whole_number(1), default=2)
    parser.add_argument("--json", type=output_file)

A type that raises ``argparse.ArgumentTypeError`` makes argparse print a one-line
``error: argument --threads: …`` naming the option and exit with code 2. Checked when
parsing, because these tools run for minutes to hours: a typo in ``--json`` must not surface
only when the results are written at the end. Imports nothing beyond the standard library,
so that tools/bench.py's driver process can use it without importing minqwen.

:func:`require_reference` is the same kind of check for a missing library: a tool that needs
torch and transformers stops with one line that says how to install them.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path


def whole_number(minimum: int, maximum: int | None = None):
    """An int in minimum … maximum (inclusive; no maximum if None)."""
    bounds = f"≥ {minimum}" if maximum is None else f"in {minimum} … {maximum}"

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a whole number {bounds}, got {text!r}") from None
        if value < minimum or (maximum is not None and value > maximum):
            raise argparse.ArgumentTypeError(f"must be a whole number {bounds}, got {value}")
        return value

    return parse


def real_number(minimum: float, maximum: float | None = None, above_minimum: bool = False):
    """A finite float ≥ minimum (> minimum if ``above_minimum``) and ≤ maximum."""
    low = f"> {minimum:g}" if above_minimum else f"≥ {minimum:g}"
    bounds = low if maximum is None else f"{low} and ≤ {maximum:g}"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a number {bounds}, got {text!r}") from None
        # nan compares false with everything, so it would pass the range tests below
        if not math.isfinite(value) or value < minimum or (above_minimum and value == minimum) \
                or (maximum is not None and value > maximum):
            raise argparse.ArgumentTypeError(f"must be a number {bounds}, got {text}")
        return value

    return parse


def existing_file(text: str) -> Path:
    path = Path(text)
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"{text}: " + ("is a folder; give a file" if path.is_dir() else "no such file"))
    return path


def checkpoint_folder(text: str) -> Path:
    """A folder holding a config.json (what every minqwen and transformers loader starts from)."""
    path = Path(text)
    if not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text}: " + ("is a file; give a checkpoint folder" if path.exists()
                                                        else "no such folder"))
    if not (path / "config.json").is_file():
        raise argparse.ArgumentTypeError(f"{text}: no config.json in this folder; give a checkpoint folder")
    return path


def output_folder(text: str) -> Path:
    """A folder to write into: an existing one, or one that can be made (parents included)."""
    path = Path(text)
    existing = next(p for p in (path.absolute(), *path.absolute().parents) if p.exists())
    if not existing.is_dir():
        where = "is a file" if existing == path.absolute() else f"{existing} is a file, not a folder"
        raise argparse.ArgumentTypeError(f"{text}: {where}; give a folder to write to")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise argparse.ArgumentTypeError(f"{text}: {existing} is not writable")
    return path


def output_file(text: str) -> Path:
    """A file to write: its folder must exist (nothing makes it) and be writable."""
    path = Path(text)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text}: is a folder; give a file name")
    folder = path.absolute().parent
    if not folder.is_dir():
        raise argparse.ArgumentTypeError(f"{text}: the folder {folder} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise argparse.ArgumentTypeError(f"{text}: not writable")
    return path


def require_reference(prog: str) -> None:
    """Import tools/reference.py (torch, transformers 5.23.0), or exit 2 saying how to install them.

    Called before a tool's first use of torch: without the reference extra, that first
    ``import torch`` would end the tool in a traceback, while reference.py's import error names
    what is missing and the command that installs it. The message is printed as argparse prints
    a bad option (``prog: error: …``), with its exit code.
    """
    from minqwen.errors import MinqwenError  # here, not above: the bench's driver imports this module

    try:
        import reference  # noqa: F401  (a sibling script, on sys.path like this one)
    except MinqwenError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
