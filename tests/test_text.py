"""Text in, text out on the embedded model: tokenizer, streaming decode, chat template, generation, chat."""

import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import minqwen
from conftest import FIXTURES, Recorder, forced, penalized64, require_reference, set_model_type
from minqwen import MinqwenError
from minqwen.checkpoint import EMBEDDED
from minqwen.generate import ChatSession, GenerationStats, generate_ids, stream, stream_text
from minqwen.sampling import SamplingParams
from minqwen.tokenizer import QWEN_SPLIT_PATTERNS, StreamDecoder, Tokenizer

TOKENIZER = Tokenizer(EMBEDDED)
GREEDY = SamplingParams()  # the embedded model's generation_config.json samples
MODEL = minqwen.load(EMBEDDED)


@settings(max_examples=150, deadline=None)
@given(st.text(alphabet=st.characters(codec="utf-8"), max_size=40)
       | st.sampled_from(["héllo wörld", "日本語のテキスト", "emoji 🐍🎉👩‍👩‍👧", "e\u0301\u0302", "  \t\n  x"]))
def test_streaming_decode_never_splits_a_character_and_adds_up_to_the_whole(text):
    ids = TOKENIZER.encode(text)
    decoder = StreamDecoder(TOKENIZER)
    pieces = [decoder.push(i) for i in ids] + [decoder.flush()]
    whole = TOKENIZER.decode(ids)
    assert "".join(pieces) == whole
    if "\ufffd" not in whole:
        assert all("\ufffd" not in p for p in pieces)


@settings(max_examples=150, deadline=None)
@given(ids=st.lists(st.integers(0, 4086), max_size=40))
def test_streaming_any_ids_adds_up_to_their_decoding(ids):
    # Random byte-level tokens: half characters, stray continuation bytes, runs of U+FFFD.
    decoder = StreamDecoder(TOKENIZER)
    assert "".join([decoder.push(i) for i in ids] + [decoder.flush()]) == TOKENIZER.decode(ids)


@pytest.mark.parametrize("text", ["x" + "\ufffd" * 3 + "y", "a" + " \ufffd" * 9 + "日", "\ufffd" * 12])
def test_a_run_of_replacement_characters_streams_as_it_decodes(text):
    # Held at most 8 tokens, a run of U+FFFD the text really holds released a character's first
    # bytes alone: the pieces joined to one U+FFFD too many ("x����y" for "x���y").
    ids = TOKENIZER.encode(text)
    decoder = StreamDecoder(TOKENIZER)
    pieces = [decoder.push(i) for i in ids] + [decoder.flush()]
    assert "".join(pieces) == TOKENIZER.decode(ids) == text


def test_special_token_strings_encode_to_their_ids():
    ids = TOKENIZER.encode("<|im_start|>user\nhi<|im_end|>")
    assert ids[0] == TOKENIZER.token_to_id("<|im_start|>")
    assert ids[-1] == TOKENIZER.token_to_id("<|im_end|>")


def test_eos_ids_come_from_the_checkpoint(tmp_path):
    import json
    import shutil

    # generation_config.json's eos_token_id list, then tokenizer_config.json's eos_token
    generation = json.loads((EMBEDDED / "generation_config.json").read_text())["eos_token_id"]
    eos_token = json.loads((EMBEDDED / "tokenizer_config.json").read_text())["eos_token"]
    assert TOKENIZER.eos_ids == tuple(dict.fromkeys([*generation, TOKENIZER.token_to_id(eos_token)]))
    folder = tmp_path / "model"
    shutil.copytree(EMBEDDED, folder)
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": 7}))
    assert Tokenizer(folder).eos_ids == (7, TOKENIZER.token_to_id(eos_token))


def test_thinking_switch_in_the_generation_prompt():
    messages = [{"role": "user", "content": "hi"}]
    on = TOKENIZER.render_chat(messages, enable_thinking=True)
    off = TOKENIZER.render_chat(messages, enable_thinking=False)
    assert on.endswith("<|im_start|>assistant\n<think>\n")
    assert off.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert on.startswith("<|im_start|>user\nhi<|im_end|>\n")


def test_earlier_turns_lose_their_reasoning_when_re_rendered():
    messages = [{"role": "user", "content": "a"},
                {"role": "assistant", "content": "<think>\nsecret\n</think>\n\nanswer"},
                {"role": "user", "content": "b"}]
    text = TOKENIZER.render_chat(messages)
    assert "secret" not in text and "answer" in text


def test_a_checkpoint_without_a_template_falls_back_to_chatml(tmp_path):
    import shutil

    shutil.copy(EMBEDDED / "tokenizer.json", tmp_path / "tokenizer.json")
    tok = Tokenizer(tmp_path)
    assert not tok.has_chat_template
    assert tok.render_chat([{"role": "user", "content": "x"}], enable_thinking=False) == \
        "<|im_start|>user\nx<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"


def test_a_folder_without_a_tokenizer_is_a_clear_error(tmp_path):
    with pytest.raises(MinqwenError, match="no tokenizer.json"):
        Tokenizer(tmp_path)


def test_greedy_generation_equals_a_manual_argmax_loop():
    ids = TOKENIZER.encode("import os\n")
    got = list(generate_ids(MODEL, ids, SamplingParams(), max_new_tokens=12))
    cache = MODEL.new_cache()
    logits = MODEL.forward(ids, cache, last_only=True)
    expected = []
    for _ in range(12):
        expected.append(int(np.argmax(logits[-1])))
        if expected[-1] in MODEL.config.eos_token_id or expected[-1] in TOKENIZER.eos_ids:
            break
        logits = MODEL.forward([expected[-1]], cache, last_only=True)
    assert got == expected


def test_a_seed_makes_sampled_generation_reproducible():
    ids = TOKENIZER.encode("def ")
    params = SamplingParams(temperature=1.0, top_p=0.95)
    runs = [list(generate_ids(MODEL, ids, params, max_new_tokens=20, seed=3)) for _ in range(2)]
    assert runs[0] == runs[1]
    # …and the options are used: other seeds give other tokens, and sampling is not greedy decoding
    others = [list(generate_ids(MODEL, ids, params, max_new_tokens=20, seed=seed)) for seed in (4, 5, 6)]
    assert any(run != runs[0] for run in others)
    greedy = list(generate_ids(MODEL, ids, SamplingParams(temperature=0), max_new_tokens=20))
    assert any(run != greedy for run in [runs[0], *others])


def test_max_new_tokens_and_eos_stop_generation():
    ids = TOKENIZER.encode("class ")
    assert len(list(generate_ids(MODEL, ids, max_new_tokens=5))) == 5
    eos_first = list(generate_ids(MODEL, ids, max_new_tokens=50, stop_ids=range(MODEL.config.vocab_size)))
    assert len(eos_first) == 1  # every id is a stop id: the first one ends it


def test_stop_strings_end_the_text_before_them():
    ids = TOKENIZER.encode("def f(x):\n")
    full = "".join(stream_text(MODEL, TOKENIZER, ids, max_new_tokens=40))
    assert len(full.strip()) >= 12, full  # the embedded model writes a line or more here
    # a stop string from the middle of the text, so that the cut keeps what came before it
    middle = len(full) // 2
    stop = full[middle : middle + 3]
    cut = "".join(stream_text(MODEL, TOKENIZER, ids, max_new_tokens=40, stop_strings=[stop]))
    assert stop not in cut and full.startswith(cut) and cut == full[: full.index(stop)]


def test_empty_prompt_is_a_clear_error():
    with pytest.raises(MinqwenError, match="empty"):
        list(generate_ids(MODEL, [], max_new_tokens=3))


@pytest.mark.parametrize("prompt", [[1.7], ["3"], "hello", [[1, 2]], [[1, 2], [3]], [True]], ids=repr)
def test_a_prompt_that_is_not_whole_token_ids_is_an_error_not_a_rounding(prompt):
    # int(1.7) would quietly feed token 1
    with pytest.raises(MinqwenError, match="the prompt must be a 1-D sequence of token ids"):
        list(generate_ids(MODEL, prompt, max_new_tokens=3))


@pytest.mark.parametrize("options, named", [
    (dict(max_new_tokens=2.5), "max_new_tokens must be a whole number"),
    (dict(max_new_tokens="5"), "max_new_tokens must be a whole number"),
    (dict(max_new_tokens=0), "max_new_tokens must be a whole number"),
    (dict(seed=-1), "seed must be a whole number"), (dict(seed="abc"), "seed must be a whole number"),
    (dict(seed=1.5), "seed must be a whole number")], ids=str)
def test_bad_generation_arguments_are_errors_naming_them(options, named):
    with pytest.raises(MinqwenError, match=named):
        list(generate_ids(MODEL, [1, 2, 3], **{"max_new_tokens": 3, **options}))


def test_numpy_token_ids_and_seeds_are_accepted():
    ids = np.array([10, 20, 30], np.int32)
    out = list(generate_ids(MODEL, ids, SamplingParams(temperature=1.0), max_new_tokens=3, seed=np.int64(4)))
    assert out == list(generate_ids(MODEL, [10, 20, 30], SamplingParams(temperature=1.0), max_new_tokens=3, seed=4))


@pytest.mark.parametrize("history, named", [
    ([-1], "history id -1 is not a token id"),  # would penalise the vocabulary's last token
    ([MODEL.config.vocab_size], f"history id {MODEL.config.vocab_size} is not a token id"),
    ([2.0], "history id 2.0 is not a token id"), ([True], "history id True is not a token id"),
    (7, "history must be a sequence of token ids"), ("abc", "history must be a sequence of token ids")], ids=repr)
def test_history_ids_outside_the_vocabulary_are_errors_not_penalties_elsewhere(history, named):
    params = SamplingParams(temperature=0, repetition_penalty=1.3)
    with pytest.raises(MinqwenError, match=named):
        list(generate_ids(MODEL, [1, 2, 3], params, max_new_tokens=3, history=history))


def test_history_may_be_any_sequence_of_ids():
    params = SamplingParams(temperature=0, repetition_penalty=1.3)
    expected = list(generate_ids(MODEL, [1, 2, 3], params, max_new_tokens=4, history=[5, 6, 7]))
    for history in ((5, 6, 7), np.array([5, 6, 7]), range(5, 8), (t for t in [5, 6, 7]), [np.int32(5), 6, 7]):
        assert list(generate_ids(MODEL, [1, 2, 3], params, max_new_tokens=4, history=history)) == expected


def test_an_eos_that_ends_the_text_is_the_stop_reason():
    from minqwen.generate import GenerationStats

    stats = GenerationStats()
    word, eos = TOKENIZER.encode("def")[0], MODEL.config.eos_token_id[0]
    # a decoder that yields a word, an eos, and the word again: the text ends at the eos
    text = "".join(stream_text(MODEL, TOKENIZER, [1, 2, 3], max_new_tokens=5, stats=stats,
                               decode=lambda *args: iter([word, eos, word])))
    assert text == TOKENIZER.decode([word]) and stats.stop_reason == "eos"


def test_sampling_params_that_are_not_a_sampling_params_are_an_error():
    with pytest.raises(MinqwenError, match="params must be a minqwen SamplingParams, got dict"):
        list(generate_ids(MODEL, [1, 2, 3], {"temperature": 0.7}, max_new_tokens=3))
    with pytest.raises(MinqwenError, match="params must be a minqwen SamplingParams, got dict"):
        list(ChatSession(MODEL, TOKENIZER).reply("Hi", params={"temperature": 0.7}, max_new_tokens=3))


def test_a_whole_params_and_sampling_options_together_are_refused_not_half_ignored():
    with pytest.raises(MinqwenError, match=r"either params or sampling options \(temperature\)"):
        list(stream(MODEL, TOKENIZER, "def f", params=SamplingParams(), temperature=0.7, max_new_tokens=3))


def test_stop_strings_may_be_a_set():
    text = "".join(stream_text(MODEL, TOKENIZER, TOKENIZER.encode("def "), max_new_tokens=30,
                               stop_strings={"(", ":"}))
    assert "(" not in text and ":" not in text


@pytest.mark.parametrize("stop", [[""], [5], "end", 5, None, (s for s in ["x"])], ids=repr)
def test_stop_strings_must_be_non_empty_strings(stop):
    with pytest.raises(MinqwenError, match="stop strings must be a list of non-empty strings"):
        list(stream_text(MODEL, TOKENIZER, [1, 2, 3], max_new_tokens=3, stop_strings=stop))


def test_wrong_argument_types_are_errors_naming_what_was_expected():
    with pytest.raises(MinqwenError, match="path of a checkpoint folder"):
        minqwen.load(None)
    with pytest.raises(MinqwenError, match="cache must be a minqwen Cache"):
        MODEL.forward([1], "x")
    with pytest.raises(MinqwenError, match="the message must be text"):
        list(ChatSession(MODEL, TOKENIZER).reply(None))
    with pytest.raises(MinqwenError, match="encode takes text"):
        TOKENIZER.encode(None)
    with pytest.raises(MinqwenError, match="decode takes token ids"):
        TOKENIZER.decode([5, -1])
    assert TOKENIZER.decode(np.array([5, 6])) == TOKENIZER.decode([5, 6])


def test_every_chat_turn_equals_a_fresh_run_on_the_same_rendered_conversation():
    session = ChatSession(MODEL, TOKENIZER, enable_thinking=False)
    for text in ["Hello there.", "What is a list?", "Thanks."]:
        answer = "".join(session.reply(text, GREEDY, max_new_tokens=24))
        # the same conversation, rendered and run from scratch
        rendered = TOKENIZER.render_chat(session.messages[:-1], enable_thinking=False)
        fresh = "".join(stream_text(MODEL, TOKENIZER, TOKENIZER.encode(rendered), max_new_tokens=24,
                                    skip_special_tokens=False))
        assert answer == fresh


def test_chat_with_thinking_rolls_back_rewritten_history_and_still_matches_a_fresh_run():
    session = ChatSession(MODEL, TOKENIZER, enable_thinking=True)
    for text in ["Hi.", "Again."]:
        answer = "".join(session.reply(text, GREEDY, max_new_tokens=16))
        rendered = TOKENIZER.render_chat(session.messages[:-1], enable_thinking=True)
        fresh = "".join(stream_text(MODEL, TOKENIZER, TOKENIZER.encode(rendered), max_new_tokens=16,
                                    skip_special_tokens=False))
        assert answer == fresh


@pytest.mark.parametrize("do_sample", [True, False])
def test_a_chat_reply_without_params_samples_as_the_checkpoints_generation_config_says(tmp_path, do_sample):
    # As stream() and `minqwen chat`: the file's settings (the embedded model's samples at
    # temperature 0.7); greedy where the file does not set do_sample.
    folder = copy_of_embedded(tmp_path)
    config = json.loads((folder / "generation_config.json").read_text())
    config["do_sample"] = do_sample
    (folder / "generation_config.json").write_text(json.dumps(config))
    tokenizer = Tokenizer(folder)
    params = SamplingParams.from_generation_config(tokenizer.generation_config)
    assert params.greedy is not do_sample
    session = ChatSession(MODEL, tokenizer, enable_thinking=False)
    answer = "".join(session.reply("Tell me a story.", max_new_tokens=24, seed=5))
    rendered = tokenizer.render_chat(session.messages[:-1], enable_thinking=False)
    fresh = "".join(stream_text(MODEL, tokenizer, tokenizer.encode(rendered), params, max_new_tokens=24, seed=5,
                                skip_special_tokens=False))
    assert answer == fresh
    # Not SamplingParams()'s plain argmax: greedy or not, the file's repetition penalty (1.05) applies.
    plain = "".join(stream_text(MODEL, tokenizer, tokenizer.encode(rendered), GREEDY, max_new_tokens=24,
                                skip_special_tokens=False))
    assert answer != plain


@pytest.mark.parametrize("thinking", [False, True])
@pytest.mark.parametrize("how", ["stopped reading", "bad max_new_tokens", "bad seed", "bad stop_strings"])
def test_a_turn_that_does_not_finish_leaves_the_conversation_as_it_was(how, thinking):
    session = ChatSession(MODEL, TOKENIZER, enable_thinking=thinking)
    "".join(session.reply("Hello there.", GREEDY, max_new_tokens=8))
    before = list(session.messages)
    if how == "stopped reading":
        pieces = session.reply("Write a long poem about the sea.", GREEDY, max_new_tokens=40)
        next(pieces)  # the first piece, then the caller stops reading
        pieces.close()
    else:
        bad = {"bad max_new_tokens": dict(max_new_tokens=0), "bad seed": dict(seed=-1),
               "bad stop_strings": dict(stop_strings="x")}[how]
        with pytest.raises(MinqwenError):
            "".join(session.reply("Write a long poem about the sea.", **bad))
    assert session.messages == before
    # The next turn answers exactly as a fresh run over the conversation without the lost turn.
    answer = "".join(session.reply("What is a list?", GREEDY, max_new_tokens=16))
    rendered = TOKENIZER.render_chat(session.messages[:-1], enable_thinking=thinking)
    fresh = "".join(stream_text(MODEL, TOKENIZER, TOKENIZER.encode(rendered), max_new_tokens=16,
                                skip_special_tokens=False))
    assert answer == fresh


def test_text_that_is_not_utf8_and_templates_that_fail_are_errors_not_tracebacks():
    with pytest.raises(MinqwenError, match="not valid Unicode"):
        TOKENIZER.encode("a\udcff")  # how Python holds a byte 0xff read from a non-UTF-8 argument
    with pytest.raises(MinqwenError, match="decode takes token ids"):
        TOKENIZER.decode([10**30])
    with pytest.raises(MinqwenError, match="checkpoint folder"):
        Tokenizer(5)
    with pytest.raises(MinqwenError, match="list of one or more messages"):
        TOKENIZER.render_chat(None)
    with pytest.raises(MinqwenError, match="stop_ids"):
        list(generate_ids(MODEL, [1, 2], max_new_tokens=2, stop_ids=5))
    with pytest.raises(MinqwenError, match="stats"):
        list(generate_ids(MODEL, [1, 2], max_new_tokens=2, stats=5))
    broken = Tokenizer(EMBEDDED)
    for template, error in [("{{ 1 / 0 }}", "ZeroDivisionError"), ("{{ messages + 1 }}", "TypeError"),
                            ("{{ raise_exception('no system role') }}", "no system role")]:
        broken.chat_template = template
        with pytest.raises(MinqwenError, match=error):
            broken.render_chat([{"role": "user", "content": "hi"}])


def test_the_python_generate_api_takes_a_prompt_or_chat_messages_and_streams_the_same_text():
    text = minqwen.generate(MODEL, TOKENIZER, "def ", max_new_tokens=12, temperature=0)
    assert text == "".join(minqwen.stream(MODEL, TOKENIZER, "def ", max_new_tokens=12, temperature=0))
    # generate() fills what it is not told from generation_config.json (here: a repetition penalty)
    greedy = SamplingParams.from_generation_config(TOKENIZER.generation_config, temperature=0)
    assert greedy.greedy and greedy.repetition_penalty == TOKENIZER.generation_config["repetition_penalty"]
    assert text == "".join(stream_text(MODEL, TOKENIZER, TOKENIZER.encode("def "), greedy, max_new_tokens=12))
    messages = [{"role": "user", "content": "Hello"}]
    chat = minqwen.generate(MODEL, TOKENIZER, messages, max_new_tokens=8, temperature=0, enable_thinking=False)
    rendered = TOKENIZER.encode(TOKENIZER.render_chat(messages, enable_thinking=False))
    assert chat == "".join(stream_text(MODEL, TOKENIZER, rendered, greedy, max_new_tokens=8))
    with pytest.raises(MinqwenError, match="unknown sampling option"):
        minqwen.generate(MODEL, TOKENIZER, "x", temprature=0)


@pytest.mark.parametrize("text, named", [("[" * 100_000 + "]" * 100_000, "not valid JSON"),
                                         ("{", "not valid JSON"), ("[1, 2]", "expected a JSON object")], ids=str)
def test_a_broken_tokenizer_config_is_an_error_naming_the_file(tmp_path, text, named):
    import shutil

    folder = tmp_path / "model"
    shutil.copytree(EMBEDDED, folder)
    (folder / "tokenizer_config.json").write_text(text)  # deep nesting was a bare RecursionError
    with pytest.raises(MinqwenError, match=f"tokenizer_config.json: {named}"):
        Tokenizer(folder)


TINY_TEXT = minqwen.load(FIXTURES / "text_tied_fp32")  # vocab 160, context 512


def reference_greedy(model, prompt, n, history, rep, presence):
    """Greedy decoding with the documented penalties applied in float64; also the smallest top-2 margin."""
    cache = model.new_cache()
    logits = model.forward(prompt, cache, last_only=True)[-1]
    out, margin = [], np.inf
    for _ in range(n):
        row = penalized64(logits, list(history) + list(prompt) + out, out, rep, presence)
        top2 = np.sort(row)[-2:]
        margin = min(margin, top2[1] - top2[0])
        out.append(int(np.argmax(row)))
        logits = model.forward([out[-1]], cache, last_only=True)[-1]
    return out, margin


@pytest.mark.parametrize("rep, presence", [(3.0, 0.0), (1.0, 3.0), (2.0, 1.5)])
def test_generate_counts_history_for_repetition_and_only_generated_ids_for_presence(rep, presence):
    params = SamplingParams(repetition_penalty=rep, presence_penalty=presence)
    for seed in range(4):
        prompt = [int(i) for i in np.random.default_rng(seed).integers(0, 160, size=5)]
        plain, _ = reference_greedy(TINY_TEXT, prompt, 3, [], 1.0, 0.0)
        # history holds what unpenalised greedy would say next, and the prompt repeats it: both must matter
        for history, prompt_ in (([plain[0], plain[1]], prompt), ([], prompt + [plain[0]])):
            expected, margin = reference_greedy(TINY_TEXT, prompt_, 6, history, rep, presence)
            if margin < 1e-4:
                continue  # a near-tie: float32 and float64 may break it differently
            assert list(generate_ids(TINY_TEXT, prompt_, params, 6, history=history)) == expected, (seed, history)


EOS = set(TOKENIZER.eos_ids) | set(MODEL.config.eos_token_id)


def fixed_decode(ids):
    """A drop-in for generate_ids that yields ``ids``, whatever it is asked."""
    def decode(model, prompt_ids, params, max_new_tokens, stop_ids, *rest):
        yield from ids
    return decode


def streamed_texts(ids, skip_special_tokens=True):
    """The text after each id (StreamDecoder's pieces so far), then after the final flush."""
    decoder = StreamDecoder(TOKENIZER, skip_special_tokens=skip_special_tokens)
    text, texts = "", []
    for token in ids:
        text += decoder.push(token)
        texts.append(text)
    texts.append(text + decoder.flush())
    return texts


def expected_stop_cut(ids, stops):
    """The streaming rule, by brute force: at the first point where some stop string is in the text
    so far, the output is the text before the earliest occurrence; else the whole text."""
    for text in streamed_texts(ids):
        hits = [text.find(s) for s in stops if s in text]
        if hits:
            return text[: min(hits)]
    return streamed_texts(ids)[-1]


def stop_cases():
    rng = np.random.default_rng(0)
    words = TOKENIZER.encode("def main():\n    print('héllo wörld 🙂 漢字テスト')\n    return x + y  # ok ✓")
    vocab = [i for i in range(MODEL.config.vocab_size) if i not in EOS]
    cases = []
    for _ in range(300):
        n = int(rng.integers(1, 12))
        ids = [int(words[j]) if rng.random() < 0.6 else int(vocab[rng.integers(len(vocab))])
               for j in rng.integers(0, len(words), size=n)]
        text = streamed_texts(ids)[-1]
        if not text:
            continue
        stops = []
        for _ in range(int(rng.integers(1, 3))):  # one or two stop strings, cut from the text
            a = int(rng.integers(0, len(text)))
            b = int(rng.integers(a + 1, min(len(text), a + 6) + 1))
            stops.append(text[a:b])
        if rng.random() < 0.2:
            stops.append("zzq")  # one that never occurs
        cases.append((ids, stops))
    return cases


def test_stop_strings_cut_the_stream_where_the_first_completes():
    for ids, stops in stop_cases():
        got = "".join(stream_text(MODEL, TOKENIZER, [1], max_new_tokens=len(ids), stop_strings=stops,
                                  decode=fixed_decode(ids)))
        assert got == expected_stop_cut(ids, stops), (ids, stops)


def test_an_eos_is_not_part_of_the_text_even_when_special_tokens_are_kept():
    ids = TOKENIZER.encode("Hello there")
    for eos in sorted(EOS):
        got = "".join(stream_text(MODEL, TOKENIZER, [1], max_new_tokens=10, skip_special_tokens=False,
                                  decode=fixed_decode(ids + [eos] + ids)))
        assert got == TOKENIZER.decode(ids, skip_special_tokens=False)


def hf_tokenizers():
    """The embedded tokenizer.json read by the tokenizers library directly: the independent side."""
    from tokenizers import Tokenizer as HF

    return HF.from_file(str(EMBEDDED / "tokenizer.json"))


def test_flush_gives_back_the_text_held_for_an_unfinished_character():
    # Generation that stops (max_new_tokens) in the middle of a character: the text before it,
    # and the incomplete character as U+FFFD, as the tokenizers library decodes those ids.
    hf = hf_tokenizers()
    ids = TOKENIZER.encode("ab 🐍🎉 日本語")
    cuts = [n for n in range(1, len(ids)) if hf.decode(ids[:n], skip_special_tokens=False).endswith("\ufffd")]
    assert cuts, "no prefix ends inside a character"
    for n in cuts:
        want = hf.decode(ids[:n], skip_special_tokens=False)
        decoder = StreamDecoder(TOKENIZER)
        pieces = [decoder.push(i) for i in ids[:n]]
        assert "".join(pieces) + decoder.flush() == want
        got = "".join(stream_text(MODEL, TOKENIZER, [1], max_new_tokens=n, skip_special_tokens=False,
                                  decode=lambda *args, _ids=ids[:n]: iter(_ids)))
        assert got == want


def test_decode_with_skip_special_tokens_drops_them_as_the_tokenizers_library():
    hf = hf_tokenizers()
    ids = TOKENIZER.encode("<|im_start|>user\nhi there<|im_end|>\n<|endoftext|>ok")
    kept, dropped = hf.decode(ids, skip_special_tokens=False), hf.decode(ids, skip_special_tokens=True)
    assert kept != dropped
    assert TOKENIZER.decode(ids) == kept
    assert TOKENIZER.decode(ids, skip_special_tokens=True) == dropped
    decoder = StreamDecoder(TOKENIZER, skip_special_tokens=True)
    assert "".join(decoder.push(i) for i in ids) + decoder.flush() == dropped


def test_decode_refuses_true_and_false_as_token_ids():
    # bool is an int subclass: decode([True]) would quietly be token 1's text. (A mask or a
    # comparison result passed by mistake is no list of ids.)
    for ids in ([True], [5, False], np.array([True, False])):
        with pytest.raises(MinqwenError, match="decode takes token ids"):
            TOKENIZER.decode(ids)


def copy_of_embedded(tmp_path) -> Path:
    folder = tmp_path / "model"
    shutil.copytree(EMBEDDED, folder)
    return folder


def edit_tokenizer_config(folder: Path, **changes):
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config.update(changes)
    (folder / "tokenizer_config.json").write_text(json.dumps(config))


def test_an_eos_token_written_as_an_added_token_dict_is_an_eos_id_as_transformers_reads_it(tmp_path):
    require_reference()
    from transformers import AutoTokenizer

    folder = copy_of_embedded(tmp_path)
    (folder / "generation_config.json").unlink()  # the eos then comes from tokenizer_config.json alone
    edit_tokenizer_config(folder, eos_token={"__type": "AddedToken", "content": "<|endoftext|>", "lstrip": False,
                                             "normalized": False, "rstrip": False, "single_word": False,
                                             "special": True})
    reference = AutoTokenizer.from_pretrained(str(folder))
    assert Tokenizer(folder).eos_ids == (reference.eos_token_id,)


# Combining marks that NFC leaves standing: Qwen3.5's split keeps them in the word, Qwen2's cuts there.
MARKS = ["\u0301's", "a\ufe0f's it", "ok\u20dd'll go", "x\u0301\u0302 y", "e\u0301 t\u0308"]


@pytest.mark.parametrize("model_type, tokenizer_class", [
    ("qwen3_5_text", "Qwen2Tokenizer"), ("qwen3_5_text", "Qwen3_5Tokenizer"), ("qwen3_5_text", None),
    ("qwen3_5_text", "TokenizersBackend"), ("qwen3_5", "Qwen2Tokenizer"), ("qwen3_5_moe_text", "Qwen2TokenizerFast"),
])
@pytest.mark.parametrize("file_change", ["as shipped", "no normalizer", "Qwen2 split", "prefix space"])
def test_ids_and_text_are_transformers_whichever_class_it_loads_the_tokenizer_as(tmp_path, model_type,
                                                                                  tokenizer_class, file_change):
    # transformers' Qwen classes keep tokenizer.json's vocabulary and merges but bring their own
    # normalizer (NFC), split and decoder; a generic backend reads the file as it is.
    require_reference()
    from transformers import AutoTokenizer

    folder = copy_of_embedded(tmp_path)
    set_model_type(folder, model_type)
    tokenizer_config = json.loads((folder / "tokenizer_config.json").read_text())
    tokenizer_config.pop("tokenizer_class")
    if tokenizer_class is not None:
        tokenizer_config["tokenizer_class"] = tokenizer_class
    if file_change == "prefix space":
        tokenizer_config["add_prefix_space"] = True
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    file = json.loads((folder / "tokenizer.json").read_text())
    if file_change == "no normalizer":
        file["normalizer"] = None
    elif file_change == "Qwen2 split":
        file["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = QWEN_SPLIT_PATTERNS["Qwen2Tokenizer"]
    elif file_change == "prefix space":
        file["pre_tokenizer"]["pretokenizers"][1]["add_prefix_space"] = True
    (folder / "tokenizer.json").write_text(json.dumps(file))
    reference, ours = AutoTokenizer.from_pretrained(str(folder)), Tokenizer(folder)
    for text in MARKS + ["cafe\u0301 ok", "x"]:
        ids = reference.encode(text, add_special_tokens=False)
        assert ours.encode(text) == ids, text
        assert ours.decode(ids) == reference.decode(ids), text


@pytest.mark.parametrize("split", [True, False])
def test_special_token_text_is_split_or_kept_as_split_special_tokens_says_as_in_transformers(tmp_path, split):
    require_reference()
    from transformers import AutoTokenizer

    folder = copy_of_embedded(tmp_path)
    edit_tokenizer_config(folder, split_special_tokens=split)
    text = "a<|im_start|>b<|im_end|>"
    ids = AutoTokenizer.from_pretrained(str(folder)).encode(text, add_special_tokens=False)
    assert Tokenizer(folder).encode(text) == ids
    assert (TOKENIZER.token_to_id("<|im_start|>") in ids) is not split


def test_split_special_tokens_that_is_not_true_or_false_is_an_error_naming_it(tmp_path):
    folder = copy_of_embedded(tmp_path)
    edit_tokenizer_config(folder, split_special_tokens="yes")
    with pytest.raises(MinqwenError, match=r"tokenizer_config\.json: field 'split_special_tokens' must be true or false"):
        Tokenizer(folder)


def test_generation_config_fields_minqwen_does_not_implement_are_named_in_a_warning(tmp_path):
    # transformers' generate() would apply them; silently dropping them would change the output unseen.
    folder = copy_of_embedded(tmp_path)
    config = json.loads((folder / "generation_config.json").read_text())
    config.update(no_repeat_ngram_size=2, num_beams=1, bad_words_ids=[[11]], typical_p=1.0, suppress_tokens=[])
    (folder / "generation_config.json").write_text(json.dumps(config))
    with pytest.warns(UserWarning, match=r"generation_config\.json: minqwen does not implement "
                                         r"no_repeat_ngram_size, bad_words_ids, which transformers"):
        Tokenizer(folder)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the embedded model's file sets only what minqwen implements
        Tokenizer(EMBEDDED)


@pytest.mark.parametrize("fields", [dict(max_new_tokens=5), dict(max_length=40), dict(max_new_tokens=5, max_length=40)])
def test_a_generation_config_length_is_named_as_not_read(tmp_path, fields):
    # transformers' generate() stops there; minqwen's max_new_tokens is the call's own, and a
    # length that was silently ignored gave 128 tokens where the file said 5.
    folder = copy_of_embedded(tmp_path)
    config = json.loads((folder / "generation_config.json").read_text())
    (folder / "generation_config.json").write_text(json.dumps({**config, **fields}))
    with pytest.warns(UserWarning, match=rf"generation_config\.json: {' and '.join(fields)} not read: how many "
                                         r"tokens to generate is each call's own max_new_tokens \(default 128"):
        Tokenizer(folder)


def test_the_embedded_tokenizer_is_loaded_as_the_class_it_was_trained_with():
    # Its tokenizer.json holds Qwen3.5's split (tools/train_embedded.py trains with it), and its
    # tokenizer_config.json names the class that keeps it: transformers and minqwen alike then
    # keep marks in the word. (Naming Qwen2Tokenizer, as the release files do, would make
    # transformers split a qwen3_5_text checkpoint with Qwen2's pattern instead.)
    file = json.loads((EMBEDDED / "tokenizer.json").read_text())
    assert file["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] == QWEN_SPLIT_PATTERNS["Qwen3_5Tokenizer"]
    assert json.loads((EMBEDDED / "tokenizer_config.json").read_text())["tokenizer_class"] == "Qwen3_5Tokenizer"
    assert TOKENIZER.encode("\u0301's")[-1] == TOKENIZER.token_to_id("'s")  # Qwen2's split: "\u0301'" + "s"


MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "héllo 日本"},
            {"role": "assistant", "content": "x"}, {"role": "user", "content": "y"}]


@pytest.mark.parametrize("template", [
    # whitespace control: transformers renders with trim_blocks and lstrip_blocks
    "{% for m in messages %}\n  {% if m.role != 'system' %}\n{{ m.role }}: {{ m.content }}\n  {% endif %}\n"
    "{% endfor %}\n{% if add_generation_prompt %}\nA:{% endif %}",
    # tojson keeps non-ASCII text as it is
    "{% for m in messages %}{{ m.content | tojson }}\n{% endfor %}",
], ids=["blocks", "tojson"])
def test_a_checkpoint_template_renders_as_transformers_apply_chat_template(tmp_path, template):
    require_reference()
    from transformers import AutoTokenizer

    folder = copy_of_embedded(tmp_path)
    edit_tokenizer_config(folder, chat_template=template)
    reference = AutoTokenizer.from_pretrained(str(folder))
    for generation_prompt in (True, False):
        want = reference.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=generation_prompt)
        assert Tokenizer(folder).render_chat(MESSAGES, add_generation_prompt=generation_prompt) == want


def test_of_several_named_templates_the_default_is_used_as_transformers_does(tmp_path):
    require_reference()
    from transformers import AutoTokenizer

    folder = copy_of_embedded(tmp_path)
    edit_tokenizer_config(folder, chat_template=[
        {"name": "tool_use", "template": "TOOLS {{ messages[0].content }}"},
        {"name": "default", "template": "DEFAULT {{ messages[0].content }}"}])
    want = AutoTokenizer.from_pretrained(str(folder)).apply_chat_template(MESSAGES, tokenize=False)
    assert Tokenizer(folder).render_chat(MESSAGES) == want


def test_a_template_shipped_as_chat_template_jinja_is_used_as_transformers_does(tmp_path):
    require_reference()
    from transformers import AutoTokenizer

    folder = copy_of_embedded(tmp_path)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config.pop("chat_template")
    (folder / "chat_template.jinja").write_text("{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}")
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    want = AutoTokenizer.from_pretrained(str(folder)).apply_chat_template(MESSAGES, tokenize=False,
                                                                          add_generation_prompt=True)
    assert Tokenizer(folder).render_chat(MESSAGES) == want


def test_the_template_sees_the_eos_token_text_when_written_as_a_dict(tmp_path):
    require_reference()
    from transformers import AutoTokenizer

    folder = copy_of_embedded(tmp_path)
    edit_tokenizer_config(folder, eos_token={"__type": "AddedToken", "content": "<|im_end|>", "special": True},
                          chat_template="{{ messages[0].content }}{{ eos_token }}")
    want = AutoTokenizer.from_pretrained(str(folder)).apply_chat_template(MESSAGES, tokenize=False)
    assert Tokenizer(folder).render_chat(MESSAGES) == want


@pytest.mark.parametrize("template", [
    "{% for m in messages %}{{ m.content }}{% if loop.index == 2 %}{% break %}{% endif %}{% endfor %}",
    "{{ messages[1].content | tojson(ensure_ascii=True) }}",
    "{{ strftime_now('%Y') }}",
], ids=["break", "tojson-kwargs", "strftime_now"])
def test_template_features_transformers_offers(tmp_path, template):
    require_reference()
    from transformers import AutoTokenizer

    folder = copy_of_embedded(tmp_path)
    edit_tokenizer_config(folder, chat_template=template)
    want = AutoTokenizer.from_pretrained(str(folder)).apply_chat_template(MESSAGES, tokenize=False)
    assert Tokenizer(folder).render_chat(MESSAGES) == want


# ----------------------------------------------------------------------------- the chat session's cache


CHATML = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def test_a_history_that_differs_only_at_the_last_cached_token_is_rolled_back():
    """With a template that keeps history verbatim, an answer cut off by max_new_tokens whose
    last fed token re-tokenizes differently (" P" + "ython" → " Python") makes the re-rendered
    conversation diverge exactly at the last id of the log. The next turn must still equal one
    fresh prefill of the conversation."""
    model = minqwen.load(EMBEDDED)
    tokenizer = Tokenizer(EMBEDDED)
    tokenizer.chat_template = CHATML
    hi, p, ython = tokenizer.encode("Hi"), tokenizer.encode(" P"), tokenizer.encode("ython")
    assert len(p) == len(ython) == 1 and tokenizer.encode("Hi Python") != hi + p + ython  # the merge happens
    recorder = Recorder(model)
    session = ChatSession(recorder, tokenizer)
    "".join(session.reply("Hello", decode=forced(hi + p + ython)))
    assert session.log[-1] == p[0]  # the last fed id is the one the re-rendering changes
    full = tokenizer.encode(tokenizer.render_chat(session.messages + [{"role": "user", "content": "Again"}],
                                                  add_generation_prompt=True))
    assert full[: len(session.log) - 1] == session.log[:-1] and full[len(session.log) - 1] != session.log[-1]
    stats = GenerationStats()
    "".join(session.reply("Again", SamplingParams(), max_new_tokens=4, stats=stats))
    n = stats.generated_tokens
    assert session.log[: len(full)] == full and len(session.log) == len(full) + n - 1
    assert session.cache.position == len(session.log)
    fresh = model.forward(session.log, model.new_cache(), last_only=False)
    np.testing.assert_allclose(np.stack(recorder.rows[-n:]), fresh[-n:], rtol=0, atol=1e-4)


@pytest.mark.parametrize("thinking", [False, True])
def test_resending_the_same_message_after_a_turn_that_did_not_finish_equals_a_fresh_run(thinking):
    """Ctrl-C in the middle of an answer, then the same message again: the re-rendered body then
    equals the log exactly (no roll-back to hide a stale cache), so the dropped turn must have
    restored the cache itself."""
    model, tokenizer = minqwen.load(EMBEDDED), Tokenizer(EMBEDDED)
    session = ChatSession(model, tokenizer, enable_thinking=thinking)
    "".join(session.reply("Hello there.", GREEDY, max_new_tokens=8))
    pieces = session.reply("Write a long poem about the sea.", GREEDY, max_new_tokens=40)
    next(pieces)
    next(pieces)
    pieces.close()
    answer = "".join(session.reply("Write a long poem about the sea.", GREEDY, max_new_tokens=16))
    rendered = tokenizer.render_chat(session.messages[:-1], enable_thinking=thinking)
    fresh = "".join(stream_text(model, tokenizer, tokenizer.encode(rendered), max_new_tokens=16,
                                skip_special_tokens=False))
    assert answer == fresh
    assert session.cache.position == len(session.log)


def test_a_tokenizer_file_given_for_its_folder_is_named_as_a_file():
    # (it was told "no tokenizer.json in this folder")
    with pytest.raises(MinqwenError, match=r"tokenizer\.json: a file; Tokenizer takes the checkpoint folder that "
                                           r"holds tokenizer\.json"):
        Tokenizer(EMBEDDED / "tokenizer.json")
