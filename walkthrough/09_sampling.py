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
# # Chapter 9 · Sampling and generation
#
# The model gives scores; something else must choose. This chapter turns logits into text on
# the embedded model:
#
# * **greedy** decoding and the prefill / decode loop around it;
# * **temperature**, and the three ways of cutting off the unlikely tail: **top-k**,
#   **top-p** and **min-p**;
# * **penalties** against repetition;
# * **streaming**, stop tokens, and a **chat** that keeps one cache across turns.
#
# Each piece is written by hand and checked against `minqwen.sampling` and
# `minqwen.generate`, down to the same random draws for the same seed.

# %%
import numpy as np

import course
import minqwen
from minqwen.generate import ChatSession, generate_ids, stream_text
from minqwen.sampling import SamplingParams, apply_penalties, filter_logits
from minqwen.tokenizer import Tokenizer

np.set_printoptions(precision=4, suppress=True, linewidth=110)
folder = course.embedded_model()
model, tok = minqwen.load(folder), Tokenizer(folder)
prompt = "def fibonacci(n):"
prompt_ids = tok.encode(prompt)

# %% [markdown]
# ## The next-token distribution
#
# One forward pass over the prompt gives a row of logits per position; only the last row
# matters for what comes next. `softmax` turns it into probabilities.

# %%
def softmax(logits):
    z = np.exp(logits - logits.max())
    return z / z.sum()


logits = model.forward(prompt_ids, last_only=True)[-1]  # [V]
probs = softmax(logits)
top = np.argsort(-probs)[:8]
print(f"after {prompt!r}, the most likely next tokens:")
for i in top:
    print(f"  {tok.decode([i])!r:<14} p = {probs[i]:.3f}")

# %% [markdown]
# ## Greedy decoding, by hand
#
# Greedy: always take the most likely token. The loop has two phases, the same for every
# decoding strategy:
#
# * **prefill** — run the whole prompt in one call, filling the cache;
# * **decode** — feed back one token at a time; each step costs one token's worth of work,
#   thanks to the cache (chapters 4 and 6).

# %%
def my_greedy(prompt_ids, n_new):
    cache = model.new_cache()
    logits = model.forward(prompt_ids, cache, last_only=True)[-1]  # prefill
    out = []
    for _ in range(n_new):
        out.append(int(np.argmax(logits)))
        logits = model.forward([out[-1]], cache, last_only=True)[-1]  # decode one token
    return out


mine = my_greedy(prompt_ids, 24)
theirs = list(generate_ids(model, prompt_ids, SamplingParams(temperature=0), max_new_tokens=24))
assert mine == theirs
print(prompt + tok.decode(mine))

# %% [markdown]
# Greedy is deterministic and often repetitive: small models, especially, fall into loops.
# Sampling draws the next token at random from (a reshaped version of) the distribution.
#
# ## Temperature
#
# Dividing the logits by a temperature `T` before the softmax sharpens the distribution
# (`T < 1`) or flattens it (`T > 1`). `T → 0` is greedy; `T = 1` is the model's own
# distribution. Entropy (in bits) measures how spread out it is:

# %%
for T in (0.3, 0.7, 1.0, 1.5):
    p = softmax(logits / T)
    entropy = -(p[p > 0] * np.log2(p[p > 0])).sum()
    print(f"T = {T:<4} top token p = {p.max():.3f}   entropy = {entropy:5.2f} bits")

# %% [markdown]
# ## Cutting off the tail: top-k, top-p, min-p
#
# Even at `T = 1` the thousands of individually unlikely tokens together carry real
# probability, and one bad draw can derail the text. Three filters remove them (removed
# logits become −∞), applied in this order after the temperature:
#
# * **top-k**: keep the `k` most likely tokens;
# * **top-p** (nucleus): keep the smallest set of most likely tokens whose probabilities add
#   up to at least `p` — a token stays if the tokens ranked above it hold less than `p`;
# * **min-p**: drop tokens less likely than `min_p ×` the most likely one's probability — a
#   cut that adapts: strict when the model is sure, lenient when it is not.

# %%
def my_filter(logits, temperature, top_k=0, top_p=1.0, min_p=0.0):
    logits = logits / temperature
    if top_k:
        kth_largest = np.sort(logits)[-top_k]
        logits = np.where(logits < kth_largest, -np.inf, logits)
    if top_p < 1.0:
        order = np.argsort(-logits, kind="stable")  # most likely first
        p = softmax(logits)[order]
        mass_above = np.cumsum(p) - p
        logits = logits.copy()
        logits[order[mass_above >= top_p]] = -np.inf
    if min_p > 0.0:
        p = softmax(logits)
        logits = np.where(p < min_p * p.max(), -np.inf, logits)
    return logits


for settings in ({"temperature": 1.0, "top_k": 20}, {"temperature": 0.8, "top_p": 0.9},
                 {"temperature": 1.2, "min_p": 0.05}, {"temperature": 0.7, "top_k": 20, "top_p": 0.9, "min_p": 0.02}):
    ours = my_filter(logits, **settings)
    theirs = filter_logits(logits, SamplingParams(**settings))
    np.testing.assert_array_equal(np.isfinite(ours), np.isfinite(theirs))
    np.testing.assert_allclose(ours[np.isfinite(ours)], theirs[np.isfinite(theirs)], rtol=1e-6)
    print(f"{settings}: {int(np.isfinite(ours).sum())} tokens kept")

# %% [markdown]
# ## Penalties
#
# Two ways of discouraging repeats, applied to the logits *before* the temperature:
#
# * **repetition penalty** (as in transformers, multiplicative): every id seen so far — in
#   the prompt or the output — has its logit divided by the penalty if positive, multiplied by
#   it if negative. Either way, with a penalty above 1, it becomes less likely (below 1, more
#   likely). (Dividing a negative logit would make it *more* likely: a classic bug.)
# * **presence penalty** (as in the OpenAI API and vLLM, additive): subtract a constant once
#   from every id already *generated*.

# %%
def my_penalties(logits, seen, generated, repetition=1.0, presence=0.0):
    logits = logits.copy()
    for i in set(seen):
        logits[i] = logits[i] / repetition if logits[i] > 0 else logits[i] * repetition
    for i in set(generated):
        logits[i] -= presence
    return logits


seen, generated = prompt_ids + mine[:10], mine[:10]
ours = my_penalties(logits, seen, generated, repetition=1.3, presence=0.5)
theirs = apply_penalties(logits, seen, generated, SamplingParams(repetition_penalty=1.3, presence_penalty=0.5))
np.testing.assert_allclose(ours, theirs, rtol=1e-6)

# %% [markdown]
# ## The whole sampler, and reproducibility
#
# Penalties → temperature → top-k → top-p → min-p → softmax → one draw. With a seeded random
# generator the draws are reproducible: our loop and minqwen's make exactly the same choices.

# %%
def my_sample(logits, rng, seen, generated, temperature=0.8, top_p=0.95, repetition=1.1):
    logits = my_penalties(logits.astype(np.float32), seen, generated, repetition=repetition)
    p = softmax(my_filter(logits, temperature, top_p=top_p)).astype(np.float64)
    return int(rng.choice(len(p), p=p / p.sum()))


def my_generate(prompt_ids, n_new, seed):
    rng, cache = np.random.default_rng(seed), model.new_cache()
    logits = model.forward(prompt_ids, cache, last_only=True)[-1]
    generated = []
    for _ in range(n_new):
        generated.append(my_sample(logits, rng, list(prompt_ids) + generated, generated))
        logits = model.forward([generated[-1]], cache, last_only=True)[-1]
    return generated


params = SamplingParams(temperature=0.8, top_p=0.95, repetition_penalty=1.1)
for seed in (0, 1, 2):
    ours = my_generate(prompt_ids, 20, seed)
    theirs = list(generate_ids(model, prompt_ids, params, max_new_tokens=20, seed=seed))
    assert ours == theirs
    print(f"seed {seed}: {prompt + tok.decode(ours)!r}")

# %% [markdown]
# ## Picture: what the filters keep

# %%
plt = course.pyplot()
if plt is not None:
    order = np.argsort(-logits)[:20]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.2), sharey=True)
    for ax, T in zip(axes, (0.5, 1.0, 1.5)):
        p = softmax(logits / T)
        kept = np.isfinite(my_filter(logits, T, top_p=0.5))
        colours = ["#4c9be8" if kept[i] else "#cccccc" for i in order]
        ax.bar(range(20), p[order], color=colours)
        ax.set_title(f"T = {T}: top-p 0.5 keeps {int(kept.sum())} tokens (blue)", fontsize=9)
        ax.set_xticks(range(20), [course.token_label(tok.decode([i])) for i in order], rotation=90, fontsize=7)
    axes[0].set_ylabel("probability")
    fig.suptitle(f"Next token after {prompt!r}: the 20 most likely", fontsize=9)
    fig.tight_layout()
    course.save(fig, "09_sampling.png")

# %% [markdown]
# ## Streaming, stop tokens and chat
#
# `stream_text` wraps the loop with chapter 1's streaming decoder and stops at the
# checkpoint's end-of-sequence ids (for a chat model, `<|im_end|>`), which are not printed.
#
# A chat keeps **one cache** across turns: each turn only the new part of the conversation
# needs feeding. One wrinkle (chapter 1): Qwen's template *rewrites* earlier assistant turns,
# dropping their thinking. The rendered history then no longer extends the ids already in the
# cache, so `ChatSession` rolls the cache back to a snapshot taken where the histories still
# agree (a DeltaNet memory cannot be rewound — chapter 6) and feeds from there. The test of
# correctness: each turn's answer equals a fresh run on the same rendered conversation.

# %%
session = ChatSession(model, tok, enable_thinking=False)
greedy = SamplingParams(temperature=0)
answers = []
for question in ("Hello! Who are you?", "What is your favourite colour?"):
    answers.append("".join(session.reply(question, greedy, max_new_tokens=40)))
    print(f"user: {question}\nassistant: {answers[-1]!r}\n")

# The second answer, recomputed from scratch on the conversation as the template renders it:
fresh_prompt = tok.encode(tok.render_chat(session.messages[:-1], add_generation_prompt=True, enable_thinking=False))
fresh = "".join(stream_text(model, tok, fresh_prompt, greedy, max_new_tokens=40, skip_special_tokens=False))
assert answers[-1] == fresh
print("the chat's second turn equals a fresh run on the re-rendered conversation")

# %% [markdown]
# ## Exercises
#
# Solutions: `walkthrough/solutions/09_sampling.py`.
#
# **Exercise 9.1.** The OpenAI API also has a **frequency penalty**: subtract
# `penalty × (number of times the id was generated)`. Write it, and show on `logits` that for
# an id generated three times it subtracts three times as much as the presence penalty of the
# same size.
#
# **Exercise 9.2.** Order matters. With `T = 1`, compare the set of tokens kept by
# "top-k 5, then top-p 0.5" with "top-p 0.5, then top-k 5" on `logits`. Return both sets
# (as Python sets of ids). Which can be smaller, and why?

# %%
def exercise_9_1(logits, generated, penalty):
    """logits with the frequency penalty applied (a new array)."""
    return None  # your code here


answer = exercise_9_1(logits, [7, 7, 7, 9], 0.5)
if answer is None:
    print("Exercise 9.1: not attempted yet.")
else:
    assert np.isclose(logits[7] - answer[7], 1.5) and np.isclose(logits[9] - answer[9], 0.5)
    print("Exercise 9.1: correct.")
