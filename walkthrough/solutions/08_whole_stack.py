"""Solutions to chapter 8's exercises. Run: python walkthrough/solutions/08_whole_stack.py"""

import contextlib
import importlib
import io
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # walkthrough/, for `course` and the chapter
import course  # noqa: E402
from minqwen.config import load_config  # noqa: E402


# Exercise 8.1 -------------------------------------------------------------------------------
# KV cache per token (bf16): layers × 2 (k and v) × kv heads × head_dim × 2 bytes.
def exercise_8_1(weights_bytes=752e6 * 2):
    per_token_hybrid = 6 * 2 * 2 * 256 * 2
    per_token_all = 24 * 2 * 2 * 256 * 2
    return int(np.ceil(weights_bytes / per_token_hybrid)), int(np.ceil(weights_bytes / per_token_all))


hybrid, all_attention = exercise_8_1()
print(f"Exercise 8.1: the KV cache outgrows the weights after {hybrid:,} tokens in the hybrid, "
      f"{all_attention:,} in an all-attention model of the same shape.")
assert abs(hybrid - 4 * all_attention) <= 4

# Exercise 8.2 -------------------------------------------------------------------------------
# Reuse the chapter's functions: importing the chapter runs it once (its output is hidden here).
with contextlib.redirect_stdout(io.StringIO()):
    chapter = importlib.import_module("08_whole_stack")

folder, expected = course.fixture("text_tied_fp32")
c, W = load_config(folder), chapter.read_weights(folder)
ids = expected["token_ids"]
whole, _, _ = chapter.forward(W, c, ids, chapter.new_cache(c))
cache = chapter.new_cache(c)
first, _, _ = chapter.forward(W, c, ids[:10], cache)
second, _, _ = chapter.forward(W, c, ids[10:], cache)
np.testing.assert_allclose(np.concatenate([first, second]), whole, rtol=0, atol=1e-4)  # float32 rounding
np.testing.assert_allclose(second, expected["logits"][10:], rtol=0, atol=1e-4)
print("Exercise 8.2: 10 + 11 tokens through one cache give the same logits as 21 at once "
      f"(max |Δ| {np.abs(second - whole[10:]).max():.1e}).")
