"""The bf16-resident mode: weights kept bf16, widened exactly inside the kernels, float32 accumulation."""

import json

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.numpy import load_file

import minqwen
from conftest import FIXTURE_NAMES, FIXTURES, greedy_continuation, reordering_bound
from minqwen.linear import BLAS_ROWS, linear, linear_bf16, linear_bf16_numpy, widen_bf16, widen_bf16_numpy

BF16_FIXTURES = [n for n in FIXTURE_NAMES
                 if json.loads((FIXTURES / n / "config.json").read_text()).get("dtype") == "bfloat16"]


def random_bf16(rng, shape):
    return (rng.normal(size=shape) * rng.uniform(0.1, 3)).astype(ml_dtypes.bfloat16)


def test_widening_bf16_is_exact():
    rng = np.random.default_rng(0)
    w = random_bf16(rng, (37, 19))
    w[0, :4] = np.array([0.0, -0.0, np.inf, -np.inf], dtype=ml_dtypes.bfloat16)
    expected = w.astype(np.float32)  # ml_dtypes' widening
    np.testing.assert_array_equal(widen_bf16_numpy(w).view(np.uint32), expected.view(np.uint32))
    np.testing.assert_array_equal(widen_bf16(w).view(np.uint32), expected.view(np.uint32))


def test_widening_wakes_the_thread_pool_only_for_a_big_array(monkeypatch):
    # A decode step's embedding row (bf16-resident mode) goes to the serial build; a prompt's
    # rows to the parallel one. Both widen exactly.
    from minqwen import linear as linear_module

    rng = np.random.default_rng(1)
    launched = []
    for name in ("_widen_kernel", "_widen_kernel_serial"):
        kernel = getattr(linear_module, name)
        monkeypatch.setattr(linear_module, name, lambda bits, out, kernel=kernel, name=name: (
            launched.append((name, bits.size)), kernel(bits, out)))
    small = random_bf16(rng, (2, 256))
    big = random_bf16(rng, (linear_module.PARALLEL_FROM // 512, 512))
    for w in (small, big):
        np.testing.assert_array_equal(widen_bf16(w).view(np.uint32), w.astype(np.float32).view(np.uint32))
    assert launched == [("_widen_kernel_serial", small.size), ("_widen_kernel", big.size)]


@settings(max_examples=40, deadline=None)
@given(rows=st.integers(1, 2 * BLAS_ROWS), n_in=st.integers(1, 300), n_out=st.integers(1, 300), seed=st.integers(0, 2**16))
def test_bf16_kernels_equal_the_numpy_twin_within_float32_reordering(rows, n_in, n_out, seed):
    rng = np.random.default_rng(seed)
    w = random_bf16(rng, (n_out, n_in))
    x = rng.normal(size=(rows, n_in)).astype(np.float32)
    expected = linear_bf16_numpy(x, w)
    got = linear_bf16(x, w)
    assert got.dtype == np.float32 and got.shape == (rows, n_out)
    assert (np.abs(got - expected) <= reordering_bound(x, w.astype(np.float32))).all()


def test_linear_dispatches_on_the_weight_dtype_and_adds_the_bias():
    rng = np.random.default_rng(1)
    w = random_bf16(rng, (8, 5))
    x = rng.normal(size=(2, 5)).astype(np.float32)
    b = rng.normal(size=8).astype(np.float32)
    expected = x.astype(np.float64) @ w.astype(np.float64).T + b  # [2, 8], independent of linear()
    np.testing.assert_allclose(linear(x, w, b), expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(linear(x, w.astype(np.float32), b), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", BF16_FIXTURES)
def test_bf16_resident_model_matches_the_reference_on_bf16_checkpoints(name):
    model = minqwen.load(FIXTURES / name, dtype="bfloat16")
    expected = load_file(str(FIXTURES / name / "expected.safetensors"))
    assert model.weights_dtype == ml_dtypes.bfloat16 and model.dtype == np.float32
    logits = model.forward(expected["token_ids"])
    np.testing.assert_allclose(logits, expected["logits"], rtol=0, atol=1e-4)
    assert greedy_continuation(model, expected["token_ids"], len(expected["greedy"])) == expected["greedy"].tolist()


def test_bf16_resident_weights_take_half_the_memory():
    def matrix_bytes(model):
        # the projection matrices; the small conv1d filter stays float32 in both modes
        total = model.embed_tokens.nbytes
        for layer in model.layers:
            for part in (layer.mlp, layer.linear_attn, layer.self_attn):
                if part is not None:
                    total += sum(v.nbytes for k, v in vars(part).items()
                                 if isinstance(v, np.ndarray) and v.ndim == 2 and k != "conv1d")
        return total

    # a dense fixture: MoE experts stay memory-mapped in their stored dtype in both modes
    name = next(n for n in BF16_FIXTURES if "num_experts" not in (FIXTURES / n / "config.json").read_text())
    assert matrix_bytes(minqwen.load(FIXTURES / name, dtype="bfloat16")) * 2 == matrix_bytes(minqwen.load(FIXTURES / name))


def test_an_unknown_load_dtype_is_a_clear_error():
    with pytest.raises(minqwen.MinqwenError, match="dtype must be"):
        minqwen.load(FIXTURES / FIXTURE_NAMES[0], dtype="int8")
