"""Continuous batching in the server: aggregate decode tokens/s at 1, 4 and 8 concurrent streams against one
stream, and time to first token (TTFT) under load, in one run against one server.

    .venv/bin/python benchmarks/bench_serve.py [--model demo-150m] [--max-tokens 64] [--streams 1 4 8] [--reps 2]

Starts `python -m glm4v_ms.serve --max-num-seqs 8` on a free localhost port, by default on a random checkpoint of
demo-150m's shape (text 8 x 1024, vision 4 x 256; fp32, CPU) but with the tiny tokenizer's vocabulary of 512 instead
of 32768, so that every token decodes to text the stream can be timed by (demo-150m's ids past the tokenizer's 471
decode to nothing); built once into $GLM4V_MS_CACHE/bench-serve-150m. It warms the server up (graph compiles), then for each stream count S sends
S streamed greedy requests at once (different text prompts, min_tokens = max_tokens so that every reply has the
same length), and measures per stream the arrival time of each SSE chunk:
  aggregate decode tokens/s = sum over streams of (tokens - 1) / (last chunk of the last stream - first token of
  the first stream); the ratio column divides by the one-stream figure measured in the same run;
  TTFT = request sent -> first content chunk, the mean and max over the S streams (all sent together, so the
  later ones wait for the earlier prefills);
  TTFT under load: one more request sent while 7 streams are decoding (the 8th row free).
The same run also starts a server with --max-num-seqs 1 (no batching at all) and measures one stream there: the
last column divides by it. (A lone stream on the 8-row server runs on its one-row cache too; two or more streams
decode all 8 rows, busy or not.)
Each figure is the best of --reps repetitions.
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from load_serve import start_server, stop_server  # noqa: E402

PROMPTS = ["Describe the quick brown fox in detail.", "What is in the picture? Tell me everything.",
           "Please describe the video in detail.", "How many people are there in the park?",
           "What color is the car next to the house?", "Let me think about this step by step, please.",
           "A cat is sitting on the table next to a cup of tea.", "The dog runs in the park with a red ball."]


def checkpoint():
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from glm4v_ms import demo
    root = os.environ.get("GLM4V_MS_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "glm4v_ms")
    dst = os.path.join(root, "bench-serve-150m")
    if not os.path.isfile(os.path.join(dst, demo.MARKER)):
        spec = demo.SIZES["demo-150m"]
        demo.SIZES["bench-serve-150m"] = dict(text=dict(spec["text"], vocab_size=512), vision=spec["vision"])
        demo.build(dst, "bench-serve-150m")
    return dst


def stream(url, prompt, n, out: dict, start: threading.Event | None = None):
    """One streamed greedy request; out gets sent, chunk times, tokens."""
    host, port = url.split("//")[1].split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=600)
    body = json.dumps({"messages": [{"role": "user", "content": prompt}], "max_tokens": n, "min_tokens": n,
                       "temperature": 0, "stream": True, "stream_options": {"include_usage": True}})
    if start is not None:
        start.wait()
    out["sent"] = time.perf_counter()
    conn.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
    r = conn.getresponse()
    assert r.status == 200, r.read()
    times = out["times"] = []
    for line in r:
        line = line.strip()
        if not line.startswith(b"data: ") or line == b"data: [DONE]":
            continue
        d = json.loads(line[6:])
        if d.get("usage"):
            out["tokens"] = d["usage"]["completion_tokens"]
        elif d["choices"] and any(k in d["choices"][0]["delta"] for k in ("content", "reasoning_content")) \
                and (d["choices"][0]["delta"].get("content") or d["choices"][0]["delta"].get("reasoning_content")):
            times.append(time.perf_counter())
    conn.close()


def run_streams(url, s, n):
    outs = [{} for _ in range(s)]
    go = threading.Event()
    ts = [threading.Thread(target=stream, args=(url, PROMPTS[i % len(PROMPTS)], n, outs[i], go)) for i in range(s)]
    for t in ts:
        t.start()
    go.set()
    for t in ts:
        t.join()
    first = min(o["times"][0] for o in outs)
    last = max(o["times"][-1] for o in outs)
    decoded = sum(o["tokens"] - 1 for o in outs)
    ttft = [o["times"][0] - o["sent"] for o in outs]
    return decoded / (last - first), sum(ttft) / s, max(ttft)


def ttft_under_load(url, n, busy=7):
    outs = [{} for _ in range(busy)]
    ts = [threading.Thread(target=stream, args=(url, PROMPTS[i % len(PROMPTS)], n * 3, outs[i])) for i in range(busy)]
    for t in ts:
        t.start()
    while not all(o.get("times") for o in outs):   # every stream has its first token: all decoding now
        time.sleep(0.01)
    time.sleep(1.0)   # let them reach the steady decode
    one = {}
    stream(url, PROMPTS[-1], 8, one)
    for t in ts:
        t.join()
    return one["times"][0] - one["sent"]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", help="checkpoint folder (default: the bench-serve-150m random checkpoint)")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--streams", type=int, nargs="+", default=[1, 4, 8])
    ap.add_argument("--reps", type=int, default=2)
    a = ap.parse_args(argv)
    rows = max(8, max(a.streams))
    model = a.model or checkpoint()
    proc, url = start_server(model, ["--max-num-seqs", str(rows), "--max-model-len", "512"], timeout=900)
    try:
        for s in sorted(set(a.streams)):   # warm-up: the prefill graph and the decode graph
            run_streams(url, s, 4)
        res = {}
        for s in a.streams:
            best = max((run_streams(url, s, a.max_tokens) for _ in range(a.reps)), key=lambda r: r[0])
            res[s] = best
        under = min(ttft_under_load(url, a.max_tokens) for _ in range(a.reps))
    finally:
        stop_server(proc)
    proc, url = start_server(model, ["--max-num-seqs", "1", "--max-model-len", "512"], timeout=900)
    try:
        run_streams(url, 1, 4)
        single = max(run_streams(url, 1, a.max_tokens)[0] for _ in range(a.reps))
    finally:
        stop_server(proc)
    base = res[a.streams[0]][0]
    print(f"model {a.model or 'bench-serve-150m'}, {rows} rows, {a.max_tokens} tokens per stream, best of {a.reps}")
    print("| streams | aggregate decode tokens/s | vs 1 stream | TTFT mean (s) | TTFT max (s) | vs a 1-row server |")
    print("|---:|---:|---:|---:|---:|---:|")
    for s in a.streams:
        tps, mean, mx = res[s]
        print(f"| {s} | {tps:.1f} | {tps / base:.2f}x | {mean:.2f} | {mx:.2f} | {tps / single:.2f}x |")
    print(f"one stream on a 1-row server (--max-num-seqs 1): {single:.1f} tokens/s")
    print(f"TTFT of one request arriving while 7 streams decode: {under:.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
