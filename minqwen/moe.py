"""The sparse mixture-of-experts block: every qwen3_5_moe layer's MLP.

In place of one wide SwiGLU MLP, an MoE layer holds E small SwiGLU "experts" and a router
that sends each token to k of them (Qwen3.5-35B-A3B: 256 experts, k = 8), plus one shared
expert that every token uses. A token's path (x: the post-attention-normed residual, [T, H]):

    x ─ gate (the router, [E, H]) ─ softmax over the E experts, in fp32 ─ top-k ─ renormalise
                                                   → k experts per token, k weights summing to 1
    routed = Σ over the token's k experts e:  weight_e · down_e(act(gate_e(x)) · up_e(x))
    shared = sigmoid(x · shared_expert_gateᵀ) · shared_expert(x)
    out    = routed + shared

The point of it: a token reads k of the E experts, so the model has the knowledge of all its
parameters (35 B) and the per-token cost of the ones it uses (3 B). minqwen keeps that true in
memory as well as in arithmetic: the experts stay memory-mapped in the checkpoint's own dtype
(:func:`load_experts` never reads them) and a step indexes only the experts its tokens chose,
so a decode step pages in the active parameters, not the total.

**The gather.** Looping over tokens would run one tiny matmul per (token, expert) pair;
looping over all E experts with a mask (what the tests use as the definition,
``dense_masked_moe`` in tests/test_moe.py: NumPy, eight lines) would read every expert.
Instead the k·T (token, expert) assignments are grouped by expert — a counting sort,
:func:`group_by_expert` — so that each chosen expert runs one matmul over all of its tokens, and
the outputs are then scattered back to their tokens with their routing weights,
:func:`scatter_weighted`. The grouping and the scatter are plain loops, compiled by Numba; each
has a NumPy twin (``…_numpy``) that is the definition and that tests hold it equal to. The
experts' matmuls themselves: a prompt's many rows go expert by expert to
:func:`~minqwen.linear.linear` (BLAS); a decode step's few rows of bf16 experts take one more
compiled loop, :func:`grouped_rows_bf16` (twin: :func:`grouped_rows_bf16_numpy`), which runs
one projection of all chosen experts at once and widens bf16 as it reads, never making a
float32 copy of an expert: see :func:`experts_swiglu_few_rows` for why.

**Ties.** The reference picks the k experts with ``torch.topk``, whose documentation says the
indices of equal values are not guaranteed. On CPU it selects with ``std::partial_sort`` (when
64·k ≤ E) or ``std::nth_element``, and neither follows an index rule: measured with torch 2.13,
256 equal scores and k = 8 give experts 168–175; six equal scores and k = 1 give expert 3. No
rule can match that, so minqwen breaks ties towards the lowest expert index (a stable sort), and
tests pin the rule. What any top-k agrees on, and a reference-lane test checks: the k chosen
probabilities (so the weights) and, unless equal scores straddle the k-th place, the chosen
experts — the only case in which a tie changes the output. Real activations essentially never
tie exactly; parity tests use continuous random router weights.

**Two expert layouts** a checkpoint may use, found per layer (one checkpoint can mix them):
per expert, ``experts.{e}.gate_proj/up_proj/down_proj.weight`` (what transformers'
``save_pretrained`` writes, the FP8 releases, the MTP layer), and fused,
``experts.gate_up_proj`` [E, 2·I, H] (gate rows first, then up rows) with ``experts.down_proj``
[E, H, I], no ``.weight`` suffix (the bf16 35B-A3B's main layers, and ``save_pretrained`` with
``save_original_format=False``). Both become the same :class:`Experts`: three sequences
indexed by expert, ``gate_proj[e]`` [I, H] and so on — views into the file either way.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numba
import numpy as np
from numba.typed import List

from .activations import ACTIVATIONS, sigmoid
from .checkpoint import FP8Tensor
from .errors import MinqwenError
from .linear import (BF16, BLAS_ROWS, BLOCK, CACHE_LINE, PREFETCH_AHEAD_BYTES, _prefetch_block, _row_a_quarter_on,
                     as_float32, linear)
from .mlp import MLPWeights, swiglu_mlp
from .threads import serial_and_parallel


@dataclass
class Experts:
    """One layer's E routed experts, as stored (dtype and all), indexed by expert.

    Each field is anything that ``[e]`` turns into that expert's matrix: a list of per-expert
    arrays, or a view of a fused [E, …] array. Nothing is read until an expert is used.
    """

    gate_proj: Sequence[np.ndarray]  # E × [I, H], I = config.moe_intermediate_size
    up_proj: Sequence[np.ndarray]  # E × [I, H]
    down_proj: Sequence[np.ndarray]  # E × [H, I]
    layout: str = "per_expert"  # or "fused": how the checkpoint stores them (minqwen inspect shows it)

    def __len__(self) -> int:
        return len(self.gate_proj)


@dataclass
class MoEWeights:
    """One layer's sparse MoE block, named as in the checkpoint (``layers.{i}.mlp.…``)."""

    gate: np.ndarray  # [E, H]: the router (``mlp.gate.weight``)
    experts: Experts
    shared_expert: MLPWeights  # [S, H], [S, H], [H, S]; S = config.shared_expert_intermediate_size
    shared_expert_gate: np.ndarray  # [1, H]


# ==================================================================== the block


def sparse_moe_block(x: np.ndarray, w: MoEWeights, top_k: int, hidden_act: str, tap=None) -> np.ndarray:
    """The MoE block: x [T, H] → routed experts + gated shared expert, [T, H]."""
    router_logits, chosen, weights = route(x, w.gate, top_k)  # [T, E], [T, k], [T, k]
    if tap is not None:
        tap("mlp.router_logits", router_logits)
        tap("mlp.experts_chosen", chosen)
        tap("mlp.expert_weights", weights)
    routed = routed_experts(x, w.experts, chosen, weights, hidden_act)  # [T, H]
    shared = swiglu_mlp(x, w.shared_expert, hidden_act)  # [T, H]
    if tap is not None:
        tap("mlp.shared_expert", shared)
    return routed + sigmoid(linear(x, w.shared_expert_gate)) * shared  # [T, 1] gate per token


def route(x: np.ndarray, gate: np.ndarray, top_k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The router: which k experts each token goes to, and with what weights.

    Returns ``router_logits`` [T, E], ``experts_chosen`` [T, k] int64 (best first) and
    ``expert_weights`` [T, k] (the chosen experts' softmax probabilities, renormalised to sum
    to 1). Exactly equal probabilities are ranked lowest expert index first: where such a tie
    straddles the k-th place, the reference's choice follows no rule (see the module's "Ties").
    """
    logits = linear(x, gate)  # [T, H] · [E, H]ᵀ → [T, E]
    # The reference takes the softmax in fp32 (dtype=torch.float) whatever the activations' dtype;
    # so does minqwen, except that a float64 model (used to check the algebra) stays float64.
    z = logits.astype(np.promote_types(logits.dtype, np.float32), copy=False)
    z = np.exp(z - z.max(axis=-1, keepdims=True))
    probs = z / z.sum(axis=-1, keepdims=True)  # [T, E]
    # A stable sort of −p keeps equal probabilities in index order: ties go to the lowest index.
    chosen = np.argsort(-probs, axis=-1, kind="stable")[:, :top_k]  # [T, k]
    top = np.take_along_axis(probs, chosen, axis=-1)  # [T, k]
    weights = (top / top.sum(axis=-1, keepdims=True)).astype(logits.dtype, copy=False)
    return logits, chosen.astype(np.int64, copy=False), weights


def routed_experts(
    x: np.ndarray,
    experts: Experts,
    chosen: np.ndarray,
    weights: np.ndarray,
    hidden_act: str,
    grouped=None,
    scatter=None,
) -> np.ndarray:
    """Σ over each token's chosen experts of weight · expert(x), touching only chosen experts.

    x [T, H], chosen and weights [T, k]. ``grouped`` and ``scatter`` default to the Numba
    kernels; tests pass the NumPy twins to check that both give the same answer.
    """
    grouped = grouped or group_by_expert
    scatter = scatter or scatter_weighted
    t_len, top_k = chosen.shape
    order, offsets = grouped(chosen, len(experts))  # [T·k] assignments sorted by expert; [E + 1]
    tokens = order // top_k  # [T·k]: the token of each assignment (assignment a = token·k + slot)
    present = np.flatnonzero(offsets[1:] > offsets[:-1])  # the experts some token chose, ascending
    # Each chosen expert's three matrices, indexed once: the only expert weights this call reads.
    used = [(experts.gate_proj[e], experts.up_proj[e], experts.down_proj[e]) for e in present]
    if len(tokens) < BLAS_ROWS and x.dtype == np.float32 and all(_is_bf16(m) for trio in used for m in trio):
        xs = x[tokens]  # [T·k, H]: each expert's tokens side by side
        ys = experts_swiglu_few_rows(xs, used, np.diff(offsets)[present], hidden_act)  # a decode step
    else:
        # Each expert's tokens are gathered as its turn comes: a prompt's whole [T·k, H] copy of x
        # would be as large as ys (16k tokens, k = 8, H = 2048: 1 GiB each).
        ys = np.empty((len(tokens), x.shape[1]), x.dtype)  # [T·k, H]: expert outputs in grouped order
        for (gate, up, down), e in zip(used, present):
            rows = slice(offsets[e], offsets[e + 1])
            ys[rows] = expert_swiglu(x[tokens[rows]], gate, up, down, hidden_act)  # [n_e, H]
    return scatter(ys, order, weights.reshape(-1), top_k, t_len)  # [T, H]


def expert_swiglu(x: np.ndarray, gate_proj, up_proj, down_proj, hidden_act: str) -> np.ndarray:
    """One expert on its tokens x [n, H] → [n, H]: a SwiGLU MLP of width I, one matmul per matrix over all n tokens."""
    weights = MLPWeights(_readable(gate_proj, x.dtype), _readable(up_proj, x.dtype), _readable(down_proj, x.dtype))
    return swiglu_mlp(x, weights, hidden_act)


def experts_swiglu_few_rows(xs: np.ndarray, used: list, counts: np.ndarray, hidden_act: str) -> np.ndarray:
    """What :func:`expert_swiglu` computes for each chosen expert, for a few rows of bf16 experts.

    A decode step has k rows, one per chosen expert. Expert by expert that is 3·k small
    matmuls, each a parallel region that must wake the thread pool and wait for its slowest
    thread — measured, on two busy cores, to cost more than the arithmetic. Here each
    projection of all chosen experts is one compiled loop (:func:`_grouped_rows_kernel`):
    three parallel regions per layer, whatever k. ``counts[m]``: rows of the m-th expert in ``used``.
    """
    starts = np.concatenate([[0], np.cumsum(counts)])  # [M + 1]: expert m's rows are starts[m]:starts[m + 1]
    gate_proj, up_proj, down_proj = zip(*used)  # each: the chosen experts' matrices of that kind
    gate = ACTIVATIONS[hidden_act](grouped_rows_bf16(xs, starts, gate_proj))  # [n, H] → [n, I]
    up = grouped_rows_bf16(xs, starts, up_proj)  # [n, I]
    return grouped_rows_bf16(gate * up, starts, down_proj)  # [n, I] → [n, H]


def _is_bf16(weight) -> bool:
    return isinstance(weight, np.ndarray) and weight.dtype == BF16


def _readable(weight: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """One expert's stored matrix in a form linear() multiplies: as is when it can, else widened.

    float32 goes to linear() straight from the memory map, bf16 too (its kernel widens on the
    fly); float16 is converted, this one slice only. An FP8 expert
    (:class:`~minqwen.checkpoint.FP8Tensor`) is dequantized, this one expert only. (A
    ``Model.astype`` copy holds its experts in its own dtype already.)
    """
    if isinstance(weight, FP8Tensor):
        return weight.dequantize().astype(dtype, copy=False)
    if weight.dtype == dtype or (weight.dtype == BF16 and dtype == np.float32):
        return weight
    return weight.astype(dtype)


# ==================================================================== the gather: kernels and twins


def grouped_rows_bf16_numpy(x: np.ndarray, starts: np.ndarray, matrices: list) -> np.ndarray:
    """The definition: each group of rows of x times its own bf16 matrix, widened.

    x [n, in]; ``starts`` [M + 1], from 0 to n: group m is rows ``starts[m]:starts[m + 1]``;
    ``matrices`` M × [out, in] → [n, out].
    """
    return np.concatenate([x[starts[m]:starts[m + 1]] @ w.astype(np.float32).T for m, w in enumerate(matrices)])


GROUPED_BLOCK = 64  # weight rows per work item of _grouped_rows_kernel


def _grouped_rows_loops(x, starts, matrices_bits, out):
    """out[j, r] = Σ_i x[j, i] · widen(w[r, i]), w the matrix of row j's group.

    x [n, in] float32; starts [M + 1]; matrices_bits M × [out, in] (bf16 bits, uint16); out [n, out].
    One parallel loop over work items (matrix m, block of GROUPED_BLOCK rows of it): M · ⌈out/64⌉
    items, enough to share among threads even for one expert (a 512-row projection is 8 items).
    Inside an item, as in linear's few-row kernel, four weight rows a quarter of the block
    apart are read at once (four memory streams per core; measured on the 35B-A3B layer shape
    with 256 experts top-8, Intel Xeon VM: MoE layers 1.31× the dense model's time one row at
    a time, 1.20–1.23× this way), and every weight row is read from memory once for all of the
    group's input rows — a speculative verify can send several rows to one expert. The rows
    are summed BLOCK weights at a time with software prefetch ahead, as there. fastmath
    reorders each sum into vector lanes (float32 round-off; tests bound it).
    """
    n_out = out.shape[1]
    n_in = x.shape[1]
    n_blocks = (n_out + GROUPED_BLOCK - 1) // GROUPED_BLOCK
    ahead, step = PREFETCH_AHEAD_BYTES // 2, CACHE_LINE // 2  # in bf16 weights
    for item in numba.prange((starts.size - 1) * n_blocks):
        m = item // n_blocks
        w = matrices_bits[m]  # [out, in]
        flat = w.reshape(-1)  # [out · in]: the same memory, for the prefetches
        first = (item - m * n_blocks) * GROUPED_BLOCK
        stop = min(first + GROUPED_BLOCK, n_out)
        quarter = (stop - first + 3) // 4
        for r in range(first, first + quarter):
            r1 = _row_a_quarter_on(r, 1, quarter, stop)  # past the block's end: r again
            r2 = _row_a_quarter_on(r, 2, quarter, stop)
            r3 = _row_a_quarter_on(r, 3, quarter, stop)
            w0, w1, w2, w3 = w[r], w[r1], w[r2], w[r3]  # [in] each: 1-D views vectorize
            for j in range(starts[m], starts[m + 1]):
                xj = x[j]  # [in]
                a0 = a1 = a2 = a3 = np.float32(0.0)
                for start in range(0, n_in, BLOCK):
                    end = min(start + BLOCK, n_in)
                    if j == starts[m]:  # the first pass over these rows: ask for what comes after this block
                        _prefetch_block(flat, n_in, r, r1, r2, r3, start + ahead, step)
                    xs, v0, v1, v2, v3 = xj[start:end], w0[start:end], w1[start:end], w2[start:end], w3[start:end]
                    for i in range(end - start):
                        a0 += xs[i] * as_float32(v0[i])
                        a1 += xs[i] * as_float32(v1[i])
                        a2 += xs[i] * as_float32(v2[i])
                        a3 += xs[i] * as_float32(v3[i])
                out[j, r], out[j, r1], out[j, r2], out[j, r3] = a0, a1, a2, a3


_grouped_rows_kernel_serial, _grouped_rows_kernel = serial_and_parallel(_grouped_rows_loops, fastmath=True)


def grouped_rows_bf16(x: np.ndarray, starts: np.ndarray, matrices: list) -> np.ndarray:
    """The same as :func:`grouped_rows_bf16_numpy`, compiled, reading the bf16 values as they are."""
    # The kernel trusts these (its reads and writes are unchecked): groups that overlap or run
    # backwards, or matrices of other shapes than the first, would read and write past the arrays.
    if not (len(starts) == len(matrices) + 1 and starts[0] == 0 and starts[-1] == len(x)
            and (np.diff(starts) >= 0).all()):
        raise MinqwenError(f"grouped_rows_bf16: the groups {starts.tolist()} must tile the {len(x)} rows of x in "
                           f"order, one group per matrix ({len(matrices)})")
    shapes = {tuple(m.shape) for m in matrices}
    if len(shapes) != 1 or next(iter(shapes))[1] != x.shape[1]:
        raise MinqwenError(f"grouped_rows_bf16: the matrices must share one shape [out, {x.shape[1]}] (x's rows are "
                           f"{x.shape[1]} wide), got {sorted(shapes)}")
    bits = List([_read_only(np.ascontiguousarray(m).view(np.uint16)) for m in matrices])  # a typed list, for Numba
    out = np.empty((len(x), matrices[0].shape[0]), np.float32)  # [n, out]
    _grouped_rows_kernel(np.ascontiguousarray(x, dtype=np.float32), starts.astype(np.int64), bits, out)
    return out


def _read_only(view: np.ndarray) -> np.ndarray:
    """The view, marked read-only: a typed list holds one array type, and mapped experts are read-only."""
    view.flags.writeable = False
    return view


def group_by_expert_numpy(chosen: np.ndarray, n_experts: int) -> tuple[np.ndarray, np.ndarray]:
    """The definition: assignments (token·k + slot) sorted by expert, and where each expert starts.

    chosen [T, k] → ``order`` [T·k] (expert 0's assignments first, each expert's in token
    order) and ``offsets`` [E + 1] (expert e owns ``order[offsets[e]:offsets[e + 1]]``).
    """
    flat = chosen.reshape(-1)  # [T·k]
    order = np.argsort(flat, kind="stable")  # stable: within an expert, tokens stay in order
    offsets = np.zeros(n_experts + 1, np.int64)
    offsets[1:] = np.cumsum(np.bincount(flat, minlength=n_experts))
    return order.astype(np.int64), offsets


@numba.njit(cache=True)
def _group_kernel(flat, order, offsets):
    """Counting sort of the assignments by expert: count, prefix-sum, place (one pass each)."""
    for a in range(flat.size):
        offsets[flat[a] + 1] += 1
    for e in range(offsets.size - 1):
        offsets[e + 1] += offsets[e]
    fill = offsets[:-1].copy()  # next free place of each expert
    for a in range(flat.size):
        e = flat[a]
        order[fill[e]] = a
        fill[e] += 1


def group_by_expert(chosen: np.ndarray, n_experts: int) -> tuple[np.ndarray, np.ndarray]:
    """The same as :func:`group_by_expert_numpy`, compiled."""
    flat = np.ascontiguousarray(chosen.reshape(-1), dtype=np.int64)  # [T·k]
    # The kernel indexes by expert unchecked: an index past the experts would write past offsets.
    if flat.size and not (flat.min() >= 0 and flat.max() < n_experts):
        bad = int(flat.max() if flat.max() >= n_experts else flat.min())
        raise MinqwenError(f"group_by_expert: expert index {bad} is outside 0 … {n_experts - 1}: the router "
                           f"(mlp.gate) scores more experts than the block holds?")
    order = np.empty(flat.size, np.int64)
    offsets = np.zeros(n_experts + 1, np.int64)
    _group_kernel(flat, order, offsets)
    return order, offsets


def scatter_weighted_numpy(ys, order, weights, top_k, n_tokens):
    """The definition: out[token] += weight · y for each assignment, in grouped (expert) order.

    ys [T·k, H] expert outputs in grouped order; order [T·k] their assignments; weights [T·k]
    routing weights by assignment. Adding expert by expert, ascending, is also the order in
    which transformers' eager experts loop accumulates (``index_add_`` per expert), so the sums
    round alike with the eager implementation, which tools/reference.py selects. (transformers
    5.23.0's default, ``grouped_mm``, sums each token's k outputs in slot order instead, and
    rounds differently.)
    """
    out = np.zeros((n_tokens, ys.shape[1]), ys.dtype)  # [T, H]
    np.add.at(out, order // top_k, weights[order][:, None] * ys)  # unbuffered: in index order
    return out


@numba.njit(cache=True)
def _scatter_kernel(ys, order, weights, top_k, out):
    for j in range(order.size):
        a = order[j]
        t = a // top_k
        w = weights[a]
        for h in range(ys.shape[1]):
            out[t, h] += w * ys[j, h]


def scatter_weighted(ys, order, weights, top_k, n_tokens):
    """The same as :func:`scatter_weighted_numpy`, compiled: one pass, no [T·k, H] temporary."""
    out = np.zeros((n_tokens, ys.shape[1]), ys.dtype)  # [T, H]
    _scatter_kernel(ys, order, np.ascontiguousarray(weights, dtype=ys.dtype), top_k, out)
    return out


# ==================================================================== loading


def load_moe(reader, prefix: str, config) -> MoEWeights:
    """Layer ``prefix`` (``layers.{i}.mlp.``)'s MoE block from the model's tensor reader.

    The router, shared expert and its gate are read like every other weight; the routed
    experts are only mapped (:func:`load_experts`).
    """
    H, E, S = config.hidden_size, config.num_experts, config.shared_expert_intermediate_size
    return MoEWeights(
        gate=reader.take(prefix + "gate.weight", (E, H)),
        experts=load_experts(reader, prefix + "experts.", config),
        shared_expert=MLPWeights(
            gate_proj=reader.matrix(prefix + "shared_expert.gate_proj.weight", (S, H)),
            up_proj=reader.matrix(prefix + "shared_expert.up_proj.weight", (S, H)),
            down_proj=reader.matrix(prefix + "shared_expert.down_proj.weight", (H, S)),
        ),
        shared_expert_gate=reader.take(prefix + "shared_expert_gate.weight", (1, H)),
    )


def load_experts(reader, prefix: str, config) -> Experts:
    """The routed experts under ``prefix`` (``layers.{i}.mlp.experts.``), in whichever layout
    this layer uses: memory-mapped views in their stored dtype, nothing read.

    FP8 experts (F8_E4M3 with block scales, as the FP8 releases store them) stay mapped too,
    as :class:`~minqwen.checkpoint.FP8Tensor`: an expert is dequantized when a token uses it."""
    H, E, I = config.hidden_size, config.num_experts, config.moe_intermediate_size
    full = reader.prefix + prefix
    fused_names = [full + name for name in ("gate_up_proj", "down_proj") if full + name in reader.ckpt]
    # Any expert's tensor says the layer is per-expert: a missing one is then named by the read
    # below, rather than reported as "no experts".
    per_expert_names = [name for e in range(E) for w in ("gate_proj", "up_proj", "down_proj")
                        if (name := f"{full}{e}.{w}.weight") in reader.ckpt]
    if fused_names and per_expert_names:  # which copy is the model? Neither reader could say
        raise MinqwenError(
            f"{reader.ckpt.folder}: layer '{full}' holds its experts twice, fused ('{fused_names[0]}') and "
            f"per expert ('{per_expert_names[0]}'); a layer must use one layout"
        )
    fused, per_expert = bool(fused_names), bool(per_expert_names)
    if fused:
        gate_up = _mapped(reader, prefix + "gate_up_proj", (E, 2 * I, H))  # [E, 2·I, H]
        return Experts(
            gate_proj=gate_up[:, :I],  # [E, I, H]: the first I rows of each expert are its gate_proj
            up_proj=gate_up[:, I:],  # [E, I, H]: the next I its up_proj
            down_proj=_mapped(reader, prefix + "down_proj", (E, H, I)),  # [E, H, I]
            layout="fused",
        )
    if per_expert:
        return Experts(
            gate_proj=[_mapped(reader, f"{prefix}{e}.gate_proj.weight", (I, H)) for e in range(E)],
            up_proj=[_mapped(reader, f"{prefix}{e}.up_proj.weight", (I, H)) for e in range(E)],
            down_proj=[_mapped(reader, f"{prefix}{e}.down_proj.weight", (H, I)) for e in range(E)],
            layout="per_expert",
        )
    raise MinqwenError(
        f"{reader.ckpt.folder}: no experts for layer '{full}': expected '{full}gate_up_proj' and "
        f"'{full}down_proj' (fused), or '{full}{{e}}.gate_proj.weight', '…up_proj.weight', "
        f"'…down_proj.weight' for e = 0 … {E - 1} (per expert)"
    )


def _mapped(reader, name: str, shape: tuple[int, ...]) -> np.ndarray | FP8Tensor:
    """A tensor as stored, a view into the checkpoint's memory map, after checking shape and dtype.

    An FP8 tensor comes back as an :class:`~minqwen.checkpoint.FP8Tensor` (weights and block
    scales both mapped), dequantized expert by expert when used.
    """
    full = reader.prefix + name
    tensor = reader.ckpt.mapped(full, shape)
    reader.mark_used(full)
    return tensor if isinstance(tensor, FP8Tensor) else np.asarray(tensor)  # a plain ndarray view: no copy, no read
