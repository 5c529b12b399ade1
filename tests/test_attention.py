"""Gated full attention and its rotary embedding, against direct float64 formulas.

The fixtures check the layer against transformers on short prompts; these check what they do
not reach: prompts longer than one query block, M-RoPE sections with distinct height and
width (the real models' (11, 11, 10)), and a float64 model's tables.
"""

import contextlib
import math
import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minqwen import attention
from minqwen.attention import AttentionWeights, KVCache, causal_attention, gated_attention
from minqwen.linear import linears
from minqwen.rope import inverse_frequencies, mrope_cos_sin


def _direct_mrope(position_ids, inv_freq, section):
    """cos, sin [T, R] in float64: frequency i listens to height if i % 3 == 1 and i < 3·section[1],
    to width if i % 3 == 2 and i < 3·section[2], to time otherwise (the interleaved layout)."""
    half = inv_freq.shape[0]
    axis = [1 if i % 3 == 1 and i < 3 * section[1] else 2 if i % 3 == 2 and i < 3 * section[2] else 0
            for i in range(half)]
    angles = np.empty((position_ids.shape[1], half), np.float64)
    for i, a in enumerate(axis):  # angle rounded to float32 as both minqwen and the reference form it
        angles[:, i] = (position_ids[a].astype(np.float32) * inv_freq[i]).astype(np.float64)
    emb = np.concatenate([angles, angles], axis=-1)
    return np.cos(emb), np.sin(emb)


@pytest.mark.parametrize("rotary_dim, section", [(64, (11, 11, 10)), (16, (3, 3, 2)), (16, (2, 3, 1)),
                                                 (24, (4, 2, 4)), (16, (1, 0, 3))])
def test_mrope_sections_send_each_frequency_to_the_right_axis(rotary_dim, section):
    # Fixtures with images have mrope_section[1] == mrope_section[2] within R/2, so a mix-up of the
    # height and width sections is invisible to them; the real models' (11, 11, 10) is not.
    rng = np.random.default_rng(6)
    positions = rng.integers(0, 200, size=(3, 25))  # distinct time, height and width
    inv_freq = inverse_frequencies(1e4, rotary_dim)
    cos, sin = mrope_cos_sin(positions, inv_freq, section)
    cos_ref, sin_ref = _direct_mrope(positions, inv_freq, section)
    np.testing.assert_allclose(cos, cos_ref, rtol=0, atol=2e-6)
    np.testing.assert_allclose(sin, sin_ref, rtol=0, atol=2e-6)


def test_a_float64_table_takes_the_attention_factor_in_float64():
    # A float64 model (Model.astype) is the judge of float32 round-off: YaRN's attention factor
    # rounded to float32 would put its cos and sin up to 3e-8 off, its logits ~1e-7 (the float32
    # gap the judge must be free of). Angles in float64 too.
    t = np.arange(0, 5000, 7)
    positions = np.broadcast_to(t, (3, len(t)))
    inv_freq = inverse_frequencies(1e6, 32)
    factor = 0.1 * math.log(4.0) + 1.0  # YaRN's mscale for factor 4; not a float32 value
    assert float(np.float32(factor)) != factor
    cos, sin = mrope_cos_sin(positions, inv_freq, (6, 5, 5), attention_factor=factor, dtype=np.float64)
    angles = t[:, None].astype(np.float64) * inv_freq.astype(np.float64)[None, :]  # text: the three rows equal
    emb = np.concatenate([angles, angles], axis=-1)
    assert cos.dtype == sin.dtype == np.float64
    np.testing.assert_allclose(cos, np.cos(emb) * factor, rtol=0, atol=1e-15)
    np.testing.assert_allclose(sin, np.sin(emb) * factor, rtol=0, atol=1e-15)


def test_a_theta_whose_powers_overflow_float32_gives_zero_frequencies_without_a_warning():
    # theta^(2i/R) = 1e75, 1e150, 1e225 for i = 1, 2, 3: beyond float32, so their frequencies are
    # 0 (as torch's 1 / inf); a NumPy overflow warning there would only alarm (rope.py ignores it).
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = inverse_frequencies(1e300, 8)
    np.testing.assert_array_equal(got, np.array([1, 0, 0, 0], np.float32))


def _direct_causal_attention(q, keys, values, scale):
    """float64 softmax attention, query by query: query t of T sees keys 0 … S − T + t; head h reads kv head h // G."""
    t_len, hq, _ = q.shape
    hkv, s_len, _ = keys.shape
    out = np.empty(q.shape, np.float64)
    for h in range(hq):
        kh = h // (hq // hkv)
        for t in range(t_len):
            seen = s_len - t_len + t + 1
            s = keys[kh, :seen].astype(np.float64) @ q[t, h].astype(np.float64) * scale
            p = np.exp(s - s.max())
            out[t, h] = p @ values[kh, :seen].astype(np.float64) / p.sum()
    return out


@pytest.mark.parametrize("t_len, past", [(300, 0), (300, 37), (257, 5)])
def test_causal_attention_beyond_one_query_block_equals_the_direct_softmax(t_len, past):
    # Prompts of more than QUERY_BLOCK (256) tokens run several blocks; no other test has one.
    rng = np.random.default_rng(t_len + past)
    q = rng.normal(size=(t_len, 4, 8))
    keys, values = rng.normal(size=(2, 2, past + t_len, 8))
    expected = _direct_causal_attention(q, keys, values, 8**-0.5)
    np.testing.assert_allclose(causal_attention(q, keys, values, 8**-0.5), expected, rtol=0, atol=1e-12)


def test_causal_attention_with_small_query_blocks_equals_the_direct_softmax(monkeypatch):
    monkeypatch.setattr(attention, "QUERY_BLOCK", 5)
    rng = np.random.default_rng(7)
    q = rng.normal(size=(23, 6, 4))
    keys, values = rng.normal(size=(2, 3, 30, 4))  # 7 past tokens, G = 2
    expected = _direct_causal_attention(q, keys, values, 0.5)
    np.testing.assert_allclose(causal_attention(q, keys, values, 0.5), expected, rtol=0, atol=1e-12)


def _direct_gated_attention(x, w, positions, hq, hkv, d, rotary_dim, theta, eps):
    """The whole layer in float64, step by step from its definition."""
    x = x.astype(np.float64)
    f = {k: (None if v is None else v.astype(np.float64)) for k, v in vars(w).items()}
    t_len = x.shape[0]
    qg = (x @ f["q_proj"].T + f["q_proj_bias"]).reshape(t_len, hq, 2 * d)
    q, gate = qg[..., :d], qg[..., d:]
    k = (x @ f["k_proj"].T + f["k_proj_bias"]).reshape(t_len, hkv, d)
    v = (x @ f["v_proj"].T + f["v_proj_bias"]).reshape(t_len, hkv, d)

    def norm(a, weight):  # zero-centred RMSNorm
        return a / np.sqrt((a * a).mean(-1, keepdims=True) + eps) * (1 + weight)

    def rope(a):  # rotate-half on the first rotary_dim dims
        half = rotary_dim // 2
        ang = positions[:, None] * theta ** (-np.arange(half) * 2 / rotary_dim)  # [T, R/2]
        c, s = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]
        a1, a2, rest = a[..., :half], a[..., half:rotary_dim], a[..., rotary_dim:]
        return np.concatenate([a1 * c - a2 * s, a2 * c + a1 * s, rest], axis=-1)

    q, k = rope(norm(q, f["q_norm"])), rope(norm(k, f["k_norm"]))
    out = _direct_causal_attention(q, k.transpose(1, 0, 2), v.transpose(1, 0, 2), d**-0.5)
    out = out * (1 / (1 + np.exp(-gate)))
    return out.reshape(t_len, hq * d) @ f["o_proj"].T + f["o_proj_bias"]


def random_attention_weights(rng, hq: int, hkv: int, d: int, hidden: int) -> AttentionWeights:
    """float64 weights of a gated attention layer, every tensor random (norms and biases too)."""
    def mat(*shape):
        return rng.normal(size=shape) / np.sqrt(shape[-1])

    return AttentionWeights(q_proj=mat(hq * 2 * d, hidden), k_proj=mat(hkv * d, hidden), v_proj=mat(hkv * d, hidden),
                            o_proj=mat(hidden, hq * d), q_norm=0.3 * rng.normal(size=d), k_norm=0.3 * rng.normal(size=d),
                            q_proj_bias=rng.normal(size=hq * 2 * d), k_proj_bias=rng.normal(size=hkv * d),
                            v_proj_bias=rng.normal(size=hkv * d), o_proj_bias=rng.normal(size=hidden))


def test_gated_attention_on_a_long_prompt_equals_the_direct_layer_in_float64():
    hq, hkv, d, rotary_dim, theta, eps, hidden, t_len = 4, 2, 16, 8, 1e4, 1e-6, 32, 300
    rng = np.random.default_rng(8)
    w = random_attention_weights(rng, hq, hkv, d, hidden)
    x = rng.normal(size=(t_len, hidden))
    positions = np.arange(t_len)
    expected = _direct_gated_attention(x, w, positions, hq, hkv, d, rotary_dim, theta, eps)
    # minqwen's cos/sin tables, in float64 for a float64 layer (text: the three M-RoPE rows equal)
    inv_freq = theta ** (-np.arange(0, rotary_dim, 2) / rotary_dim)
    cos, sin = mrope_cos_sin(np.broadcast_to(positions, (3, t_len)), inv_freq, (2, 1, 1), dtype=np.float64)
    got = gated_attention(x, w, KVCache(hkv, d, np.float64), cos, sin, hq, hkv, d, eps)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-9 * np.abs(expected).max())


@pytest.mark.parametrize("kernel", [causal_attention, attention.attention_few_queries])
def test_each_query_row_of_the_softmax_subtracts_its_own_largest_score(kernel):
    # Trained models have heads with scores in the hundreds (attention sinks) next to heads near
    # zero. Subtracting one largest score for all heads and rows would leave exp(−300) for every
    # key of the quiet heads: 0 in float32, and 0/0 = NaN outputs. Integer q and keys make the
    # scores exact in float32; the float64 direct softmax is the reference.
    rng = np.random.default_rng(11)
    q = rng.integers(-3, 4, size=(3, 4, 4)).astype(np.float32)  # [T, Hq, D]: 3 new tokens
    q[:, 0] *= 25  # head 0 (of kv head 0): scores up to 300
    keys, values = rng.integers(-3, 4, size=(2, 2, 5, 4)).astype(np.float32)  # [Hkv, S, D]: 2 held before
    expected = _direct_causal_attention(q, keys, values, 0.5)
    got = kernel(q, keys, values, 0.5)
    assert np.abs(expected[:, 0]).max() > 0 and np.abs(expected[:, 1:]).max() > 0
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)


def test_the_few_query_kernel_takes_over_exactly_where_documented(monkeypatch):
    # The kernel and the NumPy definition agree to float32 rounding, so outputs alone cannot show
    # which one ran: an off-by-one in KERNEL_FROM_KEYS or FEW_QUERY_ROWS, or counting tokens
    # instead of query rows per key head (G · T), moves real decode steps to the other path. And a
    # float64 layer must never take the float32 kernel: its float64 answer is the judge of float32
    # round-off. Recorded per call; the float64 case is also held to the direct softmax.
    # Where Numba's pool does the products (inside one_blas_thread), from KERNEL_FROM_KEYS_AWAKE.
    from minqwen.threads import one_blas_thread

    monkeypatch.setattr(attention, "KERNEL_FROM_KEYS", 12)
    monkeypatch.setattr(attention, "KERNEL_FROM_KEYS_AWAKE", 6)
    chosen = []
    for name in ("attention_few_queries", "causal_attention", "decode_step"):
        real = getattr(attention, name)
        monkeypatch.setattr(attention, name, lambda *a, real=real, name=name, **k: (chosen.append(name), real(*a, **k))[1])
    hq, hkv, d, hidden = 4, 2, 8, 16  # G = 2 query heads per key head
    rng = np.random.default_rng(9)
    w = random_attention_weights(rng, hq, hkv, d, hidden)
    cases = [  # (tokens held before, new tokens, dtype, Numba's pool awake, path expected)
        (8, 4, np.float32, False, "attention_few_queries"),  # 12 keys, 2 · 4 = 8 = FEW_QUERY_ROWS rows
        (7, 4, np.float32, False, "causal_attention"),  # 11 keys: one short of KERNEL_FROM_KEYS
        (7, 5, np.float32, False, "causal_attention"),  # 2 · 5 = 10 rows: too many, although 5 tokens are few
        (11, 1, np.float64, False, "causal_attention"),  # a decode step of a float64 layer
        (11, 1, np.float32, False, "attention_few_queries"),  # 12 keys = KERNEL_FROM_KEYS: one decoded token
        (10, 1, np.float32, False, "decode_step"),  # 11 keys: below it, the one-pass step
        (5, 1, np.float32, False, "decode_step"),  # 6 keys: KERNEL_FROM_KEYS_AWAKE, but the pool sleeps
        (5, 1, np.float32, True, "attention_few_queries"),  # 6 keys = KERNEL_FROM_KEYS_AWAKE, the pool awake
        (4, 1, np.float32, True, "decode_step"),  # 5 keys: one short of it
        (0, 1, np.float32, True, "decode_step"),  # the first token of all: its own key only
        (3, 2, np.float32, True, "causal_attention"),  # two tokens (a verify) are not a decode step
        (3, 5, np.float32, True, "causal_attention"),  # 8 keys, but 10 rows
    ]
    for past, t_len, dtype, awake, expected in cases:
        weights = AttentionWeights(**{k: v.astype(dtype) for k, v in vars(w).items()})
        cache = KVCache(hkv, d, dtype)
        x = rng.normal(size=(past + t_len, hidden)).astype(dtype)
        positions = np.broadcast_to(np.arange(past + t_len), (3, past + t_len))
        cos, sin = mrope_cos_sin(positions, 1e4 ** (-np.arange(0, d, 2) / d), (2, 1, 1), dtype=dtype)
        gated_attention(x[:past], weights, cache, cos[:past], sin[:past], hq, hkv, d, 1e-6)
        chosen.clear()
        with one_blas_thread(awake):
            got = gated_attention(x[past:], weights, cache, cos[past:], sin[past:], hq, hkv, d, 1e-6)
        assert chosen == [expected], (past, t_len, dtype, awake)
        if dtype == np.float64:
            whole = _direct_gated_attention(x, weights, np.arange(past + t_len), hq, hkv, d, d, 1e4, 1e-6)
            np.testing.assert_allclose(got, whole[past:], rtol=0, atol=1e-12 * np.abs(whole).max())


def test_a_prompts_key_heads_are_shared_out_between_threads_bit_for_bit(monkeypatch):
    # Inside one_blas_thread (the bf16-resident mode's prompts) the key heads go to threads of
    # our own; elsewhere, and for one query, everything runs on the calling thread.
    import threading

    from minqwen.threads import one_blas_thread

    rng = np.random.default_rng(5)
    q = rng.normal(size=(40, 6, 16)).astype(np.float32)  # 6 query heads over 3 key heads
    keys, values = (rng.normal(size=(3, 45, 16)).astype(np.float32) for _ in range(2))
    seen, heads = [], attention._causal_attention_heads
    monkeypatch.setattr(attention, "_causal_attention_heads",
                        lambda q, *a: (seen.append((threading.current_thread().name, q.shape[1])), heads(q, *a))[1])
    alone = causal_attention(q, keys, values, 0.25)
    assert seen == [(threading.current_thread().name, 6)]
    seen.clear()
    with one_blas_thread():
        causal_attention(q[-5:], keys, values, 0.25)  # a verify's few queries: the calling thread
        assert seen == [(threading.current_thread().name, 6)]
        seen.clear()
        shared = causal_attention(q, keys, values, 0.25)
    np.testing.assert_array_equal(shared, alone)
    np.testing.assert_allclose(alone, _direct_causal_attention(q, keys, values, 0.25), rtol=0, atol=1e-5)
    if attention.numba.get_num_threads() < 2:
        pytest.skip("one thread: nothing to share")
    # 3 key heads (of 2 query heads each) shared out between min(3, threads) threads
    assert len(seen) == min(3, attention.numba.get_num_threads()) and sum(n for _, n in seen) == 6
    assert all(name.startswith("minqwen-attention") for name, _ in seen)


# --------------------------------------------------------------------------- the one-pass decode step


def _decode_step_case(rng, hq, hkv, d, rotary_dim, past, bias=True):
    """float32 weights, a cache holding ``past`` tokens, the next token's x and its cos/sin [1, R]."""
    w = random_attention_weights(rng, hq, hkv, d, hidden=24)
    if not bias:
        w.q_proj_bias = w.k_proj_bias = w.v_proj_bias = w.o_proj_bias = None
    w = AttentionWeights(**{k: None if v is None else v.astype(np.float32) for k, v in vars(w).items()})
    x = rng.normal(size=(past + 1, 24)).astype(np.float32)
    positions = np.broadcast_to(np.arange(past + 1), (3, past + 1))
    cos, sin = mrope_cos_sin(positions, inverse_frequencies(1e4, rotary_dim), (rotary_dim // 2, 0, 0))
    cache = KVCache(hkv, d)
    gated_attention(x[:past], w, cache, cos[:past], sin[:past], hq, hkv, d, 1e-6)
    return w, cache, x[past:], cos[past:], sin[past:]


@contextlib.contextmanager
def _by_definition():
    """Within the block every call runs gated_attention's definition, decode steps included."""
    fits = attention.decode_step_fits
    attention.decode_step_fits = lambda *args: False
    try:
        yield
    finally:
        attention.decode_step_fits = fits


@settings(max_examples=60, deadline=None)
@given(hkv=st.integers(1, 3), group=st.integers(1, 4), half_d=st.integers(1, 40), data=st.data(),
       past=st.integers(0, 40), bias=st.booleans(), awake=st.booleans(), seed=st.integers(0, 2**31))
def test_the_compiled_decode_step_agrees_with_the_layers_definition(hkv, group, half_d, data, past, bias, awake,
                                                                    seed):
    # The pass runs the definition's own compiled norms and rotation: the key it writes into the
    # cache is the definition's bit for bit, and so is the value. Its scores and mix add their
    # terms in another order than BLAS: the output agrees to float32 rounding. Judged against the
    # definition on a copy of the same cache, every tap included.
    from minqwen.threads import one_blas_thread

    d = 2 * half_d
    rotary_dim = 2 * data.draw(st.integers(1, half_d))  # partial rotary: R even, R ≤ D
    rng = np.random.default_rng(seed)
    hq = hkv * group
    w, cache, x, cos, sin = _decode_step_case(rng, hq, hkv, d, rotary_dim, past, bias)
    by_definition = cache.copy()
    taps, taps_by_definition = {}, {}
    with one_blas_thread(awake):
        got = gated_attention(x, w, cache, cos, sin, hq, hkv, d, 1e-6, tap=taps.__setitem__)
        with _by_definition():
            expected = gated_attention(x, w, by_definition, cos, sin, hq, hkv, d, 1e-6,
                                       tap=taps_by_definition.__setitem__)
    assert cache.length == by_definition.length == past + 1
    np.testing.assert_array_equal(cache.keys[:, : past + 1], by_definition.keys[:, : past + 1])
    np.testing.assert_array_equal(cache.values[:, : past + 1], by_definition.values[:, : past + 1])
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())
    assert list(taps) == list(taps_by_definition)  # the same taps, in the same order, of the same shapes
    for name, a in taps.items():
        assert a.shape == taps_by_definition[name].shape and a.dtype == np.float32, name
        if name != "self_attn.gated_output":  # before the softmax: the same steps, the same bits
            np.testing.assert_array_equal(a, taps_by_definition[name], err_msg=name)
    np.testing.assert_allclose(taps["self_attn.gated_output"], taps_by_definition["self_attn.gated_output"],
                               rtol=1e-5, atol=1e-5 * np.abs(expected).max())


def test_the_decode_step_equals_the_direct_layer_in_float64_over_many_steps():
    # Step after step (the cache growing past its first capacity, 256 spare rows, and the block
    # kernel taking over at KERNEL_FROM_KEYS_AWAKE keys), against the whole sequence computed
    # directly in float64.
    from minqwen.threads import one_blas_thread

    hq, hkv, d, rotary_dim = 6, 2, 16, 8
    rng = np.random.default_rng(3)
    w, cache, _, _, _ = _decode_step_case(rng, hq, hkv, d, rotary_dim, past=3)
    n = 520
    x = rng.normal(size=(3 + n, 24)).astype(np.float32)
    positions = np.broadcast_to(np.arange(3 + n), (3, 3 + n))
    cos, sin = mrope_cos_sin(positions, inverse_frequencies(1e4, rotary_dim), (rotary_dim // 2, 0, 0))
    cache = KVCache(hkv, d)
    gated_attention(x[:3], w, cache, cos[:3], sin[:3], hq, hkv, d, 1e-6)
    calls, real = [], attention.decode_step
    try:
        attention.decode_step = lambda *a: (calls.append(1), real(*a))[1]
        with one_blas_thread():
            got = np.concatenate([gated_attention(x[t : t + 1], w, cache, cos[t : t + 1], sin[t : t + 1], hq, hkv,
                                                  d, 1e-6) for t in range(3, 3 + n)])
    finally:
        attention.decode_step = real
    assert len(calls) == attention.KERNEL_FROM_KEYS_AWAKE - 4  # keys 4 … 511: the pass; from 512, the block kernel
    expected = _direct_gated_attention(x, w, np.arange(3 + n), hq, hkv, d, rotary_dim, 1e4, 1e-6)[3:]
    np.testing.assert_allclose(got, expected, rtol=0, atol=2e-5 * np.abs(expected).max())


def test_the_decode_steps_serial_and_parallel_builds_agree_bit_for_bit():
    rng = np.random.default_rng(12)
    w, cache, x, cos, sin = _decode_step_case(rng, 8, 2, 32, 16, past=20)
    q_and_gate, k, v = (rng.normal(size=(1, n)).astype(np.float32) for n in (8 * 64, 64, 64))
    outs = []
    for kernel in (attention._decode_step_kernel, attention._decode_step_kernel_parallel):
        c = cache.copy()
        c.make_room(1)
        filled = [np.empty((n, 32), np.float32) for n in (8, 2, 8, 8)]  # normed q, normed k, rotated q, out
        kernel(q_and_gate.reshape(8, 64), k.reshape(2, 32), v.reshape(2, 32), w.q_norm, w.k_norm, cos[0], sin[0],
               np.float32(1e-6), np.float32(32**-0.5), c.keys, c.values, c.length, *filled)
        outs.append(filled + [c.keys[:, : c.length + 1].copy(), c.values[:, : c.length + 1].copy()])
    for serial, parallel in zip(*outs):
        np.testing.assert_array_equal(serial, parallel)


def test_only_a_plain_float32_decode_step_takes_the_compiled_step():
    rng = np.random.default_rng(13)
    w, cache, x, cos, sin = _decode_step_case(rng, 4, 2, 8, 8, past=5)
    q_and_gate, k, v = linears(x, (w.q_proj, w.k_proj, w.v_proj), (w.q_proj_bias, w.k_proj_bias, w.v_proj_bias))

    def fits(q_and_gate=q_and_gate, k=k, v=v, w=w, cos=cos, sin=sin, hq=4, hkv=2, d=8):
        return attention.decode_step_fits(q_and_gate, k, v, w, cache, cos, sin, hq, hkv, d)

    assert fits()
    two = np.concatenate([q_and_gate, q_and_gate])
    assert not fits(q_and_gate=two)  # two tokens: a verify
    assert not fits(q_and_gate=q_and_gate.astype(np.float64))  # a float64 layer: the judge of round-off
    assert not fits(cos=cos.astype(np.float64), sin=sin.astype(np.float64))
    assert not fits(hq=3)  # 3 query heads do not share 2 key heads
    assert not fits(d=4)  # shapes that do not fit are left to the definition, which refuses them
    assert not fits(cos=np.ones((1, 10), np.float32), sin=np.ones((1, 10), np.float32))  # R > D
    assert not fits(w=AttentionWeights(**{**vars(w), "q_norm": w.q_norm[:4]}))
