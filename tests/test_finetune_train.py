"""The trainer: overfitting a few samples drives the loss down and greedy generation with the saved adapter returns
the trained answer; Ctrl-C saves a checkpoint and resuming from it ends at the weights of a straight run; AdamW,
clipping and the schedules against torch / transformers; the memory plan bounds the peak."""
import json
import os
import re
import subprocess
import sys
import types

import numpy as np
import pytest

import tinyref
import torch
from glm4v_ms import AutoModelForImageTextToText, demo
from glm4v_ms.finetune import adapter, interrupt, optim, trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ANSWER = 6


def sample(seed):
    """A user turn with an image, then a 6-token answer (the trained part), as data.Sample lays it out."""
    p = tinyref.Prompt(seed).text(3).image(4, 4).text(4)
    ans = np.random.default_rng(100 + seed).integers(1, 400, ANSWER)
    ids = np.array(p.ids + ans.tolist(), np.int64)
    labels = np.full_like(ids, -100)
    labels[-ANSWER:] = ans
    media = {"pixel_values": np.concatenate(p.images), "image_grid_thw": np.array(p.image_grids, np.int64)}
    return types.SimpleNamespace(input_ids=ids, labels=labels, media=media)


def args(out, **kw):
    """FinetuneArgs' fields that the trainer reads (LLaMA-Factory's names), small-run values."""
    d = dict(output_dir=out, model_name_or_path=None, adapter_name_or_path=None, finetuning_type="lora",
             lora_rank=8, lora_alpha=16, lora_dropout=0.0, lora_target=["all"], use_rslora=False,
             freeze_vision_tower=True, freeze_multi_modal_projector=True, overwrite_output_dir=False,
             per_device_train_batch_size=2, gradient_accumulation_steps=1, learning_rate=1e-2, num_train_epochs=3.0,
             max_steps=-1, lr_scheduler_type="linear", warmup_steps=0, warmup_ratio=0.0, weight_decay=0.0,
             max_grad_norm=1.0, optim="adamw_torch", seed=7, disable_shuffling=False, logging_steps=1,
             save_steps=500, save_total_limit=None, resume_from_checkpoint=None, plot_loss=False,
             gradient_checkpointing=False, bf16=False, cutoff_len=64)
    d.update(kw)
    return types.SimpleNamespace(**d)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("train_base"))
    tinyref.build(d, seed=1)
    return d


def log_lines(out):
    with open(os.path.join(out, "trainer_log.jsonl")) as f:
        return [json.loads(ln) for ln in f]


def test_overfit_then_generate(base, tmp_path):
    """Three samples, AdamW with warmup + cosine, batch 2 with accumulation 2 (the last step of an epoch is short),
    recompute on: the loss falls by 10x; LLaMA-Factory's log lines; the plot; then a fresh model with the saved
    adapter answers each prompt greedily with its trained answer."""
    train = [sample(s) for s in range(3)]
    out = str(tmp_path / "out")
    a = args(out, num_train_epochs=30, per_device_train_batch_size=1, gradient_accumulation_steps=2,
             lr_scheduler_type="cosine", warmup_ratio=0.1, plot_loss=True, gradient_checkpointing=True,
             logging_steps=5)
    tr = trainer.run(a, train, [], None, model=AutoModelForImageTextToText.from_pretrained(base))
    assert tr.plan.total == 60   # ceil(3 / 1) = 3 batches -> 2 steps per epoch (2 + 1) x 30
    logs = log_lines(out)
    assert [e["current_steps"] for e in logs] == list(range(5, 61, 5))
    assert set(logs[0]) == {"current_steps", "total_steps", "loss", "lr", "epoch", "percentage", "elapsed_time",
                            "remaining_time"}
    assert logs[-1]["percentage"] == 100 and logs[-1]["epoch"] == 30 and logs[-1]["lr"] == 0
    assert logs[-1]["loss"] < logs[0]["loss"] / 10, logs
    assert os.path.getsize(os.path.join(out, "training_loss.png")) > 1000
    with open(os.path.join(out, "adapter_config.json")) as f:
        cfg = json.load(f)
    assert cfg["r"] == 8 and cfg["lora_alpha"] == 16 and cfg["peft_type"] == "LORA"

    m = AutoModelForImageTextToText.from_pretrained(base)
    m.load_adapter(out)
    for s in train:
        prompt = s.input_ids[:-ANSWER]
        got = m.generate(input_ids=prompt[None], **s.media, max_new_tokens=ANSWER, min_new_tokens=ANSWER,
                         do_sample=False)
        np.testing.assert_array_equal(got[0, len(prompt):], s.input_ids[-ANSWER:])


def test_interrupt_and_resume_equal_a_straight_run(base, tmp_path):
    """Ctrl-C at step 3 saves checkpoint-3 (atomically: no temporary folder left) and stops with one line; resuming
    from it (found in output_dir, as LLaMA-Factory does) ends at exactly the weights of an uninterrupted run, with
    checkpoints every 2 steps and save_total_limit 2."""
    train = [sample(s) for s in range(5)]
    kw = dict(max_steps=7, save_steps=2, save_total_limit=2, lr_scheduler_type="linear", warmup_steps=2,
              weight_decay=0.1, gradient_accumulation_steps=2, per_device_train_batch_size=1)
    straight = str(tmp_path / "straight")
    trainer.run(args(straight, **kw), train, [], None, model=AutoModelForImageTextToText.from_pretrained(base))
    assert [os.path.basename(p) for p in trainer.checkpoints(straight)] == ["checkpoint-4", "checkpoint-6"]

    cut = str(tmp_path / "cut")
    real = trainer.Trainer.train_step

    def step(self, k):
        loss = real(self, k)
        if self.step == 3:
            interrupt.request_stop()   # what the first Ctrl-C does (the watcher thread of interrupt.watch)
        return loss
    trainer.Trainer.train_step = step
    try:
        with pytest.raises(SystemExit) as e:
            trainer.run(args(cut, **kw), train, [], None, model=AutoModelForImageTextToText.from_pretrained(base))
    finally:
        trainer.Trainer.train_step = real
    assert e.value.code == 130
    assert sorted(os.listdir(cut)) == ["checkpoint-2", "checkpoint-3", "trainer_log.jsonl"]
    tr = trainer.run(args(cut, **kw), train, [], None, model=AutoModelForImageTextToText.from_pretrained(base))
    assert tr._start_step == 3
    a, b = (adapter.SafetensorsFile(os.path.join(d, adapter.WEIGHTS)) for d in (straight, cut))
    assert sorted(a.keys()) == sorted(b.keys())
    for k in a.keys():
        np.testing.assert_array_equal(a.read(k)[0], b.read(k)[0], err_msg=k)
    assert [e["current_steps"] for e in log_lines(cut)] == list(range(1, 8))
    assert [e["loss"] for e in log_lines(cut)] == [e["loss"] for e in log_lines(straight)]


def test_optimizers_and_schedules_match_torch():
    """Three AdamW steps (weight decay, changing lr) equal torch.optim.AdamW's on the same gradients; SGD with
    weight decay torch.optim.SGD's; clip_grad_norm torch's; the schedules transformers' get_scheduler's."""
    from mindspore import Parameter, Tensor
    from transformers import get_scheduler
    rng = np.random.default_rng(0)
    shapes = [(4, 16), (24, 4), (8,)]
    for kind in ("adamw_torch", "sgd"):
        init = [rng.standard_normal(s).astype(np.float32) for s in shapes]
        ours = [Parameter(Tensor(x.copy()), name=f"{kind}.{i}") for i, x in enumerate(init)]
        theirs = [torch.nn.Parameter(torch.from_numpy(x.copy())) for x in init]
        opt = optim.Optimizer(ours, kind, weight_decay=0.1)
        topt = (torch.optim.AdamW(theirs, lr=1.0, weight_decay=0.1, betas=(0.9, 0.999), eps=1e-8) if kind != "sgd"
                else torch.optim.SGD(theirs, lr=1.0, weight_decay=0.1))
        for step, lr in enumerate((1e-2, 3e-2, 5e-3)):
            grads = [rng.standard_normal(s).astype(np.float32) * (step + 1) for s in shapes]
            clipped, norm = optim.clip_grad_norm([Tensor(g) for g in grads], 1.0)
            for p, g in zip(theirs, grads):
                p.grad = torch.from_numpy(g.copy())
            tnorm = torch.nn.utils.clip_grad_norm_(theirs, 1.0)
            assert abs(float(norm.asnumpy()) - float(tnorm)) <= 1e-5 * float(tnorm)
            for group in topt.param_groups:
                group["lr"] = lr
            topt.step()
            opt.step(clipped, lr)
            for p, t in zip(ours, theirs):
                np.testing.assert_allclose(p.asnumpy(), t.detach().numpy(), rtol=1e-5, atol=1e-7)
    for kind in ("constant", "linear", "cosine"):
        p = torch.nn.Parameter(torch.zeros(1))
        o = torch.optim.SGD([p], lr=2e-4)
        ref = get_scheduler(kind if kind != "constant" else "constant", o, num_warmup_steps=3, num_training_steps=17)
        s = optim.Schedule(kind, 2e-4, 17, 3)
        for _ in range(17):
            assert abs(s.lr() - ref.get_last_lr()[0]) <= 1e-12
            o.step()
            ref.step()
            s.step()
    assert optim.warmup_steps(17, 0, 0.1) == 2 and optim.warmup_steps(17, 5, 0.1) == 5


_CHILD = r"""
import json, sys, types
def kb(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) * 1024
folder, out, L, rec = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4] == "1"
import numpy as np
from glm4v_ms.model import select_device
select_device("cpu")
from glm4v_ms import AutoModelForImageTextToText
from glm4v_ms.finetune import trainer
m = AutoModelForImageTextToText.from_pretrained(folder)
base = kb("VmRSS")
rng = np.random.default_rng(0)
train = []
for s in range(2):
    ids = rng.integers(1, 400, L)
    lab = ids.copy(); lab[:L // 2] = -100
    train.append(types.SimpleNamespace(input_ids=ids, labels=lab, media={}))
lines = []
a = types.SimpleNamespace(output_dir=out, per_device_train_batch_size=2, max_steps=2, cutoff_len=L, save_steps=0,
                          logging_steps=1, learning_rate=1e-3, gradient_checkpointing=rec, lora_target=["all"],
                          lora_rank=8)
tr = trainer.Trainer
orig = tr.__init__
def init(self, *args, **kw):
    orig(self, *args, log=lines.append, **{k: v for k, v in kw.items() if k != "log"})
tr.__init__ = init
trainer.run(a, train, [], None, model=m)
print(json.dumps(dict(base=base, peak=kb("VmHWM"), plan=[l for l in lines if l.startswith("[memory")][0])))
"""


def test_peak_within_training_plan(tmp_path):
    """demo-tiny trained with LoRA at 2 x 1024 tokens in a fresh process, gradient_checkpointing asked for (it is
    off on CPU, and the plan says so): the peak resident set stays within the plan's total printed at start, and
    the activation term is no idle allowance (the growth over the loaded model is at least half of it)."""
    folder = demo.build(str(tmp_path / "tiny"), "demo-tiny")
    env = dict(os.environ, GLM4V_MS_DEVICE="cpu", PYTHONPATH=ROOT, GLOG_v="3")
    p = subprocess.run([sys.executable, "-c", _CHILD, folder, str(tmp_path / "out"), "1024", "1"], env=env,
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    d = json.loads(p.stdout.strip().splitlines()[-1])
    gb = lambda pat: float(re.search(pat, d["plan"]).group(1)) * 1e9  # noqa: E731
    assert "recompute off" in d["plan"] and "off on CPU" in p.stderr
    assert d["peak"] <= gb(r"total ([\d.]+) GB"), (d["peak"] / 1e9, d["plan"])
    assert d["peak"] - d["base"] >= 0.5 * gb(r"tokens ([\d.]+) GB without recompute"), (d, d["plan"])
