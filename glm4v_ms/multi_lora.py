"""Several LoRA adapters on one model at once, each row of a batch with its own (vLLM's --enable-lora,
--lora-modules, --max-loras, --max-lora-rank and runtime loading): the server decodes requests for different
adapters, and for the base, in the same step, and loads adapters while it serves without compiling anything.

The bank is allocated once, at its full size, on every linear LoRA can take here (lora.sites with the projector:
the text linears and visual.merger's, as vLLM wraps every supported module): per linear A (K+1, R, in),
B (K+1, out, R) and scaling (K+1,), K = max_loras slots after slot 0, an all-zero adapter (the base), and
R = max_lora_rank times the linear's fused parts. A fused linear's trained parts become one low-rank product (A's
rows stacked, B block-diagonal), zero-padded to R: the added terms are exact zeros, so a row's delta is its
adapter's, (B_k (A_k x)) * s_k. Loading an adapter writes its slot (one scatter per tensor); a linear it leaves
alone gets scaling 0 there. The shapes never change, so neither do the compiled graphs.

An adapter is read from its PEFT folder on the host (NumPy, never touching the model the engine is running), by
the PEFT reader's rules (finetune/adapter.py's config checks, PEFT's target rule, lora.sites' row orders and
tensor-parallel slices), so what it accepts and refuses is the library's.

Which slot each row takes comes from a small int32 Parameter (`rows`, one entry per cache row) written on the
host before every device step (`select`) and gathered in the graph. A Parameter rather than a graph argument,
because the `lora` hook of a linear takes its input only (layers.Linear); written with ops.assign /
scatter_nd_update, which a compiled graph sees (set_data is not seen by a graph compiled before it, MindSpore
2.10). A batch-1 prompt (the engine's prefill) reads row 0; a 2-D input (the vision merger's patches, one
prompt's) is that one prompt's.

Slots (Bank.slot_for, called by the engine thread when it admits a request): an adapter already in a slot takes
it; else the slot of no running row that was used longest ago (an unloaded adapter's first) is overwritten; when
every slot holds another adapter with running rows, the request waits (vLLM's scheduler: at most max_loras
adapters in one batch step). All served adapters stay in host memory (vLLM's --max-cpu-loras is not taken).
"""
from __future__ import annotations

import hashlib
import itertools
import json
import os
import re
from dataclasses import dataclass, field

import mindspore as ms
import numpy as np
from mindspore import Parameter, Tensor, nn, ops

from .finetune import adapter as peft_adapter
from .finetune import lora as L
from .layers import Linear
from .safetensors_io import SafetensorsFile, WeightError, to_float32

_bmm_nt = ops.BatchMatMul(transpose_b=True)
MAX_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)   # vLLM's --max-lora-rank values (LoRAConfig.MaxLoRARanks)
_uids = itertools.count(1)


class LoraModulesError(ValueError):
    """An adapter that cannot be served: one line for the user (HTTP 400)."""


class AdapterNotFound(LoraModulesError):
    """No adapter at that path (vLLM's LoRAAdapterNotFoundError: HTTP 404)."""


def parse_modules(values, base_name: str) -> list:
    """vLLM's --lora-modules values (name=path, or JSON {"name", "path", "base_model_name"}) -> [(name, path)].
    Two adapters under one name, or one named like the base: refused."""
    out = []
    for v in values or []:
        if v.lstrip().startswith("{"):
            try:
                d = json.loads(v)
                name, path = d["name"], d["path"]
            except (ValueError, KeyError, TypeError):
                raise LoraModulesError(f"--lora-modules {v}: JSON form needs \"name\" and \"path\"") from None
            if d.get("base_model_name") not in (None, base_name):
                raise LoraModulesError(f"--lora-modules {name}: base_model_name {d['base_model_name']!r} is not "
                                       f"this server's model {base_name!r}")
        else:
            name, sep, path = v.partition("=")
            if not sep or not name or not path:
                raise LoraModulesError(f"--lora-modules {v}: expected name=path (or vLLM's JSON form)")
        if not isinstance(name, str) or not isinstance(path, str) or not name or not path:
            raise LoraModulesError(f"--lora-modules {v}: name and path must be non-empty strings")
        if name == base_name:
            raise LoraModulesError(f"--lora-modules {name}: the base model is served under that name")
        if name in (n for n, _ in out):
            raise LoraModulesError(f"--lora-modules {name}: two adapters under one name")
        out.append((name, path))
    return out


def read_config(name: str, path: str, max_rank: int | None = None) -> dict:
    """The cheap checks, before the model loads: a PEFT LoRA folder this reader takes, of rank <= max_rank
    (vLLM's refusal, its words). AdapterNotFound where nothing is there (vLLM: no adapter_config.json)."""
    if not os.path.isfile(os.path.join(path, peft_adapter.CONFIG)):
        raise AdapterNotFound(f"Loading lora {name} failed: No adapter found for {path} (not a PEFT adapter "
                              f"folder)")
    try:
        cfg = peft_adapter.read_config(path)
    except peft_adapter.AdapterError as e:
        raise LoraModulesError(f"{e}") from None
    if max_rank is not None and int(cfg["r"]) > max_rank:
        raise LoraModulesError(f"LoRA rank {int(cfg['r'])} is greater than max_lora_rank {max_rank}.")
    if not os.path.isfile(os.path.join(path, peft_adapter.WEIGHTS)):
        raise AdapterNotFound(f"Loading lora {name} failed: No adapter found for {path} (no "
                              f"{peft_adapter.WEIGHTS})")
    return cfg


def check_folders(modules, max_rank: int | None = None) -> None:
    for name, path in modules:
        try:
            read_config(name, path, max_rank)
        except LoraModulesError as e:
            raise LoraModulesError(f"--lora-modules {name}: {e}") from None


@dataclass(eq=False)
class Adapter:
    """One served adapter, read on the host: per site (our linear's path) its delta as one low-rank product
    (A (n r, in), B (out, n r), scaling)."""
    name: str
    path: str
    rank: int
    deltas: dict
    uid: int = field(default_factory=lambda: next(_uids))   # never reused: keys prefix reuse (engine rows)
    unloaded: bool = False


def _n_in(linear) -> int:
    return linear.weight.shape[1] if isinstance(linear, Linear) else linear.k


def read(model, name: str, path: str, max_rank: int | None = None, sites=None) -> Adapter:
    """A PEFT folder -> Adapter for this model (this rank's slices under tensor parallel), without touching the
    model: LoraModulesError (AdapterNotFound) with one line where it does not fit."""
    cfg = read_config(name, path, max_rank)
    wpath = os.path.join(path, peft_adapter.WEIGHTS)
    try:
        st = SafetensorsFile(wpath)
        keys = list(st.keys())
    except (WeightError, OSError) as e:
        raise LoraModulesError(f"{wpath}: {e}") from None
    tensors = {}
    for key in keys:
        m = re.fullmatch(re.escape(peft_adapter.PREFIX) + r"(.+)\.(lora_A|lora_B)(?:\.[^.]+)?\.weight", key)
        if m is None:
            raise LoraModulesError(f"{wpath}: tensor {key} is not a LoRA weight")
        tensors.setdefault(m.group(1), {})[m.group(2)] = key
    sites = L.sites(model, projector=True) if sites is None else sites
    parts = {p.module: (s, p) for s in sites for p in s.parts}
    for mod, ab in tensors.items():
        if mod not in parts:
            if L.ROUTED.search(mod):
                raise LoraModulesError(f"{wpath}: {mod}: LoRA on GLM-4.5V's routed experts is not supported")
            raise LoraModulesError(f"{wpath}: {mod} is not a linear of this model that takes LoRA here (an adapter "
                                   f"for another base?)")
        if set(ab) != {"lora_A", "lora_B"}:
            raise LoraModulesError(f"{wpath}: {mod} has {sorted(ab)} only")
        if not peft_adapter.targeted(mod, cfg.get("target_modules")):
            raise LoraModulesError(f"{wpath}: {mod} has weights but target_modules does not name it")
    r = int(cfg["r"])
    s = L.scaling(r, float(cfg.get("lora_alpha", 8)), bool(cfg.get("use_rslora", False)))
    deltas = {}
    for site in sites:
        mine = [p for p in site.parts if p.module in tensors]
        if not mine:
            continue
        a_rows, b = [], np.zeros((sum(p.size for p in site.parts), len(mine) * r), np.float32)
        for j, p in enumerate(mine):
            a = to_float32(*st.read(tensors[p.module]["lora_A"]))
            bb = to_float32(*st.read(tensors[p.module]["lora_B"]))
            if site.cols is not None and a.ndim == 2:   # tensor parallel: sliced like the weight (lora.set_peft)
                a = a[:, site.cols]
            if p.rows is not None and bb.ndim == 2:
                bb = bb[p.rows]
            for what, got, want in (("lora_A", a.shape, (r, _n_in(site.linear))), ("lora_B", bb.shape, (p.size, r))):
                if tuple(got) != tuple(want):
                    raise LoraModulesError(f"{wpath}: {p.module}.{what}: shape {list(got)}, this model needs "
                                           f"{list(want)} (an adapter for another base?)")
            a_rows.append(a)
            b[p.start:p.start + p.size, j * r:(j + 1) * r] = bb[p.perm]
        deltas[site.ours] = (np.concatenate(a_rows, 0), b, np.float32(s))
    return Adapter(name, path, r, deltas)


class MultiLora(nn.Cell):
    """A linear's `lora` hook over stacked adapters: row b's delta is slot rows[b]'s."""

    def __init__(self, ours: str, a: np.ndarray, b: np.ndarray, s: np.ndarray, rows: Parameter):
        super().__init__()
        self.A = Parameter(Tensor(a), name=f"{ours}.multi_lora.A", requires_grad=False)   # (K+1, R, in)
        self.B = Parameter(Tensor(b), name=f"{ours}.multi_lora.B", requires_grad=False)   # (K+1, out, R)
        self.S = Parameter(Tensor(s), name=f"{ours}.multi_lora.S", requires_grad=False)   # (K+1,)
        self.rows = rows   # shared by every linear's cell

    def construct(self, x):
        flat = x.ndim == 2
        x3 = (x[None] if flat else x.reshape(x.shape[0], -1, x.shape[-1])).astype(ms.float32)
        sel = self.rows[:x3.shape[0]]
        t = _bmm_nt(x3, ops.gather(self.A, sel, 0))                         # (B, T, R)
        y = _bmm_nt(t, ops.gather(self.B, sel, 0)) * ops.gather(self.S, sel, 0)[:, None, None]
        return y[0] if flat else y.reshape(x.shape[:-1] + (y.shape[-1],))


class Bank:
    """The slots on the model's linears and the adapters served (`adapters`: name -> Adapter, in load order)."""

    def __init__(self, model, max_loras: int, max_rank: int, max_rows: int):
        self.model, self.max_loras, self.max_rank = model, int(max_loras), int(max_rank)
        self.sites = L.sites(model, projector=True)
        self.rows = Parameter(Tensor(np.zeros(max_rows, np.int32)), name="lora_rows", requires_grad=False)
        self.max_rows = int(max_rows)
        self.cells = {}   # our linear's path -> (the linear, its MultiLora)
        K = self.max_loras
        for site in self.sites:
            R, n_out = len(site.parts) * self.max_rank, sum(p.size for p in site.parts)
            cell = MultiLora(site.ours, np.zeros((K + 1, R, _n_in(site.linear)), np.float32),
                             np.zeros((K + 1, n_out, R), np.float32), np.zeros(K + 1, np.float32), self.rows)
            site.linear.lora = cell
            self.cells[site.ours] = (site.linear, cell)
        self.adapters = {}
        self.resident = [None] * (K + 1)   # slot -> the Adapter it holds (slot 0: the base, always None)
        self.used = [0] * (K + 1)          # slot -> when a request last took it (a count of takes: no ties)
        self.takes = 0
        self.loads = 0                     # slot writes (an adapter into a slot)

    def select(self, slots) -> None:
        """Before a device step: row b of the next graph takes slot slots[b] (0: the base)."""
        v = np.zeros(self.max_rows, np.int32)
        a = np.asarray(slots, np.int32).reshape(-1)
        v[:len(a)] = a
        ops.assign(self.rows, Tensor(v))

    def read(self, name: str, path: str) -> Adapter:
        return read(self.model, name, path, self.max_rank, self.sites)

    def write(self, slot: int, ad: Adapter) -> None:
        """Adapter `ad` into slot `slot` (1..max_loras): between device steps only (the engine thread)."""
        assert 1 <= slot <= self.max_loras and ad.rank <= self.max_rank
        idx = Tensor(np.array([[slot]], np.int32))
        for ours, (_, cell) in self.cells.items():
            got = ad.deltas.get(ours)
            if got is None:   # a linear this adapter leaves alone: no delta in this slot
                ops.scatter_nd_update(cell.S, idx, Tensor(np.zeros(1, np.float32)))
                continue
            a, b, s = got
            A = np.zeros((1,) + tuple(cell.A.shape[1:]), np.float32)
            B = np.zeros((1,) + tuple(cell.B.shape[1:]), np.float32)
            A[0, :a.shape[0]], B[0, :, :b.shape[1]] = a, b
            ops.scatter_nd_update(cell.A, idx, Tensor(A))
            ops.scatter_nd_update(cell.B, idx, Tensor(B))
            ops.scatter_nd_update(cell.S, idx, Tensor(np.array([s], np.float32)))
        self.resident[slot] = ad
        self.loads += 1

    def slot_for(self, ad: Adapter, busy, write=None) -> int | None:
        """The slot a request for `ad` decodes with: the one holding it, else an idle one (not in `busy`: no
        running row uses it) overwritten, the one holding an unloaded adapter or used longest ago first; None when
        every slot holds another adapter in use (the request waits). write(slot, ad) does the overwrite (default
        self.write; under msrun rank 0's engine first tells the other ranks, which write the same slot)."""
        self.takes += 1
        now = self.takes
        for k in range(1, self.max_loras + 1):
            if self.resident[k] is ad:
                self.used[k] = now
                return k
        idle = [k for k in range(1, self.max_loras + 1) if k not in busy]
        if not idle:
            return None
        k = min(idle, key=lambda k: (self.resident[k] is not None and not self.resident[k].unloaded, self.used[k]))
        (write or self.write)(k, ad)
        self.used[k] = now
        return k

    def resident_names(self) -> list:
        return [None if a is None else a.name for a in self.resident[1:]]


def install(model, modules, max_rows: int, max_loras: int | None = None, max_rank: int | None = None) -> Bank:
    """The bank on the model's linears (the model's own adapter, if any, removed), with every (name, folder)
    adapter read and served, the first max_loras of them in slots. Defaults: a slot per adapter (at least one),
    the largest rank among them. Raises LoraModulesError (one line) for an adapter that does not fit the model.
    Under tensor parallel each rank holds its slices of every adapter (sliced like the linear they sit on)."""
    uninstall(model)
    L.remove(model)
    sites = L.sites(model, projector=True)
    ads = []
    for name, path in modules:
        try:
            ads.append(read(model, name, path, max_rank, sites))
        except LoraModulesError as e:
            raise type(e)(f"--lora-modules {name}: {e}") from None
    max_loras = max(1, len(ads)) if max_loras is None else max_loras
    max_rank = max([a.rank for a in ads] or [8]) if max_rank is None else max_rank
    digest = model.config_digest
    bank = Bank(model, max_loras, max_rank, max_rows)
    bank.digest = digest   # the model's config_digest before the bank
    for k, ad in enumerate(ads):
        bank.adapters[ad.name] = ad
        if k < max_loras:
            bank.write(k + 1, ad)
    model._decoders.clear()   # the compiled graphs hold the linears as they were
    # the compile cache's key: the graphs hold a bank of these shapes (its contents are Parameters, not constants)
    model.config_digest = hashlib.sha256((digest or "").encode() +
                                         f"multi_lora:{max_rows}:{max_loras}:{max_rank}".encode()).hexdigest()
    model.adapter_bank = bank
    return bank


def uninstall(model) -> None:
    """The model as it was before install (its linears without deltas)."""
    bank = getattr(model, "adapter_bank", None)
    if bank is None:
        return
    for linear, cell in bank.cells.values():
        if linear.lora is cell:
            linear.lora = None
    model.config_digest = bank.digest
    model._decoders.clear()
    del model.adapter_bank
