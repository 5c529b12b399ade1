"""The two RMSNorms of Qwen3.5.

* :func:`rms_norm` — the decoder's norms (input, post-attention, final, ``q_norm``, ``k_norm``)
  are *zero-centred*: the stored weight ``w`` is an offset from one, and the scale applied is
  ``1 + w``. A freshly initialised norm stores zeros. The ``1 + w`` is formed in float32 at run
  time: folding it into a bf16 weight rounds it and drifts from the reference.
* :func:`gated_rms_norm` — the Gated DeltaNet output norm is an ordinary RMSNorm (scale ``w``)
  followed by a SiLU gate from the ``in_proj_z`` projection.
"""

import numpy as np

from .activations import silu


def normalised(x: np.ndarray, eps: float) -> np.ndarray:
    """x / rms(x) over the last axis, the part both norms share: x [..., D] → [..., D]."""
    variance = np.square(x).sum(axis=-1, keepdims=True) / x.dtype.type(x.shape[-1])  # [..., 1]: the mean square
    return x / np.sqrt(variance + x.dtype.type(eps))  # eps in x's dtype: float64 checks stay free of fp32 rounding


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    """Zero-centred RMSNorm over the last axis: x / rms(x) · (1 + weight)."""
    # x: [..., D], weight: [D]
    return normalised(x, eps) * (np.float32(1.0) + weight)


def gated_rms_norm(x: np.ndarray, gate: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    """RMSNorm with a plain scale, then multiplied by silu(gate)."""
    # x, gate: [..., Dv], weight: [Dv]
    return weight * normalised(x, eps) * silu(gate)
