"""The safetensors reader and checkpoint loading, as a specification.

Every bad input is a :class:`minqwen.MinqwenError` whose message names the file and, where
there is one, the tensor. Good input reads back exactly, memory-mapped and read-only. Parts
of a checkpoint minqwen does not load are reported, never silently dropped.

Small files are built in ``tmp_path``: well-formed ones with ``safetensors.numpy.save_file``,
malformed ones byte by byte with ``struct`` and ``json``.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import re
import shutil
import struct
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.numpy import load_file, save_file

import minqwen
from minqwen import MinqwenError
from minqwen.checkpoint import DTYPES, Checkpoint, SafetensorsFile

FIXTURES = Path(__file__).parent / "fixtures"
TEXT = FIXTURES / "text_tied_fp32"  # qwen3_5_text, one model.safetensors, all F32, tied head
SHARDED = FIXTURES / "multimodal_sharded"  # qwen3_5 wrapper, 13 shards + index, with a vision tower

NORM = "model.norm.weight"  # [48] in TEXT
Q_NORM = "model.layers.3.self_attn.q_norm.weight"  # [16] in TEXT, layer 3 is full attention


# ----------------------------------------------------------------------------- helpers


def copy_fixture(tmp_path: Path, fixture: Path = TEXT) -> Path:
    """A private copy of a fixture checkpoint folder that a test may damage."""
    folder = tmp_path / fixture.name
    shutil.copytree(fixture, folder)
    return folder


def rewrite_tensors(folder: Path, change) -> None:
    """Load the copy's model.safetensors, let ``change(tensors)`` edit the dict, save it back."""
    path = folder / "model.safetensors"
    tensors = load_file(path)
    change(tensors)
    save_file(tensors, path)


def write_raw(path: Path, header, data: bytes = b"", header_len: int | None = None) -> Path:
    """A safetensors file by hand: 8-byte length, header (a JSON value or raw bytes), data."""
    header_bytes = header if isinstance(header, bytes) else json.dumps(header).encode("utf-8")
    length = len(header_bytes) if header_len is None else header_len
    path.write_bytes(struct.pack("<Q", length) + header_bytes + data)
    return path


def entry(dtype: str, shape, begin: int, end: int) -> dict:
    return {"dtype": dtype, "shape": list(shape), "data_offsets": [begin, end]}


def names(path: Path, tensor: str | None = None) -> str:
    """A regex matching a message that names the file (and the tensor, if given)."""
    pattern = re.escape(str(path))
    if tensor is not None:
        pattern += r".*" + re.escape(f"'{tensor}'")
    return pattern


# ----------------------------------------------------------------------------- tensors that do not fit the config


def test_a_missing_tensor_is_an_error_naming_the_tensor_and_the_folder(tmp_path):
    folder = copy_fixture(tmp_path)
    rewrite_tensors(folder, lambda t: t.pop(Q_NORM))
    with pytest.raises(MinqwenError, match=re.escape(f"{folder}: tensor '{Q_NORM}' is missing from the checkpoint")):
        minqwen.load(folder)


def test_a_tensor_of_the_wrong_shape_is_an_error_naming_it_with_both_shapes(tmp_path):
    folder = copy_fixture(tmp_path)
    rewrite_tensors(folder, lambda t: t.update({NORM: np.ones(47, np.float32)}))
    expected = f"{folder / 'model.safetensors'}: tensor '{NORM}' has shape [47] but the config needs [48]"
    with pytest.raises(MinqwenError, match=re.escape(expected)):
        minqwen.load(folder)


def test_a_matrix_stored_transposed_is_an_error_though_it_has_as_many_elements(tmp_path):
    # A converter that forgets a transpose writes [48, 96] where [96, 48] belongs: the same bytes,
    # so a check of the element count alone would load it and give silently wrong numbers.
    folder = copy_fixture(tmp_path)
    name = "model.layers.0.mlp.gate_proj.weight"  # [intermediate 96, hidden 48]
    rewrite_tensors(folder, lambda t: t.update({name: np.ascontiguousarray(t[name].T)}))
    expected = f"{folder / 'model.safetensors'}: tensor '{name}' has shape [48, 96] but the config needs [96, 48]"
    with pytest.raises(MinqwenError, match=re.escape(expected)):
        minqwen.load(folder)


def test_a_tied_checkpoint_that_stores_only_lm_head_loads_it_as_the_embedding_too(tmp_path):
    # Tied, with the shared matrix saved under the head's name only: transformers 5.23.0 ties the
    # embedding to it. The fixture's expected logits are transformers' for the same matrix.
    folder = copy_fixture(tmp_path)
    rewrite_tensors(folder, lambda t: t.update({"lm_head.weight": t.pop("model.embed_tokens.weight")}))
    model = minqwen.load(folder)
    assert model.lm_head is model.embed_tokens and model.load_report == ""
    expected = load_file(str(folder / "expected.safetensors"))
    np.testing.assert_allclose(model.forward(expected["token_ids"]), expected["logits"], rtol=0, atol=1e-4)


def test_an_integer_tensor_where_a_float_is_needed_is_an_error_naming_its_dtype(tmp_path):
    folder = copy_fixture(tmp_path)
    rewrite_tensors(folder, lambda t: t.update({NORM: np.ones(48, np.int32)}))
    with pytest.raises(MinqwenError, match=names(folder / "model.safetensors", NORM) + r".*stored as I32"):
        minqwen.load(folder)


def test_a_tied_checkpoint_needs_no_lm_head_and_an_untied_one_does(tmp_path):
    folder = copy_fixture(tmp_path)
    model = minqwen.load(folder)
    assert model.lm_head is model.embed_tokens
    config = json.loads((folder / "config.json").read_text())
    config["tie_word_embeddings"] = False
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(MinqwenError, match=re.escape("tensor 'lm_head.weight' is missing")):
        minqwen.load(folder)


# ----------------------------------------------------------------------------- damaged files


def test_a_truncated_file_is_an_error_naming_the_file_and_a_tensor_past_the_end(tmp_path):
    folder = copy_fixture(tmp_path)
    path = folder / "model.safetensors"
    entries = SafetensorsFile(path).entries
    last = max(entries, key=lambda name: entries[name][3])  # the tensor whose data ends the file
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(MinqwenError, match=names(path, last) + r": data_offsets .* outside the file.*truncated"):
        minqwen.load(folder)


def test_a_file_shorter_than_the_length_field_is_an_error_naming_the_file(tmp_path):
    path = tmp_path / "tiny.safetensors"
    path.write_bytes(b"\x01\x02\x03")
    with pytest.raises(MinqwenError, match=names(path) + r": file is 3 bytes, too short"):
        SafetensorsFile(path)


def test_a_header_length_larger_than_the_file_is_a_bad_header(tmp_path):
    path = write_raw(tmp_path / "x.safetensors", {}, header_len=10_000)
    with pytest.raises(MinqwenError, match=names(path) + r": bad header: its length field says 10000 bytes"):
        SafetensorsFile(path)


def test_a_header_length_one_byte_past_the_end_of_the_file_is_a_bad_header(tmp_path):
    # The boundary: the 8 bytes of the length field are not part of what follows it. (A file
    # with no tensors would otherwise load, its data starting past its end.)
    header = json.dumps({}).encode("utf-8")
    path = write_raw(tmp_path / "x.safetensors", header, header_len=len(header) + 1)
    with pytest.raises(MinqwenError, match=names(path) + rf": bad header: its length field says {len(header) + 1} "
                                                         rf"bytes but the file has {len(header)} after it"):
        SafetensorsFile(path)
    SafetensorsFile(write_raw(tmp_path / "y.safetensors", header))  # the exact length reads


def test_a_header_length_past_the_limit_in_a_file_long_enough_is_not_called_truncated(tmp_path, monkeypatch):
    from minqwen import checkpoint

    monkeypatch.setattr(checkpoint, "MAX_HEADER_BYTES", 16)  # a 100 MB header, without writing 100 MB
    path = write_raw(tmp_path / "x.safetensors", {}, data=b" " * 64, header_len=32)
    with pytest.raises(MinqwenError, match=names(path) + r": bad header: its length field says 32 bytes, more than "
                                                         r"the 16 minqwen reads as a header"):
        SafetensorsFile(path)


def test_a_header_that_is_not_json_is_a_bad_header(tmp_path):
    path = write_raw(tmp_path / "x.safetensors", b"{this is not json")
    with pytest.raises(MinqwenError, match=names(path) + r": bad header: not valid UTF-8 JSON"):
        SafetensorsFile(path)


def test_a_header_that_is_not_utf8_is_a_bad_header(tmp_path):
    path = write_raw(tmp_path / "x.safetensors", b'{"\xff\xfe": 1}')
    with pytest.raises(MinqwenError, match=names(path) + r": bad header: not valid UTF-8 JSON"):
        SafetensorsFile(path)


def test_a_deeply_nested_header_is_a_bad_header_not_a_recursion_error(tmp_path):
    path = write_raw(tmp_path / "x.safetensors", b"[" * 100_000)
    with pytest.raises(MinqwenError, match=names(path) + r": bad header: not valid UTF-8 JSON"):
        SafetensorsFile(path)


def test_a_header_with_an_enormous_integer_literal_is_a_bad_header(tmp_path):
    path = write_raw(tmp_path / "x.safetensors", b'{"a": ' + b"9" * 5000 + b"}")
    with pytest.raises(MinqwenError, match=names(path) + r": bad header: not valid UTF-8 JSON"):
        SafetensorsFile(path)


@pytest.mark.parametrize("header", [[], "weights", 3, None], ids=["list", "string", "number", "null"])
def test_a_header_that_is_not_a_json_object_is_a_bad_header(tmp_path, header):
    path = write_raw(tmp_path / "x.safetensors", header)
    with pytest.raises(MinqwenError, match=names(path) + r": bad header: expected a JSON object"):
        SafetensorsFile(path)


def test_metadata_that_is_not_an_object_is_a_bad_header(tmp_path):
    path = write_raw(tmp_path / "x.safetensors", {"__metadata__": ["format", "pt"]})
    with pytest.raises(MinqwenError, match=names(path) + r": bad header: __metadata__ must be an object"):
        SafetensorsFile(path)


def test_a_header_entry_that_is_not_an_object_is_an_error_naming_the_tensor(tmp_path):
    path = write_raw(tmp_path / "x.safetensors", {"w": [1, 2]})
    with pytest.raises(MinqwenError, match=names(path, "w") + r": bad header entry"):
        SafetensorsFile(path)


def test_data_offsets_outside_the_file_are_an_error_naming_the_tensor(tmp_path):
    path = write_raw(tmp_path / "x.safetensors", {"w": entry("F32", [4], 0, 16)}, data=bytes(8))
    with pytest.raises(MinqwenError, match=names(path, "w") + r": data_offsets \[0, 16\] point outside the file"):
        SafetensorsFile(path)


def test_data_offsets_ending_one_byte_past_the_data_are_an_error_when_the_file_is_opened(tmp_path):
    # The boundary: ending exactly at the end of the data is fine, one byte further is outside
    # (a memory-mapped expert would otherwise fail with a bare reshape error, or read short).
    ok = write_raw(tmp_path / "ok.safetensors", {"w": entry("U8", [4], 0, 4)}, data=bytes(4))
    assert SafetensorsFile(ok).array("w").shape == (4,)
    path = write_raw(tmp_path / "x.safetensors", {"w": entry("U8", [4], 1, 5)}, data=bytes(4))
    with pytest.raises(MinqwenError, match=names(path, "w") + r": data_offsets \[1, 5\] point outside the file, "
                                           r"whose data section has 4 bytes"):
        SafetensorsFile(path)


def test_data_offsets_spanning_more_bytes_than_dtype_and_shape_need_is_an_error(tmp_path):
    # float32 data under a header that says F16: the span is twice what F16 [2] needs, and reading
    # its first 4 bytes as two halves would give silently wrong numbers.
    path = write_raw(tmp_path / "x.safetensors", {"w": entry("F16", [2], 0, 8)},
                     data=np.array([1.5, -2.0], np.float32).tobytes())
    with pytest.raises(MinqwenError, match=names(path, "w") + r": data_offsets span 8 bytes but F16 \[2\] needs 4"):
        SafetensorsFile(path)


def test_data_offsets_that_end_before_they_begin_are_an_error_naming_the_tensor(tmp_path):
    path = write_raw(tmp_path / "x.safetensors", {"w": entry("F32", [1], 8, 4)}, data=bytes(16))
    with pytest.raises(MinqwenError, match=names(path, "w") + r": bad data_offsets \[8, 4\]"):
        SafetensorsFile(path)


@pytest.mark.parametrize(
    "offsets", [[0], [0, 4, 8], ["0", "4"], [0.0, 4.0], [False, True], None], ids=str
)
def test_data_offsets_that_are_not_two_integers_are_an_error_naming_the_tensor(tmp_path, offsets):
    header = {"w": {"dtype": "F32", "shape": [1], "data_offsets": offsets}}
    path = write_raw(tmp_path / "x.safetensors", header, data=bytes(8))
    with pytest.raises(MinqwenError, match=names(path, "w") + r": bad data_offsets"):
        SafetensorsFile(path)


def test_data_offsets_whose_span_disagrees_with_dtype_and_shape_are_an_error_with_both_sizes(tmp_path):
    path = write_raw(tmp_path / "x.safetensors", {"w": entry("F32", [2, 3], 0, 20)}, data=bytes(24))
    with pytest.raises(MinqwenError, match=names(path, "w") + r": data_offsets span 20 bytes but F32 \[2, 3\] needs 24"):
        SafetensorsFile(path)


def test_a_shape_too_large_for_64_bits_does_not_wrap_around_to_a_matching_span(tmp_path):
    # 2**32 × 2**32 elements is 2**64, which an int64 product wraps to 0: it must not match [0, 0].
    path = write_raw(tmp_path / "x.safetensors", {"w": entry("F32", [2**32, 2**32], 0, 0)}, data=bytes(8))
    with pytest.raises(MinqwenError, match=names(path, "w") + r": data_offsets span 0 bytes but F32"):
        SafetensorsFile(path)


def test_a_shape_dimension_beyond_any_integer_type_is_an_error_naming_the_tensor(tmp_path):
    path = write_raw(tmp_path / "x.safetensors", {"w": entry("F32", [2**70], 0, 4)}, data=bytes(8))
    with pytest.raises(MinqwenError, match=names(path, "w") + r": data_offsets span 4 bytes but F32"):
        SafetensorsFile(path)


@pytest.mark.parametrize("shape", [[-1], [2.0], "4", [True], None], ids=str)
def test_a_shape_that_is_not_a_list_of_non_negative_integers_is_an_error_naming_the_tensor(tmp_path, shape):
    header = {"w": {"dtype": "F32", "shape": shape, "data_offsets": [0, 4]}}
    path = write_raw(tmp_path / "x.safetensors", header, data=bytes(8))
    with pytest.raises(MinqwenError, match=names(path, "w") + r": bad shape"):
        SafetensorsFile(path)


def test_overlapping_tensors_are_an_error_naming_both(tmp_path):
    header = {"a": entry("F32", [4], 0, 16), "b": entry("F32", [2], 8, 16)}
    path = write_raw(tmp_path / "x.safetensors", header, data=bytes(16))
    with pytest.raises(MinqwenError, match=names(path) + r": bad header: tensors '(a' and 'b|b' and 'a)' overlap"):
        SafetensorsFile(path)


def test_a_tensor_nested_inside_another_is_an_overlap_even_with_a_third_in_between(tmp_path):
    header = {"outer": entry("U8", [12], 0, 12), "x": entry("U8", [2], 2, 4), "y": entry("U8", [2], 6, 8)}
    path = write_raw(tmp_path / "x.safetensors", header, data=bytes(12))
    with pytest.raises(MinqwenError, match=names(path) + r": bad header: tensors '.*' and '.*' overlap"):
        SafetensorsFile(path)


def test_an_overlap_of_one_byte_between_the_last_two_of_three_tensors_is_an_error_naming_both(tmp_path):
    # The smallest overlap, and not between the first two spans: every neighbouring pair is checked.
    header = {"a": entry("U8", [4], 0, 4), "b": entry("U8", [4], 4, 8), "c": entry("U8", [4], 7, 11)}
    path = write_raw(tmp_path / "x.safetensors", header, data=bytes(11))
    with pytest.raises(MinqwenError, match=names(path) + r": bad header: tensors 'b' and 'c' overlap"):
        SafetensorsFile(path)


@pytest.mark.parametrize("header, data, message", [
    ({"a": entry("U8", [4], 0, 4), "b": entry("U8", [4], 6, 10)}, 10, r"2 bytes between tensors 'a' and 'b'"),
    ({"a": entry("U8", [4], 2, 6)}, 6, r"the tensors cover bytes 2 to 6 of a 6-byte data section"),
    ({"a": entry("U8", [4], 0, 4)}, 7, r"the tensors cover bytes 0 to 4 of a 7-byte data section"),
], ids=["gap", "before", "after"])
def test_bytes_that_belong_to_no_tensor_are_an_error_as_the_safetensors_library_says(tmp_path, header, data, message):
    # The format tiles the data section with the tensors; a hole means a damaged offset somewhere.
    from safetensors import safe_open

    path = write_raw(tmp_path / "x.safetensors", header, data=bytes(data))
    with pytest.raises(Exception, match="(?i)offset|not fully covered|MetadataIncompleteBuffer"):  # (0.4.3: the last two)
        safe_open(str(path), "np")
    with pytest.raises(MinqwenError, match=names(path) + r": bad header: " + message):
        SafetensorsFile(path)


def test_a_tensor_named_twice_in_one_header_is_an_error_naming_it(tmp_path):
    # json.loads keeps the last copy: a second entry could silently replace the tensor's data.
    header = b'{"w": {"dtype": "U8", "shape": [2], "data_offsets": [0, 2]}, ' \
             b'"w": {"dtype": "U8", "shape": [2], "data_offsets": [2, 4]}}'
    path = write_raw(tmp_path / "x.safetensors", header, data=bytes(4))
    with pytest.raises(MinqwenError, match=names(path) + r": bad header: not valid UTF-8 JSON \(the name 'w' "
                                                          r"appears twice in one object\)"):
        SafetensorsFile(path)


def test_metadata_that_is_not_text_is_an_error_as_the_safetensors_library_says(tmp_path):
    path = write_raw(tmp_path / "x.safetensors", {"__metadata__": {"format": 1}, "w": entry("U8", [2], 0, 2)},
                     data=bytes(2))
    with pytest.raises(MinqwenError, match=names(path) + r": bad header: __metadata__ must be an object of strings"):
        SafetensorsFile(path)


def test_a_named_pipe_in_place_of_the_weights_is_an_error_not_a_hang(tmp_path):
    # open() on a FIFO waits for a writer forever; the check runs in a child so that a
    # regression fails here instead of hanging the suite.
    import subprocess
    import sys

    folder = tmp_path / "pipe"
    folder.mkdir()
    shutil.copy(TEXT / "config.json", folder / "config.json")
    os.mkfifo(folder / "model.safetensors")  # not a file: the one-.safetensors-file fallback found it
    done = subprocess.run([sys.executable, "-c", f"import minqwen; minqwen.load({str(folder)!r})"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and "MinqwenError" in done.stderr, done.stderr[-500:]
    assert f"{folder / 'model.safetensors'}: cannot open safetensors file (not a regular file)" in done.stderr


def test_empty_tensors_at_the_same_offset_do_not_overlap(tmp_path):
    header = {"a": entry("F32", [0], 4, 4), "b": entry("F32", [0, 3], 4, 4), "c": entry("F32", [2], 0, 8)}
    f = SafetensorsFile(write_raw(tmp_path / "x.safetensors", header, data=bytes(8)))
    assert f.array("a").shape == (0,)
    assert f.array("b").shape == (0, 3)
    assert f.array("c").shape == (2,)


@pytest.mark.parametrize("dtype", ["F4", "float32", "f32", "", None, 7, ["F32"], {"F32": 1}], ids=str)
def test_an_unknown_dtype_is_an_error_naming_the_tensor_and_the_known_dtypes(tmp_path, dtype):
    header = {"w": {"dtype": dtype, "shape": [1], "data_offsets": [0, 4]}}
    path = write_raw(tmp_path / "x.safetensors", header, data=bytes(4))
    with pytest.raises(MinqwenError, match=names(path, "w") + r": unknown dtype .*known: F64, F32"):
        SafetensorsFile(path)


def test_a_file_that_does_not_exist_is_an_error_naming_it(tmp_path):
    path = tmp_path / "absent.safetensors"
    with pytest.raises(MinqwenError, match=names(path) + r": cannot open safetensors file"):
        SafetensorsFile(path)


def test_a_folder_given_as_a_safetensors_file_is_an_error_naming_it(tmp_path):
    with pytest.raises(MinqwenError, match=names(tmp_path) + r": cannot open safetensors file"):
        SafetensorsFile(tmp_path)


# ----------------------------------------------------------------------------- shards


def test_a_shard_index_pointing_at_a_missing_file_is_an_error_naming_that_file(tmp_path):
    folder = copy_fixture(tmp_path, SHARDED)
    victim = folder / "model-00007-of-00013.safetensors"
    victim.unlink()
    with pytest.raises(MinqwenError, match=names(victim) + r": cannot open safetensors file"):
        minqwen.load(folder)


def test_a_shard_index_listing_a_tensor_its_shard_lacks_is_an_error_naming_tensor_shard_and_index(tmp_path):
    folder = copy_fixture(tmp_path, SHARDED)
    index_path = folder / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    shard = "model-00002-of-00013.safetensors"
    index["weight_map"]["model.language_model.not_a_tensor"] = shard
    index_path.write_text(json.dumps(index))
    expected = (
        f"{folder / shard}: tensor 'model.language_model.not_a_tensor' is listed in "
        "model.safetensors.index.json but not in this file"
    )
    with pytest.raises(MinqwenError, match=re.escape(expected)):
        minqwen.load(folder)


@pytest.mark.parametrize("file_name", ["../elsewhere.safetensors", "..", "", "a\0.safetensors"], ids=repr)
def test_a_shard_index_naming_a_file_outside_the_folder_is_an_error(tmp_path, file_name):
    # ".." and "" are their own Path(...).name; a NUL byte made open() raise a bare ValueError.
    folder = copy_fixture(tmp_path, SHARDED)
    index_path = folder / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"]["model.language_model.norm.weight"] = file_name
    index_path.write_text(json.dumps(index))
    with pytest.raises(MinqwenError, match=names(index_path, "model.language_model.norm.weight") + r" maps to"):
        minqwen.load(folder)


def test_a_tensor_stored_in_two_shards_is_an_error_naming_it_and_both_files(tmp_path):
    # transformers 5.23.0 reads every shard whole and keeps the copy in the file that sorts
    # last, whatever the index says: measured, a norm stored twice moved its logits by 7.8.
    folder = copy_fixture(tmp_path, SHARDED)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    name = "model.language_model.norm.weight"
    other = next(f for f in sorted(set(index["weight_map"].values())) if f != index["weight_map"][name])
    tensors = load_file(str(folder / other))
    tensors[name] = 3 * load_file(str(folder / index["weight_map"][name]))[name]
    save_file(tensors, str(folder / other))
    with pytest.raises(MinqwenError, match=re.escape(f"{folder}: tensor '{name}' is stored twice, in ")
                       + r".*(" + re.escape(other) + r").*"):
        minqwen.load(folder)


def test_a_tensor_a_shard_holds_but_the_index_leaves_out_is_read_as_transformers_reads_it(tmp_path):
    # transformers takes from weight_map only which files to open, and reads each file whole.
    folder = copy_fixture(tmp_path, SHARDED)
    index_path = folder / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    del index["weight_map"]["model.language_model.norm.weight"]
    index_path.write_text(json.dumps(index))
    expected = load_file(str(folder / "expected.safetensors"))  # transformers' logits for the fixture
    np.testing.assert_allclose(minqwen.load(folder).forward(expected["token_ids"]), expected["logits"],
                               rtol=0, atol=1e-4)


@pytest.mark.parametrize(
    "text", ["{not json", "[]", '{"metadata": {}}', '{"weight_map": ["a"]}', "[" * 100_000],
    ids=["not-json", "list", "no-weight-map", "weight-map-not-an-object", "deeply-nested"],
)
def test_a_malformed_shard_index_is_an_error_naming_it(tmp_path, text):
    folder = copy_fixture(tmp_path, SHARDED)
    index_path = folder / "model.safetensors.index.json"
    index_path.write_text(text)
    with pytest.raises(MinqwenError, match=names(index_path) + r": (not a valid shard index|'weight_map' must)"):
        minqwen.load(folder)


# ----------------------------------------------------------------------------- folders


def test_a_folder_with_no_safetensors_is_an_error_naming_the_folder(tmp_path):
    folder = tmp_path / "ckpt"
    folder.mkdir()
    shutil.copy(TEXT / "config.json", folder / "config.json")
    with pytest.raises(MinqwenError, match=names(folder) + r": no model.safetensors or model.safetensors.index.json"):
        minqwen.load(folder)


def test_a_folder_with_several_unindexed_safetensors_is_an_error_that_counts_them(tmp_path):
    folder = copy_fixture(tmp_path)
    (folder / "model.safetensors").rename(folder / "a.safetensors")
    shutil.copy(folder / "a.safetensors", folder / "b.safetensors")
    (folder / "expected.safetensors").unlink()
    with pytest.raises(MinqwenError, match=names(folder) + r": no model.safetensors .*found 2 other"):
        minqwen.load(folder)


def test_a_folder_with_one_oddly_named_safetensors_file_loads_it(tmp_path):
    folder = copy_fixture(tmp_path)
    (folder / "expected.safetensors").unlink()
    (folder / "model.safetensors").rename(folder / "weights.safetensors")
    assert Checkpoint(folder).file_of(NORM) == folder / "weights.safetensors"


def test_a_folder_with_no_config_json_is_an_error_naming_the_folder(tmp_path):
    folder = copy_fixture(tmp_path)
    (folder / "config.json").unlink()
    with pytest.raises(MinqwenError, match=names(folder / "config.json") + r": no config.json here"):
        minqwen.load(folder)


def test_a_path_that_is_a_file_is_not_a_checkpoint_folder(tmp_path):
    path = copy_fixture(tmp_path) / "model.safetensors"
    with pytest.raises(MinqwenError, match=names(path) + r": not a folder"):
        minqwen.load(path)


def test_a_path_that_does_not_exist_is_not_a_checkpoint_folder(tmp_path):
    path = tmp_path / "nowhere"
    with pytest.raises(MinqwenError, match=names(path) + r": not a folder"):
        minqwen.load(path)


# ----------------------------------------------------------------------------- reading values


# Values chosen to be exact in bf16 and f16, plus some that round (0.1, 1/3) and bf16's range.
KNOWN = np.array([0.0, -0.0, 1.0, -2.5, 0.15625, 0.1, 1 / 3, 3.0e-5, 65504.0, -1.5e-3], np.float32)


def _bf16_by_hand(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """bf16 bits (round to nearest even) and their float32 value, without ml_dtypes."""
    bits = values.view(np.uint32).astype(np.uint64)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    as_bf16 = rounded.astype(np.uint16)
    return as_bf16, (as_bf16.astype(np.uint32) << 16).view(np.float32)


@pytest.mark.parametrize("dtype", [np.float32, np.float16, ml_dtypes.bfloat16], ids=["F32", "F16", "BF16"])
def test_stored_floats_read_back_as_the_same_float32_values(tmp_path, dtype):
    stored = KNOWN.astype(dtype)
    path = tmp_path / "model.safetensors"
    save_file({"w": stored.reshape(2, 5)}, path)
    got = Checkpoint(tmp_path).float32("w", (2, 5))
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got.ravel(), stored.astype(np.float32))
    np.testing.assert_array_equal(np.signbit(got.ravel()), np.signbit(KNOWN))


def test_bf16_is_read_as_the_upper_half_of_a_float32(tmp_path):
    bits, expected = _bf16_by_hand(KNOWN)
    path = write_raw(tmp_path / "model.safetensors", {"w": entry("BF16", [10], 0, 20)}, data=bits.tobytes())
    got = Checkpoint(tmp_path).float32("w", (10,))
    np.testing.assert_array_equal(got, expected)
    np.testing.assert_array_equal(got, KNOWN.astype(ml_dtypes.bfloat16).astype(np.float32))
    assert SafetensorsFile(path).array("w").dtype == np.dtype(ml_dtypes.bfloat16)


def test_f16_is_read_as_ieee_half_precision(tmp_path):
    # 0x3C00 = 1.0, 0xC100 = -2.5, 0x7BFF = 65504 (largest half), 0x0001 = 2**-24 (smallest subnormal)
    bits = np.array([0x3C00, 0xC100, 0x7BFF, 0x0001], np.uint16)
    write_raw(tmp_path / "model.safetensors", {"w": entry("F16", [4], 0, 8)}, data=bits.tobytes())
    got = Checkpoint(tmp_path).float32("w", (4,))
    np.testing.assert_array_equal(got, np.array([1.0, -2.5, 65504.0, 2.0**-24], np.float32))


def test_tensors_are_read_at_their_offsets_after_the_header_in_little_endian(tmp_path):
    a = np.arange(6, dtype="<f4").reshape(2, 3)
    b = np.array([7, -8], dtype="<i8")
    # b first in the data section, then a; the header lists them the other way round.
    header = {"__metadata__": {"format": "pt"}, "a": entry("F32", [2, 3], 16, 40), "b": entry("I64", [2], 0, 16)}
    f = SafetensorsFile(write_raw(tmp_path / "x.safetensors", header, data=b.tobytes() + a.tobytes()))
    np.testing.assert_array_equal(f.array("a"), a)
    np.testing.assert_array_equal(f.array("b"), b)
    assert f.metadata == {"format": "pt"}
    assert "__metadata__" not in f
    assert f.shape("a") == (2, 3) and f.dtype_name("b") == "I64"


def test_a_scalar_tensor_has_shape_empty_and_one_element(tmp_path):
    f = SafetensorsFile(write_raw(tmp_path / "x.safetensors", {"s": entry("F32", [], 0, 4)}, np.float32(2.5).tobytes()))
    assert f.array("s").shape == ()
    assert float(f.array("s")) == 2.5


# The safetensors format's dtype names and what each means, written out from its specification
# (not taken from minqwen.checkpoint.DTYPES, the table under test).
SAFETENSORS_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}


def test_every_known_dtype_reads_back_what_numpy_wrote(tmp_path):
    assert set(DTYPES) == set(SAFETENSORS_DTYPES)
    arrays = {name: np.arange(6, dtype=np.float32).astype(dtype).reshape(3, 2)
              for name, dtype in SAFETENSORS_DTYPES.items()}
    header, data, offset = {}, b"", 0
    for name, arr in arrays.items():
        raw = arr.tobytes()
        header[name] = entry(name, arr.shape, offset, offset + len(raw))
        data += raw
        offset += len(raw)
    f = SafetensorsFile(write_raw(tmp_path / "x.safetensors", header, data))
    for name, arr in arrays.items():
        got = f.array(name)
        assert got.dtype == np.dtype(SAFETENSORS_DTYPES[name]), name
        assert got.tobytes() == arr.tobytes(), name


def test_the_safetensors_librarys_own_dtype_names_read_back_as_written(tmp_path):
    # The library names each NumPy dtype itself: an independent check of the name → dtype table.
    arrays = {str(np.dtype(t)): np.arange(6).astype(t).reshape(2, 3)
              for t in (np.float64, np.float32, np.float16, np.int64, np.int32, np.int16, np.int8, np.uint8, np.bool_)}
    save_file(arrays, str(tmp_path / "x.safetensors"))
    f = SafetensorsFile(tmp_path / "x.safetensors")
    for key, arr in arrays.items():
        got = f.array(key)
        assert got.dtype == arr.dtype and np.array_equal(got, arr), key


def test_raw_tensors_are_read_only_views_of_one_memory_map_not_copies(tmp_path):
    folder = copy_fixture(tmp_path)
    ckpt = Checkpoint(folder)
    first, second = ckpt.raw(NORM), ckpt.raw(NORM)
    assert not first.flags.writeable
    assert not first.flags.owndata
    assert np.shares_memory(first, second)
    with pytest.raises(ValueError):
        first[0] = 1.0
    base = first
    while getattr(base, "base", None) is not None and not isinstance(base, np.memmap):
        base = base.base
    assert isinstance(base, np.memmap)


def test_float32_returns_an_independent_writable_copy(tmp_path):
    ckpt = Checkpoint(copy_fixture(tmp_path))
    widened = ckpt.float32(NORM, (48,))
    assert widened.flags.writeable and widened.flags.owndata
    assert not np.shares_memory(widened, ckpt.raw(NORM))
    np.testing.assert_array_equal(widened, ckpt.raw(NORM))


# ----------------------------------------------------------------------------- what is not loaded is reported


def test_loading_a_multimodal_checkpoint_reports_the_vision_tower_as_left_to_its_own_loader():
    weight_map = json.loads((SHARDED / "model.safetensors.index.json").read_text())["weight_map"]
    n_vision = sum(name.startswith("model.visual.") for name in weight_map)
    assert n_vision > 0
    model = minqwen.load(SHARDED)
    line = f"vision tower: {n_vision} tensors (not in the text model: minqwen.vision.load_vision loads them)"
    assert line in model.load_report.splitlines()
    assert "unused" not in model.load_report


def test_loading_a_complete_text_checkpoint_reports_nothing():
    assert minqwen.load(TEXT).load_report == ""


def test_extra_mtp_tensors_are_reported_as_the_mtp_head_and_unrelated_ones_as_unused(tmp_path):
    folder = copy_fixture(tmp_path)
    extra = {
        "mtp.fc.weight": np.zeros((48, 96), np.float32),
        "mtp.norm.weight": np.ones(48, np.float32),
        "mtp.layers.0.input_layernorm.weight": np.ones(48, np.float32),
        "something.else": np.zeros(3, np.float32),
    }
    rewrite_tensors(folder, lambda t: t.update(extra))
    # (the MTP head's tensors are expected beside the text model's; only the stray one is warned of)
    with pytest.warns(UserWarning, match=r"1 tensors of the checkpoint .* not used: something\.else\. "):
        lines = minqwen.load(folder).load_report.splitlines()
    assert "MTP head: 3 tensors (not in the text model: minqwen.mtp.load_mtp loads them)" in lines
    assert "unused: 1 tensors not part of the model: something.else" in lines


def test_a_long_list_of_unused_tensors_is_shortened_with_a_count(tmp_path):
    folder = copy_fixture(tmp_path)
    rewrite_tensors(folder, lambda t: t.update({f"junk.{i:02d}": np.zeros(1, np.float32) for i in range(13)}))
    with pytest.warns(UserWarning, match=r"13 tensors .* not used: junk\.00, .* junk\.09, … \(3 more\)"):
        report = minqwen.load(folder).load_report
    assert report.startswith("unused: 13 tensors not part of the model: junk.00, junk.01")
    assert report.endswith("junk.09, … (3 more)")


# ----------------------------------------------------------------------------- fuzzing the reader

_counter = itertools.count()


@pytest.fixture(scope="module")
def fuzz_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz")


@pytest.fixture(scope="module")
def valid_file_bytes(tmp_path_factory) -> bytes:
    """A small well-formed file with several dtypes, a scalar and an empty tensor."""
    path = tmp_path_factory.mktemp("seed") / "seed.safetensors"
    save_file(
        {
            "a": np.arange(12, dtype=np.float32).reshape(3, 4),
            "b": np.arange(5, dtype=np.float16),
            "c": np.arange(4, dtype=np.float32).astype(ml_dtypes.bfloat16),
            "d": np.array([1, 2, 3], np.int64),
            "e": np.zeros((0, 2), np.float32),
            "s": np.array(1.5, np.float32),
        },
        path,
        metadata={"format": "pt"},
    )
    return path.read_bytes()


def parse_or_fail_cleanly(folder: Path, content: bytes) -> None:
    """The property: a file either parses into consistent entries or raises MinqwenError."""
    path = folder / f"f{next(_counter)}.safetensors"
    path.write_bytes(content)
    try:
        try:
            f = SafetensorsFile(path)
        except MinqwenError as e:
            assert str(path) in str(e)
            return
        assert f.data_start + f.data_len == len(content)
        spans = []
        for name, (dtype, shape, begin, end) in f.entries.items():
            assert dtype in DTYPES
            assert all(isinstance(d, int) and d >= 0 for d in shape)
            assert 0 <= begin <= end <= f.data_len
            assert end - begin == math.prod(shape) * DTYPES[dtype].itemsize
            if end > begin:
                spans.append((begin, end))
            arr = f.array(name)
            assert arr.shape == shape and arr.dtype == DTYPES[dtype]
            assert arr.tobytes() == content[f.data_start + begin : f.data_start + end]
        spans.sort()
        assert all(b2 >= e1 for (_, e1), (b2, _) in zip(spans, spans[1:]))
    finally:
        path.unlink()


FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=12,
)
small_ints = st.integers(-2, 40) | st.sampled_from([2**31, 2**32, 2**63, 2**64, 2**70])
dtypes = st.sampled_from(list(DTYPES)) | st.sampled_from(["F4", "bf16", "", "U64"]) | json_values
shapes = st.lists(small_ints, max_size=3) | json_values
offsets = st.lists(small_ints, min_size=2, max_size=2) | st.lists(small_ints, max_size=3) | json_values
entries = st.fixed_dictionaries({"dtype": dtypes, "shape": shapes, "data_offsets": offsets}) | json_values
headers = st.dictionaries(st.text(max_size=6), entries, max_size=5) | json_values


@FUZZ
@given(data=st.data())
def test_fuzz_random_mutations_of_a_valid_file_parse_consistently_or_raise_minqwen_error(
    fuzz_dir, valid_file_bytes, data
):
    content = bytearray(valid_file_bytes)
    for _ in range(data.draw(st.integers(1, 4), label="n_mutations")):
        kind = data.draw(st.sampled_from(["flip", "set", "truncate", "insert", "delete"]), label="kind")
        last = max(len(content) - 1, 0)
        # Half the mutations land in the length field and header (the first few hundred bytes).
        pos = data.draw(st.integers(0, min(last, 400)) | st.integers(0, last), label="pos")
        if kind == "flip" and content:
            content[pos] ^= 1 << data.draw(st.integers(0, 7))
        elif kind == "set" and content:
            content[pos] = data.draw(st.integers(0, 255))
        elif kind == "truncate":
            del content[pos:]
        elif kind == "insert":
            content[pos:pos] = data.draw(st.binary(min_size=1, max_size=8))
        elif kind == "delete":
            del content[pos : pos + data.draw(st.integers(1, 8))]
    parse_or_fail_cleanly(fuzz_dir, bytes(content))


@FUZZ
@given(header=headers, data_len=st.integers(0, 64), fill=st.integers(0, 255))
def test_fuzz_random_headers_parse_consistently_or_raise_minqwen_error(fuzz_dir, header, data_len, fill):
    header_bytes = json.dumps(header).encode("utf-8")
    content = struct.pack("<Q", len(header_bytes)) + header_bytes + bytes([fill]) * data_len
    parse_or_fail_cleanly(fuzz_dir, content)


@FUZZ
@given(
    header_len=st.integers(0, 64) | st.integers(0, 2**64 - 1),
    rest=st.binary(max_size=96),
)
def test_fuzz_random_bytes_after_any_length_field_parse_consistently_or_raise_minqwen_error(
    fuzz_dir, header_len, rest
):
    parse_or_fail_cleanly(fuzz_dir, struct.pack("<Q", header_len) + rest)


@FUZZ
@given(content=st.binary(max_size=64))
def test_fuzz_arbitrary_short_files_parse_consistently_or_raise_minqwen_error(fuzz_dir, content):
    parse_or_fail_cleanly(fuzz_dir, content)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(dtype=st.sampled_from(["float32", "float16", "bfloat16"]), shape=st.lists(st.integers(1, 9), min_size=1,
       max_size=3), block=st.integers(1, 64), threads=st.integers(1, 3), seed=st.integers(0, 2**31))
def test_converting_reads_block_by_block_equal_converting_the_whole_tensor(tmp_path_factory, monkeypatch, dtype,
                                                                           shape, block, threads, seed):
    # Loading converts a few MB at a time (so a bf16 embedding is never held twice), and cuts a
    # large tensor into one span per thread; here the blocks are a few bytes and every tensor
    # counts as large: many blocks, a last one cut short, spans that end inside a block (or
    # hold no element). (monkeypatch sets the same values again in each example, so sharing
    # them between examples is harmless.)
    import minqwen.checkpoint as checkpoint

    monkeypatch.setattr(checkpoint, "READ_BLOCK_BYTES", block)
    monkeypatch.setattr(checkpoint, "SPLIT_BYTES", 0)
    monkeypatch.setattr(checkpoint, "_reading_threads", lambda: threads)
    stored = np.random.default_rng(seed).normal(size=shape).astype(np.dtype(getattr(ml_dtypes, dtype, dtype)))
    path = tmp_path_factory.mktemp("blocks") / "model.safetensors"
    save_file({"w": stored}, str(path))
    ckpt = Checkpoint(path.parent)
    np.testing.assert_array_equal(ckpt.float32("w", tuple(shape)), stored.astype(np.float32))
    np.testing.assert_array_equal(ckpt.raw("w"), ckpt.where["w"].read("w"))  # as stored, no conversion
    as_bf16 = ckpt.bfloat16("w", tuple(shape))
    np.testing.assert_array_equal(as_bf16.view(np.uint16), stored.astype(ml_dtypes.bfloat16).view(np.uint16))


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype", [np.float32, ml_dtypes.bfloat16], ids=["F32", "BF16"])
def test_a_file_cut_short_after_opening_is_an_error_naming_file_tensor_and_bytes(tmp_path, monkeypatch, threads,
                                                                                 dtype):
    # The header is checked against the file's size when it is opened; a file that shrinks
    # afterwards (a download still being written over) is caught by the reads themselves.
    import minqwen.checkpoint as checkpoint

    monkeypatch.setattr(checkpoint, "READ_BLOCK_BYTES", 16)
    monkeypatch.setattr(checkpoint, "SPLIT_BYTES", 0)
    monkeypatch.setattr(checkpoint, "_reading_threads", lambda: threads)
    path = tmp_path / "model.safetensors"
    save_file({"w": np.arange(64, dtype=np.float32).astype(dtype)}, str(path))
    ckpt = Checkpoint(tmp_path)
    nbytes = 64 * np.dtype(dtype).itemsize
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size - 10)
    with pytest.raises(MinqwenError, match=re.escape(f"{path}: tensor 'w': file ended after {nbytes - 10} of {nbytes} bytes")):
        ckpt.float32("w", (64,))


def test_a_folder_with_both_a_single_file_and_a_shard_index_reads_the_single_file_like_transformers(tmp_path):
    # transformers.modeling_utils._get_resolved_checkpoint_files (5.23.0) checks SAFE_WEIGHTS_NAME
    # before SAFE_WEIGHTS_INDEX_NAME.
    folder = tmp_path / "both"
    shutil.copytree(FIXTURES / "text_tied_fp32", folder)
    tensors = load_file(str(folder / "model.safetensors"))
    stale = {k: (2 * v if k == "model.embed_tokens.weight" else v) for k, v in tensors.items()}
    save_file(stale, str(folder / "stale.safetensors"), metadata={"format": "pt"})
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": {k: "stale.safetensors" for k in stale}}))
    expected = load_file(str(folder / "expected.safetensors"))  # transformers' logits for model.safetensors
    np.testing.assert_allclose(minqwen.load(folder).forward(expected["token_ids"]), expected["logits"],
                               rtol=0, atol=1e-4)


# ----------------------------------------------------------------------------- finding a checkpoint


@pytest.mark.parametrize("variable", ["XDG_CACHE_HOME", "HUGGINGFACE_HUB_CACHE", "HF_HOME"])
def test_a_hub_id_is_found_in_the_cache_huggingface_hub_downloads_to(tmp_path, monkeypatch, variable):
    # huggingface_hub's constants.py: HF_HUB_CACHE, else HUGGINGFACE_HUB_CACHE, else
    # $HF_HOME/hub, else $XDG_CACHE_HOME/huggingface/hub, else ~/.cache/huggingface/hub
    from minqwen.checkpoint import find_checkpoint

    for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HOME", "XDG_CACHE_HOME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # nothing in the default cache
    hub = {"XDG_CACHE_HOME": tmp_path / "huggingface" / "hub", "HUGGINGFACE_HUB_CACHE": tmp_path,
           "HF_HOME": tmp_path / "hub"}[variable]
    snapshot = hub / "models--org--tiny" / "snapshots" / "abc1234"
    snapshot.mkdir(parents=True)
    monkeypatch.setenv(variable, str(tmp_path))
    assert find_checkpoint("org/tiny") == snapshot


def test_hf_hub_cache_wins_over_its_older_name_huggingface_hub_cache(tmp_path, monkeypatch):
    # huggingface_hub's constants.py: HF_HUB_CACHE = getenv("HF_HUB_CACHE", HUGGINGFACE_HUB_CACHE).
    # With both set (an old shell profile beside a new one), the newer name says where downloads go.
    from minqwen.checkpoint import find_checkpoint

    for name, folder in (("HF_HUB_CACHE", "new"), ("HUGGINGFACE_HUB_CACHE", "old")):
        (tmp_path / folder / "models--org--tiny" / "snapshots" / "abc1234").mkdir(parents=True)
        monkeypatch.setenv(name, str(tmp_path / folder))
    assert find_checkpoint("org/tiny") == tmp_path / "new" / "models--org--tiny" / "snapshots" / "abc1234"


def test_a_hub_id_resolves_to_the_snapshot_refs_main_names_not_the_newest_one(tmp_path, monkeypatch):
    # huggingface_hub reads refs/main for the commit of "main"; a snapshot of another revision
    # (a branch, a pinned commit) downloaded later must not be taken instead.
    from minqwen.checkpoint import find_checkpoint

    repo = tmp_path / "models--org--tiny"
    for name, age in (("aaa1111", 100), ("bbb2222", 10)):  # bbb2222 downloaded last
        (repo / "snapshots" / name).mkdir(parents=True)
        os.utime(repo / "snapshots" / name, (1e9 - age, 1e9 - age))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("aaa1111")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    assert find_checkpoint("org/tiny") == repo / "snapshots" / "aaa1111"


def test_a_hub_cache_variable_starting_with_a_tilde_is_under_home(tmp_path, monkeypatch):
    from minqwen.checkpoint import find_checkpoint

    monkeypatch.setenv("HOME", str(tmp_path))
    snapshot = tmp_path / "hf" / "models--org--tiny" / "snapshots" / "abc1234"
    snapshot.mkdir(parents=True)
    monkeypatch.setenv("HF_HUB_CACHE", "~/hf")
    assert find_checkpoint("org/tiny") == snapshot


@pytest.mark.parametrize("extra", ["model.layers.3.self_attn.o_proj.bias", "model.layers.0.linear_attn.norm.bias"])
def test_a_tensor_the_config_has_no_place_for_is_warned_of_at_load(tmp_path, extra):
    # transformers warns of a checkpoint's unexpected keys too: an o_proj bias while attention_bias
    # is false says that config.json and the weights may not belong together.
    folder = copy_fixture(tmp_path)
    rewrite_tensors(folder, lambda t: t.update({extra: np.ones(48, np.float32)}))
    with pytest.warns(UserWarning, match=rf"1 tensors of the checkpoint are not part of the model its config.json "
                                         rf"describes and were not used: {re.escape(extra)}\."):
        model = minqwen.load(folder)
    assert extra in model.load_report


@pytest.mark.parametrize("dtype", [np.float32, ml_dtypes.bfloat16], ids=["F32", "BF16"])
@pytest.mark.parametrize("shape", [(1024, 1024), (1500, 1001), (3, 700, 600)])
def test_a_tensor_of_2_mib_or_more_is_read_into_memory_that_starts_on_a_2_mib_boundary(tmp_path, dtype, shape):
    # So Linux can put all of it on 2 MiB pages, which a decode step streams faster (see
    # checkpoint.empty_on_huge_pages); the values are the file's, whatever the alignment.
    from minqwen.checkpoint import HUGE_PAGE_BYTES

    stored = np.random.default_rng(0).normal(size=shape).astype(np.float32)
    assert stored.nbytes // 2 >= HUGE_PAGE_BYTES  # in bf16 too
    save_file({"w": stored.astype(dtype)}, str(tmp_path / "model.safetensors"))
    ckpt = Checkpoint(tmp_path)
    for got, expected in ((ckpt.float32("w", shape), stored.astype(dtype).astype(np.float32)),
                          (ckpt.bfloat16("w", shape), stored.astype(ml_dtypes.bfloat16))):
        assert got.ctypes.data % HUGE_PAGE_BYTES == 0
        assert got.flags.c_contiguous and got.flags.writeable and got.shape == shape
        np.testing.assert_array_equal(got.view(np.uint8), expected.view(np.uint8))


@pytest.mark.parametrize("shape", [(), (0, 4096), (7,), (511, 1024)])
def test_smaller_tensors_are_ordinary_arrays_of_their_own_size(shape):
    # Below 2 MiB there is no large page to fill: no padding, no view of a larger buffer.
    from minqwen.checkpoint import empty_on_huge_pages

    got = empty_on_huge_pages(shape, np.float32)
    assert got.shape == shape and got.dtype == np.float32 and got.base is None


def _vm_flags_at(address: int) -> list[str]:
    """The VmFlags of the mapping that holds ``address``, from /proc/self/smaps (Linux)."""
    inside = False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and all(c in "0123456789abcdef-" for c in head):
                begin, end = (int(part, 16) for part in head.split("-"))
                inside = begin <= address < end
            elif inside and line.startswith("VmFlags:"):
                return line.split()[1:]
    raise AssertionError(f"no mapping holds {address:#x}")


@pytest.mark.skipif(not hasattr(__import__("mmap"), "MADV_HUGEPAGE") or not os.path.exists("/proc/self/smaps"),
                    reason="Linux's large-page advice only")
def test_only_the_whole_2_mib_pages_of_a_tensor_ask_for_large_pages():
    # A tail that fills no whole 2 MiB page must not get one (it would cost up to 2 MiB of memory
    # for a few bytes): "hg" marks memory advised to take large pages, "nh" memory advised not to.
    from minqwen.checkpoint import HUGE_PAGE_BYTES, empty_on_huge_pages

    array = empty_on_huge_pages((3 * HUGE_PAGE_BYTES // 4 + 1000,), np.float32)  # 3 whole pages and 4000 bytes
    start = array.ctypes.data
    assert "hg" in _vm_flags_at(start) and "hg" in _vm_flags_at(start + 3 * HUGE_PAGE_BYTES - 1)
    assert "nh" in _vm_flags_at(start + 3 * HUGE_PAGE_BYTES)
    array[:] = 1.5  # and it is ordinary writeable memory
    assert array.sum() == 1.5 * array.size
