"""Checkpoints with an MTP head, and what transformers 5.23.0 computes with it.

transformers' Qwen3.5 classes ignore ``mtp.*``; its generic ``MtpModel``
(``transformers.modeling_layers``) runs MTP heads. It is built from a main model whose text
config carries ``num_mtp_layers`` and ``mtp_layer_types``, and takes its decoder-layer and
norm classes from the main model's *last* layer — so reference models here end with a
full-attention layer. Its module names differ from the checkpoint's:

    MtpModel (in memory)               checkpoint (Qwen3.5)
    layers.0.enorm.weight              mtp.pre_fc_norm_embedding.weight
    layers.0.hnorm.weight              mtp.pre_fc_norm_hidden.weight
    layers.0.eh_proj.weight            mtp.fc.weight
    layers.{i}.mtp_block.<name>        mtp.layers.{i}.<name>
    layers.0.post_norm.weight          mtp.norm.weight

(transformers' own loader maps them the same way: ``conversion_mapping["MtpModel"]``.)
A Qwen3.5 checkpoint holds one fc and one set of norms however many MTP layers it has, while
MtpModel gives every layer its own: with several layers, every layer's copies are set to
layer 0's before anything runs, and only layer 0's are written.

Functions (imported by tests/test_mtp.py, tools/mtp_figures.py and tools/real_shape.py):

* :func:`build_mtp_model` — a randomized MtpModel for a main model built by reference.py;
* :func:`mtp_checkpoint_tensors` — its weights under checkpoint names (experts per expert or fused);
  :func:`mtp_checkpoint_shapes` — their names and shapes only (for a model on the meta device);
* :func:`write_mtp_tensors` — add them to a saved checkpoint folder;
* :func:`run_mtp_reference` — the reference's MTP logits at every position, and its chained drafts;
* :func:`random_mtp_tensors` — NumPy-only random MTP weights for a config (no torch; for big shapes);
* :func:`linked_copy` — a checkpoint's files linked into another folder, to add a head there.

    python tools/make_mtp_fixtures.py SRC DST     # DST: SRC's files (linked) + a random MTP head
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import ml_dtypes
import numpy as np
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

# The MTP-only parameters of MtpModel, and where each goes in a Qwen3.5 checkpoint.
SHARED = {"enorm": "pre_fc_norm_embedding", "hnorm": "pre_fc_norm_hidden", "eh_proj": "fc", "post_norm": "norm"}


def _text_config(main_model):
    return main_model.config.get_text_config(decoder=True)


def build_mtp_model(main_model, n_layers: int, seed: int):
    """A transformers MtpModel with ``n_layers`` MTP layers on ``main_model``, every own tensor random.

    Sets ``num_mtp_layers`` and ``mtp_layer_types`` (all full attention) on the main model's
    text config, as MtpModel needs. The embedding and LM head stay the main model's.
    """
    import torch
    from transformers.modeling_layers import MtpModel

    text = _text_config(main_model)
    text.num_mtp_layers = n_layers
    text.mtp_layer_types = ["full_attention"] * n_layers
    mtp = MtpModel(main_model, n_layers)
    mtp.eval()
    _randomize_own(mtp, seed)
    with torch.no_grad():  # one fc and one set of norms, as a Qwen3.5 checkpoint stores them
        for layer in mtp.layers[1:]:
            for name in SHARED:
                getattr(layer, name).weight.copy_(getattr(mtp.layers[0], name).weight)
    return mtp


def _randomize_own(mtp, seed: int) -> None:
    """Random values for MtpModel's own parameters only (not the shared embedding / LM head)."""
    import torch
    from reference import random_value

    gen = torch.Generator().manual_seed(seed + 7919)
    with torch.no_grad():
        for name, p in mtp.named_parameters():
            if name.startswith("layers."):
                p.copy_(random_value(name, p.shape, gen))


def round_mtp_to_bf16(mtp) -> None:
    """Round the MTP's own parameters to bf16 values (the reference then runs on what is stored)."""
    import torch

    with torch.no_grad():
        for name, p in mtp.named_parameters():
            if name.startswith("layers."):
                p.copy_(p.to(torch.bfloat16).to(torch.float32))


def checkpoint_pieces(name: str, shape: tuple, fused_experts: bool = False) -> list[tuple[str, tuple]]:
    """Where the MtpModel parameter ``name`` (of ``shape``) goes in a Qwen3.5 checkpoint.

    A list of (checkpoint name, index into the parameter): one pair for most parameters; one
    per expert and projection for MoE experts stored per expert (``gate_up_proj`` [E, 2I, H],
    gate rows first, and ``down_proj`` [E, H, I] in memory); none for what a checkpoint does
    not hold (the shared embedding / LM head; layers 1 … 's copies of fc and the norms).
    The one mapping both the values (:func:`mtp_checkpoint_tensors`) and the shapes
    (:func:`mtp_checkpoint_shapes`) follow.
    """
    if not name.startswith("layers."):
        return []  # embed_tokens / shared_head: the main model's
    _, index, rest = name.split(".", 2)
    module = rest.split(".")[0]
    if module in SHARED:
        return [(f"mtp.{SHARED[module]}." + rest.split(".", 1)[1], ())] if index == "0" else []
    assert rest.startswith("mtp_block."), name
    rest = rest.removeprefix("mtp_block.")
    prefix = f"mtp.layers.{index}.mlp.experts."
    if ".experts.gate_up_proj" in name and not fused_experts:
        width = shape[1] // 2
        return [piece for e in range(shape[0]) for piece in (
            (f"{prefix}{e}.gate_proj.weight", (e, slice(0, width))),
            (f"{prefix}{e}.up_proj.weight", (e, slice(width, 2 * width))))]
    if ".experts.down_proj" in name and not fused_experts:
        return [(f"{prefix}{e}.down_proj.weight", (e,)) for e in range(shape[0])]
    return [(f"mtp.layers.{index}.{rest}", ())]


def mtp_checkpoint_tensors(mtp, fused_experts: bool = False, dtype: str = "float32") -> dict[str, np.ndarray]:
    """The MtpModel's own weights under Qwen3.5 checkpoint names (``mtp.…``), as NumPy arrays.

    MoE experts are written per expert (``mlp.experts.{e}.gate_proj.weight`` …, as
    Qwen3.5-MoE's MTP layer stores them) unless ``fused_experts`` (see :func:`checkpoint_pieces`).
    """
    out: dict[str, np.ndarray] = {}
    for name, tensor in mtp.state_dict().items():
        pieces = checkpoint_pieces(name, tuple(tensor.shape), fused_experts)
        value = tensor.float().numpy() if pieces else None
        for checkpoint_name, index in pieces:
            out[checkpoint_name] = value[index]
    convert = (lambda a: a.astype(ml_dtypes.bfloat16)) if dtype == "bfloat16" else (lambda a: a.astype(np.float32))
    return {name: np.ascontiguousarray(convert(value)) for name, value in out.items()}


def mtp_checkpoint_shapes(mtp, fused_experts: bool = False) -> dict[str, tuple]:
    """The shapes :func:`mtp_checkpoint_tensors` would write, without reading a value: works on
    an MtpModel built on the meta device, at any size."""
    shapes = {}
    for name, p in mtp.named_parameters():
        # A zero-strided view of one byte, shaped like the parameter: indexing it costs nothing.
        shaped = np.broadcast_to(np.zeros((), np.int8), tuple(p.shape))
        shapes.update({checkpoint_name: shaped[index].shape
                       for checkpoint_name, index in checkpoint_pieces(name, tuple(p.shape), fused_experts)})
    return shapes


def write_mtp_tensors(folder: Path, tensors: dict[str, np.ndarray], n_layers: int) -> None:
    """Add ``tensors`` to the checkpoint in ``folder``; set ``mtp_num_hidden_layers`` in config.json.

    A sharded checkpoint gets a new shard ``mtp.safetensors`` listed in
    ``model.safetensors.index.json``; a single-file one gets them written into
    ``model.safetensors`` itself (transformers reads only that file when it exists, index or
    not). ``mtp_num_hidden_layers`` goes in ``text_config`` for the multimodal wrapper.
    """
    folder = Path(folder)
    index_path = folder / "model.safetensors.index.json"
    single = folder / "model.safetensors"
    if index_path.is_file() and not single.exists():
        index = json.loads(index_path.read_text())
        save_file(tensors, str(folder / "mtp.safetensors"), metadata={"format": "pt"})
        index["weight_map"].update({name: "mtp.safetensors" for name in tensors})
        index_path.write_text(json.dumps(index, indent=2, sort_keys=True))
    else:
        save_file({**load_file(str(single)), **tensors}, str(single), metadata={"format": "pt"})
    config_path = folder / "config.json"
    config = json.loads(config_path.read_text())
    config.get("text_config", config)["mtp_num_hidden_layers"] = n_layers
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True))


def run_mtp_reference(main_model, mtp, token_ids, next_token: int) -> dict[str, np.ndarray]:
    """What transformers computes for the prompt ``token_ids`` (T ids) followed by ``next_token``.

    * ``layer0_logits`` [T, V]: MTP layer 0 teacher-forced over the pairs (h[j], t[j+1]),
      j = 0 … T−1 (t[T] = next_token), from a fresh MTP cache;
    * ``draft_logits`` [n, V], ``draft_ids`` [n]: one ``MtpModel.forward`` over the same
      window — layer i drafts token i + 1, each layer reading the previous one's output and
      the tokens shifted by one more (argmax drafting).
    Positions follow MtpModel's caller (the candidate generator): the ids' own positions 1 … T.
    """
    import torch
    from transformers.cache_utils import MtpCache

    ids = torch.tensor(np.asarray(token_ids, dtype=np.int64)[None])
    shifted = torch.cat([ids[:, 1:], torch.tensor([[int(next_token)]])], dim=1)  # t[j+1] for j = 0 … T−1
    positions = torch.arange(1, ids.shape[1] + 1)[None]
    with torch.no_grad():
        decoder = main_model.get_decoder()
        hidden = decoder(input_ids=ids, use_cache=False).last_hidden_state  # after the final norm
        config = main_model.config.get_mtp_config()
        out = mtp.forward_layer(0, hidden, positions, MtpCache(config=config), input_ids=shifted)
        layer0 = mtp._project_to_logits(out)[0].float().numpy()
        drafted, logits, _ = mtp(input_ids=shifted, last_hidden_states=hidden, attention_mask=None,
                                 position_ids=positions, mtp_cache=MtpCache(config=config))
    return {"layer0_logits": layer0, "draft_logits": logits[0].float().numpy(),
            "draft_ids": drafted[0].numpy().astype(np.int64)}


# ==================================================================== NumPy-only random heads


def random_mtp_tensors(config, seed: int = 0, dtype: str = "bfloat16") -> dict[str, np.ndarray]:
    """Random MTP weights (one layer) for a minqwen ``TextConfig``, under checkpoint names.

    The layer is the model's own kind: attention biases where the config has them, and for an
    MoE model a router, per-expert weights and the shared expert. Scaled like
    reference.random_value (matrices by 1/√fan-in, zero-centred norms and biases near 0): for
    timing on big shapes, where building a torch model would be a waste.
    """
    rng = np.random.default_rng(seed)
    c = config
    H, I, D = c.hidden_size, c.intermediate_size, c.head_dim
    Hq, Hkv = c.num_attention_heads, c.num_key_value_heads

    def matrix(rows, cols):
        return (rng.standard_normal((rows, cols), dtype=np.float32) / np.sqrt(cols)).astype(np.float32)

    def norm(size):
        return (0.2 * rng.standard_normal(size)).astype(np.float32)

    p = "mtp.layers.0."
    tensors = {
        "mtp.fc.weight": matrix(H, 2 * H),
        "mtp.pre_fc_norm_embedding.weight": norm(H),
        "mtp.pre_fc_norm_hidden.weight": norm(H),
        "mtp.norm.weight": norm(H),
        p + "input_layernorm.weight": norm(H),
        p + "post_attention_layernorm.weight": norm(H),
        p + "self_attn.q_proj.weight": matrix(Hq * 2 * D, H),
        p + "self_attn.k_proj.weight": matrix(Hkv * D, H),
        p + "self_attn.v_proj.weight": matrix(Hkv * D, H),
        p + "self_attn.o_proj.weight": matrix(H, Hq * D),
        p + "self_attn.q_norm.weight": norm(D),
        p + "self_attn.k_norm.weight": norm(D),
    }
    if c.attention_bias:
        sizes = {"q_proj": Hq * 2 * D, "k_proj": Hkv * D, "v_proj": Hkv * D, "o_proj": H}
        tensors.update({f"{p}self_attn.{name}.bias": norm(size) for name, size in sizes.items()})
    if c.num_experts:  # the MoE block, experts stored one by one (as the MTP layers of the releases are)
        E, I_e, I_s = c.num_experts, c.moe_intermediate_size, c.shared_expert_intermediate_size
        tensors[p + "mlp.gate.weight"] = matrix(E, H)
        for e in range(E):
            tensors.update({f"{p}mlp.experts.{e}.gate_proj.weight": matrix(I_e, H),
                            f"{p}mlp.experts.{e}.up_proj.weight": matrix(I_e, H),
                            f"{p}mlp.experts.{e}.down_proj.weight": matrix(H, I_e)})
        tensors.update({p + "mlp.shared_expert.gate_proj.weight": matrix(I_s, H),
                        p + "mlp.shared_expert.up_proj.weight": matrix(I_s, H),
                        p + "mlp.shared_expert.down_proj.weight": matrix(H, I_s),
                        p + "mlp.shared_expert_gate.weight": matrix(1, H)})
    else:
        tensors.update({p + "mlp.gate_proj.weight": matrix(I, H),
                        p + "mlp.up_proj.weight": matrix(I, H),
                        p + "mlp.down_proj.weight": matrix(H, I)})
    if dtype == "bfloat16":
        tensors = {name: value.astype(ml_dtypes.bfloat16) for name, value in tensors.items()}
    return tensors


MAIN_SHARD = "model-main.safetensors"  # what with_random_mtp calls a single-file source's link


def with_random_mtp(source: Path, target: Path, seed: int = 0) -> Path:
    """``target``: every file of checkpoint ``source`` (symlinked, nothing copied) plus a random MTP head."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from minqwen.config import load_config

    target = linked_copy(source, target)
    write_mtp_tensors(target, random_mtp_tensors(load_config(source), seed), n_layers=1)
    return target


def linked_copy(source: Path, target: Path) -> Path:
    """``target``: every file of checkpoint ``source`` symlinked, its config copied, and an index
    of the links — ready for :func:`write_mtp_tensors` to add ``mtp.safetensors``.

    A single-file source is linked under a shard name (``MAIN_SHARD``) and indexed too: loaders
    (minqwen's and transformers') read a ``model.safetensors`` alone whenever it exists, so a
    link under that name would hide the head.
    """
    source, target = Path(source).resolve(), Path(target)
    index_path, single = source / "model.safetensors.index.json", source / "model.safetensors"
    target.mkdir(parents=True, exist_ok=True)
    for path in source.iterdir():
        if path.name in ("config.json", "model.safetensors.index.json", "mtp.safetensors"):
            continue
        link = target / (MAIN_SHARD if path == single else path.name)
        if not link.exists():
            link.symlink_to(path)
    (target / "config.json").write_text((source / "config.json").read_text())
    if single.is_file():
        with safe_open(str(single), "np") as f:
            index = {"metadata": {}, "weight_map": {name: MAIN_SHARD for name in f.keys()}}
    else:
        index = json.loads(index_path.read_text())
    (target / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True))
    return target


def main() -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from argtypes import checkpoint_folder, output_folder, whole_number

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", type=checkpoint_folder, help="a checkpoint folder without an MTP head")
    parser.add_argument("target", type=output_folder,
                        help="where to put the copy with a random MTP head (links, not copies)")
    parser.add_argument("--seed", type=whole_number(0), default=0, help="seed of the random head (default 0)")
    args = parser.parse_args()
    if args.target.resolve() == args.source.resolve():  # the head would be written into the source itself
        parser.error(f"target {args.target} is the source folder; give another folder for the copy")
    print(with_random_mtp(args.source, args.target, args.seed))


if __name__ == "__main__":
    main()
