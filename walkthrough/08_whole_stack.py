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
# # Chapter 8 · The whole stack, its caches, and memory as context grows
#
# Time to put the pieces together. Below is a complete Qwen3.5 text model — dense or
# mixture-of-experts — in about 120 lines of NumPy, written from the chapters before this one
# and from nothing in minqwen but its config reader. It reads the weights straight from the
# safetensors files, keeps its own decode cache, and reproduces the reference's logits, every
# layer's hidden state, the decode state and a greedy continuation, on every fixture in the
# repository.
#
# Then we weigh the caches: how the memory of a hybrid model grows with the length of the
# text, compared with a model made only of attention layers.

# %%
import ml_dtypes  # noqa: F401  (lets safetensors read bf16 as NumPy arrays)
import numpy as np
from safetensors.numpy import load_file

import course
import minqwen
from minqwen.config import config_from_dict, load_config

np.set_printoptions(precision=4, suppress=True, linewidth=110)

# %% [markdown]
# ## Weights: names in, float32 arrays out
#
# All tensors of all shard files, widened to float32, with the text model's prefix removed
# (`model.language_model.` in multimodal releases, `model.` in text-only ones). Vision-tower
# and MTP tensors come along but are never looked at.

# %%
def read_weights(folder):
    weights = {}
    for file in sorted(folder.glob("*.safetensors")):
        if file.name == "expected.safetensors":  # the reference outputs, not weights
            continue
        for name, value in load_file(str(file)).items():
            for prefix in ("model.language_model.", "model."):
                if name.startswith(prefix):
                    name = name[len(prefix):]
                    break
            weights[name] = value.astype(np.float32)
    return weights


# %% [markdown]
# ## The pieces, one function each
#
# Every function here is a chapter in a few lines. `W` is the weight dictionary and `p` the
# name prefix of the current block, so each line reads like the checkpoint.

# %%
def silu(x):
    return x / (1 + np.exp(-x))


def sigmoid(x):
    return 1 / (1 + np.exp(-x))


def rms_norm(x, w, eps):  # chapter 2: zero-centred, 1 + w in float32
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * (1 + w)


def linear(W, name, x):  # y = x · Wᵀ (+ b): the checkpoint stores W as [out, in]
    y = x @ W[name + ".weight"].T
    return y + W[name + ".bias"] if name + ".bias" in W else y


def rope(x, positions, c):  # chapter 3: rotate-half on the first rotary_dim dims; text: t = h = w
    R = c.rotary_dim
    angles = positions[:, None, None] * (1.0 / c.rope_theta ** (np.arange(0, R, 2) / R))  # [T, 1, R/2]
    a, b, rest = x[..., : R // 2], x[..., R // 2 : R], x[..., R:]
    return np.concatenate([a * np.cos(angles) - b * np.sin(angles), a * np.sin(angles) + b * np.cos(angles), rest], -1)


def attention(W, p, h, c, state, positions):  # chapter 4: gated GQA attention with a KV cache
    T, Hq, Hkv, D, eps = len(h), c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.rms_norm_eps
    qg = linear(W, p + "q_proj", h).reshape(T, Hq, 2 * D)  # per head: [query | gate]
    q = rope(rms_norm(qg[..., :D], W[p + "q_norm.weight"], eps), positions, c)
    k = rope(rms_norm(linear(W, p + "k_proj", h).reshape(T, Hkv, D), W[p + "k_norm.weight"], eps), positions, c)
    state["k"] = np.concatenate([state["k"], k]) if "k" in state else k  # [S, Hkv, D]
    state["v"] = np.concatenate([state["v"], linear(W, p + "v_proj", h).reshape(T, Hkv, D)]) if "v" in state \
        else linear(W, p + "v_proj", h).reshape(T, Hkv, D)
    keys, values = np.repeat(state["k"], Hq // Hkv, 1), np.repeat(state["v"], Hq // Hkv, 1)  # [S, Hq, D]
    S = len(keys)
    scores = np.einsum("thd,shd->hts", q, keys) / np.sqrt(D)
    scores = np.where(np.arange(S)[None, :] <= (S - T + np.arange(T))[:, None], scores, -np.inf)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    out = np.einsum("hts,shd->thd", probs / probs.sum(-1, keepdims=True), values)  # [T, Hq, D]
    return linear(W, p + "o_proj", out.reshape(T, Hq * D) * sigmoid(qg[..., D:].reshape(T, Hq * D)))


def deltanet(W, p, h, c, state):  # chapters 5 and 6: Gated DeltaNet with (conv window, memory) state
    T, K = len(h), c.linear_conv_kernel_dim
    Hk, Hv, dk, dv = c.linear_num_key_heads, c.linear_num_value_heads, c.linear_key_head_dim, c.linear_value_head_dim
    mixed = linear(W, p + "in_proj_qkv", h)  # [T, C]
    window = np.concatenate([state["conv"], mixed])  # [K−1+T, C]
    w_conv = W[p + "conv1d.weight"][:, 0, :]  # [C, K]
    mixed = silu(sum(window[j : j + T] * w_conv[:, j] for j in range(K)))
    state["conv"] = window[len(window) - (K - 1) :]
    unit = lambda x: x / np.sqrt(np.sum(x * x, -1, keepdims=True) + 1e-6)  # noqa: E731
    q = np.repeat(unit(mixed[:, : Hk * dk].reshape(T, Hk, dk)) / np.sqrt(dk), Hv // Hk, 1)  # [T, Hv, dk]
    k = np.repeat(unit(mixed[:, Hk * dk : 2 * Hk * dk].reshape(T, Hk, dk)), Hv // Hk, 1)
    v = mixed[:, 2 * Hk * dk :].reshape(T, Hv, dv)
    beta = sigmoid(linear(W, p + "in_proj_b", h))  # [T, Hv]
    g = -np.exp(W[p + "A_log"]) * np.log1p(np.exp(linear(W, p + "in_proj_a", h) + W[p + "dt_bias"]))
    S, out = state["S"], np.empty_like(v)
    for t in range(T):  # the recurrent form: decay, predict, write the correction, read
        S = S * np.exp(g[t])[:, None, None]
        delta = beta[t][:, None] * (v[t] - np.einsum("hk,hkv->hv", k[t], S))
        S = S + k[t][:, :, None] * delta[:, None, :]
        out[t] = np.einsum("hk,hkv->hv", q[t], S)
    state["S"] = S
    z = linear(W, p + "in_proj_z", h).reshape(T, Hv, dv)
    normed = out / np.sqrt(np.mean(out * out, -1, keepdims=True) + c.rms_norm_eps) * W[p + "norm.weight"] * silu(z)
    return linear(W, p + "out_proj", normed.reshape(T, Hv * dv))


def swiglu(W, p, x):  # chapter 7
    return linear(W, p + "down_proj", silu(linear(W, p + "gate_proj", x)) * linear(W, p + "up_proj", x))


def moe(W, p, x, c):  # chapter 7: router, top-k, renormalised weights, plus the gated shared expert
    logits = linear(W, p + "gate", x)  # [T, E]
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    chosen = np.argsort(-probs, -1, kind="stable")[:, : c.num_experts_per_tok]
    I = c.moe_intermediate_size
    out = sigmoid(linear(W, p + "shared_expert_gate", x)) * swiglu(W, p + "shared_expert.", x)
    for t in range(len(x)):
        weights = probs[t, chosen[t]] / probs[t, chosen[t]].sum()
        for e, weight in zip(chosen[t], weights):
            if p + "experts.gate_up_proj" in W:  # fused layout: [E, 2I, H] and [E, H, I], no ".weight"
                gate_up, down = W[p + "experts.gate_up_proj"][e], W[p + "experts.down_proj"][e]
                out[t] += weight * (silu(x[t] @ gate_up[:I].T) * (x[t] @ gate_up[I:].T)) @ down.T
            else:  # one set of matrices per expert
                out[t] += weight * swiglu(W, p + f"experts.{e}.", x[t : t + 1])[0]
    return out


# %% [markdown]
# ## The stack
#
# The decoder loop is the diagram of chapter 0, line for line. The cache is a plain dict: the
# next position, and per layer either a KV cache or a (conv window, memory) pair.

# %%
def new_cache(c):
    layers = []
    for kind in c.layer_types:
        if kind == "linear_attention":
            layers.append({"conv": np.zeros((c.linear_conv_kernel_dim - 1, c.linear_conv_dim), np.float32),
                           "S": np.zeros((c.linear_num_value_heads, c.linear_key_head_dim, c.linear_value_head_dim),
                                         np.float32)})
        else:
            layers.append({})
    return {"position": 0, "layers": layers}


def forward(W, c, ids, cache):
    """Logits [T, V] for ids, continuing from cache (which it advances); also every layer's output."""
    x = W["embed_tokens.weight"][ids]  # [T, H]
    positions = np.arange(cache["position"], cache["position"] + len(ids))
    hidden = []
    for i, kind in enumerate(c.layer_types):
        p = f"layers.{i}."
        h = rms_norm(x, W[p + "input_layernorm.weight"], c.rms_norm_eps)
        if kind == "linear_attention":
            x = x + deltanet(W, p + "linear_attn.", h, c, cache["layers"][i])
        else:
            x = x + attention(W, p + "self_attn.", h, c, cache["layers"][i], positions)
        h = rms_norm(x, W[p + "post_attention_layernorm.weight"], c.rms_norm_eps)
        x = x + (moe(W, p + "mlp.", h, c) if c.is_moe else swiglu(W, p + "mlp.", h))
        hidden.append(x)
    cache["position"] += len(ids)
    x = rms_norm(x, W["norm.weight"], c.rms_norm_eps)
    head = W["embed_tokens.weight"] if c.tie_word_embeddings else W["lm_head.weight"]
    return x @ head.T, hidden, x


# %% [markdown]
# ## Every fixture, against the reference
#
# For each fixture: the prompt's logits, each layer's output and the final norm, the decode
# state after the prompt, and then eight greedy decode steps, one token at a time through the
# cache — all against what transformers computed, at 1e-4.

# %%
fixtures = sorted(p.name for p in course.FIXTURES.iterdir() if (p / "expected.safetensors").is_file())
for name in fixtures:
    folder, expected = course.fixture(name)
    c = load_config(folder)
    W = read_weights(folder)
    ids = expected["token_ids"]
    cache = new_cache(c)
    logits, hidden, normed = forward(W, c, ids, cache)
    err = np.abs(logits - expected["logits"]).max()
    np.testing.assert_allclose(logits, expected["logits"], rtol=0, atol=1e-4, err_msg=name)
    for i, x in enumerate(hidden):
        np.testing.assert_allclose(x, expected[f"hidden.{i}"], rtol=0, atol=1e-4, err_msg=f"{name} layer {i}")
    np.testing.assert_allclose(normed, expected["norm"], rtol=0, atol=1e-4)
    for i, state in enumerate(cache["layers"]):
        if "S" in state:
            np.testing.assert_allclose(state["S"], expected[f"state.{i}.recurrent"], rtol=0, atol=1e-4)
            np.testing.assert_allclose(state["conv"], expected[f"state.{i}.conv"], rtol=0, atol=1e-4)
        else:
            np.testing.assert_allclose(state["k"].transpose(1, 0, 2), expected[f"state.{i}.keys"], rtol=0, atol=1e-4)
            np.testing.assert_allclose(state["v"].transpose(1, 0, 2), expected[f"state.{i}.values"], rtol=0, atol=1e-4)
    greedy = []
    for _ in range(8):  # decode: one token at a time, through the cache
        greedy.append(int(np.argmax(logits[-1])))
        logits, _, _ = forward(W, c, np.array([greedy[-1]]), cache)
    assert greedy == expected["greedy"][:8].tolist(), (name, greedy)
    kind = f"MoE {c.num_experts}×top-{c.num_experts_per_tok}" if c.is_moe else "dense"
    print(f"{name:<32} {kind:<11} logits max |Δ| {err:.1e}, every layer and state within 1e-4, 8 greedy tokens match")

# %% [markdown]
# That is the whole model. minqwen differs from this sketch only in ways that do not change
# the numbers: the delta rule compiled with Numba (and the chunked form as a tested
# alternative), blocked attention so long prompts never build a `T × T` score matrix, bf16 weights kept in memory
# (on Intel's AMX tiles a prompt multiplies them exactly, each float32 activation taken as the
# sum of three bf16 numbers, split once for all of a layer's projections of one input), SiLU
# fused into the pass before it (the conv) and the one after it (the MLP's product with `up`:
# the same float32 steps), an MoE gather that touches only chosen experts, validation with
# clear error messages, and taps. (One opt-in setting does change them: `bf16_prompts` rounds a
# prompt's activations to bf16 for the CPU's bf16 instructions, a faster prefill that is no
# longer exact; see `minqwen/bf16_dot.py`.) We check that too, on one fixture:

# %%
folder, expected = course.fixture("text_grouped_bf16_bias")
c, W = load_config(folder), read_weights(folder)
ours, _, _ = forward(W, c, expected["token_ids"], new_cache(c))
np.testing.assert_allclose(ours, minqwen.load(folder).forward(expected["token_ids"]), rtol=0, atol=1e-5)

# %% [markdown]
# ## Memory as context grows
#
# While generating, a model keeps two things in memory besides its weights:
#
# * each **attention layer**: keys and values of every token so far,
#   `2 × Hkv × D` numbers per token — it *grows*;
# * each **Gated DeltaNet layer**: the conv window `(K − 1) × C` and the memory
#   `Hv × Dk × Dv` — *constant*.
#
# For Qwen3.5-0.8B (6 attention layers, 18 Gated DeltaNet layers), in bf16, compared with
# the same model if all 24 layers were attention:

# %%
REAL_0_8B = config_from_dict({
    "model_type": "qwen3_5_text", "hidden_size": 1024, "intermediate_size": 3584, "num_hidden_layers": 24,
    "num_attention_heads": 8, "num_key_value_heads": 2, "head_dim": 256, "linear_num_key_heads": 16,
    "linear_num_value_heads": 16, "linear_key_head_dim": 128, "linear_value_head_dim": 128,
    "linear_conv_kernel_dim": 4, "vocab_size": 248320, "tie_word_embeddings": True, "full_attention_interval": 4,
    "max_position_embeddings": 262144,
})


def cache_bytes(c, tokens, bytes_per_number=2):
    """(KV cache, DeltaNet state) in bytes after `tokens` tokens."""
    n_attn, n_delta = c.layer_types.count("full_attention"), c.layer_types.count("linear_attention")
    kv = n_attn * 2 * c.num_key_value_heads * c.head_dim * tokens
    state = n_delta * ((c.linear_conv_kernel_dim - 1) * c.linear_conv_dim
                       + c.linear_num_value_heads * c.linear_key_head_dim * c.linear_value_head_dim)
    return kv * bytes_per_number, state * bytes_per_number


# minqwen's `inspect` command does the same sums; they must agree.
from types import SimpleNamespace

from minqwen.summary import cache_bytes as minqwen_cache_bytes

for tokens in (1, 4096, 262144):
    assert cache_bytes(REAL_0_8B, tokens, 4) == minqwen_cache_bytes(SimpleNamespace(config=REAL_0_8B), tokens, 4)

# And a real cache, measured: the embedded model after 100 tokens (float32).
emb = minqwen.load(course.embedded_model())
emb_cache = emb.new_cache()
emb.forward(np.arange(100) % 200, emb_cache)
kv, state = cache_bytes(emb.config, 100, 4)
assert emb_cache.nbytes == kv + state
print(f"embedded model after 100 tokens: KV cache {kv:,} B + DeltaNet state {state:,} B "
      f"= {emb_cache.nbytes:,} B (measured)")

weights_bytes = 752e6 * 2  # about 752 M parameters in bf16
print(f"\nQwen3.5-0.8B, bf16 (weights ≈ {weights_bytes / 2**30:.1f} GiB):")
print(f"{'context':>9} {'KV cache':>11} {'DeltaNet':>10} {'all-attention model':>21}")
for tokens in (1_024, 32_768, 262_144):
    kv, state = cache_bytes(REAL_0_8B, tokens)
    all_attention = kv * 24 // 6
    print(f"{tokens:>9,} {kv / 2**20:>8.0f} MiB {state / 2**20:>6.1f} MiB {all_attention / 2**20:>17.0f} MiB")

# %%
plt = course.pyplot()
if plt is not None:
    tokens = np.unique(np.logspace(0, np.log10(262144), 200).astype(int))
    kv, state = cache_bytes(REAL_0_8B, tokens)
    fig, ax = plt.subplots(figsize=(7.5, 3.8))
    ax.loglog(tokens, kv * 4, "--", color="#999999", label="if all 24 layers were attention: KV cache")
    ax.loglog(tokens, kv, color="#e8744c", label="Qwen3.5-0.8B: KV cache of its 6 attention layers")
    ax.loglog(tokens, np.full(len(tokens), state), color="#4c9be8",
              label="Qwen3.5-0.8B: state of its 18 DeltaNet layers")
    ax.loglog(tokens, kv + state, color="black", lw=2, label="Qwen3.5-0.8B: total decode state")
    ax.axhline(weights_bytes, color="#55aa55", lw=1, ls=":", label="the weights themselves (bf16)")
    ax.set_xlabel("context length (tokens)"), ax.set_ylabel("bytes (bf16)")
    ax.set_title("Decode memory as context grows", fontsize=10)
    ax.legend(fontsize=7, loc="upper left")
    course.save(fig, "08_memory_vs_context.png")

# %% [markdown]
# Below about 800 tokens the DeltaNet state dominates (a fixed 9.6 MiB in bf16); beyond,
# the attention layers' cache takes over and grows linearly — but from a quarter of the height
# of the all-attention line, because only a quarter of the layers keep one. At the native
# context of 262,144 tokens the hybrid needs 3 GiB of cache where an all-attention model of the
# same shape would need 12.
#
# ## Exercises
#
# Solutions: `walkthrough/solutions/08_whole_stack.py`.
#
# **Exercise 8.1.** At what context length does the KV cache of Qwen3.5-0.8B (bf16) grow
# larger than its weights (752 M parameters in bf16)? And the KV cache of the all-attention
# variant, against the same 752 M parameters?
#
# **Exercise 8.2.** Feed the prompt of `text_tied_fp32` through `forward` in two calls —
# the first 10 tokens, then the other 11 — with one cache, and check that the logits of the
# second call equal the last 11 rows of a single call.

# %%
def exercise_8_1():
    """(tokens for the hybrid, tokens for the all-attention variant) at which the KV cache passes the weights."""
    return None  # your code here


answer = exercise_8_1()
if answer is None:
    print("Exercise 8.1: not attempted yet.")
else:
    hybrid, all_attention = answer
    assert abs(hybrid - 4 * all_attention) <= 4, "the all-attention model has 4 times as many attention layers"

    def kv_at(tokens):
        return cache_bytes(REAL_0_8B, tokens)[0]  # bf16, the 6 attention layers

    assert kv_at(hybrid - 1) <= weights_bytes < kv_at(hybrid), "the first length at which the KV cache is larger"
    assert 4 * kv_at(all_attention - 1) <= weights_bytes < 4 * kv_at(all_attention)
    print(f"Exercise 8.1: hybrid {hybrid:,} tokens, all-attention {all_attention:,} tokens")
