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
   M-RoPE is plain RoPE. Qwen3.5's (11, 11, 10) over R/2 = 32 frequencies: t h w t h w … t h.
"""

import math

import numba
import numpy as np


def inverse_frequencies(theta: float, rotary_dim: int) -> np.ndarray:
    """inv_freq[i] = theta^(-2i / R) for i < R/2, rounded as the reference rounds it.

    (For an odd R, which no released model has but the reference allows, there are ⌈R/2⌉
    frequencies, one for each even 2i < R, and R + 1 dims turn.)

    transformers computes 1 / theta^(2i/R) in float32: the power rounded to float32, then
    the reciprocal rounded again. Rounding theta^(-2i/R) once puts a third to a half of the
    frequencies one float32 step off (15 of Qwen3.5's 32); the angle position × inv_freq then
    drifts with the position (on a small model with Qwen3.5's rotary, logits 1e-3 apart at
    position 100,000).
    This equals torch's portable float32 power everywhere, and Qwen3.5's real sizes on every
    CPU; for some other (theta, R), torch's AVX2/AVX-512 power rounds a few frequencies one
    step the other way, so there transformers itself differs from CPU to CPU.
    """
    exponents = np.arange(0, rotary_dim, 2, dtype=np.float32) / np.float32(rotary_dim)  # [R/2]
    with np.errstate(over="ignore"):  # a huge theta overflows float32 to inf: a frequency of 0, as in torch
        power = (np.float64(theta) ** exponents.astype(np.float64)).astype(np.float32)  # theta^(2i/R), float32
    return np.float32(1.0) / power


def yarn_mscale(scale: float, m: float = 1.0) -> float:
    """YaRN's attention temperature for a context stretched ``scale`` times: 0.1·m·ln(scale) + 1, or 1."""
    return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0


def yarn_inverse_frequencies(theta: float, rotary_dim: int, yarn) -> tuple[np.ndarray, float]:
    """YaRN: (inv_freq [R/2], attention factor), as transformers 5.23.0 computes them.

    Fast-turning frequencies (many rotations within the original context) are kept;
    slow ones (less than one rotation) are divided by ``factor``, so positions beyond the
    original context look like positions it was trained on; a linear ramp blends the two
    between ``beta_fast`` and ``beta_slow`` rotations. The scaling is static: the same
    frequencies at every position. The attention factor multiplies cos and sin, so it
    scales only the rotated dims of q and k. The correction range is measured on the rotary
    dims (head_dim × partial factor), not on head_dim.
    """
    factor = yarn.factor
    attention_factor = yarn.attention_factor
    if attention_factor is None:
        # mscale alone changes nothing: the reference uses it only together with mscale_all_dim
        if yarn.mscale and yarn.mscale_all_dim:
            attention_factor = yarn_mscale(factor, yarn.mscale) / yarn_mscale(factor, yarn.mscale_all_dim)
        else:
            attention_factor = yarn_mscale(factor)

    def correction_dim(rotations):
        """The frequency index that turns ``rotations`` times over the original context."""
        return rotary_dim * math.log(yarn.original_max_position_embeddings / (rotations * 2 * math.pi)) / (
            2 * math.log(theta))

    low, high = correction_dim(yarn.beta_fast), correction_dim(yarn.beta_slow)
    if yarn.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, rotary_dim - 1)
    if low == high:
        high += 0.001  # the reference's guard against a zero-width ramp

    exponents = np.arange(0, rotary_dim, 2, dtype=np.float32) / np.float32(rotary_dim)  # [R/2]
    pos_freqs = (np.float64(theta) ** exponents.astype(np.float64)).astype(np.float32)
    extrapolation = np.float32(1.0) / pos_freqs  # the original frequencies
    interpolation = np.float32(1.0) / (np.float32(factor) * pos_freqs)  # stretched by factor
    ramp = np.clip((np.arange(rotary_dim // 2, dtype=np.float32) - np.float32(low)) / np.float32(high - low), 0, 1)
    keep = np.float32(1.0) - ramp  # 1: keep the original frequency, 0: fully interpolate
    inv_freq = interpolation * (np.float32(1.0) - keep) + extrapolation * keep
    return inv_freq.astype(np.float32), float(attention_factor)


def text_position_ids(start: int, length: int) -> np.ndarray:
    """Positions for plain text: the same running index in all three M-RoPE rows."""
    positions = np.arange(start, start + length, dtype=np.int64)  # [T]
    return np.broadcast_to(positions, (3, length))  # [3, T]


def mrope_cos_sin(position_ids: np.ndarray, inv_freq: np.ndarray, mrope_section,
                  attention_factor: float = 1.0, dtype=np.float32) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin tables [T, R] for 3-row position ids [3, T] (both scaled by YaRN's attention factor).

    ``dtype`` is the model's compute dtype: float32 rounds each angle as the reference does, and a
    float64 model's angles are exact (the frequencies themselves stay the float32 values they are).
    """
    # angles[axis, t, i] = position_ids[axis, t] · inv_freq[i]
    angles = position_ids[..., None].astype(dtype) * inv_freq.astype(dtype)  # [3, T, R/2]
    chosen = angles[0].copy()  # start from time, overwrite the height and width frequencies
    for axis in (1, 2):
        # The reference's slice: start at `axis`, step 3, stop at 3·section. A section that
        # does not fit R/2 is simply cut at the end of the array, as in the reference.
        picked = slice(axis, 3 * mrope_section[axis], 3)
        chosen[:, picked] = angles[axis][:, picked]
    emb = np.concatenate([chosen, chosen], axis=-1)  # [T, R]: dim i and i + R/2 share an angle
    if attention_factor != 1.0:
        factor = np.asarray(attention_factor, dtype=dtype)
        return np.cos(emb) * factor, np.sin(emb) * factor
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


@numba.njit(inline="always")
def rotate_row(x, cos, sin, result):
    """:func:`apply_rotary` for one head's row x [D] and one token's cos, sin [R], into result [D].

    The same float32 steps as apply_rotary's (a product with cos, one with the rotated half and
    sin, their sum; no fused multiply-add), so the same values bit for bit: attention's decode
    step calls it.
    """
    rotary_dim = cos.size
    half = rotary_dim // 2
    for i in range(half):  # (a, b) → (a cos − b sin, b cos + a sin), b = x[i + R/2]
        result[i] = x[i] * cos[i] + -x[i + half] * sin[i]
    for i in range(half, rotary_dim):
        result[i] = x[i] * cos[i] + x[i - half] * sin[i]
    for i in range(rotary_dim, x.size):
        result[i] = x[i]
