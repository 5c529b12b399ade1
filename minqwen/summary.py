"""`minqwen inspect`: the model at a glance — its layers, where the parameters are, what memory it needs."""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from .checkpoint import FP8Tensor
from .model import Model
from .moe import Experts, MoEWeights


def count(obj) -> int:
    """Parameters in an array, a list of arrays (per-expert weights) or a weights dataclass."""
    if isinstance(obj, np.ndarray):
        return obj.size
    if isinstance(obj, FP8Tensor):  # an FP8 expert stack left in the file
        return math.prod(obj.shape)
    if isinstance(obj, (list, tuple)):
        return sum(count(item) for item in obj)
    if dataclasses.is_dataclass(obj):
        return sum(count(getattr(obj, f.name)) for f in dataclasses.fields(obj))
    return 0


def resident_bytes(model: Model) -> int:
    """Bytes of weights held in memory — each array once (a tied head is the embedding); the
    routed experts are left out, since a loaded model leaves them memory-mapped in the checkpoint."""
    return weight_bytes(model.embed_tokens, model.lm_head, model.norm, *model.layers)


def weight_bytes(*parts) -> int:
    """Bytes of the arrays in ``parts`` (arrays or weights dataclasses), each array counted once,
    routed experts left out."""
    seen: dict[int, int] = {}

    def walk(obj):
        if isinstance(obj, np.ndarray):
            seen[id(obj)] = obj.nbytes
        elif dataclasses.is_dataclass(obj) and not isinstance(obj, Experts):
            for f in dataclasses.fields(obj):
                walk(getattr(obj, f.name))

    for part in parts:
        walk(part)
    return sum(seen.values())


def experts(model: Model) -> tuple[int, int, int]:
    """(parameters in routed experts, of them read per token, their stored bytes); zeros for a dense model.

    FP8 experts' bytes are a byte a weight plus their block scales, each scale array once (a
    fused gate_up stack's gate and up rows share one per expert).
    """
    c = model.config
    total = active = nbytes = 0
    scales: dict[int, int] = {}  # address → bytes
    for layer in model.layers:
        if isinstance(layer.mlp, MoEWeights):
            ex = layer.mlp.experts
            n = count(ex)
            total += n
            active += n * c.num_experts_per_tok // c.num_experts
            for matrices in (ex.gate_proj, ex.up_proj, ex.down_proj):
                for e in range(len(ex)):
                    m = matrices[e]
                    if isinstance(m, FP8Tensor):
                        nbytes += math.prod(m.shape)  # a byte a weight
                        scales[m.scale_inv.ctypes.data] = m.scale_inv.nbytes
                    else:
                        nbytes += m.nbytes
    return total, active, nbytes + sum(scales.values())


def cache_bytes(model: Model, context: int, itemsize: int = 4) -> tuple[int, int]:
    """(KV-cache bytes, DeltaNet state bytes) after ``context`` tokens: the first grows, the second does not."""
    c = model.config
    full = c.layer_types.count("full_attention")
    linear = c.layer_types.count("linear_attention")
    kv = full * 2 * context * c.num_key_value_heads * c.head_dim * itemsize
    conv = (c.linear_conv_kernel_dim - 1) * c.linear_conv_dim
    recurrent = c.linear_num_value_heads * c.linear_key_head_dim * c.linear_value_head_dim
    return kv, linear * (conv + recurrent) * itemsize


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


def describe(model: Model, context: int = 4096) -> str:
    c = model.config
    lines = [f"Qwen3.5 text model from {c.source}",
             f"hidden size {c.hidden_size:,} · vocabulary {c.vocab_size:,} · context {c.max_position_embeddings:,} "
             f"tokens (max_position_embeddings) · weights kept as {model.embed_tokens.dtype.name} (--dtype), "
             f"computing in {np.dtype(model.dtype).name}", ""]
    lines.append(f"{'layer':>5}  {'type':<18}{'token mixer':>14}{'mlp':>14}{'norms':>10}")
    for i, layer in enumerate(model.layers):
        mixer = layer.linear_attn if layer.layer_type == "linear_attention" else layer.self_attn
        kind = "Gated DeltaNet" if layer.layer_type == "linear_attention" else "gated attention"
        norms = count(layer.input_layernorm) + count(layer.post_attention_layernorm)
        lines.append(f"{i:>5}  {kind:<18}{count(mixer):>14,}{count(layer.mlp):>14,}{norms:>10,}")
    embed = count(model.embed_tokens)
    head = 0 if model.lm_head is model.embed_tokens else count(model.lm_head)
    layers = sum(count(layer.linear_attn) + count(layer.self_attn) + count(layer.mlp)
                 + count(layer.input_layernorm) + count(layer.post_attention_layernorm) for layer in model.layers)
    total = embed + head + layers + count(model.norm)
    lines += [
        "",
        f"embed_tokens: {embed:,} parameters" + ("  (tied: also the LM head)" if not head else ""),
        *([f"lm_head: {head:,} parameters"] if head else []),
        f"decoder layers: {layers:,} parameters",
        f"total: {total:,} parameters · {human(resident_bytes(model))} resident",
    ]
    if c.quantization is not None:
        q = c.quantization
        kept = ", ".join(q.modules_to_not_convert) or "none listed"
        lines.append(f"FP8 checkpoint: {q.weight_block_size[0]} × {q.weight_block_size[1]} blocks, dequantized on "
                     f"load; modules_to_not_convert: {kept}")
    in_experts, active_experts, expert_bytes = experts(model)
    if in_experts:
        active = total - in_experts + active_experts
        layout = next(layer.mlp.experts.layout for layer in model.layers if isinstance(layer.mlp, MoEWeights))
        lines += [
            f"experts: {c.num_experts} per layer, {c.num_experts_per_tok} used per token: {in_experts:,} parameters, "
            f"{human(expert_bytes)} memory-mapped as stored ({layout}; read only when chosen)",
            f"active per token: {active:,} parameters ({active / total:.1%} of the total)",
        ]
    kv, state = cache_bytes(model, context, model.dtype.itemsize)
    n_attention, n_deltanet = c.layer_types.count("full_attention"), c.layer_types.count("linear_attention")
    lines += [
        "",
        f"at a context of {context:,} tokens:",
        f"  KV cache ({n_attention} attention layer{'s' * (n_attention != 1)}): {human(kv)}  (grows with context)",
        f"  DeltaNet state ({n_deltanet} layer{'s' * (n_deltanet != 1)}): {human(state)}  (constant)",
    ]
    if model.load_report:
        lines += ["", "outside the text model:", *("  " + line for line in model.load_report.splitlines())]
    return "\n".join(lines)
