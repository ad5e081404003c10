"""The reference side of the tests: torch + transformers, imported the way this machine needs.

torchvision 0.28 is installed with --no-deps next to a CPU torch it was not built for: its import
registers fake kernels for `torchvision::nms` / `qnms`, which fails unless the op schemas exist.
Defining the two schemas first lets transformers' video processor (which needs torchvision) import.
"""
import torch

_lib = None


def _define_torchvision_schemas():
    global _lib
    if _lib is not None:
        return
    try:
        _lib = torch.library.Library("torchvision", "DEF")
        _lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        _lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    except RuntimeError:  # already defined (a real torchvision build, or a second call)
        pass


_define_torchvision_schemas()
import torchvision  # noqa: E402,F401  (must come after the schemas)
import transformers  # noqa: E402,F401

torch.set_num_threads(2)
