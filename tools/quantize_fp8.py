"""Quantize a checkpoint to block-scaled FP8, as Qwen's "-FP8" releases are stored: test material.

    python tools/quantize_fp8.py SRC OUT [--block ROWS COLS] [--scale-dtype bfloat16|float16|float32]
                                         [--spread N] [--seed S]

Writes OUT/model.safetensors and OUT/config.json (SRC's, with a ``quantization_config`` at its
top level) and copies SRC's other files (tokenizer, …). Each projection matrix of the language
model — attention, Gated DeltaNet and MLP projections, shared experts, routed experts per
expert (``experts.{e}.gate_proj.weight``) or fused (``experts.gate_up_proj``) — becomes

    weight            F8_E4M3 [..., R, C]
    weight_scale_inv  [..., ⌈R/b0⌉, ⌈C/b1⌉] in --scale-dtype: one scale per block, ceiling grid

(``<name>_scale_inv`` for fused experts), so that ``weight × its block's scale`` ≈ the source
weight. Everything else keeps its stored dtype: embeddings, the LM head, norms, the conv, the
router (``mlp.gate``), ``shared_expert_gate``, decay parameters, biases, the vision tower.
The 2-D matrices among them (embeddings, an untied LM head, the router, ``shared_expert_gate``,
the vision tower's linear layers) are listed, by module, in ``modules_to_not_convert``; the
1-D and 3-D tensors (norms, the conv, decay parameters, biases) are not.

The scales are made to be *test* material: a block's natural scale is max|block| / 448 (448 is
the largest E4M3 value), and each is further multiplied by a random power of two from 1 to
2^--spread (default 2^6). Every scale is then far from 1 and neighbouring blocks differ by up
to 64×, so a loader that ignored the scales, transposed their grid or assumed a different
block size would load visibly wrong weights. (A real quantizer uses the natural scale alone,
for the most precision; here precision is not the point.)
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
from pathlib import Path

import ml_dtypes
import numpy as np
from safetensors.numpy import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from argtypes import checkpoint_folder, output_folder, whole_number  # noqa: E402
from minqwen.checkpoint import FLOAT_DTYPES, Checkpoint, fp8_scale_grid  # noqa: E402
from minqwen.config import load_config  # noqa: E402
from minqwen.errors import MinqwenError  # noqa: E402

FP8 = np.dtype(ml_dtypes.float8_e4m3fn)
FP8_MAX = float(ml_dtypes.finfo(ml_dtypes.float8_e4m3fn).max)  # 448
SCALE_DTYPES = {"bfloat16": np.dtype(ml_dtypes.bfloat16), "float16": np.dtype(np.float16),
                "float32": np.dtype(np.float32)}

# The language model's projection matrices, by name: what the FP8 releases quantize.
QUANTIZED = re.compile(
    r"\.(q_proj|k_proj|v_proj|o_proj|in_proj_qkv|in_proj_z|in_proj_a|in_proj_b|out_proj"
    r"|gate_proj|up_proj|down_proj)\.weight$"  # dense MLP, shared expert, per-expert experts, attention
    r"|\.experts\.(gate_up_proj|down_proj)$"  # fused experts [E, rows, cols]
)


def is_quantized(name: str) -> bool:
    return QUANTIZED.search(name) is not None and not name.startswith(("model.visual.", "visual."))


def block_scales(weight: np.ndarray, block: tuple[int, int], scale_dtype: np.dtype, rng, spread: int) -> np.ndarray:
    """One scale per block of weight [..., R, C] (ceiling grid) → [..., ⌈R/b0⌉, ⌈C/b1⌉], stored dtype.

    max|block| / 448 makes the block's largest value the largest FP8 value; the random factor
    2^k, k in 0 … spread, only ever makes a scale larger, so no quantized value overflows.
    """
    *lead, rows, cols = weight.shape
    b0, b1 = min(block[0], rows), min(block[1], cols)  # a block past the matrix is one block over it
    grid = fp8_scale_grid(weight.shape, block)
    # Pad to whole blocks with zeros (they do not change a block's max), then take each block's max.
    padded = np.zeros((*lead, grid[-2] * b0, grid[-1] * b1), np.float32)
    padded[..., :rows, :cols] = np.abs(weight)
    amax = padded.reshape(*lead, grid[-2], b0, grid[-1], b1).max(axis=(-3, -1))  # [..., ⌈R/b0⌉, ⌈C/b1⌉]
    with np.errstate(over="ignore"):  # an overflow is reported below, by the option that causes it
        scale = amax / FP8_MAX * 2.0 ** rng.integers(0, spread + 1, size=amax.shape)
        # An all-zero block, or a scale below what the storage dtype can hold: the smallest normal one.
        scale = np.maximum(scale, float(ml_dtypes.finfo(scale_dtype).tiny))
        stored = scale.astype(scale_dtype)
    if not np.isfinite(stored.astype(np.float32)).all():  # an inf scale would quantize its block to zeros
        raise SystemExit(f"--spread {spread}: a scale exceeds the largest {scale_dtype.name} value; "
                         f"give a smaller --spread or a wider --scale-dtype")
    return stored


def quantize(weight: np.ndarray, scale_inv: np.ndarray, block: tuple[int, int]) -> np.ndarray:
    """weight [..., R, C] ÷ its block's stored scale, rounded to E4M3 → F8 [..., R, C]."""
    rows, cols = weight.shape[-2:]
    b0, b1 = min(block[0], rows), min(block[1], cols)  # a block past the matrix is one block over it
    per_element = np.repeat(np.repeat(scale_inv.astype(np.float32), b0, axis=-2), b1, axis=-1)[..., :rows, :cols]
    return np.clip(weight / per_element, -FP8_MAX, FP8_MAX).astype(FP8)


def quantize_checkpoint(src: Path, out: Path, block=(128, 128), scale_dtype: str = "float32", spread: int = 6,
                        seed: int = 0) -> dict:
    """Write the FP8 copy of checkpoint ``src`` to ``out``. Returns what was done, for reports and tests."""
    src, out = Path(src), Path(out)
    block = (int(block[0]), int(block[1]))
    if block[0] < 1 or block[1] < 1:
        raise SystemExit(f"--block must be two positive integers, got {list(block)}")
    if out.resolve() == src.resolve():  # it would delete the source's weights before copying its other files
        raise SystemExit(f"{out}: OUT is the source folder; give another folder for the FP8 copy")
    load_config(src)  # a config.json minqwen refuses is named here, not met as a KeyError later
    config = json.loads((src / "config.json").read_text())
    if "quantization_config" in config:
        raise SystemExit(f"{src}: already quantized ({config['quantization_config'].get('quant_method')})")
    ckpt = Checkpoint(src)
    rng = np.random.default_rng(seed)
    tensors: dict[str, np.ndarray] = {}
    quantized, kept = [], []
    for name in ckpt.names:
        value = np.array(ckpt.raw(name))  # a copy, in its stored dtype
        if is_quantized(name) and ckpt.where[name].dtype_name(name) in FLOAT_DTYPES and value.ndim >= 2:
            weight = value.astype(np.float32)
            scale_inv = block_scales(weight, block, SCALE_DTYPES[scale_dtype], rng, spread)
            tensors[name] = quantize(weight, scale_inv, block)
            tensors[name + "_scale_inv"] = scale_inv  # ….weight → ….weight_scale_inv
            quantized.append(name)
        else:
            tensors[name] = value
            if name.endswith(".weight") and value.ndim == 2:
                kept.append(name.removesuffix(".weight"))

    out.mkdir(parents=True, exist_ok=True)
    for stale in list(out.glob("*.safetensors")) + list(out.glob("*.safetensors.index.json")):
        stale.unlink()
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    config["quantization_config"] = {
        "quant_method": "fp8",
        "fmt": "e4m3",
        "activation_scheme": "dynamic",
        "weight_block_size": list(block),
        "modules_to_not_convert": sorted(kept),
    }
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    for path in src.iterdir():  # tokenizer files and the like; never the source weights
        if path.is_file() and path.name != "config.json" and not path.name.endswith((".safetensors", ".index.json")):
            shutil.copy2(path, out / path.name)
    return {"quantized": quantized, "not_converted": sorted(kept), "block": list(block), "scale_dtype": scale_dtype}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", type=checkpoint_folder, help="checkpoint folder to quantize (unquantized weights)")
    parser.add_argument("out", type=output_folder, help="folder to write the FP8 checkpoint to")
    parser.add_argument("--block", type=whole_number(1), nargs=2, default=[128, 128], metavar=("ROWS", "COLS"),
                        help="weight_block_size (default 128 128)")
    parser.add_argument("--scale-dtype", choices=sorted(SCALE_DTYPES), default="float32",
                        help="how the scales are stored (default float32)")
    parser.add_argument("--spread", type=whole_number(0), default=6,
                        help="scales get a random factor 2^0 … 2^SPREAD (default 6)")
    parser.add_argument("--seed", type=whole_number(0), default=0, help="seed of the scales' factors (default 0)")
    args = parser.parse_args(argv)
    try:
        done = quantize_checkpoint(args.src, args.out, tuple(args.block), args.scale_dtype, args.spread, args.seed)
    except MinqwenError as e:  # a source checkpoint minqwen cannot read
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{args.out}: {len(done['quantized'])} tensors in FP8 (blocks {done['block']}, {done['scale_dtype']} "
          f"scales), {len(done['not_converted'])} matrices kept as stored")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
