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
# # Chapter 6 · The short convolution and the decode state
#
# Chapter 5 used a short causal convolution without explaining it. Here it is, and with it
# the whole **decode state** of a Gated DeltaNet layer: everything the layer must remember
# between one call and the next. We will see that
#
# * the convolution needs only the last **K − 1** inputs (K = 4 in Qwen3.5: three rows);
# * the recurrent memory `S` has a **constant size**, whatever the length of the text;
# * a prompt can be fed in pieces of any length, down to one token, with the same result —
#   provided the state is carried correctly;
# * the state cannot be rewound, so rolling back means restoring a copy.

# %%
import numpy as np

import course
import minqwen
from minqwen.deltanet import causal_conv1d

np.set_printoptions(precision=4, suppress=True, linewidth=110)

# %% [markdown]
# ## A depthwise causal convolution
#
# The Gated DeltaNet layer projects each token to one long vector holding q, k and v side by
# side (`in_proj_qkv`, `C` channels). Before the delta rule, each channel is smoothed over
# time with its own `K` weights:
#
# $$y_{t,c} = \sum_{j=0}^{K-1} w_{c,j}\; x_{t-(K-1)+j,\,c}$$
#
# * **causal**: output `t` sees inputs `t − K + 1 … t`, never later ones;
# * **depthwise**: each channel has its own filter and channels never mix (no matrix);
# * no bias, then a SiLU.
#
# Why? The delta-rule memory has no notion of *where* a token was, only of what was written
# and how much has decayed since. The convolution hands every token a view of its three
# predecessors directly — "the previous token was `def`" — so that its query, key and value
# already carry local context. Mamba and other recurrent models use the same trick.

# %%
def my_conv(x, w, state):
    """x [T, C], w [C, K], state [K−1, C] (the K−1 inputs before x) → (y [T, C], new state [K−1, C])."""
    K = w.shape[1]
    window = np.concatenate([state, x])  # [K−1+T, C]
    y = np.zeros_like(x)
    for t in range(len(x)):
        y[t] = np.sum(window[t : t + K] * w.T, axis=0)  # inputs t−K+1 … t of each channel
    return y, window[len(window) - (K - 1) :]  # the last K−1 inputs: all the next call needs


# %% [markdown]
# ## Checking against the reference
#
# The fixtures store the reference's conv state after the prompt. For every Gated DeltaNet
# layer of three fixtures — kernel sizes 4, 3 and 2 — we recompute the conv's input from the
# reference's hidden state before that layer and check our state against it. (transformers
# stores the last **K** inputs as `[C, K]`; the oldest is never read again, and the fixture —
# like minqwen — keeps the K − 1 that are.)

# %%
def rms_norm(x, w, eps=1e-6):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * (1 + w)


for name in ("text_tied_fp32", "text_grouped_bf16_bias", "multimodal_sharded"):
    folder, expected = course.fixture(name)
    model = minqwen.load(folder)
    c = model.config
    ids = expected["token_ids"]
    for i, layer in enumerate(model.layers):
        if layer.layer_type != "linear_attention":
            continue
        x = model.embed_tokens[ids] if i == 0 else expected[f"hidden.{i - 1}"]
        conv_input = rms_norm(x, layer.input_layernorm) @ layer.linear_attn.in_proj_qkv.T  # [T, C]
        zeros = np.zeros((c.linear_conv_kernel_dim - 1, conv_input.shape[1]), np.float32)
        y, state = my_conv(conv_input, layer.linear_attn.conv1d, zeros)
        np.testing.assert_allclose(state, expected[f"state.{i}.conv"], rtol=0, atol=1e-4)
        y_minqwen, _ = causal_conv1d(conv_input, layer.linear_attn.conv1d, zeros)
        np.testing.assert_allclose(y, y_minqwen, rtol=1e-5, atol=1e-5)
    print(f"{name:<24} K = {c.linear_conv_kernel_dim}: conv state {expected['state.0.conv'].shape} matches")

# %% [markdown]
# ## Feeding a prompt in pieces
#
# A chat application feeds a prompt, generates, then feeds the user's next message — many
# calls, each continuing from the state of the last. The output must not depend on where the
# calls begin and end. The subtle case is a piece **shorter than K − 1**: its window then
# reaches back past its own start into the *previous* call's inputs, and even into the call
# before that. Carrying the last K − 1 inputs (not "the last K − 1 inputs of this call")
# handles it.

# %%
rng = np.random.default_rng(0)
K, C = 4, 6
w = rng.normal(size=(C, K)).astype(np.float32)
x = rng.normal(size=(20, C)).astype(np.float32)
whole, _ = my_conv(x, w, np.zeros((K - 1, C), np.float32))
for pieces in ([20], [1] * 20, [2, 1, 1, 5, 11], [3, 3, 3, 11], [5, 1, 14]):
    state, outs, start = np.zeros((K - 1, C), np.float32), [], 0
    for n in pieces:
        y, state = my_conv(x[start : start + n], w, state)
        outs.append(y)
        start += n
    np.testing.assert_allclose(np.concatenate(outs), whole, rtol=1e-6, atol=1e-6)
print("every split of the prompt gives the same output")

# %% [markdown]
# minqwen's whole model obeys the same law — prefill in pieces equals prefill in one go —
# because every layer carries its state in the `Cache`:

# %%
folder, expected = course.fixture("text_tied_fp32")
model = minqwen.load(folder)
ids = expected["token_ids"]
full = model.forward(ids)
cache = model.new_cache()
pieces = [model.forward(ids[a:b], cache) for a, b in ((0, 2), (2, 3), (3, 4), (4, 11), (11, 21))]
# (to float32 rounding: different shapes of matrix product sum in different orders)
np.testing.assert_allclose(np.concatenate(pieces), full, rtol=0, atol=1e-4)
print("minqwen: 5 calls of 2, 1, 1, 7, 10 tokens == 1 call of 21")

# %% [markdown]
# ## What the decode state weighs
#
# After any number of tokens, one Gated DeltaNet layer holds
#
# * the conv window: `(K − 1) × C` numbers, `C = 2·Hk·Dk + Hv·Dv`;
# * the memory `S`: `Hv × Dk × Dv` numbers;
#
# and an attention layer holds `2 × Hkv × D` numbers **per token seen**. We feed the
# embedded model 256 tokens, 8 at a time, and weigh each layer's state after each call.

# %%
emb = minqwen.load(course.embedded_model())
ec = emb.config
cache = emb.new_cache()
seen, sizes = [], []  # sizes[n][layer] = bytes after the n-th call
ids_256 = np.random.default_rng(1).integers(0, 256, size=256)  # any ids will do for weighing
for start in range(0, 256, 8):
    emb.forward(ids_256[start : start + 8], cache, last_only=True)
    seen.append(cache.position)
    sizes.append([layer.nbytes for layer in cache.layers])
sizes = np.array(sizes)  # [calls, layers]
for i, kind in enumerate(ec.layer_types):
    print(f"layer {i} ({kind:<16}): {sizes[0, i]:>8,} bytes after 8 tokens, {sizes[-1, i]:>8,} after 256")
    if kind == "linear_attention":
        expected_bytes = 4 * ((ec.linear_conv_kernel_dim - 1) * ec.linear_conv_dim
                              + ec.linear_num_value_heads * ec.linear_key_head_dim * ec.linear_value_head_dim)
        assert (sizes[:, i] == expected_bytes).all()  # constant
    else:
        assert (sizes[:, i] == 4 * 2 * ec.num_key_value_heads * ec.head_dim * np.array(seen)).all()  # linear in tokens

plt = course.pyplot()
if plt is not None:
    delta = [i for i, kind in enumerate(ec.layer_types) if kind == "linear_attention"]
    attn = [i for i, kind in enumerate(ec.layer_types) if kind == "full_attention"]
    fig, ax = plt.subplots(figsize=(7, 3.2))
    ax.plot(seen, sizes[:, delta].sum(1) / 1024, color="#4c9be8",
            label=f"{len(delta)} Gated DeltaNet layers together (conv windows + memories)")
    ax.plot(seen, sizes[:, attn].sum(1) / 1024, "--", color="#e8744c", label=f"{len(attn)} attention layer(s): KV cache")
    ax.set_xlabel("tokens seen"), ax.set_ylabel("KiB (float32)")
    ax.set_title("Decode state of the embedded model as it reads", fontsize=9)
    ax.legend(fontsize=8)
    course.save(fig, "06_state_per_layer.png")

# %% [markdown]
# At 256 tokens the embedded model's one attention layer already outweighs its three DeltaNet
# layers together; the line keeps climbing while the others stay flat. Chapter 8 does the
# same sums for the real models at up to 262,144 tokens.
#
# ## A decode step in one pass
#
# `gated_deltanet` reads as the steps of chapter 5 — conv, SiLU, split, L2 norms, β and g,
# the recurrence, the gated norm — each a call of its own. For one token each call is tiny,
# and at the real 0.8B shape the products between them have just streamed tens of megabytes
# through the caches, so each small call first waits for its data. A decode step therefore
# takes `deltanet.decode_step`: the same steps, in the same order and with the same compiled
# arithmetic, in one kernel that walks each value head from its conv to its norm, updating
# the conv window and `S` in place. A tapped call, which must show every intermediate, runs
# the definition instead, so the two can be compared — bit for bit:

# %%
from minqwen import deltanet  # noqa: E402

runs = {}
for name, tap in (("compiled step", None), ("definition", lambda name, array: None)):
    cache = emb.new_cache()
    emb.forward(ids_256[:8], cache)
    window = cache.layers[0].conv  # layer 0 is a Gated DeltaNet layer: [K − 1, C]
    runs[name] = emb.forward([42], cache, tap=tap), cache
    print(f"{name}: the window updated in place: {cache.layers[0].conv is window}")
(compiled, cache_a), (definition, cache_b) = runs["compiled step"], runs["definition"]
np.testing.assert_array_equal(compiled, definition)
for a, b in zip(cache_a.layers, cache_b.layers):
    if isinstance(a, deltanet.DeltaNetState):
        np.testing.assert_array_equal(a.conv, b.conv)
        np.testing.assert_array_equal(a.recurrent, b.recurrent)
print("decode step: the compiled pass == the layer's definition, logits and states bit for bit")

# %% [markdown]
# (At the real 0.8B shape the pass saves ~3.5 ms of a ~100 ms float32 step; `tools/measurements.md`.)
#
# ## Rolling back: copy, don't rewind
#
# Speculative decoding and chat editing sometimes need to *undo* tokens. For a KV cache that
# is trivial: forget the last rows. For the DeltaNet memory it is not: one step maps `S` to
# `exp(g)·(I − β k kᵀ)·S + β k vᵀ`, and undoing it means dividing by `exp(g)` and by `1 − β`
# along `k`. With `β` near 1 (a confident write) that division amplifies rounding errors
# enormously. We write 20 tokens in float32, then try to rewind them:

# %%
Dk, Dv = 16, 8
S0 = rng.normal(size=(Dk, Dv)).astype(np.float32)
S, history = S0.copy(), []
for t in range(20):
    k = rng.normal(size=Dk).astype(np.float32)
    k /= np.linalg.norm(k)
    v = rng.normal(size=Dv).astype(np.float32)
    beta, decay = np.float32(rng.uniform(0.9, 0.99)), np.float32(np.exp(-rng.uniform(0.05, 0.5)))
    S = S * decay
    S = S + np.outer(k, beta * (v - S.T @ k))
    history.append((k, v, beta, decay))
snapshot_of_S0 = S0.copy()  # what minqwen does instead: cache.copy() before the tokens

rewound = S.copy()
for k, v, beta, decay in reversed(history):
    undo_write = np.eye(Dk, dtype=np.float32) + beta / (1 - beta) * np.outer(k, k)  # (I − β k kᵀ)⁻¹
    rewound = undo_write @ (rewound - beta * np.outer(k, v)) / decay
error = np.abs(rewound - S0).max() / np.abs(S0).max()
print(f"rewinding 20 tokens: error {error:.1e} × the size of S;  restoring a copy: error 0")
assert error > 1.0 and np.array_equal(snapshot_of_S0, S0)

# %% [markdown]
# So minqwen's `Cache.copy()` snapshots every layer, and a rollback restores the snapshot.
# (The conv window must be restored too — a speculative decoder that forgot it once ran
# slower than no speculation at all.)
#
# ## Exercises
#
# Solutions: `walkthrough/solutions/06_conv_and_state.py`.
#
# **Exercise 6.1.** For one channel, the causal convolution is a matrix product with a
# banded lower-triangular `T × T` matrix (a Toeplitz matrix). Build it from `w[c]` and check
# it against `my_conv` on channel 2 of `x` (zero initial state).
#
# **Exercise 6.2.** What does the whole decode state of Qwen3.5-0.8B weigh in float32 —
# 18 Gated DeltaNet layers (conv K = 4, 16 key heads and 16 value heads of 128) and 6
# attention layers (2 kv heads of 256) — after 1 token, and after 32,768 tokens? Return the
# two byte counts.

# %%
def exercise_6_1(x_channel, w_channel):
    """The T×T matrix M with M @ x_channel == causal conv of x_channel with the K weights w_channel."""
    return None  # your code here


answer = exercise_6_1(x[:, 2], w[2])
if answer is None:
    print("Exercise 6.1: not attempted yet.")
else:
    np.testing.assert_allclose(answer @ x[:, 2], whole[:, 2], rtol=1e-5, atol=1e-5)
    print("Exercise 6.1: correct.")
