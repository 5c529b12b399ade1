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
# # Chapter 2 · Embeddings and the zero-centred RMSNorm
#
# Two small pieces that sit at both ends of the model and between every pair of layers:
#
# * the **embedding**, which turns ids into vectors — and, in most Qwen3.5 models, the same
#   matrix read backwards turns the last vectors into logits (*tied* embeddings);
# * **RMSNorm**, which rescales a vector to a standard size before each block reads it.
#   Qwen3.5's decoder norms are *zero-centred*: they multiply by `1 + w`, not by `w`. Why,
#   and why that `1 + w` must be computed in float32, is the heart of this chapter — it is
#   a mistake real ports have shipped.

# %%
import copy

import ml_dtypes
import numpy as np

import course
import minqwen
from minqwen.checkpoint import Checkpoint
from minqwen.norms import gated_rms_norm, rms_norm

BF16 = np.dtype(ml_dtypes.bfloat16)
folder, expected = course.fixture("text_tied_fp32")
ckpt = Checkpoint(folder)
config = minqwen.config.load_config(folder)
ids = expected["token_ids"]


def weight(name):
    """A tensor of this fixture, widened to float32 (the fixture stores the text model under 'model.')."""
    return np.asarray(ckpt.raw("model." + name), dtype=np.float32)


# %% [markdown]
# ## The embedding is a table lookup
#
# `embed_tokens` is a matrix with one row per vocabulary entry. Embedding a token is reading
# its row — no arithmetic at all. (It is often *described* as multiplying a one-hot vector
# by the matrix; that product just selects the row.)

# %%
E = weight("embed_tokens.weight")  # [V, H]
x = E[ids]  # [T, H]
print("embed_tokens", E.shape, "→ x", x.shape)

model = minqwen.load(folder)
# `tap` is a hook that forward() calls with every named intermediate array (chapter 10 builds
# golden files from them); the embedding is the first.
taps = {}
model.forward(ids, tap=lambda name, value: taps.__setitem__(name, value.copy()))
np.testing.assert_array_equal(x, taps["embed"])  # exactly minqwen's first tap

one_hot = np.eye(config.vocab_size, dtype=np.float32)[ids]  # [T, V]
np.testing.assert_allclose(one_hot @ E, x)  # the "one-hot times matrix" story says the same

# %% [markdown]
# ## Tied embeddings: the same matrix at the other end
#
# At the top of the stack, the LM head scores each vocabulary entry by a dot product with
# the final hidden vector: `logits = h · Wᵀ`. With `tie_word_embeddings`, `W` *is* the
# embedding matrix, so a token's score is how well the final state points in the direction of
# that token's own embedding. On small models this saves a lot: for Qwen3.5-0.8B the
# matrix is a third of all parameters (chapter 0).
#
# The fixture stores the reference's final normalised state (`norm`), so we can produce the
# reference logits with nothing but a matrix product:

# %%
logits = expected["norm"] @ E.T  # [T, H] · [H, V] → [T, V]
np.testing.assert_allclose(logits, expected["logits"], rtol=0, atol=1e-4)
assert model.lm_head is model.embed_tokens  # minqwen holds one array, not a copy
print("tied LM head reproduces the reference logits; max |Δ| =", np.abs(logits - expected["logits"]).max())

# %% [markdown]
# ## RMSNorm
#
# Each block reads a *normalised* copy of the residual stream: the vector divided by its
# root-mean-square, so that its typical element has size 1 whatever the scale of the stream,
# then multiplied elementwise by a learned scale:
#
# $$\mathrm{RMSNorm}(x) = \frac{x}{\sqrt{\tfrac1H \sum_i x_i^2 + \varepsilon}} \odot \text{scale}$$
#
# Unlike LayerNorm it does not subtract the mean, which saves a reduction and works as well.
# `ε` (here 1e-6) only matters for vectors that are nearly zero.
#
# **Zero-centred.** Qwen3.5 stores the scale as an *offset from one*: the checkpoint holds
# `w`, the norm multiplies by `1 + w`. A fresh norm stores zeros and scales by exactly 1. The
# practical reason is training: weight decay pulls every parameter towards 0, and for a
# stored `w` "towards 0" means "towards a scale of 1" — the harmless default — instead of
# "towards a scale of 0", which would silence the layer.

# %%
def my_rms_norm(x, w, eps=config.rms_norm_eps):
    x = x.astype(np.float32)
    rms = np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + np.float32(eps))  # [..., 1]
    return x / rms * (np.float32(1) + w)  # the 1 + w is formed here, in float32


# The final norm: the last layer's output (hidden.3) in, the reference's `norm` out.
w_final = weight("norm.weight")
ours = my_rms_norm(expected[f"hidden.{config.num_hidden_layers - 1}"], w_final)
np.testing.assert_allclose(ours, expected["norm"], rtol=0, atol=1e-5)
np.testing.assert_allclose(ours, rms_norm(expected["hidden.3"], w_final, config.rms_norm_eps), rtol=0, atol=1e-6)
print("stored w of the final norm (first 6):", w_final[:6])

# %% [markdown]
# The same norm appears in many places: `input_layernorm` and `post_attention_layernorm` of
# every layer, the final `norm`, and — per attention head — `q_norm` and `k_norm` (chapter 4).
# The Gated DeltaNet layer has one more norm with a *different* convention: its scale is the
# plain stored `w`, and the result is gated by `silu(z)` (chapter 5). Same file in minqwen,
# `norms.py`, so the two sit side by side:

# %%
rng = np.random.default_rng(0)
core, z = rng.normal(size=(2, 5, 8)).astype(np.float32)  # [T, Dv] each
w = rng.normal(size=8).astype(np.float32)
silu = z / (1 + np.exp(-z))
plain_scale = core / np.sqrt(np.mean(core**2, axis=-1, keepdims=True) + 1e-6) * w * silu  # w, not 1 + w
np.testing.assert_allclose(plain_scale, gated_rms_norm(core, z, w, 1e-6), rtol=1e-5, atol=1e-6)

# %% [markdown]
# ## Why `1 + w` must be formed in float32
#
# Released checkpoints store weights in **bfloat16**: a float32 with the bottom 16 bits cut
# off, so 8 significant bits. Near 1.0, consecutive bf16 numbers are 2⁻⁷ ≈ 0.0078 apart.
#
# * Stored as `w`, a small value like 0.0123 keeps its 8 significant bits (bf16 spacing near
#   0.01 is tiny). Adding 1 *in float32* then gives 1.0123… accurately.
# * Folded to `1 + w` and stored *in bf16* — a shortcut some ports take at load time, to
#   save one addition — it becomes 1.0156: the deviation from 1 is off by a quarter.

# %%
for w_value in (0.0123, -0.0031, 0.2718):
    w_bf16 = np.float32(np.array(w_value, BF16))  # what the checkpoint stores
    right = np.float32(1) + w_bf16  # minqwen: add in float32 at run time
    folded = np.float32(np.array(1 + w_bf16, BF16))  # the shortcut: fold, then round to bf16
    print(f"w = {w_value:+.4f}: 1 + w in float32 = {right:.6f}, folded into bf16 = {folded:.6f} "
          f"(deviation from 1 off by {abs((folded - 1) - (right - 1)) / abs(right - 1):.0%})")

# %% [markdown]
# Does that matter after a whole model? Take a fixture stored in bf16, fold `1 + w` into
# bf16 in every zero-centred norm of a copy of the model, and compare both with the
# reference:

# %%
bf16_folder, bf16_expected = course.fixture("text_grouped_bf16_bias")
right_model = minqwen.load(bf16_folder)
folded_model = copy.deepcopy(right_model)


def fold(w):
    """The shortcut, expressed as a stored offset: bf16(1 + w) − 1."""
    return (np.float32(1) + w).astype(BF16).astype(np.float32) - np.float32(1)


folded_model.norm = fold(folded_model.norm)
for layer in folded_model.layers:
    layer.input_layernorm = fold(layer.input_layernorm)
    layer.post_attention_layernorm = fold(layer.post_attention_layernorm)
    if layer.self_attn is not None:
        layer.self_attn.q_norm, layer.self_attn.k_norm = fold(layer.self_attn.q_norm), fold(layer.self_attn.k_norm)

right_err = np.abs(right_model.forward(bf16_expected["token_ids"]) - bf16_expected["logits"]).max()
folded_err = np.abs(folded_model.forward(bf16_expected["token_ids"]) - bf16_expected["logits"]).max()
print(f"max |logits − reference|: 1 + w in float32 → {right_err:.1e};  folded into bf16 → {folded_err:.2f}")
assert right_err < 1e-4 and folded_err > 1e-2

# %% [markdown]
# A drift of about 0.1 in logits on a 4-layer toy. On real bf16 checkpoints (24+ layers,
# learned norms), a port that takes the same shortcut (mlx-lm folds `1 + w` into its bf16
# norm weights) has been measured 0.25–0.56 away from transformers' logits. That is enough to
# change which token wins when two are close.
#
# A picture of the rounding, over the range where trained norm weights live:

# %%
plt = course.pyplot()
if plt is not None:
    ws = np.linspace(-0.1, 0.1, 2001, dtype=np.float32).astype(BF16).astype(np.float32)  # stored values
    exact = np.float64(1) + ws
    fig, ax = plt.subplots(figsize=(8, 3.2))
    ax.plot(ws, (np.float32(1) + ws) - exact, label="w stored in bf16, 1 + w added in float32", lw=2)
    ax.plot(ws, fold(ws) + 1 - exact, label="1 + w folded and stored in bf16", lw=1)
    ax.set_xlabel("stored norm weight w"), ax.set_ylabel("error in the applied scale")
    ax.set_title("Zero-centred norm scale 1 + w: where the rounding happens", fontsize=10)
    ax.legend(fontsize=8)
    course.save(fig, "02_norm_rounding.png")

# %% [markdown]
# ## And why the *norm itself* runs in float32
#
# The mean of squares is the other trap. Residual streams in trained models carry a few very
# large values ("massive activations", in the hundreds or thousands). In float16 a square
# above 65,504 is infinite; in bfloat16 it is representable but a sum of many squares loses
# the small terms. minqwen computes every norm in float32 whatever the checkpoint's dtype.

# %%
activation = np.full(64, 0.5, dtype=np.float32)
activation[7] = 300.0  # one "massive" channel
with np.errstate(over="ignore"):
    mean_square_fp16 = np.mean(np.square(activation.astype(np.float16)))  # the squares taken in float16
print("mean of squares in float16:", mean_square_fp16, "  in float32:", np.mean(activation**2))
assert np.isinf(mean_square_fp16) and np.isfinite(my_rms_norm(activation, np.zeros(64, np.float32))).all()

# %% [markdown]
# ## Exercises
#
# Solutions: `walkthrough/solutions/02_embeddings_and_norm.py`.
#
# **Exercise 2.1.** RMSNorm is *scale invariant*: `rms_norm(c·x) ≈ rms_norm(x)` for any
# `c > 0`. Check it numerically on `expected["hidden.0"]` for c = 0.1, 1 and 1e3. For which
# tiny `c` does it stop being true, and which term of the formula is responsible?
#
# **Exercise 2.2.** Write `layer_norm(x, w)` (subtract the mean, divide by the standard
# deviation, scale by `1 + w`). Show that on a vector whose mean is zero it equals
# `my_rms_norm`, and find how far apart they are on `expected["hidden.0"]`.

# %%
def exercise_2_1(x):
    """Return the smallest of c = 10**-k (k = 0 … 12) for which rms_norm(c·x) still matches rms_norm(x) to 1e-3."""
    return None  # your code here


answer = exercise_2_1(expected["hidden.0"])
if answer is None:
    print("Exercise 2.1: not attempted yet.")
else:
    x, zeros = expected["hidden.0"], np.zeros(expected["hidden.0"].shape[-1], np.float32)

    def still_normalises(c):
        return np.abs(my_rms_norm(c * x, zeros) - my_rms_norm(x, zeros)).max() < 1e-3

    assert still_normalises(answer) and not still_normalises(answer / 10), \
        "ε = 1e-6 is compared with the mean *square*: think about c² · mean(x²)"
    print("Exercise 2.1: smallest scale that still normalises:", answer)
