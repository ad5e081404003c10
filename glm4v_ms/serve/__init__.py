"""An OpenAI-compatible server: `python -m glm4v_ms.serve --model DIR` (needs the serving extra:
requirements-serve.txt). One engine thread owns the model (glm4v_ms.engine); FastAPI handlers reach it through
queues only."""
from .app import Server, create_app

__all__ = ["Server", "create_app"]
