"""Training on several cards: data parallel, and sharded optimizer state (DeepSpeed's ZeRO stages 1 and 2, the
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
Stage 3 (the parameters themselves sharded) is refused by name. Checkpoints hold the whole optimizer state (the
slices gathered), in the one-process format: a run saved on N ranks resumes on any number of them.
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
        self.padded = self.k * world.size
        self.lo, self.hi = world.rank * self.k, (world.rank + 1) * self.k

    def flatten(self, arrays) -> np.ndarray:
        v = np.zeros(self.padded, np.float32)
        for a, o, s in zip(arrays, self.offsets, self.sizes):
            v[o:o + s] = np.asarray(a, np.float32).reshape(-1)
        return v

    def split(self, v) -> list:
        return [np.asarray(v[o:o + s]).reshape(sh) for o, s, sh in zip(self.offsets, self.sizes, self.shapes)]


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
        whole), or this rank's flat slice (stage 2)."""

        def __init__(self, flat: Flat, stage: int, scatter: bool):
            super().__init__()
            self.flat, self.stage, self.scatter = flat, stage, scatter
            self.pad = flat.padded - flat.n
            self.all_reduce = ops.AllReduce()
            self.reduce_scatter = ops.ReduceScatter(ops.ReduceOp.SUM) if scatter else None

        @ms.jit
        def construct(self, grads, scale):
            parts = []
            for i in range(len(grads)):
                parts.append(grads[i].astype(ms.float32).reshape(-1))
            if self.pad:
                parts.append(ops.zeros((self.pad,), ms.float32))
            v = ops.cat(parts)
            if self.stage == 2:
                if self.scatter:
                    return self.reduce_scatter(v) * scale
                return self.all_reduce(v)[self.flat.lo:self.flat.hi] * scale
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
        self.reducer = Reduce(self.flat, world.stage, world.stage == 2 and use_reduce_scatter())
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


# ---------------------------------------------------------------------------------------------- per-rank silence
def silence_other_ranks():
    """Under msrun only rank 0 speaks (their exit codes still count); the scheduler process says nothing."""
    from ..parallel import rank
    if rank() != 0:
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, 1)
        os.dup2(null, 2)
