"""Train the small model that ships inside minqwen (``minqwen/embedded/``), and write it out.

This is a ``reference``-extra tool: it uses torch and transformers, which minqwen itself never
imports. The model *is* a ``transformers.Qwen3_5ForCausalLM`` — every layer the transformers
implementation of Qwen3.5 — so the weights it writes are a genuine Qwen3.5 checkpoint, only
tiny: 4 decoder layers in the real 3:1 pattern (three Gated DeltaNet layers, then one gated
full-attention layer), partial interleaved M-RoPE, GQA, tied embeddings, a 4,096-token
byte-level BPE vocabulary carrying Qwen's special tokens, and a jointly trained MTP
(multi-token prediction) head so that speculative decoding has a real draft model.

Steps, all in one run:

1. the corpus (tools/build_corpus.py; built on the fly if ``--corpus`` holds none);
2. a byte-level BPE tokenizer with the same pipeline as Qwen3.5's (NFC, the Qwen3.5 split
   regex, byte-level mapping), trained on the training split;
3. training for a wall-clock budget (``--minutes``) or a fixed number of steps (``--steps``),
   AdamW with warm-up and cosine decay, loss = main next-token loss + λ·MTP loss;
4. evaluation of the weights as shipped (rounded to bf16): held-out perplexity against a
   unigram baseline, MTP top-1 accuracy, MTP agreement with the main model's own next-next
   greedy token, and the acceptance rate of one-token greedy speculative decoding;
5. export to ``--out``: config.json, model.safetensors (bf16), tokenizer.json,
   tokenizer_config.json (with the chat template from tools/chat_template.jinja),
   generation_config.json and MODEL_CARD.md — then a check that transformers loads it back
   and reproduces the trained main model's logits.

Reproduce the shipped model::

    python tools/train_embedded.py --minutes 45
    python tools/distill_mtp.py --minutes 45     # then its MTP head alone, toward the main model

(The second step keeps the main model as it is and trains the head to agree with it, which is
what makes speculation accept; it rewrites the card's MTP rows and says what it did.)
``--from-checkpoint`` redoes steps 4–5 from the fp32 checkpoint a run leaves in ``--work``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import random
import re
import sys
import time
from pathlib import Path

import jinja2
import numpy as np
import tokenizers
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

TOOLS = Path(__file__).resolve().parent
REPO = TOOLS.parent
sys.path.insert(0, str(TOOLS))
from argtypes import output_folder, real_number, require_reference, whole_number  # noqa: E402

require_reference(Path(__file__).name)  # the model is transformers' own, trained in torch
import safetensors.torch  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import transformers  # noqa: E402
from torch import nn  # noqa: E402
from transformers import Qwen3_5ForCausalLM, Qwen3_5TextConfig  # noqa: E402
from transformers.models.qwen3_5.modeling_qwen3_5 import (  # noqa: E402
    Qwen3_5DecoderLayer,
    Qwen3_5RMSNorm,
    Qwen3_5TextRotaryEmbedding,
)

import build_corpus  # noqa: E402  (a sibling script, not an installed module)
from bench import cpu_name  # noqa: E402

# --------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------

VOCAB_SIZE = 4096

# Qwen's special tokens, in Qwen's relative order, appended after the BPE ranks as in the real
# vocabulary. As in Qwen's own tokenizer.json, <think> and </think> are added tokens that are
# *not* special: they are always matched as single tokens, but a decode that skips special
# tokens still shows them, so reasoning stays visible.
ADDED_TOKENS = [
    ("<|endoftext|>", True),
    ("<|im_start|>", True),
    ("<|im_end|>", True),
    ("<|vision_start|>", True),
    ("<|vision_end|>", True),
    ("<|image_pad|>", True),
    ("<|video_pad|>", True),
    ("<think>", False),
    ("</think>", False),
]
END_OF_TEXT, IM_END = "<|endoftext|>", "<|im_end|>"

# Qwen3.5's pre-tokenization regex (the Qwen2 pattern with combining marks, \p{M}, kept with
# letters). Using the real pipeline means the embedded tokenizer splits text exactly where
# the real one would, only with far fewer merges.
QWEN3_5_SPLIT_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}"""
    r"""| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

CHAT_TEMPLATE_FILE = TOOLS / "chat_template.jinja"

# Dialog rendering for training: the system prompt some samples get, and how often.
SYSTEM_PROMPT = "You are a helpful assistant."
SYSTEM_PROMPT_RATE = 0.25

# --------------------------------------------------------------------------------------------
# Model shape
# --------------------------------------------------------------------------------------------


def model_config(vocab_size: int, eos_ids: list[int], pad_id: int) -> Qwen3_5TextConfig:
    """The Qwen3.5 text config of the embedded model.

    Proportions follow the real family scaled down: 3 linear : 1 full attention ending in full
    attention, GQA 4:2 with head_dim 64, a quarter of each head rotated (16 dims, i.e. 8
    frequencies split 3/3/2 between the t/h/w M-RoPE sections as the real 11/11/10 splits 32),
    twice as many DeltaNet value heads as key heads. Under 4.5M parameters with the MTP head,
    so the bf16 file stays under 10 MB.
    """
    return Qwen3_5TextConfig(
        vocab_size=vocab_size,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=4,
        layer_types=["linear_attention", "linear_attention", "linear_attention", "full_attention"],
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
        hidden_act="silu",
        max_position_embeddings=2048,
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
        attention_bias=False,
        linear_conv_kernel_dim=4,
        linear_num_key_heads=4,
        linear_num_value_heads=8,
        linear_key_head_dim=32,
        linear_value_head_dim=32,
        rope_parameters={
            "rope_type": "default",
            "rope_theta": 10_000_000.0,
            "partial_rotary_factor": 0.25,
            "mrope_section": [3, 3, 2],
            "mrope_interleaved": True,
        },
        eos_token_id=eos_ids,
        pad_token_id=pad_id,
        bos_token_id=None,
        initializer_range=0.02,
    )


# --------------------------------------------------------------------------------------------
# Corpus → token sequences
# --------------------------------------------------------------------------------------------


def load_documents(corpus: Path, split: str, manifest: dict) -> list[dict]:
    """One split of the corpus, if it is the one its manifest (and so the model card) describes."""
    path = corpus / f"{split}.jsonl"
    if not path.is_file():
        raise SystemExit(f"{path}: missing; rebuild the corpus with tools/build_corpus.py --out {corpus}")
    data = path.read_bytes()
    if hashlib.sha256(data).hexdigest() != manifest.get(split, {}).get("sha256"):
        raise SystemExit(f"{path}: not the file {corpus / 'manifest.json'} describes (its SHA-256 differs); "
                         f"rebuild the corpus with tools/build_corpus.py --out {corpus}")
    return [json.loads(line) for line in data.decode("utf-8").splitlines()]


def load_chat_template() -> str:
    """The chat template, without its leading explanatory comment."""
    source = CHAT_TEMPLATE_FILE.read_text(encoding="utf-8")
    return re.sub(r"\A\{#-.*?-#\}\s*", "", source, flags=re.S).rstrip("\n")


class ChatRenderer:
    """Renders messages with the chat template, as transformers' apply_chat_template would."""

    def __init__(self, template: str):
        env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True)
        self.template = env.from_string(template)

    def __call__(self, messages: list[dict], add_generation_prompt: bool = False, enable_thinking: bool = True) -> str:
        return self.template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                    enable_thinking=enable_thinking)


def dialog_samples(doc: dict, render: ChatRenderer, copy_index: int) -> list[tuple[str, str]]:
    """(prompt, completion) text pairs for every assistant turn of a dialog document.

    The prompt is the conversation so far rendered with the generation prompt, and the
    completion is what the model must then write, ending in <|im_end|>. The two are tokenized
    separately, exactly as at inference time, where the prompt is tokenized and the reply is
    generated token by token. That matters with thinking on: the prompt ends "<think>\\n" and
    the model must learn to close the block itself ("\\n</think>\\n\\n"), which it would never
    see if the whole rendered turn were tokenized as one string ("\\n\\n" is one token).
    Thinking on/off and the optional system prompt are drawn per turn and per copy (the
    dialogs are repeated in training) from a generator seeded by the document name.
    """
    samples = []
    messages = doc["messages"]
    for turn, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        rng = random.Random(f"{doc['name']}#{turn}#{copy_index}")
        thinking = rng.random() < 0.5
        history = messages[:turn]
        if rng.random() < SYSTEM_PROMPT_RATE:
            history = [{"role": "system", "content": SYSTEM_PROMPT}] + history
        prompt = render(history, add_generation_prompt=True, enable_thinking=thinking)
        completion = ("\n</think>\n\n" if thinking else "") + message["content"] + IM_END + "\n"
        samples.append((prompt, completion))
    return samples


def tokenizer_training_texts(documents: list[dict]):
    """Texts the BPE merges are learned from: code files and dialog turns, without specials."""
    for doc in documents:
        if doc["kind"] == "code":
            yield doc["text"]
        else:
            yield "".join(f"{m['role']}\n{m['content']}\n" for m in doc["messages"])


def train_tokenizer(documents: list[dict]) -> Tokenizer:
    """A byte-level BPE tokenizer with Qwen3.5's pipeline and special tokens, VOCAB_SIZE in all."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN3_5_SPLIT_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE - len(ADDED_TOKENS),
        min_frequency=2,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes: nothing is ever unknown
        special_tokens=[],
    )
    tokenizer.train_from_iterator(tokenizer_training_texts(documents), trainer=trainer)
    base = tokenizer.get_vocab_size()
    if base != VOCAB_SIZE - len(ADDED_TOKENS):
        raise RuntimeError(f"BPE training produced {base} tokens, expected {VOCAB_SIZE - len(ADDED_TOKENS)}")
    # One by one, so that ids follow ADDED_TOKENS' order whatever the special flag.
    for content, special in ADDED_TOKENS:
        token = AddedToken(content, special=special, normalized=False)
        (tokenizer.add_special_tokens if special else tokenizer.add_tokens)([token])
    for offset, (content, _) in enumerate(ADDED_TOKENS):
        assert tokenizer.token_to_id(content) == base + offset, content
    return tokenizer


def encode_documents(tokenizer: Tokenizer, documents: list[dict], render: ChatRenderer,
                     dialog_copies: int) -> tuple[list[list[int]], list[list[int]]]:
    """Token ids per document, each ending in <|endoftext|>: (code documents, dialog samples)."""
    eot = tokenizer.token_to_id(END_OF_TEXT)
    code_docs = [d for d in documents if d["kind"] == "code"]
    code = [enc.ids + [eot] for enc in tokenizer.encode_batch([d["text"] for d in code_docs])]
    pairs = [pair for copy_index in range(dialog_copies)
             for doc in documents if doc["kind"] == "dialog"
             for pair in dialog_samples(doc, render, copy_index)]
    prompts = tokenizer.encode_batch([p for p, _ in pairs])
    completions = tokenizer.encode_batch([c for _, c in pairs])
    dialog = [p.ids + c.ids + [eot] for p, c in zip(prompts, completions)]
    return code, dialog


def windows(stream: list[int], length: int, stride: int) -> torch.Tensor:
    """Windows of ``length`` tokens every ``stride`` tokens over one long token stream.

    With length = T + 2 and stride = T, window k feeds positions kT..kT+T-1, its main-head
    targets are tokens kT+1..kT+T and its MTP targets kT+2..kT+T+1: consecutive windows
    cover every target exactly once.
    """
    if len(stream) < length:  # unfold would fail with a message about tensor sizes
        raise SystemExit(f"--seq-len {length - 2}: a window of {length} tokens is longer than a token stream of "
                         f"{len(stream)}; give a smaller --seq-len")
    tensor = torch.tensor(stream, dtype=torch.long)
    return tensor.unfold(0, length, stride).contiguous()


# --------------------------------------------------------------------------------------------
# The MTP head and the model trained with it
# --------------------------------------------------------------------------------------------


class MtpHead(nn.Module):
    """Qwen3.5's multi-token-prediction head: one extra decoder layer predicting token j+2.

    For each position j it combines what the main model knows after token j (its last hidden
    state, after the final norm) with the embedding of token j+1 — the token the main model
    is about to emit — and runs one full-attention decoder layer over these combined vectors,
    at rotary position j. Its output, normed and put through the shared tied LM head, is a
    guess at token j+2: a draft that speculative decoding lets the main model verify.

    Parameter names are those of Qwen3.5 checkpoints (``mtp.fc``, ``mtp.pre_fc_norm_embedding``,
    ``mtp.pre_fc_norm_hidden``, ``mtp.layers.0.*``, ``mtp.norm``). The concatenation order —
    embedding first, hidden second — is the one serving engines use; reversing it gives
    plausible text with near-zero acceptance, so it is pinned here and in the card.
    """

    def __init__(self, config: Qwen3_5TextConfig):
        super().__init__()
        hidden = config.hidden_size
        # The same decoder layer as the main model's full-attention layers (a config with a
        # single full_attention layer builds exactly that), with an explicit causal mask.
        layer_config = Qwen3_5TextConfig.from_dict({
            **config.to_dict(), "num_hidden_layers": 1, "layer_types": ["full_attention"]})
        layer_config._attn_implementation = "sdpa"
        self.fc = nn.Linear(2 * hidden, hidden, bias=False)
        self.pre_fc_norm_embedding = Qwen3_5RMSNorm(hidden, eps=config.rms_norm_eps)
        self.pre_fc_norm_hidden = Qwen3_5RMSNorm(hidden, eps=config.rms_norm_eps)
        self.layers = nn.ModuleList([Qwen3_5DecoderLayer(layer_config, layer_idx=0)])
        self.norm = Qwen3_5RMSNorm(hidden, eps=config.rms_norm_eps)
        self.rotary_emb = Qwen3_5TextRotaryEmbedding(layer_config)  # buffers only: never saved
        std = config.initializer_range
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, mean=0.0, std=std)
        # The zero-centred RMSNorms start at weight 0, i.e. a scale of exactly 1.

    def forward(self, next_embeddings: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        """next_embeddings[:, j] = embed(t[j+1]), hidden[:, j] = h[j]; returns normed states for t[j+2]."""
        batch, length, _ = hidden.shape
        x = self.fc(torch.cat([self.pre_fc_norm_embedding(next_embeddings), self.pre_fc_norm_hidden(hidden)], dim=-1))
        positions = torch.arange(length, device=x.device).unsqueeze(0).expand(batch, -1)
        cos_sin = self.rotary_emb(x, positions)
        causal = torch.full((length, length), float("-inf"), device=x.device).triu(1)[None, None]
        x = self.layers[0](x, position_embeddings=cos_sin, attention_mask=causal)
        return self.norm(x)


class ModelWithMtp(nn.Module):
    """A transformers Qwen3_5ForCausalLM (``lm``) and the MTP head (``mtp``) trained with it."""

    def __init__(self, config: Qwen3_5TextConfig):
        super().__init__()
        self.lm = Qwen3_5ForCausalLM(config)
        self.mtp = MtpHead(config)

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """tokens [B, T+2] → (main logits [B, T, V] for t[1..T], MTP logits [B, T, V] for t[2..T+1])."""
        length = tokens.shape[1] - 2
        hidden = self.lm.model(input_ids=tokens[:, :length], use_cache=False).last_hidden_state  # after final norm
        next_embeddings = self.lm.model.embed_tokens(tokens[:, 1:length + 1])
        mtp_hidden = self.mtp(next_embeddings, hidden)
        return self.lm.lm_head(hidden), self.lm.lm_head(mtp_hidden)

    def export_state_dict(self) -> dict[str, torch.Tensor]:
        """The checkpoint's tensors: text-only ``model.*`` keys plus ``mtp.*``, no tied lm_head."""
        tensors = {name: t for name, t in self.lm.state_dict().items() if name != "lm_head.weight"}
        tensors.update({f"mtp.{name}": t for name, t in self.mtp.state_dict().items()})
        return tensors


def parameter_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())  # parameters() yields tied tensors once


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------


def learning_rate(progress: float, peak: float, warmup: float, floor: float) -> float:
    """Linear warm-up over the first ``warmup`` of the run, then cosine decay to ``floor``·peak."""
    if progress < warmup:
        return peak * progress / warmup
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, (progress - warmup) / (1 - warmup))))
    return peak * (floor + (1 - floor) * cosine)


def losses(model: ModelWithMtp, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    length = batch.shape[1] - 2
    main_logits, mtp_logits = model(batch)
    vocab = main_logits.shape[-1]
    main = F.cross_entropy(main_logits.reshape(-1, vocab), batch[:, 1:length + 1].reshape(-1))
    mtp = F.cross_entropy(mtp_logits.reshape(-1, vocab), batch[:, 2:length + 2].reshape(-1))
    return main, mtp


def train(model: ModelWithMtp, train_windows: torch.Tensor, valid_windows: torch.Tensor, args) -> dict:
    """The training loop: AdamW, warm-up + cosine, gradient clipping, a time or step budget.

    Progress (which drives the learning rate) is the fraction of the wall-clock budget spent,
    or of ``--steps`` when that is given; the latter makes the schedule independent of the
    machine's speed. ``--steps`` with a timed run's step count runs as many steps on a
    schedule close to that run's, not the same: there each step's learning rate followed the
    clock (quick evaluations included), so no command reproduces a timed run's weights exactly.
    """
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]  # norms, A_log, dt_bias
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr, betas=(0.9, 0.95), eps=1e-8)
    generator = torch.Generator().manual_seed(args.seed)
    order, cursor, epoch = torch.randperm(len(train_windows), generator=generator), 0, 0
    budget = args.minutes * 60.0
    start = time.monotonic()
    last_eval = start
    step, tokens_seen = 0, 0
    smooth_main = smooth_mtp = None
    while True:
        elapsed = time.monotonic() - start
        progress = step / args.steps if args.steps else elapsed / budget
        if progress >= 1.0:
            break
        lr = learning_rate(progress, args.lr, args.warmup, args.min_lr_ratio)
        for group in optimizer.param_groups:
            group["lr"] = lr
        if cursor + args.batch_size > len(order):
            order, cursor, epoch = torch.randperm(len(train_windows), generator=generator), 0, epoch + 1
        batch = train_windows[order[cursor:cursor + args.batch_size]]
        cursor += args.batch_size

        model.train()
        main, mtp = losses(model, batch)
        loss = main + args.mtp_weight * mtp
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
        optimizer.step()
        step += 1
        tokens_seen += batch.shape[0] * (batch.shape[1] - 2)

        smooth_main = main.item() if smooth_main is None else 0.95 * smooth_main + 0.05 * main.item()
        smooth_mtp = mtp.item() if smooth_mtp is None else 0.95 * smooth_mtp + 0.05 * mtp.item()
        if step % args.log_every == 0 or step == 1:
            elapsed = time.monotonic() - start
            print(f"step {step:5d} | {elapsed / 60:5.1f} min | epoch {epoch} | lr {lr:.2e} | "
                  f"loss main {smooth_main:.3f} mtp {smooth_mtp:.3f} | {tokens_seen / elapsed:5.0f} tok/s",
                  flush=True)
        if time.monotonic() - last_eval > args.eval_every * 60:
            quick = evaluate(model, valid_windows[:args.quick_eval_windows], args.eval_batch_size)
            print(f"  eval (first {args.quick_eval_windows} valid windows): main ppl {quick['main_ppl']:.2f}, "
                  f"mtp top-1 {quick['mtp_top1']:.3f}", flush=True)
            last_eval = time.monotonic()
    return {"steps": step, "tokens_seen": tokens_seen, "epochs_started": epoch + 1,
            "train_seconds": time.monotonic() - start,
            "final_train_loss_main": smooth_main, "final_train_loss_mtp": smooth_mtp}


# --------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def evaluate(model: ModelWithMtp, windows_: torch.Tensor, batch_size: int) -> dict:
    """Held-out metrics over windows [N, T+2], every target counted once.

    * main_ppl: perplexity of the main head on t[j+1];
    * mtp_ppl, mtp_top1: the MTP head's perplexity on, and top-1 accuracy for, t[j+2];
    * mtp_agree: how often the MTP argmax equals the main model's own greedy choice at the
      next position (argmax of its logits for t[j+2], given the true t[j+1]) — with teacher
      forcing, a proxy for speculative-decoding acceptance on this text.
    """
    model.eval()
    nll_main = nll_mtp = 0.0
    count = top1 = agree = agree_count = 0
    for begin in range(0, len(windows_), batch_size):
        batch = windows_[begin:begin + batch_size]
        length = batch.shape[1] - 2
        main_logits, mtp_logits = model(batch)
        targets_main, targets_mtp = batch[:, 1:length + 1], batch[:, 2:length + 2]
        nll_main += F.cross_entropy(main_logits.flatten(0, 1), targets_main.flatten(), reduction="sum").item()
        nll_mtp += F.cross_entropy(mtp_logits.flatten(0, 1), targets_mtp.flatten(), reduction="sum").item()
        draft = mtp_logits.argmax(-1)
        top1 += (draft == targets_mtp).sum().item()
        count += targets_main.numel()
        # The main model's greedy token for position j+2 comes from its logits at j+1.
        agree += (draft[:, :-1] == main_logits[:, 1:].argmax(-1)).sum().item()
        agree_count += draft[:, :-1].numel()
    return {"tokens": count, "main_ppl": math.exp(nll_main / count), "main_nll": nll_main / count,
            "mtp_ppl": math.exp(nll_mtp / count), "mtp_top1": top1 / count, "mtp_agree": agree / agree_count}


def unigram_perplexity(train_stream: list[int], windows_: torch.Tensor, vocab_size: int) -> float:
    """Perplexity of a unigram model (add-one smoothed training-token frequencies) on the same targets."""
    counts = np.bincount(np.asarray(train_stream), minlength=vocab_size).astype(np.float64) + 1.0
    log_probs = np.log(counts / counts.sum())
    targets = windows_[:, 1:-1].reshape(-1).numpy()
    return float(math.exp(-log_probs[targets].mean()))


@torch.no_grad()
def speculative_acceptance(model: ModelWithMtp, prompts: list[list[int]], new_tokens: int) -> dict:
    """Acceptance of one-token greedy speculative decoding on the model's own greedy output.

    Each prompt is continued greedily by the main model (transformers' generate, with its
    cache). One teacher-forced pass over the result then gives the MTP draft for every
    generated position; a draft is accepted when it equals the token the main model actually
    chose there. A decoder drafts only where a cycle starts (after an accepted draft's bonus
    token, or after a rejection), so the share of its drafts accepted differs a little from
    this per-position figure (on the shipped model 83.4% of 470 drafts, against 84.2% of 855).
    """
    model.eval()
    accepted = drafted = 0
    for prompt in prompts:
        ids = torch.tensor([prompt])
        out = model.lm.generate(ids, max_new_tokens=new_tokens, do_sample=False, eos_token_id=None,
                                pad_token_id=model.lm.config.pad_token_id)[0]
        # Drafts for positions P+1 .. L-1 come from MTP at j = P-1 .. L-3 (P = prompt length).
        sequence = torch.cat([out, out.new_zeros(1)])[None]  # one pad so the window has T+2 tokens
        _, mtp_logits = model(sequence)
        drafts = mtp_logits[0].argmax(-1)
        start, end = len(prompt) - 1, len(out) - 2
        accepted += (drafts[start:end] == out[start + 2:end + 2]).sum().item()
        drafted += end - start
    return {"acceptance": accepted / drafted, "drafts": drafted}


# --------------------------------------------------------------------------------------------
# Export
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def round_to_bf16(model: nn.Module) -> None:
    """Round every parameter to bf16 in place, so evaluation sees exactly the shipped values."""
    for parameter in model.parameters():
        parameter.copy_(parameter.to(torch.bfloat16).to(parameter.dtype))


def export(model: ModelWithMtp, tokenizer: Tokenizer, template: str, out: Path) -> dict[str, int]:
    """Write the embedded model's files into ``out``; returns each file's size in bytes."""
    out.mkdir(parents=True, exist_ok=True)
    config = model.lm.config
    eos_ids = list(config.eos_token_id)
    pad_id = config.pad_token_id

    config_dict = config.to_dict()
    for key in ("transformers_version", "_name_or_path", "output_attentions", "output_hidden_states",
                "return_dict", "chunk_size_feed_forward", "problem_type", "id2label", "label2id",
                "tokenizer_class", "prefix", "sep_token_id", "decoder_start_token_id", "task_specific_params",
                "finetuning_task", "architectures", "dtype", "torch_dtype"):
        config_dict.pop(key, None)
    config_dict.update({
        "architectures": ["Qwen3_5ForCausalLM"],
        "dtype": "bfloat16",
        "attn_output_gate": True,  # transformers always gates; the public configs say so explicitly
        "mtp_num_hidden_layers": 1,
    })
    (out / "config.json").write_text(json.dumps(config_dict, indent=2, sort_keys=True) + "\n")

    tensors = {name: t.detach().to(torch.bfloat16).contiguous() for name, t in model.export_state_dict().items()}
    safetensors.torch.save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "model.safetensors").chmod(0o644)  # save_file creates it owner-only; this file ships

    tokenizer.save(str(out / "tokenizer.json"))
    added = {str(tokenizer.token_to_id(content)): {
        "content": content, "lstrip": False, "normalized": False, "rstrip": False,
        "single_word": False, "special": special} for content, special in ADDED_TOKENS}
    tokenizer_config = {
        # Not the release files' Qwen2Tokenizer: for a qwen3_5_text checkpoint naming that class,
        # transformers splits with Qwen2's pattern instead of the one this tokenizer was trained with.
        "tokenizer_class": "Qwen3_5Tokenizer",
        "added_tokens_decoder": added,
        "bos_token": None,
        "eos_token": IM_END,
        "pad_token": END_OF_TEXT,
        "unk_token": None,
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        "errors": "replace",
        "split_special_tokens": False,
        "model_max_length": config.max_position_embeddings,
        "chat_template": template,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2, ensure_ascii=False) + "\n")

    generation_config = {
        "bos_token_id": pad_id,
        "eos_token_id": eos_ids,
        "pad_token_id": pad_id,
        "do_sample": True,
        "temperature": 0.7,
        "top_k": 20,
        "top_p": 0.9,
        "repetition_penalty": 1.05,
    }
    (out / "generation_config.json").write_text(json.dumps(generation_config, indent=2) + "\n")
    return {p.name: p.stat().st_size for p in sorted(out.iterdir()) if p.is_file()}


@torch.no_grad()
def verify_export(model: ModelWithMtp, out: Path, sample: torch.Tensor) -> dict:
    """Load ``out`` back with transformers and check it is the model that was trained.

    Only the MTP tensors may go unused (transformers' Qwen3.5 classes ignore them, so they are
    only counted here; tests/test_tool_args.py holds minqwen's MTP head to this file's) and only
    the tied lm_head may be missing; logits must match the in-memory (bf16-rounded) model.
    """
    loaded, info = Qwen3_5ForCausalLM.from_pretrained(out, dtype=torch.float32, output_loading_info=True)
    loaded.eval()
    missing = [k for k in info["missing_keys"] if k != "lm_head.weight"]
    unexpected = [k for k in info["unexpected_keys"] if not k.startswith("mtp.")]
    if missing or unexpected or info["mismatched_keys"]:
        raise RuntimeError(f"export does not load cleanly: missing {missing}, unexpected {unexpected}, "
                           f"mismatched {info['mismatched_keys']}")
    if loaded.lm_head.weight.data_ptr() != loaded.model.embed_tokens.weight.data_ptr():
        raise RuntimeError("lm_head is not tied to embed_tokens after loading")
    expected = model.lm(input_ids=sample, use_cache=False).logits
    got = loaded(input_ids=sample, use_cache=False).logits
    difference = (expected - got).abs().max().item()
    if difference > 1e-4:
        raise RuntimeError(f"reloaded logits differ from the trained model's by {difference}")
    stored = safetensors.torch.load_file(str(out / "model.safetensors"))
    return {"max_logit_difference": difference, "missing_keys": list(info["missing_keys"]),
            "tensors": len(stored), "mtp_tensors": len([k for k in stored if k.startswith("mtp.")]),
            "model": loaded}


# --------------------------------------------------------------------------------------------
# Samples and the model card
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def continue_text(lm, tokenizer: Tokenizer, text: str, new_tokens: int, sample: bool, seed: int = 0) -> str:
    """A continuation of ``text`` by transformers' generate: greedy, or with the shipped sampling defaults."""
    ids = torch.tensor([tokenizer.encode(text).ids])
    torch.manual_seed(seed)
    kwargs = dict(do_sample=True, temperature=0.7, top_k=20, top_p=0.9, repetition_penalty=1.05) if sample else \
        dict(do_sample=False, temperature=None, top_k=None, top_p=None, repetition_penalty=1.0)
    out = lm.generate(ids, max_new_tokens=new_tokens, pad_token_id=lm.config.pad_token_id,
                      eos_token_id=lm.config.eos_token_id, **kwargs)
    return tokenizer.decode(out[0, ids.shape[1]:].tolist(), skip_special_tokens=False)


def machine_description() -> str:
    return f"{cpu_name()}, {os.cpu_count()} cores ({torch.get_num_threads()} torch thread used), {platform.system()}"


def write_model_card(out: Path, report: dict) -> None:
    """MODEL_CARD.md: what the model is, what it was trained on, how well, and how to rebuild it."""
    r = report
    c = r["config"]
    fence = "```"
    samples = "\n\n".join(
        f"**{s['mode']}**, prompt `{s['prompt']!r}`:\n\n{fence}\n{s['prompt']}{s['output']}\n{fence}" for s in r["samples"])
    chats = "\n\n".join(
        f"**chat, thinking {'on' if s['thinking'] else 'off'}, greedy, no repetition penalty**, user: {s['user']!r}\n\n{fence}\n{s['output']}\n{fence}"
        for s in r["chat_samples"])
    corpus = r["corpus"]
    threads = "one CPU thread" if r["args"]["threads"] == 1 else f"{r['args']['threads']} CPU threads"
    budget_note = "" if r["args"]["steps"] else (
        " A wall-clock budget makes the number of steps, and the learning rate at each step, depend "
        f"on the machine: `--steps {r['train']['steps']}` instead of `--minutes` runs as many steps on a "
        "schedule by step count, close to this run's but not the same, so no command reproduces these "
        "weights exactly.")
    sources = "\n".join(f"- {s['what']} — licence: {s['licence']}" for s in corpus["sources"])
    added_tokens = ", ".join(f"`{t}` {r['token_ids'][t]}" for t, _ in ADDED_TOKENS)
    card = f"""# minqwen embedded model

A tiny model with the **Qwen3.5** architecture, trained from scratch so that minqwen runs
out of the box with nothing to download. It writes Python that *looks like* the standard
library — plausible structure, names and idioms, little meaning — and answers short chat
turns in the Qwen3.5 chat format. It is a demonstration and a test subject for the engine
(hybrid Gated DeltaNet / gated attention layers, partial M-RoPE, GQA, tied embeddings, an MTP
draft head for speculative decoding), not a useful assistant.

Every file here loads in `transformers` {transformers.__version__} as `Qwen3_5ForCausalLM`
(which ignores the `mtp.*` tensors).

## Files

| file | bytes |
|---|---|
""" + "\n".join(f"| `{name}` | {size:,} |" for name, size in r["file_sizes"].items()
                   if name != "MODEL_CARD.md") + f"""

## Architecture

| | |
|---|---|
| parameters | {r['parameters']['total']:,} in all: main model {r['parameters']['main']:,} (of which the tied embedding {r['parameters']['embedding']:,}), MTP head {r['parameters']['mtp']:,} |
| stored as | bf16 safetensors, text-only keys `model.*` plus `mtp.*`, no `lm_head.weight` (tied) |
| layers | {c['num_hidden_layers']}: {', '.join(c['layer_types'])} |
| hidden / MLP | {c['hidden_size']} / {c['intermediate_size']} (SiLU-gated) |
| full attention | {c['num_attention_heads']} query heads, {c['num_key_value_heads']} KV heads, head_dim {c['head_dim']}, output gate, q/k RMSNorm |
| RoPE | theta {c['rope_parameters']['rope_theta']:g}, partial_rotary_factor {c['rope_parameters']['partial_rotary_factor']} ({int(c['head_dim'] * c['rope_parameters']['partial_rotary_factor'])} dims), interleaved M-RoPE sections {c['rope_parameters']['mrope_section']} |
| Gated DeltaNet | {c['linear_num_key_heads']} key heads × {c['linear_key_head_dim']}, {c['linear_num_value_heads']} value heads × {c['linear_value_head_dim']}, conv kernel {c['linear_conv_kernel_dim']} |
| vocabulary | {c['vocab_size']}: byte-level BPE (Qwen3.5's NFC + split regex + byte mapping) with {len(ADDED_TOKENS)} added tokens at the end: {added_tokens} (`<think>`/`</think>` not special, as in Qwen) |
| stop tokens | `eos_token_id` {c['eos_token_id']} (`<|im_end|>`, `<|endoftext|>`); pad `<|endoftext|>` |
| context | trained on {r['args']['seq_len']}-token windows; `max_position_embeddings` {c['max_position_embeddings']} |
| MTP head | `mtp_num_hidden_layers` 1: `fc([pre_fc_norm_embedding(embed(t[j+1])) ; pre_fc_norm_hidden(h[j])])` (embedding first; `h` after the final norm) → one full-attention decoder layer at rotary position j → `norm` → tied LM head, predicting t[j+2] |

## Training data

{sources}

Built by `tools/build_corpus.py` from CPython {corpus['python']}'s standard library: tests,
installed packages, the charmap codec tables, `pydoc_data/topics.py` and `html/entities.py`
excluded. Held out: documents whose name hashes into 2% of buckets
({corpus['valid']['kinds'].get('code', {}).get('documents', 0)} stdlib files,
{corpus['valid']['kinds'].get('dialog', {}).get('documents', 0)} dialogs). Dialogs are rendered
with the chat template (half with thinking on, half off; a quarter with a system prompt),
prompt and reply tokenized separately as at inference, and repeated {r['args']['dialog_copies']}×.
Training stream: {r['data']['train_tokens']:,} tokens ({r['data']['code_tokens']:,} code,
{r['data']['dialog_tokens']:,} dialog). Corpus SHA-256: train `{corpus['train']['sha256'][:16]}…`,
valid `{corpus['valid']['sha256'][:16]}…`.

## Training

- {r['train']['steps']:,} steps of {r['args']['batch_size']} × {r['args']['seq_len']} tokens:
  **{r['train']['tokens_seen']:,} tokens seen** in {r['train']['train_seconds'] / 60:.1f} minutes
  on {r['machine']}; torch {torch.__version__}, transformers {transformers.__version__}, tokenizers {tokenizers.__version__}.
- AdamW (β 0.9/0.95, weight decay {r['args']['weight_decay']} on matrices), peak lr {r['args']['lr']},
  {r['args']['warmup']:.0%} warm-up then cosine to {r['args']['min_lr_ratio']:.0%}, gradient clip {r['args']['clip']},
  seed {r['args']['seed']}. Loss = main next-token loss + {r['args']['mtp_weight']} × MTP loss.
- Final training loss (smoothed): main {r['train']['final_train_loss_main']:.3f}, MTP {r['train']['final_train_loss_mtp']:.3f}.

## Evaluation (held-out, weights as stored in bf16)

| | value |
|---|---|
| stdlib perplexity, main head | **{r['eval']['code']['main_ppl']:.2f}** ({r['eval']['code']['tokens']:,} tokens) |
| stdlib perplexity, unigram baseline | {r['eval']['unigram_ppl']:.1f} |
| dialog perplexity, main head | {r['eval']['dialog']['main_ppl']:.2f} ({r['eval']['dialog']['tokens']:,} tokens) |
| MTP perplexity for t[j+2] | {r['eval']['code']['mtp_ppl']:.2f} |
| MTP top-1 accuracy for t[j+2] | {r['eval']['code']['mtp_top1']:.1%} |
| MTP argmax = main model's greedy next-next token (teacher-forced) | {r['eval']['code']['mtp_agree']:.1%} |
| MTP draft = the model's own greedy token, at every position of its greedy output (a one-draft decoder's acceptance, per position) | {r['eval']['acceptance']['acceptance']:.1%} ({r['eval']['acceptance']['drafts']:,} drafts) |

## Prompting

Try `minqwen generate "{RECOMMENDED_PROMPT}"`. The tokenizer, like Qwen's, attaches a space to
the word after it (`" def"`, `" return"`), so in training a token that is only a space is
almost never followed by a word: a prompt that ends in a space (`"def "`) starts the model
somewhere it has hardly been. For the same reason a prompt ending in `):` is unusual: in
code `):` is nearly always followed by a newline, and `):\\n` is a single token. End prompts
on a word or a newline instead, and prefer sampling to greedy decoding, which soon repeats
itself in a model this small. Chat
replies are short and often beside the point: the dialog data is a few thousand one-line
exchanges.

## Samples (transformers, these weights)

{samples}

{chats}

## Reproduce

```
pip install -e '.[reference]'
python tools/train_embedded.py {training_options(r['args'])}
```

That builds the corpus (`tools/build_corpus.py`; the dialog wheel comes from PyPI with
`pip download`), trains the tokenizer and the model on {threads}, evaluates, and writes
this directory.{budget_note}

## Licence

The weights are derived from the corpus above: the Python standard library (PSF License
2.0) and chatterbot-corpus (BSD 3-Clause). They are distributed with minqwen under its
Apache-2.0 licence.
"""
    (out / "MODEL_CARD.md").write_text(card, encoding="utf-8")


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------


def argument_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpus", type=output_folder, default=REPO / "scratch" / "corpus",
                        help="output of tools/build_corpus.py (built here if missing)")
    parser.add_argument("--out", type=output_folder, default=REPO / "minqwen" / "embedded",
                        help="where the model is written")
    parser.add_argument("--work", type=output_folder, default=REPO / "scratch" / "train_embedded",
                        help="scratch: fp32 checkpoint, tokenizer, metrics")
    parser.add_argument("--minutes", type=real_number(0), default=45.0, help="wall-clock training budget")
    parser.add_argument("--steps", type=whole_number(0), default=0,
                        help="train this many steps instead of for --minutes")
    # check_causality changes token 10 and reads the MTP logits at position 9
    parser.add_argument("--seq-len", type=whole_number(10), default=256, help="tokens per training window")
    parser.add_argument("--batch-size", type=whole_number(1), default=8, help="windows per step")
    parser.add_argument("--lr", type=real_number(0, above_minimum=True), default=2e-3, help="peak learning rate")
    parser.add_argument("--warmup", type=real_number(0, 1), default=0.02, help="fraction of the run")
    parser.add_argument("--min-lr-ratio", type=real_number(0, 1), default=0.1,
                        help="the cosine ends at this fraction of --lr")
    parser.add_argument("--weight-decay", type=real_number(0), default=0.1, help="AdamW's, on matrices only")
    parser.add_argument("--clip", type=real_number(0, above_minimum=True), default=1.0, help="gradient norm clip")
    parser.add_argument("--mtp-weight", type=real_number(0), default=0.4, help="λ in main loss + λ·MTP loss")
    parser.add_argument("--dialog-copies", type=whole_number(1), default=3,
                        help="times the dialog turns appear in training")
    parser.add_argument("--seed", type=whole_number(0, 2**63 - 1), default=0,
                        help="initial weights, document order, batches")
    parser.add_argument("--threads", type=whole_number(1), default=1, help="torch threads")
    parser.add_argument("--log-every", type=whole_number(1), default=25, help="steps between loss lines")
    parser.add_argument("--eval-every", type=real_number(0), default=5.0, help="minutes between quick evaluations")
    parser.add_argument("--quick-eval-windows", type=whole_number(1), default=32,
                        help="held-out windows each quick evaluation reads (the final one reads them all)")
    parser.add_argument("--eval-batch-size", type=whole_number(1), default=16, help="windows per evaluation batch")
    parser.add_argument("--from-checkpoint", action="store_true",
                        help="skip training: evaluate and export the checkpoint in --work (with the "
                             "training options it was trained with)")
    return parser


# The options that shape the weights and their evaluation: a run's card names them, and
# --from-checkpoint takes them from the checkpoint.
TRAINING_OPTIONS = ["minutes", "steps", "seq_len", "batch_size", "lr", "warmup", "min_lr_ratio", "weight_decay",
                    "clip", "mtp_weight", "dialog_copies", "seed", "threads"]


def training_options(args: dict) -> str:
    """The command-line options that give a run's training: its budget, and what differs from the defaults."""
    defaults = vars(argument_parser().parse_args([]))
    budget = f"--steps {args['steps']}" if args["steps"] else f"--minutes {args['minutes']:g}"
    others = [f"--{k.replace('_', '-')} {args[k]:g}" for k in TRAINING_OPTIONS
              if k not in ("minutes", "steps") and args[k] != defaults[k]]
    return " ".join([budget] + others)


def restore_training_options(args, saved: dict, checkpoint_path: Path) -> None:
    """Take the checkpoint's training options, refusing one given on this command line that differs."""
    defaults = vars(argument_parser().parse_args([]))
    for name in TRAINING_OPTIONS:
        given = getattr(args, name)
        if given != defaults[name] and given != saved[name]:
            raise SystemExit(f"--from-checkpoint: --{name.replace('_', '-')} {given:g} differs from the "
                             f"{saved[name]:g} {checkpoint_path} was trained with; leave it out")
        setattr(args, name, saved[name])


def parse_args(argv=None):
    parser = argument_parser()
    args = parser.parse_args(argv)
    # Without --steps the budget is --minutes, and the loop divides by it.
    if not args.steps and not args.minutes:
        parser.error("--minutes must be > 0 unless --steps gives a number of steps")
    if args.from_checkpoint:
        missing = [name for name in ("tokenizer.json", "checkpoint.pt") if not (args.work / name).is_file()]
        if missing:
            parser.error(f"--from-checkpoint: --work {args.work} holds no {' or '.join(missing)}; "
                         f"train once without --from-checkpoint")
    return args


# Prompts for the card's samples and the acceptance measurement; the first is the one to
# recommend (it ends on a token the model has seen followed by code, see "Prompting").
PROMPTS = ["def parse_args", "def fibonacci(n):", "import os\n", "class", "def"]
RECOMMENDED_PROMPT = PROMPTS[0]
CHAT_TURNS = ["Hello, how are you?", "What is Python?"]


def main(argv=None) -> None:
    args = parse_args(argv)
    checkpoint_path = args.work / "checkpoint.pt"
    checkpoint = None
    if args.from_checkpoint:  # first: its training options decide the data windows below
        checkpoint = torch.load(checkpoint_path, weights_only=True)  # tensors and plain values, no pickled code
        restore_training_options(args, checkpoint["args"], checkpoint_path)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    args.work.mkdir(parents=True, exist_ok=True)

    if not (args.corpus / "manifest.json").exists():
        print(f"building the corpus in {args.corpus}", flush=True)
        build_corpus.build(args.corpus, with_dialogs=True, dialog_wheel=None)
    manifest = json.loads((args.corpus / "manifest.json").read_text())
    train_docs = load_documents(args.corpus, "train", manifest)
    valid_docs = load_documents(args.corpus, "valid", manifest)
    template = load_chat_template()
    render = ChatRenderer(template)

    tokenizer_path = args.work / "tokenizer.json"
    if args.from_checkpoint:
        tokenizer = Tokenizer.from_file(str(tokenizer_path))
    else:
        started = time.monotonic()
        tokenizer = train_tokenizer(train_docs)
        tokenizer.save(str(tokenizer_path))
        print(f"tokenizer: {tokenizer.get_vocab_size()} tokens in {time.monotonic() - started:.0f} s", flush=True)
    token_ids = {content: tokenizer.token_to_id(content) for content, _ in ADDED_TOKENS}
    eot = token_ids[END_OF_TEXT]

    code, dialog = encode_documents(tokenizer, train_docs, render, args.dialog_copies)
    documents = code + dialog
    random.Random(args.seed).shuffle(documents)  # dialogs spread through the code
    train_stream = [t for doc in documents for t in doc]
    valid_code, valid_dialog = encode_documents(tokenizer, valid_docs, render, 1)
    for split, docs in (("train", dialog), ("valid", valid_dialog)):
        if not docs:  # windows() would blame --seq-len for an empty stream
            raise SystemExit(f"{args.corpus}: no dialog documents in {split}.jsonl (built with --no-dialogs?); "
                             "the embedded model learns from code and dialog: rebuild the corpus with "
                             "tools/build_corpus.py, without --no-dialogs")
    window, stride = args.seq_len + 2, args.seq_len
    train_windows = windows(train_stream, window, stride)
    valid_windows = windows([t for doc in valid_code for t in doc], window, stride)
    dialog_windows = windows([t for doc in valid_dialog for t in doc], window, stride)
    data = {"train_tokens": len(train_stream), "code_tokens": sum(map(len, code)),
            "dialog_tokens": sum(map(len, dialog)), "train_windows": len(train_windows),
            "valid_windows": len(valid_windows), "valid_dialog_windows": len(dialog_windows)}
    print("data:", json.dumps(data), flush=True)

    config = model_config(VOCAB_SIZE, [token_ids[IM_END], eot], eot)
    model = ModelWithMtp(config)
    parameters = {"main": parameter_count(model.lm), "mtp": parameter_count(model.mtp),
                  "embedding": model.lm.model.embed_tokens.weight.numel()}
    parameters["total"] = parameters["main"] + parameters["mtp"]
    print("parameters:", json.dumps(parameters), f"(bf16 {2 * parameters['total'] / 1e6:.2f} MB)", flush=True)
    if 2 * parameters["total"] > 10_000_000:
        raise SystemExit("the model would not fit in 10 MB as bf16")
    check_causality(model, train_windows[:1])

    if checkpoint is not None:
        model.load_state_dict(checkpoint["state_dict"])
        train_stats = checkpoint["train"]
    else:
        train_stats = train(model, train_windows, valid_windows, args)
        torch.save({"state_dict": model.state_dict(), "train": train_stats, "args": vars(args) | {
            "corpus": str(args.corpus), "out": str(args.out), "work": str(args.work)}}, checkpoint_path)
        print("trained:", json.dumps(train_stats), flush=True)

    fp32_eval = evaluate(model, valid_windows, args.eval_batch_size)
    round_to_bf16(model)
    report_eval = {
        "code": evaluate(model, valid_windows, args.eval_batch_size),
        "code_fp32": fp32_eval,
        "dialog": evaluate(model, dialog_windows, args.eval_batch_size),
        "unigram_ppl": unigram_perplexity(train_stream, valid_windows, VOCAB_SIZE),
    }
    prompt_ids = [tokenizer.encode(p).ids for p in PROMPTS] + [doc[:32] for doc in valid_code[:4]]
    report_eval["acceptance"] = speculative_acceptance(model, prompt_ids, new_tokens=96)
    print("eval:", json.dumps(report_eval), flush=True)

    file_sizes = export(model, tokenizer, template, args.out)
    verified = verify_export(model, args.out, valid_windows[:2, :-2])
    loaded = verified.pop("model")
    print("export:", json.dumps(file_sizes), json.dumps(verified), flush=True)

    samples = []
    for prompt in PROMPTS:
        for mode, sample in (("greedy, no repetition penalty (`--temperature 0 --repetition-penalty 1`)", False), ("sampled (temperature 0.7, top-k 20, top-p 0.9, repetition penalty 1.05, seed 0)", True)):
            samples.append({"prompt": prompt, "mode": mode,
                            "output": continue_text(loaded, tokenizer, prompt, 80, sample)})
    chat_samples = []
    for user in CHAT_TURNS:
        for thinking in (False, True):
            prompt = render([{"role": "user", "content": user}], add_generation_prompt=True, enable_thinking=thinking)
            output = continue_text(loaded, tokenizer, prompt, 48, sample=False)
            chat_samples.append({"user": user, "thinking": thinking, "output": prompt + output})
    for s in samples + chat_samples:
        print("-" * 60, "\n", json.dumps({k: v for k, v in s.items() if k != "output"}), "\n", s["output"], flush=True)

    report = {"config": json.loads((args.out / "config.json").read_text()), "parameters": parameters,
              "token_ids": token_ids, "file_sizes": file_sizes, "corpus": manifest, "data": data,
              "train": train_stats, "eval": report_eval, "verify": verified, "machine": machine_description(),
              "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
              "samples": samples, "chat_samples": chat_samples}
    (args.work / "report.json").write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    write_model_card(args.out, report)
    print(f"wrote {args.out}", flush=True)


@torch.no_grad()
def check_causality(model: ModelWithMtp, tokens: torch.Tensor, position: int = 10) -> None:
    """Changing token ``position`` must leave every earlier prediction untouched.

    Main logits at j < position and MTP logits at j < position - 1 (MTP at j reads t[j+1])
    must not move: a guard against an attention path that silently drops the causal mask.
    """
    model.eval()
    changed = tokens.clone()
    changed[0, position] = (changed[0, position] + 1) % model.lm.config.vocab_size
    main_a, mtp_a = model(tokens)
    main_b, mtp_b = model(changed)
    if not (torch.allclose(main_a[:, :position], main_b[:, :position], atol=1e-5)
            and torch.allclose(mtp_a[:, :position - 1], mtp_b[:, :position - 1], atol=1e-5)):
        raise RuntimeError("a prediction depends on a later token: the causal mask is not applied")
    if torch.allclose(mtp_a[:, position - 1], mtp_b[:, position - 1]):
        raise RuntimeError("MTP at j does not read t[j+1]")


if __name__ == "__main__":
    main()
