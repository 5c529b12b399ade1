"""The sparse mixture-of-experts block, as a specification.

* the router: softmax over experts, top-k, renormalised; exact ties go to the lowest expert index;
  against transformers' router, the weights always agree and the experts do unless a tie
  straddles the k-th place (where torch.topk follows no rule: see minqwen/moe.py, "Ties");
* the gather (group by expert, one matmul per expert, scatter back weighted): its Numba kernels
  equal their NumPy twins, and the whole equals a dense loop over every expert masked by the
  routing; permuting the tokens permutes the output;
* loading: both expert layouts, detected per layer; experts stay memory-mapped in their stored
  dtype, and a step indexes exactly the experts the reference routed its tokens to, each
  matrix once, and nothing of the others reaches the output;
* the live lane: random MoE configs built in transformers 5.23.0 agree with minqwen to 1e-4.

Mixed dense/MoE layers are not covered because transformers 5.23.0 cannot build them: its
Qwen3.5-MoE has no ``mlp_only_layers`` nor ``decoder_sparse_step`` and makes every layer MoE;
minqwen's config rejects such fields (tests/test_config.py).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import mmap
import shutil
import subprocess
import sys

import ml_dtypes
import numpy as np
import pytest
from collections import Counter

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from safetensors.numpy import load_file, save_file

import minqwen
from conftest import FIXTURE_NAMES, FIXTURES, ROOT, assert_logits_match_reference, require_reference
from minqwen import MinqwenError
from minqwen.activations import ACTIVATIONS
from minqwen.mlp import MLPWeights
from minqwen.moe import (
    Experts,
    MoEWeights,
    group_by_expert,
    group_by_expert_numpy,
    grouped_rows_bf16,
    grouped_rows_bf16_numpy,
    route,
    routed_experts,
    scatter_weighted,
    scatter_weighted_numpy,
    sparse_moe_block,
)

ATOL = 1e-4
MOE_FIXTURES = [name for name in FIXTURE_NAMES if name.startswith("moe_")]
BF16 = np.dtype(ml_dtypes.bfloat16)
MATRICES = ("gate_proj", "up_proj", "down_proj")


# ============================================================================ helpers


def random_experts(rng, n_experts, hidden, width, layout, dtype) -> Experts:
    """E random SwiGLU experts, stored in ``dtype``, per expert (lists) or fused (views of one array)."""
    gate_up = (rng.normal(size=(n_experts, 2 * width, hidden)) / np.sqrt(hidden)).astype(dtype)
    down = (rng.normal(size=(n_experts, hidden, width)) / np.sqrt(width)).astype(dtype)
    if layout == "fused":
        return Experts(gate_up[:, :width], gate_up[:, width:], down, layout="fused")
    return Experts([g for g in gate_up[:, :width].copy()], [u for u in gate_up[:, width:].copy()],
                   [d for d in down.copy()])


def dense_masked_moe(x, experts: Experts, chosen, weights, hidden_act):
    """The definition of the routed part: every expert on every token, weighted by the routing (0 if not chosen)."""
    act = ACTIVATIONS[hidden_act]
    out = np.zeros_like(x)
    for e in range(len(experts)):
        gate, up, down = (np.asarray(m[e], dtype=x.dtype) for m in (experts.gate_proj, experts.up_proj,
                                                                      experts.down_proj))
        y = (act(x @ gate.T) * (x @ up.T)) @ down.T  # [T, H]: expert e on every token
        w = (weights * (chosen == e)).sum(axis=-1)  # [T]: each token's weight for e (0 when not chosen)
        out += w[:, None] * y
    return out


def random_routing(rng, t_len, n_experts, top_k):
    """k distinct experts per token, and positive weights summing to one."""
    chosen = np.stack([rng.permutation(n_experts)[:top_k] for _ in range(t_len)]).astype(np.int64)  # [T, k]
    weights = rng.uniform(0.1, 1, size=(t_len, top_k)).astype(np.float32)
    return chosen, weights / weights.sum(axis=-1, keepdims=True)


class Counting:
    """An expert sequence that records every expert indexed, as (matrix name, expert).

    Only a single expert can be asked for: a slice, an array of indices or iterating over all
    of them would also fail int(e) or be recorded, so no way of reading experts goes unseen.
    """

    def __init__(self, inner, name: str, reads: list):
        self.inner, self.name, self.reads = inner, name, reads

    def __getitem__(self, e):
        self.reads.append((self.name, int(e)))
        return self.inner[e]

    def __len__(self):
        return len(self.inner)


def count_expert_use(model) -> list[list]:
    """Wrap every layer's experts in Counting; returns, per layer, the list of (matrix, expert) read."""
    per_layer = []
    for layer in model.layers:
        reads: list[tuple[str, int]] = []
        ex = layer.mlp.experts
        layer.mlp.experts = dataclasses.replace(ex, **{m: Counting(getattr(ex, m), m, reads) for m in MATRICES})
        per_layer.append(reads)
    return per_layer


def each_matrix_once(experts) -> Counter:
    """What a step over tokens routed to ``experts`` should read: each of their three matrices, once."""
    return Counter((m, int(e)) for m in MATRICES for e in set(experts))


def poisoned(experts: Experts, which) -> Experts:
    """A copy of ``experts`` whose experts e with which(e) are NaN in every matrix."""
    return Experts(*([np.full_like(m[e], np.nan) if which(e) else m[e] for e in range(len(experts))]
                     for m in (experts.gate_proj, experts.up_proj, experts.down_proj)))


def backed_by_file(array) -> bool:
    """True if the array's memory is a memory map of a file (it owns no copy)."""
    while array is not None:
        if isinstance(array, (np.memmap, mmap.mmap)):
            return True
        array = getattr(array, "base", None)
    return False


# ============================================================================ the router


@settings(max_examples=60, deadline=None)
@given(t_len=st.integers(1, 12), n_experts=st.integers(1, 10), data=st.data(), seed=st.integers(0, 2**31))
def test_the_router_is_softmax_top_k_renormalised(t_len, n_experts, data, seed):
    rng = np.random.default_rng(seed)
    top_k = data.draw(st.integers(1, n_experts))
    x = rng.normal(size=(t_len, 8)).astype(np.float32)
    gate = rng.normal(size=(n_experts, 8)).astype(np.float32)
    logits, chosen, weights = route(x, gate, top_k)
    assert logits.shape == (t_len, n_experts) and chosen.shape == weights.shape == (t_len, top_k)
    assert chosen.dtype == np.int64 and weights.dtype == np.float32
    np.testing.assert_allclose(logits, x @ gate.T, rtol=1e-6, atol=1e-6)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    for t in range(t_len):
        assert len(set(chosen[t])) == top_k  # k distinct experts
        p = probs[t, chosen[t]]
        assert (np.diff(p) <= 0).all()  # best first
        others = np.delete(probs[t], chosen[t])
        assert others.size == 0 or others.max() <= p.min()  # nothing left out beats what was chosen
        np.testing.assert_allclose(weights[t], p / p.sum(), rtol=1e-5)
    np.testing.assert_allclose(weights.sum(-1), 1, rtol=1e-6)


def test_router_logits_beyond_what_exp_holds_in_float32_still_route_by_the_softmax():
    # The router's softmax is taken in float32, where exp overflows from 89 on: unless the largest
    # logit is subtracted first, a token with large router logits gets inf / inf = NaN weights,
    # and nothing at the fixtures' scale (logits of order 1) would show it. Expected: the
    # softmax in float64, where exp(±200) is finite.
    scores = np.array([[200.0, 199.0, -50.0, 197.5], [-150.0, -151.5, -149.0, -300.0]], np.float32)  # [T, E]
    x = np.eye(2, dtype=np.float32)
    _, chosen, weights = route(x, np.ascontiguousarray(scores.T), 2)  # token t's logits are scores[t]
    s = scores.astype(np.float64)
    probs = np.exp(s) / np.exp(s).sum(-1, keepdims=True)
    assert chosen.tolist() == [[0, 1], [2, 0]]
    top = np.take_along_axis(probs, chosen, -1)
    np.testing.assert_allclose(weights, top / top.sum(-1, keepdims=True), rtol=1e-6)


def test_a_float64_router_takes_its_softmax_in_float64():
    # A float64 model exists to check the algebra to round-off (1e-12, not float32's 1e-7): a
    # router that took its softmax in float32 there, as the reference does for lower dtypes,
    # would cap every float64 comparison at float32 precision.
    rng = np.random.default_rng(11)
    x, gate = rng.normal(size=(3, 8)), rng.normal(size=(6, 8))  # float64
    logits, chosen, weights = route(x, gate, 4)
    assert weights.dtype == np.float64
    s = x @ gate.T
    probs = np.exp(s - s.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    top = np.take_along_axis(probs, chosen, -1)
    np.testing.assert_allclose(weights, top / top.sum(-1, keepdims=True), rtol=1e-13, atol=0)


def test_exact_ties_go_to_the_lowest_expert_index():
    x = np.ones((1, 4), np.float32)
    # Equal rows give equal scores: every expert ties with every other.
    _, chosen, weights = route(x, np.ones((6, 4), np.float32), 3)
    assert chosen.tolist() == [[0, 1, 2]]
    np.testing.assert_allclose(weights, 1 / 3)
    # Expert 4 is best; 1, 3 and 5 tie for second: the lower indices win the two places left.
    gate = np.array([[0.0] * 4, [1.0] * 4, [0.0] * 4, [1.0] * 4, [2.0] * 4, [1.0] * 4], np.float32)
    _, chosen, _ = route(x, gate, 3)
    assert chosen.tolist() == [[4, 1, 3]]


@settings(max_examples=80, deadline=None)
@given(scores=st.lists(st.lists(st.integers(-2, 2), min_size=7, max_size=7), min_size=1, max_size=6),
       top_k=st.integers(1, 7))
def test_among_equal_router_scores_lower_indices_are_chosen_first(scores, top_k):
    # Integer logits in a small range: ties everywhere. The rule: rank by score, then by index.
    gate = np.array(scores, np.float32).T  # [E, T]: token t's input is one-hot at t, so its logits are scores[t]
    _, chosen, _ = route(np.eye(len(scores), dtype=np.float32), gate, top_k)
    for t, row in enumerate(scores):
        assert chosen[t].tolist() == sorted(range(7), key=lambda e: (-row[e], e))[:top_k]


@st.composite
def router_scores(draw):
    """Router logits on a grid of eighths (narrow spreads: exact ties everywhere), and a top-k.

    Distinct values differ by at least 1/8, so their softmax probabilities differ in any
    implementation: the only equal probabilities are those of exactly equal logits.
    """
    n_experts = draw(st.sampled_from([1, 2, 3, 4, 6, 8, 16, 64, 70]))  # 64·k ≤ E: torch's other algorithm
    top_k = draw(st.integers(1, n_experts))
    spread = draw(st.sampled_from([1, 2, 8, 40]))
    value = st.integers(-spread, spread).map(lambda v: v / 8)
    rows = draw(st.lists(st.lists(value, min_size=n_experts, max_size=n_experts), min_size=1, max_size=5))
    return np.array(rows, np.float32), top_k


@pytest.mark.reference
@settings(max_examples=100, deadline=None, derandomize=True)
@given(case=router_scores())
def test_the_router_agrees_with_the_references_on_weights_always_and_on_experts_unless_a_tie_straddles_k(case):
    require_reference()
    import torch
    from transformers.models.qwen3_5_moe.modeling_qwen3_5_moe import Qwen3_5MoeTopKRouter

    scores, top_k = case  # [T, E]
    t_len, n_experts = scores.shape
    gate = np.ascontiguousarray(scores.T)  # [E, T]: token t's input is one-hot at t, so its logits are scores[t]
    x = np.eye(t_len, dtype=np.float32)
    router = Qwen3_5MoeTopKRouter(
        type("Config", (), dict(num_experts=n_experts, num_experts_per_tok=top_k, hidden_size=t_len)))
    with torch.no_grad():
        router.weight.copy_(torch.from_numpy(gate))
        ref_logits, ref_weights, ref_chosen = (a.numpy() for a in router(torch.from_numpy(x)))
    logits, chosen, weights = route(x, gate, top_k)

    np.testing.assert_array_equal(logits, ref_logits)
    # The k best probabilities, best first, are the same whichever tied experts hold them.
    np.testing.assert_allclose(weights, ref_weights, rtol=1e-6, atol=1e-7)
    for t, row in enumerate(scores):
        kth = np.sort(row)[::-1][top_k - 1]  # the k-th best score
        above = set(np.flatnonzero(row > kth).tolist())  # experts every top-k must choose
        ours, theirs = set(chosen[t].tolist()), set(ref_chosen[t].tolist())
        assert above <= ours and above <= theirs
        assert all(row[e] == kth for e in (ours | theirs) - above)
        if top_k == n_experts or (row == kth).sum() == top_k - len(above):  # no tie straddles the k-th place
            assert ours == theirs


# ============================================================================ the gather


@settings(max_examples=60, deadline=None)
@given(t_len=st.integers(1, 40), n_experts=st.integers(1, 16), data=st.data(), seed=st.integers(0, 2**31))
def test_grouping_kernel_equals_its_numpy_twin(t_len, n_experts, data, seed):
    top_k = data.draw(st.integers(1, n_experts))
    chosen, _ = random_routing(np.random.default_rng(seed), t_len, n_experts, top_k)
    order, offsets = group_by_expert(chosen, n_experts)
    order_twin, offsets_twin = group_by_expert_numpy(chosen, n_experts)
    assert order.tolist() == order_twin.tolist()
    assert offsets.tolist() == offsets_twin.tolist()
    # What the twin means: expert e's assignments, in token order, sit at order[offsets[e]:offsets[e + 1]].
    flat = chosen.reshape(-1)
    for e in range(n_experts):
        mine = order[offsets[e]:offsets[e + 1]]
        assert mine.tolist() == np.flatnonzero(flat == e).tolist()


@settings(max_examples=60, deadline=None)
@given(t_len=st.integers(1, 30), n_experts=st.integers(1, 8), hidden=st.integers(1, 24), data=st.data(),
       dtype=st.sampled_from([np.float32, np.float64]), seed=st.integers(0, 2**31))
def test_scatter_kernel_equals_its_numpy_twin(t_len, n_experts, hidden, data, dtype, seed):
    rng = np.random.default_rng(seed)
    top_k = data.draw(st.integers(1, n_experts))
    chosen, weights = random_routing(rng, t_len, n_experts, top_k)
    order, _ = group_by_expert_numpy(chosen, n_experts)
    ys = rng.normal(size=(t_len * top_k, hidden)).astype(dtype)
    w = weights.reshape(-1).astype(dtype)
    got = scatter_weighted(ys, order, w, top_k, t_len)
    twin = scatter_weighted_numpy(ys, order, w, top_k, t_len)
    assert got.dtype == twin.dtype == dtype
    np.testing.assert_array_equal(got, twin)  # the same products, added in the same order


def test_the_compiled_grouping_refuses_an_expert_index_outside_the_experts():
    # Its kernel indexes by expert unchecked: a router with more rows than the block has experts
    # (a hand-built MoEWeights) wrote past its arrays and killed the process.
    for bad in (4, 900, -1):
        chosen = np.array([[bad, 1]] * 3, np.int64)
        with pytest.raises(MinqwenError, match=f"expert index {bad} is outside 0 … 3"):
            group_by_expert(chosen, 4)
    for got, want in zip(group_by_expert(np.zeros((0, 2), np.int64), 4),  # no tokens: nothing to check, all empty
                         group_by_expert_numpy(np.zeros((0, 2), np.int64), 4)):
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("starts, shapes, message", [
    ([0, 3, 1, 2], [(3, 4)] * 3, "must tile the 2 rows of x in order"),  # backwards: corrupted the heap
    ([0, 2, 2], [(3, 4)] * 2 + [(3, 4)], "one group per matrix"),
    ([0, 1, 2], [(3, 4), (5, 4)], "must share one shape"),
    ([0, 1, 2], [(3, 5), (3, 5)], "must share one shape"),
])
def test_the_grouped_rows_kernel_refuses_groups_or_matrices_it_would_read_past(starts, shapes, message):
    x = np.ones((2, 4), np.float32)
    matrices = [np.ones(shape, BF16) for shape in shapes]
    with pytest.raises(MinqwenError, match=message):
        grouped_rows_bf16(x, np.array(starts), matrices)


@settings(max_examples=60, deadline=None)
@given(counts=st.lists(st.integers(0, 4), min_size=1, max_size=8), n_out=st.integers(1, 150),
       n_in=st.integers(1, 300), serial=st.booleans(), seed=st.integers(0, 2**31))
@example(counts=[1] * 8, n_out=2048, n_in=64, serial=False, seed=0)  # a decode step's down_proj at k = 8: 32 blocks
@example(counts=[3, 1], n_out=64, n_in=7, serial=True, seed=1)  # exactly one block of weight rows
@example(counts=[2], n_out=65, n_in=300, serial=False, seed=2)  # one row into a second block
def test_grouped_rows_kernel_and_its_twin_equal_the_exact_product_to_float32_round_off(counts, n_out, n_in, serial,
                                                                                        seed):
    # A step's expert matmuls: the rows of each group (an expert's tokens) times that expert's bf16 matrix.
    # serial: the build a child forked from an OpenMP process runs (threads.launched_safely).
    from unittest import mock

    from minqwen import moe

    rng = np.random.default_rng(seed)
    matrices = [rng.normal(size=(n_out, n_in)).astype(BF16) for _ in counts]
    starts = np.concatenate([[0], np.cumsum(counts)])  # group m: rows starts[m]:starts[m + 1]
    x = rng.normal(size=(starts[-1], n_in)).astype(np.float32)
    build = moe._grouped_rows_kernel_serial if serial else moe._grouped_rows_kernel
    with mock.patch.object(moe, "_grouped_rows_kernel", build):
        got = grouped_rows_bf16(x, starts, matrices)
    twin = grouped_rows_bf16_numpy(x, starts, matrices)
    assert got.shape == twin.shape == (starts[-1], n_out) and got.dtype == twin.dtype == np.float32

    # Exact (float64, bf16 widens exactly), and the most float32 round-off can add to an n_in-term
    # dot product in any summation order: (n_in + 1)·2⁻²⁴·Σ_i |x_i·w_ri| (products and sums each
    # rounded once; the kernel's vector lanes and FMAs, and BLAS's blocking, are all within it).
    groups = [slice(starts[m], starts[m + 1]) for m in range(len(counts))]
    exact = np.concatenate([x[g].astype(np.float64) @ w.astype(np.float64).T for g, w in zip(groups, matrices)])
    bound = (n_in + 1) * 2.0**-24 * np.concatenate(
        [np.abs(x[g]).astype(np.float64) @ np.abs(w.astype(np.float64)).T for g, w in zip(groups, matrices)])
    assert (np.abs(got - exact) <= bound).all(), np.max(np.abs(got - exact) - bound)
    assert (np.abs(twin - exact) <= bound).all(), np.max(np.abs(twin - exact) - bound)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(t_len=st.integers(1, 24), n_experts=st.integers(1, 8), hidden=st.integers(1, 16), width=st.integers(1, 12),
       layout=st.sampled_from(["per_expert", "fused"]), stored=st.sampled_from(["float32", "bfloat16", "float16"]),
       act=st.sampled_from(["silu", "gelu_pytorch_tanh"]), data=st.data(), seed=st.integers(0, 2**31))
def test_the_gather_equals_a_dense_loop_over_all_experts_masked_by_routing(
        t_len, n_experts, hidden, width, layout, stored, act, data, seed):
    rng = np.random.default_rng(seed)
    top_k = data.draw(st.integers(1, n_experts))
    experts = random_experts(rng, n_experts, hidden, width, layout, np.dtype(stored) if stored != "bfloat16" else BF16)
    x = rng.normal(size=(t_len, hidden)).astype(np.float32)
    chosen, weights = random_routing(rng, t_len, n_experts, top_k)

    dense = dense_masked_moe(x, experts, chosen, weights, act)
    kernels = routed_experts(x, experts, chosen, weights, act)
    twins = routed_experts(x, experts, chosen, weights, act, grouped=group_by_expert_numpy,
                           scatter=scatter_weighted_numpy)
    np.testing.assert_allclose(kernels, dense, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(twins, kernels, rtol=1e-6, atol=1e-6)
    # In float64 the three agree to round-off: the algebra is the same, not just close.
    x64, w64 = x.astype(np.float64), weights.astype(np.float64)
    dense64 = dense_masked_moe(x64, experts, chosen, w64, act)
    np.testing.assert_allclose(routed_experts(x64, experts, chosen, w64, act), dense64, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(routed_experts(x64, experts, chosen, w64, act, grouped=group_by_expert_numpy,
                                              scatter=scatter_weighted_numpy), dense64, rtol=1e-12, atol=1e-12)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(t_len=st.integers(1, 24), n_experts=st.integers(1, 8), hidden=st.integers(1, 16), width=st.integers(1, 12),
       layout=st.sampled_from(["per_expert", "fused"]), stored=st.sampled_from(["float32", "bfloat16"]),
       data=st.data(), seed=st.integers(0, 2**31))
def test_permuting_tokens_permutes_the_moe_blocks_output(t_len, n_experts, hidden, width, layout, stored, data,
                                                          seed):
    # The whole block (router, gather, shared expert), over 1 to 24 tokens: the decode-size
    # kernels and the per-expert matmuls alike. A token's output must not depend on its place.
    rng = np.random.default_rng(seed)
    top_k = data.draw(st.integers(1, n_experts))
    dtype = BF16 if stored == "bfloat16" else np.dtype(stored)
    block = MoEWeights(
        gate=rng.normal(size=(n_experts, hidden)).astype(np.float32),
        experts=random_experts(rng, n_experts, hidden, width, layout, dtype),
        shared_expert=MLPWeights(*(rng.normal(size=shape).astype(np.float32) / 3
                                   for shape in ((5, hidden), (5, hidden), (hidden, 5)))),
        shared_expert_gate=rng.normal(size=(1, hidden)).astype(np.float32),
    )
    x = rng.normal(size=(t_len, hidden)).astype(np.float32)
    perm = np.array(data.draw(st.permutations(range(t_len))), dtype=np.int64)
    out = sparse_moe_block(x, block, top_k, "silu")
    np.testing.assert_allclose(sparse_moe_block(x[perm], block, top_k, "silu"), out[perm], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", MOE_FIXTURES)
def test_permuting_tokens_permutes_each_fixture_layers_moe_output(name):
    model = minqwen.load(FIXTURES / name)
    c = model.config
    rng = np.random.default_rng(0)
    x = rng.normal(size=(23, c.hidden_size)).astype(np.float32)
    perm = rng.permutation(23)
    for layer in model.layers:
        out = sparse_moe_block(x, layer.mlp, c.num_experts_per_tok, c.hidden_act)
        permuted = sparse_moe_block(x[perm], layer.mlp, c.num_experts_per_tok, c.hidden_act)
        np.testing.assert_allclose(permuted, out[perm], rtol=1e-6, atol=1e-6)


# ============================================================================ loading and touching


@pytest.mark.parametrize("name", MOE_FIXTURES)
def test_experts_stay_memory_mapped_in_their_stored_dtype(name):
    model = minqwen.load(FIXTURES / name)
    stored = "bfloat16" if "bf16" in name else "float32"
    for layer in model.layers:
        ex = layer.mlp.experts
        assert ex.layout == ("fused" if "fused" in name else "per_expert")
        for matrices in (ex.gate_proj, ex.up_proj, ex.down_proj):
            for e in range(len(ex)):
                assert str(matrices[e].dtype) == stored
                assert backed_by_file(matrices[e]), "an expert was copied into memory at load"


@pytest.mark.parametrize("name", MOE_FIXTURES)
def test_a_decode_step_reads_exactly_the_experts_the_reference_routed_to(name):
    # Decoding the prompt's last token after the rest is, by causality, the reference's last
    # prompt position: the fixture records which experts transformers routed it to, per layer.
    model = minqwen.load(FIXTURES / name)
    expected = load_file(str(FIXTURES / name / "expected.safetensors"))
    ids = expected["token_ids"]
    cache = model.new_cache()
    model.forward(ids[:-1], cache)
    reads = count_expert_use(model)
    model.forward(ids[-1:], cache)
    for i, layer_reads in enumerate(reads):
        routed = expected[f"experts_chosen.{i}"][-1]  # [k]
        assert Counter(layer_reads) == each_matrix_once(routed), f"layer {i}: routed to {sorted(routed.tolist())}"


@pytest.mark.parametrize("name", MOE_FIXTURES)
@pytest.mark.parametrize("t_len", [3, None], ids=["3 tokens", "whole prompt"])
def test_a_step_over_several_tokens_reads_each_routed_expert_once_per_matrix(name, t_len):
    # One matmul per expert over all of its tokens, not one per (token, expert) pair. 3 tokens (a
    # speculative verify) take the few-rows kernels where the experts are bf16 and 3·k rows are
    # fewer than 16 (moe_text_16_experts_top4_bf16), the per-expert products elsewhere, as a
    # whole prompt does; a decode step's one token is the test above.
    model = minqwen.load(FIXTURES / name)
    expected = load_file(str(FIXTURES / name / "expected.safetensors"))
    ids = expected["token_ids"][:t_len]
    reads = count_expert_use(model)
    model.forward(ids)
    for i, layer_reads in enumerate(reads):
        routed = expected[f"experts_chosen.{i}"][: len(ids)].reshape(-1)  # [T·k]
        assert Counter(layer_reads) == each_matrix_once(routed), f"layer {i}"


@pytest.mark.parametrize("name", MOE_FIXTURES)
def test_experts_a_decode_step_did_not_route_to_cannot_reach_its_output_even_as_nan(name):
    # A dense loop masked by the routing would multiply NaN by a zero weight and give NaN.
    model = minqwen.load(FIXTURES / name)
    expected = load_file(str(FIXTURES / name / "expected.safetensors"))
    ids = expected["token_ids"]
    cache = model.new_cache()
    model.forward(ids[:-1], cache)
    clean = model.forward(ids[-1:], cache.copy())
    stored = [layer.mlp.experts for layer in model.layers]
    for i, layer in enumerate(model.layers):
        routed = set(expected[f"experts_chosen.{i}"][-1].tolist())
        layer.mlp.experts = poisoned(stored[i], lambda e: e not in routed)
    np.testing.assert_array_equal(model.forward(ids[-1:], cache.copy()), clean)
    # The poison is live: the same step with one routed expert of layer 0 poisoned too is NaN.
    first = int(expected["experts_chosen.0"][-1][0])
    model.layers[0].mlp.experts = poisoned(stored[0], lambda e: e == first)
    assert np.isnan(model.forward(ids[-1:], cache.copy())).all()


def _fuse_layer_experts(tensors: dict, layer_prefix: str, n_experts: int) -> None:
    """Rewrite one layer's per-expert tensors as the fused pair, in place."""
    gate = [tensors.pop(f"{layer_prefix}experts.{e}.gate_proj.weight") for e in range(n_experts)]
    up = [tensors.pop(f"{layer_prefix}experts.{e}.up_proj.weight") for e in range(n_experts)]
    down = [tensors.pop(f"{layer_prefix}experts.{e}.down_proj.weight") for e in range(n_experts)]
    tensors[f"{layer_prefix}experts.gate_up_proj"] = np.stack([np.concatenate([g, u]) for g, u in zip(gate, up)])
    tensors[f"{layer_prefix}experts.down_proj"] = np.stack(down)


def test_the_expert_layout_is_detected_per_layer(tmp_path):
    # The bf16 35B-A3B release mixes layouts in one checkpoint; so does this copy of a fixture.
    source = FIXTURES / "moe_text_per_expert_fp32"
    shutil.copy(source / "config.json", tmp_path / "config.json")
    tensors = load_file(str(source / "model.safetensors"))
    _fuse_layer_experts(tensors, "model.layers.1.mlp.", 4)
    _fuse_layer_experts(tensors, "model.layers.3.mlp.", 4)
    save_file(tensors, str(tmp_path / "model.safetensors"))

    model = minqwen.load(tmp_path)
    assert [layer.mlp.experts.layout for layer in model.layers] == ["per_expert", "fused", "per_expert", "fused"]
    assert model.load_report == ""
    expected = load_file(str(source / "expected.safetensors"))
    np.testing.assert_allclose(model.forward(expected["token_ids"]), expected["logits"], rtol=0, atol=ATOL)


@pytest.mark.parametrize("case", ["whole-per-expert-and-fused-gate-up", "whole-per-expert-and-fused-down",
                                  "fused-and-experts-2-3-per-expert"])
def test_a_layer_with_both_expert_layouts_is_an_error_naming_it(tmp_path, case):
    # Whichever copy were read, the other might be the model: any per-expert tensor of any
    # expert beside either fused name is refused.
    source = FIXTURES / "moe_text_per_expert_fp32"
    shutil.copy(source / "config.json", tmp_path / "config.json")
    tensors = load_file(str(source / "model.safetensors"))
    prefix = "model.layers.2.mlp."
    if case == "whole-per-expert-and-fused-gate-up":
        tensors[prefix + "experts.gate_up_proj"] = np.zeros((4, 32, 48), np.float32)
    elif case == "whole-per-expert-and-fused-down":
        tensors[prefix + "experts.down_proj"] = np.zeros((4, 48, 16), np.float32)
    else:
        kept = {name: tensors[name] for name in tensors if name.startswith(prefix + "experts.2.")
                or name.startswith(prefix + "experts.3.")}
        _fuse_layer_experts(tensors, prefix, 4)
        tensors.update(kept)
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(MinqwenError, match=r"'model\.layers\.2\.mlp\.experts\.' holds its experts twice"):
        minqwen.load(tmp_path)


def per_expert_fixture_without(tmp_path, prefix: str) -> None:
    """The per-expert MoE fixture, copied into tmp_path without the tensors whose names start with prefix."""
    source = FIXTURES / "moe_text_per_expert_fp32"
    shutil.copy(source / "config.json", tmp_path / "config.json")
    tensors = {k: v for k, v in load_file(str(source / "model.safetensors")).items() if not k.startswith(prefix)}
    save_file(tensors, str(tmp_path / "model.safetensors"))


def test_a_layer_without_experts_is_an_error_naming_both_layouts(tmp_path):
    per_expert_fixture_without(tmp_path, "model.layers.0.mlp.experts.")
    with pytest.raises(MinqwenError, match=r"no experts for layer 'model\.layers\.0\.mlp\.experts\.': expected "
                                           r"'model\.layers\.0\.mlp\.experts\.gate_up_proj'.*per expert"):
        minqwen.load(tmp_path)


def test_a_layer_missing_all_of_expert_0_names_expert_0s_tensor_not_no_experts(tmp_path):
    # A shard lost in transfer can take every tensor of one expert: the other experts still say
    # "per expert", so the error names the missing tensor rather than claiming there are no experts.
    per_expert_fixture_without(tmp_path, "model.layers.1.mlp.experts.0.")
    with pytest.raises(MinqwenError, match=r"tensor 'model\.layers\.1\.mlp\.experts\.0\.gate_proj\.weight' is "
                                           r"missing"):
        minqwen.load(tmp_path)


@pytest.mark.parametrize("missing", ["experts.3.up_proj.weight", "experts.0.gate_proj.weight", "shared_expert_gate.weight",
                                     "gate.weight"])
def test_a_missing_moe_tensor_is_an_error_naming_it(tmp_path, missing):
    source = FIXTURES / "moe_text_per_expert_fp32"
    shutil.copy(source / "config.json", tmp_path / "config.json")
    tensors = load_file(str(source / "model.safetensors"))
    del tensors["model.layers.1.mlp." + missing]
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(MinqwenError, match=rf"tensor 'model\.layers\.1\.mlp\.{missing}' is missing"):
        minqwen.load(tmp_path)


def test_experts_of_the_wrong_shape_are_an_error_naming_the_tensor_and_both_shapes(tmp_path):
    source = FIXTURES / "moe_text_per_expert_fp32"
    config = json.loads((source / "config.json").read_text())
    config["moe_intermediate_size"] = 8
    (tmp_path / "config.json").write_text(json.dumps(config))
    shutil.copy(source / "model.safetensors", tmp_path / "model.safetensors")
    with pytest.raises(MinqwenError, match=r"tensor 'model\.layers\.0\.mlp\.experts\.0\.gate_proj\.weight' has shape "
                                           r"\[16, 48\] but the config needs \[8, 48\]"):
        minqwen.load(tmp_path)


def test_experts_stored_as_integers_are_an_error_naming_the_dtype(tmp_path):
    source = FIXTURES / "moe_text_per_expert_fp32"
    shutil.copy(source / "config.json", tmp_path / "config.json")
    tensors = load_file(str(source / "model.safetensors"))
    name = "model.layers.0.mlp.experts.2.down_proj.weight"
    tensors[name] = tensors[name].astype(np.int8)
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(MinqwenError, match=r"experts\.2\.down_proj\.weight' is stored as I8"):
        minqwen.load(tmp_path)


def test_all_experts_active_gives_the_dense_masked_result():
    # top-k = E: the gather then runs every expert, each over every token; so does the dense loop.
    model = minqwen.load(FIXTURES / "moe_text_fused_all_experts_bf16")
    c = model.config
    assert c.num_experts_per_tok == c.num_experts
    x = np.random.default_rng(1).normal(size=(9, c.hidden_size)).astype(np.float32)
    for layer in model.layers:
        _, chosen, weights = route(x, layer.mlp.gate, c.num_experts_per_tok)
        np.testing.assert_allclose(routed_experts(x, layer.mlp.experts, chosen, weights, c.hidden_act),
                                   dense_masked_moe(x, layer.mlp.experts, chosen, weights, c.hidden_act),
                                   rtol=1e-5, atol=1e-5)


# ============================================================================ the live lane


@st.composite
def moe_configs(draw):
    n_experts = draw(st.integers(1, 8))
    kv_heads = draw(st.sampled_from([1, 2]))
    key_heads = draw(st.sampled_from([1, 2]))
    n_layers = draw(st.integers(2, 4))
    layer_types = draw(st.lists(st.sampled_from(["linear_attention", "full_attention"]),
                                min_size=n_layers, max_size=n_layers))
    if "full_attention" not in layer_types:
        layer_types[draw(st.integers(0, n_layers - 1))] = "full_attention"  # the reference needs one to cache
    return dict(
        vocab_size=draw(st.integers(40, 200)),
        hidden_size=draw(st.sampled_from([16, 24, 32])),
        num_hidden_layers=n_layers,
        layer_types=layer_types,
        num_attention_heads=kv_heads * draw(st.sampled_from([1, 2])),
        num_key_value_heads=kv_heads,
        head_dim=draw(st.sampled_from([8, 16])),
        hidden_act=draw(st.sampled_from(["silu", "silu", "gelu_pytorch_tanh"])),
        rms_norm_eps=1e-6,
        attention_bias=draw(st.booleans()),
        tie_word_embeddings=draw(st.booleans()),
        linear_conv_kernel_dim=draw(st.integers(2, 4)),
        linear_num_key_heads=key_heads,
        linear_num_value_heads=key_heads * draw(st.sampled_from([1, 2])),
        linear_key_head_dim=draw(st.sampled_from([4, 8])),
        linear_value_head_dim=draw(st.sampled_from([4, 8])),
        max_position_embeddings=1024,
        rope_parameters=dict(rope_type="default", rope_theta=1e4, partial_rotary_factor=0.5),
        num_experts=n_experts,
        num_experts_per_tok=draw(st.integers(1, n_experts)),
        moe_intermediate_size=draw(st.sampled_from([4, 8, 12])),
        shared_expert_intermediate_size=draw(st.sampled_from([4, 8, 16])),
    )


@pytest.mark.reference
@settings(max_examples=25, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(text=moe_configs(), multimodal=st.booleans(), fused=st.booleans(),
       dtype=st.sampled_from(["float32", "bfloat16"]), prompt_len=st.integers(1, 40), seed=st.integers(0, 2**16),
       data=st.data())
def test_random_moe_configs_match_transformers(tmp_path_factory, text, multimodal, fused, dtype, prompt_len, seed,
                                               data):
    reference = require_reference()
    tie = data.draw(st.sampled_from([None, True, False])) if multimodal else None
    model = reference.build_model(text, seed, multimodal=multimodal, tie=tie)
    folder = tmp_path_factory.mktemp("moe")
    reference.save_checkpoint(model, folder, dtype=dtype, fused_experts=fused)
    ours = minqwen.load(folder)
    assert all(layer.mlp.experts.layout == ("fused" if fused else "per_expert") for layer in ours.layers)

    rng = np.random.default_rng(seed)
    ids = rng.integers(0, text["vocab_size"], size=prompt_len + 3)
    assert_logits_match_reference(reference, model, ours, ids, prompt_len, f"{text}, {dtype}, fused {fused}")


# ============================================================================ the figure's tool


@pytest.mark.reference
def test_the_moe_figure_tool_runs_its_three_contenders_in_quick_mode(tmp_path):
    # The real figure maps gigabytes of experts; --quick runs the same code at toy widths.
    require_reference()
    out = tmp_path / "figure.json"
    run = subprocess.run([sys.executable, str(ROOT / "tools" / "moe_figure.py"), "--quick", "--threads", "1",
                          "--json", str(out)], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    (result,) = json.loads(out.read_text())["results"]
    assert [row["label"] for row in result["rows"]] == ["MoE", "dense, same active parameters",
                                                        "MoE, all experts active"]
    assert all(row["steps"] == 3 and row["layers_ms"] > 0 for row in result["rows"])
    assert "MoE ÷ dense with the same active parameters" in run.stdout
    # Its sizes, recomputed here from the toy shape the tool declares.
    E, k, layers = result["num_experts"], result["top_k"], result["layers"]
    spec = importlib.util.spec_from_file_location("moe_figure", ROOT / "tools" / "moe_figure.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    H, I, S = (tool.QUICK_SHAPE[f] for f in ("hidden_size", "moe_intermediate_size", "shared_expert_intermediate_size"))
    assert result["expert_bytes_total"] == layers * E * 3 * I * H * 2  # bf16: 2 bytes
    assert result["expert_bytes_read_per_step"] == layers * k * 3 * I * H * 2
    active = E * H + 3 * S * H + H + k * 3 * I * H  # router, shared expert and its gate, k experts
    assert result["active_mlp_parameters_per_layer"] == active
    assert result["dense_intermediate_size"] == round(active / (3 * H))


@pytest.mark.parametrize("name, layout", [("moe_text_per_expert_fp32", "per_expert"),
                                          ("moe_text_fused_all_experts_bf16", "fused")])
def test_inspect_says_how_the_checkpoint_stores_its_experts(name, layout):
    from minqwen.summary import describe

    assert f"memory-mapped as stored ({layout}; read only when chosen)" in describe(minqwen.load(FIXTURES / name))
