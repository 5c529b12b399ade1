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
# # Chapter 11 · Multi-token prediction and speculative decoding
#
# Qwen3.5 checkpoints carry a small extra network, the **MTP head** (`mtp.*`), trained with
# the model to predict not the next token but the one after it. Serving engines use it to
# decode faster *without changing a single output token*:
#
# 1. **draft** a few tokens cheaply with the head;
# 2. **verify** them all with one forward pass of the real model;
# 3. keep the ones the model agrees with, plus one token of its own, and **roll back** the
#    rest.
#
# This chapter builds each step on the embedded model (trained with its head) and checks it
# against `minqwen.mtp` — and, at the end, shows that the speculative output *is* the plain
# output.

# %%
import time

import numpy as np

import course
import minqwen
from minqwen.deltanet import DeltaNetState
from minqwen.generate import generate_ids
from minqwen.linear import linear_few_rows
from minqwen.mtp import (
    MtpCache,
    SpeculativeStats,
    accept,
    draft,
    keep_first,
    load_mtp,
    mtp_logits,
    record_mtp,
    speculative_generate,
    verify,
)
from minqwen.sampling import SamplingParams
from minqwen.tokenizer import Tokenizer

np.set_printoptions(precision=4, suppress=True, linewidth=110)
folder = course.embedded_model()
model, tok = minqwen.load(folder), Tokenizer(folder)
head = load_mtp(folder, model)
c = model.config

# %% [markdown]
# ## Why predict two tokens
#
# A decode step multiplies one vector by every weight matrix of the model. The arithmetic is
# tiny; reading the weights from memory is what takes the time. So a forward pass over
# **two** positions — two vectors against the same matrices — can cost about as much as one,
# *if* each weight is read once for both. That is the whole opportunity: if we knew the next
# two tokens, one pass could check both.
#
# BLAS does not read each weight once for two rows (its GEMM streams the matrix through
# blocks made for many rows); minqwen's few-row kernel does. Here on one big matrix (the
# timings are printed, not asserted: they depend on the machine):

# %%
rng = np.random.default_rng(0)
W = rng.standard_normal((16384, 1024)).astype(np.float32)  # 64 MB: larger than any cache
x1, x2 = rng.standard_normal((1, 1024)).astype(np.float32), rng.standard_normal((2, 1024)).astype(np.float32)
np.testing.assert_allclose(linear_few_rows(x2, W), x2 @ W.T, rtol=1e-4, atol=1e-4)  # the same product


def best_of(f, n=5):
    times = []
    for _ in range(n):
        start = time.perf_counter()
        f()
        times.append(time.perf_counter() - start)
    return min(times)


one = best_of(lambda: x1 @ W.T)
print(f"1 row, BLAS: {one * 1e3:.1f} ms   2 rows, BLAS: {best_of(lambda: x2 @ W.T) * 1e3:.1f} ms   "
      f"few-row kernel, 1 row: {best_of(lambda: linear_few_rows(x1, W)) * 1e3:.1f} ms, "
      f"2 rows: {best_of(lambda: linear_few_rows(x2, W)) * 1e3:.1f} ms")

# %% [markdown]
# ## The MTP head, by hand
#
# For position `j` the head reads what the main model knows after token `j` — its output
# `h[j]` **after the final norm** — and the embedding of token `j + 1`, the token the main
# model has just chosen there:
#
# ```
# x = fc([ pre_fc_norm_embedding(embed(t[j+1])) ; pre_fc_norm_hidden(h[j]) ])    # [2H] → [H]
# x = one full-attention decoder layer (its own KV cache), at position j
# logits for t[j+2] = lm_head(norm(x))                                            # the shared head
# ```
#
# Both pre-norms are zero-centred RMSNorms (`1 + w`, chapter 2). The **embedding comes
# first** in the concatenation: a port that swaps the halves still produces text — its drafts
# are just almost never accepted. We compute the input of the decoder layer ourselves and
# compare with minqwen's recorded taps.

# %%
def rms_norm(x, w, eps=c.rms_norm_eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * (1 + w)


with open(course.__file__, encoding="utf-8") as source:
    text = source.read()[:1500]  # Python the model never saw: course.py
ids = tok.encode(text)[:200]
hidden = model.hidden_states(ids)  # [T, H], after the final norm
embedded = model.embed_tokens[ids[1:]].astype(np.float32)  # embed(t[j+1]) for j = 0 … T−2
mine = np.concatenate([rms_norm(embedded, head.pre_fc_norm_embedding),
                       rms_norm(hidden[:-1], head.pre_fc_norm_hidden)], axis=-1) @ head.fc.T.astype(np.float32)
taps = record_mtp(model, head, ids)
np.testing.assert_allclose(mine, taps["mtp.fc"], rtol=1e-4, atol=1e-4)
print("fc input: [embedding ; hidden] →", mine.shape, "matches minqwen's tap mtp.fc")

# %% [markdown]
# Each row of `mtp_logits` predicts the token two places on. How good are those guesses on
# text the model never saw? We count how often the head's top choice for `t[j+2]` is right,
# and — what speculative decoding actually needs — how often it equals the main model's own
# top choice there. Then we swap the two halves of the concatenation and count again.

# %%
logits = mtp_logits(model, head, ids)  # [T−1, V]: row j predicts t[j+2]
main_logits = model.logits(hidden)  # [T, V]: row j predicts t[j+1]
guess = logits[:-1].argmax(-1)  # the head's guess for t[j+2], j = 0 … T−3
truth = np.asarray(ids[2:])
agree = (guess == main_logits[1:-1].argmax(-1)).mean()  # main model's choice for t[j+2], at row j+1
print(f"MTP top-1 accuracy for t[j+2]: {(guess == truth).mean():.2f}   agreement with the main model: {agree:.2f}")

swapped = dict(head.__dict__, fc=np.concatenate([head.fc[:, c.hidden_size:], head.fc[:, :c.hidden_size]], axis=1))
wrong = type(head)(**swapped)  # the same weights, reading [hidden ; embedding]
swapped_agree = (mtp_logits(model, wrong, ids)[:-1].argmax(-1) == main_logits[1:-1].argmax(-1)).mean()
print(f"with the halves swapped: agreement {swapped_agree:.2f}")
assert swapped_agree < agree

# %% [markdown]
# ## The draft
#
# `MtpCache` is the head's decode state: the keys and values of its attention layer over the
# pairs `(h[j], t[j+1])` seen so far. After the prompt, and the first token the main model
# chose, the head's newest output gives **draft 1**. For **draft 2** there is no main-model
# hidden state yet (that is what we are trying to save), so the head's *own* output stands in
# for it at the next position, with draft 1 as the token — and so on. (With several MTP
# layers, draft step `s` would use layer `s`.) The drafts are never committed to the cache.

# %%
prompt = tok.encode("def read_config(path):\n    with open(path) as f:\n")
cache = model.new_cache()
h = model.hidden_states(prompt, cache)
first = int(model.logits(h[-1:])[0].argmax())  # the main model's next token
mtp = MtpCache(model, head)
mtp.commit(model, head, h, prompt[1:] + [first])  # the prompt's pairs (h[j], t[j+1])
drafts = draft(model, head, mtp, 3, lambda row, step: int(np.argmax(row)), draft_vocab=None)
print("main model's next token:", repr(tok.decode([first])), "  drafts:", [tok.decode([d]) for d in drafts])
assert mtp.layers[0].length == len(prompt)  # drafting left the MTP cache as it was

# %% [markdown]
# ## The verify
#
# One forward pass over `[first, draft 1, draft 2, draft 3]` gives the main model's own
# prediction after each of them: row `m` is what plain decoding would compute after feeding
# the first `m + 1` of these tokens. We check that against four single decode steps.

# %%
before = cache.copy()
start = cache.position
hidden_v, logits_v = verify(model, cache, [first] + drafts)  # [4, H], [4, V]
stepped = before.copy()
single = [model.forward([t], stepped, last_only=True)[-1] for t in [first] + drafts]
np.testing.assert_allclose(logits_v, np.array(single), rtol=0, atol=1e-4)
print("one verify pass over 4 positions = 4 decode steps (to 1e-4)")

# %% [markdown]
# **Greedy acceptance**: keep draft `m + 1` while it is the model's argmax at row `m`. At the
# first disagreement, the model's own argmax replaces it (a correction); if every draft is
# accepted, the last row gives a **bonus** token. Either way each verify emits at least one
# token — never fewer than plain decoding.

# %%
def my_greedy_accept(logits, drafts):
    emitted = []
    for m, d in enumerate(drafts):
        best = int(np.argmax(logits[m]))
        emitted.append(best)
        if best != d:
            return emitted
    return emitted + [int(np.argmax(logits[len(drafts)]))]


emitted = my_greedy_accept(logits_v, drafts)
theirs, n_accepted = accept(logits_v, drafts, [None] * 3, SamplingParams(), rng, prompt + [first], [first])
assert emitted == theirs
print(f"accepted {n_accepted} of 3 drafts; this verify emits {[tok.decode([t]) for t in emitted]}")

# %% [markdown]
# **Sampling** needs more care: accepting "when it matches" would skew the distribution. The
# rule of Leviathan et al. and Chen et al. (2023): the draft `d` was drawn from `q`; the model
# says `p`. Accept `d` with probability `min(1, p(d)/q(d))`; if rejected, draw from the
# residual `max(p − q, 0)`, normalised. The emitted token is then distributed *exactly* as
# `p`, whatever `q` is — we check the algebra on a random pair (exercise 11.2 asks for it).
# Drafting by argmax is the special case of a one-hot `q`.

# %%
p = rng.dirichlet(np.ones(6))
q = rng.dirichlet(np.ones(6))
accepted_mass = np.minimum(q, p)  # P(draw x from q and accept it) = q(x) · min(1, p(x)/q(x))
residual = np.maximum(p - q, 0) / np.maximum(p - q, 0).sum()
emitted_distribution = accepted_mass + (1 - accepted_mass.sum()) * residual
np.testing.assert_allclose(emitted_distribution, p, atol=1e-12)
print("rejection rule: the emitted token has exactly the model's distribution")

# %% [markdown]
# ## The rollback
#
# The verify fed all four tokens, but only `len(emitted)` of them stay: the cache must end
# exactly where the accepted tokens end. Attention caches are easy — each token owns a row of
# keys and values, so we drop the last rows. A Gated DeltaNet memory cannot be rewound: every
# token was folded into one matrix (chapter 6). So the verify pass keeps the (conv window,
# memory) after *each* of its positions, and the rollback picks the one after the last kept
# token — no recomputation.

# %%
kept = len(emitted)  # the cache keeps [first, accepted drafts]; the last emitted token is fed next time
deltanet = next(s for s in cache.layers if isinstance(s, DeltaNetState))
print(f"a DeltaNet layer kept {len(deltanet.history)} states during the verify; we keep the state after token {kept}")
keep_first(cache, start, kept)

plain = before.copy()
for t in ([first] + drafts)[:kept]:
    model.forward([t], plain)
for a, b in zip(cache.layers, plain.layers):
    if isinstance(a, DeltaNetState):
        np.testing.assert_allclose(a.recurrent, b.recurrent, atol=1e-4)
        np.testing.assert_allclose(a.conv, b.conv, atol=1e-4)
    else:
        assert a.length == b.length
        np.testing.assert_allclose(a.keys[:, :a.length], b.keys[:, :b.length], atol=1e-4)
assert cache.position == plain.position
print("after the rollback the cache equals plain decoding of the kept tokens")

# %% [markdown]
# Finally the head catches up: it commits the pairs `(h[j], t[j+1])` of the kept positions,
# now with the main model's real hidden states from the verify pass — and its newest output
# is the start of the next draft.

# %%
mtp.commit(model, head, hidden_v[:kept], emitted)
assert mtp.end == cache.position

# %% [markdown]
# ## All together
#
# `speculative_generate` runs that cycle until a stop rule fires. Its greedy output is plain
# greedy output; what changes is how many forward passes it took.

# %%
stats = SpeculativeStats()
fast = list(speculative_generate(model, head, prompt, max_new_tokens=60, draft_tokens=2, stats=stats))
slow = list(generate_ids(model, prompt, max_new_tokens=60))
assert fast == slow
print(tok.decode(prompt) + tok.decode(fast))
print(f"\n{stats.generated_tokens} tokens in {stats.verifies} verify passes after the prefill: "
      f"{stats.tokens_per_verify:.2f} tokens per pass; {stats.accepted} of {stats.drafted} drafts accepted "
      f"({stats.acceptance_rate:.0%})")

# %% [markdown]
# Whether that is faster depends on two costs, each relative to one decode step: `c_verify`,
# the verify pass over k + 1 positions (≈ 1 when each weight is read once), and `c_draft`, the
# head (its one layer plus the LM head — on the real 248k vocabulary the LM head dominates, so
# minqwen drafts over the first quarter of the ids, at most 32,768, which byte-level BPE gives
# to its most frequent tokens, plus every id already in the context). With `a` accepted drafts per verify on
# average, the speedup is `(1 + a) / (c_verify + k · c_draft)`. `tools/mtp_figures.py`
# measures both costs on the real Qwen3.5-0.8B shape.

# %%
plt = course.pyplot()
if plt is not None:
    fig, ax = plt.subplots(figsize=(6, 3.2))
    acceptance = np.linspace(0, 1, 51)
    # c_verify(k + 1) and c_draft as tools/mtp_figures.py measured them on the Qwen3.5-0.8B
    # shape (float32, 2 threads, an Intel Xeon VM; the table in the repository's README.md,
    # section "Multi-token prediction"): a k = 1 verify costs
    # 1.09 steps.
    for k, c_verify, c_draft in ((1, 1.09, 0.076), (2, 1.17, 0.076)):
        tokens = sum(acceptance ** i for i in range(k + 1))  # 1 + a + a² + … (each draft needs the one before)
        ax.plot(acceptance, tokens / (c_verify + k * c_draft), label=f"k = {k}: c_verify {c_verify}, c_draft {c_draft}")
    ax.axhline(1, color="#999999", lw=0.8)
    ax.set_xlabel("per-draft acceptance")
    ax.set_ylabel("speedup over plain decoding")
    ax.set_title("Predicted speedup on the Qwen3.5-0.8B shape (measured costs)", fontsize=9)
    ax.legend()
    fig.tight_layout()
    course.save(fig, "11_speedup.png")

# %% [markdown]
# The same formula says why drafting is harder to win in the model of this chapter. Its MTP
# layer is one layer beside the model's four, and its LM head (4,096 rows) is a quarter of its
# weights, so a draft over the whole vocabulary costs about half a decode step: `c_draft` ≈
# 0.46–0.51, measured by `tools/mtp_figures.py depth` when it drafted over the whole
# vocabulary. Even a verify that cost exactly one step would then give (1 + 0.84) / (1 + 0.5)
# ≈ 1.2× at the 84% acceptance its head had when it was trained alongside the model; measured
# it was 0.9–1.1×, and 1.18–1.19× once the draft head read only the first 1,024 ids
# (`c_draft` ≈ 0.45 then, of which the MTP layer 0.33). What moved it was the numerator:
# distilled toward the model it drafts for (`tools/distill_mtp.py` trains the head to match
# the main model's own predictions rather than the corpus's tokens), the head's first drafts
# are accepted 90% of the time and two drafts per verify emit 2.7 tokens, and greedy decoding
# with two drafts measures 1.4× plain decoding. In Qwen3.5-0.8B, with 24 layers and a draft
# head cut to 32k rows, `c_draft` is 0.07–0.09: there drafting pays even when few drafts are
# accepted.

# %% [markdown]
# ## Exercises
#
# Solutions: `walkthrough/solutions/11_multi_token_prediction.py`.
#
# **Exercise 11.1.** If every draft is accepted independently with probability `a`, how many
# tokens does one verify emit on average with `k` drafts? (Draft `m` only counts if drafts
# `1 … m − 1` were accepted, and the verify always adds one token of its own.) Return it as a
# number, for `a = 0.7`, `k = 3`.
#
# **Exercise 11.2.** Write the rejection rule as a function of two distributions: given `p`
# (the model's) and `q` (the draft's), return the distribution of the token one verify
# position emits — accepted draft or residual draw. It must equal `p`, also when `q` puts mass
# where `p` has none, and when `q` is one-hot (argmax drafting).

# %%
def exercise_11_1(a, k):
    """Expected tokens emitted per verify with k drafts, each accepted with probability a."""
    return None  # your code here


answer = exercise_11_1(0.7, 3)
if answer is None:
    print("Exercise 11.1: not attempted yet.")
else:
    assert np.isclose(answer, 1 + 0.7 + 0.49 + 0.343)
    print("Exercise 11.1: correct.")


# %%
def exercise_11_2(p, q):
    """The distribution of the emitted token when a draft drawn from q is checked against p."""
    return None  # your code here


one_hot = np.eye(6)[2]
p_sparse = np.array([0.5, 0.5, 0, 0, 0, 0])
answers = [exercise_11_2(p, q), exercise_11_2(p, one_hot), exercise_11_2(p_sparse, q)]
if answers[0] is None:
    print("Exercise 11.2: not attempted yet.")
else:
    for got, wanted in zip(answers, (p, p, p_sparse)):
        np.testing.assert_allclose(got, wanted, atol=1e-12)
    print("Exercise 11.2: correct.")
