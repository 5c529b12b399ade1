"""The walkthrough (walkthrough/): every chapter and every solution runs end to end, headless.

Each chapter is a plain script that checks itself with asserts against minqwen and the
reference fixtures, so running it is the test. They run as subprocesses, exactly as a reader
runs them (``python walkthrough/NN_name.py`` from the repository root), with the Agg
matplotlib backend and figures written to a temporary folder.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
WALKTHROUGH = ROOT / "walkthrough"
CHAPTERS = sorted(WALKTHROUGH.glob("[0-9][0-9]_*.py"))
SOLUTIONS = sorted((WALKTHROUGH / "solutions").glob("[0-9][0-9]_*.py"))

try:
    import matplotlib  # noqa: F401

    HAVE_MATPLOTLIB = True
except ImportError:
    HAVE_MATPLOTLIB = False


def run_script(path: Path, figures: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, MPLBACKEND="Agg", MINQWEN_WALKTHROUGH_FIGURES=str(figures), PYTHONIOENCODING="utf-8")
    return subprocess.run([sys.executable, str(path.relative_to(ROOT))], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)


def test_there_is_a_chapter_for_each_part_of_the_course():
    assert [p.name[:2] for p in CHAPTERS] == [f"{n:02d}" for n in range(len(CHAPTERS))]
    assert len(CHAPTERS) >= 11


def test_every_chapter_has_its_solutions_file_and_no_other():
    assert [p.name for p in SOLUTIONS] == [p.name for p in CHAPTERS]


def test_readme_lists_every_chapter_with_its_timing():
    readme = (WALKTHROUGH / "README.md").read_text(encoding="utf-8")
    for chapter in CHAPTERS:
        # | `NN_name.py` | topic | workshop minutes | run time | figures |
        # (a topic may hold "|", as in `<|image_pad|>`: the timings are found from the row's end)
        row = re.search(rf"^\| `{re.escape(chapter.name)}` \|.*\| (\d+) min \| ([^|]+) \|[^|\n]*\|$", readme, re.M)
        assert row, f"walkthrough/README.md has no table row with the timings of {chapter.name}"
        assert re.fullmatch(r"\d+ s|a few s|\d+ min", row.group(2).strip()), row.group(0)


@pytest.mark.parametrize("chapter", CHAPTERS, ids=lambda p: p.stem)
def test_chapter_is_a_jupytext_percent_notebook(chapter):
    text = chapter.read_text(encoding="utf-8")
    assert text.startswith("# ---\n# jupyter:\n#   jupytext:\n#     formats: py:percent\n")
    assert text.count("# %% [markdown]") >= 5, "a chapter teaches in prose cells"
    assert re.search(r"^# %%$", text, re.M), "and runs code cells"
    assert re.search(r"^# ## Exercises", text, re.M), "and ends with exercises"
    # Every cell is prose or code: a "# %% [raw]" or "# %% [md]" cell would not render as taught.
    markers = re.findall(r"^# %%.*$", text, re.M)
    assert all(m in ("# %%", "# %% [markdown]") for m in markers), [m for m in markers if m not in ("# %%", "# %% [markdown]")]
    try:
        import jupytext  # the walkthrough extra; CI has only the test extra, hence the check above
    except ImportError:
        return
    notebook = jupytext.reads(text, fmt="py:percent")
    kinds = {cell.cell_type for cell in notebook.cells}
    assert kinds == {"markdown", "code"}


@pytest.mark.parametrize("chapter", CHAPTERS, ids=lambda p: p.stem)
def test_chapter_runs_end_to_end(chapter, tmp_path):
    result = run_script(chapter, tmp_path)
    assert result.returncode == 0, f"{chapter.name} failed:\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
    assert "Traceback" not in result.stderr
    draws = "course.save(" in chapter.read_text(encoding="utf-8")
    if draws and HAVE_MATPLOTLIB:
        assert list(tmp_path.glob("*.png")), f"{chapter.name} draws figures, but wrote none"
    if draws and not HAVE_MATPLOTLIB:
        assert "matplotlib is not installed" in result.stdout


@pytest.mark.parametrize("solution", SOLUTIONS, ids=lambda p: p.stem)
def test_solutions_run_and_check_themselves(solution, tmp_path):
    result = run_script(solution, tmp_path)
    assert result.returncode == 0, f"solutions/{solution.name} failed:\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
    assert "Exercise" in result.stdout


def test_a_figures_folder_that_is_a_file_is_named_instead_of_a_traceback(tmp_path):
    not_a_folder = tmp_path / "figures"
    not_a_folder.write_text("a file")
    env = dict(os.environ, MPLBACKEND="Agg", MINQWEN_WALKTHROUGH_FIGURES=str(not_a_folder), PYTHONIOENCODING="utf-8")
    code = "import course; course.save(None, 'figure.png')"  # what a chapter does at its first figure
    result = subprocess.run([sys.executable, "-c", code], cwd=WALKTHROUGH, env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert f"MINQWEN_WALKTHROUGH_FIGURES={not_a_folder} is a file" in result.stderr


# ------------------------------------------------------------------ the exercise checks
# A chapter's exercise cell checks the reader's answer. Each check must accept the solution in
# walkthrough/solutions/ and reject a plausible wrong answer. Both are tried the way a reader
# would: the chapter's own text, with a definition of the exercise function inserted just
# before the line that calls it, run as a script from the repository root.

def chapter_with(chapter: str, marker: str, definition: str) -> str:
    text = (WALKTHROUGH / chapter).read_text(encoding="utf-8")
    assert text.count(marker) == 1, f"{chapter}: the line {marker!r} is not where the test expects it"
    return text.replace(marker, definition.strip("\n") + "\n" + marker)


def run_text(text: str, tmp_path: Path) -> subprocess.CompletedProcess:
    script = tmp_path / "chapter_variant.py"
    script.write_text(text, encoding="utf-8")
    env = dict(os.environ, MPLBACKEND="Agg", MINQWEN_WALKTHROUGH_FIGURES=str(tmp_path / "figures"),
               PYTHONIOENCODING="utf-8",
               PYTHONPATH=os.pathsep.join([str(WALKTHROUGH), str(ROOT), os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, str(script)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def from_solutions(chapter: str, function: str) -> str:
    """A definition that takes the exercise function from the chapter's solutions file."""
    return f"""
import contextlib as _contextlib, importlib.util as _util, io as _io
_spec = _util.spec_from_file_location("solution", "walkthrough/solutions/{chapter}")
_solution = _util.module_from_spec(_spec)
with _contextlib.redirect_stdout(_io.StringIO()):
    _spec.loader.exec_module(_solution)
{function} = _solution.{function}
"""


STRICT_CHECKS = [  # every exercise with a check cell: (chapter, the line calling it, its function, its number)
    ("00_map.py", "answer = exercise_0_1(real)", "exercise_0_1", "0.1"),
    ("01_tokens.py", "answer = exercise_1_1(ids)", "exercise_1_1", "1.1"),
    ("02_embeddings_and_norm.py", 'answer = exercise_2_1(expected["hidden.0"])', "exercise_2_1", "2.1"),
    ("03_rotary.py", "answer = exercise_3_2()", "exercise_3_2", "3.2"),
    ("04_attention.py", "answer = exercise_4_1(q, k, v)", "exercise_4_1", "4.1"),
    ("05_deltanet.py", "answer = exercise_5_1(A_test)", "exercise_5_1", "5.1"),
    ("06_conv_and_state.py", "answer = exercise_6_1(x[:, 2], w[2])", "exercise_6_1", "6.1"),
    ("07_mlp_and_moe.py", "answer = exercise_7_1()", "exercise_7_1", "7.1"),
    ("08_whole_stack.py", "answer = exercise_8_1()", "exercise_8_1", "8.1"),
    ("09_sampling.py", "answer = exercise_9_1(logits, [7, 7, 7, 9], 0.5)", "exercise_9_1", "9.1"),
    ("10_golden.py", "answer = exercise_10_1()", "exercise_10_1", "10.1"),
    ("11_multi_token_prediction.py", "answer = exercise_11_1(0.7, 3)", "exercise_11_1", "11.1"),
    ("11_multi_token_prediction.py", "answers = [exercise_11_2(p, q)", "exercise_11_2", "11.2"),
    ("12_vision.py", "answer = exercise_12_1(4032, 3024)", "exercise_12_1", "12.1"),
    ("12_vision.py", "answer = exercise_12_2()", "exercise_12_2", "12.2"),
]


@pytest.mark.parametrize("chapter, marker, function, number", STRICT_CHECKS, ids=[c[3] for c in STRICT_CHECKS])
def test_exercise_check_accepts_the_solution(chapter, marker, function, number, tmp_path):
    result = run_text(chapter_with(chapter, marker, from_solutions(chapter, function)), tmp_path)
    assert result.returncode == 0, f"{chapter} refused its own solution:\n{result.stderr[-3000:]}"
    assert f"Exercise {number}:" in result.stdout and f"Exercise {number}: not attempted" not in result.stdout


WRONG_ANSWERS = [  # (chapter, the line calling the exercise, what is wrong, a definition giving that answer)
    ("00_map.py", "answer = exercise_0_1(real)", "the shares in the wrong order", """
def exercise_0_1(c):
    n = sum(layer_params(c, k) for k in c.layer_types) + c.hidden_size
    return (18 * deltanet_params(c) / n, 24 * mlp_params(c) / n, 6 * attention_params(c) / n)
"""),
    ("00_map.py", "answer = exercise_0_1(real)", "every mixer counted as DeltaNet", """
def exercise_0_1(c):
    n = sum(layer_params(c, k) for k in c.layer_types) + c.hidden_size
    return (24 * mlp_params(c) / n, 24 * deltanet_params(c) / n, 0.0)
"""),
    ("01_tokens.py", "answer = exercise_1_1(ids)", "nothing streamed before the flush", """
def exercise_1_1(ids):
    return [""] * len(ids) + [tok.decode(ids)]
"""),
    ("02_embeddings_and_norm.py", 'answer = exercise_2_1(expected["hidden.0"])', "one power of ten too small", """
def exercise_2_1(x):
    return 0.01
"""),
    ("02_embeddings_and_norm.py", 'answer = exercise_2_1(expected["hidden.0"])', "one power of ten too large", """
def exercise_2_1(x):
    return 1.0
"""),
    ("03_rotary.py", "answer = exercise_3_2()", "the real model's axes for a 4-dim rotary", """
def exercise_3_2():
    return "THW"
"""),
    ("04_attention.py", "answer = exercise_4_1(q, k, v)", "the causal mask blind to cached keys (query t at t)", """
def exercise_4_1(q, k, v, block=4):
    T, S = len(q), len(k)
    g = q.shape[1] // k.shape[1]
    k, v = np.repeat(k, g, 1), np.repeat(v, g, 1)
    m, l = np.full((q.shape[1], T), -np.inf), np.zeros((q.shape[1], T))
    acc = np.zeros((q.shape[1], T, q.shape[2]))
    for s0 in range(0, S, block):
        s = np.einsum("thd,shd->hts", q, k[s0:s0 + block]) / np.sqrt(q.shape[-1])
        s = np.where(np.arange(s0, min(s0 + block, S))[None] <= np.arange(T)[:, None], s, -np.inf)
        m_new = np.maximum(m, s.max(-1))
        scale, p = np.exp(m - m_new), np.exp(s - m_new[..., None])
        l, m = l * scale + p.sum(-1), m_new
        acc = acc * scale[..., None] + np.einsum("hts,shd->htd", p, v[s0:s0 + block])
    return (acc / l[..., None]).transpose(1, 0, 2)
"""),
    ("04_attention.py", "answer = exercise_4_1(q, k, v)", "key and value heads tiled, not repeated", """
def exercise_4_1(q, k, v, block=4):
    T, S = len(q), len(k)
    g = q.shape[1] // k.shape[1]
    k, v = np.tile(k, (1, g, 1)), np.tile(v, (1, g, 1))
    s = np.einsum("thd,shd->hts", q, k) / np.sqrt(q.shape[-1])
    s = np.where(np.arange(S)[None] <= (S - T + np.arange(T))[:, None], s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    return np.einsum("hts,shd->thd", p / p.sum(-1, keepdims=True), v)
"""),
    ("05_deltanet.py", "answer = exercise_5_1(A_test)", "row i = e_i + Σ A[i, j] · row j (sign flipped)", """
def exercise_5_1(A):
    inv = np.eye(len(A))
    for i in range(1, len(A)):
        inv[i] += A[i, :i] @ inv[:i]
    return inv
"""),
    ("06_conv_and_state.py", "answer = exercise_6_1(x[:, 2], w[2])", "the causal window one token late", """
def exercise_6_1(xc, wc):
    T, K = len(xc), len(wc)
    M = np.zeros((T, T))
    for t in range(T):
        for j in range(K):
            if 0 <= t - K + j < T:
                M[t, t - K + j] = wc[j]
    return M
"""),
    ("07_mlp_and_moe.py", "answer = exercise_7_1()", "the shared expert forgotten", """
def exercise_7_1():
    return 40 * 256 * 3 * 2048 * 512, 40 * 8 * 3 * 2048 * 512
"""),
    ("08_whole_stack.py", "answer = exercise_8_1()", "(0, 0), which keeps the 4:1 ratio", """
def exercise_8_1():
    return 0, 0
"""),
    ("08_whole_stack.py", "answer = exercise_8_1()", "the cache counted in float32", """
def exercise_8_1():
    return int(np.ceil(752e6 * 2 / (6 * 2 * 2 * 256 * 4))), int(np.ceil(752e6 * 2 / (24 * 2 * 2 * 256 * 4)))
"""),
    ("09_sampling.py", "answer = exercise_9_1(logits, [7, 7, 7, 9], 0.5)", "repeated ids penalised once", """
def exercise_9_1(logits, generated, penalty):
    out = logits.copy()
    out[generated] -= penalty  # fancy indexing: id 7 is hit once, not three times
    return out
"""),
    ("10_golden.py", "answer = exercise_10_1()", "the gate named instead of the query", """
def exercise_10_1():
    return "layers.3.self_attn.gate"
"""),
    ("11_multi_token_prediction.py", "answer = exercise_11_1(0.7, 3)", "the verify's own token forgotten", """
def exercise_11_1(a, k):
    return sum(a ** m for m in range(1, k + 1))
"""),
    ("11_multi_token_prediction.py", "answers = [exercise_11_2(p, q)", "the residual draw not weighted", """
def exercise_11_2(p, q):
    r = np.maximum(p - q, 0)
    return np.minimum(p, q) + r / r.sum()
"""),
    ("12_vision.py", "answer = exercise_12_1(4032, 3024)", "sides rounded half up, not half to even", """
def exercise_12_1(height, width):
    f = pre.factor
    h, w = int(height / f + 0.5) * f, int(width / f + 0.5) * f
    if h * w > pre.max_pixels:
        beta = math.sqrt(height * width / pre.max_pixels)
        h, w = max(f, math.floor(height / beta / f) * f), max(f, math.floor(width / beta / f) * f)
    elif h * w < pre.min_pixels:
        beta = math.sqrt(pre.min_pixels / (height * width))
        h, w = math.ceil(height * beta / f) * f, math.ceil(width * beta / f) * f
    return (h // pre.patch_size) * (w // pre.patch_size) // pre.merge_size ** 2
"""),
    ("12_vision.py", "answer = exercise_12_2()", "positions counted in patches, not merged tokens", """
def exercise_12_2():
    return int(sum(max(h, w) - t * h * w // 4 for t, h, w in expected["three_images.grid_thw"]))
"""),
]


ALSO_RIGHT = [  # (chapter, the line calling the exercise, what differs, a definition the check must accept)
    ("00_map.py", "answer = exercise_0_1(real)", "the final norm left out of the total (2e-6 of it)", """
def exercise_0_1(c):
    body = sum(layer_params(c, k) for k in c.layer_types)
    kinds = (c.num_hidden_layers * mlp_params(c), c.layer_types.count("linear_attention") * deltanet_params(c),
             c.layer_types.count("full_attention") * attention_params(c))
    return tuple(n / body for n in kinds)
"""),
]


@pytest.mark.parametrize("chapter, marker, what, definition", ALSO_RIGHT, ids=[f"{c[0][:2]}-{c[2]}" for c in ALSO_RIGHT])
def test_exercise_check_accepts_an_equally_right_answer(chapter, marker, what, definition, tmp_path):
    result = run_text(chapter_with(chapter, marker, definition), tmp_path)
    assert result.returncode == 0, f"{chapter}'s check refused a right answer ({what}):\n{result.stderr[-1500:]}"


def test_strict_checks_list_every_checked_exercise_in_the_chapters():
    # The two tests around this one walk STRICT_CHECKS: a check cell added to a chapter but not
    # to the list would go untested.
    call = r"^answers? = \[?exercise_\w+\("
    found = {(c.name, m.group(0)) for c in CHAPTERS for m in re.finditer(call, c.read_text(encoding="utf-8"), re.M)}
    assert found == {(chapter, re.match(call, marker).group(0)) for chapter, marker, *_ in STRICT_CHECKS}


def test_every_exercise_check_is_tried_with_a_wrong_answer():
    # walkthrough/README.md: "the test suite holds each check to ... refusing a plausible wrong answer"
    tried = {(chapter, marker) for chapter, marker, *_ in WRONG_ANSWERS}
    assert [number for chapter, marker, _, number in STRICT_CHECKS if (chapter, marker) not in tried] == []


@pytest.mark.parametrize("chapter, marker, what, definition", WRONG_ANSWERS,
                         ids=[f"{c[0][:2]}-{c[2]}" for c in WRONG_ANSWERS])
def test_exercise_check_rejects_a_wrong_answer(chapter, marker, what, definition, tmp_path):
    result = run_text(chapter_with(chapter, marker, definition), tmp_path)
    assert result.returncode != 0, f"{chapter}'s check accepted a wrong answer ({what}):\n{result.stdout[-1500:]}"
    assert "AssertionError" in result.stderr, result.stderr[-3000:]


# ------------------------------------------------------------------ numbers the prose states
# Recomputed here from the public Qwen3.5-0.8B config (docs: hidden 1024, 24 layers of which 6
# attention with 2 KV heads of 256; 18 DeltaNet with 16 key and value heads of 128, conv 4).

def prose(chapter: str) -> str:
    """A chapter's prose cells (its '# ' comment lines), joined into one line of text."""
    lines = (WALKTHROUGH / chapter).read_text(encoding="utf-8").splitlines()
    return " ".join(line[2:] for line in lines if line.startswith("# "))


def test_cache_sizes_in_chapters_4_and_8_are_the_real_configs_arithmetic():
    kv_per_token = 6 * 2 * 2 * 256 * 2  # attention layers × (keys, values) × KV heads × head_dim × bf16 bytes
    conv_dim = 2 * 16 * 128 + 16 * 128
    state = 18 * ((4 - 1) * conv_dim + 16 * 128 * 128) * 2  # per DeltaNet layer: conv window + memory, bf16
    ch4, ch8 = prose("04_attention.py"), prose("08_whole_stack.py")
    assert kv_per_token == 12 * 1024 and "= 12 KiB per token" in ch4
    assert kv_per_token * 32768 == 384 * 2**20 and "384 MiB at 32k tokens" in ch4
    assert f"a fixed {state / 2**20:.1f} MiB in bf16" in ch8
    said = re.search(r"Below about ([\d,]+) tokens the DeltaNet state dominates", ch8)
    assert said and abs(int(said.group(1).replace(",", "")) - state / kv_per_token) < 0.05 * state / kv_per_token
    assert kv_per_token * 262144 == 3 * 2**30 and "the hybrid needs 3 GiB of cache" in ch8
    assert 4 * kv_per_token * 262144 == 12 * 2**30 and "would need 12" in ch8


def test_bf16_spacing_near_one_is_what_chapter_2_says():
    import ml_dtypes
    import numpy as np

    one = np.array(1.0, ml_dtypes.bfloat16)
    assert float(np.nextafter(one, np.array(2.0, ml_dtypes.bfloat16))) - 1.0 == 2.0**-7
    assert "consecutive bf16 numbers are 2⁻⁷ ≈ 0.0078 apart" in prose("02_embeddings_and_norm.py")
    folded = np.array(1 + float(np.array(0.0123, ml_dtypes.bfloat16)), ml_dtypes.bfloat16)
    assert round(float(folded), 4) == 1.0156 and "it becomes 1.0156" in prose("02_embeddings_and_norm.py")
