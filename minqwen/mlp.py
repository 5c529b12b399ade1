"""The SwiGLU feed-forward block: down(act(gate(x)) · up(x))."""

from dataclasses import dataclass

import numpy as np

from .activations import ACTIVATIONS, SILU_NAMES, silu_times
from .linear import linear, linears


@dataclass
class MLPWeights:
    gate_proj: np.ndarray  # [I, H]
    up_proj: np.ndarray  # [I, H]
    down_proj: np.ndarray  # [H, I]


def swiglu_mlp(x: np.ndarray, w: MLPWeights, hidden_act: str) -> np.ndarray:
    # x: [T, H]
    gate, up = linears(x, (w.gate_proj, w.up_proj))  # [T, I] each
    if hidden_act in SILU_NAMES:  # every Qwen3.5 text model
        hidden = silu_times(gate, up)  # [T, I]: silu(gate) · up, one pass
    else:
        hidden = ACTIVATIONS[hidden_act](gate) * up  # [T, I]
    return linear(hidden, w.down_proj)  # [T, H]
