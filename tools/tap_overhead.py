"""What do golden taps cost? Time Model.forward with no tap, with a tap that discards, and recording.

    python tools/tap_overhead.py

``Model.forward(..., tap=None)`` — the default — must cost nothing: every tap site is guarded by
``if tap is not None``, so an untapped forward pays one identity test per site and builds no
name strings, closures or copies. This script shows it with numbers, on a model with the layer
shapes of Qwen3.5-0.8B (hidden 1024, DeltaNet 16×128 key and value heads, attention 8×256 with
2 key/value heads, MLP 3584; four layers [L, L, L, F], a 32k vocabulary; random fp32 weights
built in memory) and on the tiny test fixture, where Python overhead weighs the most:

* ``tap=None``  — the ordinary forward;
* ``discard``   — a tap function that does nothing: what the tap sites cost when used;
* ``record``    — golden.record's own collector, copying every intermediate;
* the guard cost of ``tap=None`` itself: (tap calls per forward, an upper bound on the guards
  evaluated) × (time of one ``is not None`` test), estimated with timeit, since a forward
  without the guards does not exist to time against.

The three variants take turns, one run each per round, so drift in the machine's speed hits
them alike; each cost is the median over rounds of that round's ratio to ``tap=None``, with
the quartiles of those ratios beside it (a minimum per variant would compare lucky moments:
on a shared machine one variant's fastest run can fall in a quiet second the others missed).
It prints; it asserts nothing.
"""

from __future__ import annotations

import argparse
import sys
import time
import timeit
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import minqwen  # noqa: E402
from minqwen.attention import AttentionWeights  # noqa: E402
from minqwen.config import config_from_dict  # noqa: E402
from minqwen.deltanet import DeltaNetWeights  # noqa: E402
from minqwen.mlp import MLPWeights  # noqa: E402
from minqwen.model import DecoderLayer, Model  # noqa: E402

QWEN3_5_0_8B_LAYERS = dict(
    model_type="qwen3_5_text", vocab_size=32768, hidden_size=1024, intermediate_size=3584, num_hidden_layers=4,
    num_attention_heads=8, num_key_value_heads=2, head_dim=256, hidden_act="silu", max_position_embeddings=4096,
    rms_norm_eps=1e-6, tie_word_embeddings=True, linear_conv_kernel_dim=4, linear_key_head_dim=128,
    linear_value_head_dim=128, linear_num_key_heads=16, linear_num_value_heads=16,
    layer_types=["linear_attention"] * 3 + ["full_attention"],
    rope_parameters=dict(rope_type="default", rope_theta=1e7, partial_rotary_factor=0.25),
)


def random_model(raw_config: dict, seed: int = 0) -> Model:
    """A minqwen Model with random weights of the config's shapes, built in memory (no checkpoint)."""
    c = config_from_dict(raw_config)
    rng = np.random.default_rng(seed)

    def w(*shape):
        fan_in = shape[-1] if len(shape) > 1 else 1
        return (rng.standard_normal(shape, dtype=np.float32) / np.sqrt(fan_in)).astype(np.float32)

    H, I = c.hidden_size, c.intermediate_size
    layers = []
    for kind in c.layer_types:
        layer = DecoderLayer(layer_type=kind, input_layernorm=w(H) * 0.1, post_attention_layernorm=w(H) * 0.1,
                             mlp=MLPWeights(gate_proj=w(I, H), up_proj=w(I, H), down_proj=w(H, I)))
        if kind == "linear_attention":
            Hv = c.linear_num_value_heads
            layer.linear_attn = DeltaNetWeights(
                in_proj_qkv=w(c.linear_conv_dim, H), in_proj_z=w(c.linear_value_dim, H),
                in_proj_b=w(Hv, H), in_proj_a=w(Hv, H), conv1d=w(c.linear_conv_dim, c.linear_conv_kernel_dim),
                A_log=np.log(rng.uniform(0.3, 4, Hv)).astype(np.float32), dt_bias=np.full(Hv, -2.5, np.float32),
                norm=np.ones(c.linear_value_head_dim, np.float32), out_proj=w(H, c.linear_value_dim),
            )
        else:
            D, Hq, Hkv = c.head_dim, c.num_attention_heads, c.num_key_value_heads
            layer.self_attn = AttentionWeights(q_proj=w(Hq * 2 * D, H), k_proj=w(Hkv * D, H), v_proj=w(Hkv * D, H),
                                               o_proj=w(H, Hq * D), q_norm=w(D) * 0.1, k_norm=w(D) * 0.1)
        layers.append(layer)
    embed = w(c.vocab_size, H) * 0.3
    return Model(c, embed, layers, w(H) * 0.1, embed)


def discard(name, value):
    pass


def recorder():
    kept = {}

    def keep(name, value):
        kept[name] = np.array(value, copy=True)

    return keep


def measure(model: Model, label: str, prompt_len: int, repeats: int) -> None:
    rng = np.random.default_rng(1)
    prompt = rng.integers(0, model.config.vocab_size, prompt_len)
    warm = model.new_cache()
    model.forward(prompt, warm)  # compiles the Numba kernels, warms caches
    next_token = [int(prompt[-1])]

    def decode(tap_kind):
        cache = warm.copy()  # outside the timed region: each run decodes from the same state
        tap = {"none": None, "discard": discard, "record": recorder()}[tap_kind]
        start = time.perf_counter()
        model.forward(next_token, cache, last_only=True, tap=tap)
        return time.perf_counter() - start

    def prefill(tap_kind):
        tap = {"none": None, "discard": discard, "record": recorder()}[tap_kind]
        start = time.perf_counter()
        model.forward(prompt, model.new_cache(), tap=tap)
        return time.perf_counter() - start

    n_sites = []
    model.forward(next_token, warm.copy(), tap=lambda name, value: n_sites.append(name))
    guard = min(timeit.repeat("tap is not None", globals={"tap": None}, number=1_000_000, repeat=5)) / 1e6

    print(f"\n{label}: {len(n_sites)} tap calls per forward")
    runs = (("decode step (T=1)", decode, repeats), (f"prefill (T={prompt_len})", prefill, max(3, repeats // 5)))
    for what, run, n in runs:
        times = {kind: [] for kind in ("none", "discard", "record")}
        for _ in range(n):
            for kind in times:
                times[kind].append(run(kind))
        base = float(np.median(times["none"]))
        guards = len(n_sites) * guard
        costs = []
        for kind in ("discard", "record"):  # per round: this variant's time over tap=None's
            ratios = np.array(times[kind]) / np.array(times["none"])
            low, mid, high = (np.percentile(ratios, [25, 50, 75]) - 1) * 100
            costs.append(f"{kind} {mid:+5.1f}% ({low:+.1f} … {high:+.1f})")
        print(f"  {what:<20} tap=None {base * 1e3:8.3f} ms | " + " | ".join(costs))
        print(f"  {'':<20} guards when tap=None: at most {len(n_sites)} × {guard * 1e9:.0f} ns = "
              f"{guards * 1e6:.2f} µs = {guards / base * 100:.4f}% of the forward")


def main(argv: list[str] | None = None) -> None:
    # No options; parsed so that --help or a mistyped option does not start the measurement.
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args(argv)
    print(f"minqwen {minqwen.__version__}, numpy {np.__version__}; medians of per-round ratios to tap=None "
          "(quartiles in brackets)")
    measure(random_model(QWEN3_5_0_8B_LAYERS), "Qwen3.5-0.8B layer shapes, 4 layers [L, L, L, F], vocab 32k",
            prompt_len=64, repeats=50)
    measure(minqwen.load(ROOT / "tests" / "fixtures" / "text_tied_fp32"), "tiny fixture text_tied_fp32 (hidden 48)",
            prompt_len=21, repeats=200)


if __name__ == "__main__":
    main()
