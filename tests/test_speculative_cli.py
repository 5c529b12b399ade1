"""`--speculative` and `--dtype` in the console script: the same text, the acceptance line, clean errors."""

import numpy as np
from safetensors.numpy import load_file, save_file

from minqwen.checkpoint import EMBEDDED
from test_cli import assert_clean_error, run

PROMPT = "def parse_args"


def greedy(*extra):
    return run("generate", PROMPT, "--max-new-tokens", "24", "--temperature", "0", *extra)


def speculation_line(stderr):
    """The stats line's ' · speculative: …' part (drafts, acceptance, tokens per pass), or None."""
    return next((part for line in stderr.splitlines() for part in line.split(" · ") if part.startswith("speculative:")),
                None)


def test_speculation_prints_the_same_greedy_text_and_on_the_tiny_embedded_model_is_on_when_greedy():
    default, one = greedy(), greedy("--speculative")
    two, off = greedy("--speculative", "2"), greedy("--speculative", "0")
    for result in (default, one, two, off):
        assert result.returncode == 0, result.stderr
    assert default.stdout == one.stdout == two.stdout == off.stdout
    assert "drafts accepted" in one.stderr and "drafts accepted" in two.stderr
    assert "speculative" not in off.stderr
    # Greedy, a small model drafts two tokens a pass unless told (mtp.default_draft_tokens):
    # the same drafts, so the same counts, as --speculative 2.
    assert speculation_line(default.stderr) == speculation_line(two.stderr) != speculation_line(one.stderr)
    # Sampling (the embedded model's generation config), it decodes plainly unless told.
    sampled = run("generate", PROMPT, "--max-new-tokens", "8", "--seed", "0")
    assert sampled.returncode == 0 and "speculative" not in sampled.stderr, sampled.stderr


def test_a_speculative_chat_over_stdin_answers_as_a_plain_one():
    turns = "Hello!\nWhat is Python?\n"
    args = ("chat", "--no-think", "--max-new-tokens", "12", "--temperature", "0", "--verbose")
    spec, plain = run(*args, "--speculative", stdin=turns), run(*args, "--speculative", "0", stdin=turns)
    assert spec.returncode == 0 and plain.returncode == 0, spec.stderr + plain.stderr
    assert spec.stdout == plain.stdout and spec.stdout.count("\n") >= 2
    assert spec.stderr.count("drafts accepted") == 2  # one line per turn


def without_mtp(tmp_path):
    """The embedded checkpoint with its mtp.* tensors left out."""
    folder = tmp_path / "no_mtp"
    folder.mkdir()
    for path in EMBEDDED.iterdir():
        if path.suffix != ".safetensors":
            (folder / path.name).write_bytes(path.read_bytes())
    tensors = load_file(str(EMBEDDED / "model.safetensors"))
    kept = {name: np.ascontiguousarray(value) for name, value in tensors.items() if not name.startswith("mtp.")}
    assert len(kept) < len(tensors)
    save_file(kept, str(folder / "model.safetensors"))
    return folder


def test_without_an_mtp_head_plain_decoding_runs_and_asking_for_speculation_says_why(tmp_path):
    folder = without_mtp(tmp_path)
    plain = run("generate", PROMPT, "--max-new-tokens", "4", "--model", str(folder))
    assert plain.returncode == 0 and "speculative" not in plain.stderr, plain.stderr
    assert_clean_error(run("generate", PROMPT, "--speculative", "--model", str(folder)), "needs an MTP head")
    assert_clean_error(run("chat", "--speculative", "2", "--model", str(folder), stdin="Hi\n"), "needs an MTP head")


def test_a_negative_draft_count_is_a_clean_error():
    assert_clean_error(run("generate", PROMPT, "--speculative", "-1"), "--speculative")
    assert_clean_error(run("generate", PROMPT, "--speculative", "two"), "--speculative")


def test_dtype_bfloat16_keeps_half_the_bytes_resident_and_generates():
    import re

    def resident_mib(*extra):
        result = run("inspect", *extra)
        assert result.returncode == 0, result.stderr
        return float(re.search(r"([\d.]+) MiB resident", result.stdout).group(1))

    assert resident_mib("--dtype", "bfloat16") < 0.6 * resident_mib()  # matrices bf16; norms stay float32
    result = greedy("--dtype", "bfloat16")
    assert result.returncode == 0 and result.stdout.startswith(PROMPT), result.stderr
    assert_clean_error(run("generate", PROMPT, "--dtype", "float16"), "--dtype")
