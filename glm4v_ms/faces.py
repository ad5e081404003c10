"""What the command-line faces share (the CLI, generate_cli.py, and the server, serve/__main__.py): the parser's
conventions, the process setup (other ranks silenced, MindSpore's log, the compile cache), the model's name
resolved to a folder (a folder, a hub id, or a random demo checkpoint) and loaded, and the one-line error.

Nothing here imports MindSpore at import time: the CLI blocks SIGINT before anything starts a thread.
"""
from __future__ import annotations

import argparse
import os
import sys

DEMOS = ("demo-tiny", "demo-150m")
MODELS = "GLM-4.1V-9B-Thinking or GLM-4.5V"
MODEL_HELP = "checkpoint folder (HF or converted), hub id, or a random demo checkpoint: " + " or ".join(DEMOS)


class Parser(argparse.ArgumentParser):
    """An argument error is one line `<name>: error: ...` and exit 2, not usage + error."""

    def __init__(self, name: str, **kw):
        super().__init__(**kw)
        self.name = name

    def error(self, message):
        sys.stderr.write(f"{self.name}: error: {message}\n")
        sys.exit(2)


def true_or_false(v):
    low = v.strip().lower()
    if low in ("true", "1", "yes", "on"):
        return True
    if low in ("false", "0", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {v!r}")


def add_runtime_args(p: Parser, dashed: bool = False, ranks_help: str = ""):
    """--device, --dtype, --tensor_parallel_size and --expert_parallel (`dashed`: with --tensor-parallel-size and
    --expert-parallel as aliases, the server's spelling)."""
    p.add_argument("--device", choices=["auto", "cpu", "ascend"], default=None)
    p.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default=None)
    p.add_argument("--tensor_parallel_size", *(["--tensor-parallel-size"] if dashed else []), type=int, default=1,
                   help="ranks of this msrun launch (default 1)" + ranks_help)
    p.add_argument("--expert_parallel", *(["--expert-parallel"] if dashed else []), action="store_true",
                   help="whole experts per rank instead of split experts")


def check_runtime_args(p: Parser, a):
    if a.tensor_parallel_size < 1:
        p.error(f"--tensor_parallel_size must be >= 1, got {a.tensor_parallel_size}")


def silence_other_ranks():
    """Under msrun rank 0 speaks for all; the others only compute (their exit code still counts)."""
    from .parallel import rank   # no MindSpore import yet
    if rank() != 0:
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, 1)
        os.dup2(null, 2)


def setup_process(no_compile_cache: bool):
    """MindSpore's own log to errors only, the package's warnings (compile cache off, GPTQ layers in float) as one
    line each, and the compile cache on (the next run loads the graphs this one compiles) unless asked not to."""
    os.environ.setdefault("GLOG_v", "3")
    import warnings
    warnings.formatwarning = lambda message, *_, **__: f"note: {message}\n"
    from . import compile_cache
    if no_compile_cache:
        os.environ[compile_cache.ENV] = "off"
    else:
        os.environ.setdefault(compile_cache.ENV, compile_cache.DEFAULT_DIR)


def resolve_model(name: str) -> str:
    """A folder for a model name: a demo (built once, said so on stderr), a local folder, or a hub id (owner/name,
    downloaded with huggingface_hub). ValueError otherwise."""
    if name in DEMOS:
        from . import demo
        folder = demo.cached(name)
        print(f"[{name}: a random checkpoint in {folder}: its weights are random, its output is noise]", file=sys.stderr)
        return folder
    if os.path.isdir(name):
        return name
    if name.count("/") == 1 and not name.startswith(("/", ".", "~")) and not os.path.exists(name):
        try:
            from huggingface_hub import snapshot_download
        except ImportError:
            raise ValueError(f"{name} is not a local folder, and huggingface_hub is not installed to download it") \
                from None
        try:
            return snapshot_download(name)
        except Exception as e:  # network, auth, missing repo: one line whatever the cause
            raise ValueError(f"could not download {name}: {error_line(e)}") from None
    raise ValueError(f"model folder not found: {name}")


def load_model(folder: str, a):
    """The checkpoint with the runtime arguments (add_runtime_args)."""
    from . import AutoModelForImageTextToText
    return AutoModelForImageTextToText.from_pretrained(
        folder, dtype=a.dtype, device=None if a.device in (None, "auto") else a.device,
        tensor_parallel_size=a.tensor_parallel_size, expert_parallel=a.expert_parallel)


def error_line(e: BaseException) -> str:
    """An exception as one line: its message's first line, or its type's name."""
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
