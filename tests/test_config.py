"""config.json handling, as a specification.

Both wrappers (``qwen3_5_text`` and the multimodal ``qwen3_5``) give the same validated
TextConfig; missing fields take transformers 5.23.0's defaults; legacy names are honoured;
every value minqwen cannot honour is a MinqwenError naming the field; unknown fields are a
warning naming them.
"""

from __future__ import annotations

import copy
import inspect
import json
import re
import warnings
from pathlib import Path

import numpy as np
import pytest

from conftest import require_reference
from minqwen import MinqwenError
from minqwen.config import (
    MOE_TEXT_FIELDS,
    TEXT_FIELDS,
    WRAPPER_FIELDS,
    TextConfig,
    config_from_dict,
    load_config,
)
from minqwen.rope import inverse_frequencies

FIXTURES = Path(__file__).parent / "fixtures"
L, F = "linear_attention", "full_attention"


def small_text(**overrides) -> dict:
    """A valid qwen3_5_text config.json dict (the text_tied_fp32 fixture's), with overrides."""
    raw = json.loads((FIXTURES / "text_tied_fp32" / "config.json").read_text())
    raw.update(overrides)
    return raw


def wrapped(text: dict, **top) -> dict:
    """The same text model inside a qwen3_5 multimodal wrapper."""
    inner = dict(text)
    inner.pop("architectures", None)
    inner.pop("transformers_version", None)
    return {"model_type": "qwen3_5", "architectures": ["Qwen3_5ForConditionalGeneration"], "text_config": inner, **top}


def parse(raw: dict) -> TextConfig:
    """config_from_dict, failing the test on any warning (a valid config must load silently)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return config_from_dict(raw, source="config.json")


def write(tmp_path: Path, raw) -> Path:
    path = tmp_path / "config.json"
    path.write_text(json.dumps(raw) if not isinstance(raw, str) else raw)
    return path


# ----------------------------------------------------------------------------- the two wrappers


def test_a_text_config_is_read_field_by_field():
    c = parse(small_text())
    assert (c.vocab_size, c.hidden_size, c.intermediate_size, c.num_hidden_layers) == (160, 48, 96, 4)
    assert (c.num_attention_heads, c.num_key_value_heads, c.head_dim) == (4, 2, 16)
    assert (c.linear_num_key_heads, c.linear_num_value_heads, c.linear_key_head_dim, c.linear_value_head_dim) == (
        2, 2, 12, 8,
    )
    assert c.linear_conv_kernel_dim == 4
    assert c.layer_types == (L, L, L, F)
    assert c.hidden_act == "silu" and c.rms_norm_eps == 1e-6 and c.max_position_embeddings == 512
    assert c.tie_word_embeddings is True and c.attention_bias is False
    assert (c.rope_theta, c.partial_rotary_factor, c.rotary_dim) == (10000.0, 0.25, 4)
    assert c.eos_token_id == ()


def test_the_multimodal_wrapper_reads_the_text_model_from_text_config():
    text = small_text(tie_word_embeddings=False)
    assert parse(wrapped(text)) == parse(text)


def test_the_multimodal_wrapper_takes_eos_from_the_top_level_first_as_transformers_generation_does():
    text = small_text()
    del text["eos_token_id"]
    assert parse(wrapped(text, eos_token_id=[7, 9])).eos_token_id == (7, 9)
    assert parse(wrapped(small_text(eos_token_id=3), eos_token_id=[7, 9])).eos_token_id == (7, 9)
    assert parse(wrapped(small_text(eos_token_id=3), eos_token_id=None)).eos_token_id == (3,)


@pytest.mark.parametrize("field, value", [("tie_word_embeddings", "yes"), ("tie_word_embeddings", None),
                                          ("eos_token_id", "2"), ("eos_token_id", [2, "3"])], ids=repr)
def test_a_bad_top_level_value_in_the_wrapper_is_named_where_it_is_not_as_a_text_config_field(field, value):
    # The wrapper's tie_word_embeddings and eos_token_id replace text_config's: an error about
    # them must send the reader to the top level, where the value is.
    with pytest.raises(MinqwenError, match=f"field '{field}' must be") as error:
        parse(wrapped(small_text(), **{field: value}))
    assert "text_config." not in str(error.value)


def test_the_multimodal_wrapper_needs_a_text_model_type_inside_text_config():
    raw = wrapped(small_text(model_type="qwen3_5_moe_text"))
    with pytest.raises(MinqwenError, match=r"text_config\.model_type is 'qwen3_5_moe_text'; expected 'qwen3_5_text'"):
        parse(raw)


def test_a_text_config_that_is_not_an_object_is_an_error_naming_it():
    with pytest.raises(MinqwenError, match=r"field 'text_config' must be an object"):
        parse({"model_type": "qwen3_5", "text_config": [1, 2]})


def test_a_wrapper_without_text_config_gives_the_default_text_model():
    assert parse({"model_type": "qwen3_5"}) == TextConfig(layer_types=(L, L, L, F) * 8)


@pytest.mark.parametrize("fixture", sorted(p.name for p in FIXTURES.iterdir() if (p / "config.json").is_file()))
def test_every_fixture_config_loads_without_a_warning(fixture):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        c = load_config(FIXTURES / fixture)
    assert c.source == str(FIXTURES / fixture / "config.json")
    assert len(c.layer_types) == c.num_hidden_layers


# ----------------------------------------------------------------------------- tying in the wrapper


@pytest.mark.parametrize("inner", [True, False, None], ids=["text-true", "text-false", "text-absent"])
@pytest.mark.parametrize("top", [True, False, None], ids=["top-true", "top-false", "top-absent"])
def test_in_the_wrapper_top_level_tie_word_embeddings_wins_and_absent_means_untied(top, inner):
    text = small_text()
    if inner is None:
        del text["tie_word_embeddings"]
    else:
        text["tie_word_embeddings"] = inner
    raw = wrapped(text) if top is None else wrapped(text, tie_word_embeddings=top)
    assert parse(raw).tie_word_embeddings is (top is True)


def test_a_text_config_without_tie_word_embeddings_is_untied():
    text = small_text()
    del text["tie_word_embeddings"]
    assert parse(text).tie_word_embeddings is False


# ----------------------------------------------------------------------------- layer_types


@pytest.mark.parametrize(
    "interval, layers, expected",
    [
        (4, 8, [L, L, L, F] * 2),
        (4, 6, [L, L, L, F, L, L]),
        (3, 6, [L, L, F] * 2),
        (2, 4, [L, F] * 2),
        (1, 3, [F, F, F]),
        (7, 3, [L, L, L]),
    ],
)
def test_layer_types_are_derived_from_full_attention_interval_when_absent(interval, layers, expected):
    raw = small_text(num_hidden_layers=layers, full_attention_interval=interval)
    del raw["layer_types"]
    assert parse(raw).layer_types == tuple(expected)


def test_full_attention_interval_defaults_to_4():
    raw = small_text(num_hidden_layers=8)
    del raw["layer_types"]
    assert parse(raw).layer_types == (L, L, L, F) * 2


def test_explicit_layer_types_win_over_full_attention_interval():
    raw = small_text(layer_types=[F, L, F, L], full_attention_interval=4)
    assert parse(raw).layer_types == (F, L, F, L)


@pytest.mark.parametrize("interval", [0, -4, 2.0, True, "4"], ids=str)
def test_a_full_attention_interval_that_is_not_a_positive_integer_is_an_error_naming_it(interval):
    raw = small_text(full_attention_interval=interval)
    del raw["layer_types"]
    with pytest.raises(MinqwenError, match=r"field 'full_attention_interval' must be a positive integer"):
        parse(raw)


@pytest.mark.parametrize("layer_types", [[L, L, F], [L, L, L, F, F], [], "LLLF", {"0": L}], ids=str)
def test_layer_types_of_the_wrong_length_or_kind_is_an_error_naming_the_field_and_layer_count(layer_types):
    with pytest.raises(MinqwenError, match=r"field 'layer_types' must list one type per layer \(4 layers\)"):
        parse(small_text(layer_types=layer_types))


@pytest.mark.parametrize("kind", ["sliding_attention", "Full_Attention", None, 1], ids=str)
def test_an_unknown_layer_type_is_an_error_naming_the_layer_and_the_known_types(kind):
    with pytest.raises(MinqwenError, match=rf"field 'layer_types\[2\]' is {re.escape(repr(kind))}; expected one of "):
        parse(small_text(layer_types=[L, L, kind, F]))


def test_errors_inside_text_config_name_the_field_with_its_prefix():
    with pytest.raises(MinqwenError, match=r"field 'text_config\.layer_types\[0\]' is 'dense'"):
        parse(wrapped(small_text(layer_types=["dense", L, L, F])))


# ----------------------------------------------------------------------------- rope


def test_rope_parameters_are_read():
    rope = {"rope_type": "default", "rope_theta": 5e6, "partial_rotary_factor": 0.5, "mrope_section": [1, 1, 2]}
    c = parse(small_text(rope_parameters=rope))
    assert (c.rope_theta, c.partial_rotary_factor, c.mrope_section, c.rotary_dim) == (5e6, 0.5, (1, 1, 2), 8)


def test_legacy_rope_scaling_is_read_as_rope_parameters():
    raw = small_text(rope_scaling={"type": "default", "rope_theta": 123.0, "partial_rotary_factor": 0.5})
    del raw["rope_parameters"]
    c = parse(raw)
    assert (c.rope_theta, c.partial_rotary_factor) == (123.0, 0.5)


def test_rope_scaling_is_read_instead_of_rope_parameters_when_both_are_present():
    # transformers 5.23.0: rope_parameters = rope_scaling or rope_parameters
    scaling = {"rope_type": "default", "rope_theta": 5e5, "partial_rotary_factor": 0.5}
    raw = small_text(rope_parameters={"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.25},
                     rope_scaling=scaling)
    c = parse(raw)
    assert (c.rope_theta, c.partial_rotary_factor) == (scaling["rope_theta"], scaling["partial_rotary_factor"])
    assert parse(small_text(rope_scaling={})).rope_theta == small_text()["rope_parameters"]["rope_theta"]
    with pytest.raises(MinqwenError, match=r"field 'rope_scaling\.rope_theta' must be a positive"):
        parse(small_text(rope_scaling={**scaling, "rope_theta": -1.0}))


def yarn_text(**rope) -> dict:
    """small_text with YaRN over a 1024-token original context stretched to 4096."""
    return small_text(max_position_embeddings=4096, rope_parameters={
        "rope_type": "yarn", "rope_theta": 1e4, "partial_rotary_factor": 0.5,
        "original_max_position_embeddings": 1024, **rope})


def test_yarn_betas_of_zero_read_as_their_defaults():
    # transformers reads `beta_fast or 32` and `beta_slow or 1`
    zero = parse(yarn_text(factor=4.0, beta_fast=0, beta_slow=0))
    absent = parse(yarn_text(factor=4.0))
    assert (zero.yarn.beta_fast, zero.yarn.beta_slow) == (absent.yarn.beta_fast, absent.yarn.beta_slow)


def test_a_null_yarn_factor_is_the_ratio_of_the_two_context_lengths():
    raw = yarn_text(factor=None)
    assert parse(raw).yarn.factor == raw["max_position_embeddings"] / raw["rope_parameters"]["original_max_position_embeddings"]


def test_legacy_top_level_rope_theta_and_partial_rotary_factor_are_honoured():
    raw = small_text(rope_theta=1e6, partial_rotary_factor=0.5)
    del raw["rope_parameters"]
    c = parse(raw)
    assert (c.rope_theta, c.partial_rotary_factor) == (1e6, 0.5)


def test_legacy_top_level_rope_fields_fill_in_what_rope_parameters_leaves_out():
    c = parse(small_text(rope_parameters={"rope_type": "default"}, rope_theta=77.0, partial_rotary_factor=0.5))
    assert (c.rope_theta, c.partial_rotary_factor) == (77.0, 0.5)


def test_rope_parameters_win_over_legacy_top_level_rope_fields():
    rope = {"rope_type": "default", "rope_theta": 1e6, "partial_rotary_factor": 0.5}
    c = parse(small_text(rope_parameters=rope, rope_theta=77.0, partial_rotary_factor=1.0))
    assert (c.rope_theta, c.partial_rotary_factor) == (1e6, 0.5)


def test_defaults_equal_those_of_transformers_5_23():
    c = parse({"model_type": "qwen3_5_text"})
    assert c.partial_rotary_factor == 0.25
    assert c.mrope_section == (11, 11, 10)
    assert c.rope_theta == 10000.0
    assert c.tie_word_embeddings is False and c.attention_bias is False
    assert c.hidden_act == "silu" and c.rms_norm_eps == 1e-6
    assert c.layer_types == (L, L, L, F) * 8
    sizes = (
        c.vocab_size, c.hidden_size, c.intermediate_size, c.num_hidden_layers, c.num_attention_heads,
        c.num_key_value_heads, c.head_dim, c.max_position_embeddings, c.linear_conv_kernel_dim,
        c.linear_key_head_dim, c.linear_value_head_dim, c.linear_num_key_heads, c.linear_num_value_heads,
    )
    assert sizes == (248320, 4096, 12288, 32, 16, 4, 256, 32768, 4, 128, 128, 16, 32)


def test_rope_theta_defaults_to_10000_when_rope_parameters_has_none():
    c = parse(small_text(rope_parameters={"rope_type": "default", "partial_rotary_factor": 0.5}))
    assert c.rope_theta == 10000.0


@pytest.mark.parametrize("rope_type", ["linear", "dynamic", "mrope", None])
def test_a_rope_type_other_than_default_or_yarn_is_an_error_naming_the_field(rope_type):
    with pytest.raises(
        MinqwenError,
        match=rf"field 'rope_parameters\.rope_type' is {re.escape(repr(rope_type))}; .*'default' and 'yarn'",
    ):
        parse(small_text(rope_parameters={"rope_type": rope_type, "rope_theta": 1e4, "factor": 4.0}))


def test_a_legacy_rope_scaling_with_type_linear_is_an_error_naming_the_field():
    raw = small_text(rope_scaling={"type": "linear", "factor": 2.0})
    del raw["rope_parameters"]
    with pytest.raises(MinqwenError, match=r"field 'rope_scaling\.rope_type' is 'linear'"):  # the field in the file
        parse(raw)


def test_an_unknown_rope_parameters_field_is_an_error_naming_it():
    rope = {"rope_type": "yarn", "rope_theta": 1e4, "factor": 8.0, "low_freq_factor": 1.0}
    with pytest.raises(MinqwenError, match=r"rope_parameters fields minqwen does not implement: low_freq_factor"):
        parse(small_text(rope_parameters=rope))


def test_yarn_fields_beside_rope_type_default_are_ignored_with_a_warning_as_transformers_does():
    rope = {"rope_type": "default", "rope_theta": 1e4, "factor": 8.0, "original_max_position_embeddings": 4096}
    with pytest.warns(UserWarning, match=r"YaRN fields \(factor, original_max_position_embeddings\) but rope_type "
                                         r"'default': they are not used"):
        c = config_from_dict(small_text(rope_parameters=rope), source="config.json")
    assert c.yarn is None and c.rope_theta == 1e4


def test_a_top_level_original_max_position_embeddings_wins_over_the_yarn_one_as_in_transformers():
    raw = small_text(max_position_embeddings=4096, original_max_position_embeddings=16, rope_parameters={
        "rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0, "original_max_position_embeddings": 2048})
    assert parse(raw).yarn.original_max_position_embeddings == raw["original_max_position_embeddings"]


def test_a_null_top_level_partial_rotary_factor_rotates_the_whole_head_as_in_transformers():
    raw = small_text(partial_rotary_factor=None, rope_theta=1e4)
    del raw["rope_parameters"]
    assert parse(raw).partial_rotary_factor == 1.0


@pytest.mark.parametrize("value", [[10000.0], [], "", 0, False], ids=repr)
def test_rope_parameters_that_are_not_an_object_is_an_error_naming_the_field(value):
    # Empty ones too: transformers refuses them; reading them as absent would run the defaults.
    with pytest.raises(MinqwenError, match=r"field 'rope_parameters' must be an object"):
        parse(small_text(rope_parameters=value))


def test_a_yarn_config_without_a_factor_is_an_error_naming_it():
    # transformers 5.23.0 raises a KeyError for it; a null factor it derives (the test above)
    with pytest.raises(MinqwenError, match=r"field 'rope_parameters\.factor' is missing"):
        parse(yarn_text())


@pytest.mark.parametrize("field", ["rope_theta", "partial_rotary_factor"])
@pytest.mark.parametrize("value", [0, -1.0, "1e4", True, None, float("nan"), float("inf")], ids=str)
def test_a_rope_number_that_is_not_positive_and_finite_is_an_error_naming_it(field, value):
    rope = {"rope_type": "default", field: value}
    with pytest.raises(MinqwenError, match=rf"field 'rope_parameters\.{field}' must be a positive, finite number"):
        parse(small_text(rope_parameters=rope))


def test_a_partial_rotary_factor_above_one_is_an_error_naming_it():
    with pytest.raises(MinqwenError, match=r"field 'rope_parameters\.partial_rotary_factor' must be ≤ 1"):
        parse(small_text(rope_parameters={"rope_type": "default", "partial_rotary_factor": 1.5}))


@pytest.mark.parametrize("factor, rotated", [(0.1875, 4), (0.0625, 2), (0.25, 4), (1.0, 16)])
def test_rotary_dims_turn_in_pairs_so_an_odd_count_turns_one_more_as_in_the_reference(factor, rotated):
    # head_dim is 16: 0.1875 → R = 3, whose frequencies theta^(-0/3), theta^(-2/3) turn 4 dims.
    config = parse(small_text(rope_parameters={"rope_type": "default", "partial_rotary_factor": factor}))
    assert config.rotary_dim == int(16 * factor)
    assert 2 * len(inverse_frequencies(config.rope_theta, config.rotary_dim)) == rotated


@pytest.mark.parametrize("head_dim, factor", [(16, 0.01), (15, 1.0)], ids=["no-dims", "odd-head-whole"])
def test_rotary_dims_that_round_to_none_or_past_the_head_are_an_error_naming_head_dim_and_the_factor(head_dim, factor):
    # 16 × 0.01 → 0 rotary dims; 15 × 1.0 → 15, which would turn 16 dims of a 15-dim head.
    message = rf"head_dim × partial_rotary_factor = {head_dim} × {factor:g} = \d+ rotary"
    with pytest.raises(MinqwenError, match=message):
        parse(small_text(head_dim=head_dim, rope_parameters={"rope_type": "default", "partial_rotary_factor": factor}))


def test_yarn_with_an_odd_number_of_rotary_dims_is_an_error_the_reference_shares():
    rope = {"rope_type": "yarn", "factor": 4.0, "partial_rotary_factor": 0.1875, "original_max_position_embeddings": 64}
    with pytest.raises(MinqwenError, match=r"'yarn' with an odd number of rotary dims"):
        parse(small_text(rope_parameters=rope))


def test_the_legacy_layer_type_names_read_as_transformers_reads_them():
    config = parse(small_text(num_hidden_layers=4, layer_types=["mamba", "attention", L, "attention"]))
    assert config.layer_types == (L, F, L, F)


@pytest.mark.parametrize("section", [[11, 11], [1, 1, 1, 1], [1, -1, 2], [1.0, 1, 2], "11,11,10", [True, 1, 2]], ids=str)
def test_an_mrope_section_that_is_not_three_non_negative_integers_is_an_error_naming_it(section):
    with pytest.raises(MinqwenError, match=r"field 'rope_parameters\.mrope_section' must be three non-negative"):
        parse(small_text(rope_parameters={"rope_type": "default", "mrope_section": section}))


def test_a_rope_number_written_as_a_huge_integer_is_an_error_naming_it_not_an_overflow():
    with pytest.raises(MinqwenError, match=r"field 'rope_parameters\.rope_theta' must be a positive, finite number"):
        parse(small_text(rope_parameters={"rope_type": "default", "rope_theta": 10**400}))


def test_a_rope_theta_whose_frequencies_overflow_float32_is_an_error_naming_it():
    # head_dim 16 × 0.25: frequencies 1 and rope_theta^(-1/2), here 1e150 — every logit would be NaN
    with pytest.raises(MinqwenError, match=r"field 'rope_parameters\.rope_theta' is 1e-300: the rotary frequencies "
                                           r"rope_theta\^\(-2i/4\) .* every logit would be NaN\. "
                                           r"Use a rope_theta above 1"):
        parse(small_text(rope_parameters={"rope_type": "default", "rope_theta": 1e-300}))


def test_a_rope_theta_whose_angles_overflow_within_the_context_is_an_error_naming_it():
    # The frequency 1e37 is a float32, but position 511 × 1e37 is not.
    with pytest.raises(MinqwenError, match=r"rope_theta' is 1e-74: .* within the context \(512 positions"):
        parse(small_text(rope_parameters={"rope_type": "default", "rope_theta": 1e-74}))


def test_the_angle_overflow_check_reaches_the_last_position_of_the_context():
    # head_dim 4, whole head rotated: frequencies 1 and 1e20. Position 2⁶¹ × 1e20 is a float32,
    # the last position 2⁶² − 1 (≈ 2⁶² in float32) × 1e20 = 4.6e38 is not — the check must go all the way.
    raw = small_text(head_dim=4, max_position_embeddings=2**62,
                     rope_parameters={"rope_type": "default", "rope_theta": 1e-40, "partial_rotary_factor": 1.0})
    assert np.isfinite(np.float32(2**61) * np.float32(1e20))
    with pytest.raises(MinqwenError, match=r"rope_theta' is 1e-40: .* within the context \(4611686018427387904 "
                                           r"positions"):
        parse(raw)


@pytest.mark.reference
@pytest.mark.parametrize("theta", [1.0, 0.5, 1e-20, 1e300], ids=str)
def test_a_rope_theta_transformers_computes_finite_frequencies_for_loads_with_its_frequencies(theta):
    # Odd, but finite in transformers 5.23.0 — so minqwen computes them too (1e300 gives a zero frequency).
    require_reference()
    import transformers
    from transformers.models.qwen3_5 import modeling_qwen3_5 as reference
    from minqwen.rope import inverse_frequencies

    raw = small_text(rope_parameters={"rope_type": "default", "rope_theta": theta, "partial_rotary_factor": 0.5})
    c = parse(raw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = transformers.Qwen3_5TextConfig(**copy.deepcopy(raw))
    expected, _ = reference.Qwen3_5TextRotaryEmbedding.compute_default_rope_parameters(config)
    assert np.array_equal(inverse_frequencies(c.rope_theta, c.rotary_dim), expected.numpy())


@pytest.mark.reference
@pytest.mark.parametrize("theta, rotary_dim", [(1e7, 64), (1e7, 128), (1e4, 16), (1e4, 64), (1e6, 32), (1e6, 64)])
def test_rotary_inverse_frequencies_are_rounded_as_transformers_rounds_them(theta, rotary_dim):
    # Rounded once from float64 instead, a third of them were a float32 step off, and the
    # angles position × inv_freq drifted apart at long positions (see test_reference_live).
    require_reference()
    import torch

    from minqwen.rope import inverse_frequencies

    expected = (1.0 / (theta ** (torch.arange(0, rotary_dim, 2, dtype=torch.float) / rotary_dim))).numpy()
    np.testing.assert_array_equal(inverse_frequencies(theta, rotary_dim), expected)


def test_mrope_interleaved_is_accepted_in_rope_parameters():
    rope = {"rope_type": "default", "mrope_section": [1, 1, 0], "mrope_interleaved": True}
    assert parse(small_text(rope_parameters=rope)).mrope_section == (1, 1, 0)


# ----------------------------------------------------------------------------- model types


@pytest.mark.parametrize("model_type", ["llama", "qwen3", "qwen3_next", "", None, ["qwen3_5"]], ids=str)
def test_an_unknown_model_type_is_an_error_naming_the_field_and_what_is_supported(model_type):
    raw = small_text(model_type=model_type)
    with pytest.raises(
        MinqwenError, match=rf"field 'model_type' is {re.escape(repr(model_type))}; .*'qwen3_5' or 'qwen3_5_text'"
    ):
        parse(raw)


def test_a_missing_model_type_is_an_error_naming_the_field():
    raw = small_text()
    del raw["model_type"]
    with pytest.raises(MinqwenError, match=r"field 'model_type' is None"):
        parse(raw)


# ----------------------------------------------------------------------------- mixture of experts


def small_moe(**overrides) -> dict:
    """A valid qwen3_5_moe_text config.json dict (the moe_text_per_expert_fp32 fixture's), with overrides."""
    raw = json.loads((FIXTURES / "moe_text_per_expert_fp32" / "config.json").read_text())
    raw.update(overrides)
    return raw


def moe_wrapped(text: dict, **top) -> dict:
    return {**wrapped(text, **top), "model_type": "qwen3_5_moe", "architectures": ["Qwen3_5MoeForConditionalGeneration"]}


def test_an_moe_text_config_reads_the_expert_fields():
    c = parse(small_moe(num_experts=6, num_experts_per_tok=3, moe_intermediate_size=20,
                        shared_expert_intermediate_size=28))
    assert c.is_moe
    assert (c.num_experts, c.num_experts_per_tok, c.moe_intermediate_size, c.shared_expert_intermediate_size) == (
        6, 3, 20, 28,
    )
    assert c.intermediate_size == 0  # there is no dense MLP


def test_a_dense_config_has_no_experts():
    c = parse(small_text())
    assert not c.is_moe
    assert (c.num_experts, c.num_experts_per_tok, c.moe_intermediate_size, c.shared_expert_intermediate_size) == (
        0, 0, 0, 0,
    )


def test_the_moe_wrapper_reads_the_text_model_from_text_config():
    text = small_moe(tie_word_embeddings=False)
    text["model_type"] = "qwen3_5_moe_text"
    assert parse(moe_wrapped(text)) == parse(text)


def test_the_moe_wrapper_needs_an_moe_text_model_inside():
    with pytest.raises(MinqwenError, match=r"text_config\.model_type is 'qwen3_5_text'; expected 'qwen3_5_moe_text'"):
        parse(moe_wrapped(small_text()))


def test_moe_defaults_equal_those_of_transformers_5_23():
    c = parse({"model_type": "qwen3_5_moe_text"})
    assert (c.num_experts, c.num_experts_per_tok, c.moe_intermediate_size, c.shared_expert_intermediate_size) == (
        256, 8, 512, 512,
    )
    assert (c.hidden_size, c.num_hidden_layers, c.num_key_value_heads, c.intermediate_size) == (2048, 40, 2, 0)
    assert (c.vocab_size, c.num_attention_heads, c.head_dim, c.linear_num_value_heads) == (248320, 16, 256, 32)


@pytest.mark.parametrize("field", ["num_experts", "num_experts_per_tok", "moe_intermediate_size",
                                   "shared_expert_intermediate_size"])
@pytest.mark.parametrize("value", [4.0, "4", None, True, [4]], ids=repr)
def test_an_expert_size_that_is_not_an_integer_is_an_error_naming_the_field(field, value):
    with pytest.raises(MinqwenError, match=rf"field '{field}' must be an integer, got {re.escape(repr(value))}"):
        parse(small_moe(**{field: value}))


@pytest.mark.parametrize("field", ["num_experts", "num_experts_per_tok", "moe_intermediate_size",
                                   "shared_expert_intermediate_size"])
def test_an_expert_size_below_one_is_an_error_naming_the_field(field):
    with pytest.raises(MinqwenError, match=rf"field '{field}' must be at least 1, got 0"):
        parse(small_moe(**{field: 0}))


def test_more_experts_per_token_than_experts_is_an_error_naming_both():
    with pytest.raises(MinqwenError, match=r"field 'num_experts_per_tok' \(5\) must be at most num_experts \(4\)"):
        parse(small_moe(num_experts_per_tok=5))


def test_top_k_may_equal_the_number_of_experts():
    assert parse(small_moe(num_experts_per_tok=4)).num_experts_per_tok == 4


@pytest.mark.parametrize(
    "field, value",
    [("mlp_only_layers", [0]), ("mlp_only_layers", [1, 3]), ("decoder_sparse_step", 2), ("norm_topk_prob", False)],
)
def test_an_moe_field_asking_for_dense_layers_or_unnormalised_weights_is_an_error_naming_it(field, value):
    # transformers 5.23.0 would silently build every layer MoE with renormalised weights: not
    # the model the field describes, so minqwen refuses rather than guess.
    with pytest.raises(MinqwenError, match=rf"field '{field}' is {re.escape(repr(value))}; transformers 5\.23\.0 "
                                           r"ignores it and builds every layer as a sparse MoE block"):
        parse(small_moe(**{field: value}))


def test_moe_fields_at_the_values_the_reference_implies_are_accepted_silently():
    c = parse(small_moe(mlp_only_layers=[], decoder_sparse_step=1, norm_topk_prob=True))
    assert c == parse(small_moe())
    # null names nothing, as an absent field (mlp_only_layers: null was refused as not [])
    assert parse(small_moe(mlp_only_layers=None, decoder_sparse_step=None, norm_topk_prob=None)) == c


def test_in_an_moe_config_intermediate_size_and_training_fields_are_ignored_silently():
    c = parse(small_moe(intermediate_size=1234, router_aux_loss_coef=0.5, output_router_logits=True))
    assert c == parse(small_moe())


# Two text_config fields of Qwen3.5's released configs that transformers 5.23.0 never reads: the
# values are those of Qwen/Qwen3.5-0.8B's and -2B's config.json (public copies: a logged download of
# the 0.8B's, and the 2B's as quoted verbatim from mlx-community/Qwen3.5-2B-mxfp4; mlp_only_layers: []
# is in Qwen3.5-397B-A17B's too); only these two fields are kept here.
RELEASE_TEXT_FIELDS = {"mamba_ssm_dtype": "float32", "mlp_only_layers": []}


@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
def test_the_text_fields_of_the_released_configs_load_without_a_warning(moe):
    text = small_moe() if moe else small_text()
    plain = parse(text)
    assert parse(dict(text, **RELEASE_TEXT_FIELDS)) == plain
    wrap = moe_wrapped if moe else wrapped
    assert parse(wrap(dict(text, **RELEASE_TEXT_FIELDS))) == parse(wrap(text))


def test_a_dense_config_naming_mlp_only_layers_is_the_same_dense_model_as_in_transformers():
    # transformers' dense Qwen3.5 gives every layer the SwiGLU MLP whatever the field holds.
    assert parse(small_text(mlp_only_layers=[0, 2])) == parse(small_text())


def test_expert_fields_in_a_dense_config_are_a_warning_naming_them():
    with pytest.warns(UserWarning, match=r"not used: moe_intermediate_size, num_experts$"):
        config_from_dict(small_text(num_experts=4, moe_intermediate_size=8), source="config.json")


def test_an_moe_config_round_trips_through_to_dict_and_a_dense_dict_has_no_expert_fields():
    c = parse(small_moe())
    d = c.to_dict()
    assert "intermediate_size" not in d and d["num_experts"] == 4
    section = d.pop("mrope_section")
    again = parse({"model_type": "qwen3_5_moe_text", "rope_parameters": {"mrope_section": section}, **d})
    assert again == c
    assert not set(parse(small_text()).to_dict()) & {"num_experts", "num_experts_per_tok", "moe_intermediate_size",
                                                     "shared_expert_intermediate_size"}


# ----------------------------------------------------------------------------- sizes and other fields


SIZE_FIELDS = [
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "max_position_embeddings", "linear_conv_kernel_dim",
    "linear_key_head_dim", "linear_value_head_dim", "linear_num_key_heads", "linear_num_value_heads",
]


@pytest.mark.parametrize("field", SIZE_FIELDS)
@pytest.mark.parametrize("value", [48.0, "48", None, True, [48]], ids=repr)
def test_a_size_that_is_not_an_integer_is_an_error_naming_the_field(field, value):
    with pytest.raises(MinqwenError, match=rf"field '{field}' must be an integer, got {re.escape(repr(value))}"):
        parse(small_text(**{field: value}))


@pytest.mark.parametrize("field", SIZE_FIELDS)
def test_a_size_below_one_is_an_error_naming_the_field(field):
    with pytest.raises(MinqwenError, match=rf"field '{field}' must be at least 1, got 0"):
        parse(small_text(**{field: 0}))


def test_num_attention_heads_not_a_multiple_of_num_key_value_heads_is_an_error_naming_both():
    with pytest.raises(
        MinqwenError, match=r"field 'num_attention_heads' \(5\) must be a multiple of num_key_value_heads \(2\)"
    ):
        parse(small_text(num_attention_heads=5))


def test_linear_num_value_heads_not_a_multiple_of_linear_num_key_heads_is_an_error_naming_both():
    with pytest.raises(
        MinqwenError, match=r"field 'linear_num_value_heads' \(3\) must be a multiple of linear_num_key_heads \(2\)"
    ):
        parse(small_text(linear_num_value_heads=3))


@pytest.mark.parametrize("act", ["silu", "swish", "gelu", "gelu_pytorch_tanh", "relu"])
def test_known_activations_are_accepted(act):
    assert parse(small_text(hidden_act=act)).hidden_act == act


@pytest.mark.parametrize("act", ["tanh", "SiLU", "", None, ["silu"]], ids=str)
def test_an_unknown_hidden_act_is_an_error_naming_the_field_and_the_known_ones(act):
    with pytest.raises(MinqwenError, match=rf"field 'hidden_act' is {re.escape(repr(act))}; minqwen knows silu, swish"):
        parse(small_text(hidden_act=act))


@pytest.mark.parametrize("field", ["tie_word_embeddings", "attention_bias"])
@pytest.mark.parametrize("value", [1, 0, "true", None], ids=repr)
def test_a_flag_that_is_not_a_boolean_is_an_error_naming_the_field(field, value):
    with pytest.raises(MinqwenError, match=rf"field '{field}' must be true or false, got {re.escape(repr(value))}"):
        parse(small_text(**{field: value}))


@pytest.mark.parametrize("value", ["1e-6", None, False], ids=repr)
def test_an_rms_norm_eps_that_is_not_a_number_is_an_error_naming_the_field(value):
    with pytest.raises(MinqwenError, match=r"field 'rms_norm_eps' must be a number"):
        parse(small_text(rms_norm_eps=value))


def test_an_rms_norm_eps_of_zero_is_accepted_as_transformers_accepts_it():
    assert parse(small_text(rms_norm_eps=0.0)).rms_norm_eps == 0.0


@pytest.mark.parametrize("value", [-1.0, float("nan"), float("inf")], ids=repr)
def test_an_rms_norm_eps_that_is_negative_or_not_finite_is_an_error_naming_the_field(value):
    # a negative eps turns some norms into NaN, and greedy decoding then quietly emits token 0
    with pytest.raises(MinqwenError, match=r"field 'rms_norm_eps' must be a finite number ≥ 0"):
        parse(small_text(rms_norm_eps=value))


def test_an_implausible_layer_count_is_an_error_before_anything_is_built_for_each_layer():
    raw = small_text(num_hidden_layers=10**9)
    raw.pop("layer_types", None)
    with pytest.raises(MinqwenError, match=r"field 'num_hidden_layers' is 1000000000; minqwen takes at most"):
        parse(raw)


@pytest.mark.parametrize("eos, expected", [(5, (5,)), ([5, 6], (5, 6)), (None, ()), ([], ())], ids=str)
def test_eos_token_id_is_an_integer_or_a_list_of_them(eos, expected):
    assert parse(small_text(eos_token_id=eos)).eos_token_id == expected


@pytest.mark.parametrize("eos", ["5", [5, "6"], [True], 5.0, {"id": 5}], ids=str)
def test_an_eos_token_id_that_is_not_integers_is_an_error_naming_the_field(eos):
    with pytest.raises(MinqwenError, match=r"field 'eos_token_id' must be an integer or a list of integers"):
        parse(small_text(eos_token_id=eos))


@pytest.mark.reference
@pytest.mark.parametrize("overrides", [{}, dict(linear_num_value_heads=6, linear_value_head_dim=4, head_dim=32,
                                                rope_parameters=dict(rope_theta=1e4, partial_rotary_factor=0.5))])
def test_derived_sizes_follow_the_reference(overrides):
    require_reference()
    import transformers
    from transformers.models.qwen3_5 import modeling_qwen3_5 as reference

    raw = small_text(**overrides)
    c = parse(raw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = transformers.Qwen3_5TextConfig(**copy.deepcopy(raw))
    deltanet = reference.Qwen3_5GatedDeltaNet(config, 0)  # its sizes, as the reference derives them
    assert (c.linear_key_dim, c.linear_value_dim, c.linear_conv_dim) == (deltanet.key_dim, deltanet.value_dim,
                                                                         deltanet.conv_dim)
    assert c.rotary_dim == 2 * reference.Qwen3_5TextRotaryEmbedding(config).inv_freq.shape[0]


# ----------------------------------------------------------------------------- unknown fields warn


def test_unknown_top_level_fields_give_one_warning_naming_them_all():
    raw = small_text(frobnicate=1, another_new_field=True)
    with pytest.warns(UserWarning, match=r"config fields minqwen does not know were not used: another_new_field, frobnicate"):
        c = config_from_dict(raw, source="config.json")
    assert c == parse(small_text())


def test_unknown_fields_in_text_config_and_the_wrapper_are_named_with_where_they_are():
    raw = wrapped(small_text(new_text_field=1), new_wrapper_field=2)
    with pytest.warns(UserWarning) as record:
        config_from_dict(raw, source="config.json")
    messages = [str(w.message) for w in record]
    assert any(m.endswith("not used: new_wrapper_field") for m in messages)
    assert any(m.endswith("not used: text_config.new_text_field") for m in messages)


def test_the_warning_names_the_config_file(tmp_path):
    path = write(tmp_path, small_text(frobnicate=1))
    with pytest.warns(UserWarning, match=re.escape(str(path)) + r": .*frobnicate"):
        load_config(path)


# ----------------------------------------------------------------------------- the file itself


def test_load_config_takes_the_folder_or_the_file(tmp_path):
    path = write(tmp_path, small_text())
    assert load_config(tmp_path) == load_config(path) == parse(small_text())
    assert load_config(tmp_path).source == str(path)


def test_a_folder_without_config_json_is_an_error_naming_the_missing_file(tmp_path):
    with pytest.raises(MinqwenError, match=re.escape(str(tmp_path / "config.json")) + r": no config.json here"):
        load_config(tmp_path)


@pytest.mark.parametrize(
    "text",
    ['{"model_type": "qwen3_5_text",', "", "not json", "{'model_type': 'qwen3_5_text'}", "[" * 100_000,
     '{"vocab_size": ' + "1" * 5000 + "}"],
    ids=["truncated", "empty", "words", "single-quotes", "deeply-nested", "enormous-integer"],
)
def test_invalid_json_is_an_error_naming_the_file(tmp_path, text):
    path = write(tmp_path, text)
    with pytest.raises(MinqwenError, match=re.escape(str(path)) + r": not valid JSON"):
        load_config(path)


def test_a_config_that_is_not_utf8_is_an_error_naming_the_file(tmp_path):
    path = tmp_path / "config.json"
    path.write_bytes(b'{"model_type": "\xff"}')
    with pytest.raises(MinqwenError, match=re.escape(str(path)) + r": not valid JSON"):
        load_config(path)


@pytest.mark.parametrize("value", [[], "qwen3_5_text", 1, None], ids=repr)
def test_a_config_that_is_not_a_json_object_is_an_error_naming_the_file(tmp_path, value):
    path = write(tmp_path, json.dumps(value))
    with pytest.raises(MinqwenError, match=re.escape(str(path)) + r": expected a JSON object at the top level"):
        load_config(path)


def test_errors_name_the_config_file_they_came_from(tmp_path):
    path = write(tmp_path, small_text(hidden_act="tanh"))
    with pytest.raises(MinqwenError, match=re.escape(str(path)) + r": field 'hidden_act'"):
        load_config(path)


def test_the_config_is_frozen_and_round_trips_through_to_dict():
    c = parse(small_text())
    with pytest.raises(AttributeError):
        c.hidden_size = 1  # type: ignore[misc]
    d = c.to_dict()
    assert "source" not in d
    assert json.loads(json.dumps(d)) == d
    # to_dict's rope_theta and partial_rotary_factor read back as the legacy top-level fields.
    section = d.pop("mrope_section")
    again = parse({"model_type": "qwen3_5_text", "rope_parameters": {"mrope_section": section}, **d})
    assert again == c


def test_the_field_tables_say_what_minqwen_does_with_every_field():
    for table in (TEXT_FIELDS, MOE_TEXT_FIELDS, WRAPPER_FIELDS):
        for name, what in table.items():
            assert re.match(r"(honoured|defaulted|ignored|metadata|reported)\b", what), (name, what)


# ----------------------------------------------------------------------------- against transformers


@pytest.mark.reference
def test_every_field_of_transformers_qwen3_5_text_config_is_listed_in_text_fields():
    require_reference()
    import transformers
    ref = transformers.Qwen3_5TextConfig
    # The dataclass fields PreTrainedConfig itself declares are generic to every model and not
    # required here: transformers_version, architectures, output_hidden_states, return_dict,
    # dtype, chunk_size_feed_forward, is_encoder_decoder, id2label, label2id, problem_type, and
    # the class-level settings (base_config_key, sub_configs_defaults, attribute_map,
    # base_model_*_plan, _auto_class, extra_files, extra_config_files, model_type).
    generic = set(transformers.PreTrainedConfig.__dataclass_fields__)
    own = {name for name in ref.__dataclass_fields__ if name not in generic}
    assert own, "transformers changed how config fields are declared"
    assert sorted(own - set(TEXT_FIELDS)) == []

    # What save_pretrained writes for a text model (fields that differ from PreTrainedConfig's defaults).
    saved = set(ref(num_hidden_layers=4).to_diff_dict())
    assert sorted(saved - set(TEXT_FIELDS)) == []

    # Legacy keyword arguments the reference's __post_init__ reads (full_attention_interval, …).
    legacy = set(re.findall(r"kwargs\.(?:pop|get|setdefault)\(\s*[\"'](\w+)[\"']", inspect.getsource(ref.__post_init__)))
    assert legacy, "transformers' Qwen3_5TextConfig.__post_init__ no longer reads legacy kwargs"
    assert sorted(legacy - set(TEXT_FIELDS)) == []


@pytest.mark.reference
def test_every_field_of_transformers_qwen3_5_config_is_listed_in_wrapper_fields():
    require_reference()
    import transformers
    generic = set(transformers.PreTrainedConfig.__dataclass_fields__)
    own = {name for name in transformers.Qwen3_5Config.__dataclass_fields__ if name not in generic}
    assert sorted(own - set(WRAPPER_FIELDS)) == []


@pytest.mark.reference
def test_every_field_of_transformers_moe_configs_is_listed_in_the_moe_tables():
    require_reference()
    import transformers
    generic = set(transformers.PreTrainedConfig.__dataclass_fields__)
    ref = transformers.Qwen3_5MoeTextConfig
    own = {name for name in ref.__dataclass_fields__ if name not in generic}
    assert {"num_experts", "num_experts_per_tok", "moe_intermediate_size", "shared_expert_intermediate_size"} <= own
    assert sorted(own - set(MOE_TEXT_FIELDS)) == []
    assert sorted(set(ref(num_hidden_layers=4).to_diff_dict()) - set(MOE_TEXT_FIELDS)) == []
    legacy = set(re.findall(r"kwargs\.(?:pop|get|setdefault)\(\s*[\"'](\w+)[\"']", inspect.getsource(ref.__post_init__)))
    assert sorted(legacy - set(MOE_TEXT_FIELDS)) == []
    wrapper = {name for name in transformers.Qwen3_5MoeConfig.__dataclass_fields__ if name not in generic}
    assert sorted(wrapper - set(WRAPPER_FIELDS)) == []


@pytest.mark.reference
@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"num_experts": 6, "num_experts_per_tok": 6, "moe_intermediate_size": 24, "shared_expert_intermediate_size": 8},
        {"num_hidden_layers": 6, "full_attention_interval": 3, "num_experts": 1, "num_experts_per_tok": 1},
    ],
    ids=["defaults", "top-k-all", "one-expert"],
)
def test_an_moe_config_read_by_transformers_and_by_minqwen_agree(overrides):
    require_reference()
    import transformers
    ref = transformers.Qwen3_5MoeTextConfig(**copy.deepcopy(overrides))
    ours = parse({"model_type": "qwen3_5_moe_text", **copy.deepcopy(overrides)})
    moe_sizes = ["num_experts", "num_experts_per_tok", "moe_intermediate_size", "shared_expert_intermediate_size"]
    for name in [f for f in SIZE_FIELDS if f != "intermediate_size"] + moe_sizes + ["hidden_act", "rms_norm_eps"]:
        assert getattr(ours, name) == getattr(ref, name), name
    assert list(ours.layer_types) == ref.layer_types


@pytest.mark.reference
@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"num_hidden_layers": 6, "full_attention_interval": 3},
        {"rope_theta": 5e5, "partial_rotary_factor": 0.5},
        {"rope_parameters": {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 3, 3]}},
        {"tie_word_embeddings": True, "attention_bias": True, "hidden_act": "gelu", "eos_token_id": [1, 2]},
    ],
    ids=["defaults", "interval-3", "legacy-rope", "rope-parameters", "flags"],
)
def test_a_config_read_by_transformers_and_by_minqwen_agree(overrides):
    require_reference()
    import transformers
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = transformers.Qwen3_5TextConfig(**copy.deepcopy(overrides))
    ours = parse({"model_type": "qwen3_5_text", **copy.deepcopy(overrides)})
    for name in SIZE_FIELDS + ["hidden_act", "rms_norm_eps", "tie_word_embeddings", "attention_bias"]:
        assert getattr(ours, name) == getattr(ref, name), name
    assert list(ours.layer_types) == ref.layer_types
    rope = ref.rope_parameters
    assert ours.rope_theta == rope["rope_theta"]
    assert ours.partial_rotary_factor == rope.get("partial_rotary_factor", 0.25)
    assert ours.mrope_section == tuple(rope.get("mrope_section", [11, 11, 10]))
    eos = ref.eos_token_id
    assert ours.eos_token_id == (() if eos is None else tuple(eos) if isinstance(eos, list) else (eos,))
