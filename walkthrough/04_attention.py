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
# # Chapter 4 · Gated attention and the KV cache
#
# One layer in four of Qwen3.5 is ordinary softmax attention — with three additions that a
# port must get exactly right:
#
# * `q_proj` produces, **per head**, a query *and* an output gate;
# * `q_norm` and `k_norm` normalise each head's query and key before rotary;
# * the attention output is multiplied by `sigmoid(gate)` before `o_proj`.
#
# It also uses **grouped-query attention** (GQA): fewer key/value heads than query heads.
# And it is the only layer whose memory grows with the text: the **KV cache**.
#
# We build the layer step by step on layer 3 of the `text_tied_fp32` fixture, starting from
# the reference's own hidden state before that layer, and finish with the reference's own
# output after it.

# %%
import numpy as np

import course
import minqwen
from minqwen.attention import KVCache

np.set_printoptions(precision=4, suppress=True, linewidth=110)

folder, expected = course.fixture("text_tied_fp32")
model = minqwen.load(folder)
c = model.config
LAYER = 3
assert c.layer_types[LAYER] == "full_attention"
w = model.layers[LAYER].self_attn  # q_proj, k_proj, v_proj, o_proj, q_norm, k_norm: as in the checkpoint
Hq, Hkv, D = c.num_attention_heads, c.num_key_value_heads, c.head_dim
print(f"{Hq} query heads, {Hkv} key/value heads, head_dim {D}; q_proj {w.q_proj.shape}, k_proj {w.k_proj.shape}")


def rms_norm(x, w, eps=c.rms_norm_eps):  # chapter 2
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * (1 + w)


def rotate(x, positions):  # chapter 3: rotate-half RoPE on the first rotary_dim dims of each head
    R = c.rotary_dim
    angles = positions[:, None, None] * (1.0 / c.rope_theta ** (np.arange(0, R, 2) / R))  # [T, 1, R/2]
    a, b, rest = x[..., : R // 2], x[..., R // 2 : R], x[..., R:]
    return np.concatenate([a * np.cos(angles) - b * np.sin(angles), a * np.sin(angles) + b * np.cos(angles), rest], -1)


x = expected[f"hidden.{LAYER - 1}"]  # [T, H]: the residual stream entering layer 3 (reference values)
T = len(x)
h = rms_norm(x, model.layers[LAYER].input_layernorm)  # [T, H]

# %% [markdown]
# ## Step 1 · Query and gate come out of one projection
#
# `q_proj` is twice as tall as the query needs: `[Hq · 2 · D, H]`. Its output holds, for each
# head in turn, that head's query and then that head's gate: `[q₀ | g₀ | q₁ | g₁ | …]`. So we
# reshape to `(heads, 2·D)` first and split each head in half.

# %%
q_and_gate = (h @ w.q_proj.T).reshape(T, Hq, 2 * D)  # [T, Hq, 2D]
q, gate = q_and_gate[..., :D], q_and_gate[..., D:]  # [T, Hq, D] each
k = (h @ w.k_proj.T).reshape(T, Hkv, D)  # [T, Hkv, D]
v = (h @ w.v_proj.T).reshape(T, Hkv, D)  # [T, Hkv, D]

# %% [markdown]
# The tempting mistake is to split the flat output in half — first half queries, second half
# gates. That mixes heads: the "query" of head 1 would be head 0's gate. Everything still
# runs and produces plausible numbers, which is what makes it dangerous:

# %%
flat = h @ w.q_proj.T
wrong_q = flat[:, : Hq * D].reshape(T, Hq, D)
print("head 1 of the wrong split == head 0's gate:", np.allclose(wrong_q[:, 1], gate[:, 0]))
assert not np.allclose(wrong_q, q)

# %% [markdown]
# ## Step 2 · q_norm and k_norm, then rotary
#
# Each head's query and key are RMS-normalised over their `D` dims (zero-centred, `1 + w`,
# one weight vector shared by all heads). Normalising q and k bounds the size of the
# attention scores, which keeps training stable. Then rotary positions (chapter 3).
#
# After this step `k` and `v` are exactly what goes into the KV cache — and the fixture
# stores the reference's cache, so we check both now.

# %%
positions = np.arange(T)
q = rotate(rms_norm(q, w.q_norm), positions)  # [T, Hq, D]
k = rotate(rms_norm(k, w.k_norm), positions)  # [T, Hkv, D]
np.testing.assert_allclose(k.transpose(1, 0, 2), expected[f"state.{LAYER}.keys"], rtol=0, atol=1e-4)
np.testing.assert_allclose(v.transpose(1, 0, 2), expected[f"state.{LAYER}.values"], rtol=0, atol=1e-4)

# %% [markdown]
# ## Step 3 · Causal attention with grouped heads
#
# Query head `h` reads key/value head `h // (Hq / Hkv)`: here heads 0 and 1 share kv head 0,
# heads 2 and 3 share kv head 1. The cache stores only `Hkv` heads, which is the whole point
# of GQA — a quarter of the memory in Qwen3.5 (8 query heads, 2 kv heads).
#
# Scores are scaled by `1/√D` so that their spread does not grow with the head size, and a
# causal mask stops each token from seeing the future.

# %%
def attention(q, k, v):
    """q [T, Hq, D], k and v [S, Hkv, D], the last T of the S keys belong to the T queries."""
    T, S = len(q), len(k)
    group = q.shape[1] // k.shape[1]
    k, v = np.repeat(k, group, axis=1), np.repeat(v, group, axis=1)  # [S, Hq, D]: kv head for each q head
    scores = np.einsum("thd,shd->hts", q, k) / np.sqrt(q.shape[-1])  # [Hq, T, S]
    visible = np.arange(S)[None, :] <= (S - T + np.arange(T))[:, None]  # [T, S]: query t sits at S − T + t
    scores = np.where(visible, scores, -np.inf)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    return np.einsum("hts,shd->thd", probs, v)  # [T, Hq, D]


out = attention(q, k, v)  # [T, Hq, D]

# %% [markdown]
# ## Step 4 · The output gate
#
# Each head's output is multiplied, element by element, by `sigmoid(gate)`. The gate lets a
# head say "I found nothing useful here" by closing, instead of being forced to output some
# weighted average of values (softmax weights always sum to one). This is Qwen's
# *gated attention*; it also removes the "attention sink" habit of dumping attention on the
# first token.

# %%
gated = out.reshape(T, Hq * D) / (1 + np.exp(-gate.reshape(T, Hq * D)))  # out · sigmoid(gate)
mixer = gated @ w.o_proj.T  # [T, H]

taps = {}
model.forward(expected["token_ids"], tap=lambda n, a: taps.__setitem__(n, a.copy()))
np.testing.assert_allclose(mixer, taps[f"layers.{LAYER}.token_mixer"], rtol=0, atol=1e-4)

# %% [markdown]
# Finally the rest of the layer — residual add, the second norm and the MLP (chapter 7's
# subject, three lines here) — must give the reference's hidden state after layer 3:

# %%
mlp = model.layers[LAYER].mlp
x_mid = x + mixer
hh = rms_norm(x_mid, model.layers[LAYER].post_attention_layernorm)
g = hh @ mlp.gate_proj.T
x_out = x_mid + (g / (1 + np.exp(-g)) * (hh @ mlp.up_proj.T)) @ mlp.down_proj.T
np.testing.assert_allclose(x_out, expected[f"hidden.{LAYER}"], rtol=0, atol=1e-4)
print("layer 3 rebuilt: max |Δ| against the reference =", np.abs(x_out - expected[f"hidden.{LAYER}"]).max())

# %% [markdown]
# ## The KV cache
#
# Generating text is one token at a time. Recomputing every key and value of the whole text
# at every step would cost O(T²) projections; instead we keep them. A decode step projects
# only the new token, appends its k and v to the cache, and lets its query attend over the
# cache. The answer must be the same as running the whole sequence at once.

# %%
class MyKVCache:
    def __init__(self):
        self.k, self.v = np.zeros((0, Hkv, D)), np.zeros((0, Hkv, D))

    def append(self, k, v):
        self.k, self.v = np.concatenate([self.k, k]), np.concatenate([self.v, v])
        return self.k, self.v


def attention_layer(h, cache, start):
    """The gated attention block over h [t, H] at positions start … start + t − 1."""
    t = len(h)
    qg = (h @ w.q_proj.T).reshape(t, Hq, 2 * D)
    pos = np.arange(start, start + t)
    q = rotate(rms_norm(qg[..., :D], w.q_norm), pos)
    k = rotate(rms_norm((h @ w.k_proj.T).reshape(t, Hkv, D), w.k_norm), pos)
    keys, values = cache.append(k, (h @ w.v_proj.T).reshape(t, Hkv, D))
    out = attention(q, keys, values).reshape(t, Hq * D) / (1 + np.exp(-qg[..., D:].reshape(t, Hq * D)))
    return out @ w.o_proj.T


cache = MyKVCache()
prefill = attention_layer(h[:17], cache, 0)  # the prompt, in one go
steps = [attention_layer(h[t : t + 1], cache, t) for t in range(17, T)]  # then one token at a time
np.testing.assert_allclose(np.concatenate([prefill, *steps]), mixer, rtol=0, atol=1e-5)
print("prefill + 4 decode steps == one pass; cache holds", cache.k.shape[0], "tokens")

# %% [markdown]
# The cost: every attention layer keeps `2 × Hkv × D` numbers per token, forever. For
# Qwen3.5-0.8B (6 attention layers, 2 kv heads of 256) in bf16 that is
# 6 × 2 × 2 × 256 × 2 bytes = 12 KiB per token — 384 MiB at 32k tokens. Chapter 8 puts this
# next to the Gated DeltaNet state, which does not grow at all.
#
# minqwen's `KVCache` stores `[Hkv, capacity, D]` arrays and doubles the capacity when full,
# so appending one token costs amortised O(1) copies instead of reallocating the whole history
# at each step (as our `np.concatenate` does):

# %%
kv = KVCache(Hkv, D)
lengths, capacities = [], []
for t in range(300):
    kv.append(np.zeros((1, Hkv, D), np.float32), np.zeros((1, Hkv, D), np.float32))
    lengths.append(kv.length)
    capacities.append(kv.keys.shape[1])
assert kv.nbytes == 2 * 300 * Hkv * D * 4  # nbytes counts what is used, not the spare capacity
print("capacity after 300 appends:", capacities[-1], "tokens; re-allocations:", len(set(capacities)))

# %% [markdown]
# ## What minqwen runs at long context
#
# At 16k tokens a decode step's attention is almost all memory traffic: one query token
# reads every key and value in the cache. For a few query tokens (tokens × query heads per KV
# head ≤ 8: one or two at the 0.8B shape) minqwen runs `attention_few_queries`, a Numba
# kernel: from 512 keys in a model too big for the caches, from 2k in a small one, where
# waking Numba's threads costs more than it saves. It splits the keys into blocks; each core
# reads its blocks once and returns, per block, the largest score, the sum of exponentials and the
# exp-weighted sum of values, and the blocks are merged at the end. That is the online
# softmax of Exercise 4.1 below, run in parallel ("flash decoding"). It is held equal to the
# definition (minqwen stores its cache as [Hkv, S, D], hence the transposes):

# %%
from minqwen.attention import attention_few_queries

r = np.random.default_rng(4)
q_new = r.standard_normal((1, Hq, D)).astype(np.float32)  # one decode step's queries
k_long, v_long = (r.standard_normal((3000, Hkv, D)).astype(np.float32) for _ in range(2))  # [S, Hkv, D]
kernel_out = attention_few_queries(q_new, np.ascontiguousarray(k_long.transpose(1, 0, 2)),
                                   np.ascontiguousarray(v_long.transpose(1, 0, 2)), D**-0.5)
np.testing.assert_allclose(kernel_out, attention(q_new, k_long, v_long), rtol=0, atol=1e-5)
print("minqwen's long-context decode kernel == attention() over 3,000 keys")

# %% [markdown]
# ## Pictures: what the heads look at, and how the cache grows
#
# The embedded model has been trained, so its attention heads have learned habits. We read
# the queries and keys of its attention layer through minqwen's `tap` hook (every named
# intermediate is visible that way) and compute the attention probabilities ourselves.

# %%
from minqwen.tokenizer import Tokenizer

emb_folder = course.embedded_model()
emb, tok = minqwen.load(emb_folder), Tokenizer(emb_folder)
ids = tok.encode("def add(a, b):\n    return a + b\n\nprint(add(1, 2))")
emb_taps = {}
emb.forward(ids, tap=lambda n, a: emb_taps.__setitem__(n, a.copy()))
L = emb.config.layer_types.index("full_attention")
eq, ek = emb_taps[f"layers.{L}.self_attn.q"], emb_taps[f"layers.{L}.self_attn.k"]  # [T, Hq, D], [T, Hkv, D]
group = eq.shape[1] // ek.shape[1]
scores = np.einsum("thd,shd->hts", eq, np.repeat(ek, group, axis=1)) / np.sqrt(eq.shape[-1])
scores = np.where(np.tril(np.ones((len(ids), len(ids)), bool)), scores, -np.inf)
probs = np.exp(scores - scores.max(-1, keepdims=True))
probs /= probs.sum(-1, keepdims=True)  # [Hq, T, T]
assert np.allclose(probs.sum(-1), 1)

plt = course.pyplot()
if plt is not None:
    labels = [course.token_label(tok.decode([i])) for i in ids]
    n_heads = probs.shape[0]
    fig, axes = plt.subplots(1, n_heads, figsize=(3.3 * n_heads, 3.8))
    for head, ax in enumerate(np.atleast_1d(axes)):
        ax.imshow(probs[head], cmap="viridis", vmin=0, vmax=1)
        ax.set_title(f"layer {L}, head {head} (kv head {head // group})", fontsize=8)
        ax.set_xticks(range(len(ids)), labels, rotation=90, fontsize=5)
        ax.set_yticks(range(len(ids)), labels, fontsize=5)
    fig.suptitle("Attention probabilities of the embedded model (row: query token, column: key token)", fontsize=9)
    fig.tight_layout()
    course.save(fig, "04_attention_heads.png")

    fig, ax = plt.subplots(figsize=(6, 2.8))
    ax.plot(lengths, label="tokens in the cache")
    ax.step(range(300), capacities, where="post", label="allocated capacity")
    ax.set_xlabel("decode step"), ax.set_ylabel("tokens"), ax.legend(fontsize=8)
    ax.set_title("minqwen's KVCache: grows with every token, reallocates by doubling", fontsize=9)
    course.save(fig, "04_kv_cache_growth.png")

# %% [markdown]
# ## A decode step in one pass
#
# Below the length where that kernel takes over, one token's attention is little work spread
# over many small calls: two norms, two rotations, the cache append, the softmax, the gate.
# At the real 0.8B shape the products between them have just streamed megabytes through the
# caches, so each small call first waits for its data. A decode step therefore takes
# `attention.decode_step`: the same steps in one compiled call. Its norms and rotation are
# the very compiled steps the definition calls, so the key it caches is the definition's, bit
# for bit; its scores and weighted sum add their terms in another order than BLAS does, so
# its output agrees with the definition to float32 rounding. Its taps show what it computed:
# redo the step's attention from them with this chapter's own `attention`:

# %%
cache = emb.new_cache()
emb.forward(ids, cache)
step_taps = {}
emb.forward([42], cache, tap=lambda n, a: step_taps.__setitem__(n, a.copy()))  # one token: the compiled pass
kv_cache = cache.layers[L]
cached_k = kv_cache.keys[:, : kv_cache.length].transpose(1, 0, 2)  # [S, Hkv, D], as `attention` takes them
cached_v = kv_cache.values[:, : kv_cache.length].transpose(1, 0, 2)
np.testing.assert_array_equal(cached_k[-1:], step_taps[f"layers.{L}.self_attn.k"])  # the new key, cached
gate = step_taps[f"layers.{L}.self_attn.gate"]  # [1, Hq, D]
ours = attention(step_taps[f"layers.{L}.self_attn.q"], cached_k, cached_v) / (1 + np.exp(-gate))
np.testing.assert_allclose(ours.reshape(1, -1), step_taps[f"layers.{L}.self_attn.gated_output"], rtol=0, atol=1e-5)
print(f"decode step over {kv_cache.length} keys: the compiled pass == this chapter's attention, to float32 rounding")

# %% [markdown]
# ## Exercises
#
# Solutions: `walkthrough/solutions/04_attention.py`.
#
# **Exercise 4.1.** Long prompts cannot afford the full `[heads, T, T]` score matrix.
# Rewrite `attention` to walk over the keys in blocks of 4, keeping for each query a running
# maximum, a running sum of `exp` and a running weighted sum of values ("online softmax",
# the idea behind FlashAttention). Like `attention`, it must also work when there are fewer
# queries than keys (a decode step over a cache: the T queries are the last T of the S keys).
# Check it against `attention` on `q, k, v` above, and on `q[-3:], k, v`.
#
# **Exercise 4.2.** For Qwen3.5-0.8B at 32,768 tokens in bf16, how many bytes would the KV
# cache take with 8 kv heads (plain multi-head attention), with 2 (what it has), and with 1
# (multi-query attention)? Return the three numbers.

# %%
def exercise_4_1(q, k, v, block=4):
    """Causal GQA attention like `attention`, but over key blocks with an online softmax."""
    return None  # your code here


answer = exercise_4_1(q, k, v)
if answer is None:
    print("Exercise 4.1: not attempted yet.")
else:
    np.testing.assert_allclose(answer, attention(q, k, v), rtol=1e-6, atol=1e-8)
    # Three queries after 18 cached keys: query t sits at position S − T + t, not t.
    np.testing.assert_allclose(exercise_4_1(q[-3:], k, v), attention(q[-3:], k, v), rtol=1e-6, atol=1e-8,
                               err_msg="with T < S queries, query t sits at position S − T + t")
    print("Exercise 4.1: online softmax agrees with the plain one.")
