"""The MoE figure: what a decode step of a sparse MoE model costs next to a dense one.

    python tools/moe_figure.py                    # Qwen3.5-35B-A3B layers, then the issue's 64 experts top-4
    python tools/moe_figure.py --json out.json --dtype bfloat16 --steps 16
    python tools/moe_figure.py --quick            # smoke test: toy widths, seconds; its times mean nothing

For each MoE config, three contenders decode the same tokens after the same 8-token prompt:

* **MoE** — the model as it is: each token reads the router, the shared expert and its k
  experts, memory-mapped in bf16 from the checkpoint;
* **dense, same active parameters** — the same model with each MoE block replaced by one
  SwiGLU MLP whose width makes its parameters equal to the MoE block's active ones (router,
  shared expert and its gate, k experts); this is the cost the MoE should approach. Same
  parameters are the same bytes only with ``--dtype bfloat16``: in float32 the dense MLP is
  held in float32 (4 bytes a parameter) while the experts stay bf16 in the checkpoint (2), so
  there the dense twin reads up to twice the MoE's expert bytes;
* **MoE, all experts active** — the MoE checkpoint with top-k raised to E: what the step
  would cost if the gather touched every expert (a dense loop masked by the routing).

Checkpoints (tools/real_shape.py, random bf16, four layers [L, L, L, F], untied head of the
real vocabulary) are built once under scratch/. Every expert page is touched once before
timing, so the figure is for a model whose experts are in memory (the page cache), not for
first reads from disk; the "disk reads/step" column counts the major page faults a step
still takes (experts the kernel dropped from memory meanwhile). A step is timed in two parts:
the decoder layers (``Model.hidden_states``) and the LM head (``Model.logits`` of the last
row), which is the same 509 M-parameter product for all three and would otherwise hide the
difference. The contenders take turns, one step at a time, so that load from other processes
on a shared machine falls on all of them alike; each figure is the median over steps. The
load average is printed before and after: with more runnable threads than cores, every
parallel region waits for its slowest thread, and the MoE step has more of them.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from argtypes import output_file, require_reference, whole_number  # noqa: E402

CONFIGS = {  # name → (experts, experts per token)
    "35B-A3B layers (256 experts, top-8)": (256, 8),
    "issue #4 (64 experts, top-4)": (64, 4),
}
LAYERS = 4
PROMPT = 8
# --quick: the same four layers and the same three contenders at toy widths, to check that the
# tool runs end to end (built in a temporary folder, then deleted). Its times measure nothing.
QUICK_CONFIGS = {"smoke test (8 experts, top-2, toy widths)": (8, 2)}
QUICK_SHAPE = dict(
    vocab_size=512, hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
    linear_key_head_dim=16, linear_value_head_dim=16, linear_num_key_heads=2, linear_num_value_heads=4,
    moe_intermediate_size=16, shared_expert_intermediate_size=16,
    rope_parameters=dict(rope_type="default", rope_theta=1e7, partial_rotary_factor=0.25,
                         mrope_section=[1, 1, 0], mrope_interleaved=True),  # rotary dim 4: 2 frequencies
)


def active_mlp_parameters(text: dict) -> int:
    """Parameters one token reads in one MoE block: router, shared expert and its gate, k experts."""
    H = text["hidden_size"]
    router = text["num_experts"] * H
    shared = 3 * text["shared_expert_intermediate_size"] * H + H
    experts = text["num_experts_per_tok"] * 3 * text["moe_intermediate_size"] * H
    return router + shared + experts


def dense_twin(text: dict) -> dict:
    """The same model with a dense SwiGLU MLP as wide as the MoE block's active parameters."""
    dense = {k: v for k, v in text.items() if k not in (
        "num_experts", "num_experts_per_tok", "moe_intermediate_size", "shared_expert_intermediate_size")}
    dense["intermediate_size"] = round(active_mlp_parameters(text) / (3 * text["hidden_size"]))
    return dense


def build(num_experts: int, top_k: int, quick_folder: Path | None = None):
    """(MoE folder, dense folder, the MoE text config, the dense text config), built if missing.

    The real shapes go to scratch/ and are reused; with ``quick_folder``, toy shapes go there."""
    from real_shape import SCRATCH, make_moe, write_random
    from reference import real_shape_moe_text_config

    text = real_shape_moe_text_config(num_experts, top_k, LAYERS)
    if quick_folder is not None:
        text.update(QUICK_SHAPE)
    dense = dense_twin(text)
    if quick_folder is not None:
        return write_random(quick_folder / "moe", text), write_random(quick_folder / "dense", dense, 1), text, dense
    moe_folder = make_moe(num_experts, top_k, LAYERS)
    dense_folder = write_random(
        SCRATCH / f"qwen3.5-35b-a3b-{LAYERS}-layers-dense-{dense['intermediate_size']}-random", dense, seed=1)
    return moe_folder, dense_folder, text, dense


def touch_experts(model) -> int:
    """Read one byte of every page of every expert (so timing finds them in memory); returns bytes."""
    total = 0
    for layer in model.layers:
        ex = layer.mlp.experts
        for matrices in (ex.gate_proj, ex.up_proj, ex.down_proj):
            for e in range(len(ex)):
                raw = np.asarray(matrices[e]).reshape(-1).view(np.uint8)
                int(raw[::4096].sum())
                total += raw.nbytes
    return total


class Contender:
    """One model decoding one token per step from its own cache, timed in two parts."""

    def __init__(self, label, model, prompt, top_k=None):
        self.label, self.model = label, model
        if top_k is not None:  # the same weights, every expert chosen
            model = self.model = _with_top_k(model, top_k)
        self.cache = model.new_cache()
        model.forward(prompt, self.cache)
        self.layers_ms, self.head_ms, self.major_faults = [], [], []

    def step(self, token: int) -> None:
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_majflt
        start = time.perf_counter()
        hidden = self.model.hidden_states([token], self.cache)  # [1, H]
        mid = time.perf_counter()
        self.model.logits(hidden[-1:])  # [1, V]
        end = time.perf_counter()
        self.layers_ms.append((mid - start) * 1e3)
        self.head_ms.append((end - mid) * 1e3)
        # Pages read from disk during the step: weights the kernel had dropped from memory.
        self.major_faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_majflt - faults)

    def summary(self) -> dict:
        layers, head = statistics.median(self.layers_ms), statistics.median(self.head_ms)
        return {"label": self.label, "steps": len(self.layers_ms), "layers_ms": layers, "head_ms": head,
                "step_ms": layers + head, "major_faults_per_step": statistics.mean(self.major_faults)}


def _with_top_k(model, top_k):
    import copy

    other = copy.copy(model)  # shares every weight; only the config differs
    other.config = dataclasses.replace(model.config, num_experts_per_tok=top_k)
    return other


def measure(name: str, num_experts: int, top_k: int, dtype: str, steps: int, all_steps: int,
            quick_folder: Path | None = None) -> dict:
    import minqwen

    moe_folder, dense_folder, text, dense_text = build(num_experts, top_k, quick_folder)
    rng = np.random.default_rng(0)
    prompt = rng.integers(0, text["vocab_size"], size=PROMPT)
    tokens = rng.integers(0, text["vocab_size"], size=steps + 4)

    moe_model = minqwen.load(moe_folder, dtype=dtype)
    dense_model = minqwen.load(dense_folder, dtype=dtype)
    expert_bytes = touch_experts(moe_model)
    moe = Contender("MoE", moe_model, prompt)
    dense = Contender("dense, same active parameters", dense_model, prompt)
    everything = Contender("MoE, all experts active", moe_model, prompt, top_k=num_experts)

    for c in (moe, dense, everything):  # warm-up (first calls, compiled kernels), not timed
        for token in tokens[:2]:
            c.step(int(token))
        c.layers_ms.clear()
        c.head_ms.clear()
        c.major_faults.clear()
    every = max(1, steps // max(1, all_steps))
    for n, token in enumerate(tokens[2:2 + steps]):  # take turns, so shared-machine load hits all alike
        moe.step(int(token))
        dense.step(int(token))
        if n % every == 0 and len(everything.layers_ms) < all_steps:
            everything.step(int(token))

    rows = [moe.summary(), dense.summary(), everything.summary()]
    itemsize = 2  # bf16 experts
    per_expert = 3 * text["moe_intermediate_size"] * text["hidden_size"]
    result = {
        "config": name, "num_experts": num_experts, "top_k": top_k, "layers": LAYERS, "dtype": dtype,
        "dense_intermediate_size": dense_text["intermediate_size"],
        "active_mlp_parameters_per_layer": active_mlp_parameters(text),
        "expert_bytes_total": expert_bytes,
        "expert_bytes_read_per_step": LAYERS * top_k * per_expert * itemsize,
        "rows": rows,
        "moe_over_dense_layers": rows[0]["layers_ms"] / rows[1]["layers_ms"],
        "moe_over_dense_step": rows[0]["step_ms"] / rows[1]["step_ms"],
        "all_experts_over_moe_layers": rows[2]["layers_ms"] / rows[0]["layers_ms"],
        "all_experts_over_moe_step": rows[2]["step_ms"] / rows[0]["step_ms"],
    }
    del moe, dense, everything, moe_model, dense_model
    return result


def report(result: dict) -> str:
    lines = [
        f"{result['config']}: {result['layers']} layers, weights {result['dtype']}, experts bf16 memory-mapped "
        f"({result['expert_bytes_total'] / 1e9:.2f} GB of experts, {result['expert_bytes_read_per_step'] / 1e6:.0f} MB "
        f"read per token); dense twin intermediate_size {result['dense_intermediate_size']}",
        f"  {'contender':<32}{'layers ms':>11}{'head ms':>10}{'step ms':>10}{'steps':>7}{'disk reads/step':>17}",
    ]
    for row in result["rows"]:
        lines.append(f"  {row['label']:<32}{row['layers_ms']:>11.1f}{row['head_ms']:>10.1f}{row['step_ms']:>10.1f}"
                     f"{row['steps']:>7}{row['major_faults_per_step']:>17.0f}")
    lines += [
        f"  MoE ÷ dense with the same active parameters: {result['moe_over_dense_layers']:.2f}× (layers), "
        f"{result['moe_over_dense_step']:.2f}× (whole step)",
        f"  all experts active ÷ MoE: {result['all_experts_over_moe_layers']:.1f}× (layers), "
        f"{result['all_experts_over_moe_step']:.1f}× (whole step)",
    ]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16",
                        help="how minqwen keeps the non-expert matrices (experts stay bf16, mapped)")
    parser.add_argument("--steps", type=whole_number(1), default=16, help="timed decode steps per contender")
    parser.add_argument("--all-steps", type=whole_number(1), default=4, help="timed steps with all experts active")
    parser.add_argument("--threads", type=whole_number(1), default=2, help="BLAS and Numba threads (default 2)")
    parser.add_argument("--only", choices=["256", "64"], default=None, help="one config only (by expert count)")
    parser.add_argument("--json", type=output_file, default=None, help="also write the results to this JSON file")
    parser.add_argument("--quick", action="store_true",
                        help="smoke test: toy widths in a temporary folder, 3 steps (the times mean nothing)")
    args = parser.parse_args()
    if args.quick:
        # its one toy config is neither of --only's, and it sets its own step counts
        given = [option for option, value, default in (("--only", args.only, None), ("--steps", args.steps, 16),
                                                       ("--all-steps", args.all_steps, 4)) if value != default]
        if given:
            parser.error(f"--quick runs its own toy config for 3 steps; it does not take {', '.join(given)}")
        args.steps, args.all_steps = 3, 3
    require_reference(parser.prog)  # the checkpoints' names and shapes come from transformers models
    print(f"{args.threads} threads; load average before: {' '.join(f'{x:.1f}' for x in os.getloadavg())}")

    from minqwen.errors import MinqwenError
    from minqwen.threads import set_threads

    try:
        set_threads(args.threads)
    except MinqwenError as e:  # more threads than Numba was started with
        print(f"error: --threads {args.threads}: {e}", file=sys.stderr)
        return 2
    results = []
    with tempfile.TemporaryDirectory(prefix="moe_figure_") if args.quick else contextlib.nullcontext() as quick:
        for name, (num_experts, top_k) in (QUICK_CONFIGS if args.quick else CONFIGS).items():
            if args.only and int(args.only) != num_experts:
                continue
            result = measure(name, num_experts, top_k, args.dtype, args.steps, args.all_steps,
                             Path(quick) if quick else None)
            print(report(result), flush=True)
            results.append(result)
    print(f"load average after: {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    if args.json:
        args.json.write_text(json.dumps({"threads": args.threads, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
