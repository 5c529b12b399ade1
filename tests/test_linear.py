"""The projection y = x · Wᵀ: the few-row kernel against its twins, for both weight formats."""

from unittest import mock

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minqwen import bf16_dot
from minqwen import linear as L
from minqwen.threads import one_blas_thread


def twin(x, weight):
    return L.linear_bf16_numpy(x, weight) if weight.dtype == L.BF16 else x @ weight.T


@pytest.mark.parametrize("build", ["_rows_kernel", "_rows_kernel_parallel"])
@pytest.mark.parametrize("weight_dtype", [np.float32, ml_dtypes.bfloat16])
@settings(max_examples=25, deadline=None)
@given(rows=st.integers(0, L.BLAS_ROWS - 1), n_in=st.integers(1, 300), n_out=st.integers(1, 200), seed=st.integers(0, 99))
def test_both_builds_of_the_few_row_kernel_equal_the_twin(build, weight_dtype, rows, n_in, n_out, seed):
    # n_out from 1 covers matrices with fewer than four rows, where a step's four rows repeat
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, n_in)).astype(np.float32)
    weight = rng.standard_normal((n_out, n_in)).astype(weight_dtype)
    out = np.full((rows, n_out), np.nan, np.float32)
    getattr(L, build)(x, weight.view(np.uint16) if weight_dtype == ml_dtypes.bfloat16 else weight, out)
    expected = twin(x, weight)
    widened = weight.astype(np.float32)
    bound = 2 * n_in * 2.0**-24 * (np.abs(x) @ np.abs(widened).T) + 1e-30  # float32 rounding of a reordered sum
    assert np.all(np.abs(out - expected) <= bound)  # NaN (a row never written) fails too


@pytest.mark.parametrize("weight_dtype", [np.float32, ml_dtypes.bfloat16])
def test_linear_sends_few_rows_to_the_kernel_and_many_to_blas(monkeypatch, weight_dtype):
    rng = np.random.default_rng(3)
    weight = rng.standard_normal((40, 24)).astype(weight_dtype)
    used = []
    kernel = L.linear_few_rows
    monkeypatch.setattr(L, "linear_few_rows", lambda x, w: (used.append(len(x)), kernel(x, w))[1])
    for aside in (False, True):
        used.clear()
        with one_blas_thread(aside):
            for rows in (1, 2, L.BLAS_ROWS - 1, L.BLAS_ROWS, 40):
                x = rng.standard_normal((rows, 24)).astype(np.float32)
                np.testing.assert_allclose(L.linear(x, weight), twin(x, weight), rtol=1e-5, atol=1e-5)
        # whether or not BLAS stepped aside (that only picks the kernel's build)
        assert used == [1, 2, L.BLAS_ROWS - 1]


def test_numba_does_the_products_for_few_rows_of_a_model_too_big_for_the_caches():
    big, small = L.SMALL_MODEL_BYTES, L.SMALL_MODEL_BYTES - 1
    for rows in (1, 2, L.BLAS_ROWS - 1):
        assert L.numba_multiplies(L.BF16, rows, big) and L.numba_multiplies(np.dtype(np.float32), rows, big)
        # a small model's few rows: the kernel's serial build (bf16 too), no pool to wake
        assert not L.numba_multiplies(L.BF16, rows, small)
        assert not L.numba_multiplies(L.BF16, rows, small, bf16_prompts=True)
        assert not L.numba_multiplies(np.dtype(np.float32), rows, small)
        assert not L.numba_multiplies(np.dtype(np.float64), rows, big)
    assert not L.numba_multiplies(np.dtype(np.float32), L.BLAS_ROWS, big)  # a float32 prompt: BLAS
    # a bf16 prompt: Numba's kernel in three parts on AMX tiles, else BLAS
    assert L.numba_multiplies(L.BF16, L.BLAS_ROWS, big) == bf16_dot.cpu_has_amx_bf16()
    with mock.patch.object(bf16_dot, "cpu_has_amx_bf16", lambda: False):
        assert not L.numba_multiplies(L.BF16, L.BLAS_ROWS, big)


def test_as_float32_widens_bf16_bits_the_same_in_python_and_in_numba():
    import numba

    compiled = numba.njit(lambda w: L.as_float32(w))
    values = np.array([1.0, -2.5, 3.140625, 0.0, -0.0, np.inf, 1e-40], ml_dtypes.bfloat16)
    for bits, value in zip(values.view(np.uint16), values.astype(np.float32)):
        for widen in (L.as_float32, compiled):
            assert np.float32(widen(bits)).view(np.uint32) == value.view(np.uint32)
    assert L.as_float32(np.float32(0.1)) == compiled(np.float32(0.1)) == np.float32(0.1)
    for other in (np.float64(0.1), 0.1):  # anything else is rounded to a float32 in both forms (was kept in Numba)
        assert type(L.as_float32(other)) is np.float32 and L.as_float32(other) == np.float32(0.1)
        assert float(compiled(other)) == float(np.float32(0.1))  # (compared as Python floats: NumPy would round 0.1)


AMX_TILES = [pytest.param(False, id="blas"),
             pytest.param(True, id="amx", marks=pytest.mark.skipif(not bf16_dot.cpu_has_amx_bf16(), reason="no AMX tiles"))]


@pytest.mark.parametrize("amx", AMX_TILES)
@pytest.mark.parametrize("n_out", [L.WIDEN_BLOCK + 1, 2 * L.WIDEN_BLOCK, 2 * L.WIDEN_BLOCK + 37])
@pytest.mark.parametrize("rows", [L.BLAS_ROWS, L.BLAS_ROWS + 3])
def test_a_prompt_times_a_bf16_matrix_of_several_widening_blocks_is_right_in_every_block(n_out, rows, amx):
    # Prompts widen bf16 weights WIDEN_BLOCK rows at a time for BLAS; every real checkpoint's
    # matrices span several blocks, the fixtures' none. Or, on AMX tiles, they multiply them in
    # three parts of x (bf16_dot.py): exact too.
    rng = np.random.default_rng(n_out + rows)
    n_in = 24
    weight = (rng.normal(size=(n_out, n_in)) * 0.5).astype(ml_dtypes.bfloat16)
    x = rng.normal(size=(rows, n_in)).astype(np.float32)
    widened = []
    kernel = L._widen_kernel_serial
    with L.rounding_prompts_to_bf16(False), mock.patch.object(bf16_dot, "cpu_has_amx_bf16", lambda: amx), \
            mock.patch.object(L, "_widen_kernel_serial", lambda *arguments: (widened.append(1), kernel(*arguments))[1]):
        got = L.linear(x, weight)
    assert len(widened) == (0 if amx else -(-n_out // L.WIDEN_BLOCK))  # the path this case is about
    w64 = weight.astype(np.float64)  # bf16 widens exactly
    exact = x.astype(np.float64) @ w64.T
    bound = (n_in + 1) * 2.0**-24 * (np.abs(x).astype(np.float64) @ np.abs(w64).T)  # float32 rounding of the sums
    assert got.shape == (rows, n_out) and got.dtype == np.float32
    assert (np.abs(got - exact) <= bound).all(), np.flatnonzero((np.abs(got - exact) > bound).any(axis=0))[:10]


@pytest.mark.parametrize("weight_dtype", [np.float32, ml_dtypes.bfloat16])
@pytest.mark.parametrize("rounded", [False, True])
@pytest.mark.parametrize("rows", [1, L.BLAS_ROWS - 1, L.BLAS_ROWS, 70])
def test_linears_are_the_products_one_at_a_time_with_x_split_once(monkeypatch, weight_dtype, rounded, rows):
    if rounded and not bf16_dot.cpu_has_bf16_dot():
        pytest.skip("this CPU has no AVX512-BF16: nothing is rounded")
    rng = np.random.default_rng(rows)
    x = rng.standard_normal((rows, 40)).astype(np.float32)
    weights = [rng.standard_normal((n_out, 40)).astype(weight_dtype) for n_out in (48, 7, 33)]
    biases = [None, rng.standard_normal(7).astype(np.float32), None]
    with L.rounding_prompts_to_bf16(rounded), one_blas_thread(rounded):
        alone = [L.linear(x, w, b) for w, b in zip(weights, biases)]
        splits, split = [], bf16_dot.split_into_bf16_parts
        monkeypatch.setattr(bf16_dot, "split_into_bf16_parts", lambda *a: (splits.append(1), split(*a))[1])
        together = L.linears(x, weights, biases)
    # The same kernels on the same inputs: bit for bit, biases included.
    assert len(together) == 3 and all(np.array_equal(a, t) for a, t in zip(alone, together))
    np.testing.assert_allclose(together[1], twin(x, weights[1]) + biases[1], rtol=0.02 if rounded else 1e-5, atol=0.1 if rounded else 1e-5)
    on_tiles = weight_dtype == ml_dtypes.bfloat16 and rows >= L.BLAS_ROWS and bf16_dot.cpu_has_amx_bf16()
    assert len(splits) == (1 if on_tiles else 0)  # one split for the three weights, not three


def test_linears_refuse_a_bias_list_of_another_length():
    x, w = np.ones((2, 3), np.float32), np.ones((4, 3), np.float32)
    with pytest.raises(L.MinqwenError, match="2 weights but 1 biases"):
        L.linears(x, [w, w], [None])
