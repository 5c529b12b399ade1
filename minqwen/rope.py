"""Rotary position embeddings: partial rotation and the interleaved M-RoPE layout.

Three ideas stack up here.

1. **RoPE** rotates pairs of query/key dims by an angle ``position × inv_freq[i]``, so that the
   dot product of a query and a key depends only on their distance. Qwen pairs dim ``i`` with
   dim ``i + R/2`` (the "rotate half" layout), not neighbours.
2. **Partial rotary**: only the first ``R = head_dim × partial_rotary_factor`` dims of each head
   are rotated (64 of 256 in the real models); the rest carry no position at all.
3. **M-RoPE**: each token has three positions — time, height, width — so that image patches
   can be placed on a grid. Each of the R/2 frequencies listens to one of the three, chosen
   *interleaved*: frequency ``i`` uses height if ``i % 3 == 1`` (for the first
   ``3·mrope_section[1]`` frequencies), width if ``i % 3 == 2`` (for the first
   ``3·mrope_section[2]``), and time otherwise. For text the three positions are equal and
   M-RoPE is plain RoPE.
"""

import numpy as np


def inverse_frequencies(theta: float, rotary_dim: int) -> np.ndarray:
    """inv_freq[i] = theta^(-2i / R) for i < R/2, in float32 like the reference."""
    exponents = np.arange(0, rotary_dim, 2, dtype=np.float32) / np.float32(rotary_dim)  # [R/2]
    return (1.0 / (np.float64(theta) ** exponents.astype(np.float64))).astype(np.float32)


def text_position_ids(start: int, length: int) -> np.ndarray:
    """Positions for plain text: the same running index in all three M-RoPE rows."""
    positions = np.arange(start, start + length, dtype=np.int64)  # [T]
    return np.broadcast_to(positions, (3, length))  # [3, T]


def mrope_cos_sin(position_ids: np.ndarray, inv_freq: np.ndarray, mrope_section) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin tables [T, R] for 3-row position ids [3, T]."""
    # angles[axis, t, i] = position_ids[axis, t] · inv_freq[i]
    angles = position_ids[..., None].astype(np.float32) * inv_freq  # [3, T, R/2]
    chosen = angles[0].copy()  # start from time, overwrite the height and width frequencies
    for axis in (1, 2):
        # The reference's slice: start at `axis`, step 3, stop at 3·section. A section that
        # does not fit R/2 is simply cut at the end of the array, as in the reference.
        picked = slice(axis, 3 * mrope_section[axis], 3)
        chosen[:, picked] = angles[axis][:, picked]
    emb = np.concatenate([chosen, chosen], axis=-1)  # [T, R]: dim i and i + R/2 share an angle
    return np.cos(emb), np.sin(emb)


def apply_rotary(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """Rotate the first R dims of every head of x [T, heads, D]; dims R..D pass through."""
    rotary_dim = cos.shape[-1]
    half = rotary_dim // 2
    rot, rest = x[..., :rotary_dim], x[..., rotary_dim:]  # [T, heads, R], [T, heads, D - R]
    cos, sin = cos[:, None, :], sin[:, None, :]  # [T, 1, R]: the same angles for every head
    # rotate_half pairs dim i with dim i + R/2: (a, b) → (-b, a)
    rotated_half = np.concatenate([-rot[..., half:], rot[..., :half]], axis=-1)  # [T, heads, R]
    return np.concatenate([rot * cos + rotated_half * sin, rest], axis=-1)
