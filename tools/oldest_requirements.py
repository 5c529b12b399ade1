"""The oldest release of each dependency pyproject.toml allows, as pip requirements, one per line.

    pip install $(python tools/oldest_requirements.py)

CI installs these together in a virtualenv of their own and runs minqwen there (.ci/run), so
that every lower bound in pyproject.toml is one that works: each ``name>=X`` becomes
``name==X``; other conditions (``!=``) are dropped, since they exclude newer releases only.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def oldest(requirement: str) -> str:
    """'numba>=0.59' → 'numba==0.59'; a requirement without a lower bound is an error naming it."""
    found = re.fullmatch(r"\s*([A-Za-z0-9_.\-]+)\s*(?:\[[^\]]*\])?\s*(.*)", requirement)
    name, conditions = found.group(1), found.group(2)
    floors = [c.strip()[2:].strip() for c in conditions.split(",") if c.strip().startswith(">=")]
    if len(floors) != 1:
        raise SystemExit(f"oldest_requirements.py: {requirement!r} has no single '>=' lower bound")
    return f"{name}=={floors[0]}"


def main() -> int:
    import tomllib  # Python 3.11 on

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    print("\n".join(oldest(r) for r in project["dependencies"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
