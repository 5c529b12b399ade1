"""Gated DeltaNet: the linear-attention layer that makes up three in four Qwen3.5 layers.

Instead of keeping every past key and value, each value head keeps a fixed-size memory, a
matrix ``S`` of shape [Dk, Dv] that maps keys to values. Each token

1. decays the memory:              S ← exp(g) · S                     (g ≤ 0, the "gate")
2. reads what S predicts for k:    v̂ = Sᵀ k
3. writes the correction:          S ← S + k ⊗ β (v − v̂)             (β ∈ (0, 1): the delta rule)
4. reads the output for q:         o = Sᵀ q

so a decode step costs the same at token 10 as at token 100 000 (Yang et al., "Gated Delta
Networks", ICLR 2025). The layer around that recurrence:

    x ─ in_proj_qkv ─ conv1d (causal, depthwise, K taps) ─ SiLU ─ split q, k, v
      ─ in_proj_z → z (output gate)     in_proj_b → β = sigmoid(b)
      ─ in_proj_a → g = −exp(A_log) · softplus(a + dt_bias)
    q, k: L2-normalised per head, q scaled by 1/√Dk; q and k shared by groups of value heads
    o ─ RMSNorm(o) · w · silu(z) ─ out_proj

The recurrence is written three times, on purpose:

* :func:`recurrent_gated_delta_rule_numpy` — the four steps above, token by token, in NumPy.
  This is the definition; read it first.
* :func:`recurrent_gated_delta_rule` — the same loop compiled by Numba. It is what runs, for
  decode steps and prompts alike (see FORMS below for why); tests hold it equal to the twin.
* :func:`chunked_gated_delta_rule` — the same result computed chunk by chunk with matrix
  products (the WY / UT-transform form of Yang et al., NeurIPS 2024), the form GPU kernels
  use for long prompts. Tests hold it equal to the recurrent form (to ~1e-10 in float64).

A float32 decode step runs the whole layer between its projections — conv, norms, gates and
the recurrence — as one compiled pass per value head (:func:`decode_step`), built of the
same compiled pieces as :func:`gated_deltanet`, which stays its definition.

The layer's decode state is (conv window, S): see :class:`DeltaNetState`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numba
import numpy as np

from .activations import ACTIVATIONS, SILU_NAMES, sigmoid, sigmoid32, silu32, softplus, softplus32
from .errors import MinqwenError
from .linear import BLAS_ROWS, linear, linears
from .norms import L2_EPS, gated_rms_norm, gated_rms_norm_row, l2_normalize, l2_normalize_row
from .threads import OPENBLAS_THREADS_NAP, numba_does_the_products, serial_and_parallel

CHUNK_SIZE = 64
# Which form runs a multi-token call. Measured on this project's 2-core CPU at the real
# Qwen3.5-0.8B head shape (16 heads of 128 × 128): the compiled recurrence costs ~0.04 ms per
# token and layer, the chunked form in NumPy ~0.7–1.6 ms per token (its many small batched
# matmuls do not reach BLAS speed). So on a CPU the recurrence runs everywhere; the chunked form — the
# matmul formulation that GPU kernels use — is kept, tested equal, and selectable.
FORMS = ("recurrent", "chunked")


# Letters in the shapes below: H = hidden_size; Hk, Dk = linear_num_key_heads, linear_key_head_dim;
# Hv, Dv = linear_num_value_heads, linear_value_head_dim; K = linear_conv_kernel_dim (conv taps);
# conv_dim = 2·Hk·Dk + Hv·Dv (config.linear_conv_dim: the q | k | v channels, convolved together).
@dataclass
class DeltaNetWeights:
    in_proj_qkv: np.ndarray  # [2·Hk·Dk + Hv·Dv, H]
    in_proj_z: np.ndarray  # [Hv·Dv, H]
    in_proj_b: np.ndarray  # [Hv, H]
    in_proj_a: np.ndarray  # [Hv, H]
    conv1d: np.ndarray  # [conv_dim, K]: the checkpoint's conv1d.weight [conv_dim, 1, K], squeezed
    A_log: np.ndarray  # [Hv]
    dt_bias: np.ndarray  # [Hv]
    norm: np.ndarray  # [Dv]
    out_proj: np.ndarray  # [H, Hv·Dv]


@dataclass
class DeltaNetState:
    """What a Gated DeltaNet layer carries from one call to the next.

    ``conv``: the last K − 1 inputs of the short convolution, [K − 1, conv_dim], oldest first.
    (transformers keeps K, the oldest of which is never used; minqwen keeps only what is read.)
    ``recurrent``: the memory S of every value head, [Hv, Dk, Dv], in the compute dtype: float32,
    even with bf16 weights (float64 only in a ``Model.astype(np.float64)`` copy, as tests use).
    ``history``: None, except while a speculative verify runs (see mtp.py): then a list that
    each call extends with the (conv, recurrent) state after every one of its tokens, so that
    the verify can keep any prefix of its tokens without recomputing (S cannot be rewound).
    """

    conv: np.ndarray
    recurrent: np.ndarray
    history: list | None = field(default=None, repr=False, compare=False)

    def copy(self) -> DeltaNetState:
        return DeltaNetState(self.conv.copy(), self.recurrent.copy())

    @property
    def nbytes(self) -> int:
        return self.conv.nbytes + self.recurrent.nbytes


# --------------------------------------------------------------------------- short convolution


def causal_conv1d_numpy(x: np.ndarray, weight: np.ndarray, conv_state: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Depthwise causal convolution of x [T, C] with weight [C, K], continuing from conv_state [K−1, C].

    Output t mixes inputs t−K+1 … t of its own channel; the inputs before this call come from
    conv_state, so a prompt split in two pieces gives the same output as in one piece.
    Returns (output [T, C], new conv_state [K−1, C]). The definition; :func:`causal_conv1d`
    is its compiled twin.
    """
    kernel = weight.shape[1]
    t_len = x.shape[0]
    window = np.concatenate([conv_state, x], axis=0)  # [K−1+T, C]
    out = np.zeros_like(x)
    for tap in range(kernel):
        # weight[:, tap] multiplies the input (K−1−tap) steps before the output position
        out += window[tap : tap + t_len] * weight[:, tap]
    return out, window[window.shape[0] - (kernel - 1) :].copy()


def _conv_loops(x, weight_t, conv_state, then_silu, out):
    """Numba twin of causal_conv1d_numpy's sum: out [T, C] from x [T, C], weight_t [K, C], conv_state [K−1, C].

    The NumPy form builds the window (a copy of x) and a temporary per tap: at T = 512 tokens
    and C = 6144 channels, ~12 passes over a 12.6 MB array. Here each output row is summed
    in place from the rows it reads, the taps in the same order, so the same roundings.
    ``then_silu`` (float32 only): SiLU applied to each row while it is in the nearest cache.
    """
    t_len, channels = x.shape
    kernel = weight_t.shape[0]
    for t in numba.prange(t_len):  # rows are independent: a prompt's may go to several threads
        row = out[t]  # [C]; rows as 1-D views, which LLVM turns into vector loops
        for c in range(channels):
            row[c] = 0.0
        for tap in range(kernel):
            source = t + tap - (kernel - 1)  # the input row this tap reads; < 0: from before this call
            inputs = x[source] if source >= 0 else conv_state[kernel - 1 + source]  # [C]
            taps = weight_t[tap]  # [C]
            for c in range(channels):
                row[c] += taps[c] * inputs[c]
        if then_silu:
            for c in range(channels):
                row[c] = silu32(row[c])


# Serial where BLAS does the products: in a float32 prefill, OpenBLAS's threads are still
# spinning from the projection just before (for ~0.1 s after each call), and a parallel build
# fights them for the cores; measured on the 0.8B shape, 512 tokens, it was no faster. One core
# does 18 layers' convs in ~0.06-0.09 s. Where Numba does the products the cores are its own,
# and a prompt's rows take both (Intel Xeon VM, 512 × 6144: 1.9-2.0 ms serial, 1.3-1.6 parallel,
# bound by memory; at 16 rows or fewer, no faster).
# error_model="numpy", as for activations' kernels: with Python's (a check for division by
# zero before each divide) LLVM left the serial build's SiLU loop scalar, and SiLU in the pass
# cost 5x the conv itself (512 × 6144: 22 ms against 4.2 ms; one token 40 µs against 8).
_conv_kernel, _conv_kernel_parallel = serial_and_parallel(_conv_loops, error_model="numpy")
CONV_PARALLEL_FROM = 1 << 17  # values (T × C) worth both cores


def causal_conv1d(x: np.ndarray, weight: np.ndarray, conv_state: np.ndarray,
                  silu: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """The causal convolution, compiled: same contract as :func:`causal_conv1d_numpy`.

    ``silu``: the output goes through SiLU, as in the layer (the reference's causal_conv1d_fn
    takes the activation too). For float32 in the same pass, bit for bit
    ``activations.silu(output)``: a prompt's output, 12.6 MB at the 0.8B shape's 512 tokens,
    is then not read and written again.
    """
    kernel = weight.shape[1]
    channels = x.shape[1]
    # The kernel does not check its reads: shapes that do not fit are refused here
    if weight.shape != (channels, kernel) or conv_state.shape != (kernel - 1, channels):
        raise MinqwenError(f"causal_conv1d: x [T, C] = {list(x.shape)} needs weight [C, K] and conv_state "
                           f"[K − 1, C], got {list(weight.shape)} and {list(conv_state.shape)}")
    out = np.empty_like(x)
    in_the_pass = silu and x.dtype == np.float32  # (the kernel's SiLU is float32 arithmetic)
    conv = _conv_kernel_parallel if x.size >= CONV_PARALLEL_FROM and numba_does_the_products() else _conv_kernel
    conv(np.ascontiguousarray(x), np.ascontiguousarray(weight.T, dtype=x.dtype),
         np.ascontiguousarray(conv_state, dtype=x.dtype), in_the_pass, out)
    if silu and not in_the_pass:
        out = ACTIVATIONS["silu"](out)
    kept = np.concatenate([conv_state, x[max(0, x.shape[0] - (kernel - 1)) :]], axis=0)  # [≤ 2(K−1), C]
    return out, kept[kept.shape[0] - (kernel - 1) :]


# --------------------------------------------------------------------------- the recurrence


def recurrent_gated_delta_rule_numpy(q, k, v, g, beta, state):
    """The gated delta rule, one token at a time: the definition.

    q, k: [T, Hv, Dk]; v: [T, Hv, Dv]; g, beta: [T, Hv]; state: [Hv, Dk, Dv].
    Returns (o [T, Hv, Dv], final state [Hv, Dk, Dv]); the input state is not modified.
    """
    S = state.copy()
    out = np.empty_like(v)
    for t in range(q.shape[0]):
        S *= np.exp(g[t])[:, None, None]  # 1. decay
        predicted = np.einsum("hk,hkv->hv", k[t], S)  # 2. v̂ = Sᵀk        [Hv, Dv]
        delta = beta[t][:, None] * (v[t] - predicted)  #    β (v − v̂)       [Hv, Dv]
        S += k[t][:, :, None] * delta[:, None, :]  # 3. S += k ⊗ δ      [Hv, Dk, Dv]
        out[t] = np.einsum("hk,hkv->hv", q[t], S)  # 4. o = Sᵀq         [Hv, Dv]
    return out, S


def _recurrent_loops(q, k, v, g, beta, initial, states, out):
    """Numba twin of recurrent_gated_delta_rule_numpy: the memory starts as ``initial``, ends in ``states``.

    Heads are independent, so they may run in parallel; within a head the tokens are sequential.
    """
    for h in numba.prange(q.shape[1]):
        _recurrent_head(q, k, v, g, beta, initial, states, out, h)


@numba.njit(inline="always")
def _recurrent_head(q, k, v, g, beta, initial, states, out, h):
    """The recurrence of value head ``h`` over the T tokens of q, k, v, g, beta (arrays of every head).

    ``initial`` [Hv, Dk, Dv] is the incoming memory, read through this name only (it may be
    ``states[0]`` itself, each row read before it is overwritten). ``states`` [n, Hv, Dk, Dv]
    receives the memory: with n = 1 it is updated token after token (``initial`` may then be
    ``states[0]`` itself: a decode step updating the cache's memory in place); with n = T,
    states[t] ends as the memory after token t (what a speculative verify keeps). The same
    four steps, rearranged so that each token makes one pass over S instead of two. Both of a
    token's reads of S can be taken from the memory *before* its update:

        v̂_t = (exp(g_t) S_{t−1})ᵀ k_t = exp(g_t) · (S_{t−1}ᵀ k_t)
        o_t = S_tᵀ q_t = exp(g_t) · (S_{t−1}ᵀ q_t) + (k_t · q_t) δ_t      (S_t = exp(g_t) S_{t−1} + k_t δ_tᵀ)

    so the pass that writes S_t also accumulates S_tᵀ k_{t+1} and S_tᵀ q_{t+1} for the next
    token. On the 0.8B head shape (128 × 128) this is 1.5× the two-pass loop on one core. The
    sums run in the same order whether T tokens come in one call or in T calls, so a verify's
    kept states are bit for bit what decode steps leave.
    """
    t_len, dk = q.shape[0], q.shape[2]
    dv = v.shape[2]
    last_slot = states.shape[0] - 1
    if t_len == 0:
        return
    read_k = np.zeros(dv, states.dtype)  # S_{t−1}ᵀ k_t   [Dv]
    read_q = np.zeros(dv, states.dtype)  # S_{t−1}ᵀ q_t   [Dv]
    delta = np.empty(dv, states.dtype)  # δ_t = β_t (v_t − v̂_t)   [Dv]
    for i in range(dk):  # the first token's reads of the incoming memory
        # Rows as 1-D views, one array written per loop: LLVM then turns the loop over j
        # into vector code. (Reading S_{t−1} from one array and writing S_t to another
        # needed more run-time overlap checks than LLVM makes, and ran 6× slower.)
        row, k_first, q_first = initial[h, i], k[0, h, i], q[0, h, i]  # row [Dv]
        for j in range(dv):
            read_k[j] += k_first * row[j]
            read_q[j] += q_first * row[j]
    for t in range(t_len):
        slot = min(t, last_slot)
        S = states[slot, h]  # [Dk, Dv]: S_t after this token
        # Where S_{t−1} is: in S already (updating in place), or the slot before, or the
        # incoming memory. Not in S, each row is copied in just before its update, so the
        # update pass finds it in the nearest cache.
        previous = initial[h] if t == 0 else states[slot - 1, h] if slot == t else S
        copy_in = t > 0 and slot == t or t == 0 and not _same_memory(initial, states)
        decay = np.exp(g[t, h])
        k_dot_q = 0.0  # a float64 scalar in Numba: the one sum here over Dk terms
        for i in range(dk):
            k_dot_q += k[t, h, i] * q[t, h, i]
        for j in range(dv):
            delta[j] = beta[t, h] * (v[t, h, j] - decay * read_k[j])
            out[t, h, j] = decay * read_q[j] + k_dot_q * delta[j]
            read_k[j] = 0.0  # read: ready to sum the next token's reads
            read_q[j] = 0.0
        if t + 1 == t_len:  # the last token: write S_t, nothing more to read
            for i in range(dk):
                row, k_write = S[i], k[t, h, i]  # row [Dv]
                if copy_in:
                    source = previous[i]
                    for j in range(dv):
                        row[j] = source[j]
                for j in range(dv):
                    row[j] = decay * row[j] + k_write * delta[j]
            continue
        # Write S_t, and read it for token t + 1 on the way. The pass is bound by loads and
        # stores, not arithmetic: a row at a time it stores three vectors (the row, read_k,
        # read_q) per vector of S; four rows at a time share one pass over read_k and read_q,
        # six stores per four vectors (a 512-token prompt on the 0.8B head shape: 1.4-1.5x).
        # The sums still add the rows one after another, so the results are those of the
        # row-at-a-time loop, bit for bit (compared on the 0.8B shape and odd ones when the
        # change was made).
        i = 0
        while i < dk:
            n = min(4, dk - i)  # rows i … i + n − 1 in this pass
            if copy_in:
                for r in range(i, i + n):
                    row, source = S[r], previous[r]
                    for j in range(dv):
                        row[j] = source[j]
            if n == 4:
                r0, r1, r2, r3 = S[i], S[i + 1], S[i + 2], S[i + 3]  # [Dv] each
                w0, w1, w2, w3 = k[t, h, i], k[t, h, i + 1], k[t, h, i + 2], k[t, h, i + 3]
                k0, k1, k2, k3 = k[t + 1, h, i], k[t + 1, h, i + 1], k[t + 1, h, i + 2], k[t + 1, h, i + 3]
                q0, q1, q2, q3 = q[t + 1, h, i], q[t + 1, h, i + 1], q[t + 1, h, i + 2], q[t + 1, h, i + 3]
                for j in range(dv):
                    s0 = decay * r0[j] + w0 * delta[j]
                    s1 = decay * r1[j] + w1 * delta[j]
                    s2 = decay * r2[j] + w2 * delta[j]
                    s3 = decay * r3[j] + w3 * delta[j]
                    r0[j], r1[j], r2[j], r3[j] = s0, s1, s2, s3
                    read_k[j] = (((read_k[j] + k0 * s0) + k1 * s1) + k2 * s2) + k3 * s3
                    read_q[j] = (((read_q[j] + q0 * s0) + q1 * s1) + q2 * s2) + q3 * s3
            else:  # the last rows of a Dk that is not a multiple of four
                for r in range(i, i + n):
                    row, k_write = S[r], k[t, h, r]
                    k_next, q_next = k[t + 1, h, r], q[t + 1, h, r]
                    for j in range(dv):
                        s = decay * row[j] + k_write * delta[j]
                        row[j] = s
                        read_k[j] += k_next * s
                        read_q[j] += q_next * s
            i += n


@numba.njit(inline="always")
def _same_memory(initial, states):
    """Whether ``initial`` is ``states[0]`` itself (a decode step updating in place)."""
    return initial.ctypes.data == states.ctypes.data


# One body, compiled twice. A decode step's work per head is too small to pay for waking a
# thread pool. A speculative verify of a few tokens is large enough to split the heads across
# cores, and in a model too big for the caches BLAS is kept on one thread then (see
# linear.numba_multiplies), so the cores are free. A prompt of BLAS_ROWS tokens or more runs
# serial: OpenBLAS's threads are still spinning from the projections just before (~0.1 s
# after each call) and take one core. Measured on the
# 0.8B shape, 512 tokens, one layer right after a product (Intel Xeon VM): 22-23 ms serial,
# 24 ms parallel; 12.6 ms parallel once OpenBLAS's threads had gone to sleep.
# With OPENBLAS_THREAD_TIMEOUT=18 set when the process starts, OpenBLAS's threads sleep
# ~0.1 ms after a call, and prompts take the parallel build too (threads.OPENBLAS_THREADS_NAP).
# It pays on some machines, not others, because every product must then wake its threads:
# on an AMD EPYC the recurrence fell to 0.28–0.38 s but the whole 512-token prefill was no
# faster (101–113 against 106–119 tok/s); on an Intel Xeon VM it was 184–188 against 165–171
# tok/s (alternated runs; 197-200 against 184-189 on a later day, when it also cost the
# embedded model's decoding ~3-6%), so it is the user's choice, not the default.
# Where Numba's kernels do the products in their parallel builds (a few rows of a model too big
# for the caches, bf16 or float32: see linear.numba_multiplies) its pool is awake between calls
# and the cores are free, so even a decode step's heads are worth splitting: measured on the
# 0.8B shape, Intel Xeon VM, bf16 decode 14.4-14.6 against 14.9-15.1 tokens/s. Not where BLAS
# does the products: OpenBLAS's threads spin after each one and take a core (float32 decode
# through BLAS: 9.1-9.2 tokens/s serial, 8.7 parallel).
_recurrent_kernel, _recurrent_kernel_parallel = serial_and_parallel(_recurrent_loops)
PARALLEL_FROM = 1 << 21  # multiply-adds per call (tokens × heads × Dk × Dv) worth waking the pool
PARALLEL_FROM_AWAKE = 1 << 16  # the same when Numba's pool is already awake


def recurrent_gated_delta_rule(q, k, v, g, beta, state, every_state: bool = False, in_place: bool = False):
    """The gated delta rule, token by token, compiled: same contract as the NumPy twin.

    With ``every_state``, the second result is the state after each token, [T, Hv, Dk, Dv],
    instead of only the last. With ``in_place``, the final state is written into ``state``
    itself and returned: what a decode step wants, as the old memory is not needed again, and
    copying it would be one more pass over 1 MB per layer (0.8B shape) each token.
    """
    t_len, num_heads, dk = q.shape
    dv = v.shape[-1]
    # The kernel does not check its reads: shapes that do not fit are refused here
    if (k.shape != q.shape or v.shape != (t_len, num_heads, dv) or g.shape != (t_len, num_heads)
            or beta.shape != (t_len, num_heads) or state.shape != (num_heads, dk, dv)):
        raise MinqwenError(
            f"recurrent_gated_delta_rule: q, k [T, Hv, Dk], v [T, Hv, Dv], g, beta [T, Hv] and state [Hv, Dk, Dv] "
            f"do not fit: {', '.join(f'{n} {list(a.shape)}' for n, a in zip('q k v g beta state'.split(), (q, k, v, g, beta, state)))}")
    # [Hv, Dk, Dv]: the incoming memory. With in_place it is also states[0] below, and the
    # kernel reads each of its rows before overwriting it.
    initial = np.ascontiguousarray(state, dtype=q.dtype)
    if in_place and not every_state and initial is state:
        states = state[None]  # [1, Hv, Dk, Dv]: a view of the caller's array, updated in place
    else:
        states = np.empty((max(1, t_len) if every_state else 1, *state.shape), q.dtype)  # [T or 1, Hv, Dk, Dv]
    out = np.empty(v.shape, q.dtype)  # [T, Hv, Dv]
    if t_len == 0:  # no token: the memory is the one that came in (the kernel writes nothing)
        states[0] = initial
    work = state.size * t_len
    parallel = (work >= PARALLEL_FROM and (t_len < BLAS_ROWS or OPENBLAS_THREADS_NAP)) or (
        work >= PARALLEL_FROM_AWAKE and numba_does_the_products()
    )
    kernel = _recurrent_kernel_parallel if parallel else _recurrent_kernel
    kernel(
        np.ascontiguousarray(q), np.ascontiguousarray(k), np.ascontiguousarray(v),
        np.ascontiguousarray(g), np.ascontiguousarray(beta), initial, states, out,
    )
    return out, (states[:t_len] if every_state else states[0])


# --------------------------------------------------------------------------- a decode step in one pass


def _decode_step_loops(mixed_qkv, z, b, a, conv_weight_t, conv_state, A_log, dt_bias, norm, eps,
                       num_key_heads, S, out):
    """Everything :func:`gated_deltanet` does between its projections, for one token, compiled.

    mixed_qkv [C]: in_proj_qkv's output, before the conv; z [Hv, Dv]; b, a [Hv];
    conv_weight_t [K, C]; conv_state [K−1, C] and S [Hv, Dk, Dv]: the layer's state, both
    updated in place; out [Hv, Dv]: the gated norm's output, for out_proj.

    The twin is gated_deltanet's own code (from the conv to the gated norm), and each step
    here is the compiled step that code calls (the conv kernel's sums, sigmoid32, decay_gate's
    arithmetic, the norms' row functions, :func:`_recurrent_head`), so the results are the
    same bit for bit (tested): a tapped decode step, which runs that code, records what an
    untapped one computes. What changes is the number of passes: between two products a
    decode step made ~20 calls, each with a temporary, and found its data evicted by the
    product before; here each value head goes from its conv to its norm in one visit, and
    the heads split across the cores.
    """
    num_value_heads, dk, dv = S.shape
    key_dim = num_key_heads * dk
    group = num_value_heads // num_key_heads  # value heads per key head
    taps = conv_weight_t.shape[0]
    scale = np.float32(dk**-0.5)
    # Each head fills its own row of these; laid out as gated_deltanet's (T = 1, q and k repeated per value head)
    q = np.empty((1, num_value_heads, dk), np.float32)  # [1, Hv, Dk]
    k = np.empty((1, num_value_heads, dk), np.float32)  # [1, Hv, Dk]
    v = np.empty((1, num_value_heads, dv), np.float32)  # [1, Hv, Dv]
    g = np.empty((1, num_value_heads), np.float32)  # [1, Hv]
    beta = np.empty((1, num_value_heads), np.float32)  # [1, Hv]
    core = np.empty((1, num_value_heads, dv), np.float32)  # [1, Hv, Dv]
    states = S.reshape((1, num_value_heads, dk, dv))  # the same memory: the recurrence runs in place
    for h in numba.prange(num_value_heads):
        key_head = h // group
        # conv1d + SiLU of this head's channels (its key head's q and k, its own v), reading
        # the window as it was before this token; the window moves on after every head is done
        _conv_one_token(mixed_qkv, conv_weight_t, conv_state, key_head * dk, q[0, h])
        _conv_one_token(mixed_qkv, conv_weight_t, conv_state, key_dim + key_head * dk, k[0, h])
        _conv_one_token(mixed_qkv, conv_weight_t, conv_state, 2 * key_dim + h * dv, v[0, h])
        l2_normalize_row(q[0, h], np.float32(L2_EPS), q[0, h])
        for i in range(dk):
            q[0, h, i] *= scale
        l2_normalize_row(k[0, h], np.float32(L2_EPS), k[0, h])
        beta[0, h] = sigmoid32(b[h])
        g[0, h] = _decay_gate32(a[h], A_log[h], dt_bias[h])
        _recurrent_head(q, k, v, g, beta, S, states, core, h)
        gated_rms_norm_row(core[0, h], z[h], norm, eps, out[h])
    # The window: drop the oldest input, append this token's
    for row in range(taps - 2):
        conv_state[row] = conv_state[row + 1]
    if taps > 1:
        conv_state[taps - 2] = mixed_qkv


@numba.njit(inline="always")
def _conv_one_token(x, weight_t, conv_state, first, out):
    """out = silu(conv1d) of channels first … first + len(out) − 1 for one new input row x [C].

    The sums of :func:`_conv_loops` (taps oldest first, from zero, in float32), for one token;
    as there, loops run along the channels, which LLVM turns into vector code.
    """
    taps, n = weight_t.shape[0], out.size
    for c in range(n):
        out[c] = 0.0
    for tap in range(taps):
        weights = weight_t[tap, first : first + n]  # [n]
        inputs = (conv_state[tap] if tap < taps - 1 else x)[first : first + n]  # [n]: the window, then x
        for c in range(n):
            out[c] += weights[c] * inputs[c]
    for c in range(n):
        out[c] = silu32(out[c])


_decode_step_kernel, _decode_step_kernel_parallel = serial_and_parallel(_decode_step_loops, error_model="numpy")


def decode_step_fits(mixed_qkv, z, w: DeltaNetWeights, state: DeltaNetState, num_key_heads: int,
                     hidden_act: str) -> bool:
    """Whether :func:`decode_step` can take this call: one token, float32 throughout (the
    kernel's arithmetic), SiLU, a state it may update in place, every shape as the kernel reads
    it. Anything else runs the definition in :func:`gated_deltanet` (which refuses shapes that
    do not fit)."""
    conv, memory = state.conv, state.recurrent
    if memory.ndim != 3 or z.ndim != 3:
        return False
    num_value_heads, dk, dv = memory.shape
    channels, taps = w.conv1d.shape
    return (
        mixed_qkv.shape[0] == 1
        and hidden_act in SILU_NAMES
        and state.history is None
        and mixed_qkv.dtype == w.conv1d.dtype == w.A_log.dtype == w.dt_bias.dtype == w.norm.dtype
        == conv.dtype == memory.dtype == np.float32
        and conv.flags.c_contiguous and memory.flags.c_contiguous and conv.flags.writeable and memory.flags.writeable
        and num_key_heads > 0 and num_value_heads % num_key_heads == 0
        and mixed_qkv.shape[1] == channels == 2 * num_key_heads * dk + num_value_heads * dv
        and conv.shape == (taps - 1, channels)
        and z.shape[1:] == (num_value_heads, dv)
        and w.A_log.shape == w.dt_bias.shape == (num_value_heads,) and w.norm.shape == (dv,)
        and w.in_proj_b.shape[0] == w.in_proj_a.shape[0] == num_value_heads  # b, a: [1, Hv]
    )


def decode_step(mixed_qkv, z, b, a, w: DeltaNetWeights, state: DeltaNetState, num_key_heads: int,
                eps: float) -> np.ndarray:
    """gated_deltanet between its projections for one token, compiled (:func:`_decode_step_loops`).

    mixed_qkv [1, C], z [1, Hv, Dv], b, a [1, Hv]: the projections' outputs; advances ``state``
    in place; returns the gated norm's output [1, Hv, Dv].
    """
    out = np.empty((1, *z.shape[1:]), np.float32)  # [1, Hv, Dv]
    # Split the heads across the cores only where Numba's pool is awake anyway (a model too big
    # for the caches: see linear.numba_multiplies); a small model's step stays on this thread.
    kernel = _decode_step_kernel_parallel if numba_does_the_products() else _decode_step_kernel
    kernel(mixed_qkv[0], z[0], b[0], a[0], np.ascontiguousarray(w.conv1d.T), state.conv, w.A_log, w.dt_bias,
           w.norm, np.float32(eps), num_key_heads, state.recurrent, out[0])
    return out


def chunked_gated_delta_rule(q, k, v, g, beta, state, chunk_size: int = CHUNK_SIZE):
    """The gated delta rule over whole chunks of tokens with matrix products.

    Same contract as :func:`recurrent_gated_delta_rule_numpy`. Within a chunk of C tokens,
    all the writes of the delta rule are solved at once. Token i writes δ_i = β_i (v_i − k_iᵀ
    S_{i−1}), S decayed to step i; unrolled from the state S₀ at the chunk start, the writes
    δ [C, Dv] obey the lower-triangular system

        (I + A) δ = β v − β exp(g_cum) K S₀,   A[i, j] = β_i (k_i · k_j) · decay(j → i) for j < i

    (the UT transform), so δ = u − w S₀ with u = (I + A)⁻¹ β v (the writes if S₀ were zero)
    and w = (I + A)⁻¹ β exp(g_cum) K (how much of S₀ each write cancels). Between chunks the
    state is carried as in the recurrent form.
    """
    t_len, num_heads, dk = q.shape
    dv = v.shape[-1]
    C = chunk_size
    pad = (-t_len) % C
    n_chunks = (t_len + pad) // C

    def chunks(x):  # [T, Hv, ...] → [Hv, N, C, ...], zero-padded: a zero k and β leave S alone
        x = np.moveaxis(x, 0, 1)
        x = np.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
        return x.reshape(num_heads, n_chunks, C, *x.shape[2:])

    q, k, v, g, beta = chunks(q), chunks(k), chunks(v), chunks(g), chunks(beta)
    g_cum = np.cumsum(g, axis=-1)  # [Hv, N, C]: log of the decay from the chunk start to t

    # decay(j → i) = exp(g_cum_i − g_cum_j) for j ≤ i. Mask in log space *before* exp: for j > i
    # the difference is positive and exp of it overflows float32.
    causal = np.tril(np.ones((C, C), dtype=bool))
    log_decay = g_cum[..., :, None] - g_cum[..., None, :]  # [Hv, N, C, C]
    decay = np.exp(np.where(causal, log_decay, -np.inf))

    k_beta = k * beta[..., None]  # [Hv, N, C, Dk]
    v_beta = v * beta[..., None]  # [Hv, N, C, Dv]
    A = np.tril((k_beta @ k.swapaxes(-1, -2)) * decay, -1)  # [Hv, N, C, C], strictly lower
    inv = unit_lower_inverse(A)  # (I + A)⁻¹                   [Hv, N, C, C]
    u = inv @ v_beta  # values to write, if S were zero at the chunk start   [Hv, N, C, Dv]
    w = inv @ (k_beta * np.exp(g_cum)[..., None])  # how much of S each write cancels [Hv, N, C, Dk]

    attn = (q @ k.swapaxes(-1, -2)) * decay  # within-chunk q·k with decay, diagonal included [Hv, N, C, C]
    q_from_start = q * np.exp(g_cum)[..., None]  # q reads S as decayed since the chunk start [Hv, N, C, Dk]
    k_to_end = k * np.exp(g_cum[..., -1:] - g_cum)[..., None]  # writes decayed to the chunk end [Hv, N, C, Dk]
    chunk_decay = np.exp(g_cum[..., -1])  # [Hv, N]

    S = np.array(state, dtype=q.dtype, copy=True)  # [Hv, Dk, Dv]
    out = np.empty((num_heads, n_chunks, C, dv), q.dtype)
    for n in range(n_chunks):
        v_new = u[:, n] - w[:, n] @ S  # the correction each token writes, given S   [Hv, C, Dv]
        # old memory + this chunk's writes: [Hv, C, Dk]·[Hv, Dk, Dv] + [Hv, C, C]·[Hv, C, Dv] → [Hv, C, Dv]
        out[:, n] = q_from_start[:, n] @ S + attn[:, n] @ v_new
        S = S * chunk_decay[:, n, None, None] + k_to_end[:, n].swapaxes(-1, -2) @ v_new  # [Hv, Dk, C]·[Hv, C, Dv]
    out = out.reshape(num_heads, n_chunks * C, dv)[:, :t_len]  # [Hv, T, Dv]
    return np.moveaxis(out, 0, 1), S  # [T, Hv, Dv], [Hv, Dk, Dv]


def unit_lower_inverse(A: np.ndarray) -> np.ndarray:
    """(I + A)⁻¹ for strictly lower-triangular A [..., C, C], by forward substitution.

    Row i of the inverse is e_i − Σ_{j<i} A[i, j] · (row j of the inverse): each row needs only
    the rows above it, so C steps, each a small matrix product over every head and chunk at once.
    """
    C = A.shape[-1]
    inv = np.broadcast_to(np.eye(C, dtype=A.dtype), A.shape).copy()
    for i in range(1, C):
        inv[..., i : i + 1, :] -= A[..., i : i + 1, :i] @ inv[..., :i, :]
    return inv


# --------------------------------------------------------------------------- the layer


def decay_gate(a: np.ndarray, A_log: np.ndarray, dt_bias: np.ndarray) -> np.ndarray:
    """g = −exp(A_log) · softplus(a + dt_bias): a [T, Hv] → g [T, Hv], the log of each head's decay.

    Mamba2's parametrisation: a per-head rate exp(A_log) > 0 times a per-token step
    softplus(a + dt_bias) > 0 (dt_bias: the head's default step), so exp(g) ∈ (0, 1].
    Float32 takes the compiled loop below (the decode step's own arithmetic, so that the two
    agree bit for bit); the twin is :func:`decay_gate_numpy`.
    """
    if a.dtype == A_log.dtype == dt_bias.dtype == np.float32 and a.ndim == 2 and A_log.shape == dt_bias.shape == a.shape[1:]:
        g = np.empty(a.shape, np.float32)
        _decay_gate_kernel(a, A_log, dt_bias, g)
        return g
    return decay_gate_numpy(a, A_log, dt_bias)


def decay_gate_numpy(a: np.ndarray, A_log: np.ndarray, dt_bias: np.ndarray) -> np.ndarray:
    """The twin of :func:`decay_gate`, in NumPy (which rounds exp and log1p within an ulp of the C library's)."""
    return -np.exp(A_log) * softplus(a + dt_bias)


@numba.njit(inline="always")
def _decay_gate32(a, A_log, dt_bias):
    """decay_gate for one float32 value of a (and its head's A_log, dt_bias)."""
    return -np.exp(A_log) * softplus32(a + dt_bias)


@numba.njit(cache=True, error_model="numpy")
def _decay_gate_kernel(a, A_log, dt_bias, g):
    """g[t, h] = _decay_gate32(a[t, h], A_log[h], dt_bias[h]) over a, g [T, Hv]."""
    for t in range(a.shape[0]):
        for h in range(a.shape[1]):
            g[t, h] = _decay_gate32(a[t, h], A_log[h], dt_bias[h])


def gated_deltanet(
    x: np.ndarray,
    w: DeltaNetWeights,
    state: DeltaNetState,
    num_key_heads: int,
    num_value_heads: int,
    key_head_dim: int,
    value_head_dim: int,
    hidden_act: str,
    eps: float,
    tap=None,
    form: str = "recurrent",
) -> np.ndarray:
    """One Gated DeltaNet layer over x [T, H]; advances state in place (conv window and S).

    ``form``: "recurrent" (the Numba kernel) or "chunked" (matmuls) for calls of more than
    one token; a single token always takes the recurrent step.
    """
    t_len = x.shape[0]
    key_dim = num_key_heads * key_head_dim

    # [T, 2·Hk·Dk + Hv·Dv], [T, Hv·Dv], [T, Hv], [T, Hv]: four projections of one x
    mixed_qkv, z, b, a = linears(x, (w.in_proj_qkv, w.in_proj_z, w.in_proj_b, w.in_proj_a))
    z = z.reshape(t_len, num_value_heads, value_head_dim)  # [T, Hv, Dv]
    if tap is not None:
        tap("linear_attn.in_proj_qkv", mixed_qkv)
        tap("linear_attn.in_proj_z", z)
        tap("linear_attn.in_proj_b", b)
        tap("linear_attn.in_proj_a", a)

    if tap is None and decode_step_fits(mixed_qkv, z, w, state, num_key_heads, hidden_act):
        # A decode step: everything from here to the gated norm, compiled in one pass per value
        # head (decode_step). The code below is its definition, and what every other call runs.
        normed = decode_step(mixed_qkv, z, b, a, w, state, num_key_heads, eps)  # [1, Hv, Dv]
        return linear(normed.reshape(1, num_value_heads * value_head_dim), w.out_proj)  # [1, H]

    # Kept for a speculative verify (mtp.py), which must rebuild the conv window after each of
    # its tokens for the roll-back; the conv below replaces state.conv.
    conv_inputs, conv_before = mixed_qkv, state.conv
    silu_in_conv = hidden_act in SILU_NAMES  # every Qwen3.5 model's: applied in the conv's pass
    mixed_qkv, state.conv = causal_conv1d(mixed_qkv, w.conv1d, state.conv, silu=silu_in_conv)
    if not silu_in_conv:
        mixed_qkv = ACTIVATIONS[hidden_act](mixed_qkv)
    if tap is not None:
        tap("linear_attn.conv1d", mixed_qkv)
    q = mixed_qkv[:, :key_dim].reshape(t_len, num_key_heads, key_head_dim)  # [T, Hk, Dk]
    k = mixed_qkv[:, key_dim : 2 * key_dim].reshape(t_len, num_key_heads, key_head_dim)  # [T, Hk, Dk]
    v = mixed_qkv[:, 2 * key_dim :].reshape(t_len, num_value_heads, value_head_dim)  # [T, Hv, Dv]

    # The reference scales q by 1/√Dk before the recurrence (the paper's rule has no scale);
    # the factor in q's dtype keeps float32 float32 (and a float64 check float64).
    q = l2_normalize(q) * q.dtype.type(key_head_dim**-0.5)
    k = l2_normalize(k)
    beta = sigmoid(b)  # [T, Hv]: how strongly this token overwrites the memory
    g = decay_gate(a, w.A_log, w.dt_bias)  # [T, Hv]: log of the memory's decay, ≤ 0
    if tap is not None:
        tap("linear_attn.q", q)
        tap("linear_attn.k", k)
        tap("linear_attn.v", v)
        tap("linear_attn.g", g)
        tap("linear_attn.beta", beta)

    # Each key head serves Hv / Hk consecutive value heads.
    group = num_value_heads // num_key_heads
    if group > 1:  # (np.repeat copies even when group is 1)
        q = np.repeat(q, group, axis=1)  # [T, Hv, Dk]
        k = np.repeat(k, group, axis=1)  # [T, Hv, Dk]
    # All three branches compute recurrent_gated_delta_rule_numpy (the definition); the plain
    # path is the last one. history is set only during a speculative verify (mtp.py).
    if state.history is not None:
        core = _recurrence_keeping_every_state(q, k, v, g, beta, state, conv_inputs, conv_before)
    elif form == "chunked" and t_len > 1:
        core, state.recurrent = chunked_gated_delta_rule(q, k, v, g, beta, state.recurrent)  # [T, Hv, Dv]
    else:
        core, state.recurrent = recurrent_gated_delta_rule(q, k, v, g, beta, state.recurrent, in_place=True)
    if tap is not None:
        tap("linear_attn.core", core)
        # Copies: a decode step updates both in place, and a tap may keep the array it was handed.
        tap("linear_attn.conv_state", state.conv.copy())
        tap("linear_attn.recurrent_state", state.recurrent.copy())

    normed = gated_rms_norm(core, z, w.norm, eps)  # [T, Hv, Dv]
    if tap is not None:
        tap("linear_attn.norm", normed)
    return linear(normed.reshape(t_len, num_value_heads * value_head_dim), w.out_proj)  # [T, H]


def _recurrence_keeping_every_state(q, k, v, g, beta, state, conv_inputs, conv_before):
    """The recurrence over all T tokens, appending the state after each token to ``state.history``.

    The kernel sums in the same order for T tokens at once as for one at a time, so every kept
    state is bit for bit what a decode step would have left. The conv window after token t is
    the last K − 1 rows of (old window, inputs up to t). Returns the output [T, Hv, Dv];
    leaves the final state in place.
    """
    window = np.concatenate([conv_before, conv_inputs], axis=0)  # [K−1+T, C]
    keep = conv_before.shape[0]  # K − 1
    out, states = recurrent_gated_delta_rule(q, k, v, g, beta, state.recurrent, every_state=True)  # [T, Hv, Dk, Dv]
    for t in range(q.shape[0]):
        state.history.append(DeltaNetState(window[t + 1 : t + 1 + keep].copy(), states[t]))
    state.recurrent = states[-1]
    return out
