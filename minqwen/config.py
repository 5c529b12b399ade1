"""config.json → one frozen dataclass, every field validated once, here.

Qwen3.5 checkpoints come in two wrappers:

* ``model_type: "qwen3_5"`` — the multimodal release. The text model's fields live in
  ``text_config``; the vision tower's in ``vision_config``; tying of the LM head is read from
  the *top level* ``tie_word_embeddings`` (absent there means untied, whatever
  ``text_config`` says — this is what transformers 5.23.0 does).
* ``model_type: "qwen3_5_text"`` — a text-only model as transformers saves it.

and the sparse mixture-of-experts members (35B-A3B and larger) come in the same two, as
``qwen3_5_moe`` (text model in ``text_config``, ``model_type: "qwen3_5_moe_text"``) and
``qwen3_5_moe_text``. Their text config is the dense one with the SwiGLU MLP of every layer
replaced by a sparse MoE block: no ``intermediate_size``, four expert sizes instead
(:data:`MOE_FIELDS`), and a few different defaults. One :class:`TextConfig` holds both: a
dense model simply has ``num_experts == 0``.

Every field transformers 5.23.0 knows for the text model is listed in :data:`TEXT_FIELDS`
(for MoE models :data:`MOE_TEXT_FIELDS`) with what minqwen does with it. Fields outside the
table are reported with a warning, never silently dropped; a value minqwen cannot honour (a
rope type it does not implement, an activation it does not know, dense layers in an MoE
model) is a :class:`~minqwen.errors.MinqwenError`.

``quantization_config`` sits at the top level of config.json in every wrapper. Block-scaled
FP8 (:class:`FP8Quantization`, Qwen's "-FP8" releases) is read — its weights are dequantized on
load, see checkpoint.py; any other method (GPTQ, AWQ, bitsandbytes, compressed-tensors, static
FP8, …) is an error that says what to use instead.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from .activations import ACTIVATIONS
from .errors import MinqwenError, is_finite_number
from .rope import inverse_frequencies, yarn_inverse_frequencies, yarn_mscale

# What minqwen does with each text-config field. "honoured": read and used exactly as the
# reference uses it. "defaulted": read, with the reference's default when absent.
# "ignored": the reference's forward pass never reads it either. "metadata": describes the
# file, not the math.
TEXT_FIELDS: dict[str, str] = {
    "vocab_size": "honoured (default 248320)",
    "hidden_size": "honoured (default 4096)",
    "intermediate_size": "honoured (default 12288): the SwiGLU MLP width",
    "num_hidden_layers": "honoured (default 32)",
    "num_attention_heads": "honoured (default 16)",
    "num_key_value_heads": "honoured (default 4): grouped-query attention",
    "head_dim": "honoured (default 256)",
    "hidden_act": "honoured (default silu): the MLP activation and the Gated DeltaNet conv activation",
    "max_position_embeddings": "honoured (default 32768): a prompt beyond it is an error",
    "rms_norm_eps": "honoured (default 1e-6)",
    "tie_word_embeddings": "honoured (default false); in the qwen3_5 wrapper the top-level value wins",
    "attention_bias": "honoured (default false): biases on q_proj, k_proj, v_proj and o_proj",
    "linear_conv_kernel_dim": "honoured (default 4)",
    "linear_key_head_dim": "honoured (default 128)",
    "linear_value_head_dim": "honoured (default 128)",
    "linear_num_key_heads": "honoured (default 16)",
    "linear_num_value_heads": "honoured (default 32): must be a multiple of linear_num_key_heads",
    "layer_types": "honoured; derived from full_attention_interval when absent; the legacy names 'mamba' and "
                   "'attention' read as linear_attention and full_attention, as in transformers",
    "full_attention_interval": "honoured (default 4) when layer_types is absent",
    "rope_parameters": "honoured: rope_type ('default' or 'yarn' with all its fields), rope_theta, "
                       "partial_rotary_factor, mrope_section; mrope_interleaved ignored (always interleaved)",
    "rope_scaling": "honoured as the legacy name of rope_parameters; read instead of it when both are present, "
                    "as transformers does",
    "rope_theta": "defaulted (10000) when rope_parameters has none (legacy top-level field)",
    "partial_rotary_factor": "defaulted (0.25) when rope_parameters has none (legacy top-level field); a null "
                             "rotates the whole head, as in transformers",
    "original_max_position_embeddings": "honoured with YaRN: wins over rope_parameters', as in transformers",
    "eos_token_id": "honoured by generation (stop ids)",
    "bos_token_id": "metadata",
    "pad_token_id": "ignored: minqwen never pads",
    "attention_dropout": "ignored: inference only",
    "initializer_range": "ignored: training only",
    "use_cache": "ignored: minqwen always offers a cache",
    "attn_output_gate": "ignored as the reference ignores it: the output gate is always on",
    "mamba_ssm_dtype": "ignored as the reference ignores it: the Gated DeltaNet state is float32 whatever it says "
                       "(Qwen3.5's released configs set it to float32)",
    "mlp_only_layers": "ignored as the reference ignores it (released configs have []): every layer of a dense "
                       "model has the SwiGLU MLP already; in an MoE model see MOE_FIELDS",
    "mtp_num_hidden_layers": "honoured by minqwen.mtp.load_mtp: checked against the mtp.layers.{i}.* tensors",
    "mtp_use_dedicated_embeddings": "honoured by minqwen.mtp.load_mtp: must be false (the head shares embed_tokens)",
    "dtype": "metadata: weights are read in their stored dtype and computed in fp32",
    "torch_dtype": "metadata (legacy name of dtype)",
    "model_type": "metadata: must be qwen3_5_text inside text_config",
    "architectures": "metadata",
    "transformers_version": "metadata",
    "output_attentions": "ignored",
    "output_hidden_states": "ignored",
    "return_dict": "ignored",
    "keys_to_ignore_at_inference": "ignored",
    "layer_scan": "ignored",
    "quantization_config": "honoured at the top level of config.json: FP8 (quant_method fp8, fmt e4m3, dynamic "
                           "activations, weight_block_size) is dequantized on load; any other method is an error",
}

# The MoE text config (``qwen3_5_moe_text``): the dense table, with these fields added or changed.
# transformers 5.23.0 makes *every* layer of a qwen3_5_moe model a sparse MoE block and always
# renormalises the k routing weights. Three fields that its relative Qwen3-Next reads to do
# otherwise (dense layers in between, unnormalised weights) are declared and then deleted by
# the qwen3_5_moe config: the reference never reads them. A value that asks for that other
# model is an error here, since neither transformers nor minqwen would build what it means.
MOE_FIELDS: dict[str, str] = {
    "num_experts": "honoured (default 256): routed experts per layer",
    "num_experts_per_tok": "honoured (default 8): experts each token is routed to (top-k), 1 ≤ k ≤ num_experts",
    "moe_intermediate_size": "honoured (default 512): the SwiGLU width of each routed expert",
    "shared_expert_intermediate_size": "honoured (default 512): the SwiGLU width of the shared expert",
    "output_router_logits": "ignored: training only (returns router logits for the load-balancing loss)",
    "router_aux_loss_coef": "ignored: training only (the weight of the load-balancing loss)",
    "intermediate_size": "ignored: a qwen3_5_moe model has no dense MLP; the reference's MoE text model never reads it",
    "hidden_size": "honoured (default 2048 in qwen3_5_moe_text)",
    "num_hidden_layers": "honoured (default 40 in qwen3_5_moe_text)",
    "num_key_value_heads": "honoured (default 2 in qwen3_5_moe_text): grouped-query attention",
    "mlp_only_layers": "honoured only when empty: every layer is MoE in the reference; naming dense layers is an error",
    "decoder_sparse_step": "honoured only as 1: every layer is MoE in the reference; another step is an error",
    "norm_topk_prob": "honoured only as true: the reference always renormalises the k weights; false is an error",
    "model_type": "metadata: must be qwen3_5_moe_text inside text_config",
}
MOE_TEXT_FIELDS: dict[str, str] = {**TEXT_FIELDS, **MOE_FIELDS}
# Values of the Qwen3-Next fields that describe the model transformers 5.23.0 builds anyway.
MOE_ALWAYS = {"mlp_only_layers": [], "decoder_sparse_step": 1, "norm_topk_prob": True}

# Fields every transformers config may carry, about tasks or training rather than this model.
GENERIC_FIELDS = (
    "is_encoder_decoder", "is_decoder", "add_cross_attention", "cross_attention_hidden_size",
    "tie_encoder_decoder", "chunk_size_feed_forward", "problem_type", "id2label", "label2id",
    "pruned_heads", "finetuning_task", "task_specific_params", "tokenizer_class", "prefix",
    "sep_token_id", "decoder_start_token_id", "torchscript", "use_bfloat16", "tf_legacy_loss",
    "output_scores", "return_dict_in_generate", "_name_or_path", "_attn_implementation_autoset",
)
TEXT_FIELDS.update({name: "ignored: a generic transformers field" for name in GENERIC_FIELDS})
MOE_TEXT_FIELDS.update({name: "ignored: a generic transformers field" for name in GENERIC_FIELDS})

# Fields of the multimodal wrapper (``model_type: qwen3_5``, or ``qwen3_5_moe``) outside text_config.
WRAPPER_FIELDS: dict[str, str] = {
    "text_config": "honoured: the text model's fields (TEXT_FIELDS)",
    "vision_config": "honoured by minqwen.vision.load_vision, which loads the vision tower (its fields: "
                     "vision.VISION_FIELDS); the text model does not read it",
    "tie_word_embeddings": "honoured: decides tying for the whole model (absent → untied)",
    "image_token_id": "honoured by minqwen.vision (default 248056): each <|image_pad|> is expanded to one token "
                      "per merged patch, its embedding replaced by an image feature and given a 3-D position",
    "video_token_id": "honoured by minqwen.vision (default 248057): a prompt holding it is refused "
                      "(minqwen reads images, not videos)",
    "vision_start_token_id": "honoured by minqwen.vision (default 248053): ChatSession writes it before each "
                             "image's <|image_pad|>",
    "vision_end_token_id": "honoured by minqwen.vision (default 248054): ChatSession writes it after each "
                           "image's <|image_pad|>",
    "model_type": "metadata",
    "architectures": "metadata",
    "transformers_version": "metadata",
    "dtype": "metadata",
    "torch_dtype": "metadata",
    "eos_token_id": "honoured: wins over text_config's, as transformers' generation reads it",
    "bos_token_id": "metadata",
    "pad_token_id": "ignored",
    "use_cache": "ignored",
    "output_attentions": "ignored",
    "output_hidden_states": "ignored",
    "return_dict": "ignored",
    "quantization_config": "honoured: see TEXT_FIELDS (it lives here, at the top level, in the wrapper too)",
    **{name: "ignored: a generic transformers field" for name in GENERIC_FIELDS},
}

ROPE_FIELDS = {"rope_type", "type", "rope_theta", "partial_rotary_factor", "mrope_section", "mrope_interleaved"}
YARN_FIELDS = {"factor", "original_max_position_embeddings", "attention_factor", "beta_fast", "beta_slow",
               "mscale", "mscale_all_dim", "truncate"}


@dataclass(frozen=True)
class YarnScaling:
    """``rope_type: yarn`` (Peng et al., 2023): stretch the slow rotary frequencies by ``factor``.

    Field names and defaults are transformers 5.23.0's: ``original_max_position_embeddings``
    defaults to max_position_embeddings, ``beta_fast``/``beta_slow`` to 32/1, ``truncate`` to
    true; ``attention_factor`` absent means "derive it from factor, mscale, mscale_all_dim".
    """

    factor: float
    original_max_position_embeddings: int
    attention_factor: float | None = None
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float | None = None
    mscale_all_dim: float | None = None
    truncate: bool = True


@dataclass(frozen=True)
class FP8Quantization:
    """``quantization_config`` of an FP8 checkpoint (Qwen's "-FP8" releases), validated.

    Weights stored F8_E4M3 carry one scale per ``weight_block_size`` = [b0, b1] block (rows ×
    columns); activations are not quantized at all ("dynamic" means: quantized on the fly by
    FP8 kernels, which a CPU does not have), so dequantizing the weights on load gives the
    model the reference computes on a CPU. ``modules_to_not_convert`` is only shown by
    ``minqwen inspect``: what is FP8 and what is not is read from each tensor's stored dtype.
    """

    weight_block_size: tuple[int, int] = (128, 128)
    modules_to_not_convert: tuple[str, ...] = ()


# Every quantization_config field transformers 5.23.0's FP8 config reads (FineGrainedFP8Config), and Qwen's
# own ``fmt``, which transformers does not read: what minqwen does with each.
FP8_FIELDS: dict[str, str] = {
    "quant_method": "must be 'fp8' (other methods are errors, see OTHER_QUANTIZATION)",
    "fmt": "must be 'e4m3' (default): the F8_E4M3 storage format",
    "activation_scheme": "must be 'dynamic' (default); 'static' stores activation scales minqwen does not apply",
    "weight_block_size": "honoured (default [128, 128]): the scale grid; null (one scale per tensor) is an error",
    "modules_to_not_convert": "metadata: each tensor's stored dtype says whether it is FP8",
    "ignored_layers": "metadata: another name of modules_to_not_convert",
    "dequantize": "ignored: a loading option of transformers (minqwen always dequantizes)",
    "modules_to_convert": "must be empty: FP8 embedding tables are not read",
    "scale_fmt": "must be 'float' (default): the scales are float tensors ('ue8m0' byte exponents are an error)",
    "expert_dtype": "must be 'fp8' (default): FP4-packed experts are an error",
}
# What the quantization methods minqwen does not read are, for the error message.
OTHER_QUANTIZATION: dict[str, str] = {
    "gptq": "4-bit integer weights in groups (GPTQ)",
    "awq": "4-bit integer weights in groups (AWQ)",
    "bitsandbytes": "bitsandbytes 8-bit or 4-bit (NF4) weights",
    "compressed-tensors": "llm-compressor's packed integer or float formats",
    "fbgemm_fp8": "FP8 with per-row scales (FBGEMM)",
    "torchao": "torchao's quantized tensor subclasses",
    "hqq": "half-quadratic quantization",
    "gguf": "GGUF quantized blocks",
    "mxfp4": "MXFP4 4-bit float weights",
}
LAYER_TYPES = ("linear_attention", "full_attention")
# Older names transformers 5.23.0 still reads (remap_legacy_layer_types), for configs written before them.
LEGACY_LAYER_TYPES = {"mamba": "linear_attention", "attention": "full_attention"}
MAX_LAYERS = 10_000  # a sanity bound: a config claiming more is a typo, not a model


@dataclass(frozen=True)
class TextConfig:
    """The Qwen3.5 text model's hyper-parameters, validated. Names are config.json's."""

    vocab_size: int = 248320
    hidden_size: int = 4096
    intermediate_size: int = 12288
    num_hidden_layers: int = 32
    num_attention_heads: int = 16
    num_key_value_heads: int = 4
    head_dim: int = 256
    hidden_act: str = "silu"
    max_position_embeddings: int = 32768
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    linear_conv_kernel_dim: int = 4
    linear_key_head_dim: int = 128
    linear_value_head_dim: int = 128
    linear_num_key_heads: int = 16
    linear_num_value_heads: int = 32
    layer_types: tuple[str, ...] = ()
    rope_theta: float = 10000.0
    partial_rotary_factor: float = 0.25
    mrope_section: tuple[int, ...] = (11, 11, 10)
    yarn: YarnScaling | None = None  # None: plain rotary (rope_type "default")
    quantization: FP8Quantization | None = None  # None: weights stored unquantized (bf16, fp16 or fp32)
    eos_token_id: tuple[int, ...] = ()
    # Sparse mixture of experts (qwen3_5_moe): every layer's MLP is a router over num_experts
    # SwiGLU experts of width moe_intermediate_size, num_experts_per_tok of them used per
    # token, plus one shared expert. All 0 in a dense model (and intermediate_size is 0 in an
    # MoE one).
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    shared_expert_intermediate_size: int = 0
    source: str = field(default="<dict>", compare=False)

    @property
    def is_moe(self) -> bool:
        """True for a sparse mixture-of-experts model (every layer), False for a dense one."""
        return self.num_experts > 0

    # Derived sizes, named as the reference names them.
    @property
    def rotary_dim(self) -> int:
        """R: how many leading dims of each attention head are rotated (the rest pass through).

        Rotation turns dims in pairs: for an odd R (which the reference allows), 2·⌈R/2⌉ dims
        turn, R being then only the denominator of the frequencies' exponents (rope.py)."""
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def linear_key_dim(self) -> int:
        return self.linear_num_key_heads * self.linear_key_head_dim

    @property
    def linear_value_dim(self) -> int:
        return self.linear_num_value_heads * self.linear_value_head_dim

    @property
    def linear_conv_dim(self) -> int:
        """Channels of the short convolution: q, k and v side by side."""
        return 2 * self.linear_key_dim + self.linear_value_dim

    def to_dict(self) -> dict:
        """The config as plain JSON-able values (used for hashing and reports).

        Only the fields the model has: a dense model's dict has no expert sizes, an MoE
        model's no intermediate_size (so a dense dict is what it was before MoE existed).
        """
        absent = _MOE_SIZES if not self.is_moe else ("intermediate_size",)
        out = {k: getattr(self, k) for k in self.__dataclass_fields__ if k != "source" and k not in absent}
        if self.yarn is None:
            out.pop("yarn")  # a plain-rotary dict is what it was before YaRN existed
        else:
            out["yarn"] = dict(vars(self.yarn))
        if self.quantization is None:
            out.pop("quantization")  # an unquantized dict is what it was before FP8 existed
        else:
            out["quantization"] = {k: list(v) for k, v in vars(self.quantization).items()}
        return {k: list(v) if isinstance(v, tuple) else v for k, v in out.items()}


_MOE_SIZES = ("num_experts", "num_experts_per_tok", "moe_intermediate_size", "shared_expert_intermediate_size")
# transformers 5.23.0's Qwen3_5MoeTextConfig defaults, where they differ from the dense ones.
MOE_DEFAULTS = TextConfig(
    hidden_size=2048, num_hidden_layers=40, num_key_value_heads=2, intermediate_size=0,
    num_experts=256, num_experts_per_tok=8, moe_intermediate_size=512, shared_expert_intermediate_size=512,
)


def load_config(path: str | Path) -> TextConfig:
    """Read ``config.json`` (a file, or the folder holding it) into a :class:`TextConfig`."""
    path = Path(path)
    if path.is_dir():
        path = path / "config.json"
    if not is_present(path):
        raise MinqwenError(f"{path}: no config.json here (a Qwen3.5 checkpoint folder needs one)")
    return config_from_dict(read_json_object(path), source=str(path))


def is_present(path: Path) -> bool:
    """Whether a checkpoint file is there: False only when nothing at all is at ``path``.

    Something that is there but is not a readable file — a broken link (what an interrupted
    download leaves), a folder, a pipe — is an error naming it: taken for absent, an optional
    file would quietly drop what it holds (sampling defaults, the chat template).
    """
    if path.is_file():
        return True
    if not os.path.lexists(path):
        return False
    what = ("a symbolic link to nothing" if path.is_symlink() and not path.exists()
            else "a folder" if path.is_dir() else "not a regular file")
    raise MinqwenError(f"{path}: is here but cannot be read as a file ({what}); an unfinished download? "
                       f"Replace it with the file from the model's release, or remove it")


def read_json_object(path: Path) -> dict:
    """A JSON file whose top level is an object (config.json and its siblings), or an error naming it."""
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:  # a folder, unreadable
        raise MinqwenError(f"{path}: cannot be read ({e.strerror or e})") from None
    except (ValueError, RecursionError) as e:  # bad UTF-8 or JSON, a huge int literal, deep nesting
        raise MinqwenError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise MinqwenError(f"{path}: expected a JSON object at the top level")
    return raw


def config_from_dict(raw: dict, source: str = "<dict>") -> TextConfig:
    """Turn a config.json dictionary (either wrapper) into a validated :class:`TextConfig`."""
    if not isinstance(raw, dict):
        raise MinqwenError(f"{source}: a config must be a JSON object (a dict), got {type(raw).__name__}")
    model_type = raw.get("model_type")
    if model_type in ("qwen3_5", "qwen3_5_text", "qwen3_5_moe", "qwen3_5_moe_text"):
        # Read from the top level of config.json in every wrapper, as transformers reads it.
        quantization = _quantization(raw.get("quantization_config"), source)
        return replace(_model_config(raw, source, model_type), quantization=quantization)
    raise MinqwenError(
        f"{source}: field 'model_type' is {model_type!r}; minqwen reads Qwen3.5 checkpoints "
        "(model_type 'qwen3_5' or 'qwen3_5_text', or the mixture-of-experts 'qwen3_5_moe' or 'qwen3_5_moe_text')"
    )


def _model_config(raw: dict, source: str, model_type: str) -> TextConfig:
    if model_type in ("qwen3_5", "qwen3_5_moe"):
        _warn_unknown(raw, WRAPPER_FIELDS, source, "")
        text = raw.get("text_config")
        if text is None:
            text = {}
        if not isinstance(text, dict):
            raise MinqwenError(f"{source}: field 'text_config' must be an object")
        text = dict(text)
        # The wrapper decides tying; absent at the top level means untied (reference behaviour).
        # Both top-level values are checked here, so that an error names the field where it is.
        tie = raw.get("tie_word_embeddings", False)
        if not isinstance(tie, bool):
            raise MinqwenError(f"{source}: field 'tie_word_embeddings' must be true or false, got {tie!r}")
        text["tie_word_embeddings"] = tie
        # transformers' generation takes the wrapper's eos first (GenerationConfig.from_model_config)
        if raw.get("eos_token_id") is not None:
            text["eos_token_id"] = list(_eos_token_ids(raw["eos_token_id"], source, "eos_token_id"))
        expected = model_type + "_text"  # qwen3_5 holds a qwen3_5_text, qwen3_5_moe a qwen3_5_moe_text
        inner = text.get("model_type", expected)
        if inner != expected:
            raise MinqwenError(f"{source}: text_config.model_type is {inner!r}; expected {expected!r}")
        if "quantization_config" in text:
            raise MinqwenError(
                f"{source}: field 'text_config.quantization_config': transformers reads quantization_config only "
                f"at the top level of config.json, so it would not dequantize these weights; move it there"
            )
        return _text_config(text, source, prefix="text_config.", moe=model_type == "qwen3_5_moe")
    return _text_config(raw, source, prefix="", moe=model_type == "qwen3_5_moe_text")


def _quantization(q, source: str) -> FP8Quantization | None:
    """Validate ``quantization_config``: FP8 with e4m3 weights, dynamic activations and block scales, or absent."""
    if q is None:
        return None
    where = f"{source}: field 'quantization_config"
    if not isinstance(q, dict):
        raise MinqwenError(f"{where}' must be an object, got {q!r}")
    method = q.get("quant_method")
    if not isinstance(method, str):
        raise MinqwenError(f"{where}.quant_method' is {method!r}; expected the name of a quantization method ('fp8')")
    instead = ("use the model's bf16 release (or its FP8 release), or dequantize this checkpoint to bf16 "
               "first; minqwen reads unquantized weights (bf16, fp16, fp32) and block-scaled FP8 ones "
               "(quant_method 'fp8', fmt 'e4m3', activation_scheme 'dynamic')")
    if method.lower() != "fp8":
        what = OTHER_QUANTIZATION.get(method.lower(), "a quantization method")
        raise MinqwenError(f"{where}.quant_method' is {method!r} ({what}), which minqwen does not read: {instead}")
    _warn_unknown(q, FP8_FIELDS, source, "quantization_config.")

    def must_be(name, allowed, default, meaning):
        value = q.get(name, default)
        if not isinstance(value, str) or value.lower() != allowed:
            raise MinqwenError(f"{where}.{name}' is {value!r} ({meaning}), which minqwen does not read: {instead}")

    must_be("fmt", "e4m3", "e4m3", "the FP8 format; minqwen reads F8_E4M3 weights")
    must_be("activation_scheme", "dynamic", "dynamic",
            "'static' FP8 quantizes activations with stored input scales, a different model from the bf16 one")
    must_be("scale_fmt", "float", "float", "the scales' storage; minqwen reads float scales")
    must_be("expert_dtype", "fp8", "fp8", "the experts' format; minqwen reads FP8 experts, not FP4-packed ones")
    if q.get("modules_to_convert"):
        raise MinqwenError(f"{where}.modules_to_convert' lists {q['modules_to_convert']!r}: FP8 embedding tables "
                           f"are not read by minqwen; {instead}")

    block = q.get("weight_block_size", [128, 128])  # transformers' default when the field is absent
    if block is None:
        raise MinqwenError(f"{where}.weight_block_size' is null (one scale per tensor); minqwen reads block-scaled "
                           f"FP8 (e.g. weight_block_size [128, 128]): {instead}")
    if (not isinstance(block, list) or len(block) != 2
            or not all(isinstance(b, int) and not isinstance(b, bool) and b >= 1 for b in block)):
        raise MinqwenError(f"{where}.weight_block_size' must be two positive integers [rows, columns], got {block!r}")
    skip = q.get("modules_to_not_convert", q.get("ignored_layers")) or []
    if not isinstance(skip, list) or not all(isinstance(m, str) for m in skip):
        raise MinqwenError(f"{where}.modules_to_not_convert' must be a list of module names, got {skip!r}")
    return FP8Quantization(weight_block_size=(block[0], block[1]), modules_to_not_convert=tuple(skip))


def _warn_unknown(raw: dict, table: dict, source: str, prefix: str) -> None:
    unknown = sorted(k for k in raw if k not in table)
    if unknown:
        warnings.warn(
            f"{source}: config fields minqwen does not know were not used: "
            + ", ".join(prefix + k for k in unknown),
            stacklevel=3,
        )


def _text_config(raw: dict, source: str, prefix: str, moe: bool = False) -> TextConfig:
    _warn_unknown(raw, MOE_TEXT_FIELDS if moe else TEXT_FIELDS, source, prefix)
    defaults = MOE_DEFAULTS if moe else TextConfig()

    def get(name, kind):
        value = raw.get(name, getattr(defaults, name))
        if kind is int:
            if isinstance(value, bool) or not isinstance(value, int):
                raise MinqwenError(f"{source}: field '{prefix}{name}' must be an integer, got {value!r}")
        elif kind is float:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise MinqwenError(f"{source}: field '{prefix}{name}' must be a number, got {value!r}")
            if isinstance(value, int) and not is_finite_number(value):  # float() would overflow
                raise MinqwenError(f"{source}: field '{prefix}{name}' is an integer too large for a floating-point "
                                   f"number ({len(str(value))} digits)")
            value = float(value)
        elif kind is bool:
            if not isinstance(value, bool):
                raise MinqwenError(f"{source}: field '{prefix}{name}' must be true or false, got {value!r}")
        return value

    sizes = {
        name: get(name, int)
        for name in (
            "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "head_dim", "max_position_embeddings", "linear_conv_kernel_dim",
            "linear_key_head_dim", "linear_value_head_dim", "linear_num_key_heads", "linear_num_value_heads",
            *(_MOE_SIZES if moe else ("intermediate_size",)),
        )
    }
    for name, value in sizes.items():
        if value < 1:
            raise MinqwenError(f"{source}: field '{prefix}{name}' must be at least 1, got {value}")
    if sizes["num_hidden_layers"] > MAX_LAYERS:  # before a list with one entry per layer is built
        raise MinqwenError(f"{source}: field '{prefix}num_hidden_layers' is {sizes['num_hidden_layers']}; "
                           f"minqwen takes at most {MAX_LAYERS} (released models have a few dozen)")
    eps = get("rms_norm_eps", float)
    if not math.isfinite(eps) or eps < 0:  # a negative eps makes some norms divide by zero or NaN
        raise MinqwenError(f"{source}: field '{prefix}rms_norm_eps' must be a finite number ≥ 0, got {eps}")
    if eps > float(np.finfo(np.float32).max):  # in float32 it is inf: every norm, and every logit, would be 0
        raise MinqwenError(f"{source}: field '{prefix}rms_norm_eps' is {eps:g}, beyond float32's largest number; "
                           "released models use 1e-6")
    if moe:
        _check_moe(raw, sizes, source, prefix)
        sizes["intermediate_size"] = 0  # no dense MLP anywhere
    if sizes["num_attention_heads"] % sizes["num_key_value_heads"]:
        raise MinqwenError(
            f"{source}: field '{prefix}num_attention_heads' ({sizes['num_attention_heads']}) must be a multiple "
            f"of num_key_value_heads ({sizes['num_key_value_heads']})"
        )
    if sizes["linear_num_value_heads"] % sizes["linear_num_key_heads"]:
        raise MinqwenError(
            f"{source}: field '{prefix}linear_num_value_heads' ({sizes['linear_num_value_heads']}) must be a "
            f"multiple of linear_num_key_heads ({sizes['linear_num_key_heads']})"
        )

    hidden_act = raw.get("hidden_act", defaults.hidden_act)
    if not isinstance(hidden_act, str) or hidden_act not in ACTIVATIONS:  # (a list is unhashable)
        raise MinqwenError(
            f"{source}: field '{prefix}hidden_act' is {hidden_act!r}; minqwen knows {', '.join(ACTIVATIONS)}"
        )

    layer_types = raw.get("layer_types")
    if layer_types is None:
        interval = raw.get("full_attention_interval", 4)
        if isinstance(interval, bool) or not isinstance(interval, int) or interval < 1:
            raise MinqwenError(f"{source}: field '{prefix}full_attention_interval' must be a positive integer")
        # Every interval-th layer is full attention, the rest Gated DeltaNet: [L, L, L, F] for 4.
        layer_types = [
            "full_attention" if (i + 1) % interval == 0 else "linear_attention"
            for i in range(sizes["num_hidden_layers"])
        ]
    if not isinstance(layer_types, list) or len(layer_types) != sizes["num_hidden_layers"]:
        raise MinqwenError(
            f"{source}: field '{prefix}layer_types' must list one type per layer "
            f"({sizes['num_hidden_layers']} layers)"
        )
    layer_types = [LEGACY_LAYER_TYPES.get(kind, kind) if isinstance(kind, str) else kind for kind in layer_types]
    for i, kind in enumerate(layer_types):
        if kind not in LAYER_TYPES:
            raise MinqwenError(
                f"{source}: field '{prefix}layer_types[{i}]' is {kind!r}; expected one of {', '.join(LAYER_TYPES)}"
            )

    rope = _rope_parameters(raw, source, prefix)
    rotary_dim = int(sizes["head_dim"] * rope["partial_rotary_factor"])
    # An odd R still has a frequency for each even i < R, so 2·⌈R/2⌉ dims turn (as in transformers)
    rotated = 2 * ((rotary_dim + 1) // 2)
    if rotary_dim < 1 or rotated > sizes["head_dim"]:
        raise MinqwenError(
            f"{source}: head_dim × partial_rotary_factor = {sizes['head_dim']} × {rope['partial_rotary_factor']:g} "
            f"= {rotary_dim} rotary dims, which turn in pairs: {rotated} would be rotated, and a head has "
            f"{sizes['head_dim']} dims. Use a partial_rotary_factor that gives between 1 and head_dim rotary dims "
            f"(an odd head_dim cannot be rotated whole)"
        )
    yarn = _yarn(rope["raw"], sizes["max_position_embeddings"], rope["rope_theta"], source, rope["rope_field"])
    if yarn is not None and rotary_dim % 2:
        raise MinqwenError(
            f"{source}: field '{rope['rope_field']}.rope_type' is 'yarn' with an odd number of rotary dims "
            f"(head_dim × partial_rotary_factor = {rotary_dim}): YaRN's ramp has R/2 entries for ⌈R/2⌉ "
            f"frequencies, and transformers cannot build that model either. Use an even rotary size"
        )
    _check_rotary_numbers(rope["rope_theta"], rotary_dim, yarn, sizes["max_position_embeddings"], source,
                          rope["rope_field"])

    eos = _eos_token_ids(raw.get("eos_token_id"), source, prefix + "eos_token_id")

    return TextConfig(
        **sizes,
        hidden_act=hidden_act,
        rms_norm_eps=eps,
        tie_word_embeddings=get("tie_word_embeddings", bool),
        attention_bias=get("attention_bias", bool),
        layer_types=tuple(layer_types),
        rope_theta=rope["rope_theta"],
        partial_rotary_factor=rope["partial_rotary_factor"],
        mrope_section=rope["mrope_section"],
        yarn=yarn,
        eos_token_id=eos,
        source=source,
    )


def _eos_token_ids(eos, source: str, field_name: str) -> tuple[int, ...]:
    """An ``eos_token_id`` field (an integer, a list of them, or null) as a tuple of ids."""
    eos = () if eos is None else (tuple(eos) if isinstance(eos, list) else (eos,))
    if not all(isinstance(e, int) and not isinstance(e, bool) for e in eos):
        raise MinqwenError(f"{source}: field '{field_name}' must be an integer or a list of integers")
    return eos


def _check_moe(raw: dict, sizes: dict, source: str, prefix: str) -> None:
    """The MoE fields beyond their types: top-k within the experts, and no request for dense layers."""
    if sizes["num_experts_per_tok"] > sizes["num_experts"]:
        raise MinqwenError(
            f"{source}: field '{prefix}num_experts_per_tok' ({sizes['num_experts_per_tok']}) must be at most "
            f"num_experts ({sizes['num_experts']})"
        )
    for name, always in MOE_ALWAYS.items():
        # null names nothing, as leaving the field out (transformers ignores the field either way)
        if raw.get(name) is not None and raw[name] != always:
            raise MinqwenError(
                f"{source}: field '{prefix}{name}' is {raw[name]!r}; transformers 5.23.0 ignores it and builds every "
                f"layer as a sparse MoE block with renormalised routing weights, and so does minqwen: only "
                f"{json.dumps(always)} (or null, or leaving the field out) describes that model"
            )


def _rope_parameters(raw: dict, source: str, prefix: str) -> dict:
    """Standardise the rope fields the way transformers does (new dict, legacy names, defaults).

    A file with both a ``rope_scaling`` and a ``rope_parameters`` reads ``rope_scaling``, as
    transformers 5.23.0 does (``rope_scaling or rope_parameters``). ``rope_field`` in the
    result names the field read, for error messages.
    """
    field_name = "rope_scaling" if raw.get("rope_scaling") else "rope_parameters"
    rope_field = prefix + field_name
    rope = raw.get(field_name)
    if rope is None:  # absent or null: every rope field takes its default
        rope = {}
    if not isinstance(rope, dict):  # an empty list or string too: transformers refuses those
        raise MinqwenError(f"{source}: field '{rope_field}' must be an object")
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", "yarn"):
        raise MinqwenError(
            f"{source}: field '{rope_field}.rope_type' is {rope_type!r}; "
            "minqwen implements 'default' and 'yarn' rotary embeddings"
        )
    unknown = sorted(set(rope) - ROPE_FIELDS - YARN_FIELDS)
    if unknown:
        raise MinqwenError(
            f"{source}: {rope_field} fields minqwen does not implement: {', '.join(unknown)}"
        )
    if rope_type == "default" and set(rope) & YARN_FIELDS:
        # transformers computes plain rotary then, and only warns
        warnings.warn(f"{source}: {rope_field} has YaRN fields ({', '.join(sorted(set(rope) & YARN_FIELDS))}) but "
                      "rope_type 'default': they are not used, as in transformers", stacklevel=4)
    if rope_type == "yarn" and raw.get("original_max_position_embeddings") is not None:
        # a top-level original_max_position_embeddings wins over the YaRN one in transformers
        rope = dict(rope, original_max_position_embeddings=raw["original_max_position_embeddings"])
    theta = rope.get("rope_theta", raw.get("rope_theta", 10000.0))
    legacy_factor = raw.get("partial_rotary_factor", 0.25)
    if legacy_factor is None:  # transformers leaves a null out, and its rotary then turns the whole head
        legacy_factor = 1.0
    factor = rope.get("partial_rotary_factor", legacy_factor)
    for name, value in (("rope_theta", theta), ("partial_rotary_factor", factor)):
        value = _finite_float(value)
        if value is None or value <= 0:
            raise MinqwenError(f"{source}: field '{rope_field}.{name}' must be a positive, finite number")
    theta, factor = float(theta), float(factor)
    if factor > 1:
        raise MinqwenError(f"{source}: field '{rope_field}.partial_rotary_factor' must be ≤ 1")
    section = rope.get("mrope_section", [11, 11, 10])
    if (
        not isinstance(section, list)
        or len(section) != 3
        or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in section)
    ):
        raise MinqwenError(
            f"{source}: field '{rope_field}.mrope_section' must be three non-negative integers (t, h, w)"
        )
    # A section that does not sum to rotary_dim / 2 is accepted, as the reference accepts it:
    # the interleaving rule below only ever writes indices that exist (see rope.py).
    return {"rope_theta": theta, "partial_rotary_factor": factor, "mrope_section": tuple(section),
            "raw": rope if rope_type == "yarn" else None, "rope_field": rope_field}


def _finite_float(value) -> float | None:
    """A JSON number as a float; None for anything else (a bool, a string, NaN, ±inf, 10**400)."""
    return float(value) if is_finite_number(value) else None


def _yarn(rope: dict | None, max_position_embeddings: int, theta: float, source: str,
          rope_field: str) -> YarnScaling | None:
    """Validate the YaRN fields (None for plain rotary)."""
    if rope is None:
        return None
    where = f"{source}: field '{rope_field}."

    def number(name, default, positive=True):
        value = rope.get(name)
        if value is None:
            return default
        as_float = _finite_float(value)
        if as_float is None or (positive and as_float <= 0):
            raise MinqwenError(f"{where}{name}' must be a {'positive ' if positive else ''}finite number, got {value!r}")
        return as_float

    def rotations(name, default):
        # The reference reads 0 like absent (`or 32`), so do we. A negative count has no logarithm:
        # the ramp's ends are found from log(original context / (2π · rotations)).
        value = number(name, None, positive=False)
        if value is not None and value < 0:
            raise MinqwenError(
                f"{where}{name}' is {value:g}; it counts rotations over the original context (where YaRN's "
                f"ramp between kept and stretched frequencies ends), so it must be positive; 0 or absent means "
                f"{default:g}")
        return value or default

    if theta == 1:
        raise MinqwenError(
            f"{where}rope_theta' is 1; YaRN finds its ramp by dividing by log(rope_theta), which is 0 there "
            f"(every frequency would be the same). Use a rope_theta above 1, so that the frequencies fall with "
            f"the dimension (released models use 1e4 to 1e7)")
    original = rope.get("original_max_position_embeddings", max_position_embeddings)
    if isinstance(original, bool) or not isinstance(original, int) or original < 1:
        raise MinqwenError(f"{where}original_max_position_embeddings' must be a positive integer, got {original!r}")
    # transformers 5.23.0 requires the key (a KeyError naming it) but accepts null, and derives
    # null as the ratio of the two context lengths; so do we.
    if "factor" not in rope:
        raise MinqwenError(
            f"{where}factor' is missing; YaRN needs it: the new context over the original one (e.g. 4), or null "
            f"for max_position_embeddings / original_max_position_embeddings")
    try:
        ratio = max_position_embeddings / original
    except OverflowError:  # integers too large for a float
        raise MinqwenError(f"{where}factor' is null, and max_position_embeddings / original_max_position_embeddings "
                           f"({max_position_embeddings} / {original}) is too large a number to stand in for it") from None
    factor = number("factor", ratio)
    if factor < 1:  # transformers 5.23.0 warns about it, and computes it all the same
        warnings.warn(f"{where}factor' is {factor:g}, below 1: YaRN then squeezes the context instead of "
                      f"stretching it (factor is the new context over the original one, e.g. 4)", stacklevel=3)
    truncate = rope.get("truncate", True)
    if not isinstance(truncate, bool):
        raise MinqwenError(f"{where}truncate' must be true or false, got {truncate!r}")
    yarn = YarnScaling(
        factor=factor,
        original_max_position_embeddings=original,
        attention_factor=number("attention_factor", None),
        beta_fast=rotations("beta_fast", 32.0),
        beta_slow=rotations("beta_slow", 1.0),
        mscale=number("mscale", None, positive=False),
        mscale_all_dim=number("mscale_all_dim", None, positive=False),
        truncate=truncate,
    )
    if yarn.beta_fast < yarn.beta_slow:  # transformers 5.23.0 warns about it, and computes it all the same
        warnings.warn(f"{where}beta_fast' ({yarn.beta_fast:g}) is below beta_slow ({yarn.beta_slow:g}): YaRN's "
                      f"ramp then runs backwards (beta_fast should be the larger, as in the defaults 32 and 1)",
                      stacklevel=3)
    # The attention factor is mscale(factor, mscale) / mscale(factor, mscale_all_dim) when both are set.
    if yarn.attention_factor is None and yarn.mscale and yarn.mscale_all_dim and yarn_mscale(
            factor, yarn.mscale_all_dim) == 0:
        raise MinqwenError(
            f"{where}mscale_all_dim' is {yarn.mscale_all_dim:g}: with factor {factor:g}, YaRN's attention factor "
            f"divides by 0.1 · mscale_all_dim · ln(factor) + 1, which is 0. Released configs set mscale_all_dim "
            f"to a small positive number (often equal to mscale), or give attention_factor directly")
    return yarn


# The largest float32: what a rotary angle, or the factor attention scores grow by, must stay below.
FLOAT32_MAX = float(np.finfo(np.float32).max)


def _check_rotary_numbers(theta: float, rotary_dim: int, yarn: YarnScaling | None, max_positions: int,
                          source: str, rope_field: str) -> None:
    """Compute the rotary frequencies and YaRN's attention factor once, as the model will.

    Fields that are each fine alone can still overflow float32 together — a tiny rope_theta, a
    tiny YaRN factor, an attention factor of 1e300 — and then every logit is NaN, without an error.
    """
    where = f"{source}: field '{rope_field}."
    # The largest angle the model computes: a position of the context (an int64) × a frequency, in float32.
    last_position = np.float32(min(max_positions - 1, np.iinfo(np.int64).max))

    def fitting(yarn) -> tuple[np.ndarray, float] | None:
        """(frequencies, attention factor) if every angle of the context is a float32 number, else None."""
        with np.errstate(all="ignore"):  # overflows are what is being looked for
            try:
                inv_freq, attention_factor = ((inverse_frequencies(theta, rotary_dim), 1.0) if yarn is None
                                              else yarn_inverse_frequencies(theta, rotary_dim, yarn))
            except (OverflowError, ValueError):  # a YaRN ramp end beyond what a float holds
                return None
            # (an inf or NaN frequency fails too)
            return (inv_freq, attention_factor) if np.isfinite(last_position * inv_freq).all() else None

    if fitting(None) is None:
        raise MinqwenError(
            f"{where}rope_theta' is {theta:g}: the rotary frequencies rope_theta^(-2i/{rotary_dim}) then grow "
            f"past what float32 holds within the context ({max_positions} positions, max_position_embeddings), "
            f"and every logit would be NaN. Use a rope_theta above 1, so that the frequencies fall with the "
            f"dimension (released models use 1e4 to 1e7)")
    if yarn is None:
        return
    numbers = fitting(yarn)
    if numbers is None:
        if fitting(replace(yarn, factor=1.0)) is not None:
            raise MinqwenError(
                f"{where}factor' is {yarn.factor:g}: YaRN divides the slow frequencies by it, and they grow past "
                f"what float32 holds, so every logit would be NaN. factor is how many times the original context "
                f"is stretched: 1 or more (e.g. 4)")
        raise MinqwenError(
            f"{source}: fields '{rope_field}.beta_fast' ({yarn.beta_fast:g}), 'beta_slow' "
            f"({yarn.beta_slow:g}) and 'original_max_position_embeddings' ({yarn.original_max_position_embeddings}) "
            f"put the ends of YaRN's ramp, log(original context / (2π · beta)) / log(rope_theta), beyond what a "
            f"float holds. The betas count rotations over the original context: 32 and 1 by default")
    attention_factor = numbers[1]
    # It multiplies the rotated dims of both q and k: attention scores grow by its square.
    if not 0 < attention_factor < math.sqrt(FLOAT32_MAX):
        if yarn.attention_factor is not None:
            what = f"{where}attention_factor' is {attention_factor:g}"
        else:
            what = (f"{source}: fields '{rope_field}.mscale' ({yarn.mscale:g}) and 'mscale_all_dim' "
                    f"({yarn.mscale_all_dim:g}) give YaRN an attention factor of {attention_factor:g} (0.1 · mscale "
                    f"· ln(factor) + 1 over 0.1 · mscale_all_dim · ln(factor) + 1, factor {yarn.factor:g})")
        raise MinqwenError(
            f"{what}; it multiplies the rotated part of every query and key, so attention scores grow by its "
            f"square, which float32 must hold: it must be above 0 and below {math.sqrt(FLOAT32_MAX):.3g} "
            f"(YaRN's own formula, 0.1 · ln(factor) + 1, gives about 1 to 1.5)")
