"""The layers the text decoder, the MoE block and the vision tower share: a linear (row-parallel when it ends in an
all-reduce), a norm's weights, the vocab-parallel embedding and the SwiGLU MLP. The training forward runs these
same classes (LoRA wraps a `Linear`, it does not fork the model).
"""
from __future__ import annotations

from mindspore import Parameter, nn, ops
from mindspore.common.initializer import initializer

from .parallel import Layout, all_reduce, to_ranks


def _param(shape, dtype, name=None):
    # lazily initialised: no memory until loaded (or first used), so loading never holds two copies
    return Parameter(initializer("zeros", shape, dtype), name=name, requires_grad=False)


class Norm(nn.Cell):
    """Holds a norm's weight (and bias); the maths is attention.rms_norm / layer_norm."""
    def __init__(self, dim, dtype, bias=False):
        super().__init__()
        self.weight = _param((dim,), dtype)
        self.bias = _param((dim,), dtype) if bias else None


class Embedding(nn.Cell):
    """Vocab-parallel on several ranks: ids outside this rank's rows give zeros, the all-reduce fills them in."""
    def __init__(self, vocab, dim, dtype, lay: Layout = Layout()):
        super().__init__()
        part = lay.part(vocab)
        self.v0, self.n = part.start, part.stop - part.start
        self.weight = _param((self.n, dim), dtype)
        self.reduce = all_reduce(lay)

    def construct(self, ids):
        if self.reduce is None:
            return ops.gather(self.weight, ids, 0)
        local = ids - self.v0
        mine = (local >= 0) & (local < self.n)
        h = ops.gather(self.weight, ops.where(mine, local, ops.zeros_like(local)), 0)
        return self.reduce(h * mine[..., None].astype(h.dtype))


_mm_nt = ops.MatMul(transpose_b=True)


class Linear(nn.Cell):
    """`reduce`: an all-reduce after the matmul (a row-parallel linear: each rank holds some input columns)."""
    def __init__(self, n_in, n_out, dtype, bias=False, reduce=None):
        super().__init__()
        self.weight = _param((n_out, n_in), dtype)
        self.bias = _param((n_out,), dtype) if bias else None
        self.reduce = reduce
        self.lora = None   # finetune/lora.py: a LoRA delta added to the output (one per fused source linear)
        self.gathered = None   # ZeRO-3 (finetune/distributed.py): weight is this rank's slice, gathered here

    def construct(self, x):
        w = self.weight
        if self.gathered is not None:   # gathered after x exists: just before its use, not all at the start
            w = self.gathered(ops.depend(w, x))
        # MatMul(transpose_b), not ops.dense: eager (PyNative) dense runs ~2.5x slower on CPU; same kernel in a graph
        y = _mm_nt(x.reshape(-1, x.shape[-1]), w).reshape(x.shape[:-1] + (w.shape[0],))
        if self.bias is not None:
            y = y + self.bias
        if self.lora is not None:
            y = y + self.lora(x).astype(y.dtype)
        return y if self.reduce is None else self.reduce(y)


class MLP(nn.Cell):
    """SwiGLU; on several ranks gate/up column- and down row-parallel (reduce=False: the caller sums)."""
    def __init__(self, dim, hidden, dtype, lay: Layout = Layout(), reduce=True):
        super().__init__()
        self.hidden = hidden // lay.world
        self.gate_up = Linear(dim, 2 * self.hidden, dtype)
        self.down = Linear(self.hidden, dim, dtype, reduce=all_reduce(lay) if reduce else None)
        self.enter = to_ranks(lay) if reduce else None   # a shared expert is inside its MoE block's region

    def construct(self, x):
        if self.enter is not None:
            x = self.enter(x)
        gate, up = ops.split(self.gate_up(x), self.hidden, -1)
        return self.down(ops.silu(gate) * up)
