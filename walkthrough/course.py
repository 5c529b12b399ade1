"""Small helpers the chapters share: where things are, and optional figures.

Nothing here is part of the model. It exists so that each chapter can start with
``import course`` and then talk only about Qwen3.5:

* ``course.ROOT``, ``course.FIXTURES``: the repository and its reference fixtures;
* ``course.fixture(name)``: a fixture folder and the reference outputs stored in it;
* ``course.embedded_model()``: the folder of the small model shipped inside minqwen;
* ``course.pyplot()`` and ``course.save(fig, name)``: matplotlib if it is installed (it is
  optional), figures written to ``walkthrough/figures/``; ``course.token_label(text)`` for
  tokens on a figure's axis.

Importing it also sets minqwen to one thread (see below).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
FIXTURES = ROOT / "tests" / "fixtures"
# Where figures go. The test suite points this somewhere temporary so that CI leaves no files.
FIGURES = Path(os.environ.get("MINQWEN_WALKTHROUGH_FIGURES", HERE / "figures"))

# Let `python walkthrough/NN_chapter.py` work from a fresh clone that was never pip-installed.
try:
    import minqwen  # noqa: F401
except ImportError:
    sys.path.insert(0, str(ROOT))

# The models in this course are tiny. Their matrix products are faster on one thread than
# split across several — much faster on a busy machine — so the chapters use one.
from minqwen.threads import set_threads  # noqa: E402

set_threads(1)


def fixture(name: str):
    """(folder, expected) for a reference fixture: ``expected`` maps names to NumPy arrays.

    The keys of ``expected`` were computed by transformers 5.23.0 (fp32, eager):
    ``token_ids``, ``logits``, ``hidden.{i}`` (the residual stream after layer i), ``norm``,
    ``state.{i}.conv|recurrent|keys|values`` (the decode state after the prompt) and
    ``greedy`` (a 32-token greedy continuation).
    """
    import ml_dtypes  # noqa: F401  (lets safetensors read bf16)
    from safetensors.numpy import load_file

    folder = FIXTURES / name
    return folder, load_file(str(folder / "expected.safetensors"))


def embedded_model() -> Path:
    """The folder of the small Qwen3.5-architecture model embedded in minqwen (no download).

    ``MINQWEN_WALKTHROUGH_MODEL`` may point at another folder of the same format (useful
    while developing minqwen itself, before the embedded model is built).
    """
    from minqwen.checkpoint import EMBEDDED

    override = os.environ.get("MINQWEN_WALKTHROUGH_MODEL")
    folder = Path(override) if override else EMBEDDED
    if not (folder / "config.json").is_file():
        raise SystemExit(
            f"the embedded model is missing: {folder} has no config.json. It ships with minqwen "
            "(minqwen/embedded/); set MINQWEN_WALKTHROUGH_MODEL to another folder of the same format."
        )
    return folder


_PLT = None
_TOLD = False


def pyplot():
    """matplotlib.pyplot, or None (with a note, once) when matplotlib is not installed.

    Run as a script, the chapters draw with the Agg backend: no window, files only. In a
    notebook, Jupyter's own inline backend is kept and figures also appear in the page.
    """
    global _PLT, _TOLD
    if _PLT is not None:
        return _PLT
    try:
        import matplotlib
    except ImportError:
        if not _TOLD:
            print("(matplotlib is not installed: figures are skipped. `pip install matplotlib` to draw them.)")
            _TOLD = True
        return None
    if "ipykernel" not in sys.modules and not os.environ.get("MPLBACKEND"):
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    _PLT = plt
    return plt


def save(fig, name: str) -> Path:
    """Write a figure to walkthrough/figures/NAME (and show it, in a notebook)."""
    plt = pyplot()
    if FIGURES.exists() and not FIGURES.is_dir():  # mkdir would stop the chapter with a FileExistsError
        raise SystemExit(f"MINQWEN_WALKTHROUGH_FIGURES={FIGURES} is a file; point it at a folder for the figures")
    FIGURES.mkdir(parents=True, exist_ok=True)
    path = FIGURES / name
    fig.savefig(path, dpi=110, bbox_inches="tight")
    print(f"figure saved: {_shown(path)}")
    if "ipykernel" in sys.modules and "agg" not in plt.get_backend().lower():
        plt.show()
    else:
        plt.close(fig)
    return path


def token_label(text: str) -> str:
    """A token's text made visible for a figure's axis: escapes for newlines, ␣ for spaces."""
    return repr(text)[1:-1].replace(" ", "␣")


def _shown(path: Path) -> str:
    try:
        return str(path.relative_to(ROOT))
    except ValueError:
        return str(path)
