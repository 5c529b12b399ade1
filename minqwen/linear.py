"""The projection every layer is made of: y = x · Wᵀ (+ b), with W stored [out, in] as in the checkpoint.

Weights are either float32 arrays, or — in the bf16-resident mode
(``minqwen.load(path, dtype="bfloat16")``) — bf16 arrays: a bf16 checkpoint's values kept as
they are (other dtypes rounded to bf16 on load), half the memory and half the bytes a decode
step must read. bf16 is the top half of a float32, so widening is exact: shift the 16 bits
left by 16 and read the result as a float32.

The products themselves:

* :func:`linear_bf16_numpy` — the definition for bf16 weights: widen, then multiply. Slow
  and clear. For float32 weights the definition is the plain product ``x @ W.T``.
* :func:`_rows_loops` — Numba: for a few input rows (a decode step has 1, a speculative
  verify 2 to 15), reads each weight row once for all of them, widening bf16 on the fly and
  accumulating in float32. Decoding runs this, for both weight formats; tests hold it to
  the twins. For float32 it beats BLAS at what decoding does: OpenBLAS's GEMM for 2 rows was
  measured at 3-5× the time of one row's GEMV (its blocking is made for many rows), and for
  one row the kernel reads weights from memory, or from the last-level cache, faster (see
  :func:`_rows_loops` for why, and :func:`numba_multiplies` for which build runs).
* for many input rows (a prefill) BLAS does the product, compute-bound there anyway; bf16
  weights are widened to float32 a block of rows at a time first. Where the CPU has Intel's
  AMX tiles, bf16 weights are instead multiplied by x taken as three bf16 parts
  (bf16_dot.py): as exact, and faster than BLAS. Or, only when asked (``bf16_prompts``, see
  :func:`rounding_prompts_to_bf16`), bf16_dot.py rounds the activations to bf16 and
  multiplies with the CPU's bf16 instructions: faster still, no longer exact.
* :func:`linears` — a layer's several projections of one input (q, k and v; gate and up),
  the same products, with x put in those kernels' form once for all of them.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager
from contextvars import ContextVar

import ml_dtypes
import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic, overload

from . import bf16_dot
from .errors import MinqwenError
from .threads import numba_does_the_products, serial_and_parallel

BF16 = np.dtype(ml_dtypes.bfloat16)
# At or above this many input rows, widen blocks of W and use BLAS instead of the row kernel.
BLAS_ROWS = 16
WIDEN_BLOCK = 1024  # weight rows widened at a time: a few MB of float32 scratch


# Below this many bytes of weights a model's decode step is made of small products, each too
# short to be worth waking Numba's thread pool for (see numba_multiplies).
SMALL_MODEL_BYTES = 64 * 1024 * 1024


def numba_multiplies(weight_dtype, n_rows: int, model_bytes: int, bf16_prompts: bool = False) -> bool:
    """Whether a forward over ``n_rows`` positions hands its products to Numba's pool of threads.

    The caller then holds BLAS to one thread (:func:`~minqwen.threads.one_blas_thread`), and
    :func:`linear` sees it: big matrices go to the kernel's parallel build. So it is for few
    rows of weights, bf16 or float32, in a model (``model_bytes`` of weights) too big for the
    caches: a decode step or a verify is then bound by reading weights, which the kernel does
    faster than BLAS (see :func:`_rows_loops`).
    A small model's few-row products go to the kernel too (NumPy has no bf16 product, and for
    float32 see below), but to its serial build, on the calling thread. They are short — the
    embedded model's largest takes tens of microseconds — and the pool, idle between them,
    would have to be woken for each (on an Intel Xeon VM the embedded model decoded 1092
    tokens/s with BLAS, 757 with every product in the parallel build; in bf16, alternated
    runs, 1259 tokens/s with its LM head in the parallel build, 1421 with all serial). On one
    core the kernel beat OpenBLAS's GEMV at decoding such a model: on an AMD EPYC VM,
    alternated runs, the embedded model decoded 774 tokens/s against 567 with one row going
    to BLAS (and 650 against 475, or 426 with BLAS held to one thread, in another series).
    Its 14.8 MB of weights come from the last-level cache there, not the nearest ones (0.53 ms a
    step in a sweep over its matrices, 0.18 ms multiplied while still cached), and the kernel's
    four streams with their prefetches wait less for them. In a loop over one matrix, found in
    the nearest caches each time, BLAS was as fast or faster. Not measured on the Intel VM.
    Many rows of bf16 weights go to Numba too where bf16_dot's kernels do them: with
    ``bf16_prompts``, and on AMX tiles (three parts, exact) without.
    """
    if n_rows < BLAS_ROWS:  # a decode step or a verify: the few-row kernel, parallel if it pays
        return weight_dtype in (BF16, np.float32) and model_bytes >= SMALL_MODEL_BYTES
    return weight_dtype == BF16 and (bf16_prompts or bf16_dot.cpu_has_amx_bf16())


def linear(x: np.ndarray, weight: np.ndarray, bias: np.ndarray | None = None) -> np.ndarray:
    """x @ weight.T (+ bias): every branch computes that, up to float32 rounding of the sums
    (except inside a ``rounding_prompts_to_bf16(True)`` block, where products of many rows with
    bf16 weights round x to bf16 first: see bf16_dot.py).

    The branches only choose how: bf16 weights (widened exactly, :func:`linear_bf16`), a few
    float32 rows (a decode step: the Numba kernel :func:`linear_few_rows`, even for the
    default float32 model), or BLAS. Twins: ``x @ weight.T``, :func:`linear_bf16_numpy`.
    """
    # x: [T, in], weight: [out, in] → [T, out]
    n_rows = x.shape[0]
    if weight.dtype == BF16:
        y = linear_bf16(x, weight)
    elif weight.dtype == x.dtype == np.float32 and n_rows < BLAS_ROWS:
        # OpenBLAS's GEMM, made for many rows, took 3-5× one row's time for two (the embedded
        # model's 4096 × 256 head: 324 us for two rows, 70 for one). And for one row, see
        # numba_multiplies: the kernel, even on one core, beat OpenBLAS's GEMV at decoding.
        y = linear_few_rows(x, weight)
    else:
        y = x @ weight.T  # NumPy hands the transposed view to BLAS as is
    if bias is not None:
        y += bias
    return y


def widen_bf16_numpy(weight: np.ndarray) -> np.ndarray:
    """The twin of :func:`widen_bf16`: a bf16 is the top half of a float32, so shifting its 16
    bits up and reading the 32 as a float32 widens it exactly."""
    bits = weight.view(np.uint16).astype(np.uint32) << 16  # [..., in]: bf16 bits in the top half
    return bits.view(np.float32)


def linear_bf16_numpy(x: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """The twin: widen every bf16 weight to float32 exactly, then an ordinary product."""
    return x.astype(np.float32) @ widen_bf16_numpy(weight).T  # [T, in] · [out, in]ᵀ → [T, out]


@intrinsic
def _float32_from_bits(typingctx, bits):
    """Reinterpret a uint32 as the float32 with the same bits (no conversion, one instruction)."""
    sig = types.float32(types.uint32)

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())

    return sig, codegen


def as_float32(w):
    """One weight as a float32: bf16 bits (a uint16) widened, a float32 as it is.

    This body serves plain Python; inside Numba kernels the compiled one below stands in.
    """
    if isinstance(w, np.uint16):
        return (np.uint32(w) << np.uint32(16)).view(np.float32)
    return np.float32(w)


@overload(as_float32, inline="always")
def _as_float32_compiled(w):
    if w == types.uint16:
        return lambda w: _float32_from_bits(np.uint32(w) << np.uint32(16))
    if w == types.float32:
        return lambda w: w
    return lambda w: np.float32(w)  # as the Python body does (no kernel passes other types today)


@numba.njit(inline="always")
def _row_a_quarter_on(r, k, quarter, end):
    """Row r + k·quarter, or r itself where that is not below ``end`` (r is then computed twice).

    ``end``: the matrix's number of rows, or the end of the block of rows being walked.
    """
    row = r + k * quarter
    return row if row < end else r


# Software prefetch (see _rows_loops): how far ahead of the sums each stream asks for weights,
# in bytes, and how many weights are summed between two rounds of asking.
PREFETCH_AHEAD_BYTES = 2048
BLOCK = 128
CACHE_LINE = 64  # bytes: x86 and Arm cores alike


@intrinsic
def prefetch(typingctx, flat, index):
    """Ask the memory system to start loading the cache line that holds flat[index].

    A hint (x86 PREFETCHT0, Arm PRFM): it changes no value, only when memory is read. The
    few-row kernel here, moe.py's grouped kernel and attention.py's decode kernel use it.
    """
    sig = types.void(flat, index)

    def codegen(context, builder, signature, args):
        array = context.make_array(signature.args[0])(context, builder, args[0])
        pointer = cgutils.get_item_pointer(context, builder, signature.args[0], array, [args[1]],
                                           wraparound=False, boundscheck=False)
        i8p, i32 = ir.IntType(8).as_pointer(), ir.IntType(32)
        prefetch = builder.module.declare_intrinsic("llvm.prefetch", [i8p], ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32]))
        # (address, 0 = for reading, 3 = keep in every cache level, 1 = data, not code)
        builder.call(prefetch, [builder.bitcast(pointer, i8p), i32(0), i32(3), i32(1)])
        return context.get_dummy_value()

    return sig, codegen


@numba.njit(inline="always")
def _prefetch_block(flat, n_in, r0, r1, r2, r3, start, step):
    """Prefetch elements start … start + BLOCK − 1 (one per ``step``, a cache line) of rows r0 … r3.

    ``flat``: the matrix [out, n_in] as one row. Past the end of a row, the rows after it.
    """
    last = flat.size - 1
    for at in range(start, start + BLOCK, step):
        prefetch(flat, min(r0 * n_in + at, last))
        prefetch(flat, min(r1 * n_in + at, last))
        prefetch(flat, min(r2 * n_in + at, last))
        prefetch(flat, min(r3 * n_in + at, last))


def _rows_loops(x, weight, out):
    """out[t, r] = Σ_i x[t, i] · weight[r, i] for every t, reading each weight row from memory once.

    ``weight`` [out, in] is float32, or bf16 bits (uint16) that :func:`as_float32` widens as
    they are read. Each step takes four weight rows a quarter of the matrix apart, and input
    rows two at a time.
    Why a quarter apart: each core then reads four separate streams of memory, which the
    hardware prefetcher follows side by side, so more of memory's latency overlaps. Measured
    on an Intel Xeon VM, 2 threads, 0.8B-shaped matrices, one input row: bf16 26-29 GB/s
    against 21-25 walking one row at a time (where even a loop that only summed the raw bits
    ran at 21-23); float32 31-33 GB/s, 2-10% faster than OpenBLAS's GEMV.
    Why BLOCK weights at a time, first asking for the weights PREFETCH_AHEAD_BYTES further
    on in each stream (software prefetch): with the hardware prefetcher alone, fewer reads
    were in flight than memory can serve — or so the figures read. Same process, old kernel
    against new, 0.8B shape: a bf16 decode step 73.5 → 63.0 ms (the products from 26-27 to
    ~29 GB/s), a two-position bf16 verify 78.6 → 68.6, a float32 step 113.8 → 108.7 (already
    near what memory gives). 1 to 4 kB ahead measured alike; 512 bytes, no prefetch at all or
    only every other cache line were slower. Blocks of 32 weights were as fast here but cost
    the embedded model's small matrices ~10% (each block ends in a reduction of the vector
    lanes). Only the first pass over a weight row asks: later input rows find it in the cache.
    Why four rows and two inputs at once: each widened weight serves both inputs, each loaded
    x serves four rows, and the eight sums are independent, so the FMA units never wait on one
    sum's previous add. Two input rows cost 1.04-1.08× one (bf16; one weight row at a time
    they cost 1.4-1.6×).
    The blocks are taken as 1-D views, which LLVM turns into vector loops (2-D indexing in the
    inner loop defeated it: ~3× slower, measured). fastmath lets LLVM reorder each sum into
    vector lanes, so the result differs from the twin only by float32 rounding of a reordered
    sum (tests bound it).
    """
    n_rows, n_in = x.shape
    n_out = weight.shape[0]
    quarter = (n_out + 3) // 4
    flat = weight.reshape(-1)  # [out · in]: the same memory, for the prefetches
    ahead = PREFETCH_AHEAD_BYTES // weight.itemsize  # in weights
    step = max(1, CACHE_LINE // weight.itemsize)  # weights per cache line
    for r in numba.prange(quarter):
        r0 = np.int64(r)
        r1 = _row_a_quarter_on(r0, 1, quarter, n_out)
        r2 = _row_a_quarter_on(r0, 2, quarter, n_out)
        r3 = _row_a_quarter_on(r0, 3, quarter, n_out)
        w0, w1, w2, w3 = weight[r0], weight[r1], weight[r2], weight[r3]  # [in] each
        t = 0
        while t + 1 < n_rows:
            xt0, xt1 = x[t], x[t + 1]
            a00 = a01 = a02 = a03 = a10 = a11 = a12 = a13 = np.float32(0.0)
            for start in range(0, n_in, BLOCK):
                stop = min(start + BLOCK, n_in)
                if t == 0:  # the first pass over these rows: ask for what comes after this block
                    _prefetch_block(flat, n_in, r0, r1, r2, r3, start + ahead, step)
                x0, x1 = xt0[start:stop], xt1[start:stop]  # [BLOCK] each, like the weights below
                v0, v1, v2, v3 = w0[start:stop], w1[start:stop], w2[start:stop], w3[start:stop]
                for i in range(stop - start):
                    u0, u1, u2, u3 = as_float32(v0[i]), as_float32(v1[i]), as_float32(v2[i]), as_float32(v3[i])
                    a00 += x0[i] * u0
                    a01 += x0[i] * u1
                    a02 += x0[i] * u2
                    a03 += x0[i] * u3
                    a10 += x1[i] * u0
                    a11 += x1[i] * u1
                    a12 += x1[i] * u2
                    a13 += x1[i] * u3
            out[t, r0], out[t, r1], out[t, r2], out[t, r3] = a00, a01, a02, a03
            out[t + 1, r0], out[t + 1, r1], out[t + 1, r2], out[t + 1, r3] = a10, a11, a12, a13
            t += 2
        if t < n_rows:  # an odd input row out (a decode step's only one)
            xt0 = x[t]
            a00 = a01 = a02 = a03 = np.float32(0.0)
            for start in range(0, n_in, BLOCK):
                stop = min(start + BLOCK, n_in)
                if t == 0:  # the first pass over these rows: ask for what comes after this block
                    _prefetch_block(flat, n_in, r0, r1, r2, r3, start + ahead, step)
                x0 = xt0[start:stop]
                v0, v1, v2, v3 = w0[start:stop], w1[start:stop], w2[start:stop], w3[start:stop]
                for i in range(stop - start):
                    a00 += x0[i] * as_float32(v0[i])
                    a01 += x0[i] * as_float32(v1[i])
                    a02 += x0[i] * as_float32(v2[i])
                    a03 += x0[i] * as_float32(v3[i])
            out[t, r0], out[t, r1], out[t, r2], out[t, r3] = a00, a01, a02, a03


# Waking the thread pool costs more than a small matrix takes: those run the serial build.
# _nrt=False: compiled without Numba's reference counting (an underscored option of njit).
# Every block's slices are array views, and each view counts a reference to the matrix it
# views, an atomic add and subtract apiece. Numba prunes such pairs only within simple control
# flow (a known limit: numba/numba#2350); here it did not, and they took ~40% of a product from
# cache in the serial build: 256 × 256 bf16, one input row, 7.5 → 4.4 µs; 512 × 256, 15.0 →
# 8.0 µs (Intel Xeon VM); the embedded model decoded 3-4% faster. The parallel build ran as
# fast either way. The kernel allocates nothing, which is all reference counting is for here.
_rows_kernel, _rows_kernel_parallel = serial_and_parallel(_rows_loops, fastmath=True, _nrt=False)
PARALLEL_FROM = 1 << 18  # weights (out × in) worth a parallel region


def linear_few_rows(x: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """x [T, in] · weight [out, in]ᵀ → [T, out] float32 with the row kernel: T small, weight float32 or bf16.

    Its twins: ``x @ weight.T`` for float32, :func:`linear_bf16_numpy` for bf16.
    """
    x = np.ascontiguousarray(x, dtype=np.float32)
    weight = np.ascontiguousarray(weight)
    rows = weight.view(np.uint16) if weight.dtype == BF16 else weight  # Numba knows bf16 as its bits
    out = np.empty((x.shape[0], weight.shape[0]), np.float32)
    # The parallel build only where the pool is awake and the cores are its own (see numba_multiplies)
    parallel = weight.size >= PARALLEL_FROM and numba_does_the_products()
    (_rows_kernel_parallel if parallel else _rows_kernel)(x, rows, out)
    return out


def _widen_loops(w_bits, out):
    """out = the float32 values of bf16 bits w_bits [rows, in]."""
    for r in numba.prange(w_bits.shape[0]):
        bits, row = w_bits[r], out[r]  # 1-D views: the loop below then vectorizes (2-D indexing did not)
        for i in range(bits.size):
            row[i] = as_float32(bits[i])


# The serial build runs between BLAS calls: OpenBLAS's threads spin for a while after each
# product, and a parallel widening would fight them for the cores (measured: a 16-token bf16
# prefill of the 0.8B shape took 4 s that way). The parallel one, through widen_bf16, widens
# the embedding rows of a long prompt's tokens (Model.embed, bf16-resident mode; a decode
# step's row takes the serial build); loading widens bf16 with a NumPy shift of its own
# (checkpoint.SafetensorsFile._read_span).
_widen_kernel_serial, _widen_kernel = serial_and_parallel(_widen_loops)


def widen_bf16(weight: np.ndarray) -> np.ndarray:
    """bf16 array → float32 array, exactly (compiled; the same values as the NumPy twin's widening)."""
    bits = np.ascontiguousarray(weight.view(np.uint16)).reshape(-1, weight.shape[-1])  # [rows, in]
    out = np.empty(bits.shape, np.float32)
    # A decode step's one embedding row is not worth waking the pool for: on the embedded model
    # (bf16-resident) the parallel launch for 256 values cost 1-3% of each step and speculative cycle.
    (_widen_kernel if bits.size >= PARALLEL_FROM else _widen_kernel_serial)(bits, out)
    return out.reshape(weight.shape)


# Whether this thread's products of many rows round x to bf16 now: None (no block open),
# True, or False. A ContextVar, so that each thread (and asyncio task) has its own: one
# model's bf16_prompts forward must not round another's products in a parallel thread.
_ROUNDING: ContextVar[bool | None] = ContextVar("minqwen_rounding_prompts_to_bf16", default=None)


@contextmanager
def rounding_prompts_to_bf16(active: bool = True):
    """Within the block, products of many rows with bf16 weights round x to bf16 and use the
    CPU's bf16 dot-product instruction (bf16_dot.py), if ``active``: a model's forward opens
    it with its ``bf16_prompts``. Few-row products (decode steps) stay exact.

    A block opened with ``active=False`` is exact, and so is everything opened inside it:
    mtp.verify is part of decoding, which bf16_prompts leaves exact, even when its drafts
    and last token reach 16 rows.
    """
    token = _ROUNDING.set(bool(active) and _ROUNDING.get() is not False)
    try:
        yield
    finally:
        _ROUNDING.reset(token)


def _bf16_dot_parts() -> int | None:
    """How many bf16 parts x is taken as when bf16_dot's kernels multiply many rows by bf16
    weights: 1 inside a :func:`rounding_prompts_to_bf16` block, three (exact) on AMX tiles, or
    None when BLAS does the product (widened weights)."""
    if _ROUNDING.get():
        return 1
    return bf16_dot.EXACT_PARTS if bf16_dot.cpu_has_amx_bf16() else None


def linear_bf16(x: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """x [T, in] float32 · bf16 weight [out, in]ᵀ → [T, out] float32, accumulating in float32.

    A few rows: :func:`linear_few_rows`. Many: x rounded to bf16 inside a
    :func:`rounding_prompts_to_bf16` block; else exact, on AMX tiles in three parts where the
    CPU has them (bf16_dot.py: on the Intel Xeon VM, the 0.8B shape's 512-token prefill took
    2.0 s against 3.2 s with BLAS), or widening blocks of W for BLAS.
    """
    if x.shape[0] < BLAS_ROWS:
        return linear_few_rows(x, weight)
    n_parts = _bf16_dot_parts()
    if n_parts is not None:
        return bf16_dot.linear_bf16_dot(x, weight, n_parts)
    x = np.ascontiguousarray(x, dtype=np.float32)
    bits = weight.view(np.uint16)
    out = np.empty((x.shape[0], weight.shape[0]), np.float32)  # [T, out]
    scratch = np.empty((min(WIDEN_BLOCK, weight.shape[0]), weight.shape[1]), np.float32)  # [block, in]
    for start in range(0, weight.shape[0], WIDEN_BLOCK):
        stop = min(start + WIDEN_BLOCK, weight.shape[0])
        block = scratch[: stop - start]
        _widen_kernel_serial(bits[start:stop], block)
        out[:, start:stop] = x @ block.T  # [T, in] · [block, in]ᵀ → [T, block]
    return out


def linears(x: np.ndarray, weights: Sequence[np.ndarray],
            biases: Sequence[np.ndarray | None] | None = None) -> list[np.ndarray]:
    """Several projections of one input: [linear(x, w, b) for w, b in zip(weights, biases)].

    The same products as one call each, bit for bit (the same kernels on the same x). Where
    bf16_dot's kernels multiply (many rows, bf16 weights), x is first put in their form, split
    into bf16 parts laid out as tiles: that is done once here for all the weights. On the Intel
    Xeon VM, the 0.8B shape's 512-token prefill split x 186 times, in ~0.2 s; 96 times with
    the layers' projections of one input taken together.
    """
    biases = [None] * len(weights) if biases is None else list(biases)
    if len(biases) != len(weights):
        raise MinqwenError(f"linears: {len(weights)} weights but {len(biases)} biases")
    n_parts = _bf16_dot_parts() if x.shape[0] >= BLAS_ROWS else None
    if n_parts is None or any(np.asarray(weight).dtype != BF16 for weight in weights):
        return [linear(x, weight, bias) for weight, bias in zip(weights, biases)]
    ys = bf16_dot.linears_bf16_dot(x, weights, n_parts)
    for y, bias in zip(ys, biases):
        if bias is not None:
            y += bias
    return ys
