"""Multi-token prediction: Qwen3.5's MTP head, and self-speculative decoding with it.

A decode step reads every weight of the model to produce one token. Reading the weights is
what costs (decode is memory-bound), not the arithmetic — so a forward pass over a few
positions costs about as much as over one, *if* every weight is read once for all of them.
Speculative decoding turns that into speed: guess a few tokens cheaply, then check all the
guesses with one forward pass of the real model, and keep the ones it agrees with.

Qwen3.5 checkpoints ship their own guesser, the MTP head (``mtp.*``), trained with the model
to predict the token *after* next. For position j it reads what the main model knows after
token j (its output ``h[j]``, after the final norm) and the token j + 1 that the main model
has just chosen:

    e = pre_fc_norm_embedding(embed(t[j+1]))        h' = pre_fc_norm_hidden(h[j])
    x = fc([e ; h'])                                [2H] → [H]    (embedding first)
    x = MTP decoder layer (full attention, its own KV cache, dense MLP or MoE) at position j
    logits for t[j+2] = lm_head(norm(x))            (the main model's embedding and LM head)

Self-speculative decoding, one cycle (:func:`speculative_generate`):

1. **Draft** k tokens with the head (:func:`draft`): the first from the main model's newest
   output, each next one by feeding the head's own output back as the "hidden state" of the
   next position. With several MTP layers, draft step s uses layer s (beyond the last layer,
   the last one again).
2. **Verify**: one forward of the main model over (last token, draft 1 … draft k) gives the
   model's own logits at all k + 1 positions, reading each weight once (see linear.py).
3. **Accept** the longest prefix of drafts the model agrees with, plus one token of its own:
   the correction at the first disagreement, or the bonus token after the last draft.
   Greedy: agree = same argmax. Sampling: the standard rejection rule (Leviathan et al.,
   2023; Chen et al., 2023), which makes every emitted token distributed exactly as plain
   sampling would make it.
4. **Roll back** every cache to the last accepted token: attention caches are truncated; a
   Gated DeltaNet memory cannot be rewound, so the verify pass keeps the (conv window,
   memory) after each of its positions and the rollback picks one. Then the MTP cache is
   brought up to date over the accepted positions with the main model's own hidden states.

The output is the model's, not the head's: a bad head only makes decoding slower.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .attention import KVCache
from .checkpoint import Checkpoint
from .config import read_json_object
from .deltanet import DeltaNetState
from .errors import MinqwenError, is_whole_number, whole_number_array
from .generate import (
    GenerationStats,
    checked_generation_args,
    checked_history,
    check_model,
    checked_stats,
    checked_stop_ids,
    stop_reason,
)
from .linear import BF16, SMALL_MODEL_BYTES, linear, rounding_prompts_to_bf16
from .model import Cache, DecoderLayer, Model, load_attention, load_mlp, prefixed, TensorReader, compute_dtype, converted
from .moe import MoEWeights
from .norms import rms_norm
from .rope import mrope_cos_sin, text_position_ids
from .sampling import SamplingParams, apply_penalties, sample_next, sampling_distribution
from .threads import one_blas_thread

# How many tokens to draft per verify, unless told otherwise (see tools/mtp_figures.py); in a
# small model decoding greedily, SMALL_MODEL_DRAFT_TOKENS (see default_draft_tokens).
DRAFT_TOKENS = 1
SMALL_MODEL_DRAFT_TOKENS = 2
# The draft's LM head reads only the first token ids (plus every id already in the context):
# a byte-level BPE numbers its tokens in merge order, so low ids are the frequent ones. By
# default ("auto") the first quarter of the vocabulary, at most DRAFT_VOCAB ids: Qwen3.5's
# 248k-row head becomes a 32k-row view, the embedded model's 4,096 rows 1,024 (its whole head
# is over a quarter of a decode step's bytes; tools/measurements.md has what each cut measured).
DRAFT_VOCAB = 32768
DRAFT_VOCAB_SHARE = 4
AUTO = "auto"


# ==================================================================== the head


@dataclass
class MtpHead:
    """The MTP head's own weights, named as in the checkpoint (``mtp.…``).

    The token embedding and the LM head are the main model's (``model.embed_tokens``,
    ``model.lm_head``); only these are new.
    """

    fc: np.ndarray  # [H, 2H]: mixes [embedding ; hidden]
    pre_fc_norm_embedding: np.ndarray  # [H]
    pre_fc_norm_hidden: np.ndarray  # [H]
    layers: list[DecoderLayer]  # full-attention decoder layers (``mtp.layers.{i}.…``)
    norm: np.ndarray  # [H]

    def astype(self, dtype) -> MtpHead:
        """A copy computing in another float dtype (to pair with ``Model.astype``)."""
        return converted(self, compute_dtype(dtype))


def load_mtp(folder: str | Path, model: Model) -> MtpHead | None:
    """The MTP head stored in checkpoint ``folder`` (``mtp.*`` tensors) for ``model``, or None.

    None when the checkpoint has no ``mtp.*`` tensor at all. The weights are kept like the
    model's (float32 or bf16 matrices, experts memory-mapped).
    """
    if not isinstance(folder, (str, os.PathLike)):
        raise MinqwenError(f"load_mtp takes the path of a checkpoint folder, got {type(folder).__name__}")
    folder = Path(folder)
    check_model(model)
    c = model.config
    quantization = getattr(c, "quantization", None)
    ckpt = Checkpoint(folder, fp8_block=quantization.weight_block_size if quantization else None)
    names = [n for n in ckpt.names if n.startswith("mtp.")]
    if not names:
        return None
    _check_mtp_config(folder)
    n_layers = len({n.split(".")[2] for n in names if n.startswith("mtp.layers.")})
    declared = _declared_mtp_layers(folder)
    if declared is not None and declared != n_layers:
        raise MinqwenError(
            f"{folder}: config field 'mtp_num_hidden_layers' is {declared} but the checkpoint holds "
            f"{n_layers} MTP layers (tensors mtp.layers.{{i}}.*)")
    if n_layers == 0:
        raise MinqwenError(f"{folder}: the checkpoint has mtp.* tensors but no MTP layer (mtp.layers.0.*)")

    reader = TensorReader(ckpt, None, "bfloat16" if model.weights_dtype == BF16 else "float32")
    reader.prefix = "mtp."
    H = c.hidden_size
    layers = []
    for i in range(n_layers):
        p = f"layers.{i}."
        if f"mtp.{p}input_layernorm.weight" not in ckpt:
            raise MinqwenError(f"{folder}: MTP layers must be numbered 0 … {n_layers - 1}; "
                               f"tensor 'mtp.{p}input_layernorm.weight' is missing")
        mlp = load_mlp(reader, p + "mlp.", c)  # the MTP layer of a qwen3_5_moe model is an MoE layer too
        layers.append(DecoderLayer(
            layer_type="full_attention",
            input_layernorm=reader.take(p + "input_layernorm.weight", (H,)),
            post_attention_layernorm=reader.take(p + "post_attention_layernorm.weight", (H,)),
            mlp=mlp,
            self_attn=load_attention(reader, p + "self_attn.", c),
        ))
    head = MtpHead(
        fc=reader.matrix("fc.weight", (H, 2 * H)),
        pre_fc_norm_embedding=reader.take("pre_fc_norm_embedding.weight", (H,)),
        pre_fc_norm_hidden=reader.take("pre_fc_norm_hidden.weight", (H,)),
        layers=layers,
        norm=reader.take("norm.weight", (H,)),
    )
    unused = sorted(n for n in names if n not in reader.used)
    if unused:
        raise MinqwenError(f"{folder}: MTP tensors minqwen does not know how to use: {', '.join(unused[:5])}"
                           + (f", … ({len(unused) - 5} more)" if len(unused) > 5 else ""))
    return head if model.dtype == np.float32 else head.astype(model.dtype)


def _raw_text_config(folder: Path) -> dict:
    raw = read_json_object(folder / "config.json")
    return raw.get("text_config", raw) if isinstance(raw.get("text_config"), dict) else raw


def _declared_mtp_layers(folder: Path) -> int | None:
    value = _raw_text_config(folder).get("mtp_num_hidden_layers")
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
        raise MinqwenError(f"{folder}: config field 'mtp_num_hidden_layers' must be a whole number, got {value!r}")
    return value


def _check_mtp_config(folder: Path) -> None:
    dedicated = _raw_text_config(folder).get("mtp_use_dedicated_embeddings", False)
    if not isinstance(dedicated, bool) and dedicated is not None:
        raise MinqwenError(f"{folder}: config field 'mtp_use_dedicated_embeddings' must be true or false, "
                           f"got {dedicated!r}")
    if dedicated:
        raise MinqwenError(f"{folder}: config field 'mtp_use_dedicated_embeddings' is true; minqwen's MTP head "
                           "shares the main model's embedding, as Qwen3.5's released checkpoints do")


def default_draft_tokens(model: Model, params: SamplingParams) -> int:
    """Drafts per verify when the command line is not told (``--speculative``); 0: plain decoding.

    The Python API speculates only when handed a speculative ``decode=``. Measured with
    tools/mtp_figures.py (README, tools/measurements.md) on the Qwen3.5-0.8B shape: a
    two-position verify costs 1.03–1.09 decode steps on an Intel Xeon VM and 0.98–1.54 on an
    AMD EPYC VM, a draft 0.07–0.09, so one draft pays from an acceptance of about 0.05–0.6;
    drafts from Qwen3.5's own heads are accepted around 0.8. So a model of SMALL_MODEL_BYTES
    of weights and more takes DRAFT_TOKENS (one) a pass, greedy or sampled (a third position's
    cost varied too much between machines and runs for two drafts to be the safe default).
    In a small model the MTP layer is a large part of the model, and per-call overhead a large
    part of every step, the MTP layer's included, so only drafts accepted most of the time pay.
    The embedded model's head, distilled toward it (tools/distill_mtp.py), measured greedy 1.41×
    with two drafts (0.88 accepted), 1.36–1.41× with three, 1.24× with one; with its generation
    config's sampling 1.01× at best (a sampled draft is accepted less often and costs a
    distribution). So a small model takes SMALL_MODEL_DRAFT_TOKENS drafts when decoding
    greedily and none when sampling. (A small model whose head guesses its model poorly, such
    as a random test fixture's, decodes greedily more slowly so, with the same output:
    ``--speculative 0``.)
    """
    if model.weight_bytes >= SMALL_MODEL_BYTES:
        return DRAFT_TOKENS
    return SMALL_MODEL_DRAFT_TOKENS if params.greedy else 0


def require_head(head: MtpHead | None, where: str | None = None) -> MtpHead:
    """``head``, or the error that explains why speculative decoding cannot run without one.

    ``where``: the checkpoint folder, when the caller knows that it holds no ``mtp.*`` tensors.
    """
    if head is None:
        missing = (f"{where} has none (no mtp.* tensors)" if where is not None else
                   "head is None (minqwen.mtp.load_mtp(folder, model) loads it; None when the checkpoint has "
                   "no mtp.* tensors)")
        raise MinqwenError(
            f"speculative decoding needs an MTP head, and {missing}: "
            "the head is what drafts the tokens the model then verifies. Run without --speculative, "
            "or use a checkpoint that ships its MTP head (Qwen3.5's releases do)")
    return head


def check_head_fits(model: Model, head) -> None:
    """``head`` must be an MTP head made for ``model`` (``load_mtp(folder, model)``), as a cache must be.

    A head loaded for another model meets this model's hidden states and embeddings with other
    widths (a numpy broadcast error deep inside a norm), or attends with other head counts.
    """
    check_model(model)
    if not isinstance(head, MtpHead):
        raise MinqwenError(f"head must be an MTP head (minqwen.mtp.load_mtp(folder, model)), got {type(head).__name__}")
    if _head_shapes(head) != _head_shapes_for(model, len(head.layers)):
        H = model.config.hidden_size
        differs = (f"its hidden size is {head.fc.shape[0]}, the model's {H}" if head.fc.shape != (H, 2 * H) else
                   "its attention or MLP weights have other shapes than the model's layers")
        raise MinqwenError(f"this MTP head does not fit the model ({differs}): it was loaded for another model. "
                           f"Load it with load_mtp(folder, model), from this model's own checkpoint folder")


def _head_shapes(head: MtpHead) -> list:
    """What must match the model: every weight's shape (the MLP's kind and shapes too)."""
    shapes = [head.fc.shape, head.pre_fc_norm_embedding.shape, head.pre_fc_norm_hidden.shape, head.norm.shape]
    for layer in head.layers:
        a = layer.self_attn
        shapes.append(None if a is None else (a.q_proj.shape, a.k_proj.shape, a.v_proj.shape, a.o_proj.shape,
                                              a.q_norm.shape, a.k_norm.shape))
        shapes += [layer.input_layernorm.shape, layer.post_attention_layernorm.shape, _mlp_shapes(layer.mlp)]
    return shapes


def _head_shapes_for(model: Model, n_layers: int) -> list:
    """:func:`_head_shapes` of a head of ``n_layers`` layers loaded for ``model``."""
    c = model.config
    H, D, Hq, Hkv = c.hidden_size, c.head_dim, c.num_attention_heads, c.num_key_value_heads
    attention = ((Hq * 2 * D, H), (Hkv * D, H), (Hkv * D, H), (H, Hq * D), (D,), (D,))  # as load_attention reads
    mlp = _mlp_shapes(model.layers[0].mlp)  # an MTP layer's MLP is shaped as every layer's of its model
    return [(H, 2 * H), (H,), (H,), (H,)] + [attention, (H,), (H,), mlp] * n_layers


def _mlp_shapes(mlp) -> tuple:
    if isinstance(mlp, MoEWeights):
        return "moe", mlp.gate.shape, mlp.shared_expert_gate.shape, _mlp_shapes(mlp.shared_expert)
    return "dense", mlp.gate_proj.shape, mlp.up_proj.shape, mlp.down_proj.shape


# ==================================================================== one MTP layer


def mtp_layer(model: Model, head: MtpHead, i: int, hidden: np.ndarray, next_ids, kv: KVCache, position: int,
              tap=None) -> np.ndarray:
    """MTP layer i over pairs (hidden[m], next_ids[m]) at rotary positions position, position + 1, …

    hidden [T, H]: for layer 0, the main model's output at positions j (after its final
    norm); next_ids [T]: the token that follows each, t[j+1]. Appends to ``kv``. Returns the
    layer's output after ``mtp.norm``, [T, H]: the LM head of it gives logits for t[j+2],
    and it is what a further draft step reads as its hidden state.
    """
    c = model.config
    eps = c.rms_norm_eps
    t_len = hidden.shape[0]
    embedded = model.embed(np.asarray(next_ids))  # [T, H]
    e = rms_norm(embedded, head.pre_fc_norm_embedding, eps)  # [T, H]
    h = rms_norm(hidden, head.pre_fc_norm_hidden, eps)  # [T, H]
    x = linear(np.concatenate([e, h], axis=-1), head.fc)  # [T, 2H] · [H, 2H]ᵀ → [T, H]: embedding first
    if tap is not None:
        tap("pre_fc_norm_embedding", e)
        tap("pre_fc_norm_hidden", h)
        tap("fc", x)
    cos, sin = mrope_cos_sin(text_position_ids(position, t_len), model.inv_freq, c.mrope_section,
                             model.attention_factor, model.dtype)  # [T, R] each
    layer_tap = None if tap is None else prefixed(tap, f"layers.{i}.")
    x = model.decoder_layer(x, head.layers[i], kv, cos, sin, layer_tap)  # [T, H]
    out = rms_norm(x, head.norm, eps)
    if tap is not None:
        tap("norm", out)
    return out


def mtp_logits(model: Model, head: MtpHead, token_ids, tap=None, kv: KVCache | None = None) -> np.ndarray:
    """Teacher-forced MTP logits over a sequence: row j predicts t[j+2] from (h[j], t[j+1]).

    token_ids [T] → [T − 1, V]. This is what the head was trained on (and what its golden
    taps record: ``tap`` receives ``pre_fc_norm_embedding`` … ``norm`` and ``logits``).
    ``kv``: an empty MTP cache to fill with the T − 1 pairs (default: a fresh one, discarded).
    """
    check_head_fits(model, head)
    ids = whole_number_array(token_ids)
    if ids is None or ids.ndim != 1 or ids.size < 2:
        raise MinqwenError(f"mtp_logits: token_ids must be one sequence (1-D) of at least two token ids, as the "
                           f"head reads t[j] and t[j+1]; got {token_ids!r:.80}")
    hidden = model.hidden_states(ids)  # [T, H]
    kv = new_mtp_kv(model) if kv is None else kv
    out = mtp_layer(model, head, 0, hidden[:-1], ids[1:], kv, 0, tap)  # [T − 1, H]
    logits = model.logits(out)  # [T − 1, V]
    if tap is not None:
        tap("logits", logits)
    return logits


def new_mtp_kv(model: Model) -> KVCache:
    return KVCache(model.config.num_key_value_heads, model.config.head_dim, model.dtype)


# ==================================================================== the MTP cache


class MtpCache:
    """What the MTP head carries from one draft to the next.

    Layer i of the head consumes, at index j, the pair (g_i[j], t[j+1+i]): g_0 is the main
    model's output h, g_i the output of layer i − 1 at the same index. Each layer keeps the
    keys and values of the pairs it has *committed* — those built only from accepted tokens
    and the main model's hidden states. (With one layer, the usual case: the pairs
    (h[j], t[j+1]) for every j so far.)

    ``start``: the main position of the first pair. ``next_ids``: t[j+1] for j = start, …
    ``waiting[i]``: committed outputs of layer i − 1 that layer i cannot use yet, because the
    token i places further on is still unknown. ``last``: layer 0's newest output, from which
    the next draft starts.
    """

    def __init__(self, model: Model, head: MtpHead, start: int = 0, rope_delta: int = 0):
        check_head_fits(model, head)
        for name, value in (("start", start), ("rope_delta", rope_delta)):
            if not is_whole_number(value) or (name == "start" and value < 0):
                raise MinqwenError(f"MtpCache: {name} must be a whole number{' ≥ 0' if name == 'start' else ''}, "
                                   f"got {value!r}")
        self.layers = [new_mtp_kv(model) for _ in head.layers]
        self.start = start
        self.rope_delta = rope_delta
        self.next_ids: list[int] = []
        self.waiting = [np.zeros((0, model.config.hidden_size), model.dtype) for _ in head.layers]
        self.last: np.ndarray | None = None  # [H]

    @property
    def end(self) -> int:
        """The main position after the newest committed pair of layer 0."""
        return self.start + self.layers[0].length

    def copy(self) -> MtpCache:
        new = MtpCache.__new__(MtpCache)
        new.layers = [kv.copy() for kv in self.layers]
        new.start, new.rope_delta = self.start, self.rope_delta
        new.next_ids = list(self.next_ids)
        new.waiting = [w.copy() for w in self.waiting]
        new.last = None if self.last is None else self.last.copy()
        return new

    def commit(self, model: Model, head: MtpHead, hidden: np.ndarray, next_ids) -> None:
        """Add the main model's hidden states [n, H] at positions end … end + n − 1, with the token after each."""
        next_ids = [int(t) for t in next_ids]
        if hidden.shape[0] != len(next_ids):
            raise MinqwenError(f"commit: {hidden.shape[0]} hidden states but {len(next_ids)} next tokens")
        self.next_ids += next_ids
        inputs = hidden  # layer i's new inputs g_i, at its next uncommitted indices
        for i, kv in enumerate(self.layers):
            first = self.start + kv.length  # index of layer i's next pair
            inputs = np.concatenate([self.waiting[i], inputs])
            # the pair at index j needs t[j+1+i]: only so many of those are known
            ready = min(len(inputs), len(self.next_ids) - (first - self.start) - i)
            self.waiting[i] = inputs[ready:]
            if ready == 0:
                break
            ids = self.next_ids[first - self.start + i : first - self.start + i + ready]
            inputs = mtp_layer(model, head, i, inputs[:ready], ids, kv, first + self.rope_delta)  # [ready, H]
            if i == 0:
                self.last = inputs[-1]


def _check_mtp_cache(model: Model, head: MtpHead, mtp_cache: MtpCache) -> None:
    """A cache made for a head of another depth would index past its layers or leave one unused;
    made for another model, its keys would have other widths."""
    c = model.config
    shapes = sorted({(kv.keys.shape[0], kv.keys.shape[2]) for kv in mtp_cache.layers})  # (Hkv, D) per layer
    if len(mtp_cache.layers) != len(head.layers) or shapes != [(c.num_key_value_heads, c.head_dim)]:
        raise MinqwenError(
            f"mtp_cache was made for another head or model: it holds {len(mtp_cache.layers)} layer(s) with keys of "
            f"(heads, head_dim) {shapes}; this head has {len(head.layers)} layer(s) and the model's keys are "
            f"{(c.num_key_value_heads, c.head_dim)}. Make it with MtpCache(model, head)")


# ==================================================================== draft, verify, accept, roll back


def draft(model: Model, head: MtpHead, mtp: MtpCache, k: int, pick, draft_vocab: int | str | None = AUTO,
          context_ids=()) -> list[int]:
    """k draft tokens. ``pick(logits [V], step)`` turns each step's logits into its token.

    Step 0 reads layer 0's newest committed output (``mtp.last``). Step s < number of layers
    runs layer s over its pending indices, whose last token is draft s; a later step runs the
    last layer one index further on, its own previous output standing in for the hidden
    state there. The MTP cache is left as it was found: drafts are never committed.
    """
    if mtp.last is None:
        raise MinqwenError("draft: the MTP cache is empty; commit the prompt's hidden states first")
    committed = [kv.length for kv in mtp.layers]
    n_layers = len(head.layers)
    drafts: list[int] = []
    out = mtp.last[None]  # [1, H]: the newest output of the step before
    context = np.unique(np.asarray(context_ids, dtype=np.int64))
    try:
        for s in range(k):
            if s > 0:
                tokens = mtp.next_ids + drafts  # t[j+1] for j = start, … (drafts at the end)
                i = min(s, n_layers - 1)
                kv = mtp.layers[i]
                if s < n_layers:  # layer s over its uncommitted indices, the last of which reads draft s
                    # Step 1's `out` is mtp.last, which commit already left at the end of waiting[1];
                    # a later step's `out` is a draft's output, never committed, so it is appended.
                    inputs = np.concatenate([mtp.waiting[i], out]) if i > 1 else mtp.waiting[i]
                else:  # past the last layer: one index further, fed its own output
                    inputs = out[-1:]
                first = mtp.start + kv.length
                at = first - mtp.start + i
                out = mtp_layer(model, head, i, inputs, tokens[at : at + len(inputs)], kv, first + mtp.rope_delta)
            drafts.append(int(pick(draft_logits(model, out[-1], draft_vocab, context), s)))
    finally:
        for kv, length in zip(mtp.layers, committed):
            kv.truncate(length)
    return drafts


def draft_rows(vocab_size: int, draft_vocab: int | str | None = AUTO) -> int:
    """How many leading token ids the draft head reads: ``draft_vocab`` ("auto": see DRAFT_VOCAB; None: all)."""
    draft_vocab = checked_draft_vocab(draft_vocab)
    if isinstance(draft_vocab, str) and draft_vocab == AUTO:
        return min(DRAFT_VOCAB, max(1, vocab_size // DRAFT_VOCAB_SHARE))
    return vocab_size if draft_vocab is None else min(draft_vocab, vocab_size)


def checked_draft_vocab(draft_vocab):
    """``draft_vocab`` as :func:`draft_rows` takes it, or an error naming it."""
    if draft_vocab is None or (isinstance(draft_vocab, str) and draft_vocab == AUTO):
        return draft_vocab
    if not is_whole_number(draft_vocab) or draft_vocab < 1:
        raise MinqwenError(f"draft_vocab must be a whole number ≥ 1, 'auto' (the first quarter of the vocabulary, "
                           f"at most {DRAFT_VOCAB} ids) or None (the whole vocabulary); got {draft_vocab!r}")
    return int(draft_vocab)


def draft_logits(model: Model, hidden: np.ndarray, draft_vocab: int | str | None, context=()) -> np.ndarray:
    """LM head logits [V] for one hidden state [H]; over the first ``draft_rows`` ids and the context only.

    Ids outside get −inf: the draft never proposes them. Since the verify decides, this only
    changes how often drafts are accepted, never the output.
    """
    vocab = model.config.vocab_size
    draft_vocab = draft_rows(vocab, draft_vocab)
    if draft_vocab == vocab:
        return model.logits(hidden[None])[0]
    logits = np.full(vocab, -np.inf, np.float32)
    # [1, H] · [draft_vocab, H]ᵀ → [1, draft_vocab]; the slice of lm_head is a view, not a copy
    logits[:draft_vocab] = linear(hidden[None], model.lm_head[:draft_vocab])[0]
    extra = np.asarray(context, dtype=np.int64)
    extra = extra[extra >= draft_vocab]  # [n]: context ids beyond the draft vocabulary
    if extra.size:
        logits[extra] = linear(hidden[None], model.lm_head[extra])[0]  # [1, H] · [n, H]ᵀ → [1, n]
    return logits


def verify(model: Model, cache: Cache, tokens: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """One forward of the main model over ``tokens`` (last token, drafts), keeping every DeltaNet state.

    Returns (hidden [k+1, H], logits [k+1, V]). Afterwards each DeltaNet state holds its
    per-position states in ``history`` until :func:`keep_first` picks one.
    """
    for state in cache.layers:
        if isinstance(state, DeltaNetState):
            state.history = []
    # Exact even with bf16_prompts: a verify is decoding, and 15 drafts make 16 rows.
    with rounding_prompts_to_bf16(False):
        try:
            hidden = model.hidden_states(tokens, cache)  # [k+1, H]
        except BaseException:
            _forget_history(cache)
            raise
        return hidden, model.logits(hidden)  # [k+1, V]: every weight read once for all rows


def keep_first(cache: Cache, start: int, keep: int) -> None:
    """Cut ``cache`` back to the first ``keep`` tokens of the verify pass that began at position ``start``."""
    for state in cache.layers:
        if isinstance(state, DeltaNetState):
            kept = state.history[keep - 1]  # the state right after the keep-th token
            state.conv, state.recurrent = kept.conv, kept.recurrent
        else:
            state.truncate(start + keep)  # attention: drop the rejected tokens' keys and values
    _forget_history(cache)
    cache.position = start + keep


def _forget_history(cache: Cache) -> None:
    for state in cache.layers:
        if isinstance(state, DeltaNetState):
            state.history = None


def target_distribution(logits: np.ndarray, params: SamplingParams, seen, generated) -> np.ndarray:
    """The distribution plain sampling draws from (as :func:`~minqwen.sampling.sample_next`), float64 [V]."""
    return sampling_distribution(apply_penalties(logits, seen, generated, params), params)


def accept(logits: np.ndarray, drafts: list[int], q: list, params: SamplingParams, rng: np.random.Generator,
           seen: list[int], generated: list[int]) -> tuple[list[int], int]:
    """The tokens this verify emits, and how many of them are accepted drafts.

    logits [k+1, V]: row m is the model's prediction after (last token, drafts 1 … m).
    ``q[m]``: the distribution draft m+1 was drawn from, or None when it was an argmax (a
    one-hot q). Penalties at row m count the drafts before it, as if they had been generated.

    Greedy: accept a draft while it is the model's argmax; then emit the model's argmax.
    Sampling: accept draft d with probability min(1, p(d)/q(d)); at the first rejection emit
    a token drawn from the residual max(p − q, 0), normalised; after k acceptances, a bonus
    token drawn from p. Whatever q is, each emitted token is then distributed exactly as p.
    """
    emitted: list[int] = []
    for m, d in enumerate(drafts):
        before = drafts[:m]
        if params.greedy:
            best = sample_next(logits[m], params, rng, seen + before, generated + before)
            emitted.append(best)
            if best != d:
                return emitted, m
            continue
        p = target_distribution(logits[m], params, seen + before, generated + before)
        q_d = 1.0 if q[m] is None else q[m][d]
        if rng.random() < p[d] / q_d:
            emitted.append(d)
            continue
        residual = p.copy()
        if q[m] is None:
            residual[d] = 0.0
        else:
            residual = np.maximum(p - q[m], 0.0)
        total = residual.sum()
        emitted.append(int(rng.choice(p.size, p=residual / total)) if total > 0 else int(rng.choice(p.size, p=p)))
        return emitted, m
    emitted.append(sample_next(logits[len(drafts)], params, rng, seen + drafts, generated + drafts))
    return emitted, len(drafts)


# ==================================================================== the generation loop


@dataclass
class SpeculativeStats(GenerationStats):
    """GenerationStats plus how the drafts fared."""

    drafted: int = 0  # draft tokens proposed
    accepted: int = 0  # of which the model accepted
    verifies: int = 0  # verify passes (forward passes of the main model after the prefill)

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def tokens_per_verify(self) -> float:
        return (self.generated_tokens - 1) / self.verifies if self.verifies else 0.0


def speculative_generate(
    model: Model,
    head: MtpHead | None,
    prompt_ids,
    params: SamplingParams = SamplingParams(),
    max_new_tokens: int = 128,
    stop_ids=(),
    seed: int | None = None,
    cache: Cache | None = None,
    history=(),
    stats: GenerationStats | None = None,
    *,
    draft_tokens: int = DRAFT_TOKENS,
    draft_vocab: int | str | None = AUTO,
    argmax_drafts: bool = False,
    mtp_cache: MtpCache | None = None,
) -> Iterator[int]:
    """Yield new token ids, as :func:`~minqwen.generate.generate_ids` does, drafting with the MTP head.

    Same arguments, stop rules and cache contract as ``generate_ids`` (the cache ends holding
    the prompt and every yielded token but the last, even when the caller stops early),
    plus: ``draft_tokens`` k drafted per verify; ``draft_vocab`` the leading token ids the
    draft head reads ("auto": see :data:`DRAFT_VOCAB`; None: the whole vocabulary);
    ``argmax_drafts``: draft the head's argmax even when sampling (a one-hot q; by default a
    sampled draft is drawn from the head's distribution under the same sampling options);
    ``mtp_cache``: continue one (its ``end`` must be the cache's position), else a fresh one
    covers this call from the prompt on. ``stats``: a :class:`SpeculativeStats` (the default)
    also counts drafts, acceptances and verifies; a plain ``GenerationStats`` is filled as
    ``generate_ids`` fills it.

    Greedy output equals ``generate_ids``'s; sampled output has the same distribution (not
    the same draws for a seed: the random stream is used differently).
    """
    head = require_head(head)
    check_head_fits(model, head)
    prompt_ids = checked_generation_args(prompt_ids, max_new_tokens, seed, params)
    if not is_whole_number(draft_tokens) or draft_tokens < 1:
        raise MinqwenError(f"draft_tokens (--speculative K) must be a whole number ≥ 1, got {draft_tokens!r}")
    draft_vocab = checked_draft_vocab(draft_vocab)
    cache = cache if cache is not None else model.new_cache()
    if mtp_cache is None:
        mtp_cache = MtpCache(model, head, start=cache.position, rope_delta=cache.rope_delta)
    elif not isinstance(mtp_cache, MtpCache):
        raise MinqwenError(f"mtp_cache must be a minqwen.mtp.MtpCache (or None), got {type(mtp_cache).__name__}")
    else:
        _check_mtp_cache(model, head, mtp_cache)
        if mtp_cache.end != cache.position:
            raise MinqwenError(f"mtp_cache ends at position {mtp_cache.end} but the cache is at {cache.position}")
    # A plain GenerationStats (a caller written for generate_ids) takes the counts it has;
    # SpeculativeStats, the default, adds how the drafts fared.
    stats = SpeculativeStats() if stats is None else checked_stats(stats, GenerationStats)
    rng = np.random.default_rng(seed)
    seen = checked_history(history, model.config.vocab_size) + prompt_ids
    generated: list[int] = []
    stop_ids = checked_stop_ids(stop_ids)
    max_context = model.config.max_position_embeddings

    start = time.perf_counter()
    hidden = model.hidden_states(prompt_ids, cache)  # [T, H]
    token = sample_next(model.logits(hidden[-1:])[0], params, rng, seen, generated)
    mtp_cache.commit(model, head, hidden, prompt_ids[1:] + [token])  # the pairs (h[j], t[j+1]) of the prompt
    stats.prompt_tokens = len(prompt_ids)
    stats.prefill_seconds = time.perf_counter() - start
    decode_start = time.perf_counter()

    # A cycle's products all have few rows. Where Numba's kernels do them (model.numba_multiplies),
    # BLAS is held to one thread for the whole cycle, draft included, so that no OpenBLAS thread
    # is left spinning on a core the verify needs (measured on the 0.8B shape when float32
    # drafts went to a multi-threaded OpenBLAS GEMV: c_verify(2) 1.48–1.65).
    quiet_blas = model.numba_multiplies(1)
    # pending: the tokens to yield next; first_at: the position of the first of them; settle:
    # how to cut the caches back once we know how many of them were yielded.
    # Each pass of the loop: (1) yield what the last cycle emitted, then settle — cut the caches
    # back to what the caller took (it may stop early, so this waits for the yields); (2) run the
    # next cycle: draft, verify, accept. settle takes its cycle's values as default arguments,
    # since the loop's variables move on.
    pending, first_at, settle = [token], cache.position, None
    while True:
        yielded, stop = 0, ""
        try:
            for token in pending:
                generated.append(token)
                seen.append(token)
                yielded += 1
                stats.generated_tokens = len(generated)
                stats.decode_seconds = time.perf_counter() - decode_start
                yield token
                stop = stop_reason(token, stop_ids, len(generated), max_new_tokens, first_at + yielded - 1, max_context)
                if stop:
                    break
        finally:
            if settle is not None:  # also when the caller stops early: cut back to what was yielded
                settle(yielded)
        if stop:
            stats.stop_reason = stop
            return

        # One cycle: draft k, verify k + 1 positions in one pass, accept, roll back.
        fed = cache.position
        k = min(draft_tokens, max_new_tokens - len(generated) - 1, max_context - fed - 1)
        q: list = []  # the distribution each draft was drawn from (None: an argmax)
        pick = _draft_picker(params, rng, seen, generated, argmax_drafts, q)
        with one_blas_thread(quiet_blas):
            drafts = draft(model, head, mtp_cache, k, pick, draft_vocab, seen) if k > 0 else []
            hidden, logits = verify(model, cache, [generated[-1]] + drafts)
        emitted, n_accepted = accept(logits, drafts, q, params, rng, seen, generated)
        if isinstance(stats, SpeculativeStats):
            stats.drafted += len(drafts)
            stats.accepted += n_accepted
            stats.verifies += 1

        def settle(kept, fed=fed, hidden=hidden, emitted=emitted):
            # the cache holds the verify's first `kept` tokens; the MTP head learns their pairs
            keep_first(cache, fed, kept)
            with one_blas_thread(quiet_blas):
                mtp_cache.commit(model, head, hidden[:kept], emitted[:kept])

        pending, first_at = emitted, fed + 1


def _draft_picker(params: SamplingParams, rng, seen, generated, argmax: bool, q: list):
    """pick(logits, step) for :func:`draft`: penalties as if earlier drafts were generated, then
    the argmax (greedy, or ``argmax``) or a draw under the sampling options; each draw's
    distribution is appended to ``q`` (None for an argmax)."""
    drafted: list[int] = []

    def pick(logits, step):
        row = apply_penalties(logits, seen + drafted, generated + drafted, params)
        if params.greedy or argmax:
            q.append(None)
            token = int(np.argmax(row))
        else:
            probs = sampling_distribution(row, params)
            q.append(probs)
            token = int(rng.choice(probs.size, p=probs))
        drafted.append(token)
        return token

    return pick


def draft_cost_estimate(model: Model, head: MtpHead, draft_vocab: int | str | None = AUTO) -> float:
    """Bytes one draft step reads (MTP layer, fc, the draft's LM head rows) ÷ bytes one decode step reads.

    What c_draft would be if both were bound by reading weights — true of big models (the
    0.8B shape: 0.07 with the 32k-row draft vocabulary, 0.36 with all 248k rows); in a tiny
    model, per-call overhead is a large part of both (tools/mtp_figures.py measures them).
    """
    from .summary import experts, resident_bytes, weight_bytes

    c = model.config
    step = resident_bytes(model)
    if model.lm_head is not model.embed_tokens:
        step -= model.embed_tokens.nbytes  # an untied embedding is looked up, not read whole
    total, active, expert_bytes = experts(model)
    step += expert_bytes * active // max(total, 1)  # the experts a token visits
    rows = draft_rows(c.vocab_size, draft_vocab)
    layer_bytes = weight_bytes(*head.layers) // len(head.layers)
    if c.is_moe:
        per_layer_experts = expert_bytes // c.num_hidden_layers
        layer_bytes += per_layer_experts * c.num_experts_per_tok // c.num_experts
    draft = head.fc.nbytes + layer_bytes + rows * model.lm_head.nbytes // c.vocab_size
    return draft / step


def speculative_decoder(head: MtpHead | None, draft_tokens: int = DRAFT_TOKENS, *,
                        draft_vocab: int | str | None = AUTO, argmax_drafts: bool = False):
    """A drop-in for ``generate_ids`` (same positional arguments) that decodes speculatively.

    For ``stream_text(…, decode=speculative_decoder(head, 2))`` and the chat session: each
    call starts a fresh MTP cache at the cache's position.
    """
    head = require_head(head)

    def decode(model, prompt_ids, *args, **kwargs):
        return speculative_generate(model, head, prompt_ids, *args, draft_tokens=draft_tokens,
                                    draft_vocab=draft_vocab, argmax_drafts=argmax_drafts, **kwargs)

    return decode


# ==================================================================== golden taps


def record_mtp(model: Model, head: MtpHead, token_ids, steps=()) -> dict[str, np.ndarray]:
    """The MTP taps (:data:`minqwen.golden.MTP_TAPS`, names ``mtp.…``) of a teacher-forced run over ``token_ids``.

    Layer 0 only, at rotary positions 0 … T−2, over a fresh MTP cache: what a port computes
    when it runs its MTP head over a prompt. ``golden.record(…, mtp_head=head)`` and
    ``minqwen golden record --mtp`` add these to a recording of the main model.
    ``steps``: pairs (h [H], t) of decoding, the main model's output at position T − 1 + n (after
    its final norm) and the token after it; each goes through the same MTP cache at rotary
    position T − 1 + n, as speculative decoding brings the cache up to date, and its taps are
    named ``step{n}.mtp.…``.
    """
    taps: dict[str, np.ndarray] = {}

    def keep(prefix):
        def tap(name, value):
            taps[prefix + "mtp." + name] = np.array(value)
        return tap

    kv = new_mtp_kv(model)
    mtp_logits(model, head, token_ids, tap=keep(""), kv=kv)
    for n, (hidden, token) in enumerate(steps):
        tap = keep(f"step{n}.")
        out = mtp_layer(model, head, 0, np.asarray(hidden)[None], [token], kv, kv.length, tap)  # [1, H]
        tap("logits", model.logits(out))  # [1, V]: predicts the token after ``token``
    return taps
