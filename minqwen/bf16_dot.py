"""Prompts multiplied in bf16: the CPU's bf16 dot-product instruction, for prefills (opt-in).

A prompt's products are bound by arithmetic, not by memory: the 512-token prefill of the
0.8B shape is ~510 GFLOP, and float32 BLAS spends most of the prefill on it (see
tools/measurements.md). CPUs with the AVX512-BF16 extension (Intel since Cooper Lake, AMD
since Zen 4) have an instruction, VDPBF16PS, that multiplies 32 bf16 numbers by 32 others and
adds the products, two neighbours at a time, into 16 float32 sums: twice the multiply-adds of
a float32 FMA of the same width. In the bf16-resident mode the weights are bf16 already.
Round the activations to bf16 too, and that instruction can do a prompt's products.

The price is precision, which is why this is opt-in (``minqwen.load(..., dtype="bfloat16",
bf16_prompts=True)``): an activation keeps 8 bits of mantissa instead of 24, a relative
rounding of up to 2⁻⁸ on every input to every product of a prompt. Each product of two
bf16 numbers is exact in float32 and the sums are float32, so that rounding is the only
error — but for inputs, products and sums below 2⁻¹²⁶, which the instruction takes as zero,
and activations beyond bf16's largest number (~3.39e38), which round to infinity. The rounding is the
one llama.cpp makes for bf16 weights, and torch in bf16 makes more. It is not the
bf16-resident mode's promise of float32 results (see linear.py), so that mode stays exact
unless asked. Decode steps (fewer than 16 rows) and speculative verifies of any length
(mtp.verify opens an exact block) are not touched, so they multiply exactly, over the cache
the rounded prompt left: a step is bound by reading the weights, and the few-row kernel
(linear._rows_loops) reads them as fast while computing exactly.

* :func:`linear_bf16_dot_numpy` — the definition, slow and clear: round x to bf16, widen
  both, multiply in float32.
* :func:`round_to_bf16_pairs` — x rounded to bf16 (to nearest, ties to even, like
  ``x.astype(bfloat16)``), two neighbours packed in each 32-bit word, as the instruction
  reads them.
* :func:`_products_loops` — Numba: blocks of weight rows are repacked so that one 64-byte
  load holds the pairs of 16 outputs, and :func:`_dot_tile` — written in LLVM's own terms,
  since Numba has no vector types — keeps a tile of 8 tokens × 48 outputs in registers while
  it walks the inputs.
* :func:`_amx_products_loops` — the same product on Intel's AMX tile unit (Xeon since
  Sapphire Rapids), where there is one: eight tile registers of 16 rows × 64 bytes, and an
  instruction, TDPBF16PS, that multiplies a 16 × 32 tile of bf16 activations by a 32 × 16
  tile of bf16 weights (stored as 16 rows of pairs: the repacked layout above) into a tile of
  16 × 16 float32 sums: 8,192 multiply-adds. :func:`_amx_block` keeps 32 tokens × 32 outputs
  of sums in four tiles while it walks the inputs. On Intel, VDPBF16PS does no more
  multiply-adds a cycle than a float32 FMA: measured on the Intel Xeon VM (tools/measurements.md,
  December 5), 2 threads, the 0.8B shape's matrices, 512 tokens: VDPBF16PS 190-210 GFLOP/s,
  OpenBLAS's float32 sgemm 290-330, AMX tiles 880-930 (repacking included).
"""

from __future__ import annotations

import ctypes
import functools
import sys

import ml_dtypes
import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from .errors import MinqwenError

TILE_TOKENS = 8  # input rows a tile holds
TILE_VECTORS = 3  # 16-output vectors a tile holds: 8 × 3 sums + 3 weight vectors + 1 broadcast fit the 32 registers
LANES = 16  # float32 sums in one 512-bit register
BLOCK_OUTPUTS = TILE_VECTORS * LANES  # 48 weight rows repacked at a time


def linear_bf16_dot_numpy(x: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """The twin: x rounded to bf16, then x · Wᵀ in float32 ([T, in] · [out, in]ᵀ → [T, out]).

    ``weight`` is a bf16 array. Products of two bf16 numbers are exact in float32, so only
    the rounding of x, the order of the sums, and the instruction's flushing of subnormal
    inputs, products and sums (below 2⁻¹²⁶) to zero separate this from the kernels. (The order
    of the sums also decides where sums near float32's largest number overflow: for inputs
    3e38, 3e38, −3e38, −3e38, repeated, and weights of 1, the AMX kernel gave 0 here, the
    VDPBF16PS kernel inf and this twin NaN.)
    """
    rounded = np.asarray(x, np.float32).astype(ml_dtypes.bfloat16).astype(np.float32)  # [T, in]
    return rounded @ weight.astype(np.float32).T  # [T, in] · [in, out] → [T, out]


@functools.cache
def cpu_has_bf16_dot() -> bool:
    """Whether Numba compiles for a CPU with AVX512-BF16 here.

    Numba compiles for the host CPU unless NUMBA_CPU_NAME says otherwise (e.g. "generic",
    for a cache shared between machines); then the instruction may not exist on the target.
    """
    if numba.config.CPU_NAME not in (None, "host"):
        return False
    return _compiled_for("avx512bf16")


def _compiled_for(feature: str) -> bool:
    """Whether Numba's code may use the CPU ``feature`` (LLVM's name): the host's features, or
    NUMBA_CPU_FEATURES where the user set them (LLVM aborts on an instruction outside them)."""
    import llvmlite.binding as llvm

    if numba.config.CPU_FEATURES:
        return f"+{feature}" in numba.config.CPU_FEATURES.split(",")
    return bool(llvm.get_host_cpu_features().get(feature, False))


def check_bf16_dot_available() -> None:
    """Refuse, with the reason, where the kernel cannot run."""
    if numba.config.CPU_NAME not in (None, "host"):
        raise MinqwenError(f"bf16_prompts needs Numba to compile for this CPU, but NUMBA_CPU_NAME is "
                           f"{numba.config.CPU_NAME!r}: unset it, or load without bf16_prompts")
    if numba.config.CPU_FEATURES and not cpu_has_bf16_dot():
        raise MinqwenError("bf16_prompts needs Numba to compile with AVX512-BF16, but NUMBA_CPU_FEATURES leaves "
                           "it out (no '+avx512bf16'): unset it, or load without bf16_prompts")
    if not cpu_has_bf16_dot():
        import llvmlite.binding as llvm

        raise MinqwenError(f"bf16_prompts needs a CPU with the AVX512-BF16 instructions (Intel Cooper Lake, "
                           f"Sapphire Rapids or later; AMD Zen 4 or later); this one ({llvm.get_host_cpu_name()}) "
                           "has none: load without bf16_prompts")


# --------------------------------------------------------------------------- activations


@numba.njit(parallel=True, cache=True)
def _round_loops(x, pairs):
    """pairs[t, p] = bf16(x[t, 2p]) | bf16(x[t, 2p + 1]) << 16; a missing last neighbour is 0."""
    n_rows, n_in = x.shape
    for t in numba.prange(n_rows):
        bits = x[t].view(np.uint32)  # [in]
        row = pairs[t]  # [ceil(in / 2)]
        for p in range(pairs.shape[1]):
            lo = _bf16_bits(bits[2 * p])
            hi = _bf16_bits(bits[2 * p + 1]) if 2 * p + 1 < n_in else np.uint32(0)
            row[p] = np.int32(lo | (hi << np.uint32(16)))


@numba.njit(inline="always")
def _bf16_bits(f):
    """The bf16 nearest float32 bits f (ties to even), as the low 16 bits of a uint32."""
    if (f & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000):  # NaN: keep it a (quiet) NaN
        return (f >> np.uint32(16)) | np.uint32(0x0040)
    # Adding 0x7FFF, plus 1 when the bit that will be kept last is odd, carries into it
    # exactly when the 16 bits dropped are more than half, or half with an odd neighbour.
    return (f + np.uint32(0x7FFF) + ((f >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)


def round_to_bf16_pairs(x: np.ndarray) -> np.ndarray:
    """x [T, in] float32 → int32 [T, ceil(in / 2)]: each word two neighbouring inputs as bf16, the first in the low half."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    pairs = np.empty((x.shape[0], (x.shape[1] + 1) // 2), np.int32)
    _round_loops(x, pairs)
    return pairs


# --------------------------------------------------------------------------- the product


class _BFloat(ir.Type):
    """LLVM's bf16 scalar type, which llvmlite does not name: only used to type the instruction's operands."""

    def _to_string(self):
        return "bfloat"

    def __eq__(self, other):
        return isinstance(other, _BFloat)

    def __hash__(self):
        return hash("bfloat")


@intrinsic
def _dot_tile(typingctx, x_pairs, t0, packed, sums):
    """sums[i, o] = Σ_p dot(x_pairs[t0 + i, p], packed[p, o]) for a tile of TILE_TOKENS × BLOCK_OUTPUTS.

    ``x_pairs`` int32 [T, P]: activations as bf16 pairs. Rows past T − 1 read row T − 1 (their
    sums are not used). ``packed`` int32 [P, BLOCK_OUTPUTS]: row p holds input pair p of each
    of the block's weight rows, so one 64-byte load gives 16 outputs their pair. ``sums``
    float32 [TILE_TOKENS, BLOCK_OUTPUTS], written.
    Each step p broadcasts token i's pair to all 16 lanes and, with VDPBF16PS, adds
    x[2p]·w[o, 2p] + x[2p+1]·w[o, 2p+1] into lane o of each of the tile's 24 sums. The sums
    stay in registers for the whole walk over p: that is what this must be written in LLVM IR
    for (as loop-carried vector values), and why the tile is only as large as the registers.
    """
    sig = types.void(x_pairs, t0, packed, sums)

    def codegen(context, builder, signature, args):
        x_type, _, packed_type, sums_type = signature.args
        x_array = context.make_array(x_type)(context, builder, args[0])
        packed_array = context.make_array(packed_type)(context, builder, args[2])
        sums_array = context.make_array(sums_type)(context, builder, args[3])
        i32, i64 = ir.IntType(32), ir.IntType(64)
        words = ir.VectorType(i32, LANES)  # 32 bf16 as 16 words
        floats = ir.VectorType(ir.FloatType(), LANES)
        bf16s = ir.VectorType(_BFloat(), 2 * LANES)
        dot = builder.module.declare_intrinsic(
            "llvm.x86.avx512bf16.dpbf16ps.512", (), ir.FunctionType(floats, [floats, bf16s, bf16s]))

        def pointer(array_type, array, row, column):
            return cgutils.get_item_pointer(context, builder, array_type, array, [row, column],
                                            wraparound=False, boundscheck=False)

        n_rows, n_pairs = (builder.extract_value(x_array.shape, k) for k in (0, 1))
        last = builder.sub(n_rows, i64(1))
        token_rows = []
        for i in range(TILE_TOKENS):
            row = builder.add(args[1], i64(i))
            row = builder.select(builder.icmp_signed("<", row, n_rows), row, last)
            token_rows.append(pointer(x_type, x_array, row, i64(0)))
        packed_start = pointer(packed_type, packed_array, i64(0), i64(0))

        entry, loop, done = builder.block, builder.append_basic_block("pairs"), builder.append_basic_block("store")
        zero = ir.Constant(floats, [0.0] * LANES)
        builder.cbranch(builder.icmp_signed(">", n_pairs, i64(0)), loop, done)

        builder.position_at_end(loop)
        p = builder.phi(i64)
        sums = [builder.phi(floats) for _ in range(TILE_TOKENS * TILE_VECTORS)]
        weight_row = builder.gep(packed_start, [builder.mul(p, i64(BLOCK_OUTPUTS))])
        weights = [builder.bitcast(builder.load(builder.bitcast(builder.gep(weight_row, [i64(LANES * v)]), words.as_pointer()),
                                                align=4), bf16s)
                   for v in range(TILE_VECTORS)]  # 3 × [16 outputs × a pair]
        new_sums = []
        for i in range(TILE_TOKENS):
            pair = builder.load(builder.gep(token_rows[i], [p]), align=4)
            spread = builder.insert_element(ir.Constant(words, ir.Undefined), pair, i32(0))
            spread = builder.shuffle_vector(spread, ir.Constant(words, ir.Undefined), ir.Constant(words, [0] * LANES))
            spread = builder.bitcast(spread, bf16s)  # token i's pair in every lane
            for v in range(TILE_VECTORS):
                new_sums.append(builder.call(dot, [sums[i * TILE_VECTORS + v], spread, weights[v]]))
        p_next = builder.add(p, i64(1))
        p.add_incoming(i64(0), entry)
        p.add_incoming(p_next, loop)
        for s, new in zip(sums, new_sums):
            s.add_incoming(zero, entry)
            s.add_incoming(new, loop)
        builder.cbranch(builder.icmp_signed("<", p_next, n_pairs), loop, done)

        builder.position_at_end(done)
        finals = []
        for new in new_sums:  # every phi first, as LLVM requires
            final = builder.phi(floats)
            final.add_incoming(zero, entry)
            final.add_incoming(new, loop)
            finals.append(final)
        for i in range(TILE_TOKENS):
            for v in range(TILE_VECTORS):
                at = pointer(sums_type, sums_array, i64(i), i64(LANES * v))
                builder.store(finals[i * TILE_VECTORS + v], builder.bitcast(at, floats.as_pointer()), align=4)
        return context.get_dummy_value()

    return sig, codegen


def _products_loops(x_pairs, weight_bits, out):
    """out[t, o] = Σ_i bf16(x)[t, i] · weight[o, i], a block of BLOCK_OUTPUTS weight rows at a time.

    ``x_pairs`` int32 [T, P] from :func:`round_to_bf16_pairs`; ``weight_bits`` uint16 [O, in]
    (bf16 bits); ``out`` float32 [T, O].
    Each block's rows are first repacked, pair-major ([P, 48], 2 bytes per weight, ~350 kB at
    the 0.8B shape's widest input), where they stay in the core's cache while every tile of
    tokens walks them. Blocks are independent and split across the cores.
    Why repack rather than dot a weight row with a token row, as linear._rows_loops does: a
    row-by-row dot ends each output in a sum across the 16 lanes, about half again the work
    of the products for inputs of 1024. Measured on the 0.8B shape's matrices, 512 tokens,
    2 threads, AMD EPYC VM (Zen 4): row-by-row 4 × 4 tiles 184-225 GFLOP/s; repacked 8 × 48
    tiles 380-410, repacking included (~10% of the time); OpenBLAS's float32 sgemm 170-190.
    """
    n_rows, n_pairs = x_pairs.shape
    n_out, n_in = weight_bits.shape
    n_blocks = (n_out + BLOCK_OUTPUTS - 1) // BLOCK_OUTPUTS
    for b in numba.prange(n_blocks):
        packed = np.zeros((n_pairs, BLOCK_OUTPUTS), np.int32)  # [P, 48]; rows past O stay 0
        sums = np.empty((TILE_TOKENS, BLOCK_OUTPUTS), np.float32)  # [8, 48]
        first = b * BLOCK_OUTPUTS
        width = min(BLOCK_OUTPUTS, n_out - first)
        for o in range(width):
            row = weight_bits[first + o]  # [in]
            for p in range(n_in // 2):
                packed[p, o] = np.int32(np.uint32(row[2 * p]) | (np.uint32(row[2 * p + 1]) << np.uint32(16)))
            if n_in % 2:
                packed[n_pairs - 1, o] = np.int32(row[n_in - 1])
        for t0 in range(0, n_rows, TILE_TOKENS):
            _dot_tile(x_pairs, t0, packed, sums)
            for i in range(min(TILE_TOKENS, n_rows - t0)):
                out[t0 + i, first:first + width] = sums[i, :width]


_products_kernel = numba.njit(parallel=True, cache=True)(_products_loops)


# --------------------------------------------------------------------------- the product on AMX tiles

TILE_ROWS = 16  # an AMX tile register holds 16 rows ...
TILE_WORDS = 16  # ... of 64 bytes: 16 int32 words (16 float32 sums, or 16 bf16 pairs)
AMX_TOKENS = 2 * TILE_ROWS  # tokens a block of sums covers: two tiles of activations, a token a row
AMX_OUTPUTS = 2 * TILE_WORDS  # weight rows repacked at a time: two tiles of weights, an output a word
ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA, SYS_ARCH_PRCTL = 0x1023, 18, 158  # Linux x86-64


@functools.cache
def cpu_has_amx_bf16() -> bool:
    """Whether the AMX tile unit's bf16 product can run here (Intel Xeon since Sapphire Rapids).

    Linux lends a process the tile registers' 8 kB of state only when it asks, once, with
    arch_prctl(ARCH_REQ_XCOMP_PERM): without asking, the first tile instruction kills the
    process. So this asks, and says no where the CPU, Numba's compile target or the kernel
    refuses. The permission is the whole process's: the kernel refuses it if a thread has
    already set up an alternate signal stack too small for the larger state (sigaltstack), and
    once granted, later calls to sigaltstack with such a small stack fail.
    """
    import platform

    if not cpu_has_bf16_dot() or sys.platform != "linux" or platform.machine() != "x86_64":
        return False
    if not (_compiled_for("amx-tile") and _compiled_for("amx-bf16")):
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    return libc.syscall(SYS_ARCH_PRCTL, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0


def _tile_config() -> np.ndarray:
    """The 64-byte table LDTILECFG reads: palette 1, and all 8 tiles 16 rows × 64 bytes."""
    table = np.zeros(64, np.uint8)
    table[0] = 1  # palette 1: 8 tiles of up to 16 × 64 bytes
    table[16:32].view(np.uint16)[:8] = 4 * TILE_WORDS  # bytes per row, tiles 0-7
    table[48:56] = TILE_ROWS  # rows, tiles 0-7
    return table


TILE_CONFIG = _tile_config()


def _declare_void(builder, name, argument_types):
    return builder.module.declare_intrinsic(name, (), ir.FunctionType(ir.VoidType(), argument_types))


@intrinsic
def _tiles_configure(typingctx, table):
    """LDTILECFG: shape this thread's tile registers (:data:`TILE_CONFIG`)."""
    def codegen(context, builder, signature, args):
        array = context.make_array(signature.args[0])(context, builder, args[0])
        byte_pointer = ir.IntType(8).as_pointer()
        builder.call(_declare_void(builder, "llvm.x86.ldtilecfg", [byte_pointer]), [builder.bitcast(array.data, byte_pointer)])
        return context.get_dummy_value()

    return types.void(table), codegen


@intrinsic
def _tiles_release(typingctx):
    """TILERELEASE: give the tile registers back (their state need not be saved at a switch)."""
    def codegen(context, builder, signature, args):
        builder.call(_declare_void(builder, "llvm.x86.tilerelease", []), [])
        return context.get_dummy_value()

    return types.void(), codegen


@intrinsic
def _amx_block(typingctx, x_pairs, t0, packed, sums):
    """sums[i, o] = Σ_p dot(x_pairs[t0 + i, p], packed[p, o]) for 32 tokens × 32 outputs, on tiles.

    ``x_pairs`` int32 [T', P']: activations as bf16 pairs, T' and P' padded to multiples of 32
    and 16 with zeros. ``packed`` int32 [P', AMX_OUTPUTS]: row p holds input pair p of each of
    the block's weight rows, the layout TDPBF16PS wants for its second operand. ``sums``
    float32 [AMX_TOKENS, AMX_OUTPUTS], written. Tiles 0-3 hold the four 16 × 16 blocks of
    sums, tiles 4-5 two 16-token slices of 16 pairs, tiles 6-7 two 16-output slices; each
    TDPBF16PS does 16 × 16 × 32 multiply-adds.
    """
    def codegen(context, builder, signature, args):
        x_type, _, packed_type, sums_type = signature.args
        x_array = context.make_array(x_type)(context, builder, args[0])
        packed_array = context.make_array(packed_type)(context, builder, args[2])
        sums_array = context.make_array(sums_type)(context, builder, args[3])
        i8, i64, byte_pointer = ir.IntType(8), ir.IntType(64), ir.IntType(8).as_pointer()
        load = _declare_void(builder, "llvm.x86.tileloadd64", [i8, byte_pointer, i64])
        store = _declare_void(builder, "llvm.x86.tilestored64", [i8, byte_pointer, i64])
        zero = _declare_void(builder, "llvm.x86.tilezero", [i8])
        dot = _declare_void(builder, "llvm.x86.tdpbf16ps", [i8, i8, i8])

        def address(array_type, array, row, column):
            at = cgutils.get_item_pointer(context, builder, array_type, array, [row, column],
                                          wraparound=False, boundscheck=False)
            return builder.bitcast(at, byte_pointer)

        def stride(array):  # bytes from one row to the next
            return builder.extract_value(array.strides, 0)

        n_pairs = builder.extract_value(x_array.shape, 1)
        for tile in range(4):
            builder.call(zero, [i8(tile)])
        entry, loop, done = builder.block, builder.append_basic_block("pairs"), builder.append_basic_block("store")
        builder.cbranch(builder.icmp_signed(">", n_pairs, i64(0)), loop, done)

        builder.position_at_end(loop)
        p = builder.phi(i64)
        second_tokens = builder.add(args[1], i64(TILE_ROWS))
        builder.call(load, [i8(4), address(x_type, x_array, args[1], p), stride(x_array)])
        builder.call(load, [i8(5), address(x_type, x_array, second_tokens, p), stride(x_array)])
        builder.call(load, [i8(6), address(packed_type, packed_array, p, i64(0)), stride(packed_array)])
        builder.call(load, [i8(7), address(packed_type, packed_array, p, i64(TILE_WORDS)), stride(packed_array)])
        for tile, (tokens, outputs) in enumerate(((4, 6), (4, 7), (5, 6), (5, 7))):
            builder.call(dot, [i8(tile), i8(tokens), i8(outputs)])
        p_next = builder.add(p, i64(TILE_WORDS))  # an activation tile's row holds 16 pairs
        p.add_incoming(i64(0), entry)
        p.add_incoming(p_next, loop)
        builder.cbranch(builder.icmp_signed("<", p_next, n_pairs), loop, done)

        builder.position_at_end(done)
        for tile, (row, column) in enumerate(((0, 0), (0, TILE_WORDS), (TILE_ROWS, 0), (TILE_ROWS, TILE_WORDS))):
            builder.call(store, [i8(tile), address(sums_type, sums_array, i64(row), i64(column)), stride(sums_array)])
        return context.get_dummy_value()

    return types.void(x_pairs, t0, packed, sums), codegen


def _amx_products_loops(x_pairs, weight_words, out, table):
    """:func:`_products_loops` on AMX tiles: blocks of AMX_OUTPUTS weight rows, 32 tokens at a time.

    ``x_pairs`` int32 [T', P'] zero-padded (see :func:`_amx_block`); ``weight_words`` int32
    [O, P], P = ⌈in / 2⌉ ≤ P': the bf16 weights read two neighbours to a word, the first in
    the low half (so repacking is a transpose of words); ``out`` float32 [T, O]; ``table``
    :data:`TILE_CONFIG`. Tile registers belong to a thread, and a block may run on any of
    Numba's: each block shapes them before it starts and gives them back when it is done.
    """
    n_pairs = x_pairs.shape[1]
    n_rows = out.shape[0]
    n_out = weight_words.shape[0]
    n_blocks = (n_out + AMX_OUTPUTS - 1) // AMX_OUTPUTS
    for b in numba.prange(n_blocks):
        _tiles_configure(table)
        # [P', 32]. Zeros, not np.empty: the padding pairs and the columns past O are multiplied
        # too, and leftover bytes could read as NaN, which would spread into real sums.
        packed = np.zeros((n_pairs, AMX_OUTPUTS), np.int32)
        sums = np.empty((AMX_TOKENS, AMX_OUTPUTS), np.float32)  # [32, 32]
        first = b * AMX_OUTPUTS
        width = min(AMX_OUTPUTS, n_out - first)
        for p in range(weight_words.shape[1]):
            for o in range(width):
                packed[p, o] = weight_words[first + o, p]
        for t0 in range(0, n_rows, AMX_TOKENS):
            _amx_block(x_pairs, t0, packed, sums)
            for i in range(min(AMX_TOKENS, n_rows - t0)):
                out[t0 + i, first:first + width] = sums[i, :width]
        _tiles_release()


_amx_products_kernel = numba.njit(parallel=True, cache=True)(_amx_products_loops)


def _padded(pairs: np.ndarray) -> np.ndarray:
    """pairs [T, P] → [T', P'] with zeros, T' and P' the next multiples of 32 and 16 (whole tiles)."""
    rows = -(-pairs.shape[0] // AMX_TOKENS) * AMX_TOKENS
    columns = -(-pairs.shape[1] // TILE_WORDS) * TILE_WORDS
    padded = np.zeros((rows, columns), np.int32)
    padded[: pairs.shape[0], : pairs.shape[1]] = pairs
    return padded


def linear_bf16_dot(x: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """x [T, in] float32 · bf16 weight [out, in]ᵀ → [T, out] float32, x rounded to bf16 first.

    Its twin: :func:`linear_bf16_dot_numpy`. On AMX tiles where :func:`cpu_has_amx_bf16`,
    else with VDPBF16PS. Refused where :func:`cpu_has_bf16_dot` is not (compiling the
    instruction for a CPU without it would abort the process, not raise).
    """
    check_bf16_dot_available()
    x, weight = np.asarray(x), np.asarray(weight)
    if weight.dtype != ml_dtypes.bfloat16 or weight.ndim != 2 or x.ndim != 2 or x.shape[1] != weight.shape[1]:
        # The kernel trusts these shapes for its reads: a mismatch must not reach it.
        raise MinqwenError(f"linear_bf16_dot multiplies x [T, in] by a bf16 weight [out, in], got x "
                           f"{list(x.shape)} and a {weight.dtype} weight {list(weight.shape)}")
    pairs = round_to_bf16_pairs(x)  # [T, ceil(in / 2)]
    bits = np.ascontiguousarray(weight).view(np.uint16)  # [out, in]
    out = np.empty((x.shape[0], weight.shape[0]), np.float32)  # [T, out]
    if cpu_has_amx_bf16():
        # [out, P]: two neighbouring weights to a word (an odd width, which no Qwen3.5 matrix
        # has, is padded by a copy)
        words = bits.view(np.int32) if bits.shape[1] % 2 == 0 else np.pad(bits, ((0, 0), (0, 1))).view(np.int32)
        _amx_products_kernel(_padded(pairs), words, out, TILE_CONFIG)  # [T', P'] and [out, P] → [T, out]
    else:
        _products_kernel(pairs, bits, out)
    return out
