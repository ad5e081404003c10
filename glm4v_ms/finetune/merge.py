"""Merge a PEFT LoRA adapter into its base checkpoint: `python -m glm4v_ms.convert --src BASE --adapter DIR
--dst OUT [--layout hf]`.

`hf`: a Hugging Face checkpoint (same shards, names, dtypes and auxiliary files as BASE) with each targeted
weight W replaced by W + (B @ A) * scaling, as PEFT's merge_and_unload computes it (the delta in float32, rounded
to W's dtype, then added in that dtype); transformers and vLLM load it as the base. Default (the port's layout):
that checkpoint, then the converter (glm4v_ms.convert) over it, so the merged weights go through the one weight
table like any checkpoint. Written into a temporary folder next to OUT and renamed at the end: nothing
half-written.
"""
from __future__ import annotations

import json
import os
import shutil

import numpy as np

from ..config import Glm4vConfig
from ..safetensors_io import Checkpoint, WeightError, to_float32
from . import adapter as A


def _round(f: np.ndarray, dtype: str) -> np.ndarray:
    """float32 -> the safetensors dtype's values (still float32): what a tensor of that dtype holds."""
    from ..convert import _cast
    return to_float32(_cast(f, "F32", dtype, "merge"), dtype)


def merged(ckpt: Checkpoint, name: str, deltas: dict):
    """The tensor `name` of the base with its delta added, as (array in the source dtype, dtype)."""
    raw, dt = ckpt.read(name)
    mod = name[:-len(".weight")] if name.endswith(".weight") else None
    if mod not in deltas:
        return raw, dt
    from ..convert import _cast
    d = deltas[mod]
    if tuple(d.shape) != tuple(raw.shape):
        raise WeightError(f"adapter delta for {mod} has shape {list(d.shape)}, the base weight {list(raw.shape)}")
    w = to_float32(raw, dt)
    out = w + d if dt == "F32" else w + _round(d, dt)
    return _cast(np.asarray(out, np.float32), "F32", dt, name), dt


def merge_hf(src: str, adapter_dir: str, dst: str) -> dict:
    """Write the merged Hugging Face checkpoint into the (new) folder dst. Returns {tensors, merged}."""
    from ..convert import SafetensorsWriter, _aux_files
    Glm4vConfig.from_pretrained(src)   # a GLM-4.1V / GLM-4.5V folder, or the one-line error
    ckpt = Checkpoint(src)
    from ..weights import is_converted
    if is_converted(ckpt):
        raise WeightError(f"{src}: a glm4v_ms.convert output; merge into the Hugging Face checkpoint it came from")
    deltas = A.delta(adapter_dir)
    known = set(ckpt.keys())
    for mod in deltas:
        if mod + ".weight" not in known:
            raise A.AdapterError(f"{adapter_dir}: the adapter's module {mod} has no weight {mod}.weight in {src}")
    os.makedirs(dst)
    for fn, st in ckpt.files.items():
        names = list(st.keys())
        specs = [(n, st.info(n)[0], st.info(n)[1]) for n in names]
        w = SafetensorsWriter(os.path.join(dst, fn), specs, {"format": "pt"})
        try:
            for n in names:
                arr, _ = merged(ckpt, n, deltas)
                w.write([np.ascontiguousarray(arr)])
        except BaseException:
            w.abort()
            raise
        w.close()
    for fn in _aux_files(src):
        shutil.copyfile(os.path.join(src, fn), os.path.join(dst, fn))
    index = os.path.join(src, "model.safetensors.index.json")
    if os.path.isfile(index):
        shutil.copyfile(index, os.path.join(dst, "model.safetensors.index.json"))
    return {"tensors": len(known), "merged": len(deltas)}


def merge(src: str, adapter_dir: str, dst: str, layout: str = "ours", dtype: str | None = None,
          overwrite: bool = False) -> dict:
    src, dst = os.path.abspath(src), os.path.abspath(dst)
    if os.path.lexists(dst) and not overwrite:
        raise WeightError(f"{dst}: already exists (use --overwrite to replace it)")
    if not os.path.isdir(src):
        raise WeightError(f"{src}: no such folder")
    A.read_config(adapter_dir)   # a bad adapter fails before anything is written
    if layout == "hf" and dtype:
        raise WeightError("--dtype with --layout hf: the merged checkpoint keeps the base's dtypes")
    parent = os.path.dirname(dst)
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{os.path.basename(dst)}.merge-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        hf = tmp if layout == "hf" else tmp + ".hf"
        info = merge_hf(src, adapter_dir, hf)
        if layout != "hf":
            from ..convert import convert
            convert(hf, tmp, dtype)
            shutil.rmtree(hf)
        with open(os.path.join(tmp, "adapter_merged.json"), "w", encoding="utf-8") as f:
            json.dump({"base": src, "adapter": os.path.abspath(adapter_dir), "layout": layout, **info}, f, indent=2)
        if os.path.lexists(dst):
            shutil.rmtree(dst)
        os.rename(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(tmp + ".hf", ignore_errors=True)
        raise
    return {"dst": dst, "layout": layout, **info}

