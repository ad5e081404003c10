"""Time to first token, ours (MindSpore) against transformers (torch), CPU, one run, the same config and threads.

    .venv/bin/python benchmarks/bench_ttft.py [--model DIR] [--cases chat,1080p,4k] [--threads N]

Without --model the random `demo-150m` checkpoint is built once into the cache folder (as bench_generate.py).
Cases: `chat`, the image chat of bench_generate.py (a 672x448 drawing + a question, 290 tokens with the demo's
pixel budget); `1080p` and `4k`, a 1920x1080 and a 3840x2160 drawing resized with the real GLM-4.1V processor's
pixel budget (2700 and 6041 tokens). Each (side, case) runs in a fresh subprocess: the model loads (not timed), then
  cold = time to the first new token of the first generate() call (our graph compiles included),
  warm = the same call again;
ours runs twice, in two fresh processes sharing a new persistent compile-cache folder (compile_cache.py): "cold"
is the first (it compiles and stores), "cold again" the second run of the same command (it loads the graphs).
Time to first token = the wall time of generate(max_new_tokens=1), the vision tower included.
For `chat` also turn 2: the first turn's prompt + an assistant reply + a second question. Ours runs turn 1 then
turn 2 with a PromptCache (turn 2 reuses turn 1's cache), both warm; transformers runs turn 2 without reuse.
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
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

SIZES = {"chat": (672, 448), "1080p": (1920, 1080), "4k": (3840, 2160)}
# 1080p and 4k use the real GLM-4.1V processor's pixel budget (preprocessor_config.json's size; REFERENCE.md):
# 2691 and 6032 image tokens, as the 9B model sees them; chat keeps the demo checkpoint's smaller budget
REAL_SIZE = {"shortest_edge": 12544, "longest_edge": 9633792}
QUESTION = "Describe this image in detail: the shapes, their colours and where they are."


def make_inputs(model_dir, case, path):
    import numpy as np
    from bench_generate import drawn_image
    from glm4v_ms.processing import Glm4vProcessor
    proc = Glm4vProcessor.from_pretrained(model_dir)
    user = {"role": "user", "content": [{"type": "image", "image": drawn_image(*SIZES[case])},
                                        {"type": "text", "text": QUESTION}]}
    turns = [[user], [user, {"role": "assistant", "content": "A red circle at the top left and a blue square."},
                      {"role": "user", "content": "What colour is the largest shape?"}]]
    arrays = {}
    for i, msgs in enumerate(turns[:2 if case == "chat" else 1]):
        kw = {} if case == "chat" else {"images_kwargs": {"size": REAL_SIZE}}
        inp = proc.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=True, **kw)
        arrays.update({f"{i}.{k}": np.asarray(v) for k, v in inp.items() if v is not None and k != "mm_token_type_ids"})
    np.savez(path, **arrays)


def load_inputs(path):
    import numpy as np
    z = np.load(path)
    out = {}
    for k in z.files:
        i, key = k.split(".", 1)
        out.setdefault(int(i), {})[key] = z[k]
    return [out[i] for i in sorted(out)]


def side_ours(a, turns):
    import mindspore as ms
    from glm4v_ms import PromptCache
    from glm4v_ms import model as M
    if a.threads != (os.cpu_count() or 1):
        ms.set_device("CPU")
        ms.device_context.cpu.op_tuning.threads_num(a.threads)
        ms.runtime.launch_blocking()   # as device.select_device does on CPU
        M._device = "CPU"
    from mindspore.graph.api import ms_compile_cache
    model = M.Glm4vForConditionalGeneration.from_pretrained(a.model)

    def ttft(inp, **kw):
        t0 = time.perf_counter()
        model.generate(**inp, max_new_tokens=1, do_sample=False, **kw)
        return time.perf_counter() - t0
    c0 = len(ms_compile_cache)
    res = {"cold_s": ttft(turns[0]), "graphs_cold": len(ms_compile_cache) - c0}
    res["warm_s"] = ttft(turns[0])
    if len(turns) > 1:
        cache = PromptCache()
        ttft(turns[0], past_key_values=cache)     # compiles the suffix-length graph once, untimed
        ttft(turns[1], past_key_values=cache)
        cache = PromptCache()
        res["turn1_s"] = ttft(turns[0], past_key_values=cache)
        res["turn2_s"] = ttft(turns[1], past_key_values=cache)
        res["turn2_reused"] = cache.reused
        res["turn2_fresh_s"] = ttft(turns[1])
    res["tokens"] = [int(t["input_ids"].shape[1]) for t in turns]
    return res


def side_reference(a, turns):
    import glm4v_ms.parity.reference  # noqa: F401  (imports torchvision where its wheel mismatches CPU torch)
    import torch
    from transformers import Glm4vForConditionalGeneration
    torch.set_num_threads(a.threads)
    model = Glm4vForConditionalGeneration.from_pretrained(a.model, dtype=torch.float32).eval()

    def ttft(inp):
        t = {k: torch.from_numpy(v) for k, v in inp.items()}
        t0 = time.perf_counter()
        with torch.no_grad():
            model.generate(**t, max_new_tokens=1, do_sample=False)
        return time.perf_counter() - t0
    res = {"cold_s": ttft(turns[0]), "warm_s": ttft(turns[0])}
    if len(turns) > 1:
        res["turn2_fresh_s"] = ttft(turns[1])
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", help="checkpoint folder (default: demo-150m, built once into the cache folder)")
    ap.add_argument("--cases", default="chat,1080p,4k")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--side", choices=["ours", "reference"], help=argparse.SUPPRESS)
    ap.add_argument("--inputs", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.side:
        os.environ.setdefault("GLOG_v", "3")
        res = (side_ours if a.side == "ours" else side_reference)(a, load_inputs(a.inputs))
        with open(a.out, "w") as f:
            json.dump(res, f)
        return 0
    if not a.model:
        from glm4v_ms import demo
        a.model = demo.cached("demo-150m")
    cases = [c.strip() for c in a.cases.split(",") if c.strip()]
    bad = [c for c in cases if c not in SIZES]
    if bad:
        print(f"error: unknown case(s) {', '.join(bad)} (use {', '.join(SIZES)})", file=sys.stderr)
        return 2
    print(f"model {a.model}, {a.threads} threads, load average {os.getloadavg()[0]:.2f} at start")
    tmp = tempfile.mkdtemp(prefix="bench_ttft_")
    for case in cases:
        inp = os.path.join(tmp, f"{case}.npz")
        make_inputs(a.model, case, inp)
        got = {}
        # ours twice, each a fresh process sharing one new compile-cache folder: the first run compiles (and
        # stores) its graphs, the second is "the second run of the same command" (loads them)
        env = dict(os.environ, GLM4V_MS_COMPILE_CACHE=os.path.join(tmp, f"compiled.{case}"))
        for side, name in (("ours", "ours"), ("ours", "ours.again"), ("reference", "reference")):
            out = os.path.join(tmp, f"{case}.{name}.json")
            cmd = [sys.executable, os.path.abspath(__file__), "--side", side, "--inputs", inp, "--out", out,
                   "--model", a.model, "--threads", str(a.threads)]
            r = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if r.returncode:
                print(f"error: the {side} side failed on {case}: {r.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
                return 1
            with open(out) as f:
                got[name] = json.load(f)
        o, o2, t = got["ours"], got["ours.again"], got["reference"]
        print(f"{case}: {o['tokens'][0]} tokens; time to first token ours / transformers: "
              f"warm {o['warm_s']:.3f} / {t['warm_s']:.3f} s = {o['warm_s'] / t['warm_s']:.2f}x, "
              f"cold {o['cold_s']:.3f} / {t['cold_s']:.3f} s = {o['cold_s'] / t['cold_s']:.2f}x "
              f"(ours compiled {o['graphs_cold']} graphs cold); cold again (graphs from the compile cache) "
              f"{o2['cold_s']:.3f} s = {o2['cold_s'] / t['cold_s']:.2f}x")
        if "turn2_s" in o:
            print(f"{case} turn 2: {o['tokens'][1]} tokens, {o['turn2_reused']} reused; ours {o['turn2_s']:.3f} s "
                  f"= {o['turn2_s'] / o['turn1_s']:.2f}x our turn 1 ({o['turn1_s']:.3f} s); without reuse ours "
                  f"{o['turn2_fresh_s']:.3f} s, transformers {t['turn2_fresh_s']:.3f} s "
                  f"(ours with reuse = {o['turn2_s'] / t['turn2_fresh_s']:.2f}x transformers)")
    print(f"load average {os.getloadavg()[0]:.2f} at the end")
    return 0


if __name__ == "__main__":
    sys.exit(main())
