"""Vision: preprocessing, the tower, image tokens in the sequence, 3-D positions — against transformers 5.23.0.

The fixtures (tests/fixtures_vision/, built by tools/make_vision_fixtures.py) hold two tiny
multimodal checkpoints with every tensor randomized, test images of several sizes and aspect
ratios, and what the reference computed: Qwen2VLImageProcessorPil's pixel values, the tower's
features and intermediates, the expanded ids, get_rope_index's positions and rope delta,
logits, and a greedy continuation through the reference's cache. They need neither torch nor
Pillow. The live lane (marked ``reference``) draws random vision configs and images and
compares in-process; a draw that misses 1e-4 is judged in float64, as the text lane's (conftest).
"""

import copy
import json
import re
import shutil
import sys
import tracemalloc
import warnings

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.numpy import load_file

import minqwen
from conftest import (FIXTURES, FLOAT32_SANITY, ROOT, assert_agree_in_float64, misses_live_atol, require_pillow,
                      require_reference)
from minqwen import MinqwenError, vision
from minqwen.image import (
    BICUBIC,
    BILINEAR,
    load_preprocessor_config,
    preprocess,
    preprocessor_config_from_dict,
    read_image,
    resize,
    resize_numpy,
    smart_resize,
)

VISION_FIXTURES = ROOT / "tests" / "fixtures_vision"
FIXTURE_NAMES = sorted(p.name for p in VISION_FIXTURES.iterdir() if (p / "expected.safetensors").is_file())
ATOL = 1e-4


@pytest.fixture(scope="module", params=FIXTURE_NAMES)
def fixture(request):
    folder = VISION_FIXTURES / request.param
    expected = load_file(str(folder / "expected.safetensors"))
    prompts = sorted({k.split(".")[0] for k in expected if k.endswith(".ids")})
    return minqwen.load(folder), vision.load_vision(folder), expected, prompts


def images_of(expected, prompt):
    return [expected[f"image.{i}"] for i in expected[f"{prompt}.images"]]


# ==================================================================== against the fixtures


def test_there_are_fixtures_with_several_sizes_and_a_two_image_prompt():
    assert len(FIXTURE_NAMES) >= 2
    expected = load_file(str(VISION_FIXTURES / "vision_fp32" / "expected.safetensors"))
    shapes = [expected[k].shape[:2] for k in expected if k.startswith("image.")]
    assert any(h != w for h, w in shapes) and (1, 1) in shapes and max(h * w for h, w in shapes) > 48 * 48
    assert len(expected["two_images.images"]) == 2
    total = sum(p.stat().st_size for p in VISION_FIXTURES.rglob("*") if p.is_file())
    assert total < 1.5 * 1024 * 1024


def test_preprocessing_is_bit_identical_to_the_reference_processor(fixture):
    _, tower, expected, _ = fixture
    i = 0
    while f"image.{i}" in expected:
        pixel_values, grid_thw = preprocess(expected[f"image.{i}"], tower.preprocessor)
        assert pixel_values.dtype == np.float32
        np.testing.assert_array_equal(grid_thw, expected[f"grid_thw.{i}"])
        np.testing.assert_array_equal(pixel_values, expected[f"pixel_values.{i}"])
        i += 1


def test_tower_features_and_every_block_output_match_the_reference(fixture):
    _, tower, expected, prompts = fixture
    for prompt in prompts:
        taps = {}
        features, grid_thw = tower.encode_images(images_of(expected, prompt))
        np.testing.assert_array_equal(grid_thw, expected[f"{prompt}.grid_thw"])
        np.testing.assert_allclose(features, expected[f"{prompt}.features"], rtol=0, atol=ATOL, err_msg=prompt)
    prompt = prompts[0]  # the fixture keeps the intermediates of its first prompt
    pixel_values = np.concatenate([preprocess(im, tower.preprocessor)[0] for im in images_of(expected, prompt)])
    tower.forward(pixel_values, expected[f"{prompt}.grid_thw"], tap=lambda name, x: taps.__setitem__(name, x.copy()))
    np.testing.assert_allclose(taps["patch_embed"], expected[f"{prompt}.tap.patch_embed"], rtol=0, atol=ATOL)
    for i in range(len(tower.blocks)):
        np.testing.assert_allclose(taps[f"blocks.{i}"], expected[f"{prompt}.tap.blocks.{i}"], rtol=0, atol=ATOL)


def test_expanded_ids_position_ids_and_rope_delta_are_exactly_the_references(fixture):
    model, tower, expected, prompts = fixture
    for prompt in prompts:
        inputs = vision.multimodal_inputs(model, tower, expected[f"{prompt}.ids"], images_of(expected, prompt))
        np.testing.assert_array_equal(inputs.token_ids, expected[f"{prompt}.input_ids"])
        np.testing.assert_array_equal(inputs.position_ids, expected[f"{prompt}.position_ids"])
        assert inputs.rope_delta == int(expected[f"{prompt}.rope_delta"][0])
        assert inputs.rope_delta < 0  # an image spans fewer positions than tokens


def test_logits_with_images_match_the_reference(fixture):
    model, tower, expected, prompts = fixture
    for prompt in prompts:
        inputs = vision.multimodal_inputs(model, tower, expected[f"{prompt}.ids"], images_of(expected, prompt))
        logits = model.forward(inputs_embeds=inputs.inputs_embeds, position_ids=inputs.position_ids)
        np.testing.assert_allclose(logits, expected[f"{prompt}.logits"], rtol=0, atol=ATOL, err_msg=prompt)


def test_cached_continuation_after_the_images_is_the_references(fixture):
    """prefill sets cache.rope_delta; plain text decoding then continues at the right positions."""
    model, tower, expected, prompts = fixture
    for prompt in prompts:
        cache = model.new_cache()
        logits = vision.prefill(model, tower, expected[f"{prompt}.ids"], images_of(expected, prompt), cache)
        assert cache.rope_delta == int(expected[f"{prompt}.rope_delta"][0])
        assert cache.position == len(expected[f"{prompt}.input_ids"])
        generated = []
        for step, want in enumerate(expected[f"{prompt}.greedy_logits"]):
            token = int(np.argmax(logits[-1]))
            generated.append(token)
            logits = model.forward([token], cache, last_only=True)
            np.testing.assert_allclose(logits[-1], want, rtol=0, atol=ATOL, err_msg=f"{prompt} step {step}")
        assert generated == expected[f"{prompt}.greedy"].tolist()


def test_generation_after_an_image_prefill_is_the_references_greedy_continuation(fixture):
    """How the CLI wires images: prefill all but the last prompt token, then generate from it."""
    from minqwen.generate import generate_ids

    model, tower, expected, prompts = fixture
    prompt = prompts[0]
    ids = expected[f"{prompt}.ids"]
    cache = model.new_cache()
    vision.prefill(model, tower, ids[:-1], images_of(expected, prompt), cache)
    want = expected[f"{prompt}.greedy"].tolist()
    got = list(generate_ids(model, ids[-1:], max_new_tokens=len(want), cache=cache, history=ids[:-1].tolist()))
    assert got == want



# ==================================================================== golden recordings with images


def test_a_golden_recording_with_images_holds_the_towers_taps_and_matches_the_reference(fixture):
    # What a port of the multimodal model checks itself against: the preprocessing, every tower
    # tap, the expanded ids and 3-D positions, then the text model and cached decode steps.
    from minqwen import golden

    model, tower, expected, prompts = fixture
    prompt = prompts[0]  # the fixture keeps the tower's intermediates of its first prompt
    steps = 3
    rec = golden.record(model, expected[f"{prompt}.ids"], decode_steps=steps, tower=tower,
                        images=images_of(expected, prompt))
    assert list(rec) == sorted(rec, key=golden.forward_order)
    once = golden.vision_tap_names(tower)
    assert list(rec)[1:len(once) + 1] == once  # right after token_ids, the tower's taps, then the positions
    np.testing.assert_array_equal(rec["token_ids"], expected[f"{prompt}.input_ids"])  # each <|image_pad|> expanded
    np.testing.assert_array_equal(rec["position_ids"], expected[f"{prompt}.position_ids"])
    np.testing.assert_array_equal(rec["visual.grid_thw"], expected[f"{prompt}.grid_thw"])
    np.testing.assert_array_equal(rec["visual.pixel_values"], np.concatenate(
        [expected[f"pixel_values.{i}"] for i in expected[f"{prompt}.images"]]))
    np.testing.assert_allclose(rec["visual.patch_embed"], expected[f"{prompt}.tap.patch_embed"], rtol=0, atol=ATOL)
    for i in range(len(tower.blocks)):
        np.testing.assert_allclose(rec[f"visual.blocks.{i}"], expected[f"{prompt}.tap.blocks.{i}"], rtol=0, atol=ATOL)
    np.testing.assert_allclose(rec["visual.merger"], expected[f"{prompt}.features"], rtol=0, atol=ATOL)
    # (the fixture keeps no embeddings: they are patch_embed plus the grid's position embeddings)
    c = tower.config
    positions = vision.interpolated_position_embeddings(tower.pos_embed, rec["visual.grid_thw"], c.spatial_merge_size,
                                                        c.num_grid_per_side)  # [N, Dv]
    np.testing.assert_allclose(rec["visual.embeddings"] - rec["visual.patch_embed"], positions, rtol=0, atol=1e-6)
    image_rows = rec["token_ids"] == c.image_token_id
    np.testing.assert_array_equal(rec["embed"][image_rows], rec["visual.merger"])  # the features, in the tokens' place
    np.testing.assert_allclose(rec["logits"], expected[f"{prompt}.logits"], rtol=0, atol=ATOL)
    assert rec["generated_ids"].tolist() == expected[f"{prompt}.greedy"][:steps].tolist()
    for n in range(steps):  # the steps continue at the positions after the images' (cache.rope_delta)
        np.testing.assert_allclose(rec[f"step{n}.logits"][-1], expected[f"{prompt}.greedy_logits"][n], rtol=0,
                                   atol=ATOL)


def test_golden_record_with_an_image_on_the_command_line_and_a_changed_patch_found_first(tmp_path, capsys):
    from minqwen import golden
    from minqwen.cli import main

    Image = require_pillow()
    folder = VISION_FIXTURES / "vision_fp32"
    expected = load_file(str(folder / "expected.safetensors"))
    Image.fromarray(expected["image.1"]).save(tmp_path / "photo.png")
    c = vision.load_vision(folder).config
    tokens = f"1,2,{c.vision_start_token_id},{c.image_token_id},{c.vision_end_token_id},3"
    out = tmp_path / "rec.safetensors"
    assert main(["golden", "record", "--model", str(folder), "--tokens", tokens, "--image", str(tmp_path / "photo.png"),
                 "--decode", "1", "--out", str(out)]) == 0
    rec = golden.load_recording(out)
    np.testing.assert_array_equal(rec.tensors["visual.pixel_values"], expected["pixel_values.1"])
    assert rec.token_ids == rec.tensors["token_ids"].tolist() and len(rec.token_ids) > 6  # the ids the model read
    # a port whose position embeddings are off: the first divergence is the tower's, before any text tap
    port = dict(rec.tensors)
    port["visual.embeddings"] = port["visual.embeddings"] + 0.01
    port["embed"] = port["embed"] + 0.01
    golden.save(port, tmp_path / "port.safetensors", rec.metadata)
    assert golden.compare(tmp_path / "port.safetensors", out).first_divergent.name == "visual.embeddings"
    # refused: --mtp with images; an image for a prompt that has no place for it
    record = ["golden", "record", "--model", str(folder), "--image", str(tmp_path / "photo.png"),
              "--out", str(tmp_path / "no.safetensors")]
    capsys.readouterr()
    assert main([*record, "--tokens", tokens, "--mtp"]) == 2
    assert "--mtp records the MTP head over a text prompt" in capsys.readouterr().err
    assert main([*record, "--tokens", "1,2,3"]) == 2
    assert "0 <|image_pad|> tokens" in capsys.readouterr().err


def test_golden_record_refuses_images_without_a_tower_and_a_tower_beside_the_mtp_head(fixture):
    from minqwen import golden

    model, tower, expected, prompts = fixture
    ids, images = expected[f"{prompts[0]}.ids"], images_of(expected, prompts[0])
    with pytest.raises(MinqwenError, match="images need the vision tower"):
        golden.record(model, ids, images=images)
    with pytest.raises(MinqwenError, match=r"reads a prompt with images: give them"):  # its taps would be empty
        golden.record(model, [1, 2, 3], tower=tower)
    with pytest.raises(MinqwenError, match="MTP head's taps are recorded over a text prompt"):
        golden.record(model, ids, tower=tower, images=images, mtp_head=object())
    with pytest.raises(MinqwenError, match="tap pattern 'visual.nosuch' matches no tap"):
        golden.record(model, ids, tower=tower, images=images, taps="visual.nosuch")
    with pytest.raises(MinqwenError, match="recorded once, over the prompt: write 'visual.merger', without a step"):
        golden.record(model, ids, decode_steps=1, tower=tower, images=images, taps="step0.visual.merger")
    with pytest.raises(MinqwenError, match=r"tower's taps and position_ids need a prompt with images: --image"):
        golden.record(model, [1, 2, 3], taps="visual.*")


def test_a_nan_in_the_tower_is_named_at_the_first_tower_tap_that_holds_it(fixture):
    # Not at the text model's inputs_embeds, which the caller never gave.
    from minqwen import golden

    model, tower, expected, prompts = fixture
    broken = copy.deepcopy(tower)
    broken.blocks[-1].mlp.linear_fc2.weight[0, 0] = np.nan
    args = (model, expected[f"{prompts[0]}.ids"])
    kwargs = dict(tower=broken, images=images_of(expected, prompts[0]))
    with pytest.raises(MinqwenError, match=f"tap 'visual.blocks.{len(tower.blocks) - 1}' holds NaN"):
        golden.record(*args, **kwargs)
    with pytest.raises(MinqwenError, match="the vision tower's features hold NaN"):
        golden.record(*args, taps="logits", **kwargs)


def test_images_fed_in_two_chunks_equal_one_prefill(fixture):
    """A later turn can bring an image: positions continue from cache.position + cache.rope_delta."""
    model, tower, expected, prompts = fixture
    prompt = max(prompts, key=lambda p: len(expected[f"{p}.images"]))
    ids, images = expected[f"{prompt}.ids"], images_of(expected, prompt)
    cut = int(np.flatnonzero(ids == tower.config.vision_end_token_id)[0]) + 1  # after the first image
    cache = model.new_cache()
    first = vision.prefill(model, tower, ids[:cut], images[:1], cache, last_only=False)
    second = vision.prefill(model, tower, ids[cut:], images[1:], cache, last_only=False)
    np.testing.assert_allclose(np.concatenate([first, second]), expected[f"{prompt}.logits"], rtol=0, atol=ATOL)
    assert cache.rope_delta == int(expected[f"{prompt}.rope_delta"][0])


def test_two_images_never_attend_to_each_other(fixture):
    _, tower, expected, _ = fixture
    a, b = expected["image.0"], expected["image.1"]
    together, _ = tower.encode_images([a, b])
    alone_a, _ = tower.encode_images([a])
    alone_b, _ = tower.encode_images([b])
    np.testing.assert_allclose(together, np.concatenate([alone_a, alone_b]), rtol=0, atol=1e-5)  # BLAS round-off only: a leak would be O(0.1)


def test_a_clip_of_frames_is_its_frames_encoded_one_by_one(fixture):
    """grid t > 1 (video frames): each frame attends to itself, with the same position embeddings."""
    _, tower, expected, _ = fixture
    pv0, grid = preprocess(expected["image.0"], tower.preprocessor)
    pv1, _ = preprocess(expected["image.1"][: expected["image.0"].shape[0], : expected["image.0"].shape[1]],
                        tower.preprocessor)
    clip = tower.forward(np.concatenate([pv0, pv1]), [[2, grid[0, 1], grid[0, 2]]])
    frames = np.concatenate([tower.forward(pv0, grid), tower.forward(pv1, grid)])
    np.testing.assert_allclose(clip, frames, rtol=0, atol=1e-5)  # BLAS round-off only: a leak would be O(0.1)


def test_image_pads_are_expanded_one_per_merged_patch():
    ids = vision.expand_image_tokens([5, 9, 6, 9, 7], [[1, 4, 6], [1, 2, 2]], image_token_id=9, merge=2)
    assert ids.tolist() == [5] + [9] * 6 + [6] + [9] + [7]
    # Every frame counts: the reference processor gives an image grid_thw.prod() // merge² tokens, t included
    # (preprocessing always makes t = 1, so only a grid passed in shows it).
    ids = vision.expand_image_tokens([5, 9, 7], [[2, 4, 6]], image_token_id=9, merge=2)
    assert ids.tolist() == [5] + [9] * 12 + [7]


def test_two_image_pads_next_to_each_other_are_an_error_naming_them():
    # Expanded, 6 + 1 pads would make one run, and rope_index would blame a run of 7 the user never wrote.
    with pytest.raises(MinqwenError, match=r"<\|image_pad\|> tokens 0 and 1 \(of images 0 and 1\) are next to each "
                                           r"other, at positions 1 and 2"):
        vision.expand_image_tokens([5, 9, 9, 7], [[1, 4, 6], [1, 2, 2]], image_token_id=9, merge=2)


def test_rope_index_follows_the_reference_rule():
    """Text counts up in all rows; an image sits on its grid; the text after it starts at start + max(h, w)."""
    config = vision.VisionConfig(image_token_id=9, video_token_id=8, spatial_merge_size=2)
    ids = [1, 2] + [9] * 6 + [3]  # an image of 2 × 3 merged patches
    positions, next_position = vision.rope_index(ids, [[1, 4, 6]], config, start=10)
    assert positions[:, :2].tolist() == [[10, 11]] * 3
    assert positions[:, 2:8].tolist() == [[12] * 6, [12, 12, 12, 13, 13, 13], [12, 13, 14, 12, 13, 14]]
    assert positions[:, 8].tolist() == [15, 15, 15] and next_position == 16
    # An image with no run of <|image_pad|> for it is an error, not silently left out.
    with pytest.raises(MinqwenError, match="1 images were given but the prompt has 0 runs"):
        vision.rope_index([1, 2, 3], [[1, 4, 6]], config)


def test_after_an_image_of_more_frames_than_rows_the_next_position_is_the_largest_plus_one():
    """get_rope_index's rope delta is max(positions) + 1 − T; its text after the image starts at p + max(h, w)/m."""
    config = vision.VisionConfig(image_token_id=9, video_token_id=8, spatial_merge_size=2)
    ids = [1, 2] + [9] * 5 + [3]  # 5 frames of 1 × 1 merged patch
    positions, next_position = vision.rope_index(ids, [[5, 2, 2]], config)
    assert positions.tolist() == [[0, 1, 2, 3, 4, 5, 6, 3], [0, 1, 2, 2, 2, 2, 2, 3], [0, 1, 2, 2, 2, 2, 2, 3]]
    assert next_position - len(ids) == -1  # the reference's rope delta for these ids


# ==================================================================== resizing


@settings(max_examples=60, deadline=None, derandomize=True)
@given(h=st.integers(1, 90), w=st.integers(1, 90), height=st.integers(1, 120), width=st.integers(1, 120),
       resample=st.sampled_from([BICUBIC, BILINEAR]), seed=st.integers(0, 2**16))
def test_resize_and_its_numpy_twin_are_pillows_bit_for_bit(h, w, height, width, resample, seed):
    Image = require_pillow()
    image = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    want = np.array(Image.fromarray(image).resize((width, height), resample=resample))
    np.testing.assert_array_equal(resize_numpy(image, height, width, resample), want)
    np.testing.assert_array_equal(resize(image, height, width, resample), want)


def test_resize_is_pillows_call_and_without_pillow_its_numpy_twin(monkeypatch):
    import sys

    Image = require_pillow()
    image = np.random.default_rng(1).integers(0, 256, (30, 41, 3), dtype=np.uint8)
    calls, pillows = [], Image.Image.resize
    monkeypatch.setattr(Image.Image, "resize", lambda self, *a, **k: (calls.append(a), pillows(self, *a, **k))[1])
    with_pillow = resize(image, 17, 60)
    assert calls == [((60, 17),)]  # (the NumPy twin took 6.4 s where Pillow takes 0.6 on a 48-megapixel photo)
    monkeypatch.setitem(sys.modules, "PIL.Image", None)  # import PIL.Image now fails
    np.testing.assert_array_equal(resize(image, 17, 60), with_pillow)
    np.testing.assert_array_equal(resize(image, 17, 60), resize_numpy(image, 17, 60))


@pytest.mark.parametrize("pillow, vertical_first", [(13, True), (12, False)])
def test_the_pass_order_is_the_installed_pillows(monkeypatch, pillow, vertical_first):
    # 40 × 40 → 2 × 22: Pillow 13 shrinks the height first, Pillow 12 goes horizontal first
    # (measured; the two orders differ by 1 in 20 of these 132 values).
    from minqwen import image as image_module

    monkeypatch.setattr(image_module, "pillow_major_version", lambda: pillow)
    assert image_module.vertical_pass_first(40, 40, 2, 22) is vertical_first
    rgb = np.random.default_rng(0).integers(0, 256, (40, 40, 3), dtype=np.uint8)
    rows = image_module._resample_rows
    across = rows(rgb.transpose(1, 0, 2), 22, BICUBIC).transpose(1, 0, 2)  # [40, 22, 3]
    expected = rows(np.ascontiguousarray(across), 2, BICUBIC) if not vertical_first else \
        rows(rows(rgb, 2, BICUBIC).transpose(1, 0, 2), 22, BICUBIC).transpose(1, 0, 2)
    np.testing.assert_array_equal(resize_numpy(rgb, 2, 22), expected)


def test_the_numpy_resize_is_pillows_on_both_sides_of_its_pass_order_switch():
    Image = require_pillow()
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)
    for height in (2, 20, 38, 60):
        for width in range(15, 50):
            want = np.array(Image.fromarray(image).resize((width, height), resample=BICUBIC))
            np.testing.assert_array_equal(resize_numpy(image, height, width), want, err_msg=f"{height}×{width}")


@settings(max_examples=300, deadline=None, derandomize=True)
@given(h=st.integers(1, 5000), w=st.integers(1, 5000), factor=st.sampled_from([8, 28, 32]),
       budget=st.sampled_from([(64, 4096), (56 * 56, 28 * 28 * 1280), (65536, 16777216)]))
def test_smart_resize_lands_on_the_grid_within_the_budget(h, w, factor, budget):
    if max(h, w) / min(h, w) > 200:
        with pytest.raises(MinqwenError, match="aspect ratio above 200"):
            smart_resize(h, w, factor, *budget)
        return
    height, width = smart_resize(h, w, factor, *budget)
    assert height % factor == 0 and width % factor == 0 and height >= factor and width >= factor
    if min(height, width) > factor:  # a side clamped at one merged patch can exceed the budget
        assert height * width <= budget[1]
    assert height * width >= budget[0] or height * width > budget[1] // 4  # below the minimum only after shrinking


def test_a_huge_image_is_resized_into_the_budget_without_a_memory_blow_up():
    config = preprocessor_config_from_dict(dict(patch_size=4, merge_size=2, temporal_patch_size=2,
                                                size=dict(shortest_edge=64, longest_edge=64 * 64)))
    rng = np.random.default_rng(0)
    image = np.repeat(rng.integers(0, 256, (3000, 1, 3), dtype=np.uint8), 4000, axis=1)  # 36 MB
    tracemalloc.start()
    pixel_values, grid = preprocess(image, config)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert grid[0, 1] * grid[0, 2] * 16 <= 64 * 64  # patches of 4 × 4 pixels inside the budget
    assert peak < 100 * 1024 * 1024, f"peak {peak / 2**20:.0f} MiB while resizing a 36 MB image"


# ==================================================================== bad input


def test_bad_arrays_are_refused_by_name():
    with pytest.raises(MinqwenError, match=r"empty: 5×0 pixels"):
        read_image(np.zeros((0, 5, 3), np.uint8))
    with pytest.raises(MinqwenError, match=r"empty: 0×5 pixels"):  # no columns: read_image is public, not only preprocess
        read_image(np.zeros((5, 0, 3), np.uint8))
    with pytest.raises(MinqwenError, match=r"must have shape \[H, W, 3\]"):
        read_image(np.zeros((5, 5), np.uint8))
    with pytest.raises(MinqwenError, match="must be uint8"):
        read_image(np.zeros((5, 5, 3), np.float32))
    with pytest.raises(MinqwenError, match="an image must be a file path, a Pillow image or a NumPy array"):
        read_image(42)


def test_one_image_where_a_list_is_expected_is_refused_by_encode_images(fixture):
    _, tower, _, _ = fixture
    for one in (np.zeros((8, 8, 3), np.uint8), "photo.png"):  # a path would be read letter by letter
        with pytest.raises(MinqwenError, match="images must be a list of images"):
            tower.encode_images(one)


def test_an_extreme_aspect_ratio_is_refused():
    config = preprocessor_config_from_dict(dict(patch_size=4, merge_size=2))
    with pytest.raises(MinqwenError, match="aspect ratio above 200"):
        preprocess(np.zeros((1, 201, 3), np.uint8), config)
    # Exactly 200:1 is still allowed, as in the reference (its check is `> MAX_RATIO`): grown to the
    # default minimum of 3136 pixels, 8 × 792 (transformers' smart_resize(1, 200, 8, 3136, 1003520)).
    _, grid = preprocess(np.zeros((1, 200, 3), np.uint8), config)
    assert grid.tolist() == [[1, 2, 198]]


def test_missing_corrupt_and_truncated_files_are_refused_by_name(tmp_path):
    Image = require_pillow()
    with pytest.raises(MinqwenError, match="no such image file"):
        read_image(tmp_path / "nowhere.png")
    (tmp_path / "notes.png").write_text("not an image at all")
    with pytest.raises(MinqwenError, match=r"notes\.png: cannot read this image file"):
        read_image(tmp_path / "notes.png")
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    data = (tmp_path / "a.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(MinqwenError, match=r"cut\.png: cannot read this image file"):
        read_image(tmp_path / "cut.png")


def test_a_photo_is_turned_upright_by_its_exif_orientation_as_the_reference_does(tmp_path):
    Image = require_pillow()
    rgb = np.random.default_rng(2).integers(0, 256, (20, 40, 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: the stored pixels are to be turned 90° clockwise
    Image.fromarray(rgb).save(tmp_path / "phone.png", exif=exif)
    np.testing.assert_array_equal(read_image(tmp_path / "phone.png"), np.rot90(rgb, k=-1))


def test_a_pillow_image_that_cannot_be_decoded_is_a_clean_error(tmp_path):
    Image = require_pillow()
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(tmp_path / "a.png")
    data = (tmp_path / "a.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(MinqwenError, match="cannot read this Pillow image"):
        read_image(Image.open(tmp_path / "cut.png"))


def test_a_decompression_bomb_is_refused(tmp_path, monkeypatch):
    Image = require_pillow()
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 64² is then over twice the limit
    with pytest.raises(MinqwenError, match="too many pixels"):
        read_image(tmp_path / "big.png")


def test_a_file_drops_its_alpha_and_a_pillow_image_composites_it_onto_white_as_the_reference_does(tmp_path):
    """The reference's load_image converts a file straight to RGB; its convert_to_rgb composites an image."""
    Image = require_pillow()
    rgb = np.random.default_rng(1).integers(0, 256, (7, 9, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    np.testing.assert_array_equal(read_image(tmp_path / "rgb.png"), rgb)
    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[0, 0] = (10, 20, 30, 255)
    rgba[1, 1] = (40, 50, 60, 0)  # transparent, with a colour stored under it
    Image.fromarray(rgba).save(tmp_path / "rgba.png")
    got = read_image(tmp_path / "rgba.png")
    assert got[0, 0].tolist() == [10, 20, 30] and got[1, 1].tolist() == [40, 50, 60]
    got = read_image(Image.open(tmp_path / "rgba.png"))
    assert got[0, 0].tolist() == [10, 20, 30] and got[1, 1].tolist() == [255, 255, 255]


@pytest.mark.reference
@pytest.mark.parametrize("mode", ["RGBA", "LA", "P", "L", "RGB"])
def test_a_transparent_file_preprocesses_as_the_reference_processor_given_its_path(mode, tmp_path):
    """An alpha band (RGBA, LA) is dropped; a transparent colour (P, L, RGB with tRNS) goes white."""
    require_reference()
    Image = require_pillow()
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    rng = np.random.default_rng(11)
    rgb = (rng.integers(0, 4, (24, 40, 3)) * 80).astype(np.uint8)
    alpha = rng.integers(0, 2, (24, 40), dtype=np.uint8) * 255
    if "A" in mode:
        Image.fromarray(np.dstack([rgb, alpha])).convert(mode).save(tmp_path / "t.png")
    else:
        image = Image.fromarray(rgb).convert(mode)
        stored = np.array(image)
        image.save(tmp_path / "t.png", transparency=stored[0, 0].tolist() if mode == "RGB" else int(stored[0, 0]))
    want = Qwen2VLImageProcessorPil(**BASE)(images=[str(tmp_path / "t.png")], return_tensors="np")
    got = preprocess(tmp_path / "t.png", preprocessor_config_from_dict(BASE))
    np.testing.assert_array_equal(got[1], want["image_grid_thw"])
    np.testing.assert_array_equal(got[0], want["pixel_values"])


def test_without_pillow_files_need_it_and_arrays_do_not(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "PIL", None)
    monkeypatch.setitem(sys.modules, "PIL.Image", None)
    with pytest.raises(MinqwenError, match="pip install pillow"):
        read_image(tmp_path / "x.png")
    config = preprocessor_config_from_dict(dict(patch_size=4, merge_size=2, size=dict(shortest_edge=64, longest_edge=4096)))
    pixel_values, grid = preprocess(np.zeros((30, 20, 3), np.uint8), config)
    # 30 × 20 → 32 × 16: round(20 / 8) is 2, Python's round-half-to-even, as in the reference.
    assert grid.tolist() == [[1, 8, 4]] and pixel_values.shape == (32, 3 * 2 * 4 * 4)


def test_the_token_count_of_each_image_is_the_number_of_image_tokens_the_reference_gave_it(fixture):
    # Against the reference processor's expanded ids, on both fixtures: merge 2 and merge 3 (where
    # patches / m² and patches / m / 2, say, part).
    _, tower, expected, prompts = fixture
    for prompt in prompts:
        count = sum(tower.token_count(*image.shape[:2]) for image in images_of(expected, prompt))
        assert count == int((expected[f"{prompt}.input_ids"] == tower.config.image_token_id).sum())


def test_image_token_count_not_matching_the_images_is_refused(fixture):
    model, tower, expected, prompts = fixture
    prompt = max(prompts, key=lambda p: len(expected[f"{p}.images"]))
    ids, images = expected[f"{prompt}.ids"], images_of(expected, prompt)
    with pytest.raises(MinqwenError, match=rf"has {len(images)} <\|image_pad\|> tokens .* but {len(images) - 1} images"):
        vision.multimodal_inputs(model, tower, ids, images[:-1])
    pad = tower.config.image_token_id
    with pytest.raises(MinqwenError, match="image features and image tokens do not match: the prompt has 3"):
        vision.place_image_features(np.zeros((4, 8)), [1, pad, pad, pad], np.zeros((2, 8)), pad)
    expanded = expected[f"{prompt}.input_ids"]
    short = np.delete(expanded, np.flatnonzero(expanded == pad)[0])  # one image token too few
    with pytest.raises(MinqwenError, match=r"image 0 needs \d+ <\|image_pad\|> tokens .* a run of"):
        vision.rope_index(short, expected[f"{prompt}.grid_thw"], tower.config)
    with pytest.raises(MinqwenError, match="reads images, not videos"):
        vision.rope_index([1, tower.config.video_token_id], np.zeros((0, 3), np.int64), tower.config)


def test_pixel_values_not_matching_the_grid_are_refused(fixture):
    _, tower, expected, _ = fixture
    pixel_values, grid = preprocess(expected["image.0"], tower.preprocessor)
    with pytest.raises(MinqwenError, match=r"pixel_values must have shape \["):
        tower.forward(pixel_values[:-1], grid)
    with pytest.raises(MinqwenError, match="multiples of spatial_merge_size"):
        tower.forward(pixel_values, [[1, grid[0, 1] + 1, grid[0, 2]]])
    # A zero in the grid: no frames would give no features silently, no rows a division by zero
    # in the attention; 0 is a multiple of every merge size, so only the positivity check sees it.
    empty = np.zeros((0, tower.config.patch_dim), np.float32)
    for zero in ([0, grid[0, 1], grid[0, 2]], [1, 0, grid[0, 2]], [1, grid[0, 1], 0]):
        with pytest.raises(MinqwenError, match="grid_thw must be positive"):
            tower.forward(empty, [zero])


# ==================================================================== configs and checkpoints


@pytest.fixture
def folder(tmp_path):
    target = tmp_path / "ckpt"
    shutil.copytree(VISION_FIXTURES / "vision_fp32", target)
    return target


def edit_json(path, change):
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


@pytest.mark.parametrize("field, value, message", [
    ("hidden_act", "swiglu9", "vision_config.hidden_act' is 'swiglu9'"),
    ("in_channels", 4, "in_channels' is 4"),
    ("out_hidden_size", 40, "out_hidden_size 40 must equal the text hidden_size 32"),
    ("num_heads", 3, "not a multiple of num_heads 3"),
    ("patch_size", [4, 4], "'vision_config.patch_size' must be an integer"),
    ("rope_parameters", {"rope_type": "mrope"}, "only 'axial'"),
    ("hidden_act", ["gelu"], "vision_config.hidden_act' is ['gelu']"),
    # a theta of 0 gives infinite frequencies, NaN angles and NaN features; a negative one NaN powers
    ("rope_parameters", {"rope_type": "axial", "rope_theta": 0}, "rope_theta' must be a positive, finite number"),
    ("rope_parameters", {"rope_type": "axial", "rope_theta": -1e4}, "rope_theta' must be a positive, finite number"),
])
def test_unsupported_vision_config_values_are_errors_naming_the_field(folder, field, value, message):
    edit_json(folder / "config.json", lambda c: c["vision_config"].update({field: value}))
    with pytest.raises(MinqwenError, match=message.replace("[", r"\[")):
        vision.load_vision(folder)


def test_one_token_id_for_two_vision_markers_is_an_error_naming_the_fields(folder):
    edit_json(folder / "config.json", lambda c: c.update(image_token_id=c["vision_start_token_id"]))
    with pytest.raises(MinqwenError, match="must be four different token ids"):
        vision.load_vision(folder)


def test_head_dim_not_a_multiple_of_four_is_an_error(folder):
    edit_json(folder / "config.json", lambda c: c["vision_config"].update(hidden_size=24, num_heads=4))
    with pytest.raises(MinqwenError, match="head_dim 6 must be a multiple of 4"):
        vision.load_vision(folder)


def test_an_unknown_vision_field_is_reported_not_dropped(folder):
    edit_json(folder / "config.json", lambda c: c["vision_config"].update(deepstack_visual_indexes=[1]))
    with pytest.warns(UserWarning, match="deepstack_visual_indexes"):
        vision.load_vision(folder)


def test_the_empty_deepstack_list_of_real_qwen3_5_configs_loads_without_a_warning(folder):
    edit_json(folder / "config.json", lambda c: c["vision_config"].update(deepstack_visual_indexes=[]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        vision.load_vision(folder)


def test_a_special_token_outside_the_vocabulary_is_an_error(folder):
    edit_json(folder / "config.json", lambda c: c.update(image_token_id=248056))
    with pytest.raises(MinqwenError, match="'image_token_id' is 248056, outside the vocabulary"):
        vision.load_vision(folder)


@pytest.mark.parametrize("field, value, message", [
    ("merge_size", 3, "merge_size is 3 but config.json's vision_config.spatial_merge_size is 2"),
    ("patch_size", 3, "patch_size is 3 but config.json's vision_config.patch_size is 4"),
    # one frame per patch would make pixel_values half as wide as the tower's patch_embed reads
    ("temporal_patch_size", 1, "temporal_patch_size is 1 but config.json's vision_config.temporal_patch_size is 2"),
])
def test_preprocessor_must_agree_with_the_tower(folder, field, value, message):
    edit_json(folder / "preprocessor_config.json", lambda c: c.update({field: value}))
    with pytest.raises(MinqwenError, match=message):
        vision.load_vision(folder)


def test_missing_or_bad_preprocessor_config_is_an_error(folder):
    edit_json(folder / "preprocessor_config.json", lambda c: c.update(resample=1))
    with pytest.raises(MinqwenError, match="'resample' is 1"):
        load_preprocessor_config(folder)
    edit_json(folder / "preprocessor_config.json", lambda c: c.update(resample=3, image_std=[0.5, 0, 0.5]))
    with pytest.raises(MinqwenError, match="must not contain 0"):
        load_preprocessor_config(folder)
    (folder / "preprocessor_config.json").unlink()
    with pytest.raises(MinqwenError, match="no preprocessor_config.json here"):
        vision.load_vision(folder)


def nest_preprocessor_config(folder, keep_flat: bool, **change):
    """As transformers 5 saves a processor: its settings in processor_config.json's "image_processor"."""
    flat = json.loads((folder / "preprocessor_config.json").read_text())
    nested = {"image_processor": {**flat, **change}, "processor_class": "Qwen3VLProcessor"}
    (folder / "processor_config.json").write_text(json.dumps(nested))
    if not keep_flat:
        (folder / "preprocessor_config.json").unlink()


@pytest.mark.parametrize("keep_flat", [False, True])
def test_a_processor_configs_image_processor_block_is_read_first(folder, keep_flat):
    # A folder saved by transformers 5 has no preprocessor_config.json (it was refused); with
    # both files, the nested block wins, as in transformers (the flat file's budget was used).
    flat = load_preprocessor_config(folder)
    nest_preprocessor_config(folder, keep_flat, size={"shortest_edge": 64, "longest_edge": 1000})
    ours = load_preprocessor_config(folder)
    assert (ours.min_pixels, ours.max_pixels) == (64, 1000) != (flat.min_pixels, flat.max_pixels)
    assert ours.source == f"{folder / 'processor_config.json'} (its \"image_processor\" block)"
    assert vision.load_vision(folder).preprocessor == ours


def test_a_processor_config_without_an_image_processor_block_leaves_preprocessor_config_json_in_charge(folder):
    (folder / "processor_config.json").write_text(json.dumps({"processor_class": "Qwen3VLProcessor"}))
    assert load_preprocessor_config(folder).source == str(folder / "preprocessor_config.json")
    (folder / "processor_config.json").write_text(json.dumps({"image_processor": [1, 2]}))
    with pytest.raises(MinqwenError, match=r"processor_config.json: field 'image_processor' must be a JSON object"):
        load_preprocessor_config(folder)


@pytest.mark.reference
@pytest.mark.parametrize("keep_flat", [False, True])
def test_the_image_processor_block_is_what_transformers_reads(folder, keep_flat):
    require_reference()
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    nest_preprocessor_config(folder, keep_flat, size={"shortest_edge": 64, "longest_edge": 1000}, image_mean=[0.1] * 3)
    reference, ours = Qwen2VLImageProcessorPil.from_pretrained(folder), load_preprocessor_config(folder)
    assert (ours.min_pixels, ours.max_pixels) == (reference.size.shortest_edge, reference.size.longest_edge)
    assert ours.image_mean == tuple(reference.image_mean) == (0.1,) * 3


def test_a_folder_given_as_an_image_is_called_a_folder(tmp_path):
    require_pillow()
    with pytest.raises(MinqwenError, match=f"^{re.escape(str(tmp_path))}: is a folder, not an image file$"):
        read_image(tmp_path)


@pytest.mark.parametrize("mode", ["I;16", "I", "F"])
def test_an_image_of_more_than_8_bits_a_channel_is_read_with_a_warning_that_it_is_clipped(tmp_path, mode):
    # Pillow's RGB conversion, the reference's too, clips instead of scaling: a 16-bit scan came
    # out mostly white, a float image in 0…1 black, and nothing said so.
    Image = require_pillow()
    values = np.full((4, 6), 40000 if mode != "F" else 0.5, np.uint16 if mode == "I;16" else
                     np.int32 if mode == "I" else np.float32)
    image = Image.fromarray(values, mode=mode) if mode != "I;16" else Image.fromarray(values)
    assert image.mode == mode
    path = tmp_path / ("wide.png" if mode == "I;16" else "wide.tif")
    image.save(path)
    for source, named in ((path, str(path)), (image, "this Pillow image")):
        with pytest.warns(UserWarning, match=f"^{re.escape(named)}: Pillow mode {re.escape(mode)} \\(more than 8 bits"):
            read_image(source)


@pytest.mark.parametrize("field, value", [("image_std", [1e-320, 0.5, 0.5]), ("image_mean", [1e300, 0.5, 0.5]),
                                          ("rescale_factor", 1e300), ("image_std", [1e-44, 0.5, 0.5])],
                         ids=["std-0-in-float32", "mean-inf-in-float32", "rescale-past-float32", "std-subnormal"])
def test_normalising_numbers_that_leave_float32_are_an_error_naming_the_fields(field, value):
    # Each is a finite, non-zero JSON number; in float32, where the pixels are normalised, it
    # is 0 or infinite, or makes a pixel so: every feature would be NaN without an error.
    with pytest.raises(MinqwenError, match=r"fields 'rescale_factor' .*'image_mean' .*'image_std' .* give pixel "
                                           r"values that float32 cannot hold"):
        preprocessor_config_from_dict({field: value})


def test_a_pixel_budget_that_would_blow_up_an_image_is_refused_before_resizing():
    # A config whose minimum is 10¹¹ pixels would resize an 8 × 8 image to ~316k × 316k.
    config = preprocessor_config_from_dict(dict(patch_size=4, merge_size=2, temporal_patch_size=2,
                                                size=dict(shortest_edge=10**11, longest_edge=10**12)))
    tracemalloc.start()
    with pytest.raises(MinqwenError, match="min_pixels 100000000000"):
        preprocess(np.zeros((8, 8, 3), np.uint8), config)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 10 * 1024 * 1024


def test_legacy_min_max_pixels_win_over_size_as_in_the_reference():
    config = preprocessor_config_from_dict(dict(size=dict(shortest_edge=10, longest_edge=99), min_pixels=20,
                                                max_pixels=400))
    assert (config.min_pixels, config.max_pixels) == (20, 400)
    # A null legacy field is absent, as in the reference; an old save's size {min_pixels, max_pixels} is superseded.
    config = preprocessor_config_from_dict(dict(size=dict(shortest_edge=10, longest_edge=99), min_pixels=None))
    assert (config.min_pixels, config.max_pixels) == (10, 99)
    config = preprocessor_config_from_dict(dict(size=dict(min_pixels=1, max_pixels=2), min_pixels=20, max_pixels=400))
    assert (config.min_pixels, config.max_pixels) == (20, 400)


def test_a_pixel_budget_whose_minimum_is_above_its_maximum_is_refused_and_a_single_size_is_not():
    # min > max: smart_resize could meet neither bound; min == max: one pixel count, a budget.
    with pytest.raises(MinqwenError, match="the pixel budget is empty: min_pixels 4097 > max_pixels 4096"):
        preprocessor_config_from_dict(dict(size=dict(shortest_edge=4097, longest_edge=4096)))
    config = preprocessor_config_from_dict(dict(size=dict(shortest_edge=4096, longest_edge=4096)))
    assert (config.min_pixels, config.max_pixels) == (4096, 4096)


@pytest.mark.parametrize("raw", [
    dict(size=dict(shortest_edge=64)),                         # the reference does not fill longest_edge in
    dict(size=dict(min_pixels=64, max_pixels=4096)),           # an old save's names, without the legacy fields
    dict(size={}),
    dict(size=dict(height=32, width=32)),
    dict(size=dict(shortest_edge=64, longest_edge=4096, max_pixels=400)),
    dict(min_pixels=64, size=dict(longest_edge=4096, max_pixels=400)),
], ids=repr)
def test_a_size_without_both_edges_is_an_error_as_in_the_reference_not_the_default_budget(raw):
    with pytest.raises(MinqwenError, match="field 'size' must hold exactly shortest_edge and longest_edge"):
        preprocessor_config_from_dict(raw)


def test_a_missing_or_wrongly_shaped_tensor_is_an_error(folder):
    from safetensors.numpy import load_file as load, save_file

    tensors = load(str(folder / "model.safetensors"))
    del tensors["model.visual.blocks.1.mlp.linear_fc2.bias"]
    save_file(tensors, str(folder / "model.safetensors"))
    with pytest.raises(MinqwenError, match="'model.visual.blocks.1.mlp.linear_fc2.bias' is missing"):
        vision.load_vision(folder)
    edit_json(folder / "config.json", lambda c: c["vision_config"].update(depth=1))
    with pytest.raises(MinqwenError, match="vision tensors minqwen does not know .*blocks.1"):
        vision.load_vision(folder)
    edit_json(folder / "config.json", lambda c: c["vision_config"].update(depth=2, intermediate_size=40))
    with pytest.raises(MinqwenError, match=r"'model.visual.blocks.0.mlp.linear_fc1.weight' has shape \[48, 32\]"):
        vision.load_vision(folder)


def test_a_text_only_checkpoint_has_no_vision_tower():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(MinqwenError, match="has no vision tower"):
            vision.load_vision(FIXTURES / "text_tied_fp32")


# ==================================================================== the live lane


@st.composite
def vision_setups(draw):
    merge = draw(st.sampled_from([1, 2, 3]))
    heads = draw(st.sampled_from([1, 2]))
    vision_cfg = dict(
        depth=draw(st.integers(1, 2)), hidden_size=heads * draw(st.sampled_from([8, 12, 16])), num_heads=heads,
        intermediate_size=draw(st.sampled_from([16, 40])), patch_size=draw(st.integers(2, 5)),
        temporal_patch_size=draw(st.sampled_from([1, 2])), spatial_merge_size=merge,
        num_position_embeddings=draw(st.sampled_from([4, 16, 25, 36, 40])),
        hidden_act=draw(st.sampled_from(["gelu_pytorch_tanh", "gelu", "silu"])),
    )
    factor = vision_cfg["patch_size"] * merge
    budget = (factor * factor, factor * factor * draw(st.sampled_from([9, 25, 49])))
    sizes = draw(st.lists(st.tuples(st.integers(1, 90), st.integers(1, 90)), min_size=1, max_size=3))
    return vision_cfg, budget, sizes


@pytest.mark.reference
@settings(max_examples=20, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(setup=vision_setups(), dtype=st.sampled_from(["float32", "bfloat16"]), default_section=st.booleans(),
       seed=st.integers(0, 2**16))
def test_random_vision_configs_match_transformers(tmp_path_factory, setup, dtype, default_section, seed):
    reference = require_reference()
    require_pillow()
    import make_vision_fixtures as builder

    vision_cfg, (min_pixels, max_pixels), sizes = setup
    rope = dict(rope_type="default", rope_theta=1e4, partial_rotary_factor=1.0)
    if not default_section:
        rope.update(mrope_section=[2, 3, 3], mrope_interleaved=True)
    text = builder.tiny_text(rope_parameters=rope)
    model = builder.build_vision_model(text, vision_cfg, seed)
    settings_ = builder.preprocessor_settings(vision_cfg, min_pixels, max_pixels, seed)
    folder = tmp_path_factory.mktemp("vision")
    builder.save_vision_checkpoint(model, settings_, folder, dtype)
    rng = np.random.default_rng(seed)
    images = [builder.test_image(rng, h, w) for h, w in sizes]
    ids = builder.prompt(rng, text["vocab_size"], len(images))
    ours, tower = minqwen.load(folder), vision.load_vision(folder)
    features, grid = tower.encode_images(images)
    # The reference's text model runs on our features (see run_vision_reference); its tower is compared here.
    processor = builder.reference_processor(settings_)
    expected = builder.run_vision_reference(model, processor, images, ids, n_greedy=3, features=features)

    pixel_values = np.concatenate([preprocess(im, tower.preprocessor)[0] for im in images])
    np.testing.assert_array_equal(pixel_values, expected["pixel_values"])
    np.testing.assert_array_equal(grid, expected["grid_thw"])
    inputs = vision.multimodal_inputs(ours, tower, ids, images, ours.new_cache())
    np.testing.assert_array_equal(inputs.position_ids, expected["position_ids"])
    assert inputs.rope_delta == int(expected["rope_delta"][0])
    # Features, prefill logits and greedy steps within 1e-4, or past it judged in float64 (conftest).
    got = minqwen_vision_outputs(ours, tower, ids, images, expected["greedy"])
    if misses_live_atol(got, reference_vision_outputs(expected)):
        judge_vision_in_float64(reference, model, processor, ours, tower, images, ids, got, expected,
                                f"{setup}, {dtype}, default section {default_section}")


def reference_vision_outputs(expected: dict) -> list:
    """What the live lane compares of make_vision_fixtures.run_vision_reference: the tower's features,
    the prefill's logits, and the logits of each greedy step."""
    return [expected["features"], expected["logits"], *expected["greedy_logits"]]


def minqwen_vision_outputs(ours, tower, ids, images, greedy) -> list:
    """minqwen's side of :func:`reference_vision_outputs`, fed the reference's ``greedy`` tokens."""
    features, _ = tower.encode_images(images)
    cache = ours.new_cache()
    outputs = [features, vision.prefill(ours, tower, ids, images, cache, last_only=False)]
    return outputs + [ours.forward([int(token)], cache, last_only=True)[-1] for token in greedy]


def judge_vision_in_float64(reference, model, processor, ours, tower, images, ids, got, expected, what: str) -> None:
    """Past LIVE_ATOL in float32: both towers and text models again in float64, judged by
    conftest.assert_agree_in_float64. The reference's text model reads minqwen's float64
    features, and minqwen's greedy steps follow the float64 reference's tokens."""
    import make_vision_fixtures as builder

    ours64, tower64 = ours.astype(np.float64), tower.astype(np.float64)
    with reference.computing_in_float64():
        exact = builder.run_vision_reference(copy.deepcopy(model).double(), processor, images, ids,
                                             n_greedy=len(expected["greedy"]), features=tower64.encode_images(images)[0])
    got64 = minqwen_vision_outputs(ours64, tower64, ids, images, exact["greedy"])
    labels = ["features", "prefill logits"] + [f"greedy step {i}" for i in range(len(exact["greedy"]))]
    assert_agree_in_float64(got, reference_vision_outputs(expected), got64, reference_vision_outputs(exact), what,
                            labels)


@pytest.mark.reference
def test_a_vision_miss_is_judged_in_float64_and_a_real_error_still_fails(tmp_path, monkeypatch):
    # The judge itself, on a fixed small tower (exact GELU in its blocks: Numba's kernel in
    # float32, its NumPy twin in float64) and two images.
    reference = require_reference()
    require_pillow()
    import make_vision_fixtures as builder

    vision_cfg = builder.tiny_vision(hidden_act="gelu")
    model = builder.build_vision_model(builder.tiny_text(), vision_cfg, 3)
    settings_ = builder.preprocessor_settings(vision_cfg, 64, 32 * 32, 3)
    builder.save_vision_checkpoint(model, settings_, tmp_path)
    rng = np.random.default_rng(3)
    images = [builder.test_image(rng, h, w) for h, w in [(20, 28), (45, 31)]]
    ids = builder.prompt(rng, builder.tiny_text()["vocab_size"], len(images))
    ours, tower = minqwen.load(tmp_path), vision.load_vision(tmp_path)
    processor = builder.reference_processor(settings_)
    expected = builder.run_vision_reference(model, processor, images, ids, n_greedy=2,
                                            features=tower.encode_images(images)[0])

    def judge(got, what):
        judge_vision_in_float64(reference, model, processor, ours, tower, images, ids, got, expected, what)

    judge(minqwen_vision_outputs(ours, tower, ids, images, expected["greedy"]), "a correct tower")

    # A tower whose LayerNorms take eps 10% too large: float32's sanity bound lets it through,
    # the float64 judge does not.
    monkeypatch.setattr(vision, "LAYER_NORM_EPS", 1.1 * vision.LAYER_NORM_EPS)
    off = minqwen_vision_outputs(ours, tower, ids, images, expected["greedy"])
    assert max(np.abs(o - e).max() for o, e in zip(off, reference_vision_outputs(expected))) < FLOAT32_SANITY
    with pytest.raises(AssertionError, match="float64, features of a tower with an error"):
        judge(off, "a tower with an error")


@pytest.mark.reference
def test_a_multi_frame_grid_matches_the_reference_tower():
    """The machinery video frames would use: grid t > 1, distinct frames, attention per frame."""
    require_reference()
    import torch

    import make_vision_fixtures as builder

    vision_cfg = builder.tiny_vision()
    model = builder.build_vision_model(builder.tiny_text(), vision_cfg, seed=5)
    folder = VISION_FIXTURES / "vision_fp32"
    tower = vision.load_vision(folder)
    visual_state = {k[len("model.visual."):]: torch.from_numpy(v) for k, v in
                    load_file(str(folder / "model.safetensors")).items() if k.startswith("model.visual.")}
    model.model.visual.load_state_dict(visual_state)
    grid = np.array([[3, 4, 6], [2, 6, 2]])
    pixel_values = np.random.default_rng(0).normal(size=(int(grid.prod(1).sum()), tower.config.patch_dim))
    pixel_values = pixel_values.astype(np.float32)
    with torch.no_grad():
        want = model.model.visual(torch.from_numpy(pixel_values), grid_thw=torch.from_numpy(grid)).pooler_output.numpy()
    np.testing.assert_allclose(tower.forward(pixel_values, grid), want, rtol=0, atol=ATOL)


@pytest.mark.reference
@settings(max_examples=300, deadline=None, derandomize=True)
@given(h=st.integers(1, 3000), w=st.integers(1, 3000), factor=st.sampled_from([8, 28, 32]),
       budget=st.sampled_from([(64, 4096), (56 * 56, 28 * 28 * 1280), (65536, 16777216)]))
def test_smart_resize_is_the_references(h, w, factor, budget):
    require_reference()
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as reference_smart_resize

    if max(h, w) / min(h, w) > 200:
        return
    assert smart_resize(h, w, factor, *budget) == reference_smart_resize(h, w, factor, *budget)


@pytest.mark.reference
@pytest.mark.parametrize("h, w, budget, want", [
    (60, 68, (64, 64 * 64), (64, 64)),  # rounds (half to even) to 64 × 64, exactly max_pixels: kept, not shrunk to 56 × 64
    (60, 68, (64 * 64, 2**20), (64, 64)),  # exactly min_pixels: kept, not grown to 64 × 72
    (1, 200, (56 * 56, 28 * 28 * 1280), (8, 792)),  # an aspect ratio of exactly 200 is still allowed
])
def test_smart_resize_on_the_edges_of_its_budget_is_the_references(h, w, budget, want):
    """The bounds are strict in the reference (> max_pixels shrinks, < min_pixels grows); the random
    draws above rarely land exactly on them."""
    require_reference()
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as reference_smart_resize

    assert reference_smart_resize(h, w, 8, *budget) == want
    assert smart_resize(h, w, 8, *budget) == want


@pytest.mark.reference
def test_a_preprocessor_config_leaving_fields_out_gets_the_reference_processors_defaults():
    """Fields a preprocessor_config.json leaves out take the reference class's defaults (Qwen2-VL's);
    the fixtures write every field, so none of the defaults is used there."""
    require_reference()
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    reference = Qwen2VLImageProcessorPil()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # and an empty config is no unknown field
        ours = preprocessor_config_from_dict({})
    assert (ours.min_pixels, ours.max_pixels) == (reference.size.shortest_edge, reference.size.longest_edge)
    assert ours.image_mean == tuple(reference.image_mean) and ours.image_std == tuple(reference.image_std)
    assert (ours.patch_size, ours.temporal_patch_size, ours.merge_size) == (
        reference.patch_size, reference.temporal_patch_size, reference.merge_size)
    assert (ours.resample, ours.rescale_factor) == (int(reference.resample), reference.rescale_factor)
    assert (ours.do_resize, ours.do_rescale, ours.do_normalize) == (
        reference.do_resize, reference.do_rescale, reference.do_normalize)


@pytest.mark.reference
@pytest.mark.parametrize("change", [
    dict(rope_parameters=None, rope_theta=50.0),  # rope_theta in its legacy place, beside the other fields
    dict(rope_parameters=dict(rope_type="default", rope_theta=7.0)),  # an old save's rope_type, read as axial
    dict(depth=None, num_hidden_layers=1, num_heads=None, num_attention_heads=4),  # the attribute_map aliases
], ids=repr)
def test_legacy_and_aliased_vision_fields_are_read_as_transformers_reads_them(change):
    require_reference()
    from transformers.models.qwen3_5.configuration_qwen3_5 import Qwen3_5VisionConfig

    raw = json.loads((VISION_FIXTURES / "vision_fp32" / "config.json").read_text())
    fields = {k: v for k, v in dict(raw["vision_config"], **change).items() if v is not None}
    raw["vision_config"] = fields
    reference = Qwen3_5VisionConfig(**copy.deepcopy(fields))  # it rewrites a rope_parameters dict in place
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an alias must not be reported as an unknown field
        ours = vision.vision_config_from_dict(raw, raw["text_config"]["hidden_size"], raw["text_config"]["vocab_size"])
    assert (ours.depth, ours.num_heads) == (reference.depth, reference.num_heads)
    assert ours.rope_theta == reference.rope_parameters["rope_theta"]


@pytest.mark.reference
def test_rope_index_of_multi_frame_grids_is_the_references():
    """Frames of a grid with t > 1 on the first row, each frame's merged grid on the other two — the
    reference's (t, row, column) meshgrid. The fixtures' images all have t = 1, and the t > 1 case
    above is one merged patch a frame, where any order of the three axes gives the same positions."""
    require_reference()
    import torch

    import make_vision_fixtures as builder

    model = builder.build_vision_model(builder.tiny_text(), builder.tiny_vision(), seed=0)
    config = vision.VisionConfig(image_token_id=model.config.image_token_id,
                                 video_token_id=model.config.video_token_id, spatial_merge_size=2)
    grid = np.array([[2, 4, 6], [3, 6, 2]])
    ids = np.array([1, 2, config.image_token_id, 3, config.image_token_id, 4])
    full = vision.expand_image_tokens(ids, grid, config.image_token_id, 2)
    input_ids = torch.from_numpy(full)[None]
    want, delta = model.model.get_rope_index(input_ids, (input_ids == config.image_token_id).int(),
                                             image_grid_thw=torch.from_numpy(grid))
    positions, next_position = vision.rope_index(full, grid, config)
    np.testing.assert_array_equal(positions, want[:, 0].numpy())
    assert next_position - len(full) == int(delta.reshape(-1)[0])


@pytest.mark.reference
@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "P", "LA"])
def test_pillow_images_of_every_mode_preprocess_as_the_reference(mode):
    require_reference()
    Image = require_pillow()
    import make_vision_fixtures as builder

    rgb = builder.test_image(np.random.default_rng(3), 37, 53)
    image = Image.fromarray(rgb)
    if mode == "RGBA":
        alpha = np.random.default_rng(4).integers(0, 256, rgb.shape[:2], dtype=np.uint8)
        image = Image.fromarray(np.dstack([rgb, alpha]))
    elif mode != "RGB":
        image = image.convert(mode)
    settings_ = builder.preprocessor_settings(builder.tiny_vision(), 64, 48 * 48, seed=1)
    want = builder.reference_processor(settings_)(images=[image], return_tensors="np")
    got = preprocess(image, preprocessor_config_from_dict(settings_))
    np.testing.assert_array_equal(got[1], want["image_grid_thw"])
    np.testing.assert_array_equal(got[0], want["pixel_values"])


# ==================================================================== options and sizes the fixtures leave out


BASE = dict(patch_size=4, temporal_patch_size=2, merge_size=2, size=dict(shortest_edge=64, longest_edge=48 * 48),
            image_mean=[0.52, 0.41, 0.33], image_std=[0.21, 0.26, 0.31])


def random_image(seed, h, w):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


# ==================================================================== preprocessing options (reference)


@pytest.mark.reference
@pytest.mark.parametrize("options", [
    dict(resample=2),                                # bilinear: config.resample must reach the resize
    dict(do_rescale=False),                          # pixels stay 0…255 before normalisation
    dict(do_normalize=False),
    dict(do_rescale=False, do_normalize=False),
    dict(image_mean=0.5, image_std=0.25),            # one number stands for all three channels
    dict(rescale_factor=1 / 127.5),
], ids=repr)
def test_every_preprocessor_option_is_the_reference_processors(options):
    """Options the fixtures leave at their defaults, on non-square images off the grid, too small and too large."""
    require_reference()
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    settings = dict(BASE, **options)
    reference = Qwen2VLImageProcessorPil(**settings)
    config = preprocessor_config_from_dict(settings)
    for seed, (h, w) in enumerate([(37, 53), (90, 20), (5, 7), (130, 97)]):
        image = random_image(seed, h, w)
        want = reference(images=[image], return_tensors="np", input_data_format="channels_last")
        pixel_values, grid = preprocess(image, config)
        np.testing.assert_array_equal(grid, want["image_grid_thw"])
        np.testing.assert_array_equal(pixel_values, want["pixel_values"], err_msg=f"{options} {h}×{w}")


@pytest.mark.reference
@pytest.mark.parametrize("mode", ["P", "L", "RGB"])
def test_transparency_without_an_alpha_band_goes_white_as_in_the_reference(mode, tmp_path):
    """A palette / grey / RGB PNG (or GIF) marks transparency with a tRNS entry, not an alpha band."""
    require_reference()
    Image = require_pillow()
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    rgb = (np.random.default_rng(7).integers(0, 4, (24, 40, 3)) * 80).astype(np.uint8)  # few colours
    image = Image.fromarray(rgb).convert(mode)
    stored = np.array(image)
    image.save(tmp_path / "t.png", transparency=stored[0, 0].tolist() if mode == "RGB" else int(stored[0, 0]))
    loaded = Image.open(tmp_path / "t.png")
    loaded.load()
    assert loaded.mode == mode and loaded.info.get("transparency") is not None
    transparent = (stored == stored[0, 0]).all(axis=-1) if mode == "RGB" else stored == stored[0, 0]
    assert transparent.any() and not transparent.all()
    # read_image itself: transparent pixels are white, the others keep their colour.
    got = read_image(loaded)
    assert (got[transparent] == 255).all()
    np.testing.assert_array_equal(got[~transparent], np.array(loaded.convert("RGB"))[~transparent])
    # …and the pixel values are the reference processor's.
    reference = Qwen2VLImageProcessorPil(**BASE)
    want = reference(images=[loaded], return_tensors="np")
    np.testing.assert_array_equal(preprocess(loaded, preprocessor_config_from_dict(BASE))[0], want["pixel_values"])


# ==================================================================== preprocessing without the reference


def test_do_resize_false_refuses_an_image_past_the_allocation_limit_before_touching_its_pixels():
    # 16385 × 16384 pixels (2²⁸ + 2¹⁴), a broadcast view of one pixel: only its size is read. Not shrunk
    # (do_resize false), it would be 3 GB of float32; the limit is checked before the grid is.
    config = preprocessor_config_from_dict(dict(BASE, do_resize=False))
    huge = np.broadcast_to(np.zeros((1, 1, 3), np.uint8), (16385, 16384, 3))
    with pytest.raises(MinqwenError, match=r"16384×16385 pixels, more than minqwen allocates .*do_resize is false"):
        preprocess(huge, config)


def test_do_resize_false_refuses_either_side_off_the_grid_by_name():
    config = preprocessor_config_from_dict(dict(BASE, do_resize=False))  # factor 8
    for h, w in ((16, 20), (20, 16)):
        with pytest.raises(MinqwenError, match="do_resize is false.*not multiples of patch_size × merge_size = 8"):
            preprocess(random_image(0, h, w), config)
    pixel_values, grid = preprocess(random_image(0, 16, 24), config)
    assert grid.tolist() == [[1, 4, 6]] and pixel_values.shape == (24, 3 * 2 * 4 * 4)


def test_resizing_a_photo_sized_image_over_several_row_blocks_is_pillows():
    """_resample_rows works a block of output rows at a time (≈4M sums); the Pillow tests use tiny images."""
    Image = require_pillow()
    image = random_image(3, 1000, 1500)
    for height, width in ((900, 1400), (1100, 1400)):  # a pass with 1398 rows per block makes 1400 rows
        want = np.array(Image.fromarray(image).resize((width, height), resample=3))
        np.testing.assert_array_equal(resize_numpy(image, height, width), want, err_msg=f"{height}×{width}")


# ==================================================================== the tower


@pytest.mark.parametrize("name", sorted(p.name for p in VISION_FIXTURES.iterdir()
                                        if (p / "expected.safetensors").is_file()))
def test_attention_split_into_many_score_blocks_still_matches_the_reference(name, monkeypatch):
    """A real image (thousands of patches) splits each head's attention into blocks of query rows;
    the fixtures' tiny frames never do. A small SCORE_BLOCK makes them, with a partial last block."""
    folder = VISION_FIXTURES / name
    expected = load_file(str(folder / "expected.safetensors"))
    tower = vision.load_vision(folder)
    for prompt in sorted({k.split(".")[0] for k in expected if k.endswith(".ids")}):
        images = [expected[f"image.{i}"] for i in expected[f"{prompt}.images"]]
        lengths = expected[f"{prompt}.grid_thw"][:, 1:].prod(axis=1)
        monkeypatch.setattr(vision, "SCORE_BLOCK", int(lengths.max()) * 3)  # 3 query rows per block
        features, _ = tower.encode_images(images)
        np.testing.assert_allclose(features, expected[f"{prompt}.features"], rtol=0, atol=ATOL, err_msg=prompt)


def test_attention_scores_beyond_float32s_exp_still_give_the_softmax(monkeypatch):
    """exp overflows float32 past a score of ~88.7; the softmax is taken after subtracting each
    row's largest score, so large scores (which trained towers can produce) give the softmax, not
    NaN. Against float64 attention from its definition; several blocks of query rows."""
    rng = np.random.default_rng(5)
    length, heads, hd = 21, 2, 16
    q, k, v = (rng.standard_normal((length, heads, hd)).astype(np.float32) for _ in range(3))
    q *= 40  # scores q·k / √hd with a standard deviation of ~40: many beyond 88.7
    monkeypatch.setattr(vision, "SCORE_BLOCK", length * 4)  # 4 query rows a block, a partial last one
    got = vision.frame_attention(q, k, v)
    q64, k64, v64 = (a.astype(np.float64) for a in (q, k, v))
    scores = np.einsum("lhd,mhd->hlm", q64, k64) / np.sqrt(hd)  # [heads, L, L]
    assert scores.max() > 100
    weights = np.exp(scores - scores.max(axis=-1, keepdims=True))
    weights /= weights.sum(axis=-1, keepdims=True)
    expected = np.einsum("hlm,mhd->lhd", weights, v64)
    np.testing.assert_allclose(got, expected, rtol=0, atol=ATOL)


@pytest.mark.reference
@pytest.mark.parametrize("head_dim", [64, 72])  # Qwen3.5's towers: 768 / 12 heads, 1152 / 16
def test_the_towers_rotary_frequencies_are_rounded_as_transformers_rounds_them(head_dim):
    """The tower's frequencies, as the text model's: a float32 power, then a float32 reciprocal
    (compute_axial_rope_parameters). Rounded once from float64, 4 and 11 of them are a float32
    step off at these head dims, a drift too small for the fixtures' tolerance to see."""
    require_reference()
    import torch

    spatial = head_dim // 2
    inv_freq = (1.0 / (10000.0 ** (torch.arange(0, spatial, 2, dtype=torch.float) / spatial))).numpy()
    grid = np.array([[1, 32, 48]])
    coords = vision.patch_coordinates(grid, 2).astype(np.float32)  # [N, 2]: row, column
    half = (coords[:, :, None] * inv_freq).reshape(len(coords), -1)  # row angles, then column angles
    emb = np.concatenate([half, half], axis=-1)
    cos, sin = vision.rotary_cos_sin(grid, 2, head_dim, 10000.0)
    np.testing.assert_array_equal(cos, np.cos(emb))
    np.testing.assert_array_equal(sin, np.sin(emb))


def reference_tower(tmp_path, seed=3, **vision_overrides):
    """A random transformers Qwen3.5 model with this vision config, saved and loaded by minqwen."""
    require_reference()
    import make_vision_fixtures as builder

    vision_cfg = builder.tiny_vision(**vision_overrides)
    model = builder.build_vision_model(builder.tiny_text(), vision_cfg, seed)
    factor = vision_cfg["patch_size"] * vision_cfg["spatial_merge_size"]
    settings = builder.preprocessor_settings(vision_cfg, factor * factor, factor * factor * 25, seed)
    builder.save_vision_checkpoint(model, settings, tmp_path, "float32")
    return model, vision.load_vision(tmp_path)


def compare_towers(model, tower, grid):
    import torch

    grid = np.array(grid)
    pixel_values = np.random.default_rng(0).normal(size=(int(grid.prod(1).sum()), tower.config.patch_dim))
    pixel_values = pixel_values.astype(np.float32)
    with torch.no_grad():
        want = model.model.visual(torch.from_numpy(pixel_values), grid_thw=torch.from_numpy(grid)).pooler_output
    np.testing.assert_allclose(tower.forward(pixel_values, grid), want.numpy(), rtol=0, atol=ATOL)


@pytest.mark.reference
def test_the_vision_rope_theta_of_the_config_is_used(tmp_path):
    model, tower = reference_tower(tmp_path, rope_parameters=dict(rope_type="axial", rope_theta=50.0))
    assert json.loads((tmp_path / "config.json").read_text())["vision_config"]["rope_parameters"]["rope_theta"] == 50.0
    assert tower.config.rope_theta == 50.0
    compare_towers(model, tower, [[1, 4, 6], [1, 8, 2]])
