"""Reference checkpoints built with transformers 5.23.0 (the `reference` extra).

One place that builds every checkpoint minqwen is tested or measured against:

* :func:`build_model` — a transformers Qwen3.5 model from a text-config dict, dense or
  mixture-of-experts (a config with ``num_experts``), every tensor randomized
  (:func:`randomize`), fp32, eager attention and eager experts;
* :func:`save_checkpoint` — writes it in either key layout, fp32 or bf16, single file or
  sharded, MoE experts per expert (transformers' default) or fused;
* :func:`run_reference` — logits, per-layer hidden states, final decode states and a greedy
  continuation, all from the reference;
* :func:`real_shape_text_config` — the real Qwen3.5-0.8B text config (random weights only);
  :func:`real_shape_moe_text_config` — Qwen3.5-35B-A3B's, cut to a few layers.

Used by tools/make_fixtures.py, tools/real_shape_parity.py and the live reference lane in
tests/test_reference_live.py. Never imported by minqwen itself.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import numpy as np
import torch
import transformers
from transformers import (
    Qwen3_5Config,
    Qwen3_5ForCausalLM,
    Qwen3_5ForConditionalGeneration,
    Qwen3_5MoeConfig,
    Qwen3_5MoeForCausalLM,
    Qwen3_5MoeForConditionalGeneration,
    Qwen3_5MoeTextConfig,
    Qwen3_5TextConfig,
)

assert transformers.__version__ == "5.23.0", f"reference is transformers 5.23.0, found {transformers.__version__}"
# Quiet: no progress bars when saving, no notes about optional fast kernels.
transformers.utils.logging.disable_progress_bar()
transformers.utils.logging.set_verbosity_error()

# A vision tower just big enough to exist: the multimodal wrapper needs one.
TINY_VISION = dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=0,
                   patch_size=4, temporal_patch_size=2, spatial_merge_size=2, num_position_embeddings=16)


def real_shape_text_config() -> dict:
    """Qwen3.5-0.8B's public text config (the weights will be random)."""
    return dict(
        vocab_size=248320, hidden_size=1024, intermediate_size=3584, num_hidden_layers=24,
        num_attention_heads=8, num_key_value_heads=2, head_dim=256, hidden_act="silu",
        max_position_embeddings=262144, rms_norm_eps=1e-6, tie_word_embeddings=True, attention_bias=False,
        linear_conv_kernel_dim=4, linear_key_head_dim=128, linear_value_head_dim=128,
        linear_num_key_heads=16, linear_num_value_heads=16,
        layer_types=(["linear_attention"] * 3 + ["full_attention"]) * 6,
        rope_parameters=dict(rope_type="default", rope_theta=1e7, partial_rotary_factor=0.25,
                             mrope_section=[11, 11, 10], mrope_interleaved=True),
        eos_token_id=248046,
    )


def real_shape_moe_text_config(num_experts: int = 256, experts_per_tok: int = 8, num_hidden_layers: int = 4) -> dict:
    """Qwen3.5-35B-A3B's public text config, cut to ``num_hidden_layers`` layers [L, L, L, F, …].

    hidden 2048; 256 experts, 8 per token, each 512 wide, plus a 512-wide shared expert;
    attention 16 query heads, 2 key/value heads, head_dim 256; Gated DeltaNet 16 key heads and
    32 value heads of 128; untied head. The expert count and top-k can be changed (the MoE
    figure also runs the issue's 64 experts, top-4).
    """
    return dict(
        vocab_size=248320, hidden_size=2048, num_hidden_layers=num_hidden_layers,
        num_attention_heads=16, num_key_value_heads=2, head_dim=256, hidden_act="silu",
        max_position_embeddings=262144, rms_norm_eps=1e-6, tie_word_embeddings=False, attention_bias=False,
        linear_conv_kernel_dim=4, linear_key_head_dim=128, linear_value_head_dim=128,
        linear_num_key_heads=16, linear_num_value_heads=32,
        layer_types=[("full_attention" if (i + 1) % 4 == 0 else "linear_attention") for i in range(num_hidden_layers)],
        rope_parameters=dict(rope_type="default", rope_theta=1e7, partial_rotary_factor=0.25,
                             mrope_section=[11, 11, 10], mrope_interleaved=True),
        num_experts=num_experts, num_experts_per_tok=experts_per_tok, moe_intermediate_size=512,
        shared_expert_intermediate_size=512, eos_token_id=248046,
    )


def build_model(text: dict, seed: int, multimodal: bool = False, tie: bool | None = None):
    """A randomized fp32 eager transformers model for the text config ``text``.

    ``multimodal``: build ``Qwen3_5ForConditionalGeneration`` (keys ``model.language_model.*``,
    tying decided by the top-level flag ``tie``) instead of ``Qwen3_5ForCausalLM``. A config
    with ``num_experts`` builds the mixture-of-experts classes (``Qwen3_5Moe…``) instead, with
    the experts run by transformers' eager loop (its default, grouped_mm, is another kernel).
    """
    torch.manual_seed(seed)
    moe = "num_experts" in text
    if multimodal:
        vision = dict(TINY_VISION, out_hidden_size=text["hidden_size"])
        top = {} if tie is None else {"tie_word_embeddings": tie}
        wrapper, cls = (Qwen3_5MoeConfig, Qwen3_5MoeForConditionalGeneration) if moe else (
            Qwen3_5Config, Qwen3_5ForConditionalGeneration)
        model = cls(wrapper(text_config=dict(text), vision_config=vision, **top))
    else:
        config, cls = (Qwen3_5MoeTextConfig, Qwen3_5MoeForCausalLM) if moe else (Qwen3_5TextConfig, Qwen3_5ForCausalLM)
        model = cls(config(**text))
    model.config._attn_implementation = "eager"
    for sub in (getattr(model.config, "text_config", None),):
        if sub is not None:
            sub._attn_implementation = "eager"
    if moe:
        model.set_experts_implementation("eager")
    model.eval()
    randomize(model, seed)
    return model


@torch.no_grad()
def randomize(model, seed: int) -> None:
    """Give every parameter a random value away from its default.

    Defaults of zeros or ones (norm offsets, dt_bias, biases) would hide exactly the bugs a
    parity test exists to catch — a forgotten ``1 +``, a dropped bias — so nothing keeps one.
    """
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        p.copy_(random_value(name, p.shape, gen))


def random_value(name: str, shape, gen: torch.Generator) -> torch.Tensor:
    """A random fp32 value for the parameter called ``name`` (transformers' own names).

    The router (``mlp.gate.weight``), the experts and ``shared_expert_gate`` are matrices like
    any other: scaled by their fan-in, so router logits are of order one and the softmax
    over experts is far from uniform and far from one-hot.
    """
    def normal(std, mean=0.0):
        return torch.randn(shape, generator=gen) * std + mean

    ndim = len(shape)
    if name.endswith("A_log"):
        # A in (0.3, 4), and below softplus(a + dt_bias) ≈ 0.1: per-token decays exp(g) of
        # about 0.5 to 0.99, as in trained models. The memory then carries information
        # across many tokens (and chunk boundaries), so a wrong state shows; a decay that
        # forgets everything each token would hide it.
        return torch.empty(shape).uniform_(math.log(0.3), math.log(4.0), generator=gen)
    if name.endswith("dt_bias"):
        return normal(0.5, mean=-2.5)
    if name.endswith("linear_attn.norm.weight"):
        return normal(0.2, mean=1.0)  # a plain scale, centred on one
    if ndim == 1 and "norm" in name:
        return normal(0.2)  # zero-centred: the model applies 1 + w
    if name.endswith(".bias"):
        return normal(0.1)
    if "embed_tokens" in name:
        # Small enough that a tied head gives logits of a few units: fp32 round-off then
        # stays well inside the 1e-4 parity tolerance (at |logit| ≈ 50 it does not).
        return normal(0.3)
    if ndim >= 2:
        # Fused experts are [E, out, in]: each expert's fan-in is the last dim. (Elsewhere the
        # only 3-D weight is the depthwise conv [C, 1, K], whose fan-in is K.)
        fan_in = shape[-1] if ".experts." in name else math.prod(shape[1:])
        return normal(1.0 / math.sqrt(fan_in))
    return normal(0.1)


@torch.no_grad()
def round_to_bf16(model) -> None:
    """Round every parameter to bf16 and back: the fp32 reference then runs on exactly the stored values."""
    for p in model.parameters():
        p.copy_(p.to(torch.bfloat16).to(torch.float32))


def save_checkpoint(model, folder: Path, dtype: str = "float32", max_shard_size=None, extra_config: dict | None = None,
                    drop_config: tuple = (), drop_top_config: tuple = (), fused_experts: bool = False) -> None:
    """save_pretrained in fp32 or bf16 (optionally sharded), then patch config.json if asked.

    ``extra_config`` / ``drop_config`` edit the text config (``text_config`` in the multimodal
    wrapper); ``drop_top_config`` removes fields of the wrapper itself. MoE experts are saved
    per expert (``experts.{e}.gate_proj.weight`` …, what save_pretrained writes by default)
    unless ``fused_experts`` (``experts.gate_up_proj``, ``experts.down_proj``: transformers'
    in-memory layout, written with ``save_original_format=False``).
    """
    folder = Path(folder)
    kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    if fused_experts:
        kwargs["save_original_format"] = False
    if dtype == "bfloat16":
        round_to_bf16(model)
        # Save a bf16 copy: casting the model itself there and back would also round its
        # rotary inv_freq buffer to bf16, and the fp32 reference would no longer be fp32.
        copy.deepcopy(model).to(torch.bfloat16).save_pretrained(folder, **kwargs)
    else:
        model.save_pretrained(folder, **kwargs)
    (folder / "generation_config.json").unlink(missing_ok=True)
    if extra_config or drop_config or drop_top_config:
        path = folder / "config.json"
        cfg = json.loads(path.read_text())
        for key in drop_top_config:
            cfg.pop(key, None)
        target = cfg.get("text_config", cfg)
        for key in drop_config:
            target.pop(key, None)
        target.update(extra_config or {})
        path.write_text(json.dumps(cfg, indent=2, sort_keys=True))


def _decoder_layers(model):
    inner = model.model.language_model if hasattr(model.model, "language_model") else model.model
    return inner


@torch.no_grad()
def run_reference(model, token_ids: np.ndarray, n_greedy: int = 0) -> dict[str, np.ndarray]:
    """Everything the golden tests compare, as NumPy arrays.

    ``logits`` [T, V]; ``hidden.{i}`` the output of decoder layer i [T, H]; ``norm`` the final
    norm's output; ``state.{i}.conv`` (last K−1 conv inputs, [K−1, conv_dim]) and
    ``state.{i}.recurrent`` [Hv, Dk, Dv] for DeltaNet layers, ``state.{i}.keys/values``
    [Hkv, T, D] for attention layers; for MoE layers ``router_logits.{i}`` [T, E] and
    ``experts_chosen.{i}`` [T, k] (the router's top-k, best first); ``greedy`` the next
    n_greedy argmax tokens decoded one at a time through the reference cache, with
    ``greedy_margin`` the top-1 − top-2 logit gap.
    """
    inner = _decoder_layers(model)
    captured: dict[str, np.ndarray] = {}
    hooks = []
    for i, layer in enumerate(inner.layers):
        hooks.append(layer.register_forward_hook(
            lambda mod, args, out, i=i: captured.__setitem__(f"hidden.{i}", out[0].float().numpy().copy())
        ))
    for i, layer in enumerate(inner.layers):
        if hasattr(layer.mlp, "gate"):  # an MoE block: its router returns (logits, weights, indices)
            hooks.append(layer.mlp.gate.register_forward_hook(
                lambda mod, args, out, i=i: captured.update({
                    f"router_logits.{i}": out[0].float().numpy().copy(),
                    f"experts_chosen.{i}": out[2].numpy().astype(np.int64),
                })
            ))
    hooks.append(inner.norm.register_forward_hook(
        lambda mod, args, out: captured.__setitem__("norm", out[0].float().numpy().copy())
    ))
    ids = torch.tensor(np.asarray(token_ids)[None], dtype=torch.long)
    out = model(input_ids=ids, use_cache=True)
    for h in hooks:
        h.remove()
    result = dict(captured)
    result["logits"] = out.logits[0].float().numpy()
    cache = out.past_key_values
    types = inner.config.layer_types
    for i, layer_cache in enumerate(cache.layers):
        if types[i] == "linear_attention":
            conv = layer_cache.conv_states[0][0]  # [conv_dim, K]: the K most recent inputs
            result[f"state.{i}.conv"] = conv[:, 1:].T.float().numpy().copy()  # the K−1 the next step reads
            result[f"state.{i}.recurrent"] = layer_cache.recurrent_states[0][0].float().numpy().copy()
        else:
            result[f"state.{i}.keys"] = layer_cache.keys[0].float().numpy().copy()
            result[f"state.{i}.values"] = layer_cache.values[0].float().numpy().copy()

    greedy, margins = [], []
    logits = out.logits[0, -1]
    for _ in range(n_greedy):
        top2 = torch.topk(logits, 2).values
        margins.append(float(top2[0] - top2[1]))
        nxt = int(torch.argmax(logits))
        greedy.append(nxt)
        out = model(input_ids=torch.tensor([[nxt]]), past_key_values=cache, use_cache=True)
        cache = out.past_key_values
        logits = out.logits[0, -1]
    if n_greedy:
        result["greedy"] = np.array(greedy, dtype=np.int64)
        result["greedy_margin"] = np.array(margins, dtype=np.float32)
    return result
