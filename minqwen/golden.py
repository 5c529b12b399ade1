"""Golden outputs: record every named intermediate of a run, and find where two runs part ways.

A port of Qwen3.5 to another language or framework that gets the logits wrong says only that
*something* is wrong. To say *what*, both implementations write their intermediates — the
"taps" — under the same names into one safetensors file each, and :func:`compare` walks the
two files in forward order and names the first tap whose values differ beyond tolerance:

    minqwen golden record --model ckpt/ --tokens 1,2,3 --decode 4 --out minqwen.safetensors
    python my_port.py ... --out port.safetensors          # writes the same names
    minqwen golden compare port.safetensors minqwen.safetensors

Every tap minqwen records is listed in :data:`TAPS` (name, shape, dtype, meaning), in the
order a forward pass produces them, the MTP head's in :data:`MTP_TAPS` and the vision tower's
in :data:`VISION_TAPS`; ``minqwen golden taps`` prints the tables. The names are
a stable interface: they change only with a new ``format`` in the metadata.

Where taps come from: ``Model.forward(..., tap=f)`` calls ``f(name, array)`` for every
intermediate; with ``tap=None`` (the default) every call site is skipped by one
``if tap is not None`` test and nothing is kept (``tools/tap_overhead.py`` measures it).

The file
--------
One safetensors file: the tensors under their tap names, plus two id vectors,

* ``token_ids``      [T] int64 — the prompt (with images: the ids the text model read, each
  ``<|image_pad|>`` expanded to one per merged patch);
* ``generated_ids``  [N] int64 — present when N > 0 decode steps were recorded: step n's input
  is ``generated_ids[n]``, greedy: the argmax of the previous forward's last logits row.

The prompt's taps carry their plain names (``layers.0.mlp``); decode step n's taps are
prefixed ``step{n}.`` (``step0.layers.0.mlp``, n from 0). The header's ``__metadata__`` maps
each key to JSON text (decode every value with ``json.loads``):

===================  =========================================================================
``format``           ``"minqwen-golden/1"``
``producer``         who wrote the file, e.g. ``"minqwen 0.1.0"``
``minqwen_version``  the minqwen that wrote the file (absent from files written without it)
``config``           the text config as minqwen reads it (:meth:`TextConfig.to_dict`)
``config_sha256``    SHA-256 (hex) of that config as canonical JSON: sorted keys, no spaces
                     — ``json.dumps(cfg, sort_keys=True, separators=(",", ":"))``
``token_ids``        the prompt, a list of ints
``decode_steps``     N
``taps``             the manifest: ``[{"name", "shape", "dtype"}, …]`` in forward order
``tolerances``       the fp32 defaults, ``{"atol": 1e-4, "rtol": 1e-3}`` (compare's own defaults)
===================  =========================================================================

A recording of a prompt with images also holds the vision tower's taps (``visual.…``) and the
prompt's 3-D ``position_ids``. ``config_sha256`` covers the text config only: a port whose
vision config differs is caught at the first ``visual.…`` tap.

A file written by another implementation needs only the tensors it has, ``token_ids`` and
``config_sha256`` — copied from the reference recording, since it hashes minqwen's reading of
the config, not the checkpoint's config.json: :func:`compare` refuses to compare runs over different prompts or configs,
orders rows by :data:`TAPS` and lists the taps that only one side has.

The conv state. A Gated DeltaNet layer's short convolution reads the last K−1 inputs
(rows of ``in_proj_qkv``) before each token. transformers keeps the last K as [C, K] and never
reads the oldest; minqwen keeps the K−1 it reads, [K−1, C], oldest first, and that is what
``layers.{i}.linear_attn.conv_state`` records — from transformers' cache, ``conv[:, 1:].T``.

Within tolerance means, for every element, ``|a − b| ≤ atol + rtol·|b|`` (NumPy's ``isclose``),
so give the reference as ``b``. Integer tensors (the ids) must be equal.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import ml_dtypes  # noqa: F401  (registers bfloat16 with NumPy, so safetensors can read bf16 taps)
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from . import __version__
from .config import TextConfig
from .errors import MinqwenError, is_real_number, is_whole_number

FORMAT = "minqwen-golden/1"
DEFAULT_ATOL = 1e-4
DEFAULT_RTOL = 1e-3


# ==================================================================== the tap table


@dataclass(frozen=True)
class Tap:
    """One row of the tap table. ``{i}`` in the name stands for the decoder layer's index."""

    name: str
    shape: str  # in the symbols listed above TAPS
    meaning: str
    layer_type: str | None = None  # only layers of this type have it; None: every layer (or not a layer tap)
    dtype: str = "float32"  # float64 when the model is a Model.astype(np.float64) copy
    moe: bool = False  # only mixture-of-experts models (qwen3_5_moe) have it


# Symbols: T tokens in this forward call · H hidden_size · V vocab_size · I intermediate_size.
# Gated DeltaNet: Hk, Dk key heads and dim · Hv, Dv value heads and dim · K conv kernel ·
# C = 2·Hk·Dk + Hv·Dv conv channels (q, k, v side by side). Attention: Hq query heads,
# Hkv key/value heads, D head_dim. Mixture of experts: E experts, k of them per token.
EMBED_TAPS = (
    Tap("embed", "[T, H]", "the input embeddings: rows of embed_tokens for the ids (with images, the "
        "<|image_pad|> rows are visual.merger's)"),
)
LAYER_TAPS = (
    Tap("layers.{i}.input_layernorm", "[T, H]", "zero-centred RMSNorm of the residual stream, scale 1 + w"),
    # Gated DeltaNet layers (layer_types[i] == "linear_attention")
    Tap("layers.{i}.linear_attn.in_proj_qkv", "[T, C]", "x · in_proj_qkvᵀ: q, k, v before the conv",
        "linear_attention"),
    Tap("layers.{i}.linear_attn.in_proj_z", "[T, Hv, Dv]", "x · in_proj_zᵀ: the output gate, before SiLU",
        "linear_attention"),
    Tap("layers.{i}.linear_attn.in_proj_b", "[T, Hv]", "x · in_proj_bᵀ: β before the sigmoid", "linear_attention"),
    Tap("layers.{i}.linear_attn.in_proj_a", "[T, Hv]", "x · in_proj_aᵀ: feeds the decay g", "linear_attention"),
    Tap("layers.{i}.linear_attn.conv1d", "[T, C]", "causal depthwise conv over in_proj_qkv, then the activation",
        "linear_attention"),
    Tap("layers.{i}.linear_attn.q", "[T, Hk, Dk]", "query: L2-normalised per head, times Dk^-0.5",
        "linear_attention"),
    Tap("layers.{i}.linear_attn.k", "[T, Hk, Dk]", "key: L2-normalised per head (value head h reads key "
        "head h // (Hv / Hk), and query head h // (Hv / Hk))", "linear_attention"),
    Tap("layers.{i}.linear_attn.v", "[T, Hv, Dv]", "value, as split from the conv output", "linear_attention"),
    Tap("layers.{i}.linear_attn.g", "[T, Hv]", "log decay: −exp(A_log) · softplus(a + dt_bias), ≤ 0",
        "linear_attention"),
    Tap("layers.{i}.linear_attn.beta", "[T, Hv]", "write strength: sigmoid(b)", "linear_attention"),
    Tap("layers.{i}.linear_attn.core", "[T, Hv, Dv]", "the gated delta rule's output, before the gated norm",
        "linear_attention"),
    # transformers keeps K inputs as [C, K]: its [:, 1:].T is this tap.
    Tap("layers.{i}.linear_attn.conv_state", "[K−1, C]", "the conv window after this call: the last K−1 "
        "conv inputs (in_proj_qkv rows), oldest first", "linear_attention"),
    Tap("layers.{i}.linear_attn.recurrent_state", "[Hv, Dk, Dv]", "the memory S after this call",
        "linear_attention"),
    Tap("layers.{i}.linear_attn.norm", "[T, Hv, Dv]", "RMSNorm(core) · w · silu(z): the input of out_proj",
        "linear_attention"),
    # Gated attention layers (layer_types[i] == "full_attention")
    Tap("layers.{i}.self_attn.q_norm", "[T, Hq, D]", "query after q_norm, before rotary", "full_attention"),
    Tap("layers.{i}.self_attn.k_norm", "[T, Hkv, D]", "key after k_norm, before rotary", "full_attention"),
    Tap("layers.{i}.self_attn.q", "[T, Hq, D]", "query after q_norm and rotary", "full_attention"),
    Tap("layers.{i}.self_attn.k", "[T, Hkv, D]", "key after k_norm and rotary (what the cache stores)",
        "full_attention"),
    Tap("layers.{i}.self_attn.v", "[T, Hkv, D]", "value", "full_attention"),
    Tap("layers.{i}.self_attn.gate", "[T, Hq, D]", "output gate before the sigmoid (second half of each "
        "head's q_proj output)", "full_attention"),
    Tap("layers.{i}.self_attn.gated_output", "[T, Hq·D]", "attention output × sigmoid(gate): the input of o_proj",
        "full_attention"),
    # Every layer
    Tap("layers.{i}.token_mixer", "[T, H]", "the DeltaNet or attention block's output (after out_proj / o_proj)"),
    Tap("layers.{i}.post_attention_layernorm", "[T, H]", "zero-centred RMSNorm of x + token_mixer"),
    # Mixture-of-experts models: the MoE block's router and shared expert (every layer)
    Tap("layers.{i}.mlp.router_logits", "[T, E]", "x · gateᵀ: the router's score for every expert", moe=True),
    Tap("layers.{i}.mlp.experts_chosen", "[T, k]", "each token's k experts, best first (exact ties: lowest index)",
        dtype="int64", moe=True),
    Tap("layers.{i}.mlp.expert_weights", "[T, k]", "their softmax probabilities, renormalised to sum to 1",
        moe=True),
    Tap("layers.{i}.mlp.shared_expert", "[T, H]", "the shared expert's SwiGLU output, before its sigmoid gate",
        moe=True),
    Tap("layers.{i}.mlp", "[T, H]", "SwiGLU: down(act(gate(x)) · up(x)); MoE: routed experts + gated shared expert"),
    Tap("layers.{i}.output", "[T, H]", "the residual stream after layer i (transformers' hidden_states[i + 1], "
        "but for the last layer: its last entry is after the final norm, the tap 'norm')"),
)
FINAL_TAPS = (
    Tap("norm", "[T, H]", "the final zero-centred RMSNorm"),
    Tap("logits", "[T, V]", "the LM head's output (every position: recording never asks for the last only)"),
)
TAPS = EMBED_TAPS + LAYER_TAPS + FINAL_TAPS

# Where an MTP layer's tap means something else than the main model's of the same name.
_MTP_MEANINGS = {
    "layers.{i}.token_mixer": "the attention block's output (after o_proj): an MTP layer is a full-attention one",
    "layers.{i}.output": "the MTP layer's output, before mtp.norm",
}

# The MTP head's taps (minqwen/mtp.py), recorded when asked for (``record(…, mtp_head=…)``,
# ``golden record --mtp``): a teacher-forced run of MTP layer 0 over the prompt's T − 1 pairs
# (h[j], t[j+1]), at rotary positions 0 … T−2, over a fresh MTP cache; then, with decode steps,
# one pair per step through that cache (``step{n}.mtp.…``, one row where the prompt's have
# T − 1): the main model's output at the position before generated[n], and generated[n], at
# position T − 1 + n.
MTP_TAPS = (
    Tap("mtp.pre_fc_norm_embedding", "[T−1, H]", "zero-centred RMSNorm of embed(t[j+1]), j = 0 … T−2"),
    Tap("mtp.pre_fc_norm_hidden", "[T−1, H]", "zero-centred RMSNorm of h[j]: the main model's output after its "
        "final norm (the tap 'norm')"),
    Tap("mtp.fc", "[T−1, H]", "[pre_fc_norm_embedding ; pre_fc_norm_hidden] · fcᵀ: embedding first"),
    *(Tap("mtp." + tap.name, tap.shape.replace("[T", "[T−1"),
          _MTP_MEANINGS.get(tap.name, tap.meaning) + (" (mixture-of-experts models only)" if tap.moe else ""),
          tap.layer_type, tap.dtype, tap.moe)
      for tap in LAYER_TAPS if tap.layer_type in (None, "full_attention")),  # its layer is a full-attention one
    Tap("mtp.norm", "[T−1, H]", "the MTP's own final zero-centred RMSNorm (mtp.norm)"),
    Tap("mtp.logits", "[T−1, V]", "the shared LM head: row j predicts t[j+2]"),
)

# The vision tower's taps (minqwen/vision.py), recorded for a prompt with images (``record(…,
# tower=…, images=…)``, ``golden record --image``): once, before the text model reads the prompt,
# whose <|image_pad|> tokens are then one per merged patch. N = Σ t·h·w patches over the images,
# each C·T·P·P pixel values (C channels, T = temporal_patch_size frames, P × P pixels); Dv the
# tower's hidden size; m = spatial_merge_size.
VISION_TAPS = (
    Tap("visual.pixel_values", "[N, C·T·P·P]", "the preprocessed images: each patch's normalised pixel values, "
        "(channel, frame, row, column) fastest last (the image processor's pixel_values)"),
    Tap("visual.grid_thw", "[images, 3]", "each image's patches: t (of T frames each; a still image, its frame "
        "repeated T times: 1), rows, columns", dtype="int64"),
    Tap("visual.patch_embed", "[N, Dv]", "pixel_values · patch_embedᵀ + bias: the 3-D conv as one matmul"),
    Tap("visual.embeddings", "[N, Dv]", "patch_embed + the learned position embeddings, interpolated "
        "bilinearly to each image's grid"),
    Tap("visual.blocks.{i}", "[N, Dv]", "the output of vision block i"),
    Tap("visual.merger", "[N/m², H]", "the patch merger's output: the features that replace the <|image_pad|> "
        "tokens' embeddings, in the tokens' order"),
)
# With a vision tower the text model's positions are 3-D (M-RoPE), recorded with the prompt's taps.
POSITION_TAP = Tap("position_ids", "[3, T]", "the text model's M-RoPE positions (t, row, column) of the prompt's "
                   "tokens, once; a text token's three are equal", dtype="int64")

# Position of each within-layer tap, for putting rows of a comparison in forward order.
_LAYER_SUFFIXES = [tap.name.removeprefix("layers.{i}.") for tap in LAYER_TAPS]


def tap_names(config: TextConfig) -> list[str]:
    """The names one forward call taps for this config, in the order it taps them."""
    names = [tap.name for tap in EMBED_TAPS]
    for i, kind in enumerate(config.layer_types):
        names += [tap.name.format(i=i) for tap in LAYER_TAPS
                  if tap.layer_type in (None, kind) and (config.is_moe or not tap.moe)]
    return names + [tap.name for tap in FINAL_TAPS]


def vision_tap_names(tower) -> list[str]:
    """The names a recording with this vision tower holds besides the text model's, in order."""
    names = []
    for tap in VISION_TAPS:
        names += [tap.name.format(i=i) for i in range(len(tower.blocks))] if "{i}" in tap.name else [tap.name]
    return names + [POSITION_TAP.name]


def mtp_tap_names(config: TextConfig) -> list[str]:
    """The names a recording of the MTP head holds for this config, in the order it taps them."""
    return [tap.name.format(i=0) for tap in MTP_TAPS if config.is_moe or not tap.moe]


def format_tap_table() -> str:
    """The tap table as text, for ``minqwen golden taps`` and the README."""
    width = max(len(tap.name) for tap in TAPS)
    lines = [
        "T tokens in the call, H hidden, V vocab. DeltaNet: Hk×Dk keys, Hv×Dv values, K conv kernel,",
        "C = 2·Hk·Dk + Hv·Dv. Attention: Hq query heads, Hkv key/value heads, D head_dim.",
        "Mixture of experts: E experts, k per token.",
        "Every tap is float32 (float64 from a Model.astype(np.float64) copy), but experts_chosen, grid_thw and",
        "position_ids (int64).",
        "Decode step n records the same names prefixed 'step{n}.'.",
    ]
    group = None
    for tap in VISION_TAPS + (POSITION_TAP,) + TAPS + MTP_TAPS:
        if tap.name.startswith("visual.") or tap is POSITION_TAP:
            this = ("a prompt with images (`golden record --image`), once, before the text model: the vision "
                    "tower (N patches of C·T·P·P values, Dv its width, m its merge size) and the positions")
        elif tap.name.startswith("mtp."):
            this = ("the MTP head (checkpoints with mtp.* tensors; `golden record --mtp`): teacher-forced over "
                    "the prompt's pairs (h[j], t[j+1]), row j at rotary position j (0 … T−2), over a fresh MTP "
                    "cache; with decode steps, step{n}.mtp.… takes one more pair through that cache, as "
                    "speculative decoding does: the main model's output at the position before generated[n], "
                    "and generated[n], at position T−1+n (one row where the prompt's have T−1)")
        elif tap.name.startswith("layers."):
            this = _GROUPS["moe" if tap.moe else tap.layer_type]
        else:
            this = "the model"
        if this != group:
            group = this
            lines += ["", f"{group}:"]
        lines.append(f"  {tap.name:<{width}}  {tap.shape:<13} {tap.meaning}")
    return "\n".join(lines)


_GROUPS = {
    None: "every layer",
    "linear_attention": "Gated DeltaNet layers (layer_types[i] = linear_attention)",
    "full_attention": "gated attention layers (layer_types[i] = full_attention)",
    "moe": "every layer of a mixture-of-experts model (qwen3_5_moe)",
}


# ==================================================================== recording


def record(model, token_ids, decode_steps: int = 0, taps: str = "*", mtp_head=None, tower=None,
           images=()) -> dict[str, np.ndarray]:
    """Run ``token_ids`` through ``model`` and ``decode_steps`` greedy steps, keeping the taps.

    ``mtp_head`` (a :class:`minqwen.mtp.MtpHead`): also record the MTP head's taps
    (:data:`MTP_TAPS`) over the prompt (``mtp.…``) and at each decode step (``step{n}.mtp.…``).
    ``tower`` (a :class:`minqwen.vision.VisionTower`) and ``images`` (one per ``<|image_pad|>``
    in ``token_ids``, as :func:`minqwen.vision.multimodal_inputs` takes them): the prompt is
    read as a prompt with images; the recording adds the tower's taps (:data:`VISION_TAPS`,
    ``visual.…``) and the prompt's ``position_ids``, and its ``token_ids`` are the ids the text
    model read, each ``<|image_pad|>`` expanded to one per merged patch.

    ``taps``: comma-separated fnmatch-style globs, matched against each tap's name within its
    forward call (``layers.*.mlp``) and against its recorded name (``step2.logits``). Note that
    ``*`` crosses dots: ``layers.1*`` also matches layer 10; write ``layers.1.*``. A pattern
    that matches no tap of this model is an error (a typo would otherwise record nothing); past
    step 10,000 a pattern must name its step's number (``step12345.logits``), not a glob of it.

    Returns ``{name: array}`` in forward order (:func:`forward_order`): ``token_ids``, the
    tower's taps and ``position_ids`` (with ``tower``), the prompt's taps, the MTP taps (with
    ``mtp_head``), each step's ``step{n}.`` taps (and its ``step{n}.mtp.…`` with ``mtp_head``), and
    ``generated_ids`` when ``decode_steps`` > 0. The arrays are copies;
    the model computes exactly what it computes without recording, bit for bit. A recorded tap
    holding NaN or inf is an error naming the first such tap: a reference must be numbers.
    """
    if not is_whole_number(decode_steps) or decode_steps < 0:
        raise MinqwenError(f"decode_steps must be a whole number ≥ 0, got {decode_steps!r}")
    decode_steps = int(decode_steps)
    if tower is None and images is not None and (not hasattr(images, "__len__") or len(images)):
        raise MinqwenError("images need the vision tower that encodes them: record(…, tower=minqwen.vision."
                           "load_vision(folder), images=[…])")
    if tower is not None and (images is None or not hasattr(images, "__len__") or not len(images)):
        raise MinqwenError("record(…, tower=…) reads a prompt with images: give them (images=[…]), or leave out "
                           "the tower to record a text prompt")
    if tower is not None and mtp_head is not None:
        raise MinqwenError("the MTP head's taps are recorded over a text prompt, not one read with a vision tower: "
                           "record them in a recording of their own")
    patterns = _parse_patterns(taps)
    per_call = tap_names(model.config)
    mtp_names = mtp_tap_names(model.config) if mtp_head is not None else []
    vision_names = vision_tap_names(tower) if tower is not None else []
    # with decode steps the MTP head also takes each step's pair (step{n}.mtp.…)
    _check_patterns(patterns, per_call, mtp_names + vision_names, decode_steps,
                    step_only=mtp_names if decode_steps else [])  # before the tower's work
    inputs, before_text = None, {}
    if tower is not None:
        inputs, before_text = _read_images(model, tower, token_ids, images, patterns)
        token_ids = inputs.token_ids  # [T]: each <|image_pad|> expanded
    context = model.config.max_position_embeddings
    prompt_length = len(token_ids) if hasattr(token_ids, "__len__") else 0  # forward checks the ids themselves
    if decode_steps and prompt_length + decode_steps > context:
        raise MinqwenError(f"decode_steps is {decode_steps}: after the prompt's {prompt_length} tokens that passes "
                           f"the model's context of {context:,} positions (max_position_embeddings)")
    if mtp_head is not None and prompt_length < 2:
        raise MinqwenError(f"recording the MTP head needs a prompt of at least 2 tokens, got {prompt_length}: its "
                           f"first row reads the pair (h[0], t[1])")
    taps_seen: dict[str, np.ndarray] = {}
    mtp_steps = mtp_head is not None and decode_steps > 0
    last_hidden: list[np.ndarray] = []  # [H] per forward call, after the final norm: the MTP head's steps read them

    def collector(prefix: str):
        """A tap function that copies the selected intermediates of one forward call, or None.

        With the MTP head's steps to record it also keeps each call's last row after the final
        norm, so every call runs tapped then (each tap site's work, such as copying a recurrent
        state, is done even for taps not kept: a recording's cost, not its values)."""
        wanted = {name for name in per_call if _selected(patterns, name, prefix + name)}
        if not wanted and not mtp_steps:
            return None  # this call records nothing: run it untapped

        def keep(name, value):
            if name in wanted:
                taps_seen[prefix + name] = np.array(value, copy=True, order="C")
            if mtp_steps and name == "norm":
                last_hidden.append(np.array(value[-1], copy=True))

        return keep

    cache = model.new_cache()
    if inputs is None:
        logits = model.forward(token_ids, cache, tap=collector(""))  # [T, V]; forward validates the ids
    else:  # the image features in place of the image tokens' embeddings, at 3-D positions
        logits = model.forward(cache=cache, inputs_embeds=inputs.inputs_embeds, position_ids=inputs.position_ids,
                               tap=collector(""))  # [T, V]
        cache.rope_delta = inputs.rope_delta  # the decode steps' positions continue after the images'
    generated = []
    for n in range(decode_steps):
        if not np.isfinite(logits[-1]).all():  # the argmax of NaNs would decode nonsense, quietly
            _refuse_non_finite(taps_seen)  # names where it started, when a recorded tap shows it
            where = f"decode step {n - 1}" if n else "the prompt"
            raise MinqwenError(f"the logits of {where} hold NaN or infinite values, so greedy decoding cannot "
                               f"choose the next token: {_CANNOT_COMPUTE}")
        next_id = int(np.argmax(logits[-1]))
        generated.append(next_id)
        logits = model.forward([next_id], cache, last_only=True, tap=collector(f"step{n}."))  # [1, V]
    recording = {"token_ids": np.asarray(token_ids).astype(np.int64), **before_text, **taps_seen}
    if mtp_head is not None:
        from .mtp import record_mtp  # here: mtp.py builds on this module

        # Step n's pair: the output at the position before generated[n] (the prompt's last, then
        # step n − 1's), and generated[n] itself.
        mtp_taps = record_mtp(model, mtp_head, token_ids, steps=list(zip(last_hidden, generated)))
        recording.update({name: value for name, value in mtp_taps.items()
                          if _selected(patterns, _within_call(name), name)})
    if decode_steps:
        recording["generated_ids"] = np.array(generated, dtype=np.int64)
    _refuse_non_finite(recording)
    return {name: recording[name] for name in sorted(recording, key=forward_order)}


def _read_images(model, tower, token_ids, images, patterns) -> tuple:
    """A prompt with images, as the text model will read it, and the selected taps of the way there.

    Returns (:class:`minqwen.vision.MultimodalInputs`, {name: array}): the vision tower's taps
    (``visual.…``, with ``visual.grid_thw``) and the prompt's 3-D ``position_ids``.
    """
    from .vision import multimodal_inputs  # here: vision.py builds on the model, as this module does

    taps: dict[str, np.ndarray] = {}

    def keep_visual(name, value):
        if _selected(patterns, "visual." + name, "visual." + name):
            taps["visual." + name] = np.array(value, copy=True, order="C")

    inputs = multimodal_inputs(model, tower, token_ids, images, tap=keep_visual)
    if not np.isfinite(inputs.inputs_embeds).all():  # the text model would blame its inputs_embeds
        _refuse_non_finite(taps)
        raise MinqwenError(f"the vision tower's features hold NaN or infinite values: {_CANNOT_COMPUTE}")
    for name, value in (("visual.grid_thw", inputs.grid_thw), ("position_ids", inputs.position_ids)):
        if _selected(patterns, name, name):
            taps[name] = np.asarray(value, dtype=np.int64)
    return inputs, taps


_CANNOT_COMPUTE = ("the model's weights or config.json hold values it cannot compute with (a NaN weight, say), "
                   "and a golden recording of them would test nothing")


def _refuse_non_finite(taps: dict[str, np.ndarray]) -> None:
    """A NaN equals nothing, not even a NaN: name the first tap, in forward order, holding one (or an inf)."""
    for name in sorted(taps, key=forward_order):
        if not np.isfinite(taps[name]).all():
            raise MinqwenError(f"tap '{name}' holds NaN or infinite values (the first recorded tap that does, "
                               f"in forward order): {_CANNOT_COMPUTE}")


def _parse_patterns(taps: str) -> list[str]:
    if not isinstance(taps, str):
        raise MinqwenError(f"taps must be a string of comma-separated patterns, got {type(taps).__name__}")
    patterns = [p.strip() for p in taps.split(",") if p.strip()]
    if not patterns:
        raise MinqwenError("taps: give at least one pattern, e.g. '*' (everything) or 'layers.0.*,logits'")
    return patterns


def _selected(patterns, name, full_name) -> bool:
    return any(fnmatch.fnmatchcase(name, p) or fnmatch.fnmatchcase(full_name, p) for p in patterns)


def _check_patterns(patterns, per_call, once_names, decode_steps, step_only=()) -> None:
    """Every pattern must match some tap of this recording; name the ones that do not.

    ``per_call`` taps are recorded for the prompt and again for each step (``step{n}.``);
    ``once_names`` (the MTP head's, the vision tower's) once, over the prompt, so never under a
    step's prefix; ``step_only`` (the MTP head's, with decode steps) under each step's prefix too.
    """
    for p in patterns:
        # The steps a pattern can name: the first thousands, and any number written in it
        # (trying every step of a long recording would take minutes for a mistyped pattern).
        steps = set(range(min(decode_steps, 10_000))) | {int(d) for d in re.findall(r"\d+", p) if int(d) < decode_steps}
        prefixes = [""] + [f"step{n}." for n in sorted(steps)]
        if not any(_selected([p], name, prefix + name) for prefix in prefixes for name in per_call) \
                and not any(_selected([p], name, name) for name in once_names) \
                and not any(_selected([p], name, prefix + name) for prefix in prefixes[1:] for name in step_only):
            examples = ", ".join(per_call[:3] + [per_call[-1]])
            step_hint = f"; decode taps step0 … step{decode_steps - 1}" if decode_steps else " (no decode steps)"
            unstepped = re.sub(r"^step[^.]*\.", "", p)
            if unstepped != p and any(_selected([unstepped], name, name) for name in step_only):
                hint = f" There are {decode_steps} decode steps: step0 … step{decode_steps - 1}."
            elif unstepped != p and any(_selected([unstepped], name, name) for name in once_names):
                mtp = any(_selected([unstepped], name, name) for name in _ANY_MTP_NAMES)
                hint = (f" Those taps are recorded over the prompt: write '{unstepped}', without a step (the MTP "
                        f"head's also at each decode step, when there are some)." if mtp else
                        f" Those taps are recorded once, over the prompt: write '{unstepped}', without a step.")
            else:
                hint = ""
            for names, needs in _RECORDED_ON_REQUEST:  # (the pattern matched none of those asked for)
                if not hint and any(_selected([unstepped], name, name) for name in names):
                    hint = f" {needs}."
            raise MinqwenError(
                f"tap pattern '{p}' matches no tap of this model (names look like {examples}{step_hint}; "
                f"`minqwen golden taps` lists them all).{hint}"
            )


# Taps a recording holds only when asked for, and how to ask.
_ANY_MTP_NAMES = [tap.name.format(i=0) for tap in MTP_TAPS]
_ANY_VISION_NAMES = [tap.name.format(i=0) for tap in VISION_TAPS] + [POSITION_TAP.name]
_RECORDED_ON_REQUEST = (
    (_ANY_MTP_NAMES, "The MTP head's taps need --mtp (record(…, mtp_head=…))"),
    (_ANY_VISION_NAMES, "The vision tower's taps and position_ids need a prompt with images: --image "
                        "(record(…, tower=…, images=[…]))"),
)


def is_mtp_tap(name: str) -> bool:
    """Whether a recorded name is one of the MTP head's taps, the prompt's or a decode step's."""
    return _within_call(name).startswith("mtp.")


def _within_call(name: str) -> str:
    """A recorded name without its decode step's prefix: ``step2.mtp.fc`` → ``mtp.fc``."""
    return re.sub(r"^step\d+\.", "", name)


# ==================================================================== the file


def config_hash(config: TextConfig) -> str:
    """SHA-256 (hex) of the text config as canonical JSON: sorted keys, no spaces."""
    return hashlib.sha256(_canonical_json(config.to_dict()).encode("utf-8")).hexdigest()


def _canonical_json(value) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def model_metadata(model) -> dict:
    """What a recording says about the model that made it: config, its hash, the producer."""
    return {
        "producer": f"minqwen {__version__}",
        "config": model.config.to_dict(),
        "config_sha256": config_hash(model.config),
    }


# Metadata fields that save() derives from the recording itself.
_DERIVED = ("format", "token_ids", "decode_steps", "taps")


def save(recording: dict[str, np.ndarray], path, metadata: dict) -> None:
    """Write a recording to one safetensors file, with ``metadata`` (e.g. :func:`model_metadata`).

    ``metadata`` must hold ``config_sha256``; the format, token ids, decode steps and the tap
    manifest are derived from the recording; ``minqwen_version`` is this minqwen's and
    ``tolerances`` defaults to atol 1e-4, rtol 1e-3. Every value is stored as JSON text.
    """
    if not isinstance(recording, dict) or "token_ids" not in recording:
        raise MinqwenError("a recording is a dict {name: array} holding its 'token_ids' (the prompt): record() "
                           "makes one")
    if not isinstance(metadata, dict) or "config_sha256" not in metadata:
        raise MinqwenError("save: metadata needs 'config_sha256' (golden.model_metadata(model) gives it)")
    arrays = {name: np.ascontiguousarray(recording[name]) for name in sorted(recording, key=forward_order)}
    generated = arrays.get("generated_ids", np.zeros(0, np.int64))
    derived = {
        "format": FORMAT,
        "token_ids": [int(t) for t in arrays["token_ids"]],
        "decode_steps": int(generated.size),
        "taps": [{"name": n, "shape": list(a.shape), "dtype": str(a.dtype)} for n, a in arrays.items()],
    }
    for key in _DERIVED:
        if key in metadata and metadata[key] != derived[key]:
            raise MinqwenError(f"save: metadata '{key}' = {metadata[key]!r} contradicts the recording")
    defaults = {"minqwen_version": __version__, "tolerances": {"atol": DEFAULT_ATOL, "rtol": DEFAULT_RTOL}}
    full = {**defaults, **metadata, **derived}
    path = Path(path)
    if not path.parent.is_dir():
        raise MinqwenError(f"{path}: the folder {path.parent} does not exist")
    if path.is_dir() or not path.name:
        raise MinqwenError(f"{path}: is a folder; give the golden file's own name (e.g. {path / 'golden.safetensors'})")
    if path.exists() and not path.is_file():  # safetensors would replace a device or a pipe with a plain file
        raise MinqwenError(f"{path}: exists and is not a regular file (a device or a pipe); give a file's name")
    try:
        save_file(arrays, str(path), metadata={key: json.dumps(value) for key, value in full.items()})
    except Exception as e:  # safetensors raises its own error type for a file it cannot write
        raise MinqwenError(f"{path}: cannot write the golden file here ({e})") from None
    # safetensors writes a private temporary file (mode 600) and renames it: give the file the
    # mode any new file gets here, as a golden file is made to be shared
    umask = os.umask(0)
    os.umask(umask)
    path.chmod(0o666 & ~umask)


@dataclass
class Recording:
    """A golden file read back: its tensors and its decoded metadata."""

    path: Path
    tensors: dict[str, np.ndarray]
    metadata: dict

    @property
    def token_ids(self) -> list[int]:
        if "token_ids" in self.metadata:
            return [int(t) for t in self.metadata["token_ids"]]
        if "token_ids" in self.tensors:
            return [int(t) for t in self.tensors["token_ids"]]
        raise MinqwenError(f"{self.path}: records no token ids (metadata 'token_ids' or a 'token_ids' tensor)")

    @property
    def config_sha256(self) -> str:
        if "config_sha256" not in self.metadata:
            raise MinqwenError(
                f"{self.path}: its metadata has no 'config_sha256', so nothing says which model it ran "
                f"(SHA-256 of the text config as canonical JSON; see minqwen.golden)"
            )
        return str(self.metadata["config_sha256"])


# The metadata a comparison reads, which must be JSON text; other entries that are not JSON
# (another writer's, such as the {"format": "pt"} transformers writes) are kept as text.
_READ_AS_JSON = ("config_sha256", "token_ids")


def load_recording(path) -> Recording:
    """Read a golden file. A missing or malformed file is a MinqwenError that names it."""
    path = Path(path)
    if not path.is_file():
        what = "a folder, not a file" if path.is_dir() else "not a regular file" if path.exists() else "no such file"
        raise MinqwenError(f"{path}: {what} (a golden recording is a .safetensors file, e.g. from "
                           f"`minqwen golden record`)")
    try:
        with safe_open(str(path), framework="np") as f:
            raw_meta = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except Exception as e:  # safetensors raises several types for a bad header
        raise MinqwenError(f"{path}: not a readable safetensors file ({e})") from None
    metadata = {}
    for key, text in raw_meta.items():
        try:
            metadata[key] = json.loads(text)
        except json.JSONDecodeError:
            if key not in _READ_AS_JSON:
                metadata[key] = text
                continue
            raise MinqwenError(f"{path}: metadata '{key}' is not JSON text ({text[:40]!r}); "
                               f"golden metadata values are JSON") from None
    ids = metadata.get("token_ids")
    if "token_ids" in metadata and (not isinstance(ids, list) or not all(is_whole_number(t) and t >= 0 for t in ids)):
        raise MinqwenError(f"{path}: metadata 'token_ids' must be a JSON list of token ids (whole numbers ≥ 0), "
                           f"got {raw_meta['token_ids'][:40]!r}")
    for name, array in tensors.items():
        if np.issubdtype(array.dtype, np.complexfloating):  # compared, it would lose its imaginary part
            raise MinqwenError(f"{path}: tensor '{name}' is {array.dtype}; golden taps are real numbers")
    for name in ("token_ids", "generated_ids"):
        array = tensors.get(name)
        if array is not None and (array.ndim != 1 or not np.issubdtype(array.dtype, np.integer)):
            raise MinqwenError(f"{path}: tensor '{name}' must be 1-D token ids (integers), "
                               f"got {array.dtype} of shape {list(array.shape)}")
    if "token_ids" in metadata and "token_ids" in tensors and [int(t) for t in tensors["token_ids"]] != ids:
        raise MinqwenError(f"{path}: its metadata 'token_ids' ({len(ids)} ids) and its 'token_ids' tensor "
                           f"({tensors['token_ids'].size} ids) are different prompts; write the same ids in both, "
                           f"or only one of them")
    return Recording(path, tensors, metadata)



# ==================================================================== comparing


@dataclass
class TapDiff:
    """How one tensor differs between the two recordings."""

    name: str
    shape_a: tuple
    shape_b: tuple
    max_abs: float = 0.0  # max |a − b| over the elements that are numbers on both sides
    max_rel: float = 0.0  # max |a − b| / |b| over those where b is finite and ≠ 0
    beyond: int = 0  # how many elements break |a − b| ≤ atol + rtol·|b|
    size: int = 0
    nans: int = 0  # elements where a or b is NaN
    worst: tuple | None = None  # index of the element furthest beyond tolerance (a NaN first; ids: the first
    #                             that differs), if any
    worst_values: tuple = ()  # (a, b) there

    @property
    def ok(self) -> bool:
        return self.shape_a == self.shape_b and self.beyond == 0


@dataclass
class Report:
    """The result of :func:`compare`: per-tap errors in forward order, and what only one side has."""

    a: Path
    b: Path
    atol: float
    rtol: float
    rows: list[TapDiff]
    only_in_a: list[str] = field(default_factory=list)
    only_in_b: list[str] = field(default_factory=list)
    producers: tuple[str, str] = ("", "")
    notes: list[str] = field(default_factory=list)

    @property
    def first_divergent(self) -> TapDiff | None:
        """The first tap, in forward order, with an element beyond tolerance (or a shape mismatch)."""
        return next((row for row in self.rows if not row.ok), None)

    @property
    def compared_taps(self) -> int:
        """How many taps (not counting the id vectors) both sides recorded."""
        return sum(row.name not in ID_VECTORS for row in self.rows)

    @property
    def ok(self) -> bool:
        """Every common tap within tolerance — and at least one tap in common: misnamed taps are no pass."""
        return self.first_divergent is None and self.compared_taps > 0

    def format(self) -> str:
        """The report as a table; the first divergent tap is marked ``>>``."""
        first = self.first_divergent
        width = max([len(r.name) for r in self.rows] + [3])
        lines = [
            f"a: {self.a}" + (f"  ({self.producers[0]})" if self.producers[0] else ""),
            f"b: {self.b}" + (f"  ({self.producers[1]})" if self.producers[1] else ""),
            f"tolerance: |a − b| ≤ atol + rtol·|b| with atol {self.atol:g}, rtol {self.rtol:g}",
            "",
            f"   {'tap':<{width}}  {'shape':<16} {'max abs':>9} {'max rel':>9}  beyond",
        ]
        for row in self.rows:
            mark = ">>" if row is first else "  "
            if row.shape_a != row.shape_b:
                shape, numbers = "mismatch", f"a {list(row.shape_a)} vs b {list(row.shape_b)}"
            else:
                shape = str(list(row.shape_a))
                numbers = f"{row.max_abs:9.2e} {row.max_rel:9.2e}  {row.beyond}/{row.size}"
                if row.nans:
                    numbers += f" ({row.nans} NaN)"
            lines.append(f"{mark} {row.name:<{width}}  {shape:<16} {numbers}")
        for side, names in (("a", self.only_in_a), ("b", self.only_in_b)):
            if names:
                shown = ", ".join(names[:6]) + (", …" if len(names) > 6 else "")
                lines.append(f"only in {side} ({len(names)}): {shown}")
        lines += self.notes
        if self.compared_taps == 0:
            lines.append("no tap in common: nothing was compared (check the names with `minqwen golden taps`)")
        elif first is None:
            lines.append(f"all {self.compared_taps} common taps within tolerance")
        elif first.shape_a != first.shape_b:
            lines.append(f"first divergence: {first.name} (shapes differ)")
        else:
            nans = f", {first.nans} NaN" if first.nans else ""
            a_value, b_value = first.worst_values
            lines.append(f"first divergence: {first.name} ({first.beyond} of {first.size} elements beyond "
                         f"tolerance{nans}, max abs {first.max_abs:.3g}, max rel {first.max_rel:.3g}); the worst at "
                         f"index {list(first.worst)}: a {a_value:.6g}, b {b_value:.6g}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.format()


def compare(a_path, b_path, atol: float = DEFAULT_ATOL, rtol: float = DEFAULT_RTOL) -> Report:
    """Compare two golden files tap by tap; ``b`` is the reference (rtol scales with |b|).

    Runs over different prompts or model configs are not comparable: that is a MinqwenError,
    as is a missing file. Taps only one side recorded are listed, not counted as divergent.
    """
    # (an infinite tolerance would pass anything, and NumPy only warns about it)
    if not (is_real_number(atol) and is_real_number(rtol) and 0 <= atol < math.inf and 0 <= rtol < math.inf):
        raise MinqwenError(f"tolerances must be finite numbers ≥ 0, got atol {atol!r}, rtol {rtol!r}")
    a, b = load_recording(a_path), load_recording(b_path)
    if a.token_ids != b.token_ids:
        where = next((i for i, (x, y) in enumerate(zip(a.token_ids, b.token_ids)) if x != y),
                     min(len(a.token_ids), len(b.token_ids)))
        raise MinqwenError(
            f"{a.path} and {b.path} ran different prompts ({len(a.token_ids)} vs {len(b.token_ids)} tokens, "
            f"first difference at position {where}); golden outputs compare only runs over the same token ids"
        )
    if a.config_sha256 != b.config_sha256:
        raise MinqwenError(
            f"{a.path} and {b.path} ran different model configs (config sha256 {a.config_sha256[:12]}… vs "
            f"{b.config_sha256[:12]}…); compare recordings of the same checkpoint"
        )
    common = sorted(set(a.tensors) & set(b.tensors), key=forward_order)
    rows = [_diff(name, a.tensors[name], b.tensors[name], atol, rtol) for name in common]
    return Report(
        a=a.path, b=b.path, atol=atol, rtol=rtol, rows=rows,
        only_in_a=sorted(set(a.tensors) - set(b.tensors), key=forward_order),
        only_in_b=sorted(set(b.tensors) - set(a.tensors), key=forward_order),
        producers=(str(a.metadata.get("producer", "")), str(b.metadata.get("producer", ""))),
        notes=_decode_notes(a, b) + _unknown_name_notes(a, b),
    )


def _diff(name: str, a: np.ndarray, b: np.ndarray, atol: float, rtol: float) -> TapDiff:
    if name == "generated_ids":
        # One side may have decoded more steps than the other: compare the steps both have.
        n = min(a.size, b.size)
        a, b = a[:n], b[:n]
    row = TapDiff(name, tuple(a.shape), tuple(b.shape), size=int(a.size))
    if row.shape_a != row.shape_b:
        return row
    if np.issubdtype(a.dtype, np.integer) and np.issubdtype(b.dtype, np.integer):
        a64, b64 = a.astype(np.int64), b.astype(np.int64)
        close = a64 == b64  # ids: equal or not
        excess = np.where(close, 0.0, 1.0)  # [same shape]: any difference is as bad as another
    else:
        a64, b64 = a.astype(np.float64), b.astype(np.float64)
        close = np.isclose(a64, b64, rtol=rtol, atol=atol)  # |a − b| ≤ atol + rtol·|b|
    with np.errstate(invalid="ignore"):  # NaN in, NaN out: counted below
        err = np.where(a64 == b64, 0.0, np.abs(a64 - b64).astype(np.float64))  # equal infinities differ by 0
        if not np.issubdtype(a64.dtype, np.integer):
            excess = err - (atol + rtol * np.abs(b64))  # > 0 beyond tolerance (NaN where err is)
            excess[np.isinf(b64) & ~close] = np.inf  # an infinite reference missed: as far beyond as it gets
    nan = np.isnan(err)
    row.nans = int(np.count_nonzero(nan))
    numbers = ~nan
    if numbers.any():
        row.max_abs = float(np.max(err[numbers]))
        finite = numbers & (b64 != 0) & np.isfinite(b64)  # (relative to an infinite b: undefined)
        row.max_rel = float(np.max(err[finite] / np.abs(b64[finite]))) if finite.any() else 0.0
    row.beyond = int(np.count_nonzero(~close))
    if row.beyond:  # where to look first: a NaN, else the element furthest past its tolerance
        flat = int(np.argmax(nan)) if row.nans else int(np.argmax(np.where(close, -np.inf, excess)))
        row.worst = tuple(int(i) for i in np.unravel_index(flat, a.shape))
        row.worst_values = (a.reshape(-1)[flat].item(), b.reshape(-1)[flat].item())
    return row


def _decode_notes(a: Recording, b: Recording) -> list[str]:
    """Say where greedy decoding chose different tokens: from there on the steps ran on different inputs."""
    ga, gb = a.tensors.get("generated_ids"), b.tensors.get("generated_ids")
    if ga is None or gb is None:
        return []
    n = min(ga.size, gb.size)
    differ = np.nonzero(ga[:n] != gb[:n])[0]
    notes = []
    if differ.size:
        s = int(differ[0])
        notes.append(f"greedy decoding chose different tokens at step{s} (a {int(ga[s])}, b {int(gb[s])}): "
                     f"taps from step{s} on ran on different inputs; look at the logits before it")
    if ga.size != gb.size:
        notes.append(f"decode steps: a {ga.size}, b {gb.size} (only the common steps are compared)")
    return notes


def _unknown_name_notes(a: Recording, b: Recording) -> list[str]:
    """Names outside the tap table are usually typos in a port: say so."""
    notes = []
    for side, rec in (("a", a), ("b", b)):
        unknown = [name for name in sorted(rec.tensors) if forward_order(name)[0] == 3]
        if unknown:
            shown = ", ".join(unknown[:6]) + (", …" if len(unknown) > 6 else "")
            notes.append(f"{side} has names outside the tap table ({len(unknown)}): {shown}")
    return notes


ID_VECTORS = ("token_ids", "generated_ids")
_STEP = re.compile(r"step(\d+)\.(.*)")
_LAYER = re.compile(r"layers\.(\d+)\.(.*)")
_VISUAL_BLOCK = re.compile(r"visual\.blocks\.(\d+)")
_VISION_ORDER = [tap.name for tap in VISION_TAPS]


def forward_order(name: str) -> tuple:
    """A sort key that puts recorded names in the order a forward pass produces them.

    token_ids, the vision tower's taps and position_ids, then the prompt's taps, then each decode
    step's, then generated_ids; within a call, by layer and by position in :data:`TAPS`, the MTP
    head's after the call's logits. Names outside the table go last, sorted.
    """
    if name == "token_ids":
        return (0,)
    if name == "generated_ids":
        return (2,)
    step, rest = -1, name
    match = _STEP.fullmatch(name)
    if match:
        step, rest = int(match.group(1)), match.group(2)
    layer = _LAYER.fullmatch(rest)
    if step == -1 and name.startswith("visual."):  # the tower runs before the text model
        block = _VISUAL_BLOCK.fullmatch(name)
        if block:
            return (1, -1, -3, _VISION_ORDER.index("visual.blocks.{i}"), int(block.group(1)))
        if name in _VISION_ORDER:
            return (1, -1, -3, _VISION_ORDER.index(name), 0)
    if step == -1 and name == POSITION_TAP.name:
        return (1, -1, -2, 0)
    if rest == "embed":
        return (1, step, -1, 0)
    if layer and layer.group(2) in _LAYER_SUFFIXES:
        return (1, step, int(layer.group(1)), _LAYER_SUFFIXES.index(layer.group(2)))
    finals = [tap.name for tap in FINAL_TAPS]
    if rest in finals:
        return (1, step, float("inf"), finals.index(rest))
    mtp = [tap.name.format(i=0) for tap in MTP_TAPS]
    if rest in mtp:  # the MTP head runs after the main model's pass (the prompt's, or a step's)
        return (1, step, float("inf"), len(finals) + mtp.index(rest))
    return (3, name)
