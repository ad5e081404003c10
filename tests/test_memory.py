"""Prefill memory stays within the printed plan: a prompt attends over the filled part of the cache only, in
chunks, so a long max_new_tokens costs its KV cache and nothing more; chunked prefill gives the same tokens."""
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

import tinyref
from glm4v_ms import Glm4vForConditionalGeneration, demo
from glm4v_ms import shapes
from glm4v_ms.steps import prefill
from glm4v_ms.prompt import Prompt

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# In a fresh process: load, generate one token of a long prompt with room for `new` tokens (the streamer stops
# it: the peak is the prefill's), print the resident set before generating, its peak after, and the plan.
_CHILD = r"""
import json, sys
def kb(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) * 1024
folder, prompt_len, new = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
import numpy as np
from glm4v_ms import Glm4vForConditionalGeneration
m = Glm4vForConditionalGeneration.from_pretrained(folder)
base = kb("VmRSS")
class Stop(Exception):
    pass
def streamer(tok):
    raise Stop
try:
    m.generate(input_ids=np.random.default_rng(0).integers(0, 400, (1, prompt_len)), max_new_tokens=new,
               streamer=streamer)
except Stop:
    pass
print(json.dumps(dict(base=base, peak=kb("VmHWM"), plan=m.memory_plan(prompt_len + new))))
"""

GB = 1e9


def _run(folder, prompt_len, new):
    env = dict(os.environ, GLM4V_MS_DEVICE="cpu", PYTHONPATH=ROOT, GLOG_v="3")
    p = subprocess.run([sys.executable, "-c", _CHILD, folder, str(prompt_len), str(new)], env=env,
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    d = json.loads(p.stdout.strip().splitlines()[-1])
    pats = {"KV cache": r"= ([\d.]+) GB at", "activations": r"activations <= ([\d.]+) GB",
            "runtime": r"runtime <= ([\d.]+) GB", "total": r"total ([\d.]+) GB"}
    plan = {k: float(m.group(1)) * GB for k, pat in pats.items() if (m := re.search(pat, d["plan"]))}
    assert set(pats) <= set(plan), d["plan"]
    return d["peak"] - d["base"], d["peak"], plan


def test_long_max_new_tokens_peak_within_plan(tmp_path):
    """demo-tiny with a 64K context: a 1000-token prompt with room for 60000 new tokens. Before prompt attention
    was bounded, its scores spanned the 64K cache (4 heads x 1024 x 65536 floats per copy): a 12 GB peak."""
    folder = demo.build(str(tmp_path / "long"), "demo-tiny")
    cfg = json.load(open(os.path.join(folder, "config.json")))
    cfg["max_position_embeddings"] = cfg["text_config"]["max_position_embeddings"] = 65536
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(cfg, f)
    _, short_peak, short_plan = _run(folder, 1000, 100)
    _, long_peak, long_plan = _run(folder, 1000, 60000)
    # the plan holds: the process's peak resident set stays within the printed total
    assert long_peak <= long_plan["total"], (long_peak, long_plan)
    # room for 60000 more tokens costs at most their KV cache plus the activation bound the plan prints
    assert long_peak - short_peak <= long_plan["KV cache"] - short_plan["KV cache"] + long_plan["activations"], \
        (long_peak, short_peak, long_plan)


def test_activation_bound_printed_and_bounded():
    """The activation term is in the plan and does not grow with the context once prompts are chunked."""
    from glm4v_ms.config import Glm4vConfig
    t = Glm4vConfig.from_dict(demo.official_config(**demo.SIZES["demo-150m"], max_position_embeddings=65536)).text
    for n in (256, 1024, 4096, 16384, 65536):
        c = shapes.prompt_chunk(t, 1, n)
        # one copy of the scores of every layer the CPU graph keeps alive
        assert t.num_hidden_layers * c * t.num_attention_heads * 4 * n <= shapes.SCORES_BUDGET or c == 16
        # the bound does not grow with the context: a few score copies plus per-chunk rows
        assert shapes.activation_bytes(t, 1, n, 4) <= 6 * shapes.SCORES_BUDGET
    assert shapes.prompt_chunk(t, 1, 65536) < 65536            # long prompts are chunked
    # one piece up to 512 tokens, 256-token chunks beyond: a bounded set of prompt graphs, whatever the length
    assert shapes.prompt_chunk(t, 1, 256) == 256 and shapes.prompt_chunk(t, 1, 8192) == 128


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("mem"))
    ref = tinyref.build(d, seed=5)
    return ref, Glm4vForConditionalGeneration.from_pretrained(d)


def test_chunked_prompt_equals_transformers(pair, monkeypatch):
    """A budget small enough that a 186-token image prompt runs in 64-token chunks over growing extents: the
    same logits and greedy tokens as transformers."""
    ref, ours = pair
    inputs = tinyref.Prompt(21).text(40).image(8, 12).text(120).inputs()   # 186 tokens: 3 chunks
    L = inputs["input_ids"].shape[1]
    layers = ours.config.text.num_hidden_layers   # 64 queries x 4 heads over 256 slots, in every layer
    monkeypatch.setattr(shapes, "SCORES_BUDGET", 64 * 4 * 4 * 256 * layers)
    assert shapes.prompt_chunk(ours.config.text, 1, shapes.prompt_bucket(L)) == 64
    logits, _ = prefill(ours, Prompt.of(ours.config, inputs), 512)
    with torch.no_grad():
        t = {k: torch.from_numpy(v) for k, v in inputs.items()}
        want = ref(**t).logits[0, -1].numpy()
        want_ids = ref.generate(**t, max_new_tokens=12, min_new_tokens=12, do_sample=False).numpy()
    np.testing.assert_allclose(logits[0], want, atol=2e-4, rtol=1e-4)
    np.testing.assert_array_equal(ours.generate(**inputs, max_new_tokens=12, min_new_tokens=12, do_sample=False),
                                  want_ids)
