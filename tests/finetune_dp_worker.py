"""One msrun worker of tests/test_finetune_dp.py: trains each spec data parallel over the launch's ranks (the
trainer as `finetune.py` runs it), and writes what the test compares: rank 0's losses per step (unrounded), every
rank's final LoRA weights, its optimizer state's size and its memory plan line.

    msrun ... tests/finetune_dp_worker.py OUT_DIR BASE SPECS_JSON
SPECS_JSON: [{"name", ...trainer keys}] (see tests/test_finetune_dp.py)."""
import json
import os
import sys
import types

import numpy as np

ANSWER = 5


def sample(seed):
    """A user turn with an image, then a 5-token answer (trained), laid out as data.Sample."""
    import tinyref
    p = tinyref.Prompt(seed).text(3 + seed % 3).image(4, 4).text(4)
    ans = np.random.default_rng(100 + seed).integers(1, 400, ANSWER)
    ids = np.array(p.ids + ans.tolist(), np.int64)
    labels = np.full_like(ids, -100)
    labels[-ANSWER - seed % 2:] = ids[-ANSWER - seed % 2:]   # rows with 5 or 6 trained tokens
    media = {"pixel_values": np.concatenate(p.images), "image_grid_thw": np.array(p.image_grids, np.int64)}
    return types.SimpleNamespace(input_ids=ids, labels=labels, media=media)


def args(out, base, **kw):
    d = dict(output_dir=out, model_name_or_path=base, adapter_name_or_path=None, finetuning_type="lora",
             lora_rank=4, lora_alpha=8, lora_dropout=0.0, lora_target=["all"], use_rslora=False,
             freeze_vision_tower=True, freeze_multi_modal_projector=True, overwrite_output_dir=False,
             per_device_train_batch_size=1, gradient_accumulation_steps=1, learning_rate=1e-2, num_train_epochs=3.0,
             max_steps=2, lr_scheduler_type="linear", warmup_steps=0, warmup_ratio=0.0, weight_decay=0.1,
             max_grad_norm=0.5, optim="adamw_torch", seed=11, disable_shuffling=False, logging_steps=1,
             save_steps=1, save_total_limit=None, resume_from_checkpoint=None, plot_loss=False,
             gradient_checkpointing=False, disable_gradient_checkpointing=True, bf16=False, cutoff_len=64, deepspeed=None)
    d.update(kw)
    from glm4v_ms.finetune.args import FinetuneArgs
    return FinetuneArgs(**d)


def run(a, n, losses=None):
    """trainer.run on n samples, recording each step's loss (the logged value before rounding)."""
    from glm4v_ms.finetune import trainer
    real = trainer.Trainer.train_step
    got = [] if losses is None else losses

    def step(self, k):
        loss = real(self, k)
        got.append(loss)
        return loss
    trainer.Trainer.train_step = step
    try:
        tr = trainer.run(a, [sample(s) for s in range(n)], [], None)
    finally:
        trainer.Trainer.train_step = real
    return tr, got


def plan_parts(tr):
    from glm4v_ms.finetune import plan
    from glm4v_ms.quant_layers import weight_bytes
    a = tr.args
    return plan.parts(tr.model.config, 4, weight_bytes(tr.model)[0], a.per_device_train_batch_size, a.cutoff_len,
                      sum(int(np.prod(p.shape)) for p in tr.params), a.optim, ranks=tr.world.size,
                      stage=tr.world.stage, bucket=tr.world.bucket)


def main(out, base, specs):
    from glm4v_ms.finetune.plan import training_plan
    from glm4v_ms.parallel import rank
    for spec in json.loads(specs):
        spec = dict(spec)
        name, n = spec.pop("name"), spec.pop("n")
        if str(spec.get("resume_from_checkpoint", "")).startswith("@"):   # a checkpoint of an earlier spec
            spec["resume_from_checkpoint"] = os.path.join(out, spec["resume_from_checkpoint"][1:])
        tr, losses = run(args(os.path.join(out, name), base, **spec), n)
        r = tr.world.rank
        # what this rank holds of each parameter (ZeRO-3: slices), then the whole weights (gathered)
        held = {k: int(np.prod(p.shape)) for k, p in tr.model.parameters_and_names()}
        whole = tr.zero3.values() if tr.zero3 else {}
        weights = {p.name: whole[p.name] if p.name in whole else p.asnumpy() for p in tr.params}
        np.savez(os.path.join(out, f"{name}.rank{r}.npz"), **weights)
        info = {"losses": losses, "world": tr.world.size, "stage": tr.world.stage, "held": held,
                "sliced": sorted(shard.name for _, shard, _, _ in tr.zero3.items) if tr.zero3 else [],
                "state_numel": 0 if tr.zero3 else int(sum(int(np.prod(p.shape)) for p in tr.opt.update.get_parameters()
                                                          if not p.requires_grad)),
                "parts": plan_parts(tr) if not tr.zero3 else {},
                "buckets": [b[0] for b in tr.opt.sharding.reducer.buckets] if getattr(tr.opt, "sharding", None) else [],
                "plan": training_plan(tr.model, tr.args, tr.n_trained, tr.world)}
        with open(os.path.join(out, f"{name}.rank{r}.json"), "w") as f:
            json.dump(info, f)
    print(f"rank {rank()}: done", flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:4])
