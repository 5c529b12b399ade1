"""Build the training corpus of minqwen's embedded model, deterministically.

Two sources, rebuilt bit for bit by the same CPython release built and installed the same way,
with PyPI access. (Two generated modules of the standard library, ``_sysconfigdata_*.py`` and
``config-*/python-config.py``, record where and how Python was built, and a Linux
distribution's Python patches a few modules: another installation of the same release gives a
corpus that differs in those files. The two modules were in the shipped model's corpus, so
they stay in.)

* **Code** — the ``*.py`` source of the running interpreter's standard library (PSF licence).
  Tests, third-party packages and the large generated data tables are left out (see
  :func:`is_excluded`): they are large, repetitive and teach nothing about ordinary Python.
* **Dialog** (optional, on by default) — the English part of ``chatterbot-corpus`` 1.3.3 from
  PyPI (BSD licence), a few thousand short question/answer turns. A little of it teaches the
  model the shape of a chat reply, so ``minqwen chat`` answers in sentences rather than in
  code. The wheel is fetched with ``pip download`` and read straight from the zip file; its
  SHA-256 is pinned so a changed upload cannot silently change the corpus.

A fixed ~2% of documents is held out as a validation split. Membership is decided by a hash of
each document's name rather than by its position in a list, so adding or removing a file
elsewhere never moves another file between the splits.

Output (in ``--out``)::

    train.jsonl    one document per line: {"kind": "code", "name", "text"}
                   or {"kind": "dialog", "name", "category", "messages": [{"role", "content"}...]}
    valid.jsonl    the held-out documents, same format
    manifest.json  interpreter version, sources, licences, counts and SHA-256 of both splits

Usage::

    python tools/build_corpus.py                       # into scratch/corpus (git ignores scratch/)
    python tools/build_corpus.py --out /tmp/corpus --no-dialogs   # code only: offline, no PyYAML

tools/train_embedded.py needs the dialogs too; ``--no-dialogs`` is for looking at the code
corpus on a machine without PyPI.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import platform
import subprocess
import sys
import sysconfig
import tokenize
import zipfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from argtypes import existing_file, output_folder  # noqa: E402

# Every document whose name hashes into the first VALID_PER_MILLE of 1000 buckets is held out.
VALID_PER_MILLE = 20

# Directory names anywhere in a stdlib path that mark tests or installed third-party code.
EXCLUDED_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}

# Generated data modules: valid Python, but megabytes of tables or prose dumps that would
# dominate a small corpus. Charmap codecs are recognised by content instead (see is_excluded).
EXCLUDED_FILES = {
    "pydoc_data/topics.py",  # the whole language reference as string literals (~750 kB)
    "html/entities.py",  # a 2,000-line table of HTML entity names
}

# The dialog source: name, version, and the SHA-256 of the wheel on PyPI.
DIALOG_PACKAGE = "chatterbot-corpus"
DIALOG_VERSION = "1.3.3"
DIALOG_WHEEL_SHA256 = "86de5300afb9a80826386339d3bec79c0a72eb0358abb8327e2ecef5ae0ce154"
DIALOG_LANGUAGE_DIR = "chatterbot_corpus/data/english/"
# Categories left out: opinions on politics and made-up gossip about named people are not
# what a demo model should reproduce.
DIALOG_EXCLUDED_CATEGORIES = {"politics", "gossip"}


def in_validation(name: str) -> bool:
    """True for the fixed ~2% of documents held out, chosen by a hash of the document name."""
    bucket = int.from_bytes(hashlib.sha256(name.encode("utf-8")).digest()[:8], "big") % 1000
    return bucket < VALID_PER_MILLE


def is_excluded(relative: Path, text: str) -> bool:
    """Whether a stdlib file stays out of the corpus (tests, third-party, generated tables)."""
    if EXCLUDED_DIRS.intersection(relative.parts[:-1]):
        return True
    if relative.as_posix() in EXCLUDED_FILES:
        return True
    # The charmap codecs in encodings/ are written by a generator and are mostly one
    # 256-entry decoding table each; together they would be over 10% of the corpus.
    if relative.parts[0] == "encodings" and "### Decoding Table" in text:
        return True
    return False


def read_source(path: Path) -> str:
    """A source file's text, decoded as Python itself would (PEP 263 cookie), with \\n newlines."""
    with tokenize.open(path) as handle:
        text = handle.read()
    return text.replace("\r\n", "\n").replace("\r", "\n")


def stdlib_documents() -> list[dict]:
    """All kept stdlib modules, sorted by their path relative to the stdlib root."""
    root = Path(sysconfig.get_paths()["stdlib"])
    documents = []
    for path in sorted(root.rglob("*.py"), key=lambda p: p.relative_to(root).as_posix()):
        relative = path.relative_to(root)
        if EXCLUDED_DIRS.intersection(relative.parts[:-1]):
            continue  # decided by the path alone: skip reading the file
        try:
            text = read_source(path)
        except (SyntaxError, UnicodeDecodeError):
            continue  # a deliberately broken file (the stdlib has a few under its tests)
        if is_excluded(relative, text) or not text.strip():
            continue
        documents.append({"kind": "code", "name": relative.as_posix(), "text": text})
    return documents


def fetch_dialog_wheel(download_dir: Path) -> Path:
    """Download the pinned chatterbot-corpus wheel with pip (no install) and check its hash."""
    download_dir.mkdir(parents=True, exist_ok=True)
    wheel_name = f"chatterbot_corpus-{DIALOG_VERSION}-py2.py3-none-any.whl"
    wheel = download_dir / wheel_name
    if wheel.exists() and hashlib.sha256(wheel.read_bytes()).hexdigest() != DIALOG_WHEEL_SHA256:
        wheel.unlink()  # a download cut short, or another upload: fetch it again
    if not wheel.exists():
        done = subprocess.run(
            [sys.executable, "-m", "pip", "download", f"{DIALOG_PACKAGE}=={DIALOG_VERSION}",
             "--no-deps", "--only-binary=:all:", "--quiet", "--dest", str(download_dir)],
        )
        if done.returncode != 0 or not wheel.exists():
            raise SystemExit(f"pip could not download {DIALOG_PACKAGE}=={DIALOG_VERSION} (see pip's message "
                             "above): pass a copy of the wheel with --dialog-wheel, or --no-dialogs for the "
                             "code corpus alone")
    return check_dialog_wheel(wheel)


def check_dialog_wheel(wheel: Path) -> Path:
    """``wheel``, if it is the pinned one: the manifest records its hash as the corpus's source."""
    digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
    if digest != DIALOG_WHEEL_SHA256:
        raise SystemExit(f"{wheel}: SHA-256 {digest} is not the pinned {DIALOG_WHEEL_SHA256}")
    return wheel


def dialog_documents(wheel: Path) -> list[dict]:
    """English chatterbot conversations as chat messages, alternating user and assistant.

    Each YAML file holds ``conversations``: lists of utterances in which speakers alternate,
    the first being the person talking to the bot. Lists shorter than one exchange are skipped.
    """
    try:
        import yaml  # PyYAML: a dependency of transformers, so present wherever training runs
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise SystemExit("reading the dialog corpus needs PyYAML (pip install pyyaml), or pass --no-dialogs") from exc

    documents = []
    with zipfile.ZipFile(wheel) as archive:
        members = sorted(n for n in archive.namelist() if n.startswith(DIALOG_LANGUAGE_DIR) and n.endswith(".yml"))
        for member in members:
            category = Path(member).stem
            if category in DIALOG_EXCLUDED_CATEGORIES:
                continue
            data = yaml.safe_load(io.TextIOWrapper(archive.open(member), encoding="utf-8"))
            for index, turns in enumerate(data.get("conversations") or []):
                # YAML turns a bare "yes" or "42" into a bool or int: the text is what was meant.
                turns = [str(t).strip() for t in turns if t is not None and str(t).strip()]
                if len(turns) < 2:
                    continue
                messages = [
                    {"role": "user" if i % 2 == 0 else "assistant", "content": text}
                    for i, text in enumerate(turns)
                ]
                if messages[-1]["role"] == "user":
                    messages.pop()  # a trailing question with no answer teaches nothing
                documents.append({"kind": "dialog", "name": f"chatterbot/english/{category}.yml#{index}",
                                  "category": category, "messages": messages})
    return documents


def write_jsonl(path: Path, documents: list[dict]) -> str:
    """Write documents one JSON object per line (stable key order) and return the file's SHA-256."""
    payload = "".join(json.dumps(doc, ensure_ascii=False, sort_keys=True) + "\n" for doc in documents)
    data = payload.encode("utf-8")
    path.write_bytes(data)
    return hashlib.sha256(data).hexdigest()


def summarize(documents: list[dict]) -> dict:
    """Document and character counts per kind."""
    summary: dict[str, dict[str, int]] = {}
    for doc in documents:
        entry = summary.setdefault(doc["kind"], {"documents": 0, "characters": 0})
        entry["documents"] += 1
        entry["characters"] += len(doc["text"]) if "text" in doc else sum(len(m["content"]) for m in doc["messages"])
    return summary


def build(out: Path, with_dialogs: bool, dialog_wheel: Path | None) -> dict:
    """Build both splits into ``out`` and return the manifest that was written beside them."""
    out.mkdir(parents=True, exist_ok=True)
    documents = stdlib_documents()
    sources = [{
        "kind": "code",
        "what": f"Python {platform.python_version()} standard library (*.py), tests and generated tables excluded",
        "licence": "PSF-2.0 (Python Software Foundation License)",
        "root": sysconfig.get_paths()["stdlib"],
    }]
    if with_dialogs:
        wheel = check_dialog_wheel(dialog_wheel) if dialog_wheel else fetch_dialog_wheel(out / "downloads")
        documents += dialog_documents(wheel)
        sources.append({
            "kind": "dialog",
            "what": f"{DIALOG_PACKAGE} {DIALOG_VERSION} (PyPI), English, "
                    f"without {', '.join(sorted(DIALOG_EXCLUDED_CATEGORIES))}",
            "licence": "BSD-3-Clause (PyPI classifier 'License :: OSI Approved :: BSD License')",
            "wheel_sha256": DIALOG_WHEEL_SHA256,
        })

    train = [d for d in documents if not in_validation(d["name"])]
    valid = [d for d in documents if in_validation(d["name"])]
    manifest = {
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "sources": sources,
        "valid_per_mille": VALID_PER_MILLE,
        "train": {"sha256": write_jsonl(out / "train.jsonl", train), "kinds": summarize(train)},
        "valid": {"sha256": write_jsonl(out / "valid.jsonl", valid), "kinds": summarize(valid)},
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return manifest


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=output_folder, default=Path(__file__).resolve().parent.parent / "scratch" / "corpus",
                        help="output directory (default: scratch/corpus in the repository)")
    parser.add_argument("--no-dialogs", dest="dialogs", action="store_false",
                        help="code only: skip the chatterbot-corpus dialog turns")
    parser.add_argument("--dialog-wheel", type=existing_file, default=None,
                        help="use this already-downloaded chatterbot-corpus wheel instead of pip download")
    args = parser.parse_args(argv)
    if args.dialog_wheel and not args.dialogs:
        parser.error("--dialog-wheel gives the dialogs that --no-dialogs leaves out: pass one or the other")
    manifest = build(args.out, args.dialogs, args.dialog_wheel)
    print(json.dumps({k: manifest[k] for k in ("python", "train", "valid")}, indent=2))


if __name__ == "__main__":
    main()
