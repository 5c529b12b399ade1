"""Solutions to chapter 10's exercises. Run: python walkthrough/solutions/10_golden.py"""

import copy
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # walkthrough/, for `course`
import course  # noqa: E402
import minqwen  # noqa: E402
from minqwen import golden  # noqa: E402

folder, expected = course.fixture("text_tied_fp32")
model = minqwen.load(folder)
ids = expected["token_ids"]


def first_divergence(port, work):
    """Record the reference and the port on the fixture's prompt, compare, return the report."""
    golden.save(golden.record(model, ids), work / "ref.safetensors", golden.model_metadata(model))
    golden.save(golden.record(port, ids), work / "port.safetensors", golden.model_metadata(port))
    return golden.compare(work / "port.safetensors", work / "ref.safetensors")


# Exercise 10.1 ------------------------------------------------------------------------------
# q_proj's rows are, per head h: [q_h (D rows) | gate_h (D rows)]. The flat split reads rows
# 0 … Hq·D as "the queries" and the rest as "the gates". Reorder the rows so that the per-head
# split of the copy reads exactly that.
def exercise_10_1():
    c = model.config
    Hq, D = c.num_attention_heads, c.head_dim
    port = copy.deepcopy(model)
    w = port.layers[3].self_attn
    old = w.q_proj.copy()
    flat_q, flat_gate = old[: Hq * D], old[Hq * D :]
    w.q_proj = np.concatenate([np.concatenate([flat_q[h * D : (h + 1) * D], flat_gate[h * D : (h + 1) * D]])
                               for h in range(Hq)])
    with tempfile.TemporaryDirectory() as tmp:
        return first_divergence(port, Path(tmp)).first_divergent.name


name = exercise_10_1()
print("Exercise 10.1: the flat q/gate split is first seen at", name,
      "— the query after q_norm, before rotary; k is still right, which points at q_proj's split.")
assert name == "layers.3.self_attn.q_norm"


# Exercise 10.2 ------------------------------------------------------------------------------
def exercise_10_2():
    caught = []
    for k in range(1, 8):
        eps = 10.0**-k
        port = copy.deepcopy(model)
        port.layers[0].linear_attn.out_proj = port.layers[0].linear_attn.out_proj * np.float32(1 + eps)
        with tempfile.TemporaryDirectory() as tmp:
            report = first_divergence(port, Path(tmp))
        if not report.ok:
            caught.append((eps, report.first_divergent.name))
    return caught


caught = exercise_10_2()
print("Exercise 10.2: out_proj of layer 0 scaled by 1 + ε:")
for eps, where in caught:
    print(f"  ε = {eps:g}: caught, first at {where}")
print(f"  smaller ε: not caught. The smallest caught is {caught[-1][0]:g}, and notice *where*: at ε = 1e-3 the")
print("  mixer's own error sits right at rtol, so the first tap flagged is further on, where a norm has divided")
print("  by a small value and the error stands out. Below the detection limit a bug hides; tighten --rtol and")
print("  --atol to hunt smaller ones, at the price of flagging honest rounding differences.")
assert caught and caught[0][1] == "layers.0.token_mixer"
