"""Properties of the Gated DeltaNet recurrence and its short convolution.

Three implementations of one recurrence must agree: the NumPy definition, the Numba kernel
that prefill and decoding run, and the chunked (WY) matmul form that GPU kernels use.
"""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import minqwen
from conftest import DIRECT_ACTIVATIONS, require_reference
from minqwen.checkpoint import EMBEDDED
from minqwen.deltanet import (
    DeltaNetState,
    DeltaNetWeights,
    causal_conv1d,
    causal_conv1d_numpy,
    chunked_gated_delta_rule,
    gated_deltanet,
    l2_normalize,
    recurrent_gated_delta_rule,
    recurrent_gated_delta_rule_numpy,
)
from minqwen.linear import BLAS_ROWS


def random_inputs(rng, t_len, heads, dk, dv, dtype, with_state=True):
    """Inputs shaped as the layer makes them: unit-norm keys, scaled queries, g ≤ 0, β in (0, 1)."""
    def unit(x):
        return x / np.linalg.norm(x, axis=-1, keepdims=True)

    q = unit(rng.normal(size=(t_len, heads, dk))) / np.sqrt(dk)
    k = unit(rng.normal(size=(t_len, heads, dk)))
    v = rng.normal(size=(t_len, heads, dv))
    g = -np.exp(rng.uniform(-1, 1.5, heads)) * np.log1p(np.exp(rng.normal(-2, 1.5, size=(t_len, heads))))
    beta = 1 / (1 + np.exp(-rng.normal(size=(t_len, heads))))
    state = rng.normal(size=(heads, dk, dv)) if with_state else np.zeros((heads, dk, dv))
    return [np.asarray(a, dtype) for a in (q, k, v, g, beta, state)]


shapes = st.tuples(
    st.integers(1, 300),  # T
    st.integers(1, 4),  # heads
    st.integers(1, 24),  # Dk
    st.integers(1, 24),  # Dv
    st.sampled_from([16, 32, 64]),  # chunk size
    st.integers(0, 2**31),  # seed
)


@settings(max_examples=40, deadline=None)
@given(shapes)
def test_chunked_form_equals_recurrent_form_in_float64(shape):
    t_len, heads, dk, dv, chunk, seed = shape
    args = random_inputs(np.random.default_rng(seed), t_len, heads, dk, dv, np.float64)
    o_ref, s_ref = recurrent_gated_delta_rule_numpy(*args)
    o, s = chunked_gated_delta_rule(*args, chunk_size=chunk)
    np.testing.assert_allclose(o, o_ref, rtol=0, atol=1e-10 * max(1.0, np.abs(o_ref).max()))
    np.testing.assert_allclose(s, s_ref, rtol=0, atol=1e-10 * max(1.0, np.abs(s_ref).max()))


@settings(max_examples=40, deadline=None)
@given(shapes)
def test_chunked_form_equals_recurrent_form_in_float32(shape):
    t_len, heads, dk, dv, chunk, seed = shape
    args64 = random_inputs(np.random.default_rng(seed), t_len, heads, dk, dv, np.float64)
    o_ref, s_ref = recurrent_gated_delta_rule_numpy(*args64)
    o, s = chunked_gated_delta_rule(*[a.astype(np.float32) for a in args64], chunk_size=chunk)
    assert o.dtype == np.float32 and s.dtype == np.float32
    np.testing.assert_allclose(o, o_ref, rtol=0, atol=1e-5 * max(1.0, np.abs(o_ref).max()))
    np.testing.assert_allclose(s, s_ref, rtol=0, atol=1e-5 * max(1.0, np.abs(s_ref).max()))


@pytest.mark.parametrize("t_len", [1, 63, 64, 65, 257])
def test_chunked_form_at_chunk_boundaries(t_len):
    args = random_inputs(np.random.default_rng(t_len), t_len, 3, 16, 8, np.float64)
    o_ref, s_ref = recurrent_gated_delta_rule_numpy(*args)
    o, s = chunked_gated_delta_rule(*args, chunk_size=64)
    np.testing.assert_allclose(o, o_ref, atol=1e-10)
    np.testing.assert_allclose(s, s_ref, atol=1e-10)


@settings(max_examples=30, deadline=None)
@given(st.tuples(st.integers(1, 40), st.integers(1, 4), st.integers(1, 20), st.integers(1, 20),
                 st.sampled_from([np.float32, np.float64]), st.integers(0, 2**31)))
def test_numba_kernel_equals_numpy_twin(shape):
    t_len, heads, dk, dv, dtype, seed = shape
    args = random_inputs(np.random.default_rng(seed), t_len, heads, dk, dv, dtype)
    o_ref, s_ref = recurrent_gated_delta_rule_numpy(*args)
    o, s = recurrent_gated_delta_rule(*args)
    tol = 1e-12 if dtype == np.float64 else 2e-6
    np.testing.assert_allclose(o, o_ref, rtol=0, atol=tol * max(1.0, np.abs(o_ref).max()))
    np.testing.assert_allclose(s, s_ref, rtol=0, atol=tol * max(1.0, np.abs(s_ref).max()))


@settings(max_examples=25, deadline=None)
@given(st.tuples(st.integers(1, 12), st.integers(1, 4), st.integers(1, 20), st.integers(1, 20), st.integers(0, 2**31)))
def test_every_state_is_what_token_by_token_calls_leave_bit_for_bit(shape):
    # A speculative verify keeps the state after each of its tokens; a later decode step must
    # continue from exactly what decoding those tokens one by one would have left.
    t_len, heads, dk, dv, seed = shape
    q, k, v, g, beta, state = random_inputs(np.random.default_rng(seed), t_len, heads, dk, dv, np.float32)
    out, states = recurrent_gated_delta_rule(q, k, v, g, beta, state, every_state=True)
    assert states.shape == (t_len, heads, dk, dv)
    S = state
    for t in range(t_len):
        o_t, S = recurrent_gated_delta_rule(q[t : t + 1], k[t : t + 1], v[t : t + 1], g[t : t + 1], beta[t : t + 1], S)
        np.testing.assert_array_equal(o_t[0], out[t])
        np.testing.assert_array_equal(S, states[t])
    o_ref, s_ref = recurrent_gated_delta_rule_numpy(q, k, v, g, beta, state)
    np.testing.assert_allclose(states[-1], s_ref, rtol=0, atol=2e-6 * max(1.0, np.abs(s_ref).max()))


def test_in_place_writes_the_same_state_into_the_given_array():
    q, k, v, g, beta, state = random_inputs(np.random.default_rng(6), 5, 3, 16, 12, np.float32)
    out, expected = recurrent_gated_delta_rule(q, k, v, g, beta, state)
    mine = state.copy()
    out_in_place, returned = recurrent_gated_delta_rule(q, k, v, g, beta, mine, in_place=True)
    assert returned is mine or returned.base is mine
    np.testing.assert_array_equal(mine, expected)
    np.testing.assert_array_equal(out_in_place, out)


def test_rules_do_not_modify_the_state_they_are_given():
    args = random_inputs(np.random.default_rng(0), 70, 2, 8, 8, np.float32)
    before = args[-1].copy()
    for rule in (recurrent_gated_delta_rule_numpy, recurrent_gated_delta_rule, chunked_gated_delta_rule):
        rule(*args)
        np.testing.assert_array_equal(args[-1], before)
    recurrent_gated_delta_rule(*args, every_state=True)
    np.testing.assert_array_equal(args[-1], before)


def test_strong_decay_does_not_overflow_in_the_chunked_form():
    # g of −80 per token: exp of a positive log-decay would overflow float32 if the mask were
    # applied after exp.
    q, k, v, g, beta, state = random_inputs(np.random.default_rng(1), 64, 2, 8, 8, np.float32)
    g[:] = -80.0
    with np.errstate(over="raise", invalid="raise"):
        o, s = chunked_gated_delta_rule(q, k, v, g, beta, state)
    assert np.isfinite(o).all() and np.isfinite(s).all()


@pytest.mark.parametrize("conv", [causal_conv1d_numpy, causal_conv1d])
def test_causal_conv1d_split_anywhere_equals_one_pass(conv):
    rng = np.random.default_rng(3)
    for kernel in (1, 2, 3, 4, 5):
        x = rng.normal(size=(12, 7)).astype(np.float32)
        w = rng.normal(size=(7, kernel)).astype(np.float32)
        zero = np.zeros((kernel - 1, 7), np.float32)
        whole, state_whole = conv(x, w, zero)
        for split in range(1, 12):
            a, state = conv(x[:split], w, zero)
            b, state = conv(x[split:], w, state)
            np.testing.assert_allclose(np.concatenate([a, b]), whole, atol=1e-6)
            np.testing.assert_array_equal(state, state_whole)


@pytest.mark.parametrize("conv", [causal_conv1d_numpy, causal_conv1d])
def test_causal_conv1d_is_the_textbook_convolution(conv):
    rng = np.random.default_rng(4)
    x = rng.normal(size=(9, 3))
    w = rng.normal(size=(3, 4))
    out, _ = conv(x, w, np.zeros((3, 3)))
    for t in range(9):
        for c in range(3):
            # the newest input meets the last tap
            expected = sum(w[c, 3 - j] * x[t - j, c] for j in range(4) if t - j >= 0)
            assert out[t, c] == pytest.approx(expected)


@settings(max_examples=40, deadline=None)
@given(st.tuples(st.integers(1, 20), st.integers(1, 40), st.integers(1, 6),
                 st.sampled_from([np.float32, np.float64]), st.booleans(), st.integers(0, 2**31)))
def test_compiled_conv1d_equals_numpy_twin(shape):
    t_len, channels, kernel, dtype, strided, seed = shape
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(t_len, 2 * channels)).astype(dtype)
    x = x[:, ::2] if strided else x[:, :channels]  # the layer passes a column slice of in_proj_qkv's output
    w = rng.normal(size=(channels, kernel)).astype(dtype)
    state = rng.normal(size=(kernel - 1, channels)).astype(dtype)
    out_ref, state_ref = causal_conv1d_numpy(x, w, state)
    out, new_state = causal_conv1d(x, w, state)
    assert out.dtype == dtype and new_state.shape == state_ref.shape
    # the same taps summed in the same order, and no fastmath: the same roundings, bit for bit
    np.testing.assert_array_equal(out, out_ref)
    np.testing.assert_array_equal(new_state, state_ref)


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 40), st.integers(1, 50), st.integers(1, 5), st.sampled_from([np.float32, np.float64]),
       st.integers(0, 2**31))
def test_conv1d_with_silu_in_its_pass_is_silu_of_the_conv_bit_for_bit(t_len, channels, kernel, dtype, seed):
    from minqwen.activations import silu, silu_numpy

    rng = np.random.default_rng(seed)
    x = rng.normal(scale=4, size=(t_len, channels)).astype(dtype)
    w, state = rng.normal(size=(channels, kernel)).astype(dtype), rng.normal(size=(kernel - 1, channels)).astype(dtype)
    plain, plain_state = causal_conv1d(x, w, state)
    fused, fused_state = causal_conv1d(x, w, state, silu=True)
    assert fused.dtype == dtype
    np.testing.assert_array_equal(fused, silu(plain))  # float32: the compiled SiLU's steps, in the pass
    if dtype == np.float64:  # float64 never meets float32 arithmetic: the twins' steps exactly
        np.testing.assert_array_equal(fused, silu_numpy(causal_conv1d_numpy(x, w, state)[0]))
    np.testing.assert_array_equal(fused_state, plain_state)  # the window keeps inputs, not outputs


def test_loaded_conv_weights_reach_the_kernel_without_a_copy_and_either_layout_gives_the_same(monkeypatch):
    import minqwen.deltanet as deltanet

    model = minqwen.load(EMBEDDED)
    weight = next(layer.linear_attn for layer in model.layers if layer.layer_type == "linear_attention").conv1d
    assert weight.shape == (model.config.linear_conv_dim, model.config.linear_conv_kernel_dim)  # [C, K], as named
    handed = []
    kernel = deltanet._conv_kernel
    monkeypatch.setattr(deltanet, "_conv_kernel", lambda *a: (handed.append(a[1]), kernel(*a)))
    rng = np.random.default_rng(5)
    x = rng.normal(size=(1, weight.shape[0])).astype(np.float32)
    state = rng.normal(size=(weight.shape[1] - 1, weight.shape[0])).astype(np.float32)
    out, _ = causal_conv1d(x, weight, state, silu=True)
    assert np.shares_memory(handed[0], weight)  # the kernel's [K, C] is the loaded array itself
    np.testing.assert_array_equal(out, causal_conv1d(x, np.ascontiguousarray(weight), state, silu=True)[0])


def test_a_prompts_conv_takes_both_cores_where_numba_owns_them_bit_for_bit(monkeypatch):
    import minqwen.deltanet as deltanet
    from minqwen.threads import one_blas_thread

    rng = np.random.default_rng(11)
    x = rng.normal(size=(deltanet.CONV_PARALLEL_FROM // 64 + 3, 64)).astype(np.float32)
    w, state = rng.normal(size=(64, 4)).astype(np.float32), rng.normal(size=(3, 64)).astype(np.float32)
    used, kernel = [], deltanet._conv_kernel_parallel
    monkeypatch.setattr(deltanet, "_conv_kernel_parallel", lambda *a: (used.append(len(a[0])), kernel(*a)))
    serial, _ = causal_conv1d(x, w, state)  # BLAS's threads may be spinning: one core
    with one_blas_thread():
        parallel, _ = causal_conv1d(x, w, state)
        causal_conv1d(x[:5], w, state)  # a few rows: one core
    assert used == [len(x)]
    np.testing.assert_array_equal(parallel, serial)
    np.testing.assert_array_equal(parallel, causal_conv1d_numpy(x, w, state)[0])


def test_a_prompt_takes_the_parallel_build_only_when_openblas_threads_nap(monkeypatch):
    import minqwen.deltanet as deltanet

    calls = []
    for name in ("_recurrent_kernel", "_recurrent_kernel_parallel"):
        kernel = getattr(deltanet, name)
        monkeypatch.setattr(deltanet, name, lambda *a, kernel=kernel, name=name: (calls.append(name), kernel(*a)))
    monkeypatch.setattr(deltanet, "PARALLEL_FROM", 0)
    args = random_inputs(np.random.default_rng(6), 2 * BLAS_ROWS, 3, 16, 12, np.float32)  # a prompt
    o_ref, s_ref = recurrent_gated_delta_rule_numpy(*args)
    for nap, expected in ((False, "_recurrent_kernel"), (True, "_recurrent_kernel_parallel")):
        monkeypatch.setattr(deltanet, "OPENBLAS_THREADS_NAP", nap)
        calls.clear()
        o, s = recurrent_gated_delta_rule(*args)
        assert calls == [expected]
        np.testing.assert_allclose(o, o_ref, rtol=0, atol=2e-6 * np.abs(o_ref).max())
        np.testing.assert_allclose(s, s_ref, rtol=0, atol=2e-6 * np.abs(s_ref).max())


def test_a_decode_step_takes_the_parallel_build_only_while_numba_does_the_products(monkeypatch):
    import minqwen.deltanet as deltanet
    from minqwen.threads import numba_does_the_products, one_blas_thread

    calls = []
    for name in ("_recurrent_kernel", "_recurrent_kernel_parallel"):
        kernel = getattr(deltanet, name)
        monkeypatch.setattr(deltanet, name, lambda *a, kernel=kernel, name=name: (calls.append(name), kernel(*a)))
    monkeypatch.setattr(deltanet, "PARALLEL_FROM", 1 << 60)  # never worth waking the pool
    monkeypatch.setattr(deltanet, "PARALLEL_FROM_AWAKE", 0)  # always worth using an awake one
    args = random_inputs(np.random.default_rng(8), 1, 3, 16, 12, np.float32)  # one token
    o_ref, s_ref = recurrent_gated_delta_rule_numpy(*args)
    for aside, expected in ((False, "_recurrent_kernel"), (True, "_recurrent_kernel_parallel")):
        calls.clear()
        with one_blas_thread(aside):
            assert numba_does_the_products() is aside
            o, s = recurrent_gated_delta_rule(*args)
        assert calls == [expected] and not numba_does_the_products()
        np.testing.assert_allclose(o, o_ref, rtol=0, atol=2e-6 * np.abs(o_ref).max())
        np.testing.assert_allclose(s, s_ref, rtol=0, atol=2e-6 * np.abs(s_ref).max())


@pytest.mark.parametrize("value, naps", [("18", True), ("4", True), ("19", False), ("28", False), ("", False),
                                         ("soon", False), (None, False)])
def test_openblas_thread_timeout_is_read_as_openblas_reads_it(monkeypatch, value, naps):
    from minqwen import threads

    if value is None:
        monkeypatch.delenv("OPENBLAS_THREAD_TIMEOUT", raising=False)
    else:
        monkeypatch.setenv("OPENBLAS_THREAD_TIMEOUT", value)
    assert threads._openblas_threads_nap() is naps


@pytest.mark.parametrize("parallel_from", [0, 1 << 60])
def test_the_parallel_and_serial_compilations_both_equal_the_twin(monkeypatch, parallel_from):
    import minqwen.deltanet as deltanet

    monkeypatch.setattr(deltanet, "PARALLEL_FROM", parallel_from)
    # 9 tokens: fewer than BLAS_ROWS, where the parallel build may run at all
    args = random_inputs(np.random.default_rng(5), 9, 3, 16, 12, np.float32)
    o_ref, s_ref = recurrent_gated_delta_rule_numpy(*args)
    o, s = recurrent_gated_delta_rule(*args)
    np.testing.assert_allclose(o, o_ref, rtol=0, atol=2e-6 * np.abs(o_ref).max())
    np.testing.assert_allclose(s, s_ref, rtol=0, atol=2e-6 * np.abs(s_ref).max())


# --------------------------------------------------------------------------- the whole layer, and edges


def _small_deltanet(rng, hk=2, hv=4, dk=12, dv=8, kernel=4, hidden=32):
    conv_dim = 2 * hk * dk + hv * dv
    def mat(*s):
        return (rng.normal(size=s) / np.sqrt(s[-1])).astype(np.float32)
    w = DeltaNetWeights(in_proj_qkv=2 * mat(conv_dim, hidden), in_proj_z=mat(hv * dv, hidden), in_proj_b=mat(hv, hidden),
                        in_proj_a=mat(hv, hidden), conv1d=rng.normal(size=(conv_dim, kernel)).astype(np.float32),
                        A_log=rng.normal(size=hv).astype(np.float32), dt_bias=rng.normal(size=hv).astype(np.float32),
                        norm=(1 + 0.1 * rng.normal(size=dv)).astype(np.float32), out_proj=mat(hidden, hv * dv))
    state = DeltaNetState(np.zeros((kernel - 1, conv_dim), np.float32), np.zeros((hv, dk, dv), np.float32))
    return w, state


def _direct_deltanet(x, w, hk, hv, dk, dv, act, eps):
    """The whole Gated DeltaNet layer in float64 from a zero state, token by token, from its definition."""
    f = {name: getattr(w, name).astype(np.float64) for name in vars(w)}
    x = x.astype(np.float64)
    t_len = x.shape[0]
    pre = x @ f["in_proj_qkv"].T  # [T, C]
    kernel = f["conv1d"].shape[1]
    conv = np.zeros_like(pre)
    for t in range(t_len):
        for j in range(kernel):  # the newest input meets the last tap
            if t - j >= 0:
                conv[t] += f["conv1d"][:, kernel - 1 - j] * pre[t - j]
    mixed = DIRECT_ACTIVATIONS[act](conv)
    q = mixed[:, : hk * dk].reshape(t_len, hk, dk)
    k = mixed[:, hk * dk : 2 * hk * dk].reshape(t_len, hk, dk)
    v = mixed[:, 2 * hk * dk :].reshape(t_len, hv, dv)
    q = q / np.sqrt((q * q).sum(-1, keepdims=True) + 1e-6) / np.sqrt(dk)
    k = k / np.sqrt((k * k).sum(-1, keepdims=True) + 1e-6)
    beta = 1 / (1 + np.exp(-(x @ f["in_proj_b"].T)))  # [T, Hv]
    g = -np.exp(f["A_log"]) * np.logaddexp(0.0, x @ f["in_proj_a"].T + f["dt_bias"])  # [T, Hv]
    z = (x @ f["in_proj_z"].T).reshape(t_len, hv, dv)
    out = np.empty((t_len, hv, dv))
    for h in range(hv):
        kh = h // (hv // hk)  # value head h reads key head h // (Hv / Hk)
        S = np.zeros((dk, dv))
        for t in range(t_len):
            S *= np.exp(g[t, h])
            S += np.outer(k[t, kh], beta[t, h] * (v[t, h] - S.T @ k[t, kh]))
            out[t, h] = S.T @ q[t, kh]
    normed = out / np.sqrt((out * out).mean(-1, keepdims=True) + eps) * f["norm"] * (z / (1 + np.exp(-z)))
    return normed.reshape(t_len, hv * dv) @ f["out_proj"].T


@pytest.mark.parametrize("act, t_len, form", [("silu", 300, "recurrent"), ("silu", 300, "chunked"),
                                              ("relu", 9, "recurrent"), ("gelu_pytorch_tanh", 9, "recurrent")])
def test_gated_deltanet_layer_equals_the_direct_layer_in_float64(act, t_len, form):
    # Long prompts (fixtures and model tests stop at 150 tokens) and a hidden_act other than silu
    # (transformers applies config.hidden_act after the conv; minqwen says it honours it).
    rng = np.random.default_rng(2)
    hk, hv, dk, dv, eps = 2, 4, 12, 8, 1e-6
    w, state = _small_deltanet(rng, hk, hv, dk, dv)
    w = DeltaNetWeights(**{name: getattr(w, name).astype(np.float64) for name in vars(w)})
    state = DeltaNetState(state.conv.astype(np.float64), state.recurrent.astype(np.float64))
    x = rng.normal(size=(t_len, 32))
    expected = _direct_deltanet(x, w, hk, hv, dk, dv, act, eps)
    got = gated_deltanet(x, w, state, hk, hv, dk, dv, act, eps, form=form)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-9 * np.abs(expected).max())


def test_l2_normalize_puts_eps_under_the_square_root_even_for_tiny_vectors():
    # A q or k head whose conv output is near zero (SiLU of large negatives) has |x|² ~ eps:
    # there eps's placement decides the result. Float64 direct formula, and transformers' l2norm if present.
    rng = np.random.default_rng(3)
    x = rng.normal(size=(40, 16)) * np.logspace(-6, 1, 40)[:, None]  # norms from ~4e-6 to ~40
    expected = x / np.sqrt((x * x).sum(-1, keepdims=True) + 1e-6)
    # (rtol 1e-8 in float64: minqwen adds eps rounded to float32, 1e-9 relative at the smallest norms)
    for dtype, rtol in ((np.float64, 1e-8), (np.float32, 2e-6)):
        np.testing.assert_allclose(l2_normalize(x.astype(dtype)), expected, rtol=rtol, atol=0)
    require_reference()
    import torch
    from transformers.models.qwen3_5.modeling_qwen3_5 import l2norm

    np.testing.assert_allclose(l2_normalize(x), l2norm(torch.tensor(x), dim=-1, eps=1e-6).numpy(), rtol=1e-8, atol=0)


def test_chunked_form_with_chunks_longer_than_64_equals_the_recurrent_definition():
    # chunk_size is a parameter; the property tests draw 16, 32 and 64 only.
    args = random_inputs(np.random.default_rng(4), 200, 2, 8, 6, np.float64)
    o_ref, s_ref = recurrent_gated_delta_rule_numpy(*args)
    for chunk in (96, 128):
        o, s = chunked_gated_delta_rule(*args, chunk_size=chunk)
        np.testing.assert_allclose(o, o_ref, rtol=0, atol=1e-10 * max(1.0, np.abs(o_ref).max()))
        np.testing.assert_allclose(s, s_ref, rtol=0, atol=1e-10 * max(1.0, np.abs(s_ref).max()))


def test_the_compiled_rule_with_no_tokens_returns_the_state_it_was_given():
    rng = np.random.default_rng(5)
    state = rng.normal(size=(2, 4, 3)).astype(np.float32)
    empty = [np.zeros(s, np.float32) for s in [(0, 2, 4), (0, 2, 4), (0, 2, 3), (0, 2), (0, 2)]]
    _, expected = recurrent_gated_delta_rule_numpy(*empty, state)
    _, got = recurrent_gated_delta_rule(*empty, state)
    np.testing.assert_array_equal(got, expected)


def test_float64_mode_scales_and_normalises_q_and_k_in_float64():
    # Model.astype(np.float64) is the round-off-free yardstick: no constant of the layer may be
    # rounded to float32 on the way (1/sqrt(Dk) and the l2 eps were, capping it near 1e-8).
    model = minqwen.load(EMBEDDED).astype(np.float64)
    c = model.config
    taps = {}
    model.forward([5, 17, 300], tap=lambda name, x: taps.__setitem__(name, np.array(x)))
    mixed = taps["layers.0.linear_attn.conv1d"]  # [T, C] float64, after the conv's activation
    key_dim = c.linear_num_key_heads * c.linear_key_head_dim
    for name, part in (("q", mixed[:, :key_dim]), ("k", mixed[:, key_dim:2 * key_dim])):
        heads = part.reshape(len(part), c.linear_num_key_heads, c.linear_key_head_dim)
        expected = heads / np.sqrt(np.sum(heads * heads, axis=-1, keepdims=True) + 1e-6)
        if name == "q":
            expected = expected / np.sqrt(c.linear_key_head_dim)
        got = taps[f"layers.0.linear_attn.{name}"]
        assert got.dtype == np.float64
        np.testing.assert_allclose(got, expected, rtol=1e-13, atol=0)


def test_the_norms_eps_is_taken_in_the_inputs_dtype():
    # With |x|² near eps, eps rounded to float32 (1e-6 → 9.99999997e-07) moves a float64 result
    # by about 1e-9 of itself: far beyond float64's own rounding.
    from minqwen.norms import normalised

    x = np.full((1, 32), 1e-4)  # float64; sum of squares 3.2e-7, mean square 1e-8
    np.testing.assert_allclose(l2_normalize(x), x / np.sqrt(np.sum(x * x) + 1e-6), rtol=1e-15, atol=0)
    np.testing.assert_allclose(normalised(x, 1e-6), x / np.sqrt(np.mean(x * x) + 1e-6), rtol=1e-15, atol=0)


def test_the_parallel_build_starts_exactly_at_its_documented_thresholds(monkeypatch):
    # Both builds compute the same numbers, so only the build chosen shows an off-by-one in the
    # dispatch: a call of PARALLEL_FROM multiply-adds or more (PARALLEL_FROM_AWAKE while Numba
    # does the products) takes the parallel build, and a prompt of BLAS_ROWS tokens or more stays
    # serial while OpenBLAS's threads spin. The tests above set a threshold to 0 or 2⁶⁰ and so
    # never stand on a boundary.
    import minqwen.deltanet as deltanet
    from minqwen.threads import one_blas_thread

    calls = []
    for name in ("_recurrent_kernel", "_recurrent_kernel_parallel"):
        kernel = getattr(deltanet, name)
        monkeypatch.setattr(deltanet, name, lambda *a, kernel=kernel, name=name: (calls.append(name), kernel(*a)))
    monkeypatch.setattr(deltanet, "OPENBLAS_THREADS_NAP", False)
    heads, dk, dv = 3, 4, 5
    per_token = heads * dk * dv  # multiply-adds of one token: state.size
    cases = [  # (tokens, PARALLEL_FROM, PARALLEL_FROM_AWAKE, Numba does the products, build expected)
        (BLAS_ROWS - 1, per_token * (BLAS_ROWS - 1), 1 << 60, False, "_recurrent_kernel_parallel"),  # work == threshold
        (BLAS_ROWS - 1, per_token * (BLAS_ROWS - 1) + 1, 1 << 60, False, "_recurrent_kernel"),  # one short of it
        (BLAS_ROWS, 0, 1 << 60, False, "_recurrent_kernel"),  # a prompt of BLAS_ROWS tokens: serial
        (1, 1 << 60, per_token, True, "_recurrent_kernel_parallel"),  # a decode step at the awake threshold
        (1, 1 << 60, per_token + 1, True, "_recurrent_kernel"),
    ]
    for t_len, parallel_from, awake_from, aside, expected in cases:
        monkeypatch.setattr(deltanet, "PARALLEL_FROM", parallel_from)
        monkeypatch.setattr(deltanet, "PARALLEL_FROM_AWAKE", awake_from)
        args = random_inputs(np.random.default_rng(t_len), t_len, heads, dk, dv, np.float32)
        o_ref, s_ref = recurrent_gated_delta_rule_numpy(*args)
        calls.clear()
        with one_blas_thread(aside):
            o, s = recurrent_gated_delta_rule(*args)
        assert calls == [expected], (t_len, parallel_from, awake_from, aside)
        np.testing.assert_allclose(o, o_ref, rtol=0, atol=2e-6 * np.abs(o_ref).max())
        np.testing.assert_allclose(s, s_ref, rtol=0, atol=2e-6 * np.abs(s_ref).max())


@pytest.mark.parametrize("t_len", [1, 5])
def test_a_layer_keeping_every_state_leaves_the_final_state_in_place_too(t_len):
    # A speculative verify sets state.history; the layer must then still leave the state after
    # its last token in state.recurrent and state.conv, as the plain path does (keep_first
    # happens to overwrite them, but a cache used after a verify without it would otherwise hold
    # a conv window of the new tokens beside the memory of before them). And each kept state is
    # the plain path's state after that many tokens.
    rng = np.random.default_rng(11)
    hk, hv, dk, dv = 2, 4, 12, 8
    w, state = _small_deltanet(rng, hk, hv, dk, dv)
    layer = lambda x, s: gated_deltanet(x, w, s, hk, hv, dk, dv, "silu", 1e-6)  # noqa: E731
    layer(rng.normal(size=(6, 32)).astype(np.float32), state)  # a non-empty state to start from
    x = rng.normal(size=(t_len, 32)).astype(np.float32)
    plain, keeping = state.copy(), state.copy()
    keeping.history = []
    expected = layer(x, plain)
    # (to float32 rounding: one row or several through BLAS round differently)
    close = lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=1e-5 * max(1.0, np.abs(b).max()))  # noqa: E731
    close(layer(x, keeping), expected)
    np.testing.assert_array_equal(keeping.conv, plain.conv)
    close(keeping.recurrent, plain.recurrent)
    step = state.copy()
    for t in range(t_len):  # the plain path, one token at a time
        layer(x[t : t + 1], step)
        close(keeping.history[t].conv, step.conv)
        close(keeping.history[t].recurrent, step.recurrent)


# --------------------------------------------------------------------------- a decode step in one pass


def _noop_tap(name, array):
    """A tap that keeps nothing: a tapped call runs the layer's definition, step by step."""


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 3), st.integers(1, 3), st.integers(1, 20), st.integers(1, 20), st.integers(1, 6),
       st.booleans(), st.integers(0, 2**31))
def test_a_compiled_decode_step_equals_the_layers_definition(hk, group, dk, dv, kernel, awake, seed):
    # Any head counts (value heads sharing a key head), head widths that are not a multiple of
    # the recurrence's four rows, conv kernels of 1 (no window) to 6, serial and parallel builds;
    # several steps in a row, from a state a prompt left.
    from minqwen.threads import one_blas_thread

    rng = np.random.default_rng(seed)
    hv = hk * group
    w, state = _small_deltanet(rng, hk, hv, dk, dv, kernel)
    gated_deltanet(rng.normal(size=(5, 32)).astype(np.float32), w, state, hk, hv, dk, dv, "silu", 1e-6)
    compiled, definition = state.copy(), state.copy()
    conv, memory = compiled.conv, compiled.recurrent
    for _ in range(3):
        x = rng.normal(size=(1, 32)).astype(np.float32)
        with one_blas_thread(awake):
            got = gated_deltanet(x, w, compiled, hk, hv, dk, dv, "silu", 1e-6)
        expected = gated_deltanet(x, w, definition, hk, hv, dk, dv, "silu", 1e-6, tap=_noop_tap)
        # The same arithmetic in the same order: bit for bit (so a tapped step records what an untapped one computes)
        np.testing.assert_array_equal(got, expected)
        np.testing.assert_array_equal(compiled.conv, definition.conv)
        np.testing.assert_array_equal(compiled.recurrent, definition.recurrent)
    assert compiled.conv is conv and compiled.recurrent is memory  # updated in place


def test_the_decode_steps_serial_and_parallel_builds_agree_bit_for_bit():
    from minqwen import deltanet

    rng = np.random.default_rng(4)
    hk, hv, dk, dv = 2, 6, 16, 12
    w, state = _small_deltanet(rng, hk, hv, dk, dv)
    gated_deltanet(rng.normal(size=(4, 32)).astype(np.float32), w, state, hk, hv, dk, dv, "silu", 1e-6)
    mixed_qkv = rng.normal(size=(1, w.conv1d.shape[0])).astype(np.float32)
    z, b, a = (rng.normal(size=s).astype(np.float32) for s in ((1, hv, dv), (1, hv), (1, hv)))
    results = []
    for kernel in (deltanet._decode_step_kernel, deltanet._decode_step_kernel_parallel):
        s = state.copy()
        out = np.empty((hv, dv), np.float32)
        kernel(mixed_qkv[0], z[0], b[0], a[0], np.ascontiguousarray(w.conv1d.T), s.conv, w.A_log, w.dt_bias,
               w.norm, np.float32(1e-6), hk, s.recurrent, out)
        results.append((out, s.conv, s.recurrent))
    for serial, parallel in zip(*results):
        np.testing.assert_array_equal(serial, parallel)


def test_only_a_plain_float32_decode_step_takes_the_compiled_step(monkeypatch):
    # Prompts, tapped calls (a tap sees every intermediate), a speculative verify (it keeps each
    # token's state), float64 checks and other activations run the definition.
    from minqwen import deltanet

    calls = []
    for name in ("_decode_step_kernel", "_decode_step_kernel_parallel"):
        kernel = getattr(deltanet, name)
        monkeypatch.setattr(deltanet, name, lambda *a, kernel=kernel: (calls.append(1), kernel(*a)))
    rng = np.random.default_rng(6)
    hk, hv, dk, dv = 2, 4, 12, 8
    w, state = _small_deltanet(rng, hk, hv, dk, dv)
    w64 = DeltaNetWeights(**{name: getattr(w, name).astype(np.float64) for name in vars(w)})
    state64 = DeltaNetState(state.conv.astype(np.float64), state.recurrent.astype(np.float64))
    one, two = rng.normal(size=(1, 32)).astype(np.float32), rng.normal(size=(2, 32)).astype(np.float32)
    verifying = state.copy()
    verifying.history = []
    cases = {
        "a decode step": (one, w, state.copy(), "silu", None, 1),
        "two tokens": (two, w, state.copy(), "silu", None, 0),
        "tapped": (one, w, state.copy(), "silu", _noop_tap, 0),
        "a verify": (one, w, verifying, "silu", None, 0),
        "float64": (one.astype(np.float64), w64, state64, "silu", None, 0),
        "gelu": (one, w, state.copy(), "gelu_pytorch_tanh", None, 0),
    }
    for case, (x, weights, s, act, tap, expected) in cases.items():
        calls.clear()
        gated_deltanet(x, weights, s, hk, hv, dk, dv, act, 1e-6, tap=tap)
        assert len(calls) == expected, case


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 6), st.integers(1, 20), st.integers(0, 2**31))
def test_the_compiled_decay_gate_equals_its_numpy_twin(t_len, heads, seed):
    # Steps from deep in softplus's exponential tail to past its switch to x at 20, and rates
    # from tiny to large: within float32 rounding of the twin (exp and log1p from another library).
    from minqwen.deltanet import decay_gate, decay_gate_numpy

    rng = np.random.default_rng(seed)
    a = rng.normal(0, 12, size=(t_len, heads)).astype(np.float32)
    A_log = rng.normal(0, 3, size=heads).astype(np.float32)
    dt_bias = rng.normal(0, 4, size=heads).astype(np.float32)
    got, expected = decay_gate(a, A_log, dt_bias), decay_gate_numpy(a, A_log, dt_bias)
    assert got.dtype == np.float32 and got.shape == (t_len, heads)
    np.testing.assert_allclose(got, expected, rtol=4e-7, atol=0)
    assert (got <= 0).all()


def test_the_decay_gate_at_softplus_switch_and_with_nan():
    from minqwen.deltanet import decay_gate, decay_gate_numpy

    a = np.array([[19.5, 20.0, 20.5, -100.0, np.nan, np.inf]], np.float32)
    zero = np.zeros(6, np.float32)
    got, expected = decay_gate(a, zero, zero), decay_gate_numpy(a, zero, zero)
    np.testing.assert_allclose(got, expected, rtol=4e-7, atol=0)  # NaN where NaN, -inf where -inf
    np.testing.assert_array_equal(np.isnan(got), np.isnan(expected))


def test_arrays_that_do_not_fit_the_kernels_are_refused_not_read_past_their_ends():
    # The compiled kernels do not check their reads; a state or window of another layer's size
    # (a hand-built cache) must be refused with a message, never read out of bounds.
    from minqwen.errors import MinqwenError

    rng = np.random.default_rng(12)
    hk, hv, dk, dv = 2, 4, 12, 8
    w, state = _small_deltanet(rng, hk, hv, dk, dv)
    one, three = rng.normal(size=(1, 32)).astype(np.float32), rng.normal(size=(3, 32)).astype(np.float32)
    small_memory = DeltaNetState(state.conv.copy(), np.zeros((hv, dk - 4, dv), np.float32))
    short_window = DeltaNetState(state.conv[:1].copy(), state.recurrent.copy())
    for x in (one, three):
        with pytest.raises(MinqwenError, match=r"state \[4, 8, 8\]"):
            gated_deltanet(x, w, small_memory.copy(), hk, hv, dk, dv, "silu", 1e-6)
        with pytest.raises(MinqwenError, match=r"conv_state \[K − 1, C\].*\[1, 80\]"):
            gated_deltanet(x, w, short_window.copy(), hk, hv, dk, dv, "silu", 1e-6)
    args = random_inputs(rng, 2, 3, 5, 4, np.float32)
    with pytest.raises(MinqwenError, match="beta"):
        recurrent_gated_delta_rule(*args[:4], args[4][:1], args[5])
