"""A model's current weights as a Hugging Face checkpoint: what full fine-tuning saves.

    save_hf(model, base, dst)   base: the Hugging Face folder the model was loaded from; dst: a new folder
                                (values: whole tensors by name standing in for parameters the model holds as
                                ZeRO-3 slices, finetune/distributed.Zero3.values)
    hf_params(model)            our parameter name -> the transformers tensor names it holds

The inverse of the one weight table (weights.hf_table), not a second table: each entry's own transform is run on
element numbers (every source element numbered in order), which says, for each element of our parameter, which
source tensor and element it came from; our values are scattered back through that. The transforms are pure
layout operations (reshape, transpose, concatenate, stack, GLM-4.1V's rotary row permutation), so the numbering
is a bijection, checked per entry. Stacked experts are inverted one expert at a time (small index arrays).

dst holds base's shard files, tensor names, shapes and dtypes (our float32 values rounded to nearest even for a
bf16 base, as torch casts), base's model.safetensors.index.json, config.json and every tokenizer / processor /
template / generation file copied byte for byte (convert._aux_files); transformers, our from_pretrained and
`python -m glm4v_ms.convert` take it. Written into a temporary folder beside dst, fsync'ed and renamed at the end
(convert's _publish): nothing half-written.

Refused with one WeightError line, before anything is written: base is not a folder, has no config.json, is a
glm4v_ms.convert output or a GPTQ folder, or describes another model than `model`; the model is one tensor-parallel
rank, holds quantized linears, or carries LoRA deltas (refused by name rather than exporting the base weights
alone: save the adapter with finetune/adapter.py, or merge it with `python -m glm4v_ms.convert --adapter`); dst
exists and is not an empty folder. With tie_word_embeddings, lm_head.weight and the embeddings share one tensor:
they must still be equal (a head stored anyway in base is copied as it is: transformers ties it on load).
"""
from __future__ import annotations

import dataclasses
import os
import shutil

import mindspore as ms
import numpy as np
from mindspore import ops

from ..config import ConfigError, Glm4vConfig
from ..convert import _aux_files, _cast, _publish, _quantized, _remove_stale, _tmp_name
from ..safetensors_io import ST_DTYPES, Checkpoint, SafetensorsWriter, WeightError
from ..weights import Entry, hf_table, is_converted, plan

_IDENTITY = Entry("", ()).fn
INDEX = "model.safetensors.index.json"


def hf_params(model) -> dict[str, list[str]]:
    """Our parameter name -> the transformers tensor names it holds (fused q/k/v -> q/k/v, gate_up -> gate and
    up, stacked experts -> every expert's), from the weight table."""
    return {e.ours: list(e.sources) for e in hf_table(model.config)}


# ----------------------------------------------------------------------------------------------- the inverse
def _scatter(cfg, e: Entry, value: np.ndarray, shapes: list) -> list[np.ndarray]:
    """Our value of entry e -> its sources' values, by the transform run on element numbers."""
    sizes = [int(np.prod(s, dtype=np.int64)) for s in shapes]
    total = sum(sizes)
    starts = np.cumsum([0] + sizes)
    dt = np.int32 if total < 2 ** 31 else np.int64
    idx = e.fn(cfg, *[np.arange(a, a + n, dtype=dt).reshape(s) for a, n, s in zip(starts, sizes, shapes)])
    idx = np.asarray(idx).ravel()
    seen = np.zeros(total, bool)
    seen[idx] = True
    if idx.size != total or not seen.all():
        raise AssertionError(f"{e.ours}: the table's transform is not a permutation of its sources")
    flat = np.empty(total, np.float32)
    flat[idx] = value.ravel()
    return [flat[a:a + n].reshape(s) for a, n, s in zip(starts, sizes, shapes)]


def _sources(cfg, e: Entry, value: np.ndarray) -> list[np.ndarray]:
    shapes = e.source_shapes(cfg)
    if e.fn is _IDENTITY and len(shapes) == 1:
        return [value.reshape(shapes[0])]
    if not e.per_expert:
        return _scatter(cfg, e, value, shapes)
    k = e.per_expert   # one expert at a time: its sources map to value[j:j + 1]
    out = []
    for j in range(len(shapes) // k):
        out += _scatter(cfg, e, value[j:j + 1], shapes[j * k:(j + 1) * k])
    return out


def _value(p) -> np.ndarray:
    return (p if p.dtype == ms.float32 else ops.cast(p, ms.float32)).asnumpy()


# ----------------------------------------------------------------------------------------------- the checks
def _first_difference(a, b, path="config") -> str | None:
    for f in dataclasses.fields(a):
        x, y = getattr(a, f.name), getattr(b, f.name)
        if dataclasses.is_dataclass(x) and dataclasses.is_dataclass(y):
            d = _first_difference(x, y, f"{path}.{f.name}")
            if d:
                return d
        elif x != y:
            return f"{path}.{f.name} {y!r} in base, {x!r} in the model"
    return None


def _check(model, base: str, dst: str, values: dict) -> tuple:
    """Every refusal, before anything is written. Returns (cfg, base Checkpoint, table)."""
    if not os.path.isdir(base):
        raise WeightError(f"{base}: no such folder (give the Hugging Face checkpoint the model was loaded from)")
    if not os.path.isfile(os.path.join(base, "config.json")):
        raise WeightError(f"{base}: no config.json (not a Hugging Face checkpoint folder)")
    rb, rd = os.path.realpath(base), os.path.realpath(dst)
    if rb == rd or rb.startswith(rd + os.sep):
        raise WeightError(f"{dst}: is or contains the base folder")
    if os.path.lexists(dst) and not (os.path.isdir(dst) and not os.path.islink(dst) and not os.listdir(dst)):
        raise WeightError(f"{dst}: already exists and is not an empty folder")
    lay = getattr(model, "layout", None)
    if lay is not None and lay.world > 1:
        raise WeightError(f"the model is rank {lay.rank} of {lay.world} (tensor parallel) and holds slices only: "
                          f"save from a model on one rank")
    if getattr(model, "loras", None):
        raise WeightError(f"the model carries LoRA deltas on {len(model.loras)} linears: save_hf writes full weights "
                          f"only (save the adapter with finetune/adapter.py, or merge it into base with python -m "
                          f"glm4v_ms.convert --adapter)")
    if _quantized(base):
        raise WeightError(f"{base}: a GPTQ checkpoint (quantization_config in config.json); save_hf writes float "
                          f"weights into the float Hugging Face checkpoint they came from")
    try:
        cfg = Glm4vConfig.from_pretrained(base)
    except ConfigError as e:
        raise WeightError(f"{base}: {e}") from None
    ckpt = Checkpoint(base)
    if is_converted(ckpt):
        raise WeightError(f"{base}: a glm4v_ms.convert output; give the Hugging Face checkpoint it came from")
    diff = _first_difference(dataclasses.replace(model.config, torch_dtype=None),
                             dataclasses.replace(cfg, torch_dtype=None))
    if diff:
        raise WeightError(f"{base}: another model's checkpoint ({diff})")
    table = plan(cfg, ckpt)
    params = dict(model.parameters_and_names())
    for e in table:
        p = values.get(e.ours, params.get(e.ours))
        if p is None or tuple(p.shape) != e.shape(cfg) or (
                e.ours not in values and p.dtype not in (ms.float32, ms.float16, ms.bfloat16)):
            raise WeightError(f"{e.ours}: the model holds no float parameter of shape {list(e.shape(cfg))} "
                              f"(quantized linears are not saved here)")
    return cfg, ckpt, table


# ----------------------------------------------------------------------------------------------- writing
class _Tensors:
    """The source tensors of base, from the model's values, one table entry at a time (the siblings of a tensor
    wait in `ready` until their own turn in the shard order)."""

    def __init__(self, model, cfg, ckpt: Checkpoint, table: list, values: dict):
        self.cfg, self.ckpt, self.values = cfg, ckpt, values
        self.params = dict(model.parameters_and_names())
        self.owners = {}
        for e in table:
            for s in e.sources:
                self.owners.setdefault(s, []).append(e)
        self.done, self.ready = set(), {}

    def get(self, name: str) -> np.ndarray:
        if name not in self.owners:   # not a parameter of ours (a tied head stored anyway): base's bytes
            return self.ckpt.read(name)[0]
        for e in self.owners[name]:
            if e.ours in self.done:
                continue
            self.done.add(e.ours)
            v = self.values[e.ours] if e.ours in self.values else _value(self.params[e.ours])
            for s, arr in zip(e.sources, _sources(self.cfg, e, v)):
                raw = _cast(arr, "F32", self.ckpt.info(s)[0], s)
                if s in self.ready and not np.array_equal(self.ready[s], raw):
                    raise WeightError(f"{s}: tied (tie_word_embeddings) but the model's "
                                      f"{', '.join(x.ours for x in self.owners[s])} differ")
                self.ready[s] = raw
        return self.ready.pop(name)


def _write_shards(tmp: str, tensors: _Tensors, ckpt: Checkpoint) -> None:
    for fn, st in ckpt.files.items():
        names = sorted(st.keys(), key=lambda n: st.tensors[n]["data_offsets"][0])
        w = SafetensorsWriter(os.path.join(tmp, fn), [(n, *st.info(n)) for n in names], st.metadata or {"format": "pt"})
        try:
            for n in names:
                arr = tensors.get(n)
                w.write([np.ascontiguousarray(arr, ST_DTYPES[st.info(n)[0]])])
        except BaseException:
            w.abort()
            raise
        w.close()


def save_hf(model, base: str, dst: str, values: dict | None = None) -> None:
    """Write the model's current weights into dst as a Hugging Face checkpoint shaped like base (see the module
    docstring). Raises WeightError (one line) with nothing written."""
    base, dst = os.path.abspath(base), os.path.abspath(dst)
    values = values or {}
    cfg, ckpt, table = _check(model, base, dst, values)
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    _remove_stale(dst)
    tmp = _tmp_name(dst, "tmp", os.getpid())
    os.mkdir(tmp)
    try:
        _write_shards(tmp, _Tensors(model, cfg, ckpt, table, values), ckpt)
        aux = _aux_files(base) + ([INDEX] if os.path.isfile(os.path.join(base, INDEX)) else [])
        for fn in aux:
            shutil.copyfile(os.path.join(base, fn), os.path.join(tmp, fn))
        _publish(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise

