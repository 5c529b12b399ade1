"""The compiled float32 sigmoid, SiLU and exact GELU against their NumPy twins, the exp and erf
inside them; softplus; and every hidden_act a config may name, applied as its formula says."""

import math

import numba
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from conftest import DIRECT_ACTIVATIONS
from minqwen import activations
from minqwen.activations import (ACTIVATIONS, gelu, gelu_numpy, gelu_tanh, sigmoid, sigmoid_numpy, silu,
                                 silu_numpy, silu_times, silu_times_numpy, softplus)
from minqwen.mlp import MLPWeights, swiglu_mlp


@numba.njit
def _exp_all(x, out):
    for i in range(x.size):
        out[i] = activations._exp32(x[i])


def compiled_exp(x: np.ndarray) -> np.ndarray:
    out = np.empty_like(x)
    _exp_all(x, out)
    return out


def test_compiled_exp_is_within_a_unit_and_a_fifth_in_the_last_place():
    # 4 M float32 values spread over the whole range where exp(x) is a normal float32
    x = np.linspace(-87.3, 88.7, 4_000_001).astype(np.float32)
    exact = np.exp(x.astype(np.float64))
    ulp = np.spacing(exact.astype(np.float32)).astype(np.float64)
    errors = np.abs(compiled_exp(x) - exact) / ulp
    assert errors.max() <= 1.25


def test_compiled_exp_at_the_edges():
    x = np.array([0.0, -0.0, 1.0, np.nan, np.inf, -np.inf, 89.0, 100.0, 1e30, -104.0, -200.0, -1e30,
                  -100.0, -90.0], np.float32)
    got = compiled_exp(x)
    assert got[0] == got[1] == 1.0 and got[2] == np.float32(np.e)
    assert np.isnan(got[3])
    assert np.all(np.isinf(got[[4, 6, 7, 8]])) and np.all(got[[4, 6, 7, 8]] > 0)  # overflow: inf
    assert np.all(got[[5, 9, 10, 11]] <= 1.5e-45)  # underflow: zero or the smallest subnormal
    # subnormal results, built from two powers of two: exact to within a subnormal's spacing
    np.testing.assert_allclose(got[12:], np.exp(x[12:].astype(np.float64)), rtol=1e-6, atol=1.5e-45)


arrays = hnp.arrays(np.float32, hnp.array_shapes(min_dims=1, max_dims=3, max_side=9),
                    elements=st.floats(-120, 120, width=32) | st.sampled_from([np.inf, -np.inf, 0.0]))


@settings(max_examples=60, deadline=None)
@given(arrays, st.booleans())
def test_compiled_sigmoid_and_silu_equal_their_numpy_twins(x, strided):
    if strided and x.shape[-1] > 1:
        x = x[..., ::2]  # the layers pass column slices
    for compiled, twin in ((sigmoid, sigmoid_numpy), (silu, silu_numpy)):
        with np.errstate(invalid="ignore"):  # silu(−inf) = −inf · 0: NaN in both, as in torch
            got, want = compiled(x), twin(x)
        assert got.shape == x.shape and got.dtype == np.float32
        # A few float32 roundings apart (exp within 1.2 ulp of NumPy's, both near exact)
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-30)


@settings(max_examples=40, deadline=None)
@given(arrays, st.booleans(), st.integers(0, 99))
def test_silu_times_is_silu_then_the_product_bit_for_bit(gate, strided, seed):
    if strided and gate.shape[-1] > 1:
        gate = gate[..., ::2]
    up = np.random.default_rng(seed).normal(scale=3, size=gate.shape).astype(np.float32)
    with np.errstate(invalid="ignore", over="ignore"):
        got, want = silu_times(gate, up), silu(gate) * up
    assert got.shape == gate.shape and got.dtype == np.float32
    np.testing.assert_array_equal(got, want)  # NaN where both are NaN
    with np.errstate(invalid="ignore", over="ignore"):
        twin = silu_times_numpy(gate, up)
    np.testing.assert_allclose(got, twin, rtol=1e-6, atol=1e-30)  # its twin: silu's rounding apart


def test_silu_times_takes_both_cores_for_a_prompt_and_other_dtypes_the_plain_steps(monkeypatch):
    from minqwen.threads import one_blas_thread

    rng = np.random.default_rng(4)
    gate, up = (rng.normal(scale=4, size=(activations.PARALLEL_FROM // 64 + 5, 64)).astype(np.float32) for _ in range(2))
    used, kernel = [], activations._silu_times_kernel_parallel
    monkeypatch.setattr(activations, "_silu_times_kernel_parallel", lambda *a: (used.append(1), kernel(*a)))
    with one_blas_thread():
        parallel_result = silu_times(gate, up)
    assert used == [1] and np.array_equal(parallel_result, silu(gate) * up)
    g64, u64 = gate.astype(np.float64), up.astype(np.float64)
    np.testing.assert_array_equal(silu_times(g64, u64), silu_numpy(g64) * u64)
    assert silu_times(g64, u64).dtype == np.float64


def test_a_prompts_sigmoid_and_silu_take_both_cores_when_numba_owns_them_and_agree_bit_for_bit(monkeypatch):
    from minqwen.threads import one_blas_thread

    x = np.random.default_rng(3).normal(scale=8, size=(activations.PARALLEL_FROM // 64 + 5, 64)).astype(np.float32)
    small = x[:3]
    for compiled, name in ((sigmoid, "_sigmoid_kernel"), (silu, "_silu_kernel")):
        serial_result = compiled(x)  # outside one_blas_thread: BLAS's threads may be spinning
        used = []
        for suffix in ("", "_parallel"):
            kernel = getattr(activations, name + suffix)
            monkeypatch.setattr(activations, name + suffix,
                                lambda flat, out, kernel=kernel, suffix=suffix: (used.append(suffix), kernel(flat, out)))
        # the module functions look the kernels up when called
        with one_blas_thread():
            parallel_result = compiled(x)
            compiled(small)
        compiled(x)
        assert used == ["_parallel", "", ""]
        assert np.array_equal(parallel_result, serial_result)
        monkeypatch.undo()


@numba.njit
def _numba_erf_all(x, out):
    for i in range(x.size):
        out[i] = math.erf(x[i])


def test_the_compiled_erf_is_within_an_ulp_of_pythons():
    # The exact GELU's kernel calls Numba's math.erf, in float64; its twin, Python's.
    x = np.concatenate([np.linspace(-7, 7, 1_000_001), [0.0, -0.0, 1e-300, -1e-300, 30.0, -30.0, np.inf, -np.inf]])
    got = np.empty_like(x)
    _numba_erf_all(x, got)
    want = np.array([math.erf(v) for v in x])
    np.testing.assert_array_max_ulp(got, want, maxulp=1)


@settings(max_examples=60, deadline=None)
@given(arrays, st.booleans())
def test_compiled_gelu_equals_its_numpy_twin(x, strided):
    if strided and x.shape[-1] > 1:
        x = x[..., ::2]
    with np.errstate(invalid="ignore"):  # gelu(−inf) = −inf · 0: NaN in both, as in torch
        got, want = gelu(x), gelu_numpy(x)
    assert got.shape == x.shape and got.dtype == np.float32
    # The same float32 and float64 steps: equal but for a 1-ulp difference between the two erfs
    np.testing.assert_allclose(got, want, rtol=1.2e-7, atol=1e-45)


def test_compiled_gelu_is_exact_to_float32_round_off():
    # Against x · Φ(x) in float64 (erfc: no cancellation in the negative tail). The formula's
    # own 1 + erf cancels there in both minqwen and torch; what is left is below 2.4e-7 absolute.
    x = np.linspace(-10, 10, 2_000_001).astype(np.float32)
    x64 = x.astype(np.float64)
    exact = x64 * 0.5 * np.array([math.erfc(-v / math.sqrt(2)) for v in x64])
    np.testing.assert_allclose(gelu(x), exact, rtol=2.5e-7, atol=2.5e-7)


def test_gelu_tanh_in_place_is_its_formula_bit_for_bit():
    # Computed step by step on one temporary: the same float32 roundings as the one-line formula.
    rng = np.random.default_rng(2)
    x = np.concatenate([rng.normal(size=10_000) * 4, [0.0, -0.0, 30.0, -30.0, 1e-40]]).astype(np.float32)
    c = np.float32(math.sqrt(2 / math.pi))
    formula = 0.5 * x * (1 + np.tanh(c * (x + np.float32(0.044715) * x * x * x)))
    before = x.copy()
    np.testing.assert_array_equal(gelu_tanh(x), formula)
    np.testing.assert_array_equal(x, before)  # the input is left alone


def test_float32_gelu_takes_the_compiled_kernel(monkeypatch):
    # test_compiled_gelu_equals_its_numpy_twin compares gelu with its twin: were float32 sent to
    # the twin as well, it would compare the twin with itself and could never fail.
    def twin_called(x):
        raise AssertionError("float32 gelu went to the NumPy twin")

    monkeypatch.setattr(activations, "gelu_numpy", twin_called)
    x = np.linspace(-5, 5, 101, dtype=np.float32)
    exact = x.astype(np.float64) * 0.5 * np.array([math.erfc(-v / math.sqrt(2)) for v in x.astype(np.float64)])
    np.testing.assert_allclose(gelu(x), exact, rtol=2.5e-7, atol=2.5e-7)


def test_float64_takes_the_twin_exactly():
    x = np.random.default_rng(0).normal(size=(4, 33)) * 20
    np.testing.assert_array_equal(sigmoid(x), sigmoid_numpy(x))
    np.testing.assert_array_equal(silu(x), silu_numpy(x))
    np.testing.assert_array_equal(gelu(x), gelu_numpy(x))


@pytest.mark.parametrize("dtype, rtol", [(np.float64, 1e-9), (np.float32, 1e-6)])
def test_softplus_is_log1p_exp_over_the_whole_range(dtype, rtol):
    # g = −exp(A_log)·softplus(a + dt_bias): a + dt_bias in (10, 20] is a real model's input, and
    # a float64 model (Model.astype) keeps softplus's float64 accuracy below torch's threshold 20.
    x = np.concatenate([np.linspace(-40, 60, 2001), np.linspace(9.5, 20.5, 1001)]).astype(dtype)
    expected = np.logaddexp(0.0, x.astype(np.float64))  # log(1 + e^x) in float64, no threshold
    got = softplus(x)
    assert got.dtype == dtype
    np.testing.assert_allclose(got, expected, rtol=rtol, atol=0)


def test_the_direct_formulas_cover_every_activation_minqwen_accepts():
    assert set(DIRECT_ACTIVATIONS) == set(ACTIVATIONS)


@pytest.mark.parametrize("act", sorted(DIRECT_ACTIVATIONS))
def test_the_mlp_applies_the_activation_its_hidden_act_names(act):
    # Every fixture's MLP uses silu; the others are checked here.
    rng = np.random.default_rng(1)
    h, inter, t = 24, 40, 7
    x = rng.normal(size=(t, h)).astype(np.float32)
    w = MLPWeights(*(rng.normal(size=s).astype(np.float32) / np.sqrt(s[1]) * 2
                     for s in [(inter, h), (inter, h), (h, inter)]))
    x64, (g64, u64, d64) = x.astype(np.float64), (a.astype(np.float64) for a in (w.gate_proj, w.up_proj, w.down_proj))
    expected = (DIRECT_ACTIVATIONS[act](x64 @ g64.T) * (x64 @ u64.T)) @ d64.T  # ([T, I] ⊙ [T, I]) · [H, I]ᵀ → [T, H]
    got = swiglu_mlp(x, w, act)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5 * np.abs(expected).max())
