"""A persistent compile cache that is safe: the second run of the same command compiles nothing, and no run ever
loads a graph compiled for other shapes.

MindSpore's own cache (MS_COMPILER_CACHE_ENABLE / MS_COMPILER_CACHE_PATH) stores the i-th graph a process
compiles as compile_cache_i.mindir and loads it back for the i-th compile of a later run, checking only a hash of
the entry script (not the Parameters' shapes, not a package importable from sys.path): a decode graph compiled
for a 256-slot KV cache was loaded for a 512-slot one (a crash in that case; with compatible shapes it could
run silently wrong). Its folder is fixed at the process's first compile; whether to use it is read at each one.

So the folder is keyed on everything that shapes the graphs (this package's sources, MindSpore's version, the
checkpoint's config.json, dtype, kernel mode, device, parallel layout) and on the exact sequence of graph
signatures the run will compile, planned before the first compile (generate(): its prompt graph, then its decode
graph). The cache stays on while the compiles follow that plan and goes off for the rest of the process at the
first one that does not (a chat's next turn, a server's other shapes): those compile as usual, never cached.

A folder is written under a private name (KEY.partial-PID) and renamed to KEY once the planned graphs are all
compiled (or at exit), so a run killed mid-write never leaves a truncated graph where a later run would load it
(MindSpore then logs an ERROR and compiles anyway). A run whose folder holds fewer graphs than it plans works on
a copy the same way. At most KEEP folders are kept, the least recently used go first; a folder of a few graphs
is ~0.1-1 MB (no weights).

GLM4V_MS_COMPILE_CACHE=DIR turns it on (generate.py sets its default folder, ~/.cache/glm4v_ms/compile, unless
--no_compile_cache); unset, nothing is written or read.
"""
from __future__ import annotations

import atexit
import glob
import hashlib
import json
import os
import shutil
import time

ENV = "GLM4V_MS_COMPILE_CACHE"
DEFAULT_DIR = os.path.join(os.path.expanduser("~"), ".cache", "glm4v_ms", "compile")

_plan = None        # the signatures this process was planned to compile, in order (None: not planned)
_done = []          # the signatures compiled so far in this process (through model._run)
_off = False        # the process left its plan (or compiled before planning): no caching from then on
_pending = None     # (private folder, its key's folder): published once the plan's graphs are all compiled
KEEP = 32           # finished folders kept (least recently used evicted)
PARTIAL = ".partial-"


def folder() -> str | None:
    d = os.environ.get(ENV, "").strip()
    return None if d.lower() in ("", "0", "off", "none") else os.path.abspath(os.path.expanduser(d))


def _source_digest() -> str:
    import mindspore as ms
    h = hashlib.sha256(ms.__version__.encode())
    here = os.path.dirname(os.path.abspath(__file__))
    for root, dirs, files in os.walk(here):
        dirs.sort()
        for f in sorted(files):
            if f.endswith(".py"):
                with open(os.path.join(root, f), "rb") as fh:
                    h.update(f.encode() + b"\0" + fh.read())
    return h.hexdigest()


def _entry_digest() -> str:
    """MindSpore's cache also checks a hash of the entry script: a folder is only ever used by one script."""
    import sys
    try:
        with open(sys.argv[0], "rb") as fh:
            return hashlib.sha256(fh.read()).hexdigest()
    except (OSError, IndexError):
        return ""


def _model_key(model) -> dict:
    from . import attention
    lay = model.layout
    return {"config": repr(model.config), "files": getattr(model, "config_digest", None), "dtype": str(model.dtype),
            "mode": attention.mode(), "layout": [lay.rank, lay.world, lay.expert_parallel]}


def plan(model, signatures: list):
    """Before a process's first compile: the graphs it is about to compile, in order. Sets MindSpore's cache
    folder to one keyed on them; does nothing when the cache is off or something was compiled already."""
    global _plan, _off, _pending
    base = folder()
    from . import attention
    # the fused kernels' own small graphs (the vision tower's varlen attention) compile before the prompt's,
    # with shapes that follow the images: only the plain path's graph sequence is known in advance
    if base is None or _plan is not None or _off or attention.mode() != "plain":
        return
    from mindspore.graph.api import ms_compile_cache
    if len(ms_compile_cache) or _done:
        return
    import sys
    if not (sys.argv and os.path.isfile(sys.argv[0])):   # MindSpore's cache reads the entry script (and fails
        import warnings                                   # on `python -c`): a script is needed
        warnings.warn("compile cache off: it needs a script file as the entry point (not python -c or a shell)",
                      stacklevel=2)
        _off = True
        return
    key = json.dumps({"sources": _source_digest(), "entry": _entry_digest(), "model": _model_key(model),
                      "graphs": signatures}, sort_keys=True, default=str)
    name = hashlib.sha256(key.encode()).hexdigest()[:24]
    try:
        path = open_folder(base, name, len(signatures))
    except OSError as e:   # a cache is an optimisation: an unwritable folder costs the compile, not the run
        import warnings
        warnings.warn(f"compile cache off: cannot create {e.filename or base} ({e.strerror})", stacklevel=2)
        _off = True
        return
    os.environ["MS_COMPILER_CACHE_PATH"] = path
    os.environ["MS_COMPILER_CACHE_ENABLE"] = "1"
    _plan = [tuple(s) for s in signatures]
    _pending = (path, os.path.join(base, name)) if path != os.path.join(base, name) else None


def after_call():
    """After a graph call: once every planned graph has been compiled (MindSpore stores each as it compiles it),
    the folder is published at once rather than at exit, which a server stopped by a signal never reaches."""
    global _pending
    if _pending is not None and len(_done) >= len(_plan) and _done[:len(_plan)] == _plan:
        close_folder(*_pending)
        _pending = None


def graphs_in(path: str) -> int:
    """Graphs MindSpore stored in a folder: rank_R/graph_cache/[ROLE]compile_cache_I.mindir (under msrun its
    files carry the process's role, MS_WORKER)."""
    return len(glob.glob(os.path.join(path, "rank_*", "graph_cache", "*compile_cache_*.mindir")))


def open_folder(base: str, name: str, n_graphs: int) -> str:
    """The folder MindSpore should use for the key `name`: the finished one when it holds all n_graphs graphs
    (nothing is written then), else a private copy that close_folder publishes (after_call, or at exit)."""
    final = os.path.join(base, name)
    os.makedirs(base, exist_ok=True)
    if graphs_in(final) >= n_graphs:
        os.utime(final)   # recently used: evicted last
        return final
    work = final + PARTIAL + str(os.getpid())
    shutil.rmtree(work, ignore_errors=True)
    if os.path.isdir(final):
        shutil.copytree(final, work)
        for r, _, fs in os.walk(work):   # MindSpore stores its files read-only; this copy gets more of them
            os.chmod(r, 0o700)
    else:
        os.makedirs(work)
    atexit.register(close_folder, work, final)
    return work


def close_folder(work: str, final: str):
    """Publish `work` as `final` (replacing an older, smaller one), then evict beyond KEEP."""
    try:
        if graphs_in(work) > graphs_in(final):
            old = final + PARTIAL + "old-" + str(os.getpid())
            if os.path.isdir(final):
                os.rename(final, old)
            os.rename(work, final)
            shutil.rmtree(old, ignore_errors=True)
        evict(os.path.dirname(final), KEEP)
    except OSError:
        pass   # another run published the same key meanwhile, or the folder went away: nothing is lost
    finally:
        shutil.rmtree(work, ignore_errors=True)


def evict(base: str, keep: int):
    """Remove all but the `keep` most recently used finished folders, and private folders whose process is gone."""
    done = []
    for name in os.listdir(base):
        p = os.path.join(base, name)
        if PARTIAL in name:
            pid = name.rsplit("-", 1)[-1]
            if pid.isdigit() and not _alive(int(pid)) or time.time() - os.stat(p).st_mtime > 86400:
                shutil.rmtree(p, ignore_errors=True)
        elif os.path.isdir(p):
            done.append((os.stat(p).st_mtime, p))
    for _, p in sorted(done, reverse=True)[keep:]:
        shutil.rmtree(p, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        pass
    return True


def before_compile(signature: tuple):
    """Called before every graph call with its signature: a new one either follows the plan (cached) or ends
    caching for the rest of the process."""
    global _off
    sig = tuple(signature)
    if sig in _done:
        return
    _done.append(sig)
    if _off:
        return
    if _plan is None or len(_done) > len(_plan) or _plan[len(_done) - 1] != sig:
        _off = True
        if os.environ.get("MS_COMPILER_CACHE_ENABLE") == "1":
            os.environ["MS_COMPILER_CACHE_ENABLE"] = "0"


def signature(batch: int, tokens: int, max_len: int, last_only: bool, extent: int) -> tuple:
    """What tells one decoder graph from another (with the model key): its input and cache shapes."""
    return (int(batch), int(tokens), int(max_len), bool(last_only), int(extent))
