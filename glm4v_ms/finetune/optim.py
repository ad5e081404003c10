"""Optimizers, gradient clipping and learning-rate schedules with torch's and transformers' exact formulas.

- `adamw_torch`: torch.optim.AdamW's single-tensor update (what it runs on CPU tensors), betas (0.9, 0.999),
  eps 1e-8 (transformers' TrainingArguments defaults): p *= 1 - lr wd; m = lerp(m, g, 1 - b1);
  v = b2 v + (1 - b2) g^2; p -= lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps).
  mindspore's nn.AdamWeightDecay is a different rule (FINETUNE.md section 5), so the few lines are written here.
- `sgd`: p -= lr g (with weight decay: g + wd p, as torch.optim.SGD).
- clip: torch.nn.utils.clip_grad_norm_: total = ||(||g_i||)||, g *= min(1, max_norm / (total + 1e-6)).
- schedules: transformers.get_scheduler's lambdas (constant, linear, cosine with warmup); warmup_ratio gives
  ceil(total * ratio) warmup steps when warmup_steps is 0.
The updates run as one compiled graph over all parameters (ms.jit): per-parameter eager ops cost ~0.1-1 ms each.
A parameter held narrower than float32 (bf16 full fine-tuning) is updated through a float32 master kept in the
optimizer state (sharded with the moments under ZeRO 1/2), the parameter being its rounding.
On several ranks (distributed.py) the optimizer also reduces the gradients; with sharded state (ZeRO 1/2) it
keeps the moments of its flat slice only and runs the same per-element update on that slice (_ShardUpdate); under
ZeRO-3 (Zero3Optimizer) the sliced weights update their own slices.
"""
from __future__ import annotations

import math

import mindspore as ms
import numpy as np
from mindspore import Parameter, ParameterTuple, Tensor, nn, ops


def lr_lambda(kind: str, step: int, total: int, warmup: int) -> float:
    if kind == "constant":   # transformers' "constant" ignores warmup (constant_with_warmup is another type)
        return 1.0
    if step < warmup:
        return float(step) / float(max(1, warmup))
    if kind == "linear":
        return max(0.0, float(total - step) / float(max(1, total - warmup)))
    if kind == "cosine":
        progress = float(step - warmup) / float(max(1, total - warmup))
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * 0.5 * 2.0 * progress)))
    raise ValueError(f"lr_scheduler_type {kind!r}: use constant, linear or cosine")


def warmup_steps(total: int, steps: int, ratio: float) -> int:
    return steps if steps > 0 else math.ceil(total * ratio)


class Schedule:
    """LambdaLR: `lr()` for the next optimizer step; step() after each one."""

    def __init__(self, kind, base_lr, total, warmup, last=0):
        self.kind, self.base, self.total, self.warmup, self.last = kind, float(base_lr), int(total), int(warmup), last

    def lr(self) -> float:
        return self.base * lr_lambda(self.kind, self.last, self.total, self.warmup)

    def step(self):
        self.last += 1

    def state(self) -> dict:
        return {"kind": self.kind, "base_lr": self.base, "total": self.total, "warmup": self.warmup, "last": self.last}


class _Update(nn.Cell):
    """One graph for the whole update (the parameters and states are Parameters assigned in place)."""

    def __init__(self, params, kind, b1, b2, eps, wd):
        super().__init__()
        self.kind, self.b1, self.b2, self.eps, self.wd = kind, b1, b2, eps, wd
        self.params = ParameterTuple(params)
        zero = lambda p, tag: Parameter(Tensor(np.zeros(p.shape, np.float32)), name=f"{p.name}.{tag}",  # noqa: E731
                                        requires_grad=False)
        self.m = ParameterTuple([zero(p, "exp_avg") for p in params]) if kind == "adamw_torch" else ()
        self.v = ParameterTuple([zero(p, "exp_avg_sq") for p in params]) if kind == "adamw_torch" else ()
        # a weight held narrower than float32 (bf16 full fine-tuning) is updated through a float32 master, the
        # model's copy its rounding (LLaMA-Factory trains float32 parameters under bf16 autocast)
        self.masters = masters(params)
        self.narrow = tuple(p.dtype != ms.float32 for p in params)
        self.master_of = tuple(int(np.cumsum(self.narrow)[i]) - 1 for i in range(len(params)))

    @ms.jit
    def construct(self, grads, lr, bc1, bc2_sqrt):
        for i in range(len(self.params)):
            p, g = self.params[i], grads[i].astype(ms.float32)
            w = self.masters[self.master_of[i]] if self.narrow[i] else p
            if self.kind == "sgd":
                if self.wd != 0.0:
                    g = g + self.wd * w
                new = w - lr * g
            else:
                w2 = w * (1.0 - lr * self.wd)
                m = self.m[i] + (g - self.m[i]) * (1.0 - self.b1)
                v = self.v[i] * self.b2 + g * g * (1.0 - self.b2)
                ops.assign(self.m[i], m)
                ops.assign(self.v[i], v)
                denom = ops.sqrt(v) / bc2_sqrt + self.eps
                new = w2 - (lr / bc1) * (m / denom)
            ops.assign(w, new)   # narrow: the master (the caller rounds it into p: CPU has no bf16 Assign)
        return lr

    def round_into_params(self):
        for i, p in enumerate(self.params):
            if self.narrow[i]:
                p.set_data(self.masters[self.master_of[i]].astype(p.dtype))


def masters(params):
    """float32 copies of the parameters held narrower than float32, in order."""
    return ParameterTuple([Parameter(p.astype(ms.float32), name=f"{p.name}.master", requires_grad=False)
                           for p in params if p.dtype != ms.float32])


class _ShardUpdate(nn.Cell):
    """_Update's per-element maths on this rank's slice [lo, hi) of the flattened parameters, then the updated
    slices all-gathered back into every parameter (ZeRO stages 1 and 2)."""

    def __init__(self, params, flat, kind, b1, b2, eps, wd):
        super().__init__()
        self.kind, self.b1, self.b2, self.eps, self.wd, self.flat = kind, b1, b2, eps, wd, flat
        self.params = ParameterTuple(params)
        zero = lambda tag: Parameter(Tensor(np.zeros(flat.k, np.float32)), name=f"flat.{tag}",  # noqa: E731
                                     requires_grad=False)
        self.m = zero("exp_avg") if kind == "adamw_torch" else None
        self.v = zero("exp_avg_sq") if kind == "adamw_torch" else None
        self.gather = ops.AllGather()
        # weights narrower than float32: this rank's slice of their float32 masters, sharded with the moments
        self.narrow = any(p.dtype != ms.float32 for p in params)
        self.master = None
        if self.narrow:
            whole = flat.flatten([p.astype(ms.float32).asnumpy() for p in params])
            self.master = Parameter(Tensor(whole[flat.lo:flat.hi]), name="flat.master", requires_grad=False)

    @ms.jit
    def construct(self, g, lr, bc1, bc2_sqrt):
        if self.narrow:
            p = self.master + 0.0
        else:
            parts = []
            for i in range(len(self.params)):
                parts.append(self.params[i].astype(ms.float32).reshape(-1))
            if self.flat.padded > self.flat.n:
                parts.append(ops.zeros((self.flat.padded - self.flat.n,), ms.float32))
            p = ops.cat(parts)[self.flat.lo:self.flat.hi]
        if self.kind == "sgd":
            if self.wd != 0.0:
                g = g + self.wd * p
            p = p - lr * g
        else:
            p = p * (1.0 - lr * self.wd)
            m = self.m + (g - self.m) * (1.0 - self.b1)
            v = self.v * self.b2 + g * g * (1.0 - self.b2)
            ops.assign(self.m, m)
            ops.assign(self.v, v)
            p = p - (lr / bc1) * (m / (ops.sqrt(v) / bc2_sqrt + self.eps))
        if self.narrow:
            ops.assign(self.master, p)
        whole = self.gather(p)
        if self.narrow:   # the caller rounds it into the parameters (CPU has no bf16 Assign)
            return whole
        for i in range(len(self.params)):
            o, s = self.flat.offsets[i], self.flat.sizes[i]
            ops.assign(self.params[i], whole[o:o + s].reshape(self.flat.shapes[i]).astype(self.params[i].dtype))
        return lr

    def round_into_params(self, whole):
        for i, p in enumerate(self.params):
            o, s = self.flat.offsets[i], self.flat.sizes[i]
            p.set_data(whole[o:o + s].reshape(self.flat.shapes[i]).astype(p.dtype))


class Optimizer:
    """adamw_torch or sgd over a fixed parameter list; `step(grads, lr)`; state() / load_state() for checkpoints.
    `world` (distributed.World): on several ranks `reduce` sums the gradients over them, and with ZeRO 1/2 the
    state is this rank's slice (state() gathers it whole, load_state() takes the slice of a whole one)."""

    def __init__(self, params, kind="adamw_torch", weight_decay=0.0, betas=(0.9, 0.999), eps=1e-8, world=None):
        if kind not in ("adamw_torch", "sgd"):
            raise ValueError(f"optim {kind!r}: use adamw_torch or sgd")
        self.params, self.kind, self.t = list(params), kind, 0
        self.b1, self.b2 = betas
        self.world, self.wd = world, float(weight_decay)
        self.sharding = None
        if world is not None and world.size > 1:
            from .distributed import Sharding
            self.sharding = Sharding(self.params, world)
        if world is not None and world.sharded:
            self.update = _ShardUpdate(self.params, self.sharding.flat, kind, float(betas[0]), float(betas[1]),
                                       float(eps), self.wd)
        else:
            self.update = _Update(self.params, kind, float(betas[0]), float(betas[1]), float(eps), self.wd)

    def reduce(self, grads, scale: float):
        """The step's summed gradients -> the global ones times `scale` (1 / the trained tokens): a list, or under
        ZeRO the flat vector (stage 1) / this rank's flat slice (stage 2)."""
        if self.sharding is None:
            return [g * scale for g in grads]
        return self.sharding.reduce(grads, scale)

    def clip(self, grads, max_norm: float):
        if self.sharding is None or self.world.stage == 0:   # whole gradients (one process, or unsharded ranks)
            return clip_grad_norm(grads, max_norm)
        return self.sharding.clip(grads, max_norm)

    def step(self, grads, lr: float):
        self.t += 1
        bc1 = 1.0 - self.b1 ** self.t
        bc2 = math.sqrt(1.0 - self.b2 ** self.t)
        f = lambda x: Tensor(np.float32(x))  # noqa: E731
        if isinstance(self.update, _ShardUpdate):
            if self.world.stage == 1:   # the whole reduced gradient: this rank's slice of it
                grads = grads[self.sharding.flat.lo:self.sharding.flat.hi]
            out = self.update(grads, f(lr), f(bc1), f(bc2))
            if self.update.narrow:
                self.update.round_into_params(out)
            return
        self.update(ms.mutable(tuple(grads)), f(lr), f(bc1), f(bc2))   # mutable: a new tuple is not a new graph
        if self.update.masters:
            self.update.round_into_params()

    def state(self) -> dict:
        """The whole state, in one format for any number of ranks (sharded: a collective, every rank calls it)."""
        out = {"step": np.array(self.t, np.int64)}
        if isinstance(self.update, _ShardUpdate):
            sh = self.sharding
            tags = (("exp_avg", self.update.m), ("exp_avg_sq", self.update.v)) if self.kind == "adamw_torch" else ()
            for tag, part in tags + ((("master", self.update.master),) if self.update.narrow else ()):
                for i, a in enumerate(sh.flat.split(sh.gather(part))):
                    if tag != "master" or self.params[i].dtype != ms.float32:
                        out[f"{tag}.{i}"] = a
            return out
        for i, (m, v) in enumerate(zip(self.update.m, self.update.v)):
            out[f"exp_avg.{i}"], out[f"exp_avg_sq.{i}"] = m.asnumpy(), v.asnumpy()
        narrow = [i for i, p in enumerate(self.params) if p.dtype != ms.float32]
        for i, w in zip(narrow, self.update.masters):
            out[f"master.{i}"] = w.asnumpy()
        return out

    def load_state(self, d: dict):
        """A state from state() (any number of ranks). A weight held narrower than float32 takes its master from
        the state when it is there, else from its current value (a state saved before the weight was narrow)."""
        self.t = int(d["step"])
        master = lambda i: (np.asarray(d[f"master.{i}"], np.float32) if f"master.{i}" in d  # noqa: E731
                            else self.params[i].astype(ms.float32).asnumpy())
        if isinstance(self.update, _ShardUpdate):
            fl = self.sharding.flat
            n = len(fl.sizes)
            if self.kind == "adamw_torch":
                for tag, part in (("exp_avg", self.update.m), ("exp_avg_sq", self.update.v)):
                    whole = fl.flatten([d[f"{tag}.{i}"] for i in range(n)])
                    part.set_data(Tensor(whole[fl.lo:fl.hi]))
            if self.update.narrow:
                whole = fl.flatten([master(i) for i in range(n)])
                self.update.master.set_data(Tensor(whole[fl.lo:fl.hi]))
            return
        for i, (m, v) in enumerate(zip(self.update.m, self.update.v)):
            m.set_data(Tensor(np.asarray(d[f"exp_avg.{i}"], np.float32)))
            v.set_data(Tensor(np.asarray(d[f"exp_avg_sq.{i}"], np.float32)))
        narrow = [i for i, p in enumerate(self.params) if p.dtype != ms.float32]
        for i, w in zip(narrow, self.update.masters):
            w.set_data(Tensor(master(i)))


class Zero3Optimizer:
    """ZeRO-3 (distributed.Zero3): the trained weights held as slices update their slices in place with their own
    moments and float32 masters, from the gradient their backward already made global (no gather after the
    update: the next forward gathers them); the trained tensors held whole (norms, biases, embedding, head) go
    through ZeRO-2 (Optimizer on a stage-2 world: their flat vector reduced bucket by bucket, this rank's slice
    updated, the slices all-gathered). The clip norm sums both parts' squares over the ranks. state() is the
    one-process format (every slice gathered), load_state() takes this rank's slices of one."""

    def __init__(self, params, zero3, kind="adamw_torch", weight_decay=0.0, betas=(0.9, 0.999), eps=1e-8,
                 world=None):
        import dataclasses
        self.params, self.kind, self.wd, self.world, self.zero3 = list(params), kind, float(weight_decay), world, zero3
        self.b1 = betas[0]
        self.mine = [i for i, p in enumerate(self.params) if zero3.sliced(p)]
        self.rest = [i for i, p in enumerate(self.params) if not zero3.sliced(p)]
        self.local = Optimizer([self.params[i] for i in self.mine], kind, weight_decay, betas, eps) \
            if self.mine else None
        self.shared = Optimizer([self.params[i] for i in self.rest], kind, weight_decay, betas, eps,
                                world=dataclasses.replace(world, stage=2)) if self.rest else None
        self.flats = {id(sh): (fl, shape) for _, sh, fl, shape in zero3.items}
        self.sum = ops.AllReduce()
        self.sharding = None

    @property
    def t(self) -> int:
        return (self.local or self.shared).t

    def reduce(self, grads, scale: float):
        mine = [grads[i] * scale for i in self.mine]   # already each slice's global gradient
        rest = self.shared.reduce([grads[i] for i in self.rest], scale) if self.shared else None
        return mine, rest

    def clip(self, grads, max_norm: float):
        mine, rest = grads
        sq = Tensor(np.zeros(1, np.float32))
        for g in mine:
            sq = sq + (g.astype(ms.float32) ** 2).sum()
        if rest is not None:
            sq = sq + (rest * rest).sum()
        total = ops.sqrt(self.sum(sq)).reshape(())
        coef = ops.clamp(max_norm / (total + 1e-6), max=1.0)
        return ([g * coef.astype(g.dtype) for g in mine], None if rest is None else rest * coef), total

    def step(self, grads, lr: float):
        mine, rest = grads
        if self.local:
            self.local.step(mine, lr)
        if self.shared:
            self.shared.step(rest, lr)

    def state(self) -> dict:
        out = {"step": np.array(self.t, np.int64)}
        if self.shared:
            for k, v in self.shared.state().items():
                if k != "step":
                    tag, j = k.rsplit(".", 1)
                    out[f"{tag}.{self.rest[int(j)]}"] = v
        if self.local:
            for k, v in self.local.state().items():
                if k != "step":
                    tag, j = k.rsplit(".", 1)
                    i = self.mine[int(j)]
                    fl, shape = self.flats[id(self.params[i])]
                    out[f"{tag}.{i}"] = self.zero3.gather(Tensor(v), fl, shape).asnumpy()
        return out

    def load_state(self, d: dict):
        if self.shared:
            sub = {"step": d["step"]}
            for j, i in enumerate(self.rest):
                sub.update({f"{tag}.{j}": d[f"{tag}.{i}"] for tag in ("exp_avg", "exp_avg_sq", "master")
                            if f"{tag}.{i}" in d})
            self.shared.load_state(sub)
        if self.local:
            sub = {"step": d["step"]}
            for j, i in enumerate(self.mine):
                fl, _ = self.flats[id(self.params[i])]
                for tag in ("exp_avg", "exp_avg_sq", "master"):
                    if f"{tag}.{i}" in d:
                        sub[f"{tag}.{j}"] = fl.flatten([d[f"{tag}.{i}"]])[fl.lo:fl.hi]
            self.local.load_state(sub)


def clip_grad_norm(grads, max_norm: float):
    """torch.nn.utils.clip_grad_norm_ (foreach off): returns (clipped grads, the total norm before clipping)."""
    norms = ops.stack([ops.norm(g.astype(ms.float32)) for g in grads])
    total = ops.norm(norms)
    coef = ops.clamp(max_norm / (total + 1e-6), max=1.0)
    return [g * coef for g in grads], total
