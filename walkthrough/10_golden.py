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
# # Chapter 10 · Golden outputs for your own port
#
# You have rebuilt Qwen3.5 in NumPy. Perhaps next you will port it to C, Rust, a GPU
# kernel language or a phone. The first run of a port almost never matches, and "the logits
# are wrong" tells you nothing about *where*. Golden outputs answer that:
#
# 1. both implementations run the same prompt and save their intermediates — the **taps** —
#    under the same names in one safetensors file each;
# 2. a comparison walks the two files **in forward order** and names the first tap that
#    differs beyond tolerance. Everything before it is right; the bug is between that tap and
#    the previous one.
#
# minqwen's `golden` module records and compares; its tap names are a stable interface.

# %%
import atexit
import copy
import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

import course
import minqwen
from minqwen import golden

np.set_printoptions(precision=4, suppress=True, linewidth=110)
work = Path(tempfile.mkdtemp(prefix="minqwen-golden-"))  # recordings go here; removed when Python exits
atexit.register(shutil.rmtree, work, ignore_errors=True)

# %% [markdown]
# ## The taps
#
# Every named intermediate of a forward pass, in order. A layer has the taps of its kind
# (Gated DeltaNet or attention) plus the ones every layer has. `minqwen golden taps` prints
# the whole table with shapes and meanings; here is the start of it and the names for one
# fixture:

# %%
print("\n".join(golden.format_tap_table().splitlines()[:11]), "\n…")
folder, expected = course.fixture("text_tied_fp32")
model = minqwen.load(folder)
names = golden.tap_names(model.config)
print(f"\n{len(names)} taps per forward call for {folder.name}, e.g.:", names[:3], "…", names[-3:])

# %% [markdown]
# Taps come from the `tap=` argument of `Model.forward`: a function called as
# `tap(name, array)` at every named point. When it is `None` — the default — each call site
# is skipped by a single `if`, so the hook costs nothing in normal use. Chapters 4, 5 and 7
# used it to look inside the model; recording is the same hook writing everything down.
#
# ## Recording the reference
#
# We record the fixture's prompt plus two greedy decode steps (decode steps are recorded
# under `step0.…`, `step1.…`: a port's decode path can be wrong while its prefill is right).

# %%
recording = golden.record(model, expected["token_ids"], decode_steps=2)
reference_path = work / "minqwen.safetensors"
golden.save(recording, reference_path, golden.model_metadata(model))
print(f"{len(recording)} tensors, {sum(a.nbytes for a in recording.values()) / 1e6:.2f} MB → {reference_path.name}")

# %% [markdown]
# Is minqwen a trustworthy reference? Its taps line up with what transformers computed for
# this fixture — the layer outputs, the final norm, the logits and the decode state:

# %%
for i in range(model.config.num_hidden_layers):
    np.testing.assert_allclose(recording[f"layers.{i}.output"], expected[f"hidden.{i}"], rtol=0, atol=1e-4)
    if model.config.layer_types[i] == "linear_attention":
        np.testing.assert_allclose(recording[f"layers.{i}.linear_attn.conv_state"], expected[f"state.{i}.conv"],
                                   rtol=0, atol=1e-4)
        np.testing.assert_allclose(recording[f"layers.{i}.linear_attn.recurrent_state"],
                                   expected[f"state.{i}.recurrent"], rtol=0, atol=1e-4)
np.testing.assert_allclose(recording["norm"], expected["norm"], rtol=0, atol=1e-4)
np.testing.assert_allclose(recording["logits"], expected["logits"], rtol=0, atol=1e-4)
assert recording["generated_ids"].tolist() == expected["greedy"][:2].tolist()

# %% [markdown]
# ## A port with a bug
#
# A classic porting bug: PyTorch's `conv1d` computes a *cross-correlation* (weight tap 0
# multiplies the oldest input), while `np.convolve` and most textbook convolutions flip the
# kernel. A port that uses the "real" convolution runs the short convolution with its taps
# reversed. We simulate that port with a copy of the model whose layer-1 conv weights are
# reversed, record it, and compare.

# %%
port = copy.deepcopy(model)
port.layers[1].linear_attn.conv1d = port.layers[1].linear_attn.conv1d[:, ::-1].copy()
port_path = work / "port.safetensors"
golden.save(golden.record(port, expected["token_ids"], decode_steps=2), port_path, golden.model_metadata(port))

report = golden.compare(port_path, reference_path)  # the reference goes second: rtol scales with it
print("\n".join(report.format().splitlines()[:4]))
print("…")
print("\n".join(line for line in report.format().splitlines() if line.startswith(">>")))
print(report.format().splitlines()[-1])
assert not report.ok
assert report.first_divergent.name == "layers.1.linear_attn.conv1d"

# %% [markdown]
# Every tap before `layers.1.linear_attn.conv1d` agrees — including `layers.1.linear_attn.in_proj_qkv`,
# the conv's input — so the bug is in the convolution itself. In a real port that is where you
# would now look.
#
# The errors along the whole forward pass, as a picture: none up to the bug, then spreading
# through everything after it — except a few taps of layer 1 that do not pass through the
# convolution (`g` and `β` come straight from the input projections, and the conv state holds
# the conv's *inputs*), which still agree exactly.

# %%
plt = course.pyplot()
if plt is not None:
    rows = [row for row in report.rows if row.name not in ("token_ids", "generated_ids")
            and not row.name.startswith("step")]
    errs = np.array([max(row.max_abs, 1e-9) for row in rows])
    first = next(i for i, row in enumerate(rows) if not row.ok)
    fig, ax = plt.subplots(figsize=(11, 3.6))
    ax.semilogy(errs, marker=".", lw=0.8)
    ax.axhline(golden.DEFAULT_ATOL, color="#e8744c", ls="--", lw=1, label="atol 1e-4")
    ax.axvline(first, color="#cc3333", lw=1, label=f"first divergence: {rows[first].name}")
    ticks = [i for i, row in enumerate(rows) if row.name in ("embed", "logits") or
             (row.name.startswith("layers.") and row.name.count(".") == 2 and row.name.endswith(".output"))]
    ax.set_xticks(ticks, [rows[i].name for i in ticks], rotation=30, fontsize=7, ha="right")
    ax.set_ylabel("max |port − reference|\n(exact agreement drawn at 1e-9)"), ax.legend(fontsize=8, loc="upper left")
    ax.set_title("Golden comparison of a port with reversed conv taps in layer 1 (prompt taps, forward order)",
                 fontsize=9)
    course.save(fig, "10_golden_divergence.png")

# %% [markdown]
# ## What a port in another language writes
#
# A golden file is plain safetensors: tensors under tap names, plus a `__metadata__` whose
# values are JSON text. A comparison needs only two metadata entries — `token_ids` (the
# prompt) and `config_sha256` (SHA-256 of the text config as canonical JSON, which a port can
# copy from the reference recording) — and only the taps the port has. Here is a "port" of
# the first steps of the model, three lines of NumPy, written the way a port in any language
# would write it:

# %%
ids = expected["token_ids"]
x = model.embed_tokens[ids]  # embed
w0 = model.layers[0].input_layernorm
normed = x / np.sqrt(np.mean(x * x, -1, keepdims=True) + 1e-6) * (1 + w0)  # layers.0.input_layernorm
qkv = normed @ model.layers[0].linear_attn.in_proj_qkv.T  # layers.0.linear_attn.in_proj_qkv
my_file = work / "my_port.safetensors"
save_file(
    {"embed": x, "layers.0.input_layernorm": normed, "layers.0.linear_attn.in_proj_qkv": qkv},
    str(my_file),
    metadata={"token_ids": json.dumps(ids.tolist()), "config_sha256": json.dumps(golden.config_hash(model.config)),
              "producer": json.dumps("chapter 10's three-line port")},
)
small_report = golden.compare(my_file, reference_path)
print(small_report.format())
assert small_report.ok and small_report.compared_taps == 3

# %% [markdown]
# The same from a shell, for ports that are not in Python (the port must run the same token
# ids as the reference, here 75, 81, 120: recordings of different prompts exit with code 2):
#
# ```
# minqwen golden record --model tests/fixtures/text_tied_fp32 --tokens 75,81,120 --decode 2 --out ref.safetensors
# minqwen golden compare my_port.safetensors ref.safetensors      # exit code 0: all common taps agree
# ```
#
# `tools/golden_port_example.py` is a longer worked example of the same workflow.
#
# ## Exercises
#
# Solutions: `walkthrough/solutions/10_golden.py`.
#
# **Exercise 10.1.** Chapter 4 warned about splitting `q_proj`'s output in half instead of
# per head. Simulate that bug in a copy of `model` by reordering the rows of layer 3's
# `q_proj` so that the per-head split of the copy reads what the flat split would read. Which
# tap does the comparison name first? Return its name.
#
# **Exercise 10.2.** How small a bug do the default tolerances (atol 1e-4, rtol 1e-3) catch?
# Scale layer 0's `out_proj` by `1 + ε` and find the smallest `ε` among 1e-1, 1e-2, … 1e-7 for
# which the comparison still fails.

# %%
def exercise_10_1():
    """The name of the first divergent tap when layer 3 splits q and gate the flat way."""
    return None  # your code here


answer = exercise_10_1()
if answer is None:
    print("Exercise 10.1: not attempted yet.")
else:
    assert answer.startswith("layers.3.self_attn."), "the first divergent tap is inside layer 3's attention"
    assert answer == "layers.3.self_attn.q_norm", ("layer 3 taps q and k after their norms, then after rotary, "
                                                   "then v and the gate: which of them is wrong first?")
    print("Exercise 10.1: first divergence at", answer)
