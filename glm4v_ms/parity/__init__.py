"""Parity harness: this port's hidden states and logits against transformers' GLM-4.1V, layer by layer.

Two sides that never meet in one import graph, so that each runs on its own host:
- reference.py (torch + transformers, never MindSpore): encodes the cases with transformers' processor, runs the
  reference model with forward hooks and writes a portable .npz dump (dumpfile.py);
- compare.py (MindSpore, never torch): runs this port on the dump's inputs and compares (report.py).
cases.py, dumpfile.py and report.py are NumPy/Pillow/PyAV only and are shared by both.

CLI: `python -m glm4v_ms.parity dump|compare|run` (see __main__.py).
"""


class ParityError(Exception):
    """A problem with the harness's inputs (folders, dump files, case files): reported in one line."""
