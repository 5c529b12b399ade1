"""Gated full attention: one in four Qwen3.5 layers, and the only part whose cache grows.

Compared with a textbook grouped-query attention layer, Qwen3.5 adds three things:

* ``q_proj`` produces, per head, the query *and* an output gate: ``[q_h | gate_h]``, each
  ``head_dim`` wide. The split is per head — reshape to (heads, 2·head_dim) first; splitting
  the flat vector in half would mix heads.
* ``q_norm`` and ``k_norm``: zero-centred RMSNorms over each head's dims, before rotary.
* After attention, each head's output is multiplied by ``sigmoid(gate)`` before ``o_proj``.

Rotary is partial and M-RoPE-laid-out (see rope.py). Keys and values of every past token are
kept in a :class:`KVCache`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .activations import sigmoid
from .errors import MinqwenError
from .linear import linear
from .norms import rms_norm
from .rope import apply_rotary

# Queries are processed in blocks of this many rows so that the score matrix never holds more
# than heads × block × context floats, even for very long prompts.
QUERY_BLOCK = 256


@dataclass
class AttentionWeights:
    q_proj: np.ndarray  # [Hq · 2 · D, H]: per head, query then gate
    k_proj: np.ndarray  # [Hkv · D, H]
    v_proj: np.ndarray  # [Hkv · D, H]
    o_proj: np.ndarray  # [H, Hq · D]
    q_norm: np.ndarray  # [D]
    k_norm: np.ndarray  # [D]
    q_proj_bias: np.ndarray | None = None  # present when config.attention_bias
    k_proj_bias: np.ndarray | None = None
    v_proj_bias: np.ndarray | None = None
    o_proj_bias: np.ndarray | None = None


class KVCache:
    """Keys and values of every token seen so far, per key/value head.

    Storage grows by doubling so that appending one token at a time costs amortised O(1)
    copies instead of re-allocating the whole history each step.
    """

    def __init__(self, num_kv_heads: int, head_dim: int, dtype=np.float32):
        self.keys = np.zeros((num_kv_heads, 0, head_dim), dtype)  # [Hkv, capacity, D]
        self.values = np.zeros((num_kv_heads, 0, head_dim), dtype)
        self.length = 0

    def append(self, k: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Add k, v [T, Hkv, D]; return all keys and values so far, [Hkv, length, D] each."""
        t = k.shape[0]
        needed = self.length + t
        if needed > self.keys.shape[1]:
            capacity = max(needed, 2 * self.keys.shape[1], 64)
            for name in ("keys", "values"):
                old = getattr(self, name)
                new = np.zeros((old.shape[0], capacity, old.shape[2]), old.dtype)
                new[:, : self.length] = old[:, : self.length]
                setattr(self, name, new)
        self.keys[:, self.length : needed] = k.transpose(1, 0, 2)
        self.values[:, self.length : needed] = v.transpose(1, 0, 2)
        self.length = needed
        return self.keys[:, :needed], self.values[:, :needed]

    def copy(self) -> KVCache:
        new = KVCache.__new__(KVCache)
        new.keys = self.keys[:, : self.length].copy()
        new.values = self.values[:, : self.length].copy()
        new.length = self.length
        return new

    def truncate(self, length: int) -> None:
        """Forget every token after the first ``length`` (a rejected speculative draft's).

        Unlike a Gated DeltaNet memory, keys and values can be rewound: each token owns its
        row, so dropping the last rows leaves exactly the cache of the shorter sequence.
        """
        if not 0 <= length <= self.length:
            raise MinqwenError(f"truncate: length must be 0 … {self.length} (the tokens held), got {length}")
        self.length = length

    @property
    def nbytes(self) -> int:
        return 2 * self.length * self.keys.shape[0] * self.keys.shape[2] * self.keys.itemsize


def causal_attention(q: np.ndarray, keys: np.ndarray, values: np.ndarray, scale: float) -> np.ndarray:
    """Softmax attention of q [T, Hq, D] over keys/values [Hkv, S, D], the last T of which are q's own.

    Query t sits at position S - T + t and sees keys 0 … S - T + t. Query heads are grouped:
    head h reads key/value head h // (Hq / Hkv).
    """
    t_len, num_heads, head_dim = q.shape
    num_kv, s_len, _ = keys.shape
    groups = num_heads // num_kv
    past = s_len - t_len
    q = q.transpose(1, 0, 2).reshape(num_kv, groups, t_len, head_dim)  # [Hkv, G, T, D]
    out = np.empty_like(q)
    for start in range(0, t_len, QUERY_BLOCK):
        stop = min(start + QUERY_BLOCK, t_len)
        rows = stop - start
        visible = past + stop  # no query in this block sees further than this
        # The G query heads of a group share one key head: stack their rows so that one
        # product per key head reads its keys once (at 16k tokens the keys dominate a step).
        q_rows = q[:, :, start:stop].reshape(num_kv, groups * rows, head_dim)  # [Hkv, G·B, D]
        scores = q_rows @ keys[:, :visible].swapaxes(-1, -2) * scale  # [Hkv, G·B, visible]
        scores = scores.reshape(num_kv, groups, rows, visible)  # [Hkv, G, B, visible]
        if rows > 1:  # a single query (decode) is the newest token: it sees every key
            query_pos = past + np.arange(start, stop)[:, None]  # [B, 1]
            key_pos = np.arange(visible)[None, :]  # [1, visible]
            scores = np.where(key_pos <= query_pos, scores, -np.inf)
        scores -= scores.max(axis=-1, keepdims=True)
        probs = np.exp(scores)
        probs /= probs.sum(axis=-1, keepdims=True)
        mixed = probs.reshape(num_kv, groups * rows, visible) @ values[:, :visible]  # [Hkv, G·B, D]
        out[:, :, start:stop] = mixed.reshape(num_kv, groups, rows, head_dim)
    return out.reshape(num_heads, t_len, head_dim).transpose(1, 0, 2)  # [T, Hq, D]


def gated_attention(
    x: np.ndarray,
    w: AttentionWeights,
    cache: KVCache,
    cos: np.ndarray,
    sin: np.ndarray,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    eps: float,
    tap=None,
) -> np.ndarray:
    """One gated attention layer over x [T, H]; appends this step's keys/values to the cache."""
    t_len = x.shape[0]
    q_and_gate = linear(x, w.q_proj, w.q_proj_bias).reshape(t_len, num_heads, 2 * head_dim)  # [T, Hq, 2D]
    q, gate = q_and_gate[..., :head_dim], q_and_gate[..., head_dim:]  # [T, Hq, D] each
    k = linear(x, w.k_proj, w.k_proj_bias).reshape(t_len, num_kv_heads, head_dim)  # [T, Hkv, D]
    v = linear(x, w.v_proj, w.v_proj_bias).reshape(t_len, num_kv_heads, head_dim)  # [T, Hkv, D]

    q = apply_rotary(rms_norm(q, w.q_norm, eps), cos, sin)
    k = apply_rotary(rms_norm(k, w.k_norm, eps), cos, sin)
    if tap is not None:
        tap("self_attn.q", q)
        tap("self_attn.k", k)
        tap("self_attn.v", v)
        tap("self_attn.gate", gate)

    keys, values = cache.append(k, v)  # [Hkv, S, D] each
    out = causal_attention(q, keys, values, scale=head_dim**-0.5)  # [T, Hq, D]
    out = out.reshape(t_len, num_heads * head_dim) * sigmoid(gate.reshape(t_len, num_heads * head_dim))
    if tap is not None:
        tap("self_attn.gated_output", out)
    return linear(out, w.o_proj, w.o_proj_bias)  # [T, H]
