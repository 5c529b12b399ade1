"""Shared test helpers: fixture folders, greedy decoding, and the reference lane's import rule.

The reference lane (tests marked ``reference``) builds transformers models in-process. It
runs whenever torch and transformers are importable. Under CI (``CI=true``) they must be: a
skipped reference lane there is a failure, because a green CI without it proves nothing.
"""

import os
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures"
FIXTURE_NAMES = sorted(p.name for p in FIXTURES.iterdir() if (p / "expected.safetensors").is_file())


def greedy_continuation(model, prompt_ids, n: int) -> list[int]:
    """n tokens of greedy decoding after the prompt: a prefill, then one decode step per token."""
    cache = model.new_cache()
    logits = model.forward(prompt_ids, cache, last_only=True)
    generated = []
    for _ in range(n):
        generated.append(int(np.argmax(logits[-1])))
        logits = model.forward([generated[-1]], cache, last_only=True)
    return generated


def require_reference():
    """Import the reference (torch, transformers, tools/reference.py) or skip — or fail under CI."""
    try:
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as e:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(f"CI=true but the reference lane cannot run: {e}. Install with pip install -e '.[test,reference]'")
        pytest.skip(f"reference lane needs torch and transformers ({e})")
    sys.path.insert(0, str(ROOT / "tools"))
    import reference

    return reference
