"""LoRA fine-tuning speed, ours (MindSpore) against transformers + PEFT (torch), CPU, one run, the same batches.

    .venv/bin/python benchmarks/bench_finetune.py [--model DIR] [--steps 4] [--threads N]

Without --model the random `demo-150m` checkpoint (text 8 x 1024, vocab 32768; vision 4 x 256; fp32) is built once
into the cache folder ($GLM4V_MS_CACHE, default ~/.cache/glm4v_ms). Data: the shipped examples/finetune dataset
(four samples: one image, two images over two turns, the scene, a text chat), encoded by our data pipeline
(LLaMA-Factory's encoding, tests/test_finetune_data.py) with demo_tiny_lora.yaml's keys; every step is one sample
(batch 1), in dataset order, on both sides. LoRA rank 8 / alpha 16 on every text linear (lora_target all), AdamW,
max_grad_norm 1, fp32. Each side runs in its own subprocess (so each peak RSS is its own) with the same thread
count (torch.set_num_threads, MindSpore's cpu op_tuning.threads_num):
  pass 1: `--steps` optimizer steps (ours compiles one graph per bucketed shape here), pass 2: the same steps
  again, timed. tokens/s = the steps' real tokens (padding excluded) over pass 2's wall time, collate, host-side
  preparation and the optimizer step included. The first step's loss is the base model's on both sides (B = 0),
  so it must agree. Ours also prints its memory plan, and its peak RSS (VmHWM) is compared with the plan's total.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

TEXT_LINEARS = r"^(model\.language_model(?=\.).*\.(q_proj|k_proj|v_proj|o_proj|gate_up_proj|down_proj))$"


def status_kb(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1])


def finetune_args(model, out, steps):
    from glm4v_ms.finetune.args import FinetuneArgs
    return FinetuneArgs(model_name_or_path=model, dataset=["glm_demo"], dataset_dir=os.path.join(ROOT, "examples",
                        "finetune"), template="glm4v", cutoff_len=1024, image_max_pixels=262144, output_dir=out,
                        per_device_train_batch_size=1, learning_rate=1e-4, lr_scheduler_type="constant",
                        max_steps=2 * steps, disable_shuffling=True, disable_gradient_checkpointing=True,
                        save_steps=10 ** 9, logging_steps=10 ** 9)


def samples(a):
    from glm4v_ms.finetune import data
    from glm4v_ms.processing import Glm4vProcessor
    args = finetune_args(a.model, a.out + ".dir", a.steps)
    proc = Glm4vProcessor.from_pretrained(a.model)
    train, _ = data.load(args, proc, log=lambda m: None)
    return args, train, proc.tokenizer.pad_token_id or 0


def side_ours(a):
    import mindspore as ms
    from glm4v_ms import model as M
    if a.threads != (os.cpu_count() or 1):     # select_device() sets os.cpu_count() threads, settable once
        ms.set_device("CPU")
        ms.device_context.cpu.op_tuning.threads_num(a.threads)
        ms.runtime.launch_blocking()
        M._device = "CPU"
    else:
        M.select_device("cpu")
    from glm4v_ms.finetune import trainer
    from glm4v_ms.finetune.plan import training_plan
    args, train, pad = samples(a)
    t = time.perf_counter()
    model = M.AutoModelForImageTextToText.from_pretrained(a.model)
    load_s = time.perf_counter() - t
    ms.set_seed(args.seed)
    trainer.setup(args, model)
    tr = trainer.Trainer(args, model, train, pad, log=lambda m: None)
    plan = training_plan(model, args, sum(int(p.size) for p in tr.params))
    res = dict(load_s=load_s, plan=plan, rss_after_load_mb=status_kb("VmRSS") / 1024)
    for name, steps in (("pass1", range(a.steps)), ("pass2", range(a.steps, 2 * a.steps))):
        tok0, t, losses = tr.tokens_seen, time.perf_counter(), []
        for k in steps:
            losses.append(tr.train_step(k))
        res[name] = dict(s=time.perf_counter() - t, tokens=tr.tokens_seen - tok0, losses=losses)
    return res


def side_reference(a):
    import glm4v_ms.parity.reference  # noqa: F401  (imports torchvision where its wheel mismatches CPU torch)
    import numpy as np
    import torch
    from glm4v_ms import rope
    from peft import LoraConfig, get_peft_model
    from transformers import Glm4vForConditionalGeneration
    from glm4v_ms.finetune import data
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    args, train, pad = samples(a)
    t = time.perf_counter()
    model = Glm4vForConditionalGeneration.from_pretrained(a.model, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=TEXT_LINEARS,
                                             task_type="CAUSAL_LM"))
    load_s = time.perf_counter() - t
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.learning_rate, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    cfg = model.config

    def batch(i):   # the same collate as ours; mm_token_type_ids as GLM's processor gives them
        b = data.collate([train[i]], pad)
        b["mm_token_type_ids"] = rope.token_types(b["input_ids"], cfg.image_token_id, cfg.video_start_token_id,
                                                  cfg.video_end_token_id)
        return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in b.items()}

    res = dict(load_s=load_s, rss_after_load_mb=status_kb("VmRSS") / 1024)
    for name, steps in (("pass1", range(a.steps)), ("pass2", range(a.steps, 2 * a.steps))):
        tokens, t, losses = 0, time.perf_counter(), []
        for k in steps:
            b = batch(k % len(train))
            tokens += int(b["attention_mask"].sum())
            opt.zero_grad(set_to_none=True)
            loss = model(**b).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            losses.append(float(loss))
        res[name] = dict(s=time.perf_counter() - t, tokens=tokens, losses=losses)
    return res


SIDES = {"ours": side_ours, "transformers": side_reference}


def child(a):
    res = SIDES[a.side](a)
    res["peak_rss_mb"] = status_kb("VmHWM") / 1024
    with open(a.out, "w") as f:
        json.dump(res, f)


def spawn(a, side, tmp):
    out = os.path.join(tmp, f"{side}.json")
    cmd = [sys.executable, os.path.abspath(__file__), "--side", side, "--out", out, "--model", a.model,
           "--threads", str(a.threads), "--steps", str(a.steps)]
    env = dict(os.environ, GLM4V_MS_DEVICE="cpu", GLOG_v=os.environ.get("GLOG_v", "3"))
    p = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if p.returncode:
        tail = [ln for ln in p.stderr.splitlines() if ln.strip() and "WARNING" not in ln]
        sys.exit(f"bench_finetune.py: the {side} side failed:\n" + "\n".join(tail[-15:]))
    with open(out) as f:
        return json.load(f)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", help="checkpoint folder (default: demo-150m, built once into the cache folder)")
    ap.add_argument("--steps", type=int, default=4, help="optimizer steps per pass (default 4: one epoch)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--json", help="also write all results here")
    ap.add_argument("--side", choices=list(SIDES), help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.model is None:
        from glm4v_ms import demo
        a.model = demo.cached("demo-150m")
    a.model = os.path.abspath(a.model)
    if a.side:
        return child(a)

    tmp = tempfile.mkdtemp(prefix="bench_finetune_")
    print(f"model {a.model}; examples/finetune (4 samples), batch 1, {a.steps} steps per pass, LoRA r 8 on the "
          f"text linears, AdamW; {a.threads} threads; fp32 CPU", flush=True)
    load0 = os.getloadavg()[0]
    results = {}
    for side in ("ours", "transformers"):
        print(f"running {side} ...", flush=True)
        results[side] = spawn(a, side, tmp)
    o, r = results["ours"], results["transformers"]
    print(f"load average (1 min) at start {load0:.2f}, at end {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores")
    tps = {k: v["pass2"]["tokens"] / v["pass2"]["s"] for k, v in results.items()}
    rows = [("load (s)", o["load_s"], r["load_s"], 2),
            (f"pass 1, {a.steps} steps, first shapes (s)", o["pass1"]["s"], r["pass1"]["s"], 2),
            (f"pass 2, the same {a.steps} steps (s)", o["pass2"]["s"], r["pass2"]["s"], 2),
            ("training tokens/s (pass 2)", tps["ours"], tps["transformers"], 1),
            ("RSS after load (MB)", o["rss_after_load_mb"], r["rss_after_load_mb"], 0),
            ("peak RSS (MB)", o["peak_rss_mb"], r["peak_rss_mb"], 0)]
    print(f"| | ours | transformers + PEFT | ours / ref |\n|---|---:|---:|---:|")
    for name, x, y, nd in rows:
        print(f"| {name} | {x:.{nd}f} | {y:.{nd}f} | {x / y:.2f} |")
    print(f"tokens per pass: {o['pass2']['tokens']} (ours), {r['pass2']['tokens']} (transformers)")
    print(f"first step's loss (base model, B = 0): ours {o['pass1']['losses'][0]:.6f}, transformers "
          f"{r['pass1']['losses'][0]:.6f}; last: {o['pass2']['losses'][-1]:.4f} / {r['pass2']['losses'][-1]:.4f}")
    import re
    total = float(re.search(r"total ([\d.]+) GB", o["plan"]).group(1)) * 1e3
    print(f"ours: memory plan [{o['plan']}]\nours: peak RSS {o['peak_rss_mb'] / 1e3 * 1.048576:.2f} GB against the "
          f"plan's total {total / 1e3:.2f} GB: {'within' if o['peak_rss_mb'] * 1.048576 <= total else 'OVER'}")
    print(f"ratio (ours / transformers + PEFT tokens/s): {tps['ours'] / tps['transformers']:.2f}x")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
