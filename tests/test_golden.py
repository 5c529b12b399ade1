"""Golden outputs (issue #5): recordings are right, comparisons find the first wrong tap.

What is checked, top to bottom:

* the tap table (golden.TAPS) lists exactly the taps a forward pass makes, in its order, with
  the shapes it states;
* recordings of the fixtures agree with transformers: hidden states, final norm, logits, the
  decode state and the greedy continuation stored in expected.safetensors, and — with forward
  hooks on the transformers modules, in-process — every internal tap, prompt and decode steps;
* recording changes nothing: logits with and without taps are bitwise equal, and the decode
  steps are those of a plain cached decode;
* compare finds an error injected into layer k — into a recorded tap, or into a weight of the
  model — and names layer k's first affected tap;
* the file format (metadata as JSON, config hash, manifest) and the errors for bad input;
* the command line, in a subprocess: exit code 0 when within tolerance, 1 on divergence;
* the worked example in tools/golden_port_example.py.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

import minqwen
from conftest import FIXTURE_NAMES, FIXTURES, ROOT, fixture_with_word_tokenizer, require_reference
from minqwen import golden
from minqwen.cli import main as cli_main
from minqwen.errors import MinqwenError

ATOL = 1e-4
DECODE_STEPS = 4


@pytest.fixture(scope="module")
def models():
    """Each fixture's minqwen model, loaded once."""
    return {name: minqwen.load(FIXTURES / name) for name in FIXTURE_NAMES}


def expected(name):
    return load_file(str(FIXTURES / name / "expected.safetensors"))


def save_recording(model, recording, path):
    golden.save(recording, path, golden.model_metadata(model))
    return path


# ============================================================================ the tap table


def shape_of(symbolic: str, c, t: int) -> tuple[int, ...]:
    """Evaluate a shape from the tap table, e.g. "[K−1, C]", for config c and T = t tokens."""
    symbols = dict(
        T=t, H=c.hidden_size, V=c.vocab_size, I=c.intermediate_size,
        Hk=c.linear_num_key_heads, Dk=c.linear_key_head_dim, Hv=c.linear_num_value_heads,
        Dv=c.linear_value_head_dim, K=c.linear_conv_kernel_dim, C=c.linear_conv_dim,
        Hq=c.num_attention_heads, Hkv=c.num_key_value_heads, D=c.head_dim,
        E=c.num_experts, k=c.num_experts_per_tok,
    )
    terms = symbolic.strip("[]").replace("−", "-").replace("·", "*").split(",")
    return tuple(eval(term, {"__builtins__": {}}, symbols) for term in terms)


@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_tap_table_lists_every_tap_forward_makes_in_order_with_its_shape_and_dtype(models, name):
    model = models[name]
    ids = expected(name)["token_ids"]
    seen = []
    model.forward(ids, tap=lambda tap_name, value: seen.append((tap_name, value.shape, value.dtype)))

    assert [tap_name for tap_name, _, _ in seen] == golden.tap_names(model.config)
    table = {tap.name: tap for tap in golden.TAPS}
    for tap_name, shape, dtype in seen:
        # layers.3.mlp → layers.{i}.mlp
        generic = ".".join("{i}" if part.isdigit() else part for part in tap_name.split("."))
        tap = table[generic]
        assert shape == shape_of(tap.shape, model.config, len(ids)), tap_name
        assert str(dtype) == tap.dtype, tap_name


def test_tap_table_prints_every_tap():
    text = golden.format_tap_table()
    for tap in golden.TAPS:
        assert tap.name in text


# ============================================================================ against transformers


@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_recording_matches_transformers_hidden_states_final_states_and_greedy_tokens(models, name):
    model, ref = models[name], expected(name)
    rec = golden.record(model, ref["token_ids"], decode_steps=DECODE_STEPS)

    close = dict(atol=ATOL, rtol=0)
    for i, kind in enumerate(model.config.layer_types):
        np.testing.assert_allclose(rec[f"layers.{i}.output"], ref[f"hidden.{i}"], **close, err_msg=f"layer {i}")
        if kind == "linear_attention":
            np.testing.assert_allclose(rec[f"layers.{i}.linear_attn.conv_state"], ref[f"state.{i}.conv"], **close)
            np.testing.assert_allclose(rec[f"layers.{i}.linear_attn.recurrent_state"], ref[f"state.{i}.recurrent"],
                                       **close)
        else:  # the prompt's keys and values are the whole cache: [T, Hkv, D] → the reference's [Hkv, T, D]
            np.testing.assert_allclose(rec[f"layers.{i}.self_attn.k"].transpose(1, 0, 2), ref[f"state.{i}.keys"],
                                       **close)
            np.testing.assert_allclose(rec[f"layers.{i}.self_attn.v"].transpose(1, 0, 2), ref[f"state.{i}.values"],
                                       **close)
    np.testing.assert_allclose(rec["norm"], ref["norm"], **close)
    np.testing.assert_allclose(rec["logits"], ref["logits"], **close)
    assert rec["generated_ids"].tolist() == ref["greedy"][:DECODE_STEPS].tolist()


def load_reference_model(name):
    """The fixture checkpoint loaded by transformers itself, fp32, eager attention (and experts)."""
    return require_reference().load_pretrained(FIXTURES / name)


def reference_taps(hf_model, token_ids, decode_steps: int) -> dict[str, np.ndarray]:
    """The golden taps caught with forward hooks on transformers: tools/reference.py's, shared with
    tools/compare_with_transformers.py."""
    return require_reference().reference_taps(hf_model, token_ids, decode_steps)


@pytest.mark.reference
@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_every_tap_matches_its_transformers_counterpart_caught_with_forward_hooks(models, name, tmp_path):
    model = models[name]
    ids = expected(name)["token_ids"]
    hf_model = load_reference_model(name)

    ours = save_recording(model, golden.record(model, ids, decode_steps=3), tmp_path / "minqwen.safetensors")
    theirs = tmp_path / "transformers.safetensors"
    golden.save(reference_taps(hf_model, ids, decode_steps=3), theirs,
                {"config_sha256": golden.config_hash(model.config), "producer": "transformers (forward hooks)"})
    report = golden.compare(ours, theirs, atol=ATOL, rtol=1e-3)

    assert report.ok, report.format()
    assert report.only_in_a == [] and report.only_in_b == [], "every minqwen tap has a reference counterpart"
    assert len(report.rows) == 2 + 4 * len(golden.tap_names(model.config))  # both id vectors, prompt, 3 steps


# ============================================================================ recording changes nothing


@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_recording_leaves_logits_bitwise_identical(models, name):
    model = models[name]
    ids = expected(name)["token_ids"]
    rec = golden.record(model, ids)
    assert np.array_equal(rec["logits"], model.forward(ids))
    assert np.array_equal(rec["logits"], model.forward(ids, tap=lambda tap_name, value: None))


@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_decode_steps_recorded_per_step_equal_a_plain_cached_decode(models, name):
    model = models[name]
    ids = expected(name)["token_ids"]
    rec = golden.record(model, ids, decode_steps=DECODE_STEPS)

    cache = model.new_cache()
    logits = model.forward(ids, cache, last_only=True)
    for n in range(DECODE_STEPS):
        token = int(np.argmax(logits[-1]))
        assert rec["generated_ids"][n] == token
        logits = model.forward([token], cache, last_only=True)
        assert np.array_equal(rec[f"step{n}.logits"], logits), f"step {n}"
    last = f"step{DECODE_STEPS - 1}."
    for i, state in enumerate(cache.layers):
        if model.config.layer_types[i] == "linear_attention":
            assert np.array_equal(rec[f"{last}layers.{i}.linear_attn.conv_state"], state.conv)
            assert np.array_equal(rec[f"{last}layers.{i}.linear_attn.recurrent_state"], state.recurrent)


# ============================================================================ finding an injected error


def perturbed_copy(path, tap, delta, out):
    tensors = load_file(str(path))
    tensors[tap] = tensors[tap] + np.float32(delta)
    with safe_open(str(path), framework="np") as f:
        metadata = f.metadata()
    save_file(tensors, str(out), metadata=metadata)
    return out


@pytest.mark.parametrize("tap", ["layers.1.post_attention_layernorm", "layers.3.self_attn.q",
                                 "step1.layers.2.linear_attn.recurrent_state"])
def test_compare_names_a_perturbed_tap_as_the_first_divergence(models, tap, tmp_path):
    model = models["text_tied_fp32"]
    rec = golden.record(model, [3, 1, 4, 1, 5, 9], decode_steps=2)
    good = save_recording(model, rec, tmp_path / "good.safetensors")
    bad = perturbed_copy(good, tap, 1e-2, tmp_path / "bad.safetensors")
    slight = perturbed_copy(good, tap, 1e-5, tmp_path / "slight.safetensors")

    report = golden.compare(bad, good)
    assert not report.ok
    assert report.first_divergent.name == tap
    assert [row.name for row in report.rows if not row.ok] == [tap]
    assert f">> {tap} " in report.format()
    assert golden.compare(slight, good).ok  # 1e-5 is within atol 1e-4


# (layer, weight, the first tap it changes). Every element of the weight gets + 0.05; the first
# tap to change is the one that weight produces, everything before it stays bit for bit the same.
WEIGHT_INJECTIONS = [
    (0, "input_layernorm", "layers.0.input_layernorm"),
    (1, "linear_attn.in_proj_a", "layers.1.linear_attn.in_proj_a"),
    (1, "linear_attn.conv1d", "layers.1.linear_attn.conv1d"),
    (2, "linear_attn.A_log", "layers.2.linear_attn.g"),
    (2, "linear_attn.norm", "layers.2.linear_attn.norm"),
    (2, "mlp.down_proj", "layers.2.mlp"),
    (3, "self_attn.q_norm", "layers.3.self_attn.q_norm"),
    (3, "self_attn.k_norm", "layers.3.self_attn.k_norm"),
    (3, "self_attn.v_proj", "layers.3.self_attn.v"),
    (3, "self_attn.o_proj", "layers.3.token_mixer"),
]


@pytest.mark.parametrize("layer, weight, first", WEIGHT_INJECTIONS)
def test_compare_names_the_first_tap_of_the_layer_whose_weight_was_changed(models, layer, weight, first, tmp_path):
    model = models["text_tied_fp32"]
    ids = [3, 1, 4, 1, 5, 9, 2, 6]
    good = save_recording(model, golden.record(model, ids, decode_steps=2), tmp_path / "good.safetensors")

    broken = minqwen.load(FIXTURES / "text_tied_fp32")  # a second copy of the model
    owner, attr = broken.layers[layer], weight
    while "." in attr:
        part, attr = attr.split(".", 1)
        owner = getattr(owner, part)
    setattr(owner, attr, getattr(owner, attr) + np.float32(0.05))
    bad = save_recording(broken, golden.record(broken, ids, decode_steps=2), tmp_path / "bad.safetensors")

    report = golden.compare(bad, good)
    assert report.first_divergent is not None and report.first_divergent.name == first, report.format()
    before = report.rows[: report.rows.index(report.first_divergent)]
    assert all(row.max_abs == 0 for row in before), "everything upstream is bit for bit the same"


def write_logits(path, logits, generated=None):
    """A minimal recording: two prompt ids, the given logits and, if given, greedy ids."""
    recording = {"token_ids": np.array([1, 2], np.int64), "logits": np.asarray(logits, np.float32)}
    if generated is not None:
        recording["generated_ids"] = np.asarray(generated, np.int64)
    golden.save(recording, path, {"config_sha256": "same"})
    return path


def test_beyond_tolerance_means_abs_diff_above_atol_plus_rtol_times_reference(tmp_path):
    ref = write_logits(tmp_path / "ref.safetensors", [10.0])  # threshold: 1e-4 + 1e-3 · 10 = 0.0101
    inside = write_logits(tmp_path / "inside.safetensors", [10.0095])
    outside = write_logits(tmp_path / "outside.safetensors", [10.0110])
    assert golden.compare(inside, ref).ok
    report = golden.compare(outside, ref)
    assert report.first_divergent.name == "logits"
    assert report.first_divergent.max_rel == pytest.approx(1.1e-3, rel=1e-3)
    assert golden.compare(outside, ref, rtol=2e-3).ok
    assert "atol 0.0001, rtol 0.001" in report.format()


def test_the_report_points_at_the_worst_element_of_the_first_divergent_tap(tmp_path):
    # A port wrong in a few places (rotary on the wrong dims, say) learns where, not only that.
    logits = np.linspace(-1, 1, 24, dtype=np.float32).reshape(2, 3, 4)
    port = logits.copy()
    port[1, 2, 3] += 0.5  # the worst
    port[0, 1, 0] += 0.2
    ref_path = write_logits(tmp_path / "ref.safetensors", logits)
    report = golden.compare(write_logits(tmp_path / "port.safetensors", port), ref_path)
    row = report.first_divergent
    assert (row.beyond, row.worst, row.nans) == (2, (1, 2, 3), 0)
    assert row.worst_values == pytest.approx((float(port[1, 2, 3]), float(logits[1, 2, 3])))
    assert "the worst at index [1, 2, 3]" in report.format()


def test_a_nan_is_counted_apart_and_does_not_hide_the_size_of_the_other_errors(tmp_path):
    logits = np.zeros(6, np.float32)
    port = logits.copy()
    port[1], port[4] = 0.25, np.nan
    report = golden.compare(write_logits(tmp_path / "port.safetensors", port),
                            write_logits(tmp_path / "ref.safetensors", logits))
    row = report.first_divergent
    assert (row.beyond, row.nans, row.worst) == (2, 1, (4,))  # the NaN is where to look first
    assert row.max_abs == pytest.approx(0.25)
    assert "1 NaN" in report.format() and "max abs 0.25" in report.format()


def test_equal_infinities_are_no_error_and_opposite_ones_are_an_infinite_one(tmp_path):
    ref = write_logits(tmp_path / "ref.safetensors", [np.inf, -np.inf, 1.0])
    assert golden.compare(write_logits(tmp_path / "same.safetensors", [np.inf, -np.inf, 1.0]), ref).ok
    row = golden.compare(write_logits(tmp_path / "flip.safetensors", [-np.inf, -np.inf, 1.5]), ref).first_divergent
    assert (row.beyond, row.nans, row.worst, row.max_abs) == (2, 0, (0,), np.inf)


@pytest.mark.parametrize("a_value, b_value", [(1.105, 1.0), (1.0, 1.105), (-2.2, -2.0), (-2.0, -2.2)])
def test_the_relative_tolerance_scales_with_b_the_reference_not_with_a(tmp_path, a_value, b_value):
    # pairs where scaling rtol by |a| and by |b| give different answers
    a = write_logits(tmp_path / "a.safetensors", [a_value])
    b = write_logits(tmp_path / "b.safetensors", [b_value])
    a32, b32 = float(np.float32(a_value)), float(np.float32(b_value))
    assert golden.compare(a, b, atol=0.0, rtol=0.1).ok == (abs(a32 - b32) <= 0.1 * abs(b32))


def test_compare_lists_the_taps_only_one_side_recorded(models, tmp_path):
    model = models["text_tied_fp32"]
    ids = [7, 8, 9]
    full = save_recording(model, golden.record(model, ids, decode_steps=1), tmp_path / "full.safetensors")
    part = save_recording(model, golden.record(model, ids, decode_steps=1, taps="layers.0.*,logits"),
                          tmp_path / "part.safetensors")
    report = golden.compare(part, full)
    assert report.ok
    assert report.only_in_a == []
    assert "embed" in report.only_in_b and "step0.norm" in report.only_in_b
    assert report.only_in_b == sorted(report.only_in_b, key=golden.forward_order)
    assert "only in b" in report.format()


def test_a_port_whose_tap_names_match_none_does_not_pass(models, tmp_path):
    model = models["text_tied_fp32"]
    rec = golden.record(model, [7, 8, 9])
    good = save_recording(model, rec, tmp_path / "good.safetensors")
    misnamed = {"token_ids": rec["token_ids"], "layer0.mlp": rec["layers.0.mlp"]}
    port = tmp_path / "port.safetensors"
    golden.save(misnamed, port, {"config_sha256": golden.config_hash(model.config)})
    report = golden.compare(port, good)
    assert not report.ok
    text = report.format()
    assert "no tap in common" in text
    assert "a has names outside the tap table (1): layer0.mlp" in text


def test_greedy_tokens_that_part_ways_are_pointed_out(models, tmp_path):
    model = models["text_tied_fp32"]
    rec = golden.record(model, [7, 8, 9], decode_steps=2)
    good = save_recording(model, rec, tmp_path / "good.safetensors")
    rec["generated_ids"] = rec["generated_ids"] + np.array([0, 1])
    other = save_recording(model, rec, tmp_path / "other.safetensors")
    text = golden.compare(other, good).format()
    assert "different tokens at step1" in text


def test_the_decode_note_names_the_first_step_where_greedy_tokens_differ(tmp_path):
    generated_a, generated_b = np.array([3, 4, 5, 6]), np.array([3, 9, 9, 6])
    a = write_logits(tmp_path / "a.safetensors", [0.5], generated_a)
    b = write_logits(tmp_path / "b.safetensors", [0.5], generated_b)
    first = int(np.flatnonzero(generated_a != generated_b)[0])
    assert f"different tokens at step{first} " in golden.compare(a, b).format()


def test_greedy_tokens_must_be_equal_not_merely_within_tolerance(tmp_path):
    # at rtol 1e-3 two ids near 150000 that differ by one are "close"; a different token is not
    a = write_logits(tmp_path / "a.safetensors", [0.5], [150_000, 7])
    b = write_logits(tmp_path / "b.safetensors", [0.5], [150_001, 7])
    report = golden.compare(a, b)
    assert not report.ok
    assert report.first_divergent.name == "generated_ids" and report.first_divergent.beyond == 1


def test_recordings_of_different_numbers_of_decode_steps_compare_the_steps_both_have(models, tmp_path):
    model = models["text_tied_fp32"]
    ids = [7, 8, 9]
    long = save_recording(model, golden.record(model, ids, decode_steps=3), tmp_path / "long.safetensors")
    short = save_recording(model, golden.record(model, ids, decode_steps=1), tmp_path / "short.safetensors")
    for a, b in ((long, short), (short, long)):
        report = golden.compare(a, b)
        assert report.ok, report.format()
        assert [row.ok for row in report.rows if row.name == "generated_ids"] == [True]
        assert "only the common steps are compared" in report.format()


# ============================================================================ selecting taps


def test_tap_patterns_select_by_name_within_a_call_and_by_recorded_name(models):
    model = models["text_tied_fp32"]
    rec = golden.record(model, [1, 2, 3], decode_steps=1, taps="layers.0.*, logits")
    layer0 = [n for n in golden.tap_names(model.config) if n.startswith("layers.0.")]
    assert list(rec) == ["token_ids", *layer0, "logits", *(f"step0.{n}" for n in layer0), "step0.logits",
                         "generated_ids"]

    only_step = golden.record(model, [1, 2, 3], decode_steps=2, taps="step1.logits")
    assert list(only_step) == ["token_ids", "step1.logits", "generated_ids"]


@pytest.mark.parametrize("taps, decode_steps", [("layers.0.mlpx", 0), ("logits,nosuch*", 0), ("step0.*", 0),
                                                ("layers.9.*", 2)])
def test_a_tap_pattern_that_matches_nothing_is_an_error_naming_it(models, taps, decode_steps):
    bad = [p for p in taps.split(",") if p not in ("logits",)][0]
    with pytest.raises(MinqwenError, match=f"tap pattern '{bad.replace('*', '[*]')}' matches no tap"):
        golden.record(models["text_tied_fp32"], [1, 2], decode_steps=decode_steps, taps=taps)


def test_a_pattern_past_the_first_ten_thousand_steps_is_checked_against_the_step_it_names():
    # A recording of more than 10,000 decode steps checks a pattern against the first 10,000 and
    # the steps written in it; step 12345 of 20,000 is a tap (recording that many steps would
    # take minutes: the check alone).
    per_call = ["embed", "layers.0.mlp", "logits"]
    golden._check_patterns(["step12345.logits", "step19999.layers.0.*"], per_call, [], 20_000)
    for bad in ("step20000.logits", "step12345.nosuch"):
        with pytest.raises(MinqwenError, match=f"tap pattern '{bad}' matches no tap"):
            golden._check_patterns([bad], per_call, [], 20_000)


@pytest.mark.parametrize("kwargs, message", [(dict(taps=" , "), "at least one pattern"),
                                             (dict(decode_steps=-1), "decode_steps"),
                                             (dict(decode_steps=1.5), "decode_steps")])
def test_bad_record_arguments_are_clear_errors(models, kwargs, message):
    with pytest.raises(MinqwenError, match=message):
        golden.record(models["text_tied_fp32"], [1, 2], **kwargs)


def with_nan_weight(layer, weight):
    """A fresh copy of the fixture model whose weight ``layers.{layer}.{weight}`` has one NaN element."""
    model = minqwen.load(FIXTURES / "text_tied_fp32")
    owner, attr = model.layers[layer], weight
    while "." in attr:
        part, attr = attr.split(".", 1)
        owner = getattr(owner, part)
    broken = getattr(owner, attr).copy()
    broken.flat[0] = np.nan
    setattr(owner, attr, broken)
    return model


def test_recording_a_model_that_computes_nan_is_an_error_naming_the_first_nan_tap():
    # A golden file of NaNs would test nothing: NaN equals nothing, not even NaN.
    model = with_nan_weight(2, "linear_attn.norm")
    with pytest.raises(MinqwenError, match=r"^tap 'layers\.2\.linear_attn\.norm' holds NaN or infinite values"):
        golden.record(model, [3, 1, 4], decode_steps=2)
    with pytest.raises(MinqwenError, match=r"^tap 'layers\.2\.mlp' holds NaN"):  # the first of those recorded
        golden.record(model, [3, 1, 4], taps="layers.2.mlp,logits")


def test_decoding_from_nan_logits_is_an_error_even_when_no_recorded_tap_shows_them():
    model = with_nan_weight(3, "self_attn.o_proj")
    assert golden.record(model, [3, 1, 4], taps="layers.0.*")  # the taps it records are sound numbers
    with pytest.raises(MinqwenError, match="the logits of the prompt hold NaN or infinite values, so greedy decoding"):
        golden.record(model, [3, 1, 4], decode_steps=1, taps="layers.0.*")


# ============================================================================ the file


def test_saved_file_carries_json_metadata_config_hash_and_manifest(models, tmp_path):
    model = models["text_grouped_bf16_bias"]
    rec = golden.record(model, [5, 6, 7], decode_steps=2)
    path = save_recording(model, rec, tmp_path / "rec.safetensors")

    with safe_open(str(path), framework="np") as f:
        meta = {key: json.loads(text) for key, text in f.metadata().items()}  # every value is JSON text
    canonical = json.dumps(model.config.to_dict(), sort_keys=True, separators=(",", ":"))
    assert meta["config_sha256"] == hashlib.sha256(canonical.encode()).hexdigest()
    assert meta["config_sha256"] == hashlib.sha256(
        json.dumps(meta["config"], sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    assert meta["format"] == golden.FORMAT
    assert meta["minqwen_version"] == minqwen.__version__
    assert meta["token_ids"] == [5, 6, 7]
    assert meta["decode_steps"] == 2
    assert meta["tolerances"] == {"atol": 1e-4, "rtol": 1e-3}
    assert [entry["name"] for entry in meta["taps"]] == list(rec)  # forward order
    assert all(entry["shape"] == list(rec[entry["name"]].shape) and entry["dtype"] == str(rec[entry["name"]].dtype)
               for entry in meta["taps"])

    back = golden.load_recording(path)
    assert set(back.tensors) == set(rec)
    assert all(np.array_equal(back.tensors[name], rec[name]) for name in rec)


def test_save_refuses_metadata_without_a_config_hash_or_contradicting_the_recording(models, tmp_path):
    model = models["text_tied_fp32"]
    rec = golden.record(model, [1, 2])
    with pytest.raises(MinqwenError, match="config_sha256"):
        golden.save(rec, tmp_path / "x.safetensors", {})
    with pytest.raises(MinqwenError, match="token_ids"):
        golden.save(rec, tmp_path / "x.safetensors", {**golden.model_metadata(model), "token_ids": [9, 9]})


def test_save_to_a_folder_or_an_unwritable_place_is_an_error_naming_it(models, tmp_path):
    model = models["text_tied_fp32"]
    rec = golden.record(model, [1, 2])
    with pytest.raises(MinqwenError, match="is a folder; give the golden file's own name"):
        golden.save(rec, tmp_path, golden.model_metadata(model))
    if Path("/proc/self").is_dir():  # Linux: nobody, not even root, can create a file in /proc
        with pytest.raises(MinqwenError, match="minqwen-golden.safetensors: cannot write the golden file here"):
            golden.save(rec, Path("/proc/minqwen-golden.safetensors"), golden.model_metadata(model))


@pytest.mark.parametrize("change, message", [
    (lambda meta, tensors: meta.update(token_ids='"5"'), "metadata 'token_ids' must be a JSON list of token ids"),
    (lambda meta, tensors: meta.update(token_ids="[1, -2]"), "metadata 'token_ids' must be a JSON list"),
    (lambda meta, tensors: tensors.update(generated_ids=np.array([np.nan, 1.0])), "tensor 'generated_ids' must be 1-D"),
    (lambda meta, tensors: tensors.update(token_ids=np.zeros((2, 2), np.int64)), "tensor 'token_ids' must be 1-D"),
    (lambda meta, tensors: meta.update(token_ids="null"), "metadata 'token_ids' must be a JSON list.*got 'null'"),
    (lambda meta, tensors: tensors.update(logits=tensors["logits"] + 1j), "tensor 'logits' is complex64; golden taps "
                                                                         "are real numbers"),
], ids=["string", "negative", "nan-generated", "2-D", "null", "complex"])
def test_a_golden_file_with_malformed_ids_is_an_error_naming_the_file_and_the_entry(models, tmp_path, change, message):
    model = models["text_tied_fp32"]
    path = save_recording(model, golden.record(model, [1, 2], decode_steps=1), tmp_path / "g.safetensors")
    with safe_open(str(path), framework="np") as f:
        meta, tensors = dict(f.metadata()), {name: f.get_tensor(name) for name in f.keys()}
    change(meta, tensors)
    try:
        save_file(tensors, str(path), metadata=meta)
    except Exception as e:  # safetensors before 0.7 cannot write complex64, so no such file can arise
        if "complex" not in str(e):
            raise
        pytest.skip(f"this safetensors cannot write the malformed file ({e})")
    with pytest.raises(MinqwenError, match=message):
        golden.load_recording(path)


def test_metadata_a_comparison_does_not_read_may_be_any_text(models, tmp_path):
    """Only config_sha256 and token_ids must be JSON. A port's own entries are kept as text,
    under minqwen's names too (a 'config' described in words), and the files still compare."""
    model = models["text_tied_fp32"]
    ours = save_recording(model, golden.record(model, [1, 2], decode_steps=1), tmp_path / "ours.safetensors")
    port = tmp_path / "port.safetensors"
    with safe_open(str(ours), framework="np") as f:
        meta, tensors = dict(f.metadata()), {name: f.get_tensor(name) for name in f.keys()}
    words = {"config": "Qwen3.5-like, fp32", "taps": "logits and more", "decode_steps": "one",
             "tolerances": "the defaults", "format": "pt"}
    save_file(tensors, str(port), metadata={**meta, **words})
    loaded = golden.load_recording(port)
    assert {key: loaded.metadata[key] for key in words} == words
    assert golden.compare(port, ours).ok
    save_file(tensors, str(port), metadata={**meta, "token_ids": "one, two"})  # read: it must be JSON
    with pytest.raises(MinqwenError, match="metadata 'token_ids' is not JSON text"):
        golden.load_recording(port)


@pytest.mark.parametrize("atol, rtol", [("0.1", 0), (None, 0), (-1.0, 0), (float("nan"), 0), (float("inf"), 0),
                                        (0, float("inf"))], ids=repr)
def test_compare_tolerances_must_be_finite_numbers_at_least_zero(models, tmp_path, atol, rtol):
    model = models["text_tied_fp32"]
    path = save_recording(model, golden.record(model, [1, 2]), tmp_path / "g.safetensors")
    with pytest.raises(MinqwenError, match="tolerances must be finite numbers ≥ 0"):
        golden.compare(path, path, atol=atol, rtol=rtol)


def test_compare_refuses_recordings_of_different_prompts(models, tmp_path):
    model = models["text_tied_fp32"]
    a = save_recording(model, golden.record(model, [1, 2, 3]), tmp_path / "a.safetensors")
    b = save_recording(model, golden.record(model, [1, 2, 4]), tmp_path / "b.safetensors")
    with pytest.raises(MinqwenError, match="different prompts.*position 2"):
        golden.compare(a, b)


def test_a_file_whose_token_ids_metadata_and_tensor_disagree_is_refused(tmp_path):
    # Either one is enough; both must then say the same prompt, else which one ran?
    path = tmp_path / "port.safetensors"
    save_file({"token_ids": np.array([1, 2, 3], np.int64), "logits": np.zeros((3, 2), np.float32)}, str(path),
              metadata={"config_sha256": json.dumps("same"), "token_ids": json.dumps([1, 2, 3, 4, 5, 6])})
    with pytest.raises(MinqwenError, match=r"port.safetensors: its metadata 'token_ids' \(6 ids\) and its "
                                           r"'token_ids' tensor \(3 ids\) are different prompts"):
        golden.load_recording(path)


def test_a_tap_of_another_shape_is_the_first_divergence_and_no_pass(tmp_path):
    # Shapes that differ have no elements to compare, so none is "beyond tolerance": a port
    # writing a [T, H] tap as [H, T] must still fail, and there, not at a later tap.
    def write(path, norm):
        golden.save({"token_ids": np.array([1, 2], np.int64), "norm": np.asarray(norm, np.float32),
                     "logits": np.zeros((2, 3), np.float32)}, path, {"config_sha256": "same"})
        return path

    ref = write(tmp_path / "ref.safetensors", np.arange(6).reshape(2, 3))
    port = write(tmp_path / "port.safetensors", np.arange(6).reshape(3, 2))
    report = golden.compare(port, ref)
    assert not report.ok
    assert report.first_divergent.name == "norm"
    assert "first divergence: norm (shapes differ)" in report.format()


def test_prompts_where_one_extends_the_other_first_differ_where_the_shorter_ends(tmp_path):
    # [1, 2] and [1, 2, 3] agree on every position both have: they first differ at position 2.
    def write(path, ids):
        golden.save({"token_ids": np.array(ids, np.int64), "logits": np.zeros((len(ids), 3), np.float32)},
                    path, {"config_sha256": "same"})
        return path

    with pytest.raises(MinqwenError, match=r"\(2 vs 3 tokens, first difference at position 2\)"):
        golden.compare(write(tmp_path / "a.safetensors", [1, 2]), write(tmp_path / "b.safetensors", [1, 2, 3]))


def test_layers_from_ten_on_come_after_layer_nine_and_the_first_divergence_is_the_earliest_layer(tmp_path):
    # Real checkpoints have 24 to 64 layers; the fixtures have fewer than ten. Forward order is
    # by the layer's number, not its digits: a divergence at layer 2 comes before one at layer 12.
    names = ["logits", "layers.12.output", "layers.2.output", "layers.10.mlp", "layers.9.output", "embed",
             "layers.10.input_layernorm"]
    assert sorted(names, key=golden.forward_order) == [
        "embed", "layers.2.output", "layers.9.output", "layers.10.input_layernorm", "layers.10.mlp",
        "layers.12.output", "logits"]

    def write(path, shift):
        tensors = {name: np.zeros(3, np.float32) for name in names}
        for name, delta in shift.items():
            tensors[name] = tensors[name] + delta
        golden.save({"token_ids": np.array([1, 2], np.int64), **tensors}, path, {"config_sha256": "same"})
        return path

    ref = write(tmp_path / "ref.safetensors", {})
    port = write(tmp_path / "port.safetensors", {"layers.12.output": 1.0, "layers.2.output": 1.0})
    assert golden.compare(port, ref).first_divergent.name == "layers.2.output"


def test_tolerances_given_in_the_metadata_are_kept_not_replaced_by_the_defaults(tmp_path):
    # A port whose reference is bf16 records the tolerances it was judged at; save() fills in the
    # fp32 defaults only where the metadata says nothing.
    recording = {"token_ids": np.array([1, 2], np.int64), "logits": np.zeros(3, np.float32)}
    golden.save(recording, tmp_path / "given.safetensors",
                {"config_sha256": "same", "tolerances": {"atol": 0.02, "rtol": 0.01}})
    golden.save(recording, tmp_path / "default.safetensors", {"config_sha256": "same"})
    with safe_open(str(tmp_path / "given.safetensors"), framework="np") as f:
        assert json.loads(f.metadata()["tolerances"]) == {"atol": 0.02, "rtol": 0.01}
    with safe_open(str(tmp_path / "default.safetensors"), framework="np") as f:
        assert json.loads(f.metadata()["tolerances"]) == {"atol": 1e-4, "rtol": 1e-3}


def test_a_config_hash_that_is_not_json_text_is_refused_naming_it(tmp_path):
    # A comparison reads config_sha256, so it must be JSON text like every golden value (a port
    # writing the bare hex, without quotes, is told so), as token_ids must.
    path = tmp_path / "port.safetensors"
    save_file({"token_ids": np.array([1, 2], np.int64), "logits": np.zeros(3, np.float32)}, str(path),
              metadata={"config_sha256": "ab12cd", "token_ids": "[1, 2]"})
    with pytest.raises(MinqwenError, match="metadata 'config_sha256' is not JSON text"):
        golden.load_recording(path)


def test_compare_refuses_recordings_of_different_configs(models, tmp_path):
    one, two = models["text_tied_fp32"], models["multimodal_bf16_untied"]
    a = save_recording(one, golden.record(one, [1, 2, 3]), tmp_path / "a.safetensors")
    b = save_recording(two, golden.record(two, [1, 2, 3]), tmp_path / "b.safetensors")
    with pytest.raises(MinqwenError, match="different model configs"):
        golden.compare(a, b)


def test_compare_names_a_missing_or_unreadable_file(models, tmp_path):
    model = models["text_tied_fp32"]
    a = save_recording(model, golden.record(model, [1, 2, 3]), tmp_path / "a.safetensors")
    missing = tmp_path / "nowhere.safetensors"
    with pytest.raises(MinqwenError, match="nowhere.safetensors: no such file"):
        golden.compare(a, missing)
    if Path("/dev/null").exists():
        with pytest.raises(MinqwenError, match="/dev/null: not a regular file"):
            golden.compare(a, "/dev/null")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file")
    with pytest.raises(MinqwenError, match="junk.safetensors: not a readable safetensors file"):
        golden.compare(junk, a)
    no_hash = tmp_path / "no_hash.safetensors"
    save_file({"token_ids": np.array([1, 2, 3])}, str(no_hash), metadata={"token_ids": "[1, 2, 3]"})
    with pytest.raises(MinqwenError, match="no_hash.safetensors: its metadata has no 'config_sha256'"):
        golden.compare(no_hash, a)


# ============================================================================ command line


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "minqwen", "golden", *map(str, args)],
                          capture_output=True, text=True, cwd=ROOT)


def test_cli_record_then_compare_exits_0_when_within_tolerance_and_1_on_divergence(tmp_path):
    fixture = FIXTURES / "text_tied_fp32"
    good = tmp_path / "good.safetensors"
    done = run_cli("record", "--model", fixture, "--tokens", "3,1,4,1,5", "--decode", "2", "--out", good)
    assert done.returncode == 0, done.stderr
    assert "2 decode steps" in done.stdout

    same = run_cli("compare", good, good)
    assert same.returncode == 0, same.stdout + same.stderr
    assert "within tolerance" in same.stdout

    bad = perturbed_copy(good, "layers.2.mlp", 1e-2, tmp_path / "bad.safetensors")
    diverged = run_cli("compare", bad, good)
    assert diverged.returncode == 1
    assert any(line.startswith(">> layers.2.mlp ") for line in diverged.stdout.splitlines()), diverged.stdout
    assert "first divergence: layers.2.mlp" in diverged.stdout
    assert run_cli("compare", bad, good, "--atol", "0.1").returncode == 0


def test_cli_record_records_as_many_decode_steps_as_asked(tmp_path, capsys):
    out = tmp_path / "three.safetensors"
    code = cli_main(["golden", "record", "--model", str(FIXTURES / "text_tied_fp32"), "--tokens", "3,1,4",
                     "--decode", "3", "--taps", "logits", "--out", str(out)])
    assert code == 0
    recording = golden.load_recording(out)
    assert recording.metadata["decode_steps"] == 3 and recording.tensors["generated_ids"].shape == (3,)
    assert {"logits", "step0.logits", "step1.logits", "step2.logits"} <= set(recording.tensors)
    assert "and 3 decode steps" in capsys.readouterr().out


def test_cli_errors_exit_2_with_a_one_line_message(tmp_path):
    fixture = FIXTURES / "text_tied_fp32"
    missing = run_cli("compare", tmp_path / "a.safetensors", tmp_path / "b.safetensors")
    assert missing.returncode == 2 and "a.safetensors: no such file" in missing.stderr
    assert "Traceback" not in missing.stderr

    no_tokenizer = run_cli("record", "--model", fixture, "--prompt", "hello", "--out", tmp_path / "x.safetensors")
    assert no_tokenizer.returncode == 2 and "--tokens" in no_tokenizer.stderr


@pytest.mark.parametrize("argv, message", [
    (["--tokens", "1,two"], "not a list of token ids"),
    (["--tokens", "1,2", "--taps", "layers.7.*"], "tap pattern 'layers.7.*'"),
    (["--tokens", "1,2", "--decode", "-1"], "--decode"),
    (["--tokens", "1,999"], "outside the vocabulary"),
])
def test_cli_record_rejects_bad_arguments(argv, message, tmp_path, capsys):
    code = cli_main(["golden", "record", "--model", str(FIXTURES / "text_tied_fp32"), *argv,
                     "--out", str(tmp_path / "x.safetensors")])
    assert code == 2
    assert message in capsys.readouterr().err


def test_cli_record_tokenizes_a_prompt_with_the_checkpoints_tokenizer_json(tmp_path):
    folder = fixture_with_word_tokenizer(tmp_path)

    out = tmp_path / "rec.safetensors"
    code = cli_main(["golden", "record", "--model", str(folder), "--prompt", "hello world hello", "--out", str(out)])
    assert code == 0
    assert golden.load_recording(out).token_ids == [11, 22, 11]


def test_cli_taps_prints_the_table(capsys):
    assert cli_main(["golden", "taps"]) == 0
    assert "layers.{i}.linear_attn.conv_state" in capsys.readouterr().out


# ============================================================================ the worked example


def test_worked_example_port_agrees_and_its_norm_bug_is_found_at_the_norm(tmp_path, capfd):
    spec = importlib.util.spec_from_file_location("golden_port_example", ROOT / "tools" / "golden_port_example.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    args = ["--model", str(FIXTURES / "multimodal_sharded"), "--tokens", "5,17,42,99"]

    assert example.main([*args, "--workdir", str(tmp_path / "right")]) == 0
    assert "within tolerance" in capfd.readouterr().out

    assert example.main([*args, "--workdir", str(tmp_path / "bug"), "--bug"]) == 1
    out = capfd.readouterr().out
    assert "first divergence: layers.0.input_layernorm" in out
    assert any(line.startswith(">> layers.0.input_layernorm ") for line in out.splitlines())


def test_worked_example_without_a_workdir_leaves_no_files_behind(tmp_path, capfd, monkeypatch):
    spec = importlib.util.spec_from_file_location("golden_port_example", ROOT / "tools" / "golden_port_example.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    assert example.main(["--model", str(FIXTURES / "multimodal_sharded"), "--tokens", "5,17,42,99"]) == 0
    assert "within tolerance" in capfd.readouterr().out and list(tmp_path.iterdir()) == []


MODEL_ARG = ["--model", str(FIXTURES / "multimodal_sharded")]


@pytest.mark.parametrize("argv, message", [
    (["--model", "/nonexistent/model", "--tokens", "5,17"], "no config.json here"),
    ([*MODEL_ARG, "--tokens", "a,b"], "--tokens must be whole numbers"),
    ([*MODEL_ARG, "--tokens", "1,99999"], "--tokens must be 1 or more ids in 0 …"),
    ([*MODEL_ARG, "--tokens=-1,2"], "--tokens must be 1 or more ids in 0 …"),
    ([*MODEL_ARG, "--tokens", "5,17", "--workdir", str(FIXTURES / "multimodal_sharded" / "config.json")],
     "config.json: is a file; give a folder"),
    ([*MODEL_ARG, "--tokens", "5,17", "--workdir", str(FIXTURES / "multimodal_sharded" / "config.json" / "sub")],
     "config.json is a file, not a folder"),
], ids=["no-model", "letters", "beyond-vocab", "negative", "workdir-file", "workdir-under-a-file"])
def test_worked_example_refuses_bad_arguments_with_one_line(capfd, argv, message):
    spec = importlib.util.spec_from_file_location("golden_port_example", ROOT / "tools" / "golden_port_example.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    try:
        code = example.main(argv)
    except SystemExit as e:  # argparse's own refusal, for --workdir
        code = e.code
    assert code == 2
    err = capfd.readouterr().err
    assert message in err and "Traceback" not in err
