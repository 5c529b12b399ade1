"""`minqwen inspect`: the model at a glance — its layers, where the parameters are, what memory it needs."""

from __future__ import annotations

import dataclasses

import numpy as np

from .model import Model


def count(obj) -> int:
    """Parameters in an array or a weights dataclass."""
    if isinstance(obj, np.ndarray):
        return obj.size
    if dataclasses.is_dataclass(obj):
        return sum(count(getattr(obj, f.name)) for f in dataclasses.fields(obj))
    return 0


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
    lines = [f"Qwen3.5 text model from {c.source}", ""]
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
        f"total: {total:,} parameters · {human(total * model.dtype.itemsize)} resident as {model.dtype}",
    ]
    kv, state = cache_bytes(model, context, model.dtype.itemsize)
    lines += [
        "",
        f"at a context of {context:,} tokens:",
        f"  KV cache ({c.layer_types.count('full_attention')} attention layers): {human(kv)}  (grows with context)",
        f"  DeltaNet state ({c.layer_types.count('linear_attention')} layers): {human(state)}  (constant)",
    ]
    if model.load_report:
        lines += ["", "not loaded:", *("  " + line for line in model.load_report.splitlines())]
    return "\n".join(lines)
