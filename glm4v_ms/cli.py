"""Console-script entry points (pyproject.toml's [project.scripts]); each runs the module's own `main`.

glm4v-ms-generate runs glm4v_ms/generate_cli.py, as `python generate.py` (a shim) does in a checkout.
"""
import sys


def generate():
    from .generate_cli import main
    sys.exit(main())


def convert():
    from .convert.__main__ import main
    sys.exit(main())


def parity():
    from .parity.__main__ import main
    sys.exit(main())


def finetune():
    from .finetune.__main__ import main
    sys.exit(main())


def serve():
    try:
        from .serve.__main__ import main
    except ImportError as e:   # the serve extra is optional: say so in one line, not a traceback
        if (e.name or "").split(".")[0] in ("fastapi", "starlette", "uvicorn", "pydantic"):
            print(f"error: glm4v-ms-serve needs the serve extra ({e.name} is missing): "
                  "pip install 'glm4v-ms[serve]'", file=sys.stderr)
            sys.exit(1)
        raise
    sys.exit(main())
