"""Several LoRA adapters on one model at once, each row of a batch with its own (vLLM's --lora-modules): the
server decodes requests for different adapters, and for the base, in the same step.

Each adapter is read by the PEFT reader (finetune/adapter.py: loaded onto the model, its cells read, removed
again), so what it accepts and refuses, and the row orders of fused linears, are the library's. Per linear that
any adapter targets, the adapters' deltas are stacked: A (K+1, R, in), B (K+1, out, R), scaling (K+1,), index 0
an all-zero adapter (the base, and any adapter that leaves this linear alone). A fused linear's trained parts
become one low-rank product (A's rows stacked, B block-diagonal) and ranks are zero-padded to the largest R: the
added terms are exact zeros, so a row's delta is its adapter's, (B_k (A_k x)) * s_k.

Which adapter each row takes comes from a small int32 Parameter (`rows`, one entry per cache row) written on the
host before every device step (`select`) and gathered in the graph: the compiled graphs stay the same whatever
mix of adapters a batch holds. A Parameter rather than a graph argument, because the `lora` hook of a linear takes
its input only (layers.Linear), and written with ops.assign, which a compiled graph sees (set_data is not seen
by a graph compiled before it, MindSpore 2.10). A batch-1 prompt (the engine's prefill) reads row 0; a 2-D input
(the vision merger's patches, one prompt's) is that one prompt's.
"""
from __future__ import annotations

import hashlib
import json
import os

import mindspore as ms
import numpy as np
from mindspore import Parameter, Tensor, nn, ops

from .finetune import adapter as peft_adapter
from .finetune import lora as L

_bmm_nt = ops.BatchMatMul(transpose_b=True)


class LoraModulesError(ValueError):
    """A --lora-modules value that cannot be served: one line for the user."""


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


def check_folders(modules) -> None:
    """The cheap checks, before the model loads: each path a PEFT LoRA folder this reader takes."""
    for name, path in modules:
        try:
            peft_adapter.read_config(path)
        except peft_adapter.AdapterError as e:
            raise LoraModulesError(f"--lora-modules {name}: {e}") from None
        if not os.path.isfile(os.path.join(path, peft_adapter.WEIGHTS)):
            raise LoraModulesError(f"--lora-modules {name}: {path}: no {peft_adapter.WEIGHTS}")


class MultiLora(nn.Cell):
    """A linear's `lora` hook over stacked adapters: row b's delta is adapter rows[b]'s."""

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


def _effective(lo: L.Lora):
    """One Lora cell's delta as a single low-rank product: A (n r, in), B (out, n r) block-diagonal."""
    r, sizes = lo.r, [size for size, _ in lo.segments]
    a = np.concatenate([p.asnumpy() for p in lo.A], 0)
    b = np.zeros((sum(sizes), len(lo.targets) * r), np.float32)
    start, j = 0, 0
    for (size, on) in lo.segments:
        if on:
            b[start:start + size, j * r:(j + 1) * r] = lo.B[j].asnumpy()
            j += 1
        start += size
    return a, b, lo.scaling


class Bank:
    """The adapters served beside the base: names in order (index k + 1 in `rows`), their folders."""

    def __init__(self, names, paths, rows: Parameter, cells: dict, digest):
        self.names, self.paths, self.rows = list(names), list(paths), rows
        self.cells = cells     # our linear's path -> (the linear, its MultiLora)
        self.digest = digest   # the model's config_digest before the bank
        self.max_rows = int(rows.shape[0])

    def select(self, adapters) -> None:
        """Before a device step: row b of the next graph takes adapter adapters[b] (0: the base)."""
        v = np.zeros(self.max_rows, np.int32)
        a = np.asarray(adapters, np.int32).reshape(-1)
        v[:len(a)] = a
        ops.assign(self.rows, Tensor(v))

    def index(self, name: str | None) -> int:
        """0 for the base (None), k + 1 for the k-th adapter."""
        return 0 if name is None else self.names.index(name) + 1


def install(model, modules, max_rows: int) -> Bank:
    """Load every (name, folder) adapter and put the stacked deltas on the model's linears; the model's own
    adapter, if any, is removed. Raises LoraModulesError (one line) for an adapter that does not fit the model.
    Under tensor parallel each rank stacks its slices (the reader slices A and B like the linear they sit on)."""
    uninstall(model)
    digest = model.config_digest
    per_site, order = {}, []
    for k, (name, path) in enumerate(modules):
        try:
            loras = peft_adapter.load(model, path)
        except (peft_adapter.AdapterError, L.LoraError) as e:
            L.remove(model)
            raise LoraModulesError(f"--lora-modules {name}: {e} (an adapter for another base?)"
                                   if "shape" in str(e) else f"--lora-modules {name}: {e}") from None
        for lo in loras:
            if lo.site.ours not in per_site:
                per_site[lo.site.ours] = (lo.site.linear, {})
                order.append(lo.site.ours)
            per_site[lo.site.ours][1][k] = _effective(lo)
        L.remove(model)
    K = len(modules)
    rows = Parameter(Tensor(np.zeros(max_rows, np.int32)), name="lora_rows", requires_grad=False)
    cells = {}
    for ours in order:
        linear, got = per_site[ours]
        n_in = next(iter(got.values()))[0].shape[1]
        n_out = next(iter(got.values()))[1].shape[0]
        R = max(a.shape[0] for a, _, _ in got.values())
        A = np.zeros((K + 1, R, n_in), np.float32)
        B = np.zeros((K + 1, n_out, R), np.float32)
        S = np.zeros(K + 1, np.float32)
        for k, (a, b, s) in got.items():
            A[k + 1, :a.shape[0]], B[k + 1, :, :b.shape[1]], S[k + 1] = a, b, s
        linear.lora = MultiLora(ours, A, B, S, rows)
        cells[ours] = (linear, linear.lora)
    model._decoders.clear()   # the compiled graphs hold the linears as they were
    # the compile cache's key: the graphs now hold these adapters' stacks (and a selector of max_rows)
    h = hashlib.sha256((model.config_digest or "").encode() + f"multi_lora:{max_rows}".encode())
    for name, path in modules:
        for f in (peft_adapter.CONFIG, peft_adapter.WEIGHTS):
            with open(os.path.join(path, f), "rb") as fh:
                h.update(name.encode() + b"\0" + fh.read())
    model.config_digest = h.hexdigest()
    bank = Bank([n for n, _ in modules], [p for _, p in modules], rows, cells, digest)
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

