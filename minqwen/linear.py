"""The projection every layer is made of: y = x · Wᵀ (+ b), with W stored [out, in] as in the checkpoint.

Weights are either float32 arrays (NumPy hands them to BLAS), or — in the bf16-resident mode
(``minqwen.load(path, dtype="bfloat16")``) — the checkpoint's bf16 values kept as they are,
half the memory and half the bytes a decode step must read. bf16 is the top half of a
float32, so widening is exact: shift the 16 bits left by 16 and read the result as a float32.

For bf16 weights:

* :func:`linear_bf16_numpy` — the definition: widen, then multiply. Slow and clear.
* :func:`_bf16_rows_kernel` — Numba: walks each weight row once, widening on the fly and
  accumulating in float32 for every input row at once (decode has 1 row, a speculative
  verify a few). This is what decoding runs; tests hold it to the NumPy twin.
* for many input rows (a prefill), blocks of weight rows are widened to float32 and handed
  to BLAS, which is compute-bound there anyway.

For float32 weights, one input row (a decode step) and many (a prefill) go to BLAS. A few
rows — a speculative verify of 2 to 15 positions — go to :func:`_f32_rows_kernel`, which
reads each weight row once for all of them: OpenBLAS's GEMM for 2 rows was measured here at
3–5× the time of one row's GEMV (its blocking is made for many rows), the kernel at 1.0–1.15×
(a whole 2-position forward of the 0.8B shape measured at 1.03× a decode step).
Its twin is the plain product ``x @ W.T``.
"""

from __future__ import annotations

import ml_dtypes
import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic

from .threads import serial_and_parallel

BF16 = np.dtype(ml_dtypes.bfloat16)
# At or above this many input rows, widen blocks of W and use BLAS instead of the row kernel.
BLAS_ROWS = 16
WIDEN_BLOCK = 1024  # weight rows widened at a time: a few MB of float32 scratch


def numba_multiplies(weight_dtype, n_rows: int) -> bool:
    """Whether :func:`linear` hands ``n_rows`` input rows times weights of this dtype to a Numba kernel."""
    return (weight_dtype == BF16 and n_rows < BLAS_ROWS) or (weight_dtype == np.float32 and 1 < n_rows < BLAS_ROWS)


def linear(x: np.ndarray, weight: np.ndarray, bias: np.ndarray | None = None) -> np.ndarray:
    # x: [T, in], weight: [out, in] → [T, out]
    if weight.dtype == BF16:
        y = linear_bf16(x, weight)
    elif weight.dtype == x.dtype == np.float32 and 1 < x.shape[0] < BLAS_ROWS:
        y = linear_f32_rows(x, weight)
    else:
        y = x @ weight.T  # NumPy hands the transposed view to BLAS as is
    if bias is not None:
        y += bias
    return y


def linear_bf16_numpy(x: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """The twin: widen every bf16 weight to float32 exactly, then an ordinary product."""
    bits = weight.view(np.uint16).astype(np.uint32) << 16  # [out, in]: bf16 bits in the top half
    return x.astype(np.float32) @ bits.view(np.float32).T


@intrinsic
def _float32_from_bits(typingctx, bits):
    """Reinterpret a uint32 as the float32 with the same bits (no conversion, one instruction)."""
    sig = types.float32(types.uint32)

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())

    return sig, codegen


@numba.njit(parallel=True, fastmath=True, cache=True)
def _bf16_rows_kernel(x, w_bits, out):
    """out[t, r] = Σ_i x[t, i] · widen(w_bits[r, i]) for all t, reading each weight row once.

    Input rows go two at a time: each weight is widened once and used for both (measured: two
    rows cost 1.2× one row on a 65536 × 1024 weight, against 1.34× one row at a time).
    fastmath lets LLVM reorder the sums into vector lanes; the result differs from the twin
    only by float32 rounding of a reordered sum (tests bound it).
    """
    n_rows, n_in = x.shape
    for r in numba.prange(w_bits.shape[0]):
        w = w_bits[r]  # [in]: from memory once, then from cache
        t = 0
        while t + 1 < n_rows:
            x0 = x[t]
            x1 = x[t + 1]
            a0 = np.float32(0.0)
            a1 = np.float32(0.0)
            for i in range(n_in):
                w_i = _float32_from_bits(np.uint32(w[i]) << np.uint32(16))
                a0 += x0[i] * w_i
                a1 += x1[i] * w_i
            out[t, r] = a0
            out[t + 1, r] = a1
            t += 2
        if t < n_rows:  # an odd row out
            x0 = x[t]
            a0 = np.float32(0.0)
            for i in range(n_in):
                a0 += x0[i] * _float32_from_bits(np.uint32(w[i]) << np.uint32(16))
            out[t, r] = a0


def _widen_loops(w_bits, out):
    """out = the float32 values of bf16 bits w_bits [rows, in]."""
    for r in numba.prange(w_bits.shape[0]):
        bits, row = w_bits[r], out[r]  # 1-D views: the loop below then vectorizes (2-D indexing did not)
        for i in range(bits.size):
            row[i] = _float32_from_bits(np.uint32(bits[i]) << np.uint32(16))


# The serial build runs between BLAS calls: OpenBLAS's threads spin for a while after each
# product, and a parallel widening would fight them for the cores (measured: a 16-token bf16
# prefill of the 0.8B shape took 4 s that way). The parallel one widens whole tensors at load.
_widen_kernel_serial, _widen_kernel = serial_and_parallel(_widen_loops)


def widen_bf16(weight: np.ndarray) -> np.ndarray:
    """bf16 array → float32 array, exactly (compiled; the same values as the NumPy twin's widening)."""
    bits = np.ascontiguousarray(weight.view(np.uint16)).reshape(-1, weight.shape[-1])  # [rows, in]
    out = np.empty(bits.shape, np.float32)
    _widen_kernel(bits, out)
    return out.reshape(weight.shape)


def linear_bf16(x: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """x [T, in] float32 · bf16 weight [out, in]ᵀ → [T, out] float32, accumulating in float32."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    bits = weight.view(np.uint16)
    out = np.empty((x.shape[0], weight.shape[0]), np.float32)
    if x.shape[0] < BLAS_ROWS:
        _bf16_rows_kernel(x, bits, out)
        return out
    scratch = np.empty((min(WIDEN_BLOCK, weight.shape[0]), weight.shape[1]), np.float32)
    for start in range(0, weight.shape[0], WIDEN_BLOCK):
        stop = min(start + WIDEN_BLOCK, weight.shape[0])
        block = scratch[: stop - start]
        _widen_kernel_serial(bits[start:stop], block)
        out[:, start:stop] = x @ block.T
    return out


def _f32_rows_loops(x, weight, out):
    """out[t, r] = Σ_i x[t, i] · weight[r, i], four weight rows r and two input rows t at a time.

    x has an even number of rows (zero-padded). Each weight row is read from memory once, each
    value of x serves four weight rows, and the eight sums of a 4 × 2 block are independent, so
    the FMA units need not wait on one sum's previous add (measured on the 0.8B shape's layer
    weights, 2 rows, no BLAS threads awake: 23 GB/s against 20 GB/s one weight row at a time;
    BLAS's 1-row GEMV 25).
    The rows are taken as 1-D views, which LLVM turns into vector loops (2-D indexing in the
    inner loop defeated it: ~3× slower, measured). The last block repeats the last weight row
    where it runs short. fastmath lets LLVM reorder each sum into vector lanes, so the result
    differs from ``x @ W.T`` only by float32 rounding (tests bound it).
    """
    n_rows, n_in = x.shape
    last = weight.shape[0] - 1
    for block in numba.prange((last + 4) // 4):
        r0 = 4 * block
        r1, r2, r3 = min(r0 + 1, last), min(r0 + 2, last), min(r0 + 3, last)
        w0, w1, w2, w3 = weight[r0], weight[r1], weight[r2], weight[r3]  # [in] each
        for t in range(0, n_rows, 2):
            x0, x1 = x[t], x[t + 1]
            a00 = a01 = a02 = a03 = a10 = a11 = a12 = a13 = np.float32(0.0)
            for i in range(n_in):
                a00 += x0[i] * w0[i]
                a01 += x0[i] * w1[i]
                a02 += x0[i] * w2[i]
                a03 += x0[i] * w3[i]
                a10 += x1[i] * w0[i]
                a11 += x1[i] * w1[i]
                a12 += x1[i] * w2[i]
                a13 += x1[i] * w3[i]
            out[t, r0], out[t, r1], out[t, r2], out[t, r3] = a00, a01, a02, a03
            out[t + 1, r0], out[t + 1, r1], out[t + 1, r2], out[t + 1, r3] = a10, a11, a12, a13


# Waking the thread pool costs more than a small matrix takes: those run the serial build.
_f32_rows_kernel, _f32_rows_kernel_parallel = serial_and_parallel(_f32_rows_loops, fastmath=True)
F32_PARALLEL_FROM = 1 << 18  # weights (out × in) worth a parallel region


def linear_f32_rows(x: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """x [T, in] · float32 weight [out, in]ᵀ → [T, out] with the row kernel (T small; its twin: x @ weight.T)."""
    n_rows = x.shape[0]
    if n_rows % 2:
        padded = np.zeros((n_rows + 1, x.shape[1]), np.float32)  # [T rounded up to even, in]
        padded[:n_rows] = x
    else:
        padded = np.ascontiguousarray(x, dtype=np.float32)
    out = np.empty((padded.shape[0], weight.shape[0]), np.float32)
    kernel = _f32_rows_kernel_parallel if weight.size >= F32_PARALLEL_FROM else _f32_rows_kernel
    kernel(padded, np.ascontiguousarray(weight), out)
    return out[:n_rows]

