"""The SwiGLU feed-forward block: down(act(gate(x)) · up(x))."""

from dataclasses import dataclass

import numpy as np

from .activations import ACTIVATIONS
from .linear import linear, linears


@dataclass
class MLPWeights:
    gate_proj: np.ndarray  # [I, H]
    up_proj: np.ndarray  # [I, H]
    down_proj: np.ndarray  # [H, I]


def swiglu_mlp(x: np.ndarray, w: MLPWeights, hidden_act: str) -> np.ndarray:
    # x: [T, H]
    gate, up = linears(x, (w.gate_proj, w.up_proj))  # [T, I] each
    gate = ACTIVATIONS[hidden_act](gate)  # [T, I]
    return linear(gate * up, w.down_proj)  # [T, H]
