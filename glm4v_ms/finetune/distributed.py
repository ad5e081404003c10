"""Training on several cards: data parallel, and sharded state (DeepSpeed's ZeRO stages 1, 2 and 3, the
`deepspeed` key of LLaMA-Factory's recipes), one process per card under msrun (finetune.py at the repository root).

Data: the one-process order of samples with micro-batches of per_device_train_batch_size x N samples (trainer.Plan),
each split into N contiguous shares, rank r taking share r (`share`); so no sample is seen twice in an epoch and
none is skipped. The last batch of an epoch may be short: it is split as evenly as it goes, and refused (`check_split`)
only when it has fewer samples than ranks. The loss is the sum over the step's trained tokens of every rank, divided
by their global count (all-reduced with the loss, in `sum_scalars`), so the step equals one process with the same
global batch, up to the order of float sums.

Gradients and optimizer state (`Flat`): the trainable parameters flattened into one float32 vector, padded to a
multiple of N and cut into N contiguous slices; one collective moves the whole vector.
- stage 0: the summed gradient is all-reduced; every rank updates every parameter (state replicated);
- stage 1: the same all-reduce, but each rank keeps the optimizer state of its slice only, updates that slice,
  and the updated slices are all-gathered into the parameters;
- stage 2: as 1, and each rank keeps only its slice of the reduced gradient (the clip norm is all-reduced from the
  slices). MindSpore's CPU backend (MCCL) has only all-reduce (sum), all-gather and broadcast: there the reduction
  is an all-reduce and a slice; on Ascend HCCL's ReduceScatter does it in one collective. Its documented contract
  (mindspore.ops.ReduceScatter): input (M, *) with M divisible by the group size, output (M / N, *); that rank r
  receives the r-th chunk is the collective's usual definition, assumed here: not yet run on hardware.
Stage 2 reduces in buckets of reduce_bucket_size elements (Flat.buckets): bucket j is the j-th chunk of every
rank's slice, so one reduce-scatter per bucket hands each rank the next chunk of its own slice and no float32
vector longer than a bucket is ever held.
Stage 3 (`Zero3`): the decoder's linear weights held as slices, gathered inside the graph just before use, their
backward giving each rank its slice's global gradient; the rest of the trained tensors through stage 2.
Checkpoints hold the whole optimizer state (the slices gathered), in the one-process format: a run saved on N
ranks resumes on any number of them.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass

import numpy as np

from .args import FinetuneError


# ---------------------------------------------------------------------------------------------- the process group
@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    stage: int = 0   # ZeRO stage; 0 on one process (one slice is the whole)
    bucket: int = 0  # elements per bucket of the stage-2 gradient reduction (0: the whole vector at once)

    @property
    def sharded(self) -> bool:
        return self.size > 1 and self.stage > 0


def launched() -> int:
    from ..parallel import launched_world
    return launched_world()


def init(stage: int) -> World:
    """Join the launch's process group (all ranks, and msrun's scheduler process, which serves there)."""
    size = launched()
    if size == 1:
        return World(0, 1, 0)
    from mindspore import communication

    from ..parallel import hold_whole_model
    hold_whole_model()   # the model loaded next is whole on every rank (no tensor-parallel layout)
    communication.init()
    return World(communication.get_rank(), communication.get_group_size(), int(stage))


def sum_scalars(world: World, values) -> list:
    """The per-rank values summed over the ranks (float64 on the host; one small all-reduce)."""
    if world.size == 1:
        return list(values)
    import mindspore as ms
    from mindspore import Tensor, ops
    out = ops.AllReduce()(Tensor(np.asarray(values, np.float32), ms.float32)).asnumpy()
    return [float(v) for v in out]


# ---------------------------------------------------------------------------------------------- the data split
def check_split(n: int, per_device: int, world: int):
    """Every global batch must give every rank a sample: refused when an epoch's last batch has fewer samples than
    ranks (no sample is repeated or dropped to fill it)."""
    if world == 1:
        return
    g = per_device * world
    last = n % g
    if n < world or 0 < last < world:
        raise FinetuneError(f"per_device_train_batch_size {per_device} x {world} ranks: the {n} training samples "
                            f"leave a last batch of {last or n} per epoch, fewer than the {world} ranks (every rank "
                            f"needs a sample of every batch); use a sample count whose remainder over {g} is 0 or at "
                            f"least {world}")


def share(indices, rank: int, world: int) -> list:
    """Rank `rank`'s contiguous share of one global micro-batch (equal shares; a short last batch as even as goes)."""
    if world == 1:
        return list(indices)
    return [int(i) for i in np.array_split(np.asarray(indices, np.int64), world)[rank]]


# ---------------------------------------------------------------------------------------------- flat slices
class Flat:
    """The trainable parameters as one float32 vector of `padded` elements (a multiple of the world), rank r's
    slice [lo, hi)."""

    def __init__(self, params, world: World):
        self.shapes = [tuple(int(d) for d in p.shape) for p in params]
        self.sizes = [int(np.prod(s)) for s in self.shapes]
        self.offsets = np.cumsum([0] + self.sizes)[:-1].tolist()
        self.n = int(sum(self.sizes))
        self.k = math.ceil(self.n / world.size)
        self.world = world.size
        self.padded = self.k * world.size
        self.lo, self.hi = world.rank * self.k, (world.rank + 1) * self.k

    def flatten(self, arrays) -> np.ndarray:
        v = np.zeros(self.padded, np.float32)
        for a, o, s in zip(arrays, self.offsets, self.sizes):
            v[o:o + s] = np.asarray(a, np.float32).reshape(-1)
        return v

    def split(self, v) -> list:
        return [np.asarray(v[o:o + s]).reshape(sh) for o, s, sh in zip(self.offsets, self.sizes, self.shapes)]

    def pieces(self, a: int, b: int) -> tuple:
        """The flat range [a, b) as (tensor index, start, end) pieces of the flattened tensors; (-1, 0, n) for n
        elements of the padding past the last tensor."""
        out = []
        for i, (o, s) in enumerate(zip(self.offsets, self.sizes)):
            lo, hi = max(a, o), min(b, o + s)
            if lo < hi:
                out.append((i, lo - o, hi - o))
        if b > self.n:
            out.append((-1, 0, b - max(a, self.n)))
        return tuple(out)

    def buckets(self, size: int) -> tuple:
        """The reduction's buckets for `size` elements each (0: one bucket, the whole vector): bucket j is the j-th
        chunk of c = ceil(size / N) elements of every rank's slice, in rank order (N equal chunks, the last bucket's
        shorter), so that a reduce-scatter of it hands rank r the next chunk of its own slice. One bucket of
        c >= k is the whole vector in order. Each bucket: (chunk length, pieces of rank 0's chunk, rank 1's ...)."""
        c = self.k if size <= 0 else max(1, min(self.k, -(-int(size) // self.world)))
        out = []
        for a in range(0, self.k, c):
            m = min(c, self.k - a)
            out.append((m,) + tuple(self.pieces(r * self.k + a, r * self.k + a + m) for r in range(self.world)))
        return tuple(out)


def use_reduce_scatter() -> bool:
    """HCCL has ReduceScatter; MCCL (CPU) does not (GLM45V.md section 2.2)."""
    import mindspore as ms
    return ms.get_context("device_target") == "Ascend"


def _cells():
    """The collective graphs (built on first use: they import MindSpore)."""
    import mindspore as ms
    from mindspore import nn, ops

    class Reduce(nn.Cell):
        """Summed local gradients -> the global gradient times `scale`: the whole list (stages 0 and 1 keep it
        whole), or this rank's flat slice (stage 2, bucket by bucket: Flat.buckets)."""

        def __init__(self, flat: Flat, stage: int, scatter: bool, bucket: int = 0):
            super().__init__()
            self.flat, self.stage, self.scatter = flat, stage, scatter
            self.pad = flat.padded - flat.n
            self.all_reduce = ops.AllReduce()
            self.reduce_scatter = ops.ReduceScatter(ops.ReduceOp.SUM) if scatter else None
            self.buckets = flat.buckets(bucket) if stage == 2 else ()
            self.rank = flat.lo // flat.k

        @ms.jit
        def construct(self, grads, scale):
            if self.stage == 2:
                # one bucket's float32 vector at a time (cast, reduced, this rank's chunk kept): never the whole
                mine = []
                for b in self.buckets:
                    parts = []
                    for r in range(1, len(b)):
                        for i, s, e in b[r]:
                            if i < 0:
                                parts.append(ops.zeros((e - s,), ms.float32))
                            else:
                                parts.append(grads[i].reshape(-1)[s:e].astype(ms.float32))
                    v = ops.cat(parts) if len(parts) > 1 else parts[0]
                    if self.scatter:
                        mine.append(self.reduce_scatter(v))
                    else:
                        mine.append(self.all_reduce(v)[self.rank * b[0]:(self.rank + 1) * b[0]])
                out = ops.cat(mine) if len(mine) > 1 else mine[0]
                return out * scale
            parts = []
            for i in range(len(grads)):
                parts.append(grads[i].astype(ms.float32).reshape(-1))
            if self.pad:
                parts.append(ops.zeros((self.pad,), ms.float32))
            v = ops.cat(parts)
            v = self.all_reduce(v) * scale
            if self.stage == 1:
                return v
            out = []
            for i in range(len(grads)):
                o, s = self.flat.offsets[i], self.flat.sizes[i]
                out.append(v[o:o + s].reshape(self.flat.shapes[i]))
            return tuple(out)

    class ClipFlat(nn.Cell):
        """clip_grad_norm_ on a flat gradient: the whole vector (stage 1) or a slice (stage 2: the squares summed
        over the ranks)."""

        def __init__(self, sliced: bool):
            super().__init__()
            self.sliced = sliced
            self.all_reduce = ops.AllReduce()

        @ms.jit
        def construct(self, g, max_norm):
            sq = (g * g).sum()
            if self.sliced:
                sq = self.all_reduce(sq.reshape(1)).reshape(())
            total = ops.sqrt(sq)
            coef = ops.clamp(max_norm / (total + 1e-6), max=1.0)
            return g * coef, total

    return Reduce, ClipFlat


class Sharding:
    """The optimizer's side of data parallel: reduce the gradients, clip them, hold the update's slice."""

    def __init__(self, params, world: World):
        self.world, self.flat = world, Flat(params, world)
        Reduce, ClipFlat = _cells()
        self.reducer = Reduce(self.flat, world.stage, world.stage == 2 and use_reduce_scatter(), world.bucket)
        self.clipper = ClipFlat(world.stage == 2)

    def reduce(self, grads, scale: float):
        import mindspore as ms
        from mindspore import Tensor
        out = self.reducer(ms.mutable(tuple(grads)), Tensor(np.float32(scale)))
        return list(out) if self.world.stage == 0 else out

    def clip(self, g, max_norm: float):
        from mindspore import Tensor
        return self.clipper(g, Tensor(np.float32(max_norm)))

    def gather(self, part) -> np.ndarray:
        """All ranks' slices of a flat vector, joined (a collective: every rank calls it)."""
        from mindspore import ops
        return ops.AllGather()(part).asnumpy()


# ---------------------------------------------------------------------------------------------- ZeRO-3
def sharded_name(name: str, numel: int, threshold: int) -> bool:
    """The parameters ZeRO-3 holds as slices: the decoder layers' linear weights (layers.Linear) of more than
    `threshold` elements, trained or frozen. Everything else (norms, biases, the embedding and lm_head, which the
    training forward reads directly, the vision tower and the merger, which a rank with no image in its share does
    not run) stays whole on every rank."""
    import re
    return numel > threshold and re.match(r"text\.layers\.\d+\.(attn|mlp)\..*\.weight$", name) is not None


def _gathered_cell():
    import mindspore as ms
    from mindspore import nn, ops

    class Gathered(nn.Cell):
        """One sharded weight: this rank's 1/N flat slice in, the whole weight out (an all-gather inside the
        compiled graph). Its backward hands the slice the global gradient of that slice: the whole local gradient
        summed over the ranks, this rank's part kept (all-reduce and a slice on CPU, whose MCCL has no
        ReduceScatter, which AllGather's own backward needs; ReduceScatter on Ascend: Reduce's contract)."""

        def __init__(self, shape, flat: Flat, scatter: bool):
            super().__init__()
            self.shape, self.n, self.pad = tuple(shape), flat.n, flat.padded - flat.n
            self.lo, self.hi = flat.lo, flat.hi
            self.gather = ops.AllGather()
            self.all_reduce = ops.AllReduce()
            self.scatter = ops.ReduceScatter(ops.ReduceOp.SUM) if scatter else None

        def construct(self, shard):
            whole = self.gather(shard)
            return (whole[:self.n] if self.pad else whole).reshape(self.shape)

        def bprop(self, shard, out, dout):
            g = dout.reshape(-1).astype(ms.float32)
            if self.pad:
                g = ops.cat([g, ops.zeros((self.pad,), ms.float32)])
            g = self.scatter(g) if self.scatter is not None else self.all_reduce(g)[self.lo:self.hi]
            return (g.astype(shard.dtype),)

    return Gathered


class Zero3:
    """ZeRO-3 (sharded parameters) over a loaded model: each weight that `sharded_name` picks is replaced in its
    layers.Linear by a Parameter of the same name holding this rank's 1/N slice of it (flattened, padded to a
    multiple of N), and the Linear gathers it whole just before its matmul (layers.Linear.gathered), inside the
    training graph. With recompute per layer the backward's recompute gathers it again, so only the layers in
    flight are whole at once (on hardware; MindSpore's CPU graphs keep every layer's intermediates, plan.py).
    `values()` gathers every sharded weight whole for saving, `loading()` for a resume (collectives)."""

    def __init__(self, model, world: World, threshold: int):
        from mindspore import Parameter, Tensor

        from ..layers import Linear
        Gathered = _gathered_cell()
        scatter = use_reduce_scatter()
        self.world, self.items = world, []   # (Linear, shard Parameter, its Flat, its shape)
        names = {id(p): n for n, p in model.parameters_and_names()}
        for _, cell in model.text.layers.cells_and_names():
            if not isinstance(cell, Linear):
                continue
            w = cell.weight
            if not sharded_name(names[id(w)], int(w.size), threshold):
                continue
            fl = Flat([w], world)
            part = self._slice(w, fl)
            shard = Parameter(Tensor(part).astype(w.dtype), name=w.name, requires_grad=w.requires_grad)
            cell.weight = shard
            cell.gathered = Gathered(w.shape, fl, scatter)
            self.items.append((cell, shard, fl, tuple(w.shape)))
        self.ids = {id(shard) for _, shard, _, _ in self.items}

    @staticmethod
    def _slice(w, fl: Flat) -> np.ndarray:
        """This rank's part of a whole tensor, as float32 (numpy has no bf16), padded with zeros."""
        import mindspore as ms
        v = w.reshape(-1).astype(ms.float32).asnumpy()
        out = np.zeros(fl.k, np.float32)
        part = v[fl.lo:min(fl.hi, fl.n)]
        out[:len(part)] = part
        return out

    def sliced(self, p) -> bool:
        return id(p) in self.ids

    def gather(self, shard, fl: Flat, shape):
        """The whole value of one sharded tensor (a collective)."""
        from mindspore import ops
        whole = ops.AllGather()(shard)
        return whole[:fl.n].reshape(shape)

    def values(self, keep: bool = True) -> dict:
        """Every sharded weight's whole value (float32), by name: a collective, every rank calls it; a rank that
        does not write (keep False) drops each as it comes. The layers keep their slices (the compiled graphs hold
        them)."""
        import mindspore as ms
        out = {}
        for _, shard, fl, shape in self.items:
            v = self.gather(shard, fl, shape)
            if keep:
                out[shard.name] = v.astype(ms.float32).asnumpy()
        return out

    def loading(self):
        """A context for loading a checkpoint (before training: no graph holds the slices yet): every sharded
        weight gathered whole into its Linear (a collective); on leaving, each slice takes its part of the value
        then held and goes back in place."""
        import contextlib

        from mindspore import Parameter, Tensor

        @contextlib.contextmanager
        def ctx():
            for cell, shard, fl, shape in self.items:
                cell.weight = Parameter(self.gather(shard, fl, shape), name=shard.name,
                                        requires_grad=shard.requires_grad)
            try:
                yield
            finally:
                for cell, shard, fl, shape in self.items:
                    shard.set_data(Tensor(self._slice(cell.weight, fl)).astype(shard.dtype))
                    cell.weight = shard
        return ctx()


# ---------------------------------------------------------------------------------------------- per-rank silence
def silence_other_ranks():
    """Under msrun only rank 0 speaks (their exit codes still count); the scheduler process says nothing."""
    from ..parallel import rank
    if rank() != 0:
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, 1)
        os.dup2(null, 2)
