"""minqwen against transformers 5.23.0 at the per-layer widths of every Qwen3.5 family member.

    python tools/family_shapes.py                       # every member, vocabulary 4096
    python tools/family_shapes.py 4B 35B-A3B --vocab 248320 --out scratch/family-shapes

For each member: a random bf16 checkpoint (tools/real_shape.write_random: every tensor random)
with the member's widths and a few layers ending in full attention, never committed; prompts
of 1, 63, 64, 65 and 257 tokens (around the DeltaNet chunk of 64 and the 256-row attention
blocks), each followed by 6 cached decode steps fed the fp32 reference's greedy tokens. Each
run is a process of its own, so that one model at a time is in memory (the 27B layer at the
real vocabulary needs about 8 GB):

* ``ref32``: transformers fp32, eager (the project's reference);
* ``ref64``: transformers in float64 — its modeling modules' own casts to float32 redirected
  to float64, or they would round back to fp32 inside — to measure ``ref32``'s own round-off;
* ``mq32``, ``mq32c``: minqwen float32, the recurrent and the chunked DeltaNet form;
* ``mqbf16``: minqwen bf16-resident (exact on a bf16 checkpoint: it must equal ``mq32``).

Printed per member: max |Δlogits| of each minqwen run against ``ref32`` and against ``ref64``,
beside ``ref32``'s own distance to ``ref64``. A bug shows as a difference far beyond that.

Widths: the 0.8B's from its public config (docs); the others from public configs and model
cards of the family and of models derived from it, where found; where not, plausible guesses
in the family's spirit, marked ``guessed`` below. The MoE members keep their top-k and widths
with fewer experts (memory); head dims 256 (attention) and 128 (DeltaNet), conv 4, partial
rotary 0.25 with M-RoPE [11, 11, 10], rope θ 1e7, rms eps 1e-6 throughout.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

TOOLS = Path(__file__).resolve().parent
ROOT = TOOLS.parent
sys.path.insert(0, str(TOOLS))
sys.path.insert(0, str(ROOT))

from argtypes import output_folder, require_reference, whole_number  # noqa: E402

LENGTHS = [1, 63, 64, 65, 257]
DECODE_STEPS = 6
RUNS = ["ref32", "ref64", "mq32", "mq32c", "mqbf16"]

COMMON = dict(head_dim=256, linear_key_head_dim=128, linear_value_head_dim=128, linear_conv_kernel_dim=4,
              linear_num_key_heads=16, rms_norm_eps=1e-6, hidden_act="silu", attention_bias=False,
              max_position_embeddings=262144, eos_token_id=248046,
              rope_parameters=dict(rope_type="default", rope_theta=1e7, partial_rotary_factor=0.25,
                                   mrope_section=[11, 11, 10], mrope_interleaved=True))
MEMBERS = {  # per-layer widths; "layers" is how many this check builds, not the member's depth
    "0.8B": dict(hidden_size=1024, intermediate_size=3584, num_attention_heads=8, num_key_value_heads=2,
                 linear_num_value_heads=16, tie_word_embeddings=True, layers=4),
    "2B": dict(hidden_size=2048, intermediate_size=6144, num_attention_heads=8, num_key_value_heads=2,  # heads guessed
               linear_num_value_heads=16, tie_word_embeddings=True, layers=4),
    "4B": dict(hidden_size=2560, intermediate_size=9216, num_attention_heads=16, num_key_value_heads=4,  # I guessed
               linear_num_value_heads=32, tie_word_embeddings=True, layers=4),
    "9B": dict(hidden_size=4096, intermediate_size=12288, num_attention_heads=16, num_key_value_heads=4,
               linear_num_value_heads=32, tie_word_embeddings=False, layers=2),
    "27B": dict(hidden_size=5120, intermediate_size=17408, num_attention_heads=24, num_key_value_heads=4,
                linear_num_value_heads=48, tie_word_embeddings=False, layers=2),  # value heads guessed
    "35B-A3B": dict(hidden_size=2048, num_attention_heads=16, num_key_value_heads=2, linear_num_value_heads=32,
                    tie_word_embeddings=False, layers=4, num_experts=32, num_experts_per_tok=8,  # of 256
                    moe_intermediate_size=512, shared_expert_intermediate_size=512),
    "122B-A10B": dict(hidden_size=3072, num_attention_heads=32, num_key_value_heads=2, linear_num_value_heads=64,
                      tie_word_embeddings=False, layers=2, num_experts=16, num_experts_per_tok=8,  # of 256;
                      moe_intermediate_size=1024, shared_expert_intermediate_size=1024),  # widths guessed
    "397B-A17B": dict(hidden_size=4096, num_attention_heads=32, num_key_value_heads=2, linear_num_value_heads=64,
                      tie_word_embeddings=False, layers=2, num_experts=16, num_experts_per_tok=10,  # of 512
                      moe_intermediate_size=1024, shared_expert_intermediate_size=1024),
}


def text_config(member: str, vocab: int) -> dict:
    """A qwen3_5_text (or _moe_text) config with the member's widths: DeltaNet layers, then attention."""
    widths = dict(MEMBERS[member])
    n = widths.pop("layers")
    return dict(COMMON, **widths, vocab_size=vocab, num_hidden_layers=n,
                layer_types=["linear_attention"] * (n - 1) + ["full_attention"])


def prompt_ids(vocab: int) -> np.ndarray:
    return np.random.default_rng(1234).integers(0, vocab, size=max(LENGTHS))


# ==================================================================== the runs, one per process


def reference_logits(folder: Path, float64: bool, tokens: dict | None) -> dict:
    """{p{L}: prompt logits [L, V], d{L}: decode-step logits [6, V], tok{L}: greedy ids (ref32 only)}."""
    import reference  # tools/reference.py: torch and transformers
    import torch

    if not float64:
        return _run_reference(reference.load_pretrained(folder), tokens)
    # The modeling modules' own float32 casts (the delta rule, norms, rotary, softmax) lifted
    # while the model is built and run.
    with reference.computing_in_float64():
        model = reference.pretrained_class(folder).from_pretrained(folder, dtype=torch.float64,
                                                                   attn_implementation="eager").eval()
        if hasattr(model, "set_experts_implementation"):
            model.set_experts_implementation("eager")
        return _run_reference(model.double(), tokens)


def _run_reference(model, tokens: dict | None) -> dict:
    """:func:`reference_logits` for a loaded transformers model."""
    import torch

    ids = prompt_ids(model.config.get_text_config().vocab_size)
    out = {}
    with torch.no_grad():
        for length in LENGTHS:
            step = model(input_ids=torch.tensor(ids[None, :length]), use_cache=True)
            out[f"p{length}"] = step.logits[0].double().numpy()
            chain = [] if tokens is None else [int(t) for t in tokens[f"tok{length}"]]
            decoded = []
            for n in range(DECODE_STEPS):
                if tokens is None:
                    chain.append(int(torch.argmax(step.logits[0, -1])))
                step = model(input_ids=torch.tensor([[chain[n]]]), past_key_values=step.past_key_values,
                             use_cache=True)
                decoded.append(step.logits[0, -1].double().numpy())
            out[f"d{length}"] = np.stack(decoded)
            if tokens is None:
                out[f"tok{length}"] = np.array(chain)
    return out


def minqwen_logits(folder: Path, run: str, tokens: dict) -> dict:
    import minqwen

    model = minqwen.load(folder, dtype="bfloat16" if run == "mqbf16" else "float32")
    model.deltanet_form = "chunked" if run == "mq32c" else "recurrent"
    ids = prompt_ids(model.config.vocab_size)
    out = {}
    for length in LENGTHS:
        cache = model.new_cache()
        out[f"p{length}"] = model.forward(ids[:length], cache).astype(np.float64)
        out[f"d{length}"] = np.stack([model.forward([int(t)], cache, last_only=True)[-1].astype(np.float64)
                                      for t in tokens[f"tok{length}"]])
    return out


def run_one(folder: Path, run: str) -> None:
    """One run, in this process; its logits saved beside the checkpoint."""
    tokens = None if run == "ref32" else dict(np.load(folder / "ref32.npz"))
    if run.startswith("ref"):
        out = reference_logits(folder, run == "ref64", tokens)
    else:
        out = minqwen_logits(folder, run, tokens)
    np.savez(folder / f"{run}.npz", **out)


# ==================================================================== the driver


def largest_difference(a: dict, b: dict) -> float:
    return max(float(np.abs(a[k] - b[k]).max()) for k in a if not k.startswith("tok"))


def check_member(member: str, vocab: int, out: Path) -> None:
    from real_shape import write_random

    folder = out / f"{member}-vocab{vocab}"
    write_random(folder, text_config(member, vocab), seed=sum(map(ord, member)))
    for run in RUNS:  # each in a new process: one model in memory at a time
        subprocess.run([sys.executable, __file__, "--run", run, "--folder", str(folder)], check=True)
    logits = {run: dict(np.load(folder / f"{run}.npz")) for run in RUNS}
    scale = max(float(np.abs(v).max()) for k, v in logits["ref32"].items() if not k.startswith("tok"))
    own = largest_difference(logits["ref32"], logits["ref64"])
    print(f"{member} (vocabulary {vocab}): logits up to {scale:.3g}; transformers fp32 vs float64: {own:.2e}")
    for run in ("mq32", "mq32c", "mqbf16"):
        print(f"  minqwen {run:<7} vs transformers fp32 {largest_difference(logits[run], logits['ref32']):.2e}, "
              f"vs float64 {largest_difference(logits[run], logits['ref64']):.2e}")
    (folder / "summary.json").write_text(json.dumps({"member": member, "vocab": vocab, "logit_scale": scale,
                                                     "ref32_vs_ref64": own}, indent=1))


def member_name(text: str) -> str:
    if text not in MEMBERS:
        raise argparse.ArgumentTypeError(f"{text!r} is not a Qwen3.5 member this check knows: {', '.join(MEMBERS)}")
    return text


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("members", nargs="*", type=member_name, metavar="MEMBER",
                        help=f"which members (default: all): {', '.join(MEMBERS)}")
    parser.add_argument("--vocab", type=whole_number(2, 1 << 20), default=4096,
                        help="vocabulary size (default 4096; the releases' is 248,320)")
    parser.add_argument("--out", type=output_folder, default=ROOT / "scratch" / "family-shapes",
                        help="where the checkpoints and logits go (default scratch/family-shapes; never commit)")
    parser.add_argument("--run", choices=RUNS, help=argparse.SUPPRESS)  # internal: one run in this process
    parser.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    require_reference(parser.prog)  # the checkpoints are built, and the logits compared, in transformers
    if args.run:
        run_one(args.folder, args.run)
        return 0
    for member in args.members or MEMBERS:
        check_member(member, args.vocab, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
