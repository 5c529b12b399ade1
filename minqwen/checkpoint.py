"""safetensors files → named NumPy arrays, every header field checked.

A safetensors file is simple enough to read by hand, and reading it by hand is what lets
minqwen read each tensor straight into the dtype it computes in (a block at a time: see
:meth:`SafetensorsFile.read_as`), leave MoE experts memory-mapped until a token is routed to
them (:meth:`Checkpoint.mapped`), read bf16 and float8 through ``ml_dtypes``, and say exactly
which file and which tensor is wrong when a download was truncated or a header is damaged:

    [8 bytes: N, little-endian u64] [N bytes: JSON header] [data ...]

The header maps each tensor name to ``{"dtype", "shape", "data_offsets": [begin, end]}``,
offsets relative to the first byte after the header. An optional ``__metadata__`` entry holds
string → string pairs.

A checkpoint folder holds either ``model.safetensors`` or shards listed by
``model.safetensors.index.json`` (``{"weight_map": {tensor name: file name}}``). A folder
with both reads ``model.safetensors``, as transformers 5.23.0 does.

FP8 checkpoints (config ``quantization_config.quant_method: "fp8"``, Qwen's "-FP8" releases)
store most projection matrices as F8_E4M3 — one byte per weight — each with a sibling tensor of
block scales, ``<name>_scale_inv`` (``….weight`` → ``….weight_scale_inv``; fused experts
``experts.gate_up_proj`` → ``experts.gate_up_proj_scale_inv``). The weight is cut into blocks
of ``weight_block_size`` = [b0, b1] (rows × columns) on a *ceiling* grid — the last row and
column of blocks are cut short when b0 or b1 does not divide the shape — and the real weight is
``fp8 value × its block's scale_inv`` (:func:`dequantize_fp8`). :meth:`Checkpoint.float32` and
:meth:`Checkpoint.bfloat16` return FP8 weights dequantized, so the model computes with them
exactly as with bf16 weights.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import re
import stat
import struct
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import ml_dtypes
import numpy as np

from .errors import MinqwenError

# safetensors dtype names → NumPy dtypes. bf16 and float8 come from ml_dtypes.
DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
FLOAT_DTYPES = ("F32", "F16", "BF16", "F64")
FP8_DTYPE = "F8_E4M3"  # the FP8 format Qwen's FP8 releases use (config fmt "e4m3"); read only with its scales
FP8_E4M3_MAX = 448.0  # the largest finite E4M3 value

# A header larger than this is not a safetensors header but a damaged length field.
MAX_HEADER_BYTES = 100 * 1024 * 1024
READ_BLOCK_BYTES = 8 * 1024 * 1024  # loads read (and convert) this much at a time (see read_as)
SPLIT_BYTES = 4 * 1024 * 1024  # a stored tensor this large is read by several threads at once
HUGE_PAGE_BYTES = 2 * 1024 * 1024  # x86-64's large page (see empty_on_huge_pages)


def _refusing_repeated_names(pairs: list) -> dict:
    """A JSON object's pairs as a dict, refusing a name given twice: json.loads would keep the last
    copy silently, and a header naming one tensor twice leaves it unclear which data is the tensor."""
    out = {}
    for name, value in pairs:
        if name in out:
            raise ValueError(f"the name {name!r} appears twice in one object")
        out[name] = value
    return out


class SafetensorsFile:
    """One safetensors file: its validated header and a read-only memory map of its data."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            status = self.path.stat()
            if not stat.S_ISREG(status.st_mode):  # a pipe would block the read forever; a device never ends
                raise MinqwenError(f"{self.path}: cannot open safetensors file (not a regular file)")
            size = status.st_size
            f = open(self.path, "rb")  # an unreadable file fails here, not below
        except OSError as e:
            raise MinqwenError(f"{self.path}: cannot open safetensors file ({e.strerror})") from None
        except ValueError as e:  # a NUL byte in the name (an index can spell anything)
            raise MinqwenError(f"{self.path!r}: cannot open safetensors file ({e})") from None
        with f:
            if size < 8:
                raise MinqwenError(
                    f"{self.path}: file is {size} bytes, too short to be a safetensors file (truncated?)"
                )
            (header_len,) = struct.unpack("<Q", f.read(8))
            if header_len > size - 8:
                raise MinqwenError(
                    f"{self.path}: bad header: its length field says {header_len} bytes but the file has "
                    f"{size - 8} after it (truncated or not a safetensors file)"
                )
            if header_len > MAX_HEADER_BYTES:
                raise MinqwenError(
                    f"{self.path}: bad header: its length field says {header_len} bytes, more than the "
                    f"{MAX_HEADER_BYTES} minqwen reads as a header (a damaged length field, or not a safetensors file)"
                )
            header_bytes = f.read(header_len)
        try:
            header = json.loads(header_bytes.decode("utf-8"), object_pairs_hook=_refusing_repeated_names)
        except (ValueError, RecursionError) as e:  # bad UTF-8 or JSON, a huge int literal, deep nesting
            raise MinqwenError(f"{self.path}: bad header: not valid UTF-8 JSON ({e})") from None
        if not isinstance(header, dict):
            raise MinqwenError(f"{self.path}: bad header: expected a JSON object")

        self.data_start = 8 + header_len
        self.data_len = size - self.data_start
        self.metadata = header.pop("__metadata__", None) or {}
        if not isinstance(self.metadata, dict) or not all(isinstance(v, str) for v in self.metadata.values()):
            raise MinqwenError(f"{self.path}: bad header: __metadata__ must be an object of strings")
        self.entries: dict[str, tuple[str, tuple[int, ...], int, int]] = {}
        for name, entry in header.items():
            self.entries[name] = self._validate_entry(name, entry)
        self._check_data_layout()
        self._map = None

    def _validate_entry(self, name, entry):
        where = f"{self.path}: tensor '{name}'"
        if not isinstance(entry, dict):
            raise MinqwenError(f"{where}: bad header entry (expected an object)")
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if not isinstance(dtype, str) or dtype not in DTYPES:
            raise MinqwenError(f"{where}: unknown dtype {dtype!r} (known: {', '.join(DTYPES)})")
        if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
            raise MinqwenError(f"{where}: bad shape {shape!r} (expected a list of non-negative integers)")
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
        ):
            raise MinqwenError(f"{where}: bad data_offsets {offsets!r} (expected [begin, end])")
        begin, end = offsets
        if not 0 <= begin <= end:
            raise MinqwenError(f"{where}: bad data_offsets {offsets!r} (need 0 ≤ begin ≤ end)")
        if end > self.data_len:
            raise MinqwenError(
                f"{where}: data_offsets {offsets!r} point outside the file, whose data section has "
                f"{self.data_len} bytes (truncated download?)"
            )
        nbytes = math.prod(shape) * DTYPES[dtype].itemsize  # Python ints: a huge shape cannot wrap around
        if end - begin != nbytes:
            raise MinqwenError(
                f"{where}: data_offsets span {end - begin} bytes but {dtype} {shape} needs {nbytes}"
            )
        return dtype, tuple(shape), begin, end

    def _check_data_layout(self):
        """The tensors tile the data section, end to end, as the format (and the safetensors
        library, which transformers reads with) requires: no overlap, no gap, nothing after."""
        spans = sorted((b, e, n) for n, (_, _, b, e) in self.entries.items() if e > b)
        for (_, end_a, name_a), (begin_b, _, name_b) in zip(spans, spans[1:]):
            if begin_b < end_a:
                raise MinqwenError(f"{self.path}: bad header: tensors '{name_a}' and '{name_b}' overlap")
            if begin_b > end_a:
                raise MinqwenError(f"{self.path}: bad header: {begin_b - end_a} bytes between tensors '{name_a}' "
                                   f"and '{name_b}' belong to no tensor (a damaged offset?)")
        first, last = (spans[0][0], spans[-1][1]) if spans else (0, 0)
        if first != 0 or last != self.data_len:
            raise MinqwenError(f"{self.path}: bad header: the tensors cover bytes {first} to {last} of a "
                               f"{self.data_len}-byte data section; the rest belongs to no tensor (a damaged offset?)")

    def __contains__(self, name):
        return name in self.entries

    def dtype_name(self, name) -> str:
        return self.entries[name][0]

    def shape(self, name) -> tuple[int, ...]:
        return self.entries[name][1]

    def read(self, name) -> np.ndarray:
        """The tensor as stored, copied into memory with plain file reads (see :meth:`read_as`)."""
        return self.read_as(name, DTYPES[self.entries[name][0]])

    def read_as(self, name, dtype) -> np.ndarray:
        """The tensor converted to ``dtype`` (or as stored), read a few MB at a time.

        Loading reads rather than maps, so that the file's pages never count in the process's
        resident memory: once a weight is converted, only the converted copy stays. It reads a
        block at a time, because converting a whole tensor after reading it would hold both
        copies at once (for the 0.8B model's bf16 embedding, 0.5 GB next to its 1 GB float32
        copy), and peak memory would exceed the weights' own size by the largest tensor.

        A large tensor is cut into one contiguous span per thread (as many as minqwen's
        kernels use), each read and converted by its own thread. Filling 3 GB of new float32
        memory is bound by the page faults that map it (written once mapped, 3 GB takes
        0.6 s), and two cores take faults side by side. Measured, 0.8B shape from its bf16
        file, Intel Xeon VM, memory freed by an earlier process: 2.4-3.4 s on one thread,
        0.8 s on two. (Memory the VM's host had not handed out yet took ~13 s a GB to fault in
        on one thread, half that on two: a cold start then is mostly the host's.)
        """
        _, shape, begin, end = self.entries[name]
        out = empty_on_huge_pages(shape, dtype)
        flat = out.reshape(-1)  # a view: filling it fills out
        threads = _reading_threads() if end - begin >= SPLIT_BYTES else 1
        cuts = [flat.size * i // threads for i in range(threads + 1)]
        if threads == 1:
            self._read_span(name, flat, 0, flat.size)
        else:
            with ThreadPoolExecutor(threads) as pool:  # list(): re-raises a thread's error here
                list(pool.map(lambda i: self._read_span(name, flat, cuts[i], cuts[i + 1]), range(threads)))
        return out

    def _read_span(self, name, flat: np.ndarray, first: int, last: int):
        """Fill ``flat[first:last]`` from the file, block by block, converting each block."""
        stored_name, _, begin, end = self.entries[name]
        stored = DTYPES[stored_name]
        block = max(1, READ_BLOCK_BYTES // stored.itemsize)
        as_stored = flat.dtype == stored
        buffer = None if as_stored else np.empty(min(block, last - first), stored)
        # bf16 is the upper half of a float32, so widening it is a 16-bit shift: exact, and a
        # plain integer ufunc that leaves the GIL to the other reading threads
        widen_bf16 = stored_name == "BF16" and flat.dtype == np.float32
        with open(self.path, "rb", buffering=0) as f:
            f.seek(self.data_start + begin + first * stored.itemsize)
            for start in range(first, last, block):
                target = flat[start : min(start + block, last)]
                part = target if as_stored else buffer[: target.size]
                got = f.readinto(memoryview(part.view(np.uint8)))
                if got != part.nbytes:
                    raise MinqwenError(f"{self.path}: tensor '{name}': file ended after "
                                       f"{start * stored.itemsize + got} of {end - begin} bytes")
                if widen_bf16:  # linear.widen_bf16_numpy's shift, written straight into the target
                    np.left_shift(part.view(np.uint16), 16, out=target.view(np.uint32), dtype=np.uint32)
                elif not as_stored:
                    target[...] = part

    def array(self, name) -> np.ndarray:
        """The tensor as stored, a read-only view into the memory map (no copy)."""
        dtype, shape, begin, end = self.entries[name]
        if self._map is None:
            self._map = np.memmap(self.path, dtype=np.uint8, mode="r")
        raw = self._map[self.data_start + begin : self.data_start + end]
        return raw.view(DTYPES[dtype]).reshape(shape)


def empty_on_huge_pages(shape: tuple[int, ...], dtype) -> np.ndarray:
    """np.empty(shape, dtype), in memory that Linux may back with 2 MiB pages wherever it fills them.

    Why: a decode step streams every weight from memory, and the CPU's address translation
    keeps up better with 2 MiB pages than with 4 KiB ones. Linux gives 2 MiB pages only to
    whole aligned 2 MiB stretches of memory that asked for them. NumPy asks for its large
    arrays, but an array that starts mid-stretch keeps up to 2 MiB at each end on small pages
    (a quarter of an 8 MiB matrix): loaded with np.empty, 2.63 of the 0.8B shape's 3.01 GB of
    float32 weights were on large pages, 2.94 from here. The few-row kernel streamed 48
    matrices of 3584 × 1024 at 32.1 GB/s on large pages against 30.5 on small ones (Intel Xeon
    VM, 2 threads).

    So the array starts on a 2 MiB boundary, and only its whole 2 MiB pages ask for large
    pages: a last part that fills no whole page stays on small pages, or a 2 MiB page would be
    spent on it (1 MiB more for each of the bf16-resident 0.8B shape's 72 MLP matrices). The
    memory before the boundary is never touched: address space, not memory. Where the system
    has no such advice (not Linux), this is np.empty.
    """
    dtype = np.dtype(dtype)
    nbytes = math.prod(shape) * dtype.itemsize
    whole_pages = nbytes - nbytes % HUGE_PAGE_BYTES
    if whole_pages == 0 or not hasattr(mmap, "MADV_HUGEPAGE"):
        return np.empty(shape, dtype)
    memory = mmap.mmap(-1, nbytes + HUGE_PAGE_BYTES, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)  # zeroed lazily
    raw = np.frombuffer(memory, np.uint8)  # the array keeps the mapping alive; unmapped with its last view
    skip = -raw.ctypes.data % HUGE_PAGE_BYTES  # bytes to the first 2 MiB boundary (whole small pages)
    memory.madvise(mmap.MADV_HUGEPAGE, skip, whole_pages)
    if whole_pages < len(memory) - skip:  # the rest: small pages even where every mapping is given large ones
        memory.madvise(mmap.MADV_NOHUGEPAGE, skip + whole_pages, len(memory) - skip - whole_pages)
    return raw[skip : skip + nbytes].view(dtype).reshape(shape)


def _reading_threads() -> int:
    """How many threads read a large tensor: as many as minqwen computes with (set_threads)."""
    from .threads import numba_threads

    return numba_threads()


class Checkpoint:
    """Every tensor of a checkpoint folder (single file or shards), by name.

    ``fp8_block``: the ``weight_block_size`` [b0, b1] of an FP8 checkpoint (from its config's
    ``quantization_config``), or None when the config declares no FP8 quantization — then an
    F8_E4M3 tensor is an error, since nothing says how its scales are laid out.
    """

    def __init__(self, folder: str | Path, fp8_block: tuple[int, int] | None = None):
        self.folder = Path(folder)
        self.fp8_block = None if fp8_block is None else (int(fp8_block[0]), int(fp8_block[1]))
        index = self.folder / "model.safetensors.index.json"
        single = self.folder / "model.safetensors"
        self.files: dict[str, SafetensorsFile] = {}
        self.where: dict[str, SafetensorsFile] = {}
        if single.is_file():  # checked first, as transformers does (a stale index may lie beside it)
            f = SafetensorsFile(single)
            self.files[single.name] = f
            self.where = {name: f for name in f.entries}
        elif index.is_file():
            self._open_shards(index)
        else:
            found = sorted(p.name for p in self.folder.glob("*.safetensors"))
            if len(found) == 1:
                f = SafetensorsFile(self.folder / found[0])
                self.files[found[0]] = f
                self.where = {name: f for name in f.entries}
            else:
                raise MinqwenError(
                    f"{self.folder}: no model.safetensors or model.safetensors.index.json in this folder"
                    + (f" (found {len(found)} other .safetensors files)" if found else "")
                )

    def _open_shards(self, index: Path):
        """Every tensor of every shard the index names, as transformers 5.23.0 reads a sharded folder.

        transformers takes from ``weight_map`` only which files to open, then reads *all* of each
        file: a tensor a shard holds but the index leaves out is still part of the model. A
        tensor stored in two shards is an error here: transformers would take the copy in the
        file whose name sorts last, whatever the index says, and the two copies may differ.
        """
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (OSError, ValueError, RecursionError, KeyError, TypeError) as e:
            raise MinqwenError(f"{index}: not a valid shard index (needs a 'weight_map' object): {e}") from None
        if not isinstance(weight_map, dict):
            raise MinqwenError(f"{index}: 'weight_map' must map tensor names to file names")
        for name, file_name in weight_map.items():
            if (not isinstance(file_name, str) or Path(file_name).name != file_name or file_name in ("", ".", "..")
                    or "\0" in file_name):
                raise MinqwenError(f"{index}: tensor '{name}' maps to {file_name!r}, not a file name in this folder")
            if file_name not in self.files:
                self.files[file_name] = SafetensorsFile(self.folder / file_name)
            if name not in self.files[file_name]:
                raise MinqwenError(f"{self.files[file_name].path}: tensor '{name}' is listed in {index.name} but not "
                                   f"in this file")
        for shard in self.files.values():
            for name in shard.entries:
                if name in self.where:
                    raise MinqwenError(
                        f"{self.folder}: tensor '{name}' is stored twice, in {self.where[name].path.name} and "
                        f"{shard.path.name}; a checkpoint holds each tensor once (a shard left over from another "
                        f"download?)"
                    )
                self.where[name] = shard

    @property
    def names(self) -> list[str]:
        return list(self.where)

    def __contains__(self, name):
        return name in self.where

    def file_of(self, name) -> Path:
        return self.where[name].path

    def raw(self, name) -> np.ndarray:
        """The tensor in its stored dtype, memory-mapped."""
        return self.where[name].array(name)

    def float32(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        """The tensor widened to float32, after checking its shape and that it is a float type.

        An FP8 weight comes back dequantized (fp8 value × its block's scale, in float32).
        """
        f = self._checked(name, shape)
        scale = self.fp8_scale_name(name)
        if scale is not None:
            return self._dequantized(name, scale)
        return f.read_as(name, np.float32)

    def bfloat16(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        """The tensor as bf16: as stored if it is bf16 (exact), else rounded to bf16.

        An FP8 weight is dequantized in float32 first, then rounded to bf16.
        """
        f = self._checked(name, shape)
        scale = self.fp8_scale_name(name)
        if scale is not None:
            return self._dequantized(name, scale).astype(DTYPES["BF16"])
        return f.read_as(name, DTYPES["BF16"])

    def mapped(self, name: str, shape: tuple[int, ...]):
        """The tensor left in the file, after the same checks as :meth:`float32`: nothing is read.

        A float tensor comes back as a read-only view of the memory map in its stored dtype;
        an FP8 one as an :class:`FP8Tensor`, which dequantizes only the parts that are indexed.
        """
        self._checked(name, shape)
        scale = self.fp8_scale_name(name)
        if scale is not None:
            return FP8Tensor(self.raw(name), self.raw(scale), self.fp8_block)
        return self.raw(name)

    def fp8_scale_name(self, name: str) -> str | None:
        """The name of the block scales of ``name`` if it is an FP8 weight, else None.

        Checks what dequantizing needs: an FP8 config, the scale tensor, a float dtype for it,
        and one scale per block of the ceiling grid.
        """
        f = self.where[name]
        if f.dtype_name(name) != FP8_DTYPE:
            return None
        where = f"{f.path}: tensor '{name}' is stored as {FP8_DTYPE} (FP8)"
        if self.fp8_block is None:
            raise MinqwenError(
                f"{where} but {self.folder / 'config.json'} declares no FP8 quantization; an FP8 checkpoint's "
                f"config.json has a quantization_config with quant_method 'fp8' and its weight_block_size"
            )
        if len(f.shape(name)) < 2:
            raise MinqwenError(f"{where} but has shape {list(f.shape(name))}; FP8 weights are matrices, "
                               f"scaled in blocks of rows × columns")
        scale = name + "_scale_inv"  # ….weight → ….weight_scale_inv; experts.gate_up_proj → …_scale_inv
        if scale not in self.where:
            raise MinqwenError(
                f"{where} but its block scales '{scale}' are missing from the checkpoint; without them the "
                f"weights would load wrong by a factor per block"
            )
        g = self.where[scale]
        if g.dtype_name(scale) not in FLOAT_DTYPES:
            raise MinqwenError(
                f"{g.path}: tensor '{scale}' (the block scales of '{name}') is stored as {g.dtype_name(scale)}; "
                f"scales must be one of {', '.join(FLOAT_DTYPES)}"
            )
        stored, shape = g.shape(scale), f.shape(name)
        grid = fp8_scale_grid(shape, self.fp8_block)
        if stored != grid:
            raise MinqwenError(
                f"{g.path}: tensor '{scale}' has shape {list(stored)}, but '{name}' {list(shape)} in blocks of "
                f"{list(self.fp8_block)} (weight_block_size) needs {list(grid)}: one scale per block, "
                f"⌈rows / {self.fp8_block[0]}⌉ × ⌈columns / {self.fp8_block[1]}⌉"
            )
        values = g.read(scale)  # one per block: small beside the weight
        bad = values.size - np.count_nonzero(np.isfinite(values))
        if bad:
            raise MinqwenError(f"{g.path}: tensor '{scale}' (the block scales of '{name}') holds {bad} NaN or "
                               f"infinite value(s): every weight of those blocks would be NaN or infinite")
        # Finite as stored, but the float32 product with an FP8 weight (up to ±448) must stay finite too
        largest = float(np.max(np.abs(values.astype(np.float64)))) if values.size else 0.0
        if largest * FP8_E4M3_MAX > float(np.finfo(np.float32).max):
            raise MinqwenError(f"{g.path}: tensor '{scale}' (the block scales of '{name}') holds {largest:.3g}: "
                               f"times an FP8 weight (up to ±{FP8_E4M3_MAX:g}) that passes what float32 holds "
                               f"(3.4e38), and those weights would load as infinite")
        return scale

    def _dequantized(self, name: str, scale: str) -> np.ndarray:
        return dequantize_fp8(self.where[name].read(name), self.where[scale].read(scale), self.fp8_block)

    def _checked(self, name: str, shape: tuple[int, ...]) -> SafetensorsFile:
        if name not in self.where:
            raise MinqwenError(f"{self.folder}: tensor '{name}' is missing from the checkpoint")
        f = self.where[name]
        stored = f.shape(name)
        if stored != tuple(shape):
            raise MinqwenError(
                f"{f.path}: tensor '{name}' has shape {list(stored)} but the config needs {list(shape)}"
            )
        dtype = f.dtype_name(name)
        if dtype not in FLOAT_DTYPES and dtype != FP8_DTYPE:
            raise MinqwenError(
                f"{f.path}: tensor '{name}' is stored as {dtype}; minqwen expects one of {', '.join(FLOAT_DTYPES)} "
                f"(or {FP8_DTYPE} with block scales, in an FP8 checkpoint)"
            )
        return f


# --------------------------------------------------------------------------- FP8 weights


def fp8_scale_grid(shape: tuple[int, ...], block: tuple[int, int]) -> tuple[int, ...]:
    """The shape of an FP8 weight's scales: [..., R, C] in blocks of [b0, b1] → [..., ⌈R/b0⌉, ⌈C/b1⌉]."""
    *lead, rows, cols = shape
    return (*lead, -(-rows // block[0]), -(-cols // block[1]))


def dequantize_fp8(weight: np.ndarray, scale_inv: np.ndarray, block: tuple[int, int]) -> np.ndarray:
    """FP8 weight [..., R, C] × block scales [..., ⌈R/b0⌉, ⌈C/b1⌉] → the weight in float32 [..., R, C].

    Element (r, c) belongs to block (r // b0, c // b1) and is multiplied by that block's scale:
    the ceiling grid, whose bottom row and right column of blocks are cut short when b0 ∤ R or
    b1 ∤ C. The scales may be stored bf16, fp16, fp32 (widened exactly) or fp64 (rounded); the
    product is taken in float32, as the reference takes it.
    """
    rows, cols = weight.shape[-2:]
    scale = scale_inv.astype(np.float32)  # [..., ⌈R/b0⌉, ⌈C/b1⌉]
    # Each scale is repeated over the columns its block covers *in this matrix* (repeating it
    # over a whole b1 first could ask for far more memory than the matrix holds), then applied
    # one row of blocks at a time in place: a scale per element would cost a second float32
    # copy of the matrix while loading, 4 bytes a weight on top of the result's 4.
    column_scales = np.repeat(scale, _block_lengths(cols, block[1]), axis=-1)  # [..., ⌈R/b0⌉, C]
    out = weight.astype(np.float32)  # [..., R, C]
    start = 0
    for i, length in enumerate(_block_lengths(rows, block[0])):
        out[..., start:start + length, :] *= column_scales[..., i:i + 1, :]  # [..., b0, C] × [..., 1, C]
        start += length
    return out


def _block_lengths(size: int, block: int) -> np.ndarray:
    """How many of ``size`` rows (or columns) each block of the ceiling grid covers: ``block``, …, the rest."""
    step = min(block, size)  # a block larger than the matrix covers all of it
    edges = np.minimum(np.arange(-(-size // block) + 1) * step, size)  # where each block starts, then the end
    return np.diff(edges)


class FP8Tensor:
    """An FP8 weight left in the file — [..., R, C] F8_E4M3 and its block scales, both memory-mapped.

    What the MoE experts use instead of a memory-mapped array, so that an FP8 checkpoint's
    experts, too, are read only when a token chooses them. It supports exactly the indexing the
    experts need: ``t[e]`` (expert e of a stack) and ``t[:, a:b]`` (rows a … b−1 of every
    expert: a fused ``gate_up_proj`` holds gate_proj rows, then up_proj rows), both still lazy,
    and :meth:`dequantize`, which reads the rows wanted — whole blocks of them — and nothing else.
    """

    def __init__(self, weight: np.ndarray, scale_inv: np.ndarray, block: tuple[int, int],
                 rows: tuple[int, int] | None = None):
        self.weight = weight  # [..., R, C] float8_e4m3fn, a view of the memory map
        self.scale_inv = scale_inv  # [..., ⌈R/b0⌉, ⌈C/b1⌉]
        self.block = block
        self.rows = rows if rows is not None else (0, weight.shape[-2])  # [start, stop) of each matrix

    @property
    def shape(self) -> tuple[int, ...]:
        return (*self.weight.shape[:-2], self.rows[1] - self.rows[0], self.weight.shape[-1])

    def __len__(self) -> int:
        return self.weight.shape[0]

    def __getitem__(self, index):
        if isinstance(index, (int, np.integer)) and self.weight.ndim > 2:  # t[e]: one matrix of the stack
            return FP8Tensor(self.weight[index], self.scale_inv[index], self.block, self.rows)
        if (isinstance(index, tuple) and len(index) == 2 and index[0] == slice(None)
                and isinstance(index[1], slice) and index[1].step is None and self.weight.ndim == 3):
            start, stop, _ = index[1].indices(self.rows[1] - self.rows[0])  # t[:, a:b]: rows of every matrix
            return FP8Tensor(self.weight, self.scale_inv, self.block, (self.rows[0] + start, self.rows[0] + stop))
        raise MinqwenError(f"an FP8Tensor supports t[e] and t[:, a:b], not t[{index!r}]")

    def dequantize(self) -> np.ndarray:
        """The wanted rows in float32, [..., stop − start, C]: whole blocks are read, then cropped."""
        start, stop = self.rows
        b0 = self.block[0]
        first = start // b0  # the block row holding row `start`
        # Rows from the first needed block's top edge: the scales line up with them block for block.
        weight = self.weight[..., first * b0:stop, :]
        scale = self.scale_inv[..., first:-(-stop // b0), :]
        return dequantize_fp8(weight, scale, self.block)[..., start - first * b0:, :]


# --------------------------------------------------------------------------- finding a checkpoint


def _hub_cache() -> str:
    """The Hugging Face cache folder, found as huggingface_hub finds it (its constants.py)."""
    env = os.environ.get
    home = env("HF_HOME") or os.path.join(env("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"),
                                          "huggingface")
    hub = env("HF_HUB_CACHE") or env("HUGGINGFACE_HUB_CACHE") or os.path.join(home, "hub")
    return os.path.expandvars(os.path.expanduser(hub))  # "~/models" in the variable, as huggingface_hub reads it


EMBEDDED = Path(__file__).resolve().parent / "embedded"


def find_checkpoint(spec: str | Path | None) -> Path:
    """A checkpoint folder from what a user typed: nothing (the embedded model), a folder, or a hub id.

    A hub id (``Qwen/Qwen3.5-0.8B``) is looked up in the local Hugging Face cache only —
    minqwen never downloads anything. The cache is where ``huggingface_hub`` puts it:
    ``$HF_HUB_CACHE``, else ``$HUGGINGFACE_HUB_CACHE`` (its older name), else ``$HF_HOME/hub``,
    else ``$XDG_CACHE_HOME/huggingface/hub``, else ``~/.cache/huggingface/hub``.
    """
    if spec is None:
        return EMBEDDED
    if not isinstance(spec, (str, os.PathLike)) or not str(spec):
        raise MinqwenError(f"a model is a checkpoint folder or a hub id (owner/name), got {spec!r}")
    path = Path(os.path.expanduser(spec))  # (Path.expanduser raises for an unknown ~user)
    if path.is_dir():
        return path
    text = str(spec)
    if text.count("/") == 1 and not path.exists() and not text.startswith((".", "/", "~")):
        hub = _hub_cache()
        repo = Path(hub) / ("models--" + text.replace("/", "--"))
        snapshots = repo / "snapshots"
        ref = repo / "refs" / "main"
        # refs/main names the snapshot (a commit hash) that the hub's "main" pointed to
        commit = ref.read_bytes().decode("ascii", "replace").strip() if ref.is_file() else ""
        if re.fullmatch(r"[0-9a-f]{7,64}", commit) and (snapshots / commit).is_dir():
            return snapshots / commit
        if snapshots.is_dir():  # no usable ref: the snapshot downloaded last
            found = [p for p in snapshots.iterdir() if p.is_dir()]
            if found:
                return max(found, key=lambda p: p.stat().st_mtime)
        raise MinqwenError(
            f"{text}: not in the local Hugging Face cache ({hub}). minqwen does not download; get the files "
            f"with `hf download {text}` (`huggingface-cli download` in older huggingface_hub releases), or "
            f"`git clone` the model repository, and pass the folder"
        )
    what = "a file, not a folder" if path.is_file() else "no such folder"
    raise MinqwenError(f"{spec}: {what} (a checkpoint is a folder with config.json and *.safetensors)")
