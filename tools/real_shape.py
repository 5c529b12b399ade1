"""A random-weight checkpoint with the real Qwen3.5-0.8B text shape, and minqwen's parity on it.

    python tools/real_shape.py make  [--out DIR]        # build it (bf16, ~1.5 GB; never commit it)
    python tools/real_shape.py parity [--out DIR]       # minqwen vs transformers fp32 on a 64-token prompt

The one builder of the real-shape checkpoint: the parity check here, the benchmark and the
MoE figure all reuse the folder it makes. Weights are random (every tensor, norms and decay
parameters included) and stored bf16, as the real release is; the reference runs them in
fp32 eager mode.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

DEFAULT_DIR = Path(__file__).resolve().parent.parent / "scratch" / "qwen3.5-0.8b-random"
PROMPT_TOKENS = 64
GREEDY_TOKENS = 32


def make(out: Path, seed: int = 0) -> Path:
    """Build the checkpoint once; later calls reuse it."""
    import torch
    from reference import build_model, real_shape_text_config, save_checkpoint

    if (out / "config.json").is_file():
        print(f"reusing {out}")
        return out
    start = time.time()
    torch.set_num_threads(2)
    model = build_model(real_shape_text_config(), seed)
    save_checkpoint(model, out, dtype="bfloat16")
    print(f"wrote {out} in {time.time() - start:.0f} s")
    return out


def parity(out: Path) -> dict:
    import torch
    from transformers import Qwen3_5ForCausalLM

    import minqwen

    make(out)
    rng = np.random.default_rng(1)
    ids = rng.integers(0, 248044, size=PROMPT_TOKENS)

    # Reference: transformers fp32, eager, on the bf16 weights widened to fp32.
    torch.set_num_threads(2)
    ref = Qwen3_5ForCausalLM.from_pretrained(out, dtype=torch.float32, attn_implementation="eager").eval()
    with torch.no_grad():
        result = ref(input_ids=torch.tensor(ids[None]), use_cache=True)
        ref_logits = result.logits[0].numpy()
        cache = result.past_key_values
        ref_greedy, margins = [], []
        logits = result.logits[0, -1]
        for _ in range(GREEDY_TOKENS):
            top2 = torch.topk(logits, 2).values
            margins.append(float(top2[0] - top2[1]))
            token = int(torch.argmax(logits))
            ref_greedy.append(token)
            result = ref(input_ids=torch.tensor([[token]]), past_key_values=cache, use_cache=True)
            cache, logits = result.past_key_values, result.logits[0, -1]
    del ref, result, cache

    model = minqwen.load(out)
    cache = model.new_cache()
    logits = model.forward(ids, cache)
    ours_greedy = []
    next_logits = logits[-1]
    for _ in range(GREEDY_TOKENS):
        token = int(np.argmax(next_logits))
        ours_greedy.append(token)
        next_logits = model.forward([token], cache, last_only=True)[-1]

    agree = next((i for i, (a, b) in enumerate(zip(ours_greedy, ref_greedy)) if a != b), GREEDY_TOKENS)
    report = {
        "prompt_tokens": PROMPT_TOKENS,
        "max_abs_logit_diff": float(np.abs(logits - ref_logits).max()),
        "logit_scale": float(np.abs(ref_logits).max()),
        "greedy_tokens_identical": agree,
        "greedy_tokens": GREEDY_TOKENS,
        "min_greedy_margin": float(min(margins)),
    }
    print(json.dumps(report, indent=2))
    return report


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["make", "parity"])
    parser.add_argument("--out", type=Path, default=DEFAULT_DIR)
    args = parser.parse_args()
    if args.what == "make":
        make(args.out)
        return 0
    report = parity(args.out)
    ok = report["max_abs_logit_diff"] <= 2e-3 and report["greedy_tokens_identical"] == GREEDY_TOKENS
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
