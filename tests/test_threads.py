"""The process settings minqwen makes on import (minqwen/threads.py)."""

import json
import os
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from minqwen import MinqwenError
from minqwen.threads import keep_freed_memory

GLIBC_LINUX = sys.platform.startswith("linux") and "CS_GNU_LIBC_VERSION" in getattr(os, "confstr_names", {})


@pytest.mark.skipif(not GLIBC_LINUX, reason="the allocator setting is for glibc on Linux")
def test_a_freed_large_array_is_reused_without_page_faults():
    assert keep_freed_memory()
    size = 8 << 20  # above glibc's default mmap threshold (128 kB), below minqwen's (32 MB)
    first = np.ones(size // 4, np.float32)
    del first
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    second = np.ones(size // 4, np.float32)  # writes every page
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    assert second.sum() == size // 4
    # Mapped fresh, the 2048 pages of 4 kB would each fault once.
    assert faults < 256, f"{faults} page faults re-allocating a freed 8 MB array"


@pytest.mark.skipif(not GLIBC_LINUX, reason="the allocator setting is for glibc on Linux")
def test_a_malloc_setting_of_the_user_wins():
    code = "import minqwen.threads as t; print(t.keep_freed_memory())"
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"



def test_the_default_thread_count_stays_within_numba_num_threads():
    # A user who starts Python with NUMBA_NUM_THREADS=1 asked for one thread: the command
    # line's default (the physical cores) must not then refuse to run; an explicit
    # --threads beyond it still is refused, with the variable named.
    env = dict(os.environ, NUMBA_NUM_THREADS="1")
    command = ["generate", "def", "--max-new-tokens", "2"]
    ok = subprocess.run([sys.executable, "-m", "minqwen", *command], env=env, capture_output=True, text=True,
                        timeout=300)
    assert ok.returncode == 0, ok.stderr
    refused = subprocess.run([sys.executable, "-m", "minqwen", "--threads", "2", *command], env=env,
                             capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2 and "NUMBA_NUM_THREADS" in refused.stderr
    assert "Traceback" not in refused.stderr


def test_an_installed_minqwen_caches_its_numba_kernels_outside_the_package(tmp_path):
    # pip uninstall would leave a cache inside site-packages/minqwen behind, and the empty
    # minqwen/ it leaves would then shadow a later editable install
    site = tmp_path / "lib" / "site-packages"
    shutil.copytree(Path(__file__).resolve().parent.parent / "minqwen", site / "minqwen",
                    ignore=shutil.ignore_patterns("__pycache__"))
    home = tmp_path / "home"
    env = {k: v for k, v in os.environ.items() if k not in ("NUMBA_CACHE_DIR", "XDG_CACHE_HOME")}
    env.update(HOME=str(home), PYTHONPATH=str(site))
    code = ("import minqwen, os; print(minqwen.__file__); print(os.environ['NUMBA_CACHE_DIR']); "
            "minqwen.load(minqwen.checkpoint.EMBEDDED).forward([1, 2, 3])")
    run = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stderr
    package, folder = run.stdout.splitlines()[:2]
    assert Path(package).parent == site / "minqwen" and Path(folder).is_relative_to(home)
    assert not list((site / "minqwen").rglob("*.nbi")) and list(Path(folder).rglob("*.nbi"))
    env["NUMBA_CACHE_DIR"] = str(tmp_path / "mine")  # the user's choice wins
    run = subprocess.run([sys.executable, "-c", "import minqwen, os; print(os.environ['NUMBA_CACHE_DIR'])"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert run.stdout.strip() == str(tmp_path / "mine"), run.stderr


def test_a_system_pythons_dist_packages_counts_as_an_install_too(tmp_path):
    # Debian's and Ubuntu's Python install packages into dist-packages: the same uninstall
    # problem as site-packages. (Importing is enough to see the choice: no kernel is compiled.)
    site = tmp_path / "lib" / "python3" / "dist-packages"
    shutil.copytree(Path(__file__).resolve().parent.parent / "minqwen", site / "minqwen",
                    ignore=shutil.ignore_patterns("__pycache__"))
    home = tmp_path / "home"
    env = {k: v for k, v in os.environ.items() if k not in ("NUMBA_CACHE_DIR", "XDG_CACHE_HOME")}
    env.update(HOME=str(home), PYTHONPATH=str(site))
    code = "import minqwen, os; print(minqwen.__file__); print(os.environ.get('NUMBA_CACHE_DIR'))"
    run = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr
    package, folder = run.stdout.splitlines()[:2]
    assert Path(package).parent == site / "minqwen" and Path(folder).is_relative_to(home)


@pytest.mark.parametrize("value, naps", [("18", True), ("0", True), ("19", False), ("", False), ("x", False)])
def test_openblas_threads_nap_from_a_timeout_of_18_or_less(monkeypatch, value, naps):
    # OpenBLAS sleeps its threads after 2^OPENBLAS_THREAD_TIMEOUT cycles: 18 (~0.1 ms) is the
    # largest value with which a prompt's DeltaNet recurrence may take both cores (deltanet.py);
    # unset or unreadable leaves OpenBLAS's default spin (2^28), so no.
    from minqwen.threads import _openblas_threads_nap

    monkeypatch.setenv("OPENBLAS_THREAD_TIMEOUT", value)
    assert _openblas_threads_nap() is naps


# Generation from several Python threads at once, and in a child forked after the parent
# generated: each runs in a fresh process, whose output the test compares with one thread's.
CONCURRENT = """
import json, sys, threading
import minqwen
from minqwen.checkpoint import EMBEDDED
from minqwen.generate import generate_ids
model = minqwen.load(EMBEDDED, dtype="bfloat16")  # bf16: its LM head runs a parallel kernel
prompts = [list(range(5 + i, 40 + i)) for i in range(4)]
alone = [list(generate_ids(model, p, max_new_tokens=32)) for p in prompts]
differ = []
def work(i):
    for _ in range(3):
        if list(generate_ids(model, prompts[i], max_new_tokens=32)) != alone[i]:
            differ.append(i)
threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
for t in threads: t.start()
for t in threads: t.join()
print(json.dumps({"differ": differ}))
"""

FORKED = """
import json, multiprocessing, numba
import minqwen
from minqwen.checkpoint import EMBEDDED
from minqwen.generate import generate_ids
model = minqwen.load(EMBEDDED, dtype="bfloat16")
prompt = list(range(5, 40))
alone = list(generate_ids(model, prompt, max_new_tokens=32))  # the parent's kernels start its thread pool
def child(queue):
    queue.put(list(generate_ids(model, prompt, max_new_tokens=32)))
context = multiprocessing.get_context("fork")
queue = context.Queue()
process = context.Process(target=child, args=(queue,))
process.start()
process.join(120)
print(json.dumps({"layer": numba.threading_layer(), "exitcode": process.exitcode,
                  "same": process.exitcode == 0 and queue.get() == alone}))
"""


@pytest.mark.parametrize("layer", ["default", "workqueue"])
def test_threads_generating_at_once_get_what_one_thread_gets(layer):
    # Numba's workqueue pool (its fallback where neither TBB nor OpenMP is installed) aborted
    # the process when two threads launched parallel kernels at once; minqwen launches them
    # one at a time.
    env = dict(os.environ, NUMBA_THREADING_LAYER=layer)
    out = subprocess.run([sys.executable, "-c", CONCURRENT], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout.splitlines()[-1]) == {"differ": []}


@pytest.mark.skipif(not sys.platform.startswith("linux"),
                    reason="forking a process that has run threads is Linux's to promise, not macOS's")
def test_a_child_forked_after_generating_generates_the_same():
    # On Numba's omp layer (GNU OpenMP) a forked child was killed at its first parallel kernel;
    # it now runs the serial builds.
    out = subprocess.run([sys.executable, "-c", FORKED], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.splitlines()[-1])
    assert result["exitcode"] == 0 and result["same"], (result, out.stderr[-2000:])


def test_a_forked_child_of_an_openmp_process_runs_the_serial_build(monkeypatch):
    from minqwen import threads

    calls = []
    launch = threads.launched_safely(lambda *a: calls.append(("parallel", a)), lambda *a: calls.append(("serial", a)))
    launch(1, 2)
    monkeypatch.setattr(threads, "_forked_from_openmp", True)
    launch(3)
    assert calls == [("parallel", (1, 2)), ("serial", (3,))]


def test_one_blas_thread_blocks_that_overlap_give_blas_its_threads_back():
    # As two threads' blocks overlap: the first opens, the second opens, the first closes
    # while the second is still open, then the second closes. Each restoring what it found
    # left BLAS on one thread for good.
    import numba

    from minqwen.threads import one_blas_thread, set_threads, threads_in_use

    if numba.config.NUMBA_NUM_THREADS < 2:
        pytest.skip("needs two threads to tell one thread from the setting before")
    set_threads(2)
    try:
        before = threads_in_use()["blas"]
        assert before == [2]
        first, second = one_blas_thread(), one_blas_thread()
        first.__enter__()
        second.__enter__()
        first.__exit__(None, None, None)
        assert threads_in_use()["blas"] == [1]  # the second block is still open
        second.__exit__(None, None, None)
        assert threads_in_use()["blas"] == before
    finally:
        set_threads()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the per-user cache folder is read from XDG_CACHE_HOME on Linux")
def test_without_a_folder_numba_can_write_kernels_compile_in_a_temporary_one(tmp_path):
    # Neither the package's __pycache__ (here a file, so that even root cannot write into it)
    # nor the per-user cache folder can be written: `import minqwen` ended in Numba's
    # "RuntimeError: cannot cache function ...: no locator available".
    package = tmp_path / "site" / "minqwen"
    shutil.copytree(Path(minqwen_folder()), package, ignore=shutil.ignore_patterns("__pycache__"))
    (package / "__pycache__").write_text("not a folder")
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_CACHE_DIR"}
    env.update(PYTHONPATH=str(package.parent), XDG_CACHE_HOME="/dev/null/cache", PYTHONDONTWRITEBYTECODE="1")
    code = ("import minqwen, numba; from minqwen.checkpoint import EMBEDDED; "
            "print(minqwen.load(EMBEDDED, dtype='float32').forward([1, 2, 3]).shape, numba.config.CACHE_DIR)")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600,
                         cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    shape, folder = out.stdout.split(")")[0] + ")", out.stdout.split(")")[1].strip()
    assert shape == "(3, 4096)" and "minqwen-numba-" in folder
    assert "compile again next time" in out.stderr and "NUMBA_CACHE_DIR" in out.stderr
    assert not Path(folder).exists()  # removed at exit


def minqwen_folder() -> str:
    import minqwen

    return os.path.dirname(minqwen.__file__)


def test_a_threading_layer_this_machine_lacks_is_named_at_the_first_kernel_too():
    # set_threads (the command line) already named it; the Python API met Numba's ValueError
    # at the first parallel kernel, deep inside a forward pass.
    import importlib.util

    if importlib.util.find_spec("tbb") is not None:
        pytest.skip("TBB is installed here, so Numba can start that layer")
    code = ("import minqwen; from minqwen.checkpoint import EMBEDDED; "
            "minqwen.load(EMBEDDED, dtype='bfloat16').forward(list(range(40)))")
    out = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, NUMBA_THREADING_LAYER="tbb"),
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 1
    assert "MinqwenError: Numba cannot start its threads" in out.stderr, out.stderr[-1500:]
    assert "NUMBA_THREADING_LAYER is 'tbb'" in out.stderr


def test_asking_numba_for_its_thread_count_names_a_missing_threading_layer(monkeypatch):
    # numba.get_num_threads() starts the pool on first use: with NUMBA_THREADING_LAYER=tbb and no
    # TBB, a bf16 prompt's first question (how many threads share the AMX blocks) met Numba's
    # ValueError once the embedding row no longer went through a parallel kernel first.
    import numba

    from minqwen import threads

    def no_layer():
        raise ValueError("No threading layer could be loaded.\nHINT:\nIntel TBB is required")

    monkeypatch.setattr(numba, "get_num_threads", no_layer)
    monkeypatch.setenv("NUMBA_THREADING_LAYER", "tbb")
    with pytest.raises(MinqwenError, match="(?s)Numba cannot start its threads.*NUMBA_THREADING_LAYER is 'tbb'"):
        threads.numba_threads()


def test_only_the_threads_module_asks_numba_for_its_threads_directly():
    # Every other module asks through threads.numba_threads(), which names a missing layer.
    package = Path(minqwen_folder())
    direct = [f"{path.name}:{n}" for path in sorted(package.glob("*.py")) if path.name != "threads.py"
              for n, line in enumerate(path.read_text().splitlines(), 1) if "numba.get_num_threads(" in line]
    assert not direct
