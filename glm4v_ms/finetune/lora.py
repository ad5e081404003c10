"""LoRA as a property of a linear: `Linear.lora` adds `B(A(dropout(x))) * scaling` to the linear's output (PEFT's
maths, tuners/lora/layer.py), in float32 whatever the frozen weight's dtype.

Our linears fuse what the checkpoint keeps apart (text q/k/v in one matmul; gate/up wherever the checkpoint has
them separate), and PEFT's adapters are per source module. So one `Lora` holds one (A, B) pair per source module
that is trained: A (r, in) is the source's own; B (out_i, r) is stored in our row order, which the weight table's
transform gives (GLM-4.1V's q/k rows permuted to rotate-half, rope.neox_permutation). Which source modules a linear
has, their names, widths and row orders all come from weights.hf_table: the one table that reads checkpoints.
Untrained parts of a fused output get no delta.

Sites: every text linear (attention, dense MLPs, GLM-4.5V's shared experts) and, when the projector is not frozen,
visual.merger's. GLM-4.5V's routed experts are 3-D parameters in transformers 5 (PEFT's target_parameters path):
refused by name.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

import mindspore as ms
import numpy as np
from mindspore import Parameter, ParameterTuple, Tensor, nn, ops

from .. import parallel
from ..layers import Linear
from ..quant_layers import QuantLinear, SplitLinear
from ..weights import hf_shapes, hf_table

# the linears a LoRA delta may sit on: float, or a GPTQ base's quantized ones (frozen, kept quantized on the Ascend
# path: quant_layers), which take the same `lora` hook and the same source modules (the float model's names)
LINEARS = (Linear, QuantLinear, SplitLinear)

_mm_nt = ops.MatMul(transpose_b=True)


class LoraError(ValueError):
    """A LoRA target or adapter that does not fit this model."""


@dataclass(frozen=True)
class Part:
    module: str          # the source module's name in transformers' tree (model.language_model.layers.0.self_attn.q_proj)
    start: int           # its rows in our fused output: [start, start + size)
    size: int
    perm: np.ndarray     # our row j of the part = the source's row perm[j] (of the rows this rank holds)
    rows: np.ndarray = None   # tensor parallel: the source rows this rank's linear holds (None: all)
    kind: str = ""            # tensor parallel: the source's split kind (parallel.OUT, HALVES, KV, IN or REPLICATED)
    whole_perm: np.ndarray = None   # tensor parallel: perm of the whole part (one process's row order)


@dataclass(frozen=True)
class Site:
    ours: str            # our linear's path (text.layers.0.attn.qkv)
    linear: Linear
    parts: tuple         # of Part, in our output order
    cols: slice = None   # tensor parallel, a row-parallel linear: the input columns this rank holds (A's columns)


def _row_order(cfg, entry, sizes):
    """Our fused rows as source rows, by running the table's own transform on row numbers."""
    starts = np.cumsum([0] + list(sizes))
    idx = entry.fn(cfg, *[np.arange(a, a + n, dtype=np.int64)[:, None] for a, n in zip(starts, sizes)])[:, 0]
    perms = []
    for a, n in zip(starts, sizes):
        p = idx[a:a + n] - a
        if sorted(p.tolist()) != list(range(n)):
            raise AssertionError(f"{entry.ours}: the transform moves rows across its sources")
        perms.append(p)
    return starts[:-1], perms


def _held(cfg, lay, kind: str, n: int):
    """Tensor parallel: the rows of an n-row source this rank's slice holds (parallel.shard on row numbers), or
    None where the rows are whole (replicated, or split by input columns)."""
    if lay.world == 1 or kind in (parallel.REPLICATED, parallel.IN):
        return None
    t = cfg.text
    return parallel.shard(kind, np.arange(n, dtype=np.int64)[:, None], lay, t.head_dim, t.num_key_value_heads)[:, 0]


def sites(model, projector: bool = False) -> list[Site]:
    """Every linear LoRA may wrap, with its source modules (text linears; visual.merger's when `projector`).
    Under tensor parallel each site is this rank's slice: a column-parallel linear's parts hold the source rows of
    its weight's slice (B sliced alike, A whole), a row-parallel one the input columns (A sliced alike, B whole);
    the delta joins the base output before the linear's all-reduce."""
    cfg = model.config
    lay = getattr(model, "layout", None) or parallel.Layout()
    cells = dict(model.cells_and_names())
    shapes = hf_shapes(cfg)
    out = []
    for e in hf_table(cfg):
        if not e.ours.endswith(".weight"):
            continue
        path = e.ours[:-len(".weight")]
        if not (path.startswith("text.layers.") or (projector and path.startswith("visual.merger."))):
            continue
        cell = cells.get(path)
        if not isinstance(cell, LINEARS):
            continue
        kinds = e.split or (parallel.REPLICATED,) * len(e.sources)
        held = [_held(cfg, lay, k, shapes[s][0]) for k, s in zip(kinds, e.sources)]
        sizes = [shapes[s][0] if h is None else len(h) for s, h in zip(e.sources, held)]
        starts, perms = _row_order(cfg, e, sizes)
        wperms = _row_order(cfg, e, [shapes[s][0] for s in e.sources])[1] if lay.world > 1 else perms
        parts = tuple(Part(s[:-len(".weight")], int(a), n, p, h, k, w)
                      for s, a, n, p, h, k, w in zip(e.sources, starts, sizes, perms, held, kinds, wperms))
        cols = lay.part(shapes[e.sources[0]][1]) if lay.world > 1 and parallel.IN in kinds else None
        out.append(Site(path, cell, parts, cols))
    return out


ROUTED = re.compile(r"\.mlp\.experts(\.|$)")


def routed_expert_modules(model) -> list[str]:
    """transformers' names of GLM-4.5V's routed experts (what LoRA cannot wrap here)."""
    t = model.config.text
    return [f"model.language_model.layers.{i}.mlp.experts" for i in range(t.num_hidden_layers) if t.is_moe_layer(i)]


def select(model, lora_target, projector: bool = False) -> list[str]:
    """LLaMA-Factory's choice of modules: names (a list or a comma-separated string) matched as substrings of the
    full names of the modules not frozen (its patch_target_modules rule); `all` = the short names of the language
    model's linears (its find_all_linear_modules, which leaves the projector out) matched the same way. So with the
    projector trained, `all` also takes the merger linears that share a short name (GLM-4.1V: merger.down_proj;
    GLM-4.5V: merger.gate_proj, up_proj, down_proj), as LLaMA-Factory does."""
    names = [p.module for s in sites(model, projector) for p in s.parts]
    if isinstance(lora_target, str):
        lora_target = [t.strip() for t in lora_target.split(",") if t.strip()]
    targets = list(lora_target)
    if targets == ["all"]:
        targets = sorted({n.rsplit(".", 1)[1] for n in names if n.startswith("model.language_model.")})
    chosen = []
    for t in targets:
        routed = [m for m in routed_expert_modules(model) if t in m or t in ("experts", "mlp.experts")]
        if routed:
            raise LoraError(f"lora_target {t}: GLM-4.5V's routed experts ({routed[0]} ...) cannot take LoRA here "
                            f"(attention, the dense layers and the shared experts can)")
        hit = [n for n in names if t in n]
        if not hit:
            raise LoraError(f"lora_target {t} names no linear of this model (e.g. q_proj, k_proj, v_proj, o_proj, "
                            f"gate_up_proj/gate_proj, up_proj, down_proj, or all)")
        chosen += [n for n in hit if n not in chosen]
    return [n for n in names if n in chosen]


class Lora(nn.Cell):
    """The delta of one linear: per trained source part, B_i (A_i x) * scaling in that part's output rows."""

    def __init__(self, site: Site, trained: dict, r: int, scaling: float, dropout: float = 0.0):
        super().__init__()
        n_in = site.linear.weight.shape[1] if isinstance(site.linear, Linear) else site.linear.k
        self.site, self.r, self.scaling, self.p = site, r, float(scaling), float(dropout)
        self.segments = tuple((p.size, p.module in trained) for p in site.parts)
        self.targets = tuple(p.module for p in site.parts if p.module in trained)
        z = lambda *s: np.zeros(s, np.float32)  # noqa: E731
        self.A = ParameterTuple([Parameter(Tensor(z(r, n_in)), name=f"{site.ours}.lora_A.{m}") for m in self.targets])
        self.B = ParameterTuple([Parameter(Tensor(z(p.size, r)), name=f"{site.ours}.lora_B.{p.module}")
                                 for p in site.parts if p.module in trained])
        self.dropout = nn.Dropout(p=self.p) if self.p > 0 else None

    def construct(self, x):
        x = x.astype(ms.float32)
        if self.dropout is not None:
            x = self.dropout(x)
        x2 = x.reshape(-1, x.shape[-1])
        outs, j = [], 0
        for size, on in self.segments:
            if on:
                outs.append(_mm_nt(_mm_nt(x2, self.A[j]), self.B[j]))
                j += 1
            else:
                outs.append(ops.zeros((x2.shape[0], size), ms.float32))
        y = outs[0] if len(outs) == 1 else ops.cat(outs, -1)
        return (y * self.scaling).reshape(x.shape[:-1] + (y.shape[-1],))

    # ---- PEFT's tensors <-> ours
    def part(self, module) -> Part:
        return next(p for p in self.site.parts if p.module == module)

    def set_peft(self, module, a: np.ndarray, b: np.ndarray):
        """PEFT's lora_A (r, in) and lora_B (out, r) of one source module (whole: sliced here under tensor
        parallel, like the weight the delta sits on)."""
        j = self.targets.index(module)
        p = self.part(module)
        if self.site.cols is not None and a.ndim == 2:
            a = a[:, self.site.cols]
        if p.rows is not None and b.ndim == 2:
            b = b[p.rows]
        for name, got, want in (("lora_A", a.shape, self.A[j].shape), ("lora_B", b.shape, (p.size, self.r))):
            if tuple(got) != tuple(want):
                raise LoraError(f"{module}.{name}: shape {list(got)}, this model needs {list(want)}")
        self.A[j].set_data(Tensor(np.ascontiguousarray(a, np.float32)))
        self.B[j].set_data(Tensor(np.ascontiguousarray(np.asarray(b, np.float32)[p.perm])))

    def peft(self, module, A=None, B=None):
        """(lora_A, lora_B) of one source module in PEFT's layout (the row order undone); A/B: arrays of ours."""
        if self.site.cols is not None or any(p.rows is not None for p in self.site.parts):
            if A is None and B is None and module in getattr(self, "whole", {}):
                return self.whole[module]   # gathered from every rank (finetune/tensor_parallel.gather)
            raise LoraError("a tensor-parallel rank holds a slice of this adapter, not PEFT's whole tensors")
        j = self.targets.index(module)
        a = self.A[j].asnumpy() if A is None else A
        b = self.B[j].asnumpy() if B is None else B
        out = np.empty_like(b)
        out[self.part(module).perm] = b
        return a, out


def kaiming_uniform_a(rng: np.random.Generator, r: int, n_in: int) -> np.ndarray:
    """PEFT's init of A: kaiming_uniform_(a=sqrt(5)): bound = sqrt(6 / ((1 + a^2) fan_in)) = 1 / sqrt(fan_in)."""
    bound = 1.0 / math.sqrt(n_in)
    return rng.uniform(-bound, bound, (r, n_in)).astype(np.float32)


def scaling(r: int, alpha: float, rslora: bool) -> float:
    return alpha / math.sqrt(r) if rslora else alpha / r


def inject(model, modules: list[str], r: int, alpha: float, dropout: float = 0.0, rslora: bool = False,
           seed: int = 0, projector: bool = False) -> list[Lora]:
    """Give the linears holding `modules` a LoRA delta (A kaiming-uniform, B zeros, as PEFT initialises them).
    Returns the Lora cells; their A and B are the trainable parameters."""
    rng = np.random.default_rng(seed)
    want = set(modules)
    out = []
    for site in sites(model, projector):
        trained = {p.module: True for p in site.parts if p.module in want}
        if not trained:
            continue
        lora = Lora(site, trained, r, scaling(r, alpha, rslora), dropout)
        for a in lora.A:
            # a row-parallel rank draws the whole A and keeps its columns: the one process's init, sliced
            cols = site.cols or slice(0, a.shape[1])
            n_in = a.shape[1] * (model.layout.world if site.cols is not None else 1)
            a.set_data(Tensor(kaiming_uniform_a(rng, r, n_in)[:, cols]))
        site.linear.lora = lora
        out.append(lora)
    missing = want - {m for l in out for m in l.targets}
    if missing:
        raise LoraError(f"module {sorted(missing)[0]} is not a linear LoRA can wrap in this model")
    model.loras = out
    _recompile(model)
    return out


def _recompile(model):
    # the compiled inference graphs hold the linears as they were
    if hasattr(model, "_decoders"):
        model._decoders.clear()


def remove(model):
    for lora in getattr(model, "loras", []):
        lora.site.linear.lora = None
    model.loras = []
    _recompile(model)


def trainable(model) -> list[Parameter]:
    """The LoRA parameters in a fixed order (site order, then A before B per part)."""
    ps = []
    for lora in getattr(model, "loras", []):
        for a, b in zip(lora.A, lora.B):
            ps += [a, b]
    return ps
