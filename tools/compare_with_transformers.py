"""Run a local Qwen3.5 checkpoint in minqwen and in transformers, and say whether they agree.

    python tools/compare_with_transformers.py --model DIR [--prompt TEXT | --tokens IDS]
                                              [--new-tokens N] [--atol A] [--rtol R] [--keep DIR]
                                              [--reference-model DIR2] [--dtype bfloat16]

Any checkpoint folder minqwen loads — dense or mixture-of-experts, text-only or multimodal,
fp32, bf16 or FP8 (with blocks that divide its matrices, as transformers needs) — runs twice:
in minqwen (float32; ``--dtype bfloat16``: the bf16-resident mode, exact too on a bf16
checkpoint), and in transformers 5.23.0 in fp32 with eager attention (the class
config.json names: Qwen3_5ForCausalLM for ``qwen3_5_text``, Qwen3_5ForConditionalGeneration
for ``qwen3_5``, their Moe twins for the MoE types). Printed:

* max |Δlogits| over every prompt position, against the tolerance ``--atol``;
* greedy agreement: each side decodes N tokens by argmax through its own cache, and the
  continuations are compared token by token (with max |Δlogits| over the decode steps both
  sides ran on the same tokens);
* on a mismatch, the first diverging tap: every intermediate (minqwen.golden's tap table) was
  recorded on both sides — golden.record on minqwen's, forward hooks on transformers'
  (tools/reference.py) — and the first one, in forward order, beyond ``|Δ| ≤ atol + rtol·|ref|``
  is named, with the taps just before it.

``--reference-model DIR2`` loads transformers from another folder holding the same model —
the original release, when DIR is a copy you converted, re-sharded or re-saved — so that the
comparison checks the copy too: a tensor changed on the way shows as the first diverging tap
of its layer.

The prompt is ``--prompt`` text tokenized with DIR/tokenizer.json, or ``--tokens`` ids, or
(neither given) ``--random-tokens`` random ids. Exit code 0 when the logits agree within
``--atol`` and the greedy continuations are identical, 1 when they do not, 2 on an error.

The default ``--atol`` 2e-3 is for real checkpoints: the two implementations add the same
products in different orders, and at Qwen3.5-0.8B size (24 layers, logits up to ±50) fp32
round-off alone leaves max |Δlogits| near 6e-4 — an error in the model changes logits by far
more. For the tiny test checkpoints 1e-4 holds.
"""

from __future__ import annotations

import argparse
import gc
import math
import re
import sys
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import minqwen  # noqa: E402
from minqwen import golden  # noqa: E402
from minqwen.cli import parse_token_ids  # noqa: E402
from minqwen.checkpoint import Checkpoint  # noqa: E402
from minqwen.config import load_config  # noqa: E402
from minqwen.errors import MinqwenError  # noqa: E402

DEFAULT_ATOL = 2e-3
DEFAULT_RTOL = 1e-3
DEFAULT_NEW_TOKENS = 16
DEFAULT_RANDOM_TOKENS = 32
ROWS_BEFORE = 4  # taps shown before the first diverging one
_STEP = re.compile(r"step(\d+)\.")


def prompt_ids(model_dir: Path, vocab_size: int, prompt: str | None, tokens: str | None, n_random: int,
               seed: int) -> tuple[list[int], str]:
    """The prompt's ids, and where they came from."""
    if tokens is not None:
        ids = parse_token_ids(tokens)
        bad = [t for t in ids if t >= vocab_size]
        if bad:  # checked here: transformers would fail on it with an IndexError
            raise MinqwenError(f"--tokens: token id {bad[0]} is outside the vocabulary (0 … {vocab_size - 1})")
        return ids, "given ids"
    if prompt is not None:
        if not (model_dir / "tokenizer.json").is_file():
            raise MinqwenError(f"{model_dir}: no tokenizer.json, so --prompt cannot be tokenized; give ids with "
                               f"--tokens (e.g. --tokens 1,2,3), or leave both out for random ids")
        ids = minqwen.Tokenizer(model_dir).encode(prompt)
        if not ids:
            raise MinqwenError("--prompt: the text tokenizes to no tokens; give a non-empty prompt")
        return ids, "tokenizer.json"
    if n_random < 1:
        raise MinqwenError(f"--random-tokens must be ≥ 1, got {n_random}")
    if seed < 0:
        raise MinqwenError(f"--seed must be ≥ 0, got {seed}")
    rng = np.random.default_rng(seed)
    return rng.integers(0, vocab_size, size=n_random).tolist(), f"random ids, seed {seed}"


def stored_dtypes(model_dir: Path) -> str:
    """What the checkpoint's tensors are stored as, most common first: "BF16 300, F32 50"."""
    ckpt = Checkpoint(model_dir)
    counts = Counter(ckpt.where[name].dtype_name(name) for name in ckpt.names)
    return ", ".join(f"{dtype} {n}" for dtype, n in counts.most_common())


def check_fp8_blocks_for_the_reference(folder: Path) -> None:
    """Refuse an FP8 checkpoint whose scale grids transformers 5.23.0 would misread.

    minqwen reads a weight's scale grid as the config's block size, the last block of a row or
    column cut short where the block does not divide the shape. transformers instead takes the
    block as shape ÷ grid, which is the same only where the block divides the shape or the grid
    has one block in that dimension; otherwise its dequantized weights are wrong (or it stops
    with an error), and a comparison would blame minqwen. Real releases (blocks of 128 over
    widths that are multiples of 128) pass.
    """
    config = load_config(folder)
    if config.quantization is None:
        return
    block = tuple(config.quantization.weight_block_size)
    ckpt = Checkpoint(folder)
    for scale_name in ckpt.names:
        if not scale_name.endswith("_scale_inv"):
            continue
        name = scale_name[: -len("_scale_inv")]
        if name not in ckpt:
            continue  # minqwen's loader names this mistake itself
        shape, grid = ckpt.where[name].shape(name)[-2:], ckpt.where[scale_name].shape(scale_name)[-2:]
        for size, cells, step, axis in zip(shape, grid, block, ("rows", "columns")):
            if size % step and cells > 1:
                raise MinqwenError(
                    f"{folder}: FP8 blocks {list(block)} do not divide {name}'s shape {list(shape)} "
                    f"({axis}: {size} in {cells} blocks of {step}); transformers 5.23.0 takes the block as "
                    f"shape ÷ scale grid and would misread it, so it cannot be the reference for this "
                    f"checkpoint (minqwen itself loads it). Quantize with blocks that divide every matrix.")


def step_of(name: str) -> int:
    """−1 for a prompt tap, n for decode step n's (``step{n}.…``)."""
    match = _STEP.match(name)
    return int(match.group(1)) if match else -1


def top2_margin(logits_row: np.ndarray) -> float:
    top = np.sort(logits_row)[-2:]
    return float(top[1] - top[0])


def compare(model_dir: Path, ids: list[int], new_tokens: int, atol: float, rtol: float, workdir: Path,
            reference_dir: Path | None = None, dtype: str = "float32") -> dict:
    """Both runs, their recordings in ``workdir``, and the figures. Returns them as a dict.

    minqwen runs ``model_dir``, loaded with ``dtype``; transformers runs ``reference_dir``
    (default: the same folder).
    """
    import reference  # tools/reference.py: torch and transformers, imported only when comparing

    reference_dir = model_dir if reference_dir is None else reference_dir
    config = load_config(model_dir)
    if golden.config_hash(load_config(reference_dir)) != golden.config_hash(config):
        raise MinqwenError(f"{model_dir} and {reference_dir} hold different model configs; --reference-model "
                           f"must be the same model")
    meta = {"config_sha256": golden.config_hash(config), "config": config.to_dict()}

    check_fp8_blocks_for_the_reference(reference_dir)
    # minqwen first (it names a tensor that does not fit config.json, where transformers only
    # points at a report), then the reference: only one model is in memory at a time.
    model = minqwen.load(model_dir, dtype=dtype)
    ours = golden.record(model, ids, decode_steps=new_tokens)
    ours_path = workdir / "minqwen.safetensors"
    golden.save(ours, ours_path, golden.model_metadata(model))
    del model
    gc.collect()

    try:
        hf_model = reference.load_pretrained(reference_dir)
        reference_class = type(hf_model).__name__
        theirs = reference.reference_taps(hf_model, ids, new_tokens)
    except MinqwenError:
        raise
    except Exception as e:  # noqa: BLE001 - whatever transformers cannot do with this checkpoint is no verdict on minqwen
        raise MinqwenError(f"transformers could not run {reference_dir}, so there is nothing to compare with: "
                           f"{type(e).__name__}: {e}") from None
    del hf_model
    gc.collect()
    theirs_path = workdir / "transformers.safetensors"
    golden.save(theirs, theirs_path, {**meta, "producer": f"transformers {reference.transformers.__version__} "
                                                          f"{reference_class}, fp32 eager (forward hooks)"})

    # Greedy: how many leading tokens agree; decode step n ran on the same input on both sides iff n < agree.
    ours_gen = ours.get("generated_ids", np.zeros(0, np.int64)).tolist()
    theirs_gen = theirs.get("generated_ids", np.zeros(0, np.int64)).tolist()
    agree = next((n for n, (a, b) in enumerate(zip(ours_gen, theirs_gen)) if a != b), new_tokens)
    step_diffs = [float(np.abs(ours[f"step{n}.logits"] - theirs[f"step{n}.logits"]).max()) for n in range(agree)]
    result = {
        "reference_class": reference_class,
        "prompt_tokens": len(ids),
        "max_abs_logit_diff": float(np.abs(ours["logits"] - theirs["logits"]).max()),
        "logit_scale": float(np.abs(theirs["logits"]).max()),
        "decode_max_abs_logit_diff": max(step_diffs, default=0.0),
        "new_tokens": new_tokens,
        "greedy_identical": agree,
        "minqwen_tokens": ours_gen,
        "transformers_tokens": theirs_gen,
        "first_divergent": None,
        "rows_before": [],
        "parting_margin": None,
    }
    result["ok"] = (result["max_abs_logit_diff"] <= atol and result["decode_max_abs_logit_diff"] <= atol
                    and agree == new_tokens)
    if agree < new_tokens:  # the reference's top-2 gap where the continuations parted: a near tie, or not
        before = theirs["logits"][-1] if agree == 0 else theirs[f"step{agree - 1}.logits"][-1]
        result["parting_margin"] = top2_margin(before)
    if not result["ok"]:
        # Look for the first tap beyond tolerance among the calls both sides ran on the same tokens.
        report = golden.compare(ours_path, theirs_path, atol=atol, rtol=rtol)
        rows = [row for row in report.rows if row.name not in ("token_ids", "generated_ids")
                and step_of(row.name) < agree]
        first = next((i for i, row in enumerate(rows) if not row.ok), None)
        if first is not None:
            result["first_divergent"] = rows[first]
            result["rows_before"] = rows[max(0, first - ROWS_BEFORE):first]
    return result


def format_row(row) -> str:
    if row.shape_a != row.shape_b:
        return f"{row.name}  shapes differ: minqwen {list(row.shape_a)}, transformers {list(row.shape_b)}"
    return (f"{row.name:<44} {str(list(row.shape_a)):<16} max |Δ| {row.max_abs:9.2e}  "
            f"beyond tolerance {row.beyond}/{row.size}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, type=Path, metavar="DIR",
                        help="checkpoint folder (config.json + *.safetensors)")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--prompt", metavar="TEXT", help="prompt text, tokenized with DIR/tokenizer.json")
    source.add_argument("--tokens", metavar="IDS", help="prompt token ids, comma- or space-separated")
    parser.add_argument("--random-tokens", type=int, default=DEFAULT_RANDOM_TOKENS, metavar="N",
                        help=f"without --prompt or --tokens: N random ids (default {DEFAULT_RANDOM_TOKENS})")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random ids (default 0)")
    parser.add_argument("--new-tokens", type=int, default=DEFAULT_NEW_TOKENS, metavar="N",
                        help=f"greedy tokens each side decodes (default {DEFAULT_NEW_TOKENS})")
    parser.add_argument("--atol", type=float, default=DEFAULT_ATOL,
                        help=f"largest |Δlogits| that counts as agreement (default {DEFAULT_ATOL:g})")
    parser.add_argument("--rtol", type=float, default=DEFAULT_RTOL,
                        help=f"relative tolerance of the tap comparison, on top of atol (default {DEFAULT_RTOL:g})")
    parser.add_argument("--threads", type=int, default=None, metavar="N",
                        help="threads for both minqwen and torch (default: their own defaults)")
    parser.add_argument("--keep", type=Path, default=None, metavar="DIR",
                        help="keep both recordings in DIR (for `minqwen golden compare`)")
    parser.add_argument("--reference-model", type=Path, default=None, metavar="DIR2",
                        help="load transformers from this folder instead (the same model, e.g. the original "
                             "release of a copy you converted)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                        help="minqwen's weights in memory: float32 (default) or bfloat16 (the bf16-resident mode)")
    args = parser.parse_args(argv)

    try:
        if args.new_tokens < 0:
            raise MinqwenError(f"--new-tokens must be ≥ 0, got {args.new_tokens}")
        if not (0 <= args.atol < math.inf and 0 <= args.rtol < math.inf):  # an infinite tolerance passes anything
            raise MinqwenError(f"--atol and --rtol must be finite numbers ≥ 0, got {args.atol} and {args.rtol}")
        config = load_config(args.model)
        ids, origin = prompt_ids(args.model, config.vocab_size, args.prompt, args.tokens, args.random_tokens,
                                 args.seed)
        if len(ids) + args.new_tokens > config.max_position_embeddings:
            raise MinqwenError(f"the prompt's {len(ids)} tokens ({origin}) and --new-tokens {args.new_tokens} pass "
                               f"the model's context of {config.max_position_embeddings} positions "
                               f"(max_position_embeddings)")
        if args.threads is not None:
            import torch

            minqwen.set_threads(args.threads)
            torch.set_num_threads(args.threads)
        kind = f"MoE, {config.num_experts} experts, top-{config.num_experts_per_tok}" if config.is_moe else "dense"
        quant = (f"; FP8, blocks {list(config.quantization.weight_block_size)}" if config.quantization else "")
        print(f"model:  {args.model} ({kind}, {config.num_hidden_layers} layers; stored {stored_dtypes(args.model)}"
              f"{quant})")
        print(f"prompt: {len(ids)} tokens ({origin}); {args.new_tokens} greedy tokens each side")
        if args.dtype != "float32":
            print(f"minqwen: weights kept {args.dtype} (minqwen.load(..., dtype={args.dtype!r}))")
        if args.reference_model is not None:
            print(f"transformers loads: {args.reference_model}")
        if args.keep is not None:
            if args.keep.exists() and not args.keep.is_dir():
                raise MinqwenError(f"--keep {args.keep}: is a file; give a folder to keep the golden files in")
            try:
                args.keep.mkdir(parents=True, exist_ok=True)
            except OSError as e:  # a file on the way, no permission
                raise MinqwenError(f"--keep {args.keep}: cannot make this folder ({e.strerror or e})") from None
            result = compare(args.model, ids, args.new_tokens, args.atol, args.rtol, args.keep, args.reference_model,
                             args.dtype)
        else:
            with tempfile.TemporaryDirectory(prefix="minqwen-compare-") as tmp:
                result = compare(args.model, ids, args.new_tokens, args.atol, args.rtol, Path(tmp),
                                 args.reference_model, args.dtype)
    except MinqwenError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    r = result
    print(f"reference: transformers {r['reference_class']}, fp32, eager")
    mark = "ok" if r["max_abs_logit_diff"] <= args.atol else "BEYOND TOLERANCE"
    print(f"logits over the prompt:  max |Δ| = {r['max_abs_logit_diff']:.2e}  (largest |logit| "
          f"{r['logit_scale']:.3g}; tolerance {args.atol:g})  {mark}")
    if args.new_tokens:
        same = r["greedy_identical"]
        mark = "ok" if r["decode_max_abs_logit_diff"] <= args.atol else "BEYOND TOLERANCE"
        print(f"logits of the decode steps run on the same tokens ({same}):  max |Δ| = "
              f"{r['decode_max_abs_logit_diff']:.2e}  {mark}")
        print(f"greedy: {same} of {args.new_tokens} tokens identical")
        if same < args.new_tokens:
            print(f"  parted at token {same}: minqwen {r['minqwen_tokens'][same]}, transformers "
                  f"{r['transformers_tokens'][same]} (the reference's top-2 logit gap there: "
                  f"{r['parting_margin']:.2e})")
    if not r["ok"]:
        first = r["first_divergent"]
        if first is None and r["greedy_identical"] < args.new_tokens:
            print(f"no tap beyond tolerance (atol {args.atol:g}, rtol {args.rtol:g}) before the continuations "
                  f"parted: a near tie in the logits, not a wrong intermediate")
        elif first is None:
            print(f"the logits differ by more than --atol {args.atol:g}, but every tap, the logits included, is "
                  f"within atol + rtol·|reference| (rtol {args.rtol:g}): the difference is relative to large "
                  f"values. --rtol 0 names the first tap beyond --atol alone")
        else:
            print(f"first diverging tap (|Δ| > atol {args.atol:g} + rtol {args.rtol:g}·|reference|), in forward "
                  f"order, with the taps before it:")
            for row in r["rows_before"]:
                print("     " + format_row(row))
            print("  >> " + format_row(first))
            print(f"first diverging tap: {first.name}")
        if args.keep is not None:
            print(f"every tap: minqwen golden compare {args.keep / 'minqwen.safetensors'} "
                  f"{args.keep / 'transformers.safetensors'} --atol {args.atol:g} --rtol {args.rtol:g}")
    print("PASS" if r["ok"] else "FAIL")
    return 0 if r["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
