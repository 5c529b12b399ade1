"""Solutions to chapter 0's exercises. Run: python walkthrough/solutions/00_map.py"""

import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # walkthrough/, for `course`
import course  # noqa: E402
from minqwen.config import config_from_dict  # noqa: E402

REAL_0_8B = config_from_dict({
    "model_type": "qwen3_5_text", "hidden_size": 1024, "intermediate_size": 3584, "num_hidden_layers": 24,
    "num_attention_heads": 8, "num_key_value_heads": 2, "head_dim": 256, "linear_num_key_heads": 16,
    "linear_num_value_heads": 16, "linear_key_head_dim": 128, "linear_value_head_dim": 128,
    "linear_conv_kernel_dim": 4, "vocab_size": 248320, "tie_word_embeddings": True, "full_attention_interval": 4,
})


# Exercise 0.1 -------------------------------------------------------------------------------
# The per-kind counts from the chapter, then shares of everything but the embedding.
def deltanet_params(c):
    key, value = c.linear_num_key_heads * c.linear_key_head_dim, c.linear_num_value_heads * c.linear_value_head_dim
    return ((2 * key + value) * c.hidden_size + value * c.hidden_size + 2 * c.linear_num_value_heads * c.hidden_size
            + (2 * key + value) * c.linear_conv_kernel_dim + 2 * c.linear_num_value_heads + c.linear_value_head_dim
            + c.hidden_size * value)


def attention_params(c):
    q, kv = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
    return 2 * q * c.hidden_size + 2 * kv * c.hidden_size + c.hidden_size * q + 2 * c.head_dim


def exercise_0_1(c):
    n_delta, n_attn = c.layer_types.count("linear_attention"), c.layer_types.count("full_attention")
    mlp = c.num_hidden_layers * 3 * c.hidden_size * c.intermediate_size
    delta = n_delta * deltanet_params(c)
    attn = n_attn * attention_params(c)
    norms = c.num_hidden_layers * 2 * c.hidden_size + c.hidden_size
    total = mlp + delta + attn + norms
    return mlp / total, delta / total, attn / total


mlp, delta, attn = exercise_0_1(REAL_0_8B)
print(f"Exercise 0.1: of Qwen3.5-0.8B's non-embedding parameters, MLPs {mlp:.1%}, "
      f"DeltaNet mixers {delta:.1%}, attention mixers {attn:.1%}")
assert abs(mlp + delta + attn - 1) < 0.001 and mlp > 0.5

# Exercise 0.2 -------------------------------------------------------------------------------
out = subprocess.run([sys.executable, "-m", "minqwen", "inspect", "--model", str(course.FIXTURES / "text_tied_fp32")],
                     capture_output=True, text=True, check=True).stdout
kv_line = next(line for line in out.splitlines() if "KV cache" in line)
print("Exercise 0.2:", kv_line.strip())
print("  Only the attention layers (here layer 3) keep a KV cache; the DeltaNet layers' state is constant.")
assert "(1 attention layer)" in kv_line
