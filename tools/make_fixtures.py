"""Build the reference fixtures under tests/fixtures/ (needs the `reference` extra).

    python tools/make_fixtures.py          # rebuilds every fixture

The weights come from fixed seeds, so a rebuild writes the same checkpoints on any machine;
the reference's outputs agree with the committed ones to float32 round-off (torch's kernels,
chosen by CPU and thread count, add in their own order: a rebuild on another machine differed
by up to 6e-5), inside the tests' 1e-4.

Each fixture is a folder holding a small random Qwen3.5 checkpoint exactly as transformers
5.23.0 saves it, and ``expected.safetensors`` with what the reference computes for it in fp32
eager mode: the prompt's token ids, logits, every decoder layer's output, the final norm, the
decode state after the prompt, and a 32-token greedy continuation decoded through the
reference's own cache. The configs between them cover: value heads = key heads, 2×, 3× and 4×;
tied and untied heads; conv kernels 2, 3 and 4; head dims 16 and 32; partial rotary 0.25, 0.5
and 1.0; an M-RoPE section that does not fit the rotary dims (the default one, as tiny test
models do) and ones that do; attention biases; fp32 and bf16 storage; both key layouts; a
sharded checkpoint; layer types derived from full_attention_interval. The mixture-of-experts
fixtures (``moe_*``) cover 3, 4, 8 and 16 experts with top-1, top-2, top-4 and top-k = all
experts; per-expert and fused expert tensors; text-only and multimodal; fp32 and bf16; and
also record each layer's router logits and chosen experts.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from argtypes import require_reference  # noqa: E402

require_reference(Path(__file__).name)
from reference import build_model, run_reference, save_checkpoint  # noqa: E402

FIXTURES = Path(__file__).resolve().parent.parent / "tests" / "fixtures"
PROMPT_LENGTH = 21
GREEDY_TOKENS = 32


def base(**overrides) -> dict:
    cfg = dict(
        vocab_size=160, hidden_size=48, intermediate_size=96, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, hidden_act="silu",
        max_position_embeddings=512, rms_norm_eps=1e-6, attention_bias=False,
        linear_conv_kernel_dim=4, linear_key_head_dim=12, linear_value_head_dim=8,
        linear_num_key_heads=2, linear_num_value_heads=2, tie_word_embeddings=False,
        rope_parameters=dict(rope_type="default", rope_theta=10000.0, partial_rotary_factor=0.25),
    )
    cfg.update(overrides)
    return cfg


def moe(**overrides) -> dict:
    """A small qwen3_5_moe text config: base() with the dense MLP replaced by experts."""
    cfg = base(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, shared_expert_intermediate_size=24,
               layer_types=["linear_attention"] * 3 + ["full_attention"])
    del cfg["intermediate_size"]  # not a field of the MoE config: every layer is MoE
    cfg.update(overrides)
    return cfg


# name → (text config, how to save it)
FIXTURE_SPECS = {
    # Text-only layout, fp32, tied, Hv = Hk, default M-RoPE section [11, 11, 10] on a 4-dim rotary.
    "text_tied_fp32": (
        base(tie_word_embeddings=True, layer_types=["linear_attention"] * 3 + ["full_attention"]),
        dict(multimodal=False, dtype="float32"),
    ),
    # bf16 storage, untied, Hv = 2·Hk, conv kernel 3, head_dim 32, half rotary with a fitting
    # section, attention biases.
    "text_grouped_bf16_bias": (
        base(linear_num_value_heads=4, linear_conv_kernel_dim=3, head_dim=32, attention_bias=True,
             num_attention_heads=2, num_key_value_heads=1,
             rope_parameters=dict(rope_type="default", rope_theta=1e6, partial_rotary_factor=0.5,
                                  mrope_section=[4, 2, 2], mrope_interleaved=True),
             layer_types=["linear_attention", "full_attention", "linear_attention", "full_attention"]),
        dict(multimodal=False, dtype="bfloat16"),
    ),
    # Multimodal layout (model.language_model.*), top-level tie, sharded, Hv = 3·Hk, conv
    # kernel 2, full rotary, layer_types left to full_attention_interval (=3) in config.json.
    "multimodal_sharded": (
        base(linear_num_value_heads=6, linear_conv_kernel_dim=2, num_hidden_layers=6,
             rope_parameters=dict(rope_type="default", rope_theta=10000.0, partial_rotary_factor=1.0,
                                  mrope_section=[3, 3, 2], mrope_interleaved=True),
             layer_types=["linear_attention", "linear_attention", "full_attention"] * 2),
        dict(multimodal=True, tie=True, dtype="float32", max_shard_size="60KB",
             drop_config=("layer_types",), extra_config={"full_attention_interval": 3}),
    ),
    # Multimodal layout, bf16, untied (top level absent → untied even though text_config says tied).
    "multimodal_bf16_untied": (
        base(tie_word_embeddings=True, linear_num_value_heads=4, linear_num_key_heads=1,
             linear_key_head_dim=16, linear_value_head_dim=16,
             layer_types=["linear_attention"] * 3 + ["full_attention"]),
        dict(multimodal=True, tie=None, dtype="bfloat16", drop_top_config=("tie_word_embeddings",)),
    ),
    # MoE, text-only, fp32, tied, 4 experts top-2, experts per expert (save_pretrained's default).
    "moe_text_per_expert_fp32": (
        moe(tie_word_embeddings=True),
        dict(multimodal=False, dtype="float32"),
    ),
    # MoE, bf16, untied, top-k = all 8 experts (the router only weighs them), fused experts,
    # grouped value heads.
    "moe_text_fused_all_experts_bf16": (
        moe(num_experts=8, num_experts_per_tok=8, linear_num_value_heads=4, shared_expert_intermediate_size=16),
        dict(multimodal=False, dtype="bfloat16", fused_experts=True),
    ),
    # MoE, bf16, 16 narrow experts top-4, per expert, attention every other layer.
    "moe_text_16_experts_top4_bf16": (
        moe(num_experts=16, num_experts_per_tok=4, moe_intermediate_size=8, shared_expert_intermediate_size=12,
            layer_types=["linear_attention", "full_attention"] * 2),
        dict(multimodal=False, dtype="bfloat16"),
    ),
    # MoE, multimodal layout (model.language_model.*), top-level tie, fp32, 3 experts top-1,
    # fused experts.
    "moe_multimodal_fused_top1": (
        moe(num_experts=3, num_experts_per_tok=1, moe_intermediate_size=24),
        dict(multimodal=True, tie=True, dtype="float32", fused_experts=True),
    ),
}


def build_fixture(name: str, text: dict, how: dict, seed: int) -> None:
    folder = FIXTURES / name
    if folder.exists():
        shutil.rmtree(folder)
    model = build_model(text, seed, multimodal=how.get("multimodal", False), tie=how.get("tie"))
    save_checkpoint(model, folder, dtype=how["dtype"], max_shard_size=how.get("max_shard_size"),
                    extra_config=how.get("extra_config"), drop_config=how.get("drop_config", ()),
                    drop_top_config=how.get("drop_top_config", ()), fused_experts=how.get("fused_experts", False))
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, text["vocab_size"], size=PROMPT_LENGTH).astype(np.int64)
    expected = run_reference(model, ids, n_greedy=GREEDY_TOKENS)
    expected["token_ids"] = ids
    if expected["greedy_margin"].min() < 1e-3:
        print(f"  warning: {name}: a greedy step has a top-2 margin of {expected['greedy_margin'].min():.2e}")
    arrays = {k: np.ascontiguousarray(v) for k, v in expected.items()}
    save_file(arrays, str(folder / "expected.safetensors"),
              metadata={"transformers": "5.23.0", "torch": "2.13.0", "seed": str(seed),
                        "text_config": json.dumps(text, sort_keys=True)})
    size = sum(p.stat().st_size for p in folder.iterdir())
    print(f"{name}: {size / 1024:.0f} KiB")


def main(argv: list[str] | None = None) -> None:
    # No options; parsed so that --help or a mistyped option does not rebuild the committed fixtures.
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args(argv)
    FIXTURES.mkdir(parents=True, exist_ok=True)
    for seed, (name, (text, how)) in enumerate(FIXTURE_SPECS.items(), start=1):
        build_fixture(name, text, how, seed)
    total = sum(p.stat().st_size for p in FIXTURES.rglob("*") if p.is_file())
    print(f"total: {total / 1024 / 1024:.2f} MiB in {FIXTURES}")


if __name__ == "__main__":
    main()
