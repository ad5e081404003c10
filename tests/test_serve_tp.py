"""The server under msrun, 2 ranks (one launch): rank 0 serves HTTP, rank 1 follows its engine step by step.
Concurrent greedy requests (streaming, an image, one prefilled in pieces while another decodes) answer exactly what
the one-process server answers (one of them for a LoRA adapter, --lora-modules: each rank holds its slices of
the adapter), a client that disconnects mid-stream stops its row on both ranks (the ranks stay
in step: later requests are still right), and SIGTERM to rank 0 prints one line and ends every process of the
launch. Adapters beyond the one slot (--max-loras 1): one loaded at runtime (/v1/load_lora_adapter: each rank
reads its slices from the folder) and requests that swap the slot (rank 0's choice, replayed on rank 1) answer
what the library's generate gives with that adapter loaded (a rank holding another adapter, or the right one in
another slot, would change every answer: the ranks' partial sums meet in each layer); an unload is then a 404."""
import base64
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
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
N = 10   # new tokens of the requests compared with the library (min_tokens too)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    from glm4v_ms import demo
    return demo.build(str(tmp_path_factory.mktemp("tp_serve") / "tiny"), "demo-tiny", seed=4)


@pytest.fixture(scope="module")
def lora_args(folder):
    from test_serve_lora import peft_adapter
    # q/v column-parallel (B sliced by rows), o_proj row-parallel (A sliced by columns)
    d = peft_adapter(folder, os.path.join(os.path.dirname(folder), "a"), 4, 8, ["q_proj", "v_proj", "o_proj"])
    return ["--max-loras", "1", "--lora-modules", f"a={d}"]


@pytest.fixture(scope="module")
def runtime_adapter(folder):
    """Loaded while serving: rank 8 on k_proj (the fused qkv: B's rows sliced) and the MLPs (gate_up column-, down
    row-parallel: A's columns sliced)."""
    from test_serve_lora import peft_adapter
    return peft_adapter(folder, os.path.join(os.path.dirname(folder), "b"), 8, 16,
                        r"^model\.language_model\..*\.(k_proj|gate_up_proj|down_proj)$", seed=5)


@pytest.fixture(scope="module")
def library(folder, lora_args, runtime_adapter):
    """(model, prompt) -> the reply's content by the library: greedy generate (for an adapter after
    model.load_adapter(DIR))."""
    from glm4v_ms import Glm4vForConditionalGeneration, Glm4vProcessor
    from glm4v_ms.processing.reply import split, strip_boxes
    from test_serve_lora import for_processor
    model, proc = Glm4vForConditionalGeneration.from_pretrained(folder), Glm4vProcessor.from_pretrained(folder)
    out = {}
    a = lora_args[-1].split("=", 1)[1]
    for name, d, prompts in (("m", None, (2,)), ("a", a, (3,)), ("b", runtime_adapter, (2, 3))):   # those asked
        if d is not None:
            model.load_adapter(d)
        for i in prompts:
            x = proc.apply_chat_template(for_processor(messages(i)), add_generation_prompt=True, tokenize=True,
                                         return_dict=True)
            tokens = model.generate(**x, max_new_tokens=N, min_new_tokens=N, do_sample=False)[
                0, x["input_ids"].shape[1]:]
            out[name, i] = strip_boxes(split(proc.decode(tokens, skip_special_tokens=True))[1]).strip()
    assert out["a", 3] != out["b", 3]
    return out


def post(url, path, body):
    """(status, the reply: text for a text/plain one, else parsed JSON) of a raw POST."""
    req = urllib.request.Request(url + path, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=300) as r:
            raw = r.read()
            text = r.headers.get("Content-Type", "").startswith("text/plain")
            return r.status, raw.decode() if text else json.loads(raw)
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def together(url, jobs):
    """(model, prompt) jobs at once, greedy with N tokens -> {job: (status, reply)}."""
    got = {}

    def one(j):
        got[j] = post(url, "/v1/chat/completions", {"model": j[0], "messages": messages(j[1]), "max_tokens": N,
                                                   "min_tokens": N, "temperature": 0})
    ts = [threading.Thread(target=one, args=(j,)) for j in jobs]
    for t in ts:
        t.start()
    for t in ts:
        t.join(300)
    return got


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


def test_tp2_server(folder, single, lora_args, runtime_adapter, library, tmp_path):
    port = free_port()
    env = dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""),
               PYTHONPATH=os.pathsep.join([ROOT, HERE]), GLM4V_MS_DEVICE="cpu", GLOG_v="3",
               VLLM_ALLOW_RUNTIME_LORA_UPDATING="True")
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
        assert health["busy_rows"] == 0 and health["waiting"] == 0, health   # the disconnected row was freed

        # runtime adapters on both ranks: b loaded, then asked (the one slot swaps a -> b), then a, b and the base
        # at once (a and b cannot share the slot: one waits, then swaps it), each the library's answer
        assert post(url, "/v1/load_lora_adapter", {"lora_name": "b", "lora_path": runtime_adapter}) == (
            200, "Success: LoRA adapter 'b' added successfully.")
        status, err = post(url, "/v1/load_lora_adapter", {"lora_name": "x", "lora_path": str(tmp_path / "absent")})
        assert status == 404 and "No adapter found" in err["error"]["message"], err
        status, got = together(url, [("b", 3)])["b", 3]
        assert status == 200 and got["choices"][0]["message"]["content"] == library["b", 3], got
        jobs = [("a", 3), ("b", 2), ("m", 2)]
        for j, (status, got) in together(url, jobs).items():
            assert status == 200 and got["choices"][0]["message"]["content"] == library[j], (j, got)
        health = json.loads(urllib.request.urlopen(url + "/health", timeout=5).read())
        assert health["lora_loads"] >= 3 and health["lora_slots"] in (["a"], ["b"]), health   # swaps took place
        assert post(url, "/v1/unload_lora_adapter", {"lora_name": "b"}) == (
            200, "Success: LoRA adapter 'b' removed successfully.")
        status, err = together(url, [("b", 3)])["b", 3]
        assert status == 404 and err["error"]["message"] == "The model `b` does not exist.", err
        assert ask(client, 3, stream=False) == single[3]   # a again, after the ranks dropped b

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
