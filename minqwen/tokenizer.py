"""Text ↔ token ids, the checkpoint's tokenizer files, and streaming decode.

* ids come from the checkpoint's ``tokenizer.json`` through the ``tokenizers`` library (the
  same byte-level BPE the reference uses), special tokens included, with the normaliser and
  split transformers' Qwen tokenizer classes impose; walkthrough/01_tokens.py rebuilds its
  encoder in plain Python;
* ``tokenizer_config.json`` gives the chat template (``chat_template.jinja`` beside it wins, as
  in transformers) and the eos token; ``generation_config.json`` gives eos ids and default
  sampling settings;
* the chat template is Jinja, rendered in a sandbox (:mod:`minqwen.chat_template`): a
  template ships with a checkpoint, and code that ships with a checkpoint is never trusted;
* :class:`StreamDecoder` turns ids into text piece by piece without ever emitting half of a
  character that spans several tokens.
"""

from __future__ import annotations

import numbers
import os
import warnings
from pathlib import Path

from .chat_template import CHATML_TEMPLATE, render
from .config import is_present, read_json_object
from .errors import MinqwenError, is_whole_number
from .sampling import UNIMPLEMENTED_GENERATION_FIELDS

# transformers 5.23.0 picks Qwen3_5Tokenizer for these model types whatever class
# tokenizer_config.json names (it lists the names on the Hub as unreliable)…
QWEN_TOKENIZER_MODEL_TYPES = ("qwen3_5", "qwen3_5_moe", "qwen3_5_moe_text")
# …and for qwen3_5_text the class named (in tokenizer_config.json, else in config.json), or
# Qwen3_5Tokenizer when none is. Only Qwen's classes are mimicked: a generic backend reads the
# file as it is; another model's class (GPT2Tokenizer …) would bring its own rules, which
# minqwen does not.
QWEN_TOKENIZER_CLASSES = ("Qwen2Tokenizer", "Qwen3_5Tokenizer")
# What a Qwen class puts in place of the file's own: an NFC normalizer, a byte-level decoder, and
# this split before byte-level BPE. Qwen3.5's split keeps combining marks (\p{M}) inside words;
# Qwen2's does not, so the two cut a mark that NFC leaves standing differently ("a\ufe0f's":
# a variation selector; "\u0301's": an accent with no letter before it).
QWEN_SPLIT_PATTERNS = {
    "Qwen2Tokenizer": r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
                      r"""|\s*[\r\n]+|\s+(?!\S)|\s+""",
    "Qwen3_5Tokenizer": r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}"""
                        r"""| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""",
}


def _token_text(token) -> str | None:
    """A special token as tokenizer_config.json gives it — a string, or an AddedToken dict — as text."""
    if isinstance(token, dict):
        token = token.get("content")
    return token if isinstance(token, str) else None


def check_utf8(text: str, what: str = "the text") -> None:
    """A MinqwenError naming ``what``, the byte and where, when ``text`` cannot be UTF-8.

    A lone surrogate is Python's stand-in for bytes that were not UTF-8 (a command-line argument
    or file in another encoding: the undecodable byte b becomes U+DC00 + b). The tokenizer works
    on UTF-8 text only.
    """
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        char = text[e.start]
        byte = f"the byte \\x{ord(char) - 0xDC00:02x}" if 0xDC80 <= ord(char) <= 0xDCFF else f"U+{ord(char):04X}"
        raise MinqwenError(f"{what} is not valid Unicode: {byte} at character {e.start}, after "
                           f"{text[max(0, e.start - 20):e.start]!r}; save or pass it as UTF-8") from None


def _read_json(path: Path) -> dict:
    """The file's JSON object, or {} when the checkpoint does not ship it (each of these is optional)."""
    return read_json_object(path) if is_present(path) else {}


class Tokenizer:
    """A checkpoint's tokenizer, chat template, eos ids and generation defaults.

    Its added tokens (``<|im_end|>`` and the other specials) are tokenizer.json's own, with the
    flags it gives them. transformers rebuilds them from tokenizer_config.json's
    ``added_tokens_decoder`` where that is present (releases agree with their tokenizer.json,
    and transformers 5 no longer writes the field): a config edited to mark other tokens special,
    or to strip spaces around them, is not followed here.
    """

    def __init__(self, folder: str | Path):
        from tokenizers import Tokenizer as HFTokenizer

        if not isinstance(folder, (str, os.PathLike)):
            raise MinqwenError(f"Tokenizer takes a checkpoint folder (a path), got {type(folder).__name__}")
        folder = Path(folder)
        if folder.is_file():
            raise MinqwenError(f"{folder}: a file; Tokenizer takes the checkpoint folder that holds tokenizer.json "
                               f"(and its tokenizer_config.json, config.json, generation_config.json)")
        path = folder / "tokenizer.json"
        if not is_present(path):
            raise MinqwenError(
                f"{folder}: no tokenizer.json in this folder; minqwen needs the checkpoint's tokenizer to "
                "turn text into token ids and back (copy it from the model's release). Without it, only token "
                "ids go in and out: Model.forward(ids) in Python, `minqwen golden record --tokens` on the command line"
            )
        try:
            self._tok = HFTokenizer.from_file(str(path))
        except Exception as e:  # the tokenizers library raises its own exception type
            raise MinqwenError(f"{path}: cannot read this tokenizer ({e})") from None
        self.config = _read_json(folder / "tokenizer_config.json")
        model_config = _read_json(folder / "config.json")
        self._model_type = model_config.get("model_type")
        self._config_tokenizer_class = model_config.get("tokenizer_class")
        split_special_tokens = self.config.get("split_special_tokens", False)
        if not isinstance(split_special_tokens, bool):
            raise MinqwenError(f"{folder / 'tokenizer_config.json'}: field 'split_special_tokens' must be true or "
                               f"false, got {split_special_tokens!r}")
        # True: "<|im_start|>" in text is plain text, as in transformers (a rendered chat's own
        # control tokens too: such a checkpoint cannot chat, there or here).
        self._tok.encode_special_tokens = split_special_tokens
        byte_level_bpe = type(self._tok.model).__name__ == "BPE" and type(self._tok.decoder).__name__ == "ByteLevel"
        qwen_class = self._qwen_tokenizer_class()
        if byte_level_bpe and qwen_class is not None:
            self._use_qwen_class_rules(qwen_class)
        self.generation_config_path = folder / "generation_config.json"
        self.generation_config = _read_json(self.generation_config_path)
        ignored = [name for name, no_op in UNIMPLEMENTED_GENERATION_FIELDS.items()
                   if self.generation_config.get(name) not in (None, no_op, [], {})]
        if ignored:
            warnings.warn(f"{self.generation_config_path}: minqwen does not implement {', '.join(ignored)}, which "
                          "transformers' generate() would apply: ignored", stacklevel=2)
        lengths = [name for name in ("max_new_tokens", "max_length") if self.generation_config.get(name) is not None]
        if lengths:  # transformers' generate() would stop there
            warnings.warn(f"{self.generation_config_path}: {' and '.join(lengths)} not read: how many tokens to "
                          "generate is each call's own max_new_tokens (default 128; ChatSession.reply 256; "
                          "--max-new-tokens on the command line)", stacklevel=2)
        template = self.config.get("chat_template")
        problem = None  # why the stored template cannot be used: said when a chat is rendered
        if isinstance(template, (list, dict)):  # some releases store several named templates
            pairs = (template.items() if isinstance(template, dict)
                     else [(t.get("name"), t.get("template")) for t in template if isinstance(t, dict)])
            named = {name: text for name, text in pairs if isinstance(name, str)}
            template = named.get("default")
            if template is None:  # as transformers refuses it: no template is the chat template
                problem = (f"{folder / 'tokenizer_config.json'}: field 'chat_template' lists named templates "
                           f"({', '.join(map(repr, named)) or 'none with a name'}) but none named 'default'")
        else:
            named = {}
        if template is not None and not isinstance(template, str) and problem is None:
            problem = (f"{folder / 'tokenizer_config.json'}: field 'chat_template' must be a template (a string) "
                       f"or named ones (a list or an object), got {template!r}")
        template_file = folder / "chat_template.jinja"
        has_template_file = is_present(template_file)
        if has_template_file:  # transformers 5 saves the template here; it wins over tokenizer_config's
            try:
                template = template_file.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as e:
                raise MinqwenError(f"{template_file}: cannot read this chat template ({e})") from None
            problem = None
        self.chat_template = template if isinstance(template, str) else CHATML_TEMPLATE
        self.has_chat_template = isinstance(template, str)
        self._template_problem = problem  # after the setter above, which clears it
        # With tools, a checkpoint's template named 'tool_use' is used instead, as in transformers
        self._tool_use_template = named.get("tool_use") if not has_template_file else None
        self.eos_ids = self._eos_ids()

    @property
    def chat_template(self) -> str:
        return self._chat_template

    @chat_template.setter
    def chat_template(self, template: str) -> None:
        """A template set by hand replaces the checkpoint's, and whatever was wrong with them."""
        self._chat_template = template
        self._template_problem = None
        self._tool_use_template = None

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def _eos_ids(self) -> tuple[int, ...]:
        eos = self.generation_config.get("eos_token_id")
        ids = [] if eos is None else list(eos) if isinstance(eos, list) else [eos]
        if not all(is_whole_number(i) for i in ids):
            raise MinqwenError(f"{self.generation_config_path}: field 'eos_token_id' must be a token id or a list "
                               f"of token ids (whole numbers), got {eos!r}")
        if any(i < 0 for i in ids):  # transformers warns and keeps them; no token has a negative id
            warnings.warn(f"{self.generation_config_path}: eos_token_id {eos!r} holds negative ids, which no "
                          "token can have: they are ignored", stacklevel=3)
            ids = [i for i in ids if i >= 0]
        eos_token = _token_text(self.config.get("eos_token")) or ""
        if eos_token and self.token_to_id(eos_token) is not None:
            ids.append(self.token_to_id(eos_token))
        return tuple(dict.fromkeys(ids))

    def encode(self, text: str) -> list[int]:
        """Text → ids. Special-token strings in the text (``<|im_start|>`` …) become their ids,
        unless tokenizer_config.json sets ``split_special_tokens``."""
        if not isinstance(text, str):
            raise MinqwenError(f"encode takes text (a str), got {type(text).__name__}")
        check_utf8(text)
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        try:
            sequence = None if isinstance(ids, (str, bytes)) else list(ids)
        except TypeError:  # an int, a 0-d array: nothing to iterate over
            sequence = None
        if sequence is None:
            raise MinqwenError(f"decode takes a sequence of token ids, got {type(ids).__name__} {ids!r:.40} "
                               f"(one id: decode([i]))")
        ids = sequence
        bad = [i for i in ids if isinstance(i, bool) or not isinstance(i, numbers.Integral) or not 0 <= i < 2**32]
        if bad:  # the tokenizers library would raise OverflowError or TypeError
            raise MinqwenError(f"decode takes token ids (whole numbers from 0 to 2³² − 1), got {bad[0]!r}")
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = True, enable_thinking: bool = True,
                    *, tools: list[dict] | None = None, documents: list[dict] | None = None, **variables) -> str:
        """The conversation as the model was trained to see it (the checkpoint's Jinja template).

        As transformers' ``apply_chat_template(messages, tokenize=False, …)``: a message's
        ``content`` is text or a list of parts (``{"type": "text", "text": …}``,
        ``{"type": "image"}`` …); ``tools`` are JSON schemas; ``variables`` are whatever else the
        template reads (``add_vision_id=True`` …). See :mod:`minqwen.chat_template`. Two
        defaults differ from transformers': ``add_generation_prompt`` is True (a prompt to answer
        is what minqwen renders for), and ``enable_thinking`` is always given to the template.
        """
        for option, instead in (
                ("chat_template", "set tokenizer.chat_template = … before rendering"),
                ("continue_final_message", "render without it and cut the text after the final message's content"),
                ("sanitize_control_tokens", "it applies when transformers tokenizes, which render_chat does not"),
                ("return_assistant_tokens_mask", "it applies when transformers tokenizes, which render_chat does not")):
            if option in variables:  # the template would see it as a variable and render as if it were not given
                raise MinqwenError(f"render_chat has no option {option!r} (transformers' apply_chat_template "
                                   f"does): {instead}")
        if tools is not None and self._tool_use_template is not None:
            template = self._tool_use_template
        elif self._template_problem is not None:
            raise MinqwenError(self._template_problem)
        else:
            template = self.chat_template
        text = render(template, messages, add_generation_prompt=add_generation_prompt, tools=tools,
                      documents=documents, special_tokens=self.special_tokens,
                      variables={"enable_thinking": enable_thinking, **variables})
        if not text:  # else "the prompt is empty" would blame the conversation
            raise MinqwenError("the chat template rendered this conversation as empty text: is the template "
                               "(chat_template.jinja, or tokenizer_config.json's 'chat_template') empty?")
        return text

    def _qwen_tokenizer_class(self) -> str | None:
        """Which of Qwen's classes transformers would load this folder's tokenizer as, if one."""
        if self._model_type in QWEN_TOKENIZER_MODEL_TYPES:
            return "Qwen3_5Tokenizer"
        named = self.config.get("tokenizer_class") or self._config_tokenizer_class
        if named is None:
            return "Qwen3_5Tokenizer" if self._model_type == "qwen3_5_text" else None
        named = named.removesuffix("Fast") if isinstance(named, str) else None
        return named if named in QWEN_TOKENIZER_CLASSES else None

    def _use_qwen_class_rules(self, qwen_class: str) -> None:
        """Tokenize as transformers' Qwen class does: it keeps the file's vocabulary, merges and
        special tokens, but puts its own normalizer, split and decoder in place of the file's,
        and builds its BPE model afresh, with that library's defaults for the rest (no
        ignore_merges: a file's "ignore_merges": true, which looks a whole word up in the
        vocabulary before merging, gave other ids for 201 of 232 unbuildable words).
        Qwen's released files already say the same (Qwen3.5's split, NFC); a file that says
        otherwise is tokenized as the reference tokenizes it. Only for byte-level BPE files, which
        these classes are made for: other kinds are read as they are (transformers' class would
        encode a word-level file's text as nothing, a character-level one's as byte spellings)."""
        from tokenizers import Regex, decoders, normalizers, pre_tokenizers

        self._tok.normalizer = normalizers.NFC()
        self._tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(QWEN_SPLIT_PATTERNS[qwen_class]), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=self.config.get("add_prefix_space") is True, use_regex=False),
        ])
        self._tok.decoder = decoders.ByteLevel()
        bpe = self._tok.model  # the settings transformers' class passes to BPE(...), or leaves at their defaults
        bpe.dropout, bpe.unk_token, bpe.continuing_subword_prefix, bpe.end_of_word_suffix = None, None, "", ""
        bpe.fuse_unk, bpe.byte_fallback, bpe.ignore_merges = False, False, False

    @property
    def special_tokens(self) -> dict[str, str]:
        """The named special tokens a chat template sees (``eos_token`` …), as transformers names them:
        tokenizer_config's fields ending in ``_token``, and ``extra_special_tokens`` given by name.
        Qwen's tokenizer class gives unk, eos and pad tokens ``<|endoftext|>`` where the file names none."""
        tokens = {}
        if self._qwen_tokenizer_class() is not None:
            tokens = {name: "<|endoftext|>" for name in ("unk_token", "eos_token", "pad_token")
                      if name not in self.config}
        fields = {k: v for k, v in self.config.items() if k.endswith("_token")}
        if isinstance(self.config.get("extra_special_tokens"), dict):
            fields.update(self.config["extra_special_tokens"])
        for name, token in fields.items():
            text = _token_text(token)
            if text is not None:
                tokens[name] = text
        return tokens


class StreamDecoder:
    """Ids in, text out, a piece at a time, never splitting a character.

    Byte-level BPE can split one character (an emoji, a CJK ideograph) over several tokens;
    decoding those tokens one by one would print replacement characters. Instead we decode
    the pending ids together and hold them back while the text ends in an incomplete
    character (which the decoder renders as U+FFFD). The pieces then join to the decoding of
    all the ids: text that ends in a whole character decodes the same alone or followed by
    more. A U+FFFD the model really wrote is held too, until a character after it (or
    :meth:`flush`): with a limit on how long to wait, a run of them released a half-decoded
    character, and the pieces held one U+FFFD too many.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.pending: list[int] = []

    def push(self, token_id: int) -> str:
        """Add one id; return the text that is now complete (possibly empty)."""
        self.pending.append(token_id)
        text = self.tokenizer.decode(self.pending, self.skip_special_tokens)
        if text.endswith("\ufffd"):
            return ""  # an incomplete character, perhaps: wait for its remaining bytes
        self.pending = []
        return text

    def flush(self) -> str:
        """Whatever is still held back (at the end of generation)."""
        text = self.tokenizer.decode(self.pending, self.skip_special_tokens) if self.pending else ""
        self.pending = []
        return text
