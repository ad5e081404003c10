"""LoRA fine-tuning under tensor / expert parallel (`--tensor_parallel_size N [--expert_parallel true]`, generate.py's
flags): the model split over every rank of the launch as inference splits it (parallel.py), every rank training
the same batch, equal to one process step for step.

Which LoRA tensors a rank holds whole, and what its gradient of them is (lora.sites slices A and B like their
linear; the loss is the same on every rank: forward.VocabParallelHead):
- column-parallel linears (q/k/v, gate/up): A is whole on every rank but its gradient is partial (each rank's
  B rows see only their slice of the output): summed over the ranks. B is sliced, its gradient local and exact;
  except a KV head replicated over world / n_kv ranks (more ranks than KV heads): each copy's B rows get only the
  gradient of that rank's query heads, so the copies are summed over the ranks holding that head (written into
  the whole part's rows, all-reduced, taken back: the sum runs only over the ranks sharing a head);
- row-parallel linears (o, down): A is sliced by input columns (its gradient exact), B whole with a partial
  gradient (each rank's A x covers its columns only): summed over the ranks;
- linears outside any split region (visual.merger's): whole, with the whole gradient on every rank: left alone.
The clip norm is over unique elements: each rank adds its sliced tensors' squares, and a tensor held on c ranks
counts 1 / c per rank, before one all-reduce.

Saving: the slices are put back into PEFT's whole tensors (the inverse of the slicing: the rank's rows into their
source rows, its columns into theirs; a replicated KV head taken from its first holder), and the AdamW moments the
same way into the one process's layout, so a checkpoint made on N ranks resumes on N ranks or on one process (and
one process's on N). Rank 0 writes. Data parallel combined with tensor parallel and ZeRO under it are refused by
name. On the host in NumPy, with one all-reduce per step for the gradients and one per save.
"""
from __future__ import annotations

import numpy as np

from .. import parallel
from .args import FinetuneError, check_parallel

# what a rank holds of a LoRA tensor, and what its gradient is
SLICED, PARTIAL, SHARED, WHOLE = "sliced", "partial", "shared", "whole"


def size(args) -> int:
    return int(getattr(args, "tensor_parallel_size", 1) or 1)


def data_ranks(args, launched: int, model=None) -> int:
    """The data-parallel ranks of this launch (1 under tensor parallel: all ranks train the same batch), after the
    checks that must fail alike on every rank before any process group is joined."""
    tp, ep = size(args), bool(getattr(args, "expert_parallel", False))
    check_parallel(args)
    if tp == 1:
        return launched
    if launched != tp:
        raise FinetuneError(f"tensor_parallel_size {tp} but {launched} worker process(es) were launched: tensor "
                            f"parallel takes every rank (data parallel combined with it is not implemented); start "
                            f"msrun --worker_num={tp} --local_worker_num={tp} ...")
    if model is None:
        from ..config import ConfigError, Glm4vConfig
        try:
            cfg = Glm4vConfig.from_pretrained(args.model_name_or_path)
        except (ConfigError, OSError, ValueError) as e:
            raise FinetuneError(f"model_name_or_path: {' '.join(str(e).split())}") from None
    else:
        cfg = model.config
    if ep and not cfg.text.n_routed_experts:
        raise FinetuneError(f"expert_parallel: {cfg.model_type} has no experts")
    try:
        parallel.check(cfg, parallel.Layout(0, tp, ep))
    except parallel.ParallelError as e:
        raise FinetuneError(str(e)) from None
    return 1


def init(args):
    """Join the launch's process group; the trainer's World: this rank, one data-parallel rank, no ZeRO."""
    from .distributed import World
    lay = parallel.init(size(args), bool(getattr(args, "expert_parallel", False)))
    return World(lay.rank, 1, 0)


def load_keys(args) -> dict:
    """from_pretrained's keys for this run's layout."""
    tp = size(args)
    return {"tensor_parallel_size": tp, "expert_parallel": bool(getattr(args, "expert_parallel", False))} \
        if tp > 1 else {}


def plan_line(model, args, n_trainable: int) -> str:
    """The memory plan line of one rank (plan.tensor_parallel_plan: the rank's slices, its layer widths)."""
    from .. import attention
    from .plan import _item, describe, tensor_parallel_plan
    lay, bs, L = model.layout, args.per_device_train_batch_size, args.cutoff_len
    p = tensor_parallel_plan(model.config, _item(model), bs, L, model.loras[0].r, lay.world, lay.expert_parallel,
                             args.optim, attention.mode() == "plain", n_trainable)
    return (f"per rank ({lay.world} ranks, tensor parallel{', experts whole' if lay.expert_parallel else ''}): "
            + describe(p, bs, L, bool(getattr(model, "recompute_layers", False))))


def holding(lo, module: str, lay, n_kv: int) -> tuple:
    """(what this rank holds of A, of B, on how many ranks B is) for one trained source module of a Lora."""
    site, p = lo.site, lo.part(module)
    if site.cols is not None:   # row-parallel
        return SLICED, PARTIAL, lay.world
    if all(q.rows is None for q in site.parts):   # outside any split region
        return WHOLE, WHOLE, lay.world
    if p.rows is None:
        return PARTIAL, WHOLE, lay.world
    if p.kind == parallel.KV and n_kv < lay.world:   # a KV head replicated over world / n_kv ranks
        return PARTIAL, SHARED, lay.world // n_kv
    return PARTIAL, SLICED, 1


class Ranks:
    """The trainer's tensor-parallel side: reduce the LoRA gradients, clip them, vote, gather for saving."""

    def __init__(self, model):
        self.model, self.lay = model, model.layout
        self.n_kv = model.config.text.num_key_value_heads

    def tensors(self):
        """(lora, module, 'A' | 'B', what the rank holds, on how many ranks it is) in lora.trainable's order."""
        out = []
        for lo in self.model.loras:   # read each time: resuming replaces the Lora cells
            for m in lo.targets:
                a, b, copies = holding(lo, m, self.lay, self.n_kv)
                out.append((lo, m, "A", a, 1 if a == SLICED else self.lay.world))
                out.append((lo, m, "B", b, copies))
        return out

    # ---- the collectives
    def _sum(self, v: np.ndarray) -> np.ndarray:
        from mindspore import Tensor, ops
        return ops.AllReduce()(Tensor(np.ascontiguousarray(v, np.float32))).asnumpy()

    def vote(self, value) -> float:
        """The sum of a number over the ranks (a stop request on any rank stops every rank after the same step;
        also a barrier)."""
        return float(self._sum(np.array([value], np.float32))[0])

    # ---- gradients
    def reduce(self, grads):
        """The partial gradients summed over the ranks (a replicated KV head's over the ranks that hold it)."""
        from mindspore import Tensor
        grads = list(grads)
        pieces, where = [], []
        for i, (lo, m, which, kind, copies) in enumerate(self.tensors()):
            if kind == PARTIAL:
                g = grads[i].asnumpy()
                pieces.append(g.reshape(-1))
                where.append((i, None, g.shape))
            elif kind == SHARED:   # into the whole part's rows at this rank's head, so only its holders add up
                g = grads[i].asnumpy()
                n = lo.part(m).size
                head = int(lo.part(m).rows[0]) // n
                whole = np.zeros((self.n_kv * n,) + g.shape[1:], np.float32)
                whole[head * n:(head + 1) * n] = g
                pieces.append(whole.reshape(-1))
                where.append((i, slice(head * n, (head + 1) * n), whole.shape))
        if not pieces:
            return grads
        flat = self._sum(np.concatenate(pieces))
        o = 0
        for (i, rows, shape), piece in zip(where, pieces):
            v = flat[o:o + piece.size].reshape(shape)
            o += piece.size
            grads[i] = Tensor(np.ascontiguousarray(v if rows is None else v[rows]))
        return grads

    def clip(self, grads, max_norm: float):
        """clip_grad_norm_ over the unique elements of the whole adapter: (clipped grads, the norm)."""
        from mindspore import Tensor
        sq = 0.0
        for g, (_, _, _, _, copies) in zip(grads, self.tensors()):
            a = g.asnumpy().astype(np.float64)
            sq += float((a * a).sum()) / copies
        total = float(np.sqrt(self._sum(np.array([sq], np.float32))[0]))
        coef = min(1.0, max_norm / (total + 1e-6))
        return [g * Tensor(np.float32(coef)) for g in grads], total

    # ---- saving and resuming
    def _whole(self, arrays) -> list:
        """Each tensor's whole source layout (PEFT's: A (r, in), B (out, r)) from every rank's slice of it."""
        lay, items = self.lay, self.tensors()
        pieces, out = [], []
        for a, (lo, m, which, kind, _) in zip(arrays, items):
            p = lo.part(m)
            if kind in (WHOLE, PARTIAL):   # the same on every rank (partial gradients, summed: whole tensors)
                out.append(np.asarray(a, np.float32) if which == "A" else _unperm(np.asarray(a, np.float32), p.perm))
                continue
            if which == "A":
                w = np.zeros((a.shape[0], a.shape[1] * lay.world), np.float32)
                w[:, lo.site.cols] = a
            else:
                w = np.zeros((len(p.whole_perm),) + a.shape[1:], np.float32)
                first = kind != SHARED or lay.rank % (lay.world // self.n_kv) == 0   # a replicated head's first holder
                if first:
                    w[p.rows] = _unperm(np.asarray(a, np.float32), p.perm)
            out.append(None)
            pieces.append(w)
        if pieces:
            flat = self._sum(np.concatenate([w.reshape(-1) for w in pieces]))
            o, k = 0, 0
            for i, v in enumerate(out):
                if v is None:
                    w = pieces[k]
                    out[i] = flat[o:o + w.size].reshape(w.shape)
                    o, k = o + w.size, k + 1
        return out

    def gather(self, opt=None):
        """Every rank: the adapter's whole PEFT tensors, kept on each Lora for adapter.save (rank 0 writes them);
        with `opt`, its state in the one process's layout (returned)."""
        items = self.tensors()
        params = [(lo.A if w == "A" else lo.B)[lo.targets.index(m)] for lo, m, w, _, _ in items]
        whole = self._whole([p.asnumpy() for p in params])
        for lo in self.model.loras:
            lo.whole = {}
        for (lo, m, which, _, _), w in zip(items, whole):
            a, b = lo.whole.get(m, (None, None))
            lo.whole[m] = (w, b) if which == "A" else (a, w)
        if opt is None:
            return None
        st = opt.state()
        for tag in ("exp_avg", "exp_avg_sq"):
            if f"{tag}.0" not in st:
                continue
            src = self._whole([st[f"{tag}.{i}"] for i in range(len(items))])
            for i, ((lo, m, which, _, _), w) in enumerate(zip(items, src)):
                st[f"{tag}.{i}"] = w if which == "A" else w[lo.part(m).whole_perm]   # our row order, whole
        return st

    def local_state(self, d: dict) -> dict:
        """A checkpoint's (whole, one process's layout) optimizer state -> this rank's slices of it."""
        d = dict(d)
        for i, (lo, m, which, kind, _) in enumerate(self.tensors()):
            p = lo.part(m)
            for tag in ("exp_avg", "exp_avg_sq"):
                key = f"{tag}.{i}"
                if key not in d:
                    continue
                w = np.asarray(d[key], np.float32)
                if which == "A":
                    d[key] = w[:, lo.site.cols] if lo.site.cols is not None else w
                    continue
                wp = p.whole_perm if p.whole_perm is not None else p.perm
                src = np.empty_like(w)
                src[wp] = w
                d[key] = (src[p.rows] if p.rows is not None else src)[p.perm]
        return d


def _unperm(b: np.ndarray, perm) -> np.ndarray:
    """Our rows (row j = source row perm[j]) back in the source's order."""
    out = np.empty_like(b)
    out[perm] = b
    return out
