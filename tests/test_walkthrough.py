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
