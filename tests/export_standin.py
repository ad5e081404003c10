"""A test-only stand-in for glm4v_ms.finetune.export.save_hf (written by another helper; the interface is
save_hf(model, base, dst)) until it lands: the model's current weights under the checkpoint's names (full.to_hf),
float32 bases only, config.json and the other non-weight files copied, written into a temporary folder and
renamed. `install()` registers it only when the real module is missing."""
import importlib
import os
import shutil
import sys
import types

import numpy as np


def save_hf(model, base, dst):
    from safetensors.numpy import save_file

    from glm4v_ms.finetune.full import to_hf
    from glm4v_ms.safetensors_io import WeightError
    if not os.path.isfile(os.path.join(base, "config.json")):
        raise WeightError(f"{base}: no config.json")
    ours = {n: p.asnumpy().astype(np.float32) for n, p in model.parameters_and_names()}
    tensors = to_hf(model.config, ours, fold_experts=False)
    tmp = dst + ".standin-tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, os.path.join(tmp, "model.safetensors"),
              metadata={"format": "pt"})
    for name in os.listdir(base):
        if not name.endswith((".safetensors", ".safetensors.index.json")) and os.path.isfile(os.path.join(base, name)):
            shutil.copy(os.path.join(base, name), os.path.join(tmp, name))
    os.rename(tmp, dst)


def hf_params(model):
    from glm4v_ms.finetune.full import hf_parameters
    return hf_parameters(model.config)


def install():
    try:
        importlib.import_module("glm4v_ms.finetune.export")
        return False
    except ImportError:
        mod = types.ModuleType("glm4v_ms.finetune.export")
        mod.save_hf = save_hf
        mod.hf_params = hf_params
        sys.modules["glm4v_ms.finetune.export"] = mod
        return True
