"""Shared test helpers: fixture folders, greedy decoding, and the reference lane's import rule.

The reference lane (tests marked ``reference``) builds transformers models in-process. It
runs whenever torch and transformers are importable. Under CI (``CI=true``) they must be: a
skipped reference lane there is a failure, because a green CI without it proves nothing.
"""

import math
import os
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures"
FIXTURE_NAMES = sorted(p.name for p in FIXTURES.iterdir() if (p / "expected.safetensors").is_file())


def reordering_bound(x, w32):
    """How far a float32 product x · w32ᵀ may move when its sums are reordered: ~n · 2⁻²⁴ · Σ|terms|."""
    return 2 * x.shape[1] * 2.0**-24 * (np.abs(x) @ np.abs(w32).T) + 1e-30


def greedy_continuation(model, prompt_ids, n: int) -> list[int]:
    """n tokens of greedy decoding after the prompt: a prefill, then one decode step per token."""
    cache = model.new_cache()
    logits = model.forward(prompt_ids, cache, last_only=True)
    generated = []
    for _ in range(n):
        generated.append(int(np.argmax(logits[-1])))
        logits = model.forward([generated[-1]], cache, last_only=True)
    return generated


def _erf(x):
    return np.vectorize(math.erf, otypes=[np.float64])(x)


# What each config.json hidden_act means (transformers' ACT2FN), written out in float64: the
# independent side of the tests that check minqwen applies the activation a config names.
DIRECT_ACTIVATIONS = {
    "silu": lambda x: x / (1 + np.exp(-x)),
    "swish": lambda x: x / (1 + np.exp(-x)),
    "gelu": lambda x: 0.5 * x * (1 + _erf(x / math.sqrt(2))),
    "gelu_pytorch_tanh": lambda x: 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3))),
    "relu": lambda x: np.where(x > 0, x, 0.0),
}


def softmax64(x):
    """Softmax in float64, the independent side of the sampling tests."""
    x = np.asarray(x, np.float64)
    z = np.exp(x - x.max())
    return z / z.sum()


def penalized64(logits, seen, generated, rep=1.0, presence=0.0):
    """The documented penalties in float64: repetition over every seen id, presence over generated ids."""
    out = np.asarray(logits, np.float64).copy()
    for i in set(seen):
        out[i] = out[i] / rep if out[i] > 0 else out[i] * rep
    for i in set(generated):
        out[i] -= presence
    return out


# Chat sessions under test: a model that keeps what it computed, and answers forced token by token.


class Recorder:
    """The model, with the logits of every forward call kept (last row only)."""

    def __init__(self, model):
        self.model, self.rows = model, []

    def forward(self, *args, **kwargs):
        logits = self.model.forward(*args, **kwargs)
        self.rows.append(logits[-1].copy())
        return logits

    def __getattr__(self, name):
        return getattr(self.model, name)


def forced(tokens):
    """A drop-in for generate_ids that yields exactly ``tokens``, keeping the cache's invariant."""

    def decode(model, prompt_ids, params, max_new_tokens, stop_ids, seed, cache, history, stats):
        model.forward(list(prompt_ids), cache, last_only=True)
        for i, token in enumerate(tokens):
            yield token
            if i + 1 < len(tokens):
                model.forward([token], cache, last_only=True)

    return decode


def skip_or_fail(reason: str, whole_module: bool = False) -> None:
    """Skip a test (or, from a module's top level, all of its tests) whose optional dependency is
    missing — or fail it under CI, where every lane must run."""
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"CI=true, but {reason}")
    pytest.skip(reason, allow_module_level=whole_module)


STORED_ITEMSIZE = {"F32": 4, "BF16": 2, "F16": 2, "F8_E4M3": 1}  # bytes per element, by safetensors dtype


def tensor_headers(folder) -> dict[str, tuple[str, tuple[int, ...]]]:
    """name → (safetensors dtype, shape) of every tensor stored in a checkpoint folder, read from
    the file headers alone (a fixture's expected.safetensors holds outputs, not weights: skipped)."""
    import json
    import struct

    out = {}
    for path in sorted(Path(folder).glob("*.safetensors")):
        if path.name == "expected.safetensors":
            continue
        with open(path, "rb") as f:
            header = json.loads(f.read(struct.unpack("<Q", f.read(8))[0]))  # 8-byte length, then JSON
        header.pop("__metadata__", None)
        out.update({name: (info["dtype"], tuple(info["shape"])) for name, info in header.items()})
    return out


def require_reference():
    """Import the reference (torch, transformers, tools/reference.py), or skip_or_fail."""
    try:
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as e:
        skip_or_fail(f"the reference lane needs torch and transformers ({e}); "
                     "install them with pip install -e '.[test,reference]'")
    sys.path.insert(0, str(ROOT / "tools"))
    import reference

    return reference


def require_pillow():
    """Pillow (the optional extra), or skip_or_fail."""
    try:
        import PIL.Image
    except ImportError as e:
        skip_or_fail(f"this test needs Pillow ({e}); install it with pip install pillow")
    return PIL.Image


def chi_square_critical(df: int, z: float) -> float:
    """The upper quantile of chi-square(df) at standard-normal quantile z (Wilson–Hilferty)."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


# z = 3.09: a chi-square check at this quantile fails a correct implementation with probability
# 1e-3 for a seed drawn at random; with the tests' fixed seeds the outcome is deterministic.
FALSE_ALARM_Z = 3.0902
