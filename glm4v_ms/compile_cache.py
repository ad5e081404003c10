"""A persistent compile cache that is safe: the second run of the same command compiles nothing, and no run ever
loads a graph compiled for other shapes.

MindSpore's own cache (MS_COMPILER_CACHE_ENABLE / MS_COMPILER_CACHE_PATH) stores the i-th graph a process
compiles as compile_cache_i.mindir and loads it back for the i-th compile of a later run, checking only a hash of
the entry script (not the Parameters' shapes, not a package importable from sys.path): a decode graph compiled
for a 256-slot KV cache was loaded for a 512-slot one (a crash in that case; with compatible shapes it could
run silently wrong). It numbers only the graphs compiled with it on and takes its folder at the first of them;
whether it is on is read at each compile.

So the folder is keyed on everything that shapes the graphs (this package's sources, MindSpore's version, the
checkpoint's config.json, dtype, kernel mode, device, parallel layout) and on the exact sequence of graph
signatures the run will compile, planned before the first of them (generate(): its prompt graph, then its
decode graph). The cache stays on while the compiles follow that plan and goes off for the rest of the process
once it is complete, or at the first compile that does not follow it: later graphs (a chat's next turn, a
server's other shapes, the caller's own) compile as usual, never cached.

A folder is written under a private name (KEY.partial-PID) and renamed to KEY once the planned graphs are all
compiled (or at exit), so a run killed mid-write never leaves a truncated graph where a later run would load it
(MindSpore then logs an ERROR and compiles anyway). A run whose folder holds fewer graphs than it plans works on
a copy the same way. At most KEEP folders are kept, the least recently used go first; a folder of a few graphs
is ~0.1-1 MB (no weights).

MindSpore's cache also hashes the entry script (and what it imports from outside sys.path) and reloads graphs only
while that hash holds; here it hashes this file instead (_own_dependency_files says why), and no graph outside the
plan is ever cached, so a folder serves every entry point: a script, `python -m`, `python -c`, a console script.

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
_start = 0          # len(_done) when the plan was made: graphs compiled before it were not cached
_off = False        # the process left its plan, or completed it: no caching from then on
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


def _own_dependency_files() -> bool:
    """Make MindSpore's cache hash this file, not the entry script; False where this MindSpore has no such hook.

    MindSpore (graph/api.py) takes the entry script's path from sys.argv[0] once, when it is imported, and at each
    cached compile parses that file and what it imports from outside sys.path, storing their hash with the graphs
    (a later run reloads them only while the hash is unchanged). While `python -m pkg.mod` imports its packages,
    sys.argv[0] is the string "-m" (Python puts the module's path there only when its __main__ starts running), and
    under `python -c` it is "-c": MindSpore then opens <cwd>/-m or <cwd>/-c at the first compile, and the run fails.
    Giving it the real entry file (the module's, from __main__.__spec__) would not be enough: its parser resolves a
    top-level relative import (`from . import x`) without a package, an ImportError it does not catch, and there is
    no file at all under `python -c`. Nor is the entry script's hash needed: the folder's key already holds what
    shapes the graphs (this package's sources, the model, the graph plan), and no graph outside the plan is cached
    (after_call), so no user code's graph can be. This file always exists and its bytes are in the key, so
    MindSpore's check passes in every folder. (An empty list would skip the check too, but MindSpore then warns that
    MS_DEV_FORCE_USE_COMPILE_CACHE is set, which it is not.)"""
    try:
        from mindspore.graph import api
    except ImportError:
        return False
    if not callable(getattr(api, "_get_compile_cache_dep_files", None)):
        return False
    here = os.path.abspath(__file__)
    api._get_compile_cache_dep_files = lambda: [here]
    return True


def _model_key(model) -> dict:
    from . import attention
    lay = model.layout
    return {"config": repr(model.config), "files": getattr(model, "config_digest", None), "dtype": str(model.dtype),
            "mode": attention.mode(), "layout": [lay.rank, lay.world, lay.expert_parallel]}


def plan(model, signatures: list):
    """Before a process's first cached compile: the graphs it is about to compile, in order. Sets MindSpore's
    cache folder to one keyed on them; does nothing when the cache is off or a plan was made already.

    Graphs compiled before (a forward before the first generate, as in the README's example) do not matter:
    MindSpore numbers only the graphs it compiles with its cache on, and reads the folder at the first of those
    (checked on 2.10). A planned graph compiled before would not be compiled again, though, and the next
    planned one would take its number: no plan then."""
    global _plan, _off, _pending, _start
    base = folder()
    from . import attention
    # the fused kernels' own small graphs (the vision tower's varlen attention) compile before the prompt's,
    # with shapes that follow the images: only the plain path's graph sequence is known in advance
    if base is None or _plan is not None or _off or attention.mode() != "plain":
        return
    from mindspore.graph.api import ms_compile_cache
    if len(ms_compile_cache) and os.environ.get("MS_COMPILER_CACHE_ENABLE") == "1":
        return   # the caller turned MindSpore's own cache on and compiled through it: its numbers are taken
    if any(tuple(s) in _done for s in signatures):
        return
    if not _own_dependency_files():   # a MindSpore whose cache would read the entry script: never enabled
        import warnings
        warnings.warn("compile cache off: this MindSpore version's cache reads the entry script", stacklevel=2)
        _off = True
        return
    key = json.dumps({"sources": _source_digest(), "model": _model_key(model), "graphs": signatures},
                     sort_keys=True, default=str)
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
    _start = len(_done)
    _pending = (path, os.path.join(base, name)) if path != os.path.join(base, name) else None


def after_call():
    """After a graph call: once every planned graph has been compiled (MindSpore stores each as it compiles it),
    the folder is published at once rather than at exit, which a server stopped by a signal never reaches, and
    caching ends: MindSpore would otherwise store (and a later run load, by its index alone) the next graph this
    process compiles, ours or its caller's, which nothing in the key describes."""
    global _pending, _off
    if _plan is None or _off or len(_done) - _start < len(_plan):
        return
    if _pending is not None:
        close_folder(*_pending)
        _pending = None
    _off = True
    os.environ["MS_COMPILER_CACHE_ENABLE"] = "0"


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
    if _plan is None:   # not planned (yet): MindSpore's cache is not on, this graph is compiled as usual
        return
    n = len(_done) - _start
    if n > len(_plan) or _plan[n - 1] != sig:
        _off = True
        if os.environ.get("MS_COMPILER_CACHE_ENABLE") == "1":
            os.environ["MS_COMPILER_CACHE_ENABLE"] = "0"


def signature(batch: int, tokens: int, max_len: int, last_only: bool, extent: int) -> tuple:
    """What tells one decoder graph from another (with the model key): its input and cache shapes."""
    return (int(batch), int(tokens), int(max_len), bool(last_only), int(extent))
