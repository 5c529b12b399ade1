"""Run one checkpoint in minqwen and in llama.cpp (a GGUF conversion of it), and say whether they agree.

    python tools/compare_with_llama_cpp.py --model DIR --gguf FILE [--tokens N] [--prompt-tokens P]
                                           [--atol A] [--seed S] [--threads T]

A second engine, written independently of transformers and of minqwen, is a check on both:
where all three agree, a port has three witnesses instead of one. N random token ids go
through each engine the same way: the first P as one prompt (a batched forward: one
multi-token call in minqwen, its Gated DeltaNet in the default recurrent form; llama.cpp's
batched graph), the rest one token per forward (the
decode step of each, through its own KV cache and recurrent state). Printed: max |Δlogits|
over the prompt positions and over the decode steps, the largest |logit|, and how often the
two argmaxes agree. Exit code 0 when every |Δlogits| ≤ ``--atol``, 1 when not, 2 on an error.

Make the GGUF with ``--outtype f32`` (the commands are in tools/bench.py's docstring; use
``f32`` where it says ``bf16``). llama.cpp's bf16 and f16 products round the activations to
16 bits too, which moves the logits of the random-weight 0.8B model by up to ~2.5 (about what
minqwen's own opt-in ``bf16_prompts`` moves them): a comparison for throughput, not for
correctness. So a GGUF that is not all-F32 is refused. The KV cache is kept F32 as well
(llama.cpp's default is F16). minqwen runs in float32.

Needs llama-cpp-python (``pip install llama-cpp-python==0.3.36``, built from source): it is a
tool of this repository, not a dependency of minqwen. Measured results are in
tools/measurements.md ("A second engine").
"""

from __future__ import annotations

import argparse
import ctypes
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from argtypes import existing_file, real_number, whole_number  # noqa: E402

import minqwen  # noqa: E402
from minqwen.errors import MinqwenError  # noqa: E402

DEFAULT_ATOL = 2e-3  # as tools/compare_with_transformers.py: fp32 round-off at 0.8B size is ~6e-4


def llama_cpp_module():
    try:
        import llama_cpp
    except ImportError:
        raise MinqwenError("llama-cpp-python is not installed: pip install llama-cpp-python==0.3.36 "
                           "(it builds llama.cpp from source, 5-15 minutes on 2 cores)") from None
    return llama_cpp


def open_gguf(path: Path, n_ctx: int, threads: int):
    """llama.cpp on ``path``, every logit kept, F32 KV cache; refuses a GGUF that is not all-F32."""
    llama_cpp = llama_cpp_module()
    try:
        llm = llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, n_threads=threads,
                              n_threads_batch=threads, logits_all=True, verbose=False,
                              type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32)
    except ValueError as e:  # llama-cpp-python's "Failed to load model from file: …"
        raise MinqwenError(f"{path}: llama.cpp cannot load it ({e})") from None
    desc = ctypes.create_string_buffer(256)  # e.g. "qwen35 0.8B all F32", "qwen35 0.8B BF16"
    llama_cpp.llama_model_desc(llm.model, desc, len(desc))
    desc = desc.value.decode()
    if not desc.endswith("all F32"):
        raise MinqwenError(f"{path}: a {desc.split(' ', 2)[-1]} GGUF; llama.cpp then rounds activations to "
                           f"16 bits and its logits are no check on correctness: convert with --outtype f32")
    return llm, desc


def llama_cpp_logits(llm, ids: list[int], n_prompt: int) -> np.ndarray:
    """[N, V] logits: the first n_prompt ids in one eval, then one eval per id."""
    llm.reset()  # empties the KV cache and the recurrent states
    llm.eval(ids[:n_prompt])
    for token in ids[n_prompt:]:
        llm.eval([token])
    return np.array(llm.scores[:len(ids)], dtype=np.float64)  # [N, V]


def minqwen_logits(model, ids: list[int], n_prompt: int) -> np.ndarray:
    """[N, V] logits, split into forwards as llama_cpp_logits splits them."""
    cache = model.new_cache()
    parts = [model.forward(np.array(ids[:n_prompt]), cache)]  # [P, V]
    parts += [model.forward(np.array([token]), cache) for token in ids[n_prompt:]]  # N - P times [1, V]
    return np.concatenate(parts).astype(np.float64)


def compare(model_dir: Path, gguf: Path, n_tokens: int, n_prompt: int, atol: float, seed: int,
            threads: int) -> bool:
    model = minqwen.load(model_dir, dtype="float32")
    vocab = model.config.vocab_size
    llm, desc = open_gguf(gguf, n_ctx=n_tokens, threads=threads)
    for what, theirs, ours in (("vocab_size", llm.n_vocab(), vocab), ("hidden_size", llm.n_embd(), model.config.hidden_size)):
        if theirs != ours:
            raise MinqwenError(f"{gguf}: {what} {theirs}, where {model_dir}/config.json says {ours}: "
                               f"not a conversion of the same checkpoint")
    ids = [int(t) for t in np.random.default_rng(seed).integers(0, vocab, n_tokens)]
    theirs = llama_cpp_logits(llm, ids, n_prompt)
    ours = minqwen_logits(model, ids, n_prompt)
    gap = np.abs(theirs - ours).max(axis=1)  # [N]
    print(f"minqwen {minqwen.__version__} float32 on {model_dir}; llama.cpp ({desc}) on {gguf}")
    print(f"{n_tokens} random ids (seed {seed}): {n_prompt} as one prompt, then {n_tokens - n_prompt} decode steps")
    print(f"  max |Δlogits|, prompt positions: {gap[:n_prompt].max():.2e}")
    if n_tokens > n_prompt:
        print(f"  max |Δlogits|, decode steps:     {gap[n_prompt:].max():.2e}")
    print(f"  largest |logit|: {np.abs(ours).max():.1f}")
    print(f"  argmax agrees at {int((theirs.argmax(1) == ours.argmax(1)).sum())} of {n_tokens} positions")
    agree = bool(gap.max() <= atol)
    print(f"{'AGREE' if agree else 'DISAGREE'}: max |Δlogits| {gap.max():.2e} {'≤' if agree else '>'} atol {atol:g}")
    return agree


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, required=True, help="the checkpoint folder minqwen loads")
    parser.add_argument("--gguf", type=existing_file, required=True, help="an all-F32 GGUF conversion of it")
    parser.add_argument("--tokens", type=whole_number(1, 8192), default=300, help="random ids to run (300)")
    parser.add_argument("--prompt-tokens", type=whole_number(1), default=200,
                        help="how many of them go in as one prompt; the rest are decode steps (200)")
    parser.add_argument("--atol", type=real_number(0, above_minimum=True), default=DEFAULT_ATOL,
                        help=f"largest |Δlogits| that passes ({DEFAULT_ATOL:g})")
    parser.add_argument("--seed", type=whole_number(0), default=1, help="seed of the random token ids (1)")
    parser.add_argument("--threads", type=whole_number(1), default=2, help="llama.cpp's threads (2)")
    args = parser.parse_args(argv)
    if args.prompt_tokens > args.tokens:
        parser.error(f"argument --prompt-tokens: {args.prompt_tokens} is more than --tokens {args.tokens}")
    try:
        return 0 if compare(args.model, args.gguf, args.tokens, args.prompt_tokens, args.atol, args.seed,
                            args.threads) else 1
    except MinqwenError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
