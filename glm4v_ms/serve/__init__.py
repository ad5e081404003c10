"""An OpenAI-compatible server: `python -m glm4v_ms.serve --model DIR` (needs the serving extra:
requirements-serve.txt). One engine thread owns the model (glm4v_ms.engine); FastAPI handlers reach it through
queues only.

Server and create_app load on first use: `python -m glm4v_ms.serve` imports this package before its __main__
runs, and importing the app there would import fastapi and MindSpore before main() has set MindSpore's log level,
checked that the serving extra is installed, or silenced the ranks other than 0."""

__all__ = ["Server", "create_app"]


def __getattr__(name):
    if name in __all__:
        from . import app
        return getattr(app, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
