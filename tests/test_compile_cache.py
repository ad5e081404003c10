"""Compiled graphs: their number is bounded by the cache size alone (not by prompt length or max_new_tokens), and
the persistent compile cache makes the second run of a command compile nothing, without ever loading a graph
compiled for other shapes."""
import os
import subprocess
import sys

import numpy as np
import pytest

import tinyref
from glm4v_ms import Glm4vForConditionalGeneration, compile_cache
from glm4v_ms import shapes

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
    """Prompt graphs have a prompt's length bucket as their shape up to 512 tokens (multiples of 64: at most 8),
    and 256-token chunks beyond: per KV cache size S at most 1 decode graph + 8 + one per extent above 512
    (powers of two up to S), whatever the prompt lengths and max_new_tokens that share S. Here: 9 prompt lengths
    from 5 to 420 tokens (text and image) with three max_new_tokens values in a 512-slot cache compile one graph
    per bucket and one decode graph; then long prompts of two different lengths in a 2048-slot cache share one
    chunk graph (one extent)."""
    from mindspore.graph import api

    def graphs():
        return {p for p in api.ms_compile_cache if "text.py" in p}
    before = graphs()
    lengths, buckets = [], set()
    for i, n in enumerate((5, 40, 63, 64, 65, 130, 250, 300, 420)):
        p = tinyref.Prompt(30 + i)
        inputs = (p.text(n) if i % 2 else p.text(2).image(4, 4).text(max(n - 8, 1))).inputs()
        L = inputs["input_ids"].shape[1]
        new = 512 - shapes.prompt_bucket(L) - (i % 3)       # three different max_new_tokens, one cache size
        assert shapes.cache_bucket(shapes.prompt_bucket(L) + new) == 512
        first_tokens(model, inputs, new)
        lengths.append(L)
        buckets.add(shapes.prompt_bucket(L))
    assert len(set(lengths)) == len(lengths) and len(buckets) <= 8
    assert len(graphs() - before) == len(buckets) + 1, sorted(graphs() - before)
    now = graphs()   # other lengths in those buckets, other max_new_tokens: nothing new
    first_tokens(model, tinyref.Prompt(50).text(77).inputs(), 300)
    first_tokens(model, tinyref.Prompt(51).text(270).inputs(), 100)
    assert graphs() == now
    for n in (600, 900):   # long prompts: 256-token chunks over a 1024-slot extent, one graph for both lengths
        first_tokens(model, tinyref.Prompt(60 + n).text(n).inputs(), 2048 - 1280)
    assert len(graphs() - now) == 2, sorted(graphs() - now)    # the chunk graph and the 2048-slot decode graph


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
    assert not any(compile_cache.PARTIAL in f for f in stored), stored   # published at exit
    assert cli(tmp_path, 6) == first
    assert snapshot(tmp_path) == stored
    longer = cli(tmp_path, 300)
    assert sum(f.endswith(".mindir") for f in snapshot(tmp_path)) == 4
    assert longer == cli(tmp_path, 300, cache_on=False)


def test_unwritable_cache_folder_costs_the_compile_not_the_run(tmp_path):
    """A cache folder that cannot be made: one note line, the run goes on and succeeds."""
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    env = dict(os.environ, GLM4V_MS_DEVICE="cpu", PYTHONPATH=ROOT, GLM4V_MS_COMPILE_CACHE=str(blocker / "cache"))
    p = subprocess.run([sys.executable, os.path.join(ROOT, "generate.py"), "--model_name", "demo-tiny", "--prompt",
                        "Hello there", "--max_new_tokens", "3", "--greedy"], env=env, capture_output=True, text=True,
                       timeout=300, cwd=ROOT)
    assert p.returncode == 0, p.stderr
    notes = [line for line in p.stderr.splitlines() if "compile cache off" in line]
    assert len(notes) == 1 and notes[0].startswith("note: ") and "Traceback" not in p.stderr, p.stderr


def test_cache_folders_are_published_whole_and_bounded(tmp_path):
    """A run writes into a private folder, published under its key only at exit: a run killed mid-write leaves
    nothing a later run loads (its leftovers go once its process is gone). A run planning more graphs than a
    folder holds extends a copy. At most `keep` folders stay, the least recently used go first."""
    def write_graphs(path, *idx):   # what MindSpore writes: read-only files in private folders
        d = os.path.join(path, "rank_0", "graph_cache")
        os.makedirs(d, mode=0o700, exist_ok=True)
        for i in idx:
            f = os.path.join(d, f"compile_cache_{i}.mindir")
            with open(f, "wb") as fh:
                fh.write(b"graph")
            os.chmod(f, 0o400)

    base = str(tmp_path / "cache")
    work = compile_cache.open_folder(base, "k", 2)
    final = os.path.join(base, "k")
    assert work != final and not os.path.exists(final)
    write_graphs(work, 0, 1)
    compile_cache.close_folder(work, final)
    assert compile_cache.graphs_in(final) == 2 and not os.path.exists(work)
    assert compile_cache.open_folder(base, "k", 2) == final   # complete: used as it is, nothing to write
    work = compile_cache.open_folder(base, "k", 3)            # one graph more: a copy with the two
    assert work != final and compile_cache.graphs_in(work) == 2
    write_graphs(work, 2)
    compile_cache.close_folder(work, final)
    assert compile_cache.graphs_in(final) == 3 and sorted(os.listdir(base)) == ["k"]

    dead = subprocess.Popen(["true"])
    dead.wait()
    killed = os.path.join(base, "j" + compile_cache.PARTIAL + str(dead.pid))   # a run killed mid-write
    write_graphs(killed, 0)
    work = compile_cache.open_folder(base, "j", 1)
    assert work != killed and compile_cache.graphs_in(work) == 0
    write_graphs(work, 0)
    compile_cache.close_folder(work, os.path.join(base, "j"))
    assert sorted(os.listdir(base)) == ["j", "k"]
    d = os.path.join(base, "w", "rank_1", "graph_cache")   # under msrun the files carry the role: counted too
    os.makedirs(d)
    open(os.path.join(d, "MS_WORKERcompile_cache_0.mindir"), "wb").close()
    assert compile_cache.graphs_in(os.path.join(base, "w")) == 1

    for i in range(5):
        os.makedirs(os.path.join(base, f"old{i}"))
        os.utime(os.path.join(base, f"old{i}"), (1000 + i, 1000 + i))
    os.utime(os.path.join(base, "w"), (900, 900))
    compile_cache.evict(base, 3)
    assert sorted(os.listdir(base)) == ["j", "k", "old4"]


def test_server_start_loads_its_warmup_graphs(tmp_path):
    """The serving engine compiles one decode graph per row group at start; with the cache on (the server's
    default), the next start loads them: the first start stores one graph per group, the second writes nothing.
    Both end by SIGKILL, as a server stopped by a signal does (no exit handlers): the folder is published as soon
    as the planned graphs are compiled. The second start is the same program under `python -c`, where MindSpore's
    cache would open the missing file <cwd>/-c: the folder is the script's (the entry point is not in its key)."""
    from glm4v_ms import demo
    folder = demo.build(str(tmp_path / "m"), "demo-tiny", seed=3)
    script = tmp_path / "start.py"
    script.write_text("import sys, time\nfrom glm4v_ms import Glm4vForConditionalGeneration\n"
                      "from glm4v_ms.engine import Engine\n"
                      "e = Engine(Glm4vForConditionalGeneration.from_pretrained(sys.argv[1]), 2, 256).start()\n"
                      "while e.warm < len(e.groups) and e.error is None: time.sleep(0.05)\n"
                      "e.stop(); print('WARM', e.warm, e.error, flush=True)\n"
                      "import os, signal; os.kill(os.getpid(), signal.SIGKILL)\n")
    env = dict(os.environ, GLM4V_MS_DEVICE="cpu", PYTHONPATH=ROOT, GLM4V_MS_COMPILE_CACHE=str(tmp_path / "cache"))
    for entry in ([str(script)], ["-c", script.read_text()]):
        p = subprocess.run([sys.executable, *entry, folder], env=env, capture_output=True, text=True, timeout=300,
                           cwd=tmp_path)
        assert p.returncode == -9 and "WARM 2 None" in p.stdout, p.stderr[-2000:]
        assert "compile cache off" not in p.stderr, p.stderr[-2000:]
        if entry[0] != "-c":
            stored = snapshot(tmp_path / "cache")
            assert sum(f.endswith(".mindir") for f in stored) == 2, stored   # groups of 1 and 2 rows
    assert snapshot(tmp_path / "cache") == stored
