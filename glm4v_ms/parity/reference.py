"""Reference side: transformers' Glm4vForConditionalGeneration and processor, on CUDA or CPU. Never MindSpore.

Inputs come from transformers' own processor (AutoProcessor, slow image processor, PyAV video decoding), so the
dump checks the model alone; our processor has its own tests. The model gets everything the processor returns,
mm_token_type_ids included. States are caught with forward hooks on every vision block, the merger, every text
layer and the final norm.
"""
from __future__ import annotations

import os
import platform
import sys
import time

import numpy as np

import torch


def _import_torchvision():
    """A torchvision wheel built for another torch fails to load its compiled ops, then fails at import when it
    registers fake kernels for `nms`/`qnms`. Defining those two schemas lets it import (transformers' video
    processor needs it). Tried only after a failed import, so a real build is left alone."""
    try:
        import torchvision  # noqa: F401
        return
    except ImportError:   # not installed: transformers then does without it (but cannot process videos)
        return
    except RuntimeError as e:
        if "torchvision::" not in str(e):
            raise
    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[name]
    lib = torch.library.Library("torchvision", "DEF")
    lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _import_torchvision.lib = lib   # the schemas live as long as this object
    import torchvision  # noqa: F401,F811


_import_torchvision()
import transformers  # noqa: E402  (after the schemas)

transformers.logging.set_verbosity_error()   # deprecation chatter and progress bars would bury the results
transformers.logging.disable_progress_bar()

from . import ParityError  # noqa: E402
from . import cases as cases_mod  # noqa: E402
from . import dumpfile  # noqa: E402

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def pick_device(device):
    device = (device or "auto").lower()
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ParityError("--device cuda requested but torch sees no CUDA device")
    if device != "cpu" and not device.startswith("cuda"):
        raise ParityError(f"unknown device {device!r} (use cuda, cpu or auto)")
    return device


def check_folder(folder, what="model"):
    if not os.path.isdir(folder):
        raise ParityError(f"{what} folder not found: {folder}")
    if not os.path.isfile(os.path.join(folder, "config.json")):
        raise ParityError(f"{folder} has no config.json (not a transformers checkpoint folder)")


class Reference:
    def __init__(self, folder, device="auto", dtype="float32"):
        check_folder(folder, "reference model")
        if dtype not in TORCH_DTYPES:
            raise ParityError(f"unknown dtype {dtype!r} (use float32, bfloat16 or float16)")
        self.folder, self.device, self.dtype = folder, pick_device(device), dtype
        if self.device == "cpu":
            torch.set_num_threads(os.cpu_count() or 1)
        elif dtype == "float32":
            # CUDA's cuDNN convolutions default to TF32 (10-bit mantissa): the vision tower's patch embedding then
            # differs from true fp32 by ~2.5e-4 relative (measured on an H200), over the fp32 tolerance. An fp32
            # reference must be fp32.
            torch.backends.cudnn.allow_tf32 = False
            torch.backends.cuda.matmul.allow_tf32 = False
        from transformers import AutoModelForImageTextToText, AutoProcessor

        try:
            self.processor = AutoProcessor.from_pretrained(folder, use_fast=False)
        except Exception as e:  # transformers raises many kinds here; all mean "no usable processor files"
            raise ParityError(f"cannot load the reference processor from {folder}: {_first_line(e)}") from None
        try:
            if _gptq_config(folder) is not None:
                self.model = _dequantized_gptq_model(folder, TORCH_DTYPES[dtype])
            else:
                # Glm4vForConditionalGeneration or Glm4vMoeForConditionalGeneration, by model_type
                self.model = AutoModelForImageTextToText.from_pretrained(folder, dtype=TORCH_DTYPES[dtype])
        except ParityError:
            raise
        except Exception as e:
            raise ParityError(f"cannot load the reference model from {folder}: {_first_line(e)}") from None
        self.model.to(self.device).eval()

    def encode(self, case):
        """A chat -> the processor's outputs as NumPy arrays."""
        from PIL import Image
        from transformers.video_utils import load_video

        prompt = self.processor.apply_chat_template(case.messages, add_generation_prompt=True)
        kwargs = {}
        if case.images:
            kwargs["images"] = [Image.open(p).convert("RGB") for p in case.images]
        if case.videos:
            loaded = [load_video(p, backend="pyav") for p in case.videos]   # the default (torchcodec) is optional
            kwargs.update(videos=[f for f, _ in loaded], video_metadata=[m for _, m in loaded], do_sample_frames=True)
        try:
            out = self.processor(text=[prompt], return_tensors="np", **kwargs)
        except Exception as e:
            raise ParityError(f"case {case.name!r}: the reference processor failed: {_first_line(e)}") from None
        return {k: np.asarray(v) for k, v in out.items()}, prompt

    @torch.no_grad()
    def trace(self, inputs):
        """Processor outputs -> {state name: float32 array} in forward order, logits last."""
        kind = "video" if "pixel_values_videos" in inputs else "image"
        if "pixel_values" in inputs and "pixel_values_videos" in inputs:
            raise ParityError("the reference model cannot take an image and a video in one prompt")
        states = {}

        def keep(name):
            def hook(module, args, output):
                if name in states:
                    raise ParityError(f"{name} ran twice in one forward; the harness expects one pass per module")
                x = output[0] if isinstance(output, (tuple, list)) else output
                states[name] = x.detach().float().cpu().numpy()
            return hook

        inner = self.model.model
        modules = [(f"{kind}.visual.blocks.{i}", b) for i, b in enumerate(inner.visual.blocks)]
        modules += [(f"{kind}.visual.merger", inner.visual.merger)]
        modules += [(f"text.layers.{i}", layer) for i, layer in enumerate(inner.language_model.layers)]
        modules += [("text.norm", inner.language_model.norm)]
        handles = [m.register_forward_hook(keep(name)) for name, m in modules]
        try:
            tensors = {k: torch.from_numpy(np.ascontiguousarray(v)).to(self.device) for k, v in inputs.items()}
            logits = self.model(**tensors).logits
        finally:
            for h in handles:
                h.remove()
        states["logits"] = logits.detach().float().cpu().numpy()
        return states

    def meta(self):
        dev = self.device
        if dev.startswith("cuda"):
            dev = f"{dev} ({torch.cuda.get_device_name(torch.device(dev))})"
        return {"side": "reference (transformers)", "model": os.path.abspath(self.folder), "device": dev,
                "dtype": self.dtype, "tf32": bool(self.device.startswith("cuda") and torch.backends.cudnn.allow_tf32),
                "attn_implementation": getattr(self.model.config, "_attn_implementation", None),
                "versions": {"python": platform.python_version(), "torch": torch.__version__,
                             "transformers": transformers.__version__, "numpy": np.__version__,
                             "cuda": torch.version.cuda},
                "host": platform.platform(), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}

    def run(self, case_list, log=None):
        """-> (meta, [{"name", "inputs", "states", "info"}])."""
        results = []
        for case in case_list:
            t0 = time.time()
            inputs, prompt = self.encode(case)
            states = self.trace(inputs)
            if log:
                log(f"reference: {case.name}: {inputs['input_ids'].shape[1]} tokens, {len(states)} states, "
                    f"{time.time() - t0:.1f} s")
            results.append({"name": case.name, "inputs": inputs, "states": states, "info": {"prompt": prompt}})
        return self.meta(), results


def load_cases(cases_file, workdir):
    return cases_mod.load_file(cases_file) if cases_file else cases_mod.builtin(workdir)


def dump(model, out, device="auto", dtype="float32", cases_file=None, log=None):
    """The `dump` command: run the reference on the cases and write the .npz."""
    import tempfile

    ref = Reference(model, device, dtype)
    with tempfile.TemporaryDirectory(prefix="glm4v_parity_") as workdir:
        meta, results = ref.run(load_cases(cases_file, workdir), log)
    dumpfile.save(out, meta, results)
    return meta, results


def _first_line(e):
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}".rstrip(": ")


# ----------------------------------------------------------------------------------------------- GPTQ folders
def _gptq_config(folder):
    import json
    with open(os.path.join(folder, "config.json"), encoding="utf-8") as f:
        q = json.load(f).get("quantization_config")
    if q is not None and str(q.get("quant_method", "")).lower() != "gptq":
        raise ParityError(f"reference: quantization_config.quant_method {q.get('quant_method')!r} is not supported "
                          f"(GPTQ folders only)")
    return q


def _dequantized_gptq_model(folder, dtype):
    """transformers' float Glm4vForConditionalGeneration holding the GPTQ weights dequantized by the documented
    formula, W[o, i] = scales[g, o] * (q[i, o] - z[g, o]) with g = g_idx[i] (z = stored + 1 in the v1 format),
    bits per module from `dynamic` (re.match, first match wins). transformers' own GPTQ path needs optimum and
    gptqmodel, computes in fp16/bf16, and drops `dynamic` (an Int4/Int8 mix does not load)."""
    import re

    from safetensors.torch import load_file
    from transformers import Glm4vConfig, Glm4vForConditionalGeneration

    q = _gptq_config(folder)
    config = Glm4vConfig.from_pretrained(folder)
    config.quantization_config = None
    state = {}
    for fn in sorted(os.listdir(folder)):
        if fn.endswith(".safetensors"):
            state.update(load_file(os.path.join(folder, fn)))
    v1 = q.get("checkpoint_format", q.get("format", "gptq")) == "gptq"

    def bits_of(module):
        for key, over in (q.get("dynamic") or {}).items():
            if re.match(key[2:] if key[:2] in ("-:", "+:") else key, module):
                return over.get("bits", q["bits"])
        return q["bits"]

    for name in [k for k in state if k.endswith(".qweight")]:
        m = name[:-len(".qweight")]
        b = bits_of(m)
        shifts = torch.arange(0, 32, b, dtype=torch.int32)
        w, z = state.pop(name), state.pop(m + ".qzeros")
        qv = ((w[:, None, :] >> shifts[None, :, None]) & ((1 << b) - 1)).reshape(-1, w.shape[1])
        zv = ((z[:, :, None] >> shifts[None, None, :]) & ((1 << b) - 1)).reshape(z.shape[0], -1) + int(v1)
        g = state.pop(m + ".g_idx").long()
        scales = state.pop(m + ".scales").float()
        state[m + ".weight"] = (scales[g] * (qv - zv[g]).float()).T.contiguous()
    model = Glm4vForConditionalGeneration(config)
    fused = {k for k in model.state_dict() if k.endswith("mlp.gate_up_proj.weight")}
    for f in fused:   # GPTQModel's split MLP (gate_proj = the first rows) -> transformers' fused module
        head = f[:-len("gate_up_proj.weight")]
        if head + "gate_proj.weight" in state and f not in state:
            state[f] = torch.cat([state.pop(head + "gate_proj.weight"), state.pop(head + "up_proj.weight")], 0)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise ParityError(f"reference: {folder}: tensor {(missing or unexpected)[0]} is "
                          f"{'missing' if missing else 'unexpected'} (dequantized GPTQ checkpoint)")
    if config.tie_word_embeddings:
        model.tie_weights()
    return model.to(dtype)
