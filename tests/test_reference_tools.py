"""Tests of the reference builders (tools/reference.py, make_fixtures.py,
make_vision_fixtures.py, make_mtp_fixtures.py) and tools/compare_with_transformers.py.

What the committed-fixture tests cannot see: they read files a builder wrote once, so a
builder that stopped randomizing a tensor, gave two tensors the same value, or recorded its
"expected" outputs from somewhere other than transformers passes every test until someone
rebuilds — and the in-process reference lanes compare minqwen with a model built by the same
builder, so they pass on such a model too. These tests run the builders themselves and check
their output against transformers' own defaults, against each other, against the committed
fixtures and against transformers' plain forward pass.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from conftest import FIXTURE_NAMES, FIXTURES, ROOT, require_reference, tensor_headers

pytestmark = pytest.mark.reference
TOOLS = ROOT / "tools"
ATOL = 1e-4


def load_tool(name):
    require_reference()  # puts tools/ on sys.path, skips without torch/transformers
    spec = importlib.util.spec_from_file_location(f"tool_{name}", TOOLS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def params(model) -> dict[str, np.ndarray]:
    return {name: p.detach().float().numpy().copy() for name, p in model.named_parameters()}


# ============================================================================ builders: every tensor random

SMALL_DENSE = dict(
    vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=4, num_attention_heads=2,
    num_key_value_heads=1, head_dim=16, hidden_act="silu", max_position_embeddings=256, rms_norm_eps=1e-6,
    attention_bias=True, linear_conv_kernel_dim=3, linear_key_head_dim=8, linear_value_head_dim=8,
    linear_num_key_heads=2, linear_num_value_heads=4, tie_word_embeddings=False,
    layer_types=["linear_attention", "full_attention", "linear_attention", "full_attention"],
    rope_parameters=dict(rope_type="default", rope_theta=10000.0, partial_rotary_factor=0.5),
)
SMALL_MOE = {**{k: v for k, v in SMALL_DENSE.items() if k != "intermediate_size"},
             "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 16,
             "shared_expert_intermediate_size": 24}


@pytest.fixture(scope="module", params=[("dense", False), ("dense", True), ("moe", False)],
                ids=["dense", "dense-multimodal", "moe"])
def built(request):
    """(randomized parameters, transformers' default parameters) for one small config."""
    reference = require_reference()
    from unittest import mock

    kind, multimodal = request.param
    text = SMALL_MOE if kind == "moe" else SMALL_DENSE
    randomized = params(reference.build_model(dict(text), seed=3, multimodal=multimodal))
    with mock.patch.object(reference, "randomize", lambda model, seed: None):  # transformers' own init
        default = params(reference.build_model(dict(text), seed=3, multimodal=multimodal))
    return randomized, default


def test_every_parameter_the_builder_makes_is_non_constant_and_not_transformers_default(built):
    # Fails when a norm weight is left at zeros, the gated norm at ones, dt_bias at ones or a
    # bias at zeros (transformers' defaults), or when any tensor is a single repeated value.
    randomized, default = built
    assert randomized.keys() == default.keys()
    for name, value in randomized.items():
        assert np.unique(value).size > 1 or value.size == 1, f"{name} holds one value"
        assert not np.array_equal(value, default[name]), f"{name} kept transformers' default"


def pairs(names, a, b):
    return [(n, n.replace(a, b)) for n in names if n.endswith(a) and n.replace(a, b) in names]


def test_tensors_a_port_could_swap_get_different_values(built):
    # Fails when q_norm equals k_norm, up_proj equals gate_proj, in_proj_b equals in_proj_a,
    # the two decoder norms are equal, or A_log / dt_bias repeat between heads or layers:
    # with equal values, a port that swaps them (or forgets the head index) matches the fixtures.
    randomized, _ = built
    names = set(randomized)
    swaps = (pairs(names, "self_attn.q_norm.weight", "self_attn.k_norm.weight")
             + pairs(names, "mlp.gate_proj.weight", "mlp.up_proj.weight")
             + pairs(names, "shared_expert.gate_proj.weight", "shared_expert.up_proj.weight")
             + pairs(names, "linear_attn.in_proj_a.weight", "linear_attn.in_proj_b.weight")
             + pairs(names, "input_layernorm.weight", "post_attention_layernorm.weight"))
    assert len(swaps) >= 6
    for a, b in swaps:
        assert not np.allclose(randomized[a], randomized[b]), f"{a} and {b} are equal"
    for what in ("linear_attn.A_log", "linear_attn.dt_bias"):
        per_layer = [v for n, v in sorted(randomized.items()) if n.endswith(what)]
        assert len(per_layer) == 2
        for value in per_layer:
            assert np.unique(value).size == value.size, f"{what}: two heads share a value"
        assert not np.allclose(per_layer[0], per_layer[1]), f"{what} is the same in every layer"
    fused = [n for n in names if n.endswith("experts.gate_up_proj")]
    for n in fused:  # [E, 2I, H]: gate rows first, up rows second, and experts differ
        value = randomized[n]
        half = value.shape[1] // 2
        assert not np.allclose(value[:, :half], value[:, half:]), f"{n}: gate equals up"
        assert not np.allclose(value[0], value[1]), f"{n}: experts 0 and 1 are equal"


def test_the_vision_towers_layernorms_and_biases_are_random_and_not_their_defaults():
    # Fails when make_vision_fixtures leaves a LayerNorm at its default (weight ones, bias zeros).
    require_reference()
    mv = load_tool("make_vision_fixtures")
    model = mv.build_vision_model(mv.tiny_text(), mv.tiny_vision(), seed=5)
    visual = params(model.model.visual)
    norms = [n for n in visual if "norm" in n]
    assert len(norms) >= 6
    for name in norms:
        value = visual[name]
        assert np.unique(value).size > 1, f"visual.{name} holds one value"
    weights = [visual[n] for n in norms if n.endswith(".weight")]
    assert not np.allclose(weights[0], weights[1])


def test_the_mtp_builder_gives_its_two_input_norms_and_its_q_k_norms_different_random_values():
    # Fails when pre_fc_norm_embedding equals pre_fc_norm_hidden (a port that swaps the
    # embedding and hidden halves of fc's input would then pass), or q_norm equals k_norm.
    reference = require_reference()
    mtp_tools = load_tool("make_mtp_fixtures")
    text = {**SMALL_DENSE, "attention_bias": False}
    main = reference.build_model(text, seed=4)
    tensors = mtp_tools.mtp_checkpoint_tensors(mtp_tools.build_mtp_model(main, 1, seed=4))
    emb, hid = tensors["mtp.pre_fc_norm_embedding.weight"], tensors["mtp.pre_fc_norm_hidden.weight"]
    for name, value in tensors.items():
        assert np.unique(value).size > 1, f"{name} holds one value"
    assert not np.allclose(emb, hid)
    assert not np.allclose(tensors["mtp.layers.0.self_attn.q_norm.weight"], tensors["mtp.layers.0.self_attn.k_norm.weight"])
    assert not np.allclose(tensors["mtp.norm.weight"], emb) and not np.allclose(tensors["mtp.norm.weight"], hid)


def test_save_checkpoint_edits_the_text_config_inside_the_wrapper_and_the_wrapper_itself_apart(tmp_path):
    # multimodal_sharded and multimodal_bf16_untied are made this way, and neither is rebuilt
    # below: per save_checkpoint's docstring, extra_config / drop_config edit text_config and
    # drop_top_config the wrapper, never the other way round.
    reference = require_reference()
    model = reference.build_model(dict(SMALL_DENSE), seed=3, multimodal=True, tie=False)
    reference.save_checkpoint(model, tmp_path, extra_config={"full_attention_interval": 2},
                              drop_config=("layer_types",), drop_top_config=("tie_word_embeddings",))
    cfg = json.loads((tmp_path / "config.json").read_text())
    text = cfg["text_config"]
    assert "tie_word_embeddings" not in cfg and "tie_word_embeddings" in text
    assert text["full_attention_interval"] == 2 and "full_attention_interval" not in cfg
    assert "layer_types" not in text


# ============================================================================ a fixture rebuilt


REBUILT = ["text_tied_fp32", "moe_text_fused_all_experts_bf16"]


@pytest.fixture(scope="module")
def rebuilt(tmp_path_factory):
    """REBUILT fixtures written again by tools/make_fixtures.py, into a scratch folder."""
    require_reference()
    mf = load_tool("make_fixtures")
    out = tmp_path_factory.mktemp("rebuilt")
    mf.FIXTURES = out
    for seed, (name, (text, how)) in enumerate(mf.FIXTURE_SPECS.items(), start=1):
        if name in REBUILT:
            mf.build_fixture(name, text, how, seed)
    return out


def stored_bytes(folder: Path) -> dict[str, bytes]:
    import torch

    out = {}
    for path in sorted(folder.glob("*.safetensors")):
        if path.name == "expected.safetensors":
            continue
        with safe_open(str(path), "pt") as f:
            for name in f.keys():
                out[name] = f.get_tensor(name).contiguous().view(-1).view(torch.uint8).numpy().tobytes()
    return out


@pytest.mark.parametrize("name", REBUILT)
def test_a_rebuilt_fixture_has_the_committed_weights_bit_for_bit_and_its_outputs_to_round_off(rebuilt, name):
    # Fails when the committed expected.safetensors is stale for its weights or config, and when
    # the builder records something else (a layer's input as its output, the wrong end of the
    # conv state, a bf16 fixture's reference run on unrounded weights).
    assert json.loads((rebuilt / name / "config.json").read_text()) == \
        json.loads((FIXTURES / name / "config.json").read_text())
    assert stored_bytes(rebuilt / name) == stored_bytes(FIXTURES / name)
    fresh = load_file(str(rebuilt / name / "expected.safetensors"))
    committed = load_file(str(FIXTURES / name / "expected.safetensors"))
    assert fresh.keys() == committed.keys()
    for key in committed:
        if committed[key].dtype.kind in "iu":
            assert np.array_equal(fresh[key], committed[key]), key
        else:
            np.testing.assert_allclose(fresh[key], committed[key], rtol=0, atol=ATOL, err_msg=key)


def header(path: Path) -> dict[str, str]:
    with safe_open(str(path), "np") as f:
        return f.metadata()


@pytest.mark.parametrize("name", REBUILT)
def test_a_rebuilt_fixture_records_the_committed_seed_and_config_in_its_header(rebuilt, name):
    # The header is what tells a reader (and the test below) how a fixture was made: it must
    # name the seed and config the weights really came from, as the committed one does.
    assert header(rebuilt / name / "expected.safetensors") == header(FIXTURES / name / "expected.safetensors")


def test_make_fixtures_main_builds_every_committed_fixture_from_the_seed_and_config_in_its_header(
        monkeypatch, tmp_path):
    # The rebuild above numbers the seeds itself, so a main() that numbered them otherwise (or
    # changed the config of a fixture not rebuilt here) would pass it, and a rebuild would
    # silently replace every fixture's weights. Independent side: the committed headers.
    mf = load_tool("make_fixtures")
    asked = {}
    monkeypatch.setattr(mf, "FIXTURES", tmp_path)
    monkeypatch.setattr(mf, "build_fixture", lambda name, text, how, seed: asked.__setitem__(name, (text, seed)))
    mf.main([])
    assert sorted(asked) == FIXTURE_NAMES
    for name, (text, seed) in asked.items():
        recorded = header(FIXTURES / name / "expected.safetensors")
        assert int(recorded["seed"]) == seed, name
        assert json.loads(recorded["text_config"]) == json.loads(json.dumps(text)), name


def test_make_fixtures_specs_say_how_each_committed_fixture_is_stored():
    # The storage half of each spec (dtype, shards, fused experts, key layout) for the fixtures
    # not rebuilt here, read back from the committed files' headers: a spec edited away from
    # what was committed would change those fixtures at the next rebuild.
    mf = load_tool("make_fixtures")
    for name, (_, how) in mf.FIXTURE_SPECS.items():
        folder = FIXTURES / name
        headers = tensor_headers(folder)
        assert {stored for stored, _ in headers.values()} == {"F32" if how["dtype"] == "float32" else "BF16"}, name
        assert (folder / "model.safetensors.index.json").is_file() == (how.get("max_shard_size") is not None), name
        assert any(n.endswith("experts.gate_up_proj") for n in headers) == how.get("fused_experts", False), name
        assert any(".language_model." in n for n in headers) == how["multimodal"], name


def test_make_vision_fixtures_main_builds_every_committed_fixture_from_the_seed_and_configs_in_its_header(
        monkeypatch, tmp_path):
    # As for make_fixtures; its seeds were picked by hand (SEEDS), so a typo there is the risk.
    # The tie is recorded at the wrapper's top level, not in the header's text_config.
    mv = load_tool("make_vision_fixtures")
    asked = {}
    monkeypatch.setattr(mv, "FIXTURES", tmp_path)
    monkeypatch.setattr(mv, "build_fixture", lambda name, spec, seed: asked.__setitem__(name, (spec, seed)))
    mv.main([])
    committed = ROOT / "tests" / "fixtures_vision"
    assert sorted(asked) == sorted(p.name for p in committed.iterdir() if (p / "expected.safetensors").is_file())
    for name, ((text, vision, *_), seed) in asked.items():
        recorded = header(committed / name / "expected.safetensors")
        assert int(recorded["seed"]) == seed, name
        text = {k: v for k, v in text.items() if k != "tie_word_embeddings"}
        assert json.loads(recorded["text_config"]) == json.loads(json.dumps(text)), name
        assert json.loads(recorded["vision_config"]) == json.loads(json.dumps(vision)), name


@pytest.mark.parametrize("name", REBUILT)
def test_the_recorded_outputs_are_transformers_forward_pass_on_the_saved_checkpoint(rebuilt, name):
    # The expected logits, layer outputs and final norm must be what transformers' own forward
    # (output_hidden_states) gives on the checkpoint as saved, to far below minqwen's 1e-5-ish
    # distance from it — fails when the builder records minqwen's outputs, a hook's input, or
    # runs the reference on weights other than the stored ones. The conv state is checked
    # against the last K−1 rows of in_proj_qkv applied to the normed layer input.
    import torch

    reference = require_reference()
    folder = rebuilt / name
    expected = load_file(str(folder / "expected.safetensors"))
    hf = reference.load_pretrained(folder)
    ids = torch.tensor(expected["token_ids"][None])
    with torch.no_grad():
        out = hf(input_ids=ids, output_hidden_states=True)
    hidden = [h[0].numpy() for h in out.hidden_states]  # embeddings, layer 0 … L−2 outputs, final norm
    np.testing.assert_allclose(expected["logits"], out.logits[0].numpy(), rtol=0, atol=1e-6)
    n_layers = len(hidden) - 1
    for i in range(n_layers - 1):
        np.testing.assert_allclose(expected[f"hidden.{i}"], hidden[i + 1], rtol=0, atol=1e-6, err_msg=f"layer {i}")
    np.testing.assert_allclose(expected["norm"], hidden[-1], rtol=0, atol=1e-6)
    inner = hf.model.language_model if hasattr(hf.model, "language_model") else hf.model
    checked = 0
    with torch.no_grad():
        for i, layer in enumerate(inner.layers):
            if inner.config.layer_types[i] != "linear_attention":
                continue
            k = inner.config.linear_conv_kernel_dim
            qkv = layer.linear_attn.in_proj_qkv(layer.input_layernorm(out.hidden_states[i]))[0].numpy()
            np.testing.assert_allclose(expected[f"state.{i}.conv"], qkv[-(k - 1):], rtol=0, atol=1e-6,
                                       err_msg=f"conv state of layer {i}")
            checked += 1
    assert checked >= 1
    # and minqwen is a measurably different computation: this check could tell the two apart
    import minqwen

    assert np.abs(minqwen.load(folder).forward(expected["token_ids"]) - expected["logits"]).max() > 1e-6


# ============================================================================ compare_with_transformers.py


@pytest.fixture(scope="module")
def compare_tool():
    return load_tool("compare_with_transformers")


def run_compare(tool, capsys, *args):
    code = tool.main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def fixture_ids(name, n=None) -> str:
    ids = load_file(str(FIXTURES / name / "expected.safetensors"))["token_ids"][:n]
    return ",".join(str(int(t)) for t in ids)


def wrap_record(monkeypatch, tool, change):
    """minqwen's side of the comparison, changed by ``change(recording)`` after it is recorded."""
    original = tool.golden.record

    def record(*args, **kwargs):
        recording = original(*args, **kwargs)
        change(recording)
        return recording

    monkeypatch.setattr(tool.golden, "record", record)


def test_decode_step_logits_beyond_atol_fail_even_when_the_prompt_and_tokens_agree(compare_tool, capsys, monkeypatch):
    # One greedy token: its id comes from the prompt's logits, so only the decode step's own
    # logits can show a decode-only error. Fails when the verdict ignores the decode steps.
    def shift_decode_logits(rec):
        for key in [k for k in rec if k.startswith("step") and k.endswith(".logits")]:
            rec[key] = rec[key] + np.float32(0.01)

    wrap_record(monkeypatch, compare_tool, shift_decode_logits)
    code, out, _ = run_compare(compare_tool, capsys, "--model", FIXTURES / "text_tied_fp32",
                               "--tokens", fixture_ids("text_tied_fp32"), "--new-tokens", 1, "--atol", "1e-4")
    assert "greedy: 1 of 1 tokens identical" in out
    assert code == 1, out
    assert "first diverging tap: step0.logits" in out
    assert out.rstrip().endswith("FAIL")


def test_a_different_greedy_token_fails_even_when_every_compared_logit_agrees(compare_tool, capsys, monkeypatch):
    # Fails when the verdict ignores the greedy continuation.
    def other_last_token(rec):
        rec["generated_ids"] = rec["generated_ids"].copy()
        rec["generated_ids"][-1] = (rec["generated_ids"][-1] + 1) % 160

    wrap_record(monkeypatch, compare_tool, other_last_token)
    code, out, _ = run_compare(compare_tool, capsys, "--model", FIXTURES / "text_tied_fp32",
                               "--tokens", fixture_ids("text_tied_fp32"), "--new-tokens", 2, "--atol", "1e-4")
    assert "greedy: 1 of 2 tokens identical" in out
    assert code == 1, out


def test_the_first_diverging_tap_is_judged_with_the_given_atol_and_rtol(compare_tool, capsys, tmp_path):
    # minqwen reads a copy whose embedding is scaled by 1 + 3e-4 (tied head: the logits move
    # too); transformers reads the pristine fixture. With --rtol 0 the embedding itself is
    # beyond atol 1e-4; with rtol 1e-3 it would not be. The tool's first diverging tap must be
    # the first one, in forward order, beyond the tolerance asked for — recomputed here from the
    # kept recordings. Fails when the tool judges taps with other tolerances than the given ones.
    from minqwen import golden

    pristine = FIXTURES / "text_tied_fp32"
    copy = tmp_path / "scaled"
    copy.mkdir()
    (copy / "config.json").write_text((pristine / "config.json").read_text())
    tensors = load_file(str(pristine / "model.safetensors"))
    tensors["model.embed_tokens.weight"] = tensors["model.embed_tokens.weight"] * np.float32(1 + 3e-4)
    save_file(tensors, str(copy / "model.safetensors"), metadata={"format": "pt"})
    keep = tmp_path / "keep"
    atol, rtol = 1e-4, 0.0
    code, out, _ = run_compare(compare_tool, capsys, "--model", copy, "--reference-model", pristine,
                               "--tokens", fixture_ids("text_tied_fp32"), "--new-tokens", 0,
                               "--atol", atol, "--rtol", rtol, "--keep", keep)
    assert code == 1, out
    ours, theirs = load_file(str(keep / "minqwen.safetensors")), load_file(str(keep / "transformers.safetensors"))
    common = sorted((set(ours) & set(theirs)) - {"token_ids", "generated_ids"}, key=golden.forward_order)
    beyond = [n for n in common if (np.abs(ours[n].astype(np.float64) - theirs[n])
                                    > atol + rtol * np.abs(theirs[n].astype(np.float64))).any()]
    assert beyond, "the scaled embedding must show somewhere"
    assert f"first diverging tap: {beyond[0]}\n" in out, out
    assert beyond[0] == "embed"


def test_a_failure_with_identical_greedy_tokens_is_not_blamed_on_a_near_tie(compare_tool, capsys, monkeypatch):
    # minqwen's logits scaled by 1 + 1e-4 (logits up to ~10: |Δ| up to ~1e-3): beyond --atol
    # 1e-4 in absolute terms, within atol + rtol·|reference| at every entry, the same argmax.
    def scale_logits(rec):
        for key in [k for k in rec if k == "logits" or k.endswith(".logits")]:
            rec[key] = rec[key] * np.float32(1 + 1e-4)

    wrap_record(monkeypatch, compare_tool, scale_logits)
    code, out, _ = run_compare(compare_tool, capsys, "--model", FIXTURES / "text_tied_fp32",
                               "--tokens", fixture_ids("text_tied_fp32"), "--new-tokens", 2, "--atol", "1e-4")
    assert code == 1 and "greedy: 2 of 2 tokens identical" in out
    assert "near tie" not in out, out
    assert "every tap, the logits included, is within" in out, out


def run_compare_shell(*args):
    return subprocess.run([sys.executable, str(TOOLS / "compare_with_transformers.py"), *map(str, args)],
                          capture_output=True, text=True, cwd=ROOT, timeout=200)


def test_a_keep_folder_that_cannot_be_made_is_an_error_exit_2(tmp_path):
    (tmp_path / "a_file").write_text("x")
    done = run_compare_shell("--model", FIXTURES / "text_tied_fp32", "--tokens", "1,2", "--new-tokens", 0,
                             "--keep", tmp_path / "a_file" / "sub")
    assert done.returncode == 2, done.stderr[-800:]
    assert "Traceback" not in done.stderr and "--keep" in done.stderr


def test_a_checkpoint_whose_tensors_do_not_fit_its_config_is_an_error_exit_2(tmp_path):
    require_reference()  # the tool imports torch (tools/reference.py) before it reads the checkpoint
    folder = tmp_path / "no_head_dim"
    folder.mkdir()
    config = json.loads((FIXTURES / "text_tied_fp32" / "config.json").read_text())
    del config["head_dim"]  # both sides then default to 256, which the stored q_proj does not fit
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "model.safetensors").symlink_to(FIXTURES / "text_tied_fp32" / "model.safetensors")
    done = run_compare_shell("--model", folder, "--tokens", "1,2", "--new-tokens", 0)
    assert done.returncode == 2, done.stderr[-800:]
    assert "Traceback" not in done.stderr
    assert "q_proj" in done.stderr.strip().splitlines()[-1]


def test_the_worked_example_reports_a_checkpoint_minqwen_refuses_with_exit_2(tmp_path):
    folder = tmp_path / "no_head_dim"
    folder.mkdir()
    config = json.loads((FIXTURES / "text_tied_fp32" / "config.json").read_text())
    del config["head_dim"]
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "model.safetensors").symlink_to(FIXTURES / "text_tied_fp32" / "model.safetensors")
    done = subprocess.run([sys.executable, str(TOOLS / "golden_port_example.py"), "--model", str(folder),
                           "--tokens", "1,2", "--workdir", str(tmp_path / "work")],
                          capture_output=True, text=True, cwd=ROOT, timeout=200)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-800:]


def test_a_random_mtp_head_follows_its_seed_and_is_stored_in_bf16(tmp_path):
    # make_mtp_fixtures --seed reaches the head only through with_random_mtp: one seed gives the
    # same head every time, another seed another head. bf16: random_mtp_tensors' default dtype.
    mtp_tools = load_tool("make_mtp_fixtures")
    heads = {}
    for run, seed in (("a", 1), ("b", 1), ("c", 2)):
        target = mtp_tools.with_random_mtp(FIXTURES / "text_tied_fp32", tmp_path / run, seed=seed)
        heads[run] = load_file(str(target / "mtp.safetensors"))
        assert {stored for name, (stored, _) in tensor_headers(target).items() if name.startswith("mtp.")} == {"BF16"}
    assert heads["a"].keys() == heads["c"].keys() and len(heads["a"]) >= 10
    assert all(np.array_equal(heads["a"][name], heads["b"][name]) for name in heads["a"])
    assert not any(np.array_equal(heads["a"][name], heads["c"][name]) for name in heads["a"])


@pytest.mark.parametrize("source", ["moe_text_per_expert_fp32", "text_grouped_bf16_bias"])
def test_a_random_mtp_head_added_to_a_fixture_is_one_minqwen_loads(tmp_path, source):
    import minqwen
    from minqwen.mtp import load_mtp

    mtp_tools = load_tool("make_mtp_fixtures")
    target = mtp_tools.with_random_mtp(FIXTURES / source, tmp_path / "with_mtp", seed=1)
    assert load_mtp(target, minqwen.load(target)) is not None


def test_an_fp8_checkpoint_with_fused_experts_is_not_reported_as_a_minqwen_disagreement(compare_tool, capsys, tmp_path):
    quantize_fp8 = load_tool("quantize_fp8")
    folder = tmp_path / "fp8_fused"
    quantize_fp8.quantize_checkpoint(FIXTURES / "moe_multimodal_fused_top1", folder, (8, 8), "float32")
    code, out, err = run_compare(compare_tool, capsys, "--model", folder, "--tokens",
                                 fixture_ids("moe_multimodal_fused_top1"), "--new-tokens", 1, "--atol", "1e-4")
    # transformers 5.23.0 cannot load FP8 experts stored fused: a refusal, never a FAIL blamed on minqwen
    assert code == 2, out + err
    assert "could not load all" in err and "experts" in err, err


# ============================================================================ real_shape.py mtp-parity, small


@pytest.mark.parametrize("text", [SMALL_DENSE, SMALL_MOE], ids=["dense", "moe"])
def test_mtp_parity_passes_on_a_small_shape_and_fails_when_a_norm_weight_is_dropped(tmp_path, monkeypatch, text):
    # The real-shape run takes minutes and GBs; this is the same code on a model small enough for CI.
    import minqwen.mtp

    real_shape = load_tool("real_shape")
    main = real_shape.write_random(tmp_path / "main", text)
    folder = real_shape.add_random_mtp(main, tmp_path / "mtp", text)
    assert not (main / "mtp.safetensors").exists()  # the source is linked, never written into
    report = real_shape.compare_mtp(folder, "small")
    assert report["pass"], report
    assert report["teacher"]["rows"] == real_shape.PROMPT_TOKENS
    assert report["draft"]["rows"] == real_shape.MTP_DRAFT_STEPS
    assert report["cached"]["rows"] == real_shape.MTP_CACHED_STEPS

    # A port that forgets the 1 + w of an MTP norm (here: every norm of the head) must fail.
    norm = minqwen.mtp.rms_norm
    monkeypatch.setattr(minqwen.mtp, "rms_norm", lambda x, weight, eps: norm(x, np.zeros_like(weight), eps))
    broken = real_shape.compare_mtp(folder, "small, norm weights dropped")
    assert not broken["pass"] and broken["teacher"]["max_abs_diff"] > broken["tolerance"], broken


@pytest.mark.parametrize("fused", [False, True], ids=["per-expert", "fused"])
def test_the_mtp_checkpoint_shapes_are_those_of_the_tensors_written(fused):
    reference = require_reference()
    mtp_tools = load_tool("make_mtp_fixtures")
    mtp = mtp_tools.build_mtp_model(reference.build_model(dict(SMALL_MOE), seed=3), 2, seed=3)
    tensors = mtp_tools.mtp_checkpoint_tensors(mtp, fused_experts=fused)
    assert mtp_tools.mtp_checkpoint_shapes(mtp, fused_experts=fused) == {n: t.shape for n, t in tensors.items()}


# ============================================================================ real_shape.py vision-parity, small

SMALL_VISION = dict(depth=2, hidden_size=32, num_heads=2, intermediate_size=48, patch_size=4, temporal_patch_size=2,
                    spatial_merge_size=2, num_position_embeddings=16, hidden_act="gelu_pytorch_tanh", in_channels=3,
                    deepstack_visual_indexes=[])


def test_vision_parity_passes_on_a_small_shape_and_fails_when_the_merger_gelu_is_tanh(tmp_path, monkeypatch):
    # The real-shape run takes minutes and GBs; this is the same code on a tower small enough for CI.
    require_reference()
    import minqwen.vision

    real_shape = load_tool("real_shape")
    text = dict(SMALL_DENSE, vocab_size=256, layer_types=["linear_attention"] * 3 + ["full_attention"])
    monkeypatch.setattr(real_shape, "VISION_VOCAB", 256)
    monkeypatch.setattr(real_shape, "VISION_PREPROCESSOR", dict(real_shape.VISION_PREPROCESSOR, patch_size=4,
                        size=dict(shortest_edge=64, longest_edge=4096)))
    monkeypatch.setattr(real_shape, "TOWER_IMAGES", {"30x50": (30, 50), "9x15": (9, 15), "40x24": (40, 24)})
    monkeypatch.setattr(real_shape, "BIG_IMAGE", ("300x200 (shrunk)", (300, 200)))
    monkeypatch.setattr(real_shape, "vision_configs",
                        lambda member, blocks: (dict(text, eos_token_id=251), dict(SMALL_VISION)))
    report = real_shape.vision_parity(tmp_path / "vision", "0.8b")
    assert real_shape.vision_passed(report) == [], report
    assert len(report["preprocessing"]) == 4 and len(report["tower"]["per_image"]) == 3
    assert len(report["tower"]["together_blocks"]) == SMALL_VISION["depth"]

    # A port whose merger uses the blocks' tanh GELU instead of the exact one must fail.
    monkeypatch.setattr(minqwen.vision, "gelu", minqwen.vision.ACTIVATIONS["gelu_pytorch_tanh"])
    failures = real_shape.vision_passed(real_shape.vision_parity(tmp_path / "vision", "0.8b"))
    assert any(f.startswith("tower features") for f in failures), failures


# ============================================================================ family_shapes.py's float64 reference


def test_computing_in_float64_redirects_both_spellings_of_float32_in_every_module_and_undoes_it():
    # The test below runs a dense model with theta 2¹⁶, where rotary is exact in float32 too: it
    # cannot see a missed ``torch.float`` (rotary's inv_freq at theta 1e7, the MoE router's
    # softmax), a missed vision_utils (the tower's position-embedding resampling), or casts
    # left redirected after the block, which would turn every later float32 run into float64.
    reference = require_reference()
    import torch
    import transformers.models.qwen3_5.modeling_qwen3_5 as dense
    import transformers.models.qwen3_5_moe.modeling_qwen3_5_moe as moe
    import transformers.vision_utils as vision_utils

    with reference.computing_in_float64():
        for module in (dense, moe, vision_utils):
            assert module.torch.float32 is torch.float64 and module.torch.float is torch.float64, module.__name__
        assert torch.ones(2).float().dtype == torch.float64
    for module in (dense, moe, vision_utils):
        assert module.torch is torch, module.__name__
    assert torch.ones(2, dtype=torch.float64).float().dtype == torch.float32


def test_family_shapes_float64_reference_computes_in_float64_while_it_runs(tmp_path):
    # ref64 is the exact value ref32's round-off is measured against: were its modeling casts
    # back to float32 while it runs, it would be float32 in disguise, ~1e-7 from exact.
    reference = require_reference()
    import minqwen

    family_shapes = load_tool("family_shapes")
    # theta 2¹⁶: every rotary frequency a power of two, the same in float32 and float64
    text = dict(SMALL_DENSE, max_position_embeddings=1024,
                rope_parameters=dict(rope_type="default", rope_theta=65536.0, partial_rotary_factor=0.5))
    reference.save_checkpoint(reference.build_model(text, seed=5), tmp_path)
    ref64 = family_shapes.reference_logits(tmp_path, True, None)
    ours = minqwen.load(tmp_path).astype(np.float64)
    ids = family_shapes.prompt_ids(text["vocab_size"])
    for length in family_shapes.LENGTHS:
        np.testing.assert_allclose(ours.forward(ids[:length]), ref64[f"p{length}"], rtol=0, atol=1e-9,
                                   err_msg=f"{length}-token prompt")


def test_the_reference_tools_without_torch_say_how_to_install_the_reference():
    # (a tool then prints the error and exits 2, instead of a ModuleNotFoundError traceback)
    code = ("import sys; sys.modules['torch'] = None; sys.path.insert(0, 'tools')\n"
            "from minqwen.errors import MinqwenError\n"
            "try:\n    import reference\nexcept MinqwenError as e:\n    print(e)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120).stdout
    assert "needs the reference" in out and "pip install -e '.[reference]'" in out, out
