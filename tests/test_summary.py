"""`minqwen inspect`'s figures (minqwen/summary.py), each against an independent count.

Parameter counts are summed from the safetensors headers, resident bytes from the arrays the
loaded model holds (each once), cache bytes from a cache the model actually filled.
"""

import re
from pathlib import Path

import numpy as np
import pytest
from safetensors import safe_open

import minqwen
from conftest import FIXTURES, tensor_headers
from minqwen.attention import KVCache
from minqwen.deltanet import DeltaNetState
from minqwen.summary import describe, human


SUMMARY_FIXTURES = ["text_tied_fp32", "text_grouped_bf16_bias", "moe_text_per_expert_fp32",
                    "moe_text_fused_all_experts_bf16", "moe_text_16_experts_top4_bf16", "multimodal_bf16_untied"]


def text_tensor_shapes(folder: Path) -> dict:
    """name → shape of every tensor of the text model in the checkpoint (no vision tower, no MTP head)."""
    return {name: shape for name, (_, shape) in tensor_headers(folder).items()
            if not name.startswith(("model.visual.", "mtp.", "model.mtp.")) and not name.endswith("_scale_inv")}


def numel(shapes, keep=lambda k: True) -> int:
    return sum(int(np.prod(s)) for k, s in shapes.items() if keep(k))


def held_arrays(obj, out, skip_experts=True, depth=0):
    """Every ndarray reachable from obj (generic attribute walk), by id; experts left out if asked."""
    if isinstance(obj, np.ndarray):
        out[id(obj)] = obj
    elif isinstance(obj, (list, tuple)):
        for item in obj:
            held_arrays(item, out, skip_experts, depth + 1)
    elif hasattr(obj, "__dict__") and not isinstance(obj, type):
        for name, value in vars(obj).items():
            if skip_experts and name == "experts":
                continue
            held_arrays(value, out, skip_experts, depth + 1)
    return out


def grab(pattern, text):
    m = re.search(pattern, text, re.M)
    assert m, (pattern, text)
    return int(m.group(1).replace(",", ""))


@pytest.mark.parametrize("name", SUMMARY_FIXTURES)
def test_inspect_counts_match_the_checkpoint_and_the_loaded_arrays(name):
    folder = FIXTURES / name
    model = minqwen.load(folder)
    c = model.config
    shapes = text_tensor_shapes(folder)
    text = describe(model, context=37)

    embed = numel(shapes, lambda k: k.endswith("embed_tokens.weight"))
    head = numel(shapes, lambda k: k == "lm_head.weight")
    assert (head == 0) == (model.lm_head is model.embed_tokens)  # tied exactly when the file has no head
    total = numel(shapes)
    layers = numel(shapes, lambda k: ".layers." in k)
    assert grab(r"^embed_tokens: ([\d,]+) parameters", text) == embed
    if head:
        assert grab(r"^lm_head: ([\d,]+) parameters", text) == head
    else:
        assert "lm_head:" not in text and "(tied: also the LM head)" in text
    assert grab(r"^decoder layers: ([\d,]+) parameters", text) == layers
    assert grab(r"^total: ([\d,]+) parameters", text) == total

    # each layer's row
    rows = re.findall(r"^\s+(\d+)  (?:Gated DeltaNet|gated attention)\s+([\d,]+)\s+([\d,]+)\s+([\d,]+)$", text, re.M)
    assert len(rows) == c.num_hidden_layers
    for i, mixer, mlp, norms in rows:
        def n(part):
            return numel(shapes, lambda k: f".layers.{i}.{part}" in k)
        assert int(mixer.replace(",", "")) == n("linear_attn.") + n("self_attn.")
        assert int(mlp.replace(",", "")) == n("mlp.")
        assert int(norms.replace(",", "")) == n("input_layernorm.") + n("post_attention_layernorm.")

    # resident bytes: every array the model holds, once, routed experts left out
    resident = sum(a.nbytes for a in held_arrays([model.embed_tokens, model.lm_head, model.norm, model.layers],
                                                 {}).values())
    assert re.search(rf"^total: [\d,]+ parameters · {re.escape(human(resident))} resident$", text, re.M)

    # MoE: the routed experts, and the parameters one token reads (k of E experts per layer)
    in_experts = numel(shapes, lambda k: ".mlp.experts." in k)
    if in_experts:
        E, k = c.num_experts, c.num_experts_per_tok
        assert grab(r"^experts: \d+ per layer, \d+ used per token: ([\d,]+) parameters", text) == in_experts
        assert f"experts: {E} per layer, {k} used per token" in text
        assert grab(r"^active per token: ([\d,]+) parameters", text) == total - in_experts + in_experts * k // E
        # the experts' bytes as the file stores them
        with safe_open(str(next(p for p in folder.glob("*.safetensors") if p.name != "expected.safetensors")),
                       "np") as f:
            key = next(k for k in f.keys() if ".mlp.experts." in k)
            itemsize = f.get_slice(key).get_dtype()
        file_itemsize = {"F32": 4, "BF16": 2, "F16": 2}[itemsize]
        assert f"{human(in_experts * file_itemsize)} memory-mapped as stored" in text
    else:
        assert "active per token" not in text

    # cache memory at a context of 37 tokens, measured on a cache the model filled
    cache = model.new_cache()
    model.forward(list(range(1, 38)), cache, last_only=True)
    kv = sum(s.keys[:, : s.length].nbytes + s.values[:, : s.length].nbytes
             for s in cache.layers if isinstance(s, KVCache))
    state = sum(s.nbytes for s in cache.layers if isinstance(s, DeltaNetState))
    n_attention = model.config.layer_types.count("full_attention")
    assert f"({n_attention} attention layer{'s' * (n_attention != 1)}): {human(kv)}  (grows" in text
    assert f"layers): {human(state)}  (constant)" in text


def test_inspect_sizes_the_caches_in_the_models_compute_dtype():
    # A float64 model (the float64 judge's) fills float64 caches: the figures must be twice
    # float32's, measured here on a cache the model filled, not assumed 4 bytes a number.
    model = minqwen.load(FIXTURES / "text_tied_fp32").astype(np.float64)
    text = describe(model, context=37)
    cache = model.new_cache()
    model.forward(list(range(1, 38)), cache, last_only=True)
    kv = sum(s.keys[:, : s.length].nbytes + s.values[:, : s.length].nbytes
             for s in cache.layers if isinstance(s, KVCache))
    state = sum(s.nbytes for s in cache.layers if isinstance(s, DeltaNetState))
    assert kv and state and all(s.keys.dtype == np.float64 for s in cache.layers if isinstance(s, KVCache))
    n_attention = model.config.layer_types.count("full_attention")
    assert f"({n_attention} attention layer{'s' * (n_attention != 1)}): {human(kv)}  (grows" in text
    assert f"layers): {human(state)}  (constant)" in text


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_inspect_says_the_widths_the_context_and_how_the_weights_are_kept(dtype):
    from minqwen.checkpoint import EMBEDDED
    from minqwen.summary import describe

    model = minqwen.load(EMBEDDED, dtype=dtype)
    c = model.config
    assert describe(model).splitlines()[1] == (
        f"hidden size {c.hidden_size} · vocabulary {c.vocab_size:,} · context {c.max_position_embeddings:,} tokens "
        f"(max_position_embeddings) · weights kept as {dtype} (--dtype), computing in float32")
