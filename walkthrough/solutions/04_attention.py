"""Solutions to chapter 4's exercises. Run: python walkthrough/solutions/04_attention.py"""

import numpy as np


def attention(q, k, v):
    """The chapter's causal GQA attention: q [T, Hq, D], k and v [S, Hkv, D]."""
    T, S = len(q), len(k)
    group = q.shape[1] // k.shape[1]
    k, v = np.repeat(k, group, axis=1), np.repeat(v, group, axis=1)
    scores = np.einsum("thd,shd->hts", q, k) / np.sqrt(q.shape[-1])
    scores = np.where(np.arange(S)[None, :] <= (S - T + np.arange(T))[:, None], scores, -np.inf)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    return np.einsum("hts,shd->thd", probs / probs.sum(-1, keepdims=True), v)


# Exercise 4.1 -------------------------------------------------------------------------------
# Online softmax: for each query keep the running max m, the running sum l of exp(score − m) and
# the running weighted sum acc of values. A new block with a larger max rescales both by exp(m_old − m_new).
def exercise_4_1(q, k, v, block=4):
    T, S = len(q), len(k)
    group = q.shape[1] // k.shape[1]
    k, v = np.repeat(k, group, axis=1), np.repeat(v, group, axis=1)
    Hq, D = q.shape[1], q.shape[2]
    m = np.full((Hq, T), -np.inf)
    l = np.zeros((Hq, T))
    acc = np.zeros((Hq, T, D))
    query_pos = S - T + np.arange(T)
    for start in range(0, S, block):
        kb, vb = k[start : start + block], v[start : start + block]
        scores = np.einsum("thd,shd->hts", q, kb) / np.sqrt(D)  # [Hq, T, B]
        key_pos = start + np.arange(len(kb))
        scores = np.where(key_pos[None, :] <= query_pos[:, None], scores, -np.inf)
        m_new = np.maximum(m, scores.max(-1))
        safe = np.where(np.isfinite(m_new), m_new, 0.0)  # a query that has seen no key yet
        rescale = np.exp(np.where(np.isfinite(m), m - safe, -np.inf))
        p = np.exp(scores - safe[..., None])
        l = l * rescale + p.sum(-1)
        acc = acc * rescale[..., None] + np.einsum("hts,shd->htd", p, vb)
        m = m_new
    return (acc / l[..., None]).transpose(1, 0, 2)  # [T, Hq, D]


rng = np.random.default_rng(0)
q, k, v = rng.normal(size=(21, 4, 16)), rng.normal(size=(21, 2, 16)), rng.normal(size=(21, 2, 16))
np.testing.assert_allclose(exercise_4_1(q, k, v), attention(q, k, v), rtol=1e-9, atol=1e-12)
np.testing.assert_allclose(exercise_4_1(q[-3:], k, v, block=5), attention(q[-3:], k, v), rtol=1e-9, atol=1e-12)
print("Exercise 4.1: online softmax over key blocks equals the plain softmax (also for 3 queries after 18 cached keys).")


# Exercise 4.2 -------------------------------------------------------------------------------
def exercise_4_2(tokens=32768, layers=6, head_dim=256, bytes_per_number=2):
    return tuple(layers * 2 * kv_heads * head_dim * tokens * bytes_per_number for kv_heads in (8, 2, 1))


mha, gqa, mqa = exercise_4_2()
print(f"Exercise 4.2: at 32,768 tokens, bf16: 8 kv heads {mha / 2**20:.0f} MiB, 2 kv heads {gqa / 2**20:.0f} MiB, "
      f"1 kv head {mqa / 2**20:.0f} MiB")
assert (mha, gqa, mqa) == (1536 * 2**20, 384 * 2**20, 192 * 2**20)
