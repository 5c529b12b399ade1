"""Solutions to chapter 7's exercises. Run: python walkthrough/solutions/07_mlp_and_moe.py"""


# Exercise 7.1 -------------------------------------------------------------------------------
def exercise_7_1(hidden=2048, layers=40, experts=256, top_k=8, expert_width=512, shared_width=512):
    per_expert = 3 * hidden * expert_width  # gate_proj, up_proj, down_proj
    shared = 3 * hidden * shared_width
    total = layers * (experts * per_expert + shared)
    active = layers * (top_k * per_expert + shared)
    return total, active


total, active = exercise_7_1()
print(f"Exercise 7.1: {total / 1e9:.2f} B expert parameters in all, {active / 1e9:.2f} B used per token "
      f"({active / total:.1%}). With attention, DeltaNet and embeddings on top, that is the '35B-A3B'.")
assert 30e9 < total < 35e9 and 1e9 < active < 2e9

# Exercise 7.2 -------------------------------------------------------------------------------
# plain: 2 matrices of H × 4H = 8H²;  SwiGLU: 3 matrices of H × I = 3HI  ⇒  I = 8H/3.
H = 1024
width = 8 * H / 3
print(f"Exercise 7.2: a SwiGLU MLP matches a plain 4H MLP's parameters at I = 8H/3 = {width:.0f} for H = {H}; "
      f"Qwen3.5-0.8B uses 3,584 = {3584 / H:.1f}·H, so its MLPs are {3584 / width - 1:.0%} larger than that budget.")
