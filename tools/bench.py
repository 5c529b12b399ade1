"""Benchmark minqwen against transformers (and llama.cpp) on the real Qwen3.5-0.8B shape, in one run.

    python tools/bench.py                 # the full protocol (described below)
    python tools/bench.py --quick         # fewer repeats, no 16k context: a smoke run
    python tools/bench.py --json out.json
    python tools/bench.py --gguf scratch/qwen3.5-0.8b-random-bf16.gguf   # llama.cpp as a peer too

Every contender runs on the same random-weight bf16 checkpoint (tools/real_shape.py makes it
once), with the same thread count, and every figure is the median of several runs. Speed is
reported as a ratio against transformers measured in the same run, because absolute figures
drift on shared machines; for the same reason the contenders are all loaded at once and
measured round-robin (each repeat runs every contender once). The memory roofline is measured
in the same rounds: a NumPy fp32 GEMV over a matrix much larger than the last-level cache,
sampled just before and just after each round's decoding. A contender's roofline fraction is the
median over rounds of that round's decode tokens/s × bytes per token ÷ the mean of the two
samples around it, so a machine that slows during a run moves both sides of the fraction alike
(the printed GB/s is the median of all samples).

Each contender runs in a worker process of its own, started with the environment this
benchmark was started with, so each runs with its own library's thread-pool defaults (see
:class:`Worker`); the process that drives them imports none of minqwen, torch or llama_cpp.

Decode figure: 64 new tokens after a 16-token prompt, greedy, last-position logits, on a
second run (Numba's cache warm); tokens/s = 63 ÷ the time after the first new token.

minqwen bf16-resident, bf16 prompts: the same model loaded with ``bf16_prompts=True`` (prompts
multiplied in bf16 with AVX512-BF16, or on AMX tiles where the CPU has them; see
minqwen/bf16_dot.py), on CPUs that have it. Its prefill is the figure; its decoding is
bf16-resident's, so long context and cold start are not measured again for it.

Decode at long context (minqwen only: the target is a ratio to its own decode at 512): a real
prefill of 512 and of 16k random tokens, once each, then per repeat the decode figure from a copy
of each cache in turn. The 16k prefill takes a few minutes; ``--long-context 0`` skips it.

Cold start: import + load + first token in a new process, with Numba's on-disk cache warm;
the first-call JIT cost is the same run with an empty cache, minus that. Peak RSS is that new
process's own high-water mark (VmHWM) over the same steps: import, load, a 16-token prompt
and its first token, not the 512-token prefill or the long context.

Bytes per token (the roofline's numerator): every layer's weights, the final norm and the LM
head, as held (fp32 or bf16); of an MoE layer's routed experts, as stored, the top-k's share.
The embedding table (one row a step) and an MTP head are not counted.

llama.cpp (optional, with ``--gguf``): the same checkpoint converted to GGUF, run through
llama-cpp-python, measured alongside the others in the same rounds (prefill and decode only).
To get it: ``pip install llama-cpp-python==0.3.36`` (it builds llama.cpp from source, 5-15
minutes on 2 cores), then convert with llama.cpp's own converter, from the copy of llama.cpp in
that package's sdist. From the repository root::

    pip download llama-cpp-python==0.3.36 --no-deps --no-binary :all: -d scratch/sdist
    tar xzf scratch/sdist/llama_cpp_python-0.3.36.tar.gz -C scratch/sdist
    cd scratch/sdist/llama_cpp_python-0.3.36/vendor/llama.cpp
    PYTHONPATH=gguf-py python convert_hf_to_gguf.py CHECKPOINT --no-mtp --outtype bf16 \\
        --outfile ../../../../qwen3.5-0.8b-random-bf16.gguf

(the converter resolves paths from its own folder: give CHECKPOINT as an absolute path;
the GGUF lands in scratch/).

The converter needs a ``tokenizer.json`` beside the checkpoint (any with Qwen3.5's vocabulary:
``tools/qwen_vocab_tokenizer.py --out FOLDER`` makes one; CHECKPOINT can be a folder of links to
the checkpoint's files plus that tokenizer), and ``--no-mtp`` when it has no MTP head.
"""

from __future__ import annotations

import argparse
import importlib
import json
import multiprocessing
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np

TOOLS = Path(__file__).resolve().parent
sys.path.insert(0, str(TOOLS))

from argtypes import checkpoint_folder, existing_file, output_file, whole_number  # noqa: E402


def cpu_name() -> str:
    """The CPU's model name as Linux reports it (platform.processor() is often empty there)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def machine() -> dict:
    return {"cpu": cpu_name(), "cores": os.cpu_count(), "python": platform.python_version(), "numpy": np.__version__}


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

    # After a call, OpenBLAS's threads spin waiting for the next one (measured here: 0.105 s of
    # CPU in the 0.2-1 s after a sample); the probe waits them out, so the contender measured next
    # does not share its cores with the probe's threads.
    SPIN_SECONDS = 0.3

    def sample(self) -> float:
        """The median of 5 GEMVs, in GB/s."""
        times = []
        for _ in range(5):
            start = time.perf_counter()
            self.W @ self.x
            times.append(time.perf_counter() - start)
        time.sleep(self.SPIN_SECONDS)
        return self.W.nbytes / statistics.median(times) / 1e9


def weight_bytes_per_token(model) -> int:
    """Bytes a decode step reads: every layer's weights, the final norm and the LM head once,
    and of each MoE layer's routed experts the top-k's share (k of E, on average).

    The embedding table is not counted: a step reads one row of it (and where the head is
    tied, the head is that same matrix). Nor is the MTP head: plain decoding never runs it.
    """
    from minqwen.summary import experts, weight_bytes

    c = model.config
    _, _, expert_bytes = experts(model)  # as stored: bf16 or FP8, in either compute mode
    active = expert_bytes * c.num_experts_per_tok // c.num_experts if expert_bytes else 0
    return weight_bytes(model.lm_head, model.norm, *model.layers) + active


# --------------------------------------------------------------------------- contenders


class Minqwen:
    def __init__(self, folder, what, threads):
        """``what``: "float32", "bfloat16", or "bfloat16+bf16-prompts" (load(..., bf16_prompts=True))."""
        import minqwen

        minqwen.set_threads(threads)
        dtype, _, mode = what.partition("+")
        self.name = f"minqwen {'bf16-resident' if dtype == 'bfloat16' else 'fp32'}"
        if mode == "bf16-prompts":
            self.name += ", bf16 prompts"
        self.model = minqwen.load(folder, dtype=dtype, bf16_prompts=mode == "bf16-prompts")

    def info(self):
        return {"name": self.name, "weight_bytes_per_token": weight_bytes_per_token(self.model),
                "vocab_size": self.model.config.vocab_size}

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

    def decode_at_contexts(self, prompts, n_new, repeats):
        """Per context: seconds for tokens 2 … n_new after a prefill of ``prompts[context]`` (random tokens).

        Each context is prefilled once; then every repeat decodes from a copy of each cache in
        turn (round-robin, so a slow minute of the machine slows every context alike).
        """
        prefilled = {}
        for context, ids in prompts.items():
            cache = self.model.new_cache()
            first = int(np.argmax(self.model.forward(ids, cache, last_only=True)[-1]))
            prefilled[context] = cache, first
        times = {context: [] for context in prompts}
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

    def info(self):
        return {"name": self.name}

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


class LlamaCpp:
    """llama.cpp through llama-cpp-python, on a GGUF file of the same checkpoint.

    Driven through ``Llama.eval``, one call per forward as the others are. With
    ``logits_all=False`` eval flags only the batch's last position for output, so llama.cpp
    computes the LM head for that position alone (as ``last_only`` / ``logits_to_keep=1``);
    eval itself does not copy those logits out, so they are read from the context here.
    """

    def __init__(self, path, threads):
        import ctypes

        import llama_cpp

        self.llama_cpp = llama_cpp
        self.llm = llama_cpp.Llama(model_path=str(path), n_threads=threads, n_threads_batch=threads,
                                   n_ctx=1024, logits_all=False, verbose=False)
        desc = ctypes.create_string_buffer(256)  # "qwen35 0.8B BF16", "qwen35 0.8B all F32"
        llama_cpp.llama_model_desc(self.llm.model, desc, len(desc))
        file_type = desc.value.decode().split(" ", 2)[-1].removeprefix("all ").lower()
        self.name = f"llama.cpp {file_type} (GGUF)"
        self.details = {"gguf": str(path), "llama_cpp_python": llama_cpp.__version__}

    def info(self):
        return {"name": self.name, "details": self.details}

    def last_logits(self):
        """The logits of the last evaluated position (reading them waits for the computation)."""
        pointer = self.llama_cpp.llama_get_logits_ith(self.llm.ctx, -1)
        return np.ctypeslib.as_array(pointer, shape=(self.llm.n_vocab(),))

    def prefill(self, ids):
        self.llm.reset()  # empties the KV cache and the recurrent states
        self.llm.eval(ids.tolist())
        self.last_logits()

    def decode(self, prompt, n_new):
        self.llm.reset()
        self.llm.eval(prompt.tolist())
        token = int(np.argmax(self.last_logits()))
        start = time.perf_counter()
        for _ in range(n_new - 1):
            self.llm.eval([token])
            token = int(np.argmax(self.last_logits()))
        return time.perf_counter() - start


def make_runner(kind, what, folder, threads):
    """A contender: ``what`` is a dtype for minqwen and transformers, a GGUF file for llama.cpp."""
    if kind == "minqwen":
        return Minqwen(folder, what, threads)
    if kind == "transformers":
        return Transformers(folder, what, threads)
    return LlamaCpp(what, threads)


# --------------------------------------------------------------------------- one process per contender

BF16_PROMPTS = "bfloat16+bf16-prompts"  # bf16-resident with prompts multiplied in bf16: prefill and decode only
LIBRARY = {"minqwen": "minqwen", "transformers": "transformers", "llama.cpp": "llama_cpp"}
SETTLE_SECONDS = 0.3  # before each timed command: the last contender's idle threads stop spinning


class ContenderFailed(RuntimeError):
    """A worker could not build its contender or run a command; ``missing``: its library does not import."""

    def __init__(self, message, missing=False):
        super().__init__(message)
        self.missing = missing


def serve(pipe, kind, what, folder, threads):
    """A worker process: build one contender, then answer the parent's commands until ("stop",).

    A command is (method name, *arguments); the reply is ("ok", its result), ("error", the
    traceback), or, at start, ("missing", why) when the contender's library does not import.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C goes to the parent, which ends the workers
    try:
        importlib.import_module(LIBRARY[kind])
    except (ImportError, OSError, RuntimeError) as error:  # not installed; its library fails to load
        pipe.send(("missing", str(error)))
        return
    try:
        runner = make_runner(kind, what, folder, threads)
    except Exception:
        pipe.send(("error", traceback.format_exc()))
        return
    pipe.send(("ok", runner.info()))
    while True:
        try:
            command, *arguments = pipe.recv()
        except EOFError:  # the parent is gone
            return
        if command == "stop":
            return
        try:
            if command == "prefill":  # timed here, as decode times itself: the pipe is not in the figure
                start = time.perf_counter()
                runner.prefill(*arguments)
                result = time.perf_counter() - start
            else:
                result = getattr(runner, command)(*arguments)
        except Exception:
            pipe.send(("error", traceback.format_exc()))
        else:
            pipe.send(("ok", result))


class Worker:
    """One contender in a process of its own, started with this process's (untouched) environment.

    Why not all in one process: importing minqwen tunes its thread pools through environment
    variables read once by the libraries behind them (GOMP_SPINCOUNT, for the OpenMP runtime
    libgomp.so.1, which torch also ships under that name), so in one process transformers ran
    with minqwen's settings instead of its own (measured: its fp32 decode 7.0-7.35 tokens/s
    with them, 7.4-7.6 in a clean process). So each contender gets a fresh interpreter
    ("spawn") and the parent never imports minqwen, torch or llama_cpp.
    """

    def __init__(self, kind, what, folder, threads):
        self.kind, self.what, self.name = kind, what, f"{kind} {what}"  # until the contender names itself
        spawn = multiprocessing.get_context("spawn")
        self.pipe, child = spawn.Pipe()
        self.process = spawn.Process(target=serve, args=(child, kind, what, folder, threads),
                                     name=f"bench {self.name}", daemon=True)
        self.process.start()
        child.close()  # the worker holds the only copy now: if it dies, recv() here ends with EOFError
        try:
            self.info = self.reply()
        except BaseException:  # it failed, or Ctrl-C came while it loaded
            self.terminate()
            raise
        self.name = self.info["name"]

    def reply(self):
        try:
            status, value = self.pipe.recv()
        except (EOFError, OSError):  # it died: a crash in its library, say
            self.process.join(5)
            raise ContenderFailed(f"{self.name}: its process ended (exit code {self.process.exitcode})") from None
        if status == "missing":
            raise ContenderFailed(f"{self.name}: {LIBRARY[self.kind]} does not import ({value})", missing=True)
        if status == "error":
            raise ContenderFailed(f"{self.name} failed, in its worker process:\n{value}")
        return value

    def call(self, command, *arguments):
        try:
            self.pipe.send((command, *arguments))
        except OSError:  # the worker is gone; reply() says so
            pass
        return self.reply()

    def measure(self, command, *arguments):
        """``call``, after a pause: so the contender before leaves the cores idle (OpenBLAS's
        threads, for one, spin for ~0.1 s after each product before they sleep)."""
        time.sleep(SETTLE_SECONDS)
        return self.call(command, *arguments)

    def stop(self):
        """Ask the worker to end and wait for it (it frees its model); end it if it does not."""
        if self.process.is_alive():
            try:
                self.pipe.send(("stop",))
            except OSError:  # it is ending anyway
                pass
            self.process.join(60)
        self.terminate()

    def terminate(self):
        if self.process.is_alive():
            self.process.terminate()
        self.process.join()
        self.pipe.close()


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


def check_config(folder: Path) -> None:
    """Exit with minqwen's own one-line message if ``folder``'s config.json is no Qwen3.5 config.

    Read by minqwen in a child process: this driver imports no minqwen, so that none of its
    kernels or memory is in the processes that measure."""
    check = subprocess.run([sys.executable, "-c", "import sys, minqwen.config as c\n"
                            "try:\n    c.load_config(sys.argv[1])\n"
                            "except c.MinqwenError as e:\n    sys.exit(str(e))", str(folder.absolute())],
                           capture_output=True, text=True, cwd=TOOLS.parent)
    if check.returncode != 0:
        raise SystemExit(f"--model: {check.stderr.strip().splitlines()[-1] if check.stderr.strip() else folder}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=checkpoint_folder,
                        help="checkpoint folder (default: make/reuse the real-shape one)")
    parser.add_argument("--threads", type=whole_number(1), default=2, help="threads of every contender (default 2)")
    parser.add_argument("--repeats", type=whole_number(1), help="rounds of every measurement (default 3)")
    parser.add_argument("--long-context", type=whole_number(0),
                        help="context of the long decode (default 16384); 0 skips it")
    parser.add_argument("--no-transformers", action="store_true",
                        help="leave transformers out (its rows, and every ratio to it)")
    parser.add_argument("--gguf", type=existing_file, nargs="+", default=[],
                        help="GGUF file(s) of the same checkpoint: measure llama.cpp on each (needs llama_cpp)")
    parser.add_argument("--quick", action="store_true", help="1 repeat, no long context")
    parser.add_argument("--json", type=output_file, help="also write every figure to this JSON file")
    parser.add_argument("--cold-start-only", action="store_true",
                        help="only the cold-start figures (new processes), for minqwen fp32 and bf16-resident")
    args = parser.parse_args()
    if args.quick and (args.repeats is not None or args.long_context is not None):
        parser.error("--quick sets --repeats 1 and --long-context 0: give either --quick or those")
    quick = dict(repeats=1, long_context=0) if args.quick else dict(repeats=3, long_context=16384)
    for name, default in quick.items():
        if getattr(args, name) is None:
            setattr(args, name, default)
    try:
        import numba  # its config only: this process starts no Numba threads (nor imports minqwen)
    except ImportError as e:  # run by a Python that minqwen is not installed in
        parser.error(f"minqwen's dependencies do not import in this Python ({e}): install minqwen first "
                     "(pip install -e . in the repository)")

    if args.threads > numba.config.NUMBA_NUM_THREADS:  # found now, not in a worker after the others loaded
        parser.error(f"--threads {args.threads}: Numba starts with {numba.config.NUMBA_NUM_THREADS} threads here "
                     f"(set NUMBA_NUM_THREADS={args.threads} in the environment to allow more)")

    from real_shape import DEFAULT_DIR
    from threadpoolctl import threadpool_limits

    folder = args.model or DEFAULT_DIR
    if args.model is None and not (folder / "config.json").is_file():  # made once, by a process with torch
        made = subprocess.run([sys.executable, str(TOOLS / "real_shape.py"), "make", "--out", str(folder)])
        if made.returncode:
            return made.returncode  # real_shape.py said why (no torch, no room, ...)
    check_config(folder)
    if args.cold_start_only:
        for dtype in ("float32", "bfloat16"):
            print(dtype, json.dumps(cold_starts(folder, dtype, args.threads, args.repeats)), flush=True)
        return 0
    config = json.loads((folder / "config.json").read_text())
    text_config = config.get("text_config", config)
    vocab, context = text_config["vocab_size"], text_config.get("max_position_embeddings")
    if args.long_context and context is not None and args.long_context + 64 > context:
        raise SystemExit(f"--long-context {args.long_context}: {folder}/config.json allows "
                         f"{context} positions, and the run adds 64 tokens")
    rng = np.random.default_rng(0)
    prompt16 = rng.integers(min(100, vocab - 1), min(240000, vocab), size=16)
    prompt512 = rng.integers(min(100, vocab - 1), min(240000, vocab), size=512)
    results = {"machine": machine(), "threads": args.threads, "repeats": args.repeats,
               "long_context": args.long_context, "checkpoint": str(folder), "rows": []}
    threadpool_limits(limits=args.threads)  # for the roofline probe, this process's only BLAS work
    gemv = RooflineProbe()

    contenders = [("minqwen", "float32"), ("minqwen", "bfloat16"), ("minqwen", BF16_PROMPTS)]
    if not args.no_transformers:
        contenders += [("transformers", "float32"), ("transformers", "bfloat16")]
    contenders += [("llama.cpp", path) for path in args.gguf]
    workers = []
    try:
        for kind, what in contenders:
            try:
                worker = Worker(kind, what, folder, args.threads)
            except ContenderFailed as error:
                if what == BF16_PROMPTS and "AVX512-BF16" in str(error):
                    print("no bf16-prompts row: this CPU has no AVX512-BF16", flush=True)
                    continue
                if error.missing and kind == "transformers":
                    raise ContenderFailed(f"{error}: install the reference (pip install -e '.[reference]', torch "
                                          f"2.13.0 CPU first: see README) or run with --no-transformers") from None
                if not (error.missing and kind == "llama.cpp"):
                    raise
                print(f"no llama.cpp contender ({error}): pip install llama-cpp-python==0.3.36", flush=True)
                break  # the GGUF files are last, and each would fail alike
            if any(w.name == worker.name for w in workers):  # two GGUF files of one type
                worker.name += f" {Path(what).name}"
            workers.append(worker)
        for worker in workers:  # warm-up: JIT, caches, allocator
            worker.call("prefill", prompt512)
            worker.call("decode", prompt16, 4)
        # Round-robin: every repeat measures the roofline and each contender once, so a machine
        # that slows down for a minute slows every contender alike and the ratios stay meaningful
        # (measured one contender after another, the same code moved by ±20% between runs here).
        # The probe brackets each decode round, so the roofline fraction pairs a round's decoding with
        # the bandwidth of the same minutes (one run's samples spread over 7-12% here, minute to minute).
        bandwidth, prefill, decode = [], {w.name: [] for w in workers}, {w.name: [] for w in workers}
        for _ in range(args.repeats):
            for worker in workers:
                prefill[worker.name].append(worker.measure("prefill", prompt512))
            before = gemv.sample()
            for worker in workers:
                decode[worker.name].append(worker.measure("decode", prompt16, 64))
            bandwidth.append((before, gemv.sample()))
        results["roofline_GBps"] = statistics.median(sample for pair in bandwidth for sample in pair)
        results["roofline_samples_GBps"] = bandwidth
        print(f"machine: {results['machine']['cpu']}, {args.threads} threads; "
              f"fp32 GEMV roofline {results['roofline_GBps']:.1f} GB/s (samples "
              f"{min(min(pair) for pair in bandwidth):.1f}-{max(max(pair) for pair in bandwidth):.1f})", flush=True)
        del gemv

        for worker in workers:
            row = {"name": worker.name,
                   "prefill512_tps": 512 / statistics.median(prefill[worker.name]),
                   "decode_tps": 63 / statistics.median(decode[worker.name]),
                   # each round's seconds, in round order (beside roofline_samples_GBps)
                   "prefill512_seconds": prefill[worker.name], "decode_seconds": decode[worker.name]}
            if "weight_bytes_per_token" in worker.info:
                row["weight_bytes_per_token"] = worker.info["weight_bytes_per_token"]
                row["roofline_fraction"] = statistics.median(
                    (63 / seconds) * row["weight_bytes_per_token"] / ((before + after) / 2 * 1e9)
                    for seconds, (before, after) in zip(decode[worker.name], bandwidth))
            row.update(worker.info.get("details", {}))
            results["rows"].append(row)
        for worker in workers:  # free every model before the long-context runs and the new processes
            worker.stop()

        for row, measured in zip(results["rows"], list(workers)):
            if measured.kind != "minqwen" or measured.what == BF16_PROMPTS:  # its decoding is bf16-resident's
                continue
            if args.long_context:  # in a fresh worker, the only model in memory
                worker = Worker("minqwen", measured.what, folder, args.threads)
                workers.append(worker)
                contexts = (512, args.long_context)
                prompts = {context: rng.integers(0, worker.info["vocab_size"], size=context) for context in contexts}
                for context, times in worker.call("decode_at_contexts", prompts, 64, args.repeats).items():
                    row[f"decode_at_{context}_tps"] = 63 / statistics.median(times)
                row["long_over_512"] = row[f"decode_at_{args.long_context}_tps"] / row["decode_at_512_tps"]
                worker.stop()
            row.update(cold_starts(folder, measured.what, args.threads, args.repeats))
    except ContenderFailed as error:  # its message carries the worker's traceback, where there is one
        print(f"error: {error}", file=sys.stderr)
        return 1
    finally:  # on an error or Ctrl-C too: no worker outlives the benchmark
        for worker in workers:
            worker.terminate()
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
    print(f"medians of {results['repeats']} round-robin rounds, {results['threads']} threads")
    print(f"{'contender':<36}{'prefill 512':>14}{'decode':>12}{'× tf fp32 (prefill, decode)':>30}")
    for r in rows:
        ratio = (f"{r['prefill512_tps'] / peer['prefill512_tps']:.2f}, {r['decode_tps'] / peer['decode_tps']:.2f}"
                 if peer else "-")
        print(f"{r['name']:<36}{r['prefill512_tps']:>10.1f} t/s{r['decode_tps']:>8.2f} t/s{ratio:>30}")
    for r in rows:
        if "cold_start" in r:
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
