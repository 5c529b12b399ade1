"""The norms of Qwen3.5: two RMSNorms, and the L2 norm of the Gated DeltaNet's q and k.

* :func:`rms_norm` — the decoder's norms (input, post-attention, final, ``q_norm``, ``k_norm``)
  are *zero-centred*: the stored weight ``w`` is an offset from one, and the scale applied is
  ``1 + w``. A freshly initialised norm stores zeros. The ``1 + w`` is formed in float32 at run
  time: folding it into a bf16 weight rounds it and drifts from the reference.
* :func:`gated_rms_norm` — the Gated DeltaNet output norm is an ordinary RMSNorm (scale ``w``)
  followed by a SiLU gate from the ``in_proj_z`` projection.
* :func:`l2_normalize` — the Gated DeltaNet scales each head's q and k to unit length (no
  weight), with the reference's eps under the square root.

Each has a NumPy twin (``*_numpy``), which says it plainly; float32 inputs take a compiled
kernel that makes one pass over each row instead of NumPy's five over the whole array, each
with a temporary (a 512-token prefill of the 0.8B shape spent ~0.25 s in its norms that way).
"""

import numba
import numpy as np

from .activations import silu32, silu_numpy
from .threads import numba_does_the_products, serial_and_parallel


def normalised(x: np.ndarray, eps: float) -> np.ndarray:
    """x / rms(x) over the last axis, the part both norms share: x [..., D] → [..., D]."""
    variance = np.square(x).sum(axis=-1, keepdims=True) / x.dtype.type(x.shape[-1])  # [..., 1]: the mean square
    return x / np.sqrt(variance + x.dtype.type(eps))  # eps in x's dtype: float64 checks stay free of fp32 rounding


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    """Zero-centred RMSNorm over the last axis: x / rms(x) · (1 + weight). Float32 takes the kernel."""
    if x.dtype == weight.dtype == np.float32 and _rows_fit(x, weight):
        return _by_rows(_rms_norm_kernel, _rms_norm_kernel_parallel, x, weight, np.float32(eps))
    return rms_norm_numpy(x, weight, eps)


def gated_rms_norm(x: np.ndarray, gate: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    """RMSNorm with a plain scale, then multiplied by silu(gate). Float32 takes the kernel."""
    if x.dtype == gate.dtype == weight.dtype == np.float32 and x.shape == gate.shape and _rows_fit(x, weight):
        gate = np.ascontiguousarray(gate).reshape(-1, x.shape[-1])  # [rows, Dv], like x below
        return _by_rows(_gated_rms_norm_kernel, _gated_rms_norm_kernel_parallel, x, gate, weight, np.float32(eps))
    return gated_rms_norm_numpy(x, gate, weight, eps)


L2_EPS = 1e-6  # the reference's eps for the Gated DeltaNet's q and k


def l2_normalize(x: np.ndarray, eps: float = L2_EPS) -> np.ndarray:
    """x / sqrt(|x|² + eps) over the last axis (the reference's eps placement). Float32 takes the kernel."""
    if x.dtype == np.float32 and _rows_fit(x):
        return _by_rows(_l2_normalize_kernel, _l2_normalize_kernel_parallel, x, np.float32(eps))
    return l2_normalize_numpy(x, eps)


def rms_norm_numpy(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    """The twin of rms_norm: x / rms(x) · (1 + weight)."""
    # x: [..., D], weight: [D]
    return normalised(x, eps) * (np.float32(1.0) + weight)


def gated_rms_norm_numpy(x: np.ndarray, gate: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    """The twin of gated_rms_norm: weight · x / rms(x) · silu(gate)."""
    # x, gate: [..., Dv], weight: [Dv]
    return weight * normalised(x, eps) * silu_numpy(gate)  # (silu itself would take the compiled kernel)


def l2_normalize_numpy(x: np.ndarray, eps: float = L2_EPS) -> np.ndarray:
    """The twin of l2_normalize."""
    return x / np.sqrt(np.sum(x * x, axis=-1, keepdims=True) + x.dtype.type(eps))


# --------------------------------------------------------------------------- compiled, a row at a time


@numba.njit(inline="always")
def _sum_of_squares(row):
    """Σ row², summed in float64 (NumPy's pairwise float32 sum and this differ by float32 rounding)."""
    total = 0.0
    for i in range(row.size):
        total += np.float64(row[i]) * np.float64(row[i])
    return total


@numba.njit(inline="always")
def _root_mean_square(row, eps):
    """√(mean(row²) + eps) in float32."""
    return np.sqrt(np.float32(_sum_of_squares(row) / row.size) + eps)


@numba.njit(inline="always")
def rms_norm_row(row, weight, eps, result):
    """result = row / √(mean(row²) + eps) · (1 + weight), for one row [D] (also attention's decode step's)."""
    root = _root_mean_square(row, eps)
    for i in range(row.size):
        result[i] = row[i] / root * (np.float32(1.0) + weight[i])


def _rms_norm_loops(x, weight, eps, out):
    """out[r] = x[r] / √(mean(x[r]²) + eps) · (1 + weight), over the rows of x [R, D]."""
    for r in numba.prange(x.shape[0]):
        rms_norm_row(x[r], weight, eps, out[r])


@numba.njit(inline="always")
def gated_rms_norm_row(row, gate, weight, eps, result):
    """result = weight · row / √(mean(row²) + eps) · silu(gate), for one row [Dv] (also deltanet's decode step's)."""
    root = _root_mean_square(row, eps)
    for i in range(row.size):
        result[i] = weight[i] * (row[i] / root) * silu32(gate[i])  # silu32: activations.silu's arithmetic


@numba.njit(inline="always")
def l2_normalize_row(row, eps, result):
    """result = row / √(|row|² + eps), for one row [D] (also deltanet's decode step's)."""
    root = np.sqrt(np.float32(_sum_of_squares(row)) + eps)
    for i in range(row.size):
        result[i] = row[i] / root


def _gated_rms_norm_loops(x, gate, weight, eps, out):
    """out[r] = weight · x[r] / √(mean(x[r]²) + eps) · silu(gate[r]), over the rows of x [R, Dv]."""
    for r in numba.prange(x.shape[0]):
        gated_rms_norm_row(x[r], gate[r], weight, eps, out[r])


def _l2_normalize_loops(x, eps, out):
    """out[r] = x[r] / √(|x[r]|² + eps), over the rows of x [R, D]."""
    for r in numba.prange(x.shape[0]):
        l2_normalize_row(x[r], eps, out[r])


_rms_norm_kernel, _rms_norm_kernel_parallel = serial_and_parallel(_rms_norm_loops, error_model="numpy")
_l2_normalize_kernel, _l2_normalize_kernel_parallel = serial_and_parallel(_l2_normalize_loops, error_model="numpy")
_gated_rms_norm_kernel, _gated_rms_norm_kernel_parallel = serial_and_parallel(_gated_rms_norm_loops,
                                                                              error_model="numpy")
# Values worth both cores when Numba owns them (as for the activations: a decode step's norms
# of 1,024 values stay on one, a prompt's take both).
PARALLEL_FROM = 1 << 14


def _rows_fit(x: np.ndarray, weight: np.ndarray | None = None) -> bool:
    """Whether the kernels may take x (and weight): non-empty rows, a weight of one row's length.
    Anything else goes to the twin, which broadcasts or raises as NumPy does (the kernels do
    not check their reads)."""
    return x.ndim >= 1 and x.shape[-1] > 0 and (weight is None or weight.shape == x.shape[-1:])


def _by_rows(kernel, parallel, x: np.ndarray, *arguments) -> np.ndarray:
    """kernel(x as rows [R, D], *arguments, out [R, D]); returns out shaped like x."""
    rows = np.ascontiguousarray(x).reshape(-1, x.shape[-1])  # [R, D]
    out = np.empty_like(rows)
    (parallel if rows.size >= PARALLEL_FROM and numba_does_the_products() else kernel)(rows, *arguments, out)
    return out.reshape(x.shape)
