"""GPTQ checkpoints (Int4, Int8 and mixes through `dynamic`): the format, the quantized linear, the repacking.

On-disk format (per quantized nn.Linear `<m>` of in-width K, out-width N, b bits, pf = 32/b values a word):
`<m>.qweight` int32 (K/pf, N), packed along K, low bits first; `<m>.qzeros` int32 (G, N/pf), packed along N;
`<m>.scales` fp16 (G, N); `<m>.g_idx` int32 (K,), the group of each input row (a permutation of i//gs under
act-order). W[o, i] = scales[g, o] * (q[i, o] - z[g, o]) with g = g_idx[i], and z the stored zero + 1 in the v1
format (`checkpoint_format: gptq`; gptq_v2 stores z itself). `dynamic` maps module-name regexes (re.match, first
match wins) to overrides of bits/group_size/desc_act/sym; a `-:` key keeps the module float.
The text MLP comes in two layouts: transformers' fused `mlp.gate_up_proj`, or GPTQModel's, which splits it into
`mlp.gate_proj` and `mlp.up_proj` before quantizing (its rules then name the halves, which may differ); the split
halves read as the fused weight (SplitMLP), so the weight table stays the one for transformers' names.

Where the weights go:
- plain mode (CPU): dequantized at load by that formula into the compute dtype; the float model runs unchanged.
- ascend / emulated mode: kept quantized, run by WeightQuantBatchMatmul: int8 (K, N), or int4 as qint4x2 (K, N/2)
  (two signed nibbles a byte, even column in the low nibble), per-group scale and offset (G, N) with
  dequant(w) = (w + offset) * scale, w = q - 2^(b-1), offset = 2^(b-1) - z. Under act-order the rows are sorted by
  group (each group then holds gs consecutive rows) and the activations gathered by that permutation at run time.
  The text q/k rotary row permutation (weights.py) is a permutation of the N columns: applied exactly.
  q/k/v (and GPTQModel's gate/up halves) share one matmul only when their bits, group size and row order agree;
  otherwise one matmul each.
- This port's converted layout stores exactly those tensors (`<ours>.qweight/.scales/.offsets[/.perm]`), so a
  converted folder loads with no repacking; config.json then says `quant_method: glm4v_ms` and lists each module.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field

import numpy as np

from .safetensors_io import Checkpoint, WeightError, to_float32
from .weights import converted_table, hf_shapes, hf_table, is_converted

SUPPORTED_FORMATS = ("gptq", "gptq_v2")
# the linears GPTQ quantizes (of model.language_model.layers.N); the vision tower and lm_head stay float.
# GLM-4.1V's MLP comes two ways: fused `mlp.gate_up_proj` (transformers' module), or split into `mlp.gate_proj` and
# `mlp.up_proj` (GPTQModel replaces the MLP before quantizing: gate = the fused weight's first intermediate_size rows)
TEXT_LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_up_proj",
                "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
FUSED_MLP, SPLIT_MLP = "mlp.gate_up_proj", ("mlp.gate_proj", "mlp.up_proj")
OURS = "glm4v_ms"          # quant_method of a converted folder


def is_text_linear(module: str) -> bool:
    return ".language_model.layers." in module and module.endswith(TEXT_LINEARS)


def split_names(module: str) -> tuple:
    """`...mlp.gate_up_proj` -> its GPTQModel halves (`...mlp.gate_proj`, `...mlp.up_proj`)."""
    head = module[:-len(FUSED_MLP)]
    return tuple(head + h for h in SPLIT_MLP)


class QuantError(WeightError):
    """A quantized checkpoint this port cannot load, or one that contradicts its own quantization_config."""


# ----------------------------------------------------------------------------------------------- config
@dataclass(frozen=True)
class Spec:
    bits: int
    group_size: int          # -1: one group over the whole input width
    desc_act: bool
    sym: bool


@dataclass
class GPTQConfig:
    base: Spec
    v2: bool
    rules: list = field(default_factory=list)   # (key, keep_float, compiled regex, Spec)

    @classmethod
    def from_dict(cls, q: dict) -> "GPTQConfig":
        if not isinstance(q, dict):
            raise QuantError("quantization_config is not a JSON object")
        method = str(q.get("quant_method", "")).lower()
        if method != "gptq":
            raise QuantError(f"quantization_config.quant_method {q.get('quant_method')!r} is not supported "
                             f"(glm4v_ms loads GPTQ checkpoints only)")
        fmt = q.get("checkpoint_format", q.get("format", "gptq"))
        if fmt not in SUPPORTED_FORMATS:
            raise QuantError(f"quantization_config.checkpoint_format {fmt!r} is not supported (gptq or gptq_v2)")
        if q.get("pack_dtype", "int32") != "int32":
            raise QuantError(f"quantization_config.pack_dtype {q['pack_dtype']!r} is not supported (int32)")
        if q.get("lm_head"):
            raise QuantError("quantization_config.lm_head: a quantized lm_head is not supported")
        base = _spec(q, Spec(4, 128, False, True), "quantization_config")
        rules = []
        dyn = q.get("dynamic") or {}
        if not isinstance(dyn, dict):
            raise QuantError("quantization_config.dynamic is not a JSON object")
        for key, over in dyn.items():
            keep_float = key.startswith("-:")
            pattern = key[2:] if key.startswith(("-:", "+:")) else key
            try:
                rx = re.compile(pattern)
            except re.error as e:
                raise QuantError(f"quantization_config.dynamic[{key!r}]: not a regular expression ({e})") from None
            if not isinstance(over, dict):
                raise QuantError(f"quantization_config.dynamic[{key!r}] is not a JSON object")
            spec = None if keep_float else _spec(over, base, f"quantization_config.dynamic[{key!r}]")
            rules.append((key, keep_float, rx, spec))
        return cls(base, fmt == "gptq_v2", rules)

    def resolve(self, module: str):
        """(Spec or None for float, the deciding dynamic key or None): the first matching rule wins."""
        for key, keep_float, rx, spec in self.rules:
            if rx.match(module):
                return (None if keep_float else spec), key
        return self.base, None


def _spec(d: dict, dflt: Spec, where: str) -> Spec:
    bits = d.get("bits", dflt.bits)
    gs = d.get("group_size", dflt.group_size)
    if not isinstance(bits, int) or bits not in (4, 8):
        raise QuantError(f"{where}.bits = {bits!r} is not supported (4 or 8)")
    if not isinstance(gs, int) or not (gs == -1 or gs > 0):
        raise QuantError(f"{where}.group_size = {gs!r} is not valid (a positive width or -1)")
    return Spec(bits, gs, bool(d.get("desc_act", dflt.desc_act)), bool(d.get("sym", dflt.sym)))


def read_quantization_config(folder: str):
    """config.json's quantization_config: None (a float checkpoint), a GPTQConfig, or our own module list."""
    try:
        with open(os.path.join(folder, "config.json"), encoding="utf-8") as f:
            d = json.load(f)
    except (OSError, ValueError):
        return None   # config.py reports an unreadable config.json
    q = d.get("quantization_config") if isinstance(d, dict) else None
    if q is None:
        return None
    if isinstance(q, dict) and q.get("quant_method") == OURS:
        return q
    return GPTQConfig.from_dict(q)


# ----------------------------------------------------------------------------------------------- bits
def unpack_rows(words: np.ndarray, bits: int) -> np.ndarray:
    """(R, N) int32 -> (R*pf, N) int32 values, low bits first (word r holds rows r*pf .. r*pf+pf-1)."""
    pf, mask = 32 // bits, (1 << bits) - 1
    w = words.view(np.uint32)
    q = np.stack([(w >> np.uint32(bits * j)) & np.uint32(mask) for j in range(pf)], 1)
    return q.reshape(-1, w.shape[1]).astype(np.int32)


def unpack_cols(words: np.ndarray, bits: int) -> np.ndarray:
    """(G, C) int32 -> (G, C*pf) values, low bits first along the columns."""
    pf, mask = 32 // bits, (1 << bits) - 1
    w = words.view(np.uint32)
    q = np.stack([(w >> np.uint32(bits * j)) & np.uint32(mask) for j in range(pf)], 2)
    return q.reshape(w.shape[0], -1).astype(np.int32)


def pack_rows(q: np.ndarray, bits: int) -> np.ndarray:
    pf = 32 // bits
    u = (q.astype(np.uint32) & np.uint32((1 << bits) - 1)).reshape(q.shape[0] // pf, pf, q.shape[1])
    out = np.zeros((u.shape[0], u.shape[2]), np.uint32)
    for j in range(pf):
        out |= u[:, j] << np.uint32(bits * j)
    return out.view(np.int32)


def pack_cols(z: np.ndarray, bits: int) -> np.ndarray:
    pf = 32 // bits
    u = (z.astype(np.uint32) & np.uint32((1 << bits) - 1)).reshape(z.shape[0], z.shape[1] // pf, pf)
    out = np.zeros(u.shape[:2], np.uint32)
    for j in range(pf):
        out |= u[:, :, j] << np.uint32(bits * j)
    return out.view(np.int32)


def pack_int4(w: np.ndarray) -> np.ndarray:
    """Signed int4 values (K, N), N even -> (K, N/2) int8 bytes: column 2j in the low nibble, 2j+1 in the high
    one (qint4x2's layout)."""
    lo, hi = w[:, 0::2].astype(np.int16), w[:, 1::2].astype(np.int16)
    return ((lo & 0xF) | ((hi & 0xF) << 4)).astype(np.uint8).view(np.int8)


def unpack_int4(b: np.ndarray) -> np.ndarray:
    """(K, N/2) int8 bytes -> (K, N) signed int4 values in int8 (sign-extended nibbles)."""
    b = np.asarray(b).view(np.int8)
    lo = (b << 4).astype(np.int8) >> 4
    hi = b >> 4
    return np.stack([lo, hi], -1).reshape(b.shape[0], -1).astype(np.int8)


# ----------------------------------------------------------------------------------------------- one module
@dataclass
class Packed:
    """One quantized matmul in the kernel's layout. w: signed values (K, N) int8; scale/offset (G, N) float16;
    perm: rows of x to gather first (act-order), or None. group: rows per group (K when G == 1)."""
    bits: int
    w: np.ndarray
    scale: np.ndarray
    offset: np.ndarray
    perm: np.ndarray | None

    @property
    def group(self) -> int:
        return self.w.shape[0] // self.scale.shape[0]

    def key(self):
        return self.bits, self.group, None if self.perm is None else self.perm.tobytes()

    def columns(self, cols):
        return Packed(self.bits, self.w[:, cols], self.scale[:, cols], self.offset[:, cols], self.perm)

    def dequantize(self) -> np.ndarray:
        """-> (N, K) float32: scale * (w + offset), rows put back in input order."""
        K, G = self.w.shape[0], self.scale.shape[0]
        g = np.arange(K) // (K // G)
        sorted_rows = self.scale.astype(np.float32)[g] * (self.w.astype(np.float32) + self.offset.astype(np.float32)[g])
        if self.perm is None:
            return np.ascontiguousarray(sorted_rows.T)
        out = np.empty_like(sorted_rows)
        out[self.perm] = sorted_rows
        return np.ascontiguousarray(out.T)

    def stored(self) -> dict:
        """Tensors of the converted layout (suffix -> array)."""
        d = {"qweight": pack_int4(self.w) if self.bits == 4 else self.w, "scales": self.scale, "offsets": self.offset}
        if self.perm is not None:
            d["perm"] = self.perm.astype(np.int32)
        return d


def concat(parts: list) -> Packed:
    p = parts[0]
    w, scale, offset = (np.concatenate([getattr(q, a) for q in parts], 1) for a in ("w", "scale", "offset"))
    return Packed(p.bits, w, scale, offset, p.perm)


class GPTQModule:
    """One quantized linear of a GPTQ checkpoint: its tensors checked against its spec and the config's widths."""

    def __init__(self, ckpt: Checkpoint, name: str, spec: Spec, v2: bool, shape: tuple):
        self.ckpt, self.name, self.spec, self.v2 = ckpt, name, spec, v2
        N, K = shape
        b = spec.bits
        pf = 32 // b
        for suffix in ("qweight", "qzeros", "scales", "g_idx"):
            if f"{name}.{suffix}" not in ckpt.keys():
                raise QuantError(f"tensor {name}.{suffix} is missing from the checkpoint in {ckpt.folder} "
                                 f"({name}.qweight is there)")
        gs = K if spec.group_size == -1 else spec.group_size
        if K % gs:
            raise QuantError(f"{name}: group_size {spec.group_size} does not divide its input width {K}")
        if K % pf or N % pf:
            raise QuantError(f"{name}: widths {K} x {N} cannot be packed at {b} bits")
        G = K // gs
        want = {"qweight": ((K // pf, N), "I32"), "qzeros": ((G, N // pf), "I32"), "scales": ((G, N), None),
                "g_idx": ((K,), "I32")}
        for suffix, (shp, dt) in want.items():
            got_dt, got = ckpt.info(f"{name}.{suffix}")
            if got != shp:
                raise QuantError(f"tensor {name}.{suffix} has shape {list(got)}, {b} bits and group size "
                                 f"{spec.group_size} on a {K} -> {N} linear imply {list(shp)}")
            if dt and got_dt != dt:
                raise QuantError(f"tensor {name}.{suffix} has dtype {got_dt}, expected {dt}")
        if ckpt.info(f"{name}.scales")[0] not in ("F16", "BF16", "F32"):
            raise QuantError(f"tensor {name}.scales has dtype {ckpt.info(name + '.scales')[0]}, expected F16")
        self.K, self.N, self.G = K, N, G

    def ints(self):
        """q (K, N), z (G, N), scales (G, N) float32, g_idx (K,): the documented formula's operands."""
        b = self.spec.bits
        q = unpack_rows(np.asarray(self.ckpt.read(self.name + ".qweight")[0]), b)
        z = unpack_cols(np.asarray(self.ckpt.read(self.name + ".qzeros")[0]), b) + (0 if self.v2 else 1)
        s, st = self.ckpt.read(self.name + ".scales")
        g = np.asarray(self.ckpt.read(self.name + ".g_idx")[0]).astype(np.int64)
        if g.min(initial=0) < 0 or g.max(initial=0) >= self.G:
            raise QuantError(f"tensor {self.name}.g_idx holds groups outside [0, {self.G})")
        return q, z, to_float32(s, st), g

    def dequantize(self) -> np.ndarray:
        q, z, s, g = self.ints()
        return np.ascontiguousarray((s[g] * (q - z[g]).astype(np.float32)).T)

    def packed(self):
        """The kernel layout, or None when the kernel cannot take this module as it is (then it runs float)."""
        q, z, s, g = self.ints()
        half = 1 << (self.spec.bits - 1)
        if np.any(np.bincount(g, minlength=self.G) != self.K // self.G):
            return None   # groups of unequal size: not expressible as per-group scales over sorted rows
        perm = np.argsort(g, kind="stable")
        if np.array_equal(perm, np.arange(self.K)):
            perm = None
        rows = q if perm is None else q[perm]
        if not np.array_equal(s.astype(np.float16).astype(np.float32), s):
            return None   # scales beyond float16 (a bf16/fp32-scaled writer): the float path takes them
        return Packed(self.spec.bits, (rows - half).astype(np.int8), s.astype(np.float16),
                      (half - z).astype(np.float16), None if perm is None else perm.astype(np.int32))


class SplitMLP:
    """GPTQModel's split text MLP read as transformers' fused `mlp.gate_up_proj` (gate rows, then up rows). Each
    half is a GPTQModule, or the name of its float weight (a `-:` rule kept that half float)."""

    def __init__(self, ckpt: Checkpoint, halves: list, shape: tuple):
        self.ckpt, self.halves = ckpt, halves
        self.N, self.K = shape

    def quantized(self) -> bool:
        return any(isinstance(h, GPTQModule) for h in self.halves)

    def _float_dtypes(self) -> set:
        return {self.ckpt.info(h)[0] for h in self.halves if isinstance(h, str)}

    def info(self):
        dts = self._float_dtypes()
        return (dts.pop() if not self.quantized() and len(dts) == 1 else "F32"), (self.N, self.K)

    def read(self):
        if not self.quantized() and len(self._float_dtypes()) == 1:   # both float: raw bits, their own dtype
            return np.concatenate([np.asarray(self.ckpt.read(h)[0]) for h in self.halves], 0), self.info()[0]
        return np.concatenate([h.dequantize() if isinstance(h, GPTQModule) else to_float32(*self.ckpt.read(h))
                               for h in self.halves], 0), "F32"


def kernel_ok(p: Packed) -> bool:
    """The WeightQuantBatchMatmul contract (kernel_limits.weight_quant_batch_matmul, without the dtype):
    k, n <= 65535; per-group sizes a multiple of 32 in [32, k-1]."""
    from .kernel_limits import weight_quant_batch_matmul
    K, N = p.w.shape
    return weight_quant_batch_matmul(K, N, 0 if p.scale.shape[0] == 1 else p.group, None, False) is None


# ----------------------------------------------------------------------------------------------- the checkpoint view
_QUANT_SUFFIXES = ("qweight", "qzeros", "scales", "g_idx")
_OURS_SUFFIXES = ("qweight", "scales", "offsets", "perm")


class QuantView:
    """A Checkpoint in which quantized modules read as float `<module>.weight` (F32, dequantized on read), so
    the weight table, the loader and the converter's float path work unchanged; `packed(entry)` gives the kernel
    layout for an entry of the table instead."""

    def __init__(self, ckpt: Checkpoint, cfg, qcfg):
        self.ckpt, self.cfg, self.qcfg = ckpt, cfg, qcfg
        self.folder, self.files, self.where = ckpt.folder, ckpt.files, ckpt.where
        self.virtual = {}      # "<module>.weight" -> GPTQModule, SplitMLP, or list of our Packed parts
        self.hidden = set()
        self.converted = is_converted(ckpt)
        if self.converted != isinstance(qcfg, dict):
            raise QuantError(f"{ckpt.folder}: quantization_config says {'gptq' if self.converted else OURS!r} but "
                             f"the tensors are in {'this port' if self.converted else 'the Hugging Face'}'s layout")
        table = hf_table(cfg)
        if self.converted:
            self._ours(table)
        else:
            self._gptq(table)

    # HF GPTQ folder
    def _gptq(self, table):
        shapes = hf_shapes(self.cfg)
        have = set(self.ckpt.keys())
        for k in sorted(k for k in have if k.endswith(".qweight")):
            m = k[:-len(".qweight")]
            fused = m.rsplit(".", 1)[0] + ".gate_up_proj" if m.endswith(SPLIT_MLP) else m
            if not (is_text_linear(m) and (m + ".weight" in shapes or fused + ".weight" in shapes)):
                raise QuantError(f"tensor {k}: quantized weights are supported for the text linears only")
        self._split_mlp(shapes, have)
        for e in table:
            mods = [s[:-len(".weight")] for s in e.sources if s.endswith(".weight") and s not in self.virtual]
            quant = [m + ".qweight" in have for m in mods]
            if not any(quant):
                continue
            if not all(quant):
                fl = [m for m, q in zip(mods, quant) if not q]
                keys = sorted({k for (_, k) in map(self.qcfg.resolve, mods) if k})
                raise QuantError(f"{fl[0]} is float while {[m for m, q in zip(mods, quant) if q][0]} is quantized: "
                                 f"they form one fused layer and must be quantized alike"
                                 + (f" (see quantization_config.dynamic {keys})" if keys else ""))
            for m in mods:
                self.virtual[m + ".weight"] = self._module(m, shapes[m + ".weight"])
        stray = sorted(k for k in have if k.endswith(_QUANT_SUFFIXES[1:]) and k not in self.hidden
                       and k.rsplit(".", 1)[-1] in _QUANT_SUFFIXES)
        if stray:
            raise QuantError(f"tensor {stray[0]} belongs to no quantized module (its qweight is missing)")

    def _module(self, m: str, shape: tuple) -> GPTQModule:
        spec, key = self.qcfg.resolve(m)
        if spec is None:
            raise QuantError(f"{m} is quantized (it has qweight) but quantization_config.dynamic[{key!r}] keeps it "
                             f"float")
        self.hidden |= {f"{m}.{s}" for s in _QUANT_SUFFIXES}
        return GPTQModule(self.ckpt, m, spec, self.qcfg.v2, shape)

    def _split_mlp(self, shapes, have):
        """GPTQModel's layout: each layer's `mlp.gate_proj` and `mlp.up_proj` (quantized by their own `dynamic`
        rules, or float) read as the fused `mlp.gate_up_proj.weight` the table maps."""
        for name, shape in shapes.items():
            m = name[:-len(".weight")]
            if not m.endswith(FUSED_MLP):
                continue
            N, K = shape
            halves = split_names(m)
            there = [h for h in halves if h + ".qweight" in have or h + ".weight" in have]
            if not there or any(f"{m}.{s}" in have for s in ("weight",) + _QUANT_SUFFIXES):
                continue   # the fused layout (or nothing: plan names what is missing)
            parts = []
            for h in halves:
                if h + ".qweight" in have:
                    parts.append(self._module(h, (N // 2, K)))
                elif h + ".weight" in have:
                    got = self.ckpt.info(h + ".weight")[1]
                    if got != (N // 2, K):
                        raise QuantError(f"tensor {h}.weight has shape {list(got)}, the config implies "
                                         f"{[N // 2, K]}")
                    parts.append(h + ".weight")
                    self.hidden.add(h + ".weight")
                else:
                    raise QuantError(f"tensor {h}.qweight (or {h}.weight) is missing from the checkpoint in "
                                     f"{self.folder} ({there[0]} is there: GPTQModel's split MLP needs both halves)")
            self.virtual[name] = SplitMLP(self.ckpt, parts, (N, K))

    # converted folder (our layout)
    def _ours(self, table):
        mods = self.qcfg.get("modules") or {}
        have = set(self.ckpt.keys())
        for e in table:
            name = e.ours[:-len(".weight")] if e.ours.endswith(".weight") else None
            if name not in mods:
                continue
            parts = mods[name]
            prefixes = [name] if len(parts) == 1 else [f"{name}.parts.{j}" for j in range(len(parts))]
            self.virtual[e.ours] = [(p, int(spec["bits"])) for p, spec in zip(prefixes, parts)]
            for p in prefixes:
                for s in _OURS_SUFFIXES:
                    if f"{p}.{s}" in have:
                        self.hidden.add(f"{p}.{s}")
                for s in _OURS_SUFFIXES[:3]:
                    if f"{p}.{s}" not in have:
                        raise QuantError(f"tensor {p}.{s} is missing from the checkpoint in {self.folder}")

    def _ours_packed(self, prefix, bits):
        r = lambda s: np.asarray(self.ckpt.read(f"{prefix}.{s}")[0])   # noqa: E731
        w = r("qweight")
        w = unpack_int4(w) if bits == 4 else w.astype(np.int8)
        perm = r("perm").astype(np.int32) if f"{prefix}.perm" in self.hidden else None
        return Packed(bits, w, r("scales").astype(np.float16), r("offsets").astype(np.float16), perm)

    # Checkpoint interface
    def keys(self):
        return (set(self.ckpt.keys()) - self.hidden) | set(self.virtual)

    def info(self, name):
        v = self.virtual.get(name)
        if v is None:
            return self.ckpt.info(name)
        if isinstance(v, GPTQModule):
            return "F32", (v.N, v.K)
        if isinstance(v, SplitMLP):
            return v.info()
        shapes = [(self.ckpt.info(f"{p}.qweight")[1], b) for p, b in v]
        return "F32", (sum(s[1] * (2 if b == 4 else 1) for s, b in shapes), shapes[0][0][0])

    def read(self, name):
        v = self.virtual.get(name)
        if v is None:
            return self.ckpt.read(name)
        if isinstance(v, GPTQModule):
            return v.dequantize(), "F32"
        if isinstance(v, SplitMLP):
            return v.read()
        return np.concatenate([self._ours_packed(p, b).dequantize() for p, b in v], 0), "F32"

    # the kernel layout
    def quantized_entries(self):
        return [e for e in self._table() if e.ours in self.virtual or
                (not self.converted and any(isinstance(p, GPTQModule) for s in e.sources for p in self._parts(s)))]

    def _parts(self, source):
        """The linears behind one source of the table: GPTQModules, or float weight names."""
        v = self.virtual.get(source)
        return v.halves if isinstance(v, SplitMLP) else [v if v is not None else source]

    def _table(self):
        return converted_table(self.cfg) if self.converted else hf_table(self.cfg)

    def packed(self, e):
        """Packed parts for a table entry: one (fused) or one per source; None if the kernel cannot run them."""
        if self.converted:
            parts = [self._ours_packed(p, b) for p, b in self.virtual[e.ours]]
            return parts if all(kernel_ok(p) for p in parts) else None
        mods = [p for s in e.sources for p in self._parts(s)]
        if not all(isinstance(m, GPTQModule) for m in mods):
            return None   # a split MLP with one half float: the layer runs dequantized
        parts = [m.packed() for m in mods]
        if any(p is None for p in parts):
            return None
        # where the table's transform sends each output row: apply it to the row numbers themselves
        ends = np.cumsum([0] + [self.virtual[s].N for s in e.sources])
        order = np.asarray(e.fn(self.cfg, *[np.arange(a, b)[:, None] for a, b in zip(ends, ends[1:])]))[:, 0]
        offs = np.cumsum([0] + [m.N for m in mods])
        # one matmul when the parts agree in bits, group size and row order (q/k/v of one GPTQ subset; GPTQModel's
        # gate/up halves); the zero points need not agree: they are per output column, exact when concatenated
        if len({p.key() for p in parts}) == 1:
            out = [concat(parts).columns(order)]
        else:   # separate matmuls: each part's rows must stay one block, in source order
            out = []
            for p, a, b in zip(parts, offs, offs[1:]):
                block = order[a:b]
                if block.min() != a or block.max() != b - 1:
                    raise QuantError(f"{e.ours}: its parts differ in bits/group size/order and the table "
                                     f"interleaves them; cannot run them as separate matmuls")
                out.append(p.columns(block - a))
        return out if all(kernel_ok(p) for p in out) else None


def view(ckpt: Checkpoint, cfg):
    """The checkpoint itself when it is a float one, else a QuantView of it."""
    qcfg = read_quantization_config(ckpt.folder)
    return ckpt if qcfg is None else QuantView(ckpt, cfg, qcfg)


# ----------------------------------------------------------------------------------------------- converting
def quantize_rtn(W: np.ndarray, bits: int, group_size: int) -> dict:
    """Round-to-nearest GPTQ tensors (symmetric, plain group order, v1 zero points) for a float weight (N, K):
    per group, scale = 2 max|w| / (2^b - 1) and z = 2^(b-1), as GPTQ's symmetric quantizer sets them."""
    N, K = W.shape
    gs = K if group_size == -1 else group_size
    maxq, half = (1 << bits) - 1, 1 << (bits - 1)
    Wg = W.T.astype(np.float32).reshape(K // gs, gs, N)
    amax = np.abs(Wg).max(1)                                      # (G, N)
    scale = (2 * amax / maxq).astype(np.float16)
    scale[scale == 0] = 1
    q = np.clip(np.round(Wg / scale.astype(np.float32)[:, None]) + half, 0, maxq).astype(np.int32).reshape(K, N)
    return {"qweight": pack_rows(q, bits), "qzeros": pack_cols(np.full((K // gs, N), half - 1, np.int32), bits),
            "scales": scale, "g_idx": (np.arange(K) // gs).astype(np.int32)}


def quantize_items(ckpt: Checkpoint, bits: int, group_size: int, keep_float=()):
    """(name, safetensors dtype, array) for a GPTQ folder made from a float checkpoint, in GPTQModel's layout: the
    text MLP's gate_up_proj split into gate_proj and up_proj, the text linears quantized unless a keep_float regex
    matches their module name (re.match, as a `-:` rule of `dynamic`), everything else as stored."""
    rules = []
    for p in keep_float:
        try:
            rules.append(re.compile(p))
        except re.error as e:
            raise QuantError(f"--keep-float {p!r}: not a regular expression ({e})") from None
    for name in sorted(ckpt.keys()):
        arr, st = ckpt.read(name)
        m = name[:-len(".weight")]
        if not (name.endswith(".weight") and is_text_linear(m)):
            yield name, st, np.asarray(arr)
            continue
        halves = split_names(m) if m.endswith(FUSED_MLP) else (m,)
        for h, w in zip(halves, np.split(np.asarray(arr), len(halves), 0)):   # gate: the first half of the rows
            if any(r.match(h) for r in rules):
                yield h + ".weight", st, w
                continue
            N, K = w.shape
            if group_size != -1 and K % group_size:
                raise QuantError(f"--group-size {group_size} does not divide the input width {K} of {h} "
                                 f"(use a divisor of {K}, or -1 for one group per column)")
            t = quantize_rtn(to_float32(w, st), bits, group_size)
            for k in ("qweight", "qzeros", "scales", "g_idx"):
                yield f"{h}.{k}", {"qweight": "I32", "qzeros": "I32", "scales": "F16", "g_idx": "I32"}[k], t[k]


def gptq_config(bits: int, group_size: int, keep_float=()) -> dict:
    """The quantization_config --quantize writes: GPTQModel's fields, so its loader and vLLM read the folder."""
    return {"quant_method": "gptq", "method": "gptq", "bits": bits, "group_size": group_size, "desc_act": False,
            "sym": True, "checkpoint_format": "gptq", "format": "gptq", "pack_dtype": "int32", "lm_head": False,
            "true_sequential": True, "dynamic": {f"-:{p}": {} for p in keep_float},
            "meta": {"quantizer": ["glm4v_ms round-to-nearest"]}}


def repack_items(v: QuantView):
    """(name, safetensors dtype, array) of this port's layout for a GPTQ folder, and the module list for config.json:
    quantized entries as the kernel takes them, the rest through the weight table (as the float converter)."""
    modules = {}

    def items():
        for e in v._table():
            parts = v.packed(e) if (e.ours.endswith(".weight") and any(s in v.virtual for s in e.sources)) else None
            if parts is not None:
                path = e.ours[:-len(".weight")]
                prefixes = [path] if len(parts) == 1 else [f"{path}.parts.{j}" for j in range(len(parts))]
                modules[path] = []
                for pre, p in zip(prefixes, parts):
                    modules[path].append({"bits": p.bits, "group_size": p.group if p.scale.shape[0] > 1 else -1,
                                          "act_order": p.perm is not None})
                    for k, a in p.stored().items():
                        yield f"{pre}.{k}", {"qweight": "I8", "scales": "F16", "offsets": "F16", "perm": "I32"}[k], a
                continue
            raws = [v.read(s) for s in e.sources]
            dts = {d for _, d in raws}
            if len(dts) != 1:
                raise QuantError(f"tensors {', '.join(e.sources)} mix dtypes {sorted(dts)}")
            st = dts.pop()
            yield e.ours, st, e.fn(v.cfg, *[a for a, _ in raws])
    return items(), modules


def estimate_bytes(cfg, qcfg: GPTQConfig, item: int = 2, split_mlp: bool = True) -> tuple:
    """(all weights, the quantized linears' share) in bytes on the Ascend path, for a config and a GPTQ
    quantization_config, without the checkpoint: the memory plan of a model not at hand (the 9B Int4/Int8-mix).
    Assumes every text linear is quantized unless a `-:` rule keeps it float, q/k/v fused (shared order), and the
    MLP in GPTQModel's split layout (split_mlp; its rules name gate_proj / up_proj), the halves fused where they
    agree, the whole layer dequantized where one half is float."""
    total = quant = 0
    for name, shape in hf_shapes(cfg).items():
        m = name[:-len(".weight")]
        linear = name.endswith(".weight") and is_text_linear(m)
        if linear and split_mlp and m.endswith(FUSED_MLP):
            specs = [qcfg.resolve(h)[0] for h in split_names(m)]
            if None in specs or len({(sp.bits, sp.group_size, sp.desc_act) for sp in specs}) == 1:
                blocks = [(None if None in specs else specs[0], shape)]   # one matmul (or the layer float)
            else:
                blocks = [(sp, (shape[0] // 2, shape[1])) for sp in specs]
        else:
            blocks = [(qcfg.resolve(m)[0] if linear else None, shape)]
        shared = m.endswith(("k_proj", "v_proj"))   # the fused q/k/v holds one act-order permutation
        for spec, shp in blocks:
            b = _block_bytes(spec, shp, item, shared)
            total += b if b else int(np.prod(shp)) * item   # float (or dequantized: the kernel cannot take it)
            quant += b
    return total, quant


def _block_bytes(spec, shape, item, shared) -> int:
    """The quantized bytes of one matmul (0: it runs float)."""
    if spec is None:
        return 0
    N, K = shape
    gs = K if spec.group_size in (-1, K) else spec.group_size
    if K % gs or (gs != K and gs % 32):
        return 0
    return K * N * spec.bits // 8 + 2 * (K // gs) * N * item + (4 * K if spec.desc_act and not shared else 0)
