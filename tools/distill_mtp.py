"""Distil a trained model's MTP head toward the model itself, so that more of its drafts are accepted.

    pip install -e '.[reference]'
    python tools/build_corpus.py                  # once: scratch/corpus
    python tools/distill_mtp.py --minutes 20      # the embedded model's head, in place

tools/train_embedded.py trains the MTP head on the corpus: from (h[j], t[j+1]) it learns to
predict the corpus's t[j+2]. But speculative decoding accepts a draft when it equals what the
*main model* would choose there, not what the corpus holds; a head that guesses the corpus
well still disagrees with a small main model wherever the main model is wrong. So this tool
keeps the main model frozen and trains only the ``mtp.*`` tensors to match the main model's
own next-token distribution (KL divergence from it, the usual "self-distillation" of a draft
model), on two kinds of text:

* windows of the training corpus, as in training;
* the main model's own greedy continuations of corpus prompts: the text a greedy speculative
  decoder actually drafts on (there t[j+1] is the main model's choice, not the corpus's).

And on two kinds of draft:

* the first draft of a verify: the head reads (h[j], t[j+1]), as in training;
* the second one in a row (``--speculative 2`` and more): the head reads its *own* output at j
  in place of the main model's hidden state, and t[j+2], at position j+1, attending to the
  pairs committed up to j and to itself (mtp.draft does exactly this). Training never showed
  the head its own output; here it learns to read it (``--chained-weight``).

Only ``mtp.*`` changes: every other tensor of model.safetensors is written back byte for byte
(checked), so the main model's outputs are untouched. The held-out figures of the model card's
MTP rows are measured again (the same measures tools/train_embedded.py reports) and the card
gets a section saying what this run did.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import sys
import textwrap
import time
from pathlib import Path

TOOLS = Path(__file__).resolve().parent
REPO = TOOLS.parent
sys.path.insert(0, str(TOOLS))

from argtypes import checkpoint_folder, output_folder, real_number, require_reference, whole_number  # noqa: E402

require_reference("distill_mtp.py")
import safetensors  # noqa: E402
import safetensors.torch  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from tokenizers import Tokenizer  # noqa: E402

import train_embedded as te  # noqa: E402  (a sibling script: the model classes and the measures)

CARD_SECTION = "## MTP head distillation"


def load_model(folder: Path) -> tuple[te.ModelWithMtp, dict[str, torch.Tensor]]:
    """The checkpoint in ``folder`` as transformers' model plus the MTP head, float32; and its stored tensors."""
    model = te.ModelWithMtp(te.Qwen3_5TextConfig.from_pretrained(folder))
    stored = safetensors.torch.load_file(str(folder / "model.safetensors"))
    main = {name: t.float() for name, t in stored.items() if not name.startswith("mtp.")}
    head = {name[len("mtp."):]: t.float() for name, t in stored.items() if name.startswith("mtp.")}
    if not head:
        raise SystemExit(f"{folder / 'model.safetensors'}: no mtp.* tensors, so no MTP head to distil")
    missing, unexpected = model.lm.load_state_dict(main, strict=False)
    if unexpected or [name for name in missing if name != "lm_head.weight"]:
        raise SystemExit(f"{folder}: not a checkpoint of the embedded model's kind (missing {missing}, "
                         f"unexpected {unexpected})")
    model.lm.tie_weights()
    model.mtp.load_state_dict(head)
    for parameter in model.lm.parameters():
        parameter.requires_grad_(False)
    return model, stored


@torch.no_grad()
def own_text(model: te.ModelWithMtp, prompts: torch.Tensor, length: int) -> torch.Tensor:
    """The main model's greedy continuations of ``prompts`` [B, P], cut to ``length`` tokens each: [B, length]."""
    model.eval()
    out = model.lm.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=length - prompts.shape[1],
                            do_sample=False, eos_token_id=None, pad_token_id=model.lm.config.pad_token_id)
    return out[:, :length]


def kl_from(teacher: torch.Tensor, student: torch.Tensor) -> torch.Tensor:
    """KL(teacher ‖ student) per row, averaged: logits [N, V] each."""
    return F.kl_div(F.log_softmax(student, -1), F.log_softmax(teacher, -1), log_target=True, reduction="batchmean")


def head_and_teacher_logits(model: te.ModelWithMtp, batch: torch.Tensor):
    """(teacher [B, T, V], first draft [B, T, V], chained draft [B, T−1, V]) logits over windows [B, T+2].

    Row j of the first draft reads (h[j], t[j+1]) at position j and guesses t[j+2]: its teacher
    is the main model's distribution there (its logits at position j+1, teacher row j). Row i
    of the chained draft reads (the head's own output at i, t[i+2]) at position i+1 and guesses
    t[i+3]: teacher row i+1.
    """
    mtp = model.mtp
    length = batch.shape[1] - 2  # T
    with torch.no_grad():
        states = model.lm.model(input_ids=batch[:, :length + 1], use_cache=False).last_hidden_state  # [B, T+1, H]
        teacher = model.lm.lm_head(states[:, 1:])  # [B, T, V]: row m is the main model's prediction after t[m+1]
    hidden = states[:, :length]  # [B, T, H]: h[j], after the final norm
    embed = model.lm.model.embed_tokens
    first = mtp(embed(batch[:, 1:length + 1]), hidden)  # [B, T, H]: after mtp.norm

    # The chained rows go after the committed ones, in one sequence of 2T − 1 rows: committed
    # pair j at position j sees pairs ≤ j; chained row i at position i + 1 sees committed pairs ≤ i
    # and itself (never another chained row: a draft's pair is never committed).
    batch_size, rows = batch.shape[0], 2 * length - 1
    # (The committed rows' fc again: in this sequence their keys and values are what the chained rows read.)
    x_first = mtp.fc(torch.cat([mtp.pre_fc_norm_embedding(embed(batch[:, 1:length + 1])),
                                mtp.pre_fc_norm_hidden(hidden)], dim=-1))  # [B, T, H]
    x_chained = mtp.fc(torch.cat([mtp.pre_fc_norm_embedding(embed(batch[:, 2:length + 1])),
                                  mtp.pre_fc_norm_hidden(first[:, :-1])], dim=-1))  # [B, T−1, H]
    x = torch.cat([x_first, x_chained], dim=1)  # [B, 2T−1, H]
    positions = torch.cat([torch.arange(length), torch.arange(1, length)])  # [2T−1]
    allowed = torch.zeros(rows, rows, dtype=torch.bool)
    allowed[:length, :length] = torch.ones(length, length, dtype=torch.bool).tril()
    allowed[length:, :length - 1] = torch.ones(length - 1, length - 1, dtype=torch.bool).tril()
    allowed[length:, length:] = torch.eye(length - 1, dtype=torch.bool)
    mask = torch.zeros(rows, rows).masked_fill(~allowed, float("-inf"))[None, None]  # [1, 1, 2T−1, 2T−1]
    cos_sin = mtp.rotary_emb(x, positions[None].expand(batch_size, -1))
    chained = mtp.norm(mtp.layers[0](x, position_embeddings=cos_sin, attention_mask=mask)[:, length:])  # [B, T−1, H]
    return teacher, model.lm.lm_head(first), model.lm.lm_head(chained)


def distillation_losses(model: te.ModelWithMtp, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(first draft's loss, chained draft's loss) over windows [B, T+2]: KL from the main model to the head."""
    teacher, first, chained = head_and_teacher_logits(model, batch)
    return kl_from(teacher.flatten(0, 1), first.flatten(0, 1)), kl_from(teacher[:, 1:].flatten(0, 1),
                                                                          chained.flatten(0, 1))


def distil(model: te.ModelWithMtp, windows: torch.Tensor, args) -> dict:
    """AdamW on the head alone, cosine learning rate over a time or step budget."""
    optimizer = torch.optim.AdamW(model.mtp.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.0)
    rng = random.Random(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    start, step, smooth, pool = time.monotonic(), 0, None, []
    while True:
        elapsed = time.monotonic() - start
        progress = step / args.steps if args.steps else elapsed / (args.minutes * 60)
        if progress >= 1.0:
            break
        for group in optimizer.param_groups:
            group["lr"] = args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))
        picked = windows[torch.randint(0, len(windows), (args.batch_size,), generator=generator)]
        if rng.random() < args.own_text:
            if len(pool) < args.batch_size:  # continue a few prompts at a time: generate is batched
                prompts = windows[torch.randint(0, len(windows), (4 * args.batch_size,), generator=generator)]
                pool += list(own_text(model, prompts[:, :args.prompt_tokens], windows.shape[1]))
            picked = torch.stack([pool.pop() for _ in range(args.batch_size)])
        model.mtp.train()
        first, chained = distillation_losses(model, picked)
        loss = first + args.chained_weight * chained
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.mtp.parameters(), 1.0)
        optimizer.step()
        step += 1
        values = torch.stack([first, chained]).detach()
        smooth = values if smooth is None else 0.95 * smooth + 0.05 * values
        if step % args.log_every == 0 or step == 1:
            print(f"step {step:5d} | {(time.monotonic() - start) / 60:5.1f} min | KL first draft {smooth[0]:.3f}, "
                  f"chained {smooth[1]:.3f}", flush=True)
    kl = [None, None] if smooth is None else smooth.tolist()  # (None: a budget of no steps)
    return {"steps": step, "seconds": time.monotonic() - start, "final_kl_first": kl[0], "final_kl_chained": kl[1]}


def measure(model: te.ModelWithMtp, valid_windows: torch.Tensor, prompts: list[list[int]]) -> dict:
    """The model card's MTP figures: held-out perplexity, top-1, agreement, greedy acceptance."""
    code = te.evaluate(model, valid_windows, 16)
    return {"mtp_ppl": code["mtp_ppl"], "mtp_top1": code["mtp_top1"], "mtp_agree": code["mtp_agree"],
            **te.speculative_acceptance(model, prompts, new_tokens=96)}


def write_head(model: te.ModelWithMtp, stored: dict[str, torch.Tensor], source: Path, out: Path) -> None:
    """model.safetensors with the head's new tensors (bf16, as stored) and every other tensor as it was."""
    head = {f"mtp.{name}": t.detach().to(torch.bfloat16).contiguous() for name, t in model.mtp.state_dict().items()
            if f"mtp.{name}" in stored}  # (rotary buffers are not stored)
    if set(head) != {name for name in stored if name.startswith("mtp.")}:
        raise SystemExit("the head's tensors are not the checkpoint's mtp.* tensors")
    with safetensors.safe_open(str(source / "model.safetensors"), "pt") as f:
        metadata = f.metadata()
    tensors = {**stored, **head}
    out.mkdir(parents=True, exist_ok=True)
    for path in source.iterdir():
        if path.is_file() and path.name != "model.safetensors" and source.resolve() != out.resolve():
            (out / path.name).write_bytes(path.read_bytes())
    # Written beside it, then renamed over it: the file being replaced may be the one ``stored``
    # was read from (the default, in place), and an interrupted run leaves the old file whole.
    partial = out / "model.safetensors.partial"
    safetensors.torch.save_file(tensors, str(partial), metadata=metadata)
    partial.chmod(0o644)
    os.replace(partial, out / "model.safetensors")
    written = safetensors.torch.load_file(str(out / "model.safetensors"))
    for name, tensor in stored.items():
        if not name.startswith("mtp.") and not torch.equal(written[name], tensor):
            raise SystemExit(f"{name} changed on writing: only mtp.* may")


def update_card(card: Path, before: dict, after: dict, run: dict, args) -> None:
    """The card's four MTP rows measured again, and a section on this run (replaced if there is one)."""
    text = card.read_text()
    rows = {
        "MTP perplexity for t[j+2]": f"{after['mtp_ppl']:.2f}",
        "MTP top-1 accuracy for t[j+2]": f"{after['mtp_top1']:.1%}",
        "MTP argmax = main model's greedy next-next token (teacher-forced)": f"{after['mtp_agree']:.1%}",
    }
    for label, value in rows.items():
        text, count = re.subn(rf"^\| {re.escape(label)} \| [^|\n]* \|$", f"| {label} | {value} |", text, flags=re.M)
        if count != 1:
            raise SystemExit(f"{card}: no row '{label}' to update")
    text, count = re.subn(r"^(\| MTP draft = [^|\n]*\| )[^|\n]*( \|)$",
                          rf"\g<1>{after['acceptance']:.1%} ({after['drafts']:,} drafts)\g<2>", text, flags=re.M)
    if count != 1:
        raise SystemExit(f"{card}: no 'MTP draft =' row to update")
    run_text = textwrap.fill(
        f"After training, the MTP head alone was distilled toward the main model (frozen, unchanged) by "
        f"`tools/distill_mtp.py`: {run['steps']:,} steps of {args.batch_size} windows of {args.seq_len} tokens in "
        f"{run['seconds'] / 60:.1f} minutes, KL divergence from the main model's next-token distribution to the "
        f"head's, on corpus windows and ({args.own_text:.0%} of the batches) on the main model's own greedy "
        f"continuations of corpus prompts, for the first draft and (weight {args.chained_weight}) for a second "
        f"draft chained on the head's own output; AdamW, peak lr {args.lr}, cosine to 10%, seed {args.seed}. The "
        f"MTP rows of the evaluation below are measured after it.", width=94)
    section = f"""{CARD_SECTION}

{run_text}

| held-out, bf16 | before | after |
|---|---|---|
| MTP perplexity for t[j+2] | {before['mtp_ppl']:.2f} | {after['mtp_ppl']:.2f} |
| MTP top-1 accuracy for t[j+2] | {before['mtp_top1']:.1%} | {after['mtp_top1']:.1%} |
| MTP argmax = main model's greedy next-next token (teacher-forced) | {before['mtp_agree']:.1%} | {after['mtp_agree']:.1%} |
| greedy one-draft acceptance, per position | {before['acceptance']:.1%} | {after['acceptance']:.1%} |

The head is trained toward the main model's guesses rather than the corpus's tokens: what
counts for a draft head is agreement with the model that verifies it.

"""
    # The card's Reproduce block gets this step after the training command (replacing an earlier run's line).
    # (By step count: a schedule by step, close to a timed run's, not the same.)
    command = f"python tools/distill_mtp.py --steps {run['steps']}   # then the MTP head alone (MTP head distillation)"
    text = re.sub(r"^python tools/distill_mtp\.py .*\n", "", text, flags=re.M)
    text, count = re.subn(r"(## Reproduce\n\n```\n(?:.*\n)*?python tools/train_embedded\.py.*\n)", rf"\g<1>{command}\n",
                          text)
    if count != 1:
        raise SystemExit(f"{card}: no Reproduce block with the training command to add this step to")
    if CARD_SECTION in text:  # a later run replaces the section an earlier one wrote
        text = re.sub(rf"{re.escape(CARD_SECTION)}\n.*?(?=^## )", section, text, flags=re.S | re.M)
    else:
        text = text.replace("## Evaluation (held-out", section + "## Evaluation (held-out", 1)
    card.write_text(text)


def argument_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=checkpoint_folder, default=REPO / "minqwen" / "embedded",
                        help="a checkpoint of the embedded model's kind with an MTP head (default: the embedded model)")
    parser.add_argument("--out", type=output_folder, default=None,
                        help="where to write the checkpoint with the distilled head (default: --model, in place)")
    parser.add_argument("--corpus", type=output_folder, default=REPO / "scratch" / "corpus",
                        help="the corpus tools/build_corpus.py built (default scratch/corpus)")
    parser.add_argument("--minutes", type=real_number(0), default=20.0, help="wall-clock budget")
    parser.add_argument("--steps", type=whole_number(0), default=0,
                        help="a step budget instead of --minutes (0: use --minutes)")
    parser.add_argument("--seq-len", type=whole_number(10), default=256, help="tokens per window")
    parser.add_argument("--batch-size", type=whole_number(1), default=8, help="windows per step")
    parser.add_argument("--lr", type=real_number(0, above_minimum=True), default=5e-4, help="peak learning rate")
    parser.add_argument("--own-text", type=real_number(0, 1), default=0.5,
                        help="share of batches from the main model's own greedy continuations (default 0.5)")
    parser.add_argument("--prompt-tokens", type=whole_number(1), default=32,
                        help="corpus tokens each greedy continuation starts from")
    parser.add_argument("--chained-weight", type=real_number(0), default=0.5,
                        help="weight of the second, chained draft's loss (0: first drafts only)")
    parser.add_argument("--seed", type=whole_number(0, 2**63 - 1), default=0, help="batches and prompts")
    parser.add_argument("--threads", type=whole_number(1), default=2, help="torch threads")
    parser.add_argument("--log-every", type=whole_number(1), default=25, help="steps between loss lines")
    return parser


def main(argv=None) -> None:
    args = argument_parser().parse_args(argv)
    out = args.out or args.model
    if args.seq_len + 2 <= args.prompt_tokens:
        raise SystemExit(f"--prompt-tokens {args.prompt_tokens} leaves nothing to continue in a window of "
                         f"--seq-len {args.seq_len}")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    model, stored = load_model(args.model)
    tokenizer = Tokenizer.from_file(str(args.model / "tokenizer.json"))
    if not (args.corpus / "manifest.json").is_file():
        raise SystemExit(f"{args.corpus}: no corpus there; build it with python tools/build_corpus.py --out {args.corpus}")
    manifest = json.loads((args.corpus / "manifest.json").read_text())
    render = te.ChatRenderer(te.load_chat_template())
    # The training stream as tools/train_embedded.py builds it (its default dialog copies, shuffled by seed).
    dialog_copies = te.argument_parser().get_default("dialog_copies")
    code, dialog = te.encode_documents(tokenizer, te.load_documents(args.corpus, "train", manifest), render,
                                       dialog_copies)
    documents = code + dialog
    random.Random(args.seed).shuffle(documents)
    windows = te.windows([t for doc in documents for t in doc], args.seq_len + 2, args.seq_len)
    valid_code, _ = te.encode_documents(tokenizer, te.load_documents(args.corpus, "valid", manifest), render, 1)
    valid_windows = te.windows([t for doc in valid_code for t in doc], args.seq_len + 2, args.seq_len)
    # The prompts tools/train_embedded.py measures acceptance on, so that before and after compare.
    prompts = [tokenizer.encode(p).ids for p in te.PROMPTS] + [doc[:32] for doc in valid_code[:4]]

    te.round_to_bf16(model.mtp)  # (already bf16 values: stored so)
    before = measure(model, valid_windows, prompts)
    print("before:", json.dumps(before), flush=True)
    run = distil(model, windows, args)
    te.round_to_bf16(model.mtp)  # measured as it will be stored
    after = measure(model, valid_windows, prompts)
    print("after:", json.dumps(after), json.dumps(run), flush=True)
    write_head(model, stored, args.model, out)
    if (out / "MODEL_CARD.md").is_file():
        update_card(out / "MODEL_CARD.md", before, after, run, args)
    print(f"wrote {out}", flush=True)


if __name__ == "__main__":
    main()
