"""The Qwen3.5 vision tower, and how its output joins the text model's sequence.

An image's path, top to bottom of this file:

    pixels ─ preprocess (image.py) ─ pixel_values [patches, C·T·P·P], grid_thw (t, h, w)
      ─ patch_embed: one matmul (the 3-D convolution's kernel equals its stride)
      ─ + pos_embed: a learned square grid, bilinearly resampled to (h, w)
      ─ for each block ─────────────────────────────────────────────────────┐
      │  x += attention(LayerNorm(x))   2-D rotary (row, column); each frame │
      │                                 attends only to itself               │
      │  x += mlp(LayerNorm(x))         gelu-tanh                            │
      └──────────────────────────────────────────────────────────────────────┘
      ─ merger: LayerNorm, fuse each merge × merge square of patches, MLP (exact GELU)
      ─ features [merged patches, text hidden]

and then, in the text model's sequence:

    … <|vision_start|> <|image_pad|> × (merged patches) <|vision_end|> …

each ``<|image_pad|>`` embedding is replaced by one feature row, and the image's tokens get
3-D M-RoPE positions (t, row, column) so that the text model sees the grid. Text after an
image continues from the image's largest position + 1, which is fewer positions than the
image has tokens: the difference, ``rope_delta``, is what the cache adds to every later
position (``Cache.rope_delta``).

Everything is checked against transformers 5.23.0 (``Qwen3_5VisionModel``,
``Qwen3_5Model.get_rope_index``, ``get_placeholder_mask``).
"""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .activations import ACTIVATIONS, gelu
from .checkpoint import Checkpoint
from .config import GENERIC_FIELDS, load_config, read_json_object
from .errors import MinqwenError, is_finite_number
from .image import PreprocessorConfig, image_list, load_preprocessor_config, preprocess_images, target_size
from .linear import linear
from .model import Cache, converted
from .rope import apply_rotary, inverse_frequencies

# What minqwen does with each vision_config field.
VISION_FIELDS: dict[str, str] = {
    "depth": "honoured (default 27): the number of vision blocks",
    "hidden_size": "honoured (default 1152): the tower's width",
    "hidden_act": "honoured (default gelu_pytorch_tanh): the blocks' MLP activation (the merger's GELU is always exact)",
    "intermediate_size": "honoured (default 4304): the blocks' MLP width",
    "num_heads": "honoured (default 16): attention heads; head_dim = hidden_size / num_heads, a multiple of 4",
    "in_channels": "honoured only as 3 (default): preprocessing makes RGB",
    "patch_size": "honoured (default 16): pixels per patch side",
    "temporal_patch_size": "honoured (default 2): frames per patch (a still image is repeated)",
    "spatial_merge_size": "honoured (default 2): merge × merge patches become one text token",
    "out_hidden_size": "honoured (default 3584): must equal the text hidden_size",
    "num_position_embeddings": "honoured (default 2304): a learned square grid of side ⌊√n⌋ (rows past side² unused, as in the reference)",
    "rope_parameters": "honoured: rope_type 'axial' only ('default', in old saves, reads as axial, as in "
                       "transformers), rope_theta (default 10000)",
    "rope_theta": "honoured when rope_parameters has none (the legacy place, as in transformers)",
    "num_attention_heads": "honoured as the alias of num_heads",
    "num_hidden_layers": "honoured as the alias of depth",
    "initializer_range": "ignored: training only",
    "deepstack_visual_indexes": "ignored when empty, as Qwen3.5's own configs carry it (its tower has no deepstack "
                                "mergers; transformers ignores it whatever it holds); a non-empty list is warned about",
    "model_type": "metadata: qwen3_5_vision or qwen3_5_moe_vision (or, in old saves, the wrapper's name)",
    "dtype": "metadata",
    "torch_dtype": "metadata",
    "architectures": "metadata",
    "transformers_version": "metadata",
    "output_attentions": "ignored",
    "output_hidden_states": "ignored",
    "return_dict": "ignored",
    **{name: "ignored: a generic transformers field" for name in GENERIC_FIELDS},
}
ALIASES = {"num_attention_heads": "num_heads", "num_hidden_layers": "depth"}
# The special tokens of the multimodal wrapper, with transformers' Qwen3.5 defaults.
TOKEN_FIELDS = {"image_token_id": 248056, "video_token_id": 248057,
                "vision_start_token_id": 248053, "vision_end_token_id": 248054}
LAYER_NORM_EPS = 1e-6  # fixed in the reference, not a config field


@dataclass(frozen=True)
class VisionConfig:
    """The vision tower's hyper-parameters (``vision_config``) and the wrapper's special tokens."""

    depth: int = 27
    hidden_size: int = 1152
    hidden_act: str = "gelu_pytorch_tanh"
    intermediate_size: int = 4304
    num_heads: int = 16
    in_channels: int = 3
    patch_size: int = 16
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    out_hidden_size: int = 3584
    num_position_embeddings: int = 2304
    rope_theta: float = 10000.0
    image_token_id: int = 248056
    video_token_id: int = 248057
    vision_start_token_id: int = 248053
    vision_end_token_id: int = 248054
    source: str = field(default="<dict>", compare=False)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def patch_dim(self) -> int:
        """Values in one patch: channels × frames × pixels."""
        return self.in_channels * self.temporal_patch_size * self.patch_size * self.patch_size

    @property
    def merge_unit(self) -> int:
        """Patches fused into one text token."""
        return self.spatial_merge_size**2

    @property
    def num_grid_per_side(self) -> int:
        """Side of the learned position grid."""
        return math.isqrt(self.num_position_embeddings)


def vision_config_from_dict(raw: dict, text_hidden_size: int, vocab_size: int, source: str = "<dict>") -> VisionConfig:
    """The vision config of a ``qwen3_5`` / ``qwen3_5_moe`` config.json dictionary, validated."""
    if raw.get("model_type") not in ("qwen3_5", "qwen3_5_moe"):
        raise MinqwenError(
            f"{source}: model_type {raw.get('model_type')!r} has no vision tower; images need a multimodal "
            "Qwen3.5 checkpoint (model_type 'qwen3_5' or 'qwen3_5_moe')"
        )
    vision = raw.get("vision_config")
    if vision is None:
        raise MinqwenError(f"{source}: no 'vision_config': this checkpoint has no vision tower")
    if not isinstance(vision, dict):
        raise MinqwenError(f"{source}: field 'vision_config' must be an object")
    # deepstack_visual_indexes: [] on every real Qwen3.5 config; a list of blocks is another tower's (Qwen3-VL's)
    unknown = sorted(k for k in vision if k not in VISION_FIELDS or (k == "deepstack_visual_indexes" and vision[k]))
    if unknown:
        warnings.warn(f"{source}: vision_config fields minqwen does not know were not used: "
                      + ", ".join(unknown), stacklevel=2)
    vision = dict(vision)
    for alias, name in ALIASES.items():
        if alias in vision:
            if name in vision and vision[name] != vision[alias]:
                raise MinqwenError(f"{source}: vision_config.{alias} and vision_config.{name} disagree")
            vision[name] = vision.pop(alias)
    inner_type = vision.get("model_type", "qwen3_5_vision")
    # "qwen3_5" / "qwen3_5_moe": the wrappers' names, in old saves; transformers reads them as the vision config
    if inner_type not in ("qwen3_5_vision", "qwen3_5_moe_vision", "qwen3_5", "qwen3_5_moe"):
        raise MinqwenError(f"{source}: vision_config.model_type is {inner_type!r}; expected 'qwen3_5_vision'")

    defaults = VisionConfig()

    def integer(name, minimum=1, where="vision_config.", table=vision, default=None):
        value = table.get(name, getattr(defaults, name) if default is None else default)
        if isinstance(value, bool) or not isinstance(value, int):
            raise MinqwenError(f"{source}: field '{where}{name}' must be an integer, got {value!r}")
        if value < minimum:
            raise MinqwenError(f"{source}: field '{where}{name}' must be at least {minimum}, got {value}")
        return value

    sizes = {name: integer(name) for name in (
        "hidden_size", "intermediate_size", "num_heads", "in_channels", "patch_size", "temporal_patch_size",
        "spatial_merge_size", "out_hidden_size", "num_position_embeddings")}
    sizes["depth"] = integer("depth", minimum=0)
    if sizes["in_channels"] != 3:
        raise MinqwenError(f"{source}: field 'vision_config.in_channels' is {sizes['in_channels']}; "
                           "minqwen's preprocessing makes RGB images (3 channels)")
    if sizes["hidden_size"] % sizes["num_heads"]:
        raise MinqwenError(f"{source}: vision_config.hidden_size {sizes['hidden_size']} is not a multiple of "
                           f"num_heads {sizes['num_heads']}")
    if (sizes["hidden_size"] // sizes["num_heads"]) % 4:
        raise MinqwenError(f"{source}: the vision head_dim {sizes['hidden_size'] // sizes['num_heads']} must be a "
                           "multiple of 4 (its rotary splits it into row and column halves of cos/sin pairs)")
    if sizes["out_hidden_size"] != text_hidden_size:
        raise MinqwenError(f"{source}: vision_config.out_hidden_size {sizes['out_hidden_size']} must equal the text "
                           f"hidden_size {text_hidden_size} (image features replace token embeddings)")
    act = vision.get("hidden_act", defaults.hidden_act)
    if not isinstance(act, str) or act not in ACTIVATIONS:
        raise MinqwenError(f"{source}: field 'vision_config.hidden_act' is {act!r}; minqwen knows "
                           + ", ".join(ACTIVATIONS))

    rope = vision.get("rope_parameters") or {}
    if not isinstance(rope, dict):
        raise MinqwenError(f"{source}: field 'vision_config.rope_parameters' must be an object")
    if "rope_theta" not in rope and "rope_theta" in vision:  # the legacy place, which transformers still reads
        rope = dict(rope, rope_theta=vision["rope_theta"])
    rope_type = rope.get("rope_type", rope.get("type", "axial"))
    if rope_type == "default":  # old saves: transformers reads it as the tower's own, axial
        rope_type = "axial"
    if rope_type != "axial":
        raise MinqwenError(f"{source}: field 'vision_config.rope_parameters.rope_type' is {rope_type!r}; the "
                           "Qwen3.5 vision tower has only 'axial' (2-D) rotary embeddings")
    extra = sorted(set(rope) - {"rope_type", "type", "rope_theta"})
    if extra:
        raise MinqwenError(f"{source}: vision_config.rope_parameters fields minqwen does not implement: {', '.join(extra)}")
    theta = rope.get("rope_theta", defaults.rope_theta)
    if not is_finite_number(theta) or theta <= 0:
        raise MinqwenError(f"{source}: field 'vision_config.rope_parameters.rope_theta' must be a positive, finite number")

    tokens = {}
    for name, default in TOKEN_FIELDS.items():
        tokens[name] = integer(name, minimum=0, where="", table=raw, default=default)
        if tokens[name] >= vocab_size:
            raise MinqwenError(f"{source}: field '{name}' is {tokens[name]}, outside the vocabulary (size {vocab_size})")
    if len(set(tokens.values())) < len(tokens):  # one id standing for two markers would misplace images
        raise MinqwenError(f"{source}: fields {', '.join(tokens)} must be four different token ids, got "
                           + ", ".join(str(v) for v in tokens.values()))
    return VisionConfig(**sizes, hidden_act=act, rope_theta=float(theta), **tokens, source=source)


# ==================================================================== weights


@dataclass
class Linear:
    weight: np.ndarray  # [out, in]
    bias: np.ndarray  # [out]


@dataclass
class LayerNorm:
    weight: np.ndarray  # [D]
    bias: np.ndarray  # [D]


@dataclass
class VisionAttention:
    qkv: Linear  # [3·D, D]: queries, keys and values of every head
    proj: Linear  # [D, D]


@dataclass
class VisionMLP:
    linear_fc1: Linear  # [I, D]
    linear_fc2: Linear  # [D, I]


@dataclass
class VisionBlock:
    """One block's weights, named as in the checkpoint (``model.visual.blocks.{i}.…``)."""

    norm1: LayerNorm
    attn: VisionAttention
    norm2: LayerNorm
    mlp: VisionMLP


@dataclass
class PatchMerger:
    norm: LayerNorm  # [D], applied per patch before the merge
    linear_fc1: Linear  # [D·m², D·m²]
    linear_fc2: Linear  # [out_hidden, D·m²]


# ==================================================================== the pieces of the tower


def layer_norm(x: np.ndarray, norm: LayerNorm) -> np.ndarray:
    """LayerNorm over the last axis: (x − mean) / √(var + ε) · w + b (an ordinary one, not zero-centred)."""
    mean = x.mean(axis=-1, keepdims=True)  # [..., 1]
    var = np.square(x - mean).mean(axis=-1, keepdims=True)  # [..., 1]: the biased variance, as torch
    return (x - mean) / np.sqrt(var + x.dtype.type(LAYER_NORM_EPS)) * norm.weight + norm.bias


def patch_coordinates(grid_thw: np.ndarray, merge: int) -> np.ndarray:
    """(row, column) of every patch, in the order pixel_values lists them: [N, 2].

    Within a frame the order is merge block by merge block (block row, block column, row in
    block, column in block) — so that the merger's m² patches are consecutive — and frames
    follow one another, each with the same coordinates.
    """
    coords = []
    for t, h, w in grid_thw:
        rows = np.arange(h).reshape(h // merge, 1, merge, 1)  # [block row, ·, row in block, ·]
        cols = np.arange(w).reshape(1, w // merge, 1, merge)  # [·, block col, ·, col in block]
        shape = (h // merge, w // merge, merge, merge)
        frame = np.stack([np.broadcast_to(rows, shape).reshape(-1), np.broadcast_to(cols, shape).reshape(-1)], axis=-1)
        coords.append(np.tile(frame, (t, 1)))  # [t·h·w, 2]
    return np.concatenate(coords)


def frame_boundaries(grid_thw: np.ndarray) -> np.ndarray:
    """cu_seqlens: where each frame of each image starts and ends in the patch sequence, [frames + 1]."""
    lengths = np.repeat(grid_thw[:, 1] * grid_thw[:, 2], grid_thw[:, 0])  # [frames]
    return np.concatenate([[0], np.cumsum(lengths)])


def interpolated_position_embeddings(pos_embed: np.ndarray, grid_thw: np.ndarray, merge: int, side: int) -> np.ndarray:
    """The learned side × side grid of embeddings, resampled to each image's h × w patches: [N, D].

    Bilinear with corners aligned (the grid's corners land on the image's corner patches), as
    ``F.interpolate(mode="bilinear", align_corners=True)``; computed in the embeddings' dtype,
    float32 like the reference (or float64 for a tower made with ``astype``).
    """
    coords = patch_coordinates(grid_thw, merge)  # [N, 2]
    sizes = np.repeat(grid_thw[:, 1:], grid_thw.prod(axis=1), axis=0)  # [N, 2]: (h, w) of each patch's image
    f = pos_embed.dtype.type  # float32 or float64

    def taps(index, size):
        # Where patch `index` of `size` falls on the grid: 0 … side−1, ends included.
        src = index.astype(f) * f(side - 1) / np.maximum(size - 1, 1).astype(f)  # [N]
        floor = np.floor(src)
        lower = np.minimum(floor.astype(np.int64), side - 1)  # [N]
        upper = np.minimum(floor.astype(np.int64) + 1, side - 1)  # the next grid line (clamped at the edge)
        frac = src - floor  # [N]: weight of the upper line
        return (lower, upper), (f(1) - frac, np.maximum(f(1) - np.abs(frac - f(1)), 0))

    (r0, r1), (wr0, wr1) = taps(coords[:, 0], sizes[:, 0])
    (c0, c1), (wc0, wc1) = taps(coords[:, 1], sizes[:, 1])
    out = np.zeros((len(coords), pos_embed.shape[1]), pos_embed.dtype)  # [N, D]
    for r, wr in ((r0, wr0), (r1, wr1)):
        for c, wc in ((c0, wc0), (c1, wc1)):
            out += pos_embed[r * side + c] * (wr * wc)[:, None]  # one of the four corners around each patch
    return out


def rotary_cos_sin(grid_thw: np.ndarray, merge: int, head_dim: int, theta: float,
                   dtype=np.float32) -> tuple[np.ndarray, np.ndarray]:
    """2-D rotary tables [N, head_dim]: the first half of the angles follows the row, the second the column.

    Each of row and column gets head_dim / 4 frequencies; as in the text model, dim i and
    i + head_dim/2 share an angle (rotate-half layout), and the whole head is rotated.
    ``dtype`` is the tower's compute dtype, as in ``rope.mrope_cos_sin``: float32 rounds each
    angle as the reference does, float64 keeps it exact (the frequencies stay float32 values).
    """
    coords = patch_coordinates(grid_thw, merge).astype(dtype)  # [N, 2]
    spatial = head_dim // 2
    inv_freq = inverse_frequencies(theta, spatial).astype(dtype)  # [D/4]
    angles = coords[:, :, None] * inv_freq  # [N, 2, D/4]
    half = angles.reshape(len(coords), -1)  # [N, D/2]: row angles, then column angles
    emb = np.concatenate([half, half], axis=-1)  # [N, D]
    return np.cos(emb), np.sin(emb)


# Score-matrix budget (floats) per block of one head's query rows: 2²² float32 scores, 16 MB,
# instead of heads × patches² at once (357 MB for a 720 × 1000 photo: 2728 patches, 12 heads).
# Why this size: a block under glibc's mmap threshold (32 MB, threads.keep_freed_memory) is
# taken from memory the block before it freed, where a larger one is mapped fresh from the
# kernel and page-faulted in each time; within half the 32 MB last-level cache, the softmax's
# passes over it stay off main memory; and a photo's head needs only a few blocks, so few BLAS
# calls, each of which waits for both threads (a wait that grows long when another process
# holds a core). Measured at the 0.8B tower's real shape: tools/measurements.md.
SCORE_BLOCK = 1 << 22


def frame_attention(q: np.ndarray, k: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Full (non-causal) attention within one frame: q, k, v [L, heads, hd] → [L, heads, hd]."""
    length, heads, hd = q.shape
    scale = q.dtype.type(hd**-0.5)
    out = np.empty_like(q)
    rows = max(1, SCORE_BLOCK // length)
    for h in range(heads):
        # One head's [L, hd], contiguous: each product below is then one plain BLAS call.
        q_h, k_h, v_h = (np.ascontiguousarray(a[:, h]) for a in (q, k, v))
        for start in range(0, length, rows):
            scores = q_h[start:start + rows] @ k_h.T  # [r, hd] · [hd, L] → [r, L]
            # The softmax over the frame's keys, in place: one block-sized array, whatever the steps.
            scores *= scale
            scores -= scores.max(axis=-1, keepdims=True)
            np.exp(scores, out=scores)
            scores /= scores.sum(axis=-1, keepdims=True)
            out[start:start + rows, h] = scores @ v_h  # [r, L] · [L, hd] → [r, hd]
    return out


def vision_attention(x, attn: VisionAttention, cos, sin, cu_seqlens, num_heads: int) -> np.ndarray:
    """Multi-head attention, block-diagonal: each frame of each image attends only to itself."""
    n, d = x.shape
    qkv = linear(x, attn.qkv.weight, attn.qkv.bias).reshape(n, 3, num_heads, d // num_heads)  # [N, 3, heads, hd]
    q = apply_rotary(qkv[:, 0], cos, sin)  # [N, heads, hd]
    k = apply_rotary(qkv[:, 1], cos, sin)
    v = qkv[:, 2]
    out = np.empty_like(q)
    for start, stop in zip(cu_seqlens[:-1], cu_seqlens[1:]):
        out[start:stop] = frame_attention(q[start:stop], k[start:stop], v[start:stop])
    return linear(out.reshape(n, d), attn.proj.weight, attn.proj.bias)  # [N, D]


def vision_block(x, block: VisionBlock, cos, sin, cu_seqlens, config: VisionConfig) -> np.ndarray:
    x = x + vision_attention(layer_norm(x, block.norm1), block.attn, cos, sin, cu_seqlens, config.num_heads)
    h = linear(layer_norm(x, block.norm2), block.mlp.linear_fc1.weight, block.mlp.linear_fc1.bias)  # [N, I]
    h = ACTIVATIONS[config.hidden_act](h)
    return x + linear(h, block.mlp.linear_fc2.weight, block.mlp.linear_fc2.bias)  # [N, D]


def patch_merger(x: np.ndarray, merger: PatchMerger, merge_unit: int) -> np.ndarray:
    """Norm each patch, fuse each merge × merge square (consecutive rows) into one, MLP to the text width."""
    x = layer_norm(x, merger.norm)  # [N, D]
    x = x.reshape(-1, x.shape[1] * merge_unit)  # [N / m², D·m²]
    x = gelu(linear(x, merger.linear_fc1.weight, merger.linear_fc1.bias))  # exact GELU, whatever hidden_act says
    return linear(x, merger.linear_fc2.weight, merger.linear_fc2.bias)  # [N / m², out_hidden]


# ==================================================================== the tower


class VisionTower:
    """A loaded vision tower with its preprocessing settings. Build one with :func:`load_vision`."""

    def __init__(self, config: VisionConfig, preprocessor: PreprocessorConfig, patch_embed: Linear,
                 pos_embed: np.ndarray, blocks: list[VisionBlock], merger: PatchMerger):
        self.config = config
        self.preprocessor = preprocessor
        self.patch_embed = patch_embed  # weight [D, C·T·P·P]: the Conv3d kernel, flattened
        self.pos_embed = pos_embed  # [num_position_embeddings, D]
        self.blocks = blocks
        self.merger = merger

    @property
    def dtype(self) -> np.dtype:
        """The compute dtype: float32, or float64 for a copy made with :meth:`astype`."""
        return self.pos_embed.dtype

    def astype(self, dtype) -> VisionTower:
        """A copy computing in another float dtype (to pair with ``Model.astype``): float64 checks
        the tower's algebra free of round-off."""
        return VisionTower(self.config, self.preprocessor, converted(self.patch_embed, dtype),
                           converted(self.pos_embed, dtype), converted(self.blocks, dtype),
                           converted(self.merger, dtype))

    def forward(self, pixel_values: np.ndarray, grid_thw, tap=None) -> np.ndarray:
        """pixel_values [Σ t·h·w, C·T·P·P] and grid_thw [images, 3] → features [Σ t·h·w / m², out_hidden].

        The rows of each image's features are in its merged-grid order (row-major over
        (t, h/m, w/m)), the order its ``<|image_pad|>`` tokens take. ``tap(name, array)``, if
        given, sees "pixel_values" (the input, in the tower's dtype), "patch_embed",
        "embeddings", "blocks.{i}" and "merger".
        """
        c = self.config
        grid_thw = self.check_inputs(pixel_values, grid_thw)
        with np.errstate(over="ignore"):  # a value past float32 becomes inf: refused below
            pixels = np.asarray(pixel_values, self.dtype)  # [N, C·T·P·P]
        if not np.isfinite(pixels).all():  # every feature would be NaN
            raise MinqwenError(f"pixel_values holds NaN or infinite values (in {np.dtype(self.dtype).name})")
        if tap is not None:
            tap("pixel_values", pixels)
        x = linear(pixels, self.patch_embed.weight, self.patch_embed.bias)  # [N, D]
        if tap is not None:
            tap("patch_embed", x)
        x = x + interpolated_position_embeddings(self.pos_embed, grid_thw, c.spatial_merge_size, c.num_grid_per_side)
        if tap is not None:
            tap("embeddings", x)
        cos, sin = rotary_cos_sin(grid_thw, c.spatial_merge_size, c.head_dim, c.rope_theta, self.dtype)  # [N, hd] each
        cu_seqlens = frame_boundaries(grid_thw)
        for i, block in enumerate(self.blocks):
            x = vision_block(x, block, cos, sin, cu_seqlens, c)
            if tap is not None:
                tap(f"blocks.{i}", x)
        features = patch_merger(x, self.merger, c.merge_unit)
        if tap is not None:
            tap("merger", features)
        return features

    def check_inputs(self, pixel_values, grid_thw) -> np.ndarray:
        c = self.config
        for name, value in (("grid_thw", grid_thw), ("pixel_values", pixel_values)):
            try:
                kind = np.asarray(value).dtype.kind
            except ValueError:  # a ragged nesting of lists
                kind = None
            if kind not in ("i", "u", "f"):
                raise MinqwenError(f"{name} must be an array of numbers (rows of equal length), got {value!r:.80}")
        grid = np.asarray(grid_thw)
        if grid.ndim != 2 or grid.shape[1] != 3 or not np.issubdtype(grid.dtype, np.integer) or len(grid) == 0:
            raise MinqwenError(f"grid_thw must be integers of shape [images, 3] (t, h, w), got {list(grid.shape)}")
        if (grid < 1).any():
            raise MinqwenError(f"grid_thw must be positive, got {grid.tolist()}")
        if (grid[:, 1:] % c.spatial_merge_size).any():
            raise MinqwenError(f"grid_thw heights and widths must be multiples of spatial_merge_size "
                               f"{c.spatial_merge_size}, got {grid.tolist()}")
        shape = np.shape(pixel_values)
        patches = sum(t * h * w for t, h, w in grid.tolist())  # Python ints: a huge grid cannot wrap around
        if len(shape) != 2 or shape[1] != c.patch_dim or shape[0] != patches:
            raise MinqwenError(f"pixel_values must have shape [{patches}, {c.patch_dim}] for grid_thw "
                               f"{grid.tolist()} (patches × C·T·P·P), got {list(shape)}")
        return grid.astype(np.int64)

    def token_count(self, height: int, width: int) -> int:
        """How many ``<|image_pad|>`` tokens (merged patches) an image of height × width pixels becomes."""
        height, width = target_size(height, width, self.preprocessor)
        p = self.preprocessor
        return (height // p.patch_size) * (width // p.patch_size) // self.config.merge_unit

    def encode_images(self, images) -> tuple[np.ndarray, np.ndarray]:
        """Images (paths, Pillow images or [H, W, 3] uint8 arrays) → (features, grid_thw)."""
        pixel_values, grid_thw = preprocess_images(images, self.preprocessor)
        return self.forward(pixel_values, grid_thw), grid_thw


def load_vision(path: str | Path) -> VisionTower:
    """The vision tower of a multimodal Qwen3.5 checkpoint folder: config.json's ``vision_config``,
    the image preprocessor's settings (:func:`minqwen.image.load_preprocessor_config`) and the
    ``model.visual.*`` tensors, every shape checked."""
    if not isinstance(path, (str, os.PathLike)):
        raise MinqwenError(f"load_vision takes the path of a checkpoint folder, got {type(path).__name__}")
    folder = Path(path)
    if not folder.is_dir():
        raise MinqwenError(f"{folder}: not a folder (a checkpoint is a folder with config.json and *.safetensors)")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the text model's own load reports its config's unknown fields
        text = load_config(folder)
    source = str(folder / "config.json")
    raw = read_json_object(folder / "config.json")
    config = vision_config_from_dict(raw, text.hidden_size, text.vocab_size, source)
    preprocessor = load_preprocessor_config(folder)
    for name, ours in (("patch_size", "patch_size"), ("temporal_patch_size", "temporal_patch_size"),
                       ("merge_size", "spatial_merge_size")):
        if getattr(preprocessor, name) != getattr(config, ours):
            raise MinqwenError(f"{preprocessor.source}: {name} is {getattr(preprocessor, name)} but config.json's "
                               f"vision_config.{ours} is {getattr(config, ours)}; they must agree")

    # Qwen's FP8 releases keep the tower unquantized, but a checkpoint that quantizes it is read the same way.
    ckpt = Checkpoint(folder, fp8_block=text.quantization.weight_block_size if text.quantization else None)
    prefix = "model.visual."
    if not any(n.startswith(prefix) for n in ckpt.names):
        raise MinqwenError(f"{folder}: no {prefix}* tensors: this checkpoint has no vision tower weights")
    used = set()

    def take(name, shape):
        used.add(prefix + name)
        array = ckpt.float32(prefix + name, shape)
        used.add(ckpt.fp8_scale_name(prefix + name))  # None when it is not FP8
        return array

    def linear_weights(name, out_dim, in_dim):
        return Linear(take(name + ".weight", (out_dim, in_dim)), take(name + ".bias", (out_dim,)))

    def norm_weights(name, dim):
        return LayerNorm(take(name + ".weight", (dim,)), take(name + ".bias", (dim,)))

    c = config
    D, I, merged = c.hidden_size, c.intermediate_size, c.hidden_size * c.merge_unit
    conv = take("patch_embed.proj.weight", (D, c.in_channels, c.temporal_patch_size, c.patch_size, c.patch_size))
    # The conv's kernel equals its stride: every patch meets the kernel once, so it is a matmul.
    patch_embed = Linear(conv.reshape(D, c.patch_dim), take("patch_embed.proj.bias", (D,)))
    pos_embed = take("pos_embed.weight", (c.num_position_embeddings, D))
    blocks = []
    for i in range(c.depth):
        p = f"blocks.{i}."
        blocks.append(VisionBlock(
            norm1=norm_weights(p + "norm1", D),
            attn=VisionAttention(qkv=linear_weights(p + "attn.qkv", 3 * D, D), proj=linear_weights(p + "attn.proj", D, D)),
            norm2=norm_weights(p + "norm2", D),
            mlp=VisionMLP(linear_fc1=linear_weights(p + "mlp.linear_fc1", I, D),
                          linear_fc2=linear_weights(p + "mlp.linear_fc2", D, I)),
        ))
    merger = PatchMerger(norm=norm_weights("merger.norm", D), linear_fc1=linear_weights("merger.linear_fc1", merged, merged),
                         linear_fc2=linear_weights("merger.linear_fc2", c.out_hidden_size, merged))
    unknown = sorted(n for n in ckpt.names if n.startswith(prefix) and n not in used)
    if unknown:
        shown = ", ".join(unknown[:5]) + (f", … ({len(unknown) - 5} more)" if len(unknown) > 5 else "")
        raise MinqwenError(f"{folder}: vision tensors minqwen does not know (a different vision architecture, or "
                           f"vision_config.depth too small?): {shown}")
    return VisionTower(config, preprocessor, patch_embed, pos_embed, blocks, merger)


# ==================================================================== images in the text sequence


def image_placeholder(tower: VisionTower, tokenizer) -> str:
    """What a chat template writes for one image, ``<|vision_start|><|image_pad|><|vision_end|>``,
    spelt by this checkpoint's token ids."""
    c = tower.config
    return tokenizer.decode([c.vision_start_token_id, c.image_token_id, c.vision_end_token_id],
                            skip_special_tokens=False)


def with_image_placeholders(text: str, n_images: int, tower: VisionTower, tokenizer) -> str:
    """``text`` with one image placeholder per image before it, unless it places them itself
    (how ``minqwen generate --image`` and ``golden record --image`` read a prompt)."""
    placeholder = image_placeholder(tower, tokenizer)
    return text if placeholder in text else placeholder * n_images + text


def expand_image_tokens(token_ids, grid_thw, image_token_id: int, merge: int) -> np.ndarray:
    """Give each image as many ``<|image_pad|>`` tokens as it has merged patches.

    A chat template writes one ``<|image_pad|>`` per image; the i-th becomes t·h·w / m² copies
    for the i-th image, as the reference processor does.
    """
    ids = np.asarray(token_ids, dtype=np.int64)
    grid = np.asarray(grid_thw, dtype=np.int64).reshape(-1, 3)
    at = np.flatnonzero(ids == image_token_id)
    if len(at) != len(grid):
        raise MinqwenError(
            f"the prompt has {len(at)} <|image_pad|> tokens (id {image_token_id}) but {len(grid)} images were given: "
            "write one <|vision_start|><|image_pad|><|vision_end|> per image, in the order of the images"
        )
    touching = np.flatnonzero(np.diff(at) == 1)
    if len(touching):  # expanded, they would be one run of pads, which positions read as one image
        i = int(touching[0])
        raise MinqwenError(
            f"<|image_pad|> tokens {i} and {i + 1} (of images {i} and {i + 1}) are next to each other, at positions "
            f"{at[i]} and {at[i + 1]} of the prompt: write one <|vision_start|><|image_pad|><|vision_end|> per image"
        )
    repeats = np.ones(len(ids), np.int64)
    repeats[at] = grid.prod(axis=1) // merge**2
    return np.repeat(ids, repeats)


def rope_index(token_ids, grid_thw, config: VisionConfig, start: int = 0) -> tuple[np.ndarray, int]:
    """3-D M-RoPE positions [3, T] (t, row, column) for ids whose images are already expanded,
    and the position the next token takes.

    As transformers' ``get_rope_index``: text runs count up in all three rows; a run of
    ``<|image_pad|>`` is one image: with p the position it starts at, its tokens sit at
    (p + frame, p + row, p + column) on its merged grid, and the text after it starts at
    p + max(rows, columns), whatever its frames. The next token after the ids takes the largest
    position + 1 (for a one-frame image, where the text after it would start).
    ``start`` is where the sequence begins (``cache.position + cache.rope_delta``).
    """
    ids = np.asarray(token_ids, dtype=np.int64)
    grid = np.asarray(grid_thw, dtype=np.int64).reshape(-1, 3)
    m = config.spatial_merge_size
    if (ids == config.video_token_id).any():
        raise MinqwenError(f"the prompt holds <|video_pad|> tokens (id {config.video_token_id}); minqwen reads images, "
                           "not videos")
    is_image = ids == config.image_token_id
    runs = np.split(np.arange(len(ids)), np.flatnonzero(np.diff(is_image.astype(np.int8))) + 1)
    positions = np.empty((3, len(ids)), np.int64)
    current, image = start, 0
    for run in runs:
        if len(run) == 0:
            continue
        if not is_image[run[0]]:
            positions[:, run] = current + np.arange(len(run))  # text: the same index in all three rows
            current += len(run)
            continue
        if image >= len(grid):
            raise MinqwenError(f"the prompt has more runs of <|image_pad|> tokens than the {len(grid)} images given")
        t, h, w = grid[image]
        frames, rows, cols = np.meshgrid(np.arange(t), np.arange(h // m), np.arange(w // m), indexing="ij")
        if len(run) != frames.size:
            raise MinqwenError(
                f"image {image} needs {frames.size} <|image_pad|> tokens (one per merged patch of its {t}×{h}×{w} "
                f"grid) but the prompt has a run of {len(run)}"
            )
        positions[:, run] = np.stack([frames.ravel(), rows.ravel(), cols.ravel()]) + current
        current += max(h, w) // m
        image += 1
    if image != len(grid):
        raise MinqwenError(f"{len(grid)} images were given but the prompt has {image} runs of <|image_pad|> tokens")
    # The reference's rope delta is (largest position + 1) − T: past `current` only when an image
    # has more frames than merged rows and columns, and no text after it reaches them.
    return positions, int(positions.max()) + 1 if len(ids) else current


def place_image_features(inputs_embeds: np.ndarray, token_ids, features: np.ndarray, image_token_id: int) -> np.ndarray:
    """The embeddings with each ``<|image_pad|>`` row replaced by the next feature row, in order."""
    ids = np.asarray(token_ids)
    mask = ids == image_token_id  # [T]
    if int(mask.sum()) != len(features):
        raise MinqwenError(
            f"image features and image tokens do not match: the prompt has {int(mask.sum())} <|image_pad|> tokens "
            f"(id {image_token_id}) but the images give {len(features)} feature rows"
        )
    out = inputs_embeds.copy()
    out[mask] = features
    return out


@dataclass
class MultimodalInputs:
    """What the text model needs to read a prompt with images."""

    token_ids: np.ndarray  # [T]: each image's <|image_pad|> expanded to one token per merged patch
    inputs_embeds: np.ndarray  # [T, H]: token embeddings, image features at the image tokens
    position_ids: np.ndarray  # [3, T]: M-RoPE (t, row, column)
    rope_delta: int  # set cache.rope_delta to this once the prompt is in the cache
    grid_thw: np.ndarray  # [images, 3]


def multimodal_inputs(model, tower: VisionTower, token_ids, images, cache=None, tap=None) -> MultimodalInputs:
    """Embeddings, 3-D positions and rope delta for ``token_ids`` holding one ``<|image_pad|>`` per image.

    ``images``: paths, Pillow images or [H, W, 3] uint8 arrays, one per ``<|image_pad|>``, in
    order. With a ``cache`` the ids continue it: positions start at
    ``cache.position + cache.rope_delta`` (so images may arrive in any turn of a chat).
    ``tap``: handed to the tower (:meth:`VisionTower.forward`).
    """
    from .generate import check_model  # here: generate.py imports this module

    check_model(model)
    if not isinstance(tower, VisionTower):
        raise MinqwenError(f"tower must be a vision tower (minqwen.vision.load_vision(folder)), got "
                           f"{type(tower).__name__}")
    if cache is not None and not isinstance(cache, Cache):
        raise MinqwenError(f"cache must be the model's cache (model.new_cache()) or None, got {type(cache).__name__}")
    c = tower.config
    if c.out_hidden_size != model.config.hidden_size:
        raise MinqwenError(f"the vision tower outputs {c.out_hidden_size} features per token but the text model's "
                           f"hidden_size is {model.config.hidden_size}: are they from the same checkpoint?")
    ids = model.checked_token_ids(token_ids)
    images = image_list(images)
    # expand_image_tokens checks this too; here it fails before the images are encoded
    n_pads = int((ids == c.image_token_id).sum())
    if n_pads != len(images):
        raise MinqwenError(
            f"the prompt has {n_pads} <|image_pad|> tokens (id {c.image_token_id}) but {len(images)} images were "
            "given: write one <|vision_start|><|image_pad|><|vision_end|> per image, in the order of the images"
        )
    past, start = (cache.position, cache.position + cache.rope_delta) if cache is not None else (0, 0)
    if images:
        pixel_values, grid_thw = preprocess_images(images, tower.preprocessor)
        _check_images_fit_the_context(model, ids, grid_thw, c, past,  # before the tower's long work
                                      tower.preprocessor.source)
        features = tower.forward(pixel_values, grid_thw, tap)
    else:
        features, grid_thw = np.zeros((0, c.out_hidden_size), np.float32), np.zeros((0, 3), np.int64)
    ids = expand_image_tokens(ids, grid_thw, c.image_token_id, c.spatial_merge_size)
    embeds = model.embed(ids)  # [T, H]
    embeds = place_image_features(embeds, ids, features.astype(model.dtype), c.image_token_id)
    position_ids, next_position = rope_index(ids, grid_thw, c, start)
    # After the prompt the cache has consumed past + T tokens, and the next position is next_position.
    return MultimodalInputs(ids, embeds, position_ids, next_position - (past + len(ids)), grid_thw)


def _check_images_fit_the_context(model, ids: np.ndarray, grid_thw: np.ndarray, c, past: int,
                                  preprocessor_source: str) -> None:
    """Refuse a prompt whose images, once expanded to their tokens, pass the model's context.

    Checked between preprocessing and the tower: the tower's attention grows with the square
    of an image's patches, so a huge image would otherwise take minutes before the text
    model refused the length.
    """
    per_image = [int(t * h * w) // c.merge_unit for t, h, w in grid_thw]  # merged patches: its tokens
    total = past + len(ids) - len(per_image) + sum(per_image)  # each <|image_pad|> becomes its image's tokens
    limit = model.config.max_position_embeddings
    if total > limit:
        sizes = ", ".join(f"{n} tokens ({int(h)} × {int(w)} patches)" for n, (_, h, w) in zip(per_image, grid_thw))
        raise MinqwenError(
            f"the sequence would reach {total} tokens, beyond the model's context of {limit} (config "
            f"max_position_embeddings): its images take {sizes}. Give smaller images, or lower the "
            f"preprocessor's max_pixels (size.longest_edge in {preprocessor_source})"
        )


def prefill(model, tower: VisionTower, token_ids, images, cache, last_only: bool = True) -> np.ndarray:
    """Feed a prompt with images into ``cache`` and set its rope delta; return the logits.

    Afterwards plain ``model.forward(ids, cache)`` continues with the right positions.
    """
    if not isinstance(cache, Cache):  # prefill's whole point is the cache it leaves behind
        raise MinqwenError(f"prefill needs the cache to fill (model.new_cache()), got {type(cache).__name__}")
    inputs = multimodal_inputs(model, tower, token_ids, images, cache)
    logits = model.forward(cache=cache, inputs_embeds=inputs.inputs_embeds, position_ids=inputs.position_ids,
                           last_only=last_only)
    cache.rope_delta = inputs.rope_delta
    return logits
