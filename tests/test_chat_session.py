"""ChatSession's cache across turns (finished, abandoned, rewritten), penalties in a chat, the
thinking printer, and `minqwen inspect` on FP8 MoE checkpoints.

Each test compares with an independent computation: a fresh prefill of the whole rendered
conversation (minqwen's own forward, or vision.prefill, on a new cache), transformers'
generate on the rendered conversation, or the safetensors headers of the checkpoint.
"""

import json
import re
import sys

import numpy as np
import pytest
from safetensors.numpy import load_file

import minqwen
from conftest import FIXTURES, ROOT, STORED_ITEMSIZE, Recorder, forced, require_reference, tensor_headers
from minqwen import MinqwenError, vision
from minqwen.checkpoint import EMBEDDED
from minqwen.generate import ChatSession, GenerationStats
from minqwen.sampling import SamplingParams
from minqwen.tokenizer import Tokenizer

GREEDY = SamplingParams()
ATOL = 1e-4


def fresh_logits_match(model, session, recorder, n):
    """The last n logits the session generated with equal one fresh prefill of its log, and the
    log holds exactly the rendered conversation, then the tokens generated (all but the last)."""
    tok = session.tokenizer
    full = tok.encode(tok.render_chat(session.messages[:-1], add_generation_prompt=True,
                                      enable_thinking=session.enable_thinking))
    assert session.log[: len(full)] == full
    assert len(session.log) == len(full) + n - 1
    assert session.cache.position == len(session.log)
    fresh = model.forward(session.log, model.new_cache(), last_only=False)
    np.testing.assert_allclose(np.stack(recorder.rows[-n:]), fresh[-n:], rtol=0, atol=ATOL)


# ==================================================================== text chats (embedded model)


def test_a_roll_back_never_restores_a_snapshot_of_a_dropped_turn():
    """A turn that does not finish leaves a snapshot at the end of its message. When the next
    message is a little shorter and the turn after rolls back to just past it, that snapshot
    (which holds the dropped message) must be gone. Catches: _sync not discarding the snapshots
    past the roll-back point."""
    model, tok = minqwen.load(EMBEDDED), Tokenizer(EMBEDDED)
    recorder = Recorder(model)
    session = ChatSession(recorder, tok, enable_thinking=True)
    "".join(session.reply("Hello there.", max_new_tokens=8))
    pieces = session.reply("Write a poem now.", max_new_tokens=10)
    next(pieces)
    pieces.close()
    "".join(session.reply("Write a poem", max_new_tokens=8))  # ends one or two tokens before the dropped one
    stats = GenerationStats()
    "".join(session.reply("Again.", max_new_tokens=6, stats=stats))
    fresh_logits_match(model, session, recorder, stats.generated_tokens)


# A template whose generation prompt re-tokenizes the end of the conversation ("\n" + "\n" is one
# token), so the conversation without it is no prefix of the one with it and the session syncs once.
MERGING = ("{% for m in messages %}{% if m.role == 'user' %}{{ '<|im_start|>user\\n' + m.content + '\\n' }}"
           "{% else %}{{ '\\n<|im_start|>assistant\\n' + m.content + '\\n' }}{% endif %}{% endfor %}"
           "{% if add_generation_prompt %}{{ '\\n<|im_start|>assistant\\n' }}{% endif %}")


def test_a_generation_prompt_that_retokenizes_the_conversation_still_gives_a_fresh_run():
    """Here the whole roll-back rests on one sync of the full rendering, and the answer's last fed
    id (" P", before "ython") re-tokenizes to " Python": the divergence is at the log's last id.
    Catches: rolling back only when the divergence is before the last id; feeding from the
    divergence instead of from the snapshot restored."""
    model, tok = minqwen.load(EMBEDDED), Tokenizer(EMBEDDED)
    tok.chat_template = MERGING
    m = [{"role": "user", "content": "Hello"}]
    body = tok.encode(tok.render_chat(m, add_generation_prompt=False))
    assert tok.encode(tok.render_chat(m, add_generation_prompt=True))[: len(body)] != body  # the premise
    hi, p, ython = tok.encode("Hi"), tok.encode(" P"), tok.encode("ython")
    recorder = Recorder(model)
    session = ChatSession(recorder, tok)
    "".join(session.reply("Hello", decode=forced(hi + p + ython)))
    assert session.log[-1] == p[0]
    stats = GenerationStats()
    "".join(session.reply("Again", GREEDY, max_new_tokens=4, stats=stats))
    fresh_logits_match(model, session, recorder, stats.generated_tokens)


class Counting:
    """The model, counting the tokens fed to it."""

    def __init__(self, model):
        self.model, self.fed = model, 0

    def forward(self, ids, *args, **kwargs):
        self.fed += len(ids)
        return self.model.forward(ids, *args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.model, name)


def test_a_rewritten_history_is_fed_again_only_from_the_end_of_the_previous_message():
    """With thinking on, each turn's re-rendering drops the last answer's think block: the session
    must go back to the snapshot at the end of the previous user message, not to the start.
    The count is the rendered conversation past that message (tokenizer), plus one id per new
    token but the last. Catches: no snapshot taken at the end of a turn's message."""
    model, tok = minqwen.load(EMBEDDED), Tokenizer(EMBEDDED)
    counting = Counting(model)
    session = ChatSession(counting, tok, enable_thinking=True)
    "".join(session.reply("Hello there.", max_new_tokens=6))
    first_body = tok.encode(tok.render_chat(session.messages[:1], add_generation_prompt=False))
    counting.fed = 0
    stats = GenerationStats()
    "".join(session.reply("Again.", max_new_tokens=6, stats=stats))
    full = tok.encode(tok.render_chat(session.messages[:-1], add_generation_prompt=True, enable_thinking=True))
    assert full[: len(first_body)] == first_body
    assert counting.fed == len(full) - len(first_body) + stats.generated_tokens - 1


def test_a_history_edited_in_place_is_fed_again_from_the_first_token_that_changed():
    """A caller may edit session.messages (here the system message) between turns. "Alice" and
    "Carol" take as many tokens, so every position after the edit still matches the log: only a
    prefix that ends at the first differing token tells the session to roll back before it.
    Catches: counting every matching position, which keeps the cache that read "Alice"."""
    model, tok = minqwen.load(EMBEDDED), Tokenizer(EMBEDDED)
    alice, carol = tok.encode("You are Alice."), tok.encode("You are Carol.")
    assert len(alice) == len(carol) and alice != carol  # the premise: an edit of the same length
    recorder = Recorder(model)
    session = ChatSession(recorder, tok, enable_thinking=False,
                          messages=[{"role": "system", "content": "You are Alice."}])
    "".join(session.reply("Hello there.", max_new_tokens=6))
    session.messages[0] = {"role": "system", "content": "You are Carol."}
    stats = GenerationStats()
    "".join(session.reply("Again.", max_new_tokens=6, stats=stats))
    fresh_logits_match(model, session, recorder, stats.generated_tokens)


# Plain ChatML, which re-renders an answer exactly as it was generated (Qwen's templates rewrite
# it, dropping the think block even with thinking off).
PLAIN_CHATML = ("{%- for m in messages %}{{- '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}"
                "{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")


def test_a_history_the_new_rendering_extends_is_not_fed_again():
    """When the next turn's rendering extends the log, only what is new is fed: the end of the
    answer (its last id was sampled, never fed), the new message and the prompt. The count comes
    from the tokenizer: the new rendering's length, less the first turn's prompt and the answer's
    ids but the last, plus one id per new token but the last. Catches: rolling back to the
    snapshot before the answer when nothing was rewritten."""
    model, tok = minqwen.load(EMBEDDED), Tokenizer(EMBEDDED)
    tok.chat_template = PLAIN_CHATML
    answer = tok.encode("Hi there.") + [tok.token_to_id("<|im_end|>")]
    counting = Counting(model)
    session = ChatSession(counting, tok)
    "".join(session.reply("Hello.", decode=forced(answer)))
    first = tok.encode(tok.render_chat(session.messages[:1], add_generation_prompt=True))
    counting.fed = 0
    stats = GenerationStats()
    "".join(session.reply("Again.", max_new_tokens=4, stats=stats))
    full = tok.encode(tok.render_chat(session.messages[:-1], add_generation_prompt=True))
    assert full[: len(first) + len(answer) - 1] == first + answer[:-1]  # the premise: the log is a prefix
    assert counting.fed == len(full) - (len(first) + len(answer) - 1) + stats.generated_tokens - 1


@pytest.mark.parametrize("text", ["", " ", "\n\t  \n"])
def test_an_empty_or_blank_message_is_refused_and_changes_nothing(text):
    # A blank line would otherwise become a turn of its own: the model answers nothing in particular.
    session = ChatSession(minqwen.load(EMBEDDED), Tokenizer(EMBEDDED))
    with pytest.raises(MinqwenError, match="the message is empty"):
        "".join(session.reply(text))
    assert session.messages == [] and session.log == []


def test_the_stored_answer_is_what_the_generation_prompt_opened_then_the_streamed_text():
    """With thinking on, Qwen's generation prompt already writes "<think>\n": the answer kept in the
    conversation is that, then the text streamed (raw, special tokens kept), as the template wrote
    it after its assistant header. Catches: dropping what the generation prompt opened."""
    model, tok = minqwen.load(EMBEDDED), Tokenizer(EMBEDDED)
    session = ChatSession(model, tok, enable_thinking=True)
    streamed = "".join(session.reply("Hello there.", max_new_tokens=6))
    prompt_text = tok.render_chat(session.messages[:-1], add_generation_prompt=True, enable_thinking=True)
    header = "<|im_start|>assistant\n"
    opened = prompt_text[prompt_text.rindex(header) + len(header):]
    assert opened  # the premise: this template opens the answer (its think block)
    assert session.messages[-1] == {"role": "assistant", "content": opened + streamed}


def test_a_chat_streams_special_tokens_the_model_writes_as_their_text():
    """reply streams the raw answer: a special token that is no eos (here <|im_start|>) is part of
    it, as the tokenizer decodes it with special tokens kept. Catches: a chat decoding with
    skip_special_tokens."""
    model, tok = minqwen.load(EMBEDDED), Tokenizer(EMBEDDED)
    special = tok.token_to_id("<|im_start|>")
    eos = sorted(set(tok.eos_ids) | set(model.config.eos_token_id))
    assert special not in eos
    ids = tok.encode("Hi") + [special] + tok.encode(" there") + [eos[0]]
    session = ChatSession(model, tok, enable_thinking=False)
    streamed = "".join(session.reply("Hello", decode=forced(ids)))
    assert streamed == tok.decode(ids[:-1], skip_special_tokens=False)
    assert "<|im_start|>" in streamed


CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


class Interrupting:
    """The model, raising KeyboardInterrupt (Ctrl-C) in the next forward call once armed."""

    def __init__(self, model):
        self.model, self.armed, self.rows = model, False, []

    def forward(self, *args, **kwargs):
        if self.armed:
            self.armed = False
            raise KeyboardInterrupt
        logits = self.model.forward(*args, **kwargs)
        self.rows.append(logits[-1].copy())
        return logits

    def __getattr__(self, name):
        return getattr(self.model, name)


def test_ctrl_c_during_a_prefill_then_an_abandoned_turn_leave_a_cache_that_matches_a_fresh_run():
    """A template that keeps history verbatim (no roll-back of its own): Ctrl-C while the new
    message is fed must leave the cache and the log at the same point; a later roll-back to that
    point must find the snapshot as it was taken. Catches: the restore not cutting the log; the
    restore handing out the snapshot itself instead of a copy."""
    model, tok = minqwen.load(EMBEDDED), Tokenizer(EMBEDDED)
    tok.chat_template = CHATML
    interrupting = Interrupting(model)
    session = ChatSession(interrupting, tok)
    end = tok.token_to_id("<|im_end|>")
    assert end in set(tok.eos_ids) | set(model.config.eos_token_id)
    "".join(session.reply("Hello", decode=forced(tok.encode("Hi there") + [end])))
    logged = len(session.log)
    interrupting.armed = True
    with pytest.raises(KeyboardInterrupt):
        "".join(session.reply("Tell me more", max_new_tokens=5))
    assert session.cache.position == len(session.log) < logged  # went back to a snapshot, log and cache alike
    pieces = session.reply("Again", max_new_tokens=5)
    next(pieces)
    pieces.close()
    stats = GenerationStats()
    "".join(session.reply("Why?", max_new_tokens=5, stats=stats))
    fresh_logits_match(model, session, interrupting, stats.generated_tokens)


def test_with_a_template_of_another_format_the_stored_answer_is_the_generated_text():
    """The history must hold what the model wrote, decoded by the tokenizer, not the template's
    'assistant: ' prompt in front of it (which the next turn would render twice)."""
    model, tok = minqwen.load(EMBEDDED), Tokenizer(EMBEDDED)
    tok.chat_template = ("{% for m in messages %}{{ m.role + ': ' + m.content + '\\n' }}{% endfor %}"
                         "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}")
    answer = tok.encode("Hi there")
    session = ChatSession(model, tok)
    "".join(session.reply("Hello", decode=forced(answer)))
    assert session.messages[-1] == {"role": "assistant", "content": tok.decode(answer)}


@pytest.mark.parametrize("thinking", [False, True])
def test_penalties_in_a_chat_count_the_whole_conversation_as_transformers_generate(thinking):
    """Each turn equals transformers' greedy generate with the same repetition penalty on the
    whole rendered conversation as input_ids (which it all counts). Catches: a chat passing no
    history, or only part of it, to the penalty."""
    reference = require_reference()
    import torch

    model, tok = minqwen.load(EMBEDDED), Tokenizer(EMBEDDED)
    hf = reference.load_pretrained(EMBEDDED)
    eos = sorted(set(tok.eos_ids) | set(model.config.eos_token_id))
    rep, n = 1.8, 10
    session = ChatSession(model, tok, enable_thinking=thinking)
    compared = 0
    for text in ["Hello there.", "What is a list?", "Say it again."]:
        messages = session.messages + [{"role": "user", "content": text}]
        full = tok.encode(tok.render_chat(messages, add_generation_prompt=True, enable_thinking=thinking))
        ids = []

        def recording(*args, **kwargs):
            from minqwen.generate import generate_ids
            for t in generate_ids(*args, **kwargs):
                ids.append(t)
                yield t

        "".join(session.reply(text, SamplingParams(repetition_penalty=rep), max_new_tokens=n, decode=recording))
        with torch.no_grad():
            out = hf.generate(torch.tensor([full]), do_sample=False, repetition_penalty=rep, max_new_tokens=n,
                              eos_token_id=eos, pad_token_id=eos[0], output_scores=True,
                              return_dict_in_generate=True)
        want = out.sequences[0, len(full):].tolist()
        margin = min(float(torch.topk(s[0], 2).values.diff().abs()) for s in out.scores)
        if margin < 1e-3:
            continue  # a near-tie: two float32 implementations may break it differently
        assert ids == want, text
        compared += 1
    assert compared >= 2


# ==================================================================== images in a chat (vision fixture)


@pytest.fixture(scope="module")
def vision_folder(tmp_path_factory):
    from test_vision_chat import chat_checkpoint

    return chat_checkpoint(tmp_path_factory.mktemp("vision_chat_session"))


@pytest.fixture(scope="module")
def vision_setup(vision_folder):
    from test_vision_chat import FIXTURE

    folder = vision_folder
    expected = load_file(str(FIXTURE / "expected.safetensors"))
    return minqwen.load(folder), Tokenizer(folder), vision.load_vision(folder), expected


def vision_turn_matches_fresh(model, tower, session, recorder, n):
    tok = session.tokenizer
    full = tok.encode(tok.render_chat(session.messages[:-1], add_generation_prompt=True,
                                      enable_thinking=session.enable_thinking))
    assert session.log[: len(full)] == full and len(session.log) == len(full) + n - 1
    fresh = model.new_cache()
    logits = vision.prefill(model, tower, session.log, session.images, fresh, last_only=False)
    np.testing.assert_allclose(np.stack(recorder.rows[-n:]), logits[-n:], rtol=0, atol=ATOL)
    assert (session.cache.position, session.cache.rope_delta) == (fresh.position, fresh.rope_delta)


def abandon(session, text, images):
    pieces = session.reply(text, GREEDY, 6, images=images)
    next(pieces)
    pieces.close()


def test_an_unfinished_turn_with_an_image_leaves_the_conversation_and_its_images_as_before(vision_setup):
    """After a turn with an image is abandoned, the session holds the finished turns' messages and
    images only, and the next turn, with another image, equals a fresh prefill of the conversation."""
    model, tok, tower, expected = vision_setup
    recorder = Recorder(model)
    session = ChatSession(recorder, tok, enable_thinking=False, tower=tower)
    "".join(session.reply("Describe this.", GREEDY, 4, images=[expected["image.0"]]))
    messages, images = list(session.messages), list(session.images)
    abandon(session, "And this one?", [expected["image.1"]])
    assert session.messages == messages and len(session.images) == len(images)
    assert all(a is b for a, b in zip(session.images, images))
    stats = GenerationStats()
    "".join(session.reply("Which is wider?", GREEDY, 4, stats=stats, images=[expected["image.2"]]))
    vision_turn_matches_fresh(model, tower, session, recorder, stats.generated_tokens)


def test_a_messages_images_come_before_its_text_each_as_the_checkpoints_vision_tokens(vision_setup):
    """As Qwen's examples put them (and the docstring of reply says): each image as
    <|vision_start|><|image_pad|><|vision_end|>, spelt by the tower config's token ids, in the
    order given, then the text. Catches: images placed after the text."""
    model, tok, tower, expected = vision_setup
    c = tower.config
    session = ChatSession(model, tok, enable_thinking=False, tower=tower)
    "".join(session.reply("Compare them.", GREEDY, 2, images=[expected["image.0"], expected["image.1"]]))
    one = tok.decode([c.vision_start_token_id, c.image_token_id, c.vision_end_token_id], skip_special_tokens=False)
    assert session.messages[0] == {"role": "user", "content": one * 2 + "Compare them."}
    assert session.images[0] is not session.images[1]
    np.testing.assert_array_equal(session.images[0], expected["image.0"])
    np.testing.assert_array_equal(session.images[1], expected["image.1"])


def test_a_video_token_the_model_writes_stays_out_of_the_history(vision_setup):
    """As for <|image_pad|>: a <|video_pad|> the model writes is no video, and the stored answer is
    the rest of what it wrote (decoded by the tokenizer). Catches: stripping only image tokens."""
    model, tok, tower, expected = vision_setup
    c = tower.config
    end = tok.token_to_id("<|im_end|>")
    text = tok.encode("OK")
    session = ChatSession(model, tok, enable_thinking=False, tower=tower)
    "".join(session.reply("Describe this.", images=[expected["image.0"]],
                          decode=forced([c.video_token_id] + text + [c.image_token_id, end])))
    assert session.messages[-1]["content"].endswith(tok.decode(text))
    assert tok.decode([c.video_token_id]) not in session.messages[-1]["content"]
    assert tok.decode([c.image_token_id]) not in session.messages[-1]["content"]


def test_the_same_message_with_another_image_after_an_unfinished_turn_sees_the_new_image(vision_setup):
    model, tok, tower, expected = vision_setup
    recorder = Recorder(model)
    session = ChatSession(recorder, tok, enable_thinking=False, tower=tower)
    "".join(session.reply("Hi.", GREEDY, 4))
    abandon(session, "Describe this.", [expected["image.0"]])
    stats = GenerationStats()
    "".join(session.reply("Describe this.", GREEDY, 6, stats=stats, images=[expected["image.2"]]))
    vision_turn_matches_fresh(model, tower, session, recorder, stats.generated_tokens)


def test_images_go_through_the_tower_when_the_generation_prompt_changes_the_whole_rendering(vision_setup):
    """A template that writes something else at the start once the generation prompt is asked for:
    the rendering without it is no prefix of the one with it, so the session feeds the whole
    conversation, images included, from one sync. The images must still go in as features.
    Catches: the session feeding the images' placeholder ids as plain tokens on that path."""
    model, tok, tower, expected = vision_setup
    template = tok.chat_template
    tok.chat_template = "{% if add_generation_prompt %}{{ 'G ' }}{% endif %}" + template
    try:
        recorder = Recorder(model)
        session = ChatSession(recorder, tok, enable_thinking=False, tower=tower)
        for text, images in [("Describe this.", [expected["image.0"]]), ("And this?", [expected["image.2"]])]:
            stats = GenerationStats()
            "".join(session.reply(text, GREEDY, 4, stats=stats, images=images))
            vision_turn_matches_fresh(model, tower, session, recorder, stats.generated_tokens)
    finally:
        tok.chat_template = template


# ==================================================================== `minqwen inspect` on FP8 checkpoints




@pytest.fixture(scope="module")
def fp8_moe(tmp_path_factory):
    sys.path.insert(0, str(ROOT / "tools"))
    import quantize_fp8

    built = []
    for name, block, scale_dtype in [("moe_text_per_expert_fp32", (8, 4), "float16"),
                                     ("moe_text_fused_all_experts_bf16", (6, 20), "bfloat16")]:
        out = tmp_path_factory.mktemp("fp8_inspect") / name
        quantize_fp8.quantize_checkpoint(FIXTURES / name, out, block, scale_dtype)
        built.append((out, block))
    return built


def grab(pattern, text):
    m = re.search(pattern, text, re.M)
    assert m, (pattern, text)
    return int(m.group(1).replace(",", ""))


def test_inspect_on_fp8_moe_checkpoints_counts_parameters_as_the_headers_and_names_the_block(fp8_moe):
    """Parameters are the stored weights' elements (scales are no parameters); the block is the
    config's rows × cols (not square here); experts and active parameters as the headers give.
    Catches: the FP8 count branch, the block's order, the experts' FP8 path."""
    from minqwen.summary import describe

    for folder, block in fp8_moe:
        model = minqwen.load(folder)
        c = model.config
        h = {k: v for k, v in tensor_headers(folder).items() if not k.startswith(("mtp.", "model.mtp.", "model.visual."))}
        weights = {k: v for k, v in h.items() if not k.endswith("_scale_inv")}
        assert any(d == "F8_E4M3" for d, _ in weights.values())
        text = describe(model, context=16)
        total = sum(int(np.prod(s)) for _, s in weights.values())
        in_experts = sum(int(np.prod(s)) for k, (_, s) in weights.items() if ".mlp.experts." in k)
        assert grab(r"^total: ([\d,]+) parameters", text) == total
        assert grab(r"^decoder layers: ([\d,]+) parameters", text) == sum(
            int(np.prod(s)) for k, (_, s) in weights.items() if ".layers." in k)
        assert grab(r"used per token: ([\d,]+) parameters", text) == in_experts
        assert grab(r"^active per token: ([\d,]+) parameters", text) == (
            total - in_experts + in_experts * c.num_experts_per_tok // c.num_experts)
        for i in range(c.num_hidden_layers):
            row = re.search(rf"^\s+{i}  (?:Gated DeltaNet|gated attention)\s+[\d,]+\s+([\d,]+)", text, re.M)
            assert int(row.group(1).replace(",", "")) == sum(
                int(np.prod(s)) for k, (_, s) in weights.items() if f".layers.{i}.mlp." in k)
        layout = "fused" if any(k.endswith("experts.gate_up_proj") for k in weights) else "per_expert"
        assert f"memory-mapped as stored ({layout};" in text
        kept = json.loads((folder / "config.json").read_text())["quantization_config"]["modules_to_not_convert"]
        assert f"FP8 checkpoint: {block[0]} × {block[1]} blocks, dequantized on load; " \
               f"modules_to_not_convert: {', '.join(kept)}" in text


def test_inspect_gives_the_bytes_fp8_experts_take_in_the_file_scales_included(fp8_moe):
    from minqwen.summary import describe, experts, human

    for folder, _ in fp8_moe:
        h = {k: v for k, v in tensor_headers(folder).items() if not k.startswith(("mtp.", "model.mtp."))}
        stored = sum(int(np.prod(s)) * STORED_ITEMSIZE[d] for k, (d, s) in h.items() if ".mlp.experts." in k)
        model = minqwen.load(folder)
        assert experts(model)[2] == stored
        assert f"{human(stored)} memory-mapped as stored" in describe(model)


@pytest.mark.parametrize("n", [0, 1023, 1024, 1536, 37_748_736, 5 * 2**30])
def test_inspect_sizes_are_in_binary_units(n):
    """KiB = 1024 bytes and so on, one decimal; whole bytes below 1 KiB. Catches: a 1000 threshold."""
    from minqwen.summary import human

    unit = max((u for u in range(5) if n >= 1024**u), default=0)
    want = f"{n} B" if unit == 0 else f"{n / 1024**unit:.1f} {['B', 'KiB', 'MiB', 'GiB', 'TiB'][unit]}"
    assert human(n) == want


# ==================================================================== the chat's thinking printer


class Screen:
    """A text stream that says whether it is a terminal."""

    def __init__(self, tty):
        import io

        self.buffer, self.tty = io.StringIO(), tty

    def write(self, s):
        self.buffer.write(s)

    def flush(self):
        pass

    def isatty(self):
        return self.tty


RAW = "Let me think about <b> and </th.\n</think>\n\n\nA list <thin holds items <"
REASONING, ANSWER = RAW.split("</think>", 1)


def chunkings(text):
    """The whole text at once, a character at a time, and ragged pieces that split every tag."""
    rng = np.random.default_rng(0)
    cuts = sorted(set(int(c) for c in rng.integers(1, len(text), size=len(text) // 3)))
    ragged = [text[a:b] for a, b in zip([0] + cuts, cuts + [len(text)])]
    return {"whole": [text], "chars": list(text), "ragged": ragged}


@pytest.mark.parametrize("how", ["whole", "chars", "ragged"])
@pytest.mark.parametrize("mode", ["plain", "hidden", "terminal"])
def test_the_thinking_printer_shows_the_same_text_however_the_answer_is_cut_into_pieces(mode, how):
    """Streamed in any pieces, the printer shows what the whole answer defines: the reasoning
    between <think> (which the prompt opened) and </think> on a line of its own (plain), nothing of
    it (hidden), or the reasoning dimmed without tags (terminal); then
    the answer without its leading newlines, a trailing partial tag included. Catches: not holding
    back a partial tag, not dropping the newlines after </think> in the piece that closes it,
    tags printed on a terminal, the held-back text lost at close."""
    from minqwen.cli import ThinkingPrinter

    screen = Screen(tty=mode == "terminal")
    printer = ThinkingPrinter(hide=mode == "hidden", in_think=True, out=screen)
    for piece in chunkings(RAW)[how]:
        printer.write(piece)
    printer.close()
    shown = screen.buffer.getvalue()
    answer = ANSWER.lstrip("\n")
    if mode == "plain":
        assert shown == "<think>\n" + REASONING + "</think>\n" + answer
    elif mode == "hidden":
        assert shown == answer
    else:
        assert "<think>" not in shown and "</think>" not in shown
        assert re.sub(r"\x1b\[[0-9]*m", "", shown) == REASONING + answer
        assert shown.startswith("\x1b[2m") and shown.endswith(answer)


# ==================================================================== stream_text and the stats a chat reports


def test_stop_strings_hold_back_at_most_one_character_less_than_the_longest():
    """While no stop string is in sight, the text streamed so far lacks at most len(longest) − 1
    characters of the text decoded so far (only those could still begin a stop string).
    Catches: holding back a character more."""
    from minqwen.generate import stream_text

    tok = Tokenizer(EMBEDDED)
    model = minqwen.load(EMBEDDED)
    ids = tok.encode("def add(a, b):\n    return a + b\n")
    fed = []

    def decode(*args):
        for t in ids:
            fed.append(t)
            yield t

    stops = ["zzq", "never here"]
    out = ""
    for piece in stream_text(model, tok, [1], GREEDY, 64, stops, decode=decode):
        out += piece
        so_far = tok.decode(fed)
        if len(fed) < len(ids):
            assert so_far.startswith(out) and len(so_far) - len(out) <= max(map(len, stops)) - 1
    assert out == tok.decode(ids)


def test_an_eos_the_models_config_names_ends_the_text_even_if_the_tokenizer_does_not():
    """config.json's eos_token_id is what transformers' generate stops at: an id it names ends the
    stream, whatever the tokenizer's own eos. Catches: only the tokenizer's eos ids counted."""
    import dataclasses

    from minqwen.generate import stream_text
    from minqwen.model import Model

    tok = Tokenizer(EMBEDDED)
    base = minqwen.load(EMBEDDED)
    extra = tok.encode("!")[0]
    assert extra not in tok.eos_ids
    config = dataclasses.replace(base.config, eos_token_id=tuple(base.config.eos_token_id) + (extra,))
    model = Model(config, base.embed_tokens, base.layers, base.norm, base.lm_head)
    ids = tok.encode("Hi") + [extra] + tok.encode(" more")
    out_ids = []
    text = "".join(stream_text(model, tok, [1], GREEDY, 64, decode=lambda *a: iter(ids), ids_out=out_ids))
    assert text == tok.decode(ids[: ids.index(extra)])
    assert out_ids == ids[: ids.index(extra) + 1]


def test_decode_speed_counts_the_decode_steps_the_model_ran():
    """The first token comes out of the prefill: the decode speed is the one-token forward passes
    run after it, over the decode time. Catches: counting the prefill's token as decoded."""
    from minqwen.generate import generate_ids

    model = minqwen.load(EMBEDDED)
    counting = Counting(model)
    calls = []
    original = counting.forward

    def forward(ids, *args, **kwargs):
        calls.append(len(ids))
        return original(ids, *args, **kwargs)

    counting.forward = forward
    stats = GenerationStats()
    list(generate_ids(counting, [1, 2, 3], GREEDY, 6, stats=stats))
    steps = sum(1 for n in calls[1:] if n == 1)
    assert stats.generated_tokens == 6 and steps == 5
    assert stats.decode_tokens_per_second == pytest.approx(steps / stats.decode_seconds)


def test_an_image_path_typed_in_a_chat_may_start_with_the_home_folder(vision_setup, tmp_path, monkeypatch):
    from PIL import Image

    from minqwen.cli import attach_image
    from minqwen.image import read_image

    model, tok, tower, expected = vision_setup
    monkeypatch.setenv("HOME", str(tmp_path))
    Image.fromarray(expected["image.0"]).save(tmp_path / "photo.png")
    session = ChatSession(model, tok, tower=tower)
    pixels = attach_image(session, "~/photo.png", None)
    np.testing.assert_array_equal(pixels, read_image(tmp_path / "photo.png"))
