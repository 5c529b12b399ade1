"""YaRN rotary scaling, against transformers 5.23.0."""

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import minqwen
from conftest import (FLOAT32_SANITY, assert_logits_match_reference, judge_in_float64, minqwen_steps,
                      reference_steps, require_reference)
from minqwen import MinqwenError
from minqwen.config import YarnScaling, config_from_dict
from minqwen.rope import yarn_inverse_frequencies

pytestmark = pytest.mark.reference


def text_config(rope, **overrides):
    cfg = dict(
        vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        layer_types=["linear_attention", "full_attention"], num_attention_heads=2, num_key_value_heads=1,
        head_dim=16, linear_num_key_heads=1, linear_num_value_heads=2, linear_key_head_dim=8,
        linear_value_head_dim=8, linear_conv_kernel_dim=4, max_position_embeddings=256, rope_parameters=rope,
    )
    cfg.update(overrides)
    return cfg


yarn_parameters = st.fixed_dictionaries(
    {"rope_type": st.just("yarn"), "factor": st.sampled_from([2.0, 4.0, 8.0, 32.0]),
     "rope_theta": st.sampled_from([1e4, 1e6, 1e7]), "partial_rotary_factor": st.sampled_from([0.25, 0.5, 1.0])},
    optional={"original_max_position_embeddings": st.sampled_from([16, 64, 4096]),
              "attention_factor": st.floats(0.5, 2.0), "beta_fast": st.sampled_from([16.0, 32.0, 64.0]),
              "beta_slow": st.sampled_from([0.5, 1.0, 2.0]), "mscale": st.sampled_from([0.5, 0.707, 1.0]),
              "mscale_all_dim": st.sampled_from([0.5, 1.0]), "truncate": st.booleans()},
)


@settings(max_examples=60, deadline=None)
@given(rope=yarn_parameters, head_dim=st.sampled_from([16, 64, 256]))
def test_yarn_frequencies_and_attention_factor_match_transformers(rope, head_dim):
    require_reference()
    from transformers import Qwen3_5TextConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    reference = Qwen3_5TextConfig(**text_config(dict(rope), head_dim=head_dim))
    inv_freq, factor = ROPE_INIT_FUNCTIONS["yarn"](reference)
    ours = config_from_dict(dict(text_config(dict(rope), head_dim=head_dim), model_type="qwen3_5_text"))
    got, got_factor = yarn_inverse_frequencies(ours.rope_theta, ours.rotary_dim, ours.yarn)
    np.testing.assert_allclose(got, inv_freq.numpy(), rtol=2e-7)
    assert got_factor == pytest.approx(factor, rel=1e-12)


@pytest.mark.parametrize("rope", [
    {"original_max_position_embeddings": 262144},
    {"original_max_position_embeddings": 4096, "beta_slow": 0.01},
], ids=["long-original", "tiny-beta_slow"])
def test_a_yarn_ramp_ending_past_the_middle_frequency_matches_transformers(rope):
    # The ramp's far end, correction_dim(beta_slow) = R·ln(orig / (2π·beta_slow)) / (2·ln theta),
    # is clamped to R − 1 (in transformers as here). The drawn configs keep it below R/2, where
    # a clamp at R/2 − 1 (the last frequency index) would agree; these put it past R/2.
    require_reference()
    import math

    from transformers import Qwen3_5TextConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    rope = dict({"rope_type": "yarn", "rope_theta": 1e4, "factor": 8.0, "partial_rotary_factor": 1.0}, **rope)
    rotary = 16
    original, beta_slow = rope["original_max_position_embeddings"], rope.get("beta_slow", 1.0)
    far_end = rotary * math.log(original / (2 * math.pi * beta_slow)) / (2 * math.log(rope["rope_theta"]))
    assert far_end > rotary / 2  # the case this test is for
    text = text_config(rope, max_position_embeddings=original * 8)
    inv_freq, factor = ROPE_INIT_FUNCTIONS["yarn"](Qwen3_5TextConfig(**text))
    ours = config_from_dict(dict(text, model_type="qwen3_5_text"))
    assert ours.rotary_dim == rotary
    got, got_factor = yarn_inverse_frequencies(ours.rope_theta, ours.rotary_dim, ours.yarn)
    np.testing.assert_allclose(got, inv_freq.numpy(), rtol=2e-7)
    assert got_factor == pytest.approx(factor, rel=1e-12)


@pytest.mark.parametrize("rope", [
    {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0, "beta_fast": 0, "beta_slow": 0},
    {"rope_type": "yarn", "rope_theta": 1e4, "factor": None},
    {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0},
], ids=["betas-zero", "factor-null", "truncate-absent"])
def test_yarn_fields_left_to_their_defaults_give_transformers_frequencies(rope):
    require_reference()
    from transformers import Qwen3_5TextConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    rope = dict(rope, partial_rotary_factor=0.5, original_max_position_embeddings=64)
    reference = Qwen3_5TextConfig(**text_config(dict(rope)))
    inv_freq, factor = ROPE_INIT_FUNCTIONS["yarn"](reference)
    ours = config_from_dict(dict(text_config(dict(rope)), model_type="qwen3_5_text"))
    got, got_factor = yarn_inverse_frequencies(ours.rope_theta, ours.rotary_dim, ours.yarn)
    np.testing.assert_allclose(got, inv_freq.numpy(), rtol=2e-7)
    assert got_factor == pytest.approx(factor, rel=1e-12)


def test_a_config_with_both_rope_scaling_and_rope_parameters_reads_what_transformers_reads():
    require_reference()
    from transformers import Qwen3_5TextConfig

    fields = text_config({"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.25},
                         rope_scaling={"rope_type": "default", "rope_theta": 5e5, "partial_rotary_factor": 0.5})
    reference = Qwen3_5TextConfig.from_dict(dict(fields)).rope_parameters
    ours = config_from_dict(dict(fields, model_type="qwen3_5_text"))
    assert (ours.rope_theta, ours.partial_rotary_factor) == (reference["rope_theta"], reference["partial_rotary_factor"])


def test_mscale_alone_changes_nothing_and_with_mscale_all_dim_it_does():
    base = YarnScaling(factor=4.0, original_max_position_embeddings=64)
    _, plain = yarn_inverse_frequencies(1e4, 32, base)
    _, alone = yarn_inverse_frequencies(1e4, 32, YarnScaling(factor=4.0, original_max_position_embeddings=64, mscale=0.7))
    _, both = yarn_inverse_frequencies(1e4, 32, YarnScaling(factor=4.0, original_max_position_embeddings=64,
                                                            mscale=0.7, mscale_all_dim=1.0))
    assert alone == plain and both != plain


@settings(max_examples=8, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(rope=yarn_parameters, length=st.sampled_from([10, 40]), seed=st.integers(0, 1000))
def test_yarn_models_match_transformers_below_and_above_the_original_context(tmp_path_factory, rope, length, seed):
    reference = require_reference()

    rope = dict(rope, original_max_position_embeddings=16)  # 10 tokens below it, 40 above
    text = text_config(rope)
    model = reference.build_model(text, seed)
    folder = tmp_path_factory.mktemp("yarn")
    reference.save_checkpoint(model, folder)
    ids = np.random.default_rng(seed).integers(0, 97, size=length)
    # The prompt's logits within 1e-4, or past it judged in float64 (as the live lane's).
    assert_logits_match_reference(reference, model, minqwen.load(folder), ids, length, f"{rope}, {length} tokens")


def test_a_yarn_miss_is_judged_in_float64_and_a_slightly_wrong_attention_factor_still_fails(tmp_path, monkeypatch):
    # The judge itself, on a fixed model 40 tokens long, past its original context of 16.
    reference = require_reference()
    import minqwen.model

    rope = dict(rope_type="yarn", factor=4.0, rope_theta=1e4, partial_rotary_factor=0.5,
                original_max_position_embeddings=16)
    model = reference.build_model(text_config(rope), 3)
    reference.save_checkpoint(model, tmp_path)
    ids = np.random.default_rng(3).integers(0, 97, size=40)
    expected = reference_steps(model, ids, 40)
    ours = minqwen.load(tmp_path)
    judge_in_float64(reference, model, ours, ids, 40, minqwen_steps(ours, ids, 40), expected, "YaRN")

    # An attention factor 1e-4 too large, in every Model built from here on (the judge's float64
    # copy too): float32's sanity bound lets it through, the float64 judge does not.
    def attention_factor_off(theta, rotary_dim, yarn):
        inv_freq, factor = yarn_inverse_frequencies(theta, rotary_dim, yarn)
        return inv_freq, factor * 1.0001

    monkeypatch.setattr(minqwen.model, "yarn_inverse_frequencies", attention_factor_off)
    ours = minqwen.load(tmp_path)
    off = minqwen_steps(ours, ids, 40)
    assert np.abs(off[0] - expected[0]).max() < FLOAT32_SANITY
    with pytest.raises(AssertionError, match="float64, step 0 of YaRN"):
        judge_in_float64(reference, model, ours, ids, 40, off, expected, "YaRN")


def test_yarn_is_static_the_same_frequencies_at_every_position(tmp_path, monkeypatch):
    import json
    import shutil

    import minqwen.model
    from conftest import FIXTURES
    from minqwen.rope import inverse_frequencies

    folder = tmp_path / "yarn"
    shutil.copytree(FIXTURES / "text_tied_fp32", folder)
    config = json.loads((folder / "config.json").read_text())
    config["rope_parameters"].update(rope_type="yarn", factor=4.0, original_max_position_embeddings=16)
    (folder / "config.json").write_text(json.dumps(config))
    model = minqwen.load(folder)
    c = model.config
    assert c.yarn.factor == 4.0 and c.yarn.beta_fast == 32.0 and c.yarn.truncate is True  # the defaults
    yarn_inv_freq, yarn_factor = yarn_inverse_frequencies(c.rope_theta, c.rotary_dim, c.yarn)
    assert not np.allclose(yarn_inv_freq, inverse_frequencies(c.rope_theta, c.rotary_dim))  # YaRN changes them

    calls = []  # (last position, inv_freq, attention factor) of every rotary table the model builds
    build = minqwen.model.mrope_cos_sin

    def spy(position_ids, inv_freq, section, factor, dtype):
        calls.append((int(position_ids.max()), inv_freq, factor))
        return build(position_ids, inv_freq, section, factor, dtype)

    monkeypatch.setattr(minqwen.model, "mrope_cos_sin", spy)
    cache = model.new_cache()
    model.forward(list(range(1, 9)), cache)  # positions 0 … 7, inside the original context
    for token in range(1, 15):  # one at a time up to position 21, past it
        model.forward([token], cache)
    assert calls[0][0] < 16 <= calls[-1][0]
    for _, inv_freq, factor in calls:  # a dynamic YaRN would switch tables at position 16
        np.testing.assert_array_equal(inv_freq, yarn_inv_freq)
        assert factor == yarn_factor


@pytest.mark.parametrize("bad, message", [
    ({"rope_type": "yarn", "factor": -1.0}, "factor"),
    ({"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 0}, "original_max_position_embeddings"),
    # 0 is not "absent": a factor of 0 divides the slow frequencies by 0, an attention factor of 0 zeroes
    # every rotated dim (transformers computes NaN or silently wrong scores); neither may fall back to a default.
    ({"rope_type": "yarn", "factor": 0}, r"'rope_parameters\.factor' must be a positive finite number, got 0"),
    ({"rope_type": "yarn", "factor": 2.0, "attention_factor": 0.0},
     r"'rope_parameters\.attention_factor' must be a positive finite number, got 0\.0"),
    ({"rope_type": "yarn", "factor": 2.0, "truncate": "yes"}, "truncate"),
    ({"rope_type": "yarn", "factor": 2.0, "bogus": 1}, "bogus"),
    ({"rope_type": "linear", "factor": 2.0}, "'linear'"),
])
def test_bad_rope_scaling_fields_are_clear_errors(bad, message):
    with pytest.raises(MinqwenError, match=message):
        config_from_dict(dict(text_config(bad), model_type="qwen3_5_text"))


def yarn(**fields):
    return dict({"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}, **fields)


@pytest.mark.parametrize("rope, message", [
    (yarn(beta_fast=-1.0), r"field 'rope_parameters\.beta_fast' is -1; it counts rotations .* must be positive; "
                           r"0 or absent means 32"),
    (yarn(beta_slow=-1.0), r"field 'rope_parameters\.beta_slow' is -1; .* must be positive; 0 or absent means 1"),
    (yarn(rope_theta=1), r"field 'rope_parameters\.rope_theta' is 1; YaRN .* log\(rope_theta\), which is 0 .* "
                         r"above 1"),
    (yarn(rope_theta=1e-300), r"field 'rope_parameters\.rope_theta' is 1e-300: the rotary frequencies .* NaN"),
    (yarn(factor=1e-300), r"field 'rope_parameters\.factor' is 1e-300: YaRN divides the slow frequencies by it, "
                          r".* 1 or more"),
    (yarn(factor=10**400), r"field 'rope_parameters\.factor' must be a positive finite number"),
    # with factor e, 0.1 · (−10) · ln(e) + 1 = 0: the attention factor's denominator
    (yarn(factor=np.e, mscale=1.0, mscale_all_dim=-10.0), r"field 'rope_parameters\.mscale_all_dim' is -10: .* "
                                                          r"which is 0"),
    (yarn(mscale=-10.0, mscale_all_dim=1.0), r"fields 'rope_parameters\.mscale' \(-10\) and 'mscale_all_dim' \(1\) "
                                             r"give YaRN an attention factor of -0\.339.* above 0"),
    (yarn(attention_factor=1e300), r"field 'rope_parameters\.attention_factor' is 1e\+300; .* grow by its square"),
    (yarn(beta_fast=5e-324), r"fields 'rope_parameters\.beta_fast' \(4\.94066e-324\), 'beta_slow' \(1\) and "
                             r"'original_max_position_embeddings' \(256\) put the ends of YaRN's ramp"),
    (yarn(original_max_position_embeddings=10**400), r"'original_max_position_embeddings' \(10{400}\) put the ends"),
], ids=["beta_fast<0", "beta_slow<0", "theta=1", "theta tiny", "factor tiny", "factor huge int", "mscale_all_dim",
        "attention<0", "attention huge", "beta tiny", "original huge"])
@pytest.mark.filterwarnings("ignore::UserWarning")  # a factor below 1, betas swapped: warned about first
def test_yarn_fields_that_would_crash_or_give_nan_logits_are_errors_naming_them(rope, message):
    with pytest.raises(MinqwenError, match=message):
        config_from_dict(dict(text_config(rope), model_type="qwen3_5_text"))


@pytest.mark.parametrize("rope, warned", [
    (yarn(factor=0.5), r"field 'rope_parameters\.factor' is 0\.5, below 1"),
    (yarn(beta_fast=1.0, beta_slow=4.0), r"field 'rope_parameters\.beta_fast' \(1\) is below beta_slow \(4\)"),
    (yarn(rope_theta=0.5), None),
    (yarn(factor=1e300), None),  # slow frequencies become 0: finite
], ids=["factor<1", "betas swapped", "theta<1", "factor huge"])
def test_yarn_fields_transformers_warns_about_but_computes_are_computed_the_same(rope, warned):
    require_reference()
    import warnings

    from transformers import Qwen3_5TextConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    text = text_config(dict(rope, partial_rotary_factor=1.0))
    if warned:
        with pytest.warns(UserWarning, match=warned):
            ours = config_from_dict(dict(text, model_type="qwen3_5_text"))
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            ours = config_from_dict(dict(text, model_type="qwen3_5_text"))
    inv_freq, factor = ROPE_INIT_FUNCTIONS["yarn"](Qwen3_5TextConfig(**text))
    with np.errstate(over="ignore"):  # factor 1e300 is inf in float32, as in the reference
        got, got_factor = yarn_inverse_frequencies(ours.rope_theta, ours.rotary_dim, ours.yarn)
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, inv_freq.numpy(), rtol=2e-7)
    assert got_factor == pytest.approx(factor, rel=1e-12)


def test_a_checkpoint_whose_yarn_fields_give_nan_logits_fails_to_load_naming_its_config(tmp_path):
    import json
    import shutil

    from conftest import FIXTURES

    folder = tmp_path / "yarn"
    shutil.copytree(FIXTURES / "text_tied_fp32", folder)
    config = json.loads((folder / "config.json").read_text())
    config["rope_parameters"].update(rope_type="yarn", factor=4.0, attention_factor=1e300)
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(MinqwenError, match=r"yarn/config\.json: field 'rope_parameters\.attention_factor' is 1e\+300"):
        minqwen.load(folder)
