# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Chapter 0 · A map of the code
#
# This course takes Qwen3.5 apart one piece at a time. In every chapter we write a piece
# ourselves in plain NumPy, then check it — with asserts, not by eye — against two things:
#
# * **minqwen**, the readable implementation this course ships with, and
# * **reference fixtures**: small random checkpoints in `tests/fixtures/` together with what
#   Hugging Face transformers (the reference implementation) computed for them.
#
# When both agree with what we wrote, we have understood that piece well enough to rebuild
# it. By chapter 8 we will have rebuilt the whole model and reproduced the reference logits.
#
# This first chapter is the map: which idea lives in which file, what a checkpoint contains,
# and what the stack of layers looks like.

# %%
import importlib

import numpy as np

import course
import minqwen
from minqwen.checkpoint import Checkpoint
from minqwen.config import config_from_dict

np.set_printoptions(precision=4, suppress=True, linewidth=110)

# %% [markdown]
# ## The path of one token
#
# A decoder-only language model turns a list of token ids into, for each position, a score
# ("logit") for every possible next token. In Qwen3.5 the path is:
#
# ```
# ids ─ embed_tokens ─┬─ repeat for each layer ─────────────────────────────────┐
#                     │  x = x + token_mixer(input_layernorm(x))                │
#                     │        Gated DeltaNet (3 layers in 4) or                │
#                     │        gated full attention (1 layer in 4)              │
#                     │  x = x + mlp(post_attention_layernorm(x))               │
#                     └─────────────────────────────────────────────────────────┘
#                       ─ norm ─ lm_head ─ logits
# ```
#
# `x` is the *residual stream*: every layer reads it and adds something to it. The token
# mixer is the only place where positions talk to each other; everything else works on each
# position alone. Qwen3.5 is a **hybrid**: most mixers are Gated DeltaNet layers (a kind of
# linear attention with a fixed-size memory), and every fourth is ordinary softmax attention
# with a gate. Why mix the two is the question of chapter 5.
#
# ## Which file holds which idea
#
# minqwen names its files after the concepts. The first line of each module's docstring says
# what it holds, so let us print the map from the code itself rather than copy it here (a copy
# would go stale).

# %%
MAP = {
    "config": "0 · what the numbers in config.json mean",
    "checkpoint": "0 · reading safetensors files",
    "tokenizer": "1 · text ↔ ids",
    "chat_template": "1 · a conversation as one string",
    "norms": "2 · zero-centred RMSNorm",
    "rope": "3 · rotary, partial rotary, M-RoPE",
    "attention": "4 · gated attention, the KV cache",
    "deltanet": "5, 6 · the delta rule, the short convolution",
    "mlp": "7 · SwiGLU",
    "moe": "7 · sparse mixture of experts",
    "model": "8 · the whole stack and its cache",
    "sampling": "9 · choosing the next token",
    "generate": "9 · the generation loop, chat",
    "golden": "10 · golden outputs for your own port",
    "mtp": "11 · the MTP head, speculative decoding",
    "image": "12 · pictures into patches",
    "vision": "12 · the vision tower",
}
for name, chapter in MAP.items():
    module = importlib.import_module(f"minqwen.{name}")
    first_line = module.__doc__.strip().splitlines()[0]
    print(f"minqwen/{name + '.py':<17} ch. {chapter:<38} {first_line[:70]}")

# %% [markdown]
# ## What a checkpoint is
#
# A checkpoint is a folder: `config.json` (the shape of the model) and one or more
# `.safetensors` files (the weights). A safetensors file is a small JSON header — name, dtype,
# shape and byte offsets of every tensor — followed by the raw bytes. Let us open the
# smallest fixture and look at the names.

# %%
folder, expected = course.fixture("text_tied_fp32")
ckpt = Checkpoint(folder)
names = ckpt.names
print(f"{len(names)} tensors in {folder.name}; layer 0 and layer 3 hold:")
for name in names:
    if name.startswith(("model.layers.0.", "model.layers.3.")) or not name.startswith("model.layers."):
        print(f"  {name:<52} {ckpt.where[name].dtype_name(name):>4} {list(ckpt.where[name].shape(name))}")

# %% [markdown]
# Two kinds of layer show up: layer 0 has `linear_attn.*` (Gated DeltaNet), layer 3 has
# `self_attn.*` (attention). Both have the same `mlp.*` and two norms. There is no
# `lm_head.weight`: this model *ties* its output layer to the embedding matrix (chapter 2).
#
# Real Qwen3.5 releases are multimodal and put the text model under `model.language_model.`
# (with `model.visual.*` for the vision tower and `mtp.*` for a multi-token-prediction head);
# text-only checkpoints saved by transformers use `model.`. minqwen reads both.
#
# ## The config
#
# `config.json` fixes every size. minqwen reads it into one validated dataclass; every field
# transformers knows is listed in `minqwen.config.TEXT_FIELDS` with what minqwen does with it.

# %%
model = minqwen.load(folder)
c = model.config
for field in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
              "linear_num_key_heads", "linear_num_value_heads", "linear_key_head_dim", "linear_value_head_dim",
              "linear_conv_kernel_dim", "intermediate_size", "vocab_size", "partial_rotary_factor"):
    print(f"{field:<26} {getattr(c, field)}")
print("layer_types:", c.layer_types)
print("\nwhat minqwen does with 'attn_output_gate':", minqwen.config.TEXT_FIELDS["attn_output_gate"])

# %% [markdown]
# ## Counting parameters by hand
#
# Knowing the shapes is most of understanding a model. Below, the parameter count of each
# kind of layer written out from the config alone — each line is one weight matrix, and the
# names are the checkpoint's. We check it against the arrays minqwen actually loaded.

# %%
def deltanet_params(c):
    key, value = c.linear_num_key_heads * c.linear_key_head_dim, c.linear_num_value_heads * c.linear_value_head_dim
    return (
        (2 * key + value) * c.hidden_size  # in_proj_qkv: q, k and v in one matrix
        + value * c.hidden_size  # in_proj_z: the output gate
        + 2 * c.linear_num_value_heads * c.hidden_size  # in_proj_b (write strength), in_proj_a (decay)
        + (2 * key + value) * c.linear_conv_kernel_dim  # conv1d: K taps per channel
        + 2 * c.linear_num_value_heads  # A_log, dt_bias
        + c.linear_value_head_dim  # norm
        + c.hidden_size * value  # out_proj
    )


def attention_params(c):
    q, kv = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
    bias = (2 * q + 2 * kv + c.hidden_size) if c.attention_bias else 0
    return 2 * q * c.hidden_size + 2 * kv * c.hidden_size + c.hidden_size * q + 2 * c.head_dim + bias


def mlp_params(c):
    return 3 * c.hidden_size * c.intermediate_size  # gate_proj, up_proj, down_proj


def layer_params(c, kind):
    mixer = deltanet_params(c) if kind == "linear_attention" else attention_params(c)
    return mixer + mlp_params(c) + 2 * c.hidden_size  # + the two norms


def total_params(c):
    head = 0 if c.tie_word_embeddings else c.vocab_size * c.hidden_size
    return c.vocab_size * c.hidden_size + head + sum(layer_params(c, k) for k in c.layer_types) + c.hidden_size


from minqwen.summary import count  # counts the elements of the arrays minqwen holds

for i, layer in enumerate(model.layers):
    loaded = count(layer.linear_attn) + count(layer.self_attn) + count(layer.mlp) + 2 * c.hidden_size
    print(f"layer {i} ({layer.layer_type:<16}): {layer_params(c, layer.layer_type):>7,} parameters")
    assert loaded == layer_params(c, layer.layer_type)

# %% [markdown]
# The same arithmetic on the real **Qwen3.5-0.8B** text config (copied from its public
# `config.json`; we have no need of its weights to count them). Its layer pattern is
# `[DeltaNet, DeltaNet, DeltaNet, attention] × 6`, derived from `full_attention_interval: 4`.

# %%
REAL_0_8B = {
    "model_type": "qwen3_5_text", "hidden_size": 1024, "intermediate_size": 3584, "num_hidden_layers": 24,
    "num_attention_heads": 8, "num_key_value_heads": 2, "head_dim": 256, "linear_num_key_heads": 16,
    "linear_num_value_heads": 16, "linear_key_head_dim": 128, "linear_value_head_dim": 128,
    "linear_conv_kernel_dim": 4, "vocab_size": 248320, "tie_word_embeddings": True, "full_attention_interval": 4,
    "rope_parameters": {"rope_type": "default", "rope_theta": 1e7, "partial_rotary_factor": 0.25,
                        "mrope_section": [11, 11, 10]},
}
real = config_from_dict(REAL_0_8B)
n = total_params(real)
embed = real.vocab_size * real.hidden_size
print("layer types:", "".join("L" if k == "linear_attention" else "F" for k in real.layer_types))
print(f"text model: {n / 1e6:.1f} M parameters, of which the (tied) embedding {embed / 1e6:.1f} M")
print(f"  one DeltaNet layer {layer_params(real, 'linear_attention') / 1e6:.2f} M, "
      f"one attention layer {layer_params(real, 'full_attention') / 1e6:.2f} M")
assert abs(n - 752e6) / 752e6 < 0.01  # the published figure: about 752 M

# %% [markdown]
# A third of the small model is its vocabulary: 248,320 rows of 1,024 numbers. That share
# shrinks in the larger members of the family, whose vocabulary is the same.
#
# ## The layer map, as a picture

# %%
plt = course.pyplot()
if plt is not None:
    models = [("Qwen3.5-0.8B", real), ("this fixture", c)]
    fig, axes = plt.subplots(2, 1, figsize=(10, 3.8), gridspec_kw={"height_ratios": [1, 1]})
    colours = {"linear_attention": "#4c9be8", "full_attention": "#e8744c"}
    for ax, (title, cfg) in zip(axes, models):
        for i, kind in enumerate(cfg.layer_types):
            mixer = deltanet_params(cfg) if kind == "linear_attention" else attention_params(cfg)
            share = mixer / layer_params(cfg, kind)  # the mixer's part of the layer, the rest is MLP
            ax.add_patch(plt.Rectangle((i, 0), 0.9, share, color=colours[kind]))
            ax.add_patch(plt.Rectangle((i, share), 0.9, 1 - share, color="#cccccc"))
            ax.text(i + 0.45, share / 2, "L" if kind == "linear_attention" else "F", ha="center", va="center",
                    color="white", fontweight="bold")
        ax.set_xlim(0, len(cfg.layer_types)), ax.set_ylim(0, 1), ax.set_yticks([])
        ax.set_xticks(np.arange(len(cfg.layer_types)) + 0.45, range(len(cfg.layer_types)))
        ax.set_title(f"{title}: {len(cfg.layer_types)} layers", loc="left", fontsize=10)
    handles = [plt.Rectangle((0, 0), 1, 1, color=col) for col in (*colours.values(), "#cccccc")]
    fig.legend(handles, ["Gated DeltaNet (L)", "gated attention (F)", "MLP"], loc="upper right", ncol=3, fontsize=9)
    axes[1].set_xlabel("layer index · bar height: share of the layer's parameters in the token mixer vs the MLP")
    fig.tight_layout(rect=(0, 0, 1, 0.92))
    course.save(fig, "00_layer_map.png")

# %% [markdown]
# ## The promise of this course
#
# Run the fixture's prompt through minqwen and compare with what transformers computed. This
# is the bar every chapter holds its own code to: the same numbers to 1e-4.

# %%
logits = model.forward(expected["token_ids"])  # [T, vocab]
print("prompt:", expected["token_ids"].tolist())
print("logits", logits.shape, "max |minqwen − transformers| =", np.abs(logits - expected["logits"]).max())
np.testing.assert_allclose(logits, expected["logits"], rtol=0, atol=1e-4)

# %% [markdown]
# ## The fixtures
#
# Each fixture exercises something different. They are tiny (hidden size 48) so that every
# chapter runs in seconds, yet each has the real architecture. The `moe_*` ones are the
# mixture-of-experts members of the family (chapter 7); the others are dense.

# %%
for path in sorted(course.FIXTURES.iterdir()):
    if (path / "expected.safetensors").is_file():
        fc = minqwen.config.load_config(path)
        kinds = "".join("L" if k == "linear_attention" else "F" for k in fc.layer_types)
        mlp = f"MoE {fc.num_experts} experts, top-{fc.num_experts_per_tok}" if fc.is_moe else "dense MLP"
        print(f"{path.name:<32} layers {kinds:<7} tied={fc.tie_word_embeddings!s:<5} "
              f"bias={fc.attention_bias!s:<5} conv K={fc.linear_conv_kernel_dim} "
              f"value:key heads={fc.linear_num_value_heads // fc.linear_num_key_heads} "
              f"rotary={fc.partial_rotary_factor:<4} {mlp}")

# %% [markdown]
# ## Exercises
#
# Solutions are in `walkthrough/solutions/00_map.py`; try first.
#
# **Exercise 0.1.** Using only `layer_params` and the config, what fraction of Qwen3.5-0.8B's
# *non-embedding* parameters (every parameter but the embedding matrix, the final norm
# included) sit in MLPs, in DeltaNet mixers and in attention mixers? Fill in `exercise_0_1`
# so that it returns the three fractions (they add up to a little under 1: norms are the rest).
#
# **Exercise 0.2.** `minqwen inspect` (the command line) prints a table like ours. Run
# `python -m minqwen inspect --model tests/fixtures/text_tied_fp32` and find the number that
# says how much memory the KV cache needs at the model's whole context (512 tokens for this
# fixture). Which layers contribute to it?

# %%
def exercise_0_1(c):
    """Return (mlp_share, deltanet_share, attention_share) of the non-embedding parameters."""
    return None  # your code here


answer = exercise_0_1(real)
if answer is None:
    print("Exercise 0.1: not attempted yet.")
else:
    # A share times the non-embedding total, divided by one layer's count of that kind, is the
    # number of layers of that kind. (rtol 1e-5: leaving out the final norm's 1,024 parameters
    # moves a share by 2e-6 and is accepted; leaving out all 49 norms moves it by 1e-4 and is not.)
    body = total_params(real) - real.vocab_size * real.hidden_size
    layers = [share * body / per_layer for share, per_layer in
              zip(answer, (mlp_params(real), deltanet_params(real), attention_params(real)))]
    counts = (real.num_hidden_layers, real.layer_types.count("linear_attention"), real.layer_types.count("full_attention"))
    assert np.allclose(layers, counts, rtol=1e-5), f"these shares make {layers} layers of MLP, DeltaNet, attention"
    print("Exercise 0.1: correct —", ", ".join(f"{s:.1%}" for s in answer))
