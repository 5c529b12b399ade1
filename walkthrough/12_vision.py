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
# # Chapter 12 · Seeing: the vision tower, and images in the text
#
# Qwen3.5 is natively multimodal: every checkpoint of the family carries a vision tower, a
# small transformer of its own that turns an image into a run of vectors of the text model's
# width. Those vectors then *replace* the embeddings of `<|image_pad|>` tokens in the prompt,
# and the text model reads them like words — with one change: they get 3-D positions
# (time, row, column), which is what chapter 3's M-RoPE was built for.
#
# The way there, in this chapter's order:
#
# 1. **preprocessing** — resize to a grid of patches within a pixel budget, normalise, cut into
#    patches; a still image is a clip of two identical frames;
# 2. **patch embedding** — a 3-D convolution, which is one matrix product;
# 3. **position embeddings** — a learned square grid, resampled bilinearly to the image's grid;
# 4. **2-D rotary** — half of each head's angles follow the row, half the column;
# 5. **blocks** — LayerNorm, attention (each frame attends only to itself), a GELU MLP;
# 6. **the patch merger** — every 2 × 2 square of patches becomes one text token;
# 7. **into the text** — features at the `<|image_pad|>` tokens, 3-D M-RoPE positions, and
#    the offset (`rope_delta`) the text after an image carries.
#
# Everything is checked against a tiny multimodal checkpoint whose expected values
# transformers 5.23.0 computed (`tests/fixtures_vision/vision_fp32`: patch 4, merge 2, a
# 2-block tower of width 32, a 4-layer text model, randomized weights).

# %%
import math

import numpy as np
from safetensors.numpy import load_file

import course
import minqwen
from minqwen import vision
from minqwen.image import resize, smart_resize

np.set_printoptions(precision=4, suppress=True, linewidth=110)

folder = course.ROOT / "tests" / "fixtures_vision" / "vision_fp32"
expected = load_file(str(folder / "expected.safetensors"))  # what transformers computed
model = minqwen.load(folder)  # the text model (chapters 2–8)
tower = vision.load_vision(folder)  # the vision tower, with its preprocessor settings
pre, vc = tower.preprocessor, tower.config
print(f"patch {pre.patch_size} px, merge {pre.merge_size}×{pre.merge_size}, {pre.temporal_patch_size} frames per "
      f"patch, pixel budget {pre.min_pixels}…{pre.max_pixels}; tower: {vc.depth} blocks of width {vc.hidden_size}, "
      f"{vc.num_heads} heads; text width {vc.out_hidden_size}")

# %% [markdown]
# ## 1 · Preprocessing
#
# The tower cuts an image into `patch × patch` squares and later fuses each `merge × merge`
# square of patches into one token, so both sides of the image must be multiples of
# `factor = patch × merge` (8 pixels here, 32 in the released models). `smart_resize` picks
# the size nearest the original on that grid — rounding half to even, as Python's `round`
# does, which is what the reference does — and, if the area falls outside
# `[min_pixels, max_pixels]`, scales both sides by the same ratio to get inside. The aspect
# ratio is kept as closely as the grid allows; nothing is cropped or padded.

# %%
def my_smart_resize(height, width, factor, min_pixels, max_pixels):
    h, w = round(height / factor) * factor, round(width / factor) * factor
    if h * w > max_pixels:  # too big: shrink both sides by the same ratio, rounding down
        beta = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < min_pixels:  # too small: grow, rounding up
        beta = math.sqrt(min_pixels / (height * width))
        h, w = math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
    return h, w


images = [expected[f"image.{i}"] for i in range(6)]
for i, image in enumerate(images):
    h, w = my_smart_resize(*image.shape[:2], pre.factor, pre.min_pixels, pre.max_pixels)
    assert (h, w) == smart_resize(*image.shape[:2], pre.factor, pre.min_pixels, pre.max_pixels)
    grid = expected[f"grid_thw.{i}"][0]  # the reference's (t, h, w) in patches
    assert (h, w) == (grid[1] * pre.patch_size, grid[2] * pre.patch_size)
    print(f"image {i}: {image.shape[0]:>3}×{image.shape[1]:<3} px → {h:>2}×{w:<2} px = grid {grid.tolist()} patches")

# %% [markdown]
# Image 0 is 20 pixels tall: 20 / 8 = 2.5 rounds to 2, not 3 (half to even), so it becomes 16.
# Image 3 is a single pixel, grown to the minimum; image 4 (160 × 120) is shrunk into the
# 48 × 48 budget.
#
# The resize itself is Pillow's bicubic filter: `minqwen.image.resize` calls Pillow, and
# `resize_numpy` says the same in NumPy, bit for bit; we simply use the first. Then each
# channel is rescaled to 0…1 and normalised with the checkpoint's mean and standard deviation.
#
# Cutting into patches has two twists. First, the tower was trained on video: a patch spans
# `temporal_patch_size = 2` frames, so a still image is repeated to make a clip of two
# identical frames. Second, the rows of `pixel_values` are not in reading order: patches are
# listed **merge block by merge block** (block row, block column, row in block, column in
# block), so that the four patches the merger will fuse are consecutive rows.

# %%
def my_normalize(image):
    x = (image.transpose(2, 0, 1).astype(np.float64) * pre.rescale_factor).astype(np.float32)  # [3, H, W]
    mean = np.array(pre.image_mean, np.float32)[:, None, None]
    std = np.array(pre.image_std, np.float32)[:, None, None]
    return (x - mean) / std


def my_patchify(x, p=pre.patch_size, m=pre.merge_size, t=pre.temporal_patch_size):
    """[C, H, W] → pixel_values [patches, C·T·P·P] in merge-block order, and the grid (1, H/P, W/P)."""
    c, height, width = x.shape
    gh, gw = height // p, width // p
    x = x.reshape(c, gh // m, m, p, gw // m, m, p)  # [C, block row, row in block, py, block col, col in block, px]
    x = x.transpose(1, 4, 2, 5, 0, 3, 6)  # [block row, block col, row in block, col in block, C, py, px]
    x = np.repeat(x[:, :, :, :, :, None], t, axis=5)  # [..., C, T, py, px]: the same frame twice
    return x.reshape(gh * gw, c * t * p * p), (1, gh, gw)


def my_preprocess(image):
    h, w = my_smart_resize(*image.shape[:2], pre.factor, pre.min_pixels, pre.max_pixels)
    return my_patchify(my_normalize(resize(image, h, w)))


for i, image in enumerate(images):
    pixel_values, grid = my_preprocess(image)
    np.testing.assert_array_equal(pixel_values, expected[f"pixel_values.{i}"])  # bit for bit
    assert grid == tuple(expected[f"grid_thw.{i}"][0])
row = pixel_values[0].reshape(3, 2, pre.patch_size, pre.patch_size)  # [C, T, P, P]
assert (row[:, 0] == row[:, 1]).all()  # both frames of a still image are the same
print("pixel_values equal the reference's bit for bit, for all six images; one row is", pixel_values.shape[1],
      "values = 3 channels × 2 frames × 4 × 4 pixels")

# %% [markdown]
# ## 2 · Patch embedding: a 3-D convolution that is one matrix product
#
# The checkpoint stores the first layer as a `Conv3d` kernel of shape
# `[width, channels, frames, patch, patch]` whose stride equals its size. Each patch of the
# clip therefore meets the kernel exactly once and no two patches overlap: the convolution is
# one dot product per patch and output channel. Flatten the kernel to
# `[width, C·T·P·P]` and it is a single matrix product with `pixel_values`. Here is the
# convolution written out over the clip, next to the matrix product:

# %%
raw = load_file(str(folder / "model.safetensors"))
kernel = raw["model.visual.patch_embed.proj.weight"]  # [D, C, T, P, P]
bias = raw["model.visual.patch_embed.proj.bias"]  # [D]
print("Conv3d kernel:", kernel.shape)

image = images[0]
h, w = my_smart_resize(*image.shape[:2], pre.factor, pre.min_pixels, pre.max_pixels)
clip = np.repeat(my_normalize(resize(image, h, w))[:, None], 2, axis=1)  # [C, T=2, H, W]
P, m = pre.patch_size, pre.merge_size
tiles = clip.reshape(3, 2, h // P, P, w // P, P)  # [C, T, patch row, py, patch col, px]
conv = np.einsum("ctiyjx,dctyx->ijd", tiles, kernel) + bias  # [patch row, patch col, D]: the convolution
conv = conv.reshape(h // P // m, m, w // P // m, m, -1).transpose(0, 2, 1, 3, 4).reshape(-1, len(bias))  # merge order

pixel_values, grid = my_preprocess(image)
patch_embed = pixel_values @ kernel.reshape(len(bias), -1).T + bias  # [N, D]: the same, as one matmul
np.testing.assert_allclose(patch_embed, conv, atol=1e-5)
np.testing.assert_allclose(patch_embed, expected["one_image.tap.patch_embed"], rtol=0, atol=1e-4)
print("patch embedding:", patch_embed.shape, "— equal to the convolution, and to the reference's")

# %% [markdown]
# ## 3 · Position embeddings: a learned grid, resampled
#
# The tower learned one embedding per cell of a square grid — `num_position_embeddings = 36`
# here, a 6 × 6 grid (48 × 48 in the released models). An image of any shape gets the grid
# *stretched* over it: patch (row, column) of an `h × w` grid sits at
# `(row · (side − 1)/(h − 1), column · (side − 1)/(w − 1))` on the learned grid — corners on
# corners — and takes the bilinear mix of the four cells around that point. (Where `h = 1`
# every row sits on the first grid line.) The result is reordered into merge-block order,
# like the patches, and added to the patch embeddings.

# %%
def my_merge_order(gh, gw, m=pre.merge_size):
    """The (row, column) of each patch, in the order pixel_values lists them: [gh·gw, 2]."""
    rows, cols = np.meshgrid(np.arange(gh), np.arange(gw), indexing="ij")  # [gh, gw] each
    rc = np.stack([rows, cols], axis=-1)  # [gh, gw, 2], reading order
    return rc.reshape(gh // m, m, gw // m, m, 2).transpose(0, 2, 1, 3, 4).reshape(-1, 2)


def my_position_embeddings(table, gh, gw):
    side = math.isqrt(len(table))
    cells = table[: side * side].reshape(side, side, -1)  # [side, side, D]
    coords = my_merge_order(gh, gw).astype(np.float64)
    y = coords[:, 0] * (side - 1) / max(gh - 1, 1)  # [N]: where each patch sits on the learned grid
    x = coords[:, 1] * (side - 1) / max(gw - 1, 1)
    y0, x0 = np.floor(y).astype(int), np.floor(x).astype(int)
    y1, x1 = np.minimum(y0 + 1, side - 1), np.minimum(x0 + 1, side - 1)
    fy, fx = (y - y0)[:, None], (x - x0)[:, None]  # [N, 1]: how far past the lower grid line
    return ((1 - fy) * (1 - fx) * cells[y0, x0] + (1 - fy) * fx * cells[y0, x1]
            + fy * (1 - fx) * cells[y1, x0] + fy * fx * cells[y1, x1])  # [N, D]


pos_table = raw["model.visual.pos_embed.weight"]  # [36, D]
_, gh, gw = grid
pos = my_position_embeddings(pos_table, gh, gw)
np.testing.assert_allclose(pos, vision.interpolated_position_embeddings(pos_table, np.array([grid]), m, 6), atol=1e-5)
x = patch_embed + pos  # [N, D]: what the first block reads
print(f"a {gh}×{gw} patch grid reads the 6×6 learned grid at rows {np.linspace(0, 5, gh).round(2)}, "
      f"columns {np.linspace(0, 5, gw).round(2)}")

# %% [markdown]
# ## 4 · 2-D rotary
#
# Inside the blocks, attention also knows *where* each patch is through rotary embeddings,
# in two dimensions this time. A head of `head_dim` dimensions is paired rotate-half style
# (chapter 3); of its `head_dim / 2` angles, the first half turn with the patch's **row**, the
# second half with its **column**, each with `head_dim / 4` frequencies
# `θ^(−2i / (head_dim/2))`. Two patches' scores then depend on their offset in rows and in
# columns.

# %%
def my_rotary(gh, gw, head_dim, theta):
    coords = my_merge_order(gh, gw).astype(np.float32)  # [N, 2]
    inv_freq = 1.0 / theta ** (np.arange(0, head_dim // 2, 2, dtype=np.float32) / (head_dim // 2))  # [hd/4]
    half = np.concatenate([coords[:, :1] * inv_freq, coords[:, 1:] * inv_freq], axis=1)  # [N, hd/2]: rows, columns
    angles = np.concatenate([half, half], axis=1)  # [N, hd]: each angle for both members of its pair
    return np.cos(angles), np.sin(angles)


def my_rotate(x, cos, sin):
    """x [N, heads, hd], rotated by per-patch angles (rotate-half pairing)."""
    half = x.shape[-1] // 2
    rotated_half = np.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos[:, None] + rotated_half * sin[:, None]


cos, sin = my_rotary(gh, gw, vc.head_dim, vc.rope_theta)
ref_cos, ref_sin = vision.rotary_cos_sin(np.array([grid]), m, vc.head_dim, vc.rope_theta)
np.testing.assert_allclose(cos, ref_cos, atol=1e-6)
np.testing.assert_allclose(sin, ref_sin, atol=1e-6)

# %% [markdown]
# ## 5 · A block
#
# A vision block is a pre-norm transformer block of the classic kind — unlike the text
# model's: LayerNorm with a bias (mean removed, plain scale `w`, not `1 + w`), one fused
# `qkv` projection with biases, full non-causal attention, and a GELU MLP (`hidden_act`:
# the tanh approximation). Attention is **block-diagonal per frame**: a patch attends to the
# patches of its own frame of its own image, never to another image's (`cu_seqlens` in the
# reference marks where each frame starts).

# %%
def my_layer_norm(x, norm, eps=1e-6):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * norm.weight + norm.bias


def gelu_tanh(x):
    return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


def my_block(x, block, cos, sin, frames):
    n, d = x.shape
    heads = vc.num_heads
    qkv = my_layer_norm(x, block.norm1) @ block.attn.qkv.weight.T + block.attn.qkv.bias  # [N, 3·D]
    qkv = qkv.reshape(n, 3, heads, d // heads)
    q, k, v = my_rotate(qkv[:, 0], cos, sin), my_rotate(qkv[:, 1], cos, sin), qkv[:, 2]  # [N, heads, hd]
    out = np.empty_like(v)
    for start, stop in frames:  # each frame attends to itself only
        scores = np.einsum("qhd,khd->hqk", q[start:stop], k[start:stop]) / math.sqrt(d // heads)
        weights = np.exp(scores - scores.max(-1, keepdims=True))
        weights /= weights.sum(-1, keepdims=True)
        out[start:stop] = np.einsum("hqk,khd->qhd", weights, v[start:stop])
    x = x + out.reshape(n, d) @ block.attn.proj.weight.T + block.attn.proj.bias
    hidden = gelu_tanh(my_layer_norm(x, block.norm2) @ block.mlp.linear_fc1.weight.T + block.mlp.linear_fc1.bias)
    return x + hidden @ block.mlp.linear_fc2.weight.T + block.mlp.linear_fc2.bias


frames = [(0, len(x))]  # one image, one frame
for i, block in enumerate(tower.blocks):
    x = my_block(x, block, cos, sin, frames)
    err = np.abs(x - expected[f"one_image.tap.blocks.{i}"]).max()
    print(f"after block {i}: max |Δ| against the reference = {err:.1e}")
    np.testing.assert_allclose(x, expected[f"one_image.tap.blocks.{i}"], rtol=0, atol=1e-4)

# %% [markdown]
# ## 6 · The patch merger: four patches, one token
#
# Images are long: a 1,024 × 1,024 photo is 4,096 patches of 16 pixels. The merger divides
# that by four before the text model sees it. It normalises each patch, concatenates each
# 2 × 2 square — four consecutive rows, thanks to the merge-block order — into one vector of
# `4 · width`, and sends it through a two-layer MLP (with the *exact* GELU, whatever
# `hidden_act` says) to the text model's width.

# %%
def gelu(x):
    return 0.5 * x * (1 + np.vectorize(math.erf)(x / math.sqrt(2)))


def my_merger(x, merger):
    x = my_layer_norm(x, merger.norm).reshape(-1, x.shape[1] * m * m)  # [N/4, 4·D]
    x = gelu(x @ merger.linear_fc1.weight.T + merger.linear_fc1.bias)
    return x @ merger.linear_fc2.weight.T + merger.linear_fc2.bias  # [N/4, text width]


features = my_merger(x, tower.merger)
np.testing.assert_allclose(features, expected["one_image.features"], rtol=0, atol=1e-4)
print(f"{len(x)} patches → {len(features)} image features of width {features.shape[1]}, as the reference's")

# %% [markdown]
# ## 7 · Into the text: `<|image_pad|>` tokens and 3-D positions
#
# A prompt marks an image as `<|vision_start|><|image_pad|><|vision_end|>`. The processor
# repeats the `<|image_pad|>` once per merged patch (8 here: a 2 × 4 merged grid), and the
# model replaces those tokens' embeddings with the features, in order.

# %%
ids = expected["one_image.ids"]  # one <|image_pad|> (id 126) between vision_start (124) and vision_end (125)
pad = vc.image_token_id
n_tokens = int(np.prod(grid)) // (m * m)
at = int(np.flatnonzero(ids == pad)[0])
full_ids = np.concatenate([ids[:at], [pad] * n_tokens, ids[at + 1:]])
np.testing.assert_array_equal(full_ids, expected["one_image.input_ids"])
embeds = model.embed_tokens[full_ids].astype(np.float32)  # [T, H]
embeds[full_ids == pad] = features
print("prompt:", ids.tolist())
print("expanded:", full_ids.tolist())

# %% [markdown]
# Positions are where the image shows. Text tokens count up as usual, the same number in all
# three rows (time, height, width) — M-RoPE on text is plain RoPE (chapter 3). An image's
# tokens all start from the next free position `s` and sit at `(s + frame, s + row, s + column)`
# on the merged grid. The text after the image continues at `s + max(rows, columns)`: an image
# of 8 tokens on a 2 × 4 grid uses only 4 positions. From then on every position equals the
# token's index plus a fixed amount, `rope_delta`, which is negative (here −4) — which is why minqwen's cache keeps
# a `rope_delta` beside its `position`, and adds it to every token fed later.

# %%
def my_rope_index(ids, grids, pad, m):
    positions, current, image = [], 0, 0
    i = 0
    while i < len(ids):
        if ids[i] != pad:
            positions.append([current] * 3)
            current, i = current + 1, i + 1
            continue
        t, gh_, gw_ = grids[image]
        for frame in range(t):
            for row in range(gh_ // m):
                for col in range(gw_ // m):
                    positions.append([current + frame, current + row, current + col])
        i += t * gh_ * gw_ // (m * m)
        current += max(gh_, gw_) // m
        image += 1
    positions = np.array(positions).T  # [3, T]
    return positions, int(positions.max()) + 1 - len(ids)  # rope_delta: next position − tokens so far


for prompt in ("one_image", "two_images", "three_images"):
    positions, rope_delta = my_rope_index(expected[f"{prompt}.input_ids"], expected[f"{prompt}.grid_thw"], pad, m)
    np.testing.assert_array_equal(positions, expected[f"{prompt}.position_ids"])
    assert rope_delta == expected[f"{prompt}.rope_delta"][0]
    print(f"{prompt:<13} {len(positions[0]):>3} tokens, positions up to {positions.max():>2}: rope_delta {rope_delta}")
positions, rope_delta = my_rope_index(full_ids, [grid], pad, m)
print("one_image's positions (t, h, w):\n", positions)

# %% [markdown]
# With our own features, embeddings and positions, the text model (chapter 8's, here
# minqwen's) gives the reference's logits. Then decoding continues with plain token ids: the
# cache holds `position = 22` tokens, and the next token's rotary position is
# `position + rope_delta`. `vision.prefill` does all of this section in one call and sets the
# cache's `rope_delta`; the greedy continuation is the reference's, token for token.

# %%
cache = model.new_cache()
logits = model.forward(cache=cache, inputs_embeds=embeds, position_ids=positions)  # [T, vocab]
np.testing.assert_allclose(logits, expected["one_image.logits"], rtol=0, atol=1e-4)
cache.rope_delta = rope_delta
tokens = []
for _ in range(len(expected["one_image.greedy"])):
    tokens.append(int(np.argmax(logits[-1])))
    logits = model.forward([tokens[-1]], cache, last_only=True)
assert tokens == expected["one_image.greedy"].tolist()

cache = model.new_cache()
logits = vision.prefill(model, tower, ids, [images[0]], cache)  # the whole chapter, in minqwen
assert cache.rope_delta == rope_delta and int(np.argmax(logits[-1])) == tokens[0]
print("logits and the greedy continuation", tokens, "match the reference's")

# %% [markdown]
# In a chat, an image can arrive in any turn: positions then start from the cache's
# `position + rope_delta`, and `minqwen.ChatSession(…, tower=tower)` feeds each message's
# images through `vision.prefill` while keeping its cache snapshots (chapter 9) — each
# snapshot keeps its `rope_delta`. On the command line:
# `minqwen chat --model DIR --image photo.png`, then `/image PATH` lines.
#
# **Video** uses the same tower: consecutive frames pair up into the two frames of a
# temporal patch (grid `t` = frames / 2), and each pair is attended on its own, like an
# image. What differs is around the tower — frame sampling, a resize budget shared by all
# frames, a timestamp written as text before each frame pair — and minqwen does not
# implement it.
#
# ## Picture: from pixels to positions

# %%
plt = course.pyplot()
if plt is not None:
    big = images[4]  # 160 × 120 pixels
    pv, big_grid = my_preprocess(big)
    bh, bw = big_grid[1] * P, big_grid[2] * P
    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(12, 3.8), gridspec_kw={"width_ratios": [1, 1, 1.6]})
    ax1.imshow(big), ax1.set_title(f"image 4: {big.shape[0]}×{big.shape[1]} px", fontsize=9)
    ax2.imshow(resize(big, bh, bw), extent=(0, bw, bh, 0))
    for v in range(0, bw + 1, P):
        ax2.axvline(v, color="white", lw=0.3 if v % (P * m) else 1.2)
    for v in range(0, bh + 1, P):
        ax2.axhline(v, color="white", lw=0.3 if v % (P * m) else 1.2)
    ax2.set_title(f"resized to {bh}×{bw}: {big_grid[1]}×{big_grid[2]} patches,\n"
                  f"{big_grid[1] * big_grid[2] // 4} tokens after the 2×2 merge", fontsize=9)
    for a in (ax1, ax2):
        a.set_xticks([]), a.set_yticks([])
    three_pos = expected["three_images.position_ids"]
    for r, name in enumerate(("time", "height", "width")):
        ax3.plot(three_pos[r], lw=1, marker=".", ms=2, label=name)
    ax3.plot(np.arange(three_pos.shape[1]), color="grey", ls=":", lw=1, label="token index")
    ax3.set_xlabel("token"), ax3.set_ylabel("rotary position"), ax3.legend(fontsize=8)
    ax3.set_title("three_images prompt: M-RoPE positions (the flat steps are images)", fontsize=9)
    fig.tight_layout()
    course.save(fig, "12_vision.png")

# %% [markdown]
# On the right, the three rows agree on text and split apart on images: height climbs row by
# row, width sweeps each row, time stays flat for a still image. Each image uses fewer
# positions than tokens, so the solid lines fall further below the dotted token index after
# each one — that gap is `rope_delta`.
#
# ## Exercises
#
# Solutions: `walkthrough/solutions/12_vision.py`.
#
# **Exercise 12.1.** A phone photo is 4032 × 3024 pixels. Fill in `exercise_12_1(height, width)`
# below: how many `<|image_pad|>` tokens an image becomes with this checkpoint's preprocessor. Check it
# against minqwen's `tower.token_count` on the photo, on the six test images and on a few
# awkward sizes (2 × 300, 7 × 9, 2000 × 2000). How many tokens would the photo take with
# patch 16, merge 2 and a budget of up to 4096² = 16,777,216 pixels — the scale of the
# released models — and at what size would it be resized?
#
# **Exercise 12.2.** Without running anything but arithmetic on `grid_thw`, compute the
# `rope_delta` of the `three_images` prompt (images of 1 × 1, 160 × 120 and 9 × 150 pixels),
# and check it against the reference's. (Hint: how many tokens does each image add, and how
# many positions?)

# %%
def exercise_12_1(height, width):
    """The number of <|image_pad|> tokens an image of height × width pixels becomes here."""
    return None  # your code here


answer = exercise_12_1(4032, 3024)
if answer is None:
    print("Exercise 12.1: not attempted yet.")
else:
    for size in [(4032, 3024), (2, 300), (7, 9), (2000, 2000)] + [im.shape[:2] for im in images]:
        assert exercise_12_1(*size) == tower.token_count(*size), size
    print("Exercise 12.1: correct: the photo becomes", answer, "tokens here")


# %%
def exercise_12_2():
    """three_images' rope_delta, from its grid_thw alone."""
    return None  # your code here


answer = exercise_12_2()
if answer is None:
    print("Exercise 12.2: not attempted yet.")
else:
    assert answer == expected["three_images.rope_delta"][0]
    print("Exercise 12.2: correct:", answer)
