"""Scoring text: how likely the model finds it, token by token.

``log_probs(model, ids)`` gives log p(ids[t] | ids[:t]) for t ≥ 1. For a text longer than the
context, :func:`score_text` slides a window over it: each window starts fresh, and only the
tokens a window adds beyond the previous one are scored: after the first window, each with at
least ``window − stride`` tokens of left context (the usual overlapping-window perplexity).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .errors import MinqwenError, is_whole_number, whole_number_array
from .model import Model


def log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


# The LM head's output is [T, V]: at Qwen3.5's 248k vocabulary ~1 MB a token, three times over
# with log_softmax's temporaries (a 4k-token window: 12 GB). So it is made this many bytes of
# logits at a time; a small model's whole window is one block.
SCORE_BLOCK_BYTES = 128 << 20


def log_probs(model: Model, ids) -> np.ndarray:
    """log p(ids[t] | ids[:t]) for t = 1 … T−1, in nats, [T−1] float32 (T ≥ 2)."""
    given, ids = ids, whole_number_array(ids)
    if ids is None:
        raise MinqwenError(f"scoring takes one sequence of token ids (ints), got {given!r:.80}")
    if ids.ndim != 1:
        raise MinqwenError(f"scoring takes one sequence of token ids (1-D), got an array of shape {ids.shape}")
    if ids.size < 2:
        raise MinqwenError("scoring needs at least two token ids (the first is only context)")
    hidden = model.hidden_states(ids)[:-1]  # [T−1, H]: row t predicts ids[t + 1]
    targets = ids[1:]  # [T−1]
    logp = np.empty(targets.size, hidden.dtype)
    rows = max(1, SCORE_BLOCK_BYTES // (model.config.vocab_size * hidden.itemsize))
    for start in range(0, targets.size, rows):
        block = slice(start, start + rows)
        logits = model.logits(hidden[block])  # [rows, V]
        logp[block] = log_softmax(logits)[np.arange(logits.shape[0]), targets[block]]
    if not np.isfinite(logp).all():  # a perplexity of nan would look like a result
        raise MinqwenError("the model computed NaN or infinite logits while scoring: its weights or config.json "
                           "hold values it cannot compute with (a NaN weight, say)")
    return logp


@dataclass
class TextScore:
    tokens_scored: int
    nll_nats: float  # summed over the scored tokens
    n_bytes: int  # UTF-8 bytes of the text

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll_nats / self.tokens_scored)

    @property
    def bits_per_byte(self) -> float:
        """The scored tokens' bits over all of the text's bytes. The first token is only context
        (nothing precedes it to predict it from) but its bytes count: on a text of a few tokens
        this reads low ("import os\n" scores two of three tokens over ten bytes); over a file it
        is the usual figure."""
        return self.nll_nats / math.log(2) / self.n_bytes


def score_text(model: Model, tokenizer, text: str, window: int | None = None, stride: int | None = None,
               progress=None) -> TextScore:
    """Perplexity and bits per byte of ``text``, with overlapping windows when it exceeds ``window``."""
    from .generate import check_model  # here: generate.py imports what scoring.py does

    check_model(model)
    # Only encode is used: any object with one will do, but not a str (whose encode is another thing)
    if isinstance(tokenizer, (str, bytes)) or not callable(getattr(tokenizer, "encode", None)):
        raise MinqwenError(f"tokenizer must be a minqwen Tokenizer (minqwen.Tokenizer(folder)), "
                           f"got {type(tokenizer).__name__}")
    if progress is not None and not callable(progress):  # found now, not after the first window
        raise MinqwenError(f"progress must be a function progress(done_tokens, total_tokens) or None, "
                           f"got {type(progress).__name__}")
    ids = tokenizer.encode(text)
    if len(ids) < 2:
        raise MinqwenError("the text is too short to score: it needs at least two tokens")
    for name, value in (("window", window), ("stride", stride)):
        if value is not None and not is_whole_number(value):
            raise MinqwenError(f"{name} must be a whole number of tokens, got {value!r}")
    window = model.config.max_position_embeddings if window is None else window
    stride = max(1, window // 2) if stride is None else stride
    # Windows must overlap: a window's first token has nothing before it to be predicted from,
    # so only the window before can score it (with stride = window it would count, unscored).
    if not 1 <= stride < window:
        raise MinqwenError(f"window must be ≥ 2 and stride from 1 to window − 1, got window {window}, "
                           f"stride {stride}: windows must overlap, as each window's first token is only "
                           f"context for the rest")
    if window > model.config.max_position_embeddings:
        raise MinqwenError(f"window {window} is longer than the model's context of "
                           f"{model.config.max_position_embeddings} tokens (config max_position_embeddings)")
    nll, scored, start = 0.0, 0, 0
    while True:
        stop = min(start + window, len(ids))
        logp = log_probs(model, ids[start:stop])  # predicts ids[start + 1 : stop]
        first_new = max(scored + 1, start + 1)  # tokens before this were scored by an earlier window
        nll -= float(logp[first_new - start - 1 :].astype(np.float64).sum())
        scored = stop - 1
        if progress is not None:
            progress(stop, len(ids))
        if stop == len(ids):
            break
        start += stride
    return TextScore(tokens_scored=len(ids) - 1, nll_nats=nll, n_bytes=len(text.encode("utf-8")))
