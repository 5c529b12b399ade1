"""Chat templates rendered as transformers' apply_chat_template renders them: content parts,
tools, tool calls, reasoning under its several names, extra variables, special tokens, the
{% generation %} block, and plain data only inside the sandbox."""

import copy
import enum
import json
import shutil

import numpy as np
import pytest

import minqwen
from conftest import require_reference, set_model_type
from minqwen import MinqwenError
from minqwen.chat_template import CHATML_TEMPLATE, plain_data
from minqwen.checkpoint import EMBEDDED
from minqwen.generate import ChatSession
from minqwen.tokenizer import Tokenizer

# A template in the manner of Qwen3.5's, written for this test to reach every Jinja feature
# those templates use: a macro over content parts, namespaces, a reversed scan of the
# messages, loop.previtem / nextitem, tool schemas through tojson, tool-call arguments as a
# mapping (|items), raise_exception, the tokenizer's special tokens and extra variables.
QWEN_LIKE_TEMPLATE = """
{%- set counts = namespace(image=0, video=0) %}
{%- macro parts(content, count) %}
    {%- if content is string %}{{- content }}
    {%- elif content is iterable and content is not mapping %}
        {%- for part in content %}
            {%- if 'image' in part or part.type == 'image' %}
                {%- if count %}{%- set counts.image = counts.image + 1 %}{%- endif %}
                {%- if add_vision_id %}{{- 'Picture ' ~ counts.image ~ ': ' }}{%- endif %}
                {{- '<|vision_start|><|image_pad|><|vision_end|>' }}
            {%- elif 'video' in part or part.type == 'video' %}
                {%- if count %}{%- set counts.video = counts.video + 1 %}{%- endif %}
                {{- '<|vision_start|><|video_pad|><|vision_end|>' }}
            {%- elif 'text' in part %}{{- part.text }}
            {%- else %}{{- raise_exception('a content part with no text, image or video') }}
            {%- endif %}
        {%- endfor %}
    {%- elif content is none or content is undefined %}{{- '' }}
    {%- else %}{{- raise_exception('content of an unexpected type') }}
    {%- endif %}
{%- endmacro %}
{%- if tools %}
    {{- '<|im_start|>system\\n# Tools\\n<tools>' }}
    {%- for tool in tools %}{{- '\\n' + tool | tojson }}{%- endfor %}
    {{- '\\n</tools><|im_end|>\\n' }}
{%- endif %}
{%- set ns = namespace(last_user=messages|length - 1, done=false) %}
{%- for message in messages[::-1] %}
    {%- if not ns.done and message.role == 'user' %}
        {%- set ns.last_user = messages|length - 1 - loop.index0 %}{%- set ns.done = true %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- set content = parts(message.content, true)|trim %}
    {%- if message.role == 'assistant' %}
        {%- set reasoning = message.reasoning_content if message.reasoning_content is string else '' %}
        {%- if preserve_thinking or loop.index0 > ns.last_user %}
            {{- '<|im_start|>assistant\\n<think>\\n' + reasoning|trim + '\\n</think>\\n\\n' + content }}
        {%- else %}
            {{- '<|im_start|>assistant\\n' + content }}
        {%- endif %}
        {%- for call in message.tool_calls or [] %}
            {%- set call = call.function if call.function is defined else call %}
            {{- '\\n<tool_call>\\n<function=' + call.name + '>\\n' }}
            {%- for name, value in call.arguments|items %}
                {{- '<parameter=' + name + '>\\n' }}
                {{- value if value is string else value | tojson | safe }}
                {{- '\\n</parameter>\\n' }}
            {%- endfor %}
            {{- '</function>\\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == 'tool' %}
        {%- if loop.previtem and loop.previtem.role != 'tool' %}{{- '<|im_start|>user' }}{%- endif %}
        {{- '\\n<tool_response>\\n' + content + '\\n</tool_response>' }}
        {%- if loop.last or loop.nextitem.role != 'tool' %}{{- '<|im_end|>\\n' }}{%- endif %}
    {%- else %}
        {{- '<|im_start|>' + message.role + '\\n' + content + '<|im_end|>\\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}
    {%- else %}{{- '<think>\\n' }}{%- endif %}
{%- endif %}
{{- '[' + pad_token + ']' if pad_token is defined else '[no pad]' }}{{- unk_token | default('') }}
"""

TOOLS = [{"type": "function", "function": {
    "name": "weather", "description": "Today's weather — in °C",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]

CONVERSATIONS = {
    "pictures": [
        {"role": "system", "content": "You see pictures."},
        {"role": "user", "content": [{"type": "image", "image": np.zeros((4, 4, 3), np.uint8)},
                                     {"type": "text", "text": "And this?"},
                                     {"type": "video", "video": "clip.mp4"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "A square."}]},
        {"role": "user", "content": [{"image": "cat.png"}, {"type": "text", "text": "Now?"}]},
    ],
    "tools": [
        {"role": "user", "content": "Weather in Zürich and 東京?"},
        {"role": "assistant", "content": None, "reasoning": "Two cities: two calls.",
         "tool_calls": [{"type": "function", "function": {"name": "weather", "arguments": {"city": "Zürich"}}},
                        {"name": "weather", "arguments": {"city": "東京", "days": [1, 2], "opts": {"unit": "C"}}}]},
        {"role": "tool", "content": "12 °C"},
        {"role": "tool", "content": "18 °C"},
        {"role": "assistant", "content": "Zürich 12 °C, 東京 18 °C.", "thinking": "Both answered."},
    ],
    "history": [
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4", "reasoning_content": "Easy."},
        {"role": "user", "content": "3+3?"},
        {"role": "assistant", "content": "6", "reasoning_content": "Also easy.", "extra": np.float32(0.5)},
    ],
}


@pytest.fixture
def folder(tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(EMBEDDED, folder)
    return folder


def with_template(folder, template, **fields):
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config.update(chat_template=template, **fields)
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
@pytest.mark.parametrize("options", [
    {},
    {"tools": TOOLS, "add_generation_prompt": True, "enable_thinking": False},
    {"add_vision_id": True, "preserve_thinking": True, "add_generation_prompt": True},
], ids=["plain", "tools", "variables"])
def test_a_qwen_like_template_renders_as_transformers_renders_it(folder, name, options):
    require_reference()
    from transformers import AutoTokenizer

    with_template(folder, QWEN_LIKE_TEMPLATE, unk_token="<|endoftext|>")
    options = {"add_generation_prompt": False, **options}
    want = AutoTokenizer.from_pretrained(str(folder)).apply_chat_template(
        CONVERSATIONS[name], tokenize=False, **options)
    got = Tokenizer(folder).render_chat(CONVERSATIONS[name], **options)
    assert got == want
    if options.get("tools"):
        assert "°C" in got  # tojson keeps non-ASCII text as it is


def test_tool_call_arguments_given_as_json_text_fail_as_in_transformers_with_the_cause_named(folder):
    # The OpenAI API returns arguments as JSON text; Qwen3.5's template loops over them as a mapping.
    require_reference()
    from transformers import AutoTokenizer

    with_template(folder, QWEN_LIKE_TEMPLATE)
    messages = copy.deepcopy(CONVERSATIONS["tools"])
    messages[1]["tool_calls"][1]["arguments"] = json.dumps(messages[1]["tool_calls"][1]["arguments"])
    with pytest.raises(Exception, match="mapping"):
        AutoTokenizer.from_pretrained(str(folder)).apply_chat_template(messages, tokenize=False)
    with pytest.raises(MinqwenError, match=r"Message 1's tool_calls\[1\] gives its arguments as JSON text.*"
                                           r"json\.loads\(arguments\)"):
        Tokenizer(folder).render_chat(messages)


def test_a_generation_block_and_the_special_tokens_render_as_in_transformers(folder):
    require_reference()
    from transformers import AutoTokenizer

    template = ("{%- for m in messages %}{%- if m.role == 'assistant' %}{% generation %}{%- set inner = 'scoped' %}"
                "{{ m.content }}{{ eos_token }}{% endgeneration %}{%- else %}{{ m.content }}{%- endif %}"
                "{{ inner | default('-') }}|{%- endfor %}{{ pad_token }}{{ image_token | default('') }}")
    with_template(folder, template, extra_special_tokens={"image_token": "<|image_pad|>"})
    messages = CONVERSATIONS["history"]
    want = AutoTokenizer.from_pretrained(str(folder)).apply_chat_template(messages, tokenize=False)
    got = Tokenizer(folder).render_chat(messages)
    assert got == want and "<|im_end|>" in got and got.endswith("<|endoftext|><|image_pad|>")


@pytest.mark.parametrize("template, config, options", [
    # a field set to None is left out (the OpenAI client writes content=None, tool_calls=None)
    ("{% for m in messages %}{{ m | tojson }}|{{ 'content' in m }}|{% endfor %}", {}, {}),
    # reasoning under the name gpt-oss-style templates read
    ("{% for m in messages %}{{ m.thinking }}/{{ m.reasoning_content }}|{% endfor %}", {}, {}),
    # Qwen's tokenizer class fills unset unk, eos and pad tokens; an empty one is still given
    ("{{ unk_token }}|{{ eos_token }}|{{ pad_token }}|{{ bos_token is defined }}|{{ sep_token is defined }}",
     {"drop": ["unk_token", "eos_token", "pad_token"], "sep_token": ""}, {}),
    # variables named like minqwen's own arguments reach the template
    ("{{ template }}|{{ special_tokens }}|{{ variables }}", {}, {"template": 1, "special_tokens": 2, "variables": 3}),
    # with tools, a template named 'tool_use' wins over the default
    ({"default": "default", "tool_use": "tools: {{ tools | length }}"}, {}, {"tools": TOOLS}),
    ({"default": "default", "tool_use": "tools: {{ tools | length }}"}, {}, {}),
    ({"tool_use": "tools: {{ tools | length }}"}, {}, {"tools": TOOLS}),
    # an empty list of tools is still tools given: transformers tests `tools is not None`
    ({"default": "default", "tool_use": "tools: {{ tools | length }}"}, {}, {"tools": []}),
    # a token the file sets to null is not filled by Qwen's class: the template sees none
    ("[{{ pad_token }}|{{ pad_token is defined }}]", {"pad_token": None}, {}),
    # a variable named like a special token wins over the tokenizer's
    ("{{ eos_token }}|{{ pad_token }}", {}, {"eos_token": "<mine>"}),
], ids=["none-fields", "thinking", "class-tokens", "own-names", "tool-use", "default-without-tools",
        "tool-use-only", "tool-use-empty-tools", "null-token", "variable-over-token"])
def test_template_inputs_are_what_transformers_gives(folder, template, config, options):
    require_reference()
    from transformers import AutoTokenizer

    config = dict(config)
    tokenizer_config = json.loads((folder / "tokenizer_config.json").read_text())
    for name in config.pop("drop", []):
        tokenizer_config.pop(name)
    tokenizer_config.update(config, chat_template=template)
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    messages = [{"role": "user", "content": "hi", "name": None},
                {"role": "assistant", "content": None, "tool_calls": None, "reasoning": "because"}]
    want = AutoTokenizer.from_pretrained(str(folder)).apply_chat_template(
        messages, tokenize=False, add_generation_prompt=False, **options)
    assert Tokenizer(folder).render_chat(messages, add_generation_prompt=False, **options) == want


def test_the_tool_use_template_gives_way_to_chat_template_jinja_and_to_one_set_by_hand(folder):
    # transformers reads chat_template.jinja instead of tokenizer_config's templates, named ones
    # included; and a template set on the tokenizer replaces them all.
    require_reference()
    from transformers import AutoTokenizer

    with_template(folder, {"default": "default", "tool_use": "tool_use: {{ tools | length }}"})
    messages = [{"role": "user", "content": "hi"}]
    for step in ("set by hand", "chat_template.jinja"):
        if step == "chat_template.jinja":
            (folder / "chat_template.jinja").write_text("jinja: {{ tools | length }}")
        want_tokenizer, ours = AutoTokenizer.from_pretrained(str(folder)), Tokenizer(folder)
        if step == "set by hand":
            want_tokenizer.chat_template = ours.chat_template = "by hand: {{ tools | length }}"
        want = want_tokenizer.apply_chat_template(messages, tokenize=False, tools=TOOLS)
        assert ours.render_chat(messages, tools=TOOLS) == want and not want.startswith("tool_use"), step


@pytest.mark.parametrize("model_type, tokenizer_class", [
    ("qwen3_5_text", "Qwen2Tokenizer"), ("qwen3_5_text", "Qwen2TokenizerFast"), ("qwen3_5_text", "Qwen3_5Tokenizer"),
    ("qwen3_5_text", "TokenizersBackend"), ("qwen3_5_text", None), ("qwen3_5", "TokenizersBackend"),
    ("qwen3_5_moe_text", "PreTrainedTokenizerFast"), ("qwen3_5_moe", None),
])
def test_unset_special_tokens_are_filled_as_transformers_chooses_the_tokenizer_class(folder, model_type,
                                                                                        tokenizer_class):
    # transformers fills unk, eos and pad with <|endoftext|> when it loads one of Qwen's classes:
    # for three of the four model types whatever class the file names, for qwen3_5_text the one
    # it names, or Qwen's when it names none.
    require_reference()
    from transformers import AutoTokenizer

    set_model_type(folder, model_type)
    tokenizer_config = json.loads((folder / "tokenizer_config.json").read_text())
    for name in ("unk_token", "eos_token", "pad_token", "tokenizer_class"):
        tokenizer_config.pop(name)
    if tokenizer_class is not None:
        tokenizer_config["tokenizer_class"] = tokenizer_class
    tokenizer_config["chat_template"] = "[{{ unk_token }}|{{ eos_token }}|{{ pad_token }}]"
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    messages = [{"role": "user", "content": "hi"}]
    want = AutoTokenizer.from_pretrained(str(folder)).apply_chat_template(messages, tokenize=False)
    assert Tokenizer(folder).render_chat(messages) == want


def test_a_tokenizer_class_named_in_config_json_counts_as_transformers_counts_it(folder):
    require_reference()
    from transformers import AutoTokenizer

    config = json.loads((folder / "config.json").read_text())
    config.update(model_type="qwen3_5_text", tokenizer_class="TokenizersBackend")
    (folder / "config.json").write_text(json.dumps(config))
    tokenizer_config = json.loads((folder / "tokenizer_config.json").read_text())
    for name in ("unk_token", "eos_token", "pad_token", "tokenizer_class"):
        tokenizer_config.pop(name)
    tokenizer_config["chat_template"] = "[{{ unk_token }}|{{ eos_token }}|{{ pad_token }}]"
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    messages = [{"role": "user", "content": "hi"}]
    want = AutoTokenizer.from_pretrained(str(folder)).apply_chat_template(messages, tokenize=False)
    assert Tokenizer(folder).render_chat(messages) == want == "[||]"


@pytest.mark.parametrize("template", ["{% set d = {'a': 1} %}{{ dict.pop(d, 'a') }}{{ d }}",
                                      "{% set ns = namespace(_hidden=1) %}",
                                      "{% set ns = namespace(x=1) %}{% set ns._hidden = 2 %}"],
                         ids=["dict-method", "namespace-name", "namespace-set"])
def test_the_sandbox_refuses_what_transformers_refuses(folder, template):
    require_reference()
    from transformers import AutoTokenizer

    with_template(folder, template)
    with pytest.raises(Exception):  # noqa: B017 - transformers raises jinja's own errors
        AutoTokenizer.from_pretrained(str(folder)).apply_chat_template(CONVERSATIONS["history"], tokenize=False)
    with pytest.raises(MinqwenError, match="failed to render"):
        Tokenizer(folder).render_chat(CONVERSATIONS["history"])


def test_a_template_refusal_reads_as_the_template_wrote_it(folder):
    require_reference()
    from jinja2 import TemplateError
    from transformers import AutoTokenizer

    with_template(folder, QWEN_LIKE_TEMPLATE)
    messages = [{"role": "user", "content": [{"type": "audio", "audio": "a.wav"}]}]
    with pytest.raises(TemplateError, match="no text, image or video"):
        AutoTokenizer.from_pretrained(str(folder)).apply_chat_template(messages, tokenize=False)
    with pytest.raises(MinqwenError, match="refused this conversation: a content part with no text, image or video"):
        Tokenizer(folder).render_chat(messages)


def test_the_template_sees_plain_data_only():
    class Image:  # an object with a method a template must not reach
        def save(self, path):
            raise AssertionError("called from the template")

    class Role(str, enum.Enum):  # str() of it is "Role.USER"; a template must see "user"
        USER = "user"

    seen = plain_data({"content": [{"type": "image", "image": Image()}, {"x": np.bool_(False), "y": (np.int64(3),)}],
                       "role": Role.USER})
    assert seen == {"content": [{"type": "image", "image": "<Image>"}, {"x": False, "y": (3,)}], "role": "user"}
    assert type(seen["content"][1]["y"][0]) is int and type(seen["role"]) is str

    # A number of a subclass is its bare value too, whatever its conversions say (as str of it renders)
    class Weight(float):
        def __float__(self):
            raise AssertionError("called")

    class Count(int):
        def __int__(self):
            raise AssertionError("called")

    numbers = plain_data([Weight(0.25), Count(3)])
    assert numbers == [0.25, 3] and [type(n) for n in numbers] == [float, int]
    assert Tokenizer(EMBEDDED).render_chat([{"role": Role.USER, "content": "hi"}]).startswith("<|im_start|>user\n")
    tok = Tokenizer(EMBEDDED)
    tok.chat_template = "{{ messages[0].content[0].image.save('x') }}"
    with pytest.raises(MinqwenError, match="failed to render"):
        tok.render_chat([{"role": "user", "content": [{"type": "image", "image": Image()}]}])


def test_dataclass_and_pydantic_style_messages_render_as_the_dicts_they_hold():
    # plain_data turns a dataclass, or an object with model_dump() (the OpenAI client's pydantic
    # messages), into the dict of its fields; without that the template would see a placeholder
    # string "<Message>" and render no role and no content. The expected text is the rendering
    # of the same messages written as dicts by hand.
    import dataclasses

    @dataclasses.dataclass
    class Message:
        role: str
        content: str

    class Dumped:  # the pydantic interface: model_dump() gives the fields as a dict
        def __init__(self, **fields):
            self.fields = fields

        def model_dump(self):
            return dict(self.fields)

    tok = Tokenizer(EMBEDDED)
    as_dicts = tok.render_chat([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}])
    assert tok.render_chat([Message("system", "Be brief."), Message("user", "hi")]) == as_dicts
    assert tok.render_chat([Dumped(role="system", content="Be brief."), Dumped(role="user", content="hi")]) == as_dicts


def test_a_refusal_by_raise_exception_is_not_reported_as_a_template_failure():
    # The template's own raise_exception says what the conversation lacks; passing it through the
    # catch-all for broken templates would prefix "failed to render: MinqwenError:" and blame the
    # template for the caller's conversation.
    tok = Tokenizer(EMBEDDED)
    tok.chat_template = "{{ raise_exception('a system message comes first') }}"
    with pytest.raises(MinqwenError) as refused:
        tok.render_chat([{"role": "user", "content": "hi"}])
    assert str(refused.value) == "the chat template refused this conversation: a system message comes first"


def test_content_parts_render_in_the_chatml_fallback_as_qwen_templates_render_them():
    tok = Tokenizer(EMBEDDED)
    tok.chat_template = CHATML_TEMPLATE
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"},
                                             {"video": "v.mp4"}]},
                {"role": "assistant", "content": None}]
    assert tok.render_chat(messages, add_generation_prompt=False) == (
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>What is it?"
        "<|vision_start|><|video_pad|><|vision_end|><|im_end|>\n<|im_start|>assistant\n<|im_end|>\n")


PARTS = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}, {"video": "v.mp4"},
                                      {"type": "image_url", "image_url": "x.png"}]},
         {"role": "assistant", "content": [{"type": "text", "text": "<think>\nhm\n</think>\n\nA cat."}]},
         {"role": "user", "content": [{"type": "text", "text": "Sure?"}]}]


@pytest.mark.parametrize("vision_id", [False, True])
def test_the_embedded_template_renders_content_parts_as_qwen_templates_render_them(vision_id):
    # Text given as parts was dropped: the model was asked an empty message.
    rendered = Tokenizer(EMBEDDED).render_chat(PARTS, add_vision_id=vision_id)
    image = "<|vision_start|><|image_pad|><|vision_end|>"
    video = "<|vision_start|><|video_pad|><|vision_end|>"
    picture, film, second = ("Picture 1: ", "Video 1: ", "Picture 2: ") if vision_id else ("", "", "")
    assert rendered == (f"<|im_start|>user\n{picture}{image}What is it?{film}{video}{second}{image}<|im_end|>\n"
                        "<|im_start|>assistant\nA cat.<|im_end|>\n<|im_start|>user\nSure?<|im_end|>\n"
                        "<|im_start|>assistant\n<think>\n")


def test_the_embedded_template_refuses_tools_it_was_not_trained_on():
    # (they were left out of the prompt without a word)
    with pytest.raises(MinqwenError, match="^the chat template refused this conversation: this chat template "
                                           r"\(minqwen's embedded model\) does not take tools"):
        Tokenizer(EMBEDDED).render_chat([{"role": "user", "content": "hi"}],
                                        tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}])


def test_the_embedded_template_renders_parts_and_refuses_tools_as_in_transformers():
    require_reference()
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(EMBEDDED)
    for vision_id in (False, True):
        assert Tokenizer(EMBEDDED).render_chat(PARTS, add_vision_id=vision_id) == \
            hf.apply_chat_template(PARTS, add_generation_prompt=True, add_vision_id=vision_id, tokenize=False)
    with pytest.raises(Exception, match="does not take tools"):
        hf.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                               tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}])


@pytest.mark.parametrize("messages, options, error", [
    ([{"role": "user", "content": 5}], {}, "message 0: 'content' must be text or a list of parts"),
    ([{"role": "user", "content": ["hi"]}], {}, "message 0: 'content' must be text or a list of parts"),
    # not rendered as their "<bytes>" / "<ndarray>" placeholders, as other unknown values are
    ([{"role": "user", "content": b"hi"}], {}, "message 0: 'content' must be text or a list of parts"),
    ([{"role": "user", "content": "a"}, {"role": "user", "content": np.zeros(2)}], {},
     "message 1: 'content' must be text or a list of parts"),
    ([{"content": "hi"}], {}, "message 0 must be a dict with a string 'role'"),
    ([{"role": "user", "content": "hi"}, "hi"], {}, "message 1 must be a dict"),
    ([{"role": "user", "content": "hi"}], {"tools": {"name": "f"}}, "tools must be a list of tool schemas"),
    ([{"role": "user", "content": "hi"}], {"tools": [print]}, "tools must be a list of tool schemas"),
    ([{"role": "user", "content": "hi"}], {"documents": ["text"]}, "documents must be a list of dicts"),
    ([], {}, "a chat is a list of one or more messages"),
    ([{"role": "user", "content": "hi"}], {"chat_template": "{{ 1 }}"}, "no option 'chat_template'"),
    ([{"role": "user", "content": "hi"}], {"sanitize_control_tokens": True}, "no option 'sanitize_control"),
    ([{"role": "user", "content": "hi"}], {"return_assistant_tokens_mask": True}, "no option 'return_assistant"),
    ([{"role": "assistant", "content": "Sure"}], {"continue_final_message": True}, "no option 'continue_final"),
])
def test_malformed_chats_are_named(messages, options, error):
    with pytest.raises(MinqwenError, match=error):
        Tokenizer(EMBEDDED).render_chat(messages, **options)


def test_a_message_that_contains_itself_is_named():
    message = {"role": "user", "content": [{"type": "text", "text": "hi"}]}
    message["content"][0]["self"] = message
    with pytest.raises(MinqwenError, match="contains itself"):
        Tokenizer(EMBEDDED).render_chat([message])


@pytest.mark.parametrize("option", ["tools", "documents", "enable_thinking"])
def test_tools_documents_or_a_variable_that_contain_themselves_are_named_not_blamed_on_the_template(option):
    looped = {"type": "function"}
    looped["self"] = looped
    with pytest.raises(MinqwenError, match=f"chat's {'variables' if option == 'enable_thinking' else option} "
                                           "are nested too deeply, or one contains itself"):
        Tokenizer(EMBEDDED).render_chat([{"role": "user", "content": "hi"}],
                                        **{option: looped if option == "enable_thinking" else [looped]})


def test_generate_refuses_images_it_has_no_features_for():
    model, tok = minqwen.load(EMBEDDED), Tokenizer(EMBEDDED)
    tok.chat_template = CHATML_TEMPLATE
    for prompt in ([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What?"}]}],
                   [{"role": "user", "content": [{"type": "video"}]}],
                   "Look: <|image_pad|>"):
        with pytest.raises(MinqwenError, match="read text alone"):
            minqwen.generate(model, tok, prompt, max_new_tokens=2)
    text = [{"role": "user", "content": [{"type": "text", "text": "Hello"}]}]
    assert minqwen.generate(model, tok, text, max_new_tokens=3, temperature=0) == \
        minqwen.generate(model, tok, [{"role": "user", "content": "Hello"}], max_new_tokens=3, temperature=0)


def test_a_chat_session_history_must_hold_text():
    model, tok = minqwen.load(EMBEDDED), Tokenizer(EMBEDDED)
    for message in ({"role": "assistant", "content": None}, {"role": "user", "content": [{"type": "image"}]}, "hi"):
        session = ChatSession(model, tok, messages=[message])
        with pytest.raises(MinqwenError, match="message 0: a ChatSession's messages are dicts whose 'content' is text"):
            "".join(session.reply("hi", max_new_tokens=1))
