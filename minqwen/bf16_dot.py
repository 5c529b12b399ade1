"""Prompts multiplied with the CPU's bf16 instructions: rounded (opt-in), or exact on AMX tiles.

A prompt's products are bound by arithmetic, not by memory: the 512-token prefill of the
0.8B shape is ~510 GFLOP, and float32 BLAS spends most of the prefill on it (see
tools/measurements.md). CPUs with the AVX512-BF16 extension (Intel since Cooper Lake, AMD
since Zen 4) have an instruction, VDPBF16PS, that multiplies 32 bf16 numbers by 32 others and
adds the products, two neighbours at a time, into 16 float32 sums: twice the multiply-adds of
a float32 FMA of the same width. Intel's Xeons since Sapphire Rapids also have an AMX tile
unit: eight tile registers of 16 rows × 64 bytes, and an instruction, TDPBF16PS, that
multiplies a 16 × 32 tile of bf16 numbers by a 32 × 16 one into a tile of 16 × 16 float32
sums: 8,192 multiply-adds. In the bf16-resident mode the weights are bf16 already; the
activations are float32. Two ways to hand them to these instructions:

* **Rounded** (``bf16_prompts``, opt-in: ``minqwen.load(..., dtype="bfloat16",
  bf16_prompts=True)``): each activation rounded to bf16, 8 bits of mantissa instead of 24,
  a relative rounding of up to 2⁻⁸ on every input to every product of a prompt. The
  rounding llama.cpp makes for bf16 weights; torch in bf16 makes more. Decode steps (fewer
  than 16 rows) and speculative verifies of any length (mtp.verify opens an exact block) are
  not touched, so they multiply exactly, over the cache the rounded prompt left.
* **Exact, in three parts** (the bf16-resident mode's prompts, on AMX tiles, by default):
  an activation is exactly the sum of three bf16 numbers (see
  :func:`split_into_bf16_parts_numpy`), and each product of two bf16 numbers is exact in
  float32. So x · Wᵀ = Σ over the parts of part · Wᵀ, three times the multiply-adds, every
  one exact, summed in float32: as exact as a float32 BLAS product up to the rounding of the
  sums, of which there are three times as many (most of them of terms 2⁸ and 2¹⁶ times
  smaller); measured, its error is no larger than BLAS's (tools/measurements.md). One-hot
  weights times any float32 activations give them back bit for bit (a test). The same scheme as
  "bf16x3" in Henry, Tang and Heinecke (2019), who split both operands into three; here
  the weights are bf16 already, so only the activations are. On AMX this is faster than
  float32 BLAS: three parts cost about twice one part, not three times, because each weight
  tile is loaded once for all three. On VDPBF16PS it would not be (see below), and BLAS
  stays.

Each product of two bf16 numbers is exact in float32 and the sums are float32, so the parts
are the only difference from a float32 product — but for inputs, products and sums below
2⁻¹²⁶, which the instructions take as zero, and activations from halfway past bf16's largest
number on, (2 − 2⁻⁸)·2¹²⁷ ≈ 3.396e38, which round to infinity.

* :func:`linear_bf16_dot_numpy` — the definition, slow and clear: split x into parts
  (:func:`split_into_bf16_parts_numpy`; one part is x rounded), widen them and the weights,
  multiply in float32, add.
* :func:`round_to_bf16_pairs` — x rounded to bf16 (to nearest, ties to even, like
  ``x.astype(bfloat16)``), two neighbours packed in each 32-bit word, as the instructions
  read them.
* :func:`_products_loops` — Numba, VDPBF16PS, one part: blocks of weight rows are repacked
  so that one 64-byte load holds the pairs of 16 outputs, and :func:`_dot_tile` — written in
  LLVM's own terms, since Numba has no vector types — keeps a tile of 8 tokens × 48 outputs
  in registers while it walks the inputs.
* :func:`_split_loops` — Numba: x's parts, laid out as TDPBF16PS reads its second operand.
* :func:`_amx_products_loops` — Numba, AMX tiles, one part or three: the weights are the
  first operand as they lie in memory (16 rows of the matrix, 32 inputs of each), the parts
  of 32 tokens the second, and :func:`_amx_block` keeps 32 outputs × 32 tokens of sums in
  four tiles while it walks the inputs.

Measured on the Intel Xeon VM (tools/measurements.md, December 5), 2 threads, the 0.8B
shape's matrices, 512 tokens: VDPBF16PS 190-210 GFLOP/s (on Intel it does no more
multiply-adds a cycle than a float32 FMA), OpenBLAS's float32 sgemm 270-330, AMX tiles
with one part 880-930 (an earlier kernel, which repacked the weights) and with three parts
~600 (of the product's own multiply-adds; the tiles do three times as many).
"""

from __future__ import annotations

import ctypes
import functools
import sys

import ml_dtypes
import numba
import numpy as np
from llvmlite import ir
from llvmlite.binding import llvm_version_info
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from .errors import MinqwenError
from .threads import numba_threads, serial_and_parallel

TILE_TOKENS = 8  # input rows a tile holds
TILE_VECTORS = 3  # 16-output vectors a tile holds: 8 × 3 sums + 3 weight vectors + 1 broadcast fit the 32 registers
LANES = 16  # float32 sums in one 512-bit register
BLOCK_OUTPUTS = TILE_VECTORS * LANES  # 48 weight rows repacked at a time


EXACT_PARTS = 3  # bf16 parts that carry every bit of a float32 activation
U32 = np.uint32


def split_into_bf16_parts_numpy(x: np.ndarray, n_parts: int) -> list[np.ndarray]:
    """x [T, in] float32 as ``n_parts`` bf16 arrays: the first the bf16 nearest x (ties to
    even, like ``astype``), each next one the top half of what the ones before left over.

    A bf16 keeps 8 significant bits of a float32's 24: it is a float32's top 16 bits. What
    the first part leaves over, x minus its rounding, is exactly a float32 of at most 16
    significant bits (x's last ones, give or take a sign). The second part is its top 8 bits,
    the top half of its float32 (cut, not rounded: nothing is lost either way, and cutting is
    a mask); that leaves at most 8, which the third part, the top half again, holds whole. So
    three parts carry all 24 bits: their sum is x itself, for every 2⁻¹¹⁰ ≤ |x| < (2 − 2⁻⁸) ·
    2¹²⁷ ≈ 3.396e38 (below, the last part would be a subnormal too small for x's last bits: the
    sum is then within 2⁻¹³³, bf16's smallest step; from that bound on, halfway past bf16's
    largest number, the first part rounds to ±inf). Where the first part is ±inf or NaN, it
    stands for the whole value; the next parts are 0.
    """
    rest = np.array(x, dtype=np.float32)  # [T, in]
    parts = []
    for s in range(n_parts):
        if s == 0:
            part = rest.astype(ml_dtypes.bfloat16)  # [T, in]: the nearest bf16
        else:
            part = (rest.view(np.uint32) >> 16).astype(np.uint16).view(ml_dtypes.bfloat16)  # [T, in]: the top half
        widened = part.astype(np.float32)
        with np.errstate(invalid="ignore"):
            rest = np.where(np.isfinite(widened), rest - widened, np.float32(0)).astype(np.float32)
        parts.append(part)
    return parts


def linear_bf16_dot_numpy(x: np.ndarray, weight: np.ndarray, n_parts: int = 1) -> np.ndarray:
    """The twin: x split into ``n_parts`` bf16 parts, then Σ over the parts of part · Wᵀ in float32.

    ``weight`` is a bf16 array. One part is x rounded to bf16 (``bf16_prompts``, inexact);
    :data:`EXACT_PARTS` parts are x itself. Products of two bf16
    numbers are exact in float32, so only the parts, the order of the sums, and the
    instruction's flushing of subnormal inputs, products and sums (below 2⁻¹²⁶) to zero
    separate this from the kernels. (The order of the sums also decides where sums near
    float32's largest number overflow: for inputs 3e38, 3e38, −3e38, −3e38, repeated, and
    weights of 1, the AMX kernel gave 0 here, the VDPBF16PS kernel inf and this twin NaN.)
    """
    widened = weight.astype(np.float32)  # [out, in]
    out = np.zeros((np.shape(x)[0], weight.shape[0]), np.float32)  # [T, out]
    for part in split_into_bf16_parts_numpy(x, n_parts):
        out += part.astype(np.float32) @ widened.T  # [T, in] · [in, out] → [T, out]
    return out


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


_round_kernel_serial, _round_kernel = serial_and_parallel(_round_loops)


@numba.njit(inline="always")
def _bf16_bits(f):
    """The bf16 nearest float32 bits f (ties to even), as the low 16 bits of a uint32."""
    # Each step cast back to uint32: Numba widens integer arithmetic to 64 bits, and LLVM then
    # fills vector registers with half as many values (the split below ran 1.5x slower).
    top = U32(f >> U32(16))  # the 16 bits a cut would keep
    if U32(f & U32(0x7FFFFFFF)) > U32(0x7F800000):  # NaN: keep it a (quiet) NaN
        return U32(top | U32(0x0040))
    # Adding 0x7FFF, plus 1 when the bit that will be kept last is odd, carries into it
    # exactly when the 16 bits dropped are more than half, or half with an odd neighbour.
    odd = U32(top & U32(1))
    return U32(U32(U32(f + U32(0x7FFF)) + odd) >> U32(16))


def round_to_bf16_pairs(x: np.ndarray) -> np.ndarray:
    """x [T, in] float32 → int32 [T, ceil(in / 2)]: each word two neighbouring inputs as bf16, the first in the low half."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    pairs = np.empty((x.shape[0], (x.shape[1] + 1) // 2), np.int32)
    _round_kernel(x, pairs)
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


def _bf16_pairs_type(lanes: int) -> ir.VectorType:
    """The type LLVM gives the instruction's bf16 operands, ``lanes`` words of two bf16 each.

    From LLVM 17 on, bfloat values; before, the words themselves as 32-bit integers (LLVM 14
    and 15, which Numba 0.59-0.61 build on, refuse bfloat: "Intrinsic has incorrect argument
    type!"). The bits are the same either way.
    """
    return ir.VectorType(_BFloat(), 2 * lanes) if llvm_version_info[0] >= 17 else ir.VectorType(ir.IntType(32), lanes)


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
        bf16s = _bf16_pairs_type(LANES)
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


_products_kernel_serial, _products_kernel = serial_and_parallel(_products_loops)


# --------------------------------------------------------------------------- the product on AMX tiles

TILE_ROWS = 16  # an AMX tile register holds 16 rows ...
TILE_WORDS = 16  # ... of 64 bytes: 16 int32 words (16 float32 sums, or 16 bf16 pairs)
AMX_TOKENS = 2 * TILE_WORDS  # tokens a block of sums covers: two tiles of activations, a token a word
AMX_OUTPUTS = 2 * TILE_ROWS  # outputs a block of sums covers: two tiles of weights, an output a row
# Weight bytes a group of output blocks may take, so that they stay in a core's L2 cache while
# every block of tokens walks them (measured on the Intel Xeon VM, 3 parts, 512 tokens: groups
# of 256 kB, 512 kB and 1 MB ran the 0.8B shape's products in 0.94, 0.89 and 0.82 of the time
# of one block at a time; its L2 is 2 MB).
GROUP_BYTES = 1 << 20
SLAB_ROWS = 2048  # tokens split at a time: the split copy of x stays ~1.5 × these rows of x
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


def _split_loops(x, x_tiles):
    """x float32 [T, in] → x_tiles int32 [T'/32, P'/16, S, 2, 16, 16]: x as S bf16 parts, in tiles.

    The parts of :func:`split_into_bf16_parts_numpy` (S = 1 or 3), bit for bit.
    ``x_tiles[b, k, s, h, r, j]`` holds, for token t = 32 b + 16 h + j, input pair
    p = 16 k + r of part s, first input in the low half: each [16, 16] is one tile of
    TDPBF16PS's second operand (16 rows of pairs, a token a word), stored where one 1 kB load
    finds it. Every word is written: tokens past T and pairs past ⌈in / 2⌉ with zeros.
    For 32 tokens × 32 inputs at a time, the parts are worked out a token's row at a time
    (vector code: the inputs lie side by side), each part's bf16 halves side by side, so that
    their words are the pairs already; then each [16 tokens, 16 pairs] block of words is
    transposed into its tile.
    """
    n_rows, n_in = x.shape
    n_parts = x_tiles.shape[2]
    for b in numba.prange(x_tiles.shape[0]):
        halves = np.empty((n_parts, AMX_TOKENS, 2 * TILE_ROWS), np.uint16)  # [S, 32 tokens, 32 inputs]
        words = halves.view(np.int32)  # [S, 32 tokens, 16 pairs]: two neighbours' halves, first one low
        values = np.empty(2 * TILE_ROWS, np.float32)  # [32 inputs] of one token
        for k in range(x_tiles.shape[1]):
            i0 = 2 * TILE_ROWS * k  # the first input of this step's pairs
            for t in range(AMX_TOKENS):
                token = b * AMX_TOKENS + t
                if token < n_rows and i0 + 2 * TILE_ROWS <= n_in:
                    for i in range(2 * TILE_ROWS):
                        values[i] = x[token, i0 + i]
                else:  # past the last token or input: zeros
                    for i in range(2 * TILE_ROWS):
                        values[i] = x[token, i0 + i] if token < n_rows and i0 + i < n_in else np.float32(0)
                first = halves[0, t]  # [32 inputs]
                if n_parts == 1:
                    for i in range(2 * TILE_ROWS):
                        first[i] = np.uint16(_bf16_bits(np.float32(values[i]).view(np.uint32)))
                    continue
                second, third = halves[1, t], halves[2, t]  # [32 inputs] each
                for i in range(2 * TILE_ROWS):
                    part = _bf16_bits(np.float32(values[i]).view(np.uint32))  # the nearest bf16
                    first[i] = np.uint16(part)
                    special = U32(part & U32(0x7F80)) == U32(0x7F80)  # ±inf or NaN: it carries the value
                    rest = np.float32(0) if special else np.float32(values[i] - U32(part << U32(16)).view(np.float32))
                    top = U32(np.float32(rest).view(np.uint32) & U32(0xFFFF0000))  # the top half of what is left
                    second[i] = np.uint16(top >> U32(16))
                    rest = np.float32(rest - U32(top).view(np.float32))  # at most 8 bits: a bf16 whole
                    third[i] = np.uint16(U32(np.float32(rest).view(np.uint32)) >> U32(16))
            for s in range(n_parts):
                for h in range(2):
                    for r in range(TILE_ROWS):
                        row = x_tiles[b, k, s, h, r]  # [16 tokens]: pair r of tokens 16 h … 16 h + 15
                        for j in range(TILE_WORDS):
                            row[j] = words[s, h * TILE_WORDS + j, r]


_split_kernel_serial, _split_kernel = serial_and_parallel(_split_loops)


def split_into_bf16_parts(x: np.ndarray, n_parts: int) -> np.ndarray:
    """x [T, in] float32 → int32 [T'/32, P'/16, n_parts, 2, 16, 16], the layout :func:`_amx_block` reads."""
    if n_parts not in (1, EXACT_PARTS):  # the kernel writes exactly these
        raise MinqwenError(f"split_into_bf16_parts makes 1 or {EXACT_PARTS} parts, not {n_parts}")
    x = np.ascontiguousarray(x, dtype=np.float32)
    n_blocks = -(-x.shape[0] // AMX_TOKENS)
    n_steps = -(-x.shape[1] // (2 * TILE_ROWS))  # an activation tile covers 16 pairs: 32 inputs
    x_tiles = np.empty((n_blocks, n_steps, n_parts, 2, TILE_ROWS, TILE_WORDS), np.int32)
    _split_kernel(x, x_tiles)
    return x_tiles


@intrinsic
def _amx_block(typingctx, x_tiles, b, weight_words, o0, sums):
    """sums[o, i] = Σ_s Σ_p dot(weight_words[o0 + o, p], part s of token 32 b + i's pair p), on tiles.

    32 outputs × 32 tokens. ``x_tiles`` from :func:`split_into_bf16_parts`; ``weight_words``
    int32 [O', P']: the bf16 weights as they are stored, read two neighbours to a word, with
    O' − o0 ≥ 32 and P' = 16 × x_tiles.shape[1]; ``sums`` float32 [32, 32], written.
    The weights are TDPBF16PS's first operand as they lie in memory: a tile is 16 rows of
    the matrix, 32 inputs of each. Tiles 4-5 hold the block's 32 weight rows, tiles 6-7 two
    16-token tiles of one part, tiles 0-3 the four 16 × 16 blocks of sums. Each pair step
    loads the weights once and multiplies them by every part; each TDPBF16PS does
    16 × 16 × 32 multiply-adds.
    """
    def codegen(context, builder, signature, args):
        x_type, _, w_type, _, sums_type = signature.args
        x_array = context.make_array(x_type)(context, builder, args[0])
        w_array = context.make_array(w_type)(context, builder, args[2])
        sums_array = context.make_array(sums_type)(context, builder, args[4])
        i8, i64, byte_pointer = ir.IntType(8), ir.IntType(64), ir.IntType(8).as_pointer()
        load = _declare_void(builder, "llvm.x86.tileloadd64", [i8, byte_pointer, i64])
        store = _declare_void(builder, "llvm.x86.tilestored64", [i8, byte_pointer, i64])
        zero = _declare_void(builder, "llvm.x86.tilezero", [i8])
        dot = _declare_void(builder, "llvm.x86.tdpbf16ps", [i8, i8, i8])

        def address(array_type, array, indices):
            at = cgutils.get_item_pointer(context, builder, array_type, array, [i64(i) if isinstance(i, int) else i
                                                                                for i in indices],
                                          wraparound=False, boundscheck=False)
            return builder.bitcast(at, byte_pointer)

        weight_stride = builder.extract_value(w_array.strides, 0)  # bytes from one weight row to the next
        sums_stride = builder.extract_value(sums_array.strides, 0)
        tile_stride = i64(4 * TILE_WORDS)  # an activation tile is 1 kB in one piece
        n_steps = builder.extract_value(x_array.shape, 1)
        n_parts = builder.extract_value(x_array.shape, 2)
        second_rows = builder.add(args[3], i64(TILE_ROWS))
        for tile in range(4):
            builder.call(zero, [i8(tile)])
        entry = builder.block
        step_loop, part_loop = builder.append_basic_block("pair_steps"), builder.append_basic_block("parts")
        step_end, done = builder.append_basic_block("next_step"), builder.append_basic_block("store")
        go = builder.and_(builder.icmp_signed(">", n_steps, i64(0)), builder.icmp_signed(">", n_parts, i64(0)))
        builder.cbranch(go, step_loop, done)

        builder.position_at_end(step_loop)  # pair step k: inputs 32 k … 32 k + 31
        k = builder.phi(i64)
        p = builder.mul(k, i64(TILE_ROWS))
        builder.call(load, [i8(4), address(w_type, w_array, [args[3], p]), weight_stride])
        builder.call(load, [i8(5), address(w_type, w_array, [second_rows, p]), weight_stride])
        builder.branch(part_loop)

        builder.position_at_end(part_loop)
        s = builder.phi(i64)
        builder.call(load, [i8(6), address(x_type, x_array, [args[1], k, s, 0, 0, 0]), tile_stride])
        builder.call(load, [i8(7), address(x_type, x_array, [args[1], k, s, 1, 0, 0]), tile_stride])
        for tile, (weights, tokens) in enumerate(((4, 6), (4, 7), (5, 6), (5, 7))):
            builder.call(dot, [i8(tile), i8(weights), i8(tokens)])
        s_next = builder.add(s, i64(1))
        s.add_incoming(i64(0), step_loop)
        s.add_incoming(s_next, part_loop)
        builder.cbranch(builder.icmp_signed("<", s_next, n_parts), part_loop, step_end)

        builder.position_at_end(step_end)
        k_next = builder.add(k, i64(1))
        k.add_incoming(i64(0), entry)
        k.add_incoming(k_next, step_end)
        builder.cbranch(builder.icmp_signed("<", k_next, n_steps), step_loop, done)

        builder.position_at_end(done)
        for tile, (row, column) in enumerate(((0, 0), (0, TILE_WORDS), (TILE_ROWS, 0), (TILE_ROWS, TILE_WORDS))):
            builder.call(store, [i8(tile), address(sums_type, sums_array, [row, column]), sums_stride])
        return context.get_dummy_value()

    return types.void(x_tiles, b, weight_words, o0, sums), codegen


def _amx_products_loops(x_tiles, weight_words, out, table, group):
    """out[t, o] = Σ over the parts and inputs of x_tiles · weight_words, on AMX tiles.

    ``x_tiles`` from :func:`split_into_bf16_parts`; ``weight_words`` int32 [O', P'] (see
    :func:`_amx_block`: rows and pairs padded to whole tiles); ``out`` float32 [T, O], O ≤ O';
    ``table`` :data:`TILE_CONFIG`. The output blocks are taken ``group`` at a time (see
    :func:`_blocks_a_group`): for each block of 32 tokens, fetched once, a group's blocks all
    use it. Groups are independent and split across the cores. Tile registers belong to a
    thread, and a group may run on any of Numba's: each group shapes them before it starts
    and gives them back when it is done.
    """
    n_rows, n_out = out.shape
    n_blocks = (n_out + AMX_OUTPUTS - 1) // AMX_OUTPUTS
    n_groups = (n_blocks + group - 1) // group
    for g in numba.prange(n_groups):
        _tiles_configure(table)
        sums = np.empty((AMX_OUTPUTS, AMX_TOKENS), np.float32)  # [32 outputs, 32 tokens]
        for b in range(x_tiles.shape[0]):
            t0 = b * AMX_TOKENS
            for block in range(g * group, min(n_blocks, (g + 1) * group)):
                o0 = block * AMX_OUTPUTS
                width = min(AMX_OUTPUTS, n_out - o0)
                _amx_block(x_tiles, b, weight_words, o0, sums)
                for i in range(min(AMX_TOKENS, n_rows - t0)):
                    row = out[t0 + i]  # [O]
                    for o in range(width):
                        row[o0 + o] = sums[o, i]
        _tiles_release()


_amx_products_kernel_serial, _amx_products_kernel = serial_and_parallel(_amx_products_loops)


def _blocks_a_group(n_out: int, n_steps: int) -> int:
    """Output blocks a group takes: as many as keep their weights within :data:`GROUP_BYTES`,
    and no more than leave each of Numba's threads a group."""
    n_blocks = -(-n_out // AMX_OUTPUTS)
    block_bytes = AMX_OUTPUTS * TILE_ROWS * max(1, n_steps) * 4  # 32 rows of 16 n_steps words
    return max(1, min(GROUP_BYTES // block_bytes, -(-n_blocks // numba_threads())))


def _weight_words(weight: np.ndarray, n_steps: int) -> np.ndarray:
    """bf16 [O, in] → int32 [O', 16 · n_steps], two neighbours to a word, padded with zeros to
    whole tiles (O' a multiple of 32). A view where no padding is needed (most Qwen3.5
    matrices; not Gated DeltaNet's in_proj_b and in_proj_a, a row per value head), else a
    copy: a tile read past the matrix's end would read other memory."""
    bits = np.ascontiguousarray(weight).view(np.uint16)  # [O, in]
    n_out, n_in = bits.shape
    rows, columns = -(-n_out // AMX_OUTPUTS) * AMX_OUTPUTS, 2 * TILE_ROWS * n_steps
    if (rows, columns) != (n_out, n_in):
        bits = np.pad(bits, ((0, rows - n_out), (0, columns - n_in)))
    return bits.view(np.int32)


def linear_bf16_dot(x: np.ndarray, weight: np.ndarray, n_parts: int = 1) -> np.ndarray:
    """x [T, in] float32 · bf16 weight [out, in]ᵀ → [T, out] float32, x taken as ``n_parts`` bf16 parts.

    One part: x rounded to bf16 (``bf16_prompts``). :data:`EXACT_PARTS`: every bit of x, on
    AMX tiles only (see :func:`split_into_bf16_parts_numpy`). Twin:
    :func:`linear_bf16_dot_numpy`. On AMX tiles where :func:`cpu_has_amx_bf16`, else (one
    part only) with VDPBF16PS. Refused where :func:`cpu_has_bf16_dot` is not (compiling the
    instruction for a CPU without it would abort the process, not raise).
    """
    return linears_bf16_dot(x, [weight], n_parts)[0]


def linears_bf16_dot(x: np.ndarray, weights, n_parts: int = 1) -> list[np.ndarray]:
    """[:func:`linear_bf16_dot` (x, w, n_parts) for w in weights], with x split or rounded once.

    A layer projects one input several ways (a Gated DeltaNet's in_proj_qkv, in_proj_z,
    in_proj_b and in_proj_a; attention's q, k and v; the MLP's gate and up): putting x in the
    kernels' form is the same work for each, so it is done once for all of them.
    """
    check_bf16_dot_available()
    x = np.asarray(x)
    weights = [np.asarray(weight) for weight in weights]
    for weight in weights:
        if weight.dtype != ml_dtypes.bfloat16 or weight.ndim != 2 or x.ndim != 2 or x.shape[1] != weight.shape[1]:
            # The kernel trusts these shapes for its reads: a mismatch must not reach it.
            raise MinqwenError(f"a bf16 product multiplies x [T, in] by a bf16 weight [out, in], got x "
                               f"{list(x.shape)} and a {weight.dtype} weight {list(weight.shape)}")
    amx = cpu_has_amx_bf16()
    if n_parts not in (1, EXACT_PARTS) or n_parts > 1 and not amx:
        raise MinqwenError(f"linear_bf16_dot takes x as 1 bf16 part, or as {EXACT_PARTS} on AMX tiles; "
                           f"asked for {n_parts} part(s) on a CPU {'with' if amx else 'without'} AMX")
    outs = [np.empty((x.shape[0], weight.shape[0]), np.float32) for weight in weights]  # [T, out] each
    if not amx:
        pairs = round_to_bf16_pairs(x)  # [T, ⌈in / 2⌉]
        for weight, out in zip(weights, outs):
            _products_kernel(pairs, np.ascontiguousarray(weight).view(np.uint16), out)
        return outs
    n_steps = -(-x.shape[1] // (2 * TILE_ROWS))
    words = [_weight_words(weight, n_steps) for weight in weights]  # [O', P'] each
    groups = [_blocks_a_group(weight.shape[0], n_steps) for weight in weights]
    for start in range(0, x.shape[0], SLAB_ROWS):
        stop = min(start + SLAB_ROWS, x.shape[0])
        x_tiles = split_into_bf16_parts(x[start:stop], n_parts)  # [T'/32, P'/16, parts, 2, 16, 16]
        for weight_words, group, out in zip(words, groups, outs):
            _amx_products_kernel(x_tiles, weight_words, out[start:stop], TILE_CONFIG, group)  # → [stop − start, out]
    return outs
