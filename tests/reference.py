"""The reference side of the tests: torch + transformers, imported the way this machine needs.

torchvision 0.28 is installed with --no-deps next to a CPU torch it was not built for; the parity harness's
reference module already knows how to import it there (op schemas defined only when the real import fails),
so the tests import through it rather than repeat the trick.
"""
import glm4v_ms.parity.reference  # noqa: F401  (torchvision, then transformers)
import torch
import transformers  # noqa: F401

torch.set_num_threads(2)
