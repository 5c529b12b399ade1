"""Solutions to chapter 5's exercises. Run: python walkthrough/solutions/05_deltanet.py"""

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # walkthrough/, for `course`
import course  # noqa: E402, F401  (finds minqwen in a fresh clone; one thread)
from minqwen.deltanet import unit_lower_inverse  # noqa: E402


# Exercise 5.1 -------------------------------------------------------------------------------
def exercise_5_1(A):
    n = len(A)
    inv = np.eye(n)
    for i in range(1, n):
        inv[i] -= A[i, :i] @ inv[:i]  # row i = e_i − Σ_{j<i} A[i, j] · row j
    return inv


rng = np.random.default_rng(0)
A = np.tril(rng.normal(size=(6, 6)), -1)
np.testing.assert_allclose(exercise_5_1(A), np.linalg.inv(np.eye(6) + A), atol=1e-10)
np.testing.assert_allclose(exercise_5_1(A), unit_lower_inverse(A), atol=1e-12)
print("Exercise 5.1: forward substitution gives (I + A)⁻¹, as minqwen's unit_lower_inverse does.")

# Exercise 5.2 -------------------------------------------------------------------------------
# L(S) = ½‖Sᵀk − v‖²  ⇒  ∇_S L = k (Sᵀk − v)ᵀ, so S − β∇L = S + β k (v − Sᵀk)ᵀ: the delta rule.
Dk, Dv, beta = 6, 4, 0.7
S, k, v = rng.normal(size=(Dk, Dv)), rng.normal(size=Dk), rng.normal(size=Dv)
k /= np.linalg.norm(k)


def loss(S):
    return 0.5 * np.sum((S.T @ k - v) ** 2)


grad = np.outer(k, S.T @ k - v)
numeric = np.zeros_like(S)
for i in range(Dk):
    for j in range(Dv):
        bump = np.zeros_like(S)
        bump[i, j] = 1e-6
        numeric[i, j] = (loss(S + bump) - loss(S - bump)) / 2e-6
np.testing.assert_allclose(grad, numeric, atol=1e-6)
np.testing.assert_allclose(S - beta * grad, S + beta * np.outer(k, v - S.T @ k), atol=1e-12)
print("Exercise 5.2: the gradient k(Sᵀk − v)ᵀ matches finite differences, and one step of size β is the delta rule.")
