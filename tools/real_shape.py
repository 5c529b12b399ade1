"""A random-weight checkpoint with the real Qwen3.5-0.8B text shape, and minqwen's parity on it.

    python tools/real_shape.py make  [--out DIR]        # build it (bf16, ~1.5 GB; never commit it)
    python tools/real_shape.py parity [--out DIR]       # minqwen vs transformers fp32 on a 64-token prompt
    python tools/real_shape.py make-moe [--experts 256 --top-k 8 --layers 4 --out DIR]
                                                        # Qwen3.5-35B-A3B layers (bf16, ~8.5 GB at 256 experts)

The one builder of real-shape checkpoints: the parity check here, the benchmark and the MoE
figure (tools/moe_figure.py) all reuse the folders it makes. Weights are random (every tensor,
norms and decay parameters included, by reference.random_value's rules) and stored bf16, as
the real releases are; the reference runs them in fp32 eager mode.

The 0.8B model is built in transformers and saved with save_pretrained. The MoE layers are
too big for that (4 layers of 256 experts are 3.2 B parameters, 13 GB as the fp32 model
save_pretrained starts from), so :func:`write_random` streams them instead: names and shapes
from the transformers model built on the meta device, values generated a slice at a time,
one shard per decoder layer — never more than one shard in memory.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from argtypes import output_folder, whole_number  # noqa: E402

SCRATCH = Path(__file__).resolve().parent.parent / "scratch"
DEFAULT_DIR = SCRATCH / "qwen3.5-0.8b-random"
SLICE_ELEMENTS = 1 << 26  # random values are generated this many at a time (256 MB of fp32)
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


def moe_dir(num_experts: int, experts_per_tok: int, num_hidden_layers: int) -> Path:
    return SCRATCH / f"qwen3.5-35b-a3b-{num_hidden_layers}-layers-{num_experts}-experts-top{experts_per_tok}-random"


def make_moe(num_experts: int = 256, experts_per_tok: int = 8, num_hidden_layers: int = 4, out: Path | None = None,
             seed: int = 0) -> Path:
    """Qwen3.5-35B-A3B's layer shape, a few layers, random bf16, experts fused (as the bf16 release)."""
    from reference import real_shape_moe_text_config

    text = real_shape_moe_text_config(num_experts, experts_per_tok, num_hidden_layers)
    return write_random(out or moe_dir(num_experts, experts_per_tok, num_hidden_layers), text, seed)


def write_random(out: Path, text: dict, seed: int = 0) -> Path:
    """A random bf16 text-only checkpoint for the text config ``text`` (dense, or MoE if it has
    ``num_experts``), written shard by shard. Reuses ``out`` if it already holds one."""
    import torch
    from reference import (
        Qwen3_5ForCausalLM,
        Qwen3_5MoeForCausalLM,
        Qwen3_5MoeTextConfig,
        Qwen3_5TextConfig,
    )
    from safetensors.torch import save_file

    out = Path(out)
    if (out / "config.json").is_file():  # written last: its presence means a complete checkpoint
        print(f"reusing {out}")
        return out
    start = time.time()
    moe = "num_experts" in text
    config = (Qwen3_5MoeTextConfig if moe else Qwen3_5TextConfig)(**text)
    cls = Qwen3_5MoeForCausalLM if moe else Qwen3_5ForCausalLM
    with torch.device("meta"):  # parameters with shapes and names, and no memory behind them
        shapes = {name: tuple(p.shape) for name, p in cls(config).named_parameters()}

    def shard_of(name):  # decoder layer i → shard i + 1; embeddings, final norm, head → shard 0
        layer = re.match(r"model\.layers\.(\d+)\.", name)
        return int(layer.group(1)) + 1 if layer else 0

    gen = torch.Generator().manual_seed(seed)
    out.mkdir(parents=True, exist_ok=True)
    n_shards = config.num_hidden_layers + 1
    weight_map, total = {}, 0
    for shard in range(n_shards):
        tensors = {name: _random_bf16(name, shape, gen) for name, shape in shapes.items() if shard_of(name) == shard}
        file_name = f"model-{shard + 1:05d}-of-{n_shards:05d}.safetensors"
        save_file(tensors, str(out / file_name), metadata={"format": "pt"})
        weight_map.update({name: file_name for name in tensors})
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        del tensors
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    config.architectures = [cls.__name__]
    config.dtype = "bfloat16"
    config.save_pretrained(out)
    print(f"wrote {out} ({total / 1e9:.1f} GB) in {time.time() - start:.0f} s")
    return out


def _random_bf16(name: str, shape: tuple, gen):
    """reference.random_value for one parameter, generated in slices along its first dim, as bf16."""
    import torch
    from reference import random_value

    result = torch.empty(shape, dtype=torch.bfloat16)
    rows = max(1, SLICE_ELEMENTS // max(1, math.prod(shape[1:]))) if len(shape) > 1 else shape[0]
    for begin in range(0, shape[0], rows):
        end = min(begin + rows, shape[0])
        # Slicing the first dim keeps each row's fan-in (and each expert's), so the scale is the same.
        result[begin:end] = random_value(name, (end - begin, *shape[1:]), gen).to(torch.bfloat16)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["make", "parity", "make-moe"])
    parser.add_argument("--out", type=output_folder, default=None)
    parser.add_argument("--experts", type=whole_number(1), default=256)
    parser.add_argument("--top-k", type=whole_number(1), default=8)
    parser.add_argument("--layers", type=whole_number(1), default=4)
    args = parser.parse_args()
    if args.top_k > args.experts:
        parser.error(f"--top-k {args.top_k} must be ≤ --experts {args.experts}")
    if args.what == "make-moe":
        make_moe(args.experts, args.top_k, args.layers, args.out)
        return 0
    args.out = args.out or DEFAULT_DIR
    if args.what == "make":
        make(args.out)
        return 0
    report = parity(args.out)
    ok = report["max_abs_logit_diff"] <= 2e-3 and report["greedy_tokens_identical"] == GREEDY_TOKENS
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
