"""The server under msrun, 2 ranks (one launch): rank 0 serves HTTP, rank 1 follows its engine step by step.
Concurrent greedy requests (streaming, an image, one prefilled in pieces while another decodes) answer exactly what
the one-process server answers (one of them for a LoRA adapter, --lora-modules: each rank holds its slices of
the adapter), a client that disconnects mid-stream stops its row on both ranks (the ranks stay
in step: later requests are still right), and SIGTERM to rank 0 prints one line and ends every process of the
launch."""
import base64
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request

import numpy as np
import openai
import pytest
from PIL import Image

from serving import Running, wait_healthy
from test_parallel import HERE, ROOT, free_port

PROMPTS = ["Describe this image.", "What is in the picture?", "Count to five.", "Say hello."]


def image_url():
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(3).integers(0, 255, (56, 84, 3), dtype=np.uint8)).save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def messages(i):
    parts = [{"type": "text", "text": PROMPTS[i]}]
    if i == 0:
        parts.insert(0, {"type": "image_url", "image_url": {"url": image_url()}})
    return [{"role": "user", "content": parts}]


def ask(client, i, stream):
    model = "a" if i == 3 else "m"   # the last prompt asks the adapter, decoding beside the base's rows
    if not stream:
        r = client.chat.completions.create(model=model, messages=messages(i), max_tokens=10, temperature=0)
        return r.choices[0].message.content, r.choices[0].finish_reason
    text, reason = "", None
    for ch in client.chat.completions.create(model=model, messages=messages(i), max_tokens=10, temperature=0,
                                             stream=True):
        if ch.choices:
            text += ch.choices[0].delta.content or ""
            reason = ch.choices[0].finish_reason or reason
    return text, reason


def all_at_once(client):
    """Every prompt, concurrently (more than the 2 rows: some wait and join mid-flight), odd ones streamed."""
    out = [None] * len(PROMPTS)

    def one(i):
        time.sleep(0.3 * i)
        out[i] = ask(client, i, stream=i % 2 == 1)
    ts = [threading.Thread(target=one, args=(i,)) for i in range(len(PROMPTS))]
    for t in ts:
        t.start()
    for t in ts:
        t.join(300)
    return out


ARGS = ["--max-num-seqs", "2", "--max-model-len", "512", "--served-model-name", "m"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    from glm4v_ms import demo
    return demo.build(str(tmp_path_factory.mktemp("tp_serve") / "tiny"), "demo-tiny", seed=4)


@pytest.fixture(scope="module")
def lora_args(folder):
    from test_serve_lora import peft_adapter
    # q/v column-parallel (B sliced by rows), o_proj row-parallel (A sliced by columns)
    d = peft_adapter(folder, os.path.join(os.path.dirname(folder), "a"), 4, 8, ["q_proj", "v_proj", "o_proj"])
    return ["--lora-modules", f"a={d}"]


@pytest.fixture(scope="module")
def single(folder, lora_args):
    s = Running(["--model", folder, *ARGS, *lora_args])
    try:
        out = [ask(s.client, i, stream=False) for i in range(len(PROMPTS))]
        base = s.client.chat.completions.create(model="m", messages=messages(3), max_tokens=10, temperature=0)
        assert base.choices[0].message.content != out[3][0]   # the adapter changes that answer
        return out
    finally:
        s.close()


def workers(root_pid):
    """(pid, rank) of msrun's worker processes under root_pid (read from /proc: our own children)."""
    kids, found = {root_pid}, []
    for _ in range(4):
        for d in os.listdir("/proc"):
            if d.isdigit():
                try:
                    ppid = int(open(f"/proc/{d}/stat").read().rsplit(")", 1)[1].split()[1])
                except OSError:
                    continue
                if ppid in kids:
                    kids.add(int(d))
    for pid in kids - {root_pid}:
        try:
            env = dict(kv.split("=", 1) for kv in open(f"/proc/{pid}/environ").read().split("\0") if "=" in kv)
        except OSError:
            continue
        if env.get("MS_ROLE") == "MS_WORKER" and "serve.py" in open(f"/proc/{pid}/cmdline").read():
            found.append((pid, int(env.get("RANK_ID", env.get("MS_NODE_ID", -1)))))
    return sorted(found, key=lambda x: x[1])


def test_tp2_server(folder, single, lora_args, tmp_path):
    port = free_port()
    env = dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""),
               PYTHONPATH=os.pathsep.join([ROOT, HERE]), GLM4V_MS_DEVICE="cpu", GLOG_v="3")
    logs = tmp_path / "logs"
    cmd = ["msrun", "--worker_num=2", "--local_worker_num=2", "--master_addr=127.0.0.1", f"--master_port={free_port()}",
           "--join=True", f"--log_dir={logs}", "--cluster_time_out=90", os.path.join(ROOT, "serve.py"),
           "--model", folder, "--tensor_parallel_size", "2", "--port", str(port), *ARGS, *lora_args]
    p = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         start_new_session=True)

    def log(r):
        f = logs / f"worker_{r}.log"
        return f.read_text() if f.exists() else ""
    try:
        url = f"http://127.0.0.1:{port}"
        wait_healthy(url, p, 240, lambda: log(0)[-3000:] + log(1)[-3000:])
        client = openai.OpenAI(base_url=url + "/v1", api_key="EMPTY", max_retries=0, timeout=300)
        assert all_at_once(client) == single

        # an image prompt prefilled while a stream decodes (its vision blocks with that row's steps between them,
        # on both ranks); then that client goes away mid-stream: its row stops on both ranks, which stay in step
        stream = client.chat.completions.create(model="m", messages=messages(2), max_tokens=400, temperature=0,
                                                stream=True)
        got = [ch for _, ch in zip(range(3), stream)]
        assert len(got) == 3
        assert ask(client, 0, stream=False) == single[0]
        stream.close()
        assert all_at_once(client) == single
        health = json.loads(urllib.request.urlopen(url + "/health", timeout=5).read())
        assert health["busy_rows"] == 0 and health["waiting"] == 0   # the disconnected row was freed

        ranks = workers(p.pid)
        assert [r for _, r in ranks] == [0, 1], ranks
        os.kill(ranks[0][0], signal.SIGTERM)   # rank 0 stops: it tells rank 1, both exit, msrun ends
        rc = p.wait(90)                        # (no hang: a timeout here fails the test)
        assert rc != 0, "a server stopped by a signal exits non-zero"
        assert workers(p.pid) == []
        assert "Traceback" not in log(0) + log(1), log(0)[-3000:] + log(1)[-3000:]
        assert "[glm4v_ms.serve: SIGTERM: stopping]" in log(0), log(0)[-3000:]
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait(10)
