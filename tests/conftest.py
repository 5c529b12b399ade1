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


def fixture_with_word_tokenizer(tmp_path) -> Path:
    """The text_tied_fp32 fixture (linked) with a three-word tokenizer.json: "hello" → 11,
    "world" → 22, anything else → 0. For tools that tokenize a --prompt with the checkpoint's own file."""
    from tokenizers import Tokenizer, pre_tokenizers
    from tokenizers.models import WordLevel

    folder = tmp_path / "ckpt"
    folder.mkdir()
    for file in (FIXTURES / "text_tied_fp32").iterdir():
        (folder / file.name).symlink_to(file)
    tokenizer = Tokenizer(WordLevel({"[UNK]": 0, "hello": 11, "world": 22}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.save(str(folder / "tokenizer.json"))
    return folder


def set_model_type(folder, model_type: str) -> None:
    """Rewrite folder/config.json as a checkpoint of ``model_type`` (an MoE type gets 4 tiny experts)."""
    import json

    config = json.loads((Path(folder) / "config.json").read_text())
    config["model_type"] = model_type
    if "moe" in model_type:
        config.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=8, shared_expert_intermediate_size=8)
    (Path(folder) / "config.json").write_text(json.dumps(config))


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


# ----------------------------------------------------------------------------- the live reference lanes

# Logits of a drawn config agree with transformers' float32 within LIVE_ATOL. A few draws in a
# hundred miss it with no bug on either side: a Gated DeltaNet readout that nearly cancels is
# then scaled up by the gated norm, and both float32 implementations land 1e-4 or more from the
# exact value, each by its own rounding (transformers' own logits moved 2.4e-4 between one and
# two torch threads on one such draw). There the algebra decides: both sides computing in
# float64 must agree to FLOAT64_ATOL, and float32 stay within FLOAT32_SANITY. A real bug moves
# float64 logits by far more than 1e-9. Every live lane judges so — text and MoE here, the MTP
# head (test_mtp), the vision tower (test_vision) and YaRN (test_yarn) — through
# misses_live_atol and assert_agree_in_float64.
LIVE_ATOL = 1e-4
FLOAT64_ATOL = 1e-9  # float64 round-off, however much a near-cancelling draw amplifies it (~1e-13), stays below
FLOAT32_SANITY = 2e-3  # the largest float32 gap met on such draws (3.8e-4), with room


def misses_live_atol(got, expected) -> bool:
    """Whether any of minqwen's float32 outputs (a list of arrays) is more than LIVE_ATOL from the reference's.

    A NaN or an infinity anywhere, or a shape that differs, is a miss too, which the float64
    judge then fails. (``abs(g - e).max() > atol`` let NaN through: NaN compares as False, and
    the subtraction broadcasts over a wrong shape.)
    """
    return any(g.shape != e.shape or not (np.isfinite(g).all() and np.isfinite(e).all())
               or not np.allclose(g, e, rtol=0, atol=LIVE_ATOL) for g, e in zip(got, expected, strict=True))


def assert_agree_in_float64(got, expected, got64, exact, what: str, labels=None) -> None:
    """The float64 judge's verdict on a draw that missed LIVE_ATOL in float32.

    Four lists of arrays, output for output: minqwen's float64 outputs ``got64`` must be within
    FLOAT64_ATOL of the float64 reference's ``exact`` (the algebra is the same), and its
    float32 ``got`` within FLOAT32_SANITY of ``expected`` or of ``exact``: at a router near-tie
    (two experts' probabilities 1e-8 apart) the reference's float32 can pick the other expert
    than its own float64, and a logit jumps by ~1 while minqwen's float32 stays near the exact
    values. ``labels`` name the outputs in a failure (by default "step 0", "step 1", …).
    """
    labels = labels or [f"step {i}" for i in range(len(got))]
    for label, g, e, g64, x in zip(labels, got, expected, got64, exact, strict=True):
        for name, array in (("float32", g), ("float64", g64), ("the reference's float32", e), ("the reference's float64", x)):
            assert np.isfinite(array).all(), f"{name} {label} of {what} holds NaN or infinite values"
        np.testing.assert_allclose(g64, x, rtol=0, atol=FLOAT64_ATOL, err_msg=f"float64, {label} of {what}")
        if np.abs(g - x).max() > FLOAT32_SANITY:  # far from exact: then it must be the reference's float32
            np.testing.assert_allclose(g, e, rtol=0, atol=FLOAT32_SANITY, err_msg=f"float32, {label} of {what}")


def reference_steps(model, ids, prompt_len: int) -> list:
    """transformers' logits: the prompt's [T, V], then one [1, V] per cached decode step over ids[prompt_len:]."""
    import torch

    with torch.no_grad():
        out = model(input_ids=torch.tensor(ids[None, :prompt_len]), use_cache=True)
        steps = [out.logits[0].numpy()]
        for token in ids[prompt_len:]:
            out = model(input_ids=torch.tensor([[token]]), past_key_values=out.past_key_values, use_cache=True)
            steps.append(out.logits[0].numpy())
    return steps


def minqwen_steps(model, ids, prompt_len: int) -> list:
    """minqwen's logits, step for step as :func:`reference_steps`."""
    cache = model.new_cache()
    return [model.forward(ids[:prompt_len], cache)] + [model.forward([token], cache) for token in ids[prompt_len:]]


def assert_logits_match_reference(reference, model, ours, ids, prompt_len: int, what: str) -> None:
    """minqwen (``ours``) against the transformers ``model`` it was saved from, over a prompt and cached steps."""
    expected, got = reference_steps(model, ids, prompt_len), minqwen_steps(ours, ids, prompt_len)
    if misses_live_atol(got, expected):
        judge_in_float64(reference, model, ours, ids, prompt_len, got, expected, what)


def judge_in_float64(reference, model, ours, ids, prompt_len: int, got, expected, what: str) -> None:
    """Past LIVE_ATOL in float32: the same steps computed in float64 on both sides, judged by
    :func:`assert_agree_in_float64`."""
    import copy

    with reference.computing_in_float64():
        exact = reference_steps(copy.deepcopy(model).double(), ids, prompt_len)
    ours64 = minqwen_steps(ours.astype(np.float64), ids, prompt_len)
    assert_agree_in_float64(got, expected, ours64, exact, what)
