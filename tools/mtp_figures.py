"""Figures for self-speculative decoding with the MTP head: what a draft and a verify cost, and what they buy.

    python tools/mtp_figures.py real        # the real Qwen3.5-0.8B shape, random weights
    python tools/mtp_figures.py embedded    # the embedded model (trained with its MTP head)
    python tools/mtp_figures.py split       # where a verify's time goes beyond a step's
    python tools/mtp_figures.py depth       # the embedded model's widths at 4-16 layers

Every cost is relative to a one-token decode step measured in the same run, on the same
cache (after a 16-token prompt), median of ``--repeats`` runs (7 unless told):

* c_verify(n): one forward of the main model over n positions — what a verify of n − 1
  drafts costs — including its LM head over all n rows and the rollback;
* c_draft: one draft step — the MTP layer over one position (the commit of an accepted
  pair; its fc, attention and MLP) plus the LM head for the draft and the pick (penalties,
  argmax). A cycle whose draft is accepted commits two pairs, not one, so the predictions
  below are a little optimistic. Measured with the whole 248k-row LM head and with the draft
  vocabulary speculation uses by default (minqwen.mtp.draft_rows: 32k rows there);
* predicted speedup = (1 + accepted per verify) ÷ (c_verify + c_draft): with k = 1 draft
  per verify and per-draft acceptance a, (1 + a) ÷ (c_verify(2) + c_draft); with k = 2,
  (1 + a + a²) ÷ (c_verify(3) + 2·c_draft).

"real" and "split" read the real-shape checkpoint (``--checkpoint``, default
``scratch/qwen3.5-0.8b-random``), which they do not build: make it first with
``python tools/real_shape.py make`` (tools/bench.py also makes it). "real" builds (once)
``scratch/qwen3.5-0.8b-random-mtp``: that checkpoint's files linked, plus a random MTP head —
never committed. Random weights accept nothing, so the measured speculative tokens/s there is
the worst case, a check on the cost model.

"embedded" measures decode tokens/s (63 new tokens after the first ÷ their time, greedy or,
with ``--sampling config``, the model's generation_config.json sampling with seeds 0-2; Numba
warm; the median over every prompt's 3 runs) without and with speculation, the share
of drafts accepted and the tokens each verify emits, on prompts from standard-library files
that the embedded model's corpus held out (tools/build_corpus.py). With k ≥ 2 drafts the
share accepted is not the cost model's per-draft a (drafts after a rejection count as not
accepted); tokens per verify is what the speedup formula's numerator means.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

import minqwen  # noqa: E402
from argtypes import checkpoint_folder, real_number, whole_number  # noqa: E402
from minqwen.errors import MinqwenError  # noqa: E402
from minqwen.generate import GenerationStats, generate_ids  # noqa: E402
from minqwen.mtp import (  # noqa: E402
    MtpCache,
    SpeculativeStats,
    draft_cost_estimate,
    draft_logits,
    draft_rows,
    keep_first,
    load_mtp,
    mtp_layer,
    speculative_generate,
    verify,
)
from minqwen.sampling import SamplingParams, apply_penalties  # noqa: E402
from minqwen.threads import one_blas_thread  # noqa: E402


def machine_line() -> str:
    load = os.getloadavg()
    return f"{os.cpu_count()} cores, load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}"


def timed(function, clocks: dict, name: str):
    """``function``, adding the seconds each call takes to ``clocks[name]`` (a clock read before and after)."""
    def run(*args, **kwargs):
        start = time.perf_counter()
        try:
            return function(*args, **kwargs)
        finally:
            clocks[name] += time.perf_counter() - start
    return run


# ==================================================================== the real shape


def real_shape(checkpoint: Path, dtype: str, repeats: int) -> None:
    from make_mtp_fixtures import with_random_mtp

    folder = ROOT / "scratch" / (checkpoint.name + "-mtp")
    links = [path for path in folder.iterdir() if path.is_symlink()] if folder.is_dir() else []
    if any(link.resolve().parent != checkpoint.resolve() for link in links):  # a copy of another checkpoint of that name
        shutil.rmtree(folder)  # (the links only: rmtree does not follow them)
    hiding = folder / "model.safetensors"  # a link an earlier version made: read alone, it hides mtp.safetensors
    stale = hiding.is_symlink()
    if stale:
        hiding.unlink()
    if stale or not (folder / "mtp.safetensors").is_file() or not (folder / "model.safetensors.index.json").is_file():
        with_random_mtp(checkpoint, folder)
    model = minqwen.load(folder, dtype=dtype)
    head = load_mtp(folder, model)
    if head is None:
        raise SystemExit(f"{folder} has no mtp.* tensors that minqwen can see: delete the folder and run again")
    c = model.config
    rng = np.random.default_rng(0)
    prompt = rng.integers(0, c.vocab_size, size=16)
    cache = model.new_cache()
    hidden = model.hidden_states(prompt, cache)
    mtp = MtpCache(model, head)
    mtp.commit(model, head, hidden, list(prompt[1:]) + [1])
    tokens = [int(t) for t in rng.integers(0, c.vocab_size, size=3)]
    params = SamplingParams(repetition_penalty=1.05)  # a pick with penalties, as generation configs have
    print(f"{checkpoint.name} with a random MTP head, {dtype}; {machine_line()}")

    h = hidden[-1]
    seen = list(prompt)

    def decode_step(branch):
        model.forward(tokens[:1], branch, last_only=True)

    def verify_and_roll_back(n):
        def run(branch):
            verify(model, branch, tokens[:n])
            keep_first(branch, cache.position, 1)
        return run

    def layer(kv):
        mtp_layer(model, head, 0, h[None], [1], kv, cache.position)

    def pick(vocab):
        def run(_):
            row = apply_penalties(draft_logits(model, h, vocab, seen), seen, [], params)
            return int(np.argmax(row))
        return run

    # Each probe: (prepare a fresh state, untimed; the timed run). Run round-robin, so that a
    # busy machine slows every probe alike and the ratios stay meaningful. The draft and verify
    # probes run with BLAS as speculative_generate sets it.
    quiet_blas = model.numba_multiplies(1)
    probes = {
        "step": (cache.copy, decode_step, False),
        "verify2": (cache.copy, verify_and_roll_back(2), quiet_blas),
        "verify3": (cache.copy, verify_and_roll_back(3), quiet_blas),
        "layer": (lambda: mtp.layers[0].copy(), layer, quiet_blas),
        "head_all": (lambda: None, pick(None), quiet_blas),
        "head_subset": (lambda: None, pick(draft_rows(c.vocab_size)), quiet_blas),
    }
    times = {name: [] for name in probes}
    for repeat in range(repeats + 1):  # the first round warms every kernel and is dropped
        for name, (setup, run, one_thread) in probes.items():
            state = setup()
            with one_blas_thread(one_thread):
                start = time.perf_counter()
                run(state)
                elapsed = time.perf_counter() - start
            if repeat:
                times[name].append(elapsed)
    t = {name: statistics.median(values) for name, values in times.items()}
    step = t["step"]
    c_verify = {2: t["verify2"] / step, 3: t["verify3"] / step}
    print(f"  decode step:            {step * 1e3:7.1f} ms  (1.00)")
    for n in (2, 3):
        print(f"  verify of {n} positions:  {t[f'verify{n}'] * 1e3:7.1f} ms  c_verify({n}) = {c_verify[n]:.3f}")
    print(f"  MTP layer, 1 position:  {t['layer'] * 1e3:7.1f} ms  ({t['layer'] / step:.3f})")
    print(f"  draft head + pick, all {c.vocab_size} ids: {t['head_all'] * 1e3:7.1f} ms  ({t['head_all'] / step:.3f})")
    print(f"  draft head + pick, {draft_rows(c.vocab_size)} ids:  {t['head_subset'] * 1e3:7.1f} ms  ({t['head_subset'] / step:.3f})")
    c_draft_full = (t["layer"] + t["head_all"]) / step
    c_draft = (t["layer"] + t["head_subset"]) / step
    print(f"  c_draft = {c_draft:.3f} (with the whole LM head: {c_draft_full:.3f}); by weight bytes: "
          f"{draft_cost_estimate(model, head):.3f} ({draft_cost_estimate(model, head, None):.3f})")
    for a in (0.6, 0.8):
        k1 = (1 + a) / (c_verify[2] + c_draft)
        k2 = (1 + a + a * a) / (c_verify[3] + 2 * c_draft)
        k1_full = (1 + a) / (c_verify[2] + c_draft_full)
        print(f"  predicted speedup at acceptance {a}: k=1 {k1:.2f}x, k=2 {k2:.2f}x "
              f"(k=1 drafting over the whole vocabulary: {k1_full:.2f}x)")

    # The cost model against a measurement: random drafts are always rejected.
    ids = [int(t) for t in prompt]
    plain, spec = GenerationStats(), SpeculativeStats()
    list(generate_ids(model, ids, max_new_tokens=16, stats=plain))
    list(speculative_generate(model, head, ids, max_new_tokens=16, stats=spec, draft_tokens=1))
    ratio = spec.decode_tokens_per_second / plain.decode_tokens_per_second
    print(f"  measured, nothing accepted: plain {plain.decode_tokens_per_second:.2f} tok/s, speculative "
          f"{spec.decode_tokens_per_second:.2f} tok/s (ratio {ratio:.2f}, model: {1 / (c_verify[2] + c_draft):.2f}); "
          f"acceptance {spec.acceptance_rate:.2f}")


# ==================================================================== where the time goes


def split(checkpoint: Path, dtype: str, rounds: int) -> None:
    """A decode step against a two-position verify, each split into products, recurrence and the rest.

    Every call of the few-row kernel's wrapper and of the Gated DeltaNet recurrence is timed
    (a clock read before and after: ~0.1 µs each, against calls of 0.1–2 ms); the rest is
    the layer code between them. A float32 decode step's recurrence runs inside
    deltanet.decode_step, with the conv and norms around it in the same compiled pass: its
    "recurrence" is that whole pass. Step and verify alternate on one live cache, each feeding
    one token, for ``rounds`` rounds; medians.
    """
    import minqwen.deltanet as deltanet
    import minqwen.linear as linear_module

    model = minqwen.load(checkpoint, dtype=dtype)
    cache = model.new_cache()
    model.hidden_states(np.random.default_rng(0).integers(0, model.config.vocab_size, size=16), cache)
    tokens = [5, 7]
    clocks = {"products": 0.0, "recurrence": 0.0}

    def step():
        model.forward(tokens[:1], cache, last_only=True)

    def verify_two():
        start = cache.position
        with one_blas_thread(model.numba_multiplies(2)):
            verify(model, cache, tokens)
            keep_first(cache, start, 1)

    originals = linear_module.linear_few_rows, deltanet.recurrent_gated_delta_rule, deltanet.decode_step
    linear_module.linear_few_rows = timed(originals[0], clocks, "products")
    deltanet.recurrent_gated_delta_rule = timed(originals[1], clocks, "recurrence")
    deltanet.decode_step = timed(originals[2], clocks, "recurrence")
    rows = {"decode step": [], "verify of 2": []}
    try:
        for repeat in range(rounds + 1):  # the first round warms every kernel and is dropped
            for name, run in (("decode step", step), ("verify of 2", verify_two)):
                clocks["products"] = clocks["recurrence"] = 0.0
                start = time.perf_counter()
                run()
                total = time.perf_counter() - start
                if repeat:
                    rest = total - clocks["products"] - clocks["recurrence"]
                    rows[name].append((total, clocks["products"], clocks["recurrence"], rest))
    finally:
        linear_module.linear_few_rows, deltanet.recurrent_gated_delta_rule, deltanet.decode_step = originals
    print(f"{checkpoint.name}, {dtype}; {machine_line()}; medians of {rounds} alternated rounds")
    for name, values in rows.items():  # each column's median, so the parts need not add up exactly
        total, products, recurrence, rest = (statistics.median(column) * 1e3 for column in zip(*values))
        print(f"  {name}: {total:7.2f} ms; products {products:7.2f}, recurrence {recurrence:5.2f}, the rest {rest:6.2f}")


# ==================================================================== the embedded model


def held_out_prompts(tokenizer, count: int, length: int) -> list[tuple[str, list[int]]]:
    """The first ``length`` tokens of ``count`` standard-library files the embedded model's corpus held out."""
    from build_corpus import in_validation, stdlib_documents

    prompts = []
    for doc in stdlib_documents():
        if in_validation(doc["name"]):
            ids = tokenizer.encode(doc["text"])
            if len(ids) >= length:
                prompts.append((doc["name"], ids[:length]))
        if len(prompts) == count:
            break
    return prompts


def embedded(folder: Path, dtype: str, new_tokens: int, count: int, sampling: str = "greedy") -> None:
    from minqwen.tokenizer import Tokenizer

    model = minqwen.load(folder, dtype=dtype)
    head = load_mtp(folder, model)
    tokenizer = Tokenizer(folder)
    prompts = held_out_prompts(tokenizer, count, 48)
    params = SamplingParams()  # greedy
    if sampling == "config":
        params = SamplingParams.from_generation_config(tokenizer.generation_config,
                                                       str(tokenizer.generation_config_path))
    print(f"embedded model {folder.name}, {dtype}, {sampling if sampling == 'greedy' else params}; {machine_line()}")
    print(f"  held-out prompts: {', '.join(name for name, _ in prompts)}")
    eos = tuple(model.config.eos_token_id)
    variants = (0, 1, 2, 3)  # drafts per verify; 0 = plain decoding

    def once(k, ids, seed=0):
        stats = SpeculativeStats() if k else GenerationStats()
        if k:
            out = list(speculative_generate(model, head, ids, params, max_new_tokens=new_tokens, stop_ids=eos,
                                            seed=seed, stats=stats, draft_tokens=k))
        else:
            out = list(generate_ids(model, ids, params, max_new_tokens=new_tokens, stop_ids=eos, seed=seed,
                                    stats=stats))
        return out, stats

    for k in variants:  # warm Numba for every path
        once(k, prompts[0][1])
    rates = {k: [] for k in variants}
    accepted = {k: 0 for k in variants}
    drafted = {k: 0 for k in variants}
    emitted = {k: 0 for k in variants}  # tokens after each prompt's first, which every verify emits
    verifies = {k: 0 for k in variants}
    for _, ids in prompts:
        outputs = {}
        for repeat in range(3):  # round-robin, median of 3 per prompt and variant
            for k in variants:
                outputs[k], stats = once(k, ids, seed=repeat)
                rates[k].append(stats.decode_tokens_per_second)
                if k:  # (greedy, every repeat counts the same drafts again)
                    accepted[k] += stats.accepted
                    drafted[k] += stats.drafted
                    emitted[k] += stats.generated_tokens - 1
                    verifies[k] += stats.verifies
        if params.greedy:  # (sampled, the same distribution but other draws)
            assert all(outputs[k] == outputs[0] for k in variants), "greedy speculation must equal plain greedy"
    plain = statistics.median(rates[0])
    print(f"  plain decode:        {plain:7.1f} tok/s   ({new_tokens} new tokens per prompt, {sampling}, "
          f"median over {len(prompts)} prompts x 3 runs)")
    for k in variants[1:]:
        rate = statistics.median(rates[k])
        acceptance = accepted[k] / drafted[k] if drafted[k] else 0.0
        per_verify = emitted[k] / verifies[k] if verifies[k] else 0.0
        print(f"  speculative k = {k}:   {rate:7.1f} tok/s  ({rate / plain:.2f}x)  drafts accepted {acceptance:.3f}, "
              f"{per_verify:.2f} tokens per verify")


# ==================================================================== depth: when the MTP layer is small enough


def depth(layer_counts: list[int], acceptance: float, repeats: int, out: Path = ROOT / "scratch") -> None:
    """What one draft per verify would buy at the embedded model's widths, as the model gets deeper.

    The embedded model's MTP layer is one layer beside four, and its LM head a quarter of its
    weights: a cycle costs too many steps for 1.3x. Speculation drafts with its default draft
    vocabulary (minqwen.mtp.draft_rows: 1,024 of these models' 4,096 ids). For each N: a random checkpoint with the
    embedded model's config but N decoder layers (every fourth one full attention) and a random
    MTP head, in ``out`` (scratch/, never committed). Random drafts are never accepted, so every cycle
    emits one token, and plain ÷ speculative time per token is what a cycle costs in decode
    steps — measured in the decode loops themselves (64 new tokens after a 16-token prompt,
    alternated, medians), where the embedded model's small products find their weights in the
    caches (the probes of ``real`` run each in a cold cache). Predicted speedup at acceptance
    a: (1 + a) ÷ that cost; a little optimistic, since an accepted draft's cycle commits two
    pairs to the MTP layer instead of one. The parts are timed call by call, as in ``split``.
    """
    import json

    import minqwen.mtp as mtp
    import real_shape as builder
    from make_mtp_fixtures import with_random_mtp

    embedded_config = json.loads((ROOT / "minqwen" / "embedded" / "config.json").read_text())
    text = {key: value for key, value in embedded_config.items() if key not in ("architectures", "dtype", "model_type")}
    clocks = {"verify": 0.0, "commit": 0.0, "draft": 0.0}

    originals = mtp.verify, mtp.draft, mtp.MtpCache.commit
    print(f"the embedded model's widths, random weights, float32; {machine_line()}; medians of {repeats}")
    try:
        mtp.verify, mtp.draft = timed(originals[0], clocks, "verify"), timed(originals[1], clocks, "draft")
        mtp.MtpCache.commit = timed(originals[2], clocks, "commit")
        for n in layer_counts:
            layer_types = ["full_attention" if (i + 1) % 4 == 0 else "linear_attention" for i in range(n)]
            config = {**text, "num_hidden_layers": n, "layer_types": layer_types}
            folder = builder.write_random(Path(out) / f"embedded-depth-{n}", config)
            folder = with_random_mtp(folder, folder.with_name(folder.name + "-mtp"))
            model = minqwen.load(folder, dtype="float32")
            head = load_mtp(folder, model)
            prompt = [int(t) for t in np.random.default_rng(0).integers(0, model.config.vocab_size, size=16)]

            def once(speculate):
                stats = SpeculativeStats() if speculate else GenerationStats()
                if speculate:
                    list(speculative_generate(model, head, prompt, max_new_tokens=64, stats=stats, draft_tokens=1))
                else:
                    list(generate_ids(model, prompt, max_new_tokens=64, stats=stats))
                return stats

            once(False)  # warm every kernel
            once(True)
            clocks.update(verify=0.0, commit=0.0, draft=0.0)
            rates = {False: [], True: []}
            per_verify = []  # tokens a cycle emits: 1 while random drafts are all rejected
            speculating = 0.0  # seconds: the speculative runs, prefill and decode
            for _ in range(repeats):
                for speculate in (False, True):
                    stats = once(speculate)
                    rates[speculate].append(stats.decode_tokens_per_second)
                    if speculate:
                        speculating += stats.prefill_seconds + stats.decode_seconds
                        per_verify.append(stats.tokens_per_verify)
            plain, speculative = statistics.median(rates[False]), statistics.median(rates[True])
            cycle = plain / speculative * statistics.median(per_verify)  # decode steps per cycle
            # Each part's share of the speculative runs' time, in steps. (The prompt's commit
            # counts too: one call against 63 cycles' worth.)
            shares = {name: seconds / speculating * cycle for name, seconds in clocks.items()}
            parts = ", ".join(f"{name} {share:.2f}" for name, share in shares.items())
            print(f"  {n:3d} layers: plain {plain:6.0f} tok/s, speculative {speculative:6.0f}; a cycle costs "
                  f"{cycle:.2f} steps ({parts}, the rest {cycle - sum(shares.values()):.2f}); "
                  f"predicted at acceptance {acceptance:g}: {(1 + acceptance) / cycle:.2f}x")
    finally:
        mtp.verify, mtp.draft, mtp.MtpCache.commit = originals


def real_shape_checkpoint(text: str) -> Path:
    """checkpoint_folder, saying how to make the real-shape checkpoint when it is missing."""
    try:
        return checkpoint_folder(text)
    except argparse.ArgumentTypeError as e:
        raise argparse.ArgumentTypeError(f"{e} (the real-shape checkpoint: make it with "
                                         f"`python tools/real_shape.py make`)") from None


def main() -> int:
    threads_help = "BLAS and Numba threads (default: the physical cores)"
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=whole_number(1), help=threads_help)
    # --threads after the subcommand too; SUPPRESS leaves the value given before it, if any, alone
    after = argparse.ArgumentParser(add_help=False)
    after.add_argument("--threads", type=whole_number(1), default=argparse.SUPPRESS, help=threads_help)
    sub = parser.add_subparsers(dest="which", required=True)
    checkpoint_help = "the real-shape checkpoint (default scratch/qwen3.5-0.8b-random; not built here)"
    real = sub.add_parser("real", parents=[after], help="costs and predicted speedups on the real 0.8B shape")
    real.add_argument("--checkpoint", type=real_shape_checkpoint, default=str(ROOT / "scratch" / "qwen3.5-0.8b-random"),
                      help=checkpoint_help)
    real.add_argument("--dtype", choices=["float32", "bfloat16"], default="bfloat16",
                      help="how the weights are kept in memory (default bfloat16)")
    real.add_argument("--repeats", type=whole_number(1), default=7, help="runs per cost; medians (default 7)")
    parts = sub.add_parser("split", parents=[after], help="where a verify's time goes beyond a step's")
    parts.add_argument("--checkpoint", type=real_shape_checkpoint,
                       default=str(ROOT / "scratch" / "qwen3.5-0.8b-random"), help=checkpoint_help)
    parts.add_argument("--dtype", choices=["float32", "bfloat16"], default="bfloat16",
                       help="how the weights are kept in memory (default bfloat16)")
    parts.add_argument("--rounds", type=whole_number(1), default=20,
                       help="step/verify rounds, alternated; medians (default 20)")
    emb = sub.add_parser("embedded", parents=[after],
                         help="decode tokens/s with and without speculation on the embedded model")
    emb.add_argument("--model", type=checkpoint_folder, default=ROOT / "minqwen" / "embedded",
                     help="a checkpoint with an MTP head (default: the embedded model)")
    emb.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                     help="how the weights are kept in memory (default float32)")
    # at least 2 new tokens: tokens/s is counted after the first
    emb.add_argument("--new-tokens", type=whole_number(2), default=64,
                     help="tokens generated per prompt; tokens/s counts those after the first (default 64)")
    emb.add_argument("--prompts", type=whole_number(1), default=6,
                     help="held-out standard-library prompts, 3 runs each (default 6)")
    emb.add_argument("--sampling", choices=["greedy", "config"], default="greedy",
                     help="greedy (default), or the sampling of the model's generation_config.json (seeds 0-2)")
    deep = sub.add_parser("depth", parents=[after],
                          help="the embedded model's widths at more layers: what a cycle costs")
    deep.add_argument("--layers", type=whole_number(4), nargs="+", default=[4, 8, 12, 16],
                      help="decoder layer counts to build and measure (default 4 8 12 16)")
    deep.add_argument("--acceptance", type=real_number(0, 1), default=0.84,
                      help="per-draft acceptance to predict at (default 0.84: the embedded model's, greedy, drafting "
                           "over the whole vocabulary; 0.82 with the default 1,024-id draft head)")
    deep.add_argument("--repeats", type=whole_number(1), default=7, help="runs per layer count; medians (default 7)")
    args = parser.parse_args()
    try:
        print(f"threads: {minqwen.set_threads(args.threads)}")
        if args.which == "real":
            real_shape(args.checkpoint, args.dtype, args.repeats)
        elif args.which == "split":
            split(args.checkpoint, args.dtype, args.rounds)
        elif args.which == "depth":
            depth(args.layers, args.acceptance, args.repeats)
        else:
            embedded(args.model, args.dtype, args.new_tokens, args.prompts, args.sampling)
    except MinqwenError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
