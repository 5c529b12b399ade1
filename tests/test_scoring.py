"""Scoring, threads and the Python generate API."""

import math

import numpy as np
import pytest
from safetensors.numpy import load_file

import minqwen
from conftest import FIXTURES
from minqwen import MinqwenError
from minqwen.scoring import log_softmax, score_text


def test_score_is_the_log_softmax_of_the_reference_logits():
    folder = FIXTURES / "text_grouped_bf16_bias"
    expected = load_file(str(folder / "expected.safetensors"))
    ids = expected["token_ids"]
    logits = expected["logits"].astype(np.float64)  # [T, V], the reference's
    # log p = logit − log Σ exp(logits), written here independently of scoring.log_softmax
    reference = (logits - np.logaddexp.reduce(logits, axis=-1, keepdims=True))[np.arange(len(ids) - 1), ids[1:]]
    np.testing.assert_allclose(minqwen.load(folder).score(ids), reference, rtol=0, atol=1e-4)


def test_log_softmax_gives_log_probabilities_that_sum_to_one():
    logits = np.random.default_rng(3).normal(scale=30, size=(5, 1000))
    np.testing.assert_allclose(np.exp(log_softmax(logits)).sum(axis=-1), 1.0, rtol=1e-12)
    np.testing.assert_allclose(log_softmax(logits), logits - np.logaddexp.reduce(logits, axis=-1, keepdims=True),
                               rtol=0, atol=1e-10)


class CharTokenizer:
    """One token per byte (folded into the fixtures' small vocabulary): enough to test windowing."""

    def encode(self, text):
        return [b % 128 for b in text.encode("utf-8")]


def test_a_window_longer_than_the_models_context_is_an_error_naming_both():
    model = minqwen.load(FIXTURES / "text_tied_fp32")
    context = model.config.max_position_embeddings
    with pytest.raises(MinqwenError, match=rf"window {context + 1} is longer than the model's context of {context}"):
        score_text(model, CharTokenizer(), "abc", window=context + 1)


def test_windowed_scoring_scores_every_token_once_and_equals_one_window_when_it_fits():
    model = minqwen.load(FIXTURES / "text_tied_fp32")
    text = "abcdefghij" * 6  # 60 tokens
    whole = score_text(model, CharTokenizer(), text, window=60)
    direct = -model.score(np.array(list(text.encode()))).astype(np.float64).sum()
    assert whole.tokens_scored == 59
    assert whole.nll_nats == pytest.approx(direct, rel=1e-6)
    windowed = score_text(model, CharTokenizer(), text, window=16, stride=8)
    assert windowed.tokens_scored == 59
    assert math.isfinite(windowed.perplexity) and windowed.bits_per_byte > 0
    # with less context per token, the total can differ; with stride 1 and a full window it cannot
    same = score_text(model, CharTokenizer(), text, window=60, stride=1)
    assert same.nll_nats == pytest.approx(direct, rel=1e-6)


def test_bits_per_byte_counts_utf8_bytes():
    model = minqwen.load(FIXTURES / "text_tied_fp32")
    result = score_text(model, CharTokenizer(), "héllo wörld")
    assert result.n_bytes == len("héllo wörld".encode()) == 13
    assert result.bits_per_byte == pytest.approx(result.nll_nats / math.log(2) / 13)


@pytest.mark.parametrize("bad", [dict(window=1), dict(window=10, stride=11), dict(window=10, stride=10),
                                 dict(window=10, stride=0), dict(window=2.5), dict(window=10, stride="3")], ids=str)
def test_bad_windows_are_clear_errors(bad):
    model = minqwen.load(FIXTURES / "text_tied_fp32")
    with pytest.raises(MinqwenError, match="window|stride"):
        score_text(model, CharTokenizer(), "abcdefghijkl", **bad)


def test_stride_equal_to_window_is_refused_as_windows_must_overlap():
    # With stride = window the windows would not overlap: each one's first token would have no
    # context, go unscored, and still count in the perplexity's average.
    model = minqwen.load(FIXTURES / "text_tied_fp32")
    with pytest.raises(MinqwenError, match="stride from 1 to window − 1, got window 4, stride 4: windows must"):
        score_text(model, CharTokenizer(), "abcdefghijklmn", window=4, stride=4)


@pytest.mark.parametrize("length", [14, 15, 16, 60])
def test_at_the_largest_stride_every_token_is_scored_once_with_context(length):
    # stride = window − 1: window k spans ids[3k : 3k + 4] and scores all but its first token, which
    # the window before scored; so the total is the sum of each window's own scores.
    model = minqwen.load(FIXTURES / "text_tied_fp32")
    text = ("abcdefghij" * 6)[:length]
    ids = np.array(CharTokenizer().encode(text))
    windows = [ids[start : start + 4] for start in range(0, length - 1, 3)]
    assert sum(len(w) - 1 for w in windows) == length - 1
    expected = -sum(float(model.score(w).astype(np.float64).sum()) for w in windows)

    result = score_text(model, CharTokenizer(), text, window=4, stride=3)
    assert result.tokens_scored == length - 1
    assert result.nll_nats == pytest.approx(expected, rel=1e-6)
    assert result.perplexity == pytest.approx(math.exp(expected / (length - 1)), rel=1e-6)


def nan_model():
    """The fixture model with one NaN element in layer 0's input_layernorm weight, in memory."""
    model = minqwen.load(FIXTURES / "text_tied_fp32")
    weight = model.layers[0].input_layernorm.copy()  # a copy: never write into arrays a loader may share
    weight[0] = np.nan
    model.layers[0].input_layernorm = weight
    return model


def test_scoring_a_model_that_computes_nan_is_an_error_not_a_perplexity_of_nan():
    model = nan_model()
    with pytest.raises(MinqwenError, match="the model computed NaN or infinite logits while scoring"):
        model.score([1, 2, 3])
    with pytest.raises(MinqwenError, match="NaN weight"):
        score_text(model, CharTokenizer(), "abcdefghij", window=4, stride=2)


def test_scoring_needs_two_tokens():
    with pytest.raises(MinqwenError, match="at least two"):
        minqwen.load(FIXTURES / "text_tied_fp32").score([5])


def test_set_threads_sets_blas_and_numba():
    import numba

    from minqwen.threads import threads_in_use

    try:
        minqwen.set_threads(1)
        in_use = threads_in_use()
        assert in_use["numba"] == 1 and in_use["blas"] == [1]  # NumPy's BLAS is found, and set to one thread
        if numba.config.NUMBA_NUM_THREADS >= 2:
            minqwen.set_threads(2)
            in_use = threads_in_use()
            assert in_use["numba"] == 2 and in_use["blas"] == [2]
    finally:
        minqwen.set_threads(min(2, numba.config.NUMBA_NUM_THREADS))


def test_too_many_threads_is_a_clear_error():
    import numba

    with pytest.raises(MinqwenError, match="NUMBA_NUM_THREADS"):
        minqwen.set_threads(numba.config.NUMBA_NUM_THREADS + 1)
    for bad in (0, True, 1.0, "2"):  # True would have been one thread
        with pytest.raises(MinqwenError, match="positive whole number"):
            minqwen.set_threads(bad)
    assert minqwen.set_threads(np.int64(1)) == 1  # a NumPy integer is a whole number too
    minqwen.set_threads(min(2, numba.config.NUMBA_NUM_THREADS))


def test_serial_and_parallel_builds_of_a_kernel_keep_separate_numba_caches():
    # Numba files cached code by function name and bytecode, not by options: builds sharing a
    # name would load each other's code (a "parallel" kernel then runs on one thread).
    import minqwen

    # every kernel serial_and_parallel built, found by the launcher it hands back
    launchers = {id(value): value for module in vars(minqwen).values() if type(module).__name__ == "module"
                 for value in vars(module).values() if hasattr(value, "parallel") and hasattr(value, "serial")}
    pairs = [(launch.serial, launch) for launch in launchers.values()]
    assert len(pairs) >= 16  # activations 3, attention 1, bf16_dot 4, deltanet 2, linear 2, moe 1, norms 3
    names = set()
    for serial, launch in pairs:
        parallel = launch.parallel  # the build behind threads.launched_safely's function
        assert launch.serial is serial
        assert not serial.targetoptions.get("parallel") and parallel.targetoptions.get("parallel")
        assert serial.py_func.__code__ is parallel.py_func.__code__  # one body, as the twin tests assume
        names |= {serial._cache._cache_file._index_name, parallel._cache._cache_file._index_name}
    assert len(names) == 2 * len(pairs)


TINY_TEXT = minqwen.load(FIXTURES / "text_tied_fp32")  # vocab 160, context 512


@pytest.mark.parametrize("window, stride", [(8, 2), (8, 3), (8, 5), (6, 1), (7, 6)])
def test_each_token_is_scored_once_by_the_first_window_that_holds_it_with_context(window, stride):
    text = "the quick brown fox jumps over the lazy dog"  # 43 tokens
    ids = np.array(CharTokenizer().encode(text))
    starts = [0]
    while starts[-1] + window < len(ids):
        starts.append(starts[-1] + stride)
    expected = 0.0
    for t in range(1, len(ids)):  # token t: scored in the first window whose end is past it
        start = next(s for s in starts if s + window > t)
        assert start < t
        expected -= float(TINY_TEXT.score(ids[start: t + 1])[-1])
    result = score_text(TINY_TEXT, CharTokenizer(), text, window=window, stride=stride)
    assert result.tokens_scored == len(ids) - 1
    assert result.nll_nats == pytest.approx(expected, rel=1e-5)


def test_progress_is_told_how_many_tokens_each_window_has_reached_out_of_all():
    # The CLI's bar shows done/total: after each window, the tokens it reaches; the last call says
    # all of them. Windows of 8 every 3 over 43 tokens end at 8, 11, …, 41, then 43 (by hand).
    text = "the quick brown fox jumps over the lazy dog"  # 43 tokens
    calls = []
    score_text(TINY_TEXT, CharTokenizer(), text, window=8, stride=3, progress=lambda done, total: calls.append((done, total)))
    assert calls == [(end, 43) for end in range(8, 43, 3)] + [(43, 43)]


def test_the_default_stride_is_half_the_window_and_the_default_window_the_context():
    text = "the quick brown fox jumps over the lazy dog"
    for window in (8, 9):
        assert score_text(TINY_TEXT, CharTokenizer(), text, window=window).nll_nats == \
            score_text(TINY_TEXT, CharTokenizer(), text, window=window, stride=window // 2).nll_nats
    long_text = ("abcdefghij" * 60)[:520]  # longer than the context of 512
    context = TINY_TEXT.config.max_position_embeddings
    assert score_text(TINY_TEXT, CharTokenizer(), long_text).nll_nats == \
        score_text(TINY_TEXT, CharTokenizer(), long_text, window=context, stride=context // 2).nll_nats


@pytest.mark.parametrize("dtype, scale", [(np.float32, 100.0), (np.float64, 800.0)])
def test_log_softmax_of_large_logits_is_finite_and_exact(dtype, scale):
    logits = (scale * np.random.default_rng(2).normal(size=(3, 50))).astype(dtype)
    expected = logits.astype(np.float64) - np.logaddexp.reduce(logits.astype(np.float64), axis=-1, keepdims=True)
    got = log_softmax(logits)
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-3)


def test_scores_computed_a_block_of_logits_at_a_time_are_those_of_the_whole_window(monkeypatch):
    # The [T, V] logits of a long window at a real vocabulary (~1 MB a token, three times over
    # while log_softmax ran) are made a block of rows at a time; blocks of 5 rows here.
    from minqwen import scoring

    model = minqwen.load(minqwen.checkpoint.EMBEDDED)
    ids = np.random.default_rng(0).integers(0, model.config.vocab_size, 23)
    whole = log_softmax(model.forward(ids))[np.arange(22), ids[1:]]
    assert scoring.SCORE_BLOCK_BYTES >= 23 * model.config.vocab_size * 4  # one block, as before
    np.testing.assert_array_equal(model.score(ids), whole)
    widths = []
    logits = model.logits
    monkeypatch.setattr(model, "logits", lambda hidden: (widths.append(hidden.shape[0]), logits(hidden))[1])
    monkeypatch.setattr(scoring, "SCORE_BLOCK_BYTES", 5 * model.config.vocab_size * 4)
    np.testing.assert_allclose(model.score(ids), whole, rtol=1e-6, atol=0)  # float32 round-off of other products
    assert widths == [5, 5, 5, 5, 2]
