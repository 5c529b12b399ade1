"""Images in a chat, and images on the command line, with a multimodal checkpoint that has a tokenizer.

The vision fixtures (tests/fixtures_vision/) have no tokenizer: their vocabulary is 128 ids,
with the vision tokens at 124 … 127. Here the fp32 fixture gets one, made for it: a character
per id, and the chat and vision tokens at the ids its config names. The chat template is the
embedded model's (Qwen3.5's format). Every character round-trips, so a fixture prompt written
as text tokenizes back to the fixture's own ids.
"""

import io
import json
import os
import shutil
from pathlib import Path
import subprocess
import sys

import numpy as np
import pytest
from safetensors.numpy import load_file

import minqwen
from conftest import ROOT, Recorder, forced, require_pillow
from minqwen import MinqwenError, vision
from minqwen.checkpoint import EMBEDDED
from minqwen.generate import ChatSession, GenerationStats
from minqwen.sampling import SamplingParams
from minqwen.tokenizer import Tokenizer

FIXTURE = ROOT / "tests" / "fixtures_vision" / "vision_fp32"
ATOL = 1e-4
GREEDY = SamplingParams()
SCRIPT = shutil.which("minqwen") or ""
ENV = dict(os.environ, PYTHONIOENCODING="utf-8")

# ids 0 … 118: printable ASCII, newline, then 23 Latin-1 letters; 119 … 127: the special tokens.
CHARACTERS = [chr(c) for c in range(32, 127)] + ["\n"] + [chr(c) for c in range(0xC0, 0xC0 + 23)]
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
THINK = ["<think>", "</think>"]  # added tokens, but not special: a decode keeps them
VISION = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]


def write_tokenizer(folder):
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders
    from tokenizers.models import BPE

    tok = HFTokenizer(BPE(vocab={c: i for i, c in enumerate(CHARACTERS)}, merges=[]))
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(SPECIAL)
    tok.add_tokens(THINK)
    tok.add_special_tokens(VISION)
    tok.save(str(folder / "tokenizer.json"))
    template = json.loads((EMBEDDED / "tokenizer_config.json").read_text(encoding="utf-8"))["chat_template"]
    (folder / "tokenizer_config.json").write_text(json.dumps({"chat_template": template, "eos_token": "<|im_end|>"}))


def chat_checkpoint(folder: Path) -> Path:
    """The vision fixture's files in ``folder``, with a tokenizer that knows the vision tokens."""
    for name in ("config.json", "model.safetensors", "preprocessor_config.json"):
        shutil.copy(FIXTURE / name, folder / name)
    write_tokenizer(folder)
    return folder


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    folder = chat_checkpoint(tmp_path_factory.mktemp("vision_chat"))
    config = json.loads((folder / "config.json").read_text())
    tokenizer = Tokenizer(folder)
    for token, field in zip(VISION, ("vision_start_token_id", "vision_end_token_id", "image_token_id",
                                     "video_token_id")):
        assert tokenizer.token_to_id(token) == config[field]
    assert tokenizer.vocab_size == config["text_config"]["vocab_size"]
    return folder


@pytest.fixture(scope="module")
def setup(folder):
    return minqwen.load(folder), Tokenizer(folder), vision.load_vision(folder)


@pytest.fixture(scope="module")
def expected():
    return load_file(str(FIXTURE / "expected.safetensors"))


@pytest.fixture(scope="module")
def pngs(tmp_path_factory, expected):
    """The fixture's test images as PNG files (lossless: Pillow reads back the same pixels)."""
    Image = require_pillow()
    folder = tmp_path_factory.mktemp("images")
    paths = []
    i = 0
    while f"image.{i}" in expected:
        paths.append(folder / f"image{i}.png")
        Image.fromarray(expected[f"image.{i}"]).save(paths[-1])
        i += 1
    return paths


def assert_turn_equals_one_fresh_prefill(model, tower, tokenizer, session, n_generated, recorded_rows):
    """The logits the session generated with equal those of one prefill of the whole conversation."""
    full = tokenizer.encode(tokenizer.render_chat(session.messages[:-1], add_generation_prompt=True,
                                                  enable_thinking=session.enable_thinking))
    assert session.log[: len(full)] == full  # the cache holds exactly the rendered conversation…
    ids = session.log  # …and then the tokens generated this turn, all but the last
    assert len(ids) == len(full) + n_generated - 1
    fresh = model.new_cache()
    logits = vision.prefill(model, tower, ids, session.images, fresh, last_only=False)  # [T expanded, V]
    np.testing.assert_allclose(np.stack(recorded_rows[-n_generated:]), logits[-n_generated:], rtol=0, atol=ATOL)
    assert (session.cache.position, session.cache.rope_delta) == (fresh.position, fresh.rope_delta)


# ==================================================================== the chat session


@pytest.mark.parametrize("roll_back_past_the_images", [False, True], ids=["snapshots", "roll-back-to-start"])
def test_a_chat_with_images_over_three_turns_equals_one_fresh_prefill_of_the_conversation(
        setup, expected, roll_back_past_the_images):
    """Cache reuse across turns is exact with images: their features, 3-D positions and the rope
    delta the text after them carries, through snapshots and roll-backs (enable_thinking=False:
    each turn's re-rendered history drops the previous answer's empty think block, so the
    session rolls back every turn). Rolling back to the start re-feeds every image."""
    model, tokenizer, tower = setup
    recorder = Recorder(model)
    session = ChatSession(recorder, tokenizer, enable_thinking=False, tower=tower)
    turns = [("Describe this.", [expected["image.0"]]), ("And this one, taller?", [expected["image.1"]]),
             ("Which is wider?", [])]
    for n, (text, images) in enumerate(turns):
        if roll_back_past_the_images:
            session.snapshots = {0: session.snapshots[0]}
        before = list(session.log)
        stats = GenerationStats()
        "".join(session.reply(text, GREEDY, max_new_tokens=5, stats=stats, images=images))
        if n:
            assert session.log[: len(before)] != before, "the turn rolled back over the previous answer"
        assert_turn_equals_one_fresh_prefill(model, tower, tokenizer, session, stats.generated_tokens, recorder.rows)
    assert len(session.images) == 2 and session.cache.rope_delta < 0


def test_an_image_token_the_model_writes_stays_out_of_the_history(setup, expected):
    """The i-th <|image_pad|> of the history must be the i-th image: a generated one is dropped
    from the stored answer, and the next turn, with an image, is still exact."""
    model, tokenizer, tower = setup
    pad, end = tower.config.image_token_id, tokenizer.token_to_id("<|im_end|>")
    recorder = Recorder(model)
    session = ChatSession(recorder, tokenizer, enable_thinking=False, tower=tower)
    "".join(session.reply("Describe this.", images=[expected["image.0"]], decode=forced([pad, 40, pad, 41, end])))
    assert session.messages[-1]["content"].endswith("HI")
    assert "<|image_pad|>" not in session.messages[-1]["content"]
    stats = GenerationStats()
    "".join(session.reply("And this?", GREEDY, max_new_tokens=4, stats=stats, images=[expected["image.2"]]))
    assert_turn_equals_one_fresh_prefill(model, tower, tokenizer, session, stats.generated_tokens, recorder.rows)


def test_images_without_a_vision_tower_are_refused_and_change_nothing(setup, expected):
    model, tokenizer, _ = setup
    session = ChatSession(model, tokenizer)
    with pytest.raises(MinqwenError, match="no vision tower"):
        "".join(session.reply("Describe this.", images=[expected["image.0"]]))
    assert session.messages == [] and session.log == []


def test_image_tokens_written_into_the_text_or_a_bad_file_are_refused_and_change_nothing(setup, expected, tmp_path):
    model, tokenizer, tower = setup
    session = ChatSession(model, tokenizer, tower=tower)
    with pytest.raises(MinqwenError, match="4 <.image_pad.> tokens .id 126. for 1 images"):
        "".join(session.reply("<|image_pad|>" * 3 + "Describe this.", images=[expected["image.0"]]))
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    require_pillow()
    with pytest.raises(MinqwenError, match="bad.png: cannot read this image file"):
        "".join(session.reply("Describe this.", images=[bad]))
    assert session.messages == [] and session.images == [] and session.log == []


def test_an_image_preprocessing_would_refuse_is_refused_before_the_chat_changes(setup, expected):
    model, tokenizer, tower = setup
    session = ChatSession(model, tokenizer, tower=tower)
    with pytest.raises(MinqwenError, match="aspect ratio above 200"):
        "".join(session.reply("Describe this.", images=[np.zeros((1, 500, 3), np.uint8)]))
    assert session.messages == [] and session.images == [] and session.log == []
    # and the session still works: the next turn with a good image goes through
    "".join(session.reply("Describe this.", images=[expected["image.0"]], max_new_tokens=2))
    assert len(session.images) == 1 and len(session.messages) == 2  # the user's turn and the answer
    assert session._count_images(session.log) == 1  # the image went into the cache with its turn


def test_images_beyond_the_context_are_refused_before_the_tower_runs_and_the_chat_changes(folder, expected,
                                                                                          monkeypatch):
    # The tower's attention grows with the square of an image's patches: a huge image must be
    # refused by its token count, not after minutes of encoding.
    from dataclasses import replace
    model, tokenizer, tower = minqwen.load(folder), Tokenizer(folder), vision.load_vision(folder)
    image = expected["image.0"]
    tokens = tower.token_count(*image.shape[:2])
    model.config = replace(model.config, max_position_embeddings=tokens + 2)
    pad = tower.config.image_token_id
    monkeypatch.setattr(tower, "forward", lambda *a: pytest.fail("the tower ran on images that cannot fit"))
    with pytest.raises(MinqwenError, match=rf"would reach {tokens + 3} tokens, beyond the model's context of "
                                           rf"{tokens + 2} .*its images take {tokens} tokens \("):
        vision.prefill(model, tower, [1, 2, pad, 3], [image], model.new_cache())
    session = ChatSession(model, tokenizer, tower=tower)
    with pytest.raises(MinqwenError, match=r"beyond the model's context"):
        "".join(session.reply("Describe this.", images=[image]))
    assert session.messages == [] and session.images == [] and session.log == []


@pytest.mark.parametrize("images", [None, "photo.png", "array"], ids=repr)
def test_one_image_where_a_list_is_expected_is_an_error_saying_so(setup, expected, images):
    model, tokenizer, tower = setup
    images = expected["image.0"] if images == "array" else images
    with pytest.raises(MinqwenError, match="images must be a list of images"):
        "".join(ChatSession(model, tokenizer, tower=tower).reply("Describe this.", images=images))
    with pytest.raises(MinqwenError, match="images must be a list of images"):
        vision.prefill(model, tower, [1, 2], images, model.new_cache())


def test_prefill_without_a_cache_is_an_error_saying_what_it_needs(setup, expected):
    model, _, tower = setup
    with pytest.raises(MinqwenError, match="prefill needs the cache to fill"):
        vision.prefill(model, tower, [1, 2], [], None)


def test_the_token_count_of_an_image_is_its_merged_patches_in_the_references_grid(setup, expected):
    _, _, tower = setup
    i = 0
    while f"image.{i}" in expected:
        height, width = expected[f"image.{i}"].shape[:2]
        assert tower.token_count(height, width) == expected[f"grid_thw.{i}"].prod() // tower.config.merge_unit
        i += 1


# ==================================================================== the command line


def run(*args, stdin=None, env=ENV):
    command = [SCRIPT, *args] if SCRIPT else [sys.executable, "-m", "minqwen", *args]
    return subprocess.run(command, input=stdin, capture_output=True, text=True, env=env, timeout=300)


def assert_clean_error(result, message):
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert message in result.stderr, result.stderr


@pytest.mark.parametrize("prompt", ["one_image", "two_images"])
def test_generate_with_images_writes_the_references_greedy_continuation(folder, setup, expected, pngs, prompt):
    """The fixture's prompt as text, its images as PNG files: the console script prints the
    continuation transformers computed (two_images' holds an <|image_pad|> the model wrote)."""
    _, tokenizer, _ = setup
    ids = expected[f"{prompt}.ids"].tolist()
    text = tokenizer.decode(ids)
    assert tokenizer.encode(text) == ids
    images = [str(pngs[i]) for i in expected[f"{prompt}.images"]]
    greedy = expected[f"{prompt}.greedy"].tolist()
    result = run("generate", text, "--model", str(folder), *[a for p in images for a in ("--image", p)],
                 "--no-echo", "--temperature", "0", "--max-new-tokens", str(len(greedy)))
    assert result.returncode == 0, result.stderr
    assert result.stdout == tokenizer.decode(greedy, skip_special_tokens=True) + "\n"
    assert f"decode: {len(greedy)} tokens" in result.stderr
    # The prefill counts every position fed: each image's placeholder stands for its merged patches.
    _, _, tower = setup
    patches = sum(tower.token_count(*expected[f"image.{i}"].shape[:2]) for i in expected[f"{prompt}.images"])
    assert f"prefill: {len(ids) - len(images) + patches} tokens" in result.stderr, result.stderr


def test_generate_puts_the_images_before_a_prompt_that_does_not_place_them(folder, setup, pngs):
    _, tokenizer, _ = setup
    placed = run("generate", "<|vision_start|><|image_pad|><|vision_end|>Look.", "--model", str(folder),
                 "--image", str(pngs[0]), "--no-echo", "--temperature", "0", "--max-new-tokens", "5")
    unplaced = run("generate", "Look.", "--model", str(folder), "--image", str(pngs[0]), "--no-echo",
                   "--temperature", "0", "--max-new-tokens", "5")
    assert placed.returncode == 0 and unplaced.returncode == 0, placed.stderr + unplaced.stderr
    assert placed.stdout == unplaced.stdout and len(placed.stdout) > 1
    echoed = run("generate", "Look.", "--model", str(folder), "--image", str(pngs[0]), "--temperature", "0",
                 "--max-new-tokens", "5")
    assert echoed.stdout == "Look." + unplaced.stdout  # the prompt echoed as given, without the placeholder


def test_golden_record_puts_the_images_before_a_prompt_that_does_not_place_them(folder, pngs, tmp_path):
    from minqwen import golden
    from minqwen.cli import main

    for name, text in (("placed", "<|vision_start|><|image_pad|><|vision_end|>Look."), ("unplaced", "Look.")):
        assert main(["golden", "record", "--model", str(folder), "--prompt", text, "--image", str(pngs[0]),
                     "--out", str(tmp_path / f"{name}.safetensors")]) == 0
    placed, unplaced = (golden.load_recording(tmp_path / f"{name}.safetensors") for name in ("placed", "unplaced"))
    assert placed.token_ids == unplaced.token_ids and "visual.merger" in placed.tensors
    assert golden.compare(tmp_path / "unplaced.safetensors", tmp_path / "placed.safetensors").ok


def expected_chat(setup, turns):
    """What `minqwen chat --no-think --temperature 0 --max-new-tokens 6` prints, through the Python API."""
    from minqwen.cli import ThinkingPrinter

    model, tokenizer, tower = setup
    session = ChatSession(model, tokenizer, enable_thinking=False, tower=tower)
    out = io.StringIO()
    for text, images in turns:
        printer = ThinkingPrinter(hide=False, in_think=False, out=out)
        for piece in session.reply(text, GREEDY, 6, images=images):
            printer.write(piece)
        printer.close()
        out.write("\n")
    return out.getvalue()


def test_chat_attaches_images_with_a_slash_image_line_and_with_the_image_option(folder, setup, expected, pngs):
    want = expected_chat(setup, [("Describe it.", [str(pngs[0])]), ("And now?", [str(pngs[1])]), ("Why?", [])])
    options = ("chat", "--model", str(folder), "--no-think", "--temperature", "0", "--max-new-tokens", "6")
    by_lines = run(*options, stdin=f"/image {pngs[0]}\nDescribe it.\n/image {pngs[1]}\nAnd now?\nWhy?\n")
    assert by_lines.returncode == 0, by_lines.stderr
    assert by_lines.stdout == want
    tokens = expected["grid_thw.0"].prod() // 4  # the reference's grid, 2 × 2 patches per token
    assert by_lines.stderr.count("[image ") == 2 and f"28×20 pixels, {tokens} image tokens" in by_lines.stderr
    by_option = run(*options, "--image", str(pngs[0]), stdin=f"Describe it.\n/image {pngs[1]}\nAnd now?\nWhy?\n")
    assert by_option.returncode == 0, by_option.stderr
    assert by_option.stdout == want


def test_a_corrupt_image_is_a_clean_error_in_generate_and_in_chat(folder, tmp_path):
    require_pillow()
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(64)))
    assert_clean_error(run("generate", "Look.", "--model", str(folder), "--image", str(bad)),
                       "broken.png: cannot read this image file")
    assert_clean_error(run("chat", "--model", str(folder), stdin=f"/image {bad}\nLook.\n"),
                       "broken.png: cannot read this image file")
    assert_clean_error(run("chat", "--model", str(folder), stdin="/image\nLook.\n"), "/image needs a path")


def test_an_image_of_an_extreme_aspect_ratio_is_an_error_naming_its_file(folder, tmp_path):
    Image = require_pillow()
    thin = tmp_path / "thin.png"
    Image.fromarray(np.zeros((1, 500, 3), np.uint8)).save(thin)
    assert_clean_error(run("generate", "Look.", "--model", str(folder), "--image", str(thin)),
                       "thin.png: the image is 500×1 pixels, an aspect ratio above 200:1")
    with pytest.raises(MinqwenError, match=r"thin\.png: the image is 500×1 pixels"):
        vision.load_vision(folder).encode_images([thin])


def test_images_with_a_text_only_checkpoint_or_without_pillow_are_clean_errors(folder, pngs, tmp_path):
    assert_clean_error(run("chat", "--image", str(pngs[0]), stdin="Look.\n"), "has no vision tower")
    assert_clean_error(run("chat", stdin=f"/image {pngs[0]}\nLook.\n"), "has no vision tower")
    # An importable 'PIL' that fails like a missing one.
    (tmp_path / "PIL").mkdir()
    (tmp_path / "PIL" / "__init__.py").write_text("raise ImportError('Pillow is hidden for this test')\n")
    no_pillow = dict(ENV, PYTHONPATH=os.pathsep.join([str(tmp_path), ENV.get("PYTHONPATH", "")]))
    assert_clean_error(run("chat", "--model", str(folder), "--image", str(pngs[0]), stdin="Look.\n", env=no_pillow),
                       "reading image files needs Pillow")
