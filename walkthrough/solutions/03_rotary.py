"""Solutions to chapter 3's exercises. Run: python walkthrough/solutions/03_rotary.py"""

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # walkthrough/, for `course`
import course  # noqa: E402
from minqwen.config import load_config  # noqa: E402


def inv_freq(theta, R):
    return 1.0 / theta ** (np.arange(0, R, 2) / R)


def rotate_half_layout(x, positions, theta):  # Qwen: pairs (i, i + R/2)
    R = x.shape[-1]
    a_ = positions[:, None] * inv_freq(theta, R)
    a, b = x[..., : R // 2], x[..., R // 2 :]
    return np.concatenate([a * np.cos(a_) - b * np.sin(a_), a * np.sin(a_) + b * np.cos(a_)], -1)


# Exercise 3.1 -------------------------------------------------------------------------------
def rotate_neighbours(x, positions, theta):  # GPT-J: pairs (2i, 2i + 1)
    R = x.shape[-1]
    angles = positions[:, None] * inv_freq(theta, R)
    even, odd = x[..., 0::2], x[..., 1::2]
    out = np.empty_like(x)
    out[..., 0::2] = even * np.cos(angles) - odd * np.sin(angles)
    out[..., 1::2] = even * np.sin(angles) + odd * np.cos(angles)
    return out


rng = np.random.default_rng(0)
q, k = rng.normal(size=(1, 64)), rng.normal(size=(1, 64))


def score(rot, m, n):
    return (rot(q, np.array([m]), 1e4) @ rot(k, np.array([n]), 1e4).T)[0, 0]


np.testing.assert_allclose(score(rotate_neighbours, 10, 3), score(rotate_neighbours, 110, 103), rtol=1e-9)
x = rng.normal(size=(5, 64))
different = np.abs(rotate_neighbours(x, np.arange(5), 1e4) - rotate_half_layout(x, np.arange(5), 1e4)).max()
assert different > 0.1
print(f"Exercise 3.1: both layouts depend only on m − n, but rotate different pairs: the vectors differ by up "
      f"to {different:.2f}.")

# Exercise 3.2 -------------------------------------------------------------------------------
def exercise_3_2():
    c = load_config(course.FIXTURES / "text_tied_fp32")
    n = c.rotary_dim // 2  # 16 × 0.25 = 4 rotated dims → 2 frequencies
    axes = ["T"] * n
    for a, letter in ((1, "H"), (2, "W")):
        for i in range(a, min(3 * c.mrope_section[a], n), 3):
            axes[i] = letter
    return "".join(axes)


print("Exercise 3.2: text_tied_fp32 has", len(exercise_3_2()), "frequencies, listening to", exercise_3_2())
assert exercise_3_2() == "TH"
