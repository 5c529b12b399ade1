# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Chapter 7 · SwiGLU, and sparse mixture-of-experts routing
#
# After the token mixer, every layer runs a feed-forward block on each position separately.
# The token mixer *moves* information between positions; the feed-forward block *transforms*
# it, and holds most of what the model knows. Two flavours exist in the Qwen3.5 family:
#
# * the dense models (0.8B … 27B) use one **SwiGLU** MLP per layer;
# * the **mixture-of-experts** models (35B-A3B and larger) replace it with many small SwiGLU
#   "experts", of which a router picks a few per token, plus one shared expert.

# %%
import numpy as np

import course
import minqwen
from minqwen.mlp import swiglu_mlp

np.set_printoptions(precision=4, suppress=True, linewidth=110)


def silu(x):
    return x / (1 + np.exp(-x))  # x · sigmoid(x), also called swish


def rms_norm(x, w, eps=1e-6):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * (1 + w)


# %% [markdown]
# ## SwiGLU
#
# A classic transformer MLP is `down(relu(up(x)))`: widen, apply a nonlinearity, narrow.
# SwiGLU (Shazeer, 2020) computes *two* widenings and multiplies them:
#
# $$\mathrm{MLP}(x) = W_\text{down}\big(\mathrm{silu}(W_\text{gate}\,x) \odot W_\text{up}\,x\big)$$
#
# The `up` path carries content; the `gate` path decides, element by element, how much of it
# passes. A product of two linear functions can express interactions that a single
# nonlinearity of one projection cannot, and in practice gated MLPs train to lower loss for the
# same parameter budget. The cost is a third matrix, so gated MLPs are usually made narrower
# (Qwen3.5-0.8B: 1,024 → 3,584 → 1,024).
#
# SiLU is `x · sigmoid(x)`: like ReLU for large |x|, but smooth, and slightly negative just
# below zero.

# %%
def my_swiglu(x, mlp):
    gate = silu(x @ mlp.gate_proj.T)  # [T, I]
    up = x @ mlp.up_proj.T  # [T, I]
    return (gate * up) @ mlp.down_proj.T  # [T, H]


folder, expected = course.fixture("text_tied_fp32")
model = minqwen.load(folder)
taps = {}
model.forward(expected["token_ids"], tap=lambda n, a: taps.__setitem__(n, a.copy()))

# Layer 0: the residual stream after the token mixer, then the second norm and the MLP.
x_mid = taps["embed"] + taps["layers.0.token_mixer"]
layer = model.layers[0]
x_out = x_mid + my_swiglu(rms_norm(x_mid, layer.post_attention_layernorm), layer.mlp)
np.testing.assert_allclose(x_out, expected["hidden.0"], rtol=0, atol=1e-4)  # the reference's layer output
h = taps["layers.0.post_attention_layernorm"]
np.testing.assert_allclose(my_swiglu(h, layer.mlp), swiglu_mlp(h, layer.mlp, "silu"), rtol=1e-5, atol=1e-6)
print("SwiGLU of layer 0 reproduces the reference's hidden.0; max |Δ| =",
      np.abs(x_out - expected["hidden.0"]).max())

# %%
plt = course.pyplot()
if plt is not None:
    xs = np.linspace(-5, 5, 401)
    gelu = 0.5 * xs * (1 + np.tanh(np.sqrt(2 / np.pi) * (xs + 0.044715 * xs**3)))
    fig, ax = plt.subplots(figsize=(5.5, 3.2))
    ax.plot(xs, np.maximum(xs, 0), label="ReLU", lw=1)
    ax.plot(xs, gelu, label="GELU", lw=1)
    ax.plot(xs, silu(xs), label="SiLU = x·sigmoid(x)", lw=2)
    ax.axhline(0, color="grey", lw=0.5), ax.axvline(0, color="grey", lw=0.5)
    ax.set_title("The gate's nonlinearity", fontsize=9), ax.legend(fontsize=8)
    course.save(fig, "07_activations.png")

# %% [markdown]
# ## Sparse mixture of experts
#
# The MLP holds most of a model's parameters, and every token pays for all of them. A
# mixture-of-experts layer breaks it into `E` small SwiGLU experts and lets each token use only
# `k` of them. Qwen3.5-35B-A3B has 256 experts per layer and uses 8 (plus one shared expert):
# it *knows* what 35 B parameters can hold, and *computes* like a 3 B model.
#
# The block, for a normalised token `x`:
#
# ```
# router logits = x · gateᵀ                         [E]: one score per expert
# p = softmax(router logits)  (in float32)
# chosen = the k experts with the largest p; weights = their p, renormalised to sum to 1
# routed = Σ over chosen e of  weight_e · expert_e(x)          (each expert a SwiGLU)
# out = routed + sigmoid(x · shared_expert_gateᵀ) · shared_expert(x)
# ```
#
# In transformers 5.23.0 *every* layer of a `qwen3_5_moe` model is MoE, and the `k` weights
# are always renormalised. We write the block for one token at a time — a plain loop, the
# clearest form — and check it against a fixture that stores the reference's router logits
# and chosen experts for every layer.

# %%
def my_moe(x, w, top_k):
    """x [T, H] → ([T, H] output, chosen [T, k], router logits [T, E])."""
    logits = x @ w.gate.T  # [T, E]
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    chosen = np.argsort(-p, axis=-1, kind="stable")[:, :top_k]  # best first; ties → lower index
    out = np.zeros_like(x)
    for t in range(len(x)):
        weights = p[t, chosen[t]] / p[t, chosen[t]].sum()  # renormalise the k weights
        for e, weight in zip(chosen[t], weights):
            gate_e = np.asarray(w.experts.gate_proj[e], np.float32)  # [I, H] (stored bf16 in this fixture)
            up_e = np.asarray(w.experts.up_proj[e], np.float32)  # [I, H]
            down_e = np.asarray(w.experts.down_proj[e], np.float32)  # [H, I]
            expert_out = (silu(x[t] @ gate_e.T) * (x[t] @ up_e.T)) @ down_e.T  # a SwiGLU, [H]
            out[t] += weight * expert_out
    shared = my_swiglu(x, w.shared_expert)
    out += 1 / (1 + np.exp(-(x @ w.shared_expert_gate.T))) * shared  # [T, 1] gate per token
    return out, chosen, logits


moe_folder, moe_expected = course.fixture("moe_text_16_experts_top4_bf16")
moe_model = minqwen.load(moe_folder)
mc = moe_model.config
print(f"{mc.num_experts} experts per layer, top-{mc.num_experts_per_tok}, expert width {mc.moe_intermediate_size}, "
      f"shared expert width {mc.shared_expert_intermediate_size}")
moe_taps = {}
moe_model.forward(moe_expected["token_ids"], tap=lambda n, a: moe_taps.__setitem__(n, a.copy()))
for i in range(mc.num_hidden_layers):
    x_mid = moe_expected[f"hidden.{i - 1}"] if i else moe_taps["embed"]
    x_mid = x_mid + moe_taps[f"layers.{i}.token_mixer"]  # the stream after this layer's mixer
    h = rms_norm(x_mid, moe_model.layers[i].post_attention_layernorm)
    out, chosen, logits = my_moe(h, moe_model.layers[i].mlp, mc.num_experts_per_tok)
    np.testing.assert_allclose(logits, moe_expected[f"router_logits.{i}"], rtol=0, atol=1e-4)
    assert (np.sort(chosen, -1) == np.sort(moe_expected[f"experts_chosen.{i}"], -1)).all()
    np.testing.assert_allclose(x_mid + out, moe_expected[f"hidden.{i}"], rtol=0, atol=1e-4)
print("router logits, chosen experts and layer outputs match the reference in all",
      mc.num_hidden_layers, "layers")

# %% [markdown]
# minqwen does the same arithmetic differently: instead of looping over tokens it groups the
# (token, expert) pairs **by expert** — a counting sort — so each chosen expert runs one
# matrix product over all of its tokens, and an expert no token chose is never read at all.
# Its experts stay memory-mapped in the checkpoint's own dtype, so a decode step pages in the
# active parameters only. Same answer:

# %%
from minqwen.moe import sparse_moe_block

h = moe_taps["layers.0.post_attention_layernorm"]
ours, _, _ = my_moe(h, moe_model.layers[0].mlp, mc.num_experts_per_tok)
np.testing.assert_allclose(ours, sparse_moe_block(h, moe_model.layers[0].mlp, mc.num_experts_per_tok, "silu"),
                           rtol=1e-5, atol=1e-5)

# %% [markdown]
# **Ties.** If two experts have exactly the same probability at the `k`-th place, which one
# is chosen? `torch.topk` does not say. minqwen (and `my_moe`, through the stable sort) pick
# the lower expert index. Exact ties essentially never happen with real activations, so the
# model-level parity tests use continuous random weights; one reference test feeds the router
# ties on purpose and checks that the weights always agree, and the experts too unless a tie
# straddles the k-th place (tests/test_moe.py).
#
# ## Picture: how evenly the router spreads the load
#
# We push 400 random token ids through the fixture's MoE model and count, per layer, how many
# of the 400 × 4 assignments each expert received. With random router weights the load is
# uneven; real MoE training adds a load-balancing loss (weighted by `router_aux_loss_coef`) to
# flatten it, because an overloaded expert is a bottleneck and an idle one is wasted memory.

# %%
many_ids = np.random.default_rng(0).integers(0, mc.vocab_size, size=400)
load_taps = {}
moe_model.forward(many_ids, tap=lambda n, a: load_taps.__setitem__(n, a.copy()) if n.endswith("experts_chosen")
                  else None)
loads = np.array([np.bincount(load_taps[f"layers.{i}.mlp.experts_chosen"].ravel(), minlength=mc.num_experts)
                  for i in range(mc.num_hidden_layers)])  # [layers, E]
assert (loads.sum(1) == 400 * mc.num_experts_per_tok).all()
fair = 400 * mc.num_experts_per_tok / mc.num_experts
print(f"assignments per expert (fair share {fair:.0f}):")
for i, row in enumerate(loads):
    print(f"  layer {i}: min {row.min():>3}, max {row.max():>3}")

if plt is not None:
    fig, axes = plt.subplots(1, mc.num_hidden_layers, figsize=(3 * mc.num_hidden_layers, 2.8), sharey=True)
    for i, ax in enumerate(axes):
        ax.bar(range(mc.num_experts), loads[i], color="#4c9be8")
        ax.axhline(fair, color="#e8744c", lw=1, label="fair share")
        ax.set_title(f"layer {i}", fontsize=9), ax.set_xlabel("expert")
    axes[0].set_ylabel("tokens routed"), axes[0].legend(fontsize=7)
    fig.suptitle(f"Router load per expert: 400 tokens, top-{mc.num_experts_per_tok} of {mc.num_experts} "
                 "(random-weight fixture)", fontsize=9)
    fig.tight_layout()
    course.save(fig, "07_router_load.png")

# %% [markdown]
# ## Exercises
#
# Solutions: `walkthrough/solutions/07_mlp_and_moe.py`.
#
# **Exercise 7.1.** Count parameters for Qwen3.5-35B-A3B's MoE blocks: hidden size 2,048,
# 40 layers, 256 experts of width 512, top-8, a shared expert of width 512. How many expert
# parameters does the model hold (routed + shared, all layers), and how many does one token
# use? Return both.
#
# **Exercise 7.2.** A plain (non-gated) MLP of width `4H` has `8H²` parameters. What width
# must a SwiGLU MLP have to use the same number? Compare with Qwen3.5-0.8B's 3,584.

# %%
def exercise_7_1():
    """(total expert parameters, active expert parameters per token) for Qwen3.5-35B-A3B."""
    return None  # your code here


answer = exercise_7_1()
if answer is None:
    print("Exercise 7.1: not attempted yet.")
else:
    total, active = answer
    expert = 3 * 2048 * 512  # gate_proj, up_proj and down_proj of one expert
    assert total % expert == 0 and active % expert == 0, "count gate, up and down for each expert"
    assert (total // expert, active // expert) == (40 * 257, 40 * 9), \
        f"{total // expert} and {active // expert} experts' worth: did you count the shared expert in every layer?"
    print(f"Exercise 7.1: {total / 1e9:.1f} B expert parameters, {active / 1e9:.2f} B used per token")
