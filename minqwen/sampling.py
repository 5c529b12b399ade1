"""From logits to the next token: penalties, temperature, top-k, top-p, min-p, then a draw.

The order is transformers' ``generate``: penalties → temperature → top-k → top-p → min-p →
draw. Temperature 0 means greedy: the argmax after penalties.

* **repetition_penalty** (transformers' definition, multiplicative): every id seen so far in
  the prompt or the output has its logit divided by the penalty if positive, multiplied by
  it if negative — either way made less likely. 1.0 turns it off.
* **presence_penalty** (the OpenAI API / vLLM definition, additive; transformers has none):
  the penalty is subtracted once from the logit of every id already *generated*. 0 turns it off.
* **top_k** keeps the k most likely ids (0: off); **top_p** keeps the smallest set of most
  likely ids whose probabilities add up to at least p (1.0: off); **min_p** drops ids less
  likely than min_p × the most likely one's probability (0: off).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .errors import MinqwenError, is_real_number, is_whole_number


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0

    def __post_init__(self):
        for name in ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty"):
            value = getattr(self, name)
            if not is_real_number(value) or not math.isfinite(value):
                raise MinqwenError(f"{name} must be a finite number, got {value!r}")
        checks = [
            (self.temperature >= 0, "temperature must be ≥ 0 (0 is greedy)"),
            (is_whole_number(self.top_k) and self.top_k >= 0, "top_k must be a whole number ≥ 0 (0 is off)"),
            (0 < self.top_p <= 1, "top_p must be in (0, 1]"),
            (0 <= self.min_p <= 1, "min_p must be in [0, 1]"),
            (self.repetition_penalty > 0, "repetition_penalty must be > 0 (1 is off)"),
        ]
        for ok, message in checks:
            if not ok:
                raise MinqwenError(message)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @classmethod
    def from_generation_config(cls, config: dict, source: str = "generation_config.json",
                               **overrides) -> SamplingParams:
        """A checkpoint's generation_config.json defaults, with ``overrides`` (None = keep default).

        ``source`` names the file in errors about its values.
        """
        do_sample = config.get("do_sample", True)
        if not isinstance(do_sample, bool):
            raise MinqwenError(f"{source}: do_sample must be true or false, got {do_sample!r}")
        values = {
            "temperature": config.get("temperature", 0.0) if do_sample else 0.0,
            "top_k": config.get("top_k") or 0,
            "top_p": config.get("top_p") or 1.0,
            "min_p": config.get("min_p") or 0.0,
            "repetition_penalty": config.get("repetition_penalty") or 1.0,
            "presence_penalty": config.get("presence_penalty") or 0.0,
        }
        try:
            cls(**values)  # the file's own values, checked before any override hides one
        except MinqwenError as e:
            raise MinqwenError(f"{source}: {e}") from None
        unknown = set(overrides) - set(values)
        if unknown:
            raise MinqwenError(f"unknown sampling option(s): {', '.join(sorted(unknown))}")
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)


def apply_penalties(logits: np.ndarray, seen_ids, generated_ids, params: SamplingParams) -> np.ndarray:
    """logits [V] with the repetition and presence penalties applied (a new array)."""
    logits = logits.astype(np.float32, copy=True)
    if params.repetition_penalty != 1.0 and len(seen_ids):
        ids = np.unique(np.asarray(seen_ids))
        values = logits[ids]
        logits[ids] = np.where(values > 0, values / params.repetition_penalty, values * params.repetition_penalty)
    if params.presence_penalty != 0.0 and len(generated_ids):
        logits[np.unique(np.asarray(generated_ids))] -= params.presence_penalty
    return logits


def softmax(logits: np.ndarray) -> np.ndarray:
    z = np.exp(logits - logits.max())
    return z / z.sum()


def filter_logits(logits: np.ndarray, params: SamplingParams) -> np.ndarray:
    """Temperature, then top-k, top-p and min-p: removed ids get −inf."""
    logits = logits / params.temperature
    if params.top_k and params.top_k < logits.size:
        kth = np.partition(logits, -params.top_k)[-params.top_k]
        logits = np.where(logits < kth, -np.inf, logits)
    if params.top_p < 1.0:
        # Drop the least likely ids while their total mass stays ≤ 1 − p, as transformers does:
        # summed from the bottom, float32 rounding cannot push a tiny tail over the line (summed
        # from the top, 1 − 2e-9 rounds to 1 and reaches p = 1 − 1e-16 one id too early).
        order = np.argsort(-logits, kind="stable")[::-1]  # [V]: least likely first, np.argmax's pick last
        tail = np.cumsum(softmax(logits)[order])  # [V]: mass of each id and every less likely one
        removed = order[:-1][tail[:-1] <= 1 - params.top_p]  # the most likely id always stays
        logits = logits.copy()
        logits[removed] = -np.inf
    if params.min_p > 0.0:
        probs = softmax(logits)
        logits = np.where(probs < params.min_p * probs.max(), -np.inf, logits)
    return logits


def sample_next(logits: np.ndarray, params: SamplingParams, rng: np.random.Generator,
                seen_ids=(), generated_ids=()) -> int:
    """The next token id from last-position logits [V]."""
    if not np.isfinite(logits).all():  # argmax would quietly pick id 0 over and over
        raise MinqwenError("the model computed NaN or infinite logits: its weights or config.json hold values "
                           "it cannot compute with (a NaN weight, say)")
    logits = apply_penalties(logits, seen_ids, generated_ids, params)
    if params.greedy:
        return int(np.argmax(logits))
    return int(rng.choice(logits.size, p=sampling_distribution(logits, params)))


def sampling_distribution(logits: np.ndarray, params: SamplingParams) -> np.ndarray:
    """What a token is drawn from, given logits [V] with penalties applied: float64 [V], summing to one."""
    probs = softmax(filter_logits(logits, params)).astype(np.float64)
    return probs / probs.sum()
