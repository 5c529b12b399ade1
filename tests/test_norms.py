"""The compiled float32 norms (RMSNorm, gated RMSNorm, the Gated DeltaNet's L2 norm) against their
NumPy twins; their dispatch (float64 and mixed dtypes take the twin; both builds agree bit for bit)."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from minqwen import deltanet, norms
from minqwen.activations import silu_numpy
from minqwen.threads import one_blas_thread

shapes = hnp.array_shapes(min_dims=1, max_dims=3, min_side=1, max_side=40)


def within_float32_rounding(got, want):
    # The twins sum the squares pairwise in float32, the kernels in float64: a few roundings apart
    np.testing.assert_allclose(got, want, rtol=2e-6, atol=1e-30)


@settings(max_examples=60, deadline=None)
@given(shape=shapes, seed=st.integers(0, 999), scale=st.sampled_from([1.0, 1e-3, 1e3]),
       eps=st.sampled_from([1e-6, 1e-5, 0.0]), strided=st.booleans())
def test_compiled_norms_equal_their_numpy_twins(shape, seed, scale, eps, strided):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(shape) * scale).astype(np.float32)
    gate = rng.standard_normal(shape).astype(np.float32) * 4
    if strided and shape[-1] > 1:  # the layers pass column slices of a projection's output
        x, gate = x[..., ::2], gate[..., ::2]
    weight = rng.standard_normal(x.shape[-1]).astype(np.float32)
    pairs = [(norms.rms_norm(x, weight, eps), norms.rms_norm_numpy(x, weight, eps)),
             (norms.gated_rms_norm(x, gate, weight, eps), norms.gated_rms_norm_numpy(x, gate, weight, eps)),
             (norms.l2_normalize(x, eps), norms.l2_normalize_numpy(x, eps))]
    for got, want in pairs:
        assert got.shape == x.shape and got.dtype == np.float32
        within_float32_rounding(got, want)


def test_the_gate_is_silu_and_the_scales_are_one_plus_w_and_w():
    x = np.array([[3.0, -4.0]], np.float32)  # rms √12.5
    gate = np.array([[2.0, -1.0]], np.float32)
    weight = np.array([0.5, -2.0], np.float32)
    normalised = x / np.sqrt(np.float32(12.5))
    within_float32_rounding(norms.rms_norm(x, weight, 0.0), normalised * (1 + weight))
    within_float32_rounding(norms.gated_rms_norm(x, gate, weight, 0.0), weight * normalised * silu_numpy(gate))
    within_float32_rounding(norms.l2_normalize(x, 0.0), x / np.float32(5.0))


def test_rows_of_zeros_take_eps_and_eps_zero_gives_nan_as_the_twin_does():
    x = np.zeros((2, 8), np.float32)
    weight = np.ones(8, np.float32)
    assert np.all(norms.rms_norm(x, weight, 1e-6) == 0)
    with np.errstate(invalid="ignore"):
        assert np.all(np.isnan(norms.rms_norm(x, weight, 0.0))) and np.all(np.isnan(norms.rms_norm_numpy(x, weight, 0.0)))


def test_float64_and_mixed_dtypes_take_the_twin_exactly():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((5, 16))  # float64: the precision checks
    weight = rng.standard_normal(16)
    assert np.array_equal(norms.rms_norm(x, weight, 1e-6), norms.rms_norm_numpy(x, weight, 1e-6))
    assert np.array_equal(norms.gated_rms_norm(x, x, weight, 1e-6), norms.gated_rms_norm_numpy(x, x, weight, 1e-6))
    assert np.array_equal(norms.l2_normalize(x), norms.l2_normalize_numpy(x))
    x32 = x.astype(np.float32)
    assert np.array_equal(norms.rms_norm(x32, weight, 1e-6), norms.rms_norm_numpy(x32, weight, 1e-6))


@pytest.mark.parametrize("norm", ["rms_norm", "gated_rms_norm", "l2_normalize"])
def test_a_prompts_norm_takes_both_cores_when_numba_owns_them_and_agrees_bit_for_bit(monkeypatch, norm):
    rng = np.random.default_rng(2)
    x = rng.standard_normal((norms.PARALLEL_FROM // 64 + 3, 64)).astype(np.float32)
    weight = rng.standard_normal(64).astype(np.float32)
    call = {"rms_norm": lambda a: norms.rms_norm(a, weight, 1e-6),
            "gated_rms_norm": lambda a: norms.gated_rms_norm(a, a * 2, weight, 1e-6),
            "l2_normalize": lambda a: norms.l2_normalize(a)}[norm]
    serial = call(x)  # outside one_blas_thread: BLAS's threads may be spinning
    used = []
    for suffix in ("", "_parallel"):
        name = f"_{norm}_kernel{suffix}"
        kernel = getattr(norms, name)
        monkeypatch.setattr(norms, name, lambda *a, kernel=kernel, suffix=suffix: (used.append(suffix), kernel(*a)))
    with one_blas_thread():
        parallel = call(x)
        call(x[:3])
    call(x)
    assert used == ["_parallel", "", ""]
    assert np.array_equal(parallel, serial)


def test_shapes_the_kernels_do_not_take_go_to_the_twin():
    # The kernels trust their shapes (no bounds checks): a weight of another length, or rows of
    # no values, must reach NumPy, which broadcasts or raises as it always has.
    rng = np.random.default_rng(3)
    x = rng.standard_normal((4, 8)).astype(np.float32)
    with pytest.raises(ValueError):
        norms.rms_norm(x, np.ones(5, np.float32), 1e-6)
    with pytest.raises(ValueError):
        norms.gated_rms_norm(x, x, np.ones(5, np.float32), 1e-6)
    one = np.ones(1, np.float32)  # broadcasts in NumPy: the twin's answer
    assert np.array_equal(norms.rms_norm(x, one, 1e-6), norms.rms_norm_numpy(x, one, 1e-6))
    empty = np.zeros((3, 0), np.float32)
    with np.errstate(invalid="ignore", divide="ignore"):  # the twin's mean of no values
        assert norms.rms_norm(empty, np.zeros(0, np.float32), 1e-6).shape == (3, 0)
    assert norms.l2_normalize(empty).shape == (3, 0)


def test_the_gated_deltanet_normalizes_q_and_k_with_this_l2_norm():
    assert deltanet.l2_normalize is norms.l2_normalize
