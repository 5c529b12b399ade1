"""tools/compare_with_transformers.py (issue #11): one command checks minqwen against transformers.

* on fixtures — dense text-only, multimodal MoE with fused experts, and an FP8 copy — it passes:
  exit code 0, max |Δlogits| within tolerance, identical greedy tokens;
* on a corrupted copy (one tensor of layer k changed, rewritten with safetensors.numpy) that
  minqwen reads while transformers reads the pristine fixture (``--reference-model``: what a
  minqwen loader bug would look like) it fails, exit code 1, naming layer k's first tap;
* prompts come from tokenizer.json, from --tokens or at random; errors exit 2 with a message.

The real-shape run (python tools/real_shape.py make, then the tool on scratch/…) is a manual
figure, not part of the test suite.
"""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import minqwen
from conftest import FIXTURES, ROOT, fixture_with_word_tokenizer, require_reference

pytestmark = pytest.mark.reference
TOOL = ROOT / "tools" / "compare_with_transformers.py"
FIXTURE_ATOL = "1e-4"  # tiny fixtures: fp32 round-off stays far below it


@pytest.fixture(scope="module")
def tool():
    require_reference()
    spec = importlib.util.spec_from_file_location("compare_with_transformers", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run(tool, capsys, *args):
    code = tool.main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def prompt_logit_diff(out: str) -> float:
    return float(re.search(r"logits over the prompt:\s+max \|Δ\| = (\S+)", out).group(1))


def fixture_ids(name) -> str:
    return ",".join(str(int(t)) for t in load_file(str(FIXTURES / name / "expected.safetensors"))["token_ids"])


@pytest.mark.parametrize("name", ["text_tied_fp32", "moe_multimodal_fused_top1"])
def test_it_passes_on_fixtures_with_logits_within_tolerance_and_identical_greedy_tokens(tool, capsys, name):
    code, out, _ = run(tool, capsys, "--model", FIXTURES / name, "--tokens", fixture_ids(name), "--new-tokens", 4,
                       "--atol", FIXTURE_ATOL)
    assert code == 0, out
    assert prompt_logit_diff(out) <= 1e-4
    assert "greedy: 4 of 4 tokens identical" in out
    assert out.rstrip().endswith("PASS")


def test_the_bf16_resident_mode_passes_on_a_bf16_fixture_with_a_prompt_of_many_rows(tool, capsys):
    # 32 random ids: the prompt's products take the many-row path (three bf16 parts on AMX
    # tiles where the CPU has them, else widened weights and BLAS), held to the fp32 tolerance.
    name = "text_grouped_bf16_bias"
    code, out, _ = run(tool, capsys, "--model", FIXTURES / name, "--dtype", "bfloat16", "--new-tokens", 3,
                       "--atol", FIXTURE_ATOL)
    assert code == 0, out
    assert "minqwen: weights kept bfloat16" in out and "prompt: 32 tokens" in out
    assert prompt_logit_diff(out) <= 1e-4


def test_from_the_shell_it_exits_0_on_random_ids_by_default(tool):
    done = subprocess.run([sys.executable, str(TOOL), "--model", str(FIXTURES / "text_grouped_bf16_bias"),
                           "--new-tokens", "3", "--atol", FIXTURE_ATOL], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "prompt: 32 tokens (random ids, seed 0)" in done.stdout
    assert "reference: transformers Qwen3_5ForCausalLM, fp32, eager" in done.stdout


def test_it_passes_on_an_fp8_checkpoint(tool, capsys, tmp_path):
    spec = importlib.util.spec_from_file_location("quantize_fp8", ROOT / "tools" / "quantize_fp8.py")
    quantize_fp8 = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(quantize_fp8)
    folder = tmp_path / "fp8"
    quantize_fp8.quantize_checkpoint(FIXTURES / "text_tied_fp32", folder, (16, 16), "bfloat16")
    code, out, _ = run(tool, capsys, "--model", folder, "--new-tokens", 4, "--atol", FIXTURE_ATOL)
    assert code == 0, out
    assert "FP8, blocks [16, 16]" in out


@pytest.mark.parametrize("block", [(16, 32), (32, 16), (8, 24)])
def test_fp8_blocks_that_transformers_would_misread_are_refused_before_it_loads(tool, capsys, tmp_path, block):
    """Blocks that leave a short last block (the fixture's matrices have 48 and 64 rows or columns):
    minqwen loads them, but transformers would take the block as shape ÷ grid and misread the
    scales (a false FAIL) or stop with its own traceback. The tool says why, exit 2."""
    spec = importlib.util.spec_from_file_location("quantize_fp8", ROOT / "tools" / "quantize_fp8.py")
    quantize_fp8 = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(quantize_fp8)
    folder = tmp_path / "fp8"
    quantize_fp8.quantize_checkpoint(FIXTURES / "text_tied_fp32", folder, block, "bfloat16")
    minqwen.load(folder)  # minqwen reads it
    code, _, err = run(tool, capsys, "--model", folder, "--new-tokens", 1, "--atol", FIXTURE_ATOL)
    assert code == 2
    assert f"FP8 blocks {list(block)} do not divide" in err and "transformers 5.23.0" in err


# (layer, tensor, the first tap it changes): every element of the tensor gets + 0.05.
CORRUPTIONS = [
    (2, "mlp.down_proj.weight", "layers.2.mlp"),
    (3, "self_attn.v_proj.weight", "layers.3.self_attn.v"),
]


@pytest.mark.parametrize("layer, tensor, first", CORRUPTIONS)
def test_a_corrupted_copy_fails_naming_the_first_tap_of_the_changed_layer(tool, capsys, tmp_path, layer, tensor, first):
    pristine = FIXTURES / "text_tied_fp32"
    corrupted = tmp_path / "corrupted"
    corrupted.mkdir()
    shutil.copy(pristine / "config.json", corrupted / "config.json")
    tensors = load_file(str(pristine / "model.safetensors"))
    tensors[f"model.layers.{layer}.{tensor}"] += np.float32(0.05)
    save_file(tensors, str(corrupted / "model.safetensors"), metadata={"format": "pt"})

    code, out, _ = run(tool, capsys, "--model", corrupted, "--reference-model", pristine,
                       "--tokens", fixture_ids("text_tied_fp32"), "--new-tokens", 2, "--atol", FIXTURE_ATOL,
                       "--keep", tmp_path / "recordings")
    assert code == 1, out
    assert prompt_logit_diff(out) > 1e-4
    assert f"first diverging tap: {first}\n" in out
    assert any(line.startswith(f"  >> {first} ") for line in out.splitlines()), out
    assert (tmp_path / "recordings" / "minqwen.safetensors").is_file()
    assert "minqwen golden compare" in out
    assert out.rstrip().endswith("FAIL")


def test_a_prompt_is_tokenized_with_the_checkpoints_tokenizer_json(tool, capsys, tmp_path):
    folder = fixture_with_word_tokenizer(tmp_path)

    code, out, _ = run(tool, capsys, "--model", folder, "--prompt", "hello world hello", "--new-tokens", 2,
                       "--atol", FIXTURE_ATOL)
    assert code == 0, out
    assert "prompt: 3 tokens (tokenizer.json)" in out


@pytest.mark.parametrize("args, message", [
    (["--prompt", "hello"], "no tokenizer.json, so --prompt cannot be tokenized; give ids with --tokens"),
    (["--tokens", "1,x"], "not a list of token ids"),
    (["--tokens", "1,999"], "outside the vocabulary"),
    (["--new-tokens", "-1"], "--new-tokens must be ≥ 0"),
    (["--reference-model", FIXTURES / "multimodal_sharded"], "hold different model configs"),
    (["--seed", "-1"], "--seed must be ≥ 0"),
    (["--keep", FIXTURES / "text_tied_fp32" / "config.json"], "is a file; give a folder"),
    (["--random-tokens", "600"], "600 tokens (random ids, seed 0) and --new-tokens 16 pass the model's context of 512"),
])
def test_errors_exit_2_with_a_message(tool, capsys, args, message):
    code, out, err = run(tool, capsys, "--model", FIXTURES / "text_tied_fp32", *args)
    assert code == 2
    assert message in err
    assert "Traceback" not in err
