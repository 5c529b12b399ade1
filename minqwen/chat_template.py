"""A conversation rendered as the text the model was trained on: the checkpoint's chat template.

A Qwen3.5 checkpoint ships its chat template as Jinja (in ``tokenizer_config.json`` or
``chat_template.jinja``). It turns a list of messages — text, or content parts naming images
and videos, tool calls, reasoning — plus the tool schemas on offer into one string with the
``<|im_start|>role … <|im_end|>`` markers. minqwen renders it as transformers 5.23.0's
``apply_chat_template(…, tokenize=False)`` does, so that both give a model the same prompt:

* the template sees the same variables: ``messages``, ``tools``, ``documents``,
  ``add_generation_prompt``, the tokenizer's named special tokens (``eos_token`` …) and
  whatever else the caller passes (``enable_thinking``, ``add_vision_id`` …);
* the same helpers: ``raise_exception``, ``strftime_now``, a ``tojson`` that keeps non-ASCII
  text as it is, ``{% break %}`` / ``{% continue %}``, and a ``{% generation %}`` block;
* a message's reasoning, under whichever of ``reasoning_content``, ``thinking`` or
  ``reasoning`` the caller used, is readable under the first two;
* whitespace control: ``trim_blocks`` and ``lstrip_blocks`` on.

A template comes with a checkpoint, and code that comes with a checkpoint is never trusted:
it runs in Jinja's immutable sandbox, with its output and its loops' steps bounded, and sees
only plain data (strings, numbers, lists, dicts). Anything else a message carries — a decoded
image, an array — is shown to it as a placeholder naming its type: templates test whether an
image is there, never what it holds.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from datetime import datetime

import numpy as np
from jinja2 import TemplateError, nodes
from jinja2.exceptions import SecurityError
from jinja2.ext import Extension
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.utils import Namespace

from .errors import MinqwenError

# A rendered conversation longer than this cannot fit any context: Qwen3.5's native 262,144
# tokens are about a million characters.
MAX_RENDERED_CHARACTERS = 8_000_000
# Steps of a template's {% for %} loops, all loops of one rendering together. A template that
# loops without writing never reaches the limit above; Qwen3.5's takes a few steps per message
# and tool, so this is room for conversations far past any context (~1 s of Jinja here).
MAX_LOOP_STEPS = 5_000_000
# What the template is given by render itself: a special token or variable of the same name
# would take its place (in transformers, a TypeError).
RENDER_ARGUMENTS = ("messages", "tools", "documents", "add_generation_prompt")

# Used when a checkpoint has no template: Qwen's ChatML with its thinking switch. Content given
# as parts renders as Qwen's templates render it: text as it is, each image or video as its
# vision markers.
CHATML_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message.role + '\\n' -}}"
    "{%- if message.content is string -%}{{- message.content -}}"
    "{%- elif message.content is iterable and message.content is not mapping -%}"
    "{%- for part in message.content -%}"
    "{%- if part.type == 'image' or 'image' in part or 'image_url' in part -%}"
    "{{- '<|vision_start|><|image_pad|><|vision_end|>' -}}"
    "{%- elif part.type == 'video' or 'video' in part -%}"
    "{{- '<|vision_start|><|video_pad|><|vision_end|>' -}}"
    "{%- elif 'text' in part -%}{{- part.text -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- '<|im_start|>assistant\\n' -}}"
    "{%- if enable_thinking is defined and enable_thinking is false -%}{{- '<think>\\n\\n</think>\\n\\n' -}}"
    "{%- else -%}{{- '<think>\\n' -}}{%- endif -%}"
    "{%- endif -%}"
)

# The names a message's reasoning may come under; templates read the first (Qwen's) or the
# second (some others').
REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


def plain_data(value):
    """``value`` rebuilt from JSON types alone, so that the sandboxed template can call no method
    of the caller's objects; anything else becomes a placeholder such as ``"<ndarray>"``."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):  # a subclass (an enum of roles) as its bare text, whatever its __str__ says
        return str.__str__(value)
    if isinstance(value, float):  # NumPy's float64 is one
        return float.__float__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, np.generic):  # np.bool_(False) would otherwise be a truthy placeholder
        return plain_data(value.item())
    if isinstance(value, Mapping):
        return {plain_data(key): plain_data(item) for key, item in value.items()}
    if isinstance(value, list):
        return [plain_data(item) for item in value]
    if isinstance(value, tuple):
        return tuple(plain_data(item) for item in value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: plain_data(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if callable(getattr(value, "model_dump", None)):  # a pydantic model, as the OpenAI client's messages are
        return plain_data(value.model_dump())
    return f"<{type(value).__name__}>"


def conversation(messages) -> list[dict]:
    """The messages as the template sees them: checked, plain data, reasoning under every name."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise MinqwenError(f"a chat is a list of one or more messages (dicts with 'role' and 'content'), got "
                           f"{messages!r:.200}")
    shown = []  # the messages as the template will see them
    for i, (raw, message) in enumerate(zip(messages, plain_data(list(messages)))):
        if isinstance(raw, Mapping) and not isinstance(raw.get("content"), (str, list, tuple, type(None))):
            message = dict(message, content=raw["content"])  # not its "<bytes>" placeholder: refused below
        if isinstance(message, dict):
            # A field set to None is left out, as transformers leaves it out: the OpenAI client
            # writes content=None, tool_calls=None, and templates test whether a field is there.
            message = {key: value for key, value in message.items() if value is not None}
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise MinqwenError(f"chat message {i} must be a dict with a string 'role' (and its 'content': text, "
                               f"or a list of parts such as {{'type': 'text', 'text': …}}), got {message!r:.200}")
        content = message.get("content")
        if not (content is None or isinstance(content, str)
                or isinstance(content, (list, tuple)) and all(isinstance(part, dict) for part in content)):
            raise MinqwenError(f"chat message {i}: 'content' must be text or a list of parts (dicts such as "
                               f"{{'type': 'text', 'text': …}} or {{'type': 'image'}}), got {content!r:.200}")
        reasoning = next((message[k] for k in REASONING_FIELDS if message.get(k) is not None), None)
        if reasoning is not None:
            message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
        shown.append(message)
    return shown


class _GenerationBlock(Extension):
    """The ``{% generation %}…{% endgeneration %}`` tag.

    Templates written for fine-tuning wrap each assistant answer in it so that a trainer can
    find which tokens the loss counts. Rendering a prompt keeps the text inside as it is (in
    a scope of its own, as transformers' block has).
    """

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.CallBlock(self.call_method("_unchanged"), [], [], body).set_lineno(lineno)

    def _unchanged(self, caller):
        return caller()


class _Namespace(Namespace):
    """Jinja's ``namespace()``, refusing names that start with an underscore, as transformers'
    does (the sandbox guards such names on objects; a namespace's own would be left open)."""

    def __init__(*args, **kwargs):  # no named self: namespace(self=…) must still work
        self, names = args[0], dict(*args[1:], **kwargs)
        for name in names:
            _check_namespace_name(name)
        Namespace.__init__(self, names)

    def __setitem__(self, name, value):
        _check_namespace_name(name)
        Namespace.__setitem__(self, name, value)


def _check_namespace_name(name) -> None:
    # (a function, not a method: a Namespace answers every attribute lookup from its own names)
    if isinstance(name, str) and name.startswith("_"):
        raise SecurityError(f"a chat template cannot give a namespace a name that starts with '_' ({name!r})")


class _Dict:
    """``dict(…)`` and ``dict.fromkeys(…)`` for templates, without the dict type itself, whose
    unbound methods (``dict.pop(d, key)``) would change data the template was given."""

    def __call__(self, *args, **kwargs):
        return dict(*args, **kwargs)

    def fromkeys(self, *args, **kwargs):
        return dict.fromkeys(*args, **kwargs)


def _counting_loops(env, source: str, count) -> nodes.Template:
    """The template's syntax tree with each loop's iterable passed through ``count`` (by a global
    of that name), which can stop a template that loops without end or output."""
    tree = env.parse(source)
    for loop in tree.find_all(nodes.For):
        loop.iter = nodes.Call(nodes.Name("minqwen_count_loop_steps", "load"), [loop.iter], [], None, None)
        loop.iter.set_lineno(loop.lineno).set_environment(env)
    env.globals["minqwen_count_loop_steps"] = count
    return tree


def render(template: str, messages, *, add_generation_prompt: bool, tools=None, documents=None,
           special_tokens: dict | None = None, variables: dict | None = None) -> str:
    """``template`` applied to ``messages`` (see the module's docstring for what it sees);
    ``variables``: whatever else the template reads, by name."""
    try:
        messages = conversation(messages)
    except RecursionError:
        raise MinqwenError("the chat's messages are nested too deeply, or a message contains itself") from None
    if tools is not None and not (isinstance(tools, (list, tuple)) and all(isinstance(t, Mapping) for t in tools)):
        raise MinqwenError("tools must be a list of tool schemas (dicts such as {'type': 'function', 'function': "
                           f"{{'name': …, 'parameters': …}}}}), got {tools!r:.200}")
    if documents is not None and not (isinstance(documents, (list, tuple))
                                      and all(isinstance(d, Mapping) for d in documents)):
        raise MinqwenError(f"documents must be a list of dicts (with 'title' and 'text'), got {documents!r:.200}")
    shown = {}  # everything else the template sees, as plain data
    for name, value in (("tools", tools), ("documents", documents),
                        # the caller's variables win over the special tokens, as in transformers
                        ("variables", {**(special_tokens or {}), **(variables or {})})):
        try:
            shown[name] = plain_data(value)
        except RecursionError:
            raise MinqwenError(f"the chat's {name} are nested too deeply, or one contains itself") from None

    clashing = [name for name in RENDER_ARGUMENTS if name in shown["variables"]]
    if clashing:
        name = clashing[0]
        where = ("the tokenizer's special tokens (tokenizer_config.json's extra_special_tokens)"
                 if name in (special_tokens or {}) else "the variables passed to render")
        raise MinqwenError(f"{where} include one named {name!r}, which the chat template is given by the "
                           f"renderer itself ({', '.join(RENDER_ARGUMENTS)}): rename it")

    def raise_exception(message):
        raise MinqwenError(f"the chat template refused this conversation: {message}")

    steps = 0

    def count_loop_steps(iterable):
        nonlocal steps
        for item in iterable:
            steps += 1
            if steps > MAX_LOOP_STEPS:
                raise MinqwenError(f"the chat template's loops took more than {MAX_LOOP_STEPS:,} steps for this "
                                   "conversation: the template loops without end, or the conversation is far too long")
            yield item

    def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # Jinja's own tojson escapes HTML characters; templates expect plain JSON
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=["jinja2.ext.loopcontrols", _GenerationBlock])
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda format: datetime.now().strftime(format)
    env.globals["namespace"] = _Namespace
    env.globals["dict"] = _Dict()
    env.filters["tojson"] = tojson
    try:
        pieces = env.from_string(_counting_loops(env, template, count_loop_steps)).generate(
            **shown["variables"], messages=messages, tools=shown["tools"], documents=shown["documents"],
            add_generation_prompt=add_generation_prompt,
        )
        rendered, length = [], 0
        # Streamed, so that a template looping over its output stops here. (One expression
        # that builds a huge string, 'x' * 10**9, is built whole first, as in transformers.)
        for piece in pieces:
            rendered.append(piece)
            length += len(piece)
            if length > MAX_RENDERED_CHARACTERS:
                raise MinqwenError(f"the chat template wrote more than {MAX_RENDERED_CHARACTERS:,} characters "
                                   "for this conversation, beyond any Qwen3.5 context: the template loops, or "
                                   "the conversation is far too long")
        return "".join(rendered)
    except TemplateError as e:
        raise MinqwenError(f"the chat template failed to render: {e}{_arguments_as_text(messages)}") from None
    except MinqwenError:
        raise  # the template's own raise_exception
    except Exception as e:  # noqa: BLE001 - whatever the checkpoint's template does wrong is the template's fault
        raise MinqwenError(f"the chat template failed to render: {type(e).__name__}: {e}"
                           f"{_arguments_as_text(messages)}") from None


def _arguments_as_text(messages: list[dict]) -> str:
    """A hint for the mistake that most often breaks Qwen3.5's template: tool-call arguments given
    as JSON text (as the OpenAI API returns them), where it loops over them as a mapping."""
    for i, message in enumerate(messages):
        calls = message.get("tool_calls")
        for j, call in enumerate(calls if isinstance(calls, (list, tuple)) else []):
            function = call.get("function", call) if isinstance(call, dict) else None
            if isinstance(function, dict) and isinstance(function.get("arguments"), str):
                return (f". Message {i}'s tool_calls[{j}] gives its arguments as JSON text; this template reads "
                        "them as a mapping: pass json.loads(arguments) instead")
    return ""
