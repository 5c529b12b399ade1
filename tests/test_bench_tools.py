"""The benchmark tools print what the protocol says they print (docs/benchmarks.md, spec-notes §6,
issues #6 and #10): each figure is checked against an independent computation — the
checkpoint's safetensors headers, the protocol's formula in float64 or fractions, or a count of
calls under a fake clock — never against a number the tool itself produced.
"""

from __future__ import annotations

import io
import json
import math
import os
import platform
import re
import resource
import statistics
import sys
import types
from contextlib import redirect_stdout
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
from conftest import FIXTURES, ROOT, STORED_ITEMSIZE, require_reference, tensor_headers

sys.path.insert(0, str(ROOT / "tools"))

import bench  # noqa: E402

import minqwen  # noqa: E402

# --------------------------------------------------------------------------- the independent side

def text_config(folder: Path) -> dict:
    raw = json.loads((Path(folder) / "config.json").read_text())
    return raw.get("text_config", raw)


def decode_bytes_from_headers(folder: Path, resident_itemsize: int) -> Fraction:
    """Bytes one decode step reads, from the headers alone, by the protocol's rule: every
    decoder-layer tensor once — matrices at the resident itemsize, except the conv1d kernel, the
    MoE router and the shared-expert gate, which minqwen keeps float32 as it keeps every 1-D
    tensor (norms, A_log, dt_bias, biases) — the routed experts only for the k of E a token
    visits (at their stored itemsize: they stay memory-mapped), the final norm, and the LM
    head's V × H once, tied or not. Not counted: the embedding table (a step reads one row),
    mtp.* and the vision tower.
    """
    cfg = text_config(folder)
    E, k = cfg.get("num_experts"), cfg.get("num_experts_per_tok")
    total = Fraction(0)
    for name, (stored, shape) in tensor_headers(folder).items():
        if name.startswith("mtp.") or ".visual." in name or name.startswith("visual."):
            continue
        m = re.search(r"layers\.\d+\.(.*)$", name)
        if not m:
            continue
        rest, n = m.group(1), math.prod(shape)
        if ".experts." in rest:
            total += Fraction(n * STORED_ITEMSIZE[stored] * k, E)
        elif (len(shape) == 1 or "conv1d" in rest or rest.endswith("mlp.gate.weight")
              or rest.endswith("shared_expert_gate.weight")):
            total += n * 4
        else:
            total += n * resident_itemsize
    final_norm = cfg["hidden_size"] * 4
    return total + final_norm + cfg["vocab_size"] * cfg["hidden_size"] * resident_itemsize


DENSE = ["text_tied_fp32", "text_grouped_bf16_bias", "multimodal_bf16_untied", "multimodal_sharded"]
MOE = ["moe_text_per_expert_fp32", "moe_text_16_experts_top4_bf16", "moe_text_fused_all_experts_bf16",
       "moe_multimodal_fused_top1"]
DTYPES = [("float32", 4), ("bfloat16", 2)]


# --------------------------------------------------------------------------- roofline: bytes per token


@pytest.mark.parametrize("dtype, itemsize", DTYPES)
@pytest.mark.parametrize("name", DENSE)
def test_weight_bytes_per_token_of_a_dense_model_matches_its_tensor_headers(name, dtype, itemsize):
    # Fails if the LM head is left out, if a tied head is counted twice (embedding + head), if an
    # untied embedding is counted whole, or if bf16-resident matrices are counted at 4 bytes.
    model = minqwen.load(FIXTURES / name, dtype=dtype)
    assert bench.weight_bytes_per_token(model) == decode_bytes_from_headers(FIXTURES / name, itemsize)


def test_weight_bytes_per_token_leaves_the_mtp_head_out(tmp_path):
    # A checkpoint with a random MTP head reads, per main-model decode step, what it read without it.
    from make_mtp_fixtures import with_random_mtp

    from minqwen.mtp import load_mtp

    folder = with_random_mtp(FIXTURES / "text_tied_fp32", tmp_path / "with-mtp")
    model = minqwen.load(folder)
    assert load_mtp(folder, model) is not None  # the head is there, for the loader too
    assert bench.weight_bytes_per_token(model) == decode_bytes_from_headers(folder, 4)


@pytest.mark.parametrize("dtype, itemsize", DTYPES)
@pytest.mark.parametrize("name", MOE)
def test_weight_bytes_per_token_of_an_moe_model_counts_the_shared_and_the_active_experts(name, dtype, itemsize):
    model = minqwen.load(FIXTURES / name, dtype=dtype)
    expected = decode_bytes_from_headers(FIXTURES / name, itemsize)
    assert abs(bench.weight_bytes_per_token(model) - expected) <= 1e-6 * expected


# --------------------------------------------------------------------------- roofline: the GEMV probe


class _FakeClock:
    """perf_counter() that returns the next scripted instant."""

    def __init__(self, instants):
        self.instants = list(instants)

    def perf_counter(self):
        return self.instants.pop(0)

    def sleep(self, seconds):
        self.slept = (len(self.instants), seconds)


def test_roofline_sample_is_the_median_of_five_gemvs(monkeypatch):
    # Fails on a mean, a minimum, a single GEMV, or fewer than 5 of them.
    probe = object.__new__(bench.RooflineProbe)
    probe.W = np.ones((64, 256), np.float32)
    probe.x = np.ones(256, np.float32)
    # Median of the 5: 0.0035. Mean (0.0221), min (0.001), the first (0.004) and the median of
    # the first 4 (0.002 and 0.004 → 0.003) all differ: with a last duration equal to the middle
    # of the first 4, range(4) would pass unseen.
    durations = [0.004, 0.001, 0.100, 0.002, 0.0035]
    instants = []
    t = 10.0
    for d in durations:
        instants += [t, t + d]
        t += 1.0
    clock = _FakeClock(instants)
    monkeypatch.setattr(bench, "time", clock)
    expected = probe.W.nbytes / statistics.median(durations) / 1e9
    assert bench.RooflineProbe.sample(probe) == pytest.approx(expected, rel=1e-12)
    # Then it waits out OpenBLAS's spinning threads (0.1 s measured) before a contender runs.
    assert clock.slept[0] == 0 and clock.slept[1] >= 0.25


class _ShapeOnly:
    """Stands in for the probe's matrix: records its shape, allocates nothing."""

    def __init__(self, shape, itemsize=4):
        self.shape, self.nbytes = shape, math.prod(shape) * itemsize

    def __matmul__(self, x):
        return None


@pytest.mark.parametrize("llc", [8 << 20, 32 << 20, 200 << 20, 384 << 20])
def test_roofline_matrix_is_at_least_four_times_the_last_level_cache_and_512_mib(monkeypatch, llc):
    # Fails if the factor 4 or the 512 MiB floor is lowered.
    monkeypatch.setattr(bench, "last_level_cache_bytes", lambda: llc)
    shapes = []

    class Rng:
        def random(self, shape, dtype):
            assert dtype == np.float32
            shapes.append(shape)
            return _ShapeOnly(shape)

    monkeypatch.setattr(bench.np.random, "default_rng", lambda seed=None: Rng())
    probe = bench.RooflineProbe()
    assert probe.W.nbytes >= max(4 * llc, 512 << 20)
    assert probe.W.nbytes < max(4 * llc, 512 << 20) + 4 * shapes[0][1]  # and not needlessly larger


def test_last_level_cache_is_the_highest_level_cache_sysfs_lists():
    # Independent: the size of the cache with the highest "level" (the last level), parsed here.
    # Fails if the smallest cache (L1) or the first one listed is taken.
    base = Path("/sys/devices/system/cpu/cpu0/cache")
    levels = []
    for index in base.glob("index*"):
        try:
            level, size = int((index / "level").read_text()), (index / "size").read_text().strip()
        except (OSError, ValueError):
            continue
        units = {"K": 1024, "M": 1024**2, "G": 1024**3}
        levels.append((level, int(size[:-1]) * units[size[-1]] if size[-1] in units else int(size)))
    if not levels:
        pytest.skip("no cache sizes in sysfs here")
    assert bench.last_level_cache_bytes() == max(levels)[1]


# --------------------------------------------------------------------------- decode: 63 steps after the first token


class _Ticking:
    """A fake clock that only moves when a forward runs: one unit per forward."""

    def __init__(self):
        self.now = 0.0

    def perf_counter(self):
        return self.now

    def tick(self):
        self.now += 1.0


class _StubModel:
    """minqwen's forward, as far as bench uses it: each call costs one clock unit."""

    def __init__(self, clock, vocab=10):
        self.clock, self.vocab, self.calls = clock, vocab, []

    def new_cache(self):
        return types.SimpleNamespace(copy=lambda: None)

    def forward(self, ids, cache, last_only=False):
        self.clock.tick()
        self.calls.append(len(ids))
        logits = np.zeros((1, self.vocab), np.float32)
        logits[0, len(self.calls) % self.vocab] = 1
        return logits


def test_minqwen_decode_times_the_forwards_after_the_first_new_token(monkeypatch):
    # 64 new tokens: one prefill (giving token 1) then 63 one-token forwards, all 63 and only they
    # timed. Fails if the prefill is inside the timed span, or if 64 (or 62) steps are timed.
    clock = _Ticking()
    monkeypatch.setattr(bench, "time", clock)
    runner = object.__new__(bench.Minqwen)
    runner.model = _StubModel(clock)
    seconds = runner.decode(np.arange(16), 64)
    assert runner.model.calls == [16] + [1] * 63
    assert seconds == 63.0


def test_long_context_decode_times_63_steps_per_context_and_repeat(monkeypatch):
    clock = _Ticking()
    monkeypatch.setattr(bench, "time", clock)
    runner = object.__new__(bench.Minqwen)
    runner.model = _StubModel(clock)
    times = runner.decode_at_contexts({512: np.arange(512), 2048: np.arange(2048)}, 64, 3)
    assert times == {512: [63.0] * 3, 2048: [63.0] * 3}
    assert runner.model.calls == [512, 2048] + [1] * (63 * 6)  # each context prefilled once


# --------------------------------------------------------------------------- the table and the JSON


# The contenders' own names (bench.Minqwen / bench.Transformers name themselves so).
NAMES = {("minqwen", "float32"): "minqwen fp32", ("minqwen", "bfloat16"): "minqwen bf16-resident",
         ("transformers", "float32"): "transformers fp32", ("transformers", "bfloat16"): "transformers bf16"}
PREFILL = {"minqwen fp32": [2.0, 1.0, 9.0], "minqwen bf16-resident": [3.0, 2.5, 0.5],
           "transformers fp32": [4.0, 8.0, 5.0], "transformers bf16": [1.5, 1.0, 6.0]}
DECODE = {"minqwen fp32": [7.0, 20.0, 8.0], "minqwen bf16-resident": [4.0, 3.0, 30.0],
          "transformers fp32": [15.0, 14.0, 13.0], "transformers bf16": [12.0, 40.0, 11.0]}
# The probe's samples, one before and one after each round's decoding: median 35 (of all six),
# round means 25, 65, 45; chosen so that the median of per-round fractions differs from decode
# tok/s over the median bandwidth, and from either sample of a pair alone.
ROOFLINE = [20.0, 30.0, 100.0, 30.0, 40.0, 50.0]
WEIGHT_BYTES = {"float32": 3_009_347_584, "bfloat16": 1_505_558_528}


def _fake_worker_class(stops):
    class FakeWorker:
        def __init__(self, kind, what, folder, threads):
            if what == bench.BF16_PROMPTS:  # as on a CPU without AVX512-BF16
                raise bench.ContenderFailed("minqwen: this CPU has no AVX512-BF16")
            self.kind, self.what, self.name = kind, what, NAMES[kind, what]
            self.info = {"name": self.name}
            if kind == "minqwen":
                self.info.update(weight_bytes_per_token=WEIGHT_BYTES[what], vocab_size=1000)
            self.rounds = {"prefill": 0, "decode": 0}

        def call(self, command, *args):
            if command == "decode_at_contexts":
                prompts, n_new, repeats = args
                return {c: [(63 / 10.0) * (1 + (c != 512))] * repeats for c in prompts}
            return 0.0  # warm-up

        def measure(self, command, *args):
            i = self.rounds[command]
            self.rounds[command] += 1
            return (PREFILL if command == "prefill" else DECODE)[self.name][i]

        def stop(self):
            stops.append(self.name)

        def terminate(self):
            pass

    return FakeWorker


def _run_bench_main(monkeypatch, tmp_path, *argv, model=FIXTURES / "text_tied_fp32", threads=("--threads", "1"),
                    worker_class=None):
    stops = []
    monkeypatch.setattr(bench, "Worker", worker_class or _fake_worker_class(stops))
    samples = iter(ROOFLINE)
    monkeypatch.setattr(bench, "RooflineProbe", lambda: types.SimpleNamespace(sample=lambda: next(samples)))
    monkeypatch.setattr(bench, "cold_starts", lambda folder, dtype, threads, repeats: {
        "cold_start": {"seconds": 1.5, "peak_rss_bytes": WEIGHT_BYTES[dtype] + 200_000_000,
                       "resident_weight_bytes": WEIGHT_BYTES[dtype] + 1000},
        "cold_start_empty_numba_cache": {"seconds": 5.0, "peak_rss_bytes": 1, "resident_weight_bytes": 1},
        "jit_seconds": 3.5})
    out = tmp_path / "bench.json"
    monkeypatch.setattr(sys, "argv", ["bench.py", "--model", str(model), *threads, "--json", str(out), *argv])
    printed = io.StringIO()
    with redirect_stdout(printed):
        assert bench.main() == 0
    return json.loads(out.read_text()), printed.getvalue()


def test_bench_figures_are_the_protocols_medians_and_the_json_equals_the_table(monkeypatch, tmp_path):
    # Independent side: the protocol's formulas over the scripted times. Fails on a mean instead
    # of a median, 64 (not 63) tokens per decode, a prefill not of 512, a roofline fraction not
    # the median over rounds of decode tok/s × bytes ÷ the bandwidth around that round's decoding,
    # or a ratio to a peer other than transformers fp32.
    results, text = _run_bench_main(monkeypatch, tmp_path, "--repeats", "3", "--long-context", "448")
    assert results["roofline_GBps"] == statistics.median(ROOFLINE)
    assert (results["repeats"], results["long_context"]) == (3, 448)
    assert "medians of 3 round-robin rounds" in text
    rows = {r["name"]: r for r in results["rows"]}
    assert set(rows) == set(PREFILL)
    for name, row in rows.items():
        assert row["prefill512_tps"] == pytest.approx(512 / statistics.median(PREFILL[name]), rel=1e-12)
        assert row["decode_tps"] == pytest.approx(63 / statistics.median(DECODE[name]), rel=1e-12)
        assert (row["prefill512_seconds"], row["decode_seconds"]) == (PREFILL[name], DECODE[name])
    assert results["roofline_samples_GBps"] == [ROOFLINE[i:i + 2] for i in range(0, 6, 2)]
    for dtype in ("float32", "bfloat16"):
        row = rows[NAMES["minqwen", dtype]]
        # Each round's decode tokens/s over the mean bandwidth around it, then the median of rounds.
        per_round = [Fraction(63) / Fraction(seconds) * WEIGHT_BYTES[dtype]
                     / ((Fraction(ROOFLINE[2 * i]) + Fraction(ROOFLINE[2 * i + 1])) / 2 * 10**9)
                     for i, seconds in enumerate(DECODE[row["name"]])]
        assert row["roofline_fraction"] == pytest.approx(float(statistics.median(per_round)), rel=1e-12)
        assert row["decode_at_512_tps"] == pytest.approx(10.0) and row["decode_at_448_tps"] == pytest.approx(5.0)
        assert row["long_over_512"] == pytest.approx(0.5)
    # The printed table shows the JSON's numbers (rounded as printed) and ratios to transformers fp32.
    peer = rows["transformers fp32"]
    for name, row in rows.items():
        line = next(ln for ln in text.splitlines() if ln.startswith(name) and "t/s" in ln)
        nums = [float(x) for x in re.findall(r"\d+\.\d+", line)]
        assert nums == [round(row["prefill512_tps"], 1), round(row["decode_tps"], 2),
                        round(row["prefill512_tps"] / peer["prefill512_tps"], 2),
                        round(row["decode_tps"] / peer["decode_tps"], 2)]
    for dtype in ("float32", "bfloat16"):
        row = rows[NAMES["minqwen", dtype]]
        m = re.search(rf"^{re.escape(row['name'])}: (\d+)% of the memory roofline \(([\d.]+) GB/token\)", text, re.M)
        assert int(m.group(1)) == round(100 * row["roofline_fraction"])
        assert float(m.group(2)) == round(WEIGHT_BYTES[dtype] / 1e9, 2)


def test_bench_probes_the_bandwidth_just_before_and_just_after_each_rounds_decoding(monkeypatch, tmp_path):
    # The roofline fraction pairs a round's decoding with the probe's samples around it: the
    # samples must be taken there, not before the round's prefills or after the whole run.
    events = []
    base = _fake_worker_class([])

    class Logged(base):
        def measure(self, command, *args):
            events.append(command)
            return super().measure(command, *args)

    samples = iter(ROOFLINE)

    def sample():
        events.append("probe")
        return next(samples)

    monkeypatch.setattr(bench, "Worker", Logged)
    monkeypatch.setattr(bench, "RooflineProbe", lambda: types.SimpleNamespace(sample=sample))
    monkeypatch.setattr(bench, "cold_starts", lambda folder, dtype, threads, repeats: {
        "cold_start": {"seconds": 1.5, "peak_rss_bytes": 2, "resident_weight_bytes": 1}, "jit_seconds": 0.0})
    monkeypatch.setattr(sys, "argv", ["bench.py", "--model", str(FIXTURES / "text_tied_fp32"), "--threads", "1",
                                      "--repeats", "3", "--long-context", "0"])
    with redirect_stdout(io.StringIO()):
        assert bench.main() == 0
    one_round = ["prefill"] * 4 + ["probe"] + ["decode"] * 4 + ["probe"]
    assert events == one_round * 3


def _checkpoint_with_positions(tmp_path, positions):
    """A folder --model accepts (the fake workers load nothing): text_tied_fp32's config, ``positions`` long."""
    folder = tmp_path / f"positions_{positions}"
    folder.mkdir()
    config = json.loads((FIXTURES / "text_tied_fp32" / "config.json").read_text())
    config["max_position_embeddings"] = positions  # a text-only config: the field is at the top
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_bench_defaults_are_two_threads_three_rounds_and_a_16k_context_that_fits_exactly(monkeypatch, tmp_path):
    # The protocol without options (the module docstring, the --repeats and --long-context help):
    # 2 threads, medians of 3 rounds, a 16384-token context, which a checkpoint of exactly
    # 16384 + 64 positions holds. Numba's count is raised so that 2 threads are allowed anywhere.
    import numba

    monkeypatch.setattr(numba.config, "NUMBA_NUM_THREADS", 4)
    folder = _checkpoint_with_positions(tmp_path, 16384 + 64)
    results, text = _run_bench_main(monkeypatch, tmp_path, model=folder, threads=())
    assert (results["threads"], results["repeats"], results["long_context"]) == (2, 3, 16384)
    assert "medians of 3 round-robin rounds, 2 threads" in text
    assert all("decode_at_16384_tps" in results["rows"][i] for i in (0, 1))


def test_bench_long_context_leaves_room_for_the_64_tokens_it_decodes(monkeypatch, tmp_path):
    # One past the boundary the test above accepts: 16385 + 64 > 16448 positions.
    folder = _checkpoint_with_positions(tmp_path, 16384 + 64)
    with pytest.raises(SystemExit, match="--long-context 16385: .* allows 16448 positions"):
        _run_bench_main(monkeypatch, tmp_path, "--long-context", "16385", model=folder)


def test_bench_quick_is_one_round_and_no_long_context(monkeypatch, tmp_path):
    # --quick's help: "1 repeat, no long context".
    results, text = _run_bench_main(monkeypatch, tmp_path, "--quick")
    assert (results["repeats"], results["long_context"]) == (1, 0)
    assert "medians of 1 round-robin rounds" in text
    assert not [key for row in results["rows"] for key in row if key.startswith("decode_at_")]


def test_bench_accepts_as_many_threads_as_numba_starts_with(monkeypatch, tmp_path):
    # Only more threads than Numba's pool is refused (test_bench_refuses_more_threads_than_numba_starts_with).
    import numba

    monkeypatch.setattr(numba.config, "NUMBA_NUM_THREADS", 3)
    results, _ = _run_bench_main(monkeypatch, tmp_path, "--quick", threads=("--threads", "3"))
    assert results["threads"] == 3


def test_bench_measures_every_gguf_and_tells_two_of_one_type_apart(monkeypatch, tmp_path):
    # llama.cpp names its contender by the GGUF's stored type, so two bf16 files share a name:
    # the second must get its file name added, or its timings join the first's medians.
    class WithLlamaCpp(_fake_worker_class([])):
        def __init__(self, kind, what, folder, threads):
            if kind != "llama.cpp":
                super().__init__(kind, what, folder, threads)
                return
            self.kind, self.what, self.name = kind, what, "llama.cpp bf16 (GGUF)"
            self.info = {"name": self.name}
            self.seconds = {"a.gguf": 2.0, "b.gguf": 4.0}[Path(what).name]

        def measure(self, command, *args):
            return self.seconds if self.kind == "llama.cpp" else super().measure(command, *args)

    ggufs = [tmp_path / "a.gguf", tmp_path / "b.gguf"]
    for path in ggufs:
        path.write_bytes(b"")
    results, _ = _run_bench_main(monkeypatch, tmp_path, "--quick", "--no-transformers", "--gguf", *map(str, ggufs),
                                 worker_class=WithLlamaCpp)
    rows = {row["name"]: row for row in results["rows"]}
    assert rows["llama.cpp bf16 (GGUF)"]["prefill512_tps"] == 512 / 2.0
    assert rows["llama.cpp bf16 (GGUF) b.gguf"]["prefill512_tps"] == 512 / 4.0


def test_bench_cold_start_only_measures_both_minqwen_dtypes_and_nothing_else(monkeypatch, tmp_path):
    # Its help: only the cold-start figures, for minqwen fp32 and bf16-resident; no contender
    # is loaded and no roofline measured. The rounds are the default 3.
    calls = []

    def cold_starts(folder, dtype, threads, repeats):
        calls.append((dtype, threads, repeats))
        return {"jit_seconds": 1.0}

    def refused(*args):
        raise AssertionError("--cold-start-only went on to the other measurements")

    monkeypatch.setattr(bench, "cold_starts", cold_starts)
    monkeypatch.setattr(bench, "Worker", refused)
    monkeypatch.setattr(bench, "RooflineProbe", refused)
    monkeypatch.setattr(sys, "argv", ["bench.py", "--model", str(FIXTURES / "text_tied_fp32"), "--threads", "1",
                                      "--cold-start-only"])
    printed = io.StringIO()
    with redirect_stdout(printed):
        assert bench.main() == 0
    assert calls == [("float32", 1, 3), ("bfloat16", 1, 3)]
    assert [line.split()[0] for line in printed.getvalue().splitlines()] == ["float32", "bfloat16"]


# --------------------------------------------------------------------------- the machine


def _read_instead(monkeypatch, replacements):
    """bench's Path, with the system paths in ``replacements`` read from test files instead."""
    monkeypatch.setattr(bench, "Path", lambda path: Path(replacements.get(str(path), path)))


def test_cpu_name_is_the_model_name_field_of_proc_cpuinfo(monkeypatch, tmp_path):
    # x86 Linux lists "model" (a number) just before "model name"; a name may itself hold a colon.
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nvendor_id\t: GenuineIntel\nmodel\t\t: 85\n"
                       "model name\t: Example(R) CPU 8000: rev B @ 2.00GHz\nstepping\t: 7\n")
    _read_instead(monkeypatch, {"/proc/cpuinfo": cpuinfo})
    name = "Example(R) CPU 8000: rev B @ 2.00GHz"
    assert bench.cpu_name() == name
    assert bench.machine() == {"cpu": name, "cores": os.cpu_count(), "python": platform.python_version(),
                               "numpy": np.__version__}


def test_last_level_cache_reads_sizes_in_kib_from_any_sysfs(monkeypatch, tmp_path):
    # The test on this machine's sysfs skips where there is none; sysfs writes sizes as "30720K".
    caches = tmp_path / "cache"
    for index, size in (("index0", "48K"), ("index2", "2048K"), ("index3", "30720K")):
        (caches / index).mkdir(parents=True)
        (caches / index / "size").write_text(size + "\n")
    (caches / "index1").mkdir()  # no size file: skipped
    _read_instead(monkeypatch, {"/sys/devices/system/cpu/cpu0/cache": caches})
    assert bench.last_level_cache_bytes() == 30720 * 1024


# --------------------------------------------------------------------------- cold start and peak RSS


def test_cold_start_peak_rss_is_the_new_process_own_and_its_weights_match_the_headers():
    # Fails if the child reads getrusage's ru_maxrss, which Linux carries over from this (here
    # deliberately bloated) process through fork + exec; the resident bytes are recomputed from
    # the safetensors header (an fp32, tied fixture: every tensor, float32, once).
    ballast = np.ones(300_000_000 // 8)  # ~300 MB touched in this process
    ours = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    assert ours > 300_000_000
    folder = FIXTURES / "text_tied_fp32"
    result = bench.cold_start(folder, "float32", 1)
    del ballast
    header_bytes = sum(math.prod(shape) * STORED_ITEMSIZE[d] for d, shape in tensor_headers(folder).values())
    assert result["resident_weight_bytes"] == header_bytes
    assert 0 < result["peak_rss_bytes"] < ours - 250_000_000
    assert result["seconds"] > 0


def test_cold_starts_reports_the_median_run_and_jit_as_the_difference(monkeypatch):
    runs = iter([{"seconds": s, "peak_rss_bytes": int(s * 10), "resident_weight_bytes": 1}
                 for s in (3.0, 1.0, 2.0, 9.0, 7.0, 8.0)])  # warm: median 2.0; empty cache: median 8.0
    monkeypatch.setattr(bench, "cold_start", lambda *a, **k: next(runs))
    result = bench.cold_starts(Path("."), "float32", 1, 3)
    assert result["cold_start"]["seconds"] == statistics.median([3.0, 1.0, 2.0])
    assert result["cold_start_empty_numba_cache"]["seconds"] == statistics.median([9.0, 7.0, 8.0])
    assert result["jit_seconds"] == pytest.approx(8.0 - 2.0)


def test_cold_starts_runs_at_least_three_of_each_even_with_one_repeat(monkeypatch):
    # --quick gives --repeats 1, but a single cold start may be the one that pulls the
    # checkpoint back into the page cache: the docstring promises the median of several (3 at
    # least). Fails if either floor of 3 is lowered or the empty-cache runs are dropped.
    calls = []

    def fake(folder, dtype, threads, numba_cache=None):
        calls.append("empty" if numba_cache else "warm")
        return {"seconds": 1.0, "peak_rss_bytes": 1, "resident_weight_bytes": 1}

    monkeypatch.setattr(bench, "cold_start", fake)
    bench.cold_starts(Path("."), "float32", 1, 1)
    assert calls == ["warm"] * 3 + ["empty"] * 3


# --------------------------------------------------------------------------- bench on another checkpoint


class _InProcessWorker:
    """bench's Worker without the process: the real minqwen contender, the real serve() dispatch."""

    def __init__(self, kind, what, folder, threads):
        if kind != "minqwen" or what == bench.BF16_PROMPTS:
            raise bench.ContenderFailed(f"{kind} {what}: not in this test (AVX512-BF16)")
        self.kind, self.what = kind, what
        self.runner = bench.make_runner(kind, what, folder, threads)
        self.info = self.runner.info()
        self.name = self.info["name"]

    def call(self, command, *args):
        if command == "prefill":
            self.runner.prefill(*args)
            return 1.0
        return getattr(self.runner, command)(*args)

    measure = call

    def stop(self):
        pass

    terminate = stop


def test_bench_runs_on_any_checkpoint_folder_its_model_option_accepts(monkeypatch, tmp_path):
    monkeypatch.setattr(bench, "Worker", _InProcessWorker)
    monkeypatch.setattr(bench, "RooflineProbe", lambda: types.SimpleNamespace(sample=lambda: 10.0))
    monkeypatch.setattr(bench, "cold_starts", lambda *a: {"cold_start": {"seconds": 1.0, "peak_rss_bytes": 2,
                        "resident_weight_bytes": 1}, "jit_seconds": 0.0})
    monkeypatch.setattr(sys, "argv", ["bench.py", "--model", str(FIXTURES / "text_tied_fp32"), "--quick",
                                      "--no-transformers", "--threads", "1", "--json", str(tmp_path / "b.json")])
    with redirect_stdout(io.StringIO()):
        assert bench.main() == 0
    rows = json.loads((tmp_path / "b.json").read_text())["rows"]
    assert [r["name"] for r in rows] == ["minqwen fp32", "minqwen bf16-resident"]
    assert all(r["decode_tps"] > 0 and r["prefill512_tps"] > 0 for r in rows)


# --------------------------------------------------------------------------- mtp_figures real: the cost model


def test_a_random_mtp_head_added_to_a_single_file_checkpoint_is_loaded(tmp_path):
    from make_mtp_fixtures import with_random_mtp

    from minqwen.mtp import load_mtp

    folder = with_random_mtp(FIXTURES / "text_tied_fp32", tmp_path / "with-mtp")
    assert any(n.startswith("mtp.") for n in tensor_headers(folder))  # written to disk …
    assert load_mtp(folder, minqwen.load(folder)) is not None  # … and found by the loader



@pytest.mark.parametrize("sampling", ["greedy", "config"])
def test_mtp_figures_embedded_measures_plain_and_speculative_decoding(capsys, sampling):
    # Greedy, it asserts speculation's output is plain decoding's; with the generation config's
    # sampling (other draws, the same distribution) it must not, and says which sampling it used.
    import mtp_figures

    mtp_figures.embedded(ROOT / "minqwen" / "embedded", "float32", new_tokens=6, count=1, sampling=sampling)
    out = capsys.readouterr().out
    assert re.search(rf"plain decode: +[\d.]+ tok/s +\(6 new tokens per prompt, {sampling},", out)
    for k in (1, 2, 3):
        assert re.search(rf"speculative k = {k}: +[\d.]+ tok/s +\([\d.]+x\) +drafts accepted [\d.]+, "
                         rf"[\d.]+ tokens per verify", out), out
    assert ("temperature=0.7" in out.splitlines()[0]) == (sampling == "config")


def test_mtp_figures_speedups_follow_the_cost_model_from_the_printed_costs(monkeypatch, tmp_path, capsys):
    # speedup = (1 + expected tokens accepted per verify) ÷ (c_verify(k+1) + k·c_draft), with the
    # longest-accepted-prefix expectation a + a² + … + a^k (float64 here, from the printed costs).
    # Fails on (1 + a) for k = 2, on c_verify(2) for k = 2, on one c_draft for two drafts, or on
    # a 'model' ratio other than 1 ÷ (c_verify(2) + c_draft) for a cycle that accepts nothing.
    import mtp_figures

    monkeypatch.setattr(mtp_figures, "ROOT", tmp_path)  # its "-mtp" copy goes to tmp_path/scratch
    (tmp_path / "scratch").mkdir()
    mtp_figures.real_shape(FIXTURES / "text_tied_fp32", "float32", repeats=5)
    out = capsys.readouterr().out
    cv = {int(n): float(v) for n, v in re.findall(r"c_verify\((\d)\) = ([\d.]+)", out)}
    c_draft, c_draft_full = map(float, re.search(r"c_draft = ([\d.]+) \(with the whole LM head: ([\d.]+)\)", out).groups())
    # c_draft is the MTP layer over one position plus the draft head and pick, each printed as a
    # fraction of the step (3 decimals): fails if either part is left out of c_draft.
    layer = float(re.search(r"MTP layer, 1 position: .*\(([\d.]+)\)", out).group(1))
    head_all = float(re.search(r"draft head \+ pick, all \d+ ids: .*\(([\d.]+)\)", out).group(1))
    head_subset = float(re.search(r"draft head \+ pick, \d+ ids: .*\(([\d.]+)\)", out).group(1))
    assert abs(c_draft - (layer + head_subset)) <= 0.0021
    assert abs(c_draft_full - (layer + head_all)) <= 0.0021
    lines = re.findall(r"acceptance ([\d.]+): k=1 ([\d.]+)x, k=2 ([\d.]+)x \(k=1 drafting over the whole vocabulary: "
                       r"([\d.]+)x\)", out)
    assert [a for a, *_ in lines] == ["0.6", "0.8"]

    def close(printed, exact, inputs):  # the inputs are printed to 3 decimals, the speedup to 2
        slack = 0.0051 + exact * sum(0.0005 / x for x in inputs)
        return abs(printed - exact) <= slack

    for a, k1, k2, k1_full in lines:
        a = float(a)
        for k, printed, verify, draft in ((1, k1, cv[2], c_draft), (2, k2, cv[3], c_draft),
                                          (1, k1_full, cv[2], c_draft_full)):
            expected_accepted = sum(a**i for i in range(1, k + 1))
            exact = (1 + expected_accepted) / (verify + k * draft)
            assert close(float(printed), exact, (verify, draft)), (k, printed, exact)
    model = float(re.search(r"model: ([\d.]+)\)", out).group(1))
    assert close(model, 1 / (cv[2] + c_draft), (cv[2], c_draft))
    assert re.search(r"acceptance 0\.00$", out.strip())  # random drafts: the worst case it claims to measure


def test_mtp_figures_costs_are_medians_of_the_timed_rounds_after_the_warm_up(monkeypatch, tmp_path, capsys):
    # The test above checks the speedups against the printed costs; this one checks the costs
    # against scripted timings. Per probe: a warm-up round of 9 s (dropped), then 3 rounds whose
    # median is not their mean. Worked by hand: step median 12 ms; c_verify(2) = 15.6 / 12 =
    # 1.300, c_verify(3) = 21.6 / 12 = 1.800; c_draft = (2.4 + 1.2) / 12 = 0.300, with the whole
    # head (2.4 + 3.6) / 12 = 0.500. Fails on a mean, on a kept warm-up round, on a repeat too
    # few or too many, on c_verify(2) from the 3-position verify, or on costs not divided by the step.
    import mtp_figures

    rounds = {"step": [0.010, 0.012, 0.030], "verify2": [0.015, 0.0156, 0.030], "verify3": [0.018, 0.0216, 0.040],
              "layer": [0.0012, 0.0024, 0.006], "head_all": [0.003, 0.0036, 0.009],
              "head_subset": [0.0006, 0.0012, 0.005]}
    instants, t = [], 100.0
    for r in range(4):  # probes in the tool's order, round-robin; round 0 is the warm-up
        for name in ("step", "verify2", "verify3", "layer", "head_all", "head_subset"):
            d = 9.0 if r == 0 else rounds[name][r - 1]
            instants += [t, t + d]
            t += 10.0
    clock = _FakeClock(instants)
    monkeypatch.setattr(mtp_figures, "time", clock)
    monkeypatch.setattr(mtp_figures, "ROOT", tmp_path)
    (tmp_path / "scratch").mkdir()
    mtp_figures.real_shape(FIXTURES / "text_tied_fp32", "float32", repeats=3)
    out = capsys.readouterr().out
    assert clock.instants == []  # exactly 1 + 3 rounds of the 6 probes were timed
    assert re.search(r"decode step: +12\.0 ms", out)
    assert "c_verify(2) = 1.300" in out and "c_verify(3) = 1.800" in out
    assert "c_draft = 0.300 (with the whole LM head: 0.500)" in out


# --------------------------------------------------------------------------- moe_figure: sizes from the headers


def test_moe_figure_sizes_match_the_checkpoints_it_builds(tmp_path):
    # From the headers of the toy checkpoints --quick builds: active parameters per layer (router,
    # shared expert and its gate, k of the E experts), the experts' stored bytes and the bytes
    # read per step, and the dense twin's MLP width. Fails if a part is left out of the active
    # count or the experts are priced at another itemsize than the file's.
    require_reference()  # the tool builds its checkpoints with transformers
    import moe_figure

    (num_experts, top_k), = moe_figure.QUICK_CONFIGS.values()
    moe_folder, dense_folder, text, dense_text = moe_figure.build(num_experts, top_k, quick_folder=tmp_path)
    moe_h, dense_h = tensor_headers(moe_folder), tensor_headers(dense_folder)

    def params(header, layer, pattern):
        return sum(math.prod(shape) for n, (_, shape) in header.items()
                   if re.search(rf"layers\.{layer}\.mlp\.{pattern}", n))

    E, k = num_experts, top_k
    experts_bytes = sum(math.prod(shape) * STORED_ITEMSIZE[d] for n, (d, shape) in moe_h.items()
                        if ".mlp.experts." in n)
    for layer in range(moe_figure.LAYERS):
        active = (params(moe_h, layer, r"gate\.weight") + params(moe_h, layer, r"shared_expert\.")
                  + params(moe_h, layer, r"shared_expert_gate\.") + Fraction(params(moe_h, layer, r"experts\."), E) * k)
        assert moe_figure.active_mlp_parameters(text) == active
        dense = params(dense_h, layer, r"(gate|up|down)_proj\.")
        assert abs(dense - active) <= 3 * text["hidden_size"] / 2  # the twin's width is rounded to a whole number
    assert dense_text["intermediate_size"] * 3 * text["hidden_size"] == params(dense_h, 0, r"(gate|up|down)_proj\.")
    # what measure() reports, recomputed from the file
    result = moe_figure.measure("quick", num_experts, top_k, "bfloat16", 1, 1, quick_folder=tmp_path)
    assert result["expert_bytes_total"] == experts_bytes
    assert result["expert_bytes_read_per_step"] == Fraction(experts_bytes * k, E)
    assert result["active_mlp_parameters_per_layer"] == active
    assert [row["steps"] for row in result["rows"]] == [1, 1, 1]


# --------------------------------------------------------------------------- arguments refused before any work


def run_bench_args(*argv, env=None):
    import os
    import subprocess

    return subprocess.run([sys.executable, str(ROOT / "tools" / "bench.py"), *argv], capture_output=True, text=True,
                          timeout=120, env={**os.environ, **(env or {})})


def test_bench_refuses_a_long_context_the_checkpoint_cannot_hold_before_measuring():
    # text_tied_fp32 allows 512 positions: a 16k context would fail only after every other measurement.
    result = run_bench_args("--model", str(FIXTURES / "text_tied_fp32"), "--no-transformers", "--long-context", "16384")
    assert result.returncode != 0 and "--long-context 16384" in result.stderr and "512 positions" in result.stderr
    assert "machine:" not in result.stdout  # nothing was measured


def test_bench_refuses_more_threads_than_numba_starts_with():
    result = run_bench_args("--model", str(FIXTURES / "text_tied_fp32"), "--quick", "--threads", "2",
                            env={"NUMBA_NUM_THREADS": "1"})
    assert result.returncode == 2 and "--threads 2" in result.stderr and "NUMBA_NUM_THREADS" in result.stderr


@pytest.mark.parametrize("extra", [["--repeats", "5"], ["--long-context", "0"]])
def test_bench_quick_with_its_own_settings_is_refused_not_overridden(extra):
    result = run_bench_args("--model", str(FIXTURES / "text_tied_fp32"), "--quick", *extra)
    assert result.returncode == 2 and "--quick" in result.stderr


@pytest.mark.parametrize("name", ["text_grouped_bf16_bias", "moe_text_per_expert_fp32"])
def test_random_mtp_tensors_leave_no_tensor_at_a_constant(name):
    # The NumPy-only head times real shapes and stands in for a trained one in test_mtp: a norm
    # left at zeros (the zero-centred norm's identity) or a bias at zero would hide exactly the
    # bugs a random head is there to show. Every tensor takes many values; no two norms are alike.
    from make_mtp_fixtures import random_mtp_tensors

    from minqwen.config import load_config

    head = random_mtp_tensors(load_config(FIXTURES / name), 0, dtype="float32")
    for tensor_name, value in head.items():
        assert np.unique(value).size > 1, tensor_name
    norms = [value for tensor_name, value in head.items() if "norm" in tensor_name]
    assert len(norms) >= 5 and len({value.tobytes() for value in norms}) == len(norms)


def test_mtp_figures_real_repairs_a_folder_whose_model_link_hid_the_head(monkeypatch, tmp_path, capsys):
    # The layout an earlier version made: model.safetensors linked, the head in mtp.safetensors,
    # an index naming both. A loader reads model.safetensors alone, so the head was invisible.
    import mtp_figures
    from make_mtp_fixtures import random_mtp_tensors
    from safetensors.numpy import save_file

    from minqwen.config import load_config

    source = FIXTURES / "text_tied_fp32"
    folder = tmp_path / "scratch" / "text_tied_fp32-mtp"
    folder.mkdir(parents=True)
    (folder / "model.safetensors").symlink_to(source / "model.safetensors")
    config = json.loads((source / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "mtp_num_hidden_layers": 1}))
    head = random_mtp_tensors(load_config(source), 0)
    save_file(head, str(folder / "mtp.safetensors"))
    weight_map = {name: "model.safetensors" for name in tensor_headers(source)}
    weight_map.update({name: "mtp.safetensors" for name in head})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    monkeypatch.setattr(mtp_figures, "ROOT", tmp_path)
    mtp_figures.real_shape(source, "float32", repeats=1)
    assert "c_verify(2)" in capsys.readouterr().out
    assert not (folder / "model.safetensors").exists()
