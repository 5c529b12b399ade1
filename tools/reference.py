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
  :func:`real_shape_moe_text_config` — Qwen3.5-35B-A3B's, cut to a few layers;
* :func:`load_pretrained` — any local Qwen3.5 checkpoint folder (dense or MoE, either wrapper,
  unquantized or FP8) loaded by transformers as the reference runs it: fp32, eager;
* :func:`reference_taps` — the golden taps (minqwen.golden) as transformers computes them,
  caught with forward hooks, for a prompt and greedy decode steps;
* :func:`computing_in_float64` — the modeling modules' own float32 casts lifted, so that a
  model's ``.double()`` copy computes the exact value both float32 implementations round.

Used by tools/make_fixtures.py, tools/real_shape.py, tools/compare_with_transformers.py, the
live reference lane in tests/test_reference_live.py, and the golden, FP8 and compare-tool
tests. Never imported by minqwen itself.
"""

from __future__ import annotations

import copy
import json
import math
import sys
from contextlib import ExitStack, contextmanager
from pathlib import Path
from unittest import mock

import numpy as np

from minqwen.errors import MinqwenError

try:  # the reference extra is optional: a tool that needs it says how to get it (its callers print this)
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
except ImportError as e:
    raise MinqwenError(f"this needs the reference, torch and transformers 5.23.0 ({e}): pip install torch==2.13.0 "
                       f"--index-url https://download.pytorch.org/whl/cpu, then pip install -e '.[reference]'") from None

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
    if dtype not in ("float32", "bfloat16"):
        raise ValueError(f"save_checkpoint writes float32 or bfloat16, not {dtype!r}")
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

    if n_greedy:
        greedy, margins, _ = greedy_steps(model, out, n_greedy)
        result["greedy"] = np.array(greedy, dtype=np.int64)
        result["greedy_margin"] = np.array(margins, dtype=np.float32)
    return result


def greedy_steps(model, out, n: int) -> tuple[list[int], list[float], np.ndarray]:
    """n ≥ 1 greedy decode steps of a transformers model through its own cache.

    ``out``: the output of a forward with ``use_cache=True`` (its last logits pick the first
    token). Returns the tokens, each pick's top-1 − top-2 logit margin (how close a tie was),
    and the logits [n, V] each step computed.
    """
    greedy, margins, steps = [], [], []
    cache, logits = out.past_key_values, out.logits[0, -1]
    for _ in range(n):
        top2 = torch.topk(logits, 2).values
        margins.append(float(top2[0] - top2[1]))
        token = int(torch.argmax(logits))
        greedy.append(token)
        out = model(input_ids=torch.tensor([[token]]), past_key_values=cache, use_cache=True)
        cache, logits = out.past_key_values, out.logits[0, -1]
        steps.append(logits.float().numpy())
    return greedy, margins, np.stack(steps)


# ==================================================================== a checkpoint folder, as the reference loads it

# model_type in config.json → the transformers class that loads the whole checkpoint.
PRETRAINED_CLASSES = {
    "qwen3_5": Qwen3_5ForConditionalGeneration,
    "qwen3_5_text": Qwen3_5ForCausalLM,
    "qwen3_5_moe": Qwen3_5MoeForConditionalGeneration,
    "qwen3_5_moe_text": Qwen3_5MoeForCausalLM,
}


def pretrained_class(folder: Path):
    """The transformers class for the checkpoint in ``folder``, from its config.json's model_type."""
    model_type = json.loads((Path(folder) / "config.json").read_text())["model_type"]
    if model_type not in PRETRAINED_CLASSES:
        raise ValueError(f"{folder}: model_type {model_type!r} is not a Qwen3.5 checkpoint "
                         f"(known: {', '.join(PRETRAINED_CLASSES)})")
    return PRETRAINED_CLASSES[model_type]


@torch.no_grad()
def load_pretrained(folder: Path):
    """The checkpoint in ``folder`` loaded by transformers, fp32 throughout, eager attention and experts.

    An FP8 checkpoint (``quantization_config.quant_method: fp8``) is dequantized by transformers
    on load, as it always is on a CPU — but its *unquantized* tensors (norms, embeddings, the
    router…) keep their stored dtype even with ``dtype=torch.float32``. They are widened here
    (bf16 and fp16 widen exactly), so that the reference is fp32 everywhere, as for any other
    checkpoint.
    """
    cls = pretrained_class(folder)
    model, info = cls.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager",
                                      output_loading_info=True)
    model.eval()
    # transformers loads what it can and leaves the rest at its initial values: a reference built
    # that way would blame minqwen for transformers' gap (FP8 experts stored fused, for one).
    # The MTP head is not part of transformers' Qwen3.5 classes: its tensors are expected to stay unused.
    unused = [n for n in info["unexpected_keys"] if not n.startswith(("mtp.", "model.mtp."))]
    if info["missing_keys"] or unused:
        raise RuntimeError(f"transformers {transformers.__version__} could not load all of {folder}: missing "
                           f"{sorted(info['missing_keys'])[:5]}, not understood {sorted(unused)[:5]}")
    if cls in (Qwen3_5MoeForCausalLM, Qwen3_5MoeForConditionalGeneration):
        model.set_experts_implementation("eager")  # the plain loop; grouped_mm is another kernel
    for p in model.parameters():
        if p.dtype.is_floating_point and p.dtype != torch.float32:
            p.data = p.data.float()
    return model


# ==================================================================== float64: the exact value


class _Float64Torch:
    """``torch`` as the modeling modules see it under :func:`computing_in_float64`: float32 means float64."""

    def __init__(self, torch_module):
        self._torch = torch_module

    def __getattr__(self, name):
        return self._torch.float64 if name in ("float32", "float") else getattr(self._torch, name)


@contextmanager
def computing_in_float64():
    """transformers' Qwen3.5 modules compute in float64 inside this block.

    A model cast with ``.double()`` still rounds to float32 wherever the modeling code casts
    explicitly (the delta rule, the norms, rotary, the softmax; in ``vision_utils``, the weights
    that resample the vision tower's position embeddings): those casts are redirected to
    float64 here, and undone on leaving, so that the float64 model is exact to ~1e-15 instead
    of float32 round-off in disguise. The MTP head (``modeling_layers.MtpModel``) runs the
    Qwen3.5 decoder layer and norm classes, so it is covered too: its own float32 casts are on
    the sampling and logits-processor path alone, which the reference runs never take.
    """
    import transformers.models.qwen3_5.modeling_qwen3_5 as dense
    import transformers.models.qwen3_5_moe.modeling_qwen3_5_moe as moe
    import transformers.vision_utils as vision_utils

    modules = (dense, moe, vision_utils)
    saved_float = torch.Tensor.float
    try:
        for module in modules:
            module.torch = _Float64Torch(torch)
        torch.Tensor.float = lambda self, *args, **kwargs: self.to(torch.float64)
        yield
    finally:
        for module in modules:
            module.torch = torch
        torch.Tensor.float = saved_float


# ==================================================================== golden taps, from transformers


def reference_taps(hf_model, token_ids, decode_steps: int) -> dict[str, np.ndarray]:
    """The golden taps as transformers computes them, for the prompt and greedy decode steps.

    Forward hooks on the modules give most taps. Some sit inside a module's forward with no
    module around them, so the functions are wrapped for the run: apply_rotary_pos_emb (q and k
    after q_norm/k_norm, and after rotary), and the two gated-delta-rule kernels (their inputs are the
    conv output split into q, k, v — still un-normalised, the kernel normalises — and g, beta).
    The decode states are read from the reference's cache after each forward. Decode step n
    feeds the argmax of the previous logits: the reference's own greedy continuation, through
    its own cache.

    Works for every Qwen3.5 class, dense or MoE, text-only or multimodal: the functions are
    wrapped in the modeling module the model comes from, and an MoE layer's router and shared
    expert are hooked too. Only names in minqwen's tap table (:data:`minqwen.golden.TAPS`) are
    returned, so that both sides of a comparison hold the same names.
    """
    from minqwen import golden

    inner = hf_model.model.language_model if hasattr(hf_model.model, "language_model") else hf_model.model
    modeling = sys.modules[type(inner).__module__]  # modeling_qwen3_5, or modeling_qwen3_5_moe
    cfg = inner.config
    taps: dict[str, np.ndarray] = {"token_ids": np.asarray(token_ids, dtype=np.int64)}
    where = {"prefix": "", "layer": None}  # the running forward's step prefix and decoder layer

    def put(name, tensor, layer=True):
        full = f"{where['prefix']}layers.{where['layer']}.{name}" if layer else where["prefix"] + name
        tensor = tensor.detach()
        taps[full] = (tensor.float().numpy().copy() if tensor.is_floating_point()
                      else tensor.numpy().astype(np.int64))  # experts_chosen stays integer

    def output_hook(name, reshape=None, layer=True):
        def hook(module, args, out):
            out = out[0] if isinstance(out, tuple) else out  # attention returns (output, weights)
            out = out[0]  # drop the batch
            put(name, out.reshape(out.shape[0], *reshape) if reshape else out, layer)
        return hook

    def router_hook(module, args, out):
        logits, weights, chosen = out  # [T, E], [T, k], [T, k]: the router sees the batch flattened
        put("mlp.router_logits", logits)
        put("mlp.expert_weights", weights)
        put("mlp.experts_chosen", chosen)

    hv, dv = cfg.linear_num_value_heads, cfg.linear_value_head_dim
    hq, d = cfg.num_attention_heads, cfg.head_dim
    handles = [inner.embed_tokens.register_forward_hook(output_hook("embed", layer=False)),
               inner.norm.register_forward_hook(output_hook("norm", layer=False))]
    for i, layer in enumerate(inner.layers):
        handles.append(layer.register_forward_pre_hook(lambda module, args, i=i: where.update(layer=i)))
        handles.append(layer.register_forward_hook(output_hook("output")))
        for name in ("input_layernorm", "post_attention_layernorm", "mlp"):
            handles.append(getattr(layer, name).register_forward_hook(output_hook(name)))
        if hasattr(layer.mlp, "gate"):  # an MoE block; the shared expert also sees [T, H]
            handles += [
                layer.mlp.gate.register_forward_hook(router_hook),
                layer.mlp.shared_expert.register_forward_hook(lambda module, args, out: put("mlp.shared_expert", out)),
            ]
        if cfg.layer_types[i] == "linear_attention":
            la = layer.linear_attn
            handles += [
                la.register_forward_hook(output_hook("token_mixer")),
                la.in_proj_qkv.register_forward_hook(output_hook("linear_attn.in_proj_qkv")),
                la.in_proj_z.register_forward_hook(output_hook("linear_attn.in_proj_z", reshape=(hv, dv))),
                la.in_proj_b.register_forward_hook(output_hook("linear_attn.in_proj_b")),
                la.in_proj_a.register_forward_hook(output_hook("linear_attn.in_proj_a")),
                # the gated norm sees the core output flattened to [T·Hv, Dv]
                la.norm.register_forward_pre_hook(
                    lambda module, args: put("linear_attn.core", args[0].reshape(-1, hv, dv))),
                la.norm.register_forward_hook(
                    lambda module, args, out: put("linear_attn.norm", out.reshape(-1, hv, dv))),
            ]
        else:
            sa = layer.self_attn
            handles += [
                sa.register_forward_hook(output_hook("token_mixer")),
                sa.q_proj.register_forward_hook(  # per head [q_h | gate_h]: the gate is the second half
                    lambda module, args, out: put("self_attn.gate", out[0].reshape(-1, hq, 2 * d)[..., d:])),
                sa.v_proj.register_forward_hook(output_hook("self_attn.v", reshape=(-1, d))),
                sa.o_proj.register_forward_pre_hook(lambda module, args: put("self_attn.gated_output", args[0][0])),
            ]

    def rotary(q, k, *args, **kwargs):
        put("self_attn.q_norm", q[0].transpose(0, 1))  # [1, heads, T, D]: after q_norm and k_norm
        put("self_attn.k_norm", k[0].transpose(0, 1))
        q_rot, k_rot = original_rotary(q, k, *args, **kwargs)  # [1, heads, T, D]
        put("self_attn.q", q_rot[0].transpose(0, 1))
        put("self_attn.k", k_rot[0].transpose(0, 1))
        return q_rot, k_rot

    def delta_rule(kernel):
        def wrapped(query, key, value, *args, **kwargs):  # [1, T, heads, dim]; g, beta [1, T, Hv]
            t = query.shape[1]
            put("linear_attn.conv1d", torch.cat([query.reshape(t, -1), key.reshape(t, -1), value.reshape(t, -1)], -1))
            put("linear_attn.q", modeling.l2norm(query[0], dim=-1, eps=1e-6) * query.shape[-1] ** -0.5)
            put("linear_attn.k", modeling.l2norm(key[0], dim=-1, eps=1e-6))
            put("linear_attn.v", value[0])
            put("linear_attn.g", kwargs["g"][0])
            put("linear_attn.beta", kwargs["beta"][0])
            return kernel(query, key, value, *args, **kwargs)
        return wrapped

    def read_states(cache):
        for i, layer_cache in enumerate(cache.layers):
            if cfg.layer_types[i] == "linear_attention":
                where["layer"] = i
                conv = layer_cache.conv_states[0][0]  # [C, K]: the K latest inputs; minqwen keeps K − 1
                put("linear_attn.conv_state", conv[:, 1:].T)
                put("linear_attn.recurrent_state", layer_cache.recurrent_states[0][0])

    original_rotary = modeling.apply_rotary_pos_emb
    try:
        with ExitStack() as stack, torch.no_grad():
            stack.enter_context(mock.patch.object(modeling, "apply_rotary_pos_emb", rotary))
            for kernel_name in ("torch_chunk_gated_delta_rule", "torch_recurrent_gated_delta_rule"):
                stack.enter_context(mock.patch.object(modeling, kernel_name, delta_rule(getattr(modeling, kernel_name))))
            out = hf_model(input_ids=torch.tensor(np.asarray(token_ids)[None], dtype=torch.long), use_cache=True)
            taps["logits"] = out.logits[0].float().numpy().copy()
            read_states(out.past_key_values)
            generated = []
            for n in range(decode_steps):
                generated.append(int(torch.argmax(out.logits[0, -1])))
                where["prefix"] = f"step{n}."
                out = hf_model(input_ids=torch.tensor([[generated[-1]]]), past_key_values=out.past_key_values,
                               use_cache=True)
                put("logits", out.logits[0], layer=False)
                read_states(out.past_key_values)
    finally:
        for h in handles:
            h.remove()
    if decode_steps:
        taps["generated_ids"] = np.array(generated, dtype=np.int64)
    # Keep the names in minqwen's tap table (forward_order puts every other name in group 3).
    return {name: value for name, value in taps.items() if golden.forward_order(name)[0] != 3}
