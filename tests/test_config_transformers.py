"""config.json read as transformers 5.23.0 reads it: what the *model* uses, compared field by field.

Every test writes one config.json and reads it with transformers (AutoConfig.from_pretrained, or the
model's from_pretrained: what a user of transformers gets) and with minqwen: legacy names and
places (top-level rope fields, rope_scaling, original_max_position_embeddings, a vision
rope_theta), nulls and absent sub-configs, the wrappers' tying and eos, YaRN through the file,
and the vision config's old spellings.
"""

from __future__ import annotations

import copy
import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest

import minqwen
from conftest import ROOT, require_reference
from minqwen.config import load_config
from minqwen.rope import inverse_frequencies, yarn_inverse_frequencies

pytestmark = pytest.mark.reference

VISION_FIXTURE = ROOT / "tests" / "fixtures_vision" / "vision_fp32"
L, F = "linear_attention", "full_attention"

# A tiny dense text config (the shapes of tools/make_fixtures.py's base()).
TINY = dict(
    vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
    num_key_value_heads=1, head_dim=16, hidden_act="silu", max_position_embeddings=4096, rms_norm_eps=1e-6,
    attention_bias=False, linear_conv_kernel_dim=4, linear_key_head_dim=8, linear_value_head_dim=8,
    linear_num_key_heads=2, linear_num_value_heads=2, tie_word_embeddings=False, layer_types=[L, F],
    rope_parameters=dict(rope_type="default", rope_theta=10000.0, partial_rotary_factor=1.0),
)
TINY_MOE = {k: v for k, v in TINY.items() if k != "intermediate_size"}
TINY_MOE.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, shared_expert_intermediate_size=24)


def quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


def write_config(folder: Path, raw: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(raw))
    return folder


def hf_config(folder: Path):
    """What transformers' from_pretrained reads from this folder's config.json."""
    require_reference()
    from transformers import AutoConfig
    return quiet(AutoConfig.from_pretrained, folder)


def hf_text_rotary(text_config):
    """The text model's rotary embedding exactly as transformers builds it (inv_freq, attention scaling)."""
    from transformers.models.qwen3_5.modeling_qwen3_5 import Qwen3_5TextRotaryEmbedding
    rot = Qwen3_5TextRotaryEmbedding(text_config)
    return rot.inv_freq.numpy(), float(rot.attention_scaling)


def ours_rotary(c):
    if c.yarn is None:
        return inverse_frequencies(c.rope_theta, c.rotary_dim), 1.0
    freqs, factor = yarn_inverse_frequencies(c.rope_theta, c.rotary_dim, c.yarn)
    return np.asarray(freqs), float(factor)


def logits_both_ways(folder: Path, ids: np.ndarray):
    """(minqwen logits, transformers logits) of the checkpoint in folder, each loaded from disk."""
    reference = require_reference()
    import torch
    hf = reference.load_pretrained(folder)
    with torch.no_grad():
        expected = hf(input_ids=torch.tensor(ids[None])).logits[0].numpy()
    ours = quiet(minqwen.load, folder).forward(ids)
    return ours, expected


# ==================================================================================== where they once differed


YARN = dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=2048, rope_theta=10000.0,
            partial_rotary_factor=1.0)


def test_top_level_original_max_position_embeddings_overrides_the_yarn_one_as_in_transformers(tmp_path):
    raw = dict(TINY, model_type="qwen3_5_text", rope_parameters=dict(YARN), original_max_position_embeddings=16)
    text = hf_config(write_config(tmp_path, raw))
    ref_freqs, ref_scale = hf_text_rotary(text)
    ours = quiet(load_config, tmp_path)
    freqs, scale = ours_rotary(ours)
    np.testing.assert_allclose(freqs, ref_freqs, rtol=1e-6)
    assert scale == pytest.approx(ref_scale)


def test_top_level_original_max_position_embeddings_logits_match_transformers(tmp_path):
    reference = require_reference()
    text = dict(TINY, rope_parameters=dict(YARN))
    model = reference.build_model(text, seed=3)
    reference.save_checkpoint(model, tmp_path, extra_config={"original_max_position_embeddings": 16})
    ids = np.random.default_rng(3).integers(0, 97, size=40)
    ours, expected = logits_both_ways(tmp_path, ids)
    np.testing.assert_allclose(ours, expected, rtol=0, atol=1e-4)


def _hf_generation_eos(folder: Path):
    """The eos ids transformers' generate() stops on for a checkpoint without generation_config.json."""
    require_reference()
    from transformers import GenerationConfig
    eos = GenerationConfig.from_model_config(hf_config(folder)).eos_token_id
    return () if eos is None else tuple(eos) if isinstance(eos, list) else (eos,)


@pytest.mark.parametrize("inner", [5, [5, 6], None], ids=["inner-5", "inner-list", "inner-null"])
def test_in_the_wrapper_the_top_level_eos_wins_as_in_transformers_generation(tmp_path, inner):
    raw = {"model_type": "qwen3_5", "eos_token_id": 7,
           "text_config": dict(TINY, model_type="qwen3_5_text", eos_token_id=inner)}
    write_config(tmp_path, raw)
    expected = _hf_generation_eos(tmp_path)
    assert expected == (7,)  # what transformers' generate() stops on
    assert quiet(load_config, tmp_path).eos_token_id == expected


def test_a_null_top_level_partial_rotary_factor_rotates_the_whole_head_as_in_transformers(tmp_path):
    raw = dict(TINY, model_type="qwen3_5_text", partial_rotary_factor=None)
    raw.pop("rope_parameters")
    text = hf_config(write_config(tmp_path, raw))
    ref_freqs, _ = hf_text_rotary(text)
    freqs, _ = ours_rotary(quiet(load_config, tmp_path))
    np.testing.assert_allclose(freqs, ref_freqs, rtol=1e-6)


def test_a_default_rope_with_a_leftover_factor_is_plain_rotary_as_in_transformers(tmp_path):
    raw = dict(TINY, model_type="qwen3_5_text",
               rope_parameters=dict(rope_type="default", rope_theta=1e6, partial_rotary_factor=0.5, factor=2.0))
    text = hf_config(write_config(tmp_path, raw))
    ref_freqs, _ = hf_text_rotary(text)
    freqs, _ = ours_rotary(quiet(load_config, tmp_path))
    np.testing.assert_allclose(freqs, ref_freqs, rtol=1e-6)


def test_a_partial_rotary_factor_not_dividing_head_dim_rotates_the_floor_as_in_transformers(tmp_path):
    # 16 × 0.55 = 8.8: transformers rotates int(8.8) = 8 dims (4 frequencies). Rounding instead
    # would ask for 9, an odd count, and refuse a config transformers runs.
    raw = dict(TINY, model_type="qwen3_5_text",
               rope_parameters=dict(rope_type="default", rope_theta=1e4, partial_rotary_factor=0.55))
    text = hf_config(write_config(tmp_path, raw))
    ref_freqs, _ = hf_text_rotary(text)
    c = quiet(load_config, tmp_path)
    assert c.rotary_dim == 2 * len(ref_freqs)
    np.testing.assert_allclose(ours_rotary(c)[0], ref_freqs, rtol=1e-6)


# ------------------------------------------------------------------------------------- vision


def _vision_features_both_ways(folder: Path):
    """(minqwen tower features, transformers image features) for the fixture's first image."""
    reference = require_reference()
    import torch
    from safetensors.numpy import load_file
    from minqwen import vision
    from minqwen.image import preprocess
    expected = load_file(str(VISION_FIXTURE / "expected.safetensors"))
    image = expected[sorted(k for k in expected if k.startswith("image."))[0]]
    tower = quiet(vision.load_vision, folder)
    features, grid = tower.encode_images([image])
    pixel_values = preprocess(image, tower.preprocessor)[0]
    hf = reference.load_pretrained(folder)
    with torch.no_grad():
        ref = hf.model.get_image_features(torch.from_numpy(pixel_values), torch.from_numpy(np.asarray(grid)),
                                          return_dict=True).pooler_output
    ref = torch.cat(list(ref)) if isinstance(ref, (list, tuple)) else ref
    return features, ref.numpy()


def _vision_checkpoint(tmp_path: Path, change) -> Path:
    folder = tmp_path / "ckpt"
    shutil.copytree(VISION_FIXTURE, folder)
    cfg = json.loads((folder / "config.json").read_text())
    change(cfg["vision_config"])
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder


def test_the_vision_fixture_features_match_transformers_as_a_baseline(tmp_path):
    ours, ref = _vision_features_both_ways(_vision_checkpoint(tmp_path, lambda v: None))
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-4)


def test_a_legacy_vision_rope_theta_is_used_as_in_transformers(tmp_path):
    def change(v):
        v.pop("rope_parameters")
        v["rope_theta"] = 50.0
    ours, ref = _vision_features_both_ways(_vision_checkpoint(tmp_path, change))
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-4)


def test_a_vision_rope_type_default_is_read_as_axial_as_in_transformers(tmp_path):
    folder = _vision_checkpoint(tmp_path, lambda v: v.update(rope_parameters={"rope_type": "default",
                                                                              "rope_theta": 10000.0}))
    ours, ref = _vision_features_both_ways(folder)
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-4)


def test_an_old_moe_vision_model_type_is_accepted_as_in_transformers(tmp_path):
    from minqwen.vision import vision_config_from_dict
    vision = dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=32, patch_size=4,
                  temporal_patch_size=2, spatial_merge_size=2, num_position_embeddings=16, model_type="qwen3_5_moe")
    raw = {"model_type": "qwen3_5_moe", "text_config": dict(TINY_MOE, model_type="qwen3_5_moe_text"),
           "vision_config": vision, "vision_start_token_id": 90, "vision_end_token_id": 91, "image_token_id": 92,
           "video_token_id": 93}  # inside the tiny vocabulary
    ref = hf_config(write_config(tmp_path, raw)).vision_config
    ours = quiet(vision_config_from_dict, copy.deepcopy(raw), 32, 97)
    for name in ("depth", "hidden_size", "intermediate_size", "num_heads", "patch_size", "out_hidden_size"):
        assert getattr(ours, name) == getattr(ref, name), name


# ==================================================================================== where they agree


@pytest.mark.parametrize("wrapper", ["qwen3_5", "qwen3_5_moe"])
@pytest.mark.parametrize("inner", [True, False, None], ids=["text-true", "text-false", "text-absent"])
@pytest.mark.parametrize("top", [True, False, None], ids=["top-true", "top-false", "top-absent"])
def test_wrapper_tying_is_what_transformers_model_ties(tmp_path, wrapper, inner, top):
    """test_config.py hard-codes the rule (dense wrapper only); here transformers' model decides, both wrappers."""
    require_reference()
    import transformers
    text = dict(TINY_MOE if wrapper == "qwen3_5_moe" else TINY, model_type=wrapper + "_text")
    text.pop("tie_word_embeddings")
    if inner is not None:
        text["tie_word_embeddings"] = inner
    raw = {"model_type": wrapper, "text_config": text,
           "vision_config": dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=32,
                                 patch_size=4, num_position_embeddings=16)}
    if top is not None:
        raw["tie_word_embeddings"] = top
    config = hf_config(write_config(tmp_path, raw))
    cls = (transformers.Qwen3_5MoeForConditionalGeneration if wrapper == "qwen3_5_moe"
           else transformers.Qwen3_5ForConditionalGeneration)
    model = quiet(cls, config)
    tied = model.lm_head.weight.data_ptr() == model.model.language_model.embed_tokens.weight.data_ptr()
    assert quiet(load_config, tmp_path).tie_word_embeddings is tied


@pytest.mark.parametrize("raw", [
    dict(TINY, model_type="qwen3_5_text", layer_types=None, num_hidden_layers=6, full_attention_interval=3),
    dict(TINY, model_type="qwen3_5_text", rope_parameters=None, rope_theta=5e5, partial_rotary_factor=0.5),
    dict(TINY, model_type="qwen3_5_text", rope_scaling=None),
    dict(TINY, model_type="qwen3_5_text", rope_scaling={}, rope_parameters=dict(rope_type="default", rope_theta=3e5)),
    dict(TINY, model_type="qwen3_5_text"),
    {"model_type": "qwen3_5", "text_config": None},
    {"model_type": "qwen3_5_moe", "text_config": None},
    {"model_type": "qwen3_5_moe"},
], ids=["layer_types-null", "rope_parameters-null+legacy", "rope_scaling-null", "rope_scaling-empty",
        "tiny", "wrapper-text_config-null", "moe-wrapper-text_config-null", "moe-wrapper-absent"])
def test_json_nulls_and_absent_sub_configs_read_as_transformers_reads_them(tmp_path, raw):
    """A JSON null that transformers treats as absent; through from_pretrained, both wrappers."""
    config = hf_config(write_config(tmp_path, raw))
    text = getattr(config, "text_config", config)
    ours = quiet(load_config, tmp_path)
    for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                 "head_dim", "linear_num_value_heads", "max_position_embeddings"):
        assert getattr(ours, name) == getattr(text, name), name
    if ours.is_moe:
        for name in ("num_experts", "num_experts_per_tok", "moe_intermediate_size", "shared_expert_intermediate_size"):
            assert getattr(ours, name) == getattr(text, name), name
    assert list(ours.layer_types) == list(text.layer_types)
    ref_freqs, _ = hf_text_rotary(text)
    np.testing.assert_allclose(ours_rotary(ours)[0], ref_freqs, rtol=1e-6)


@pytest.mark.parametrize("rope", [
    dict(type="yarn", factor=4.0, original_max_position_embeddings=64),  # legacy 'type' key
    dict(rope_type="yarn", factor=4.0),  # original_max_position_embeddings → max_position_embeddings
    dict(rope_type="yarn", factor=None, original_max_position_embeddings=512),  # null factor → the ratio
    dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=64, mscale=2.0, mscale_all_dim=1.0),
], ids=["type-key", "no-original", "null-factor", "mscales"])
@pytest.mark.parametrize("where", ["rope_parameters", "rope_scaling", "wrapper"])
def test_yarn_configs_through_from_pretrained_give_transformers_frequencies(tmp_path, rope, where):
    """test_yarn.py builds Qwen3_5TextConfig(**...) directly; this goes through config.json, legacy names and the wrapper,
    with rope_theta and partial_rotary_factor given at the legacy top level."""
    text = dict(TINY, model_type="qwen3_5_text", rope_theta=5e5, partial_rotary_factor=0.5)
    text.pop("rope_parameters")
    text["rope_scaling" if where == "rope_scaling" else "rope_parameters"] = dict(rope)
    raw = {"model_type": "qwen3_5", "text_config": text} if where == "wrapper" else text
    config = hf_config(write_config(tmp_path, raw))
    ref_freqs, ref_scale = hf_text_rotary(getattr(config, "text_config", config))
    freqs, scale = ours_rotary(quiet(load_config, tmp_path))
    np.testing.assert_allclose(freqs, ref_freqs, rtol=1e-6)
    assert scale == pytest.approx(ref_scale)


@pytest.mark.parametrize("change", [
    lambda v: v.update(num_attention_heads=v.pop("num_heads"), num_hidden_layers=v.pop("depth")),
    lambda v: v.update(model_type="qwen3_5"),
    lambda v: v.pop("rope_parameters"),
], ids=["aliases", "old-model_type", "no-rope_parameters"])
def test_vision_config_spellings_read_as_transformers_reads_them(tmp_path, change):
    from minqwen.vision import vision_config_from_dict
    raw = json.loads((VISION_FIXTURE / "config.json").read_text())
    change(raw["vision_config"])
    ref = hf_config(write_config(tmp_path, raw)).vision_config
    ours = quiet(vision_config_from_dict, copy.deepcopy(raw), 32, 10 ** 6)
    for name in ("depth", "hidden_size", "intermediate_size", "num_heads", "patch_size", "temporal_patch_size",
                 "spatial_merge_size", "out_hidden_size", "num_position_embeddings", "hidden_act"):
        assert getattr(ours, name) == getattr(ref, name), name
    assert ours.rope_theta == ref.rope_parameters["rope_theta"]


def test_the_wrapper_eos_is_used_when_text_config_has_none_as_in_transformers_generation(tmp_path):
    raw = {"model_type": "qwen3_5", "eos_token_id": [7, 9], "text_config": dict(TINY, model_type="qwen3_5_text")}
    write_config(tmp_path, raw)
    assert quiet(load_config, tmp_path).eos_token_id == _hf_generation_eos(tmp_path) == (7, 9)


@pytest.mark.parametrize("factor", ["missing", None], ids=["missing", "null"])
def test_a_yarn_factor_missing_is_refused_and_a_null_one_derived_as_in_transformers(tmp_path, factor):
    rope = dict(rope_type="yarn", rope_theta=1e4, partial_rotary_factor=0.5, original_max_position_embeddings=1024)
    if factor != "missing":
        rope["factor"] = factor
    write_config(tmp_path, dict(TINY, model_type="qwen3_5_text", rope_parameters=rope))
    if factor == "missing":
        with pytest.raises(KeyError, match="factor"):
            hf_config(tmp_path)
        with pytest.raises(minqwen.MinqwenError, match=r"rope_parameters\.factor' is missing"):
            quiet(load_config, tmp_path)
        return
    ref_freqs, ref_scale = hf_text_rotary(hf_config(tmp_path))
    c = quiet(load_config, tmp_path)
    assert c.yarn.factor == 4096 / 1024
    freqs, scale = ours_rotary(c)
    np.testing.assert_allclose(freqs, ref_freqs, rtol=1e-6)
    assert scale == pytest.approx(ref_scale, rel=1e-6)
