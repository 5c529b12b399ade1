"""Solutions to chapter 1's exercises. Run: python walkthrough/solutions/01_tokens.py"""

import codecs
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # walkthrough/, for `course`
import course  # noqa: E402
from minqwen.tokenizer import Tokenizer  # noqa: E402

folder = course.embedded_model()
tok = Tokenizer(folder)
spec = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))


def bytes_to_unicode():
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


# Exercise 1.1 -------------------------------------------------------------------------------
# Each id → its bytes; an incremental UTF-8 decoder emits exactly the complete characters.
CHAR_TO_BYTE = {ch: b for b, ch in bytes_to_unicode().items()}
id_to_token = {i: t for t, i in spec["model"]["vocab"].items()}
added = {t["id"]: t["content"] for t in spec["added_tokens"]}


def token_bytes(i):
    if i in added:
        return added[i].encode("utf-8")
    return bytes(CHAR_TO_BYTE[ch] for ch in id_to_token[i])


def exercise_1_1(ids):
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    return [decoder.decode(token_bytes(i)) for i in ids] + [decoder.decode(b"", final=True)]


text = "naïve café 日本 🐍"
pieces = exercise_1_1(tok.encode(text))
assert "".join(pieces) == text and not any("\ufffd" in p for p in pieces)
print("Exercise 1.1:", pieces)

# Exercise 1.2 -------------------------------------------------------------------------------
source = (course.ROOT / "minqwen" / "model.py").read_text(encoding="utf-8")
lower, upper = len(tok.encode(source)) / len(source), len(tok.encode(source.upper())) / len(source)
print(f"Exercise 1.2: {lower:.3f} tokens per character as written, {upper:.3f} in uppercase.")
print("  The merges were learned on ordinary Python, where keywords and names are lowercase; uppercase")
print("  words were rare in training, so few merges cover them and they fall apart into short pieces.")
assert upper > lower
