"""A bounded localhost load test of the server: many clients at once, some streaming, some going away mid-stream.

    .venv/bin/python benchmarks/load_serve.py [--requests 64] [--clients 16] [--rounds 3] [--model demo-tiny]
                                              [--url http://127.0.0.1:8000]

Without --url it starts `python -m glm4v_ms.serve` on a free localhost port (--max-num-seqs 8, --max-queue 32: room for every client; a full queue answers 503, tests/test_serve.py checks that)
and stops it at the end. Each round sends --requests requests from --clients threads, a fixed mix: plain,
streamed, streamed-then-disconnected after two chunks, and with a small image. Every request must end in a
complete reply (a JSON completion, or SSE ending `data: [DONE]`), a deliberate disconnect, or an OpenAI-shaped
error (503 when the queue is full); anything else is "lost". After each round the server must be idle again
(no busy row: the disconnected requests freed theirs) and answer /health; its resident memory is printed per
round. Exit status 1 when a request is lost, the server went down, or memory grew from round 2 to the last by
more than --max-growth-mb.
"""
from __future__ import annotations

import argparse
import base64
import http.client
import io
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KINDS = ("plain", "stream", "disconnect", "image")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model="demo-tiny", extra=(), env=None, timeout=300):
    """(process, url) of a server on a free localhost port, once /health answers."""
    port = free_port()
    cmd = [sys.executable, "-m", "glm4v_ms.serve", "--model", model, "--port", str(port), *extra]
    p = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT, **(env or {})},
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    t = time.time()
    while time.time() - t < timeout:
        if p.poll() is not None:
            raise RuntimeError(f"the server exited: {p.stderr.read().strip()[-2000:]}")
        try:
            health(url)
            return p, url
        except OSError:
            time.sleep(0.2)
    p.kill()
    raise RuntimeError("the server did not start in time")


def stop_server(p):
    p.terminate()
    try:
        p.wait(30)
    except subprocess.TimeoutExpired:
        p.kill()


def health(url) -> dict:
    with urllib.request.urlopen(url + "/health", timeout=5) as r:
        return json.loads(r.read())


def rss_mb(pid) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def small_png() -> str:
    from PIL import Image
    buf = io.BytesIO()
    Image.new("RGB", (56, 56), (200, 30, 30)).save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def one(url, i, kind, image, max_tokens=16) -> str:
    """Send request i of this kind; return its outcome: ok, disconnected, error:<status>, or lost:<why>."""
    content = [{"type": "text", "text": f"Request {i}: describe the picture."}]
    if kind == "image":
        content.insert(0, {"type": "image_url", "image_url": {"url": image}})
    body = {"messages": [{"role": "user", "content": content}], "max_tokens": max_tokens,
            "stream": kind in ("stream", "disconnect"), "stream_options": {"include_usage": True}}
    host, port = url.split("//")[1].split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=300)
    try:
        conn.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
        r = conn.getresponse()
        if r.status != 200:
            err = json.loads(r.read())
            return f"error:{r.status}" if err.get("error", {}).get("message") else f"lost:bad error body {err}"
        if not body["stream"]:
            reply = json.loads(r.read())
            return "ok" if reply["choices"][0]["finish_reason"] in ("stop", "length") else f"lost:{reply}"
        chunks = 0
        while True:
            line = r.readline()
            if not line:
                return "lost:stream ended without [DONE]"
            line = line.strip()
            if not line:
                continue
            if line == b"data: [DONE]":
                return "ok"
            chunks += 1
            if kind == "disconnect" and chunks == 2:
                return "disconnected"   # close the socket mid-stream
    except (OSError, ValueError, KeyError) as e:
        return f"lost:{type(e).__name__}: {e}"
    finally:
        conn.close()


def warm_up(url):
    """One plain and one image request: the first calls compile the graphs (seconds), which a round should not
    measure as a full queue."""
    image = small_png()
    return [one(url, 0, "plain", image), one(url, 1, "image", image)]


def round_(url, requests, clients, max_tokens=16) -> dict:
    image = small_png()
    todo = list(range(requests))
    lock = threading.Lock()
    outcomes = {}

    def worker():
        while True:
            with lock:
                if not todo:
                    return
                i = todo.pop(0)
            outcomes[i] = one(url, i, KINDS[i % len(KINDS)], image, max_tokens)
            if outcomes[i] == "error:503":
                time.sleep(0.5)   # a client told the server is full backs off before its next request
    threads = [threading.Thread(target=worker) for _ in range(clients)]
    t0 = time.time()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.time() - t0
    t = time.time()
    while time.time() - t < 30:   # the disconnected requests free their rows within a step or two
        h = health(url)
        if h["busy_rows"] == 0 and h["waiting"] == 0:
            break
        time.sleep(0.1)
    counts = {}
    for o in outcomes.values():
        key = o.split(":")[0] if not o.startswith("error") else o
        counts[key] = counts.get(key, 0) + 1
    lost = [o for o in outcomes.values() if o.startswith("lost")] + ["missing"] * (requests - len(outcomes))
    return {"counts": counts, "lost": lost, "idle": h["busy_rows"] == 0 and h["waiting"] == 0, "wall_s": wall}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--url")
    ap.add_argument("--model", default="demo-tiny")
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--max-growth-mb", type=float, default=32.0)
    a = ap.parse_args(argv)
    proc = None
    url = a.url
    if url is None:
        proc, url = start_server(a.model, ["--max-num-seqs", "8", "--max-queue", "32", "--max-model-len", "512"])
    bad, rss = False, []
    try:
        print(f"warm-up: {warm_up(url)}")
        for k in range(a.rounds):
            r = round_(url, a.requests, a.clients, a.max_tokens)
            rss.append(rss_mb(proc.pid) if proc else float("nan"))
            print(f"round {k + 1}: {a.requests} requests from {a.clients} clients in {r['wall_s']:.1f} s: "
                  f"{r['counts']}; lost {len(r['lost'])}; idle after: {r['idle']}; server RSS {rss[-1]:.0f} MiB",
                  flush=True)
            for why in r["lost"][:5]:
                print("  lost:", why)
            bad |= bool(r["lost"]) or not r["idle"]
        print(f"health: {health(url)}")
        if proc and len(rss) >= 3 and rss[-1] - rss[1] > a.max_growth_mb:
            print(f"memory grew {rss[-1] - rss[1]:.0f} MiB from round 2 to round {len(rss)}")
            bad = True
    finally:
        if proc:
            stop_server(proc)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
