"""Bad input found by a second probe: each case gets a MinqwenError whose message names the file,
field or argument — never a bare Python exception, a hang, or silently wrong numbers.
"""

from __future__ import annotations

import collections
import copy
import json
import os
import pathlib
import resource
import shutil
import subprocess
import sys

import numpy as np
import pytest

import minqwen
from minqwen import ChatSession, SamplingParams, Tokenizer, golden, mtp, vision
from minqwen.config import config_from_dict
from minqwen.errors import MinqwenError
from minqwen.generate import generate_ids, stream_text
from minqwen.image import preprocessor_config_from_dict
from minqwen.scoring import log_probs, score_text

from conftest import ROOT

EMBEDDED = ROOT / "minqwen" / "embedded"
VISION_FIXTURE = ROOT / "tests" / "fixtures_vision" / "vision_fp32"
BASE = json.loads((EMBEDDED / "config.json").read_text(encoding="utf-8"))
GREEDY = SamplingParams()


@pytest.fixture(scope="module")
def model():
    return minqwen.load(EMBEDDED)


@pytest.fixture(scope="module")
def tok():
    return Tokenizer(EMBEDDED)


def embedded_copy(tmp_path, edit_config=None, files=None):
    """The embedded checkpoint in tmp_path (weights linked, not copied), config.json edited."""
    d = tmp_path / "ckpt"
    d.mkdir()
    for f in EMBEDDED.iterdir():
        if f.name == "model.safetensors":
            os.symlink(f.resolve(), d / f.name)
        else:
            shutil.copy(f, d / f.name)
    if edit_config:
        c = json.loads((d / "config.json").read_text(encoding="utf-8"))
        edit_config(c)
        (d / "config.json").write_text(json.dumps(c), encoding="utf-8")
    for name, text in (files or {}).items():
        (d / name).write_text(text, encoding="utf-8")
    return d


# ------------------------------------------------------------------------------------------
def test_rms_norm_eps_int_literal_too_long_for_a_float_is_named():
    with pytest.raises(MinqwenError, match="rms_norm_eps"):
        config_from_dict(dict(BASE, rms_norm_eps=10**400), "cfg")


# ------------------------------------------------------------------------------------------
def test_yarn_default_factor_from_a_huge_max_position_embeddings_is_named():
    raw = dict(BASE, max_position_embeddings=10**400,
               rope_parameters=dict(BASE["rope_parameters"], rope_type="yarn", original_max_position_embeddings=2048,
                                   factor=None))
    with pytest.raises(MinqwenError, match="factor' is null, and max_position_embeddings"):
        config_from_dict(raw, "cfg")


# ------------------------------------------------------------------------------------------
def test_vision_rope_theta_too_long_for_a_float_is_named():
    raw = json.loads((VISION_FIXTURE / "config.json").read_text(encoding="utf-8"))
    raw["vision_config"]["rope_parameters"] = {"rope_type": "axial", "rope_theta": 10**400}
    text = raw["text_config"]
    with pytest.raises(MinqwenError, match="rope_theta"):
        vision.vision_config_from_dict(raw, text["hidden_size"], text["vocab_size"], "cfg")


# ------------------------------------------------------------------------------------------
def test_preprocessor_numbers_too_long_for_a_float_are_named():
    raw = json.loads((VISION_FIXTURE / "preprocessor_config.json").read_text(encoding="utf-8"))
    with pytest.raises(MinqwenError, match="image_mean"):
        preprocessor_config_from_dict(dict(raw, image_mean=[10**400, 0, 0]), "pp")
    with pytest.raises(MinqwenError, match="rescale_factor"):
        preprocessor_config_from_dict(dict(raw, rescale_factor=10**400), "pp")


# ------------------------------------------------------------------------------------------
def test_rms_norm_eps_that_overflows_float32_is_refused(tmp_path):
    folder = embedded_copy(tmp_path, lambda c: c.__setitem__("rms_norm_eps", 1e39))
    with pytest.raises(MinqwenError, match="rms_norm_eps"):  # in float32 it is inf, and every logit 0
        minqwen.load(folder)


# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("eos", [[[4089]], [{"a": 1}], "4089", 4089.5, True])
def test_generation_config_eos_token_id_of_the_wrong_type_is_named(tmp_path, eos):
    folder = embedded_copy(tmp_path, files={"generation_config.json": json.dumps({"eos_token_id": eos})})
    with pytest.raises(MinqwenError, match="generation_config.json.*eos_token_id"):
        Tokenizer(folder)


# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("template", [[{"name": ["x"], "template": "a"}],
                                      [{"name": "tool_use", "template": "{{ messages[0].content }}"}],
                                      5])
def test_an_unusable_tokenizer_config_chat_template_is_named(tmp_path, template):
    config = json.loads((EMBEDDED / "tokenizer_config.json").read_text(encoding="utf-8"))
    config["chat_template"] = template
    folder = embedded_copy(tmp_path, files={"tokenizer_config.json": json.dumps(config)})
    with pytest.raises(MinqwenError, match="chat_template|chat template"):
        Tokenizer(folder).render_chat([{"role": "user", "content": "hi"}])


# ------------------------------------------------------------------------------------------
def test_a_chat_template_with_runaway_output_is_refused(tok):
    t = copy.copy(tok)
    t.chat_template = "{% for i in range(100000) %}{% for j in range(100) %}x{% endfor %}{% endfor %}"  # 10**7 chars
    with pytest.raises(MinqwenError, match="chat template"):
        t.render_chat([{"role": "user", "content": "hi"}])


def test_a_chat_template_that_loops_without_writing_is_refused(tok):
    # 10**10 steps of nothing: the output guard above never fires, the loop guard does, within ~1 s.
    t = copy.copy(tok)
    t.chat_template = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}x"
    with pytest.raises(MinqwenError, match="the chat template's loops took more than 5,000,000 steps"):
        t.render_chat([{"role": "user", "content": "hi"}])


def test_counting_a_templates_loop_steps_leaves_what_loop_tells_it_as_it_was(tok):
    t = copy.copy(tok)
    t.chat_template = ("{% for m in messages %}{{ loop.index }}/{{ loop.length }}{{ '!' if loop.last }} {% endfor %}"
                       "{% for k, v in {'a': 1}.items() %}{{ k }}{{ v }}{% else %}none{% endfor %}"
                       "{% for x in [] %}{{ x }}{% else %} none{% endfor %}")
    assert t.render_chat([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]) == "1/2 2/2! a1 none"


def test_a_special_token_named_as_a_template_argument_is_named_with_its_file(tmp_path):
    # transformers fails here too, with a TypeError about 'messages' given twice
    folder = embedded_copy(tmp_path)
    config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    config["extra_special_tokens"] = {"messages": "<|im_end|>"}
    (folder / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    with pytest.raises(MinqwenError, match=r"tokenizer_config.json's extra_special_tokens\) include one named "
                                           r"'messages'"):
        Tokenizer(folder).render_chat([{"role": "user", "content": "hi"}])


def test_an_empty_chat_template_is_named_not_blamed_on_the_prompt(tmp_path, model):
    folder = embedded_copy(tmp_path, files={"chat_template.jinja": ""})
    with pytest.raises(MinqwenError, match="the chat template rendered this conversation as empty text"):
        minqwen.generate(model, Tokenizer(folder), [{"role": "user", "content": "hello"}], max_new_tokens=2)


# ------------------------------------------------------------------------------------------
def _limit_memory():
    resource.setrlimit(resource.RLIMIT_DATA, (1_500_000_000, 1_500_000_000))


def test_golden_record_with_a_huge_decode_count_does_not_hang(tmp_path):
    out = tmp_path / "g.safetensors"
    proc = subprocess.run(
        [sys.executable, "-m", "minqwen", "golden", "record", "--model", str(EMBEDDED), "--tokens", "1,2",
         "--decode", str(10**21), "--taps", "logits", "--out", str(out)],
        capture_output=True, text=True, timeout=90, preexec_fn=_limit_memory,
        env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert "Traceback" not in proc.stderr
    assert proc.returncode == 2 and "decode_steps" in proc.stderr, proc.stderr[-300:]


# ------------------------------------------------------------------------------------------
def test_stop_ids_and_stats_of_the_wrong_kind_are_named(model):
    head = mtp.load_mtp(EMBEDDED, model)
    with pytest.raises(MinqwenError, match="stop_ids"):
        list(generate_ids(model, [1], GREEDY, 2, stop_ids=[[1]]))
    with pytest.raises(MinqwenError, match=r"stop_ids must hold token ids \(whole numbers ≥ 0\), got \[5, -1\]"):
        list(generate_ids(model, [1], GREEDY, 2, stop_ids=[5, -1]))  # a typo that could never stop anything
    for bad in (5, "ab", [[1]]):
        with pytest.raises(MinqwenError, match="stop_ids"):
            list(mtp.speculative_generate(model, head, [1, 2], GREEDY, 3, stop_ids=bad))
    with pytest.raises(MinqwenError, match="stats"):
        list(mtp.speculative_generate(model, head, [1, 2], GREEDY, 3, stats=5))


# ------------------------------------------------------------------------------------------
def test_api_arguments_of_the_wrong_kind_are_named(model, tok):
    with pytest.raises(MinqwenError, match="tap"):
        model.forward([1], tap=5)
    with pytest.raises(MinqwenError, match="progress"):
        score_text(model, tok, "hello world foo bar", progress=5)
    with pytest.raises(MinqwenError, match="model"):
        minqwen.generate(None, tok, "hi", max_new_tokens=2)
    with pytest.raises(MinqwenError, match="tokenizer"):
        list(minqwen.stream(model, None, "hi", max_new_tokens=2))
    with pytest.raises(MinqwenError, match="model"):
        "".join(ChatSession(None, tok).reply("hi", max_new_tokens=2))
    with pytest.raises(MinqwenError, match="model"):
        mtp.load_mtp(EMBEDDED, None)
    with pytest.raises(MinqwenError, match="object|dict"):
        config_from_dict([1], "cfg")
    with pytest.raises(MinqwenError, match="1-D"):
        log_probs(model, [[1, 2], [3, 4]])


# ------------------------------------------------------------------------------------------
def test_inputs_embeds_that_are_not_real_numbers_are_refused(model):
    for bad in (np.array([[None] * 256]), np.ones((1, 256), np.complex64)):
        with pytest.raises(MinqwenError, match="inputs_embeds"):
            model.forward(inputs_embeds=bad)


# ------------------------------------------------------------------------------------------
def test_mtp_use_dedicated_embeddings_of_the_wrong_type_is_named_as_it_is(tmp_path, model):
    folder = embedded_copy(tmp_path, lambda c: c.__setitem__("mtp_use_dedicated_embeddings", "false"))
    with pytest.raises(MinqwenError, match="mtp_use_dedicated_embeddings") as e:
        mtp.load_mtp(folder, model)
    assert "is true" not in str(e.value) and "'false'" in str(e.value)


# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("pad", ["<|image_pad|>", "<|video_pad|>"])
def test_an_image_pad_in_a_system_message_without_images_is_refused(model, tok, pad):
    session = ChatSession(model, tok, messages=[{"role": "system", "content": pad}])
    with pytest.raises(MinqwenError, match=pad.strip("<|>")):
        "".join(session.reply("hi", max_new_tokens=1))


# ------------------------------------------------------------------------------------------
def test_a_golden_file_is_never_written_over_a_device_or_a_pipe(model, tmp_path):
    # safetensors replaces what is at the path with a plain file: over /dev/full, as root, it
    # replaced the device itself.
    pipe = tmp_path / "pipe"
    os.mkfifo(pipe)
    recording = golden.record(model, [1, 2], taps="logits")
    with pytest.raises(MinqwenError, match="not a regular file"):
        golden.save(recording, pipe, golden.model_metadata(model))
    assert pipe.is_fifo()


# ------------------------------------------------------------------------------------------
# What the checks above must still let through.

def test_inputs_embeds_of_any_real_dtype_are_still_accepted(model):
    import ml_dtypes

    rows = model.embed([1, 2, 3])  # [3, H] float32
    expected = model.forward(inputs_embeds=rows)
    for dtype in (ml_dtypes.bfloat16, np.float16, np.float64):
        given = rows.astype(dtype)
        np.testing.assert_array_equal(model.forward(inputs_embeds=given),
                                      model.forward(inputs_embeds=given.astype(np.float32)))
    whole = np.ones((2, rows.shape[1]), np.int64)
    np.testing.assert_array_equal(model.forward(inputs_embeds=whole), model.forward(inputs_embeds=whole.astype(np.float32)))
    assert expected.shape == (3, model.config.vocab_size)


def test_stop_ids_as_numpy_integers_are_accepted(model):
    first = list(generate_ids(model, [1, 2], GREEDY, 4))
    stopped = list(generate_ids(model, [1, 2], GREEDY, 4, stop_ids=np.array([first[1]])))
    assert stopped == first[:2]


def test_a_golden_recording_may_fill_the_context_exactly(tmp_path):
    folder = embedded_copy(tmp_path, lambda c: c.__setitem__("max_position_embeddings", 8))
    small = minqwen.load(folder)
    recording = golden.record(small, [1, 2, 3], decode_steps=5, taps="logits")
    assert recording["generated_ids"].size == 5
    with pytest.raises(MinqwenError, match="decode_steps"):
        golden.record(small, [1, 2, 3], decode_steps=6, taps="logits")


def test_a_negative_eos_id_in_generation_config_is_ignored_with_a_warning_as_transformers_does(tmp_path):
    folder = embedded_copy(tmp_path, files={"generation_config.json": json.dumps({"eos_token_id": [-1, 4089]})})
    with pytest.warns(UserWarning, match="negative"):
        tok = Tokenizer(folder)
    assert -1 not in tok.eos_ids and 4089 in tok.eos_ids


def test_chat_templates_given_as_an_object_of_named_templates_use_the_default(tmp_path):
    config = json.loads((EMBEDDED / "tokenizer_config.json").read_text(encoding="utf-8"))
    config["chat_template"] = {"default": "[{{ messages[0].content }}]", "tool_use": "x"}
    folder = embedded_copy(tmp_path, files={"tokenizer_config.json": json.dumps(config)})
    assert Tokenizer(folder).render_chat([{"role": "user", "content": "hi"}]) == "[hi]"


def test_a_text_only_chat_goes_on_after_the_model_writes_an_image_token(model, tok):
    from conftest import forced

    session = ChatSession(model, tok)
    end = tok.token_to_id("<|im_end|>")
    "".join(session.reply("hi", decode=forced([tok.token_to_id("<|image_pad|>"), end])))
    answer = "".join(session.reply("and then?", max_new_tokens=2))  # no error: that token was the model's
    assert isinstance(answer, str) and [m["role"] for m in session.messages] == ["user", "assistant"] * 2


# ------------------------------------------------------------------------------------------
# Found by a third review (December 5): each of these ended in a bare Python exception.
@pytest.mark.parametrize("call, names", [
    (lambda m, t, h: list(generate_ids(m, [1, 2], None, 2)), ["params", "NoneType", "SamplingParams()"]),
    (lambda m, t, h: list(stream_text(m, t, [1, 2], None, 2)), ["params"]),
    (lambda m, t, h: list(mtp.speculative_generate(m, h, [1, 2], None, 2)), ["params"]),
    (lambda m, t, h: list(ChatSession(m, t).reply("hi", "greedy", 2)), ["params", "str"]),
    (lambda m, t, h: ChatSession(m, t, messages="hi"), ["messages", "str"]),
    (lambda m, t, h: ChatSession(m, t, messages=None), ["messages", "NoneType"]),
    (lambda m, t, h: ChatSession(m, t, tower="x"), ["tower", "load_vision"]),
    (lambda m, t, h: list(ChatSession(m, t).reply("hi", images=5)), ["images", "int"]),
    (lambda m, t, h: list(ChatSession(m, t).reply("hi", images=True)), ["images", "bool"]),
    (lambda m, t, h: t.decode(5), ["decode", "int"]),
    # iterable, but not ids: bytes would decode their byte values as token ids, silently
    (lambda m, t, h: t.decode(b"\x05\x06"), ["decode takes a sequence of token ids", "bytes"]),
    (lambda m, t, h: mtp.load_mtp(123, m), ["load_mtp", "int"]),
    (lambda m, t, h: vision.load_vision(123), ["load_vision", "int"]),
    (lambda m, t, h: score_text(m, "x", "hello world"), ["tokenizer", "str"]),
    (lambda m, t, h: list(stream_text(m, t, [1, 2], GREEDY, 2, ids_out="x")), ["ids_out", "str"]),
    (lambda m, t, h: golden.save({"token_ids": np.array([1])}, "unused.safetensors", None), ["metadata"]),
    (lambda m, t, h: golden.save([1], "unused.safetensors", {"config_sha256": "0"}), ["recording", "dict"]),
    (lambda m, t, h: SamplingParams.from_generation_config("x"), ["generation config", "dict", "str"]),
], ids=["generate-params", "stream-params", "speculative-params", "reply-params", "messages-str",
        "messages-none", "tower", "images-int", "images-bool", "decode-int", "decode-bytes", "load-mtp", "load-vision",
        "score-tokenizer", "ids-out", "save-metadata", "save-recording", "generation-config"])
def test_api_arguments_of_the_wrong_kind_are_named_too(model, tok, call, names):
    head = mtp.load_mtp(EMBEDDED, model)
    with pytest.raises(MinqwenError) as raised:
        call(model, tok, head)
    for name in names:
        assert name in str(raised.value)


@pytest.mark.parametrize("pixel_values, grid_thw, name", [
    ([[1.0, 2.0], [3.0]], [[1, 2, 2]], "pixel_values"),
    (np.zeros((4, 4), np.float32), [[1, 2], [2]], "grid_thw"),
    (np.array([["a"]]), [[1, 2, 2]], "pixel_values"),
])
def test_a_vision_forward_with_ragged_or_non_numeric_inputs_names_them(pixel_values, grid_thw, name):
    tower = vision.load_vision(VISION_FIXTURE)
    with pytest.raises(MinqwenError, match=f"{name} must be an array of numbers"):
        tower.forward(pixel_values, grid_thw)


def test_golden_record_takes_numpy_integers_for_decode_steps(model):
    recording = golden.record(model, [1, 2, 3], decode_steps=np.int64(2), taps="logits")
    assert recording["generated_ids"].shape == (2,) and "step1.logits" in recording


def test_a_model_folder_under_an_unknown_home_is_no_such_folder(capsys):
    from minqwen.cli import main

    assert main(["inspect", "--model", "~nosuchuser_minqwen_test/model"]) == 2
    assert "~nosuchuser_minqwen_test/model: no such folder" in capsys.readouterr().err


# What those checks must still let through (a review of them found each refused).
def test_images_may_come_from_any_iterable():
    tower = vision.load_vision(VISION_FIXTURE)
    image = np.zeros((32, 32, 3), np.uint8)
    want, _ = tower.encode_images([image])
    for images in ((i for i in [image]), collections.deque([image]), map(np.asarray, [image])):
        np.testing.assert_array_equal(tower.encode_images(images)[0], want)
    for wrong in (5, True, None):
        with pytest.raises(MinqwenError, match="images must be a list"):
            tower.encode_images(wrong)
    # Iterable, but not a list of images: a dict would give its keys (a path each, say), bytes their values
    for wrong in ({"photo.png": image}, b"\x89PNG"):
        with pytest.raises(MinqwenError, match=f"images must be a list .* got {type(wrong).__name__}$"):
            tower.encode_images(wrong)


def test_ids_out_takes_anything_with_append(model, tok):
    as_list, as_deque = [], collections.deque()
    "".join(stream_text(model, tok, [1, 2], GREEDY, 3, ids_out=as_list))
    "".join(stream_text(model, tok, [1, 2], GREEDY, 3, ids_out=as_deque))
    assert list(as_deque) == as_list and as_list


def test_every_loader_takes_any_path_like(model):
    folder = pathlib.PurePath(EMBEDDED)
    assert minqwen.load(folder).config == model.config
    assert Tokenizer(folder).encode("hi") == Tokenizer(EMBEDDED).encode("hi")
    assert isinstance(mtp.load_mtp(folder, model), mtp.MtpHead)
    assert isinstance(vision.load_vision(pathlib.PurePath(VISION_FIXTURE)), vision.VisionTower)


def test_decode_of_a_zero_dimensional_array_is_named(tok):
    with pytest.raises(MinqwenError, match="decode takes a sequence of token ids"):
        tok.decode(np.array(5))


def test_a_loaded_recording_saves_again_with_its_own_metadata(model, tmp_path):
    golden.save(golden.record(model, [1, 2, 3], decode_steps=1), tmp_path / "a.safetensors",
                golden.model_metadata(model))
    loaded = golden.load_recording(tmp_path / "a.safetensors")  # its tensors come back sorted by name
    golden.save(loaded.tensors, tmp_path / "b.safetensors", loaded.metadata)
    names = [row["name"] for row in golden.load_recording(tmp_path / "b.safetensors").metadata["taps"]]
    assert names == sorted(names, key=golden.forward_order)


# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["broken-link", "folder"])
@pytest.mark.parametrize("name", ["generation_config.json", "tokenizer_config.json", "chat_template.jinja",
                                  "tokenizer.json", "config.json"])
def test_a_checkpoint_file_that_is_there_but_unreadable_is_named_not_taken_for_absent(tmp_path, name, kind):
    # An interrupted download leaves broken links: read as absent, generation_config.json would
    # quietly turn the release's sampling into greedy decoding, and a lost template into ChatML.
    folder = embedded_copy(tmp_path)
    path = folder / name
    path.unlink(missing_ok=True)
    if kind == "broken-link":
        os.symlink(tmp_path / "nowhere", path)
    else:
        path.mkdir()
    what = "a symbolic link to nothing" if kind == "broken-link" else "a folder"
    message = rf"{name}: is here but cannot be read as a file \({what}\)"
    with pytest.raises(MinqwenError, match=message):
        minqwen.load(folder) if name == "config.json" else Tokenizer(folder)


def test_a_preprocessor_config_that_is_a_broken_link_is_named(tmp_path):
    folder = tmp_path / "vision"
    shutil.copytree(VISION_FIXTURE, folder)
    (folder / "preprocessor_config.json").unlink()
    os.symlink(tmp_path / "nowhere", folder / "preprocessor_config.json")
    with pytest.raises(MinqwenError, match=r"preprocessor_config.json: is here but cannot be read as a file"):
        vision.load_vision(folder)


# ------------------------------------------------------------------------------------------ a third probe
@pytest.mark.parametrize("ids", [[[1], [2, 3]], np.array([1, 2], "timedelta64[s]")], ids=["ragged", "timedelta"])
def test_token_ids_that_are_no_integer_sequence_are_named_on_every_path(model, ids):
    # NumPy counts timedelta64 among its integers; a ragged nesting is a ValueError inside it
    head = mtp.load_mtp(EMBEDDED, model)
    for call, name in ((lambda: model.forward(ids), "token_ids"), (lambda: log_probs(model, ids), "scoring"),
                       (lambda: mtp.mtp_logits(model, head, ids), "mtp_logits"),
                       (lambda: list(generate_ids(model, ids, max_new_tokens=1)), "the prompt"),
                       (lambda: list(generate_ids(model, [1], max_new_tokens=1, history=ids)), "history"),
                       (lambda: list(generate_ids(model, [1], max_new_tokens=1, stop_ids=ids)), "stop_ids")):
        if name == "history" and isinstance(ids, np.ndarray):
            name = "history id"
        with pytest.raises(MinqwenError, match=name):
            call()


@pytest.mark.parametrize("argument", ["history", "stop_ids"])
def test_a_zero_dimensional_array_of_ids_is_named(model, argument):
    with pytest.raises(MinqwenError, match=rf"{argument} must be a (sequence|collection) of token ids"):
        list(generate_ids(model, [1], max_new_tokens=1, **{argument: np.array(5)}))


@pytest.mark.parametrize("value", [np.nan, np.inf, 1e39], ids=["nan", "inf", "past-float32"])
def test_inputs_embeds_and_pixel_values_that_are_not_finite_are_refused(model, value):
    x = np.zeros((2, model.config.hidden_size), np.float64)
    x[1, 3] = value  # 1e39 is finite in float64 and infinite once cast to the model's float32
    with pytest.raises(MinqwenError, match="inputs_embeds holds NaN or infinite values"):
        model.forward(inputs_embeds=x)
    tower = vision.load_vision(VISION_FIXTURE)
    grid = np.array([[1, 2, 2]])
    pixels = np.zeros((4, tower.config.patch_dim), np.float64)
    pixels[0, 0] = value
    with pytest.raises(MinqwenError, match="pixel_values holds NaN or infinite values"):
        tower.forward(pixels, grid)


def test_a_grid_whose_patch_count_wraps_around_int64_is_refused_by_its_true_count():
    # 2**32 × 2**32 patches is 0 in int64: the grid would pass as one of 4 patches
    tower = vision.load_vision(VISION_FIXTURE)
    grid = np.array([[1, 2, 2], [1, 2**32, 2**32]])
    with pytest.raises(MinqwenError, match=rf"pixel_values must have shape \[{4 + 2**64}, "):
        tower.forward(np.zeros((4, tower.config.patch_dim), np.float32), grid)


def test_objects_of_the_wrong_kind_are_named_before_use(model, tok):
    tower = vision.load_vision(VISION_FIXTURE)
    vision_model = minqwen.load(VISION_FIXTURE)
    cases = [
        (lambda: minqwen.generate(model, tok, "hi", max_new_tokens=1, decode=1), "decode must be a decoding loop"),
        (lambda: vision.prefill(vision_model, None, [1], [], vision_model.new_cache()), "tower must be a vision tower"),
        (lambda: vision.prefill(None, tower, [1], [], vision_model.new_cache()), "model must be a minqwen model"),
        (lambda: vision.multimodal_inputs(vision_model, tower, [1], [], cache=5), "cache must be the model's cache"),
        (lambda: mtp.MtpCache(model, None), "head must be an MTP head"),
        (lambda: mtp.MtpCache(model, mtp.load_mtp(EMBEDDED, model), start=-1), "start must be a whole number ≥ 0"),
        (lambda: model.astype(np.int32), "astype takes np.float32 or np.float64"),
        (lambda: model.astype(None), "astype takes np.float32 or np.float64"),
    ]
    for call, message in cases:
        with pytest.raises(MinqwenError, match=message):
            call()
