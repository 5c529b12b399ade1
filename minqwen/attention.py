"""Gated full attention: one in four Qwen3.5 layers, and the only part whose cache grows.

Compared with a textbook grouped-query attention layer, Qwen3.5 adds three things:

* ``q_proj`` produces, per head, the query *and* an output gate: ``[q_h | gate_h]``, each
  ``head_dim`` wide. The split is per head — reshape to (heads, 2·head_dim) first; splitting
  the flat vector in half would mix heads.
* ``q_norm`` and ``k_norm``: zero-centred RMSNorms over each head's dims, before rotary.
* After attention, each head's output is multiplied by ``sigmoid(gate)`` before ``o_proj``.

Rotary is partial and M-RoPE-laid-out (see rope.py). Keys and values of every past token are
kept in a :class:`KVCache`.

Attention itself has two implementations of one definition: :func:`causal_attention` in NumPy
(the definition, and what a prefill runs: its matrix products go to BLAS; the math is in
:func:`_causal_attention_heads`, which it may share out over threads by key head), and
:func:`attention_few_queries`, a Numba kernel for a decode step or a speculative verify (a few
queries over a long cache), where the work is reading the cache once. Tests hold them equal
to float32 rounding. And below the length where that kernel pays, a decode step runs
:func:`decode_step`: everything the layer does between its projections (norms, rotation,
cache append, softmax, gate) for one token, in one compiled call.
"""

from __future__ import annotations

import functools
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numba
import numpy as np

from .activations import sigmoid, sigmoid32
from .errors import MinqwenError
from .linear import BLAS_ROWS, CACHE_LINE, PREFETCH_AHEAD_BYTES, linear, linears, prefetch
from .norms import rms_norm, rms_norm_row
from .rope import apply_rotary, rotate_row
from .threads import numba_does_the_products, numba_threads, serial_and_parallel

# Queries are processed in blocks of this many rows so that the score matrix never holds more
# than heads × block × context floats, even for very long prompts.
QUERY_BLOCK = 256
# attention_few_queries takes over from this many keys in the cache, for at most this many
# query rows per key head (G query heads × T tokens); each of its parallel jobs reads
# KEY_BLOCK keys. With more rows its score loop, not memory, becomes the limit.
# Where Numba's pool is awake between products (threads.numba_does_the_products: a model too
# big for the caches) the kernel pays from a few hundred keys. 0.8B shape (G = 4), float32
# decode steps, Intel Xeon VM, alternated: at 512 keys 105.5 against 105.6 ms a step (NumPy,
# kernel), 640 105.8 / 104.6, 768 106.3-108.9 / 104.1-106.0, 1024 108.2-111.2 / 104.3-105.5,
# 2048 113.4 / 106.0. Elsewhere it would wake the pool for each call: on the embedded model
# (G = 2, D = 64) it was the slower at every context it can hold (1536 keys: 1.18 against
# 1.08 ms a step), so it waits for long contexts there.
KERNEL_FROM_KEYS = 2048
KERNEL_FROM_KEYS_AWAKE = 512
FEW_QUERY_ROWS = 8
KEY_BLOCK = 256


def few_query_kernel_from() -> int:
    """How many keys (this call's own included) hand a few queries to attention_few_queries now."""
    return KERNEL_FROM_KEYS_AWAKE if numba_does_the_products() else KERNEL_FROM_KEYS


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
        self.make_room(t)
        self.keys[:, self.length : needed] = k.transpose(1, 0, 2)  # [T, Hkv, D] → [Hkv, T, D]
        self.values[:, self.length : needed] = v.transpose(1, 0, 2)
        self.length = needed
        return self.keys[:, :needed], self.values[:, :needed]

    def make_room(self, t: int) -> None:
        """Grow the storage, if it must, so that rows length … length + t − 1 are free to write."""
        needed = self.length + t
        if needed > self.keys.shape[1]:
            # Room to spare: a prompt's keys fill the cache exactly, and the first decoded
            # token would otherwise copy the whole history at once.
            capacity = max(needed + 256, 2 * self.keys.shape[1])
            for name in ("keys", "values"):
                old = getattr(self, name)
                new = np.zeros((old.shape[0], capacity, old.shape[2]), old.dtype)
                new[:, : self.length] = old[:, : self.length]
                setattr(self, name, new)

    def copy(self) -> KVCache:
        """An independent copy with the same spare capacity, so that it grows no sooner than the original.

        (A copy cut to its length would re-allocate on its first append: at 16k tokens of the
        0.8B shape, 128 MB a layer, ~0.1 s on the first decode step, measured.)
        """
        new = KVCache.__new__(KVCache)
        new.keys, new.values = np.empty_like(self.keys), np.empty_like(self.values)  # [Hkv, capacity, D]
        new.keys[:, : self.length] = self.keys[:, : self.length]
        new.values[:, : self.length] = self.values[:, : self.length]
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

    For a prompt while Numba's kernels hold BLAS to one thread (threads.one_blas_thread: the
    bf16-resident mode's prompts), the key heads are shared out between threads of our own,
    each with its key heads and their query heads: NumPy lets go of the GIL in its products and
    ufuncs, so they run side by side, each on one BLAS thread. The same steps per head, so the
    same values, bit for bit. (0.8B shape, 512 tokens, 2 threads: 18.5 → 13 ms a layer.)
    """
    if q.shape[0] < BLAS_ROWS or not numba_does_the_products():  # (before asking Numba, which starts its pool)
        return _causal_attention_heads(q, keys, values, scale)
    num_kv = keys.shape[0]
    n_threads = min(num_kv, numba_threads())
    if n_threads < 2:
        return _causal_attention_heads(q, keys, values, scale)
    groups = q.shape[1] // num_kv
    shares = np.array_split(np.arange(num_kv), n_threads)  # key heads per thread

    def attend(share):
        first, stop = share[0], share[-1] + 1
        return _causal_attention_heads(q[:, first * groups:stop * groups], keys[first:stop], values[first:stop], scale)

    return np.concatenate(list(_thread_pool(n_threads).map(attend, shares)), axis=1)  # [T, Hq, D]


@functools.cache
def _thread_pool(n_threads: int) -> ThreadPoolExecutor:
    """The threads causal_attention shares key heads between, made once per thread count."""
    return ThreadPoolExecutor(n_threads, thread_name_prefix="minqwen-attention")


# A child made by fork() inherits the pool's bookkeeping but none of its threads (a map would
# wait for ever): it starts with no pool, and makes its own when it needs one.
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_thread_pool.cache_clear)


def _causal_attention_heads(q: np.ndarray, keys: np.ndarray, values: np.ndarray, scale: float) -> np.ndarray:
    """The definition, on the calling thread: grouped causal softmax attention, a block of queries at a time."""
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
        if rows > 1:  # one row sits at visible − 1: every key in keys[:visible] is at or before it
            query_pos = past + np.arange(start, stop)[:, None]  # [B, 1]
            key_pos = np.arange(visible)[None, :]  # [1, visible]
            scores = np.where(key_pos <= query_pos, scores, -np.inf)
        scores -= scores.max(axis=-1, keepdims=True)
        probs = np.exp(scores)
        probs /= probs.sum(axis=-1, keepdims=True)
        mixed = probs.reshape(num_kv, groups * rows, visible) @ values[:, :visible]  # [Hkv, G·B, D]
        out[:, :, start:stop] = mixed.reshape(num_kv, groups, rows, head_dim)
    return out.reshape(num_heads, t_len, head_dim).transpose(1, 0, 2)  # [T, Hq, D]


def attention_few_queries(q: np.ndarray, keys: np.ndarray, values: np.ndarray, scale: float) -> np.ndarray:
    """:func:`causal_attention` for a few queries (a decode step, a speculative verify), in Numba.

    At 16k tokens of context a decode step's attention is all memory traffic: the 8 query
    heads of the 0.8B shape read 2 key/value heads of 16k × 256 floats each. NumPy's route (a
    product, a softmax, a product, with BLAS packing the cache for each product) moved ~5 GB/s
    here. Instead each parallel job takes one block of KEY_BLOCK keys and values, reads them
    once for all of a head's query rows, and returns a partial softmax: the block's max score,
    its sum of exponentials and its exp-weighted sum of values ("flash decoding"). The blocks
    are merged after. Same contract as causal_attention (measured at 16k: about 2× faster).
    While it works on one key (or value) row it asks for the row ~2 kB further on, as
    linear.py's kernel does for weights: the six attention layers' caches at 16k (403 MB)
    took 28-31 ms a decode step without that, 21-24 ms with it (13-14 → 17-19 GB/s; a
    two-position verify 43 → 32-35 ms).
    """
    t_len, num_heads, head_dim = q.shape
    num_kv, s_len, _ = keys.shape
    groups = num_heads // num_kv
    rows = q.transpose(1, 0, 2).reshape(num_kv, groups * t_len, head_dim)  # [Hkv, G·T, D], row g·T + t
    visible = np.tile(s_len - t_len + 1 + np.arange(t_len), groups)  # [G·T]: query t sees keys 0 … S − T + t
    n_blocks = -(-s_len // KEY_BLOCK)
    block_max = np.empty((num_kv, n_blocks, groups * t_len), np.float32)  # [Hkv, B, G·T]
    block_sum = np.empty_like(block_max)  # [Hkv, B, G·T]
    block_out = np.empty((num_kv, n_blocks, groups * t_len, head_dim), np.float32)  # [Hkv, B, G·T, D]
    for h in range(num_kv):  # one head at a time: keys[h] is a contiguous [S, D] block of the cache
        _attention_blocks_kernel(np.ascontiguousarray(rows[h]), keys[h], values[h], visible, np.float32(scale),
                                 KEY_BLOCK, block_max[h], block_sum[h], block_out[h])
    # Merge the blocks: rescale each to the overall max, then normalise.
    overall = block_max.max(axis=1, keepdims=True)  # [Hkv, 1, G·T]
    weight = np.exp(block_max - overall)  # [Hkv, B, G·T]: 0 for a block the query cannot see
    total = (block_sum * weight).sum(axis=1)  # [Hkv, G·T]
    out = (block_out * weight[..., None]).sum(axis=1) / total[..., None]  # [Hkv, G·T, D]
    return out.reshape(num_heads, t_len, head_dim).transpose(1, 0, 2)  # [T, Hq, D]


@numba.njit(inline="always")
def _prefetch_row(rows, s):
    """Ask for every cache line of rows[s] (a hint, see linear.prefetch); past the last row, nothing.

    The rows after the block a job works on are, mostly, its next block's: prange hands each
    thread a run of consecutive blocks.
    """
    if s < rows.shape[0]:
        row = rows[s]
        for i in range(0, row.size, max(1, CACHE_LINE // row.itemsize)):
            prefetch(row, i)


def _attention_blocks_loops(rows, keys, values, visible, scale, block, block_max, block_sum, block_out):
    """For one key head, per block b of keys: the partial softmax of every query row r.

    rows [R, D], keys and values [S, D]. block_max[b, r] = max score m, block_sum[b, r] =
    Σ exp(score − m), block_out[b, r] = Σ exp(score − m) · value, over the keys s < visible[r]
    of the block (m = −inf and sums 0 where it has none). Each key and value row is read from
    memory once for all query rows. Only the reassociation of sums (vector lanes) and fused
    multiply-adds are allowed: −inf must stay −inf. The result differs from the NumPy twin by
    float32 rounding (tests bound it).
    """
    n_rows, head_dim = rows.shape
    ahead = max(1, PREFETCH_AHEAD_BYTES // (head_dim * keys.itemsize))  # in rows
    for b in numba.prange(block_max.shape[0]):
        start = b * block
        stop = min(start + block, keys.shape[0])
        p = np.empty((n_rows, stop - start), np.float32)  # [R, block]: scores, then exp(score − m)
        for s in range(start, stop):
            _prefetch_row(keys, s + ahead)
            key = keys[s]
            for r in range(n_rows):
                query = rows[r]
                dot = np.float32(0.0)
                for i in range(head_dim):
                    dot += query[i] * key[i]
                p[r, s - start] = dot * scale
        for r in range(n_rows):
            for s in range(max(start, visible[r]), stop):  # keys after the query's own position
                p[r, s - start] = -np.inf
            top = np.float32(-np.inf)
            for j in range(stop - start):
                top = max(top, p[r, j])
            total = np.float32(0.0)
            if top > -np.inf:
                for j in range(stop - start):
                    p[r, j] = np.exp(p[r, j] - top)
                    total += p[r, j]
            else:  # the block holds no key this query sees
                p[r, :] = 0.0
            block_max[b, r] = top
            block_sum[b, r] = total
        out = block_out[b]  # [R, D]
        out[:, :] = 0.0
        for s in range(start, stop):  # each value row once, for every query row
            _prefetch_row(values, s + ahead)
            value = values[s]
            for r in range(n_rows):
                weight = p[r, s - start]
                out_r = out[r]
                for i in range(head_dim):
                    out_r[i] += weight * value[i]


_attention_blocks_kernel_serial, _attention_blocks_kernel = serial_and_parallel(
    _attention_blocks_loops, fastmath={"reassoc", "contract"})


# --------------------------------------------------------------------------- a decode step in one pass


def _decode_step_loops(q_and_gate, k, v, q_norm, k_norm, cos, sin, eps, scale, keys, values, length,
                       normed_q, normed_k, rotated_q, out):
    """Everything :func:`gated_attention` does between its projections, for one token, compiled.

    q_and_gate [Hq, 2D]: q_proj's output (per head, the query then the gate); k, v [Hkv, D];
    cos, sin [R]: this token's angles; keys, values [Hkv, capacity, D]: the cache's arrays,
    with row ``length`` free: this token's key and value are written there. Filled: normed_q
    [Hq, D], normed_k [Hkv, D] (after q_norm, k_norm), rotated_q [Hq, D] (the rotated key is
    the cache's new row), and out [Hq, D], the gated attention output, for o_proj.

    The twin is gated_attention's own code. The norms and the rotation are the same compiled
    steps as there (:func:`~minqwen.norms.rms_norm_row`, :func:`~minqwen.rope.rotate_row`),
    so the cache receives the same key bits; the scores and the mix add their terms in
    another order than BLAS does, so the output agrees to float32 rounding (tested). What
    changes is the number of calls: between two products a decode step's attention made ~15
    NumPy calls and small kernels, each finding its data, and the interpreter's, evicted
    by the product before; here one.
    """
    num_heads, head_dim = out.shape
    num_kv = k.shape[0]
    group = num_heads // num_kv  # query heads per key/value head
    visible = length + 1  # every key so far, this token's included
    for h in range(num_kv):  # this token's key (normed, rotated) and value go in first: its query sees them
        rms_norm_row(k[h], k_norm, eps, normed_k[h])
        rotate_row(normed_k[h], cos, sin, keys[h, length])
        values[h, length, :] = v[h]
    for h in numba.prange(num_heads):
        kv = h // group
        rms_norm_row(q_and_gate[h, :head_dim], q_norm, eps, normed_q[h])
        rotate_row(normed_q[h], cos, sin, rotated_q[h])
        _softmax_attention_row(rotated_q[h], keys[kv, :visible], values[kv, :visible], scale, out[h])
        gate = q_and_gate[h, head_dim:]
        for i in range(head_dim):  # each head's output scaled by its own sigmoid gate
            out[h, i] *= sigmoid32(gate[i])


@numba.njit(cache=True, fastmath={"reassoc", "contract"})
def _softmax_attention_row(query, keys, values, scale, result):
    """result [D] = softmax(keys · query · scale) · values, for one query over keys, values [S, D].

    Compiled apart from the pass, with the same freedoms as the block kernel above (sums
    reordered into vector lanes, fused multiply-adds), which the norms must not have.
    """
    scores = np.empty(keys.shape[0], np.float32)  # [S]
    top = np.float32(-np.inf)
    for s in range(keys.shape[0]):
        key = keys[s]
        dot = np.float32(0.0)
        for i in range(query.size):
            dot += query[i] * key[i]
        scores[s] = dot * scale
        top = max(top, scores[s])
    total = np.float32(0.0)
    for s in range(scores.size):
        scores[s] = np.exp(scores[s] - top)
        total += scores[s]
    result[:] = 0.0
    for s in range(scores.size):
        weight = scores[s] / total
        value = values[s]
        for i in range(result.size):
            result[i] += weight * value[i]


_decode_step_kernel, _decode_step_kernel_parallel = serial_and_parallel(_decode_step_loops, error_model="numpy")


def decode_step_fits(q_and_gate, k, v, w: AttentionWeights, cache: KVCache, cos, sin, num_heads: int,
                     num_kv_heads: int, head_dim: int) -> bool:
    """Whether :func:`decode_step` can take this call: one token, float32 throughout (the
    kernel's arithmetic), a cache short enough that the few-query kernel would not take it
    (see KERNEL_FROM_KEYS), every shape as the kernel reads it. Anything else runs the
    definition in :func:`gated_attention`."""
    keys = cache.keys
    return (
        q_and_gate.shape[0] == 1
        and cache.length + 1 < few_query_kernel_from()  # the keys with this token's own
        and q_and_gate.dtype == k.dtype == v.dtype == w.q_norm.dtype == w.k_norm.dtype == cos.dtype == sin.dtype
        == keys.dtype == cache.values.dtype == np.float32
        and num_kv_heads > 0 and num_heads % num_kv_heads == 0
        and q_and_gate.shape[1] == num_heads * 2 * head_dim and k.shape[1] == v.shape[1] == num_kv_heads * head_dim
        and w.q_norm.shape == w.k_norm.shape == (head_dim,)
        and cos.shape == sin.shape and cos.shape[0] == 1 and cos.shape[1] % 2 == 0 and cos.shape[1] <= head_dim
        and keys.shape[0] == num_kv_heads and keys.shape[2] == head_dim and keys.shape == cache.values.shape
    )


def decode_step(q_and_gate, k, v, w: AttentionWeights, cache: KVCache, cos, sin, num_heads: int,
                num_kv_heads: int, head_dim: int, eps: float, tap=None) -> np.ndarray:
    """gated_attention between its projections for one token, compiled (:func:`_decode_step_loops`).

    q_and_gate [1, Hq·2D], k, v [1, Hkv·D]: the projections' outputs; cos, sin [1, R].
    Appends this token's key and value to ``cache``; returns the gated output [1, Hq·D].
    ``tap`` sees the intermediates gated_attention shows, as this pass computed them.
    """
    cache.make_room(1)
    q_and_gate = q_and_gate.reshape(num_heads, 2 * head_dim)  # [Hq, 2D]
    k, v = k.reshape(num_kv_heads, head_dim), v.reshape(num_kv_heads, head_dim)  # [Hkv, D] each
    normed_q, rotated_q, out = (np.empty((num_heads, head_dim), np.float32) for _ in range(3))  # [Hq, D] each
    normed_k = np.empty((num_kv_heads, head_dim), np.float32)  # [Hkv, D]
    # Heads split across the cores only where Numba's pool is awake anyway (as deltanet's step)
    kernel = _decode_step_kernel_parallel if numba_does_the_products() else _decode_step_kernel
    kernel(q_and_gate, k, v, w.q_norm, w.k_norm, cos[0], sin[0], np.float32(eps), np.float32(head_dim**-0.5),
           cache.keys, cache.values, cache.length, normed_q, normed_k, rotated_q, out)
    if tap is not None:  # [1, heads, D] each, as the definition shows them
        tap("self_attn.q_norm", normed_q[None])
        tap("self_attn.k_norm", normed_k[None])
        tap("self_attn.q", rotated_q[None])
        tap("self_attn.k", cache.keys[None, :, cache.length].copy())
        tap("self_attn.v", v[None])
        tap("self_attn.gate", q_and_gate[None, :, head_dim:])
    cache.length += 1
    out = out.reshape(1, num_heads * head_dim)  # [1, Hq·D]
    if tap is not None:
        tap("self_attn.gated_output", out)
    return out


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
    """One gated attention layer over x [T, H]; appends this step's keys/values to the cache.

    ``cos``, ``sin``: [T, R] from :func:`minqwen.rope.mrope_cos_sin` (R rotated dims of D, made
    once per forward in ``Model.hidden_states``).
    """
    t_len = x.shape[0]
    q_and_gate, k, v = linears(x, (w.q_proj, w.k_proj, w.v_proj), (w.q_proj_bias, w.k_proj_bias, w.v_proj_bias))
    if decode_step_fits(q_and_gate, k, v, w, cache, cos, sin, num_heads, num_kv_heads, head_dim):
        # A decode step: everything from here to the gate, compiled in one pass (decode_step).
        # The code below is its definition, and what every other call runs.
        out = decode_step(q_and_gate, k, v, w, cache, cos, sin, num_heads, num_kv_heads, head_dim, eps,
                          tap)  # [1, Hq·D]
        return linear(out, w.o_proj, w.o_proj_bias)  # [1, H]
    q_and_gate = q_and_gate.reshape(t_len, num_heads, 2 * head_dim)  # [T, Hq, 2D]
    q, gate = q_and_gate[..., :head_dim], q_and_gate[..., head_dim:]  # [T, Hq, D] each
    k = k.reshape(t_len, num_kv_heads, head_dim)  # [T, Hkv, D]
    v = v.reshape(t_len, num_kv_heads, head_dim)  # [T, Hkv, D]

    q = rms_norm(q, w.q_norm, eps)  # [T, Hq, D]
    k = rms_norm(k, w.k_norm, eps)  # [T, Hkv, D]
    if tap is not None:
        tap("self_attn.q_norm", q)
        tap("self_attn.k_norm", k)
    q = apply_rotary(q, cos, sin)
    k = apply_rotary(k, cos, sin)
    if tap is not None:
        tap("self_attn.q", q)
        tap("self_attn.k", k)
        tap("self_attn.v", v)
        tap("self_attn.gate", gate)

    keys, values = cache.append(k, v)  # [Hkv, S, D] each
    few = t_len * (num_heads // num_kv_heads) <= FEW_QUERY_ROWS and keys.shape[1] >= few_query_kernel_from()
    attend = attention_few_queries if few and q.dtype == keys.dtype == np.float32 else causal_attention
    out = attend(q, keys, values, scale=head_dim**-0.5)  # [T, Hq, D]
    # each head's output scaled, element by element, by its own sigmoid gate
    out = out.reshape(t_len, num_heads * head_dim) * sigmoid(gate.reshape(t_len, num_heads * head_dim))  # [T, Hq·D]
    if tap is not None:
        tap("self_attn.gated_output", out)
    return linear(out, w.o_proj, w.o_proj_bias)  # [T, H]
