"""How minqwen sets up the process it runs in: its two thread pools, and the allocator.

Two thread pools do the work: the BLAS library behind NumPy's matmuls (set through
threadpoolctl) and Numba's parallel kernels. Numba cannot use more threads than
``NUMBA_NUM_THREADS`` said when numba was first imported; to go higher, set that variable
before importing minqwen.

Every parallel kernel is launched through :func:`launched_safely`, so that a model may be
used from several Python threads, and in a child process forked after it ran.

Importing minqwen also asks the C allocator to keep freed memory for reuse
(:func:`keep_freed_memory`), and keeps Numba's compiled kernels out of an installed package
(:func:`numba_cache_outside_the_package`), or in a temporary folder where Numba can write none
of its own (:func:`numba_cache_that_can_be_written`).
"""

from __future__ import annotations

import atexit
import ctypes
import os
import shutil
import sys
import tempfile
import threading
import warnings
from contextlib import contextmanager
from pathlib import Path

from .errors import MinqwenError, is_whole_number

# Numba's parallel kernels run on an OpenMP pool (GNU libgomp here) whose idle threads spin
# for a while after each kernel, waiting for the next, then sleep. Two costs pull opposite
# ways. Spinning too long: between kernels minqwen calls BLAS, whose threads then find the
# cores taken (measured once, 0.8B shape, bf16 weights: a 16-token prefill took 4.1 s with
# libgomp's default spin, 0.66 s with GOMP_SPINCOUNT=1000; 0.43 s either way on the Intel
# Xeon VM below, where the bf16 widening no longer runs in parallel). Sleeping too soon: a
# sleeping thread takes 45-85 us to wake (measured on an Intel Xeon VM), and a bf16 decode
# step launches ~200 kernels, each ending in a barrier where the thread done first waits for
# the other. 10 000 spins (50-200 us there) keep the pool awake through a decode step and
# still let it sleep through a prefill's products: bf16 decode 11.2-11.5 -> 12.7-12.9
# tokens/s; float32 decode and prefills unchanged (same machine, alternated runs).
# On an AMD EPYC VM a spin is longer: 10 000 spins lasted 200-400 us (a kernel called after
# an idle gap took 10 us after 200 us, 53 us after 400). Counted there (voluntary context
# switches, 0.8B shape), the pool slept 5 times a bf16 decode step and 13 times a float32 one
# at 10 000 spins, 1-2 times at 30 000 or more, 84 and 44 times at 3 000 (bf16 step 96 ms
# against 68). So a longer spin could save at most ~1 ms of a 65-120 ms step there, and step
# times over 8 alternated rounds did not tell 10 000 from 30 000 apart. Spinning for ever
# (GOMP_SPINCOUNT=infinite) made a 128-token prefill 2-3x slower on both weight formats.
# Set before the OpenMP runtime starts (the first parallel kernel); a value the user set wins.
if "OMP_WAIT_POLICY" not in os.environ:
    os.environ.setdefault("GOMP_SPINCOUNT", "10000")


def _openblas_threads_nap() -> bool:
    """Whether the user started the process with OpenBLAS told to let its threads sleep soon.

    OpenBLAS's idle threads spin for 2^OPENBLAS_THREAD_TIMEOUT cycles (default 2^28, ~0.1 s)
    after each product before they sleep; it reads the variable once, when NumPy loads it.
    At 18 or less (~0.1 ms) the cores are free right after a product, and a prompt's Gated
    DeltaNet recurrence can take both (see deltanet.recurrent_gated_delta_rule).
    """
    try:
        return int(os.environ.get("OPENBLAS_THREAD_TIMEOUT", "")) <= 18
    except ValueError:
        return False


OPENBLAS_THREADS_NAP = _openblas_threads_nap()

# Numba's threading layers (NUMBA_THREADING_LAYER): pools by name, or by the safety asked of them.
NUMBA_THREADING_LAYERS = ("default", "omp", "tbb", "workqueue", "safe", "threadsafe", "forksafe")


def check_numba_environment() -> None:
    """The environment variables Numba reads, checked before it reads them.

    Numba's own checks fail with a ValueError deep inside ``import numba`` (a thread count
    below 1) or at the first parallel kernel (an unknown threading layer); and with its
    compiler switched off, minqwen's kernels do not run at all (their NumPy twins are the
    readable path, not a drop-in).
    """
    threads = os.environ.get("NUMBA_NUM_THREADS", "").strip()
    if threads and not (threads.isdigit() and int(threads) >= 1):
        raise MinqwenError(f"the environment variable NUMBA_NUM_THREADS is {threads!r}: it must be a whole number "
                           f"≥ 1 (the most threads Numba may use), or unset")
    layer = os.environ.get("NUMBA_THREADING_LAYER", "").strip()
    if layer and layer.lower() not in NUMBA_THREADING_LAYERS:
        raise MinqwenError(f"the environment variable NUMBA_THREADING_LAYER is {layer!r}: Numba knows "
                           f"{', '.join(NUMBA_THREADING_LAYERS)}, or unset")
    if os.environ.get("NUMBA_DISABLE_JIT", "0").strip() not in ("", "0"):
        raise MinqwenError("the environment variable NUMBA_DISABLE_JIT is set: minqwen's kernels need Numba's "
                           "compiler; unset it (the kernels' NumPy twins are for reading and tests, not a mode)")


check_numba_environment()  # at import: before any module of minqwen imports numba


def keep_freed_memory() -> bool:
    """Have glibc's malloc keep freed blocks of up to 32 MB for reuse, not hand them back to the OS.

    A forward pass makes and drops large temporaries: in a 512-token prefill of the 0.8B
    shape, [512, 3584] MLP activations of 7 MB, [512, 6144] DeltaNet projections of 13 MB.
    By default glibc maps blocks of more than 128 kB fresh from the kernel and unmaps them
    when freed; it raises that threshold to the largest block freed so far (and trims the heap
    past twice it), so a block larger than any freed before, or one mapped while the threshold
    was lower, still starts with page faults, and the kernel zeroes every page. Measured here:
    75 000 faults in one such prefill, and 89 against 107 tokens/s with this setting (the same
    process, runs alternated). A speculative verify's per-token DeltaNet states (2 MB a
    layer) cost 1 ms a layer in faults.
    Freed blocks then stay in the process for the next pass: peak memory is unchanged (the
    blocks are reused, not added to), but it is given back only at exit.

    Does nothing where the C library is not glibc, or where the user already tuned malloc
    (``MALLOC_MMAP_THRESHOLD_``, ``MALLOC_TRIM_THRESHOLD_`` or ``GLIBC_TUNABLES`` set).
    Returns whether the setting was applied.
    """
    if not sys.platform.startswith("linux") or any(
        name in os.environ for name in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES")
    ):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt  # glibc's; musl has none
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # from glibc's malloc.h
    largest = 32 << 20  # the most glibc accepts for the mmap threshold on 64-bit systems
    return bool(mallopt(m_mmap_threshold, largest)) and bool(mallopt(m_trim_threshold, 2 * largest))


keep_freed_memory()


def numba_cache_outside_the_package() -> str | None:
    """Where an installed minqwen's Numba kernels are cached: numba's own per-user cache folder.

    Numba caches a compiled kernel (``cache=True``) beside its source, in ``__pycache__``. For
    minqwen installed into site-packages (``pip install .``) that is a folder pip did not
    install, so ``pip uninstall`` leaves it behind, and with it an empty ``minqwen/`` that
    Python then imports, instead of minqwen itself, after a later ``pip install -e .``. So
    when minqwen runs from site-packages and the user has not chosen a cache folder
    (``NUMBA_CACHE_DIR``), kernels go where Numba puts those of a read-only install. A source
    checkout keeps Numba's default. Returns the folder chosen, or None.

    The setting is the process's (and, through the environment, its children's): other
    cached Numba kernels run there go to the same per-user folder, each under a name made
    from its own source path. A kernel minqwen compiles later (``minqwen.vision`` is
    imported on demand) must find the setting still there, so it is not undone.
    """
    package = Path(__file__).resolve().parent
    if os.environ.get("NUMBA_CACHE_DIR") or package.parent.name not in ("site-packages", "dist-packages"):
        return None
    import numba
    from numba.misc.appdirs import AppDirs

    folder = AppDirs(appname="numba", appauthor=False).user_cache_dir
    # Both: numba has read the environment already, and re-reads it if a NUMBA_ variable changes.
    os.environ["NUMBA_CACHE_DIR"] = numba.config.CACHE_DIR = folder
    return folder


numba_cache_outside_the_package()


def _can_write(folder) -> bool:
    """Whether files can be made in ``folder`` (made if missing): Numba's own test of a cache folder."""
    try:
        os.makedirs(folder, exist_ok=True)
        tempfile.TemporaryFile(dir=folder).close()
        return True
    except OSError:
        return False


def numba_cache_that_can_be_written() -> str | None:
    """A folder for Numba's cached kernels where none that Numba tries can be written; returns it, or None.

    Numba files a compiled kernel (``cache=True``) in the first folder it can write of:
    ``NUMBA_CACHE_DIR``, the ``__pycache__`` beside the source, its per-user cache folder
    (~/.cache/numba). Where none can be written (an install the user cannot write to, run
    with a home folder that cannot be written either, as in some containers), it fails while
    the kernels are defined: ``import minqwen`` itself ended in "RuntimeError: cannot cache
    function ...". Then the kernels go to a new private folder in the temporary directory,
    removed at exit, and compile again in every process: a warning says so, and how to keep
    them.
    """
    import numba
    from numba.misc.appdirs import AppDirs

    package = Path(__file__).resolve().parent
    tried = [numba.config.CACHE_DIR, str(package / "__pycache__"), AppDirs(appname="numba", appauthor=False).user_cache_dir]
    if any(folder and _can_write(folder) for folder in tried):
        return None
    named = ", ".join(folder for folder in tried if folder)
    try:
        folder = tempfile.mkdtemp(prefix="minqwen-numba-")
    except OSError as e:
        raise MinqwenError(f"Numba needs a folder it can write to keep compiled kernels in, and none of {named} or "
                           f"the temporary directory can be written ({e}): set the environment variable "
                           f"NUMBA_CACHE_DIR to one that can") from None
    creator = os.getpid()
    atexit.register(lambda: os.getpid() == creator and shutil.rmtree(folder, ignore_errors=True))
    os.environ["NUMBA_CACHE_DIR"] = numba.config.CACHE_DIR = folder
    warnings.warn(f"Numba cannot write its cache of compiled kernels to any of {named}: "
                  f"they go to {folder} for this process only, and compile again next time. Set the environment "
                  "variable NUMBA_CACHE_DIR to a folder you can write to keep them.", stacklevel=2)
    return folder


numba_cache_that_can_be_written()

_limits = None  # the threadpoolctl limiter in force, kept alive so the limit holds
_controller = None  # a threadpoolctl controller, made once: making one scans the loaded libraries (~1 ms)


def physical_cores() -> int:
    """Cores, not hardware threads: two hyper-threads share one core's memory bandwidth."""
    try:
        cores = set()
        physical = core = None
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("physical id"):
                physical = line.split(":")[1].strip()
            elif line.startswith("core id"):
                core = line.split(":")[1].strip()
            elif not line.strip() and core is not None:
                cores.add((physical, core))
                physical = core = None
        if core is not None:
            cores.add((physical, core))
        if cores:
            return min(len(cores), os.cpu_count() or len(cores))
    except OSError:
        pass
    return os.cpu_count() or 1


def serial_and_parallel(loops, **options):
    """Compile the loop nest ``loops`` twice with Numba: (on one thread, parallel over its prange).

    Small calls run the serial build (waking a thread pool costs more than they take), large
    ones the parallel build. Numba's on-disk cache files a compiled function under its module,
    name and bytecode, not under its options, so two builds of one function would share one
    cache entry, and whichever was compiled first would be loaded for both (seen here: the
    "parallel" few-row kernel, cached by a process that had only needed the serial one, ran on
    one thread). So each build gets a function of its own name over the same code.
    The parallel build is returned wrapped by :func:`launched_safely`.
    """
    import types

    import numba

    def named(suffix):
        renamed = types.FunctionType(loops.__code__, loops.__globals__, loops.__name__ + suffix,
                                     loops.__defaults__, loops.__closure__)
        renamed.__qualname__ = loops.__qualname__ + suffix
        renamed.__doc__ = loops.__doc__
        return renamed

    serial = numba.njit(cache=True, **options)(named("_serial"))
    parallel = numba.njit(parallel=True, cache=True, **options)(named("_parallel"))
    return serial, launched_safely(parallel, serial)


# Numba runs parallel kernels on one of three thread pools ("threading layers"), whichever it
# finds first: TBB, OpenMP, or its own workqueue. Two of them break uses of minqwen that a
# user may well try, so every parallel kernel is launched through launched_safely():
# * workqueue, where neither TBB nor OpenMP is installed (macOS without libomp, for one),
#   aborts the whole process when two Python threads launch parallel kernels at the same time
#   (seen here: four threads generating with one model). One launch at a time avoids it, on
#   any layer: each kernel takes every core anyway.
# * GNU OpenMP (the omp layer on Linux) cannot run in a child forked from a process that used
#   it; Numba kills such a child at its first parallel kernel (multiprocessing forks by
#   default on Linux before Python 3.14). A forked child of such a process runs the serial
#   builds instead.
_launching = threading.Lock()
_forked_from_openmp = False


def launched_safely(parallel, serial):
    """``parallel`` (a parallel Numba build) as a function that is safe to call from threads and forked children.

    Launches go one at a time; in a child forked from a process whose kernels ran on GNU
    OpenMP, ``serial`` (the same loops built without ``parallel=True``) runs instead.
    """
    def launch(*args):
        if _forked_from_openmp:
            return serial(*args)
        with _launching:
            try:
                return parallel(*args)
            except ValueError as e:  # the first launch starts the pool: a layer this machine lacks?
                raise_if_a_missing_layer(e)
                raise

    launch.__name__ = launch.__qualname__ = getattr(parallel, "__name__", "parallel")
    launch.parallel, launch.serial = parallel, serial
    return launch


def set_threads(n: int | None = None) -> int:
    """Use ``n`` threads (default: the physical cores, at most NUMBA_NUM_THREADS) for BLAS and Numba; returns n."""
    global _limits
    import numba
    from threadpoolctl import threadpool_limits

    # The default stays within what Numba was started with: NUMBA_NUM_THREADS=1 set by the
    # user is a choice to respect, not an error (asking for more explicitly still is one).
    n = min(physical_cores(), numba.config.NUMBA_NUM_THREADS) if n is None else n
    if not is_whole_number(n) or n < 1:
        raise MinqwenError(f"threads must be a positive whole number, got {n!r}")
    n = int(n)
    if n > numba.config.NUMBA_NUM_THREADS:
        raise MinqwenError(
            f"Numba was started with {numba.config.NUMBA_NUM_THREADS} threads and cannot use {n}; "
            f"set NUMBA_NUM_THREADS={n} in the environment before starting Python"
        )
    _limits = threadpool_limits(limits=n)
    try:
        numba.set_num_threads(n)  # (starts Numba's thread pool, in the threading layer asked for)
    except ValueError as e:  # a layer this machine lacks, as tbb without the tbb package?
        raise_if_a_missing_layer(e)
        raise
    return n


def numba_threads() -> int:
    """numba.get_num_threads(), which starts Numba's pool the first time: a layer this machine
    lacks is then said as for a kernel launch (:func:`threads_cannot_start`)."""
    import numba

    try:
        return numba.get_num_threads()
    except ValueError as e:
        raise_if_a_missing_layer(e)
        raise


def raise_if_a_missing_layer(e: ValueError) -> None:
    """Raise :func:`threads_cannot_start` if ``e`` is Numba's missing-threading-layer error."""
    if "threading layer" in str(e):
        raise threads_cannot_start(e) from None


def threads_cannot_start(e: ValueError) -> MinqwenError:
    """Numba's error when the threading layer asked for is not installed, said as minqwen's."""
    return MinqwenError(f"Numba cannot start its threads: {e} (NUMBA_THREADING_LAYER is "
                        f"{os.environ.get('NUMBA_THREADING_LAYER', 'unset')!r})")


@contextmanager
def one_blas_thread(active: bool = True):
    """Run the block with BLAS on one thread (if ``active``), then restore it.

    For the calls where Numba's parallel kernels do the heavy matmuls (see
    :func:`minqwen.linear.numba_multiplies`): OpenBLAS's threads keep spinning for a while
    after each of its calls, and on a machine with as many threads as cores they take the
    cores from Numba's. While the block runs, :func:`numba_does_the_products` is true. Measured
    on the Qwen3.5-0.8B shape with bf16 weights, 512 tokens of context (where attention's
    matmuls are big enough for OpenBLAS to go parallel): 311 ms a decode step, 103 ms with BLAS
    on one thread. Switching costs ~12 µs.
    Blocks may nest, and may be open in several threads at once: the first to open sets BLAS
    to one thread, the last to close gives it back its threads. (Each block restoring what it
    found would leave BLAS on one thread for good once two threads' blocks overlapped.)
    """
    global _controller, _blas_aside, _blas_limit
    if not active:
        yield
        return
    with _blas_switch:
        if _blas_aside == 0:
            if _controller is None:
                from threadpoolctl import ThreadpoolController

                _controller = ThreadpoolController()
            _blas_limit = _controller.limit(limits=1, user_api="blas")
        _blas_aside += 1
    try:
        yield
    finally:
        with _blas_switch:
            _blas_aside -= 1
            if _blas_aside == 0:
                _blas_limit.restore_original_limits()
                _blas_limit = None


_blas_aside = 0  # how many one_blas_thread blocks are open, in every thread
_blas_limit = None  # threadpoolctl's limiter while any is open
_blas_switch = threading.Lock()


def _after_fork_in_child() -> None:
    global _launching, _forked_from_openmp, _blas_switch
    # a lock another thread held at the fork would stay held for ever
    _launching, _blas_switch = threading.Lock(), threading.Lock()
    if "numba" in sys.modules and not _forked_from_openmp:
        try:
            _forked_from_openmp = sys.modules["numba"].threading_layer() == "omp"
        except ValueError:  # no parallel kernel ran yet: the child starts a pool of its own
            pass


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def numba_does_the_products() -> bool:
    """Whether we are inside :func:`one_blas_thread`: Numba's pool is awake and the cores are its own."""
    return _blas_aside > 0


def threads_in_use() -> dict:
    """What each pool is set to now."""
    import numba
    from threadpoolctl import threadpool_info

    blas = sorted({pool["num_threads"] for pool in threadpool_info() if pool.get("user_api") == "blas"})
    return {"blas": blas, "numba": numba.get_num_threads(), "physical_cores": physical_cores()}
