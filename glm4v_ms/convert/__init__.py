"""python -m glm4v_ms.convert: a Hugging Face GLM-4.1V checkpoint -> this port's layout, once.

    python -m glm4v_ms.convert --src GLM-4.1V-9B-Thinking --dst glm41v-ms [--dtype bfloat16|float16|float32]
                               [--overwrite] [--verify]

Built on weights.py's table (`plan`): the names, fusions and permutations are the ones the loader applies, so
`from_pretrained` on the output reads our names directly (`converted_table`) and transforms nothing.

How it streams. Source shards are processed in order, one at a time; a table entry is written while its last
source shard is processed (a fused q/k/v split over two shards reads its first part back then). Entries the table
passes through unchanged (embeddings, MLPs: nearly all bytes) are copied file to file inside the kernel
(copy_file_range) when the dtype is kept, else cast in 4 MB pieces; the other entries (fused gate/up and q/k/v,
conv -> dense) are built one at a time in memory (the largest, the vision merger's gate_up, is 224 MB in the 9B
model, 448 MB with its two sources). A background thread reads the source shards again to hash them for the
manifest (SHA-256, ~2 GB/s a core, is the main CPU cost; hashlib releases the GIL), overlapping the copy and the
fsync. The float32 -> bfloat16 cast rounds to nearest even, as torch does.

Atomic: everything goes into `.<dst>.glm4v_ms-tmp-<pid>` beside --dst, fsync'ed, then renamed onto --dst at the
very end (an existing --dst, with --overwrite, is replaced only then). A killed run leaves that temporary folder and
nothing at --dst; the next run for the same --dst removes it. SIGTERM and Ctrl-C remove it at once.
"""
from __future__ import annotations

import hashlib
import json
import os
import resource
import shutil
import sys
import threading
import time
from dataclasses import dataclass

import numpy as np

from .. import __version__, quant
from ..config import Glm4vConfig
from ..safetensors_io import CHUNK, ST_DTYPES, Checkpoint, Range, SafetensorsWriter, WeightError, pread, to_float32
from ..weights import KEEP_DTYPE, Entry, expected_shapes, is_converted, plan

CONVERTER_VERSION = 1
MANIFEST = "glm4v_ms_manifest.json"
DTYPES = {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}
_FLOATS = {"BF16", "F16", "F32"}
_IDENTITY = Entry("", ()).fn          # the table's default transform: bytes pass through unchanged
_COPIED = (".json", ".jinja", ".txt", ".model", ".tiktoken")


# ----------------------------------------------------------------------------------------------- dtypes
def to_bfloat16(f: np.ndarray) -> np.ndarray:
    """float32 -> bf16 bits, rounding to nearest even (as torch does; NaN -> 0x7FC0)."""
    b = np.ascontiguousarray(f, np.float32).view(np.uint32)
    out = ((b + (np.uint32(0x7FFF) + ((b >> np.uint32(16)) & np.uint32(1)))) >> np.uint32(16)).astype(np.uint16)
    out[np.isnan(f)] = 0x7FC0
    return out


def _cast(raw: np.ndarray, src: str, dst: str, name: str) -> np.ndarray:
    if src == dst:
        return np.ascontiguousarray(raw)
    f = to_float32(raw, src)
    if dst == "F32":
        return np.ascontiguousarray(f)
    if dst == "BF16":
        return to_bfloat16(f)
    with np.errstate(over="ignore"):
        out = f.astype(np.float16)
    bad = np.count_nonzero(np.isinf(out) & np.isfinite(f))
    if bad:   # a silently broken model is worse than no model
        raise WeightError(f"tensor {name}: {bad} values exceed the float16 range (use bfloat16 or float32)")
    return out


# ----------------------------------------------------------------------------------------------- the schedule
@dataclass(frozen=True)
class Job:
    """One output tensor: a table entry, its source and output dtypes, its shape."""
    entry: Entry
    src_dtype: str
    dtype: str
    shape: tuple

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * np.dtype(ST_DTYPES[self.dtype]).itemsize


def _check_index(ckpt: Checkpoint) -> None:
    """Checkpoint checks that the index's tensors are in the shards; a tensor in a shard must also be indexed."""
    p = os.path.join(ckpt.folder, "model.safetensors.index.json")
    if os.path.isfile(p):
        with open(p, encoding="utf-8") as f:
            wmap = json.load(f)["weight_map"]
        for k, fn in ckpt.where.items():
            if k not in wmap:
                raise WeightError(f"tensor {k} in {fn} is missing from the index {p}")


def schedule(cfg: Glm4vConfig, ckpt: Checkpoint, dtype: str | None) -> list[list[Job]]:
    """The table's entries grouped by the source shard in which their last source lies, in file order; within a
    shard, in the order their last source appears, so that each shard is read front to back."""
    shapes, files = expected_shapes(cfg), list(ckpt.files)
    rank = {fn: i for i, fn in enumerate(files)}
    groups = [[] for _ in files]
    for e in plan(cfg, ckpt):
        dts = {ckpt.info(s)[0] for s in e.sources}
        if len(dts) != 1:
            raise WeightError(f"tensors {', '.join(e.sources)} mix dtypes {sorted(dts)}")
        src = dts.pop()
        if src not in ST_DTYPES:
            raise WeightError(f"tensor {e.sources[0]} has unsupported dtype {src}")
        out = src if e.ours.endswith(KEEP_DTYPE) else (dtype or src)
        if out != src and src not in _FLOATS:
            raise WeightError(f"tensor {e.sources[0]} has dtype {src}, which cannot be cast to {out}")
        last = max(rank[ckpt.where[s]] for s in e.sources)
        key = max(ckpt.files[files[last]].tensors[s]["data_offsets"][0] for s in e.sources
                  if rank[ckpt.where[s]] == last)
        groups[last].append((key, Job(e, src, out, shapes[e.ours])))
    return [[j for _, j in sorted(g, key=lambda kj: kj[0])] for g in groups]


def _pieces(cfg, ckpt: Checkpoint, fds: dict, job: Job, fast: bool):
    """The output bytes of one job, in order: `Range`s of a source file (fast, dtype kept) or arrays."""
    e = job.entry

    def where(s):
        fn = ckpt.where[s]
        st = ckpt.files[fn]
        a, b = st.tensors[s]["data_offsets"]
        return fds[fn], st.base + a, b - a, st.path

    if e.fn is _IDENTITY and len(e.sources) == 1:   # elementwise at most: stream it in pieces
        fd, off, n, path = where(e.sources[0])
        if fast and job.src_dtype == job.dtype:
            yield Range(fd, off, n, path)
            return
        item = np.dtype(ST_DTYPES[job.src_dtype]).itemsize
        step = CHUNK - CHUNK % item
        for a in range(0, n, step):
            raw = np.frombuffer(pread(fd, min(step, n - a), off + a, path), ST_DTYPES[job.src_dtype])
            yield _cast(raw, job.src_dtype, job.dtype, e.ours)
        return
    arrays = []
    for s in e.sources:
        fd, off, n, path = where(s)
        arrays.append(np.frombuffer(pread(fd, n, off, path), ST_DTYPES[job.src_dtype]).reshape(ckpt.info(s)[1]))
    try:
        arr = e.fn(cfg, *arrays)
    except ValueError as err:
        raise WeightError(f"tensor {e.sources[0]}: cannot map to {e.ours} ({err})") from None
    arrays.clear()   # the sources, unless the transform returned a view of one
    if tuple(arr.shape) != job.shape:
        raise WeightError(f"tensors {', '.join(e.sources)} map to shape {list(arr.shape)} for {e.ours}, the config "
                          f"implies {list(job.shape)}")
    yield _cast(arr, job.src_dtype, job.dtype, e.ours)


def _open_all(ckpt: Checkpoint) -> dict:
    return {fn: os.open(st.path, os.O_RDONLY) for fn, st in ckpt.files.items()}


def _load_source(src: str, dtype: str | None):
    if not os.path.isdir(src):
        raise WeightError(f"{src}: not a folder (give the checkpoint's folder, not one of its files)"
                          if os.path.exists(src) else f"{src}: no such folder")
    cfg = Glm4vConfig.from_pretrained(src)
    ckpt = Checkpoint(src)
    _check_index(ckpt)
    return cfg, ckpt, schedule(cfg, ckpt, dtype)


# ----------------------------------------------------------------------------------------------- progress, hashing
class Progress:
    """One self-overwriting line on stderr (shards, bytes, rate) when stderr is a terminal; silent otherwise."""

    def __init__(self, total: int, shards: int, label: str, stream=sys.stderr):
        self.total, self.shards, self.label, self.stream = total, shards, label, stream
        self.on = stream.isatty()
        self.done, self.shard, self.t0, self.shown = 0, 0, time.time(), 0.0

    def next_shard(self):
        self.shard += 1
        self.draw(force=True)

    def add(self, n: int):
        self.done += n
        self.draw()

    def draw(self, force=False):
        now = time.time()
        if not self.on or (not force and now - self.shown < 0.2):
            return
        self.shown = now
        rate = self.done / max(now - self.t0, 1e-9) / 1e9
        pct = 100 * self.done / max(self.total, 1)
        bar = "#" * int(pct / 5)
        self.stream.write(f"\r{self.label} shard {self.shard}/{self.shards} [{bar:<20}] {pct:3.0f}% "
                          f"{self.done / 1e9:.2f}/{self.total / 1e9:.2f} GB {rate:.2f} GB/s ")
        self.stream.flush()

    def close(self):
        if self.on:
            self.draw(force=True)
            self.stream.write("\n")


class _Hasher:
    """SHA-256 of files, read apart from the conversion by background threads (hashlib drops the GIL). Hashing is
    the converter's main CPU cost (~2 GB/s a core), so it runs beside the copy. One thread by default: it follows
    the copy through the shards, so that a cold source is read from disk about once (more threads: more seeks)."""

    def __init__(self, paths: list, threads: int = 1):
        self.paths, self.digests, self.errors, self.stop = paths, [None] * len(paths), [], False
        self.todo = iter(range(len(paths)))
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._run, daemon=True) for _ in range(threads)]
        for t in self.threads:
            t.start()

    def _run(self):
        buf = bytearray(8 << 20)
        mv = memoryview(buf)
        while not self.stop:
            with self.lock:
                i = next(self.todo, None)
            if i is None:
                return
            try:
                h = hashlib.sha256()
                with open(self.paths[i], "rb", buffering=0) as f:
                    while (k := f.readinto(buf)) and not self.stop:
                        h.update(mv[:k])
                self.digests[i] = h.hexdigest()
            except OSError as e:
                self.errors.append(e)

    def result(self) -> list:
        for t in self.threads:
            t.join()
        if self.errors:
            raise self.errors[0]
        return self.digests


def _file_record(path: str, digest: str | None = None) -> dict:
    digest = digest or _Hasher([path]).result()[0]
    return {"name": os.path.basename(path), "size": os.path.getsize(path), "sha256": digest}


def _aux_files(src: str) -> list[str]:
    """Config, tokenizer, template, processor and generation files: everything beside the weights."""
    out = []
    for fn in sorted(os.listdir(src)):
        p = os.path.join(src, fn)
        if not os.path.isfile(p) or fn == MANIFEST or fn.endswith(".index.json"):
            continue
        if fn.endswith(_COPIED) or fn.upper().startswith(("LICENSE", "NOTICE")):
            out.append(fn)
    return out


# ----------------------------------------------------------------------------------------------- convert, verify
def _tmp_name(dst: str, kind: str, pid: int) -> str:
    return os.path.join(os.path.dirname(dst), f".{os.path.basename(dst)}.glm4v_ms-{kind}-{pid}")


def _remove_stale(dst: str) -> None:
    """Temporary folders of earlier runs for this --dst whose process is gone (killed runs)."""
    parent, prefix = os.path.dirname(dst), f".{os.path.basename(dst)}.glm4v_ms-"
    for fn in os.listdir(parent):
        if not fn.startswith(prefix):
            continue
        try:
            pid = int(fn.rsplit("-", 1)[1])
            os.kill(pid, 0)
            continue                    # still running
        except (ValueError, IndexError, ProcessLookupError):
            pass
        except PermissionError:
            continue
        shutil.rmtree(os.path.join(parent, fn), ignore_errors=True)


def _pause_for_tests(k: int) -> None:
    # Tests kill the converter here to prove that an interrupted run leaves nothing at --dst.
    pause = float(os.environ.get("GLM4V_MS_CONVERT_TEST_PAUSE", 0) or 0)
    if pause:
        print(f"glm4v_ms.convert: paused after shard {k} (test hook)", file=sys.stderr, flush=True)
        time.sleep(pause)


def convert(src: str, dst: str, dtype: str | None = None, overwrite: bool = False, verify: bool = False,
            quantize: str | None = None, group_size: int = 128, keep_float=()) -> dict:
    """Convert src into dst (see the module docstring); dtype is a safetensors name (BF16, F16, F32) or None to
    keep each tensor's. Returns a summary. Raises WeightError / ConfigError / OSError, leaving dst untouched.
    A GPTQ source, or `quantize` ("int4"/"int8"), goes through convert_quantized."""
    src, dst = os.path.abspath(src), os.path.abspath(dst)
    rs, rd = os.path.realpath(src), os.path.realpath(dst)
    if rs == rd or rs.startswith(rd + os.sep):   # --overwrite would delete the source
        raise WeightError(f"{dst}: is or contains the source folder")
    if os.path.lexists(dst) and not overwrite:
        raise WeightError(f"{dst}: already exists (use --overwrite to replace it)")
    if not os.path.isdir(src):
        raise WeightError(f"{src}: not a folder (give the checkpoint's folder, not one of its files)"
                          if os.path.exists(src) else f"{src}: no such folder")
    if quantize or _quantized(src):
        return convert_quantized(src, dst, dtype, overwrite, verify, quantize, group_size, keep_float)
    cfg, ckpt, groups = _load_source(src, dtype)
    jobs = [j for g in groups for j in g]
    total = sum(j.nbytes for j in jobs)
    shown_dtype = {v: k for k, v in DTYPES.items()}.get(dtype, "as the source")
    t0, fds = time.time(), _open_all(ckpt)

    def weights(tmp):
        names, weight_map, records = _write_weights(tmp, cfg, ckpt, groups, fds,
                                                    Progress(total, len(groups), "converting"))
        return names, weight_map, total, records, None

    try:
        names, _, _ = _write_folder(src, dst, weights, "glm4v_ms",
                              {"dtype": shown_dtype, "tensor_dtypes": sorted({j.dtype for j in jobs})},
                              verify and (lambda tmp: verify_folder(src, tmp, dtype, _loaded=(cfg, ckpt, groups, fds))))
    finally:
        for fd in fds.values():
            os.close(fd)
    return {"src": src, "dst": dst, "shards": len(names), "tensors": len(jobs), "bytes": total, "dtype": shown_dtype,
            "seconds": time.time() - t0, "verified": verify, "peak_rss": peak_rss()}


def _write_folder(src: str, dst: str, weights, fmt: str, manifest: dict, check=None) -> list:
    """The tail both pipelines share: a fresh temporary folder beside dst; the weights (`weights(tmp)` -> shard
    names, weight map, bytes, the source files' records, and a config.json to write or None to copy the source's);
    the other small files; the index and the manifest; `check(tmp)` if given; then the atomic publish. Any failure
    removes the temporary folder. Returns the shard names, the tensor count and the bytes."""
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    _remove_stale(dst)
    tmp = _tmp_name(dst, "tmp", os.getpid())
    os.mkdir(tmp)
    try:
        names, weight_map, total, records, config = weights(tmp)
        for fn in _aux_files(src):
            if config is None or fn != "config.json":
                shutil.copyfile(os.path.join(src, fn), os.path.join(tmp, fn))
            records.append(_file_record(os.path.join(src, fn)))
        if config is not None:
            with open(os.path.join(tmp, "config.json"), "w", encoding="utf-8") as f:
                json.dump(config, f, indent=2)
        with open(os.path.join(tmp, "model.safetensors.index.json"), "w", encoding="utf-8") as f:
            json.dump({"metadata": {"total_size": total, "format": fmt}, "weight_map": weight_map}, f, indent=2)
        with open(os.path.join(tmp, MANIFEST), "w", encoding="utf-8") as f:
            json.dump({"converter": "glm4v_ms.convert", "converter_version": CONVERTER_VERSION,
                       "glm4v_ms_version": __version__, "source": src, **manifest, "tensors": len(weight_map),
                       "total_size": total, "source_files": records, "files": names}, f, indent=2)
        if check:
            check(tmp)
        _publish(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return names, len(weight_map), total


def _write_weights(tmp: str, cfg, ckpt: Checkpoint, groups: list, fds: dict, progress: Progress):
    """One output shard per source shard that completes an entry, while a second thread hashes the source shards.
    Returns the shard names, the weight map and the source files' records (name, size, SHA-256)."""
    n = sum(map(bool, groups))
    names, weight_map = [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)], {}
    paths = [st.path for st in ckpt.files.values()]
    hasher, out_names = _Hasher(paths), iter(names)
    try:
        for k, group in enumerate(groups):
            progress.next_shard()
            if group:
                name = next(out_names)
                w = SafetensorsWriter(os.path.join(tmp, name), [(j.entry.ours, j.dtype, j.shape) for j in group],
                                      {"format": "glm4v_ms", "converter_version": str(CONVERTER_VERSION)})
                try:
                    for j in group:
                        w.write(_pieces(cfg, ckpt, fds, j, fast=True), progress)
                        weight_map[j.entry.ours] = name
                except BaseException:
                    w.abort()
                    raise
                w.close()
            _pause_for_tests(k + 1)
        progress.close()
        for name in names:   # durable before visible (see _publish); meanwhile the hashing goes on
            _fsync(os.path.join(tmp, name))
    except BaseException:
        hasher.stop = True
        raise
    records = [_file_record(p, d) for p, d in zip(paths, hasher.result())]
    index = os.path.join(ckpt.folder, "model.safetensors.index.json")
    if os.path.isfile(index):
        records.append(_file_record(index))
    return names, weight_map, records


def peak_rss() -> int:
    """This process's peak resident memory in bytes. VmHWM, not ru_maxrss: the latter keeps the parent's size
    across fork + exec."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _publish(tmp: str, dst: str) -> None:
    # durable before visible: a crash after the rename must not leave dst with files still in the page cache only
    for fn in [*os.listdir(tmp), "."]:
        _fsync(os.path.join(tmp, fn))
    old = None
    if os.path.lexists(dst):   # --overwrite: the old folder goes only now that the new one is complete
        old = _tmp_name(dst, "old", os.getpid())
        os.rename(dst, old)
    os.rename(tmp, dst)
    if old:
        shutil.rmtree(old) if os.path.isdir(old) and not os.path.islink(old) else os.remove(old)


def verify_folder(src: str, out: str, dtype: str | None = None, _loaded=None) -> int:
    """Check every tensor of a converted folder against the source: the same names, dtypes and shapes, and the same
    bytes as the table's transform of the source tensors followed by the dtype cast. Returns the tensor count."""
    cfg, ckpt, groups, fds = _loaded or (*_load_source(src, dtype), None)
    own = fds is None
    fds = fds or _open_all(ckpt)
    got = Checkpoint(out)
    try:
        jobs = [j for g in groups for j in g]
        want = {j.entry.ours for j in jobs}
        for k in sorted(want ^ set(got.keys())):
            raise WeightError(f"verify: tensor {k} is {'missing from' if k in want else 'unexpected in'} {out}")
        progress = Progress(sum(j.nbytes for j in jobs), len(groups), "verifying")
        out_fds = _open_all(got)
        try:
            for group in groups:
                progress.next_shard()
                for j in group:
                    name = j.entry.ours
                    st = got.files[got.where[name]]
                    if got.info(name) != (j.dtype, j.shape):
                        raise WeightError(f"verify: tensor {name} in {st.path} is {got.info(name)}, "
                                          f"expected {(j.dtype, j.shape)}")
                    off = st.base + st.tensors[name]["data_offsets"][0]
                    for p in _pieces(cfg, ckpt, fds, j, fast=False):
                        mv = memoryview(p).cast("B")
                        if pread(out_fds[got.where[name]], len(mv), off, st.path) != mv:
                            raise WeightError(f"verify: tensor {name} in {st.path} differs from the source "
                                              f"({', '.join(j.entry.sources)})")
                        off += len(mv)
                        progress.add(len(mv))
            progress.close()
        finally:
            for fd in out_fds.values():
                os.close(fd)
    finally:
        if own:
            for fd in fds.values():
                os.close(fd)
    return len(jobs)


# ----------------------------------------------------------------------------------------------- quantized
def convert_quantized(src, dst, dtype=None, overwrite=False, verify=False, quantize=None, group_size=128,
                      keep_float=()) -> dict:
    """Three conversions through quant.py, one entry at a time in memory (no byte-range copies: the tensors are
    rebuilt), into shards of about 2 GB:
    - a GPTQ folder, no dtype: repacked into the kernel's layout (quant.py), config.json listing the modules;
    - a GPTQ folder with dtype: dequantized, a plain float checkpoint in this port's layout;
    - a float folder with quantize int4/int8: the GPTQ on-disk format in GPTQModel's layout (Hugging Face names, the
      MLP split into gate_proj / up_proj), text linears quantized by round-to-nearest unless a keep_float regex
      matches them."""
    t0 = time.time()
    cfg = Glm4vConfig.from_pretrained(src)
    ckpt = Checkpoint(src)
    _check_index(ckpt)
    with open(os.path.join(src, "config.json"), encoding="utf-8") as f:
        config = json.load(f)
    qcfg = quant.read_quantization_config(src)
    modules = None
    if quantize:
        if qcfg is not None:
            raise WeightError(f"{src}: already quantized (quantization_config in config.json); --quantize takes a "
                              f"float checkpoint")
        if is_converted(ckpt):
            raise WeightError(f"{src}: --quantize takes a Hugging Face checkpoint, not a converted folder")
        if verify:
            raise WeightError("--verify checks a conversion that keeps the values; --quantize changes them")
        bits = {"int4": 4, "int8": 8}[quantize]
        plan(cfg, ckpt)    # complete and of the right shapes before anything is written
        items = quant.quantize_items(ckpt, bits, group_size, keep_float)
        config["quantization_config"] = quant.gptq_config(bits, group_size, keep_float)
        fmt, mode = "pt", f"GPTQ {quantize}"
    else:
        if keep_float or group_size != 128:
            raise WeightError("--group-size and --keep-float go with --quantize")
        v = quant.view(ckpt, cfg)
        table = plan(cfg, v)
        if dtype:
            items = ((e.ours, dtype, _cast(e.fn(cfg, *[_one(v, s) for s in e.sources]), _dt(v, e), dtype, e.ours))
                     for e in table)
            config.pop("quantization_config", None)
            mode = {b: a for a, b in DTYPES.items()}[dtype] + " (dequantized)"
        else:
            items, modules = quant.repack_items(v)
            mode = "quantized (repacked)"
        fmt = "glm4v_ms"

    def weights(tmp):
        names, weight_map, total = _write_items(tmp, items, fmt)
        if modules is not None:
            config["quantization_config"] = {"quant_method": quant.OURS, "source_quant_method": "gptq",
                                             "modules": modules}
        return names, weight_map, total, [_file_record(st.path) for st in ckpt.files.values()], config

    names, tensors, total = _write_folder(src, dst, weights, fmt, {"dtype": mode},
                                          verify and (lambda tmp: _verify_dequantized(src, tmp, cfg, dtype)))
    return {"src": src, "dst": dst, "shards": len(names), "tensors": tensors, "bytes": total, "dtype": mode,
            "seconds": time.time() - t0, "verified": verify, "peak_rss": peak_rss()}


def _quantized(src: str) -> bool:
    # whether config.json has a quantization_config at all (quant.py reads and checks it)
    try:
        with open(os.path.join(src, "config.json"), encoding="utf-8") as f:
            return "quantization_config" in json.load(f)
    except (OSError, ValueError):
        return False   # reported by the float path


def _one(v, name):
    return v.read(name)[0]


def _dt(v, e):
    dts = {v.info(s)[0] for s in e.sources}
    if len(dts) != 1:
        raise WeightError(f"tensors {', '.join(e.sources)} mix dtypes {sorted(dts)}")
    return dts.pop()


def _write_items(tmp, items, fmt, limit=2 << 30):
    """(name, safetensors dtype, array) in order -> shards of about `limit` bytes; (names, weight map, bytes)."""
    shards, buf, size, total = [], [], 0, 0

    def flush():
        path = os.path.join(tmp, f"part-{len(shards):05d}")
        w = SafetensorsWriter(path, [(n, d, a.shape) for n, d, a in buf], {"format": fmt})
        try:
            for _, d, a in buf:
                w.write([np.ascontiguousarray(a, ST_DTYPES[d])])
        except BaseException:
            w.abort()
            raise
        w.close()
        shards.append((path, [n for n, _, _ in buf]))

    for name, st, arr in items:
        buf.append((name, st, arr))
        size += arr.nbytes
        total += arr.nbytes
        if size >= limit:
            flush()
            buf, size = [], 0
    if buf or not shards:
        flush()
    names, weight_map = [], {}
    for i, (path, keys) in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        os.rename(path, os.path.join(tmp, name))
        names.append(name)
        weight_map.update({k: name for k in keys})
    return names, weight_map, total


def _verify_dequantized(src, out, cfg, dtype):
    """Every weight of the output, read as the loader reads it (dequantized), equals the source's through the
    table (cast to dtype when one was given)."""
    a, b = quant.view(Checkpoint(src), cfg), quant.view(Checkpoint(out), cfg)
    ours = {e.ours: e for e in plan(cfg, b)}
    for e in plan(cfg, a):
        want = e.fn(cfg, *[_one(a, s) for s in e.sources])
        st = _dt(a, e)
        if dtype:
            want, st = _cast(want, st, dtype, e.ours), dtype
        got = ours[e.ours].fn(cfg, *[_one(b, s) for s in ours[e.ours].sources])
        if not np.array_equal(to_float32(want, st), to_float32(got, _dt(b, ours[e.ours]))):
            raise WeightError(f"verify: tensor {e.ours} in {out} differs from the source ({', '.join(e.sources)})")
