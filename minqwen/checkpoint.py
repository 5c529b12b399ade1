"""safetensors files → named NumPy arrays, memory-mapped, every header field checked.

A safetensors file is simple enough to read by hand, and reading it by hand is what lets
minqwen memory-map tensors (nothing is copied until a layer asks for it), read bf16 and
float8 through ``ml_dtypes``, and say exactly which file and which tensor is wrong when a
download was truncated or a header is damaged:

    [8 bytes: N, little-endian u64] [N bytes: JSON header] [data ...]

The header maps each tensor name to ``{"dtype", "shape", "data_offsets": [begin, end]}``,
offsets relative to the first byte after the header. An optional ``__metadata__`` entry holds
string → string pairs.

A checkpoint folder holds either ``model.safetensors`` or shards listed by
``model.safetensors.index.json`` (``{"weight_map": {tensor name: file name}}``).
"""

from __future__ import annotations

import json
import math
import struct
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

# A header larger than this is not a safetensors header but a damaged length field.
MAX_HEADER_BYTES = 100 * 1024 * 1024


class SafetensorsFile:
    """One safetensors file: its validated header and a read-only memory map of its data."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            size = self.path.stat().st_size
            f = open(self.path, "rb")  # a folder or an unreadable file fails here, not below
        except OSError as e:
            raise MinqwenError(f"{self.path}: cannot open safetensors file ({e.strerror})") from None
        with f:
            if size < 8:
                raise MinqwenError(
                    f"{self.path}: file is {size} bytes, too short to be a safetensors file (truncated?)"
                )
            (header_len,) = struct.unpack("<Q", f.read(8))
            if header_len > min(size - 8, MAX_HEADER_BYTES):
                raise MinqwenError(
                    f"{self.path}: bad header: its length field says {header_len} bytes but the file has "
                    f"{size - 8} after it (truncated or not a safetensors file)"
                )
            header_bytes = f.read(header_len)
        try:
            header = json.loads(header_bytes.decode("utf-8"))
        except (ValueError, RecursionError) as e:  # bad UTF-8 or JSON, a huge int literal, deep nesting
            raise MinqwenError(f"{self.path}: bad header: not valid UTF-8 JSON ({e})") from None
        if not isinstance(header, dict):
            raise MinqwenError(f"{self.path}: bad header: expected a JSON object")

        self.data_start = 8 + header_len
        self.data_len = size - self.data_start
        self.metadata = header.pop("__metadata__", None) or {}
        if not isinstance(self.metadata, dict):
            raise MinqwenError(f"{self.path}: bad header: __metadata__ must be an object")
        self.entries: dict[str, tuple[str, tuple[int, ...], int, int]] = {}
        for name, entry in header.items():
            self.entries[name] = self._validate_entry(name, entry)
        self._check_no_overlap()
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

    def _check_no_overlap(self):
        spans = sorted((b, e, n) for n, (_, _, b, e) in self.entries.items() if e > b)
        for (_, end_a, name_a), (begin_b, _, name_b) in zip(spans, spans[1:]):
            if begin_b < end_a:
                raise MinqwenError(f"{self.path}: bad header: tensors '{name_a}' and '{name_b}' overlap")

    def __contains__(self, name):
        return name in self.entries

    def dtype_name(self, name) -> str:
        return self.entries[name][0]

    def shape(self, name) -> tuple[int, ...]:
        return self.entries[name][1]

    def read(self, name) -> np.ndarray:
        """The tensor as stored, copied into memory with a plain file read.

        Loading reads rather than maps, so that the file's pages never count in the process's
        resident memory: once a weight is converted, only the converted copy stays.
        """
        dtype, shape, begin, end = self.entries[name]
        out = np.empty(shape, DTYPES[dtype])
        with open(self.path, "rb") as f:
            f.seek(self.data_start + begin)
            got = f.readinto(memoryview(out.reshape(-1).view(np.uint8)))
        if got != end - begin:
            raise MinqwenError(f"{self.path}: tensor '{name}': file ended after {got} of {end - begin} bytes")
        return out

    def array(self, name) -> np.ndarray:
        """The tensor as stored, a read-only view into the memory map (no copy)."""
        dtype, shape, begin, end = self.entries[name]
        if self._map is None:
            self._map = np.memmap(self.path, dtype=np.uint8, mode="r")
        raw = self._map[self.data_start + begin : self.data_start + end]
        return raw.view(DTYPES[dtype]).reshape(shape)


class Checkpoint:
    """Every tensor of a checkpoint folder (single file or shards), by name."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        index = self.folder / "model.safetensors.index.json"
        single = self.folder / "model.safetensors"
        self.files: dict[str, SafetensorsFile] = {}
        self.where: dict[str, SafetensorsFile] = {}
        if index.is_file():
            self._open_shards(index)
        elif single.is_file():
            f = SafetensorsFile(single)
            self.files[single.name] = f
            self.where = {name: f for name in f.entries}
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
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (OSError, ValueError, RecursionError, KeyError, TypeError) as e:
            raise MinqwenError(f"{index}: not a valid shard index (needs a 'weight_map' object): {e}") from None
        if not isinstance(weight_map, dict):
            raise MinqwenError(f"{index}: 'weight_map' must map tensor names to file names")
        for name, file_name in weight_map.items():
            if not isinstance(file_name, str) or Path(file_name).name != file_name:
                raise MinqwenError(f"{index}: tensor '{name}' maps to {file_name!r}, not a file name in this folder")
            if file_name not in self.files:
                self.files[file_name] = SafetensorsFile(self.folder / file_name)
            shard = self.files[file_name]
            if name not in shard:
                raise MinqwenError(f"{shard.path}: tensor '{name}' is listed in {index.name} but not in this file")
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
        """The tensor widened to float32, after checking its shape and that it is a float type."""
        f = self._checked(name, shape)
        return f.read(name).astype(np.float32, copy=False)

    def bfloat16(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        """The tensor as bf16: as stored if it is bf16 (exact), else rounded to bf16."""
        f = self._checked(name, shape)
        return f.read(name).astype(DTYPES["BF16"], copy=False)

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
        if dtype not in FLOAT_DTYPES:
            raise MinqwenError(
                f"{f.path}: tensor '{name}' is stored as {dtype}; minqwen expects one of {', '.join(FLOAT_DTYPES)}"
            )
        return f


# --------------------------------------------------------------------------- finding a checkpoint

EMBEDDED = Path(__file__).resolve().parent / "embedded"


def find_checkpoint(spec: str | Path | None) -> Path:
    """A checkpoint folder from what a user typed: nothing (the embedded model), a folder, or a hub id.

    A hub id (``Qwen/Qwen3.5-0.8B``) is looked up in the local Hugging Face cache only —
    minqwen never downloads anything. The cache is ``$HF_HUB_CACHE``, else ``$HF_HOME/hub``,
    else ``~/.cache/huggingface/hub``.
    """
    import os

    if spec is None:
        return EMBEDDED
    path = Path(spec).expanduser()
    if path.is_dir():
        return path
    text = str(spec)
    if text.count("/") == 1 and not path.exists() and not text.startswith((".", "/", "~")):
        hub = os.environ.get("HF_HUB_CACHE") or os.path.join(
            os.environ.get("HF_HOME", os.path.join(Path.home(), ".cache", "huggingface")), "hub")
        repo = Path(hub) / ("models--" + text.replace("/", "--"))
        snapshots = repo / "snapshots"
        ref = repo / "refs" / "main"
        if ref.is_file() and (snapshots / ref.read_text().strip()).is_dir():
            return snapshots / ref.read_text().strip()
        if snapshots.is_dir():
            found = sorted(snapshots.iterdir())
            if found:
                return found[-1]
        raise MinqwenError(
            f"{text}: not in the local Hugging Face cache ({hub}). minqwen does not download; get the files "
            f"with `huggingface-cli download {text}` (or `git clone` the model repository) and pass the folder"
        )
    raise MinqwenError(f"{spec}: no such folder (a checkpoint is a folder with config.json and *.safetensors)")
