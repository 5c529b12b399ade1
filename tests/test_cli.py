"""The `minqwen` console script, run for real in a subprocess, on the embedded model."""

import os
import shutil
import subprocess
import sys
import time

import pytest

import minqwen
from conftest import FIXTURES
from minqwen.checkpoint import EMBEDDED
from minqwen.generate import ChatSession
from minqwen.sampling import SamplingParams
from minqwen.tokenizer import Tokenizer

SCRIPT = shutil.which("minqwen") or ""
ENV = dict(os.environ, PYTHONIOENCODING="utf-8")


def run(*args, stdin=None, script=True):
    command = [SCRIPT, *args] if script and SCRIPT else [sys.executable, "-m", "minqwen", *args]
    return subprocess.run(command, input=stdin, capture_output=True, text=True, env=ENV, timeout=300)


def assert_clean_error(result, message):
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert message in result.stderr, result.stderr


def test_a_warning_is_one_line_as_an_error_is(tmp_path):
    # It was Python's "path:line: UserWarning: …" and the source line that raised it.
    import json
    import shutil

    from minqwen.checkpoint import EMBEDDED

    folder = tmp_path / "model"
    shutil.copytree(EMBEDDED, folder)
    config = json.loads((folder / "generation_config.json").read_text())
    (folder / "generation_config.json").write_text(json.dumps({**config, "max_new_tokens": 5}))
    result = run("generate", "--model", str(folder), "def f", "--max-new-tokens", "2", "--seed", "0")
    assert result.returncode == 0, result.stderr
    warning = [line for line in result.stderr.splitlines() if "max_new_tokens not read" in line]
    assert warning == [f"minqwen: warning: {folder / 'generation_config.json'}: max_new_tokens not read: how many "
                       "tokens to generate is each call's own max_new_tokens (default 128; ChatSession.reply 256; "
                       "--max-new-tokens on the command line)"], result.stderr
    assert "UserWarning" not in result.stderr and "Tokenizer(" not in result.stderr


def test_the_console_script_is_installed():
    assert SCRIPT, "the `minqwen` console script is not on PATH (pip install the package)"


def test_generate_streams_a_continuation_and_reports_speed():
    result = run("generate", "def fibonacci(n):", "--max-new-tokens", "16", "--temperature", "0")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("def fibonacci(n):")
    assert len(result.stdout) > len("def fibonacci(n):")
    assert "prefill:" in result.stderr and "tok/s" in result.stderr


def test_generate_reads_the_prompt_from_stdin_and_python_m_works_too():
    result = run("generate", "--max-new-tokens", "8", stdin="import os\n", script=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("import os\n")


def test_greedy_generation_is_reproducible_and_a_seed_reproduces_sampling():
    def generate(*options):
        result = run("generate", "class ", "--max-new-tokens", "12", *options)
        assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
        assert len(result.stdout) > len("class "), "the prompt is echoed, then something is generated"
        return result.stdout

    assert generate("--temperature", "0") == generate("--temperature", "0")
    sampled = generate("--temperature", "1", "--seed", "5")
    assert sampled == generate("--temperature", "1", "--seed", "5")
    # …and it is sampling: other seeds give other texts (12 tokens at temperature 1 from a 4k vocabulary)
    others = {generate("--temperature", "1", "--seed", str(seed)) for seed in (6, 7, 8)}
    assert len(others | {sampled}) > 1


def test_chat_keeps_going_for_two_turns_over_stdin_and_ends_at_eof():
    result = run("chat", "--no-think", "--max-new-tokens", "12", "--temperature", "0",
                 stdin="Hello!\nWhat is Python?\n")
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stdout.count("\n") >= 2  # one answer per turn


def test_chat_stops_at_a_stop_text_as_generate_does():
    def chat(*options):
        result = run("chat", "--no-think", "--max-new-tokens", "24", "--temperature", "0", *options,
                     stdin="What is Python?\n")
        assert result.returncode == 0, result.stderr
        return result.stdout.rstrip("\n")

    answer = chat()
    stop = answer[len(answer) // 2:][:3]  # a piece from the middle of the answer
    assert stop.strip() and len(answer) > 6, answer
    assert chat("--stop", stop) == answer[: answer.index(stop)]  # before: --stop was ignored by chat


@pytest.mark.parametrize("command, args, message", [
    ("generate", ["def f", "--tokens", "1,2"], "either a prompt or --tokens"),  # before: the prompt was dropped
    ("generate", ["--tokens", "1,2", "--chat"], "--chat wraps a text prompt"),  # before: --chat was ignored
    ("generate", ["def f", "--no-think"], "--no-think goes with --chat"),  # before: ignored
    ("generate", ["def f", "--stop", ""], "--stop needs a non-empty text"),  # before: after the echo
    ("chat", ["--max-new-tokens", "0"], "--max-new-tokens must be ≥ 1"),  # before: only at the first message
    ("chat", ["--seed", "-1"], "--seed must be ≥ 0"),
    ("chat", ["--stop", ""], "--stop needs a non-empty text"),
])
def test_options_that_cannot_work_together_or_at_all_are_refused_before_anything_runs(command, args, message):
    result = run(command, *args, stdin="")
    assert result.returncode == 2 and result.stdout == ""
    assert_clean_error(result, message)


@pytest.mark.parametrize("command, prompt, stdin, message", [
    ("generate", ["Look: <|vision_start|><|image_pad|><|vision_end|>"], "", "no --image was given"),
    ("chat", [], "Look: <|image_pad|>\n", "this chat has no images"),
])
def test_an_image_placeholder_without_an_image_is_refused(command, prompt, stdin, message):
    # Before: the placeholder was fed as an ordinary token, with no image behind it.
    assert_clean_error(run(command, *prompt, stdin=stdin), message)


@pytest.mark.parametrize("context", ["0", "-1"])
def test_inspect_with_a_context_below_one_token_is_a_clean_error(context):
    assert_clean_error(run("inspect", "--context", context), "--context must be a number of tokens ≥ 1")


@pytest.mark.parametrize("option, value, message", [
    ("--presence-penalty", "nan", "--presence-penalty must be a finite number"),
    ("--seed", "-1", "--seed must be ≥ 0")])
def test_sampling_options_that_numpy_would_choke_on_are_clean_errors(option, value, message):
    result = run("generate", "def f", "--max-new-tokens", "4", "--temperature", "1", option, value)
    assert_clean_error(result, message)


def test_a_bad_max_new_tokens_is_reported_before_the_prompt_is_echoed():
    result = run("generate", "def f", "--max-new-tokens", "0")
    assert_clean_error(result, "--max-new-tokens must be ≥ 1")
    assert result.stdout == ""


def test_inspect_shows_layers_memory_and_threads():
    result = run("inspect", "--context", "1000")
    assert result.returncode == 0, result.stderr
    for text in ("Gated DeltaNet", "gated attention", "KV cache", "DeltaNet state", "threads:"):
        assert text in result.stdout


def test_score_prints_perplexity_and_bits_per_byte(tmp_path):
    path = tmp_path / "sample.py"
    path.write_text("def add(a, b):\n    return a + b\n" * 5)
    result = run("score", str(path), "--window", "32")
    assert result.returncode == 0, result.stderr
    assert "perplexity:" in result.stdout and "bits per byte:" in result.stdout


def test_empty_prompt_is_a_clean_error():
    assert_clean_error(run("generate", "   "), "empty")


def test_invalid_token_ids_are_a_clean_error():
    assert_clean_error(run("generate", "--tokens", "1,2,999999999"), "outside the vocabulary")
    assert_clean_error(run("generate", "--tokens", "1,x"), "not a list of token ids")


def test_a_prompt_longer_than_the_context_is_a_clean_error():
    ids = ",".join(["1"] * 5000)  # the embedded model's context is 2048
    assert_clean_error(run("generate", "--tokens", ids), "beyond the model's context")


def test_unknown_flags_are_a_clean_error():
    result = run("generate", "hi", "--no-such-flag")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "unrecognized arguments" in result.stderr


def test_a_folder_without_a_tokenizer_is_a_clean_error():
    assert_clean_error(run("generate", "hi", "--model", str(FIXTURES / "text_tied_fp32")), "no tokenizer.json")


def test_a_folder_that_is_no_checkpoint_is_called_that_not_a_checkpoint_without_a_tokenizer():
    assert_clean_error(run("generate", "hi", "--model", str(FIXTURES)), "no config.json, so this is not a checkpoint")


def test_a_hub_id_not_in_the_local_cache_says_how_to_get_it(tmp_path):
    env_cache = str(tmp_path)
    result = subprocess.run([sys.executable, "-m", "minqwen", "generate", "hi", "--model", "Qwen/Qwen3.5-0.8B"],
                            capture_output=True, text=True, env=dict(ENV, HF_HUB_CACHE=env_cache), timeout=120)
    assert_clean_error(result, "not in the local Hugging Face cache")


def test_a_hub_id_in_the_local_cache_resolves_offline(tmp_path):
    snapshot = tmp_path / "models--org--tiny" / "snapshots" / "abc123"
    shutil.copytree(FIXTURES / "text_tied_fp32", snapshot)
    (tmp_path / "models--org--tiny" / "refs").mkdir()
    (tmp_path / "models--org--tiny" / "refs" / "main").write_text("abc123")
    result = subprocess.run([sys.executable, "-m", "minqwen", "inspect", "--model", "org/tiny"],
                            capture_output=True, text=True, env=dict(ENV, HF_HUB_CACHE=str(tmp_path)), timeout=120)
    assert result.returncode == 0, result.stderr
    assert "abc123" in result.stdout


@pytest.mark.parametrize("ref", ["", "..", b"\xff\xfe", "deadbeef"], ids=repr)
def test_a_hub_cache_with_a_broken_ref_falls_back_to_its_newest_snapshot_folder(tmp_path, monkeypatch, ref):
    from minqwen.checkpoint import find_checkpoint

    repo = tmp_path / "models--org--tiny"
    for name, age in (("aaa111", 100), ("bbb222", 10)):  # bbb222 downloaded last
        (repo / "snapshots" / name).mkdir(parents=True)
        os.utime(repo / "snapshots" / name, (1e9 - age, 1e9 - age))
    (repo / "snapshots" / "zzz.txt").write_text("a stray file, not a snapshot")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_bytes(ref if isinstance(ref, bytes) else ref.encode())
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    assert find_checkpoint("org/tiny") == repo / "snapshots" / "bbb222"


@pytest.mark.parametrize("spec", ["", 5], ids=repr)
def test_a_model_that_is_neither_a_folder_nor_a_hub_id_is_an_error(spec):
    from minqwen import MinqwenError
    from minqwen.checkpoint import find_checkpoint

    with pytest.raises(MinqwenError, match="a model is a checkpoint folder or a hub id"):
        find_checkpoint(spec)


@pytest.mark.parametrize("flag, message", [("--temperature=-1", "--temperature must be ≥ 0"),
                                           ("--top-p=0", "--top-p must be in (0, 1]"),
                                           ("--top-k=-1", "--top-k must be a whole number ≥ 0"),
                                           ("--min-p=2", "--min-p must be in [0, 1]"),
                                           ("--repetition-penalty=0", "--repetition-penalty must be > 0"),
                                           ("--presence-penalty=nan", "--presence-penalty must be a finite number")])
@pytest.mark.parametrize("command", ["generate", "chat"])
def test_bad_sampling_flags_are_a_clean_error_naming_the_flag_before_the_model_loads(command, flag, message):
    # (a model that does not exist: the flag is checked first, as --max-new-tokens is)
    args = ["hi"] if command == "generate" else []
    assert_clean_error(run(command, *args, flag, "--model", "no/such/model"), message)


def test_an_image_with_a_text_only_model_is_a_clean_error(tmp_path):
    import numpy as np
    from PIL import Image

    path = tmp_path / "red.png"
    Image.fromarray(np.full((32, 32, 3), 200, np.uint8)).save(path)
    assert_clean_error(run("generate", "Describe this.", "--image", str(path)), "has no vision tower")


def test_bf16_prompts_needs_bf16_weights_and_runs_with_them():
    assert_clean_error(run("generate", "hello", "--bf16-prompts"), "--bf16-prompts needs --dtype bfloat16")
    from minqwen.bf16_dot import cpu_has_bf16_dot

    prompt = "def fibonacci(n):\n    " * 3  # 16 tokens or more, so the prompt does go through the kernel
    result = run("generate", prompt, "--dtype", "bfloat16", "--bf16-prompts", "--max-new-tokens", "4", "--temperature", "0")
    if cpu_has_bf16_dot():
        assert result.returncode == 0, result.stderr
        assert result.stdout.startswith(prompt) and len(result.stdout) > len(prompt)
    else:
        assert_clean_error(result, "needs a CPU with the AVX512-BF16 instructions")


def test_output_that_cannot_be_written_and_input_that_is_not_utf8_are_one_line_errors(tmp_path):
    command = [sys.executable, "-m", "minqwen", "generate", "def", "--max-new-tokens", "2"]
    if os.path.exists("/dev/full"):  # every write fails there: a full disk
        with open("/dev/full", "w") as full:
            result = subprocess.run(command, stdout=full, stderr=subprocess.PIPE, text=True, env=ENV, timeout=300)
        assert result.returncode == 2 and "Traceback" not in result.stderr
        assert "No space left on device" in result.stderr and "Exception ignored" not in result.stderr
    closed = subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=ENV,
                            timeout=300, preexec_fn=lambda: os.close(1))
    assert_clean_error(closed, "standard output is closed")
    for args in (["generate"], ["score", "-"]):
        not_utf8 = subprocess.run([sys.executable, "-m", "minqwen", *args], input=b"\xff\xfe text",
                                  capture_output=True, env=ENV, timeout=300)
        assert not_utf8.returncode == 2 and b"Traceback" not in not_utf8.stderr
        assert b"standard input is not UTF-8 text: the byte 0xff (invalid start byte); if it is in another " \
               b"encoding, convert it first, e.g. iconv -f latin1 -t utf-8" in not_utf8.stderr, not_utf8.stderr


# ----------------------------------------------------------------------------- options reach what they drive
# Each test runs the console script and compares its output with the Python API called directly,
# and checks that the option changes that output (so the comparison can fail).

TOKENIZER = Tokenizer(EMBEDDED)
MODEL = minqwen.load(EMBEDDED)
GENERATE_PROMPT = "def parse_args"


def hf_tokenizers():
    from tokenizers import Tokenizer as HF

    return HF.from_file(str(EMBEDDED / "tokenizer.json"))


@pytest.mark.parametrize("options, without", [
    ({"temperature": 1.0, "top_k": 2}, {"temperature": 1.0}),
    ({"temperature": 1.0, "top_p": 0.3}, {"temperature": 1.0}),
    ({"temperature": 1.0, "top_p": 1.0}, {"temperature": 1.0}),  # 1 turns off the checkpoint's top-p 0.9
    ({"temperature": 1.0, "min_p": 0.3}, {"temperature": 1.0}),
    ({"temperature": 0, "repetition_penalty": 3.0}, {"temperature": 0}),
    ({"temperature": 0, "presence_penalty": 3.0}, {"temperature": 0}),
], ids=lambda o: ",".join(o))
def test_cli_generate_passes_each_sampling_option_and_the_seed_as_the_python_api(options, without):
    expected = minqwen.generate(MODEL, TOKENIZER, GENERATE_PROMPT, max_new_tokens=16, seed=5, **options)
    # the option matters here (else this would check nothing)
    assert expected != minqwen.generate(MODEL, TOKENIZER, GENERATE_PROMPT, max_new_tokens=16, seed=5, **without)
    flags = [x for k, v in options.items() for x in (f"--{k.replace('_', '-')}", str(v))]
    result = run("generate", GENERATE_PROMPT, "--no-echo", "--max-new-tokens", "16", "--seed", "5", *flags)
    assert result.returncode == 0, result.stderr
    assert result.stdout == expected + "\n"


def test_cli_generate_echoes_the_prompt_only_without_no_echo():
    expected = minqwen.generate(MODEL, TOKENIZER, GENERATE_PROMPT, max_new_tokens=8, temperature=0)
    echoed = run("generate", GENERATE_PROMPT, "--max-new-tokens", "8", "--temperature", "0")
    bare = run("generate", GENERATE_PROMPT, "--no-echo", "--max-new-tokens", "8", "--temperature", "0")
    assert echoed.stdout == GENERATE_PROMPT + expected + "\n"
    assert bare.stdout == expected + "\n"


def test_cli_generate_chat_no_think_uses_the_no_thinking_prompt():
    messages = [{"role": "user", "content": "What is Python?"}]
    expected = minqwen.generate(MODEL, TOKENIZER, messages, max_new_tokens=16, temperature=0, enable_thinking=False)
    thinking = minqwen.generate(MODEL, TOKENIZER, messages, max_new_tokens=16, temperature=0, enable_thinking=True)
    assert expected != thinking and "<think>" not in expected and "</think>" not in expected
    result = run("generate", "What is Python?", "--chat", "--no-think", "--max-new-tokens", "16", "--temperature", "0")
    assert result.returncode == 0, result.stderr
    assert result.stdout == expected + "\n"


def shown_after_hiding(raw: str) -> str:
    """What --hide-thinking shows of an answer that starts inside <think>: the text after </think>."""
    return raw.split("</think>", 1)[1].lstrip("\n") if "</think>" in raw else ""


def test_cli_hide_thinking_prints_only_the_answer():
    session = ChatSession(MODEL, TOKENIZER, enable_thinking=True)
    greedy = SamplingParams.from_generation_config(TOKENIZER.generation_config, temperature=0)
    raw = "".join(session.reply("What is Python?", greedy, 24))
    assert "</think>" in raw, raw  # the reasoning is there to hide
    chat = run("chat", "--hide-thinking", "--max-new-tokens", "24", "--temperature", "0", stdin="What is Python?\n")
    assert chat.returncode == 0, chat.stderr
    assert chat.stdout == shown_after_hiding(raw) + "\n"
    messages = [{"role": "user", "content": "What is Python?"}]
    raw = minqwen.generate(MODEL, TOKENIZER, messages, max_new_tokens=24, temperature=0, enable_thinking=True)
    gen = run("generate", "What is Python?", "--chat", "--hide-thinking", "--max-new-tokens", "24", "--temperature", "0")
    assert gen.stdout == shown_after_hiding(raw) + "\n"
    # with --no-think the answer is not reasoning: nothing is hidden
    session = ChatSession(MODEL, TOKENIZER, enable_thinking=False)
    answer = "".join(session.reply("What is Python?", greedy, 24))
    assert answer.strip() and "<think>" not in answer and "</think>" not in answer
    chat = run("chat", "--no-think", "--hide-thinking", "--max-new-tokens", "24", "--temperature", "0",
               stdin="What is Python?\n")
    assert chat.stdout == answer + "\n"


def test_the_thinking_printer_hides_the_reasoning_token_by_token():
    import io

    from minqwen.cli import ThinkingPrinter

    raw = "Let me think about lists.\n</think>\n\nA list holds items."
    ids = TOKENIZER.encode(raw)
    out = io.StringIO()
    printer = ThinkingPrinter(hide=True, in_think=True, out=out)
    for i in ids:
        printer.write(TOKENIZER.decode([i]))
    printer.close()
    assert out.getvalue() == shown_after_hiding(raw)  # the answer's leading newlines too, piece by piece


def test_cli_chat_passes_system_seed_sampling_options_and_max_new_tokens_as_a_chat_session():
    turns = ["Hello!", "What is Python?"]
    system = "You are a terse assistant."
    params = SamplingParams.from_generation_config(TOKENIZER.generation_config, temperature=1.0, top_k=5,
                                                   repetition_penalty=1.5)

    def answers(with_system=True, seed=3, max_new_tokens=10):
        session = ChatSession(MODEL, TOKENIZER, enable_thinking=False)
        if with_system:
            session.messages.append({"role": "system", "content": system})
        return [("".join(session.reply(t, params, max_new_tokens, seed))) for t in turns]

    expected = answers()
    assert all("<think>" not in a and "</think>" not in a for a in expected)
    # each option matters here
    assert expected != answers(with_system=False) and expected != answers(seed=4)
    assert expected != answers(max_new_tokens=20)
    result = run("chat", "--no-think", "--system", system, "--temperature", "1", "--top-k", "5",
                 "--repetition-penalty", "1.5", "--seed", "3", "--max-new-tokens", "10", stdin="\n".join(turns) + "\n")
    assert result.returncode == 0, result.stderr
    assert result.stdout == "".join(a + "\n" for a in expected)


def test_cli_score_uses_the_window_and_stride_given(tmp_path):
    from minqwen.scoring import score_text

    text = "def add(a, b):\n    return a + b\n\nprint(add(1, 2))\n" * 4
    path = tmp_path / "sample.py"
    path.write_text(text)
    result = score_text(MODEL, TOKENIZER, text, window=16, stride=4)
    assert f"{result.perplexity:.4f}" != f"{score_text(MODEL, TOKENIZER, text, window=16).perplexity:.4f}"
    cli = run("score", str(path), "--window", "16", "--stride", "4")
    assert cli.returncode == 0, cli.stderr
    assert f"perplexity: {result.perplexity:.4f}" in cli.stdout
    assert f"bits per byte: {result.bits_per_byte:.4f}" in cli.stdout


def test_cli_score_scores_a_files_own_bytes_crlf_included_as_from_standard_input(tmp_path):
    # Read as text, "\r\n" became "\n": a path scored another text than the file (and than the
    # same file on standard input), over fewer bytes than it has.
    from minqwen.scoring import score_text

    data = b"import os\r\nimport sys\r\nprint(os.sep)\r\n"
    path = tmp_path / "crlf.py"
    path.write_bytes(data)
    result = score_text(MODEL, TOKENIZER, data.decode("utf-8"))
    assert result.n_bytes == len(data)
    expected = f"tokens scored: {result.tokens_scored}\nperplexity: {result.perplexity:.4f}\n" \
               f"bits per byte: {result.bits_per_byte:.4f}\n"
    from_path = subprocess.run([SCRIPT, "score", str(path)], capture_output=True, env=ENV, timeout=300)
    from_stdin = subprocess.run([SCRIPT, "score", "-"], input=data, capture_output=True, env=ENV, timeout=300)
    assert from_path.stdout.decode() == from_stdin.stdout.decode() == expected, from_path.stderr


@pytest.mark.parametrize("args, message", [(["--window", "1"], "--window must be ≥ 2 tokens, got 1"),
                                           (["--window", "8", "--stride", "8"], "--stride must be from 1 to --window"),
                                           (["--stride", "0"], "--stride must be from 1 to --window − 1")])
def test_cli_score_names_a_bad_window_or_stride_as_flags_before_the_model_loads(tmp_path, args, message):
    path = tmp_path / "a.py"
    path.write_text("import os\n")
    assert_clean_error(run("score", str(path), *args, "--model", "no/such/model"), message)


@pytest.mark.parametrize("command", ["generate", "chat", "inspect", "score"])
def test_cli_loads_the_weights_in_the_dtype_asked_for(monkeypatch, tmp_path, command):
    import io

    import minqwen.model
    from minqwen.cli import main

    loaded, load = [], minqwen.model.load
    monkeypatch.setattr(minqwen.model, "load", lambda *a, **k: (loaded.append(k.get("dtype")), load(*a, **k))[1])
    monkeypatch.setattr("sys.stdin", io.StringIO(""))
    path = tmp_path / "t.txt"
    path.write_text("def f(x):\n    return x\n")
    args = {"generate": ["hi", "--max-new-tokens", "1"], "chat": [], "inspect": [], "score": [str(path)]}[command]
    assert main([command, *args, "--dtype", "bfloat16"]) == 0
    assert loaded == ["bfloat16"]


@pytest.mark.parametrize("chat", [False, True])
def test_cli_generate_keeps_special_tokens_with_chat_and_drops_them_without(monkeypatch, capsys, chat):
    import importlib

    G = importlib.import_module("minqwen.generate")  # (minqwen.generate is also a function)
    from minqwen.cli import main

    hf = hf_tokenizers()
    ids = TOKENIZER.encode("ok <|vision_start|> done")  # no eos among them
    assert not set(ids) & set(TOKENIZER.eos_ids)
    real = G.stream_text
    monkeypatch.setattr(G, "stream_text", lambda *a, **k: real(*a, **{**k, "decode": lambda *_: iter(ids)}))
    args = ["generate", "hi", "--no-echo", "--max-new-tokens", str(len(ids))] + (["--chat", "--no-think"] if chat else [])
    assert main(args) == 0
    assert capsys.readouterr().out == hf.decode(ids, skip_special_tokens=not chat) + "\n"


def test_compile_note_reports_a_tenth_of_a_second_or_more():
    from types import SimpleNamespace

    from minqwen.cli import compile_note, compile_timer

    assert compile_note(compile_timer()) == ""  # no compile seen
    assert compile_note(SimpleNamespace(done=True, duration=0.04)) == ""
    assert compile_note(SimpleNamespace(done=True, duration=2.43)) == (
        " · of the above, 2.4 s compiling Numba kernels (once: Numba caches them on disk)")


def compile_a_new_kernel_slowly():
    """Make Numba compile a function it has never seen, each of its compiler passes 10 ms longer
    (≥ 0.1 s in all, whatever the machine): a compile the speed line must report."""
    import numba
    from numba.core import event

    class SlowPasses(event.Listener):
        def on_start(self, _):
            time.sleep(0.01)

        def on_end(self, _):
            pass

    with event.install_listener("numba:run_pass", SlowPasses()):
        assert numba.njit(lambda x: x * 2 + 1)(3) == 7  # a new function: compiled now, no cache


@pytest.mark.parametrize("command", ["generate", "chat"])
def test_the_speed_line_says_what_compiling_kernels_took(monkeypatch, capsys, command):
    """A kernel compiled during generation is counted and named; with every kernel already
    compiled (in this process, by a first run), the line says nothing of it."""
    import importlib
    import io

    G = importlib.import_module("minqwen.generate")
    from minqwen.cli import main

    def compiling_first(real):
        def wrapped(*args, **kwargs):
            compile_a_new_kernel_slowly()
            yield from real(*args, **kwargs)
        return wrapped

    args = {"generate": ["generate", "hi", "--max-new-tokens", "2"],
            "chat": ["chat", "--verbose", "--max-new-tokens", "2", "--no-think"]}[command]
    for compiles in (None, False, True):  # None: a first run, which may compile kernels not yet met
        if command == "chat":
            monkeypatch.setattr("sys.stdin", io.StringIO("hi\n"))
        if compiles:
            where, name = (G, "stream_text") if command == "generate" else (G.ChatSession, "reply")
            monkeypatch.setattr(where, name, compiling_first(getattr(where, name)))
        assert main(args) == 0
        err = capsys.readouterr().err
        if compiles is not None:
            assert ("s compiling Numba kernels (once: Numba caches them on disk)]" in err) == compiles, err


@pytest.mark.parametrize("command", ["generate", "chat"])
def test_kernels_are_loaded_before_the_prompt_is_timed(monkeypatch, capsys, command):
    """The throwaway one-token forward runs after loading and before generation; generate's
    line counts it in "load" (a compile there is named too), so "prefill" times the prompt alone."""
    import importlib
    import io

    import minqwen.cli as cli

    G = importlib.import_module("minqwen.generate")
    calls = []
    real_warm = cli.warm_kernels

    def warm(model):
        calls.append("warm")
        compile_a_new_kernel_slowly()
        time.sleep(0.3)
        real_warm(model)

    def first_generating(real):
        def wrapped(*args, **kwargs):
            calls.append("generate")
            yield from real(*args, **kwargs)
        return wrapped

    monkeypatch.setattr(cli, "warm_kernels", warm)
    if command == "generate":
        monkeypatch.setattr(G, "stream_text", first_generating(G.stream_text))
        assert cli.main(["generate", "hi", "--max-new-tokens", "2"]) == 0
    else:
        monkeypatch.setattr(G.ChatSession, "reply", first_generating(G.ChatSession.reply))
        monkeypatch.setattr("sys.stdin", io.StringIO("hi\n"))
        assert cli.main(["chat", "--verbose", "--max-new-tokens", "2", "--no-think"]) == 0
    assert calls == ["warm", "generate"]
    line = capsys.readouterr().err.strip().splitlines()[-1]
    if command == "generate":
        load = float(line.split("[load: ")[1].split(" s")[0])
        assert load >= 0.3, line  # the warm-up's time is loading's, not the prompt's
        assert "s compiling Numba kernels" in line, line


def test_an_interrupt_exits_130(monkeypatch, capsys):
    import minqwen.cli as cli

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "run_inspect", interrupted)
    assert cli.main(["inspect"]) == 130


def test_cli_generate_stops_at_a_stop_text_as_the_python_api():
    full = minqwen.generate(MODEL, TOKENIZER, GENERATE_PROMPT, max_new_tokens=16, temperature=0)
    stop = full[len(full) // 2:][:3]
    assert stop.strip() and stop in full
    expected = minqwen.generate(MODEL, TOKENIZER, GENERATE_PROMPT, max_new_tokens=16, temperature=0, stop=[stop])
    assert expected != full
    result = run("generate", GENERATE_PROMPT, "--no-echo", "--max-new-tokens", "16", "--temperature", "0", "--stop", stop)
    assert result.returncode == 0, result.stderr
    assert result.stdout == expected + "\n"


# ==================================================================== found by a newcomer's walk (December 5)

@pytest.mark.parametrize("args", [["chat"], ["generate"], ["score", "-"]])
def test_a_closed_standard_input_is_named_not_a_traceback(args):
    # `<&-`: Python then has sys.stdin = None (before: AttributeError on .isatty / .read)
    result = subprocess.run([sys.executable, "-m", "minqwen", *args],
                            capture_output=True, text=True, env=ENV, timeout=300, preexec_fn=lambda: os.close(0))
    assert result.returncode == 2, result.stderr
    assert_clean_error(result, "standard input is closed")


def test_a_closed_standard_error_does_not_send_messages_into_standard_output():
    result = subprocess.run([sys.executable, "-m", "minqwen", "generate", "hi", "--max-new-tokens", "2"],
                            capture_output=False, stdout=subprocess.PIPE, text=True, env=ENV, timeout=300,
                            preexec_fn=lambda: os.close(2))
    assert result.returncode == 0 and result.stdout.startswith("hi")
    assert "prefill" not in result.stdout and "minqwen:" not in result.stdout


def test_generate_dash_reads_the_prompt_from_standard_input():
    result = run("generate", "-", "--max-new-tokens", "4", "--temperature", "0", stdin="import os\n")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("import os\n")  # before: the prompt was the text "-"


def test_a_prompt_longer_than_the_context_is_refused_before_it_is_echoed():
    result = run("generate", "--max-new-tokens", "4", stdin="import os\n" * 1200)
    assert_clean_error(result, "beyond the model's context of 2048")
    assert result.stdout == ""  # before: the whole prompt went to stdout first


def test_sampling_options_that_greedy_decoding_ignores_are_warned_about():
    result = run("generate", "hi", "--max-new-tokens", "2", "--temperature", "0", "--top-k", "5", "--min-p", "0.1")
    assert result.returncode == 0, result.stderr
    assert "warning: --top-k, --min-p change nothing while decoding is greedy" in result.stderr
    quiet = run("generate", "hi", "--max-new-tokens", "2", "--temperature", "0.7", "--top-k", "5")
    assert "warning" not in quiet.stderr


def test_plain_chat_output_marks_the_reasoning_with_both_tags():
    result = run("chat", "--max-new-tokens", "40", "--temperature", "0", stdin="Hello!\n")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("<think>\n")  # the prompt opened it: before, only </think> showed
    if "</think>" in result.stdout:
        assert "</think>\n" in result.stdout


@pytest.mark.parametrize("args, message", [
    (["inspect", "--context", "99999"], "--context 99999 is beyond the model's context of 2048"),
    (["generate", "hi", "--model", str(EMBEDDED / "config.json")], "config.json: a file, not a folder"),
    (["--threads", "0", "inspect"], "--threads must be ≥ 1, got 0"),
    (["generate", "hi", "--stop", "\udcff"], "not UTF-8 text, so generated text can never match it"),
    (["generate", "caf\udce9"], "the byte \\xe9 at character 3, after 'caf'"),
    (["golden", "compare", str(EMBEDDED), str(EMBEDDED)], "a folder, not a file"),
])
def test_newcomer_mistakes_are_named_precisely(args, message):
    result = subprocess.run([sys.executable, "-m", "minqwen", *args], capture_output=True, env=ENV, timeout=300,
                            stdin=subprocess.DEVNULL)
    stderr = result.stderr.decode("utf-8", "backslashreplace")
    assert result.returncode == 2 and "Traceback" not in stderr
    assert message in stderr, stderr


def test_inspect_shows_the_cache_at_the_models_own_context_when_it_is_shorter_than_4096():
    result = run("inspect")
    assert result.returncode == 0, result.stderr
    assert "at a context of 2,048 tokens" in result.stdout


def test_golden_compare_takes_a_port_file_with_other_writers_metadata(tmp_path):
    from safetensors.numpy import save_file

    from minqwen import golden

    reference = tmp_path / "reference.safetensors"
    assert run("golden", "record", "--model", str(EMBEDDED), "--tokens", "1,2,3", "--taps", "logits",
               "--out", str(reference)).returncode == 0
    recorded = golden.load_recording(reference)
    port = tmp_path / "port.safetensors"
    save_file({"logits": recorded.tensors["logits"], "token_ids": recorded.tensors["token_ids"]}, str(port),
              metadata={"format": "pt", "config_sha256": json_text(recorded.config_sha256),
                        "token_ids": json_text(recorded.token_ids)})
    result = run("golden", "compare", str(port), str(reference))
    assert result.returncode == 0, result.stderr  # before: "metadata 'format' is not JSON text"


def json_text(value):
    import json

    return json.dumps(value)


class TypedLines:
    """Standard input as a person at a terminal: isatty, a line at a time, then end of input."""

    def __init__(self, lines):
        self.lines = list(lines)

    def isatty(self):
        return True

    def readline(self):
        return self.lines.pop(0) if self.lines else ""


def test_an_interactive_chat_turn_that_fails_is_reported_and_the_chat_goes_on(monkeypatch, capsys):
    import minqwen.cli as cli

    # A line holding bytes that are not UTF-8 (Python's surrogate stand-in), a message the
    # session refuses (an image token in a chat without images), then a good one.
    monkeypatch.setattr(sys, "stdin", TypedLines(["caf\udce9\n", "Look: <|image_pad|>\n", "Hello!\n"]))
    assert cli.main(["chat", "--no-think", "--max-new-tokens", "6", "--temperature", "0"]) == 0
    out, err = capsys.readouterr()
    assert "that message is not valid Unicode: the byte \\xe9 at character 3, after 'caf'" in err
    assert "this chat has no images" in err and "that message was not added to the conversation" in err
    assert out.strip()  # the last message was answered (before: the first ended the chat, exit 2)


def test_one_new_token_reports_no_decode_rate_rather_than_zero():
    result = run("generate", "hi", "--max-new-tokens", "1")
    assert result.returncode == 0, result.stderr
    assert "decode: 1 tokens, no rate (one token)" in result.stderr  # before: "0.0 tok/s"


def test_golden_record_with_mtp_refuses_taps_that_select_none_of_the_heads(tmp_path):
    result = run("golden", "record", "--model", str(EMBEDDED), "--tokens", "1,2,3", "--mtp", "--taps", "embed",
                 "--out", str(tmp_path / "x.safetensors"))
    assert_clean_error(result, "--mtp: --taps 'embed' selects none of the MTP head's taps")
    assert not (tmp_path / "x.safetensors").exists()


def test_golden_record_finds_its_model_as_the_other_commands_do(tmp_path):
    # the embedded model by default (before: --model was required), a hub id through the cache
    result = run("golden", "record", "--tokens", "1,2,3", "--taps", "logits", "--out", str(tmp_path / "e.safetensors"))
    assert result.returncode == 0, result.stderr
    assert "recorded 1 taps" in result.stdout
    assert_clean_error(run("golden", "record", "--model", "org/nothing", "--tokens", "1,2", "--out",
                           str(tmp_path / "x.safetensors")), "org/nothing: not in the local Hugging Face cache")


@pytest.mark.parametrize("name", ["model.safetensors", "config.json"])
def test_golden_record_refuses_to_write_over_a_file_of_the_checkpoint_it_records(tmp_path, name):
    folder = tmp_path / "embedded"
    shutil.copytree(EMBEDDED, folder)
    before = (folder / name).read_bytes()
    result = run("golden", "record", "--model", str(folder), "--tokens", "1,2", "--out", str(folder / name))
    assert_clean_error(result, f"--out {folder / name}: is a file of the checkpoint being recorded")
    assert (folder / name).read_bytes() == before


# ==================================================================== a review of the changes above

def test_an_empty_system_message_changes_nothing():
    args = ("chat", "--no-think", "--max-new-tokens", "12", "--temperature", "0")
    plain, empty = run(*args, stdin="Hello!\n"), run(*args, "--system", "", stdin="Hello!\n")
    assert plain.returncode == empty.returncode == 0, empty.stderr
    assert empty.stdout == plain.stdout


NO_OPEN_TEMPLATE = ("{%- for message in messages %}{{- '<|im_start|>' + message.role + '\\n' + message.content + "
                    "'<|im_end|>\\n' }}{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
                    "{%- endif %}")


@pytest.mark.parametrize("command", ["generate", "chat"])
def test_the_opening_tag_is_printed_only_when_the_prompt_opened_the_reasoning(tmp_path, command):
    folder = tmp_path / "ckpt"
    shutil.copytree(EMBEDDED, folder)
    (folder / "chat_template.jinja").write_text(NO_OPEN_TEMPLATE)
    options = ["--model", str(folder), "--temperature", "0", "--max-new-tokens", "12"]
    result = (run("generate", "--chat", "Hello, how are you?", *options) if command == "generate"
              else run("chat", *options, stdin="Hello, how are you?\n"))
    assert result.returncode == 0, result.stderr
    # The prompt opened nothing, so the model writes <think> itself: printed once, not twice
    assert result.stdout.count("<think>") <= 1, result.stdout


def test_an_answer_without_text_prints_no_opening_tag():
    import io

    from minqwen.cli import ThinkingPrinter

    screen = io.StringIO()
    printer = ThinkingPrinter(hide=False, in_think=True, out=screen)
    printer.write("")  # stream_text's last piece, when an eos or a stop text comes first
    printer.close()
    assert screen.getvalue() == ""


def test_a_chat_prompt_that_is_not_utf8_is_placed_in_the_prompt_not_in_the_template():
    for args, what in ((["generate", "--chat", "caf\udce9"], "the prompt"), (["chat", "--system", "ab\udcffc"], "--system")):
        result = subprocess.run([sys.executable, "-m", "minqwen", *args], capture_output=True, env=ENV, timeout=300,
                                stdin=subprocess.DEVNULL)
        stderr = result.stderr.decode("utf-8", "backslashreplace")
        assert result.returncode == 2 and "Traceback" not in stderr
        assert f"{what} is not valid Unicode" in stderr and "im_start" not in stderr, stderr


def test_the_greedy_warning_names_the_real_reason(tmp_path):
    import json

    folder = tmp_path / "ckpt"
    shutil.copytree(EMBEDDED, folder)
    config = json.loads((folder / "generation_config.json").read_text())
    (folder / "generation_config.json").write_text(json.dumps({**config, "do_sample": True, "temperature": 0}))
    result = run("generate", "hi", "--model", str(folder), "--top-k", "5", "--max-new-tokens", "2")
    assert result.returncode == 0, result.stderr
    assert "warning: --top-k changes nothing while decoding is greedy (the checkpoint's generation_config.json " \
           "sets temperature 0)" in result.stderr, result.stderr


def test_a_prompt_one_token_past_the_context_is_refused_before_it_is_echoed(monkeypatch, capsys):
    # The boundary of the check above: 2,049 tokens for the embedded model's 2,048 positions
    import minqwen.cli as cli

    monkeypatch.setattr(Tokenizer, "encode", lambda self, text: [1] * 2049)
    assert cli.main(["generate", "hi", "--max-new-tokens", "2"]) == 2
    out, err = capsys.readouterr()
    assert "the prompt is 2049 tokens, beyond the model's context of 2048" in err and out == ""


def test_token_ids_the_model_lacks_are_refused_before_the_prompt_is_echoed(monkeypatch, capsys):
    import minqwen.cli as cli

    encode = Tokenizer.encode
    monkeypatch.setattr(Tokenizer, "encode", lambda self, text: encode(self, text) + [4096])
    assert cli.main(["generate", "hi", "--max-new-tokens", "2"]) == 2
    out, err = capsys.readouterr()
    assert "token id 4096, outside the model's vocabulary (vocab_size 4096" in err and out == ""


# ==================================================================== --tokens and --context at their edges


@pytest.mark.parametrize("text", ["151644,872,198", "151644 872 198", " 151644, 872,\t198 ", "151644\n872 ,198"])
def test_token_ids_may_be_separated_by_commas_spaces_or_both(text):
    # --help promises "comma- or space-separated" ids
    from minqwen.cli import parse_token_ids

    assert parse_token_ids(text) == [151644, 872, 198]


def test_inspect_takes_a_context_of_exactly_the_models_own():
    # The embedded model's context is 2,048 positions: a cache of all of them is the largest allowed.
    result = run("inspect", "--context", "2048")
    assert result.returncode == 0, result.stderr
    assert "at a context of 2,048 tokens" in result.stdout


@pytest.mark.parametrize("variable, value, message", [
    ("NUMBA_NUM_THREADS", "0", "NUMBA_NUM_THREADS is '0': it must be a whole number ≥ 1"),
    ("NUMBA_THREADING_LAYER", "garbage", "NUMBA_THREADING_LAYER is 'garbage': Numba knows default"),
    ("NUMBA_DISABLE_JIT", "1", "NUMBA_DISABLE_JIT is set: minqwen's kernels need Numba's compiler"),
])
def test_numba_environment_variables_of_no_use_are_named_at_import(variable, value, message):
    # Checked as `import minqwen` runs, before Numba reads them (its own errors are ValueErrors
    # deep inside its import or first kernel). The command line's handler does not exist yet
    # then, so this one error still comes with Python's traceback, ending in the message.
    result = subprocess.run([sys.executable, "-m", "minqwen", "--version"], capture_output=True, text=True,
                            env=dict(ENV, **{variable: value}), timeout=300)
    assert result.returncode != 0
    assert f"MinqwenError: the environment variable {message}" in result.stderr.splitlines()[-1]


def test_an_ascii_only_output_shows_question_marks_and_input_is_still_read_as_utf8():
    # (before: a UnicodeEncodeError traceback, and UTF-8 input called "not UTF-8 text")
    env = dict(ENV, PYTHONIOENCODING="ascii")
    result = subprocess.run([sys.executable, "-m", "minqwen", "generate", "café", "--max-new-tokens", "2"],
                            capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("caf?")
    chat = subprocess.run([sys.executable, "-m", "minqwen", "chat", "--max-new-tokens", "2"], input="café\n",
                          capture_output=True, text=True, encoding="utf-8", env=env, timeout=300)
    assert chat.returncode == 0 and "not UTF-8" not in chat.stderr, chat.stderr


def test_chat_says_when_an_answer_fills_the_context_and_refuses_a_system_message_that_leaves_no_room():
    tokenizer = Tokenizer(EMBEDDED)
    context = minqwen.load(EMBEDDED).config.max_position_embeddings

    def prompt_tokens(words: int) -> int:
        text = tokenizer.render_chat([{"role": "user", "content": "word " * words}], enable_thinking=False)
        return len(tokenizer.encode(text))

    words = next(n for n in range(context, 0, -1) if prompt_tokens(n) <= context - 3)  # room for 3 tokens
    result = run("chat", "--no-think", "--temperature", "0", "--max-new-tokens", "50", stdin="word " * words + "\n")
    assert result.returncode == 0, result.stderr
    assert f"[the answer was cut short: the conversation has filled the model's context of {context} tokens" \
        in result.stderr
    result = run("chat", "--system", "word " * context, stdin="hi\n")
    assert_clean_error(result, "--system: the system message leaves no room in the model's context")


def test_score_refuses_a_device_and_chat_names_an_empty_image_option(tmp_path):
    if os.path.exists("/dev/zero"):  # it never ends: before, score read until memory ran out
        assert_clean_error(run("score", "/dev/zero"), "/dev/zero: a device, not a text file")
    assert_clean_error(run("chat", "--image", "", stdin=""), "--image needs a path")


def test_a_golden_file_gets_the_mode_any_new_file_gets(tmp_path):
    # safetensors writes a private temporary file (600) and renames it; a golden file is for sharing
    umask = os.umask(0)
    os.umask(umask)
    out = tmp_path / "g.safetensors"
    assert run("golden", "record", "--tokens", "1,2", "--taps", "logits", "--out", str(out)).returncode == 0
    assert out.stat().st_mode & 0o777 == 0o666 & ~umask
