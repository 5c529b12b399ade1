"""Golden tests: minqwen reproduces what transformers 5.23.0 (fp32, eager) computed for each fixture.

The fixtures (tests/fixtures/, built by tools/make_fixtures.py) cover both key layouts, tied
and untied heads, fp32 and bf16 storage, a sharded checkpoint, grouped value heads, several
conv kernels, head dims and rotary fractions, attention biases, and a config that derives its
layer types from full_attention_interval; and mixture-of-experts models (``moe_*``) with 3 to
16 experts, top-1 to top-k = all, experts stored per expert and fused, text-only and
multimodal.
"""

import numpy as np
import pytest
from safetensors.numpy import load_file

import minqwen
from conftest import FIXTURE_NAMES, FIXTURES, ROOT, greedy_continuation

ATOL = 1e-4


@pytest.fixture(scope="module", params=FIXTURE_NAMES)
def fixture(request):
    folder = FIXTURES / request.param
    return minqwen.load(folder), load_file(str(folder / "expected.safetensors"))


def test_there_are_fixtures():
    assert len(FIXTURE_NAMES) >= 4


def test_every_tensor_of_every_reference_checkpoint_is_random():
    # A norm weight of zeros, an A_log of ones, a bias of zeros: the defaults hide exactly the
    # bugs these fixtures exist to catch (a missing "1 +", a sign, a forgotten bias).
    from safetensors import safe_open

    checked = 0
    for folder in (FIXTURES, ROOT / "tests" / "fixtures_vision"):
        for path in sorted(folder.rglob("*.safetensors")):
            if path.name == "expected.safetensors":  # the reference's outputs, not weights
                continue
            with safe_open(str(path), "np") as f:
                for name in f.keys():
                    tensor = np.asarray(f.get_tensor(name), np.float64)
                    values = np.unique(tensor)
                    # one number (a scale, a one-element gate) may be anything but 0 or 1
                    random = values.size > 1 if tensor.size > 1 else values[0] not in (0.0, 1.0)
                    assert random, f"{path.relative_to(ROOT)}: {name} holds the single value {values[0]}"
                    checked += 1
    assert checked > 500


def test_logits_and_every_layer_output_match_the_reference(fixture):
    model, expected = fixture
    taps = {}
    logits = model.forward(expected["token_ids"], tap=lambda name, x: taps.__setitem__(name, x.copy()))
    assert logits.shape == expected["logits"].shape and logits.dtype == np.float32
    np.testing.assert_allclose(logits, expected["logits"], rtol=0, atol=ATOL)
    for i in range(len(model.layers)):
        np.testing.assert_allclose(taps[f"layers.{i}.output"], expected[f"hidden.{i}"], rtol=0, atol=ATOL,
                                   err_msg=f"layer {i}")
    np.testing.assert_allclose(taps["norm"], expected["norm"], rtol=0, atol=ATOL)


@pytest.mark.parametrize("name", [n for n in FIXTURE_NAMES if n.startswith("moe_")])
def test_moe_routers_choose_the_experts_the_reference_chose(name):
    model = minqwen.load(FIXTURES / name)
    expected = load_file(str(FIXTURES / name / "expected.safetensors"))
    assert model.config.is_moe
    taps = {}
    model.forward(expected["token_ids"], tap=lambda tap_name, x: taps.__setitem__(tap_name, x.copy()))
    for i in range(len(model.layers)):
        np.testing.assert_allclose(taps[f"layers.{i}.mlp.router_logits"], expected[f"router_logits.{i}"], rtol=0,
                                   atol=ATOL, err_msg=f"layer {i}")
        assert (taps[f"layers.{i}.mlp.experts_chosen"] == expected[f"experts_chosen.{i}"]).all(), f"layer {i}"


def test_decode_state_after_the_prompt_matches_the_reference(fixture):
    model, expected = fixture
    cache = model.new_cache()
    model.forward(expected["token_ids"], cache)
    for i, state in enumerate(cache.layers):
        if model.layers[i].layer_type == "linear_attention":
            np.testing.assert_allclose(state.conv, expected[f"state.{i}.conv"], rtol=0, atol=ATOL)
            np.testing.assert_allclose(state.recurrent, expected[f"state.{i}.recurrent"], rtol=0, atol=ATOL)
        else:
            np.testing.assert_allclose(state.keys[:, : state.length], expected[f"state.{i}.keys"], rtol=0, atol=ATOL)
            np.testing.assert_allclose(state.values[:, : state.length], expected[f"state.{i}.values"], rtol=0, atol=ATOL)


def test_greedy_continuation_is_token_for_token_the_reference(fixture):
    model, expected = fixture
    generated = greedy_continuation(model, expected["token_ids"], len(expected["greedy"]))
    assert len(generated) >= 32
    assert generated == expected["greedy"].tolist()


def test_with_numbas_pool_doing_the_products_the_greedy_continuation_is_still_the_reference(fixture, monkeypatch):
    # Fixtures are small, so their decode steps run the few-row kernel's serial build with BLAS
    # left alone; a real-size model's run with BLAS on one thread and Numba's pool awake (big
    # matrices in the parallel build). Pretend this one is real-size.
    from minqwen import linear, threads

    model, expected = fixture
    monkeypatch.setattr(linear, "SMALL_MODEL_BYTES", 0)
    rows = []
    kernel = linear.linear_few_rows
    monkeypatch.setattr(linear, "linear_few_rows",
                        lambda x, w: (rows.append((len(x), threads.numba_does_the_products())), kernel(x, w))[1])
    generated = greedy_continuation(model, expected["token_ids"], len(expected["greedy"]))
    assert (1, True) in rows  # the decode steps' products went to the kernel, the pool's to do
    assert generated == expected["greedy"].tolist()


def test_a_nan_an_infinity_or_a_wrong_shape_misses_the_live_tolerance_and_fails_the_judge():
    # The live reference lanes (text, MoE, MTP, vision, YaRN) passed minqwen outputs that were all NaN:
    # abs(g - e).max() > atol is False for NaN, so the float64 judge was never asked.
    from conftest import LIVE_ATOL, assert_agree_in_float64, misses_live_atol

    e = np.zeros((2, 3), np.float32)
    assert not misses_live_atol([e + LIVE_ATOL / 2], [e])
    assert misses_live_atol([e + 2 * LIVE_ATOL], [e])
    for bad in (np.full((2, 3), np.nan, np.float32), np.full((2, 3), np.inf, np.float32), np.zeros((1, 3), np.float32)):
        assert misses_live_atol([bad], [e])
    nan = np.full((2, 3), np.nan)
    with pytest.raises(AssertionError, match="NaN or infinite"):
        assert_agree_in_float64([nan.astype(np.float32)], [e], [nan], [nan], "a NaN draw")


def test_the_float64_judge_passes_float32_near_the_exact_values_when_the_references_float32_jumped():
    # At a router near-tie (top-k probabilities 1e-8 apart) transformers' float32 picked the other
    # expert than its own float64 and a logit moved by 1.1, while minqwen's float32 stayed 4e-4
    # from the exact values: a correct port, failed by the float32 comparison alone.
    from conftest import FLOAT32_SANITY, assert_agree_in_float64

    exact = np.linspace(-3, 3, 6).reshape(2, 3)
    jumped = (exact + np.array([[0, 1.1, 0], [0, 0, 0]])).astype(np.float32)
    near = (exact + 4e-4).astype(np.float32)
    assert_agree_in_float64([near], [jumped], [exact], [exact], "a near-tie draw")
    assert_agree_in_float64([jumped], [jumped], [exact], [exact], "both float32 runs on the other expert")
    for far in (exact + 3 * FLOAT32_SANITY, exact + 1.1 * (exact > 0)):  # far from both
        with pytest.raises(AssertionError, match="float32, step 0"):
            assert_agree_in_float64([far.astype(np.float32)], [jumped], [exact], [exact], "a real float32 error")
