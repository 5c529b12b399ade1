"""bf16_prompts: activations rounded to bf16, multiplied with the CPU's bf16 dot-product instruction."""

import json
from unittest import mock

import ml_dtypes
import numba
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import minqwen
from conftest import FIXTURE_NAMES, FIXTURES, reordering_bound
from minqwen import bf16_dot as D
from minqwen.errors import MinqwenError
from minqwen.linear import BLAS_ROWS, linear, rounding_prompts_to_bf16
from minqwen.threads import one_blas_thread

needs_the_instruction = pytest.mark.skipif(not D.cpu_has_bf16_dot(), reason="this CPU has no AVX512-BF16")
BF16_FIXTURES = [n for n in FIXTURE_NAMES
                 if json.loads((FIXTURES / n / "config.json").read_text()).get("dtype") == "bfloat16"]


@settings(max_examples=40, deadline=None)
@given(rows=st.integers(1, 9), n_in=st.integers(1, 41), seed=st.integers(0, 999))
def test_rounding_to_bf16_pairs_is_ml_dtypes_rounding_packed_in_words(rows, n_in, seed):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((rows, n_in)) * 10.0 ** rng.integers(-40, 38)).astype(np.float32)
    pairs = D.round_to_bf16_pairs(x)
    assert pairs.shape == (rows, (n_in + 1) // 2)
    bits = pairs.view(np.uint16).reshape(rows, -1)  # little-endian: the first of a pair in the low half
    assert np.array_equal(bits[:, :n_in], x.astype(ml_dtypes.bfloat16).view(np.uint16))
    if n_in % 2:
        assert np.all(bits[:, n_in] == 0)  # the missing neighbour of an odd width adds nothing


def test_rounding_to_bf16_handles_ties_and_special_values_like_ml_dtypes():
    tie_down, tie_up = np.float32(1 + 2**-8), np.float32(1 + 3 * 2**-8)  # halfway: to the even neighbour
    just_above_tie = np.nextafter(tie_down, np.float32(2))
    values = np.array([tie_down, tie_up, just_above_tie, -tie_up, 0.0, -0.0, np.inf, -np.inf, np.nan, -np.nan,
                       np.finfo(np.float32).max, 1e-40, -1e-45, 3.0e38], np.float32)
    got = D.round_to_bf16_pairs(values[None]).view(np.uint16)[0, : values.size]
    want = values.astype(ml_dtypes.bfloat16).view(np.uint16)
    nan = np.isnan(values)
    assert np.array_equal(got[~nan], want[~nan])
    assert np.all(np.isnan(got[nan].view(ml_dtypes.bfloat16).astype(np.float32)))  # a NaN stays a NaN
    assert got[0] == np.float32(1.0).astype(ml_dtypes.bfloat16).view(np.uint16)  # 1 + 2⁻⁸ → 1 (even)


@settings(max_examples=25, deadline=None)
@given(rows=st.integers(1, 20), n_in=st.integers(1, 300), seed=st.integers(0, 999))
def test_the_twin_moves_each_activation_by_at_most_half_a_bf16_step(rows, n_in, seed):
    # What bf16_prompts costs: each activation moves by ≤ 2⁻⁸ of itself, so each output by
    # ≤ 2⁻⁸ · Σ|x w| (plus float32 sums).
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, n_in)).astype(np.float32)
    weight = rng.standard_normal((7, n_in)).astype(ml_dtypes.bfloat16)
    w64 = weight.astype(np.float64)
    exact = x.astype(np.float64) @ w64.T
    magnitude = np.abs(x).astype(np.float64) @ np.abs(w64).T
    assert np.all(np.abs(D.linear_bf16_dot_numpy(x, weight) - exact) <= (2.0**-8 + n_in * 2.0**-23) * magnitude + 1e-30)


needs_amx = pytest.mark.skipif(not D.cpu_has_amx_bf16(), reason="this CPU (or its OS) lends no AMX tiles")
KERNELS = [pytest.param(False, id="vdpbf16ps"), pytest.param(True, id="amx", marks=needs_amx)]


def parts_bound(x, weight, n_parts):
    """reordering_bound for x taken as n_parts bf16 parts: a product over n_parts × in terms."""
    parts = [part.astype(np.float32) for part in D.split_into_bf16_parts_numpy(x, n_parts)]
    return reordering_bound(np.hstack(parts), np.hstack([weight.astype(np.float32)] * n_parts))


@needs_the_instruction
@pytest.mark.parametrize("amx, n_parts", [pytest.param(False, 1, id="vdpbf16ps"),
                                          pytest.param(True, 1, id="amx", marks=needs_amx),
                                          pytest.param(True, D.EXACT_PARTS, id="amx-exact", marks=needs_amx)])
@pytest.mark.parametrize("build", ["parallel", "serial"])
@settings(max_examples=40, deadline=None)
@given(rows=st.integers(1, 70), n_in=st.integers(1, 200), n_out=st.integers(1, 130), seed=st.integers(0, 999))
def test_the_kernel_equals_its_twin(amx, n_parts, build, rows, n_in, n_out, seed):
    # Shapes off every tile size: rows not a multiple of 8 or 32, outputs of 48 or 32, inputs
    # odd or not a multiple of 32.
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((rows, n_in)) * rng.uniform(0.1, 3)).astype(np.float32)
    weight = (rng.standard_normal((n_out, n_in)) * rng.uniform(0.1, 3)).astype(ml_dtypes.bfloat16)
    # (The amx cases run only where needs_amx's call of the real cpu_has_amx_bf16 has asked
    # Linux for the tiles: forcing it True without that would kill the process.)
    # serial: the builds a child forked from an OpenMP process runs (threads.launched_safely)
    builds = {f"_{k}_kernel": getattr(D, f"_{k}_kernel" + ("_serial" if build == "serial" else ""))
              for k in ("round", "split", "products", "amx_products")}
    name = "_amx_products_kernel" if amx else "_products_kernel"
    kernel, calls = builds.pop(name), []
    with mock.patch.object(D, "cpu_has_amx_bf16", lambda: amx), mock.patch.multiple(D, **builds), \
            mock.patch.object(D, name, lambda *arguments: (calls.append(1), kernel(*arguments))[1]):
        got = D.linear_bf16_dot(x, weight, n_parts)
    assert calls == [1]  # the kernel this case is about did the product
    assert got.shape == (rows, n_out)
    twin = D.linear_bf16_dot_numpy(x, weight, n_parts)
    assert np.all(np.abs(got - twin) <= parts_bound(x, weight, n_parts))  # NaN (never written) fails too


@settings(max_examples=60, deadline=None)
@given(rows=st.integers(1, 40), n_in=st.integers(1, 70), seed=st.integers(0, 999),
       scale=st.sampled_from([1.0, 2.0**-100, 2.0**100]))
def test_three_bf16_parts_carry_every_bit_of_a_float32(rows, n_in, seed, scale):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((rows, n_in)) * scale).astype(np.float32)
    x[0, 0] = (1 + 2.0**-10 + 2.0**-20) * scale  # its parts: 1, 2⁻¹⁰ and 2⁻²⁰ (times scale)
    parts = D.split_into_bf16_parts_numpy(x, D.EXACT_PARTS)
    total = sum(part.astype(np.float64) for part in parts)  # exact: no rounding in float64 here
    normal = np.abs(x) >= 2.0**-110  # below, the last part is a subnormal bf16, too coarse for x's last bits
    assert np.array_equal(total[normal], x[normal])
    assert np.all(np.abs(total - x)[~normal] <= 2.0**-133)  # bf16's smallest step
    two = parts[0].astype(np.float64) + parts[1].astype(np.float64)
    assert np.any(two != x)  # two parts are not enough (a float32 has 24 significant bits)
    first, second, third = (np.abs(part.astype(np.float64)) for part in parts)
    assert np.all(second <= 2.0**-8 * first)  # x less its nearest bf16: at most half a bf16 step
    assert np.all(third < 2.0**-7 * second + 2.0**-133)  # what is left less its top half: under a step


# Float32 bit patterns at the edges of the split: the largest finite values that stay finite in
# bf16 and the first that round to inf, values that round up into the next power of two, the
# smallest normal, both sides of 2⁻¹¹⁰, subnormals; each with both signs.
EDGE_BITS = np.array([0x7F7F7FFF, 0x7F7F7F00, 0x7F7F8000, 0x7F7FFFFF, 0x3FFFFFFF, 0x3F7FFFFF, 0x3F7F8000,
                      0x3F808001, 0x00800000, 0x00800001, 0x08800000, 0x08800001, 0x087FFFFF, 0x00000001,
                      0x007FFFFF, 0x00012345, 0x00000000], np.uint32)
EDGES = np.concatenate([EDGE_BITS, EDGE_BITS | np.uint32(0x80000000)]).view(np.float32)


def test_three_parts_are_exact_at_the_edges_of_float32_and_bf16():
    parts = D.split_into_bf16_parts_numpy(EDGES[None], D.EXACT_PARTS)
    total = sum(part.astype(np.float64) for part in parts)[0]
    in_range = (np.abs(EDGES) >= 2.0**-110) & (np.abs(EDGES) < (2 - 2.0**-8) * 2.0**127)
    assert np.array_equal(total[in_range], EDGES[in_range])  # up to the midpoint above bf16's largest
    assert np.all(np.isinf(total[np.abs(EDGES) >= (2 - 2.0**-8) * 2.0**127]))  # from it on: inf
    assert np.all(np.abs(total - EDGES)[np.abs(EDGES) < 2.0**-110] <= 2.0**-133)


def test_the_parts_of_infinities_and_nans_are_the_value_then_zeros():
    x = np.array([[np.inf, -np.inf, np.nan, 3.4e38, -1.5, 0.0]], np.float32)
    first, *rest = D.split_into_bf16_parts_numpy(x, D.EXACT_PARTS)
    widened = first.astype(np.float32)[0]
    assert widened[0] == np.inf and widened[1] == -np.inf and np.isnan(widened[2])
    assert widened[3] == np.inf  # beyond bf16's largest number: inf, as rounding x to bf16 does
    assert widened[4] == -1.5 and widened[5] == 0
    for part in rest:
        assert np.all(part.astype(np.float32) == 0)


@needs_amx
@pytest.mark.parametrize("n_parts", [1, D.EXACT_PARTS])  # 1: bf16_prompts on AMX; 3: the exact products
@pytest.mark.parametrize("build", ["parallel", "serial"])
def test_the_split_kernel_lays_out_the_twins_parts_bit_for_bit(n_parts, build, monkeypatch):
    if build == "serial":  # (the build a child forked from an OpenMP process runs)
        monkeypatch.setattr(D, "_split_kernel", D._split_kernel_serial)
    rng = np.random.default_rng(8)
    ties = np.float32(1 + 2.0**-8) * np.array([1, -1, 3, 2.0**-100], np.float32)  # halfway between two bf16
    for rows, n_in in ((77, 1000), (32, 64), (3, 7)):
        x = (rng.standard_normal((rows, n_in)) * np.exp(rng.uniform(-40, 40, (rows, n_in)))).astype(np.float32)
        x.flat[:6] = [np.inf, -np.inf, np.nan, 3.4e38, -3.4e38, 1e-40]
        x.flat[6:6 + min(len(EDGES), x.size - 6)] = EDGES[: x.size - 6]
        x.flat[-min(4, x.size - 6):] = ties[: min(4, x.size - 6)]
        tiles = D.split_into_bf16_parts(x, n_parts)  # [T'/32, P'/16, S, 2, 16, 16]
        n_blocks, n_steps = tiles.shape[:2]
        assert (n_blocks, n_steps) == (-(-rows // 32), -(-n_in // 32))
        # back to [S, T', P'] pairs, then to bf16 bits [S, T', 2 P']
        bits = tiles.transpose(2, 0, 3, 5, 1, 4).reshape(n_parts, 32 * n_blocks, 16 * n_steps).view(np.uint16)
        for s, part in enumerate(D.split_into_bf16_parts_numpy(x, n_parts)):
            want = part.view(np.uint16)
            nan = np.isnan(part.astype(np.float32))
            assert np.array_equal(bits[s, :rows, :n_in][~nan], want[~nan])
            assert np.all(np.isnan(bits[s, :rows, :n_in][nan].view(ml_dtypes.bfloat16).astype(np.float32)))
        padding = np.ones(bits.shape[1:], bool)
        padding[:rows, :n_in] = False
        assert np.all(bits[:, padding] == 0)  # tokens and inputs past the end: zeros


@needs_amx
@settings(max_examples=40, deadline=None)
@given(rows=st.integers(1, 70), n_in=st.integers(1, 200), n_out=st.integers(1, 130), seed=st.integers(0, 999))
def test_with_three_parts_one_hot_weights_give_back_any_float32_activations(rows, n_in, n_out, seed):
    # Random float32 values use all 24 bits: two parts would drop the last 8
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((rows, n_in)) * 2.0 ** rng.integers(-30, 30, (rows, n_in))).astype(np.float32)
    picked = rng.integers(0, n_in, n_out)
    weight = np.zeros((n_out, n_in), ml_dtypes.bfloat16)
    weight[np.arange(n_out), picked] = 1
    assert np.array_equal(D.linear_bf16_dot(x, weight, D.EXACT_PARTS), x[:, picked])


@needs_the_instruction
def test_products_over_no_inputs_are_zeros():
    weight = np.zeros((40, 0), ml_dtypes.bfloat16)
    for n_parts in (1, D.EXACT_PARTS) if D.cpu_has_amx_bf16() else (1,):
        assert np.array_equal(D.linear_bf16_dot(np.zeros((20, 0), np.float32), weight, n_parts), np.zeros((20, 40)))
    with mock.patch.object(D, "cpu_has_amx_bf16", lambda: False):  # the VDPBF16PS kernel, on an AMX machine too
        assert np.array_equal(D.linear_bf16_dot(np.zeros((20, 0), np.float32), weight, 1), np.zeros((20, 40)))


@needs_amx
def test_with_three_parts_the_tiles_multiply_float32_activations_exactly():
    # Weights of 0 and 1, one 1 a row: each output is one input, so a float32 product returns
    # it exactly. Activations with bits in all three parts' reach: one or two parts would drop them.
    rng = np.random.default_rng(9)
    n_in = 96
    x = (1 + rng.integers(0, 2**23, (40, n_in)) * 2.0**-23).astype(np.float32) * rng.choice([-1, 1], (40, n_in))
    picked = rng.integers(0, n_in, 50)
    weight = np.zeros((50, n_in), ml_dtypes.bfloat16)
    weight[np.arange(50), picked] = 1
    want = x[:, picked]
    assert np.array_equal(D.linear_bf16_dot(x, weight, D.EXACT_PARTS), want)
    assert np.array_equal(linear(x, weight), want)  # what a bf16-resident prefill runs here
    assert not np.array_equal(D.linear_bf16_dot_numpy(x, weight, 2), want)
    # Sums too: within float32's own reordering of the exact product, as BLAS is
    weight = rng.standard_normal((70, n_in)).astype(ml_dtypes.bfloat16)
    x = rng.standard_normal((40, n_in)).astype(np.float32)
    exact = x.astype(np.float64) @ weight.astype(np.float64).T
    assert np.all(np.abs(linear(x, weight) - exact) <= reordering_bound(x, weight.astype(np.float32)))


@needs_amx
def test_the_amx_kernel_runs_on_every_thread_and_for_a_whole_prompt(monkeypatch):
    # Each of Numba's threads must shape its own tiles: a group of blocks on a thread that had
    # not would fault. 8 blocks of 32 outputs per thread, over the 0.8B shape's hidden width
    # (1024); then a prompt longer than a slab, in slabs of 64 tokens.
    rng = np.random.default_rng(7)
    x = rng.standard_normal((100, 1024)).astype(np.float32)
    weight = rng.standard_normal((8 * 32 * numba.get_num_threads(), 1024)).astype(ml_dtypes.bfloat16)
    for slab in (D.SLAB_ROWS, 64):
        monkeypatch.setattr(D, "SLAB_ROWS", slab)
        for n_parts in (1, D.EXACT_PARTS):
            got = D.linear_bf16_dot(x, weight, n_parts)
            assert np.all(np.abs(got - D.linear_bf16_dot_numpy(x, weight, n_parts)) <= parts_bound(x, weight, n_parts))


def test_amx_is_used_only_where_the_cpu_has_it_and_linux_lends_it(monkeypatch):
    import ctypes

    import llvmlite.binding as llvm

    asked = []

    class Libc:
        def __init__(self, answer):
            self.answer = answer

        def syscall(self, *arguments):
            asked.append(arguments)
            return self.answer

    def answer(features, libc_answer, bf16_dot=True):
        monkeypatch.setattr(D, "cpu_has_bf16_dot", lambda: bf16_dot)
        monkeypatch.setattr(llvm, "get_host_cpu_features", lambda: features)
        monkeypatch.setattr(ctypes, "CDLL", lambda *a, **k: Libc(libc_answer))
        monkeypatch.setattr("sys.platform", "linux")
        monkeypatch.setattr("platform.machine", lambda: "x86_64")
        return D.cpu_has_amx_bf16.__wrapped__()

    amx = {"amx-tile": True, "amx-bf16": True}
    assert answer(amx, 0)
    assert asked == [(158, 0x1023, 18)]  # arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)
    assert not answer(amx, -1)  # the kernel refused: a tile instruction would kill the process
    asked.clear()
    assert not answer({"amx-tile": True, "amx-bf16": False}, 0)
    assert not answer({"amx-tile": False, "amx-bf16": True}, 0)
    assert not answer(amx, 0, bf16_dot=False)  # e.g. NUMBA_CPU_NAME=generic: not compiled for this CPU
    # NUMBA_CPU_FEATURES, where set, is what Numba compiles for (LLVM aborts on an instruction outside it)
    monkeypatch.setattr(numba.config, "CPU_FEATURES", "+avx512f,+avx512bf16,-amx-tile,+amx-bf16")
    assert not answer(amx, 0)
    assert asked == []
    monkeypatch.setattr(numba.config, "CPU_FEATURES", "+avx512f,+avx512bf16,+amx-tile,+amx-bf16")
    assert answer({}, 0)


def test_numba_cpu_features_without_avx512bf16_refuse_bf16_prompts(monkeypatch):
    monkeypatch.setattr(numba.config, "CPU_FEATURES", "+avx512f,-avx512bf16")
    assert not D.cpu_has_bf16_dot.__wrapped__()  # (the cached answer was for the host's features)
    monkeypatch.setattr(D, "cpu_has_bf16_dot", D.cpu_has_bf16_dot.__wrapped__)
    with pytest.raises(MinqwenError, match="NUMBA_CPU_FEATURES leaves it out"):
        D.check_bf16_dot_available()


@needs_the_instruction
def test_linear_uses_the_kernel_only_for_many_rows_and_only_inside_the_block(monkeypatch):
    rng = np.random.default_rng(1)
    weight = rng.standard_normal((40, 24)).astype(ml_dtypes.bfloat16)
    used = []
    kernel = D.linear_bf16_dot
    monkeypatch.setattr(D, "linear_bf16_dot", lambda x, w, n_parts=1: (used.append((len(x), n_parts)), kernel(x, w, n_parts))[1])
    for rows in (1, BLAS_ROWS - 1, BLAS_ROWS, 40):
        x = rng.standard_normal((rows, 24)).astype(np.float32)
        linear(x, weight)
        with one_blas_thread(), rounding_prompts_to_bf16():
            linear(x, weight)
        with rounding_prompts_to_bf16(False):
            linear(x, weight)
    # Rounded (one part) only inside the block; outside it, exact: three parts on AMX tiles, or BLAS
    if D.cpu_has_amx_bf16():
        assert used == [(rows, parts) for rows in (BLAS_ROWS, 40) for parts in (D.EXACT_PARTS, 1, D.EXACT_PARTS)]
    else:
        assert used == [(BLAS_ROWS, 1), (40, 1)]


@needs_the_instruction
@pytest.mark.parametrize("name", BF16_FIXTURES)
def test_a_model_with_bf16_prompts_multiplies_as_the_twin_says(monkeypatch, name):
    exact = minqwen.load(FIXTURES / name, dtype="bfloat16")
    rounded = minqwen.load(FIXTURES / name, dtype="bfloat16", bf16_prompts=True)
    assert rounded.bf16_prompts and not exact.bf16_prompts
    ids = np.random.default_rng(2).integers(0, exact.config.vocab_size, 24)
    # Under 16 tokens nothing is rounded: bit for bit the exact model.
    short = ids[: BLAS_ROWS - 1]
    assert np.array_equal(rounded.forward(short), exact.forward(short))
    # Every product of the prompt, on the model's own activations, against the twin. (Not the
    # logits against a twin model: a sum reordered can land an activation on the other side of
    # a bf16 rounding in the next layer, and such differences grow like the rounding itself.)
    # (linear_bf16_dot, one weight, calls linears_bf16_dot too: this sees every product.)
    kernel, products, shapes = D.linears_bf16_dot, [], set()

    def checked(x, weights, n_parts=1):
        got = kernel(x, weights, n_parts)
        if n_parts == 1:  # (the exact model's prompt below takes three parts, on AMX tiles)
            for weight, y in zip(weights, got):
                shapes.add(weight.shape)
                products.append(bool(np.all(np.abs(y - D.linear_bf16_dot_numpy(x, weight)) <= parts_bound(x, weight, 1))))
        return got

    monkeypatch.setattr(D, "linears_bf16_dot", checked)
    prompt = rounded.forward(ids)
    assert len(products) >= 4 * len(exact.layers) and all(products)
    assert exact.lm_head.shape in shapes  # the LM head over the prompt's positions too
    reference = exact.forward(ids)
    assert not np.array_equal(prompt, reference)  # the rounding did happen
    if not exact.config.is_moe:
        # and cost little here. Not asked of MoE models: a router's near-tie between two
        # experts can flip under any rounding, and that position's output then changes wholly.
        np.testing.assert_allclose(prompt, reference, atol=0.05 * np.abs(reference).max())


def test_bf16_prompts_is_refused_where_it_cannot_run(monkeypatch):
    name = BF16_FIXTURES[0]
    with pytest.raises(MinqwenError, match="bf16_prompts needs weights kept in bf16: load with dtype='bfloat16'"):
        minqwen.load(FIXTURES / name, bf16_prompts=True)
    with pytest.raises(MinqwenError, match="bf16_prompts must be True or False, got 'yes'"):
        minqwen.load(FIXTURES / name, dtype="bfloat16", bf16_prompts="yes")
    model = minqwen.load(FIXTURES / name)
    model.bf16_prompts = True  # set by hand on a float32 model
    with pytest.raises(MinqwenError, match="load the model with dtype='bfloat16'"):
        model.forward([1, 2, 3])
    monkeypatch.setattr(D, "cpu_has_bf16_dot", lambda: False)
    with pytest.raises(MinqwenError, match=r"needs a CPU with the AVX512-BF16 instructions .* load without bf16_prompts"):
        minqwen.load(FIXTURES / name, dtype="bfloat16", bf16_prompts=True)
    monkeypatch.setattr(numba.config, "CPU_NAME", "generic")
    with pytest.raises(MinqwenError, match="NUMBA_CPU_NAME is 'generic'"):
        minqwen.load(FIXTURES / name, dtype="bfloat16", bf16_prompts=True)


def test_with_bf16_prompts_numba_does_the_products_of_bf16_prompts_and_a_big_models_decode_steps():
    from minqwen.linear import BF16, SMALL_MODEL_BYTES, numba_multiplies

    for rows in (1, BLAS_ROWS, 512):
        assert numba_multiplies(BF16, rows, SMALL_MODEL_BYTES, bf16_prompts=True)  # BLAS then stays on one thread
        # a small model's few rows: the kernel's serial build, the pool asleep
        assert numba_multiplies(BF16, rows, SMALL_MODEL_BYTES - 1, bf16_prompts=True) == (rows >= BLAS_ROWS)
        assert not numba_multiplies(np.dtype(np.float32), max(rows, BLAS_ROWS), SMALL_MODEL_BYTES, bf16_prompts=True)
    # An exact prompt: on AMX tiles Numba does it too (three parts); elsewhere BLAS does
    assert numba_multiplies(BF16, BLAS_ROWS, SMALL_MODEL_BYTES) == D.cpu_has_amx_bf16()
    with mock.patch.object(D, "cpu_has_amx_bf16", lambda: False):
        assert not numba_multiplies(BF16, BLAS_ROWS, SMALL_MODEL_BYTES)


@needs_the_instruction
def test_a_speculative_verify_stays_exact_even_at_16_rows(monkeypatch):
    from minqwen.mtp import verify

    name = BF16_FIXTURES[0]
    exact = minqwen.load(FIXTURES / name, dtype="bfloat16")
    rounded = minqwen.load(FIXTURES / name, dtype="bfloat16", bf16_prompts=True)
    ids = np.random.default_rng(4).integers(0, exact.config.vocab_size, 8 + BLAS_ROWS).tolist()
    calls = []
    kernel = D.linear_bf16_dot
    # (an exact product of as many rows takes three parts on AMX tiles: not a rounding)
    monkeypatch.setattr(D, "linear_bf16_dot",
                        lambda x, w, n_parts=1: (n_parts == 1 and calls.append(len(x)), kernel(x, w, n_parts))[1])
    results = []
    for model in (exact, rounded):
        cache = model.new_cache()
        model.forward(ids[:8], cache)  # under 16 tokens: the same cache in both
        results.append(verify(model, cache, ids[8:]))  # a last token and 15 drafts
    assert calls == []
    for a, b in zip(*results):
        assert np.array_equal(a, b)
    rounded.forward(ids, rounded.new_cache())
    assert calls  # while a prompt of as many rows does round


@needs_the_instruction
def test_one_thread_rounding_leaves_another_threads_products_exact():
    import threading

    rng = np.random.default_rng(5)
    weight = rng.standard_normal((40, 24)).astype(ml_dtypes.bfloat16)
    x = rng.standard_normal((BLAS_ROWS, 24)).astype(np.float32)
    opened, done = threading.Event(), threading.Event()

    def other_thread():
        with rounding_prompts_to_bf16():
            opened.set()
            done.wait(30)

    thread = threading.Thread(target=other_thread)
    thread.start()
    try:
        assert opened.wait(30)
        # this thread: exact (BLAS, or three parts on AMX tiles), where a rounding of x moves it further
        got, exact = linear(x, weight), x @ weight.astype(np.float32).T
        bound = reordering_bound(x, weight.astype(np.float32))
        assert np.all(np.abs(got - exact) <= bound)
        assert np.any(np.abs(D.linear_bf16_dot_numpy(x, weight) - exact) > bound)
    finally:
        done.set()
        thread.join()


def test_a_mismatched_or_unsupported_product_is_refused_not_run(monkeypatch):
    rng = np.random.default_rng(6)
    x = rng.standard_normal((BLAS_ROWS, 64)).astype(np.float32)
    if D.cpu_has_bf16_dot():  # shapes and dtypes the kernel's reads trust
        with pytest.raises(MinqwenError, match=r"got x \[16, 64\] and a bfloat16 weight \[100, 4000\]"):
            D.linear_bf16_dot(x, np.ones((100, 4000), ml_dtypes.bfloat16))
        with pytest.raises(MinqwenError, match="and a float32 weight"):
            D.linear_bf16_dot(x, np.ones((100, 64), np.float32))
        with pytest.raises(MinqwenError, match=r"as 1 bf16 part, or as 3 on AMX tiles; asked for 2 part\(s\)"):
            D.linear_bf16_dot(x, np.ones((100, 64), ml_dtypes.bfloat16), 2)
        with mock.patch.object(D, "cpu_has_amx_bf16", lambda: False):
            with pytest.raises(MinqwenError, match=r"asked for 3 part\(s\) on a CPU without AMX"):
                D.linear_bf16_dot(x, np.ones((100, 64), ml_dtypes.bfloat16), 3)
        # one bad weight among good ones: refused before any product runs
        good, bad = np.ones((100, 64), ml_dtypes.bfloat16), np.ones((100, 63), ml_dtypes.bfloat16)
        with pytest.raises(MinqwenError, match=r"bfloat16 weight \[100, 63\]"):
            D.linears_bf16_dot(x, [good, bad, good])
    with pytest.raises(MinqwenError, match="makes 1 or 3 parts, not 2"):
        D.split_into_bf16_parts(x, 2)  # the split kernel writes exactly one part or three
    # Where the instruction is missing, the call raises (compiling it would abort the process)
    monkeypatch.setattr(D, "cpu_has_bf16_dot", lambda: False)
    with pytest.raises(MinqwenError, match="AVX512-BF16"):
        D.linear_bf16_dot(x, np.ones((100, 64), ml_dtypes.bfloat16))
    model = minqwen.load(FIXTURES / BF16_FIXTURES[0], dtype="bfloat16")
    model.bf16_prompts = True  # set by hand, on a CPU without the instruction
    with pytest.raises(MinqwenError, match="AVX512-BF16"):
        model.logits(x[:, :1].repeat(model.config.hidden_size, axis=1))


def test_every_nan_stays_a_nan_of_its_sign_when_rounded_to_bf16():
    # NaNs whose payload is only in the 16 bits rounding drops (or all ones, where adding the
    # rounding bias would carry out of the exponent): ml_dtypes keeps each a NaN with its sign.
    bits = np.array([0x7F800001, 0x7F80FFFF, 0x7FFFFFFF, 0xFF800001, 0xFFFFFFFF, 0x7FC00000, 0x7FBF8000], np.uint32)
    values = bits.view(np.float32)
    got = D.round_to_bf16_pairs(values[None]).view(np.uint16)[0, : values.size]
    with np.errstate(invalid="ignore"):
        want = values.astype(ml_dtypes.bfloat16).view(np.uint16)
    assert np.all(np.isnan(got.view(ml_dtypes.bfloat16).astype(np.float32)))
    assert np.array_equal(got >> 15, want >> 15)  # the sign
