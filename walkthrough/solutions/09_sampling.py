"""Solutions to chapter 9's exercises. Run: python walkthrough/solutions/09_sampling.py"""

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # walkthrough/, for `course`
import course  # noqa: E402
import minqwen  # noqa: E402
from minqwen.tokenizer import Tokenizer  # noqa: E402

folder = course.embedded_model()
model, tok = minqwen.load(folder), Tokenizer(folder)
logits = model.forward(tok.encode("def fibonacci(n):"), last_only=True)[-1]


# Exercise 9.1 -------------------------------------------------------------------------------
def exercise_9_1(logits, generated, penalty):
    logits = logits.copy()
    ids, counts = np.unique(np.asarray(generated), return_counts=True)
    logits[ids] -= penalty * counts
    return logits


out = exercise_9_1(logits, [7, 7, 7, 9], 0.5)
assert np.isclose(logits[7] - out[7], 1.5) and np.isclose(logits[9] - out[9], 0.5)
print("Exercise 9.1: id 7 (generated 3 times) loses 1.5, id 9 (once) loses 0.5; a presence penalty of 0.5 "
      "would take 0.5 from both.")


# Exercise 9.2 -------------------------------------------------------------------------------
def softmax(x):
    z = np.exp(x - x.max())
    return z / z.sum()


def top_k(logits, k):
    return np.where(logits < np.sort(logits)[-k], -np.inf, logits)


def top_p(logits, p):
    order = np.argsort(-logits, kind="stable")
    probs = softmax(logits)[order]
    out = logits.copy()
    out[order[np.cumsum(probs) - probs >= p]] = -np.inf
    return out


def exercise_9_2(logits):
    k_then_p = set(np.flatnonzero(np.isfinite(top_p(top_k(logits, 5), 0.5))).tolist())
    p_then_k = set(np.flatnonzero(np.isfinite(top_k(top_p(logits, 0.5), 5))).tolist())
    return k_then_p, p_then_k


k_then_p, p_then_k = exercise_9_2(logits)
print(f"Exercise 9.2: top-k then top-p keeps {len(k_then_p)} tokens, top-p then top-k keeps {len(p_then_k)}.")
print("  After top-k, top-p renormalises over the k survivors: each one's probability grows, so the 0.5 of mass")
print("  is reached sooner and top-k-first can only keep fewer (or as many) tokens. That is why the order is fixed.")
assert k_then_p <= p_then_k
