"""Properties of the whole model and its cache, on the reference fixtures."""

import shutil
import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import minqwen
from conftest import FIXTURES, require_reference
from minqwen import MinqwenError
from minqwen.attention import KVCache
from minqwen.generate import generate_ids
from minqwen.linear import BF16
from minqwen.model import Cache, Model
from minqwen.rope import mrope_cos_sin, text_position_ids

# One fixture with Hv = Hk, one with grouped heads, bf16 and kernel 3, one with kernel 2.
NAMES = ["text_tied_fp32", "text_grouped_bf16_bias", "multimodal_sharded"]
MODELS = {name: minqwen.load(FIXTURES / name) for name in NAMES}


def prompt(model, length, seed=0):
    return np.random.default_rng(seed).integers(0, model.config.vocab_size, size=length)


@pytest.mark.parametrize("name", NAMES)
def test_prefill_then_decode_equals_one_full_forward(name):
    model = MODELS[name]
    ids = prompt(model, 40)
    full = model.forward(ids)
    cache = model.new_cache()
    steps = [model.forward(ids[:20], cache)]
    for token in ids[20:]:
        steps.append(model.forward([token], cache))
    np.testing.assert_allclose(np.concatenate(steps), full, rtol=0, atol=1e-4)
    assert cache.position == 40


MODELS64 = {name: model.astype(np.float64) for name, model in MODELS.items()}


@settings(max_examples=25, deadline=None)
@given(name=st.sampled_from(NAMES), length=st.integers(2, 150), data=st.data())
def test_a_prefill_split_anywhere_equals_the_unsplit_prefill(name, length, data):
    # In float64 the two are equal to round-off: the split changes which form (recurrent or
    # chunked) runs where, and nothing else. In float32 these random models amplify round-off
    # (a tiny Gated DeltaNet output divided by its own RMS), so the float32 check is looser.
    ids = prompt(MODELS[name], length, seed=length)
    split = data.draw(st.integers(1, length - 1))
    for model, atol in ((MODELS64[name], 1e-9), (MODELS[name], 1e-3)):
        whole = model.forward(ids)
        cache = model.new_cache()
        parts = np.concatenate([model.forward(ids[:split], cache), model.forward(ids[split:], cache)])
        np.testing.assert_allclose(parts, whole, rtol=0, atol=atol)


@pytest.mark.parametrize("name", NAMES)
def test_short_prefills_after_a_cache_use_the_old_conv_window(name):
    # Prompts shorter than the conv window after a non-empty cache must read the cached inputs.
    model = MODELS[name]
    kernel = model.config.linear_conv_kernel_dim
    for n in range(1, kernel + 2):
        ids = prompt(model, 10 + n, seed=n)
        whole = model.forward(ids)
        cache = model.new_cache()
        model.forward(ids[:10], cache)
        tail = model.forward(ids[10:], cache)
        np.testing.assert_allclose(tail, whole[10:], rtol=0, atol=1e-4)


def test_last_only_returns_the_last_row():
    model = MODELS["text_tied_fp32"]
    ids = prompt(model, 9)
    last = model.forward(ids, last_only=True)
    assert last.shape == (1, model.config.vocab_size)
    # One row or many through BLAS round differently, hence not bit-equal.
    np.testing.assert_allclose(last[0], model.forward(ids)[-1], rtol=0, atol=1e-5)


def test_inputs_embeds_give_the_same_logits_as_token_ids():
    model = MODELS["text_grouped_bf16_bias"]
    ids = prompt(model, 12)
    np.testing.assert_array_equal(model.forward(inputs_embeds=model.embed_tokens[ids]), model.forward(ids))


def test_explicit_text_positions_equal_the_default_positions():
    model = MODELS["text_grouped_bf16_bias"]
    ids = prompt(model, 12)
    positions = np.stack([np.arange(12)] * 3)
    np.testing.assert_array_equal(model.forward(ids, position_ids=positions), model.forward(ids))


def test_distinct_height_and_width_positions_change_the_logits():
    # M-RoPE: with a fitting section, h and w rows drive their own frequencies. (Only that they
    # are read at all: which frequencies each axis drives is pinned by test_attention's
    # test_mrope_sections_send_each_frequency_to_the_right_axis, and against transformers by the
    # vision fixtures' 3-D positions.)
    model = MODELS["text_grouped_bf16_bias"]
    ids = prompt(model, 6)
    positions = np.stack([np.arange(6), np.arange(6) * 2, np.arange(6) * 3])
    assert not np.allclose(model.forward(ids, position_ids=positions), model.forward(ids))


def test_rope_delta_shifts_the_next_position():
    model = MODELS["text_tied_fp32"]
    ids = prompt(model, 8)
    cache = model.new_cache()
    model.forward(ids[:4], cache)
    cache.rope_delta = 5
    shifted = model.forward(ids[4:], cache)
    cache2 = model.new_cache()
    model.forward(ids[:4], cache2)
    explicit = model.forward(ids[4:], cache2, position_ids=np.stack([np.arange(9, 13)] * 3))
    np.testing.assert_array_equal(shifted, explicit)


def test_a_cache_copy_rolls_back_exactly():
    model = MODELS["text_grouped_bf16_bias"]
    ids = prompt(model, 30)
    cache = model.new_cache()
    model.forward(ids[:20], cache)
    snapshot = cache.copy()
    first = model.forward(ids[20:], cache)
    model.forward(prompt(model, 7, seed=9), cache)  # wander off
    again = model.forward(ids[20:], snapshot)
    np.testing.assert_array_equal(again, first)
    assert snapshot.position == 30 and cache.position == 37


@pytest.mark.parametrize("stop_in_layer", [0, 1, 3])
def test_a_cache_a_forward_pass_stopped_midway_is_refused_and_a_copy_from_before_still_works(stop_in_layer,
                                                                                            monkeypatch):
    """Ctrl-C (or an error) between layers leaves the first layers holding the call's tokens and
    the rest not; reusing that cache gave logits 0.6 off without a word."""
    model = MODELS["text_grouped_bf16_bias"]
    ids = prompt(model, 30)
    cache = model.new_cache()
    model.forward(ids[:20], cache)
    before = cache.copy()
    layer_of_model = model.decoder_layer
    calls = []

    def stopping(*args, **kwargs):
        calls.append(1)
        if len(calls) == stop_in_layer + 1:
            raise KeyboardInterrupt
        return layer_of_model(*args, **kwargs)

    monkeypatch.setattr(model, "decoder_layer", stopping)
    with pytest.raises(KeyboardInterrupt):
        model.forward(ids[20:], cache)
    monkeypatch.undo()
    for use in (lambda c: model.forward(ids[20:], c), lambda c: list(generate_ids(model, [3], max_new_tokens=2, cache=c)),
                lambda c: model.forward(ids[20:], c.copy())):
        with pytest.raises(MinqwenError, match=rf"part-way through a forward pass \(KeyboardInterrupt in layer "
                                               rf"{stop_in_layer} of"):
            use(cache)
    fresh = model.new_cache()
    model.forward(ids[:20], fresh)
    np.testing.assert_array_equal(model.forward(ids[20:], before), model.forward(ids[20:], fresh))


def test_a_kv_cache_keeps_spare_room_and_its_copy_keeps_the_same():
    from minqwen.attention import KVCache

    rng = np.random.default_rng(3)
    cache = KVCache(num_kv_heads=2, head_dim=4)
    prompt_k, prompt_v = rng.standard_normal((2, 40, 2, 4), dtype=np.float32)  # [T, Hkv, D] each
    cache.append(prompt_k, prompt_v)
    copy = cache.copy()
    buffer = copy.keys
    step_k, step_v = rng.standard_normal((2, 1, 2, 4), dtype=np.float32)
    keys, values = copy.append(step_k, step_v)  # a decode step right after the prompt
    assert copy.keys is buffer  # no re-allocation: the copy had the original's spare room
    np.testing.assert_array_equal(keys, np.concatenate([prompt_k, step_k]).transpose(1, 0, 2))
    np.testing.assert_array_equal(values, np.concatenate([prompt_v, step_v]).transpose(1, 0, 2))
    assert cache.length == 40 and copy.length == 41  # the original is untouched
    np.testing.assert_array_equal(cache.keys[:, :40], prompt_k.transpose(1, 0, 2))


@pytest.mark.parametrize("pieces", [[40] + [1] * 600, [40, 250, 7, 300, 1, 1, 33], [3, 1, 400, 300]])
def test_a_kv_cache_growing_past_its_room_keeps_every_key_and_value(pieces):
    # No test sent a sequence past prompt + 256 tokens, where append copies the cache into a
    # bigger buffer: a copy that dropped the newest row passed every test (280 decode steps
    # later the logits were 3e-2 off). Appended step by step and in chunks, twice past the room,
    # with a copy taken before each growth left as it was.
    from minqwen.attention import KVCache

    rng = np.random.default_rng(len(pieces))
    cache, all_k, all_v, copies, grown = KVCache(num_kv_heads=2, head_dim=4), [], [], [], 0
    for n in pieces:
        k, v = rng.standard_normal((2, n, 2, 4), dtype=np.float32)  # [T, Hkv, D] each
        if cache.length + n > cache.keys.shape[1] and cache.length:
            copies.append((cache.copy(), cache.length))
            grown += 1
        keys, values = cache.append(k, v)
        all_k.append(k), all_v.append(v)
        np.testing.assert_array_equal(keys, np.concatenate(all_k).transpose(1, 0, 2))
        np.testing.assert_array_equal(values, np.concatenate(all_v).transpose(1, 0, 2))
    assert grown >= 2
    for copy, length in copies:
        assert copy.length == length
        np.testing.assert_array_equal(copy.keys[:, :length], np.concatenate(all_k)[:length].transpose(1, 0, 2))


@pytest.mark.parametrize("name", ["text_tied_fp32", "multimodal_sharded"])
def test_decoding_past_the_kv_caches_first_room_equals_one_full_forward(name):
    # 20 prompt tokens, then decode steps past 20 + 256 (the first growth) and past its double;
    # in float64, where 560 float32 steps drift by round-off alone to ~1e-4.
    model = MODELS64[name]
    length = min(model.config.max_position_embeddings, 20 + 2 * (20 + 256) + 8)
    ids = prompt(model, length)
    full = model.forward(ids)
    cache = model.new_cache()
    steps = [model.forward(ids[:20], cache)] + [model.forward([token], cache) for token in ids[20:]]
    assert length > 20 + 256 and cache.position == length
    np.testing.assert_allclose(np.concatenate(steps), full, rtol=0, atol=1e-9)


def test_cache_reports_its_size():
    model = MODELS["text_tied_fp32"]
    cache = model.new_cache()
    before = cache.nbytes
    model.forward(prompt(model, 10), cache)
    c = model.config
    kv_per_token = 2 * c.num_key_value_heads * c.head_dim * 4 * c.layer_types.count("full_attention")
    assert cache.nbytes - before == 10 * kv_per_token


@pytest.mark.parametrize(
    "bad, message",
    [
        ([], "non-empty"),
        ([[1, 2]], "1-D"),
        ([1.5, 2.0], "integers"),
        ([1, -1], "token id -1 is outside the vocabulary"),
        ([1, 10**6], "token id 1000000 is outside the vocabulary"),
        ([1, 10**30], "integers that fit in int64"),
    ],
)
def test_bad_token_ids_are_clear_errors(bad, message):
    with pytest.raises(MinqwenError, match=message):
        MODELS["text_tied_fp32"].forward(bad)


def test_a_progress_that_cannot_be_called_is_refused_before_loading():
    with pytest.raises(MinqwenError, match="progress must be a function"):
        minqwen.load(FIXTURES / "text_tied_fp32", progress=5)


def test_a_sequence_beyond_the_context_is_an_error():
    model = MODELS["text_tied_fp32"]
    limit = model.config.max_position_embeddings
    cache = model.new_cache()
    model.forward(prompt(model, limit - 1), cache)
    with pytest.raises(MinqwenError, match="beyond the model's context"):
        model.forward([1, 2], cache)
    assert cache.position == limit - 1  # the failed call left the cache as it was


def test_bad_inputs_embeds_and_positions_are_clear_errors():
    model = MODELS["text_tied_fp32"]
    with pytest.raises(MinqwenError, match="exactly one"):
        model.forward([1], inputs_embeds=np.zeros((1, model.config.hidden_size)))
    with pytest.raises(MinqwenError, match="inputs_embeds must have shape"):
        model.forward(inputs_embeds=np.zeros((2, 3)))
    with pytest.raises(MinqwenError, match=r"position_ids must have shape \[3, 2\]"):
        model.forward([1, 2], position_ids=np.zeros((3, 5), int))
    with pytest.raises(MinqwenError, match="inputs_embeds must be an array of real numbers, got dtype <U3"):
        model.forward(inputs_embeds="abc")


@pytest.mark.parametrize("positions, message", [
    (np.array([[0.5, 1.5]] * 3), "an integer array, got dtype float64"),
    (np.array([[np.nan, 1]] * 3), "an integer array, got dtype float64"),  # NaN angles: every logit NaN
    ([[None, None]] * 3, "an integer array, got dtype object"),
    (np.array([["a", "b"]] * 3), "an integer array, got dtype <U1"),
    (np.ones((3, 2), bool), "an integer array, got dtype bool"),
    ([[0, 1], [0], [0, 1]], "got rows of different lengths"),
    (np.zeros((2, 2), int), r"got shape \[2, 2\]"),
    (np.arange(2), r"got shape \[2\]"),
], ids=["fractions", "nan", "none", "strings", "bools", "ragged", "two-rows", "one-row"])
def test_position_ids_that_are_not_whole_numbers_of_shape_3_by_t_are_errors_naming_them(positions, message):
    model = MODELS["text_tied_fp32"]
    expected = r"position_ids must have shape \[3, 2\] \(rows t, h, w; one column per token\) of whole numbers"
    cache = model.new_cache()
    with pytest.raises(MinqwenError, match=f"{expected}.*{message}"):
        model.forward([1, 2], cache, position_ids=positions)
    with pytest.raises(MinqwenError, match=f"{expected}.*{message}"):
        model.hidden_states([1, 2], position_ids=positions)
    assert cache.position == 0  # refused before any layer ran


def test_position_ids_may_be_nested_lists_of_ints():
    model = MODELS["text_tied_fp32"]
    np.testing.assert_array_equal(model.forward([1, 2], position_ids=[[0, 1]] * 3), model.forward([1, 2]))


def test_a_cache_of_another_model_is_refused_not_run_on_fewer_layers():
    model = MODELS["text_tied_fp32"]
    with pytest.raises(MinqwenError, match="this cache holds 0 layer states"):
        model.forward([1, 2], Cache([]))  # zip() would have run no decoder layer at all
    states = model.new_cache().layers
    for wrong in (states[:-1], states[::-1]):  # one layer short; the attention state where a DeltaNet's goes
        with pytest.raises(MinqwenError, match="do not match the model's"):
            model.forward([1, 2], Cache(wrong))
    # the same layer kinds at other widths (the embedded model): was a raw NumPy shape error
    other = minqwen.load(minqwen.checkpoint.EMBEDDED)
    assert [l.layer_type for l in other.layers] == [l.layer_type for l in model.layers]
    with pytest.raises(MinqwenError, match="their sizes"):
        model.forward([1, 2], other.new_cache())


def test_a_cache_whose_attention_keys_have_another_head_dim_is_refused():
    # The same layers and the same number of key/value heads, but keys and values of another
    # width, as a model with another head_dim makes them: refused by name, not left to a raw
    # NumPy broadcast error inside the first attention layer.
    model = MODELS["text_tied_fp32"]
    c = model.config
    cache = model.new_cache()
    for i, state in enumerate(cache.layers):
        if isinstance(state, KVCache):
            cache.layers[i] = KVCache(c.num_key_value_heads, 2 * c.head_dim)
    with pytest.raises(MinqwenError, match="their sizes"):
        model.forward([1, 2], cache)
    assert cache.position == 0


def test_an_unknown_deltanet_form_is_an_error_not_the_recurrent_form():
    model = MODELS["text_tied_fp32"]
    model.deltanet_form = "chunk"
    try:
        with pytest.raises(MinqwenError, match="deltanet_form must be one of recurrent, chunked, got 'chunk'"):
            model.forward([1, 2])
    finally:
        model.deltanet_form = "recurrent"


@pytest.mark.parametrize("name", NAMES)
def test_the_chunked_form_gives_the_same_model_as_the_recurrent_form(name):
    ids = prompt(MODELS[name], 150, seed=2)  # crosses two chunk boundaries
    model = MODELS64[name]
    recurrent = model.forward(ids)
    model.deltanet_form = "chunked"
    try:
        chunked = model.forward(ids)
    finally:
        model.deltanet_form = "recurrent"
    np.testing.assert_allclose(chunked, recurrent, rtol=0, atol=1e-9)


def test_the_chunked_form_matches_the_reference_fixture():
    from safetensors.numpy import load_file

    model = minqwen.load(FIXTURES / "text_grouped_bf16_bias")
    model.deltanet_form = "chunked"
    expected = load_file(str(FIXTURES / "text_grouped_bf16_bias" / "expected.safetensors"))
    np.testing.assert_allclose(model.forward(expected["token_ids"]), expected["logits"], rtol=0, atol=1e-4)


# ============================================================================ the attention kernel


@settings(max_examples=60, deadline=None)
@given(num_kv=st.integers(1, 3), groups=st.integers(1, 4), t_len=st.integers(1, 4), past=st.integers(0, 700),
       head_dim=st.integers(1, 70), block=st.sampled_from([1, 7, 64, 256]), serial=st.booleans(),
       seed=st.integers(0, 2**16))
def test_the_few_query_attention_kernel_equals_the_numpy_definition(num_kv, groups, t_len, past, head_dim, block,
                                                                      serial, seed):
    from unittest import mock

    from minqwen import attention

    rng = np.random.default_rng(seed)
    s_len = past + t_len
    q = rng.standard_normal((t_len, num_kv * groups, head_dim), dtype=np.float32)
    capacity = np.zeros((2, num_kv, s_len + 5, head_dim), np.float32)  # the cache hands over views of a larger buffer
    capacity[..., :s_len, :] = 3 * rng.standard_normal((2, num_kv, s_len, head_dim), dtype=np.float32)
    keys, values = capacity[0, :, :s_len], capacity[1, :, :s_len]
    # serial: the build a child forked from an OpenMP process runs (threads.launched_safely)
    build = attention._attention_blocks_kernel.serial if serial else attention._attention_blocks_kernel
    with mock.patch.object(attention, "KEY_BLOCK", block), mock.patch.object(attention, "_attention_blocks_kernel",
                                                                             build):
        kernel = attention.attention_few_queries(q, keys, values, head_dim**-0.5)
    twin = attention.causal_attention(q, keys, values, head_dim**-0.5)
    # float32 rounding of reordered sums; outputs are convex mixtures of values of size ~3
    np.testing.assert_allclose(kernel, twin, rtol=0, atol=2e-5)


@pytest.mark.parametrize("name", ["text_tied_fp32", "text_grouped_bf16_bias"])
def test_decoding_with_the_attention_kernel_equals_decoding_without_it(name, monkeypatch):
    from minqwen import attention

    model = MODELS[name]
    ids = prompt(model, 30)
    kernel, calls = attention.attention_few_queries, []
    def counted(*args, **kwargs):
        calls.append(1)
        return kernel(*args, **kwargs)

    monkeypatch.setattr(attention, "attention_few_queries", counted)
    runs = []
    for from_keys in (10**9, 1):  # never the kernel, then always (every decode step here)
        monkeypatch.setattr(attention, "KERNEL_FROM_KEYS", from_keys)
        monkeypatch.setattr(attention, "KERNEL_FROM_KEYS_AWAKE", from_keys)
        monkeypatch.setattr(attention, "KEY_BLOCK", 8)  # several blocks even for a short cache
        cache = model.new_cache()
        rows = [model.forward(ids[:20], cache, last_only=True)]
        rows += [model.forward([token], cache, last_only=True) for token in ids[20:]]
        runs.append(np.concatenate(rows))
    assert len(calls) == 10 * model.config.layer_types.count("full_attention")  # each decode step, each attention layer
    np.testing.assert_allclose(runs[1], runs[0], rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------- float64 copies, bf16 loads, tied heads


UNTIED = ["text_grouped_bf16_bias", "multimodal_bf16_untied"]


@pytest.mark.parametrize("name", UNTIED)
def test_a_float64_copy_of_an_untied_model_keeps_its_own_lm_head(name):
    model = minqwen.load(FIXTURES / name)
    assert model.lm_head is not model.embed_tokens
    model64 = model.astype(np.float64)
    ids = prompt(model, 11)
    logits = model64.forward(ids)
    # independent: the copy's own final states through the ORIGINAL lm_head, widened by hand
    direct = model64.hidden_states(ids) @ model.lm_head.astype(np.float64).T
    np.testing.assert_allclose(logits, direct, rtol=0, atol=1e-12 * np.abs(direct).max())
    np.testing.assert_allclose(logits, model.forward(ids), rtol=0, atol=1e-3)  # and it is the same model


def test_a_float64_copy_of_a_bf16_resident_model_computes_in_float64():
    # A bf16 checkpoint read as bf16 or widened to float32 holds the same numbers, so the two
    # float64 copies must agree to float64 round-off; a layer left in bf16 would multiply in float32.
    name = "text_grouped_bf16_bias"  # stored as bf16
    ids = prompt(minqwen.load(FIXTURES / name), 13)
    from_bf16 = minqwen.load(FIXTURES / name, dtype="bfloat16").astype(np.float64)
    from_fp32 = minqwen.load(FIXTURES / name).astype(np.float64)
    expected = from_fp32.forward(ids)
    np.testing.assert_allclose(from_bf16.forward(ids), expected, rtol=0, atol=1e-10 * np.abs(expected).max())


def _direct_gated_attention64(x, w, cos, sin, hq, hkv, d, eps):
    """Gated full attention in float64, written out from its definition, with given rotary tables [T, R]."""
    f = {k: (None if v is None else np.asarray(v, np.float64)) for k, v in vars(w).items()}
    x = np.asarray(x, np.float64)
    t_len = x.shape[0]

    def proj(name):
        y = x @ f[name].T
        return y if f.get(name + "_bias") is None else y + f[name + "_bias"]

    qg = proj("q_proj").reshape(t_len, hq, 2 * d)
    q, gate = qg[..., :d], qg[..., d:]
    k = proj("k_proj").reshape(t_len, hkv, d)
    v = proj("v_proj").reshape(t_len, hkv, d)

    def norm(a, weight):  # zero-centred RMSNorm
        return a / np.sqrt((a * a).mean(-1, keepdims=True) + eps) * (1 + weight)

    r = cos.shape[1]
    c, s = np.asarray(cos, np.float64)[:, None, :], np.asarray(sin, np.float64)[:, None, :]

    def rope(a):
        rot = a[..., :r]
        half = np.concatenate([-rot[..., r // 2:], rot[..., : r // 2]], axis=-1)
        return np.concatenate([rot * c + half * s, a[..., r:]], axis=-1)

    q, k = rope(norm(q, f["q_norm"])), rope(norm(k, f["k_norm"]))
    out = np.empty((t_len, hq, d))
    for h in range(hq):
        kh = h // (hq // hkv)
        for t in range(t_len):
            scores = k[: t + 1, kh] @ q[t, h] * d**-0.5
            p = np.exp(scores - scores.max())
            out[t, h] = p @ v[: t + 1, kh] / p.sum()
    out = out * (1 / (1 + np.exp(-gate)))
    y = out.reshape(t_len, hq * d) @ f["o_proj"].T
    return y if f.get("o_proj_bias") is None else y + f["o_proj_bias"]


@pytest.mark.parametrize("name", ["text_tied_fp32", "text_grouped_bf16_bias"])
def test_a_float64_copy_keeps_its_attention_keys_and_values_in_float64(name):
    # Keys and values rounded to float32 would go unseen by the split-prefill float64 tests, whose
    # two sides read the same rounded cache: here each layer is held to attention written out.
    model64 = minqwen.load(FIXTURES / name).astype(np.float64)
    c = model64.config
    ids = prompt(model64, 14, seed=3)
    taps = {}
    model64.forward(ids, tap=lambda key, value: taps.__setitem__(key, np.array(value)))
    # the rotary tables in float64 (the float32 frequencies, exact angles), then float64 math
    cos, sin = mrope_cos_sin(text_position_ids(0, len(ids)), model64.inv_freq, c.mrope_section,
                             model64.attention_factor, np.float64)
    checked = 0
    for i, layer in enumerate(model64.layers):
        if layer.layer_type != "full_attention":
            continue
        h = taps[f"layers.{i}.input_layernorm"]
        assert h.dtype == np.float64
        expected = _direct_gated_attention64(h, layer.self_attn, cos, sin, c.num_attention_heads,
                                             c.num_key_value_heads, c.head_dim, c.rms_norm_eps)
        np.testing.assert_allclose(taps[f"layers.{i}.token_mixer"], expected, rtol=0,
                                   atol=1e-11 * np.abs(expected).max(), err_msg=f"layer {i}")
        checked += 1
    assert checked


@pytest.mark.parametrize("name", ["text_tied_fp32", "text_grouped_bf16_bias"])
def test_float64_inputs_embeds_of_a_float64_model_are_not_rounded_to_float32(name):
    # Image features spliced into a float64 model's prompt are float64: no rounding to float32.
    model64 = minqwen.load(FIXTURES / name).astype(np.float64)
    ids = prompt(model64, 9, seed=5)
    rng = np.random.default_rng(6)
    embeds = model64.embed(ids) + 1e-3 * rng.standard_normal((len(ids), model64.config.hidden_size))
    # independent path: a twin whose embedding table holds exactly these float64 rows, fed by id
    table = np.zeros((model64.config.vocab_size, model64.config.hidden_size))
    table[: len(ids)] = embeds
    twin = Model(model64.config, table, model64.layers, model64.norm, model64.lm_head)
    expected = twin.forward(np.arange(len(ids)))
    np.testing.assert_allclose(model64.forward(inputs_embeds=embeds), expected, rtol=0,
                               atol=1e-12 * np.abs(expected).max())


# ----------------------------------------------------------------------------- bf16-resident load


@pytest.mark.parametrize("name", UNTIED)
def test_a_bf16_resident_load_keeps_an_untied_lm_head_in_bf16(name):
    # load()'s docstring: "bfloat16" keeps the projection matrices as bf16, half the memory.
    model = minqwen.load(FIXTURES / name, dtype="bfloat16")
    assert model.lm_head is not model.embed_tokens
    assert model.lm_head.dtype == BF16 and model.embed_tokens.dtype == BF16


def with_stored_head(tmp_path, head=None, drop_embedding=False):
    """text_tied_fp32 (config: tied) with an lm_head.weight stored too (``head``, or the embedding's own values)."""
    from safetensors.numpy import load_file, save_file

    folder = tmp_path / "tied_with_head"
    shutil.copytree(FIXTURES / "text_tied_fp32", folder)
    tensors = load_file(str(folder / "model.safetensors"))
    embedding = tensors["model.embed_tokens.weight"]
    tensors["lm_head.weight"] = embedding.copy() if head is None else head
    if drop_embedding:
        del tensors["model.embed_tokens.weight"]
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder, embedding


def test_a_tied_config_with_a_different_stored_lm_head_uses_that_head_as_transformers_does(tmp_path):
    # transformers 5.23.0 (PreTrainedModel.tie_weights): both present with different values →
    # "we will NOT tie them", with a warning
    tied = minqwen.load(FIXTURES / "text_tied_fp32")
    head = np.random.default_rng(0).standard_normal(tied.embed_tokens.shape).astype(np.float32)
    folder, embedding = with_stored_head(tmp_path, head)
    with pytest.warns(UserWarning, match="stores an lm_head.weight with other values; using it"):
        model = minqwen.load(folder)
    assert model.lm_head is not model.embed_tokens
    np.testing.assert_array_equal(model.embed_tokens, embedding)
    ids = prompt(model, 10)
    direct = model.hidden_states(ids).astype(np.float64) @ head.astype(np.float64).T
    np.testing.assert_allclose(model.forward(ids), direct, rtol=0, atol=1e-4)


def test_a_tied_config_storing_the_same_head_twice_or_only_the_head_is_tied_to_one_array(tmp_path):
    expected = minqwen.load(FIXTURES / "text_tied_fp32")
    ids = prompt(expected, 10)
    for drop_embedding in (False, True):  # both stored, equal; only lm_head.weight stored
        folder, _ = with_stored_head(tmp_path / str(drop_embedding), drop_embedding=drop_embedding)
        model = minqwen.load(folder)
        assert model.lm_head is model.embed_tokens
        np.testing.assert_array_equal(model.forward(ids), expected.forward(ids))


@pytest.mark.parametrize("drop_embedding", [False, True], ids=["different-head", "only-the-head"])
def test_a_tied_config_with_a_stored_head_gives_the_logits_transformers_gives(tmp_path, drop_embedding):
    reference = require_reference()
    import torch

    head = np.random.default_rng(1).standard_normal(minqwen.load(FIXTURES / "text_tied_fp32").embed_tokens.shape).astype(np.float32)
    folder, _ = with_stored_head(tmp_path, None if drop_embedding else head, drop_embedding)
    ids = prompt(minqwen.load(FIXTURES / "text_tied_fp32"), 10)
    with torch.no_grad():
        expected = reference.load_pretrained(folder)(input_ids=torch.tensor(ids[None])).logits[0].numpy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = minqwen.load(folder).forward(ids)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-4)


def test_the_chunked_form_is_what_runs_when_it_is_chosen(monkeypatch):
    # The two forms give the same numbers (the tests above hold them equal), so no comparison of
    # logits can tell whether model.deltanet_form reaches the layers at all: a model that ignored
    # it would pass them. Count the calls instead: with "chunked", a prompt takes the chunked
    # rule in every Gated DeltaNet layer and a single token the recurrent step; by default, never.
    import minqwen.deltanet as deltanet

    model = MODELS["text_grouped_bf16_bias"]
    chunked, calls = deltanet.chunked_gated_delta_rule, []
    monkeypatch.setattr(deltanet, "chunked_gated_delta_rule",
                        lambda *a, **k: (calls.append(len(a[0])), chunked(*a, **k))[1])
    layers = model.config.layer_types.count("linear_attention")
    model.forward(prompt(model, 9))
    assert calls == []  # the default form is the recurrent one
    cache = model.new_cache()
    model.deltanet_form = "chunked"
    try:
        model.forward(prompt(model, 9), cache)
        assert calls == [9] * layers
        model.forward([3], cache)
        assert calls == [9] * layers  # one token: the recurrent step
    finally:
        model.deltanet_form = "recurrent"


def test_a_tap_may_keep_the_arrays_it_is_handed_across_later_calls():
    # The tap contract: a tap may keep what it is handed. A Gated DeltaNet memory is updated in
    # place by every step, so the tap gets a copy of it; were it handed the cache's own array, the
    # prompt's kept recurrent_state would silently become a later step's, tapped or not. Judged
    # against an untapped prefill of the same prompt.
    model = MODELS["text_tied_fp32"]
    ids = prompt(model, 8)
    fresh = model.new_cache()
    model.forward(ids, fresh)
    for later_tap in (None, lambda name, x: None):
        kept = {}
        cache = model.new_cache()
        model.forward(ids, cache, tap=lambda name, x: kept.setdefault(name, x))  # kept without a copy
        model.forward([5], cache, tap=later_tap)
        model.forward([6, 7], cache, tap=later_tap)
        checked = 0
        for i, layer in enumerate(model.layers):
            if layer.layer_type == "linear_attention":
                np.testing.assert_array_equal(kept[f"layers.{i}.linear_attn.recurrent_state"], fresh.layers[i].recurrent)
                np.testing.assert_array_equal(kept[f"layers.{i}.linear_attn.conv_state"], fresh.layers[i].conv)
                checked += 1
        assert checked


def test_a_kv_cache_copy_and_its_original_each_keep_their_own_new_rows():
    # Rolling back (a chat turn, a rejected draft) means one of the two goes on with other tokens
    # while the other waits. Both write their next rows at the same place in their spare room, so a
    # copy sharing the original's buffer would hand each the other's keys. (The rollback test above
    # re-runs the same tokens into those rows, and cannot see it.)
    from minqwen.attention import KVCache

    rng = np.random.default_rng(4)
    cache = KVCache(num_kv_heads=2, head_dim=4)
    prompt_k, prompt_v = rng.standard_normal((2, 10, 2, 4), dtype=np.float32)  # [T, Hkv, D] each
    cache.append(prompt_k, prompt_v)
    copy = cache.copy()
    a_k, a_v, b_k, b_v = rng.standard_normal((4, 3, 2, 4), dtype=np.float32)
    cache.append(a_k, a_v)
    copy.append(b_k, b_v)
    for kv, (k, v) in ((cache, (a_k, a_v)), (copy, (b_k, b_v))):
        np.testing.assert_array_equal(kv.keys[:, :13], np.concatenate([prompt_k, k]).transpose(1, 0, 2))
        np.testing.assert_array_equal(kv.values[:, :13], np.concatenate([prompt_v, v]).transpose(1, 0, 2))


def test_a_kv_cache_refuses_to_truncate_to_more_tokens_than_it_holds():
    # truncate(length + 1) would quietly make the next step attend to a row no token wrote (zeros,
    # or a rejected draft's stale keys): wrong numbers, no error.
    from minqwen.attention import KVCache

    rng = np.random.default_rng(5)
    cache = KVCache(num_kv_heads=1, head_dim=2)
    k, v = rng.standard_normal((2, 5, 1, 2), dtype=np.float32)
    cache.append(k, v)
    for bad in (6, -1):
        with pytest.raises(MinqwenError, match=r"truncate: length must be 0 … 5 \(the tokens held\)"):
            cache.truncate(bad)
        assert cache.length == 5
    cache.truncate(5)
    cache.truncate(2)
    assert cache.length == 2
    keys, _ = cache.append(k[:1], v[:1])
    np.testing.assert_array_equal(keys, np.concatenate([k[:2], k[:1]]).transpose(1, 0, 2))


def test_the_first_id_past_the_vocabulary_and_an_empty_inputs_embeds_are_clear_errors():
    # The boundaries of two input checks: id == vocab_size (one past the last row of the
    # embedding) must be refused by name, not by NumPy's IndexError; an inputs_embeds of no rows
    # must not run the layers on nothing.
    model = MODELS["text_tied_fp32"]
    vocab = model.config.vocab_size
    with pytest.raises(MinqwenError, match=f"token id {vocab} is outside the vocabulary"):
        model.forward([1, vocab])
    with pytest.raises(MinqwenError, match="inputs_embeds must have shape"):
        model.forward(inputs_embeds=np.zeros((0, model.config.hidden_size), np.float32))


def test_a_float64_copy_of_a_tied_model_keeps_one_array_for_embedding_and_head():
    # Tied means one array: a copy holding two would double the largest matrix's memory.
    model = MODELS["text_tied_fp32"]
    assert model.lm_head is model.embed_tokens
    model64 = model.astype(np.float64)
    assert model64.lm_head is model64.embed_tokens and model64.lm_head.dtype == np.float64
