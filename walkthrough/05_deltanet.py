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
# # Chapter 5 · The delta rule, from first principles to Gated DeltaNet
#
# Three layers in four of Qwen3.5 are **Gated DeltaNet** layers. Instead of keeping every
# past key and value (chapter 4's cache), each head keeps one small matrix `S` — a memory of
# fixed size — and updates it token by token. This chapter builds that idea up in steps:
#
# 1. linear attention: attention without the softmax *is* a fixed-size memory;
# 2. the **delta rule**: write only what the memory gets wrong;
# 3. **gating**: let the memory forget, at a rate chosen per token;
# 4. the **recurrent form** (one token at a time) and the **chunked (WY / UT) form** (the
#    same numbers with matrix products, the form GPU kernels use for long prompts), checked
#    equal in float64;
# 5. the whole layer on a fixture, against the reference;
# 6. what a fixed-size memory cannot do — and so why Qwen3.5 keeps one attention layer in
#    four.

# %%
import numpy as np

import course
import minqwen
from minqwen.deltanet import chunked_gated_delta_rule, recurrent_gated_delta_rule, recurrent_gated_delta_rule_numpy

np.set_printoptions(precision=4, suppress=True, linewidth=110)
rng = np.random.default_rng(0)


def unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


# %% [markdown]
# ## 1 · Attention without softmax is a memory
#
# Softmax attention outputs `o_t = Σ_j softmax_j(q_t · k_j) v_j`. Drop the softmax and keep
# the raw scores:
#
# $$o_t = \sum_{j \le t} (q_t \cdot k_j)\, v_j = \Big(\sum_{j \le t} k_j v_j^\top\Big)^{\!\top} q_t = S_t^\top q_t, \qquad S_t = S_{t-1} + k_t v_t^\top$$
#
# The sum over the past collapses into one `Dk × Dv` matrix `S`, updated by adding one outer
# product per token. Memory and time per token no longer depend on how long the text is.
# (Convention, as in the reference: `S` is `[Dk, Dv]`, read as `Sᵀq`.)

# %%
T, Dk, Dv = 12, 16, 8
q, k, v = rng.normal(size=(T, Dk)), unit(rng.normal(size=(T, Dk))), rng.normal(size=(T, Dv))

quadratic = np.tril(q @ k.T) @ v  # every score q_t · k_j for j ≤ t, then the weighted sum: O(T²)
S, recurrent = np.zeros((Dk, Dv)), []
for t in range(T):
    S = S + np.outer(k[t], v[t])  # write
    recurrent.append(S.T @ q[t])  # read
np.testing.assert_allclose(np.array(recurrent), quadratic, atol=1e-12)

# %% [markdown]
# Read `S` as an associative memory: writing the pair `(k, v)` adds `k vᵀ`; reading with a
# query `q = k` returns `Sᵀk = Σ_j (k_j · k) v_j`. With orthonormal keys that is exactly the
# stored `v`. But there are only `Dk` orthonormal directions, and two problems appear at once:
#
# * writing the same key twice **adds** the values instead of replacing the old one;
# * with more than `Dk` keys, every read picks up a bit of every other value.

# %%
S = np.zeros((Dk, Dv))
key, old, new = unit(rng.normal(size=Dk)), rng.normal(size=Dv), rng.normal(size=Dv)
S += np.outer(key, old)
S += np.outer(key, new)  # "update" the value stored under `key`
print("additive memory returns old + new:", np.allclose(S.T @ key, old + new))

# %% [markdown]
# ## 2 · The delta rule: write the error
#
# Before writing, ask the memory what it currently returns for `k` — call it `v̂ = Sᵀk` — and
# write only the difference, scaled by a strength `β ∈ (0, 1)`:
#
# $$S \leftarrow S + \beta\, k\, (v - S^\top k)^\top$$
#
# With `β = 1` and a unit key, the read after the write returns exactly `v`: the old value is
# *replaced*. This is the classic delta rule (Widrow–Hoff); it is also one step of gradient
# descent, with learning rate `β`, on the loss `½‖Sᵀk − v‖²` (exercise 5.2).

# %%
S = np.zeros((Dk, Dv))
for value in (old, new):
    S += np.outer(key, 1.0 * (value - S.T @ key))  # β = 1
np.testing.assert_allclose(S.T @ key, new, atol=1e-12)
print("delta rule returns the new value only")

# %% [markdown]
# ## 3 · Gating: forgetting on purpose
#
# A memory that never forgets fills up. *Gated* DeltaNet multiplies the whole memory by a
# decay `exp(g)` with `g ≤ 0` before each write. Both `g` and `β` are computed from the
# current token, per value head, so the layer decides token by token how much to forget
# and how hard to write:
#
# * `β = sigmoid(b)`, with `b = x · in_proj_bᵀ`;
# * `g = −exp(A_log) · softplus(a + dt_bias)`, with `a = x · in_proj_aᵀ`. This is Mamba-2's
#   parametrisation: a per-head rate `exp(A_log) > 0` times a per-token step
#   `softplus(…) > 0`, so `g` is always negative and `exp(g)` is in (0, 1).
#
# One token of Gated DeltaNet, for every value head at once, is then four lines:
#
# ```
# S ← exp(g) · S               decay
# v̂ = Sᵀ k                     what the memory predicts for this key
# S ← S + k ⊗ β (v − v̂)        write the correction
# o = Sᵀ q                     read the output
# ```
#
# Queries and keys are L2-normalised per head first (a unit key makes `β` a true fraction of
# the error) and the query is scaled by `1/√Dk`. That is the **recurrent form**:

# %%
def my_recurrent(q, k, v, g, beta, S0):
    """q, k [T, Hv, Dk]; v [T, Hv, Dv]; g, beta [T, Hv]; S0 [Hv, Dk, Dv] → (o [T, Hv, Dv], S)."""
    S, out = S0.copy(), np.empty_like(v)
    for t in range(len(q)):
        S = S * np.exp(g[t])[:, None, None]  # decay
        predicted = np.einsum("hk,hkv->hv", k[t], S)  # v̂ = Sᵀk
        S = S + np.einsum("hk,hv->hkv", k[t], beta[t][:, None] * (v[t] - predicted))  # write
        out[t] = np.einsum("hk,hkv->hv", q[t], S)  # o = Sᵀq
    return out, S


def random_inputs(T, H=3, Dk=16, Dv=8, dtype=np.float64, seed=1):
    r = np.random.default_rng(seed)
    q = unit(r.normal(size=(T, H, Dk))) / np.sqrt(Dk)
    k = unit(r.normal(size=(T, H, Dk)))
    v = r.normal(size=(T, H, Dv))
    g = -np.exp(r.normal(size=H)) * np.log1p(np.exp(r.normal(size=(T, H))))  # −exp(A_log)·softplus(·)
    beta = 1 / (1 + np.exp(-r.normal(size=(T, H))))
    S0 = r.normal(size=(H, Dk, Dv)) * 0.1
    return [a.astype(dtype) for a in (q, k, v, g, beta, S0)]


inputs = random_inputs(50)
ours = my_recurrent(*inputs)
for name, fn in (("NumPy twin", recurrent_gated_delta_rule_numpy), ("Numba kernel", recurrent_gated_delta_rule)):
    theirs = fn(*inputs)
    np.testing.assert_allclose(ours[0], theirs[0], atol=1e-12)
    np.testing.assert_allclose(ours[1], theirs[1], atol=1e-12)
    print(f"my_recurrent == minqwen's {name}")

# %% [markdown]
# ### How the compiled kernel saves a pass over the memory
#
# Written as above, a token touches `S` twice: decay-and-read `v̂`, then write-and-read `o`.
# On a CPU the memory (64 KB per head at the 0.8B shape) is what costs, so the kernel reads
# both of a token's values from the memory *before* its update:
#
# $$\hat v_t = e^{g_t}\,(S_{t-1}^\top k_t), \qquad
#   o_t = S_t^\top q_t = e^{g_t}\,(S_{t-1}^\top q_t) + (k_t \cdot q_t)\,\delta_t$$
#
# and the single pass that writes `S_t` also sums `S_tᵀ k_{t+1}` and `S_tᵀ q_{t+1}` for the next
# token. The same numbers, checked here for one step:

# %%
q1, k1, v1, g1, beta1, S_prev = random_inputs(1)  # one token: q1 [1, Hv, Dk], …; S_prev [Hv, Dk, Dv]
q0, k0, v0, g0, beta0 = q1[0], k1[0], v1[0], g1[0], beta1[0]  # that token, without the T axis
reads_k = np.einsum("hk,hkv->hv", k0, S_prev)  # S_{t−1}ᵀ k   [Hv, Dv]
reads_q = np.einsum("hk,hkv->hv", q0, S_prev)  # S_{t−1}ᵀ q   [Hv, Dv]
delta = beta0[:, None] * (v0 - np.exp(g0)[:, None] * reads_k)  # β (v − v̂)   [Hv, Dv]
o_from_old_memory = np.exp(g0)[:, None] * reads_q + np.sum(k0 * q0, axis=-1)[:, None] * delta
o_definition, _ = my_recurrent(q1, k1, v1, g1, beta1, S_prev)
np.testing.assert_allclose(o_from_old_memory, o_definition[0], atol=1e-12)
print("one pass per token: the output read from the memory before its update matches")

# %% [markdown]
# ## 4 · The chunked form: the same numbers with matrix products
#
# The recurrent form does `T` small sequential steps. That is perfect for decoding one
# token, but on a GPU a 10,000-token prompt would leave the hardware idle through 10,000
# tiny dependent steps. The chunked form processes `C` tokens (64 in the reference) at once,
# with matrix products — what accelerators are built for. (On a CPU the balance differs:
# minqwen measured its compiled recurrence faster at every length, so it runs the recurrence
# by default and keeps the chunked form as a tested, selectable twin.) Derivation, for one
# head and one chunk starting with memory `S₀`:
#
# Let `Gₜ = g₁ + … + gₜ` (cumulative log-decay inside the chunk) and `γₜ = exp(Gₜ)`. Call
# `δₜ = β_t (v_t − v̂_t)` the correction token `t` writes. Unrolling the recurrence,
#
# $$S_t = \gamma_t S_0 + \sum_{j \le t} \tfrac{\gamma_t}{\gamma_j}\, k_j \delta_j^\top$$
#
# and the prediction `v̂ₜ` is read from the memory *just before* token t's write:
#
# $$\hat v_t = \gamma_t S_0^\top k_t + \sum_{j < t} \tfrac{\gamma_t}{\gamma_j} (k_t \cdot k_j)\, \delta_j$$
#
# So the corrections of a chunk solve one **lower-triangular linear system**:
#
# $$(I + A)\,\delta = \beta v - \beta\gamma\, K S_0, \qquad A_{tj} = \beta_t (k_t \cdot k_j) \tfrac{\gamma_t}{\gamma_j} \ \ (j < t)$$
#
# Its solution splits into a part independent of `S₀` and a part linear in it:
# `δ = u − w S₀`, with `u = (I + A)⁻¹ βv` and `w = (I + A)⁻¹ βγK`. Writing the product of
# many "rank-one updates" this way is the **WY representation**; computing `(I + A)⁻¹` for
# a unit lower-triangular matrix is the **UT transform** (Yang et al., NeurIPS 2024).
# Everything except the small `C × C` solve is a matrix product, and only `S` is carried
# from one chunk to the next:
#
# $$o_t = \gamma_t S_0^\top q_t + \sum_{j \le t} \tfrac{\gamma_t}{\gamma_j} (q_t \cdot k_j)\, \delta_j, \qquad S_C = \gamma_C S_0 + \sum_j \tfrac{\gamma_C}{\gamma_j}\, k_j \delta_j^\top$$

# %%
def my_chunked(q, k, v, g, beta, S0, C=64):
    """The same contract as my_recurrent, chunk by chunk."""
    T, H, _ = q.shape
    S, out = S0.copy(), np.empty_like(v)
    for start in range(0, T, C):
        rows = slice(start, min(start + C, T))
        n = rows.stop - rows.start
        for h in range(H):  # one head at a time, for clarity
            qc, kc, vc, bc = q[rows, h], k[rows, h], v[rows, h], beta[rows, h]
            G = np.cumsum(g[rows, h])  # [n]: log-decay from the chunk start through token t
            causal = np.tril(np.ones((n, n), bool))
            decay = np.exp(np.where(causal, G[:, None] - G[None, :], -np.inf))  # γ_t/γ_j for j ≤ t, else 0
            A = np.tril(bc[:, None] * (kc @ kc.T) * decay, -1)  # strictly lower-triangular
            u = np.linalg.solve(np.eye(n) + A, bc[:, None] * vc)  # [n, Dv]
            w = np.linalg.solve(np.eye(n) + A, (bc * np.exp(G))[:, None] * kc)  # [n, Dk]
            delta = u - w @ S[h]  # the corrections, now that S₀ is known
            out[rows, h] = np.exp(G)[:, None] * (qc @ S[h]) + ((qc @ kc.T) * decay) @ delta
            S[h] = np.exp(G[-1]) * S[h] + (kc * np.exp(G[-1] - G)[:, None]).T @ delta
    return out, S


# %% [markdown]
# The check is in **float64**, where rounding is ~1e-16: if the algebra were wrong anywhere
# the two forms would disagree by far more than 1e-10. Lengths around the chunk size catch
# off-by-one errors in the padding of the last chunk.

# %%
for T in (1, 63, 64, 65, 150):
    inputs = random_inputs(T)
    rec, chk, theirs = my_recurrent(*inputs), my_chunked(*inputs), chunked_gated_delta_rule(*inputs)
    err = max(np.abs(rec[0] - chk[0]).max(), np.abs(rec[1] - chk[1]).max())
    print(f"T = {T:>3}: max |chunked − recurrent| = {err:.1e} (float64)")
    assert err < 1e-10
    np.testing.assert_allclose(theirs[0], rec[0], atol=1e-10)
    np.testing.assert_allclose(theirs[1], rec[1], atol=1e-10)

# In float32 they agree to rounding, relative to the size of the output.
inputs32 = random_inputs(150, dtype=np.float32)
rec32, chk32 = my_recurrent(*inputs32), chunked_gated_delta_rule(*inputs32)
assert np.abs(rec32[0] - chk32[0]).max() < 1e-5 * np.abs(rec32[0]).max()

# A whole minqwen model can run either form (`model.deltanet_form`); the logits agree.
fixture_model = minqwen.load(course.FIXTURES / "text_tied_fp32")
prompt = np.arange(100) % 160  # long enough for two chunks
recurrent_logits = fixture_model.forward(prompt)
fixture_model.deltanet_form = "chunked"
np.testing.assert_allclose(fixture_model.forward(prompt), recurrent_logits, rtol=0, atol=1e-4)

# %% [markdown]
# **A numerical trap.** `decay` needs `exp(G_t − G_j)` only for `j ≤ t`, where the exponent
# is ≤ 0. Above the diagonal the exponent is *positive* and, with strong decay over a long
# chunk, huge: `exp` overflows to `inf`, and `inf × 0` (the mask applied afterwards) is NaN.
# So the mask must be applied in log space, *before* `exp` — as `my_chunked` does with
# `np.where(causal, …, −inf)`.

# %%
G = np.cumsum(np.full(64, -3.0, np.float32))  # strong decay: G falls to −192 over the chunk
causal = np.tril(np.ones((64, 64), bool))
with np.errstate(over="ignore", invalid="ignore"):
    mask_after = np.exp(G[:, None] - G[None, :]) * causal  # exp(+189) = inf, then inf × 0 = NaN
mask_before = np.exp(np.where(causal, G[:, None] - G[None, :], -np.inf))
print("mask after exp: NaNs =", int(np.isnan(mask_after).sum()), "  mask before exp: NaNs =",
      int(np.isnan(mask_before).sum()))
assert np.isnan(mask_after).any() and np.isfinite(mask_before).all()

# And my_chunked itself, on a chunk whose decay is −12 a token: above the diagonal the exponent
# reaches +756, past float64's largest exp (about 709). Masked first, it still agrees.
q_, k_, v_, g_, beta_, S0_ = random_inputs(64)
g_ = np.full_like(g_, -12.0)
np.testing.assert_allclose(my_chunked(q_, k_, v_, g_, beta_, S0_)[0], my_recurrent(q_, k_, v_, g_, beta_, S0_)[0],
                           rtol=0, atol=1e-10)

# %% [markdown]
# ## 5 · The whole Gated DeltaNet layer, against the reference
#
# Around the recurrence sits a layer of projections:
#
# ```
# x ─ in_proj_qkv ─ short causal conv (chapter 6) ─ SiLU ─ split into q, k, v
#   ─ in_proj_z → z        (an output gate)
#   ─ in_proj_b → β = sigmoid(b)
#   ─ in_proj_a → g = −exp(A_log) · softplus(a + dt_bias)
# q, k: L2-normalised per head; q scaled by 1/√Dk
# value heads may outnumber key heads: each key head serves a group of value heads
# o ─ RMSNorm(o) · w · silu(z)    (a plain-scale norm, not 1 + w: chapter 2) ─ out_proj
# ```
#
# We run it on layer 0 of `text_grouped_bf16_bias`, which has 2 key heads and 4 value heads:
# key head 0 serves value heads 0 and 1, key head 1 serves 2 and 3 (`np.repeat`, as the
# reference's `repeat_interleave` does; `np.tile` would pair them wrongly, and the checks
# below would fail). The input of layer 0 is just the embeddings.

# %%
folder, expected = course.fixture("text_grouped_bf16_bias")
model = minqwen.load(folder)
c = model.config
lw = model.layers[0].linear_attn
Hk, Hv, dk, dv, K = (c.linear_num_key_heads, c.linear_num_value_heads, c.linear_key_head_dim,
                     c.linear_value_head_dim, c.linear_conv_kernel_dim)
assert (Hk, Hv) == (2, 4)  # the grouping this section is about
ids = expected["token_ids"]
T = len(ids)
x = model.embed_tokens[ids]  # [T, H]


def rms_norm(x, w, eps=c.rms_norm_eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * (1 + w)


def silu(x):
    return x / (1 + np.exp(-x))


h = rms_norm(x, model.layers[0].input_layernorm)
mixed = h @ lw.in_proj_qkv.T  # [T, 2·Hk·dk + Hv·dv]
padded = np.concatenate([np.zeros((K - 1, mixed.shape[1]), np.float32), mixed])  # nothing before the prompt
conv = sum(padded[j : j + T] * lw.conv1d[:, j] for j in range(K))  # causal, depthwise: chapter 6
mixed = silu(conv)
q = unit(mixed[:, : Hk * dk].reshape(T, Hk, dk)) / np.sqrt(dk)
k = unit(mixed[:, Hk * dk : 2 * Hk * dk].reshape(T, Hk, dk))
v = mixed[:, 2 * Hk * dk :].reshape(T, Hv, dv)
beta = 1 / (1 + np.exp(-(h @ lw.in_proj_b.T)))  # [T, Hv]
a = h @ lw.in_proj_a.T + lw.dt_bias
g = -np.exp(lw.A_log) * np.log1p(np.exp(a))  # [T, Hv], ≤ 0
q, k = np.repeat(q, Hv // Hk, axis=1), np.repeat(k, Hv // Hk, axis=1)  # key head i serves value heads of group i

o, S = my_recurrent(q, k, v, g, beta, np.zeros((Hv, dk, dv), np.float32))
np.testing.assert_allclose(S, expected["state.0.recurrent"], rtol=0, atol=1e-4)  # the memory after the prompt

z = (h @ lw.in_proj_z.T).reshape(T, Hv, dv)
normed = o / np.sqrt(np.mean(o * o, axis=-1, keepdims=True) + c.rms_norm_eps) * lw.norm * silu(z)
mixer = normed.reshape(T, Hv * dv) @ lw.out_proj.T  # [T, H]

mlp = model.layers[0].mlp  # and the rest of the layer: residual, norm, SwiGLU (chapter 7)
x_mid = x + mixer
hh = rms_norm(x_mid, model.layers[0].post_attention_layernorm)
x_out = x_mid + (silu(hh @ mlp.gate_proj.T) * (hh @ mlp.up_proj.T)) @ mlp.down_proj.T
np.testing.assert_allclose(x_out, expected["hidden.0"], rtol=0, atol=1e-4)
print("Gated DeltaNet layer 0 rebuilt: max |Δ| =", np.abs(x_out - expected["hidden.0"]).max(),
      " memory per value head:", S.shape[1:], "whatever the length of the text")

# %% [markdown]
# ## Picture: the decay gates over a sentence
#
# What do trained gates do? We run a sentence through the embedded model and read `g` from
# each Gated DeltaNet layer with the `tap` hook. `exp(g)` is the fraction of the memory that
# survives each token: near 1, the head keeps everything; near 0, it wipes its memory at that
# token. `β` says how hard each token writes.

# %%
from minqwen.tokenizer import Tokenizer

emb_folder = course.embedded_model()
emb, tok = minqwen.load(emb_folder), Tokenizer(emb_folder)
sentence = "import os\n\ndef read_lines(path):\n    with open(path) as f:\n        return f.readlines()\n"
sent_ids = tok.encode(sentence)
taps = {}
emb.forward(sent_ids, tap=lambda n, a: taps.__setitem__(n, a.copy()))
delta_layers = [i for i, kind in enumerate(emb.config.layer_types) if kind == "linear_attention"]
decays = np.concatenate([np.exp(taps[f"layers.{i}.linear_attn.g"]).T for i in delta_layers])  # [layers·Hv, T]
betas = np.concatenate([taps[f"layers.{i}.linear_attn.beta"].T for i in delta_layers])
assert ((decays > 0) & (decays < 1)).all() and ((betas > 0) & (betas < 1)).all()
print("mean exp(g) per DeltaNet layer:", [round(float(np.exp(taps[f'layers.{i}.linear_attn.g']).mean()), 3)
                                          for i in delta_layers])

plt = course.pyplot()
if plt is not None:
    labels = [course.token_label(tok.decode([i])) for i in sent_ids]
    hv = emb.config.linear_num_value_heads
    fig, axes = plt.subplots(2, 1, figsize=(min(0.32 * len(sent_ids) + 2, 16), 7), sharex=True)
    for ax, values, title in ((axes[0], decays, "decay exp(g): how much memory survives the token"),
                              (axes[1], betas, "write strength β")):
        im = ax.imshow(values, aspect="auto", cmap="magma", vmin=0, vmax=1, interpolation="nearest")
        ax.set_yticks([hv * n + hv / 2 - 0.5 for n in range(len(delta_layers))], [f"layer {i}" for i in delta_layers])
        for n in range(1, len(delta_layers)):
            ax.axhline(hv * n - 0.5, color="white", lw=1)
        ax.set_title(title + f" (one row per value head, {hv} per layer)", fontsize=9)
        fig.colorbar(im, ax=ax, fraction=0.02)
    axes[1].set_xticks(range(len(sent_ids)), labels, rotation=90, fontsize=7)
    fig.tight_layout()
    course.save(fig, "05_decay_gates.png")

# %% [markdown]
# What the picture shows, in this small and briefly trained model: the decay is mostly a
# property of the *head*, not of the token. About two thirds of the gates are below 0.05 —
# those heads wipe their memory at almost every token and act as a window of a token or
# two — while two heads in each of layers 0 and 2 (the bright rows) keep 40–70% of their
# memory from one token to the next, whatever the token; layer 1 has no such head (its most
# retentive keeps about 12%). The write strength `β` is the other way round:
# every head writes with about the same average strength, and the token decides how hard.
# The cell below measures both statements on the sentence.

# %%
print(f"gates below 0.05: {(decays < 0.05).mean():.0%};  spread of exp(g) between heads "
      f"{decays.mean(1).std():.2f}, between tokens within a head {decays.std(1).mean():.2f}")
print(f"spread of β between heads {betas.mean(1).std():.2f}, between tokens within a head {betas.std(1).mean():.2f}")
assert (decays < 0.05).mean() > 0.5 and decays.mean(1).std() > decays.std(1).mean()
assert 0.4 <= decays.mean(1).max() <= 0.7  # the brightest rows keep 40–70% a token
per_head = decays.mean(1).reshape(len(delta_layers), -1)  # [DeltaNet layers, value heads]
assert [int((row >= 0.4).sum()) for row in per_head] == [2, 0, 2]  # two bright heads in layers 0 and 2, none in 1
assert betas.std(1).mean() > betas.mean(1).std()

# %% [markdown]
# ## 6 · Why hybrids
#
# A Gated DeltaNet head has `Dk × Dv` numbers of memory, no matter how much text it has read.
# Once it has seen more than about `Dk` different keys it *must* blend or overwrite — the
# delta rule overwrites the oldest associations first, which is the right thing to lose, but
# they are lost. Attention keeps every key and value and can look any of them up exactly,
# at the cost of a cache that grows with the text.
#
# An experiment with 128 random key → value pairs written into a memory with `Dk = 32`, then
# each pair looked up again by its key, grouped by how long ago it was written:

# %%
D_mem, n_pairs, trials = 32, 128, 8
errors = np.zeros((3, n_pairs))
for trial in range(trials):
    r = np.random.default_rng(100 + trial)
    keys, values = unit(r.normal(size=(n_pairs, D_mem))), r.normal(size=(n_pairs, D_mem)) / np.sqrt(D_mem)
    additive, delta = np.zeros((D_mem, D_mem)), np.zeros((D_mem, D_mem))
    for key_, value_ in zip(keys, values):
        additive += np.outer(key_, value_)
        delta += np.outer(key_, value_ - delta.T @ key_)  # β = 1, no decay
    scores = keys @ keys.T * 16  # softmax attention over all stored keys (sharp)
    probs = np.exp(scores - scores.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    for row, recalled in enumerate((keys @ additive, keys @ delta, probs @ values)):
        errors[row] += np.linalg.norm(recalled - values, axis=1) / np.linalg.norm(values, axis=1) / trials
age = n_pairs - 1 - np.arange(n_pairs)  # 0: written last
print("relative recall error, newest pair → oldest pair")
for row, name in enumerate(("linear attention (additive)", "delta rule", "softmax attention")):
    print(f"  {name:<28} newest {errors[row, -1]:.2f}   8 writes ago {errors[row, -9]:.2f}   "
          f"oldest {errors[row, 0]:.2f}")
assert errors[1, -1] < 1e-9 < errors[1, 0]  # the delta rule: exact for the newest, lossy for the oldest
assert errors[2].max() < 0.05  # attention: every pair, however old

if plt is not None:
    fig, ax = plt.subplots(figsize=(7, 3.2))
    for row, name in enumerate(("linear attention (additive)", "delta rule (fixed 32×32 memory)",
                                "softmax attention (cache of all 128 pairs)")):
        ax.plot(age, errors[row], label=name)
    ax.set_xscale("symlog", linthresh=1), ax.set_ylim(0, 2.2)
    ax.set_xlabel("how many writes ago the pair was stored"), ax.set_ylabel("relative recall error")
    ax.set_title("128 key→value pairs, keys of dimension 32", fontsize=9)
    ax.legend(fontsize=8)
    course.save(fig, "05_recall_by_age.png")

# %% [markdown]
# That is the trade Qwen3.5 makes. Three Gated DeltaNet layers in four give cheap, constant-
# size memory with a strong sense of recent context — and their cost per token does not grow
# with the text. One full attention layer in four keeps an exact record of everything, for the
# cases where the model needs to copy or look up something far back. The result has a KV
# cache a quarter of the size of an all-attention model (chapter 8).
#
# ## Exercises
#
# Solutions: `walkthrough/solutions/05_deltanet.py`.
#
# **Exercise 5.1.** `my_chunked` calls `np.linalg.solve` twice per chunk. Fill in
# `exercise_5_1(A)` below so that it computes `(I + A)⁻¹` for a strictly lower-triangular `A` by
# forward substitution — row `i` of the inverse is `e_i − Σ_{j<i} A[i, j] · row_j` — and
# check it against `np.linalg.inv`. (minqwen's `deltanet.unit_lower_inverse` does this for
# every head and chunk at once.)
#
# **Exercise 5.2.** Show numerically that one delta-rule write
# `S + β k (v − Sᵀk)ᵀ` equals one gradient-descent step `S − β ∇_S L` on
# `L(S) = ½ ‖Sᵀk − v‖²`. Write the gradient by hand, then check it with finite differences.

# %%
def exercise_5_1(A):
    """(I + A)⁻¹ for a strictly lower-triangular square A, by forward substitution."""
    return None  # your code here


A_test = np.tril(rng.normal(size=(6, 6)), -1)
answer = exercise_5_1(A_test)
if answer is None:
    print("Exercise 5.1: not attempted yet.")
else:
    np.testing.assert_allclose(answer, np.linalg.inv(np.eye(6) + A_test), atol=1e-10)
    print("Exercise 5.1: correct.")
