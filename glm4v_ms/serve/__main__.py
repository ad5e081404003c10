"""python -m glm4v_ms.serve --model DIR [--host 127.0.0.1] [--port 8000] [--max-num-seqs 4] [--max-model-len N]
[--served-model-name NAME] [--allowed-local-media-path DIR] [--api-key KEY] [--enable-lora]
[--lora-modules NAME=DIR ...] [--max-loras 1] [--max-lora-rank 16]

--lora-modules (vLLM's flag; also its JSON form '{"name": N, "path": DIR, "base_model_name": BASE}'): PEFT LoRA
adapters served beside the base, a request's `model` picking one; rows for different adapters decode in the same
step, at most --max-loras adapters in one step, of rank <= --max-lora-rank (glm4v_ms.multi_lora). A bad adapter is
one line and exit 2 before the port opens. With VLLM_ALLOW_RUNTIME_LORA_UPDATING=True in the environment (vLLM's
switch), POST /v1/load_lora_adapter and /v1/unload_lora_adapter load and unload adapters while serving.

On several cards, one process per card under msrun (a script path: serve.py at the repository root); rank 0 serves
HTTP, the other ranks follow its engine (glm4v_ms.serve.ranks):
  msrun --worker_num=2 --local_worker_num=2 --master_port=8118 --join=True serve.py --model DIR \
        --tensor_parallel_size 2 --port 8000"""
from __future__ import annotations

import os
import sys

from ..multi_lora import MAX_RANKS
from ..faces import MODEL_HELP, MODELS, Parser, add_runtime_args, check_runtime_args, error_line, load_model, \
    resolve_model, setup_process, silence_other_ranks


def parse(argv):
    p = Parser("glm4v_ms.serve", prog="python -m glm4v_ms.serve",
               description=f"OpenAI-compatible server for {MODELS} (MindSpore).")
    p.add_argument("--model", required=True, help=MODEL_HELP)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-num-seqs", type=int, default=4, help="rows decoded together (continuous batching)")
    p.add_argument("--max-model-len", type=int, help="context per row: prompt + reply (default min(model, 8192))")
    p.add_argument("--no-prefix-reuse", action="store_true",
                   help="do not reuse a finished request's cache for a new prompt sharing its prefix (a chat's next turn)")
    p.add_argument("--no-row-groups", action="store_true",
                   help="decode in one cache of --max-num-seqs rows (and a one-row cache for a lone request) instead "
                        "of row groups of 1, 2, 4, ... rows: max_num_seqs + 1 rows of KV cache instead of up to 2x")
    p.add_argument("--no-chunked-prefill", action="store_true",
                   help="prefill a prompt whole while the running requests wait, instead of in pieces (vision blocks, "
                        "256-token chunks) with a decode step of the running requests between two pieces")
    p.add_argument("--no-compile-cache", action="store_true",
                   help="do not keep the row groups' compiled decode graphs in ~/.cache/glm4v_ms/compile "
                        "($GLM4V_MS_COMPILE_CACHE) for the next start")
    p.add_argument("--max-queue", type=int, default=64, help="requests waiting for a row; beyond it: 503")
    p.add_argument("--served-model-name", help="the name clients send as `model` (default: the folder's name)")
    p.add_argument("--allowed-local-media-path", help="local image/video files are allowed only under this folder")
    p.add_argument("--api-key", default=os.environ.get("GLM4V_MS_API_KEY"), help="require 'Authorization: Bearer KEY'")
    p.add_argument("--max-images", type=int, default=8, help="images per request")
    p.add_argument("--lora-modules", nargs="+", metavar="NAME=DIR",
                   help="PEFT LoRA adapters served beside the base, each under its name (a request's `model`); "
                        "vLLM's JSON form '{\"name\": ..., \"path\": ...}' too")
    p.add_argument("--enable-lora", action="store_true",
                   help="serve LoRA adapters (vLLM's switch; implied by --lora-modules)")
    p.add_argument("--max-loras", type=int, default=1,
                   help="adapters in one batch step: the bank's slots (vLLM's default 1); a request for another "
                        "adapter waits for a slot")
    p.add_argument("--max-lora-rank", type=int, default=16, choices=MAX_RANKS, metavar="{" + ",".join(
        map(str, MAX_RANKS)) + "}", help="the largest adapter rank served (vLLM's values and default 16)")
    p.add_argument("--log-level", default="warning")
    add_runtime_args(p, dashed=True, ranks_help="; rank 0 serves HTTP")
    a = p.parse_args(argv)
    check_runtime_args(p, a)
    if a.max_num_seqs < 1 or a.max_queue < 0 or (a.max_model_len is not None and a.max_model_len < 64):
        p.error("--max-num-seqs must be >= 1, --max-queue >= 0, --max-model-len >= 64")
    if a.max_loras < 1:
        p.error(f"--max-loras must be >= 1, got {a.max_loras}")
    if a.allowed_local_media_path and not os.path.isdir(a.allowed_local_media_path):
        p.error(f"--allowed-local-media-path: not a folder: {a.allowed_local_media_path}")
    a.name = a.served_model_name or os.path.basename(os.path.normpath(a.model))
    a.enable_lora = a.enable_lora or bool(a.lora_modules)
    a.runtime_lora = runtime_lora_updating()
    return a


def runtime_lora_updating() -> bool:
    """vLLM's switch for /v1/load_lora_adapter and /v1/unload_lora_adapter (its envs.py reading)."""
    return os.environ.get("VLLM_ALLOW_RUNTIME_LORA_UPDATING", "0").strip().lower() in ("1", "true")


def build(a):
    """The app and its engine (started) for parsed arguments; under msrun, on a rank other than 0: (None, its
    engine, not started: `ranks.follow` drives it)."""
    from glm4v_ms import Glm4vProcessor
    from glm4v_ms.engine import Engine
    from .app import Server, create_app
    from .ranks import LeaderEngine
    from glm4v_ms.multi_lora import check_folders, install, parse_modules
    # the adapters' cheap checks first (names, PEFT folders), whether each fits the base once it has loaded
    adapters = parse_modules(a.lora_modules, a.name)
    check_folders(adapters, a.max_lora_rank)
    folder = resolve_model(a.model)
    processor = Glm4vProcessor.from_pretrained(folder)
    model = load_model(folder, a)
    bank = install(model, adapters, a.max_num_seqs, a.max_loras, a.max_lora_rank) if a.enable_lora else None
    # rank 0 under msrun tells the other ranks what its engine does; theirs only replay it (ranks.follow)
    kind = LeaderEngine if model.layout.world > 1 and model.layout.rank == 0 else Engine
    engine = kind(model, a.max_num_seqs, a.max_model_len, a.max_queue, prefix_reuse=not a.no_prefix_reuse,
                  row_groups=not a.no_row_groups, chunked_prefill=not a.no_chunked_prefill)
    if model.layout.rank != 0:
        return None, engine
    engine.start()
    server = Server(engine, processor, a.name, a.api_key, a.allowed_local_media_path, a.max_images, bank=bank,
                    runtime_lora=a.runtime_lora)
    return create_app(server), engine


def main(argv=None):
    silence_other_ranks()
    a = parse(sys.argv[1:] if argv is None else argv)
    # the compile cache keeps the decode graphs the warm-up compiles (prompt graphs, compiled as traffic comes, not)
    setup_process(a.no_compile_cache)
    try:
        import uvicorn
    except ImportError:
        print("error: the server needs the serving extra: pip install -r requirements-serve.txt", file=sys.stderr)
        return 1
    from glm4v_ms.multi_lora import LoraModulesError
    try:
        app, engine = build(a)
    except LoraModulesError as e:   # an adapter that does not fit this base: refused before the port opens
        print(f"glm4v_ms.serve: error: {e}", file=sys.stderr)
        return 2
    except (ValueError, OSError, RuntimeError) as e:
        print(f"error: {error_line(e)}", file=sys.stderr)
        return 1
    if app is None:   # a rank other than 0: follow rank 0's engine until it stops
        from .ranks import follow
        return follow(engine)
    if a.runtime_lora:   # vLLM's warning, in its words
        print("[glm4v_ms.serve: LoRA dynamic loading & unloading is enabled in the API server. This should ONLY be "
              "used for local development!]", file=sys.stderr)
    names = list(app.state.server.adapters)
    served = f"; adapters {', '.join(names)} beside {a.name}" if names else ""
    print(f"[glm4v_ms.serve: http://{a.host}:{a.port}  {engine.plan()}{served}]", file=sys.stderr)

    class Uvicorn(uvicorn.Server):
        def handle_exit(self, sig, frame):   # SIGINT / SIGTERM: one line, then uvicorn's graceful shutdown
            if not self.should_exit:
                import signal
                print(f"[glm4v_ms.serve: {signal.Signals(sig).name}: stopping]", file=sys.stderr, flush=True)
            super().handle_exit(sig, frame)

        async def shutdown(self, sockets=None):
            await super().shutdown(sockets)
            # here, not after run(): uvicorn raises the caught signal again once run() ends, and the default
            # handler ends the process at once. Under msrun the engine thread's last message stops the other ranks
            engine.stop()
    try:
        Uvicorn(uvicorn.Config(app, host=a.host, port=a.port, log_level=a.log_level)).run()
    finally:
        engine.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
