"""The `minqwen` command line: one subcommand per job, each a thin layer over the Python API.

    minqwen generate "def parse_args"         complete a prompt (the embedded model by default)
    minqwen chat                               talk, several turns, one cache
    minqwen inspect --context 2048             layers, parameters, weight and cache bytes
    minqwen score FILE --window 1024           perplexity and bits per byte of a text
    minqwen golden record|compare …            golden outputs for other implementations

Every error a user can cause ends as a one-line message and a non-zero exit code, never a
traceback: MinqwenError is caught here and printed.
"""

from __future__ import annotations

import argparse
import codecs
import io
import os
import re
import sys
import time
import warnings
from pathlib import Path

from . import __version__, golden
from .config import is_present
from .errors import MinqwenError

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


# --------------------------------------------------------------------------- shared options


def add_model_option(parser):
    parser.add_argument("--model", metavar="DIR|HUB_ID",
                        help="checkpoint folder, or a hub id already in the local Hugging Face cache "
                             "(default: the small model embedded in minqwen)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                        help="how the weight matrices are kept: float32 (default), or bfloat16 — half the memory "
                             "and faster decoding, widened exactly to float32 inside the matmuls")
    parser.add_argument("--bf16-prompts", action="store_true",
                        help="with --dtype bfloat16, on a CPU with AVX512-BF16: round a prompt's activations to bf16 "
                             "and multiply with the CPU's bf16 dot-product instruction — about twice as fast a "
                             "prompt, no longer exact (decode steps multiply exactly, over the cache the prompt left)")


SAMPLING_OPTIONS = ("temperature", "top_k", "top_p", "min_p", "repetition_penalty", "presence_penalty")


def add_sampling_options(parser):
    g = parser.add_argument_group("sampling (defaults: the checkpoint's generation_config.json as transformers "
                                  "reads it, else greedy; top-k 50 unless set)")
    g.add_argument("--max-new-tokens", type=int, default=128, metavar="N", help="at most N new tokens (default 128)")
    g.add_argument("--temperature", type=float, metavar="T", help="0 = greedy")
    g.add_argument("--top-k", type=int, metavar="K")
    g.add_argument("--top-p", type=float, metavar="P")
    g.add_argument("--min-p", type=float, metavar="P")
    g.add_argument("--repetition-penalty", type=float, metavar="R", help="multiplicative, as transformers (1 = off)")
    g.add_argument("--presence-penalty", type=float, metavar="P", help="additive, as the OpenAI API (0 = off)")
    g.add_argument("--seed", type=int, help="makes sampling reproducible")
    g.add_argument("--stop", action="append", default=[], metavar="TEXT", help="stop at this text (repeatable)")


def add_speculative_option(parser):
    parser.add_argument(
        "--speculative", type=int, nargs="?", const=1, default=None, metavar="K",
        help="draft K tokens per step with the checkpoint's MTP head and verify them in one pass "
             "(greedy: the same output; sampling: the same distribution, other draws for a seed; K defaults "
             "to 1; 0 turns it off). Default, where the checkpoint has an MTP head: K = 1 in models of 64 MB of "
             "weights and more; in smaller ones such as the embedded, K = 2 when greedy, off when sampling "
             "(as measured to pay)")


def check_generation_options(args):
    """The options every generation takes, checked before the model loads, named as on the command line."""
    if args.max_new_tokens < 1:
        raise MinqwenError(f"--max-new-tokens must be ≥ 1, got {args.max_new_tokens}")
    if args.seed is not None and args.seed < 0:
        raise MinqwenError(f"--seed must be ≥ 0, got {args.seed}")
    from .sampling import SamplingParams

    for name in SAMPLING_OPTIONS:  # each alone, the others at their defaults: the error is its own
        value = getattr(args, name)
        try:
            if value is not None:
                SamplingParams(**{name: value})
        except MinqwenError as e:  # "top_p must be in (0, 1] …" → "--top-p must be in (0, 1] …"
            raise MinqwenError(f"--{name.replace('_', '-')}{str(e).removeprefix(name)}") from None
    if not all(args.stop):
        raise MinqwenError("--stop needs a non-empty text to stop at")
    for text in args.stop:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:  # bytes that were not UTF-8: no generated text can hold them
            raise MinqwenError(f"--stop {text!r}: not UTF-8 text, so generated text can never match it") from None


def choose_decoder(args, model, folder, params):
    """(decode, the class of its stats) for the generation loop: the MTP head's speculative decoder
    when --speculative asks for it or when it pays (mtp.default_draft_tokens; this loads the
    head), else None for plain decoding."""
    from .generate import GenerationStats
    from .mtp import SpeculativeStats, default_draft_tokens, load_mtp, require_head, speculative_decoder

    k = args.speculative
    if k is not None and k < 0:
        raise MinqwenError(f"--speculative takes a number of draft tokens ≥ 0, got {k}")
    if k is None:
        k = default_draft_tokens(model, params)
    if k == 0:
        return None, GenerationStats
    head = load_mtp(folder, model)
    if head is None:
        if args.speculative is None:  # not asked for: plain decoding
            return None, GenerationStats
        require_head(head, str(folder))
    return speculative_decoder(head, k), SpeculativeStats


def decode_rate(stats) -> str:
    """'812.4 tok/s', timed from the first new token on; with one token there is nothing to time."""
    return f"{stats.decode_tokens_per_second:.1f} tok/s" if stats.generated_tokens > 1 else "no rate (one token)"


def speculative_summary(stats) -> str:
    """' · speculative: 82% of 40 drafts accepted, 1.8 tokens per pass', or ''."""
    if not hasattr(stats, "acceptance_rate"):
        return ""
    return (f" · speculative: {stats.acceptance_rate:.0%} of {stats.drafted} drafts accepted, "
            f"{stats.tokens_per_verify:.2f} tokens per pass")


def compile_timer():
    """A Numba event listener that adds up the seconds its kernels spend compiling while it is
    installed (``numba.core.event.install_listener("numba:compile", timer)``).

    A first run (or the first after an upgrade) compiles every kernel it meets: seconds, on
    the embedded model. Later runs load them from Numba's on-disk cache, which is not a compile
    and is not counted. Without saying so, a first run's prefill rate would read as the model's.
    """
    from numba.core.event import TimingListener

    return TimingListener()


def compile_note(timer) -> str:
    """' · of the above, 2.6 s compiling Numba kernels (…)', or '' below a tenth of a second."""
    seconds = timer.duration if timer.done else 0.0
    if seconds < 0.1:
        return ""
    return f" · of the above, {seconds:.1f} s compiling Numba kernels (once: Numba caches them on disk)"


def warm_kernels(model) -> None:
    """One token through a throwaway cache, so that Numba has loaded (on a first run, compiled)
    the kernels a forward pass uses before the prompt is timed.

    Each Numba kernel is read from the on-disk cache at its first call in a process, and the
    first call of all sets up Numba itself: ~0.15 s together on the embedded model, whose
    prefill of a short prompt takes a few milliseconds. Timed with the prompt, that made a
    3-token prefill read ~23 tokens/s; counted with loading instead, it reads as fast as it is.
    """
    model.forward([0], model.new_cache(), last_only=True)


def sampling_params(args, tokenizer):
    from .sampling import SamplingParams, filters_unused

    params = SamplingParams.from_generation_config(tokenizer.generation_config, str(tokenizer.generation_config_path),
                                                   **{n: getattr(args, n) for n in SAMPLING_OPTIONS})
    ignored = [f"--{n.replace('_', '-')}" for n in filters_unused(params, vars(args))]
    if ignored:
        if args.temperature is not None:
            why = "--temperature 0"
        elif tokenizer.generation_config.get("do_sample") is True:
            why = "the checkpoint's generation_config.json sets temperature 0"
        else:
            why = "the checkpoint's generation_config.json does not set do_sample: true"
        verb = "changes" if len(ignored) == 1 else "change"
        print(f"minqwen: warning: {', '.join(ignored)} {verb} nothing while decoding is greedy ({why}); "
              f"give --temperature T > 0 to sample", file=sys.stderr)
    return params


def load_model_and_tokenizer(spec, need_tokenizer=True, dtype="float32", bf16_prompts=False):
    from .bf16_dot import check_bf16_dot_available
    from .checkpoint import find_checkpoint
    from .model import load
    from .tokenizer import Tokenizer

    if bf16_prompts:
        if dtype != "bfloat16":
            raise MinqwenError("--bf16-prompts needs --dtype bfloat16 (the weights must be kept in bf16)")
        check_bf16_dot_available()
    folder = find_checkpoint(spec)
    if not is_present(folder / "config.json"):  # not a checkpoint at all: say so, not which of its files is missing
        raise MinqwenError(f"{folder}: no config.json, so this is not a checkpoint folder (a Qwen3.5 checkpoint "
                           f"holds config.json, *.safetensors and tokenizer.json)")
    tokenizer = Tokenizer(folder) if need_tokenizer else None
    model = load(folder, progress=progress_bar(), dtype=dtype, bf16_prompts=bf16_prompts)
    return model, tokenizer


def progress_bar():
    """A loading bar on stderr for big checkpoints (tqdm if installed, else a plain line)."""
    state = {"bar": None, "shown": -1}

    def update(done: int, total: int):
        if total < 200 * 1024 * 1024 or not sys.stderr.isatty():
            return
        try:
            from tqdm import tqdm
        except ImportError:
            percent = 100 * done // total
            if percent != state["shown"]:
                state["shown"] = percent
                print(f"\rloading weights: {percent:3d}%", end="" if done < total else "\n", file=sys.stderr)
            return
        if state["bar"] is None:
            state["bar"] = tqdm(total=total, unit="B", unit_scale=True, desc="loading weights", file=sys.stderr)
        state["bar"].update(done - state["bar"].n)
        if done >= total:
            state["bar"].close()

    return update


class ThinkingPrinter:
    """Prints streamed text, showing the reasoning inside <think>…</think> dimmed, or hiding it."""

    def __init__(self, hide: bool, in_think: bool, out=None):
        self.hide, self.in_think = hide, in_think
        self.out = sys.stdout if out is None else out  # looked up now, not when the module was imported
        self.color = self.out.isatty()
        self.pending = ""
        self.after_think = False  # the answer's leading newlines are still to be dropped
        # Without colour the tags mark the reasoning. ``in_think``: the prompt opened it (a Qwen
        # chat template's answer prompt ends with "<think>\n"), so the model never writes the
        # opening tag: print it for the model, once there is something to show.
        self.open_tag_due = in_think and not hide and not self.color

    def write(self, piece: str):
        if self.open_tag_due and (self.pending or piece):
            self.out.write(THINK_OPEN + "\n")
            self.open_tag_due = False
        text = self.pending + piece
        self.pending = ""
        if self.after_think:  # they may come in the pieces after the one that closed the reasoning
            text = text.lstrip("\n")
            self.after_think = not text
        while text:
            tag = THINK_CLOSE if self.in_think else THINK_OPEN
            at = text.find(tag)
            if at < 0:
                # hold back a possible partial tag at the end
                keep = next((k for k in range(len(tag) - 1, 0, -1) if text.endswith(tag[:k])), 0)
                self._emit(text[: len(text) - keep])
                self.pending = text[len(text) - keep:]
                break
            self._emit(text[:at])
            self.in_think = not self.in_think
            if not self.hide and not self.color:
                self.out.write(tag if self.in_think else tag + "\n")  # the answer starts on a line of its own
            text = text[at + len(tag):]
            if not self.in_think:
                text = text.lstrip("\n")
                self.after_think = not text
        self.out.flush()

    def _emit(self, text: str):
        if not text:
            return
        if self.in_think:
            if self.hide:
                return
            if self.color:
                text = f"\x1b[2m{text}\x1b[0m"
        self.out.write(text)

    def close(self):
        self._emit(self.pending)
        self.pending = ""
        self.out.flush()


# --------------------------------------------------------------------------- generate


def opens_reasoning(prompt_text: str) -> bool:
    """Whether a rendered prompt leaves a <think> open: the answer then starts inside the reasoning."""
    return prompt_text.rfind(THINK_OPEN) > prompt_text.rfind(THINK_CLOSE)


def run_generate(args) -> int:
    from numba.core.event import install_listener

    from .generate import IMAGE_PAD, checked_generation_args, stream_text
    from .tokenizer import check_utf8

    check_generation_options(args)
    if args.tokens is not None and args.prompt is not None:
        raise MinqwenError("give either a prompt or --tokens, not both")
    if args.tokens is not None and args.chat:
        raise MinqwenError("--chat wraps a text prompt in the chat template; --tokens are fed as they are")
    if args.no_think and not args.chat:
        raise MinqwenError("--no-think goes with --chat (it changes the chat template's answer prompt)")
    prompt_text = args.prompt
    if args.tokens is None and prompt_text in (None, "-"):
        if prompt_text is None and sys.stdin is not None and sys.stdin.isatty():
            raise MinqwenError("give a prompt as an argument or on standard input")
        prompt_text = read_stdin()
    if args.tokens is None and not prompt_text.strip():
        raise MinqwenError("the prompt is empty")
    if args.tokens is None:
        check_utf8(prompt_text, "the prompt")  # here, not in the chat template's rendering of it
    if args.tokens is None and not args.image and IMAGE_PAD in prompt_text:
        raise MinqwenError(f"the prompt holds {IMAGE_PAD}, the token that marks where an image goes, but no "
                           "--image was given")
    from .checkpoint import find_checkpoint

    started = time.perf_counter()
    model, tokenizer = load_model_and_tokenizer(args.model, dtype=args.dtype, bf16_prompts=args.bf16_prompts)
    params = sampling_params(args, tokenizer)
    decode, stats_class = choose_decoder(args, model, find_checkpoint(args.model), params)  # (loads an MTP head)
    loading = time.perf_counter() - started
    tower, model_text = None, prompt_text  # model_text: what the model reads; the prompt is echoed as given
    if args.image:
        from . import vision

        if args.tokens is not None:
            raise MinqwenError("--image goes with a text prompt, not with --tokens")
        tower = vision.load_vision(find_checkpoint(args.model))
        model_text = vision.with_image_placeholders(prompt_text, len(args.image), tower, tokenizer)
    if args.tokens is not None:
        ids = parse_token_ids(args.tokens)
    elif args.chat:
        rendered = tokenizer.render_chat([{"role": "user", "content": model_text}], enable_thinking=not args.no_think)
        ids = tokenizer.encode(rendered)
    else:
        ids = tokenizer.encode(model_text)
    cache, history = None, ()
    image_prefill_tokens, image_prefill_seconds = 0, 0.0
    compiling = compile_timer()
    started = time.perf_counter()
    with install_listener("numba:compile", compiling):
        warm_kernels(model)
    loading += time.perf_counter() - started
    if tower is not None:
        cache = model.new_cache()
        start = time.perf_counter()
        with install_listener("numba:compile", compiling):
            vision.prefill(model, tower, ids[:-1], args.image, cache)  # the images go in with the prompt…
        image_prefill_tokens, image_prefill_seconds = cache.position, time.perf_counter() - start
        ids, history = ids[-1:], ids[:-1]  # …and its last token starts generation
    stats = stats_class()
    # Checked before the prompt is echoed: a run that fails should not print half its output first.
    checked_generation_args(ids, args.max_new_tokens, args.seed)
    c = model.config
    outside = [i for i in ids if i >= c.vocab_size] if args.tokens is None else []
    if outside:
        raise MinqwenError(f"the tokenizer gives token id {outside[0]}, outside the model's vocabulary (vocab_size "
                           f"{c.vocab_size} in config.json): tokenizer.json and the weights are not of one model")
    if tower is None and len(ids) > c.max_position_embeddings:
        raise MinqwenError(f"the prompt is {len(ids)} tokens, beyond the model's context of "
                           f"{c.max_position_embeddings} (config max_position_embeddings)")
    printer = ThinkingPrinter(hide=args.hide_thinking, in_think=args.chat and opens_reasoning(rendered))
    if not args.chat:
        sys.stdout.write(prompt_text if args.tokens is None and args.echo else "")
    with install_listener("numba:compile", compiling):
        for piece in stream_text(model, tokenizer, ids, params, args.max_new_tokens, args.stop, args.seed,
                                 cache=cache, history=history, stats=stats, skip_special_tokens=not args.chat,
                                 decode=decode):
            printer.write(piece)
    printer.close()
    print(file=sys.stdout)
    # With images, all but the prompt's last token went in before the loop: count them as prefill.
    stats.prompt_tokens += image_prefill_tokens
    stats.prefill_seconds += image_prefill_seconds
    print(f"[load: {loading:.1f} s · "
          f"prefill: {stats.prompt_tokens} tokens, {stats.prefill_tokens_per_second:.1f} tok/s · "
          f"decode: {stats.generated_tokens} tokens, {decode_rate(stats)} · "
          f"stop: {stats.stop_reason}{speculative_summary(stats)}{compile_note(compiling)}]", file=sys.stderr)
    return 0


# --------------------------------------------------------------------------- chat


def attach_image(session, path: str, spec, given_as: str = "/image"):
    """Read an image for the chat's next message, loading the vision tower the first time; say so on stderr.

    ``given_as``: "/image" (a line of the chat) or "--image" (the option), for the errors."""
    from . import vision
    from .checkpoint import find_checkpoint
    from .image import read_image

    if not path:
        raise MinqwenError(f"{given_as} needs a path: {given_as} PATH")
    if session.tower is None:
        session.tower = vision.load_vision(find_checkpoint(spec))
    pixels = read_image(Path(os.path.expanduser(path)))  # (Path.expanduser raises for an unknown ~user)
    height, width = pixels.shape[:2]
    try:
        tokens = session.tower.token_count(height, width)
    except MinqwenError as e:  # say which of the images it was
        raise MinqwenError(f"{path}: {e}") from None
    print(f"[image {path}: {width}×{height} pixels, {tokens} image tokens, goes with the next message]",
          file=sys.stderr)
    return pixels


def run_chat(args) -> int:
    from numba.core.event import install_listener

    from .checkpoint import find_checkpoint
    from .generate import ChatSession
    from .tokenizer import check_utf8

    check_generation_options(args)
    model, tokenizer = load_model_and_tokenizer(args.model, dtype=args.dtype, bf16_prompts=args.bf16_prompts)
    params = sampling_params(args, tokenizer)
    decode, stats_class = choose_decoder(args, model, find_checkpoint(args.model), params)
    if sys.stdin is None:  # started with standard input closed (`<&-`)
        raise MinqwenError("standard input is closed: chat reads its messages from it (a terminal, a pipe or a file)")
    warm_kernels(model)  # now, not after the first message: the wait comes before the prompt
    session = ChatSession(model, tokenizer, enable_thinking=not args.no_think)
    if args.system is not None:
        check_utf8(args.system, "--system")  # refused now, not at the first message
    if args.system:
        session.messages.append({"role": "system", "content": args.system})
        with_a_message = tokenizer.encode(tokenizer.render_chat(session.messages + [{"role": "user", "content": "?"}],
                                                                enable_thinking=not args.no_think))
        if len(with_a_message) >= model.config.max_position_embeddings:  # refused now, not at the first message
            raise MinqwenError(f"--system: the system message leaves no room in the model's context "
                               f"({len(with_a_message)} tokens with a one-word message and the answer's opening, "
                               f"of {model.config.max_position_embeddings}: config max_position_embeddings)")
    # Whether the answer prompt opens the reasoning depends on the template and enable_thinking only
    in_think = opens_reasoning(tokenizer.render_chat([{"role": "user", "content": "?"}],
                                                     enable_thinking=not args.no_think))
    pending = [attach_image(session, path, args.model, "--image") for path in args.image]  # for the next message
    interactive = sys.stdin.isatty()
    if interactive:
        print("minqwen chat — /image PATH shows the model an image; Ctrl-D or Ctrl-C to leave.", file=sys.stderr)
    while True:
        try:
            line = input("> " if interactive else "")
        except (EOFError, KeyboardInterrupt):
            print(file=sys.stderr)
            return 0
        except UnicodeDecodeError as e:
            if not interactive:
                raise MinqwenError(not_utf8("standard input", e)) from None
            print("minqwen: error: that line is not UTF-8 text; type it again", file=sys.stderr)
            continue
        if not line.strip():
            continue
        command, _, path = line.strip().partition(" ")
        if command == "/image":
            try:
                pending.append(attach_image(session, path.strip(), args.model))
            except MinqwenError as e:
                if not interactive:  # a script's mistake ends the script; a person may retype the path
                    raise
                print(f"minqwen: error: {e}", file=sys.stderr)
            continue
        stats = stats_class()
        printer = ThinkingPrinter(hide=args.hide_thinking, in_think=in_think)
        compiling = compile_timer()
        try:
            images, pending = pending, []
            with install_listener("numba:compile", compiling):
                for piece in session.reply(line, params, args.max_new_tokens, args.seed, stats, decode=decode,
                                           images=images, stop_strings=args.stop):
                    printer.write(piece)
        except KeyboardInterrupt:
            printer.close()
            print(file=sys.stderr)
            return 0
        except MinqwenError as e:
            # A turn that fails leaves the conversation as it was: a person may say it otherwise.
            if not interactive:
                raise
            printer.close()
            dropped = f" (its {len(images)} image(s) too: attach them again with /image)" if images else ""
            print(f"\nminqwen: error: {e}\n[that message was not added to the conversation{dropped}]",
                  file=sys.stderr)
            continue
        printer.close()
        print()
        if stats.stop_reason == "context":
            print(f"[the answer was cut short: the conversation has filled the model's context of "
                  f"{model.config.max_position_embeddings} tokens, and the next message will not fit; start a new "
                  f"chat to go on]", file=sys.stderr)
        if args.verbose:
            print(f"[decode: {stats.generated_tokens} tokens, {decode_rate(stats)}"
                  f"{speculative_summary(stats)}{compile_note(compiling)}]", file=sys.stderr)


# --------------------------------------------------------------------------- inspect


def run_inspect(args) -> int:
    from .summary import describe

    from .threads import threads_in_use

    if args.context is not None and args.context < 1:
        raise MinqwenError(f"--context must be a number of tokens ≥ 1, got {args.context}")
    model, _ = load_model_and_tokenizer(args.model, need_tokenizer=False, dtype=args.dtype, bf16_prompts=args.bf16_prompts)
    limit = model.config.max_position_embeddings
    if args.context is not None and args.context > limit:
        raise MinqwenError(f"--context {args.context} is beyond the model's context of {limit} tokens "
                           f"(config max_position_embeddings): no cache grows that large")
    print(describe(model, min(4096, limit) if args.context is None else args.context))
    threads = threads_in_use()
    print(f"\nthreads: BLAS {', '.join(map(str, threads['blas'])) or '?'}, Numba {threads['numba']} "
          f"(physical cores: {threads['physical_cores']})")
    return 0


# --------------------------------------------------------------------------- score


def read_stdin() -> str:
    if sys.stdin is None:  # started with standard input closed (`<&-`)
        raise MinqwenError("standard input is closed: give the text as an argument or a file, or redirect "
                           "standard input from one")
    try:
        return sys.stdin.read()
    except UnicodeDecodeError as e:  # (with Python's UTF-8 mode, such bytes arrive as surrogates: encode refuses them)
        raise MinqwenError(not_utf8("standard input", e)) from None


def not_utf8(what: str, e: UnicodeDecodeError) -> str:
    """The error for text in another encoding: the first byte UTF-8 cannot read, and how to convert it."""
    return (f"{what} is not UTF-8 text: the byte {e.object[e.start]:#04x} ({e.reason}); if it is in another "
            f"encoding, convert it first, e.g. iconv -f latin1 -t utf-8")


def run_score(args) -> int:
    from .scoring import score_text

    # Named as flags, before the model loads (score_text checks them again, against the context)
    if args.window is not None and args.window < 2:
        raise MinqwenError(f"--window must be ≥ 2 tokens, got {args.window}")
    if args.stride is not None and not 1 <= args.stride < (args.window or args.stride + 1):
        raise MinqwenError(f"--stride must be from 1 to --window − 1 (windows must overlap: each window's first "
                           f"token is only context for the rest), got {args.stride}"
                           + (f" with --window {args.window}" if args.window else ""))
    path = Path(args.file)
    if args.file != "-" and path.exists() and (path.is_char_device() or path.is_block_device()):
        raise MinqwenError(f"{args.file}: a device, not a text file (it might never end)")
    try:
        # The file's own bytes: read_text's universal newlines would score \r\n as \n, another text
        text = read_stdin() if args.file == "-" else path.read_bytes().decode("utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise MinqwenError(f"{args.file}: cannot read this text file ({e})") from None
    model, tokenizer = load_model_and_tokenizer(args.model, dtype=args.dtype, bf16_prompts=args.bf16_prompts)
    bar = progress_bar_tokens()
    result = score_text(model, tokenizer, text, window=args.window, stride=args.stride, progress=bar)
    print(f"tokens scored: {result.tokens_scored}")
    print(f"perplexity: {result.perplexity:.4f}")
    print(f"bits per byte: {result.bits_per_byte:.4f}")
    return 0


def progress_bar_tokens():
    """A token-count bar on stderr while scoring long texts (only on a terminal)."""
    state = {"bar": None}

    def update(done: int, total: int):
        if not sys.stderr.isatty():
            return
        try:
            from tqdm import tqdm
        except ImportError:
            print(f"\rscoring: {done}/{total} tokens", end="" if done < total else "\n", file=sys.stderr)
            return
        if state["bar"] is None:
            state["bar"] = tqdm(total=total, unit="tok", desc="scoring", file=sys.stderr)
        state["bar"].update(done - state["bar"].n)
        if done >= total:
            state["bar"].close()

    return update


# --------------------------------------------------------------------------- golden


def add_golden_parser(subparsers) -> None:
    """``minqwen golden record | compare | taps``."""
    parser = subparsers.add_parser(
        "golden", help="record intermediates (taps) of a run, or compare two recordings",
        description="Golden outputs: record every named intermediate of a run, and find where two runs part ways.",
    )
    sub = parser.add_subparsers(dest="golden_command", metavar="ACTION")
    sub.required = True

    rec = sub.add_parser("record", help="run a prompt (and greedy decode steps) and save every tap")
    rec.add_argument("--model", metavar="DIR|HUB_ID",
                     help="checkpoint folder (config.json + safetensors), or a hub id already in the local Hugging "
                          "Face cache (default: the small model embedded in minqwen)")
    prompt = rec.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", metavar="TEXT", help="text, tokenized with the model's tokenizer.json")
    prompt.add_argument("--tokens", metavar="IDS", help="token ids, comma- or space-separated, e.g. 1,2,3")
    rec.add_argument("--decode", type=int, default=0, metavar="N", help="greedy decode steps to record (default 0)")
    rec.add_argument("--taps", default="*", metavar="PATTERN",
                     help="comma-separated globs of tap names (default '*': all); see `minqwen golden taps`")
    rec.add_argument("--mtp", action="store_true",
                     help="also record the MTP head's taps over the prompt (mtp.*) and at each decode step "
                          "(step{n}.mtp.*); needs a checkpoint with mtp.*")
    rec.add_argument("--image", action="append", default=[], metavar="PATH",
                     help="an image in the prompt (repeatable; a multimodal checkpoint, Pillow): records the vision "
                          "tower's taps (visual.*) and the 3-D positions too. With --prompt it goes before the text "
                          "unless the text holds <|vision_start|><|image_pad|><|vision_end|> where each image goes; "
                          "with --tokens, the ids hold one <|image_pad|> per image")
    rec.add_argument("--out", required=True, metavar="FILE", help="the .safetensors file to write")
    rec.set_defaults(run=run_golden_record)

    cmp_ = sub.add_parser("compare", help="compare two recordings tap by tap (B is the reference)",
                          description="Exit code 0 when the recordings have a tap in common and every common "
                                      "tap is within tolerance, 1 when one is not (or none is in common), 2 on "
                                      "an error (different prompts or configs, a missing file, a bad tolerance).")
    cmp_.add_argument("a", metavar="A", help="a recording (e.g. your port's)")
    cmp_.add_argument("b", metavar="B", help="the reference recording: rtol scales with |B|")
    cmp_.add_argument("--atol", type=float, default=golden.DEFAULT_ATOL, help=f"absolute tolerance (default {golden.DEFAULT_ATOL:g})")
    cmp_.add_argument("--rtol", type=float, default=golden.DEFAULT_RTOL, help=f"relative tolerance (default {golden.DEFAULT_RTOL:g})")
    cmp_.set_defaults(run=run_golden_compare)

    taps = sub.add_parser("taps", help="print the table of tap names, shapes and meanings")
    taps.set_defaults(run=run_golden_taps)


def run_golden_record(args) -> int:
    from .model import load  # here, not at the top: `minqwen golden compare` needs no model

    if args.decode < 0:
        raise MinqwenError(f"--decode must be ≥ 0, got {args.decode}")
    from .checkpoint import find_checkpoint

    model_dir = find_checkpoint(args.model)
    out = Path(args.out)
    if os.path.lexists(out) and out.parent.is_dir() and os.path.samefile(out.parent, model_dir):
        raise MinqwenError(f"--out {args.out}: is a file of the checkpoint being recorded ({model_dir}); writing "
                           f"the recording there would destroy it. Give another file name")
    tower, prompt_text = None, args.prompt
    if args.image:
        from . import vision
        from .tokenizer import Tokenizer

        if args.mtp:
            raise MinqwenError("--mtp records the MTP head over a text prompt: record it without --image")
        tower = vision.load_vision(model_dir)
        if prompt_text is not None and is_present(model_dir / "tokenizer.json"):  # (else encode_prompt says so)
            prompt_text = vision.with_image_placeholders(prompt_text, len(args.image), tower, Tokenizer(model_dir))
    ids = parse_token_ids(args.tokens) if args.tokens is not None else encode_prompt(model_dir, prompt_text)
    model = load(model_dir)
    head = None
    if args.mtp:
        from .mtp import load_mtp

        head = load_mtp(model_dir, model)
        if head is None:
            raise MinqwenError(f"--mtp: {model_dir} has no MTP head (no mtp.* tensors) to record")
    recording = golden.record(model, ids, decode_steps=args.decode, taps=args.taps, mtp_head=head, tower=tower,
                              images=args.image)
    ids = recording["token_ids"]  # with images: each <|image_pad|> expanded
    if head is not None and not any(golden.is_mtp_tap(name) for name in recording):
        raise MinqwenError(f"--mtp: --taps '{args.taps}' selects none of the MTP head's taps (mtp.…), so --mtp "
                           f"would record nothing more; add 'mtp.*' to --taps, or leave out --mtp")
    golden.save(recording, args.out, golden.model_metadata(model))
    n_taps = len([name for name in recording if name not in golden.ID_VECTORS])
    size = sum(a.nbytes for a in recording.values())
    print(f"recorded {n_taps} taps ({size / 1e6:.1f} MB) for {len(ids)} prompt tokens and {args.decode} decode "
          f"steps → {args.out}")
    return 0


def run_golden_compare(args) -> int:
    report = golden.compare(args.a, args.b, atol=args.atol, rtol=args.rtol)
    print(report.format())
    return 0 if report.ok else 1


def run_golden_taps(args) -> int:
    print(golden.format_tap_table())
    return 0


def parse_token_ids(text: str) -> list[int]:
    """``"1,2, 3"`` or ``"1 2 3"`` → [1, 2, 3]."""
    parts = [p for p in re.split(r"[,\s]+", text.strip()) if p]
    if not parts or not all(re.fullmatch(r"\d+", p) for p in parts):
        raise MinqwenError(f"--tokens: {text!r} is not a list of token ids (e.g. --tokens 151644,872,198)")
    return [int(p) for p in parts]


def encode_prompt(model_dir: Path, text: str) -> list[int]:
    """Tokenize ``text`` with the checkpoint's tokenizer (no special tokens are added)."""
    if not is_present(model_dir / "tokenizer.json"):
        raise MinqwenError(f"{model_dir}: no tokenizer.json, so --prompt cannot be tokenized; "
                           f"give the ids with --tokens instead (e.g. --tokens 1,2,3)")
    from .tokenizer import Tokenizer

    ids = Tokenizer(model_dir).encode(text)
    if not ids:
        raise MinqwenError("--prompt: the text tokenizes to no tokens; give a non-empty prompt")
    return ids


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="minqwen", description="Qwen3.5 in readable NumPy.")
    parser.add_argument("--version", action="version", version=f"minqwen {__version__}")
    parser.add_argument("--threads", type=int, metavar="N",
                        help="threads for BLAS and Numba (default: the physical cores, at most NUMBA_NUM_THREADS)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser("generate", help="continue a prompt, streaming tokens")
    p.add_argument("prompt", nargs="?", help="the prompt (default, or -: read standard input)")
    p.add_argument("--tokens", metavar="IDS",
                   help="token ids instead of a text prompt, e.g. '1,2,3' (the output is text: needs tokenizer.json)")
    p.add_argument("--chat", action="store_true", help="wrap the prompt as a user message in the chat template")
    p.add_argument("--no-think", action="store_true", help="with --chat: ask for an answer without reasoning")
    p.add_argument("--hide-thinking", action="store_true", help="do not print the reasoning")
    p.add_argument("--echo", action=argparse.BooleanOptionalAction, default=True,
                   help="print a plain text prompt before its continuation (default; a --chat or --tokens "
                        "prompt is never printed)")
    p.add_argument("--image", action="append", default=[], metavar="PATH",
                   help="an image to show the model (repeatable; needs a multimodal checkpoint and Pillow). It "
                        "goes before the prompt, unless the prompt holds <|vision_start|><|image_pad|><|vision_end|> "
                        "where each image goes")
    add_model_option(p)
    add_sampling_options(p)
    add_speculative_option(p)
    p.set_defaults(run=run_generate)

    p = sub.add_parser("chat", help="an interactive multi-turn conversation")
    p.add_argument("--system", help="a system message")
    p.add_argument("--no-think", action="store_true", help="answer without reasoning")
    p.add_argument("--hide-thinking", action="store_true", help="do not print the reasoning")
    p.add_argument("--verbose", action="store_true", help="print tokens/s after each answer")
    p.add_argument("--image", action="append", default=[], metavar="PATH",
                   help="show the model an image with the first message (repeatable; later ones: a line "
                        "'/image PATH'; needs a multimodal checkpoint and Pillow)")
    add_model_option(p)
    add_sampling_options(p)
    add_speculative_option(p)
    p.set_defaults(run=run_chat)

    p = sub.add_parser("inspect", help="the model at a glance: layers, parameters, memory")
    p.add_argument("--context", type=int, metavar="N",
                   help="context length for the cache sizes (default: 4096, or the model's context if shorter)")
    add_model_option(p)
    p.set_defaults(run=run_inspect)

    p = sub.add_parser("score", help="perplexity and bits per byte of a text file")
    p.add_argument("file", help="a UTF-8 text file, or - for standard input")
    p.add_argument("--window", type=int, metavar="N", help="tokens per window (default: the model's context)")
    p.add_argument("--stride", type=int, metavar="N", help="tokens between window starts (default: window / 2)")
    add_model_option(p)
    p.set_defaults(run=run_score)

    add_golden_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    if sys.stderr is None:  # started with standard error closed (`2>&-`): print(file=None) would write to stdout
        sys.stderr = open(os.devnull, "w")
    _text_streams_in_utf8()
    parser = build_parser()
    args = parser.parse_args(argv)
    with warnings.catch_warnings():  # (which puts Python's own display back on the way out)
        # A warning (a config field not read, an image clipped to 8 bits) in one line, as the
        # errors are, instead of Python's file:line and the source line that raised it.
        warnings.showwarning = _print_warning
        return _run(args)


def _print_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"minqwen: warning: {message}", file=sys.stderr if file is None else file)


def _run(args) -> int:
    try:
        from .threads import set_threads

        if sys.stdout is None:  # started with standard output closed (`>&-`)
            raise MinqwenError("standard output is closed: minqwen has nowhere to write (redirect it to a file)")
        if args.threads is not None and args.threads < 1:
            raise MinqwenError(f"--threads must be ≥ 1, got {args.threads}")
        set_threads(args.threads)
        return int(args.run(args) or 0)
    except MinqwenError as e:
        print(f"minqwen: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except BrokenPipeError:  # a reader that stopped early (`| head`) is no error
        return 0
    except OSError as e:
        # What the system refused, most often writing the output (a full disk, /dev/full): one
        # line, and stdout pointed at nothing so that Python's own flush at exit cannot fail again.
        print(f"minqwen: error: {e}", file=sys.stderr)
        _discard_stdout()
        return 2


def _text_streams_in_utf8() -> None:
    """Read standard input as UTF-8, as prompts are, whatever the locale says; and where the
    output's encoding cannot show a character the model writes (PYTHONIOENCODING=ascii, say),
    show "?" for it rather than stop with an encoding error."""
    if isinstance(sys.stdin, io.TextIOWrapper):
        sys.stdin.reconfigure(encoding="utf-8")
    for stream in (sys.stdout, sys.stderr):
        if isinstance(stream, io.TextIOWrapper) and codecs.lookup(stream.encoding).name != "utf-8":
            stream.reconfigure(errors="replace")


def _discard_stdout() -> None:
    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):
        pass
