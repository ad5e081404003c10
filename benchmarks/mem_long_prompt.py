"""Peak memory of a long prompt's prefill against the printed memory plan (issue 14): the 150M demo model with a
long context, a ~32k-token text prompt to its first token, in a fresh process.

    .venv/bin/python benchmarks/mem_long_prompt.py [--tokens 32000] [--context 32768]

Prints the plan (weights, KV cache, activation bound, total) and the measured resident set: the rise during
generate() (VmHWM peak minus VmRSS after loading) and the peak. Not a test: the prompt's attention alone is
tens of TFLOP, minutes on a 2-core CPU. tests/test_memory.py checks the same bound on a small model in CI.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CHILD = r"""
import json, sys, time
def kb(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) * 1024
folder, n = sys.argv[1], int(sys.argv[2])
import numpy as np
from glm4v_ms import Glm4vForConditionalGeneration
m = Glm4vForConditionalGeneration.from_pretrained(folder)
base = kb("VmRSS")
t0 = time.perf_counter()
m.generate(input_ids=np.random.default_rng(0).integers(1000, 30000, (1, n)), max_new_tokens=1, do_sample=False)
print(json.dumps(dict(base=base, peak=kb("VmHWM"), plan=m.memory_plan(n + 1), seconds=time.perf_counter() - t0)))
"""


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=32000)
    ap.add_argument("--context", type=int, default=32768)
    a = ap.parse_args()
    sys.path.insert(0, ROOT)
    from glm4v_ms import demo
    base = demo.cached("demo-150m")
    d = tempfile.mkdtemp(prefix="long_ctx_")
    for f in os.listdir(base):   # the demo model with a longer context: same weights, config.json changed
        if f != "config.json":
            os.symlink(os.path.join(base, f), os.path.join(d, f))
    with open(os.path.join(base, "config.json")) as f:
        cfg = json.load(f)
    cfg["max_position_embeddings"] = a.context
    cfg.setdefault("text_config", {})["max_position_embeddings"] = a.context
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(cfg, f)
    env = dict(os.environ, GLM4V_MS_DEVICE="cpu", PYTHONPATH=ROOT, GLOG_v="3", GLM4V_MS_COMPILE_CACHE="off")
    t0 = time.time()
    p = subprocess.run([sys.executable, "-c", CHILD, d, str(a.tokens)], env=env, capture_output=True, text=True)
    if p.returncode:
        print(f"error: the run failed: {p.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
        return 1
    r = json.loads(p.stdout.strip().splitlines()[-1])
    gb = 1e9
    print(f"{a.tokens}-token prompt, context {a.context}, first token after {r['seconds']:.0f} s "
          f"(wall {time.time() - t0:.0f} s with load)")
    print(f"plan: {r['plan']}")
    print(f"measured: RSS after load {r['base'] / gb:.2f} GB, peak {r['peak'] / gb:.2f} GB, "
          f"rise during generate {(r['peak'] - r['base']) / gb:.2f} GB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
