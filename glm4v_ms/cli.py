"""Console-script entry points (pyproject.toml's [project.scripts]); each is the module's own `main`.

glm4v-ms-generate runs the top-level generate.py: `glm4v_ms/generate_cli.py` is a symbolic link to it, so that
`python generate.py` in a checkout and the installed command are one file (a wheel stores the link's content).
"""
import sys


def generate():
    from .generate_cli import main
    sys.exit(main())


def convert():
    from .convert import main
    sys.exit(main())


def parity():
    from .parity.__main__ import main
    sys.exit(main())
