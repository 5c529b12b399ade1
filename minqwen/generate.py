"""Generation: prefill the prompt, then decode one token at a time until a stop rule fires.

:func:`generate_ids` is the loop itself, over ids. :func:`stream_text` wraps it with the
tokenizer: text pieces out, stop strings honoured. :class:`ChatSession` keeps one cache across
the turns of a conversation, feeding only what is new each turn.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from . import vision
from .errors import MinqwenError, is_whole_number, whole_number_array
from .image import image_list, read_image, target_size
from .model import Cache, Model
from .sampling import SamplingParams, filters_unused, sample_next
from .tokenizer import StreamDecoder, Tokenizer, check_utf8

# The text a chat template writes where an image or a video goes (Qwen's tokenizers: one special token each).
IMAGE_PAD = "<|image_pad|>"
VIDEO_PAD = "<|video_pad|>"


@dataclass
class GenerationStats:
    """Counts and timings of one generation, for the tokens/s line the CLI prints."""

    prompt_tokens: int = 0
    generated_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    stop_reason: str = ""

    @property
    def prefill_tokens_per_second(self) -> float:
        return self.prompt_tokens / self.prefill_seconds if self.prefill_seconds else 0.0

    @property
    def decode_tokens_per_second(self) -> float:
        # The first new token comes out of the prefill; decode speed counts the ones after it.
        return (self.generated_tokens - 1) / self.decode_seconds if self.decode_seconds and self.generated_tokens > 1 else 0.0


def checked_generation_args(prompt_ids, max_new_tokens, seed, params=SamplingParams()) -> list[int]:
    """The prompt as a list of ints, once the arguments every decoding loop takes are checked.

    Token ids must be whole numbers already: ``int(1.7)`` would quietly feed token 1.
    (Whether each prompt id is inside the vocabulary, the model checks as it embeds them.)
    """
    ids = whole_number_array(prompt_ids)
    if ids is None or ids.ndim != 1:
        raise MinqwenError(f"the prompt must be a 1-D sequence of token ids (whole numbers), got {prompt_ids!r:.80}"
                           " (to start from text, encode it with the tokenizer first)")
    if ids.size == 0:
        raise MinqwenError("the prompt is empty: give at least one token")
    if not is_whole_number(max_new_tokens) or max_new_tokens < 1:
        raise MinqwenError(f"max_new_tokens must be a whole number ≥ 1, got {max_new_tokens!r}")
    if seed is not None and (not is_whole_number(seed) or seed < 0):
        raise MinqwenError(f"seed must be a whole number ≥ 0, or None for a fresh one each run; got {seed!r}")
    if not isinstance(params, SamplingParams):
        raise MinqwenError(f"params must be a minqwen SamplingParams, got {type(params).__name__}"
                           " (SamplingParams() is greedy; SamplingParams(temperature=…, top_k=…) builds others; "
                           "SamplingParams.from_generation_config(tokenizer.generation_config) the checkpoint's)")
    return [int(i) for i in ids]


def checked_history(history, vocab_size: int) -> list[int]:
    """``history`` (the ids already in the cache) as a list of ints, each a token id of the model.

    These ids are never embedded, only counted by the repetition penalty, which indexes the
    logits with them: a negative id would quietly penalise a token from the end of the
    vocabulary. Checked as one array, since a chat passes its whole log every turn.
    """
    try:
        items = history if isinstance(history, np.ndarray) and history.ndim == 1 else list(history)
    except TypeError:  # not iterable, or a 0-d array
        items = None
    if items is None or isinstance(history, (str, bytes)):
        raise MinqwenError(f"history must be a sequence of token ids, got {type(history).__name__}")
    ids = whole_number_array(items)
    if ids is None or ids.ndim != 1:
        bad = next((t for t in items if not is_whole_number(t)), items)
        raise MinqwenError(f"history id {bad!r} is not a token id of this model (0 … {vocab_size - 1})")
    outside = ids[(ids < 0) | (ids >= vocab_size)]
    if outside.size:
        raise MinqwenError(f"history id {int(outside[0])} is not a token id of this model (0 … {vocab_size - 1})")
    return ids.tolist()


def check_model(model) -> None:
    """A MinqwenError, not an AttributeError deep inside, for a model of the wrong kind.

    (What it has, not what it is: a wrapper around a Model, as tests use, is fine.)
    """
    if not (hasattr(model, "forward") and hasattr(model, "config")):
        raise MinqwenError(f"model must be a minqwen model (minqwen.load(folder)), got {type(model).__name__}")


def check_tokenizer(tokenizer) -> None:
    """A MinqwenError, not an AttributeError deep inside, for a tokenizer of the wrong kind."""
    if not (hasattr(tokenizer, "encode") and hasattr(tokenizer, "eos_ids")):
        raise MinqwenError(f"tokenizer must be a minqwen Tokenizer (minqwen.Tokenizer(folder)), "
                           f"got {type(tokenizer).__name__}")


def checked_stop_ids(stop_ids) -> set[int]:
    """``stop_ids`` as a set of token ids, or a MinqwenError naming it."""
    try:
        listed = None if isinstance(stop_ids, (str, bytes)) else list(stop_ids)
    except TypeError:  # not iterable, or a 0-d array
        listed = None
    if listed is None:
        raise MinqwenError(f"stop_ids must be a collection of token ids, got {stop_ids!r:.80}")
    stop_ids = listed
    if not all(is_whole_number(i) and i >= 0 for i in stop_ids):  # a negative id could never stop anything
        raise MinqwenError(f"stop_ids must hold token ids (whole numbers ≥ 0), got {stop_ids!r}")
    return {int(i) for i in stop_ids}


def checked_stats(stats, kind: type):
    """``stats`` if it is a ``kind`` (a fresh one for None), or a MinqwenError naming it."""
    if stats is None:
        return kind()
    if not isinstance(stats, kind):
        raise MinqwenError(f"stats must be a {kind.__name__} (or None), got {type(stats).__name__}")
    return stats


def generate_ids(
    model: Model,
    prompt_ids,
    params: SamplingParams = SamplingParams(),
    max_new_tokens: int = 128,
    stop_ids=(),
    seed: int | None = None,
    cache: Cache | None = None,
    history=(),
    stats: GenerationStats | None = None,
) -> Iterator[int]:
    """Yield new token ids. The prompt is fed into ``cache`` (a fresh one if None).

    ``history``: ids already in the cache before this prompt (they count for the repetition
    penalty). A stop id is yielded, then generation ends. The cache ends holding the prompt
    and every yielded token except the last (which has not been fed back yet).
    """
    prompt_ids = checked_generation_args(prompt_ids, max_new_tokens, seed, params)
    cache = cache if cache is not None else model.new_cache()
    stats = checked_stats(stats, GenerationStats)
    rng = np.random.default_rng(seed)
    seen = checked_history(history, model.config.vocab_size) + prompt_ids
    generated: list[int] = []
    stop_ids = checked_stop_ids(stop_ids)

    start = time.perf_counter()
    logits = model.forward(prompt_ids, cache, last_only=True)[-1]
    stats.prompt_tokens = len(prompt_ids)
    stats.prefill_seconds = time.perf_counter() - start
    decode_start = time.perf_counter()
    while True:
        token = sample_next(logits, params, rng, seen, generated)
        generated.append(token)
        seen.append(token)
        stats.generated_tokens = len(generated)
        stats.decode_seconds = time.perf_counter() - decode_start
        yield token
        stats.stop_reason = stop_reason(token, stop_ids, len(generated), max_new_tokens, cache.position,
                                        model.config.max_position_embeddings)
        if stats.stop_reason:
            return
        logits = model.forward([token], cache, last_only=True)[-1]


def stop_reason(token: int, stop_ids, n_generated: int, max_new_tokens: int, position: int, max_context: int) -> str:
    """Why generation ends once ``token`` is yielded — "eos", "length" or "context" — or "" to go on.

    ``position``: where the token would be fed back, so "context" means there is no room for it.
    """
    if token in stop_ids:
        return "eos"
    if n_generated >= max_new_tokens:
        return "length"
    if position >= max_context:
        return "context"
    return ""


def stream_text(
    model: Model,
    tokenizer: Tokenizer,
    prompt_ids,
    params: SamplingParams = SamplingParams(),
    max_new_tokens: int = 128,
    stop_strings=(),
    seed: int | None = None,
    cache: Cache | None = None,
    history=(),
    stats: GenerationStats | None = None,
    ids_out: list | None = None,
    skip_special_tokens: bool = True,
    decode=None,
) -> Iterator[str]:
    """Yield text pieces as they are decoded; stop at eos ids or at the first stop string.

    Text that might be the start of a stop string is held back until it is known not to be,
    so a stop string never appears in the output. ``ids_out``, if given, receives every
    generated id. Eos ids end the text and are not part of it. ``decode``: what yields the
    ids — :func:`generate_ids` by default, or a drop-in with its arguments, such as
    ``minqwen.mtp.speculative_decoder(head)`` (speculative decoding with the MTP head).
    """
    check_model(model)
    check_tokenizer(tokenizer)
    # (a generator would be used up by this check, and then stop nothing)
    if not isinstance(stop_strings, (list, tuple, set, frozenset)) or not all(isinstance(s, str) and s for s in stop_strings):
        raise MinqwenError(f"stop strings must be a list of non-empty strings, got {stop_strings!r}")
    if ids_out is not None and not callable(getattr(ids_out, "append", None)):
        raise MinqwenError(f"ids_out must be a list, or anything with an append method (it receives every "
                           f"generated id), or None; got {type(ids_out).__name__}")
    decoder = StreamDecoder(tokenizer, skip_special_tokens=skip_special_tokens)
    eos = set(tokenizer.eos_ids) | set(model.config.eos_token_id)
    held = ""
    longest = max((len(s) for s in stop_strings), default=0)
    if decode is not None and not callable(decode):
        raise MinqwenError(f"decode must be a decoding loop with generate_ids' arguments (minqwen.mtp's "
                           f"speculative_decoder(head) makes one), or None; got {type(decode).__name__}")
    decode = decode or generate_ids
    for token in decode(model, prompt_ids, params, max_new_tokens, eos, seed, cache, history, stats):
        if ids_out is not None:
            ids_out.append(token)
        if token in eos:  # (the loop is not resumed, so it cannot record this itself)
            if stats is not None:
                stats.stop_reason = "eos"
            break
        held += decoder.push(token)
        hits = [held.index(s) for s in stop_strings if s in held]
        if hits:
            if stats is not None:
                stats.stop_reason = "stop string"
            yield held[: min(hits)]
            return
        # keep back only what could still become a stop string
        safe = len(held) - (longest - 1) if longest else len(held)
        if safe > 0:
            yield held[:safe]
            held = held[safe:]
    held += decoder.flush()
    hits = [held.index(s) for s in stop_strings if s in held]
    yield held[: min(hits)] if hits else held


def stream(model: Model, tokenizer: Tokenizer, prompt, *, max_new_tokens: int = 128, stop=(),
           seed: int | None = None, enable_thinking: bool = True, params: SamplingParams | None = None,
           decode=None, **sampling) -> Iterator[str]:
    """Stream the answer to ``prompt`` — a string to continue, or chat messages
    ``[{"role": "user", "content": "…"}]`` rendered with the checkpoint's template.

    Sampling options (temperature, top_k, top_p, min_p, repetition_penalty, presence_penalty)
    default to the checkpoint's generation_config.json; or pass a whole ``params``.
    ``decode``: see :func:`stream_text` (e.g. ``minqwen.mtp.speculative_decoder(head)``).
    """
    check_model(model)
    check_tokenizer(tokenizer)
    if params is not None and sampling:
        raise MinqwenError(f"give either params or sampling options ({', '.join(sampling)}), not both: "
                           "with a whole params, the options would be ignored")
    if params is None:
        params = SamplingParams.from_generation_config(tokenizer.generation_config,
                                                       str(tokenizer.generation_config_path), **sampling)
        unused = filters_unused(params, sampling)
        if unused:
            warnings.warn(f"{', '.join(unused)} {'changes' if len(unused) == 1 else 'change'} nothing while "
                          "decoding is greedy (temperature 0, or a generation_config.json without \"do_sample\": "
                          "true and no temperature given): give a temperature above 0 to sample", stacklevel=2)
    if isinstance(prompt, str):
        text = prompt
    elif isinstance(prompt, list):
        text = tokenizer.render_chat(prompt, enable_thinking=enable_thinking)
    else:
        raise MinqwenError("prompt must be a string or a list of chat messages")
    for marker in (IMAGE_PAD, VIDEO_PAD):
        if marker in text:  # the token would go in with its plain embedding, not a picture's features
            raise MinqwenError(f"the prompt holds {marker} (an image or video in a message's content, or the "
                               "token written out), but stream() and generate() read text alone: show images "
                               "with ChatSession(…, tower=minqwen.vision.load_vision(path)) and reply(…, "
                               "images=…), or `minqwen generate --image`")
    ids = tokenizer.encode(text)
    yield from stream_text(model, tokenizer, ids, params, max_new_tokens, stop, seed, decode=decode)


def generate(model: Model, tokenizer: Tokenizer, prompt, **options) -> str:
    """The whole answer to ``prompt`` as one string (same options as :func:`stream`)."""
    return "".join(stream(model, tokenizer, prompt, **options))


@dataclass
class ChatSession:
    """A multi-turn conversation over one cache.

    The cache holds an append-only log of ids (``self.log``). Each turn renders the whole
    conversation with the template; if the rendering extends the log, only the new suffix is
    fed. Qwen templates rewrite history (earlier turns lose their ``<think>`` block), so when
    the rendering diverges from the log, the session restores the latest snapshot at or
    before the divergence and feeds from there. Snapshots are taken at the end of each
    rendered conversation, before its generation prompt, which is exactly where a rewritten
    history starts to differ.

    With a vision ``tower`` (:func:`minqwen.vision.load_vision`) a message may bring images.
    Each is written into its message as ``<|vision_start|><|image_pad|><|vision_end|>``,
    and the i-th ``<|image_pad|>`` of the conversation is ``self.images[i]``. The log keeps
    the ids as rendered, one ``<|image_pad|>`` per image; the cache holds the image's
    features, one token per merged patch, fed by :func:`minqwen.vision.prefill` with their
    3-D positions. The cache's ``rope_delta`` (an image spans fewer positions than tokens)
    travels with it into every snapshot, so text fed after a roll-back gets the right
    positions too.
    """

    model: Model
    tokenizer: Tokenizer
    enable_thinking: bool = True
    messages: list = field(default_factory=list)
    cache: Cache | None = None
    log: list = field(default_factory=list)
    snapshots: dict = field(default_factory=dict)  # log length → Cache copy
    tower: vision.VisionTower | None = None  # None: a text-only conversation
    images: list = field(default_factory=list)  # every image shown so far, [H, W, 3] uint8, in order

    def __post_init__(self):
        check_model(self.model)
        check_tokenizer(self.tokenizer)
        if not isinstance(self.messages, list):
            raise MinqwenError(f"ChatSession: messages must be a list of message dicts (the history so far), "
                               f"got {type(self.messages).__name__}")
        if self.tower is not None and not isinstance(self.tower, vision.VisionTower):
            raise MinqwenError(f"ChatSession: tower must be a VisionTower (minqwen.vision.load_vision(folder)) or "
                               f"None, got {type(self.tower).__name__}")
        self.cache = self.model.new_cache()
        self.snapshots = {0: self.cache.copy()}

    def _sync(self, ids: list[int]) -> list[int]:
        """Bring the cache to a prefix of ``ids``; return the ids still to feed."""
        common = self._common_prefix(ids)
        if common < len(self.log):  # history was rewritten: roll back
            common = self._roll_back(common)
        return ids[common:]

    def _common_prefix(self, ids: list[int]) -> int:
        """How many ids the log and ``ids`` share from the start."""
        common = 0
        for a, b in zip(self.log, ids):
            if a != b:
                break
            common += 1
        return common

    def _roll_back(self, length: int) -> int:
        """Restore the latest snapshot at or before ``length`` logged ids; forget the later ones.

        Returns where the log now ends. A later snapshot must go too: it holds what came after
        the roll-back point (a dropped turn's message, its image's features).
        """
        at = max(p for p in self.snapshots if p <= length)
        self.cache = self.snapshots[at].copy()
        self.log = self.log[:at]
        self.snapshots = {p: c for p, c in self.snapshots.items() if p <= at}
        return at

    def _feed(self, ids: list[int]) -> None:
        if not ids:
            return
        n_images = self._count_images(ids)
        if n_images:
            # The images go in through the tower; prefill also moves the cache's rope delta on.
            first = self._count_images(self.log)
            vision.prefill(self.model, self.tower, ids, self.images[first:first + n_images], self.cache)
        else:
            self.model.forward(ids, self.cache, last_only=True)
        self.log += ids

    def _count_images(self, ids) -> int:
        """How many images ``ids`` (as rendered: one ``<|image_pad|>`` each) hold."""
        return 0 if self.tower is None else sum(1 for i in ids if i == self.tower.config.image_token_id)

    def reply(self, user_text: str, params: SamplingParams | None = None, max_new_tokens: int = 256,
              seed: int | None = None, stats: GenerationStats | None = None, decode=None,
              images=(), stop_strings=()) -> Iterator[str]:
        """Add a user message and stream the assistant's answer, thinking included, as raw text.

        ``params``: the sampling options; None, the checkpoint's generation_config.json (as in
        :func:`stream`; ``SamplingParams()`` is greedy).

        ``images``: paths, Pillow images or [H, W, 3] uint8 arrays to show with this message
        (the session needs a ``tower``); they come before the text, as Qwen's examples put them.
        ``stop_strings``: the answer ends before the first of these (as in :func:`stream_text`).
        A turn that does not finish — an error on the way, or the caller stops reading — is
        dropped: the conversation is then as it was before this call.
        """
        if not isinstance(user_text, str):
            raise MinqwenError(f"the message must be text (a str), got {type(user_text).__name__}")
        if params is None:
            params = SamplingParams.from_generation_config(self.tokenizer.generation_config,
                                                           str(self.tokenizer.generation_config_path))
        check_utf8(user_text, "that message")  # here: rendered, the template's text would surround it
        images = image_list(images)
        if not user_text.strip() and not images:
            raise MinqwenError("the message is empty")
        if images and self.tower is None:
            raise MinqwenError("this chat has no vision tower: images need a multimodal checkpoint, whose tower "
                               "minqwen.vision.load_vision loads (ChatSession(…, tower=…))")
        images = [read_image(image) for image in images]  # read now: a bad file fails before anything changes
        for rgb in images:  # and an image preprocessing would refuse, too
            target_size(rgb.shape[0], rgb.shape[1], self.tower.preprocessor)
        content = vision.image_placeholder(self.tower, self.tokenizer) * len(images) + user_text if images else user_text
        messages = self.messages + [{"role": "user", "content": content}]
        for i, m in enumerate(messages):  # a history given to the constructor may hold anything
            if not isinstance(m, dict) or not isinstance(m.get("content"), str):
                raise MinqwenError(f"chat message {i}: a ChatSession's messages are dicts whose 'content' is text "
                                   f"(images go in with reply(…, images=…)), got {m!r:.200}")
        body_text = self.tokenizer.render_chat(messages, add_generation_prompt=False)
        full_text = self.tokenizer.render_chat(messages, add_generation_prompt=True,
                                               enable_thinking=self.enable_thinking)
        # With a tower, the count below catches it. (Answers are left out: the model may write the
        # token, and the user could not take it back.)
        written = [marker for marker in (IMAGE_PAD, VIDEO_PAD) for m in messages
                   if m["role"] != "assistant" and marker in m["content"]]
        if self.tower is None and written:
            raise MinqwenError(f"the conversation holds {written[0]} (in this message or an earlier one, the system "
                               "message included), the token that marks where an image or a video goes, but this "
                               "chat has no images: attach them instead (images=… with a vision tower; `minqwen "
                               "chat`: --image or a line /image PATH)")
        body, full = self.tokenizer.encode(body_text), self.tokenizer.encode(full_text)
        if self._count_images(full) != len(self.images) + len(images):
            raise MinqwenError(
                f"the conversation would hold {self._count_images(full)} <|image_pad|> tokens (id "
                f"{self.tower.config.image_token_id}) for {len(self.images) + len(images)} images: attach images "
                "with images=…, not by writing their tokens into the text"
            )
        turn = len(self.messages), len(self.images)
        self.messages.append(messages[-1])
        self.images += images
        try:
            yield from self._answer(body, full, body_text, full_text, params, max_new_tokens, seed, stats, decode,
                                    stop_strings)
        except BaseException:
            # The turn did not finish: a bad argument found on the way, an error, or the caller
            # stopped reading (a break, Ctrl-C: GeneratorExit). Leave the conversation as it was
            # before it, and the cache at a snapshot within what the remaining conversation
            # renders to: the log may already hold this turn's message (and the cache its
            # image), which the same text with another image would otherwise reuse.
            del self.messages[turn[0]:], self.images[turn[1]:]
            history = []  # ids of what remains; none when nothing remains or the template fails on it
            if self.messages:
                try:
                    history = self.tokenizer.encode(self.tokenizer.render_chat(self.messages, add_generation_prompt=False))
                except MinqwenError:
                    pass
            self._roll_back(self._common_prefix(history))
            raise

    def _answer(self, body, full, body_text, full_text, params, max_new_tokens, seed, stats, decode, stop_strings):
        """Feed the new turn and stream the answer (reply's second half, once the message is added)."""
        if full[: len(body)] == body:
            # Feed the conversation so far and remember this point: next turn's re-rendered
            # history (which may differ after it) can roll back to here.
            self._feed(self._sync(body))
            self.snapshots[len(self.log)] = self.cache.copy()
        prompt = self._sync(full)
        if self._count_images(prompt[:-1]):
            # The body was not fed above (the generation prompt changed how it tokenizes): feed
            # the images through the tower now, and start generation from the last token.
            self._feed(prompt[:-1])
            prompt = prompt[-1:]
        # What the generation prompt already wrote of the answer (e.g. "<think>\n"), after
        # ChatML's assistant header; a template of another format is taken to write none.
        generation_prompt = full_text[len(body_text):] if full_text.startswith(body_text) else ""
        header = "<|im_start|>assistant\n"
        answer_start = generation_prompt.split(header, 1)[1] if header in generation_prompt else ""
        ids: list[int] = []
        pieces = []
        for piece in stream_text(self.model, self.tokenizer, prompt, params, max_new_tokens, stop_strings, seed,
                                 self.cache, list(self.log), stats, ids_out=ids, skip_special_tokens=False,
                                 decode=decode):
            pieces.append(piece)
            yield piece
        self.log += prompt + ids[:-1]  # the last id was sampled but not fed back
        answer = answer_start + "".join(pieces)
        if self.tower is not None:
            # An image or video token the model wrote is no image: keep it out of the history,
            # whose i-th <|image_pad|> is the i-th image. (The next turn rolls back over it.)
            c = self.tower.config
            for token_id in (c.image_token_id, c.video_token_id):
                answer = answer.replace(self.tokenizer.decode([token_id]), "")
        self.messages.append({"role": "assistant", "content": answer})
