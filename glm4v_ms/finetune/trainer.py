"""The training loop: `run(args, train, eval, processor)` with LLaMA-Factory's keys (FinetuneArgs) as transformers'
Trainer runs them, over the model's own layers (forward.py), LoRA (lora.py) and PEFT's format (adapter.py).

One optimizer step = `gradient_accumulation_steps` micro-batches of `per_device_train_batch_size` samples; the loss
is the sum of the step's trained tokens' cross-entropies over their count (transformers' num_items_in_batch), so the
gradient is that of the step's mean whatever the split. Steps per epoch and the total follow transformers'
Trainer (ceil over the batches, max_steps overriding num_train_epochs); the order of samples is a permutation per
epoch drawn from `seed` (unless disable_shuffling), a function of the step number alone: resuming skips the steps
done and goes on with the same batches, so it ends at the same weights as an uninterrupted run.

Output (output_dir): adapter_config.json + adapter_model.safetensors at the end; checkpoint-N/ every save_steps
(adapter, optimizer and scheduler state, the step = the data position), each written into a temporary folder and
renamed. Full / freeze fine-tuning (full.py) writes a Hugging Face checkpoint folder instead, in output_dir at the
end and in each checkpoint-N (export.save_hf: transformers' names, the base's dtypes, its tokenizer and processor
files), the checkpoint with the optimizer state next to it (bf16 weights' float32 masters included; and, when the
model runs wider than the base's dtype, the trained weights exactly, in trained.npz, so that resuming is exact);
Ctrl-C (interrupt.py) stops after the step with such a checkpoint and one line naming it; trainer_log.jsonl
(LLaMA-Factory's LogCallback lines); training_loss.png with plot_loss.

Under msrun (finetune.py) the trainer is data parallel (distributed.py): the plan is the one process's with
micro-batches of per_device_train_batch_size x N, each rank trains on its share of each, the loss and gradients
are summed over the ranks, optionally with the optimizer state sharded (the `deepspeed` key's ZeRO stage). Rank 0
logs, writes and plots; every rank takes part in the collectives, a checkpoint's included.
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import math
import os
import re
import shutil
import sys
import time
import types

import mindspore as ms
import numpy as np

from . import adapter, distributed, forward, full, interrupt, lora, optim, tensor_parallel

from .args import FinetuneError, check_batch_keys, persistence_threshold, reduce_bucket_size, zero_stage
from .data import collate

LOG, STATE, OPTIM, EXACT = "trainer_log.jsonl", "trainer_state.json", "optimizer.npz", "trained.npz"
CKPT = re.compile(r"checkpoint-(\d+)$")


# ---------------------------------------------------------------------------------------------- the schedule
def _count(value, total: int) -> int:
    """transformers' logging/save/warmup steps: a value under 1 is a fraction of the total steps."""
    value = float(value or 0)
    return math.ceil(value * total) if 0 < value < 1 else int(value)


class Plan:
    """Which samples each optimizer step trains on, from the step number alone."""

    def __init__(self, n: int, batch: int, accum: int, epochs: float, max_steps: int, seed: int, shuffle: bool):
        self.n, self.batch, self.accum, self.seed, self.shuffle = n, batch, accum, seed, shuffle
        self.batches = math.ceil(n / batch)                                   # per epoch
        self.per_epoch = max(self.batches // accum + int(self.batches % accum > 0), 1)
        self.total = max_steps if max_steps > 0 else math.ceil(epochs * self.per_epoch)

    def order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.n)
        return np.random.default_rng([self.seed, epoch]).permutation(self.n)

    def step(self, k: int):
        """(list of micro-batches (lists of sample indices), epoch as a float after this step) of step k (0-based)."""
        epoch, j = divmod(k, self.per_epoch)
        order = self.order(epoch)
        first = j * self.accum
        micro = [order[b * self.batch:(b + 1) * self.batch].tolist()
                 for b in range(first, min(first + self.accum, self.batches))]
        return micro, epoch + (j + 1) / self.per_epoch


# ---------------------------------------------------------------------------------------------- checkpoints
def _atomic_dir(final: str, write):
    tmp = f"{final}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        write(tmp)
        if os.path.lexists(final):
            shutil.rmtree(final)
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _atomic_file(path: str, text: str):
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def checkpoints(folder: str) -> list:
    """checkpoint-N folders in `folder`, by N."""
    if not os.path.isdir(folder):
        return []
    found = [(int(m.group(1)), os.path.join(folder, d)) for d in os.listdir(folder) if (m := CKPT.match(d))
             and os.path.isdir(os.path.join(folder, d))]
    return [p for _, p in sorted(found)]


# ---------------------------------------------------------------------------------------------- the trainer
class Trainer:
    def __init__(self, args, model, train, pad_id: int, log=None, jit: bool = True, world=None):
        self.args, self.model, self.train, self.pad_id = args, model, train, pad_id
        self.world = world or distributed.World()
        self.log = log or (lambda m: print(m, file=sys.stderr, flush=True))
        bs = args.per_device_train_batch_size
        distributed.check_split(len(train), bs, self.world.size)
        self.plan = Plan(len(train), bs * self.world.size, args.gradient_accumulation_steps, args.num_train_epochs,
                         args.max_steps, args.seed, not args.disable_shuffling)
        total = self.plan.total
        warm = _count(args.warmup_steps, total) or math.ceil(total * args.warmup_ratio)
        self.sched = optim.Schedule(args.lr_scheduler_type, args.learning_rate, total, warm)
        self.full = args.finetuning_type != "lora"
        self.params = full.trainable(model) if self.full else lora.trainable(model)
        self.n_trained = sum(int(np.prod(p.shape)) for p in self.params)   # whole, before any ZeRO-3 slicing
        self.zero3 = None
        kind = args.optim.replace("adamw_torch_fused", "adamw_torch")
        if self.world.stage == 3 and self.world.size > 1:   # sharded parameters (full / freeze: args.check)
            self.zero3 = distributed.Zero3(model, self.world, persistence_threshold(
                args.deepspeed, model.config.text.hidden_size))
            self.params = full.trainable(model)   # the slices, where sharded
            self.opt = optim.Zero3Optimizer(self.params, self.zero3, kind, args.weight_decay, world=self.world)
        else:
            self.opt = optim.Optimizer(self.params, kind, args.weight_decay, world=self.world)
        self.grad = forward.Grad(model, self.params, jit=jit)
        self.tp = tensor_parallel.Ranks(model) if model.layout.world > 1 else None   # the model split over the ranks
        self.max_norm = args.max_grad_norm
        self.out = args.output_dir
        self.logging_steps = max(1, _count(args.logging_steps, total))
        self.save_steps = _count(args.save_steps, total)
        self.step, self.epoch, self.history = 0, 0.0, []
        self.tokens_seen, self.t_start, self._start_step = 0, None, 0
        self.stop = False

    # ---- one optimizer step
    def train_step(self, k: int):
        micro, epoch = self.plan.step(k)
        w = self.world
        steps = [forward.prepare(self.model, **collate([self.train[i] for i in distributed.share(idx, w.rank, w.size)],
                                                       self.pad_id)) for idx in micro]
        n_items = sum(s.tokens for s in steps)
        total, grads = 0.0, None
        for st in steps:
            loss, g = self.grad(st)
            total += float(loss.asnumpy())
            grads = g if grads is None else [a + b for a, b in zip(grads, g)]
        seen = sum(s.length * s.cos.shape[0] for s in steps)
        # the loss over every rank's trained tokens; a Ctrl-C on any rank stops them all after this step
        total, n_items, seen, stop = distributed.sum_scalars(w, [total, n_items, seen, interrupt.requested()])
        self.stop = (self.tp.vote(stop) if self.tp else stop) > 0
        scale = 1.0 / max(n_items, 1)
        grads = self.opt.reduce(grads, scale)
        if self.tp:
            grads = self.tp.reduce(grads)
        if self.max_norm > 0:
            grads, _ = (self.tp or self.opt).clip(grads, self.max_norm)
        self.opt.step(grads, self.sched.lr())
        self.sched.step()
        self.step, self.epoch = k + 1, epoch
        self.tokens_seen += int(seen)
        return total * scale

    # ---- saving
    def adapter_config(self) -> dict:
        a = self.args
        mods = [m for lo in self.model.loras for m in lo.targets]
        r = self.model.loras[0].r
        cfg = getattr(self.model, "peft_config", None) or {}
        return adapter.config_dict(r, cfg.get("lora_alpha", a.alpha), float(cfg.get("lora_dropout", a.lora_dropout)),
                                   bool(cfg.get("use_rslora", a.use_rslora)), mods, a.model_name_or_path)

    def whole_values(self) -> dict:
        """ZeRO-3: every sharded weight's whole value by name (a collective: every rank calls it; rank 0 keeps
        them); {} otherwise."""
        return self.zero3.values(keep=self.world.rank == 0) if self.zero3 else {}

    def save_checkpoint(self) -> str:
        final = os.path.join(self.out, f"checkpoint-{self.step}")
        opt_state = self.tp.gather(self.opt) if self.tp else self.opt.state()   # sharded / split: gathered
        values = self.whole_values()
        if self.world.rank == 0:
            self._write_checkpoint(final, opt_state, values)
        return final

    def _write_checkpoint(self, final, opt_state, values):
        def write(tmp):
            if self.full:
                self.save_model(tmp, values)
                if _wider_than_base(self.model, self.args.model_name_or_path):
                    np.savez(os.path.join(tmp, EXACT), **{p.name: values[p.name] if p.name in values else p.asnumpy()
                                                          for p in self.params})
            else:
                adapter.save(self.model, tmp, self.adapter_config())
            np.savez(os.path.join(tmp, OPTIM), **opt_state)
            with open(os.path.join(tmp, STATE), "w", encoding="utf-8") as f:
                # batch: the global micro-batch (per device x ranks): a run resumes on any number of ranks with it
                json.dump({"global_step": self.step, "epoch": self.epoch, "max_steps": self.plan.total,
                           "finetuning_type": self.args.finetuning_type, "model": self.model.config_digest,
                           "trained": [p.name for p in self.params] if self.full else None,
                           "scheduler": self.sched.state(), "optim": self.opt.kind, "seed": self.plan.seed,
                           "shuffle": self.plan.shuffle, "num_samples": self.plan.n, "batch": self.plan.batch,
                           "accum": self.plan.accum, "ranks": self.world.size, "zero_stage": self.world.stage,
                           "log_history": self.history}, f, indent=2)
        _atomic_dir(final, write)
        limit = self.args.save_total_limit
        if limit:
            for old in checkpoints(self.out)[:-int(limit)]:
                shutil.rmtree(old, ignore_errors=True)

    def save_model(self, dst: str, values: dict | None = None):
        """The model's current weights as a Hugging Face checkpoint in the folder dst (which may exist: the files
        are moved in from export.save_hf's own atomic folder)."""
        from .export import save_hf
        tmp = os.path.join(dst, f".hf-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            save_hf(self.model, self.args.model_name_or_path, tmp, values)
        except ValueError as e:   # safetensors_io.WeightError: the base is no Hugging Face checkpoint of it
            shutil.rmtree(tmp, ignore_errors=True)
            raise FinetuneError(f"model_name_or_path: {' '.join(str(e).split())}") from None
        for name in os.listdir(tmp):
            target = os.path.join(dst, name)
            if os.path.isdir(target) and not os.path.islink(target):
                shutil.rmtree(target)
            os.replace(os.path.join(tmp, name), target)
        os.rmdir(tmp)

    def resume(self, folder: str):
        st = read_state(folder, self.args, self.model)
        for key, mine in (("num_samples", self.plan.n), ("batch", self.plan.batch), ("accum", self.plan.accum),
                          ("seed", self.plan.seed), ("optim", self.opt.kind)):
            if st.get(key) != mine:
                what = "batch (per_device_train_batch_size x ranks)" if key == "batch" else key
                raise FinetuneError(f"resume_from_checkpoint: {folder} was made with {what} {st.get(key)}, this run "
                                    f"has {mine}")
        if self.full:
            self._resume_full(folder, st)
            return
        mods = sorted(m for lo in self.model.loras for m in lo.targets)
        try:
            ad = adapter.read_config(folder)
        except adapter.AdapterError as e:
            raise FinetuneError(f"resume_from_checkpoint: {e}") from None
        if sorted(ad["target_modules"]) != mods or int(ad["r"]) != self.model.loras[0].r:
            raise FinetuneError(f"resume_from_checkpoint: {folder} holds a LoRA of other modules or rank than "
                                f"this run's lora_target / lora_rank")
        keep = [(p.name, p) for p in self.params]
        adapter.load(self.model, folder, projector=True)
        # the adapter load made new Parameters: point the optimizer and the gradient at them
        self.params = lora.trainable(self.model)
        assert [p.name for p in self.params] == [n for n, _ in keep]
        kind = self.opt.kind
        self.opt = optim.Optimizer(self.params, kind, self.opt.wd, world=self.world)
        with np.load(os.path.join(folder, OPTIM)) as d:
            self.opt.load_state(self.tp.local_state(dict(d)) if self.tp else dict(d))
        self.grad = forward.Grad(self.model, self.params, jit=self.grad.run is not self.grad.vg)
        self.sched.last = int(st["scheduler"]["last"])
        self.step, self.epoch, self.history = int(st["global_step"]), float(st["epoch"]), list(st["log_history"])

    def _resume_full(self, folder, st):
        with self.zero3.loading() if self.zero3 else contextlib.nullcontext():   # ZeRO-3: then sliced
            self.model.load_weights(folder)   # the whole Hugging Face checkpoint (the Parameters stay the same)
            exact = os.path.join(folder, EXACT)
            if os.path.isfile(exact):
                from mindspore import Tensor
                with np.load(exact) as d:
                    for p in full.trainable(self.model):
                        p.set_data(Tensor(d[p.name]).astype(p.dtype))
        with np.load(os.path.join(folder, OPTIM)) as d:
            self.opt.load_state(dict(d))
        self.sched.last = int(st["scheduler"]["last"])
        self.step, self.epoch, self.history = int(st["global_step"]), float(st["epoch"]), list(st["log_history"])

    # ---- the loop
    def run(self):
        total = self.plan.total
        self.t_start = time.time()
        start = self.step
        window = []
        bar = Progress(total, start)
        interrupt.training(True)
        try:
            for k in range(start, total):
                loss = self.train_step(k)
                window.append(loss)
                lr = self.sched.lr()
                bar.update(self.step, loss, lr, self.tokens_seen / max(time.time() - self.t_start, 1e-9))
                if self.step % self.logging_steps == 0 or self.step == total:
                    self.write_log(float(np.mean(window)), lr)
                    window = []
                # on several ranks the vote taken inside the step, so that every rank stops at the same one
                if self.stop or (self.world.size == 1 and not self.tp and interrupt.requested()):
                    path = self.save_checkpoint()
                    # msrun ends every rank as soon as one exits non-zero: none leaves before rank 0 has published
                    distributed.sum_scalars(self.world, [0.0])
                    if self.tp:
                        self.tp.vote(0)
                    bar.close()
                    self.log(f"interrupted: saved {path} (step {self.step} of {total}); run again with "
                             f"resume_from_checkpoint {path} to go on")
                    raise SystemExit(130)
                if self.save_steps and self.step % self.save_steps == 0 and self.step < total:
                    self.save_checkpoint()
        finally:
            interrupt.training(False)
        bar.close()
        if self.save_steps and total % self.save_steps == 0:
            self.save_checkpoint()   # transformers saves the last step's checkpoint too when it falls on save_steps
        if self.tp:
            self.tp.gather()   # every rank: the adapter's whole tensors, for rank 0 to write
        values = self.whole_values()   # ZeRO-3: every rank gathers the sharded weights, rank 0 writes them
        if self.world.rank == 0:
            self._publish(total, values)

    def _publish(self, total, values):
        if self.full:
            self.save_model(self.out, values)
        else:
            adapter.save(self.model, self.out, self.adapter_config())
        if self.args.plot_loss:
            from .plot import plot_loss
            plot_loss(self.out, [h["loss"] for h in self.history], [h["current_steps"] for h in self.history])
        self.log(f"[train] done: {total} steps in {datetime.timedelta(seconds=int(time.time() - self.t_start))}; "
                 f"the {'model' if self.full else 'adapter'} is in {self.out}")

    def write_log(self, loss, lr):
        if self.world.rank != 0:
            return
        el = time.time() - self.t_start
        rate = el / max(self.step - self._start_step, 1)
        entry = {"current_steps": self.step, "total_steps": self.plan.total, "loss": round(loss, 4), "lr": lr,
                 "epoch": round(self.epoch, 2),
                 "percentage": round(self.step / self.plan.total * 100, 2) if self.plan.total else 100,
                 "elapsed_time": str(datetime.timedelta(seconds=int(el))),
                 "remaining_time": str(datetime.timedelta(seconds=int(rate * (self.plan.total - self.step))))}
        self.history.append(entry)
        with open(os.path.join(self.out, LOG), "a", encoding="utf-8") as f:
            f.write(json.dumps(entry) + "\n")


class Progress:
    """One self-overwriting line on stderr when it is a terminal (step, loss, lr, tokens/s, ETA); otherwise a line
    every tenth of the run."""

    def __init__(self, total: int, start: int, stream=sys.stderr):
        self.total, self.start, self.stream, self.t0 = total, start, stream, time.time()
        self.tty = stream.isatty()
        self.every = max(1, total // 10)

    def update(self, step, loss, lr, tps):
        el = time.time() - self.t0
        eta = el / max(step - self.start, 1) * (self.total - step)
        line = (f"[train] step {step}/{self.total} loss {loss:.4f} lr {lr:.3g} {tps:,.0f} tokens/s "
                f"ETA {datetime.timedelta(seconds=int(eta))}")
        if self.tty:
            self.stream.write("\r" + line.ljust(100))
            self.stream.flush()
        elif step % self.every == 0 or step == self.total:
            print(line, file=self.stream, flush=True)

    def close(self):
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()


# ---------------------------------------------------------------------------------------------- the face
def _check(args):
    if args.finetuning_type not in ("lora", "full", "freeze"):
        raise FinetuneError(f"finetuning_type {args.finetuning_type}: use lora, full or freeze")
    if args.finetuning_type == "lora" and not args.freeze_vision_tower:
        raise FinetuneError("freeze_vision_tower false: training the vision tower with LoRA is not implemented "
                            "(finetuning_type full or freeze trains it)")
    if not args.output_dir:
        raise FinetuneError("output_dir: needed")


def read_state(folder, args, model) -> dict:
    """A checkpoint's trainer_state.json, refused (one line, before anything is written) when it comes from
    another finetuning_type, another model or (full / freeze) another trained set."""
    try:
        with open(os.path.join(folder, STATE), encoding="utf-8") as f:
            st = json.load(f)
    except (OSError, ValueError):
        raise FinetuneError(f"resume_from_checkpoint: {folder} holds no readable {STATE}") from None
    kind = st.get("finetuning_type", "lora")   # checkpoints from before full fine-tuning are LoRA ones
    if kind != args.finetuning_type:
        raise FinetuneError(f"resume_from_checkpoint: {folder} is a finetuning_type {kind} checkpoint, this run is "
                            f"{args.finetuning_type}")
    if st.get("model") and model.config_digest and st["model"] != model.config_digest:
        raise FinetuneError(f"resume_from_checkpoint: {folder} was trained from another model than "
                            f"{args.model_name_or_path} (its config.json differs)")
    names = getattr(model, "trained_names", None)
    if kind != "lora" and names is not None and st.get("trained") != list(names):
        raise FinetuneError(f"resume_from_checkpoint: {folder} trained other parameters than this run's keys "
                            f"select (freeze_* keys)")
    return st


def _digest(folder):
    """What model.config_digest holds for a folder (None when unreadable: the check is then the model's)."""
    import hashlib
    if not folder:
        return None
    try:
        with open(os.path.join(folder, "config.json"), "rb") as f:
            return hashlib.sha256(f.read()).hexdigest()
    except OSError:
        return None


def _wider_than_base(model, base) -> bool:
    """The model holds float32 weights of a base stored narrower (a bf16 checkpoint trained on CPU)."""
    import mindspore as ms
    if model.dtype != ms.float32:
        return False
    try:
        with open(os.path.join(base, "config.json"), encoding="utf-8") as f:
            cfg = json.load(f)
    except (OSError, ValueError):
        return True
    return str(cfg.get("dtype") or cfg.get("torch_dtype") or "float32") != "float32"


def _resume_point(args):
    """LLaMA-Factory's rule: resume_from_checkpoint names a checkpoint; without it, an output_dir that holds
    checkpoints resumes from the last unless overwrite_output_dir; another non-empty output_dir is an error."""
    r = args.resume_from_checkpoint
    out = args.output_dir
    if r:
        if not os.path.isdir(r):
            raise FinetuneError(f"resume_from_checkpoint: {r} is not a folder")
        return r
    if os.path.isdir(out) and os.listdir(out) and not args.overwrite_output_dir:
        last = checkpoints(out)
        if last:
            return last[-1]
        raise FinetuneError(f"output_dir: {out} exists and is not empty (set overwrite_output_dir, or resume)")
    return None


def setup(args, model):
    """LoRA on the model as the args ask: a given adapter to continue, else fresh (A kaiming, B zero); full /
    freeze: the trained set (full.select). Then recompute per decoder layer (and per vision block when the tower
    runs in the training graph)."""
    projector = not args.freeze_multi_modal_projector
    if args.finetuning_type != "lora":
        lay = getattr(model, "layout", None)
        if lay is not None and lay.world > 1:   # the training graphs of full.py take whole weights
            raise FinetuneError(f"finetuning_type {args.finetuning_type}: under tensor / expert parallel is not "
                                "implemented (data parallel is: one whole model per rank, ZeRO-1/2)")
        model.trained_names = full.select(model.config, args)
        _recompute(args, model)
        return
    try:
        if args.adapter_name_or_path:
            path = args.adapter_name_or_path
            path = path[0] if isinstance(path, (list, tuple)) else path
            adapter.load(model, path, dropout=args.lora_dropout, projector=projector)
        else:
            mods = lora.select(model, args.lora_target, projector)
            lora.inject(model, mods, args.lora_rank, args.alpha, args.lora_dropout, args.use_rslora, seed=args.seed,
                        projector=projector)
    except (lora.LoraError, adapter.AdapterError) as e:
        raise FinetuneError(str(e)) from None
    _recompute(args, model)


def _recompute(args, model):
    model.recompute_layers = False
    if args.recompute:
        from .. import attention
        if attention.mode() == "plain":
            # measured on demo-tiny (2 x 2048 tokens): 5.6 GB peak with Cell.recompute, 4.6 GB without; MindSpore's
            # CPU graphs keep every layer's intermediates either way (model.live_layers), so it only adds work
            print("[train] gradient checkpointing: off on CPU (it saves no memory there); per layer on Ascend",
                  file=sys.stderr)
        else:
            for layer in model.text.layers:
                layer.recompute()
            if forward.trains_tower(model):   # the tower runs in the training graph: per block there too
                for block in model.visual.blocks:
                    block.recompute()
            model.recompute_layers = True


def run(args, train, eval, processor, model=None, jit: bool = True) -> None:
    """Train as the args say; see the module docstring. `model`: an already loaded one (tests, benchmarks)."""
    _check(args)
    if not train:
        raise FinetuneError("dataset: no training samples")
    stage = zero_stage(args.deepspeed)
    n_ranks = tensor_parallel.data_ranks(args, distributed.launched(), model)   # 1 under tensor parallel
    bs = args.per_device_train_batch_size
    # checked alike on every rank before the process group is joined: a bad launch fails everywhere, none waits
    distributed.check_split(len(train), bs, n_ranks)
    check_batch_keys(args.deepspeed, bs, args.gradient_accumulation_steps, n_ranks)
    resume = _resume_point(args)
    if resume:   # before the model and before anything is written: another kind of checkpoint, or model
        read_state(resume, args, types.SimpleNamespace(
            config_digest=_digest(args.model_name_or_path),
            trained_names=full.check(args, args.model_name_or_path)
            if args.finetuning_type != "lora" and os.path.isdir(args.model_name_or_path or "") else None))
    world = tensor_parallel.init(args) if tensor_parallel.size(args) > 1 else distributed.init(stage)
    if world.size > 1:
        distributed.sum_scalars(world, [0.0])   # every rank has read output_dir before rank 0 changes it
    if world.rank == 0 and os.path.isdir(args.output_dir) and args.overwrite_output_dir and not resume:
        shutil.rmtree(args.output_dir)
    if model is None:
        from ..model import AutoModelForImageTextToText
        try:
            model = AutoModelForImageTextToText.from_pretrained(args.model_name_or_path,
                                                                dtype="bfloat16" if args.bf16 else None,
                                                                **tensor_parallel.load_keys(args))
        except ValueError as e:
            raise FinetuneError(f"model_name_or_path: {' '.join(str(e).split())}") from None
    ms.set_seed(args.seed)
    if world.stage >= 2:   # the reduction's bucket ("auto": from the model's hidden size, as transformers fills it)
        world = dataclasses.replace(world, bucket=reduce_bucket_size(args.deepspeed, model.config.text.hidden_size))
    setup(args, model)
    pad = getattr(getattr(processor, "tokenizer", None), "pad_token_id", None)
    pad = pad if pad is not None else (model.generation_config.pad_token_id or 0)
    if world.rank == 0:
        os.makedirs(args.output_dir, exist_ok=True)
    tr = Trainer(args, model, train, pad, jit=jit, world=world)
    from .plan import training_plan
    n_trainable = tr.n_trained
    if tr.tp:   # the rank's slices and layer widths
        tr.log(f"[memory {tensor_parallel.plan_line(model, args, n_trainable)}]")
    else:
        tr.log(f"[memory{_per_rank(world)}: {training_plan(model, args, n_trainable, world)}]")
    if resume:
        tr.resume(resume)
        if world.rank == 0:
            _truncate_log(args.output_dir, tr.step)
        tr.log(f"resuming from {resume} (step {tr.step} of {tr.plan.total})")
    tr._start_step = tr.step
    tr.run()
    return tr


def _per_rank(world) -> str:
    if world.size == 1:
        return ""
    return f" per rank ({world.size} ranks, data parallel, ZeRO stage {world.stage})"


def _truncate_log(out, step):
    p = os.path.join(out, LOG)
    if not os.path.isfile(p):
        return
    with open(p, encoding="utf-8") as f:
        lines = [ln for ln in f if ln.strip() and json.loads(ln).get("current_steps", 0) <= step]
    _atomic_file(p, "".join(lines))

