"""Random-weight checkpoints at Qwen3.5's real shapes, and minqwen's parity with transformers on them.

    python tools/real_shape.py make  [--out DIR]        # build it (bf16, ~1.5 GB; never commit it)
    python tools/real_shape.py parity [--out DIR]       # minqwen vs transformers fp32 on a 64-token prompt
    python tools/real_shape.py make-moe [--experts 256 --top-k 8 --layers 4 --out DIR]
                                                        # Qwen3.5-35B-A3B layers (bf16, ~8.5 GB at 256 experts)
    python tools/real_shape.py mtp-parity [--out DIR --experts 32 --top-k 8 --layers 4 --only dense|moe]
                                                        # the MTP head vs transformers' MtpModel, fp32, both shapes
    python tools/real_shape.py vision-parity [--vision-config 0.8b|4b|27b] [--blocks N] [--out DIR]
                                                        # a real vision tower, minqwen vs transformers fp32

The one builder of real-shape checkpoints: the parity check here, the benchmark and the MoE
figure (tools/moe_figure.py) all reuse the folders it makes. Weights are random (every tensor,
norms and decay parameters included, by reference.random_value's rules) and stored bf16, as
the real releases are; the reference runs them in fp32 eager mode.

The 0.8B model is built in transformers and saved with save_pretrained. The MoE layers are
too big for that (4 layers of 256 experts are 3.2 B parameters, 13 GB as the fp32 model
save_pretrained starts from), so :func:`write_random` streams them instead: names and shapes
from the transformers model built on the meta device, values generated a slice at a time,
one shard per decoder layer — never more than one shard in memory.

``mtp-parity`` checks the MTP head (minqwen.mtp) against transformers' generic MtpModel at
two real shapes: the 0.8B checkpoint above, and the MoE layers (``make-moe``; 32 experts
unless ``--experts``: the fp32 reference of 256 would need ~20 GB), each with one random MTP
layer added in a linked copy (``…-mtp-parity``; experts stored per expert, as the releases
store their MTP layer's). Over a 64-token prompt it compares the MTP logits of every pair
(h[j], t[j+1]), then 3 chained draft steps and 4 pairs committed one at a time through both
sides' caches; PASS when every |Δlogit| is within the text parity's bound scaled to the
run's largest |logit| and every argmax agrees (but at a near-tie).

``vision-parity`` builds a multimodal checkpoint whose vision tower and preprocessor are a
real member's (:data:`VISION_MEMBERS`) in front of a 4-layer text model of that member's
hidden size (the width the tower's features feed; the rest of the text model is the 0.8B's,
with a small vocabulary), and compares preprocessing, the tower's features (block by block)
and a multimodal prompt's logits and greedy continuation with transformers (see
:func:`vision_parity`). Peak memory: 4.2 GB for the 0.8B tower; a bigger tower at full depth
needs more (an estimated ~10 GB for the 27B's 27 blocks, mostly a float64 copy of the tower):
``--blocks`` keeps the member's widths with fewer blocks.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from argtypes import output_folder, require_reference, whole_number  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # minqwen, when run as python tools/real_shape.py

SCRATCH = Path(__file__).resolve().parent.parent / "scratch"
DEFAULT_DIR = SCRATCH / "qwen3.5-0.8b-random"
SLICE_ELEMENTS = 1 << 26  # random values are generated this many at a time (256 MB of fp32)
PROMPT_TOKENS = 64
GREEDY_TOKENS = 32


def make(out: Path, seed: int = 0) -> Path:
    """Build the checkpoint once; later calls reuse it."""
    import torch
    from reference import build_model, real_shape_text_config, save_checkpoint

    if (out / "config.json").is_file():
        stored = json.loads((out / "config.json").read_text())
        stored = stored.get("text_config", stored)
        wanted = real_shape_text_config()
        differ = [key for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "layer_types")
                  if stored.get(key) != wanted[key]]
        if differ:  # parity would draw ids past its vocabulary, and measure another model
            raise SystemExit(f"--out {out}: holds another checkpoint ({', '.join(differ)} not the Qwen3.5-0.8B "
                             f"shape's); give an empty folder, or the real-shape checkpoint's")
        print(f"reusing {out}")
        return out
    start = time.time()
    torch.set_num_threads(2)
    model = build_model(real_shape_text_config(), seed)
    save_checkpoint(model, out, dtype="bfloat16")
    print(f"wrote {out} in {time.time() - start:.0f} s")
    return out


def parity(out: Path) -> dict:
    import torch
    from transformers import Qwen3_5ForCausalLM

    import minqwen
    from reference import greedy_steps

    make(out)
    rng = np.random.default_rng(1)
    ids = rng.integers(0, 248044, size=PROMPT_TOKENS)

    # Reference: transformers fp32, eager, on the bf16 weights widened to fp32.
    torch.set_num_threads(2)
    ref = Qwen3_5ForCausalLM.from_pretrained(out, dtype=torch.float32, attn_implementation="eager").eval()
    with torch.no_grad():
        result = ref(input_ids=torch.tensor(ids[None]), use_cache=True)
        ref_logits = result.logits[0].numpy()
        ref_greedy, margins, _ = greedy_steps(ref, result, GREEDY_TOKENS)
    del ref, result

    model = minqwen.load(out)
    cache = model.new_cache()
    logits = model.forward(ids, cache)
    ours_greedy = []
    next_logits = logits[-1]
    for _ in range(GREEDY_TOKENS):
        token = int(np.argmax(next_logits))
        ours_greedy.append(token)
        next_logits = model.forward([token], cache, last_only=True)[-1]

    agree = next((i for i, (a, b) in enumerate(zip(ours_greedy, ref_greedy)) if a != b), GREEDY_TOKENS)
    report = {
        "prompt_tokens": PROMPT_TOKENS,
        "max_abs_logit_diff": float(np.abs(logits - ref_logits).max()),
        "logit_scale": float(np.abs(ref_logits).max()),
        "greedy_tokens_identical": agree,
        "greedy_tokens": GREEDY_TOKENS,
        "min_greedy_margin": float(min(margins)),
    }
    print(json.dumps(report, indent=2))
    return report


def moe_dir(num_experts: int, experts_per_tok: int, num_hidden_layers: int) -> Path:
    return SCRATCH / f"qwen3.5-35b-a3b-{num_hidden_layers}-layers-{num_experts}-experts-top{experts_per_tok}-random"


def make_moe(num_experts: int = 256, experts_per_tok: int = 8, num_hidden_layers: int = 4, out: Path | None = None,
             seed: int = 0) -> Path:
    """Qwen3.5-35B-A3B's layer shape, a few layers, random bf16, experts fused (as the bf16 release)."""
    from reference import real_shape_moe_text_config

    text = real_shape_moe_text_config(num_experts, experts_per_tok, num_hidden_layers)
    return write_random(out or moe_dir(num_experts, experts_per_tok, num_hidden_layers), text, seed)


def write_random(out: Path, text: dict, seed: int = 0) -> Path:
    """A random bf16 text-only checkpoint for the text config ``text`` (dense, or MoE if it has
    ``num_experts``), written shard by shard. Reuses ``out`` if it already holds one."""
    import torch
    from reference import (
        Qwen3_5ForCausalLM,
        Qwen3_5MoeForCausalLM,
        Qwen3_5MoeTextConfig,
        Qwen3_5TextConfig,
    )
    from safetensors.torch import save_file

    out = Path(out)
    if (out / "config.json").is_file():  # written last: its presence means a complete checkpoint
        print(f"reusing {out}")
        return out
    start = time.time()
    moe = "num_experts" in text
    config = (Qwen3_5MoeTextConfig if moe else Qwen3_5TextConfig)(**text)
    cls = Qwen3_5MoeForCausalLM if moe else Qwen3_5ForCausalLM
    with torch.device("meta"):  # parameters with shapes and names, and no memory behind them
        shapes = {name: tuple(p.shape) for name, p in cls(config).named_parameters()}

    def shard_of(name):  # decoder layer i → shard i + 1; embeddings, final norm, head → shard 0
        layer = re.match(r"model\.layers\.(\d+)\.", name)
        return int(layer.group(1)) + 1 if layer else 0

    gen = torch.Generator().manual_seed(seed)
    out.mkdir(parents=True, exist_ok=True)
    n_shards = config.num_hidden_layers + 1
    weight_map, total = {}, 0
    for shard in range(n_shards):
        tensors = {name: _random_bf16(name, shape, gen) for name, shape in shapes.items() if shard_of(name) == shard}
        file_name = f"model-{shard + 1:05d}-of-{n_shards:05d}.safetensors"
        save_file(tensors, str(out / file_name), metadata={"format": "pt"})
        weight_map.update({name: file_name for name in tensors})
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        del tensors
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    config.architectures = [cls.__name__]
    config.dtype = "bfloat16"
    config.save_pretrained(out)
    print(f"wrote {out} ({total / 1e9:.1f} GB) in {time.time() - start:.0f} s")
    return out


def _random_bf16(name: str, shape: tuple, gen):
    """reference.random_value for one parameter, generated in slices along its first dim, as bf16."""
    import torch
    from reference import random_value

    result = torch.empty(shape, dtype=torch.bfloat16)
    rows = max(1, SLICE_ELEMENTS // max(1, math.prod(shape[1:]))) if len(shape) > 1 else shape[0]
    for begin in range(0, shape[0], rows):
        end = min(begin + rows, shape[0])
        # Slicing the first dim keeps each row's fan-in (and each expert's), so the scale is the same.
        result[begin:end] = random_value(name, (end - begin, *shape[1:]), gen).to(torch.bfloat16)
    return result


# ==================================================================== the MTP head at the real shape

MTP_DRAFT_STEPS = 3  # chained draft steps: the first from layer 0's last output, then the one MTP layer fed its own
MTP_CACHED_STEPS = 4  # pairs committed one at a time after the prompt, through each side's main and MTP caches
# mtp-parity's MoE expert count unless told: the reference holds every expert in fp32, 256 of them in five
# layers would be 16 GB on top of the 4 GB embedding and LM head.
MTP_MOE_EXPERTS = 32
# The text parity's bound (2e-3 on logits up to ~57) as a share of the largest |logit|: fp32 round-off in the
# logits grows with their size. Never below the fixture tests' 1e-4.
MTP_RELATIVE_TOLERANCE = 2e-3 / 57
MTP_TOLERANCE_FLOOR = 1e-4


def mtp_parity(main: Path, experts: int, top_k: int, layers: int, parts=("dense", "moe")) -> list[dict]:
    """minqwen's MTP head against transformers' MtpModel, fp32 eager: the 0.8B shape, then the 35B-A3B MoE layer.

    Each part runs in a process of its own, so that its peak memory is its own: in one process
    the 0.8B model's freed matrices (2.5 GB, kept by the C library's heap for reuse) stayed
    through the MoE part and raised its peak from 9.5 to 12 GB.
    """
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context

    reports = []
    for part in parts:
        with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as pool:
            reports.append(pool.submit(mtp_parity_part, part, main, experts, top_k, layers).result())
    return reports


def mtp_parity_part(part: str, main: Path, experts: int, top_k: int, layers: int) -> dict:
    """One part of :func:`mtp_parity`: build (or reuse) its checkpoint with an MTP head, and compare."""
    from reference import real_shape_moe_text_config, real_shape_text_config

    if part == "dense":
        make(main)
        folder = add_random_mtp(main, main.with_name(main.name + "-mtp-parity"), real_shape_text_config())
        return compare_mtp(folder, "Qwen3.5-0.8B shape, dense MTP layer")
    text = real_shape_moe_text_config(experts, top_k, layers)
    moe = make_moe(experts, top_k, layers)
    folder = add_random_mtp(moe, moe.with_name(moe.name + "-mtp-parity"), text)
    return compare_mtp(folder, f"Qwen3.5-35B-A3B layer shape, {layers} main layers, MoE MTP layer of "
                               f"{experts} experts (per expert), top-{top_k}")


def add_random_mtp(source: Path, target: Path, text: dict, seed: int = 0) -> Path:
    """``target``: checkpoint ``source`` linked (never modified) plus one random MTP layer in ``mtp.safetensors``.

    Names and shapes come from transformers' MtpModel built on the meta device for the text
    config ``text``, under checkpoint names with experts stored one by one (as Qwen3.5-MoE's
    MTP layer is); every value from reference.random_value by that name (norms zero-centred,
    matrices by fan-in), generated a slice at a time, stored bf16. Reused once complete.
    """
    import torch
    from make_mtp_fixtures import linked_copy, write_mtp_tensors

    target = Path(target)
    config = target / "config.json"
    if config.is_file() and "mtp_num_hidden_layers" in json.loads(config.read_text()):  # written last
        print(f"reusing {target}")
        return target
    start = time.time()
    linked_copy(source, target)
    gen = torch.Generator().manual_seed(seed + 1)  # another stream than the main weights'
    tensors = {name: _bf16_numpy(_random_bf16(name, shape, gen)) for name, shape in mtp_shapes(text).items()}
    write_mtp_tensors(target, tensors, n_layers=1)
    print(f"wrote {target}/mtp.safetensors ({sum(t.nbytes for t in tensors.values()) / 1e9:.2f} GB) "
          f"in {time.time() - start:.0f} s")
    return target


def _bf16_numpy(tensor):
    """A torch bf16 tensor as a NumPy ml_dtypes.bfloat16 array (the same bits; safetensors.numpy writes it)."""
    import ml_dtypes
    import torch

    return tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16)


def mtp_shapes(text: dict) -> dict[str, tuple]:
    """Checkpoint name → shape of every tensor of one MTP layer for the text config ``text``, per-expert experts."""
    import torch
    from make_mtp_fixtures import mtp_checkpoint_shapes
    from transformers.modeling_layers import MtpModel

    from reference import Qwen3_5ForCausalLM, Qwen3_5MoeForCausalLM, Qwen3_5MoeTextConfig, Qwen3_5TextConfig

    moe = "num_experts" in text
    config = (Qwen3_5MoeTextConfig if moe else Qwen3_5TextConfig)(**text)
    _declare_one_mtp_layer(config)
    with torch.device("meta"):  # names and shapes, no memory
        mtp = MtpModel((Qwen3_5MoeForCausalLM if moe else Qwen3_5ForCausalLM)(config), 1)
    return mtp_checkpoint_shapes(mtp)


def _declare_one_mtp_layer(text_config) -> None:
    """What MtpModel reads from the text config (Qwen3.5's configs call it mtp_num_hidden_layers; it needs these).

    Its layer is built from the main model's last layer's class, so that must be full attention."""
    assert text_config.layer_types[-1] == "full_attention", "MtpModel copies the main model's last layer"
    text_config.num_mtp_layers = 1
    text_config.mtp_layer_types = ["full_attention"]


def compare_mtp(folder: Path, what: str) -> dict:
    """Both sides' MTP logits on one random prompt, and how far apart they are."""
    import resource

    start = time.time()
    vocab = json.loads((folder / "config.json").read_text())["vocab_size"]
    # A 64-token prompt, then t[T] (the prompt's last pair's token) and one token per cached step; ids below
    # 248044, the ones Qwen3.5's tokenizer has (the other rows of its 248320 are padding), as parity draws them.
    n_ids = PROMPT_TOKENS + 1 + MTP_CACHED_STEPS
    ids = [int(t) for t in np.random.default_rng(1).integers(0, min(vocab, 248044), size=n_ids)]
    ref = reference_mtp_logits(folder, ids)
    ours = minqwen_mtp_logits(folder, ids, ref["draft_ids"])
    scale = max(float(np.abs(ref[part]).max()) for part in ("teacher", "draft", "cached"))
    tolerance = max(MTP_RELATIVE_TOLERANCE * scale, MTP_TOLERANCE_FLOOR)
    report = {"checkpoint": str(folder), "what": what, "prompt_tokens": PROMPT_TOKENS, "logit_scale": scale,
              "tolerance": tolerance}
    for part in ("teacher", "draft", "cached"):
        report[part] = logit_agreement(ours[part], ref[part], tolerance)
    report["seconds"] = round(time.time() - start, 1)
    # the process's peak (Linux counts KiB), building included, and the mapped checkpoint's pages
    report["peak_rss_gb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9, 2)
    report["pass"] = all(report[p]["max_abs_diff"] <= tolerance and report[p]["unexplained_argmax_flips"] == 0
                         for p in ("teacher", "draft", "cached"))
    print(json.dumps(report, indent=2))
    return report


def logit_agreement(ours: np.ndarray, ref: np.ndarray, tolerance: float) -> dict:
    """max |Δ| over rows [n, V], the reference's largest |logit|, and where the argmaxes agree.

    A different argmax counts against minqwen only where the reference's top-2 gap is wider
    than 2 × tolerance: a nearer tie may fall either way by round-off alone.
    """
    top2 = np.partition(ref, -2, axis=-1)[:, -2:]  # [n, 2]: the two largest of each row
    margin = np.abs(top2[:, 1] - top2[:, 0])
    agree = np.argmax(ours, axis=-1) == np.argmax(ref, axis=-1)
    return {"rows": int(ref.shape[0]), "max_abs_diff": float(np.abs(ours - ref).max()),
            "largest_abs_logit": float(np.abs(ref).max()), "argmax_agree": int(agree.sum()),
            "min_top2_margin": float(margin.min()),
            "unexplained_argmax_flips": int((~agree & (margin > 2 * tolerance)).sum())}


def reference_mtp_logits(folder: Path, ids: list[int]) -> dict:
    """transformers 5.23.0, fp32 eager: the main model loaded by reference.load_pretrained, the head by
    MtpModel.from_pretrained (which reads the checkpoint's mtp.* names itself: they are pinned too).

    ``teacher`` [T, V]: layer 0 over the prompt's pairs (h[j], t[j+1]), j < T, from a fresh MTP
    cache, at the positions of t[j+1] (as transformers' candidate generator places them);
    ``draft`` [k, V] and ``draft_ids``: k chained steps on a copy of that cache, step s ≥ 1 the
    layer one index further on, fed its own last output and draft s − 1; ``cached`` [n, V]:
    n more pairs, each after a one-token step of the main model on its own cache, through the
    MTP cache.
    """
    import copy

    import torch
    from transformers.cache_utils import MtpCache
    from transformers.modeling_layers import MtpModel

    from reference import load_pretrained

    torch.set_num_threads(2)
    main = load_pretrained(folder)
    _declare_one_mtp_layer(main.config.get_text_config(decoder=True))
    mtp = MtpModel.from_pretrained(main).eval()
    mtp.set_attn_implementation("eager")
    if hasattr(main.config, "num_experts"):
        mtp.set_experts_implementation("eager")  # the plain loop, as reference.load_pretrained sets the main model's
    for p in mtp.parameters():
        p.data = p.data.float()  # the bf16 values, widened exactly
    decoder, T = main.get_decoder(), PROMPT_TOKENS

    def tokens(values):  # [1, n]
        return torch.tensor([[int(v) for v in values]])

    def logits(hidden):  # [1, n, H] → [n, V]
        return mtp._project_to_logits(hidden)[0].numpy()

    out = {}
    with torch.no_grad():
        prompt = decoder(input_ids=tokens(ids[:T]), use_cache=True)  # last_hidden_state: after the final norm
        main_cache, mtp_cache = prompt.past_key_values, MtpCache(config=main.config.get_mtp_config())
        g = mtp.forward_layer(0, prompt.last_hidden_state, torch.arange(1, T + 1)[None], mtp_cache,
                              input_ids=tokens(ids[1:T + 1]))  # [1, T, H]
        out["teacher"] = logits(g)

        draft_cache, last, rows, drafted = copy.deepcopy(mtp_cache), g[:, -1:], [], []
        for s in range(MTP_DRAFT_STEPS):
            rows.append(logits(last)[-1])
            drafted.append(int(np.argmax(rows[-1])))
            if s + 1 < MTP_DRAFT_STEPS:  # index T − 1 + s + 1, at the position of its token, draft s
                last = mtp.forward_layer(0, last, torch.tensor([[T + 1 + s]]), draft_cache,
                                         input_ids=tokens([drafted[-1]]))  # [1, 1, H]
        out["draft"], out["draft_ids"] = np.array(rows), drafted

        cached = []
        for m in range(MTP_CACHED_STEPS):  # pair index T + m: h after token t[T+m], with t[T+m+1]
            step = decoder(input_ids=tokens([ids[T + m]]), past_key_values=main_cache, use_cache=True)
            main_cache = step.past_key_values
            g = mtp.forward_layer(0, step.last_hidden_state, torch.tensor([[T + m + 1]]), mtp_cache,
                                  input_ids=tokens([ids[T + m + 1]]))  # [1, 1, H]
            cached.append(logits(g)[-1])
        out["cached"] = np.array(cached)
    return out


def minqwen_mtp_logits(folder: Path, ids: list[int], reference_drafts: list[int]) -> dict:
    """The same three as :func:`reference_mtp_logits`, through minqwen's own API.

    ``teacher``: mtp_logits; ``draft``: minqwen.mtp.draft over an MtpCache that committed the
    prompt's pairs, drafting what the reference drafted (so that a near-tie cannot send the
    two chains apart); ``cached``: one-token steps of the main model, each pair committed to
    the MTP cache, the logits of its newest output.
    """
    import minqwen
    from minqwen.mtp import MtpCache, draft, load_mtp, mtp_logits

    model = minqwen.load(folder)
    head = load_mtp(folder, model)
    T = PROMPT_TOKENS
    out = {"teacher": mtp_logits(model, head, ids[:T + 1])}  # [T, V]
    cache, mtp_cache = model.new_cache(), MtpCache(model, head)
    mtp_cache.commit(model, head, model.hidden_states(ids[:T], cache), ids[1:T + 1])
    rows = []

    def follow_reference(logits, step):
        rows.append(np.array(logits))
        return reference_drafts[step]

    draft(model, head, mtp_cache, MTP_DRAFT_STEPS, follow_reference, draft_vocab=None)
    out["draft"] = np.array(rows)  # [k, V]
    cached = []
    for m in range(MTP_CACHED_STEPS):
        hidden = model.hidden_states(ids[T + m:T + m + 1], cache)  # [1, H]
        mtp_cache.commit(model, head, hidden, ids[T + m + 1:T + m + 2])
        cached.append(model.logits(mtp_cache.last[None])[0])
    out["cached"] = np.array(cached)  # [n, V]
    return out


# ==================================================================== the vision tower at real shapes

# Qwen3.5's vision towers. Public config.json copies of the releases (and of models derived from
# them) give the 0.8B's (12 blocks of 768, 12 heads, MLP 3072) and the 27B's (27 × 1152, 16 heads,
# MLP 4304: also transformers 5.23.0's Qwen3_5VisionConfig defaults, documented against
# Qwen/Qwen3.5-27B). The 4B's (24 × 1024, 16 heads, MLP 4096) comes from two third-party copies
# only, not the release's own file: unconfirmed. out_hidden_size is the member's text hidden size
# (1024, 2560, 5120), taken with its head tying from tools/family_shapes.py's table.
VISION_MEMBERS = {
    "0.8b": dict(depth=12, hidden_size=768, num_heads=12, intermediate_size=3072),
    "4b": dict(depth=24, hidden_size=1024, num_heads=16, intermediate_size=4096),
    "27b": dict(depth=27, hidden_size=1152, num_heads=16, intermediate_size=4304),
}
# Common to every member's vision_config: 16-pixel patches of 2 frames, 2 × 2 merged into one
# token, a learned 48 × 48 position grid, tanh-GELU blocks, and no deepstack (the releases carry
# an empty deepstack_visual_indexes; transformers 5.23.0's Qwen3.5 tower has no deepstack mergers).
VISION_COMMON = dict(patch_size=16, temporal_patch_size=2, spatial_merge_size=2, num_position_embeddings=2304,
                     hidden_act="gelu_pytorch_tanh", in_channels=3, deepstack_visual_indexes=[])
# The releases' preprocessor_config.json (the same for every member): 256² … 4096² pixels, mean
# and std 0.5 — not the processor class's own defaults (OpenAI CLIP's), so reading them counts.
VISION_PREPROCESSOR = dict(size=dict(shortest_edge=65536, longest_edge=16777216), patch_size=16,
                           temporal_patch_size=2, merge_size=2, image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])
VISION_VOCAB = 8192  # the text side's vocabulary: logits over a 1000-token prompt stay ~30 MB, not ~1 GB
VISION_TEXT_LAYERS = ["linear_attention"] * 3 + ["full_attention"]
# Test images (height, width): the tower sees the first three, with 640 + 308 + 2728 patches.
TOWER_IMAGES = {
    "333x500 (off the 32-px grid)": (333, 500),
    "90x150 (grown to min_pixels)": (90, 150),
    "720x1000 (photo-sized)": (720, 1000),
}
# Preprocessing only: shrunk by max_pixels to 4224 × 3936, 64 944 patches. Through the tower its
# attention alone would need 12 heads × 64 944² floats (200 GB) in the reference's eager mode.
BIG_IMAGE = ("4300x4000 (shrunk by max_pixels)", (4300, 4000))
VISION_GREEDY_TOKENS = 8
# Pass marks, relative to the largest |value| compared. Features: each float32 side's distance to
# a float64 run of the reference tower is measured and printed beside it (float32 round-off,
# ~1e-6), while a real error (a missing bias, a position off by one, a wrong rotary half) moves
# features by percents. Logits: the text parity's 2e-3 on logits up to ~57, as a ratio (the scale
# of the logits depends on the member's hidden size and head tying).
FEATURE_RTOL = 1e-4
LOGIT_RTOL = 2e-3 / 57


def vision_dir(member: str, blocks: int | None) -> Path:
    depth = VISION_MEMBERS[member]["depth"] if blocks is None else blocks
    return SCRATCH / f"qwen3.5-{member}-vision-{depth}-blocks-random"


def vision_configs(member: str, blocks: int | None) -> tuple[dict, dict]:
    """(text config, vision config): the member's tower (its first ``blocks`` blocks) and a 4-layer
    text model of the member's hidden size and head tying, with the 0.8B's other widths (the
    tower's output width is the text hidden size: build_vision_model sets it from there)."""
    from family_shapes import MEMBERS
    from reference import real_shape_text_config

    vision = dict(VISION_COMMON, **VISION_MEMBERS[member])
    if blocks is not None:
        vision["depth"] = blocks
    widths = MEMBERS[member.upper()]
    text = dict(real_shape_text_config(), vocab_size=VISION_VOCAB, hidden_size=widths["hidden_size"],
                tie_word_embeddings=widths["tie_word_embeddings"], num_hidden_layers=len(VISION_TEXT_LAYERS),
                layer_types=VISION_TEXT_LAYERS,
                eos_token_id=VISION_VOCAB - 5)  # below the four vision markers at the top of the vocabulary
    return text, vision


def make_vision(out: Path, member: str, blocks: int | None, seed: int = 0) -> Path:
    """The multimodal checkpoint, bf16 as the releases are; later calls reuse it.

    Weights: make_vision_fixtures' builder — reference.random_value for the text model, and
    randomize_vision for the tower (its LayerNorms are plain scales, so centred on one; biases and
    position embeddings random; the merger's output at the embeddings' scale).
    """
    import torch
    from make_vision_fixtures import build_vision_model, save_vision_checkpoint

    text, vision = vision_configs(member, blocks)
    if (out / "config.json").is_file():
        stored = json.loads((out / "config.json").read_text()).get("vision_config", {})
        if any(stored.get(k) != vision[k] for k in ("depth", "hidden_size", "num_heads", "intermediate_size")):
            # a folder made for another member or depth would be measured under this one's name
            raise SystemExit(f"{out} holds another vision tower than the {member} one with {vision['depth']} blocks; "
                             "give another --out")
        print(f"reusing {out}")
        return out
    start = time.time()
    torch.set_num_threads(2)
    tie = text.pop("tie_word_embeddings")
    model = build_vision_model(text, vision, seed, tie=tie)
    save_vision_checkpoint(model, VISION_PREPROCESSOR, out, dtype="bfloat16")
    print(f"wrote {out} in {time.time() - start:.0f} s")
    return out


def vision_test_images(seed: int = 2) -> dict[str, np.ndarray]:
    """Gradients, a disc and noise (make_vision_fixtures.test_image) at each size, the big one last."""
    from make_vision_fixtures import test_image

    rng = np.random.default_rng(seed)
    sizes = dict(TOWER_IMAGES, **dict([BIG_IMAGE]))
    return {name: test_image(rng, h, w) for name, (h, w) in sizes.items()}


def compare_preprocessing(out: Path, images: dict[str, np.ndarray]) -> dict:
    """minqwen's preprocess vs Qwen2VLImageProcessorPil read from the checkpoint's preprocessor_config.json."""
    from make_vision_fixtures import reference_preprocess
    from transformers import Qwen2VLImageProcessorPil

    from minqwen.image import load_preprocessor_config, preprocess

    processor = Qwen2VLImageProcessorPil.from_pretrained(out)
    config = load_preprocessor_config(out)
    report = {}
    for name, image in images.items():
        ours, ours_grid = preprocess(image, config)
        ref, ref_grid = reference_preprocess(processor, image)
        report[name] = {"grid_thw": ours_grid[0].tolist(), "grid_thw_equal": bool(np.array_equal(ours_grid, ref_grid)),
                        "pixel_values_max_abs_diff": float(np.abs(ours - ref).max()) if ours.shape == ref.shape
                        else float("inf")}
        del ours, ref
    return report


def reference_tower(visual, pixel_values: np.ndarray, grid_thw: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
    """transformers' features [Σ patches / 4, out] and every block's output [Σ patches, D]."""
    import torch

    blocks = {}
    hooks = [block.register_forward_hook(lambda mod, args, out, i=i: blocks.__setitem__(i, out.numpy().copy()))
             for i, block in enumerate(visual.blocks)]
    try:
        with torch.no_grad():
            features = visual(torch.from_numpy(pixel_values), grid_thw=torch.from_numpy(grid_thw)).pooler_output
    finally:
        for h in hooks:
            h.remove()
    return features.numpy(), [blocks[i] for i in range(len(blocks))]


def minqwen_tower(tower, pixel_values: np.ndarray, grid_thw: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
    """minqwen's features and every block's output, as :func:`reference_tower`."""
    blocks = {}

    def tap(name, x):
        if name.startswith("blocks."):
            blocks[int(name.split(".")[1])] = x.copy()

    features = tower.forward(pixel_values, grid_thw, tap=tap)
    return features, [blocks[i] for i in range(len(blocks))]


def difference(ours: np.ndarray, ref: np.ndarray) -> dict:
    """max |Δ|, the largest |reference value|, and their ratio."""
    diff, scale = float(np.abs(ours - ref).max()), float(np.abs(ref).max())
    return {"max_abs_diff": diff, "scale": scale, "relative": diff / scale}


def float64_tower_features(visual, inputs: list[tuple[np.ndarray, np.ndarray]]) -> list[np.ndarray]:
    """Each image's features from a float64 copy of transformers' tower: how far from exact each
    float32 side is. The modeling module's own casts to float32 (rotary, softmax) are redirected to
    float64 for the run (reference.computing_in_float64), or they would round back inside; the
    resampling weights of the position grid stay float32, as both float32 sides compute them."""
    import copy

    from reference import computing_in_float64

    wide = copy.deepcopy(visual).double()
    with computing_in_float64():
        return [reference_tower(wide, pixel_values.astype(np.float64), grid)[0] for pixel_values, grid in inputs]


def tower_inputs(tower_preprocessor, images: list[np.ndarray]) -> list[tuple[np.ndarray, np.ndarray]]:
    """(pixel_values, grid_thw) of each image, by minqwen's preprocessing (equal to the reference's, checked first)."""
    from minqwen.image import preprocess

    return [preprocess(image, tower_preprocessor) for image in images]


def compare_towers(visual, tower, inputs: list[tuple[np.ndarray, np.ndarray]], exact: list[np.ndarray]) -> dict:
    """Features per image, against the float32 reference and against the float64 one (``exact``);
    then all images in one call (each attends only to itself), compared block by block."""
    report = {"per_image": []}
    for (pixel_values, grid), wide in zip(inputs, exact):
        ref, _ = reference_tower(visual, pixel_values, grid)
        ours = tower.forward(pixel_values, grid)
        report["per_image"].append(dict(difference(ours, ref), grid_thw=grid[0].tolist(),
                                        ours_vs_float64=difference(ours, wide)["relative"],
                                        reference_vs_float64=difference(ref, wide)["relative"]))
    pixel_values = np.concatenate([p for p, _ in inputs])
    grid = np.concatenate([g for _, g in inputs])
    ref, ref_blocks = reference_tower(visual, pixel_values, grid)
    ours, our_blocks = minqwen_tower(tower, pixel_values, grid)
    report["together"] = difference(ours, ref)
    report["together_blocks"] = [difference(a, b) for a, b in zip(our_blocks, ref_blocks)]
    return report


def vision_prompt(images: list[np.ndarray]) -> np.ndarray:
    """Text, then each image between its markers (one <|image_pad|> each) and more text."""
    from make_vision_fixtures import prompt

    return prompt(np.random.default_rng(3), VISION_VOCAB, len(images), text_len=12)


def reference_prompt(out: Path, images: list[np.ndarray], ids: np.ndarray) -> dict:
    """transformers end to end on the prompt (make_vision_fixtures.run_vision_reference): expanded
    ids, 3-D positions, rope delta, logits, and greedy steps through its own cache."""
    import torch
    from make_vision_fixtures import run_vision_reference
    from reference import load_pretrained
    from transformers import Qwen2VLImageProcessorPil

    ref_model = load_pretrained(out)
    processor = Qwen2VLImageProcessorPil.from_pretrained(out)
    with torch.no_grad():
        return run_vision_reference(ref_model, processor, images, ids, n_greedy=VISION_GREEDY_TOKENS)


def compare_prompt(out: Path, tower, images: list[np.ndarray], ids: np.ndarray, ref: dict) -> dict:
    """minqwen on the same prompt: its logits, positions and rope delta; then the decode steps,
    minqwen fed the reference's greedy tokens so that every step is compared."""
    import minqwen
    from minqwen import vision

    model = minqwen.load(out)
    cache = model.new_cache()
    logits = vision.prefill(model, tower, ids, images, cache, last_only=False)  # [T, V]
    positions, _ = vision.rope_index(ref["input_ids"], ref["grid_thw"], tower.config)
    report = {"prompt_tokens": int(len(ref["input_ids"])),
              "position_ids_equal": bool(np.array_equal(positions, ref["position_ids"])),
              "rope_delta_equal": bool(cache.rope_delta == int(ref["rope_delta"][0])),
              "logits": difference(logits, ref["logits"])}
    agree, steps, next_logits = None, [], logits[-1]
    for step, token in enumerate(ref["greedy"].tolist()):
        if agree is None and int(np.argmax(next_logits)) != token:
            agree = step
        next_logits = model.forward([token], cache, last_only=True)[-1]
        steps.append(next_logits)
    report["decode_steps"] = difference(np.stack(steps), ref["greedy_logits"])
    report["greedy_tokens_identical"] = VISION_GREEDY_TOKENS if agree is None else agree
    report["greedy_tokens"] = VISION_GREEDY_TOKENS
    report["min_greedy_margin"] = float(ref["greedy_margin"].min())
    return report


def reference_visual(out: Path):
    """transformers' tower alone, loaded as the reference runs it (fp32, eager): the text model
    it came with is dropped, so that a big member's text stand-in is not in memory meanwhile."""
    from reference import load_pretrained

    visual = load_pretrained(out).model.visual
    assert visual.config._attn_implementation == "eager"
    return visual


def vision_parity(out: Path, member: str = "0.8b", blocks: int | None = None) -> dict:
    """Everything :func:`vision_passed` judges, printed as JSON.

    One large thing at a time: preprocessing before any model (the big image's pixel values are
    ~400 MB a side); then the towers alone (the float64 one with ~2 GB of attention scores);
    then transformers' whole model, then minqwen's.
    """
    import resource

    import torch

    from minqwen import vision

    start = time.time()
    make_vision(out, member, blocks)
    torch.set_num_threads(2)
    images = vision_test_images()
    depth = json.loads((out / "config.json").read_text())["vision_config"]["depth"]  # a reused folder's own
    report = {"vision_config": member, "blocks": depth, "checkpoint": str(out),
              "preprocessing": compare_preprocessing(out, images)}
    tower_images = [images[name] for name in TOWER_IMAGES]
    del images

    visual, tower = reference_visual(out), vision.load_vision(out)
    inputs = tower_inputs(tower.preprocessor, tower_images)
    exact = float64_tower_features(visual, inputs)
    report["tower"] = compare_towers(visual, tower, inputs, exact)
    del visual, inputs, exact

    ids = vision_prompt(tower_images)
    ref = reference_prompt(out, tower_images, ids)
    report["prompt"] = compare_prompt(out, tower, tower_images, ids, ref)
    report["seconds"] = round(time.time() - start)
    report["peak_rss_gb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9, 2)
    print(json.dumps(report, indent=2))
    return report


def vision_passed(report: dict) -> list[str]:
    """What failed, in words; empty when everything passed."""
    failures = []
    for name, pre in report["preprocessing"].items():
        if not pre["grid_thw_equal"] or pre["pixel_values_max_abs_diff"] != 0.0:
            failures.append(f"preprocessing of {name}: pixel values differ by {pre['pixel_values_max_abs_diff']}")
    tower = report["tower"]
    for call, d in [*zip(TOWER_IMAGES, tower["per_image"]), ("all images in one call", tower["together"])]:
        if d["relative"] > FEATURE_RTOL:
            failures.append(f"tower features, {call}: {d['max_abs_diff']:.2e} of {d['scale']:.2f}, "
                            f"relative {d['relative']:.1e} > {FEATURE_RTOL:g}")
    p = report["prompt"]
    if not (p["position_ids_equal"] and p["rope_delta_equal"]):
        failures.append("the prompt's 3-D positions or rope delta differ")
    for what in ("logits", "decode_steps"):
        if p[what]["relative"] > LOGIT_RTOL:
            failures.append(f"{what}: max |Δ| {p[what]['max_abs_diff']:.2e} of {p[what]['scale']:.1f}, "
                            f"relative {p[what]['relative']:.1e} > {LOGIT_RTOL:.1e}")
    if p["greedy_tokens_identical"] != p["greedy_tokens"]:
        failures.append(f"greedy tokens: {p['greedy_tokens_identical']} of {p['greedy_tokens']} identical")
    return failures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["make", "parity", "make-moe", "mtp-parity", "vision-parity"],
                        help="what to do (see above)")
    parser.add_argument("--out", type=output_folder, default=None,
                        help="the checkpoint's folder (default: one in scratch/ named after the shape)")
    parser.add_argument("--experts", type=whole_number(1), default=None,
                        help=f"default: 256 (make-moe), {MTP_MOE_EXPERTS} (mtp-parity)")
    parser.add_argument("--top-k", type=whole_number(1), default=None, help="default 8")
    parser.add_argument("--layers", type=whole_number(1), default=None, help="default 4")
    parser.add_argument("--only", choices=["dense", "moe"], help="mtp-parity: run only one of its two checks")
    parser.add_argument("--vision-config", choices=list(VISION_MEMBERS), default=None,
                        help="vision-parity: whose vision tower (default 0.8b)")
    parser.add_argument("--blocks", type=whole_number(1), default=None,
                        help="vision-parity: build only the tower's first N blocks (default: all of them)")
    args = parser.parse_args()
    given = [flag for flag, value in (("--experts", args.experts), ("--top-k", args.top_k), ("--layers", args.layers))
             if value is not None]
    if args.what in ("make", "parity", "vision-parity") and given:
        # else `make --layers 2` would quietly build the whole 1.5 GB text checkpoint
        parser.error(f"{', '.join(given)}: options of make-moe and mtp-parity, not of {args.what}")
    args.top_k = 8 if args.top_k is None else args.top_k
    args.layers = 4 if args.layers is None else args.layers
    if args.experts is None:
        args.experts = MTP_MOE_EXPERTS if args.what == "mtp-parity" else 256
    if args.top_k > args.experts:
        parser.error(f"--top-k {args.top_k} must be ≤ --experts {args.experts}")
    if args.only and args.what != "mtp-parity":
        parser.error(f"--only is an option of mtp-parity, not of {args.what}")
    if args.what != "vision-parity" and (args.vision_config or args.blocks):
        # else `make --blocks 4` would quietly build the 1.5 GB text checkpoint instead
        parser.error("--vision-config and --blocks are options of vision-parity")
    if args.what == "mtp-parity" and args.layers % 4:
        # MtpModel builds its layer from the main model's last one, which must be full attention (every fourth).
        parser.error(f"--layers {args.layers} must be a multiple of 4 for mtp-parity, so that the last "
                     f"main layer is a full-attention one")
    require_reference(parser.prog)  # every subcommand builds or runs transformers models
    if args.what == "mtp-parity":
        reports = mtp_parity(args.out or DEFAULT_DIR, args.experts, args.top_k, args.layers,
                             (args.only,) if args.only else ("dense", "moe"))
        ok = all(report["pass"] for report in reports)
        print("PASS" if ok else "FAIL")
        return 0 if ok else 1
    if args.what == "vision-parity":
        return run_vision_parity(parser, args)
    if args.what == "make-moe":
        make_moe(args.experts, args.top_k, args.layers, args.out)
        return 0
    args.out = args.out or DEFAULT_DIR
    if args.what == "make":
        make(args.out)
        return 0
    report = parity(args.out)
    ok = report["max_abs_logit_diff"] <= 2e-3 and report["greedy_tokens_identical"] == GREEDY_TOKENS
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


def run_vision_parity(parser, args) -> int:
    member = args.vision_config or "0.8b"
    depth = VISION_MEMBERS[member]["depth"]
    if args.blocks is not None and args.blocks > depth:
        parser.error(f"--blocks {args.blocks} must be ≤ {depth}, the depth of the {member} tower")
    report = vision_parity(args.out or vision_dir(member, args.blocks), member, args.blocks)
    failures = vision_passed(report)
    for failure in failures:
        print(f"  {failure}")
    print("FAIL" if failures else "PASS")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
