"""Solutions to chapter 2's exercises. Run: python walkthrough/solutions/02_embeddings_and_norm.py"""

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # walkthrough/, for `course`
import course  # noqa: E402

_, expected = course.fixture("text_tied_fp32")
x = expected["hidden.0"].astype(np.float64)
w = np.zeros(x.shape[-1])


def rms_norm(x, w, eps=1e-6):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * (1 + w)


# Exercise 2.1 -------------------------------------------------------------------------------
# rms_norm(c·x) = c·x / sqrt(c²·mean(x²) + ε): the c cancels while c²·mean(x²) ≫ ε.
def exercise_2_1(x):
    reference = rms_norm(x, w)
    smallest = None
    for k in range(13):
        c = 10.0**-k
        if np.abs(rms_norm(c * x, w) - reference).max() < 1e-3:
            smallest = c
        else:
            break
    return smallest


for c in (0.1, 1.0, 1e3):
    assert np.abs(rms_norm(c * x, w) - rms_norm(x, w)).max() < 1e-3
c_min = exercise_2_1(x)
mean_square = np.mean(x * x, -1).min()
print(f"Exercise 2.1: normalised to 1e-3 down to c = {c_min:g}. The culprit is ε under the square root: the")
print(f"  relative error is about ε / (2·c²·mean(x²)), and the smallest row's mean(x²) is {mean_square:.2f} here, so")
print("  the error passes 1e-3 somewhere between c = 0.1 and c = 0.01. Far below, ε dominates and")
print("  the output shrinks with x instead of being normalised: ε is what keeps a zero vector from dividing by 0.")

# Exercise 2.2 -------------------------------------------------------------------------------
def layer_norm(x, w, eps=1e-6):
    centred = x - x.mean(-1, keepdims=True)
    return centred / np.sqrt(np.mean(centred**2, -1, keepdims=True) + eps) * (1 + w)


zero_mean = x - x.mean(-1, keepdims=True)
np.testing.assert_allclose(layer_norm(zero_mean, w), rms_norm(zero_mean, w), atol=1e-12)
gap = np.abs(layer_norm(x, w) - rms_norm(x, w)).max()
print(f"Exercise 2.2: equal on zero-mean vectors; on hidden.0 they differ by up to {gap:.3f}, because the")
print("  residual stream's rows do not have zero mean.")
