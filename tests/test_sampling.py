"""Sampling semantics: penalties, temperature, top-k, top-p, min-p, in transformers' order."""

import json
import re
import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from conftest import FALSE_ALARM_Z, chi_square_critical, require_reference, softmax64
from minqwen import MinqwenError
from minqwen.checkpoint import EMBEDDED
from minqwen.sampling import SamplingParams, apply_penalties, filter_logits, sample_next


def test_greedy_is_the_argmax_after_penalties():
    logits = np.array([1.0, 3.0, 2.9, -1.0], np.float32)
    assert sample_next(logits, SamplingParams(), np.random.default_rng(0)) == 1
    # id 1 was seen: 3.0 / 1.2 = 2.5 < 2.9
    assert sample_next(logits, SamplingParams(repetition_penalty=1.2), np.random.default_rng(0), seen_ids=[1]) == 2


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits_of_seen_ids():
    logits = np.array([2.0, -2.0, 1.0], np.float32)
    out = apply_penalties(logits, seen_ids=[0, 1, 1], generated_ids=[], params=SamplingParams(repetition_penalty=2.0))
    np.testing.assert_allclose(out, [1.0, -4.0, 1.0])


def test_presence_penalty_subtracts_once_per_generated_id_and_ignores_the_prompt():
    logits = np.array([2.0, 2.0, 2.0], np.float32)
    out = apply_penalties(logits, seen_ids=[0, 1, 1, 1], generated_ids=[1, 1, 1],
                          params=SamplingParams(presence_penalty=0.5))
    np.testing.assert_allclose(out, [2.0, 1.5, 2.0])


def test_top_k_keeps_the_k_most_likely():
    logits = np.array([0.0, 5.0, 3.0, 4.0, 1.0], np.float32)
    kept = np.isfinite(filter_logits(logits, SamplingParams(temperature=1.0, top_k=2)))
    assert kept.tolist() == [False, True, False, True, False]


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = np.array([0.5, 0.3, 0.15, 0.05])
    logits = np.log(probs).astype(np.float32)
    kept = np.isfinite(filter_logits(logits, SamplingParams(temperature=1.0, top_p=0.8)))
    assert kept.tolist() == [True, True, False, False]
    kept = np.isfinite(filter_logits(logits, SamplingParams(temperature=1.0, top_p=0.81)))
    assert kept.tolist() == [True, True, True, False]


def test_min_p_drops_ids_below_a_fraction_of_the_top_probability():
    probs = np.array([0.5, 0.3, 0.15, 0.05])
    logits = np.log(probs).astype(np.float32)
    kept = np.isfinite(filter_logits(logits, SamplingParams(temperature=1.0, min_p=0.25)))
    assert kept.tolist() == [True, True, True, False]


def test_temperature_comes_before_top_p():
    # At temperature 0.5 the top id alone has > 90 % of the mass, so top-p 0.9 keeps only it.
    logits = np.log(np.array([0.6, 0.2, 0.2])).astype(np.float32)
    assert np.isfinite(filter_logits(logits, SamplingParams(temperature=1.0, top_p=0.9))).sum() == 3
    assert np.isfinite(filter_logits(logits, SamplingParams(temperature=0.3, top_p=0.9))).sum() == 1


def test_a_seed_makes_sampling_reproducible():
    logits = np.random.default_rng(0).normal(size=50).astype(np.float32)
    params = SamplingParams(temperature=1.0)
    draws = [[sample_next(logits, params, np.random.default_rng(7)) for _ in range(5)] for _ in range(2)]
    assert draws[0] == draws[1]
    other = [sample_next(logits, params, np.random.default_rng(8)) for _ in range(5)]
    assert len(set(draws[0] + other)) > 1  # and it samples: not the argmax every time


LOGITS = np.array([2.0, 1.5, 0.2, -0.4, -1.0, 0.9], np.float32)
# (params, seen ids, the distribution sample_next must draw from, written out by hand)
SAMPLED_CASES = [
    (SamplingParams(temperature=0.7), [], softmax64(LOGITS / 0.7)),
    # top-k 3 keeps ids 0, 1 and 5 (logits 2.0, 1.5, 0.9)
    (SamplingParams(temperature=1.0, top_k=3), [], softmax64(np.where(np.isin(np.arange(6), [0, 1, 5]), LOGITS, -np.inf))),
    # repetition penalty 2 on seen ids 0 (2.0 → 1.0) and 4 (−1.0 → −2.0)
    (SamplingParams(temperature=1.0, repetition_penalty=2.0), [0, 4],
     softmax64(np.array([1.0, 1.5, 0.2, -0.4, -2.0, 0.9]))),
]


@pytest.mark.parametrize("params, seen, expected", SAMPLED_CASES, ids=["temperature", "top_k", "repetition"])
def test_draws_follow_the_distribution_the_options_define(params, seen, expected):
    draws = 6000
    rng = np.random.default_rng(11)
    counts = np.bincount([sample_next(LOGITS, params, rng, seen) for _ in range(draws)], minlength=6)
    assert counts[expected == 0].sum() == 0  # a filtered id is never drawn
    kept = expected > 0
    wanted = draws * expected[kept]
    statistic = float(((counts[kept] - wanted) ** 2 / wanted).sum())
    assert statistic < chi_square_critical(int(kept.sum()) - 1, FALSE_ALARM_Z), (statistic, counts)


@settings(max_examples=100, deadline=None)
@given(logits=arrays(np.float32, st.integers(2, 60), elements=st.floats(-20, 20, width=32)),
       temperature=st.floats(0.1, 2.0), top_k=st.integers(0, 70), top_p=st.floats(0.05, 1.0),
       min_p=st.floats(0.0, 0.9), seed=st.integers(0, 1000))
def test_filters_never_remove_every_most_likely_id_and_draws_stay_in_the_kept_set(
        logits, temperature, top_k, top_p, min_p, seed):
    # (of several tied for the top, top-p may cut some: the lower ids, as transformers)
    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)
    kept = np.isfinite(filter_logits(logits, params))
    assert kept[logits == logits.max()].any()
    assert kept[sample_next(logits, params, np.random.default_rng(seed))]


@pytest.mark.parametrize("bad", [dict(temperature=-1), dict(top_p=0), dict(top_p=1.5), dict(min_p=2),
                                 dict(top_k=-1), dict(top_k=2.5), dict(repetition_penalty=0)])
def test_bad_sampling_parameters_are_clear_errors(bad):
    (name,) = bad
    with pytest.raises(MinqwenError, match=name):
        SamplingParams(**bad)


@pytest.mark.parametrize("name", ["temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), "0.5", None, True], ids=repr)
def test_a_sampling_number_that_is_not_a_finite_number_is_an_error_naming_it(name, value):
    with pytest.raises(MinqwenError, match=rf"^{name} must be a finite number"):
        SamplingParams(**{name: value})


def test_numpy_numbers_are_accepted_as_sampling_parameters():
    params = SamplingParams(temperature=np.float32(0.7), top_k=np.int64(20), top_p=np.float64(0.9))
    assert params.top_k == 20 and not params.greedy


@pytest.mark.parametrize("config, named", [
    (dict(top_p=1.5), "top_p must be in"), (dict(temperature="hot"), "temperature must be a finite number"),
    (dict(do_sample="false"), "do_sample must be true or false")], ids=str)
def test_bad_values_in_generation_config_are_errors_naming_the_file(config, named):
    with pytest.raises(MinqwenError, match=rf"^ckpt/generation_config.json: {named}"):
        SamplingParams.from_generation_config(config, "ckpt/generation_config.json")


def test_an_override_is_not_blamed_on_the_generation_config():
    with pytest.raises(MinqwenError, match=r"^top_p must be in"):
        SamplingParams.from_generation_config({"top_p": 0.9}, "ckpt/generation_config.json", top_p=1.5)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_logits_are_an_error_not_a_quiet_token_zero(bad):
    logits = np.zeros(8, np.float32)
    logits[3] = bad
    for params in (SamplingParams(), SamplingParams(temperature=1.0)):
        with pytest.raises(MinqwenError, match="NaN or infinite logits"):
            sample_next(logits, params, np.random.default_rng(0))


@pytest.mark.reference
@settings(max_examples=60, deadline=None)
@given(logits=arrays(np.float32, st.integers(2, 40), elements=st.floats(-10, 10, width=32), unique=True),
       temperature=st.floats(0.2, 2.0), top_k=st.integers(0, 40), top_p=st.floats(0.05, 1.0),
       min_p=st.floats(0.0, 0.9), penalty=st.floats(0.5, 2.0), seen=st.lists(st.integers(0, 1), max_size=3))
def test_penalties_and_filters_match_transformers_logits_processors(logits, temperature, top_k, top_p, min_p,
                                                                    penalty, seen):
    require_reference()
    import torch
    from transformers.generation.logits_process import (
        MinPLogitsWarper,
        RepetitionPenaltyLogitsProcessor,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                            repetition_penalty=penalty)
    ours = filter_logits(apply_penalties(logits, seen, [], params), params)

    ids = torch.tensor([seen or [0]])[:, : max(1, len(seen))]
    scores = torch.tensor(logits)[None]
    if seen:
        scores = RepetitionPenaltyLogitsProcessor(penalty)(ids, scores)
    scores = TemperatureLogitsWarper(temperature)(ids, scores)
    if top_k:
        scores = TopKLogitsWarper(top_k)(ids, scores)
    if top_p < 1.0:
        scores = TopPLogitsWarper(top_p)(ids, scores)
    if min_p > 0.0:
        scores = MinPLogitsWarper(min_p)(ids, scores)
    theirs = scores[0].numpy()
    assert (np.isfinite(ours) == np.isfinite(theirs)).all()
    np.testing.assert_allclose(ours[np.isfinite(ours)], theirs[np.isfinite(theirs)], rtol=1e-5)


@pytest.mark.reference
@settings(max_examples=200, deadline=None)
@given(logits=arrays(np.float32, st.integers(2, 16), elements=st.sampled_from([0.0, 1.0, 2.5])),
       top_p=st.floats(0.05, 0.99))
def test_top_p_cuts_tied_logits_where_transformers_does(logits, top_p):
    # Equal logits at the cut: which of them survive is the one choice top-p leaves open, and
    # transformers' ascending sort (stable at these sizes) cuts the lower ids first. It kept
    # {0, 1} of [0, 0, 0, 0] at p 0.5 here, {2, 3} there.
    require_reference()
    import torch
    from transformers.generation.logits_process import TopPLogitsWarper

    ours = filter_logits(logits, SamplingParams(temperature=1.0, top_p=top_p))
    theirs = TopPLogitsWarper(top_p)(None, torch.tensor(logits)[None])[0].numpy()
    assert np.flatnonzero(np.isfinite(ours)).tolist() == np.flatnonzero(np.isfinite(theirs)).tolist()


def test_do_sample_is_refused_with_what_minqwen_does_instead():
    with pytest.raises(MinqwenError, match=r"^unknown sampling option\(s\): do_sample; minqwen has no do_sample: "
                                           r"a temperature above 0 samples, temperature 0 is greedy$"):
        SamplingParams.from_generation_config({}, do_sample=True)


@pytest.mark.parametrize("do_sample, options, unused", [
    (True, dict(top_k=5, temperature=0), ["top_k"]), (False, dict(top_p=0.9, min_p=0.1), ["top_p", "min_p"]),
    (False, dict(top_k=5, temperature=0.7), []), (True, dict(top_k=5), []), (False, dict(top_k=None), []),
    (False, dict(repetition_penalty=1.2), []),
])
def test_generate_warns_of_filters_given_while_decoding_is_greedy(tmp_path, do_sample, options, unused):
    # Greedy: temperature 0, or a generation_config.json without do_sample and no temperature
    # given. The command line warns the same (tests/test_cli.py).
    import shutil

    import minqwen

    shutil.copytree(EMBEDDED, tmp_path, dirs_exist_ok=True)
    config = json.loads((tmp_path / "generation_config.json").read_text())
    (tmp_path / "generation_config.json").write_text(json.dumps({**config, "do_sample": do_sample}))
    model, tokenizer = minqwen.load(tmp_path), minqwen.Tokenizer(tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        minqwen.generate(model, tokenizer, "def f", max_new_tokens=2, seed=0, **options)
    messages = [str(w.message) for w in caught if "nothing while decoding is greedy" in str(w.message)]
    if unused:
        verb = "changes" if len(unused) == 1 else "change"
        assert messages == [f"{', '.join(unused)} {verb} nothing while decoding is greedy (temperature 0, or a "
                            f"generation_config.json without \"do_sample\": true and no temperature given): give a "
                            f"temperature above 0 to sample"]
    else:
        assert messages == []


# ---------------------------------------------------------------- values too extreme to compute with

# Each passes SamplingParams' checks but takes a logit past float32's range: the error must name it.
# Every id was seen and generated; in the −|LOGITS| − 1 cases, every logit is negative.
OVERFLOWING = [
    (dict(temperature=1e-40), LOGITS, "temperature 1e-40 is too small"),
    (dict(temperature=5e-324), LOGITS, "temperature 4.94066e-324 is too small"),  # 0 as a float32
    (dict(temperature=1e-39), -np.abs(LOGITS) - 1, "temperature 1e-39 is too small"),  # every logit to −inf
    (dict(temperature=1.0, repetition_penalty=2e-38), 100 * LOGITS, "repetition_penalty 2e-38 pushed"),
    (dict(temperature=1.0, repetition_penalty=3e38), -np.abs(LOGITS) - 1, "repetition_penalty 3e[+]38 pushed"),
]


@pytest.mark.parametrize("options, logits, message", OVERFLOWING,
                         ids=lambda v: str(v) if isinstance(v, dict) else "")
def test_options_that_overflow_the_logits_are_an_error_naming_the_option_without_numpy_warnings(
        options, logits, message):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "overflow encountered" from NumPy either: the error says it
        with pytest.raises(MinqwenError, match=message):
            sample_next(logits.astype(np.float32), SamplingParams(**options), np.random.default_rng(0),
                        seen_ids=range(logits.size), generated_ids=range(logits.size))


def test_a_number_too_large_for_a_float_is_an_error_not_an_overflow():
    shortened = r"^temperature must be a finite number, got 100000000000… [(]401 characters"  # not 401 digits
    with pytest.raises(MinqwenError, match=shortened):
        SamplingParams(temperature=10**400)


def test_greedy_still_takes_the_argmax_when_a_penalty_overflows():
    rng = np.random.default_rng(0)
    # id 1 (logit 1.5) was seen: ÷ 2e-38 makes it 7.5e37, above id 0's 2.0
    assert sample_next(LOGITS, SamplingParams(repetition_penalty=2e-38), rng, seen_ids=[1]) == 1
    assert sample_next(LOGITS, SamplingParams(presence_penalty=-3e38), rng, generated_ids=[4]) == 4
    assert sample_next(LOGITS, SamplingParams(presence_penalty=3e38), rng, generated_ids=[0]) == 1


@pytest.mark.parametrize("options", [dict(repetition_penalty=1e-300), dict(repetition_penalty=1e39),
                                     dict(presence_penalty=-1e300), dict(presence_penalty=1e39)],
                         ids=lambda v: str(v))
def test_a_penalty_beyond_float32_is_refused_where_it_is_given(options):
    # The logits are float32, as in the reference: a penalty float32 cannot hold would turn
    # logits into NaN (0 × inf, inf − inf) and the model would be blamed.
    with pytest.raises(MinqwenError, match=f"^{next(iter(options))} must fit in float32") as refused:
        SamplingParams(**options)
    # only the penalty that divides has a smallest value to tell
    assert ("at least 1e-45" in str(refused.value)) == ("repetition_penalty" in options)


def test_a_tiny_temperature_that_stays_in_range_samples_the_argmax():
    draws = {sample_next(LOGITS, SamplingParams(temperature=1e-30), np.random.default_rng(s)) for s in range(20)}
    assert draws == {0}


@settings(max_examples=300, deadline=None)
@given(logits=arrays(np.float32, st.integers(2, 30),
                     elements=st.floats(width=32, allow_nan=False, allow_infinity=False)),
       temperature=st.floats(0, 1e308), repetition_penalty=st.floats(1e-45, 3.4e38),
       presence_penalty=st.floats(-3.4e38, 3.4e38), seen=st.lists(st.integers(0, 1), max_size=3),
       seed=st.integers(0, 100))
def test_any_finite_options_give_a_token_or_an_error_naming_an_option(
        logits, temperature, repetition_penalty, presence_penalty, seen, seed):
    params = SamplingParams(temperature=temperature, repetition_penalty=repetition_penalty,
                            presence_penalty=presence_penalty)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        try:
            token = sample_next(logits, params, np.random.default_rng(seed), seen, seen)
        except MinqwenError as e:
            assert not params.greedy  # greedy always has an argmax
            assert str(e).startswith(("temperature", "repetition_penalty", "presence_penalty")), str(e)
        else:
            assert 0 <= token < logits.size


# ---------------------------------------------------------------- generation_config.json


@pytest.mark.parametrize("config, named", [
    (dict(top_p=0), "top_p must be in [(]0, 1[]] [(]1 is off[)], got 0"),
    (dict(repetition_penalty=0), "repetition_penalty must be > 0 [(]1 is off[)], got 0"),
    (dict(repetition_penalty=0.0, top_p=0.9), "repetition_penalty must be > 0"),
    (dict(top_k=False), "top_k must be a whole number"),
    (dict(min_p=""), "min_p must be a finite number"),
], ids=str)
def test_a_zero_or_other_falsy_value_in_generation_config_is_checked_not_replaced_by_the_default(config, named):
    with pytest.raises(MinqwenError, match=rf"^ckpt/generation_config.json: {named}"):
        SamplingParams.from_generation_config(config, "ckpt/generation_config.json")


def test_generation_config_zeros_that_are_allowed_are_kept_and_null_means_off():
    params = SamplingParams.from_generation_config(
        {"top_k": 0, "min_p": 0, "presence_penalty": 0, "top_p": None, "repetition_penalty": None}, "g.json")
    assert params == SamplingParams()
    assert SamplingParams.from_generation_config({"temperature": 0.5, "min_p": 0.0}, "g.json").min_p == 0.0
    # a null temperature reads as an absent one: transformers' generate() default, 1
    sampled = SamplingParams.from_generation_config({"do_sample": True, "temperature": None, "top_k": 20}, "g.json")
    assert sampled.temperature == 1.0 and sampled.top_k == 20


@pytest.mark.parametrize("do_sample", ["absent", None, False])
def test_without_do_sample_true_the_generation_config_decodes_greedily_as_in_transformers(do_sample):
    config = {"temperature": 0.7, "top_k": 20, "top_p": 0.9}
    if do_sample != "absent":
        config["do_sample"] = do_sample
    assert SamplingParams.from_generation_config(config, "g.json").greedy
    assert not SamplingParams.from_generation_config({**config, "do_sample": True}, "g.json").greedy


def test_a_temperature_override_of_none_leaves_a_greedy_generation_config_greedy():
    # The CLI and stream() pass every option the user left unset as None. A file without
    # do_sample decodes greedily; a None override must keep that, not bring back the file's
    # sampling temperature (which transformers ignores there too). A real temperature still wins.
    config = {"do_sample": False, "temperature": 0.7, "top_k": 20}
    assert SamplingParams.from_generation_config(config, "g.json", temperature=None, top_k=None).greedy
    assert SamplingParams.from_generation_config(config, "g.json", temperature=0.5).temperature == 0.5


def test_generate_names_the_checkpoints_generation_config_when_its_top_p_is_0(tmp_path):
    import shutil

    import minqwen

    embedded = minqwen.checkpoint.EMBEDDED
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(embedded / name, tmp_path / name)
    config = json.loads((embedded / "generation_config.json").read_text())
    (tmp_path / "generation_config.json").write_text(json.dumps({**config, "do_sample": True, "top_p": 0}))
    named = re.escape(f"{tmp_path / 'generation_config.json'}: top_p must be in (0, 1] (1 is off), got 0")
    with pytest.raises(MinqwenError, match=f"^{named}$"):
        minqwen.generate(minqwen.load(embedded), minqwen.Tokenizer(tmp_path), "def f", max_new_tokens=2)


@pytest.mark.parametrize("top_p", [1e-30, 1e-12, 1e-9])
def test_a_tiny_top_p_keeps_the_most_likely_id_alone(top_p):
    # The smallest set of most likely ids reaching p is {argmax} whenever p ≤ p(argmax).
    for seed in range(20):
        logits = np.random.default_rng(seed).normal(scale=3, size=50).astype(np.float32)
        kept = np.isfinite(filter_logits(logits, SamplingParams(temperature=1.0, top_p=top_p)))
        assert np.flatnonzero(kept).tolist() == [int(np.argmax(logits))], seed
        assert sample_next(logits, SamplingParams(temperature=1.0, top_p=top_p),
                           np.random.default_rng(seed)) == int(np.argmax(logits))


@pytest.mark.parametrize("logits, min_p", [
    ([1.0, 3.0, 3.0, 0.0], 1.0),  # min_p 1 keeps exactly the ids tied with the top
    ([1.0, 3.0, 2.0, 0.0], 1.0),  # … which may be the argmax alone
    ([3.0, 3.0, 3.0], 1.0),
])
def test_min_p_keeps_ids_at_exactly_the_threshold(logits, min_p):
    # transformers' MinPLogitsWarper removes ids with p < min_p · p_max: an id at the threshold stays.
    logits = np.array(logits, np.float32)
    p = softmax64(logits)
    expected = p >= min_p * p.max()
    params = SamplingParams(temperature=1.0, min_p=min_p)
    kept = np.isfinite(filter_logits(logits, params))
    assert kept.tolist() == expected.tolist()
    assert expected[sample_next(logits, params, np.random.default_rng(0))]


def test_the_min_p_threshold_is_sharp():
    # For each id i with ratio r_i = p_i / p_max (float64), min_p just below r_i keeps i, just above drops it.
    rng = np.random.default_rng(5)
    for _ in range(10):
        logits = rng.normal(scale=2, size=12).astype(np.float32)
        ratio = softmax64(logits) / softmax64(logits).max()
        for i in np.flatnonzero(ratio < 1):
            for factor, keep in ((1 - 1e-5, True), (1 + 1e-5, False)):
                params = SamplingParams(temperature=1.0, min_p=float(ratio[i] * factor))
                assert bool(np.isfinite(filter_logits(logits, params))[i]) == keep, (i, ratio[i], factor)


@pytest.mark.parametrize("logits, top_k", [
    ([2.0, 1.0, 1.0, 0.0], 2),  # a tie at the k-th logit: transformers keeps every tied id
    ([0.5, 0.5, 0.5, 0.5, -1.0], 1),
    ([0.0, 5.0, 3.0, 4.0, 1.0], 4),  # k = V − 1 drops the least likely id
    ([0.0, 5.0, 3.0, 4.0, 1.0], 5),
    ([0.0, 5.0, 3.0, 4.0, 1.0], 9),
])
def test_top_k_keeps_every_id_at_least_as_likely_as_the_kth(logits, top_k):
    # transformers' TopKLogitsWarper: remove ids whose logit is < the k-th largest.
    logits = np.array(logits, np.float32)
    expected = logits >= np.sort(logits)[::-1][min(top_k, logits.size) - 1]
    kept = np.isfinite(filter_logits(logits, SamplingParams(temperature=1.0, top_k=top_k)))
    assert kept.tolist() == expected.tolist()


@pytest.mark.parametrize("config", [
    {"do_sample": True, "temperature": 0.7, "top_k": 20, "top_p": 0.9, "repetition_penalty": 1.05},
    {"do_sample": True, "temperature": 0.6, "top_p": 0.95, "min_p": 0.1},
    {"do_sample": True, "top_k": 20},  # no temperature: transformers samples at 1.0
    {"do_sample": True, "temperature": 0.7},  # no top_k: transformers uses 50
    {"temperature": 0.7, "top_k": 20, "repetition_penalty": 1.3},  # no do_sample: greedy, penalty kept
], ids=str)
def test_generation_config_reads_as_transformers_generate_does(config):
    """The sampling settings transformers 5.23.0's generate() would use for a checkpoint's
    generation_config.json (its own global defaults fill what the file leaves unset)."""
    require_reference()
    from transformers import GenerationConfig

    g = GenerationConfig.from_dict(dict(config))
    g.update(**GenerationConfig._get_default_generation_params(), defaults_only=True)
    ours = SamplingParams.from_generation_config(config, "g.json")
    assert ours.greedy == (not g.do_sample)
    if g.do_sample:
        assert ours.temperature == pytest.approx(g.temperature)
        assert ours.top_k == g.top_k
        assert ours.top_p == pytest.approx(g.top_p)
        assert ours.min_p == pytest.approx(g.min_p or 0.0)
    assert ours.repetition_penalty == pytest.approx(g.repetition_penalty)


def test_overrides_win_over_the_file_and_none_keeps_the_file():
    config = json.loads((EMBEDDED / "generation_config.json").read_text())
    fields = ["temperature", "top_k", "top_p", "repetition_penalty"]
    base = SamplingParams.from_generation_config(config, "g.json")
    for name in fields:
        assert getattr(base, name) == pytest.approx(config[name])
    changed = {"temperature": 0.3, "top_k": 3, "top_p": 0.5, "min_p": 0.2, "repetition_penalty": 1.5,
               "presence_penalty": 0.7}
    params = SamplingParams.from_generation_config(config, "g.json", **changed)
    for name, value in changed.items():
        assert getattr(params, name) == pytest.approx(value)
    assert SamplingParams.from_generation_config(config, "g.json", **{k: None for k in changed}) == base
    # each field is read from its own key, and only from it
    defaults = SamplingParams.from_generation_config({"do_sample": True}, "g.json")
    for name, value in changed.items():
        alone = SamplingParams.from_generation_config({"do_sample": True, name: value}, "g.json")
        for other in changed:
            expected = value if other == name else getattr(defaults, other)
            assert getattr(alone, other) == pytest.approx(expected), (name, other)


def _top_p_sorting_every_id(logits: np.ndarray, top_p: float) -> np.ndarray:
    """The top-p rule as written before it sorted only the ids still in play: all V ids sorted."""
    from minqwen.sampling import softmax

    order = np.argsort(logits, kind="stable")
    tail = np.cumsum(softmax(logits)[order])
    kept = logits.copy()
    kept[order[:-1][tail[:-1] <= 1 - top_p]] = -np.inf
    return kept


@settings(max_examples=300, deadline=None)
@given(logits=arrays(np.float32, st.integers(1, 80), elements=st.sampled_from([-np.inf, -3.0, -1.0, 0.0, 0.5, 2.0, 7.0])
                     | st.floats(-20, 20, width=32)),
       top_k=st.integers(0, 90), top_p=st.floats(0.01, 0.999))
def test_top_p_over_the_ids_still_in_play_is_bit_for_bit_top_p_over_every_id(logits, top_k, top_p):
    # Ties, and ids top-k (or the logits themselves) left at −inf, included.
    if not np.isfinite(logits.max()):
        logits[0] = 0.0
    params = SamplingParams(temperature=1.0, top_k=top_k, top_p=top_p)
    cut = filter_logits(logits, SamplingParams(temperature=1.0, top_k=top_k))  # top-k alone
    np.testing.assert_array_equal(filter_logits(logits, params), _top_p_sorting_every_id(cut, top_p))
