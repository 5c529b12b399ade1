"""The scripts in tools/ refuse bad arguments with a one-line error naming the argument.

Each case runs the script as a reader would (``python tools/NAME.py …``) and checks the exit
code, that the message names the argument or file, and that no traceback was printed. Every
check happens before the script does any work, so these run in about a second each; where a
regression would start real work (a benchmark, a training run, a fixture rebuild), the case
also passes arguments that keep that work small and away from the repository's files.
"""

import argparse
import ast
import importlib.util
import json
import os
import shutil
import subprocess
import sys

import pytest

import minqwen

from conftest import FIXTURES, ROOT, require_reference

TOOLS = ROOT / "tools"
FIXTURE = FIXTURES / "text_tied_fp32"


def run_tool(script, *args, cwd, env=None, timeout=120):
    return subprocess.run([sys.executable, str(TOOLS / script), *map(str, args)], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout, env=env)


def hiding(folder, *packages):
    """An environment in which ``packages`` fail to import, as if not installed: packages of those
    names that raise, first on PYTHONPATH (which reaches spawned worker processes too)."""
    for name in packages:
        (folder / "stub" / name).mkdir(parents=True)
        (folder / "stub" / name / "__init__.py").write_text(f"raise ImportError('no {name}: hidden by a test')\n")
    return dict(os.environ, PYTHONPATH=os.pathsep.join([str(folder / "stub"), str(TOOLS), str(ROOT)]))


def assert_refused(result, *names, code=2):
    assert result.returncode == code, result.stdout + result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    for name in names:
        assert name in last, last


@pytest.fixture
def paths(tmp_path):
    """A file, a folder with no config.json, and a place to write, in a scratch folder."""
    (tmp_path / "a_file").write_text("not a folder")
    (tmp_path / "empty").mkdir()
    return tmp_path


# ---------------------------------------------------------------------------- --help

def test_every_option_and_subcommand_of_the_tools_says_what_it_does():
    # Read from the source (running each --help would need torch for some): every
    # add_argument and add_parser call passes help=.
    silent = []
    for script in sorted(TOOLS.glob("*.py")):
        for node in ast.walk(ast.parse(script.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", "") in ("add_argument", "add_parser") \
                    and "help" not in {keyword.arg for keyword in node.keywords}:
                silent.append(f"{script.name}:{node.lineno}")
    assert not silent, f"options without help= text: {', '.join(silent)}"


# ---------------------------------------------------------------------------- argtypes.py


def _argtypes():
    spec = importlib.util.spec_from_file_location("argtypes", TOOLS / "argtypes.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_argtypes_bounds_are_inclusive_at_both_ends():
    # "in 1 … 8192", "≥ 0 and ≤ 1": the bounds themselves are valid values (compare_with_llama_cpp's
    # --tokens 8192, mtp_figures' --acceptance 1), the next value past either is refused.
    argtypes = _argtypes()
    tokens, acceptance = argtypes.whole_number(1, 8192), argtypes.real_number(0, 1)
    assert (tokens("1"), tokens("8192")) == (1, 8192)
    assert (acceptance("0"), acceptance("1")) == (0.0, 1.0)
    for parse, text in ((tokens, "0"), (tokens, "8193"), (acceptance, "-1e-9"), (acceptance, "1.000001")):
        with pytest.raises(argparse.ArgumentTypeError):
            parse(text)


# ---------------------------------------------------------------------------- bench.py

# --model FIXTURE and --quick --no-transformers on every case: were a check missing, the run
# would be a short one on the tiny fixture, never the real-shape checkpoint.
BENCH_SAFE = ["--model", FIXTURE, "--quick", "--no-transformers"]


@pytest.mark.parametrize("args, names", [
    (["--threads", "0"], ["--threads", "≥ 1"]),
    (["--threads", "two"], ["--threads", "'two'"]),
    (["--repeats", "0"], ["--repeats", "≥ 1"]),
    (["--long-context", "-1"], ["--long-context", "≥ 0"]),
    (["--gguf", "missing.gguf"], ["--gguf", "missing.gguf", "no such file"]),
    (["--gguf", "empty"], ["--gguf", "is a folder"]),
    (["--json", "no_folder/out.json"], ["--json", "does not exist"]),
    (["--json", "empty"], ["--json", "is a folder"]),
])
def test_bench_refuses_bad_counts_and_paths_before_it_measures(paths, args, names):
    assert_refused(run_tool("bench.py", *BENCH_SAFE, *args, cwd=paths), *names)


@pytest.mark.parametrize("model, names", [
    ("missing", ["--model", "no such folder"]),
    ("a_file", ["--model", "is a file"]),
    ("empty", ["--model", "no config.json"]),
])
def test_bench_refuses_a_model_that_is_not_a_checkpoint_folder(paths, model, names):
    assert_refused(run_tool("bench.py", "--model", model, "--quick", "--no-transformers", cwd=paths), *names)


@pytest.mark.parametrize("config, names", [("{}", ["--model", "field 'model_type' is None"]),
                                           ("not json", ["--model", "not valid JSON"])])
def test_bench_names_a_config_that_is_no_qwen35_config_before_it_measures(paths, config, names):
    # (before: KeyError 'vocab_size', JSONDecodeError, and with --cold-start-only a CalledProcessError)
    (paths / "empty" / "config.json").write_text(config)
    for extra in ([], ["--cold-start-only"]):
        assert_refused(run_tool("bench.py", "--model", "empty", "--quick", "--no-transformers", *extra, cwd=paths),
                       *names, code=1)


# ---------------------------------------------------------------------------- quantize_fp8.py


@pytest.mark.parametrize("args, names", [
    (["missing", "out"], ["src", "missing", "no such folder"]),
    (["a_file", "out"], ["src", "is a file"]),
    (["empty", "out"], ["src", "no config.json"]),
    ([FIXTURE, "a_file"], ["out", "is a file"]),
    ([FIXTURE, "a_file/out"], ["out", "is a file, not a folder"]),
    ([FIXTURE, "out", "--spread", "-1"], ["--spread", "≥ 0"]),
    ([FIXTURE, "out", "--seed", "-1"], ["--seed", "≥ 0"]),
    ([FIXTURE, "out", "--block", "0", "16"], ["--block", "≥ 1"]),
])
def test_quantize_fp8_refuses_bad_arguments(paths, args, names):
    assert_refused(run_tool("quantize_fp8.py", *args, cwd=paths), *names)
    assert not (paths / "out").exists()


def test_quantize_fp8_refuses_to_write_over_its_source(paths):
    source = paths / "source"
    shutil.copytree(FIXTURE, source)
    before = sorted(p.name for p in source.iterdir())
    assert_refused(run_tool("quantize_fp8.py", source, source / ".", cwd=paths), "OUT is the source folder", code=1)
    assert sorted(p.name for p in source.iterdir()) == before
    assert (source / "config.json").read_text() == (FIXTURE / "config.json").read_text()


def test_quantize_fp8_refuses_a_spread_whose_scales_overflow_the_scale_dtype(paths):
    # Before: the scales became inf, every weight quantized to 0, and the tool exited 0.
    result = run_tool("quantize_fp8.py", FIXTURE, "out", "--spread", "200", "--scale-dtype", "float16",
                      "--block", "16", "16", cwd=paths)
    assert_refused(result, "--spread 200", "float16", code=1)
    assert not (paths / "out" / "model.safetensors").exists()


def test_quantize_fp8_takes_a_block_larger_than_every_matrix_as_one_block_over_each(paths):
    # as the loader reads it; before: the padding to whole blocks asked for terabytes
    result = run_tool("quantize_fp8.py", FIXTURE, "out", "--block", "999999999999", "999999999999", cwd=paths)
    assert result.returncode == 0, result.stderr
    assert minqwen.load(paths / "out").config.quantization.weight_block_size == (999999999999, 999999999999)


def test_quantize_fp8_names_a_source_config_that_is_not_json(paths):
    (paths / "empty" / "config.json").write_text("{not json")
    assert_refused(run_tool("quantize_fp8.py", "empty", "out", cwd=paths), "config.json", "not valid JSON")


# ---------------------------------------------------------------------------- real_shape.py

# --out in the scratch folder: were a check missing, nothing is written into scratch/.
@pytest.mark.parametrize("args, names", [
    (["--experts", "0"], ["--experts", "≥ 1"]),
    (["--top-k", "0"], ["--top-k", "≥ 1"]),
    (["--experts", "8", "--top-k", "9"], ["--top-k 9", "--experts 8"]),
    (["--layers", "0"], ["--layers", "≥ 1"]),
])
def test_real_shape_make_moe_refuses_impossible_shapes(paths, args, names):
    assert_refused(run_tool("real_shape.py", "make-moe", "--out", paths / "moe", *args, cwd=paths, timeout=60), *names)


def test_real_shape_refuses_an_out_that_is_a_file(paths):
    assert_refused(run_tool("real_shape.py", "make", "--out", "a_file", cwd=paths), "--out", "is a file")


# mtp-parity: refused before anything is built; were a check missing, --out and --only dense would keep
# the work out of scratch/ (a later --only replaces the first).
@pytest.mark.parametrize("args, names", [
    (["--layers", "3"], ["--layers 3", "multiple of 4"]),  # the last main layer must be full attention
    (["--layers", "0"], ["--layers", "≥ 1"]),
    (["--top-k", "33"], ["--top-k 33", "--experts 32"]),  # mtp-parity's own default expert count
    (["--experts", "8", "--top-k", "9"], ["--top-k 9", "--experts 8"]),
    (["--experts", "0"], ["--experts", "≥ 1"]),
    (["--only", "both"], ["--only", "invalid choice"]),
])
def test_real_shape_mtp_parity_refuses_impossible_shapes(paths, args, names):
    result = run_tool("real_shape.py", "mtp-parity", "--out", paths / "dense", "--only", "dense", *args, cwd=paths,
                      timeout=60)
    assert_refused(result, *names)


def test_real_shape_only_belongs_to_mtp_parity(paths):
    assert_refused(run_tool("real_shape.py", "make", "--out", paths / "dense", "--only", "dense", cwd=paths),
                   "--only", "mtp-parity")


@pytest.mark.parametrize("what", ["make", "parity", "vision-parity"])
@pytest.mark.parametrize("option", [["--layers", "2"], ["--experts", "3"], ["--top-k", "2"]])
def test_real_shape_refuses_the_moe_options_where_they_would_change_nothing(paths, what, option):
    # (before: `make --layers 2` built the whole 1.5 GB checkpoint)
    assert_refused(run_tool("real_shape.py", what, "--out", paths / "none", *option, cwd=paths),
                   option[0], "options of make-moe and mtp-parity")
    assert not (paths / "none").exists()


def test_real_shape_refuses_to_reuse_a_folder_holding_another_checkpoint(paths):
    # (before: "reusing", then an IndexError from token ids past the other model's vocabulary)
    require_reference()
    shutil.copytree(FIXTURE, paths / "other")
    assert_refused(run_tool("real_shape.py", "parity", "--out", paths / "other", cwd=paths),
                   "holds another checkpoint", "vocab_size", code=1)


def test_real_shape_make_moe_keeps_256_experts_by_default(paths):
    # --top-k 200 passes make-moe's expert check (256 by default; mtp-parity's 32 would refuse it),
    # so the refusal comes from the check after it
    assert_refused(run_tool("real_shape.py", "make-moe", "--out", paths / "moe", "--top-k", "200", "--only", "moe",
                            cwd=paths), "--only", "mtp-parity")


# --out in the scratch folder here too: were a check missing, the checkpoint would not land in scratch/.
@pytest.mark.parametrize("args, names", [
    (["--vision-config", "1b"], ["--vision-config", "'1b'", "0.8b"]),
    (["--blocks", "0"], ["--blocks", "≥ 1"]),
    (["--blocks", "two"], ["--blocks", "'two'"]),
    (["--blocks", "13"], ["--blocks 13", "≤ 12", "0.8b"]),
    (["--vision-config", "4b", "--blocks", "25"], ["--blocks 25", "≤ 24", "4b"]),
])
def test_real_shape_vision_parity_refuses_towers_that_do_not_exist(paths, args, names):
    assert_refused(run_tool("real_shape.py", "vision-parity", "--out", paths / "vision", *args, cwd=paths, timeout=60),
                   *names)


def test_real_shape_vision_parity_refuses_an_out_that_is_a_file(paths):
    assert_refused(run_tool("real_shape.py", "vision-parity", "--out", "a_file", cwd=paths), "--out", "is a file")


@pytest.mark.parametrize("what, option", [("make", ["--blocks", "2"]), ("parity", ["--vision-config", "27b"]),
                                          ("make-moe", ["--blocks", "2"]),
                                          ("mtp-parity", ["--blocks", "2", "--only", "dense", "--layers", "3"])])
def test_real_shape_vision_options_are_refused_outside_vision_parity(paths, what, option):
    # `make --blocks 2` must not quietly build the 1.5 GB text checkpoint, ignoring what was asked.
    # (mtp-parity's --layers 3: were the check missing, its own refusal instead of a build.)
    result = run_tool("real_shape.py", what, "--out", paths / "out", *option, cwd=paths, timeout=60)
    assert_refused(result, option[0], "vision-parity")
    assert not (paths / "out").exists()


def test_real_shape_vision_parity_refuses_a_folder_holding_another_tower(paths):
    require_reference()  # the check runs where the checkpoint would be built, after torch is imported
    (paths / "empty" / "config.json").write_text(json.dumps({"vision_config": dict(
        depth=3, hidden_size=768, num_heads=12, intermediate_size=3072)}))
    result = run_tool("real_shape.py", "vision-parity", "--out", "empty", cwd=paths)
    assert_refused(result, "another vision tower", "0.8b", "12 blocks", code=1)


def test_real_shape_vision_parity_fails_a_report_beyond_its_tolerances():
    """The PASS/FAIL judge on made-up reports: no checkpoint is built."""
    sys.path.insert(0, str(TOOLS))
    import real_shape

    def figures(diff, scale=1.0):
        return {"max_abs_diff": diff, "scale": scale, "relative": diff / scale}

    good = {"preprocessing": {"a": {"grid_thw_equal": True, "pixel_values_max_abs_diff": 0.0}},
            "tower": {"per_image": [figures(1e-6)] * len(real_shape.TOWER_IMAGES), "together": figures(1e-6)},
            "prompt": {"position_ids_equal": True, "rope_delta_equal": True, "logits": figures(5e-4, 70.0),
                       "decode_steps": figures(1e-4, 70.0), "greedy_tokens_identical": 8, "greedy_tokens": 8}}
    assert real_shape.vision_passed(good) == []
    bad = {"preprocessing": {"a": {"grid_thw_equal": True, "pixel_values_max_abs_diff": 1 / 255}},
           "tower": {"per_image": good["tower"]["per_image"], "together": figures(3e-2, 0.8)},
           "prompt": dict(good["prompt"], logits=figures(0.1, 70.0), greedy_tokens_identical=5)}
    failures = real_shape.vision_passed(bad)
    assert len(failures) == 4, failures
    assert any("preprocessing of a" in f for f in failures)
    assert any("all images in one call" in f for f in failures)
    assert any(f.startswith("logits") for f in failures)
    assert any("5 of 8" in f for f in failures)


# ---------------------------------------------------------------------------- moe_figure.py


@pytest.mark.parametrize("args, names", [
    (["--steps", "0"], ["--steps", "≥ 1"]),
    (["--all-steps", "-1"], ["--all-steps", "≥ 1"]),
    (["--threads", "0"], ["--threads", "≥ 1"]),
    (["--json", "no_folder/figure.json"], ["--json", "does not exist"]),
    (["--only", "64"], ["--quick", "--only"]),  # before: nothing measured, exit 0
    (["--steps", "5"], ["--quick", "--steps"]),  # before: silently 3 steps
])
def test_moe_figure_refuses_bad_arguments_before_it_builds_checkpoints(paths, args, names):
    assert_refused(run_tool("moe_figure.py", "--quick", *args, cwd=paths), *names)


def test_moe_figure_names_threads_beyond_what_numba_was_started_with(paths):
    env = dict(os.environ, NUMBA_NUM_THREADS="1")
    assert_refused(run_tool("moe_figure.py", "--quick", "--threads", "2", cwd=paths, env=env), "--threads 2",
                   "NUMBA_NUM_THREADS")


# ---------------------------------------------------------------------------- mtp_figures.py


@pytest.mark.parametrize("args, names", [
    (["--threads", "0", "embedded"], ["--threads", "≥ 1"]),
    (["real", "--repeats", "0"], ["--repeats", "≥ 1"]),
    (["real", "--checkpoint", "empty"], ["--checkpoint", "no config.json"]),
    (["split", "--rounds", "0"], ["--rounds", "≥ 1"]),
    (["embedded", "--new-tokens", "1"], ["--new-tokens", "≥ 2"]),
    (["embedded", "--prompts", "0"], ["--prompts", "≥ 1"]),
    (["embedded", "--model", "missing"], ["--model", "no such folder"]),
    (["depth", "--layers", "8", "3"], ["--layers", "≥ 4"]),
    (["depth", "--acceptance", "1.5"], ["--acceptance", "≤ 1"]),
    (["depth", "--acceptance", "nan"], ["--acceptance", "nan"]),
    (["depth", "--repeats", "0"], ["--repeats", "≥ 1"]),
])
def test_mtp_figures_refuses_bad_arguments(paths, args, names):
    assert_refused(run_tool("mtp_figures.py", *args, cwd=paths), *names)


@pytest.mark.parametrize("mode", ["real", "split"])
def test_mtp_figures_says_how_to_make_a_missing_default_checkpoint(tmp_path, mode):
    # A copy of the script in a scratch tree, whose scratch/ holds no checkpoint (the
    # repository's may): the default --checkpoint must go through the same check as a given one.
    (tmp_path / "tools").mkdir()
    shutil.copy(TOOLS / "mtp_figures.py", tmp_path / "tools" / "mtp_figures.py")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(TOOLS), str(ROOT)]))
    result = subprocess.run([sys.executable, str(tmp_path / "tools" / "mtp_figures.py"), mode], cwd=tmp_path,
                            capture_output=True, text=True, timeout=120, env=env)
    assert_refused(result, "--checkpoint", "no such folder", "python tools/real_shape.py make")


@pytest.mark.parametrize("args", [["--threads", "1", "embedded"], ["embedded", "--threads", "1"]])
def test_mtp_figures_takes_threads_before_or_after_the_subcommand(paths, args):
    # (after it, argparse called --threads an unrecognized argument); a two-token run of one prompt
    result = run_tool("mtp_figures.py", *args, "--prompts", "1", "--new-tokens", "2", cwd=paths)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[0] == "threads: 1", result.stdout


def test_mtp_figures_reports_a_model_it_cannot_use_in_one_line(paths):
    # The fixture has no tokenizer.json: minqwen's error, printed without a traceback.
    assert_refused(run_tool("mtp_figures.py", "embedded", "--model", FIXTURE, cwd=paths), "tokenizer.json")


# ---------------------------------------------------------------------------- train_embedded.py

# --out, --work and --corpus in the scratch folder: were a check missing, the run would never
# write over minqwen/embedded.
def train_args(paths, *args):
    return [str(a) for a in ("--out", paths / "out", "--work", paths / "work", "--corpus", paths / "corpus", *args)]


@pytest.fixture(scope="module")
def train_embedded():
    require_reference()  # it imports torch and transformers at the top
    spec = importlib.util.spec_from_file_location("train_embedded", TOOLS / "train_embedded.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("args, names", [
    (["--minutes", "-1"], ["--minutes", "≥ 0"]),  # before: the training loop never ended
    (["--from-checkpoint"], ["--from-checkpoint", "checkpoint.pt"]),  # before: FileNotFoundError
])
def test_train_embedded_refuses_bad_arguments_before_it_trains(paths, args, names):
    require_reference()
    assert_refused(run_tool("train_embedded.py", *train_args(paths, *args), cwd=paths), *names)
    assert not (paths / "out").exists() and not (paths / "corpus").exists()


# The same checks, in this process: each script run costs seconds of importing torch.
@pytest.mark.parametrize("args, names", [
    (["--steps", "-1"], ["--steps", "≥ 0"]),  # before: the training loop never ended
    (["--minutes", "0"], ["--minutes", "--steps"]),  # before: ZeroDivisionError
    (["--minutes", "nan"], ["--minutes", "nan"]),
    (["--threads", "0"], ["--threads", "≥ 1"]),
    (["--seq-len", "5"], ["--seq-len", "≥ 10"]),  # before: IndexError in the causality check
    (["--log-every", "0"], ["--log-every", "≥ 1"]),  # before: ZeroDivisionError after the first step
    (["--lr", "-0.001"], ["--lr", "> 0"]),
    (["--warmup", "2"], ["--warmup", "≤ 1"]),
    (["--batch-size", "0"], ["--batch-size", "≥ 1"]),
    (["--out", "a_file"], ["--out", "is a file"]),
    (["--seed", "99999999999999999999999"], ["--seed", "in 0 …"]),  # before: torch's overflow ValueError
])
def test_train_embedded_arguments_are_checked_when_parsed(train_embedded, paths, capsys, monkeypatch, args, names):
    monkeypatch.chdir(paths)
    with pytest.raises(SystemExit) as exit_:
        train_embedded.parse_args(train_args(paths, *args))
    assert exit_.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert all(name in last for name in names), last


def test_train_embedded_refuses_a_seq_len_longer_than_the_token_stream(train_embedded):
    with pytest.raises(SystemExit, match="--seq-len 10: .* longer than a token stream of 5"):
        train_embedded.windows([1, 2, 3, 4, 5], 12, 10)


def test_train_embedded_names_a_corpus_built_without_dialogs(paths):
    # Before: "--seq-len 256: a window of 258 tokens is longer than a token stream of 0".
    require_reference()
    assert run_tool("build_corpus.py", "--out", paths / "corpus", "--no-dialogs", cwd=paths).returncode == 0
    result = run_tool("train_embedded.py", *train_args(paths, "--steps", "1"), cwd=paths, timeout=300)
    assert_refused(result, "no dialog documents", "--no-dialogs", code=1)
    assert not (paths / "out").exists()


# ---------------------------------------------------------------------------- build_corpus.py


@pytest.mark.parametrize("args, names", [
    (["--dialog-wheel", "missing.whl"], ["--dialog-wheel", "no such file"]),
    (["--dialog-wheel", "empty"], ["--dialog-wheel", "is a folder"]),
    (["--out", "a_file"], ["--out", "is a file"]),
])
def test_build_corpus_refuses_bad_paths(paths, args, names):
    assert_refused(run_tool("build_corpus.py", "--out", paths / "corpus", *args, cwd=paths), *names)


def test_build_corpus_refuses_a_dialog_wheel_that_is_not_the_pinned_one(paths):
    # Before: it was read unchecked while the manifest recorded the pinned wheel's hash.
    (paths / "other.whl").write_bytes(b"not the pinned wheel")
    result = run_tool("build_corpus.py", "--out", paths / "corpus", "--dialog-wheel", "other.whl", cwd=paths)
    assert_refused(result, "other.whl", "is not the pinned", code=1)
    assert not (paths / "corpus" / "manifest.json").exists()


# ---------------------------------------------------------------------------- qwen_vocab_tokenizer.py


@pytest.mark.parametrize("out, names", [
    ("a_file", ["--out", "is a file"]),
    ("no_folder/tokenizer.json", ["--out", "does not exist"]),
])
def test_qwen_vocab_tokenizer_refuses_an_out_it_cannot_write(paths, out, names):
    assert_refused(run_tool("qwen_vocab_tokenizer.py", "--out", out, cwd=paths), *names)


# ---------------------------------------------------------------------------- make_mtp_fixtures.py


@pytest.mark.parametrize("args, names", [
    (["missing", "target"], ["source", "no such folder"]),
    (["empty", "target"], ["source", "no config.json"]),
    ([FIXTURE, "a_file"], ["target", "is a file"]),
    ([FIXTURE, "target", "--seed", "-1"], ["--seed", "≥ 0"]),
])
def test_make_mtp_fixtures_refuses_bad_arguments(paths, args, names):
    assert_refused(run_tool("make_mtp_fixtures.py", *args, cwd=paths), *names)
    assert not (paths / "target").exists()


def test_make_mtp_fixtures_refuses_to_write_the_head_into_its_source(paths):
    source = paths / "source"
    shutil.copytree(FIXTURE, source)
    assert_refused(run_tool("make_mtp_fixtures.py", source, source, cwd=paths), "is the source folder")
    assert not (source / "mtp.safetensors").exists()


# ---------------------------------------------------------------------------- scripts without options


@pytest.mark.parametrize("script", ["make_fixtures.py", "make_vision_fixtures.py", "tap_overhead.py"])
def test_scripts_without_options_refuse_unknown_ones_instead_of_running(tmp_path, script):
    if script != "tap_overhead.py":
        require_reference()
    # A copy of the script in a scratch tree: were the check missing, the fixtures it would
    # rebuild are the scratch tree's (tmp_path/tests/…), never the repository's.
    (tmp_path / "tools").mkdir()
    shutil.copy(TOOLS / script, tmp_path / "tools" / script)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(TOOLS), str(ROOT)]))
    result = subprocess.run([sys.executable, str(tmp_path / "tools" / script), "--bogus"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=120, env=env)
    assert_refused(result, "--bogus")
    assert not (tmp_path / "tests").exists()


# ---------------------------------------------------------------------------- family_shapes.py

@pytest.mark.parametrize("args, names", [
    (["5B"], ["MEMBER", "'5B'", "0.8B"]),
    (["--vocab", "1"], ["--vocab", "in 2 … 1048576"]),
    (["--vocab", "999999999999"], ["--vocab", "in 2 … 1048576"]),
    (["--out", "a_file"], ["--out", "is a file"]),
])
def test_family_shapes_refuses_bad_arguments(paths, args, names):
    assert_refused(run_tool("family_shapes.py", *args, cwd=paths), *names)


def test_family_shapes_configs_are_ones_minqwen_reads_with_the_widths_asked_for():
    sys.path.insert(0, str(TOOLS))
    import family_shapes

    from minqwen.config import config_from_dict

    for name, widths in family_shapes.MEMBERS.items():
        raw = family_shapes.text_config(name, 4096)
        moe = "num_experts" in raw
        c = config_from_dict({**raw, "model_type": "qwen3_5_moe_text" if moe else "qwen3_5_text"}, name)
        assert (c.hidden_size, c.num_hidden_layers, c.vocab_size) == (widths["hidden_size"], widths["layers"], 4096)
        assert c.layer_types[-1] == "full_attention" and c.is_moe == moe
        assert c.linear_num_value_heads == widths["linear_num_value_heads"] and c.head_dim == 256


# ---------------------------------------------------------------------------- compare_with_llama_cpp.py

@pytest.mark.parametrize("args, names", [
    (["--tokens", "0"], ["--tokens", "1 … 8192"]),
    (["--tokens", "10", "--prompt-tokens", "11"], ["--prompt-tokens", "11", "--tokens 10"]),
    (["--atol", "0"], ["--atol", "> 0"]),
    (["--gguf", "missing.gguf"], ["--gguf", "missing.gguf", "no such file"]),
])
def test_compare_with_llama_cpp_refuses_bad_arguments(paths, args, names):
    base = {"--model": FIXTURE, "--gguf": paths / "a_file"}
    base.update(dict(zip(args[::2], args[1::2])))
    assert_refused(run_tool("compare_with_llama_cpp.py", *[x for kv in base.items() for x in kv], cwd=paths), *names)


def test_compare_with_llama_cpp_says_how_to_get_llama_cpp_when_it_is_missing(paths):
    # A llama_cpp package that fails to import stands in for one not installed (CI has none;
    # a developer's machine may).
    env = hiding(paths, "llama_cpp")
    result = run_tool("compare_with_llama_cpp.py", "--model", FIXTURE, "--gguf", paths / "a_file", cwd=paths, env=env)
    assert_refused(result, "llama-cpp-python is not installed", "pip install llama-cpp-python==0.3.36")


# ---------------------------------------------------------------------------- tools that need the reference

def without_the_reference(folder):
    """An environment as on a machine with minqwen's test extra alone: no torch, no transformers."""
    return hiding(folder, "torch", "transformers")


@pytest.mark.parametrize("script, args", [
    ("real_shape.py", ["make", "--out", "out"]),
    ("real_shape.py", ["parity", "--out", "out"]),
    ("real_shape.py", ["vision-parity", "--out", "out"]),
    ("family_shapes.py", ["--out", "out"]),
    ("moe_figure.py", ["--quick"]),
    ("train_embedded.py", ["--help"]),
    ("distill_mtp.py", ["--help"]),
    ("make_fixtures.py", []),
    ("make_vision_fixtures.py", []),
])
def test_tools_that_need_the_reference_say_how_to_install_it(paths, script, args):
    # (each ended in a ModuleNotFoundError traceback from its first `import torch`). The fixture
    # builders run as copies in a scratch tree: were the check missing, they could not write the
    # repository's fixtures.
    (paths / "tools").mkdir()
    shutil.copy(TOOLS / script, paths / "tools" / script)
    result = subprocess.run([sys.executable, str(paths / "tools" / script), *args], cwd=paths, capture_output=True,
                            text=True, timeout=120, env=without_the_reference(paths))
    assert_refused(result, f"{script}: error", "needs the reference", "pip install -e '.[reference]'")
    assert not (paths / "out").exists() and not (paths / "tests").exists()


def test_bench_in_a_python_without_minqwens_dependencies_says_to_install_minqwen(paths):
    result = run_tool("bench.py", "--model", FIXTURE, "--quick", "--no-transformers", cwd=paths,
                      env=hiding(paths, "numba"))
    assert_refused(result, "do not import in this Python", "no numba", "pip install -e .")


def test_bench_without_transformers_says_to_install_it_or_leave_it_out(paths):
    result = run_tool("bench.py", "--model", FIXTURE, "--quick", cwd=paths, env=without_the_reference(paths),
                      timeout=300)
    assert_refused(result, "transformers does not import", "pip install -e '.[reference]'", "--no-transformers",
                   code=1)


def test_oldest_requirements_turns_each_lower_bound_into_a_pin():
    sys.path.insert(0, str(ROOT / "tools"))
    from oldest_requirements import oldest

    assert oldest("numba>=0.59") == "numba==0.59"
    assert oldest("ml_dtypes>=0.3,!=0.7.0") == "ml_dtypes==0.3"
    assert oldest("safetensors >= 0.4.3") == "safetensors==0.4.3"
    with pytest.raises(SystemExit, match="no single '>=' lower bound"):
        oldest("numpy")
