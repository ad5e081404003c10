"""Fine-tuning on 2 ranks (msrun, MCCL on CPU) against 1 process, the same global batch, CPU, one run each:

    .venv/bin/python benchmarks/bench_finetune_dp.py [--steps 6] [--model demo-tiny]
    .venv/bin/python benchmarks/bench_finetune_dp.py --finetuning_type full --model demo-150m --steps 3
    .venv/bin/python benchmarks/bench_finetune_dp.py --reduce_only 100000000 [--bucket 1048576]

--reduce_only N: ZeRO-2's gradient reduction alone (distributed.Sharding) on 2 ranks, over N float32 gradient
elements in 64 tensors, in one bucket (the whole vector, as before bucketing) and in buckets of --bucket
elements: each rank's peak resident set before and after reducing (getrusage), so the difference is what the
reduction itself holds.

With --finetuning_type full (the tower frozen, SGD, global batch 4) the runs are 2 ranks under ZeRO-2 with the
gradient reduction in one bucket (the whole float32 vector, as before bucketing) and in buckets of --bucket
elements, then ZeRO-3: what the bucketed reduction saves shows in the peak resident set when the trained vector is
large against the rest (demo-150m: 0.16 B parameters, the vector 0.66 GB).

LoRA on the demo dataset (examples/finetune, 4 image samples) with the demo recipe's keys, global batch 4 per step
(1 process: per_device_train_batch_size 4; 2 ranks: 2 each), AdamW, `--steps` steps. Three runs: 1 process,
2 ranks unsharded, 2 ranks with ZeRO-2 (a DeepSpeed JSON through the `deepspeed` key). Each rank records its
step times and its peak resident set (getrusage); throughput = trained tokens of steps 2.. over their wall time
(step 1 compiles; a rank's share of 2 samples changes shape from step to step, so later steps may compile too:
the median step time is given beside it), of the slowest rank. MindSpore's CPU thread pool takes every core in
each process (model.select_device); 2 ranks are also run at cores / 2 threads each, the fair split. The plan's
per-rank gradient and optimizer terms are printed next to it:
on this LoRA they are kilobytes, so the measured peaks cannot show the sharding's saving; the plan does.
On a shared 2-core machine, 2 ranks share the cores that 1 process has alone: the ratio says what the
collectives and the split cost there, not what N cards give.
"""
import argparse
import json
import os
import resource
import socket
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
YAML = os.path.join(ROOT, "examples", "finetune", "demo_tiny_lora.yaml")


def worker(out, name, flags, threads):
    """One rank: the trainer as finetune.py runs it, with each step timed."""
    if threads:   # select_device sizes MindSpore's CPU pool by os.cpu_count(): this rank's share of the cores
        os.cpu_count = lambda: threads
    from glm4v_ms.finetune import plan, trainer
    from glm4v_ms.finetune.__main__ import prepare
    times, tokens = [], []
    real = trainer.Trainer.train_step

    def step(self, k):
        t0, seen = time.perf_counter(), self.tokens_seen
        loss = real(self, k)
        times.append(time.perf_counter() - t0)
        tokens.append(self.tokens_seen - seen)
        return loss
    trainer.Trainer.train_step = step
    args, train, _, processor = prepare([YAML, *flags])
    tr = trainer.run(args, train, [], processor)
    a = tr.args
    p = plan.training_parts(tr.model, a, tr.n_trained, tr.world)
    with open(os.path.join(out, f"{name}.rank{tr.world.rank}.json"), "w") as f:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        json.dump({"times": times, "tokens": tokens, "peak_mb": peak, "grads": p["grads"], "optimizer": p["optimizer"]},
                  f)


def reduce_worker(out, name, elements, bucket):
    """One rank of --reduce_only: the gradients made, the peak so far; reduced twice, the peak after."""
    import mindspore as ms
    import numpy as np
    from mindspore import Tensor

    from glm4v_ms.finetune import distributed
    ms.set_context(mode=ms.GRAPH_MODE)
    w = distributed.init(2)
    sizes = [elements // 64] * 64
    grads = [Tensor(np.random.default_rng(w.rank * 100 + i).standard_normal(n, dtype=np.float32))
             for i, n in enumerate(sizes)]
    sh = distributed.Sharding(grads, distributed.World(w.rank, w.size, 2, bucket))
    peak = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # noqa: E731
    before = peak()
    t0 = time.perf_counter()
    for _ in range(2):
        part = sh.reduce(grads, 1.0)
        part.asnumpy()
    took = (time.perf_counter() - t0) / 2
    with open(os.path.join(out, f"{name}.rank{w.rank}.json"), "w") as f:
        json.dump({"before": before, "after": peak(), "seconds": took,
                   "buckets": len(sh.reducer.buckets)}, f)


def reduce_only(a):
    tmp = tempfile.mkdtemp(prefix="bench_ft_reduce_")
    env = dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""),
               PYTHONPATH=ROOT, GLOG_v="3")
    print(f"ZeRO-2 reduction alone, 2 ranks, {a.reduce_only:,} float32 gradient elements "
          f"({a.reduce_only * 4 / 2 ** 20:,.0f} MiB) in 64 tensors; {os.cpu_count()} CPU cores")
    print("| reduction | buckets | peak RSS before (MiB, rank 0 / 1) | peak RSS after (MiB) | held by the reduction "
          "(MiB) | seconds per reduction |")
    print("|---|---:|---|---|---|---:|")
    for name, bucket in (("whole", 0), ("bucketed", a.bucket)):
        me = [os.path.abspath(__file__), "reduce", tmp, name, str(a.reduce_only), str(bucket)]
        cmd = ["msrun", "--worker_num=2", "--local_worker_num=2", f"--master_port={free_port()}",
               f"--log_dir={os.path.join(tmp, name + '_logs')}", "--join=True", *me]
        p = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
        if p.returncode:
            sys.exit(f"{name}: exit {p.returncode}\n{p.stderr[-3000:]}")
        r = [json.load(open(os.path.join(tmp, f"{name}.rank{k}.json"))) for k in range(2)]
        label = "one bucket (the whole vector)" if not bucket else f"buckets of {bucket:,} elements"
        both = lambda f: " / ".join(f"{f(x):,.0f}" for x in r)  # noqa: E731
        print(f"| {label} | {r[0]['buckets']} | {both(lambda x: x['before'])} | {both(lambda x: x['after'])} | "
              f"{both(lambda x: x['after'] - x['before'])} | {max(x['seconds'] for x in r):.2f} |")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--model", default="demo-tiny")
    ap.add_argument("--finetuning_type", default="lora", choices=("lora", "full"))
    ap.add_argument("--bucket", type=int, default=1 << 20, help="reduce_bucket_size of the bucketed runs")
    ap.add_argument("--reduce_only", type=int, default=0, help="elements: time and measure the reduction alone")
    a = ap.parse_args()
    if a.reduce_only:
        return reduce_only(a)
    from glm4v_ms import demo
    if a.model in ("demo-tiny", "demo-150m"):
        demo.cached(a.model)   # built once before the ranks start
    tmp = tempfile.mkdtemp(prefix="bench_ft_dp_")
    def ds_file(name, **zero):
        path = os.path.join(tmp, name)
        with open(path, "w") as f:
            json.dump({"train_batch_size": "auto", "zero_optimization": zero}, f)
        return path
    ds = ds_file("ds_z2_config.json", stage=2)
    env = dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""),
               PYTHONPATH=ROOT, GLOG_v="3")
    common = ["--model_name_or_path", a.model, "--max_steps", str(a.steps), "--gradient_accumulation_steps", "1",
              "--save_steps", str(10 ** 6), "--plot_loss", "false", "--lr_scheduler_type", "constant",
              "--warmup_ratio", "0"]
    cores = os.cpu_count() or 1
    half = max(1, cores // 2)
    if a.finetuning_type == "full":
        common += ["--finetuning_type", "full", "--optim", "sgd"]
    runs = [("1 process", 1, 0, ["--per_device_train_batch_size", "4"]),
            (f"2 ranks, {cores} threads each", 2, 0, ["--per_device_train_batch_size", "2"]),
            (f"2 ranks, {half} thread(s) each", 2, half, ["--per_device_train_batch_size", "2"]),
            (f"2 ranks, {half} thread(s) each, ZeRO-2", 2, half,
             ["--per_device_train_batch_size", "2", "--deepspeed", ds])]
    if a.finetuning_type == "full":
        two = ["--per_device_train_batch_size", "2", "--deepspeed"]
        runs = [(f"2 ranks, {half} thread(s) each, ZeRO-2, one bucket (the whole vector)", 2, half,
                 two + [ds_file("whole.json", stage=2, reduce_bucket_size=10 ** 12)]),
                (f"2 ranks, {half} thread(s) each, ZeRO-2, buckets of {a.bucket:,}", 2, half,
                 two + [ds_file("bucket.json", stage=2, reduce_bucket_size=a.bucket)]),
                (f"2 ranks, {half} thread(s) each, ZeRO-3, buckets of {a.bucket:,}", 2, half,
                 two + [ds_file("z3.json", stage=3, reduce_bucket_size=a.bucket,
                                stage3_param_persistence_threshold="auto")])]
    rows = []
    for i, (label, n, threads, flags) in enumerate(runs):
        name = f"run{i}"
        f = [*common, "--output_dir", os.path.join(tmp, name), *flags]
        me = [os.path.abspath(__file__), "worker", tmp, name, json.dumps(f), str(threads)]
        if n == 1:
            cmd = [sys.executable, *me]
        else:
            cmd = ["msrun", f"--worker_num={n}", f"--local_worker_num={n}", f"--master_port={free_port()}",
                   f"--log_dir={os.path.join(tmp, name + '_logs')}", "--join=True", *me]
        t0 = time.perf_counter()
        p = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
        if p.returncode:
            sys.exit(f"{label}: exit {p.returncode}\n{p.stderr[-3000:]}")
        ranks = [json.load(open(os.path.join(tmp, f"{name}.rank{r}.json"))) for r in range(n)]
        slow = max(sum(r["times"][1:]) for r in ranks)
        tps = sum(ranks[0]["tokens"][1:]) / slow
        med = max(sorted(r["times"][1:])[len(r["times"][1:]) // 2] for r in ranks)
        rows.append((label, tps, [r["peak_mb"] for r in ranks], ranks[0]["grads"], ranks[0]["optimizer"],
                     time.perf_counter() - t0, ranks[0]["times"][0], med))
    base = rows[0][1]
    what = "LoRA" if a.finetuning_type == "lora" else "full fine-tuning (SGD)"
    print(f"{what} on {a.model}, global batch 4, {a.steps} steps; {os.cpu_count()} CPU cores")
    print("| run | tokens/s (steps 2..) | ratio to the first | median step (s) | peak RSS per rank (MiB) | plan: "
          "gradients per rank (KB) | plan: optimizer state per rank (KB) | first step (s) | wall (s) |")
    print("|---|---:|---:|---:|---|---:|---:|---:|---:|")
    for label, tps, peaks, g, o, wall, first, med in rows:
        print(f"| {label} | {tps:,.0f} | {tps / base:.2f} | {med:.2f} | {' / '.join(f'{m:,.0f}' for m in peaks)} | "
              f"{g / 1e3:,.1f} | {o / 1e3:,.1f} | {first:.1f} | {wall:.1f} |")


if __name__ == "__main__":
    if sys.argv[1:2] == ["reduce"]:
        reduce_worker(sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]))
    elif sys.argv[1:2] == ["worker"]:   # a word, not a flag: msrun would take "--worker" for --worker_num
        from glm4v_ms.finetune.distributed import silence_other_ranks
        silence_other_ranks()
        worker(sys.argv[2], sys.argv[3], json.loads(sys.argv[4]), int(sys.argv[5]))
    else:
        main()
