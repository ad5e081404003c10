"""Tensor and expert parallelism: which slice of each weight a rank holds, and the collectives that join them.

One process per card, started by MindSpore's launcher (msrun); `mindspore.communication` carries the
collectives (HCCL on Ascend, MCCL on CPU). Megatron-style layers, as a property of each linear:
- column-parallel (output rows split): q/k/v, MLP gate/up, expert gate/up; no communication;
- row-parallel (input columns split): attention o, MLP down, expert down; one all-reduce (sum) after;
- vocab-parallel: the embedding rows (ids outside the rank's range give zeros, then all-reduce) and lm_head
  (each rank's vocab slice of the logits, then all-gather);
- replicated: norms, the router, the vision tower (12 heads do not divide by 8; vLLM replicates it too).
KV heads are split like q heads while there are enough of them; with more ranks than KV heads each KV head is
replicated over world/kv ranks (vLLM's rule), so the cache per rank is 1/world of it, or one head.
Experts: split inside each expert (TP) or whole experts per rank (EP, `expert_parallel`); either way a MoE
block's routed and shared partial sums meet in one all-reduce. Only all-reduce (sum), all-gather and broadcast
are used: the collectives MindSpore's CPU backend has.

The weight loader applies `shard` to each checkpoint tensor before any transform, on the memory map, so a rank
copies only its own slices.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

# split kinds of a checkpoint tensor (weights.Entry.split)
REPLICATED, OUT, IN, HALVES, KV = "", "out", "in", "halves", "kv"


class ParallelError(ValueError):
    """A parallel size the model or the launch cannot take."""


@dataclass(frozen=True)
class Layout:
    """This process's place: rank of world; experts split inside (TP) or whole per rank (EP)."""
    rank: int = 0
    world: int = 1
    expert_parallel: bool = False

    def part(self, n: int) -> slice:
        """This rank's contiguous share of n (n divisible by world, checked by `check`)."""
        k = n // self.world
        return slice(self.rank * k, (self.rank + 1) * k)

    def kv_heads(self, n_kv: int) -> int:
        return max(1, n_kv // self.world)

    def kv_part(self, n_kv: int) -> slice:
        """KV heads of this rank: a contiguous share, or the one head it replicates when world > n_kv."""
        if n_kv >= self.world:
            return self.part(n_kv)
        h = self.rank * n_kv // self.world
        return slice(h, h + 1)

    def experts(self, n: int) -> slice:
        """Whole experts held here: all of them (TP) or a contiguous share (EP)."""
        return self.part(n) if self.expert_parallel else slice(0, n)

    @property
    def expert_tp(self) -> int:
        """How many ways each expert's inner dimension is split."""
        return 1 if self.expert_parallel else self.world


def check(cfg, lay: Layout):
    """Every split dimension must divide by the world size: one clear error naming the first that does not."""
    if lay.world == 1:
        return
    t, w = cfg.text, lay.world
    need = [("attention heads", t.num_attention_heads), ("text intermediate_size", t.intermediate_size),
            ("vocab_size", t.vocab_size)]
    if t.n_routed_experts:
        need.append(("moe_intermediate_size x n_shared_experts", t.moe_intermediate_size * t.n_shared_experts))
        need.append(("n_routed_experts", t.n_routed_experts) if lay.expert_parallel
                    else ("moe_intermediate_size", t.moe_intermediate_size))
    for what, n in need:
        if n % w:
            raise ParallelError(f"tensor_parallel_size {w} does not divide the {what} ({n})")
    kv = t.num_key_value_heads
    if (kv % w) if kv >= w else (w % kv):
        raise ParallelError(f"tensor_parallel_size {w} and the {kv} key/value heads: one must divide the other")


def shard(kind: str, arr, lay: Layout, head_dim: int = 0, n_kv: int = 0):
    """This rank's slice of one checkpoint tensor (a memory map: only the slice is read)."""
    if lay.world == 1 or kind == REPLICATED:
        return arr
    if kind == OUT:
        return arr[lay.part(arr.shape[0])]
    if kind == IN:
        return arr[:, lay.part(arr.shape[1])]
    if kind == HALVES:   # a fused [gate; up] tensor: the same share of each half
        half = arr.shape[0] // 2
        s = lay.part(half)
        return np.concatenate([arr[s], arr[half + s.start:half + s.stop]], 0)
    if kind == KV:
        s = lay.kv_part(n_kv)
        return arr[s.start * head_dim:s.stop * head_dim]
    raise ValueError(f"unknown split kind {kind!r}")


# ----------------------------------------------------------------------------------------------- the process group
_LAYOUT = None
_REPLICAS = 1   # processes of the launch holding the same weights (data parallel): see hold_whole_model


def launched_world() -> int:
    """Worker processes in this launch (msrun / the dynamic-cluster variables), 1 outside a launch."""
    # msrun runs the script in its scheduler process too (MS_SCHED): there communication.init() serves the
    # workers until they finish, so it must take the same path as they do
    launched = os.environ.get("MS_ROLE") in ("MS_WORKER", "MS_SCHED")
    return int(os.environ.get("MS_WORKER_NUM", "1") or 1) if launched else 1


def hold_whole_model():
    """The launch's processes are data-parallel replicas (the fine-tuning trainer): each holds every weight, so a
    model built here takes no tensor-parallel layout from the launch's size."""
    global _REPLICAS
    _REPLICAS = launched_world()


def rank() -> int:
    """This process's rank (0 outside a launch): known before communication starts, so rank 0 alone prints."""
    if _LAYOUT is not None:
        return _LAYOUT.rank
    if os.environ.get("MS_ROLE") == "MS_SCHED":
        return -1   # msrun's scheduler process: not a rank, says nothing
    for k in ("RANK_ID", "MS_NODE_ID"):
        if os.environ.get(k, "").isdigit():
            return int(os.environ[k])
    return 0


def init(tensor_parallel_size: int = 1, expert_parallel: bool = False) -> Layout:
    """Join the launch's process group (once per process) and return this rank's layout."""
    global _LAYOUT
    tp = int(tensor_parallel_size or 1)
    if tp < 1:
        raise ParallelError(f"tensor_parallel_size must be >= 1, got {tp}")
    world = launched_world() // _REPLICAS
    if tp == 1 and world == 1:
        if expert_parallel:
            raise ParallelError("expert_parallel needs tensor_parallel_size > 1 (the ranks to place experts on)")
        return Layout()
    if world != tp:
        raise ParallelError(f"tensor_parallel_size {tp} but {world} worker process(es) were launched: start "
                            f"one process per rank, e.g. msrun --worker_num={tp} --local_worker_num={tp} ...")
    if _LAYOUT is None:
        from mindspore import communication
        communication.init()
        _LAYOUT = Layout(communication.get_rank(), communication.get_group_size(), False)
    if _LAYOUT.world != tp:
        raise ParallelError(f"this process group has {_LAYOUT.world} ranks, not {tp}")
    return Layout(_LAYOUT.rank, _LAYOUT.world, bool(expert_parallel))


# ----------------------------------------------------------------------------------------------- collectives
# A row-parallel linear's all-reduce and the copy of a replicated input into column-parallel linears are
# Megatron's pair of conjugate ops: the sum's backward passes the (replicated) gradient through unchanged, and the
# copy's backward sums each rank's partial gradient of the input. MindSpore's own AllReduce backward all-reduces
# the gradient again (world times too large, and the input's gradient stays partial): right for its auto-parallel
# graphs, wrong for hand-split layers. Measured on 2 ranks (a split MLP, grads vs one process): 6.1 off with the
# default, 1.4e-7 with these. Inference runs only the forwards (the copy is the identity).
_CELLS = {}


def _cells():
    if not _CELLS:
        from mindspore import nn, ops

        class Sum(nn.Cell):
            def __init__(self):
                super().__init__()
                self.op = ops.AllReduce()

            def construct(self, x):
                return self.op(x)

            def bprop(self, x, out, dout):
                return (dout,)

        class Copy(nn.Cell):
            def __init__(self):
                super().__init__()
                self.op = ops.AllReduce()

            def construct(self, x):
                return x

            def bprop(self, x, out, dout):
                return (self.op(dout),)

        class Gather(nn.Cell):
            """Concatenation over the ranks on axis 0; the backward keeps this rank's rows of a replicated gradient
            (what a reduce-scatter gives when every rank holds the same loss)."""
            def __init__(self, rank: int):
                super().__init__()
                self.op, self.rank = ops.AllGather(), rank

            def construct(self, x):
                return self.op(x)

            def bprop(self, x, out, dout):
                n = x.shape[0]
                return (dout[self.rank * n:(self.rank + 1) * n],)

        _CELLS.update(Sum=Sum, Copy=Copy, Gather=Gather)
    return _CELLS


def all_reduce(lay: Layout):
    """A sum over the ranks (usable inside ms.jit; backward: the identity), or None on one rank."""
    return None if lay.world == 1 else _cells()["Sum"]()


def to_ranks(lay: Layout):
    """Where a replicated activation enters split layers (column-parallel linears, a MoE block, the
    vocab-parallel head): the identity forward, the sum of the ranks' input gradients backward. None on one rank."""
    return None if lay.world == 1 else _cells()["Copy"]()


def gather_rows(lay: Layout):
    """All-gather on axis 0 whose backward keeps this rank's rows (for a replicated loss). None on one rank."""
    return None if lay.world == 1 else _cells()["Gather"](lay.rank)


def all_gather(lay: Layout):
    """Concatenation over the ranks along axis 0, or None on one rank."""
    if lay.world == 1:
        return None
    from mindspore import ops
    return ops.AllGather()


def broadcast_int(lay: Layout, value: int) -> int:
    """Rank 0's value on every rank (e.g. a sampling seed, so that all ranks draw the same tokens)."""
    if lay.world == 1:
        return value
    from mindspore import Tensor, ops
    return int(ops.Broadcast(0)((Tensor(np.array([value], np.int32)),))[0].asnumpy()[0])
