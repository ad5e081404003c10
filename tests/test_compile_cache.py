"""Compiled graphs: their number is bounded by the cache size alone (not by prompt length or max_new_tokens), and
the persistent compile cache makes the second run of a command compile nothing, without ever loading a graph
compiled for other shapes."""
import os
import subprocess
import sys

import numpy as np
import pytest

import tinyref
from glm4v_ms import Glm4vForConditionalGeneration
from glm4v_ms import model as model_mod

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("graphs"))
    tinyref.build(d, seed=23)
    return Glm4vForConditionalGeneration.from_pretrained(d)


class Stop(Exception):
    pass


def first_tokens(m, inputs, new, n=2):
    """Generate with room for `new` tokens (that sets the cache size) but stop after n: enough to compile and run
    the prompt's graph and the decode graph."""
    got = []

    def streamer(tok):
        got.append(int(tok[0]))
        if len(got) == n:
            raise Stop
    try:
        m.generate(**inputs, max_new_tokens=new, do_sample=False, streamer=streamer)
    except Stop:
        pass
    return got


def test_graph_count_bounded_by_cache_size(model):
    """Every prompt length from 5 to 420 tokens (text and image prompts) and every max_new_tokens that keeps the
    KV cache at 512 slots compile at most log2(512 / 256) + 2 = 3 decoder graphs in all: one decode graph and one
    64-token prompt-chunk graph per extent (256 and 512 slots). The rule: per cache size S, at most
    log2(S / 256) + 2 graphs; S is a power of two from 256 to the context."""
    from mindspore.graph import api

    def graphs():
        return {p for p in api.ms_compile_cache if "text.py" in p}
    before = graphs()
    lengths = []
    for i, n in enumerate((5, 40, 63, 64, 65, 130, 250, 300, 420)):
        p = tinyref.Prompt(30 + i)
        inputs = (p.text(n) if i % 2 else p.text(2).image(4, 4).text(max(n - 8, 1))).inputs()
        L = inputs["input_ids"].shape[1]
        new = 512 - model_mod.prompt_bucket(L) - (i % 3)       # three different max_new_tokens, one cache size
        assert model_mod.cache_bucket(model_mod.prompt_bucket(L) + new) == 512
        first_tokens(model, inputs, new)
        lengths.append(L)
    assert len(set(lengths)) == len(lengths) and max(lengths) > 256 >= min(lengths) + 200
    assert len(graphs() - before) <= 3, sorted(graphs() - before)
    # and again with other max_new_tokens in the same cache size: nothing new
    now = graphs()
    first_tokens(model, tinyref.Prompt(50).text(77).inputs(), 300)
    assert graphs() == now


def cli(cache_dir, new, cache_on=True):
    env = dict(os.environ, GLM4V_MS_DEVICE="cpu", PYTHONPATH=ROOT,
               GLM4V_MS_COMPILE_CACHE=str(cache_dir) if cache_on else "off")
    p = subprocess.run([sys.executable, os.path.join(ROOT, "generate.py"), "--model_name", "demo-tiny", "--prompt",
                        "Hello there", "--max_new_tokens", str(new), "--greedy"], env=env, capture_output=True,
                       text=True, timeout=300, cwd=ROOT)
    assert p.returncode == 0, p.stderr
    return p.stdout


def snapshot(d):
    return {os.path.join(r, f): os.stat(os.path.join(r, f)).st_mtime_ns for r, _, fs in os.walk(d) for f in fs}


def test_second_run_compiles_nothing_and_shapes_never_mix(tmp_path):
    """generate.py twice with the same arguments: the first run stores its two graphs (prompt, decode), the
    second loads them: it writes nothing (a graph it had to compile would be stored) and prints the same text.
    A run with a larger max_new_tokens (another cache size, MindSpore's own cache would hand it the 256-slot
    graphs) gets its own folder and prints what a run without the cache prints."""
    first = cli(tmp_path, 6)
    stored = snapshot(tmp_path)
    assert sum(f.endswith(".mindir") for f in stored) == 2, stored
    assert cli(tmp_path, 6) == first
    assert snapshot(tmp_path) == stored
    longer = cli(tmp_path, 300)
    assert sum(f.endswith(".mindir") for f in snapshot(tmp_path)) == 4
    assert longer == cli(tmp_path, 300, cache_on=False)
