"""PEFT's LoRA adapter format, both ways: what transformers + PEFT (and vLLM) load, and any PEFT LoRA for these
models read back.

A folder holds adapter_config.json (json indent=2, sort_keys, as PEFT writes it) and adapter_model.safetensors
with keys `base_model.model.<module>.lora_A.weight` (r, in) / `.lora_B.weight` (out, r), <module> in
transformers 5's tree (model.language_model.layers.N.self_attn.q_proj ...). Module names, their widths and row
orders come from the weight table (lora.sites), so the fusions and GLM-4.1V's rotary row permutation are undone
on save and redone on load. Which modules a config targets follows PEFT's rule (tuners/tuners_utils.py,
check_target_module_exists): a list entry matches a name equal to it or ending in "." + it; a string is
re.fullmatch'ed.
"""
from __future__ import annotations

import json
import os
import re
import struct

import numpy as np

from ..safetensors_io import SafetensorsFile, WeightError
from . import lora as L

CONFIG, WEIGHTS, PREFIX = "adapter_config.json", "adapter_model.safetensors", "base_model.model."
PEFT_VERSION = "0.18.1"   # the format written (the version the tests load it with)
# PEFT features that change the maths: refused by name rather than loaded wrong
_UNSUPPORTED = {"use_dora": False, "lora_bias": False, "fan_in_fan_out": False, "layers_to_transform": None,
                "layer_replication": None, "modules_to_save": None, "trainable_token_indices": None,
                "target_parameters": None, "alpha_pattern": {}, "rank_pattern": {}, "use_qalora": False}


class AdapterError(ValueError):
    """An adapter folder that is missing, corrupt, or not a LoRA this model can take."""


def targeted(name: str, target_modules) -> bool:
    if target_modules is None:
        return False
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, name) is not None
    return name in target_modules or any(name.endswith("." + t) for t in target_modules)


def read_config(folder: str) -> dict:
    path = os.path.join(folder, CONFIG)
    try:
        with open(path, encoding="utf-8") as f:
            cfg = json.load(f)
    except FileNotFoundError:
        raise AdapterError(f"{folder}: no {CONFIG} (not a PEFT adapter folder)") from None
    except (OSError, ValueError) as e:
        raise AdapterError(f"{path}: unreadable ({e})") from None
    if not isinstance(cfg, dict) or cfg.get("peft_type") != "LORA":
        raise AdapterError(f"{path}: peft_type {cfg.get('peft_type') if isinstance(cfg, dict) else None!r}; "
                           f"only LORA adapters load here")
    for k, ok in _UNSUPPORTED.items():
        v = cfg.get(k, ok)
        if v not in (ok, None, [], {}) or (ok is False and v):
            raise AdapterError(f"{path}: {k} = {v!r} is not supported (plain LoRA only)")
    if cfg.get("bias", "none") != "none":
        raise AdapterError(f"{path}: bias = {cfg['bias']!r} is not supported (plain LoRA only)")
    try:
        r, alpha = int(cfg["r"]), float(cfg.get("lora_alpha", 8))
    except (KeyError, TypeError, ValueError):
        raise AdapterError(f"{path}: no valid r / lora_alpha") from None
    if r <= 0:
        raise AdapterError(f"{path}: r = {r} must be positive")
    return cfg


def load(model, folder: str, dropout: float | None = None, projector: bool = True) -> list:
    """Inject the adapter's LoRA into `model` (replacing any) and set its weights. Returns the Lora cells."""
    cfg = read_config(folder)
    path = os.path.join(folder, WEIGHTS)
    if not os.path.isfile(path):
        raise AdapterError(f"{folder}: no {WEIGHTS}")
    try:
        st = SafetensorsFile(path)
    except WeightError as e:
        raise AdapterError(str(e)) from None
    tensors = {}
    for key in st.keys():
        m = re.fullmatch(re.escape(PREFIX) + r"(.+)\.(lora_A|lora_B)(?:\.[^.]+)?\.weight", key)
        if m is None:
            raise AdapterError(f"{path}: tensor {key} is not a LoRA weight (expected "
                               f"{PREFIX}<module>.lora_A.weight / .lora_B.weight)")
        tensors.setdefault(m.group(1), {})[m.group(2)] = key
    known = {p.module for s in L.sites(model, projector) for p in s.parts}
    for mod in tensors:
        if mod not in known:
            if L.ROUTED.search(mod):
                raise AdapterError(f"{path}: {mod}: LoRA on GLM-4.5V's routed experts is not supported")
            raise AdapterError(f"{path}: {mod} is not a linear of this model that takes LoRA here "
                               f"(the language model's linears and visual.merger's)")
        if set(tensors[mod]) != {"lora_A", "lora_B"}:
            raise AdapterError(f"{path}: {mod} has {sorted(tensors[mod])} only")
    # PEFT wraps every targeted module; one without tensors keeps B = 0 (no delta), so the file decides
    mods = [m for m in (p.module for s in L.sites(model, projector) for p in s.parts) if m in tensors]
    not_targeted = [m for m in mods if not targeted(m, cfg.get("target_modules"))]
    if not_targeted:
        raise AdapterError(f"{path}: {not_targeted[0]} has weights but target_modules does not name it")
    r, alpha = int(cfg["r"]), float(cfg.get("lora_alpha", 8))
    L.remove(model)
    loras = L.inject(model, mods, r, alpha, cfg.get("lora_dropout", 0.0) if dropout is None else dropout,
                     bool(cfg.get("use_rslora", False)), projector=projector)
    for lo in loras:
        for mod in lo.targets:
            a, da = st.read(tensors[mod]["lora_A"])
            b, db = st.read(tensors[mod]["lora_B"])
            from ..safetensors_io import to_float32
            try:
                lo.set_peft(mod, to_float32(a, da), to_float32(b, db))
            except L.LoraError as e:
                raise AdapterError(f"{path}: {e}") from None
    model.peft_config = dict(cfg)
    return loras


def config_dict(r: int, alpha: float, dropout: float, rslora: bool, modules: list, base: str | None) -> dict:
    """adapter_config.json as PEFT 0.18.1 writes a LoraConfig (its fields at their defaults but these)."""
    return {
        "alora_invocation_tokens": None, "alpha_pattern": {}, "arrow_config": None, "auto_mapping": None,
        "base_model_name_or_path": base, "bias": "none", "corda_config": None, "ensure_weight_tying": False,
        "eva_config": None, "exclude_modules": None, "fan_in_fan_out": False, "inference_mode": True,
        "init_lora_weights": True, "layer_replication": None, "layers_pattern": None, "layers_to_transform": None,
        "loftq_config": {}, "lora_alpha": alpha, "lora_bias": False, "lora_dropout": dropout,
        "megatron_config": None, "megatron_core": "megatron.core", "modules_to_save": None, "peft_type": "LORA",
        "peft_version": PEFT_VERSION, "qalora_group_size": 16, "r": r, "rank_pattern": {}, "revision": None,
        "target_modules": sorted(modules), "target_parameters": None, "task_type": "CAUSAL_LM",
        "trainable_token_indices": None, "use_dora": False, "use_qalora": False, "use_rslora": rslora}


def write_safetensors(path: str, tensors: dict) -> None:
    """float32 tensors, names sorted (as safetensors' own writer orders them)."""
    header, blobs, end = {"__metadata__": {"format": "pt"}}, [], 0
    for name in sorted(tensors):
        a = np.ascontiguousarray(tensors[name], np.float32)
        header[name] = {"dtype": "F32", "shape": list(a.shape), "data_offsets": [end, end + a.nbytes]}
        blobs.append(a)
        end += a.nbytes
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h)
        for a in blobs:
            f.write(a.tobytes())


def peft_tensors(model) -> dict:
    out = {}
    for lo in getattr(model, "loras", []):
        for mod in lo.targets:
            a, b = lo.peft(mod)
            out[f"{PREFIX}{mod}.lora_A.weight"] = a
            out[f"{PREFIX}{mod}.lora_B.weight"] = b
    return out


def save(model, folder: str, config: dict) -> None:
    """Write the model's LoRA into `folder` (created if needed) in PEFT's format."""
    os.makedirs(folder, exist_ok=True)
    write_safetensors(os.path.join(folder, WEIGHTS), peft_tensors(model))
    with open(os.path.join(folder, CONFIG), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2, sort_keys=True)
        f.write("\n")


def delta(folder: str):
    """{module: (B @ A) * scaling} in transformers' layout (float32): what merging adds to each weight."""
    cfg = read_config(folder)
    st = SafetensorsFile(os.path.join(folder, WEIGHTS))
    from ..safetensors_io import to_float32
    r, alpha = int(cfg["r"]), float(cfg.get("lora_alpha", 8))
    s = L.scaling(r, alpha, bool(cfg.get("use_rslora", False)))
    out = {}
    for key in st.keys():
        m = re.fullmatch(re.escape(PREFIX) + r"(.+)\.lora_A(?:\.[^.]+)?\.weight", key)
        if m:
            a = to_float32(*st.read(key))
            b = to_float32(*st.read(key.replace(".lora_A", ".lora_B")))
            out[m.group(1)] = (b @ a) * np.float32(s)   # float32, as PEFT merges on CPU
    return out
