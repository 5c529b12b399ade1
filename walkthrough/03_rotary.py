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
# # Chapter 3 · Rotary, partial rotary and M-RoPE
#
# Attention compares a query with keys by dot products, and a dot product knows nothing about
# order: shuffle the keys and every score comes out the same. Position has to be written
# into the vectors. Qwen3.5 does it with three layered ideas:
#
# 1. **RoPE** — rotate pairs of query and key dimensions by an angle proportional to the
#    position, so that the score of query *m* against key *n* depends on *m − n* only;
# 2. **partial rotary** — rotate only the first quarter of each head's dimensions and leave
#    the rest free of position;
# 3. **M-RoPE** — give every token *three* positions (time, height, width) so that image
#    patches can sit on a grid; for text the three are equal and M-RoPE is plain RoPE.
#
# Only the attention layers use positions at all. The Gated DeltaNet layers know order from
# their recurrence (chapter 5) and their short convolution (chapter 6).

# %%
import numpy as np

import course
import minqwen
from minqwen.rope import apply_rotary, inverse_frequencies, mrope_cos_sin, text_position_ids

np.set_printoptions(precision=4, suppress=True, linewidth=110)

# %% [markdown]
# ## RoPE from scratch
#
# Take a head of `R` dimensions and pair them up. Qwen pairs dimension `i` with `i + R/2`
# (the "rotate half" layout); each pair is a 2-D vector, rotated by the angle
# `position × inv_freq[i]`, with one frequency per pair:
#
# $$\mathrm{inv\_freq}[i] = \theta^{-2i/R}, \quad i = 0 \dots R/2 - 1$$
#
# Pair 0 turns by one radian per token; the last pair turns extremely slowly (θ is 10⁷ in
# Qwen3.5). Fast pairs resolve nearby positions, slow ones tell far-apart positions apart —
# like the hands of a clock.

# %%
def my_inv_freq(theta, R):
    return 1.0 / theta ** (np.arange(0, R, 2) / R)  # [R/2]


def my_rotate(x, positions, theta):
    """Rotate every vector x[t] [..., R] by angles positions[t] · inv_freq (rotate-half pairing)."""
    R = x.shape[-1]
    angles = positions[:, None] * my_inv_freq(theta, R)  # [T, R/2]
    cos, sin = np.cos(angles), np.sin(angles)
    if x.ndim == 3:  # [T, heads, R]: the same angles for every head
        cos, sin = cos[:, None, :], sin[:, None, :]
    a, b = x[..., : R // 2], x[..., R // 2 :]  # the two halves: pair i is (a[i], b[i])
    return np.concatenate([a * cos - b * sin, a * sin + b * cos], axis=-1)


# %% [markdown]
# The property that makes it work: rotating the query by angle `mφ` and the key by `nφ`
# leaves a dot product that depends on `(m − n)φ` only. Shift both positions by the same
# amount and nothing changes.

# %%
rng = np.random.default_rng(0)
q, k = rng.normal(size=(1, 64)), rng.normal(size=(1, 64))


def score(m, n, theta=1e7):
    return float((my_rotate(q, np.array([m]), theta) @ my_rotate(k, np.array([n]), theta).T)[0, 0])


print("q at 10, k at 3:", score(10, 3), "  q at 1010, k at 1003:", score(1010, 1003))
np.testing.assert_allclose(score(10, 3), score(1010, 1003), rtol=1e-9)
np.testing.assert_allclose(score(5, 5), (q @ k.T)[0, 0], rtol=1e-9)  # same position: no rotation left

# %% [markdown]
# minqwen builds the same thing as `cos` and `sin` tables of width `R` (each angle written
# twice, once for each member of its pair) and rotates with
# `x·cos + rotate_half(x)·sin`, where `rotate_half(a, b) = (−b, a)`. That is the
# reference's formulation; ours above is the same rotation, written pair by pair.

# %%
R, theta = 64, 1e7
positions = np.arange(20)
inv_freq = inverse_frequencies(theta, R)  # float32, as the reference computes it
np.testing.assert_allclose(inv_freq, my_inv_freq(theta, R), rtol=1e-6)
cos, sin = mrope_cos_sin(text_position_ids(0, 20), inv_freq, (11, 11, 10))  # [T, R]
x = rng.normal(size=(20, 3, R)).astype(np.float32)  # [T, heads, R]
np.testing.assert_allclose(apply_rotary(x, cos, sin), my_rotate(x, positions, theta), rtol=1e-4, atol=1e-4)

# %% [markdown]
# ## Partial rotary
#
# Qwen3.5 rotates only the first `R = head_dim × partial_rotary_factor` dimensions of each
# head: 64 of 256 in the released models. The other 192 carry no position at all, so the
# model can match keys by *content* regardless of distance through those, and by position
# through the rotated ones. minqwen's `apply_rotary` rotates the first `R` and passes the
# rest through untouched:

# %%
head = rng.normal(size=(20, 2, 256)).astype(np.float32)  # a full head_dim of 256
cos64, sin64 = mrope_cos_sin(text_position_ids(0, 20), inverse_frequencies(theta, 64), (11, 11, 10))
rotated = apply_rotary(head, cos64, sin64)
np.testing.assert_array_equal(rotated[..., 64:], head[..., 64:])  # dims 64…255: untouched
np.testing.assert_allclose(rotated[..., :64], my_rotate(head[..., :64], positions, theta), rtol=1e-4, atol=1e-4)

# %% [markdown]
# ## M-RoPE: three positions per token
#
# Qwen3.5 is multimodal: an image becomes a grid of patch tokens inside the text. Each token
# therefore has three position ids — **t**ime, **h**eight, **w**idth — and each of the `R/2`
# rotation frequencies listens to *one* of them. Which one is set by `mrope_section`
# (`[11, 11, 10]` for the real models: 11 + 11 + 10 = 32 = R/2) and, in Qwen3.5, the
# assignment is **interleaved**: frequency `i` listens to height if `i % 3 == 1`, to width if
# `i % 3 == 2`, to time otherwise — as long as `i` is within `3 × section` for that axis.
# Interleaving gives each axis a spread of fast and slow frequencies, instead of giving time
# all the fast ones.

# %%
def my_axis_of_frequency(n_freq, section):
    """For each of the R/2 frequencies: 0 (time), 1 (height) or 2 (width)."""
    axis = np.zeros(n_freq, dtype=int)  # time by default
    for a in (1, 2):
        for i in range(a, min(3 * section[a], n_freq), 3):
            axis[i] = a
    return axis


real_axes = my_axis_of_frequency(32, (11, 11, 10))
print("Qwen3.5 (R/2 = 32, section [11, 11, 10]):", "".join("THW"[a] for a in real_axes))
assert [int((real_axes == a).sum()) for a in range(3)] == [11, 11, 10]


def my_mrope_angles(position_ids, theta, R, section):
    """Angles [T, R/2] for 3-row position ids [3, T]: frequency i uses the row its axis says."""
    axes = my_axis_of_frequency(R // 2, section)
    all_angles = position_ids[:, :, None] * my_inv_freq(theta, R)  # [3, T, R/2]
    return np.take_along_axis(all_angles, axes[None, None, :].repeat(position_ids.shape[1], 1), axis=0)[0]


# %% [markdown]
# For text, all three rows are the same running index, so whichever row a frequency reads,
# it reads the same number: **M-RoPE on text is exactly RoPE**. That is why the text model
# needs nothing special — and why a port that forgets M-RoPE still works on text and breaks
# only on images.

# %%
text_pos = text_position_ids(0, 20)  # [3, T]
assert (text_pos[0] == text_pos[1]).all() and (text_pos[1] == text_pos[2]).all()
plain_rope_angles = positions[:, None] * my_inv_freq(theta, R)
np.testing.assert_allclose(my_mrope_angles(text_pos, theta, R, (11, 11, 10)), plain_rope_angles)

# %% [markdown]
# With an image the rows differ. Here are five text tokens followed by a 2 × 3 grid of
# patches: the patches share one time step, and spread out over height and width. (The exact
# numbering of images is the vision chapter's business; what matters here is that the
# rotation now mixes three coordinates.) minqwen's tables agree with ours:

# %%
t_rows = np.array([0, 1, 2, 3, 4, 5, 5, 5, 5, 5, 5])
h_rows = np.array([0, 1, 2, 3, 4, 5, 5, 5, 6, 6, 6])
w_rows = np.array([0, 1, 2, 3, 4, 5, 6, 7, 5, 6, 7])
image_pos = np.stack([t_rows, h_rows, w_rows])  # [3, T]
angles = my_mrope_angles(image_pos, theta, R, (11, 11, 10))
cos_img, _ = mrope_cos_sin(image_pos, inverse_frequencies(theta, R), (11, 11, 10))
np.testing.assert_allclose(cos_img[:, : R // 2], np.cos(angles), atol=1e-5)
print("angle of frequency 1 (a height frequency) per token:", angles[:, 1].round(3))

# %% [markdown]
# ## Checking against the reference
#
# The fixtures store the keys that transformers put in its KV cache: after `k_proj`, after
# the per-head `k_norm`, and after rotary. We compute them from the layer's input — the
# reference's own hidden state before that layer — with our rotation, for every dense
# fixture: they differ in head size, rotary fraction (¼, ½, all of it), θ and M-RoPE section.

# %%
def rms_norm(x, w, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * (1 + w)


for name in ("text_tied_fp32", "text_grouped_bf16_bias", "multimodal_bf16_untied", "multimodal_sharded"):
    folder, expected = course.fixture(name)
    model = minqwen.load(folder)
    c = model.config
    i = c.layer_types.index("full_attention")  # the first attention layer
    layer = model.layers[i]
    x = expected[f"hidden.{i - 1}"]  # the stream entering layer i, as the reference computed it
    h = rms_norm(x, layer.input_layernorm, c.rms_norm_eps)
    keys = h @ layer.self_attn.k_proj.T  # [T, Hkv · D]
    if layer.self_attn.k_proj_bias is not None:
        keys = keys + layer.self_attn.k_proj_bias
    keys = rms_norm(keys.reshape(len(x), c.num_key_value_heads, c.head_dim), layer.self_attn.k_norm, c.rms_norm_eps)
    R = c.rotary_dim
    pos = text_position_ids(0, len(x))
    angles = my_mrope_angles(pos, c.rope_theta, R, c.mrope_section)[:, None, :]  # [T, 1, R/2]
    a, b = keys[..., : R // 2], keys[..., R // 2 : R]
    keys = np.concatenate([a * np.cos(angles) - b * np.sin(angles), a * np.sin(angles) + b * np.cos(angles),
                           keys[..., R:]], axis=-1)
    err = np.abs(keys.transpose(1, 0, 2) - expected[f"state.{i}.keys"]).max()
    print(f"{name:<24} head_dim {c.head_dim:>2}, rotary {R:>2} dims, θ {c.rope_theta:>9g}, "
          f"section {list(c.mrope_section)}: max |Δ| = {err:.1e}")
    np.testing.assert_allclose(keys.transpose(1, 0, 2), expected[f"state.{i}.keys"], rtol=0, atol=1e-4)

# %% [markdown]
# Two of those configs have an `mrope_section` that does not add up to `R/2` (tiny test
# models shrink the head but keep the default `[11, 11, 10]`). The reference accepts that and
# simply assigns the frequencies that exist; our `my_axis_of_frequency` does the same, because
# it never writes past `R/2`.
#
# ## Pictures: the rotation angles, and what a score sees

# %%
plt = course.pyplot()
if plt is not None:
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 3.6), gridspec_kw={"width_ratios": [1.3, 1]})
    pos = np.arange(128)
    table = np.cos(pos[:, None] * my_inv_freq(1e7, 64))  # [T, 32]
    ax1.imshow(table.T, aspect="auto", cmap="RdBu", vmin=-1, vmax=1, interpolation="nearest")
    ax1.set_yticks(range(32), ["THW"[a] for a in real_axes], fontsize=6)
    ax1.set_xlabel("position"), ax1.set_ylabel("frequency i (axis it listens to)")
    ax1.set_title("cos(position · inv_freq[i]), Qwen3.5: R = 64, θ = 1e7", fontsize=9)
    q1, k1 = rng.normal(size=(1, 64)), rng.normal(size=(1, 64))
    k1 = q1 + 0.3 * k1  # a key that matches the query in content
    dist = np.arange(0, 2000)
    scores = [(my_rotate(q1, np.array([d]), 1e7) @ my_rotate(k1, np.array([0]), 1e7).T)[0, 0] for d in dist]
    ax2.plot(dist, scores, lw=0.8)
    ax2.set_xscale("symlog", linthresh=10)
    ax2.set_xlabel("distance between query and key (tokens)"), ax2.set_ylabel("q · k after rotation")
    ax2.set_title("The same q and k, moved apart", fontsize=9)
    fig.tight_layout()
    course.save(fig, "03_rotary.png")

# %% [markdown]
# On the left, the top rows (fast frequencies) flicker from token to token while the bottom
# rows barely move over 128 positions. On the right, the score of a matching query–key pair
# is largest at distance 0 and wobbles lower as they move apart: nearby tokens are easier to
# attend to, but nothing forbids a far one.
#
# ## Exercises
#
# Solutions: `walkthrough/solutions/03_rotary.py`.
#
# **Exercise 3.1.** GPT-J and some other models pair *neighbouring* dimensions, `(2i, 2i+1)`,
# instead of `(i, i + R/2)`. Write `rotate_neighbours(x, positions, theta)`. Show that it
# has the same relative-position property, but gives different vectors than Qwen's layout —
# so a port that picks the wrong pairing computes the wrong keys even though "RoPE works".
#
# **Exercise 3.2.** The fixture `text_tied_fp32` has `head_dim` 16 and rotary factor ¼, with
# the default section `[11, 11, 10]`. How many frequencies does it have, and which axis does
# each listen to? Return them as a string like `"THW"`.

# %%
def exercise_3_2():
    """The axes of text_tied_fp32's rotary frequencies, e.g. "THW"."""
    return None  # your code here


answer = exercise_3_2()
if answer is None:
    print("Exercise 3.2: not attempted yet.")
else:
    c = minqwen.config.load_config(course.FIXTURES / "text_tied_fp32")
    assert answer == "".join("THW"[a] for a in my_axis_of_frequency(c.rotary_dim // 2, c.mrope_section))
    print("Exercise 3.2: correct:", answer)
