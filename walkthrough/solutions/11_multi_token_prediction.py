"""Solutions to chapter 11's exercises. Run: python walkthrough/solutions/11_multi_token_prediction.py"""

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # walkthrough/, for `course`
import course  # noqa: E402, F401  (paths, and one thread, like every chapter)


# Exercise 11.1 ------------------------------------------------------------------------------
def exercise_11_1(a, k):
    # Draft m is emitted only if drafts 1 … m are all accepted: probability a^m. The verify
    # always adds one token of its own (a correction or the bonus). Sum: 1 + a + … + a^k.
    return sum(a**m for m in range(k + 1))


assert np.isclose(exercise_11_1(0.7, 3), 1 + 0.7 + 0.49 + 0.343)
print(f"Exercise 11.1: {exercise_11_1(0.7, 3):.3f} tokens per verify at a = 0.7, k = 3 "
      f"(at most k + 1 = 4; a verify of one draft gives {exercise_11_1(0.7, 1):.2f}).")


# Exercise 11.2 ------------------------------------------------------------------------------
def exercise_11_2(p, q):
    # Draw x from q and accept it with probability min(1, p(x)/q(x)): mass min(p(x), q(x)).
    accepted = np.minimum(p, q)
    rejected = 1.0 - accepted.sum()  # = Σ max(q − p, 0) = Σ max(p − q, 0)
    residual = np.maximum(p - q, 0.0)
    if residual.sum() == 0:  # p == q: nothing is ever rejected
        return accepted
    return accepted + rejected * residual / residual.sum()


rng = np.random.default_rng(0)
p, q = rng.dirichlet(np.ones(6)), rng.dirichlet(np.ones(6))
for case_p, case_q in ((p, q), (p, np.eye(6)[2]), (np.array([0.5, 0.5, 0, 0, 0, 0]), q), (p, p)):
    np.testing.assert_allclose(exercise_11_2(case_p, case_q), case_p, atol=1e-12)
print("Exercise 11.2: the emitted token is distributed as p for a random q, a one-hot q (argmax drafts), "
      "a q with mass where p has none, and q = p.")
