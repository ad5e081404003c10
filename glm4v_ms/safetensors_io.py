"""safetensors files: the reader (memory-mapped, numpy; BF16 as its raw bits), a folder of shards, and the
streaming writer (header first, then each tensor's bytes, copied file to file where they are unchanged).
"""
from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass

import numpy as np

CHUNK = 4 << 20


class WeightError(ValueError):
    """A checkpoint file or tensor is missing, corrupt, unexpected or of the wrong shape."""


# ----------------------------------------------------------------------------------------------- reading
# Our own reader: numpy has no bfloat16, so BF16 tensors are returned as their raw uint16 bits (see to_float32).
ST_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": np.uint16, "I64": np.int64,
             "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}


class SafetensorsFile:
    def __init__(self, path: str):
        self.path = path
        try:
            size = os.path.getsize(path)
            with open(path, "rb") as f:
                head = f.read(8)
                if len(head) < 8:
                    raise WeightError(f"{path}: truncated (no safetensors header)")
                (n,) = struct.unpack("<Q", head)
                if n > size - 8 or n > 100 << 20:
                    raise WeightError(f"{path}: truncated or not a safetensors file (header of {n} bytes)")
                header = json.loads(f.read(n))
        except OSError as e:
            raise WeightError(f"{path}: cannot read ({e.strerror})") from None
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise WeightError(f"{path}: corrupt safetensors header") from None
        self.metadata = header.pop("__metadata__", None) or {}
        self.base = 8 + n
        self.tensors = header
        end = max((v["data_offsets"][1] for v in header.values()), default=0)
        if self.base + end > size:
            raise WeightError(f"{path}: truncated ({size} bytes, the header describes {self.base + end})")
        self._mm = None

    def keys(self):
        return self.tensors.keys()

    def info(self, name):
        t = self.tensors[name]
        return t["dtype"], tuple(t["shape"])

    def read(self, name) -> tuple[np.ndarray, str]:
        """Zero-copy view of one tensor (a memory map) and its safetensors dtype name."""
        t = self.tensors[name]
        dt = ST_DTYPES.get(t["dtype"])
        if dt is None:
            raise WeightError(f"{self.path}: tensor {name} has unsupported dtype {t['dtype']}")
        if self._mm is None:
            self._mm = np.memmap(self.path, dtype=np.uint8, mode="r")
        a, b = t["data_offsets"]
        arr = self._mm[self.base + a:self.base + b].view(dt)
        if arr.size != int(np.prod(t["shape"], dtype=np.int64)):
            raise WeightError(f"{self.path}: tensor {name} has {arr.size} elements for shape {t['shape']}")
        return arr.reshape(t["shape"]), t["dtype"]


def to_float32(arr: np.ndarray, st_dtype: str) -> np.ndarray:
    if st_dtype == "BF16":  # bf16 is the top half of a float32
        return (np.asarray(arr, np.uint16).astype(np.uint32) << 16).view(np.float32)
    return np.asarray(arr, np.float32)


class Checkpoint:
    """The tensors of a folder: sharded (model.safetensors.index.json) or single-file."""

    def __init__(self, folder: str):
        self.folder = folder
        index = os.path.join(folder, "model.safetensors.index.json")
        if os.path.isfile(index):
            try:
                with open(index, encoding="utf-8") as f:
                    wmap = json.load(f)["weight_map"]
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise WeightError(f"{index}: unreadable index ({e})") from None
            files = sorted(set(wmap.values()))
        else:
            files = sorted(f for f in os.listdir(folder) if f.endswith(".safetensors")) if os.path.isdir(folder) else []
            wmap = None
        if not files:
            raise WeightError(f"{folder}: no *.safetensors weights found")
        self.files = {}
        for fn in files:
            p = os.path.join(folder, fn)
            if not os.path.isfile(p):
                raise WeightError(f"{p}: missing (listed in the index)")
            self.files[fn] = SafetensorsFile(p)
        self.where = {}
        for fn, st in self.files.items():
            for k in st.keys():
                self.where[k] = fn
        if wmap is not None:
            for k, fn in wmap.items():
                if self.where.get(k) != fn:
                    raise WeightError(f"tensor {k}: listed in the index under {fn} but not found there")

    def keys(self):
        return self.where.keys()

    def read(self, name):
        return self.files[self.where[name]].read(name)

    def info(self, name):
        return self.files[self.where[name]].info(name)


# ----------------------------------------------------------------------------------------------- writing
def pread(fd: int, n: int, off: int, what: str) -> bytearray:
    buf = bytearray(n)
    mv, got = memoryview(buf), 0
    while got < n:   # one read returns at most ~2 GB on Linux
        k = os.preadv(fd, [mv[got:]], off + got)
        if k <= 0:
            raise WeightError(f"{what}: truncated (read past the end of the file)")
        got += k
    return buf


def _write_all(fd: int, buf) -> None:
    mv = memoryview(buf).cast("B")
    while len(mv):
        mv = mv[os.write(fd, mv):]


_kernel_copy = hasattr(os, "copy_file_range")


def _copy_range(fd_in: int, off: int, fd_out: int, n: int, what: str) -> None:
    """n bytes from fd_in at off to fd_out's position; in the kernel where it can (no user-space buffer)."""
    global _kernel_copy
    while n and _kernel_copy:
        try:
            k = os.copy_file_range(fd_in, fd_out, n, off)
        except OSError:          # another filesystem, old kernel: fall back to read + write
            _kernel_copy = False
            break
        if k <= 0:
            raise WeightError(f"{what}: truncated (read past the end of the file)")
        off, n = off + k, n - k
    while n:
        k = min(n, CHUNK)
        _write_all(fd_out, pread(fd_in, k, off, what))
        off, n = off + k, n - k


@dataclass(frozen=True)
class Range:
    """n bytes of an open file at off, copied file to file by the writer (what: the file, for errors)."""
    fd: int
    off: int
    n: int
    what: str


class SafetensorsWriter:
    """Streaming safetensors writer: the header (names, dtypes, shapes, offsets) first, then the tensors' bytes in
    that order, so that no tensor is held longer than it takes to write it."""

    def __init__(self, path: str, specs: list, metadata: dict | None = None):
        self.path, self.specs, self.at = path, specs, 0
        header, end = {"__metadata__": metadata or {}}, 0
        for name, dtype, shape in specs:
            n = int(np.prod(shape, dtype=np.int64)) * np.dtype(ST_DTYPES[dtype]).itemsize
            header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [end, end + n]}
            end += n
        self.ends = [header[name]["data_offsets"][1] for name, _, _ in specs]
        h = json.dumps(header, separators=(",", ":")).encode()
        h += b" " * (-len(h) % 8)   # the format pads the header to 8 bytes so that tensors stay aligned
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        _write_all(self.fd, struct.pack("<Q", len(h)) + h)
        self.pos = 0

    def write(self, pieces, progress=None) -> None:
        """The next tensor, as an iterable of buffers and `Range`s (bytes still in a source file)."""
        for p in pieces:
            if isinstance(p, Range):
                for off in range(0, p.n, 1 << 30):   # big steps: much faster than 256 MB ones here
                    k = min(1 << 30, p.n - off)
                    _copy_range(p.fd, p.off + off, self.fd, k, p.what)
                    self.pos += k
                    progress and progress.add(k)
            else:
                mv = memoryview(p).cast("B")
                _write_all(self.fd, mv)
                self.pos += len(mv)
                progress and progress.add(len(mv))
        name = self.specs[self.at][0]
        if self.pos != self.ends[self.at]:
            raise WeightError(f"{self.path}: wrote {self.pos} bytes up to {name}, expected {self.ends[self.at]}")
        self.at += 1

    def close(self) -> None:
        if self.at != len(self.specs):
            self.abort()
            raise WeightError(f"{self.path}: closed after {self.at} of {len(self.specs)} tensors")
        self.abort()   # fsync'ed later, all at once, while the source is still being hashed

    def abort(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
