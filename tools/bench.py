"""Benchmark minqwen against transformers on the real Qwen3.5-0.8B shape, in one run.

    python tools/bench.py                 # the full protocol (../shared/docs/benchmarks.md)
    python tools/bench.py --quick         # fewer repeats, no 16k context: a smoke run
    python tools/bench.py --json out.json

Every contender runs on the same random-weight bf16 checkpoint (tools/real_shape.py makes it
once), with the same thread count, and every figure is the median of several runs. Speed is
reported as a ratio against transformers measured in the same run, because absolute figures
drift on shared machines; for the same reason the contenders are all loaded at once and
measured round-robin (each repeat runs every contender once). The memory roofline is measured
in the same rounds: a NumPy fp32 GEMV over a matrix much larger than the last-level cache.

Decode figure: 64 new tokens after a 16-token prompt, greedy, last-position logits, on a
second run (Numba's cache warm); tokens/s = 63 ÷ the time after the first new token.

Decode at long context (minqwen only: the target is a ratio to its own decode at 512): a real
prefill of 512 and of 16k random tokens, once each, then per repeat the decode figure from a copy
of each cache in turn. The 16k prefill takes a few minutes; ``--long-context 0`` skips it.

Cold start: import + load + first token in a new process, with Numba's on-disk cache warm;
the first-call JIT cost is the same run with an empty cache, minus that.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

TOOLS = Path(__file__).resolve().parent
sys.path.insert(0, str(TOOLS))


def machine() -> dict:
    cpu = platform.processor() or "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(), "numpy": np.__version__}


def last_level_cache_bytes() -> int:
    base = Path("/sys/devices/system/cpu/cpu0/cache")
    sizes = []
    for index in base.glob("index*"):
        try:
            text = (index / "size").read_text().strip()
            sizes.append(int(text[:-1]) * 1024 if text.endswith("K") else int(text))
        except (OSError, ValueError):
            pass
    return max(sizes, default=32 * 1024 * 1024)


class RooflineProbe:
    """fp32 GEMV read bandwidth in GB/s over a matrix ≥ 4× the last-level cache, one sample per call."""

    def __init__(self):
        n_bytes = max(4 * last_level_cache_bytes(), 512 * 1024 * 1024)
        cols = 4096
        self.W = np.random.default_rng(0).random((n_bytes // (4 * cols), cols), dtype=np.float32)
        self.x = np.ones(cols, np.float32)
        self.W @ self.x  # page the matrix in

    def sample(self) -> float:
        """The median of 5 GEMVs, in GB/s."""
        times = []
        for _ in range(5):
            start = time.perf_counter()
            self.W @ self.x
            times.append(time.perf_counter() - start)
        return self.W.nbytes / statistics.median(times) / 1e9


def weight_bytes_per_token(model) -> int:
    """Bytes a decode step reads: every projection matrix once (the tied head counted once)."""
    total = model.embed_tokens.nbytes if model.lm_head is not model.embed_tokens else 0
    total += model.lm_head.nbytes
    for layer in model.layers:
        for part in (layer.mlp, layer.linear_attn, layer.self_attn):
            if part is not None:
                total += sum(v.nbytes for k, v in vars(part).items() if isinstance(v, np.ndarray) and v.ndim == 2)
    return total


# --------------------------------------------------------------------------- contenders


class Minqwen:
    def __init__(self, folder, dtype):
        import minqwen

        self.name = f"minqwen {'bf16-resident' if dtype == 'bfloat16' else 'fp32'}"
        self.model = minqwen.load(folder, dtype=dtype)

    def prefill(self, ids):
        self.model.forward(ids, self.model.new_cache(), last_only=True)

    def decode(self, prompt, n_new):
        """Seconds for tokens 2 … n_new (after the first new token)."""
        cache = self.model.new_cache()
        token = int(np.argmax(self.model.forward(prompt, cache, last_only=True)[-1]))
        start = time.perf_counter()
        for _ in range(n_new - 1):
            token = int(np.argmax(self.model.forward([token], cache, last_only=True)[-1]))
        return time.perf_counter() - start

    def decode_at_contexts(self, contexts, n_new, rng, repeats):
        """Per context: seconds for tokens 2 … n_new after a prefill of that many random tokens.

        Each context is prefilled once; then every repeat decodes from a copy of each cache in
        turn (round-robin, so a slow minute of the machine slows every context alike).
        """
        prefilled = {}
        for context in contexts:
            ids = rng.integers(0, self.model.config.vocab_size, size=context)
            cache = self.model.new_cache()
            first = int(np.argmax(self.model.forward(ids, cache, last_only=True)[-1]))
            prefilled[context] = cache, first
        times = {context: [] for context in contexts}
        for _ in range(repeats):
            for context, (cache, first) in prefilled.items():
                branch, token = cache.copy(), first
                start = time.perf_counter()
                for _ in range(n_new - 1):
                    token = int(np.argmax(self.model.forward([token], branch, last_only=True)[-1]))
                times[context].append(time.perf_counter() - start)
        return times


class Transformers:
    def __init__(self, folder, dtype, threads):
        import torch
        from transformers import Qwen3_5ForCausalLM

        torch.set_num_threads(threads)
        self.torch = torch
        self.name = f"transformers {'bf16' if dtype == 'bfloat16' else 'fp32'}"
        torch_dtype = torch.bfloat16 if dtype == "bfloat16" else torch.float32
        self.model = Qwen3_5ForCausalLM.from_pretrained(folder, dtype=torch_dtype).eval()

    def prefill(self, ids):
        with self.torch.no_grad():
            self.model(input_ids=self.torch.tensor(ids[None]), use_cache=True, logits_to_keep=1)

    def decode(self, prompt, n_new):
        torch = self.torch
        with torch.no_grad():
            out = self.model(input_ids=torch.tensor(prompt[None]), use_cache=True, logits_to_keep=1)
            cache, token = out.past_key_values, int(out.logits[0, -1].argmax())
            start = time.perf_counter()
            for _ in range(n_new - 1):
                out = self.model(input_ids=torch.tensor([[token]]), past_key_values=cache, use_cache=True,
                                 logits_to_keep=1)
                cache, token = out.past_key_values, int(out.logits[0, -1].argmax())
            return time.perf_counter() - start


def cold_start(folder: Path, dtype: str, threads: int, numba_cache: str | None = None) -> dict:
    """import + load + first token in a new process; ``numba_cache``: a Numba cache folder to use
    (an empty one measures the JIT), else Numba's default (warm after the runs before)."""
    code = (
        "import time; t0 = time.perf_counter(); import numpy as np, minqwen\n"
        f"minqwen.set_threads({threads})\n"
        f"m = minqwen.load({str(folder)!r}, dtype={dtype!r})\n"
        "tok = int(np.argmax(m.forward(np.arange(16) + 100, last_only=True)[-1]))\n"
        "from minqwen.summary import resident_bytes\n"
        # VmHWM, not getrusage's ru_maxrss: Linux carries ru_maxrss over from the parent through
        # fork + exec, so it would report this benchmark's own (model-holding) peak
        "hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM:')][0].split()[1]\n"
        "print(time.perf_counter() - t0, int(hwm) * 1024, resident_bytes(m))\n"
    )
    env = dict(os.environ, **({"NUMBA_CACHE_DIR": numba_cache} if numba_cache else {}))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    seconds, rss, resident = out.stdout.split()
    return {"seconds": float(seconds), "peak_rss_bytes": int(rss), "resident_weight_bytes": int(resident)}


def cold_starts(folder: Path, dtype: str, threads: int, repeats: int) -> dict:
    """Median cold start with Numba's cache warm, and with an empty one (the difference: JIT).

    Each run is a new process; the first one also pulls the checkpoint file back into the
    page cache if the runs before pushed it out, hence the median of several.
    """
    warm = [cold_start(folder, dtype, threads) for _ in range(max(repeats, 3))]
    empty = []
    for _ in range(max(repeats, 3)):
        with tempfile.TemporaryDirectory() as cache_dir:
            empty.append(cold_start(folder, dtype, threads, cache_dir))

    def median(runs):
        return min(runs, key=lambda run: abs(run["seconds"] - statistics.median(r["seconds"] for r in runs)))

    result = {"cold_start": median(warm), "cold_start_empty_numba_cache": median(empty)}
    result["jit_seconds"] = result["cold_start_empty_numba_cache"]["seconds"] - result["cold_start"]["seconds"]
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, help="checkpoint folder (default: make/reuse the real-shape one)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--long-context", type=int, default=16384, help="0 skips the long-context decode")
    parser.add_argument("--no-transformers", action="store_true")
    parser.add_argument("--quick", action="store_true", help="1 repeat, no long context")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--cold-start-only", action="store_true",
                        help="only the cold-start figures (new processes), for minqwen fp32 and bf16-resident")
    args = parser.parse_args()
    if args.quick:
        args.repeats, args.long_context = 1, 0

    # minqwen first: importing it sets the OpenMP spin policy (minqwen/threads.py), which
    # OpenMP reads once, when Numba starts its threads. Its allocator setting (keep freed
    # blocks for reuse) holds for the whole process, so transformers, measured in this process,
    # gains from it too: the ratios to it are if anything understated.
    import minqwen

    minqwen.set_threads(args.threads)

    from real_shape import DEFAULT_DIR, make

    folder = args.model or make(DEFAULT_DIR)
    if args.cold_start_only:
        for dtype in ("float32", "bfloat16"):
            print(dtype, json.dumps(cold_starts(folder, dtype, args.threads, args.repeats)), flush=True)
        return 0
    rng = np.random.default_rng(0)
    prompt16 = rng.integers(100, 240000, size=16)
    prompt512 = rng.integers(100, 240000, size=512)
    results = {"machine": machine(), "threads": args.threads, "checkpoint": str(folder), "rows": []}
    gemv = RooflineProbe()

    contenders = [("minqwen", "float32"), ("minqwen", "bfloat16")]
    if not args.no_transformers:
        contenders += [("transformers", "float32"), ("transformers", "bfloat16")]
    runners = [Minqwen(folder, dtype) if kind == "minqwen" else Transformers(folder, dtype, args.threads)
               for kind, dtype in contenders]
    for runner in runners:  # warm-up: JIT, caches, allocator
        runner.prefill(prompt512)
        runner.decode(prompt16, 4)
    # Round-robin: every repeat measures the roofline and each contender once, so a machine
    # that slows down for a minute slows every contender alike and the ratios stay meaningful
    # (measured one contender after another, the same code moved by ±20% between runs here).
    bandwidth, prefill, decode = [], {r.name: [] for r in runners}, {r.name: [] for r in runners}
    for _ in range(args.repeats):
        bandwidth.append(gemv.sample())
        for runner in runners:
            start = time.perf_counter()
            runner.prefill(prompt512)
            prefill[runner.name].append(time.perf_counter() - start)
        for runner in runners:
            decode[runner.name].append(runner.decode(prompt16, 64))
    results["roofline_GBps"] = statistics.median(bandwidth)
    print(f"machine: {results['machine']['cpu']}, {args.threads} threads; "
          f"fp32 GEMV roofline {results['roofline_GBps']:.1f} GB/s", flush=True)
    del gemv

    for runner in runners:
        row = {"name": runner.name,
               "prefill512_tps": 512 / statistics.median(prefill[runner.name]),
               "decode_tps": 63 / statistics.median(decode[runner.name])}
        if isinstance(runner, Minqwen):
            row["weight_bytes_per_token"] = weight_bytes_per_token(runner.model)
            row["roofline_fraction"] = row["decode_tps"] * row["weight_bytes_per_token"] / (results["roofline_GBps"] * 1e9)
        results["rows"].append(row)
    del runners  # free transformers' copies before the long-context runs and the new processes

    for row, (kind, dtype) in zip(results["rows"], contenders):
        if kind != "minqwen":
            continue
        runner = Minqwen(folder, dtype)
        contexts = (512, args.long_context) if args.long_context else ()
        for context, times in runner.decode_at_contexts(contexts, 64, rng, args.repeats).items():
            row[f"decode_at_{context}_tps"] = 63 / statistics.median(times)
        if args.long_context:
            row["long_over_512"] = row[f"decode_at_{args.long_context}_tps"] / row["decode_at_512_tps"]
        del runner
        row.update(cold_starts(folder, dtype, args.threads, args.repeats))
    for row in results["rows"]:
        print(json.dumps(row), flush=True)

    print_table(results)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


def print_table(results):
    rows = results["rows"]
    peer = next((r for r in rows if r["name"] == "transformers fp32"), None)
    print()
    print(f"{'contender':<26}{'prefill 512':>14}{'decode':>12}{'× tf fp32 (prefill, decode)':>30}")
    for r in rows:
        ratio = (f"{r['prefill512_tps'] / peer['prefill512_tps']:.2f}, {r['decode_tps'] / peer['decode_tps']:.2f}"
                 if peer else "-")
        print(f"{r['name']:<26}{r['prefill512_tps']:>10.1f} t/s{r['decode_tps']:>8.2f} t/s{ratio:>30}")
    for r in rows:
        if "roofline_fraction" in r:
            cold = r["cold_start"]
            print(f"{r['name']}: {r['roofline_fraction']:.0%} of the memory roofline "
                  f"({r['weight_bytes_per_token'] / 1e9:.2f} GB/token)")
            contexts = [k for k in r if k.startswith("decode_at_")]
            if contexts:
                print("  decode with context " + ", ".join(
                    f"{k.removeprefix('decode_at_').removesuffix('_tps')}: {r[k]:.2f} t/s" for k in contexts)
                    + (f" (long / 512: {r['long_over_512']:.0%})" if "long_over_512" in r else ""))
            print(f"  cold start {cold['seconds']:.1f} s (import + load + first token, Numba cache warm); "
                  f"peak RSS {cold['peak_rss_bytes'] / 1e9:.2f} GB = "
                  f"{cold['peak_rss_bytes'] / cold['resident_weight_bytes']:.2f}× resident weights "
                  f"({cold['resident_weight_bytes'] / 1e9:.2f} GB; "
                  f"+{(cold['peak_rss_bytes'] - cold['resident_weight_bytes']) / 1e6:.0f} MB)")
            print(f"  first-call JIT (empty Numba cache): {r['jit_seconds']:.1f} s more")


if __name__ == "__main__":
    raise SystemExit(main())
