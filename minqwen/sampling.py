"""From logits to the next token: penalties, temperature, top-k, top-p, min-p, then a draw.

The order is transformers' ``generate``: penalties → temperature → top-k → top-p → min-p →
draw. Temperature 0 means greedy: the argmax after penalties.

* **repetition_penalty** (transformers' definition, multiplicative): every id seen so far in
  the prompt or the output has its logit divided by the penalty if positive, multiplied by
  it if negative — either way made less likely when the penalty is above 1 (below 1, more
  likely). 1.0 turns it off.
* **presence_penalty** (the OpenAI API / vLLM definition, additive; transformers has none):
  the penalty is subtracted once from the logit of every id already *generated*. 0 turns it off.
* **top_k** keeps the k most likely ids (0: off); **top_p** keeps the smallest set of most
  likely ids whose probabilities add up to at least p (1.0: off; of ids tied at the cut, the
  lower ids go first, as in transformers); **min_p** drops ids less
  likely than min_p × the most likely one's probability (0: off).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import MinqwenError, is_finite_number, is_whole_number

# generation_config.json fields transformers' generate() applies and minqwen does not, each with
# the value that leaves decoding as it is (what transformers assumes when the field is absent).
UNIMPLEMENTED_GENERATION_FIELDS = {
    "no_repeat_ngram_size": 0, "bad_words_ids": None, "suppress_tokens": None, "begin_suppress_tokens": None,
    "min_new_tokens": None, "min_length": 0, "forced_bos_token_id": None, "forced_eos_token_id": None,
    "num_beams": 1, "num_beam_groups": 1, "typical_p": 1.0, "epsilon_cutoff": 0.0, "eta_cutoff": 0.0,
    "sequence_bias": None, "stop_strings": None, "top_h": None, "penalty_alpha": None, "guidance_scale": None,
    "exponential_decay_length_penalty": None,
}

NON_FINITE_LOGITS = ("the model computed NaN or infinite logits: its weights or config.json hold values "
                     "it cannot compute with (a NaN weight, say)")


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
            if not is_finite_number(value):
                raise MinqwenError(f"{name} must be a finite number, got {_shown(value)}")
        checks = [
            (self.temperature >= 0, "temperature must be ≥ 0 (0 is greedy)", self.temperature),
            (is_whole_number(self.top_k) and self.top_k >= 0, "top_k must be a whole number ≥ 0 (0 is off)",
             self.top_k),
            (0 < self.top_p <= 1, "top_p must be in (0, 1] (1 is off)", self.top_p),
            (0 <= self.min_p <= 1, "min_p must be in [0, 1] (0 is off)", self.min_p),
            (self.repetition_penalty > 0, "repetition_penalty must be > 0 (1 is off)", self.repetition_penalty),
        ]
        for ok, message, value in checks:
            if not ok:
                raise MinqwenError(f"{message}, got {_shown(value)}")
        for name in ("repetition_penalty", "presence_penalty"):  # they meet float32 logits
            value = getattr(self, name)
            with np.errstate(over="ignore"):
                as_float32 = np.float32(value)
            if not np.isfinite(as_float32) or (name == "repetition_penalty" and as_float32 == 0):  # (it divides)
                smallest = "; at least 1e-45, since it divides" if name == "repetition_penalty" else ""
                raise MinqwenError(f"{name} must fit in float32, the logits' type (magnitude up to 3e38{smallest}), "
                                   f"got {_shown(value)}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @classmethod
    def from_generation_config(cls, config: dict, source: str = "generation_config.json",
                               **overrides) -> SamplingParams:
        """A checkpoint's generation_config.json defaults, with ``overrides`` (None = keep default).

        ``source`` names the file in errors about its values.
        """
        if not isinstance(config, dict):
            raise MinqwenError(f"{source}: the generation config must be a JSON object (a dict), got "
                               f"{type(config).__name__}")
        # Absent or null, do_sample is off, as transformers reads it: a file that sets only a
        # temperature (or top_k …) decodes greedily there, so it does here.
        do_sample = config.get("do_sample")
        do_sample = False if do_sample is None else do_sample
        if not isinstance(do_sample, bool):
            raise MinqwenError(f"{source}: do_sample must be true or false, got {do_sample!r}")

        def setting(name, default):
            # A missing or null field takes transformers' generate() default (temperature 1, top-k 50):
            # a 0 in the file is a value, checked like any other.
            value = config.get(name)
            return default if value is None else value

        values = {
            "temperature": setting("temperature", 1.0),
            "top_k": setting("top_k", 50),
            "top_p": setting("top_p", 1.0),
            "min_p": setting("min_p", 0.0),
            "repetition_penalty": setting("repetition_penalty", 1.0),
            "presence_penalty": setting("presence_penalty", 0.0),
        }
        try:
            cls(**values)  # the file's own values, checked before any override hides one
        except MinqwenError as e:
            raise MinqwenError(f"{source}: {e}") from None
        if not do_sample:
            values["temperature"] = 0.0  # greedy: the file's temperature is for sampling only
        unknown = set(overrides) - set(values)
        if unknown:
            hint = ("; minqwen has no do_sample: a temperature above 0 samples, temperature 0 is greedy"
                    if "do_sample" in unknown else "")
            raise MinqwenError(f"unknown sampling option(s): {', '.join(sorted(unknown))}{hint}")
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)


def filters_unused(params: SamplingParams, overrides: dict) -> list[str]:
    """The names of the filters given in ``overrides`` (not None) that change nothing: decoding is greedy.

    Top-k, top-p and min-p only shape a distribution to sample from, and greedy decoding takes
    the argmax (transformers warns the same). Said by a warning, not an error: the call runs.
    """
    if not params.greedy:
        return []
    return [name for name in ("top_k", "top_p", "min_p") if overrides.get(name) is not None]


def _shown(value) -> str:
    text = repr(value)
    return text if len(text) <= 30 else f"{text[:12]}… ({len(text)} characters)"


def apply_penalties(logits: np.ndarray, seen_ids, generated_ids, params: SamplingParams) -> np.ndarray:
    """logits [V] with the repetition and presence penalties applied (a new float32 array).

    An extreme penalty can push a logit past float32's range, to ±inf: sampling_distribution
    stops there with an error naming the penalty; greedy decoding takes the argmax regardless.
    """
    # In float32, as the reference computes. SamplingParams keeps each penalty a finite, nonzero
    # float32, so a finite logit can overflow to ±inf here but never become NaN.
    logits = logits.astype(np.float32, copy=True)
    with np.errstate(over="ignore"):  # no NumPy warning about an overflow: the error above says more
        if params.repetition_penalty != 1.0 and len(seen_ids):
            ids = np.unique(np.asarray(seen_ids))
            values = logits[ids]
            logits[ids] = np.where(values > 0, values / params.repetition_penalty,
                                   values * params.repetition_penalty)
        if params.presence_penalty != 0.0 and len(generated_ids):
            logits[np.unique(np.asarray(generated_ids))] -= params.presence_penalty
    return logits


def softmax(logits: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):  # a difference below float32's range is −inf: exp makes it the 0 it should be
        z = np.exp(logits - logits.max())
    return z / z.sum()


def filter_logits(logits: np.ndarray, params: SamplingParams) -> np.ndarray:
    """Temperature, then top-k, top-p and min-p: removed ids get −inf."""
    with np.errstate(all="ignore"):  # no NumPy warning: the overflow is reported just below
        logits = logits / params.temperature
    if not np.isfinite(logits.max()):  # +inf, or −inf everywhere: softmax would make every probability NaN
        raise MinqwenError(f"temperature {params.temperature:g} is too small for these logits: dividing by it "
                           f"goes past what float32 can hold, so no probabilities can be computed. Temperature 0 "
                           f"(greedy) picks the most likely token, which is what so small a temperature amounts to")
    if params.top_k and params.top_k < logits.size:
        kth = np.partition(logits, -params.top_k)[-params.top_k]
        logits = np.where(logits < kth, -np.inf, logits)
    if params.top_p < 1.0:
        # Drop the least likely ids while their total mass stays ≤ 1 − p, as transformers does:
        # summed from the bottom, float32 rounding cannot push a tiny tail over the line (summed
        # from the top, 1 − 2e-9 rounds to 1 and reaches p = 1 − 1e-16 one id too early).
        # Only ids still in play are sorted: an id at −inf (cut by top-k) has mass 0 and would sit
        # at the bottom of the order, adding 0 to every sum above it, and stays cut. (Sorting all
        # of Qwen3.5's 248k logits each token took ~4 ms.)
        # Ties are ordered as transformers' ascending sort orders them when it is stable (lower id
        # first, so cut first): which of several equal logits survives the cut is then the same.
        alive = np.flatnonzero(logits > -np.inf)  # [n], ascending ids
        order = alive[np.argsort(logits[alive], kind="stable")]  # [n]: least likely first
        tail = np.cumsum(softmax(logits)[order])  # [n]: mass of each id and every less likely one
        removed = order[:-1][tail[:-1] <= 1 - params.top_p]  # the last, most likely id always stays
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
        raise MinqwenError(NON_FINITE_LOGITS)
    logits = apply_penalties(logits, seen_ids, generated_ids, params)
    if params.greedy:
        return int(np.argmax(logits))
    return int(rng.choice(logits.size, p=sampling_distribution(logits, params)))


def sampling_distribution(logits: np.ndarray, params: SamplingParams) -> np.ndarray:
    """What a token is drawn from, given logits [V] with penalties applied: float64 [V], summing to one."""
    # softmax subtracts the largest logit: were it +inf, or every logit −inf, all probabilities would be NaN
    if not np.isfinite(logits.max()):  # (a NaN anywhere makes the max NaN)
        raise MinqwenError(_overflow_message(logits, params))
    probs = softmax(filter_logits(logits, params)).astype(np.float64)
    return probs / probs.sum()


def _overflow_message(logits: np.ndarray, params: SamplingParams) -> str:
    """Why penalized logits cannot be sampled from: the penalty to blame, else the model."""
    # A logit reaches +inf through a repetition_penalty below 1 or a negative presence_penalty
    # (repeated tokens made likelier); every logit reaches −inf through the opposite.
    up = logits.max() == np.inf
    culprits = [f"{name} {value:g}" for name, value, off in (("repetition_penalty", params.repetition_penalty, 1.0),
                                                             ("presence_penalty", params.presence_penalty, 0.0))
                if (value < off if up else value > off)]
    if np.isnan(logits).any() or not culprits:  # penalties make no NaN (see apply_penalties)
        return NON_FINITE_LOGITS
    return (f"{' and '.join(culprits)} pushed logits of repeated tokens past what float32 can hold, so no "
            f"probabilities can be computed: choose a penalty nearer its 'off' value (repetition_penalty 1, "
            f"presence_penalty 0; checkpoints ship values like 1.05 and 1.5)")
