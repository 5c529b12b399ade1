"""The Qwen3.5 decoder stack: load a checkpoint, run tokens through it, get logits.

A token's path, top to bottom of this file:

    ids ─ embed_tokens ─┬─ for each layer ───────────────────────────────────────────┐
                        │  x += token_mixer(input_layernorm(x))                      │
                        │        (Gated DeltaNet, or gated full attention, per layer) │
                        │  x += mlp(post_attention_layernorm(x))                     │
                        └─────────────────────────────────────────────────────────────┘
                          ─ norm ─ lm_head ─ logits

Everything a later call needs — each attention layer's keys and values, each Gated DeltaNet
layer's conv window and memory, the next position — lives in a :class:`Cache` that the caller
owns, so that prefill-then-decode, rollback (``cache.copy()``) and several conversations at
once are all plain Python.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .attention import AttentionWeights, KVCache, gated_attention
from .checkpoint import Checkpoint
from .config import TextConfig, load_config
from .deltanet import FORMS, DeltaNetState, DeltaNetWeights, gated_deltanet
from .errors import MinqwenError, whole_number_array
from .bf16_dot import check_bf16_dot_available
from .linear import BF16, linear, numba_multiplies, rounding_prompts_to_bf16, widen_bf16
from .mlp import MLPWeights, swiglu_mlp
from .moe import MoEWeights, load_moe, sparse_moe_block
from .norms import rms_norm
from .rope import inverse_frequencies, mrope_cos_sin, text_position_ids, yarn_inverse_frequencies
from .threads import one_blas_thread


@dataclass
class DecoderLayer:
    """One decoder layer's weights, named as in the checkpoint (``layers.{i}.…``)."""

    layer_type: str  # "linear_attention" or "full_attention"
    input_layernorm: np.ndarray  # [H]
    post_attention_layernorm: np.ndarray  # [H]
    mlp: MLPWeights | MoEWeights  # a SwiGLU MLP (qwen3_5), or a sparse MoE block (qwen3_5_moe)
    linear_attn: DeltaNetWeights | None = None
    self_attn: AttentionWeights | None = None


class Cache:
    """The decode state of every layer, plus where the next token goes.

    ``position`` counts the tokens consumed so far. ``rope_delta`` is added to it to get the
    next rotary position (non-zero once images have been placed in the sequence, since an
    image spans fewer positions than tokens). ``stopped_midway`` says why a forward pass
    stopped part-way through the layers (an error, Ctrl-C), or is None: such a cache is
    refused from then on, since its first layers hold that pass's tokens and the others do not.
    """

    def __init__(self, layers: list):
        self.layers = layers  # per layer: DeltaNetState or KVCache
        self.position = 0
        self.rope_delta = 0
        self.stopped_midway: str | None = None

    def copy(self) -> Cache:
        """An independent snapshot: restore it to roll back (a DeltaNet memory cannot be rewound)."""
        new = Cache([layer.copy() for layer in self.layers])
        new.position, new.rope_delta, new.stopped_midway = self.position, self.rope_delta, self.stopped_midway
        return new

    @property
    def nbytes(self) -> int:
        return sum(layer.nbytes for layer in self.layers)


def compute_dtype(dtype) -> np.dtype:
    """``dtype`` if it is one a model computes in — float32, or float64 to check algebra free of
    round-off — else an error naming it (NumPy would read None as float64, and an integer
    model computes nothing but NaN)."""
    try:
        chosen = None if dtype is None else np.dtype(dtype)
    except TypeError:
        chosen = None
    if chosen not in (np.float32, np.float64):
        raise MinqwenError(f"astype takes np.float32 or np.float64 (the dtypes a model computes in), got {dtype!r}")
    return chosen


def converted(weights, dtype):
    """A copy of ``weights`` — an array, a weights dataclass, or a list of either — with every
    array cast to ``dtype``; what ``Model.astype`` and ``MtpHead.astype`` make. Routed experts
    are read from the file into the copy, except FP8 ones: they stay in the file, dequantized to
    float32 when used."""
    if isinstance(weights, np.ndarray):
        return weights.astype(dtype)
    if isinstance(weights, list):
        return [converted(w, dtype) for w in weights]
    if dataclasses.is_dataclass(weights):
        return dataclasses.replace(weights, **{
            f.name: converted(getattr(weights, f.name), dtype) for f in dataclasses.fields(weights)
            if getattr(weights, f.name) is not None and not isinstance(getattr(weights, f.name), str)
        })
    return weights  # an FP8Tensor


class Model:
    """A loaded Qwen3.5 text model. Build one with :func:`load`."""

    def __init__(self, config: TextConfig, embed_tokens, layers, norm, lm_head, load_report=""):
        self.config = config
        self.embed_tokens = embed_tokens  # [V, H]
        self.layers: list[DecoderLayer] = layers
        self.norm = norm  # [H]
        self.lm_head = lm_head  # [V, H]; the same array as embed_tokens when tied
        self.load_report = load_report
        # How Gated DeltaNet layers process several tokens at once: "recurrent" (a compiled
        # loop, fastest on a CPU) or "chunked" (the matmul form); see deltanet.FORMS.
        self.deltanet_form = "recurrent"
        # Whether prompts (16 positions or more) round activations to bf16 for the CPU's bf16
        # dot-product instruction: bf16 weights only, faster, not exact (see bf16_dot.py).
        self.bf16_prompts = False
        if config.yarn is None:
            self.inv_freq = inverse_frequencies(config.rope_theta, config.rotary_dim)  # [R/2]
            self.attention_factor = 1.0
        else:
            self.inv_freq, self.attention_factor = yarn_inverse_frequencies(
                config.rope_theta, config.rotary_dim, config.yarn)

    # ---------------------------------------------------------------- public API

    @property
    def dtype(self) -> np.dtype:
        """The compute dtype: float32, or float64 for a copy made with :meth:`astype`."""
        return self.norm.dtype

    @property
    def weights_dtype(self) -> np.dtype:
        """How the projection matrices are stored in memory: float32, bf16 or float64."""
        return self.embed_tokens.dtype

    @functools.cached_property
    def weight_bytes(self) -> int:
        """Bytes of weights held in memory (see summary.resident_bytes)."""
        from .summary import resident_bytes

        return resident_bytes(self)

    def numba_multiplies(self, n_rows: int) -> bool:
        """Whether a forward over ``n_rows`` positions hands its products to Numba's kernels.

        See :func:`minqwen.linear.numba_multiplies`: few rows of a model too big for the caches
        (bf16 or float32 weights); many rows of bf16 weights with ``bf16_prompts`` or on AMX tiles.
        """
        return numba_multiplies(self.weights_dtype, n_rows, self.weight_bytes, self.bf16_prompts)

    def astype(self, dtype) -> Model:
        """A copy computing in another float dtype — float64 checks algebra free of round-off."""
        dtype = compute_dtype(dtype)
        embed = converted(self.embed_tokens, dtype)
        lm_head = embed if self.lm_head is self.embed_tokens else converted(self.lm_head, dtype)
        return Model(self.config, embed, converted(self.layers, dtype), converted(self.norm, dtype), lm_head,
                     self.load_report)

    def new_cache(self) -> Cache:
        c = self.config
        dtype = self.dtype
        states = []
        for layer in self.layers:
            if layer.layer_type == "linear_attention":
                states.append(
                    DeltaNetState(
                        conv=np.zeros((c.linear_conv_kernel_dim - 1, c.linear_conv_dim), dtype),
                        recurrent=np.zeros(
                            (c.linear_num_value_heads, c.linear_key_head_dim, c.linear_value_head_dim), dtype
                        ),
                    )
                )
            else:
                states.append(KVCache(c.num_key_value_heads, c.head_dim, dtype))
        return Cache(states)

    def forward(
        self,
        token_ids=None,
        cache: Cache | None = None,
        *,
        inputs_embeds: np.ndarray | None = None,
        position_ids: np.ndarray | None = None,
        last_only: bool = False,
        tap=None,
    ) -> np.ndarray:
        """Logits for a run of tokens: [T, vocab] in the compute dtype (float32; float64 in an
        :meth:`astype` copy), or [1, vocab] with ``last_only``.

        ``token_ids``: 1-D ints. Or give ``inputs_embeds`` [T, H] instead (e.g. with image
        features spliced in). Without a cache the run starts fresh; with one it continues from
        it and advances it. ``position_ids`` [3, T] overrides the M-RoPE positions (t, h, w).
        ``tap(name, array)``, if given, is called with every named intermediate (see taps in
        the README); when it is None no intermediate is kept.
        """
        hidden = self.hidden_states(token_ids, cache, inputs_embeds=inputs_embeds, position_ids=position_ids, tap=tap)
        if last_only:
            hidden = hidden[-1:]
        logits = self.logits(hidden)
        if tap is not None:
            tap("logits", logits)
        return logits

    def hidden_states(self, token_ids=None, cache=None, *, inputs_embeds=None, position_ids=None, tap=None):
        """The decoder stack: embeddings → layers → final norm, [T, H] in the compute dtype."""
        if tap is not None and not callable(tap):
            raise MinqwenError(f"tap must be a function tap(name, array) or None, got {type(tap).__name__}")
        if self.deltanet_form not in FORMS:
            raise MinqwenError(f"model.deltanet_form must be one of {', '.join(FORMS)}, got {self.deltanet_form!r}")
        if self.bf16_prompts:
            self._check_bf16_prompts()
        if cache is not None:
            self._check_cache(cache)
        if (token_ids is None) == (inputs_embeds is None):
            raise MinqwenError("give exactly one of token_ids or inputs_embeds")
        x = self.embed(token_ids) if inputs_embeds is None else self._checked_inputs_embeds(inputs_embeds)  # [T, H]
        t_len = x.shape[0]
        cache = cache if cache is not None else self.new_cache()
        c = self.config
        if cache.position + t_len > c.max_position_embeddings:
            raise MinqwenError(
                f"the sequence would reach {cache.position + t_len} tokens, beyond the model's context of "
                f"{c.max_position_embeddings} (config max_position_embeddings)"
            )
        if position_ids is None:  # [3, T]: rows t, h, w, all equal for text
            position_ids = text_position_ids(cache.position + cache.rope_delta, t_len)
        else:
            position_ids = _checked_position_ids(position_ids, t_len)
        # R = config.rotary_dim, the rotated leading dims of each attention head; computed once, shared by every layer
        cos, sin = mrope_cos_sin(position_ids, self.inv_freq, c.mrope_section, self.attention_factor,
                                 self.dtype)  # [T, R] each
        if tap is not None:
            tap("embed", x)

        # BLAS steps aside while Numba's parallel kernels do the matmuls (see one_blas_thread).
        # Neither block changes the math on the default path (bf16_prompts off), only which threads
        # do it: read the loop below as plain Python.
        with one_blas_thread(self.numba_multiplies(t_len)), rounding_prompts_to_bf16(self.bf16_prompts):
            for i, (layer, state) in enumerate(zip(self.layers, cache.layers)):
                layer_tap = None if tap is None else prefixed(tap, f"layers.{i}.")
                try:
                    x = self.decoder_layer(x, layer, state, cos, sin, layer_tap)
                except BaseException as e:  # the layers before i took these tokens in: mark the cache
                    cache.stopped_midway = f"{type(e).__name__} in layer {i} of {len(self.layers)}"
                    raise

        cache.position += t_len
        x = rms_norm(x, self.norm, c.rms_norm_eps)
        if tap is not None:
            tap("norm", x)
        return x

    def _check_bf16_prompts(self) -> None:
        if self.weights_dtype != BF16:
            raise MinqwenError("bf16_prompts needs weights kept in bf16: load the model with dtype='bfloat16'")
        check_bf16_dot_available()

    def _check_cache(self, cache) -> None:
        """A cache made by another model would pair its states with the wrong layers, or with
        fewer of them (the forward would run short without a word), or have other widths."""
        if not isinstance(cache, Cache):
            raise MinqwenError(f"cache must be a minqwen Cache (model.new_cache()), got {type(cache).__name__}")
        if cache.stopped_midway:
            raise MinqwenError(f"this cache was left part-way through a forward pass ({cache.stopped_midway}): its "
                               "first layers hold that call's tokens and the others do not, so it would give wrong "
                               "results. Start a new one (model.new_cache()), or go back to a copy taken before "
                               "(cache.copy())")
        if [_state_shape(state) for state in cache.layers] != self._state_shapes:
            raise MinqwenError(f"this cache holds {len(cache.layers)} layer states that do not match the model's "
                               f"{len(self.layers)} layers (their kinds, config layer_types, or their sizes): "
                               "make it with this model's new_cache()")

    @functools.cached_property
    def _state_shapes(self) -> list[tuple]:
        return [_state_shape(state) for state in self.new_cache().layers]

    def score(self, token_ids) -> np.ndarray:
        """log p(ids[t] | ids[:t]) for t = 1 … T−1, in nats (see scoring.py); at least two ids."""
        from .scoring import log_probs

        return log_probs(self, token_ids)

    def logits(self, hidden: np.ndarray) -> np.ndarray:
        """The LM head: hidden [T, H] → logits [T, V]."""
        with one_blas_thread(self.numba_multiplies(hidden.shape[0])), rounding_prompts_to_bf16(self.bf16_prompts):
            return linear(hidden, self.lm_head)

    # ---------------------------------------------------------------- the layers

    def embed(self, token_ids) -> np.ndarray:
        """The rows of ``embed_tokens`` for token_ids [T] → [T, H], in the compute dtype (bf16 widens exactly)."""
        rows = self.embed_tokens[self.checked_token_ids(token_ids)]  # [T, H]
        return widen_bf16(rows) if rows.dtype == BF16 else rows

    def checked_token_ids(self, token_ids) -> np.ndarray:
        """``token_ids`` as a 1-D integer array, every id inside the vocabulary."""
        ids = whole_number_array(token_ids)
        if ids is None:
            raise MinqwenError(f"token_ids must be integers that fit in int64 (a 1-D sequence of them), "
                               f"got {token_ids!r:.80}")
        if ids.ndim != 1 or ids.size == 0:
            raise MinqwenError(f"token_ids must be a non-empty 1-D sequence of ints, got shape {list(ids.shape)}")
        bad = ids[(ids < 0) | (ids >= self.config.vocab_size)]
        if bad.size:
            raise MinqwenError(
                f"token id {int(bad[0])} is outside the vocabulary (0 … {self.config.vocab_size - 1})"
            )
        return ids

    def _checked_inputs_embeds(self, inputs_embeds) -> np.ndarray:
        try:
            given = np.asarray(inputs_embeds)
            if given.dtype.kind in "OcUSmM":  # None would become NaN, a complex number lose its imaginary part
                raise MinqwenError(f"inputs_embeds must be an array of real numbers, got dtype {given.dtype}")
            with np.errstate(over="ignore"):  # a value past float32 becomes inf: refused below
                x = given.astype(self.dtype, copy=False)
        except (TypeError, ValueError):
            raise MinqwenError(f"inputs_embeds must be an array of numbers, got {type(inputs_embeds).__name__}") from None
        if x.ndim != 2 or x.shape[1] != self.config.hidden_size or x.shape[0] == 0:
            raise MinqwenError(f"inputs_embeds must have shape [T ≥ 1, {self.config.hidden_size}], got {list(x.shape)}")
        if not np.isfinite(x).all():  # every logit would be NaN
            raise MinqwenError(f"inputs_embeds holds NaN or infinite values (in {np.dtype(self.dtype).name}, "
                               f"the model's compute dtype)")
        return x

    def decoder_layer(self, x, layer: DecoderLayer, state, cos, sin, tap):
        """One pre-norm residual block, x [T, H] → [T, H]: x += token_mixer(norm(x)); x += mlp(norm(x)).

        The token mixer is ``linear_attn`` (Gated DeltaNet, state: its DeltaNetState) or
        ``self_attn`` (gated attention, state: its KVCache), as config.layer_types says; the
        MLP is SwiGLU or the sparse MoE block. ``cos``, ``sin`` [T, R] serve attention only.
        """
        c = self.config
        h = rms_norm(x, layer.input_layernorm, c.rms_norm_eps)  # [T, H]
        if tap is not None:
            tap("input_layernorm", h)
        if layer.layer_type == "linear_attention":
            mixed = gated_deltanet(
                h, layer.linear_attn, state,
                c.linear_num_key_heads, c.linear_num_value_heads, c.linear_key_head_dim, c.linear_value_head_dim,
                c.hidden_act, c.rms_norm_eps, tap, self.deltanet_form,
            )
        else:
            mixed = gated_attention(
                h, layer.self_attn, state, cos, sin,
                c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.rms_norm_eps, tap,
            )
        if tap is not None:
            tap("token_mixer", mixed)  # [T, H]
        x = x + mixed
        h = rms_norm(x, layer.post_attention_layernorm, c.rms_norm_eps)  # [T, H]
        if tap is not None:
            tap("post_attention_layernorm", h)
        if isinstance(layer.mlp, MoEWeights):
            out = sparse_moe_block(h, layer.mlp, c.num_experts_per_tok, c.hidden_act, tap)
        else:
            out = swiglu_mlp(h, layer.mlp, c.hidden_act)
        if tap is not None:
            tap("mlp", out)  # [T, H]
        x = x + out
        if tap is not None:
            tap("output", x)
        return x


def _checked_position_ids(position_ids, t_len: int) -> np.ndarray:
    """Explicit M-RoPE positions as an integer array [3, T]. A position that is not a whole
    number — None, NaN, a string — would give NaN angles (every logit NaN) or a numpy error."""
    expected = f"shape [3, {t_len}] (rows t, h, w; one column per token) of whole numbers"
    try:
        ids = np.asarray(position_ids)
    except (TypeError, ValueError):  # rows of different lengths
        raise MinqwenError(f"position_ids must have {expected}; got rows of different lengths") from None
    if ids.shape != (3, t_len):
        raise MinqwenError(f"position_ids must have {expected}, got shape {list(ids.shape)}")
    if ids.dtype.kind not in "iu":  # (not bool, nor timedelta64, which NumPy counts as integers)
        raise MinqwenError(f"position_ids must have {expected}: an integer array, got dtype {ids.dtype}")
    return ids


def _state_shape(state) -> tuple:
    """What a layer's decode state must match: its kind and sizes (not its length so far)."""
    if isinstance(state, DeltaNetState):
        return "linear_attention", state.conv.shape, state.recurrent.shape
    if isinstance(state, KVCache):
        return "full_attention", state.keys.shape[0], state.keys.shape[2]  # Hkv, D
    return (type(state).__name__,)  # not a decode state at all: matches nothing


def prefixed(tap, prefix):
    """The tap a layer is handed: its names get the layer's prefix (``layers.3.`` + ``mlp``)."""
    return lambda name, value: tap(prefix + name, value)


# ==================================================================== loading


def load(path: str | Path, progress=None, dtype: str = "float32", bf16_prompts: bool = False) -> Model:
    """Load a Qwen3.5 checkpoint folder (config.json + safetensors) into a :class:`Model`.

    ``dtype``: how the projection matrices are kept in memory. "float32" (default) widens
    them on load. "bfloat16" keeps them as bf16 — half the memory and half the bytes per
    decode step — and widens inside the matmul kernels, accumulating in float32: exact for a
    bf16 checkpoint, a rounding of the weights for an fp32 or fp16 one. Norms, decay
    parameters, biases and every activation stay float32 in both modes; an MoE model's routed
    experts stay memory-mapped as stored in both.
    ``bf16_prompts`` (with "bfloat16" only, on a CPU with AVX512-BF16): products of 16 rows
    or more — a prompt's layers, and the LM head over many positions (:meth:`Model.score`) —
    round their activations to bf16 and multiply them with the CPU's bf16 dot-product
    instruction: about twice as fast a prefill, no longer exact (a relative rounding of up
    to 2⁻⁸ on each activation, as llama.cpp makes for bf16 weights). Decode steps and
    speculative verifies multiply exactly, over the cache the rounded prompt left. It sets
    ``model.bf16_prompts``; see bf16_dot.py.
    ``progress(done_bytes, total_bytes)``, if given, is called after each tensor is read.
    """
    if dtype not in ("float32", "bfloat16"):
        raise MinqwenError(f"dtype must be 'float32' or 'bfloat16', got {dtype!r}")
    if not isinstance(bf16_prompts, bool):
        raise MinqwenError(f"bf16_prompts must be True or False, got {bf16_prompts!r}")
    if progress is not None and not callable(progress):
        raise MinqwenError(f"progress must be a function progress(done_bytes, total_bytes) or None, "
                           f"got {type(progress).__name__}")
    if bf16_prompts:
        if dtype != "bfloat16":
            raise MinqwenError("bf16_prompts needs weights kept in bf16: load with dtype='bfloat16' too")
        check_bf16_dot_available()
    if not isinstance(path, (str, os.PathLike)):
        raise MinqwenError(f"load takes the path of a checkpoint folder, got {type(path).__name__}")
    path = Path(path)
    if not path.is_dir():
        raise MinqwenError(f"{path}: not a folder (a checkpoint is a folder with config.json and *.safetensors)")
    config = load_config(path)
    # An FP8 checkpoint's weights are dequantized as they are read, with the config's block size.
    ckpt = Checkpoint(path, fp8_block=config.quantization.weight_block_size if config.quantization else None)
    reader = TensorReader(ckpt, progress, dtype)
    c = config

    H = c.hidden_size
    embed_name = reader.prefix + "embed_tokens.weight"
    if c.tie_word_embeddings and embed_name not in ckpt and "lm_head.weight" in ckpt:
        embed_name = "lm_head.weight"  # tied, and only the head is stored: transformers ties to it
    embed = reader.matrix_top(embed_name, (c.vocab_size, H))
    layers = []
    for i, kind in enumerate(c.layer_types):
        p = f"layers.{i}."
        mlp = load_mlp(reader, p + "mlp.", c)
        layer = DecoderLayer(
            layer_type=kind,
            input_layernorm=reader.take(p + "input_layernorm.weight", (H,)),
            post_attention_layernorm=reader.take(p + "post_attention_layernorm.weight", (H,)),
            mlp=mlp,
        )
        if kind == "linear_attention":
            layer.linear_attn = _load_deltanet(reader, p + "linear_attn.", c)
        else:
            layer.self_attn = load_attention(reader, p + "self_attn.", c)
        layers.append(layer)
    norm = reader.take("norm.weight", (H,))
    head_stored = "lm_head.weight" in ckpt and embed_name != "lm_head.weight"
    if c.tie_word_embeddings and not head_stored:
        lm_head = embed
    else:
        lm_head = reader.matrix_top("lm_head.weight", (c.vocab_size, H))
        # Tied in the config, yet both stored: transformers 5.23.0 ties them only if they are equal
        if c.tie_word_embeddings and np.array_equal(lm_head, embed):
            lm_head = embed
        elif c.tie_word_embeddings:
            warnings.warn(f"{path}: the config ties the LM head to the embedding (tie_word_embeddings), but the "
                          "checkpoint stores an lm_head.weight with other values; using it, as transformers does. "
                          "Set tie_word_embeddings to false in config.json to silence this warning", stacklevel=2)
    if progress is not None:
        progress(reader.total_bytes, reader.total_bytes)
    stray = reader.not_part_of_the_model()
    if stray:  # as transformers warns of a checkpoint's unexpected keys: the weights may not be this config's
        warnings.warn(f"{path}: {len(stray)} tensors of the checkpoint are not part of the model its config.json "
                      f"describes and were not used: {_first_names(stray)}. Do config.json and the weights "
                      f"belong together? (`minqwen inspect` shows the load report)", stacklevel=2)
    model = Model(config, embed, layers, norm, lm_head, load_report=reader.report())
    model.bf16_prompts = bf16_prompts
    return model


def _load_deltanet(reader, p, c: TextConfig) -> DeltaNetWeights:
    H, Hv = c.hidden_size, c.linear_num_value_heads
    conv = reader.take(p + "conv1d.weight", (c.linear_conv_dim, 1, c.linear_conv_kernel_dim))
    return DeltaNetWeights(
        in_proj_qkv=reader.matrix(p + "in_proj_qkv.weight", (c.linear_conv_dim, H)),
        in_proj_z=reader.matrix(p + "in_proj_z.weight", (c.linear_value_dim, H)),
        in_proj_b=reader.matrix(p + "in_proj_b.weight", (Hv, H)),
        in_proj_a=reader.matrix(p + "in_proj_a.weight", (Hv, H)),
        # [conv_dim, K], laid out tap after tap (a [K, conv_dim] array in memory, transposed): the
        # order the conv kernel reads, so that a decode step need not copy it each time.
        conv1d=np.ascontiguousarray(conv[:, 0, :].T).T,
        A_log=reader.take(p + "A_log", (Hv,)),
        dt_bias=reader.take(p + "dt_bias", (Hv,)),
        norm=reader.take(p + "norm.weight", (c.linear_value_head_dim,)),
        out_proj=reader.matrix(p + "out_proj.weight", (H, c.linear_value_dim)),
    )


def load_mlp(reader, p, c):
    """A layer's MLP under prefix ``p``: SwiGLU, or (qwen3_5_moe, every layer) the sparse MoE
    block, whose experts stay memory-mapped."""
    if c.is_moe:
        return load_moe(reader, p, c)
    H, inter = c.hidden_size, c.intermediate_size
    return MLPWeights(
        gate_proj=reader.matrix(p + "gate_proj.weight", (inter, H)),
        up_proj=reader.matrix(p + "up_proj.weight", (inter, H)),
        down_proj=reader.matrix(p + "down_proj.weight", (H, inter)),
    )


def load_attention(reader, p, c: TextConfig) -> AttentionWeights:
    """A full-attention layer's weights under prefix ``p`` (``…self_attn.``), every shape checked."""
    H, D, Hq, Hkv = c.hidden_size, c.head_dim, c.num_attention_heads, c.num_key_value_heads
    w = AttentionWeights(
        q_proj=reader.matrix(p + "q_proj.weight", (Hq * 2 * D, H)),
        k_proj=reader.matrix(p + "k_proj.weight", (Hkv * D, H)),
        v_proj=reader.matrix(p + "v_proj.weight", (Hkv * D, H)),
        o_proj=reader.matrix(p + "o_proj.weight", (H, Hq * D)),
        q_norm=reader.take(p + "q_norm.weight", (D,)),
        k_norm=reader.take(p + "k_norm.weight", (D,)),
    )
    if c.attention_bias:
        w.q_proj_bias = reader.take(p + "q_proj.bias", (Hq * 2 * D,))
        w.k_proj_bias = reader.take(p + "k_proj.bias", (Hkv * D,))
        w.v_proj_bias = reader.take(p + "v_proj.bias", (Hkv * D,))
        w.o_proj_bias = reader.take(p + "o_proj.bias", (H,))
    return w


# Checkpoint name prefixes of the parts the text model leaves to other loaders, for the load
# report: what each part is, and what becomes of it.
DEFERRED_PARTS = {
    "model.visual.": ("vision tower", "not in the text model: minqwen.vision.load_vision loads them"),
    "mtp.": ("MTP head", "not in the text model: minqwen.mtp.load_mtp loads them"),
}


class TensorReader:
    """Reads the text model's tensors under the right prefix and remembers which were used."""

    def __init__(self, ckpt: Checkpoint, progress=None, matrix_dtype: str = "float32"):
        self.ckpt = ckpt
        self.matrix_dtype = matrix_dtype
        self.progress = progress
        self.done_bytes = 0
        self.total_bytes = sum(f.data_len for f in ckpt.files.values())
        names = ckpt.names
        # Multimodal releases nest the text model under model.language_model.; text-only saves use model.
        if any(n.startswith("model.language_model.") for n in names):
            self.prefix = "model.language_model."
        else:
            self.prefix = "model."
        self.used: set[str] = set()

    def take(self, name, shape):
        """A float32 tensor by its name under the text model's prefix (``model.`` or ``model.language_model.``)."""
        return self.take_top(self.prefix + name, shape)

    def matrix(self, name, shape):
        """A projection matrix, kept in the load's matrix dtype (float32 or bf16)."""
        return self.matrix_top(self.prefix + name, shape)

    def matrix_top(self, full_name, shape):
        """:meth:`matrix` by the tensor's full checkpoint name (no prefix added)."""
        return self.take_top(full_name, shape, bf16=self.matrix_dtype == "bfloat16")

    def take_top(self, full_name, shape, bf16=False):
        """A tensor by its full checkpoint name (no prefix added), counted as used and as progress."""
        array = self.ckpt.bfloat16(full_name, shape) if bf16 else self.ckpt.float32(full_name, shape)
        self.mark_used(full_name)
        if self.progress is not None:
            self.done_bytes += self.ckpt.raw(full_name).nbytes
            self.progress(self.done_bytes, self.total_bytes)
        return array

    def mark_used(self, full_name):
        """Count a (checked, read) tensor as part of the model — with its block scales, if it is FP8."""
        self.used.add(full_name)
        scale = self.ckpt.fp8_scale_name(full_name)
        if scale is not None:
            self.used.add(scale)

    def not_part_of_the_model(self) -> list[str]:
        """The checkpoint's tensors that no part of the model reads, vision tower and MTP head aside."""
        return sorted(n for n in self.ckpt.names
                      if n not in self.used and not any(n.startswith(p) for p in DEFERRED_PARTS))

    def report(self) -> str:
        """One line per group of unused tensors: deferred parts by name, anything else listed."""
        unused = [n for n in self.ckpt.names if n not in self.used]
        lines = []
        for prefix, (part, fate) in DEFERRED_PARTS.items():
            group = [n for n in unused if n.startswith(prefix)]
            if group:
                lines.append(f"{part}: {len(group)} tensors ({fate})")
        other = self.not_part_of_the_model()
        if other:
            lines.append(f"unused: {len(other)} tensors not part of the model: {_first_names(other)}")
        return "\n".join(lines)


def _first_names(names: list[str]) -> str:
    return ", ".join(names[:10]) + (f", … ({len(names) - 10} more)" if len(names) > 10 else "")
