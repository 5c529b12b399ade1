"""Activation functions, by the names config.json uses for ``hidden_act``."""

import math

import numba
import numpy as np

from .linear import _float32_from_bits  # the bit-cast that bf16 widening uses too
from .threads import numba_does_the_products, serial_and_parallel


def silu(x: np.ndarray) -> np.ndarray:
    """x · sigmoid(x), also called swish. Float32 arrays take the compiled kernel below."""
    if x.dtype == np.float32:
        return _elementwise(_silu_kernel, x, _silu_kernel_parallel)
    return silu_numpy(x)


def sigmoid(x: np.ndarray) -> np.ndarray:
    """1 / (1 + exp(−x)). Float32 arrays take the compiled kernel below."""
    if x.dtype == np.float32:
        return _elementwise(_sigmoid_kernel, x, _sigmoid_kernel_parallel)
    return sigmoid_numpy(x)


def silu_times(gate: np.ndarray, up: np.ndarray) -> np.ndarray:
    """silu(gate) · up, the gating of a SwiGLU MLP, in one pass over float32 arrays of one shape.

    The same values as ``silu(gate) * up`` bit for bit (the same float32 steps), without the
    second pass: NumPy's product of a prompt's [T, I] arrays runs on one core and, at the
    0.8B shape's 512 tokens, took ~1.4 ms a layer of a ~75 ms layer.
    """
    if not (gate.dtype == up.dtype == np.float32 and gate.shape == up.shape):
        return silu(gate) * up
    flat_gate, flat_up = np.ascontiguousarray(gate).reshape(-1), np.ascontiguousarray(up).reshape(-1)
    out = np.empty_like(flat_gate)
    big = flat_gate.size >= PARALLEL_FROM and numba_does_the_products()
    (_silu_times_kernel_parallel if big else _silu_times_kernel)(flat_gate, flat_up, out)
    return out.reshape(gate.shape)


def silu_numpy(x: np.ndarray) -> np.ndarray:
    """The twin of the compiled silu: x · sigmoid(x)."""
    return x * sigmoid_numpy(x)


def silu_times_numpy(gate: np.ndarray, up: np.ndarray) -> np.ndarray:
    """The twin of silu_times: silu(gate), then the product, in NumPy."""
    return silu_numpy(gate) * up


def sigmoid_numpy(x: np.ndarray) -> np.ndarray:
    """1 / (1 + exp(−x)), in place on one temporary: torch's formula, step for step (the results
    still differ in the last place where NumPy's exp and torch's round differently).

    Below x ≈ −88 (float32) exp(−x) overflows to inf and 1 / (1 + inf) = 0, the right limit:
    the overflow is expected, not an error.
    """
    e = np.empty_like(x)  # the one temporary, and the result
    with np.errstate(over="ignore"):
        np.exp(np.negative(x, out=e), out=e)
    e += 1
    return np.reciprocal(e, out=e)


# --------------------------------------------------------------------------- compiled float32 exp
#
# Why minqwen computes exp itself: NumPy's float32 exp is fastest with AVX-512; with AVX2 alone
# (NumPy 2.4.6, X86_V3 dispatch) it took ~1 ns a value here, without either ~2-3 ns. The
# sigmoids and SiLUs of a 512-token prefill of the 0.8B shape apply it to ~126 M values
# (per token: 11,792 in each of 18 Gated DeltaNet layers, 5,632 in each of 6 attention layers).
# Numba cannot vectorize a call to the C library's expf, so here is exp in plain arithmetic,
# which LLVM turns into vector code (a sigmoid 0.66 ns a value here, against NumPy's 1.0 with
# AVX-512 and 1.9 with AVX2 alone):
#
#   exp(x) = 2^n · exp(r),   n = round(x / ln 2),   r = x − n · ln 2 ∈ [−ln2/2, ln2/2]
#
# exp(r) from its Taylor series to r⁷/7! (the next term is at most 7.31e-9 of the result on that
# interval, under an eighth of float32's unit roundoff), 2^n built from its bits. On 4 million evenly
# spaced float32 values over [−87.3, 88.7] it is within 1.25 units in the last place of the
# exact value (tests/test_activations.py).

_LN2_HI = np.float32(2839 / 4096)  # ln 2 to 12 significant bits, so that n · _LN2_HI is exact
_LN2_LO = np.float32(math.log(2) - 2839 / 4096)  # the rest of ln 2
_LOG2_E = np.float32(1 / math.log(2))
_F = np.float32


@numba.njit(inline="always")
def _pow2(k):
    """2^k for −126 ≤ k ≤ 127: the float32 whose exponent field is k + 127."""
    return _float32_from_bits(np.uint32(k + 127) << np.uint32(23))


@numba.njit(inline="always")
def _exp32(x):
    """exp(x) for a float32 x, in arithmetic LLVM can vectorize (see above)."""
    # Outside [−104, 89] the result is 0 or inf anyway; the clamp keeps n within what two
    # factors of _pow2 can build. NaN passes through (every comparison with NaN is false).
    x = min(max(x, _F(-104.0)), _F(89.0))
    n = np.int32(x * _LOG2_E + (_F(0.5) if x >= 0 else _F(-0.5)))  # round to nearest
    r = (x - _F(n) * _LN2_HI) - _F(n) * _LN2_LO  # |r| ≤ ln2/2, and exact to float32 rounding
    p = _F(1.0) + r * (_F(1.0) + r * (_F(1 / 2) + r * (_F(1 / 6) + r * (_F(1 / 24) + r * (
        _F(1 / 120) + r * (_F(1 / 720) + r * _F(1 / 5040)))))))  # exp(r), Horner form
    half = n >> 1  # 2^n as 2^half · 2^(n − half): n runs from −150 to 128, past one factor's range
    return p * _pow2(half) * _pow2(n - half)


@numba.njit(inline="always")
def sigmoid32(x):
    """1 / (1 + exp(−x)) for one float32 value: the compiled sigmoid's arithmetic, for other kernels to share."""
    return _F(1.0) / (_F(1.0) + _exp32(-x))


@numba.njit(inline="always")
def silu32(x):
    """x · sigmoid(x) for one float32 value: the compiled SiLU's arithmetic, for other kernels to share."""
    return x * sigmoid32(x)


@numba.njit(inline="always")
def softplus32(x):
    """log(1 + exp(x)) for one float32 value, x itself above 20 (:func:`softplus`'s rule), for kernels to share."""
    return x if x > _F(20.0) else np.log1p(np.exp(x))


def _sigmoid_loops(x, out):
    """out = 1 / (1 + exp(−x)) over flat float32 arrays."""
    for i in numba.prange(x.size):
        out[i] = sigmoid32(x[i])


def _silu_loops(x, out):
    """out = x · sigmoid(x) over flat float32 arrays."""
    for i in numba.prange(x.size):
        out[i] = silu32(x[i])


def _silu_times_loops(gate, up, out):
    """out = silu(gate) · up over flat float32 arrays: the steps of _silu_loops, then the product."""
    for i in numba.prange(gate.size):
        out[i] = silu32(gate[i]) * up[i]


# error_model="numpy": a float division by zero gives inf, as in NumPy, instead of a Python
# exception (whose check alone stops LLVM from vectorizing the loop).
_sigmoid_kernel, _sigmoid_kernel_parallel = serial_and_parallel(_sigmoid_loops, error_model="numpy")
_silu_kernel, _silu_kernel_parallel = serial_and_parallel(_silu_loops, error_model="numpy")
_silu_times_kernel, _silu_times_kernel_parallel = serial_and_parallel(_silu_times_loops, error_model="numpy")
# Values worth both cores, when Numba owns them (after a BLAS product OpenBLAS's spinning
# threads hold the other core: threads.py). SiLU inside one_blas_thread, Intel Xeon VM, 2
# threads: 2^12 values 2.9 µs either way, 2^14 10.3 µs serial against 6.6 parallel, 2^18 164
# against 88. A decode step's calls (3,584 values at the 0.8B shape) stay serial; a prompt's
# (1.8-3.1 M) and most of a speculative verify's (from 3 tokens on, 5 in the MLP) take both cores.
PARALLEL_FROM = 1 << 14


def _elementwise(kernel, x: np.ndarray, parallel=None) -> np.ndarray:
    """kernel(flat x, flat out) over any shape or strides of x; returns out shaped like x.

    ``parallel``: the same loop's parallel build (each value is computed alike in both), for
    large arrays while Numba owns the cores.
    """
    flat = np.ascontiguousarray(x).reshape(-1)
    out = np.empty_like(flat)
    if parallel is not None and flat.size >= PARALLEL_FROM and numba_does_the_products():
        kernel = parallel
    kernel(flat, out)
    return out.reshape(x.shape)


def softplus(x: np.ndarray) -> np.ndarray:
    """log(1 + exp(x)), stable for large |x|. torch switches to x itself above 20; so do we."""
    return np.where(x > 20, x, np.log1p(np.exp(np.minimum(x, 20)))).astype(x.dtype, copy=False)


def gelu(x: np.ndarray) -> np.ndarray:
    """The exact GELU, x · Φ(x), with Φ from the error function. Float32 arrays take the
    compiled kernel below."""
    if x.dtype == np.float32:
        return _elementwise(_gelu_kernel, x)
    return gelu_numpy(x)


def gelu_numpy(x: np.ndarray) -> np.ndarray:
    """The twin of the compiled gelu: 0.5 · x · (1 + erf(x / √2)), erf from Python's math
    module, one value at a time (NumPy has no erf). Slow: ~120 ns a value here."""
    erf = np.vectorize(math.erf, otypes=[np.float64])
    return (0.5 * x * (1 + erf(x / math.sqrt(2)))).astype(x.dtype, copy=False)


# The same steps as the twin, for a float32 x: x / √2 in float32, erf in float64 (Numba's
# math.erf), the product in float64, rounded once to float32. It stays a call per value (LLVM
# cannot vectorize it), ~18 ns here against the twin's ~120: the merger of a 720 × 1000 photo
# applies it to 2.1 M values (682 merged patches × 3072).
@numba.njit(cache=True)
def _gelu_kernel(x, out):
    """out = 0.5 · x · (1 + erf(x / √2)) over flat float32 arrays."""
    for i in range(x.size):
        scaled = x[i] / _F(math.sqrt(2))  # float32, as NumPy divides a float32 array by a Python float
        out[i] = _F(0.5 * np.float64(x[i]) * (1.0 + math.erf(np.float64(scaled))))


def gelu_tanh(x: np.ndarray) -> np.ndarray:
    """GELU's tanh approximation (transformers' ``gelu_pytorch_tanh``):
    0.5 · x · (1 + tanh(√(2/π) · (x + 0.044715 · x³))).

    The constants in x's own dtype, as torch takes them: float32 ones would put a float64
    model's activations ~1e-8 (and its logits ~1e-7) off torch's float64 GELU.
    Step by step in place on one temporary, the result: a vision block applies it to
    [patches, 3072] values, 33 MB for a 720 × 1000 photo — above glibc's mmap threshold, so
    each further temporary would be mapped and page-faulted in afresh (49 → 27 ms there,
    tools/measurements.md)."""
    c, k, half = (x.dtype.type(v) for v in (math.sqrt(2 / math.pi), 0.044715, 0.5))
    y = x * k
    y *= x
    y *= x
    y += x  # x + 0.044715 · x³
    y *= c
    np.tanh(y, out=y)
    y += 1
    y *= x
    y *= half  # exact (a power of two): the same as 0.5 · x · (1 + tanh)
    return y


def relu(x: np.ndarray) -> np.ndarray:
    return np.maximum(x, 0)


ACTIVATIONS = {"silu": silu, "swish": silu, "gelu": gelu, "gelu_pytorch_tanh": gelu_tanh, "relu": relu}
SILU_NAMES = ("silu", "swish")  # hidden_act values that mean SiLU: kernels may fuse it into a pass
