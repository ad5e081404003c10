"""Greedy generation, ours (MindSpore) against transformers' Glm4vForConditionalGeneration (torch), CPU, one run.

    .venv/bin/python benchmarks/bench_generate.py [--model DIR] [--max-new-tokens 64] [--threads N] [--peer mindone]

Without --model the random `demo-150m` checkpoint (text 8 x 1024, vocab 32768; vision 4 x 256; fp32) is built once
into the cache folder ($GLM4V_MS_CACHE, default ~/.cache/glm4v_ms). The prompt is one drawn image (256 image
tokens with the demo's pixel budget) and a text question, made once by our processor and given to every side as
the same arrays. Each side runs in its own subprocess (so each peak RSS is its own), with the same thread count
(torch.set_num_threads, MindSpore's cpu op_tuning.threads_num), greedy, min_new_tokens = max_new_tokens:
  1. warm-up: a short text prompt (4 new tokens); its wall time is the first-call cost (our graph compiles);
  2. cold: the image chat once (ours compiles its prefill graph for this length and the decode graph for this
     cache size here); 3. timed: the image chat again. Reported figures come from run 3; compile = 2 minus 3.
Prefill = time to the first new token; decode tokens/s = (n - 1) / (time of token n - time of token 1), read from
a per-token streamer on both sides. A decode step slower than 3x the median is flagged. Recompiles are counted
from MindSpore's own compile cache (`mindspore.graph.api.ms_compile_cache`, one entry per compiled jit graph)
before and after every step. Kernels per decoded token are read from the decode graph's final kernel graph
(`MS_DEV_SAVE_GRAPHS=1`, graph_build_*.ir) in a separate short run.
"""
import argparse
import glob
import json
import os
import re
import resource
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

QUESTION = "Describe this image in detail: the shapes, their colours and where they are."
WARMUP = "Hello, who are you?"
VIRTUAL = {"Load", "UpdateState", "MakeTuple", "Depend", "Return", "TupleGetItem"}


def rss_mb():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def peak_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024   # Linux: KB


def drawn_image(width, height, seed=0):
    from glm4v_ms.parity.cases import picture   # numpy + Pillow only
    return picture(width, height, seed)


def make_inputs(model_dir, path):
    """The image chat and the warm-up prompt as numpy arrays, saved for the subprocesses."""
    import numpy as np
    from glm4v_ms.processing import Glm4vProcessor
    proc = Glm4vProcessor.from_pretrained(model_dir)
    chat = [{"role": "user", "content": [{"type": "image", "image": drawn_image(672, 448)},
                                         {"type": "text", "text": QUESTION}]}]
    warm = [{"role": "user", "content": WARMUP}]
    arrays = {}
    for tag, msgs in (("chat", chat), ("warm", warm)):
        inp = proc.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=True)
        arrays.update({f"{tag}.{k}": np.asarray(v) for k, v in inp.items() if v is not None})
    np.savez(path, **arrays)
    return arrays


def load_inputs(path):
    import numpy as np
    z = np.load(path)
    out = {"chat": {}, "warm": {}}
    for k in z.files:
        tag, key = k.split(".", 1)
        out[tag][key] = z[k]
    return out


class Clock:
    """Streamer for both sides: a timestamp (and MindSpore's compile count) per new token."""
    def __init__(self, compiles=lambda: 0, skip_prompt=False):
        self.compiles, self.skip = compiles, skip_prompt
        self.times, self.counts = [], []

    def put(self, ids):
        if self.skip:          # transformers first puts the whole prompt
            self.skip = False
            return
        self.times.append(time.perf_counter())
        self.counts.append(self.compiles())

    def end(self):
        pass


def summarise(t0, clock, n_expected):
    import numpy as np
    t = np.array(clock.times)
    steps = np.diff(t)
    med = float(np.median(steps)) if len(steps) else float("nan")
    comp = np.diff(np.array(clock.counts)) if len(clock.counts) > 1 else np.zeros(0)
    return dict(prefill_s=float(t[0] - t0), decode_s=float(t[-1] - t[0]), new_tokens=len(t),
                decode_tok_s=(len(t) - 1) / float(t[-1] - t[0]) if len(t) > 1 else float("nan"),
                step_median_ms=med * 1e3, step_max_ms=float(steps.max()) * 1e3 if len(steps) else float("nan"),
                slow_steps=[int(i) + 1 for i in np.nonzero(steps > 3 * med)[0]],
                compiles_in_decode=int(comp.sum()), complete=len(t) == n_expected)


# ---------------------------------------------------------------------------------------------- sides
def side_ours(a, inputs):
    import mindspore as ms
    from glm4v_ms import model as M
    if a.threads != (os.cpu_count() or 1):     # select_device() sets os.cpu_count() threads, settable once
        ms.set_device("CPU")
        ms.device_context.cpu.op_tuning.threads_num(a.threads)
        ms.runtime.launch_blocking()   # as device.select_device does on CPU
        M._device = "CPU"
    from mindspore.graph.api import ms_compile_cache
    t = time.perf_counter()
    model = M.Glm4vForConditionalGeneration.from_pretrained(a.model)
    res = dict(load_s=time.perf_counter() - t, rss_after_load_mb=rss_mb())

    def run(inp, n):
        clock = Clock(lambda: len(ms_compile_cache))
        c0 = len(ms_compile_cache)
        t0 = time.perf_counter()
        ids = model.generate(**inp, max_new_tokens=n, min_new_tokens=n, do_sample=False, streamer=clock)
        r = summarise(t0, clock, n)
        r.update(total_s=time.perf_counter() - t0, compiles=len(ms_compile_cache) - c0,
                 compiles_before_first_token=clock.counts[0] - c0)
        return ids, r

    _, res["warmup"] = run(inputs["warm"], 4)
    _, res["cold"] = run(inputs["chat"], a.max_new_tokens)
    ids, res["timed"] = run(inputs["chat"], a.max_new_tokens)
    res["ids"] = ids[0, inputs["chat"]["input_ids"].shape[1]:].tolist()
    return res


def side_reference(a, inputs):
    import glm4v_ms.parity.reference  # noqa: F401  (imports torchvision where its wheel mismatches CPU torch)
    import torch
    from transformers import Glm4vForConditionalGeneration
    torch.set_num_threads(a.threads)
    t = time.perf_counter()
    model = Glm4vForConditionalGeneration.from_pretrained(a.model, dtype=torch.float32).eval()
    res = dict(load_s=time.perf_counter() - t, rss_after_load_mb=rss_mb())

    def run(inp, n):
        tin = {k: torch.from_numpy(v) for k, v in inp.items()}
        clock = Clock(skip_prompt=True)
        t0 = time.perf_counter()
        with torch.inference_mode():
            ids = model.generate(**tin, max_new_tokens=n, min_new_tokens=n, do_sample=False, streamer=clock)
        r = summarise(t0, clock, n)
        r["total_s"] = time.perf_counter() - t0
        return ids.numpy(), r

    _, res["warmup"] = run(inputs["warm"], 4)
    _, res["cold"] = run(inputs["chat"], a.max_new_tokens)
    ids, res["timed"] = run(inputs["chat"], a.max_new_tokens)
    res["ids"] = ids[0, inputs["chat"]["input_ids"].shape[1]:].tolist()
    return res


def side_kernels(a, inputs):
    """Kernels in the decode graph: one short prefill + one decode step with the IR dump on (set by the parent)."""
    from glm4v_ms import Glm4vForConditionalGeneration
    from glm4v_ms.steps import decode_one, prefill
    from glm4v_ms.prompt import Prompt
    model = Glm4vForConditionalGeneration.from_pretrained(a.model)
    logits, st = prefill(model, Prompt.of(model.config, inputs["warm"]), 128)
    decode_one(model, st, logits.argmax(-1))
    hidden = model.config.text.hidden_size
    for path in sorted(glob.glob(os.path.join(os.environ["MS_DEV_SAVE_GRAPHS_PATH"], "graph_build_*.ir"))):
        text = open(path).read()
        if not re.search(r"%%para\d+_h: <Tensor\[\w+\], \(1, 1, %d\)>" % hidden, text):
            continue   # not the decode graph (prefill has L > 1)
        kinds = {}
        for op in re.findall(r"^  %\d+\([^)]*\) = ([A-Za-z_]\w*)", text, re.M):
            op = op.replace("PrimFunc_", "")
            kinds[op] = kinds.get(op, 0) + 1
        return dict(kernels={k: v for k, v in sorted(kinds.items(), key=lambda kv: -kv[1]) if k not in VIRTUAL})
    return dict(kernels=None)


def side_mindone(a, inputs):
    try:
        import mindone  # noqa: F401
        from mindone.transformers import Glm4vForConditionalGeneration
    except ImportError as e:
        sys.exit(f"bench_generate.py: --peer mindone: mindone (with its glm4v) is not installed here ({e})")
    import mindspore as ms
    import numpy as np
    model = Glm4vForConditionalGeneration.from_pretrained(a.model, mindspore_dtype=ms.bfloat16)
    res = {}

    def run(inp, n):
        tin = {k: ms.Tensor(v) for k, v in inp.items()}
        clock = Clock(skip_prompt=True)
        t0 = time.perf_counter()
        ids = model.generate(**tin, max_new_tokens=n, min_new_tokens=n, do_sample=False, streamer=clock)
        r = summarise(t0, clock, n)
        r["total_s"] = time.perf_counter() - t0
        return np.asarray(ids.asnumpy() if hasattr(ids, "asnumpy") else ids), r

    _, res["warmup"] = run(inputs["warm"], 4)
    _, res["cold"] = run(inputs["chat"], a.max_new_tokens)
    ids, res["timed"] = run(inputs["chat"], a.max_new_tokens)
    res["ids"] = ids[0, inputs["chat"]["input_ids"].shape[1]:].tolist()
    return res


SIDES = {"ours": side_ours, "transformers": side_reference, "kernels": side_kernels, "mindone": side_mindone}


def child(a):
    res = SIDES[a.side](a, load_inputs(a.inputs))
    res["peak_rss_mb"] = peak_mb()
    with open(a.out, "w") as f:
        json.dump(res, f)


def spawn(a, side, tmp, env=None):
    out = os.path.join(tmp, f"{side}.json")
    cmd = [sys.executable, os.path.abspath(__file__), "--side", side, "--inputs", os.path.join(tmp, "inputs.npz"),
           "--out", out, "--model", a.model, "--threads", str(a.threads), "--max-new-tokens", str(a.max_new_tokens)]
    t = time.perf_counter()
    p = subprocess.run(cmd, env={**os.environ, **(env or {})}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                       text=True)
    if p.returncode:
        tail = [ln for ln in p.stderr.splitlines() if ln.strip() and "WARNING" not in ln]
        sys.exit(tail[-1] if tail and tail[-1].startswith("bench_generate.py") else
                 f"bench_generate.py: the {side} side failed:\n" + "\n".join(tail[-15:]))
    with open(out) as f:
        res = json.load(f)
    res["process_s"] = time.perf_counter() - t
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", help="checkpoint folder (default: demo-150m, built once into the cache folder)")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--peer", choices=["mindone"], help="also run mindone's glm4v (needs mindone installed)")
    ap.add_argument("--no-kernel-count", action="store_true", help="skip the IR-dump run that counts kernels")
    ap.add_argument("--json", help="also write all results here")
    ap.add_argument("--side", choices=list(SIDES), help=argparse.SUPPRESS)
    ap.add_argument("--inputs", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.side:
        return child(a)
    if a.peer == "mindone":
        import importlib.util
        if importlib.util.find_spec("mindone") is None:
            sys.exit("bench_generate.py: --peer mindone: mindone is not installed in this environment "
                     "(pip install mindone; it pins transformers 4.57.1 and numpy<2, and its glm4v needs Ascend)")
    if a.model is None:
        from glm4v_ms import demo
        a.model = demo.cached("demo-150m")
    a.model = os.path.abspath(a.model)

    tmp = tempfile.mkdtemp(prefix="bench_generate_")
    arrays = make_inputs(a.model, os.path.join(tmp, "inputs.npz"))
    L = arrays["chat.input_ids"].shape[1]
    n_img = int((arrays["chat.mm_token_type_ids"] == 1).sum()) if "chat.mm_token_type_ids" in arrays else -1
    cfg = json.load(open(os.path.join(a.model, "config.json")))
    tc = cfg.get("text_config", cfg)
    print(f"model {a.model}: text {tc['num_hidden_layers']} x {tc['hidden_size']}, vocab {tc['vocab_size']}; "
          f"prompt {L} tokens ({n_img} image tokens, grid {arrays['chat.image_grid_thw'].tolist()}); "
          f"{a.max_new_tokens} new tokens, greedy; {a.threads} threads; fp32 CPU", flush=True)

    results = {}
    load0 = os.getloadavg()[0]
    for side in ["ours", "transformers"] + (["mindone"] if a.peer else []):
        print(f"running {side} ...", flush=True)
        results[side] = spawn(a, side, tmp)
    if not a.no_kernel_count:
        irdir = os.path.join(tmp, "ir")
        results["kernels"] = spawn(a, "kernels", tmp, {"MS_DEV_SAVE_GRAPHS": "1", "MS_DEV_SAVE_GRAPHS_PATH": irdir})

    o, r = results["ours"], results["transformers"]
    print(f"load average (1 min) at start {load0:.2f}, at end {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores "
          "(other processes inflate both sides' times)")
    rows = [("load (s)", "load_s", None, 2), ("first call: warm-up prompt, 4 tokens (s)", "warmup.total_s", None, 2),
            ("prefill, first run of this length (s)", "cold.prefill_s", None, 3),
            ("prefill (s)", "timed.prefill_s", None, 3),
            ("decode (tokens/s, first token excluded)", "timed.decode_tok_s", None, 1),
            ("decode step median (ms)", "timed.step_median_ms", None, 1),
            ("decode step max (ms)", "timed.step_max_ms", None, 1),
            ("RSS after load (MB)", "rss_after_load_mb", None, 0), ("peak RSS (MB)", "peak_rss_mb", None, 0)]

    def get(d, key):
        for k in key.split("."):
            d = d[k]
        return d

    sides = ["ours", "transformers"] + (["mindone"] if a.peer else [])
    print()
    print(f"{'':<44}" + "".join(f"{s:>14}" for s in sides) + f"{'ours/ref':>10}")
    for label, key, _, nd in rows:
        vals = [get(results[s], key) for s in sides]
        ratio = vals[0] / vals[1] if vals[1] else float("nan")
        print(f"{label:<44}" + "".join(f"{v:>14.{nd}f}" for v in vals) + f"{ratio:>10.2f}")
    oc, oh = o["cold"], o["timed"]
    print()
    print(f"ours, compile cost: first call {o['warmup']['total_s']:.2f} s (warm-up prompt, {o['warmup']['compiles']} "
          f"graphs); new prompt length + cache size: prefill {oc['prefill_s'] - oh['prefill_s']:.2f} s more, "
          f"first decode step {oc['step_max_ms'] - oh['step_median_ms']:.0f} ms more ({oc['compiles']} graphs compiled "
          f"in that run, {oc['compiles_in_decode']} of them during decode)")
    print(f"ours, timed run: {oh['compiles']} graphs compiled, {oh['compiles_in_decode']} during decode; steps slower "
          f"than 3x median: {oh['slow_steps'] or 'none'}; per decoded token: 1 jit graph execution + 1 eager op "
          f"(embedding gather) + 5 host->device Tensors + 1 device->host logits copy")
    if "kernels" in results and results["kernels"]["kernels"]:
        k = results["kernels"]["kernels"]
        nop = sum(v for op, v in k.items() if op in ("Reshape", "ExpandDims", "Squeeze"))
        print(f"ours, decode graph: {sum(k.values())} kernels per decoded token ({nop} of them "
              f"Reshape/ExpandDims); by kind: " + ", ".join(f"{op} {v}" for op, v in k.items()))
    rt = r["timed"]
    print(f"transformers, timed run: steps slower than 3x median: {rt['slow_steps'] or 'none'}")
    same = o["ids"] == r["ids"]
    first = next((i for i, (x, y) in enumerate(zip(o["ids"], r["ids"])) if x != y), None)
    print(f"identical token ids (ours vs transformers, {len(o['ids'])} new tokens): {same}"
          + ("" if same else f" (first difference at new token {first})"))
    if a.peer:
        print(f"identical token ids (ours vs mindone): {o['ids'] == results['mindone']['ids']}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
