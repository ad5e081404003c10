"""Continuous batching in the server: aggregate decode tokens/s at 1, 4 and 8 concurrent streams against one
stream, and time to first token (TTFT) under load, for the row groups and for one cache of all rows, in one run.

    .venv/bin/python benchmarks/bench_serve.py [--model demo-150m] [--max-tokens 64] [--streams 1 4 8] [--reps 2]

Starts three `python -m glm4v_ms.serve` processes on free localhost ports, side by side: `--max-num-seqs 8` (row
groups of 1, 2, 4, 8 rows), `--max-num-seqs 8 --no-row-groups` (a one-row cache and one of 8 rows: the layout before
row groups, where 2 to 8 streams all decode 8 rows) and `--max-num-seqs 1` (no batching at all). By default on a
random checkpoint of demo-150m's shape (text 8 x 1024, vision 4 x 256; fp32, CPU) but with the tiny tokenizer's
vocabulary of 512 instead of 32768, so that every token decodes to text the stream can be timed by (demo-150m's ids
past the tokenizer's 471 decode to nothing); built once into $GLM4V_MS_CACHE/bench-serve-150m. It warms each server
up, then for each repetition, each stream count S and each server in turn (interleaved, so that the servers see the
same machine load) sends S streamed greedy requests at once (different text prompts, min_tokens = max_tokens so
that every reply has the same length), and measures per stream the arrival time of each SSE chunk:
  aggregate decode tokens/s = sum over streams of (tokens - 1) / (last chunk of the last stream - first token of
  the first stream); the ratio columns divide by the one-stream figure of the same server;
  TTFT = request sent -> first content chunk, the mean and max over the S streams (all sent together, so the
  later ones wait for the earlier prefills);
  all decoding = tokens/s while every stream of the S decodes (the last stream's first token to the first
  stream's last): the steps alone, without the prefills of the later streams that pause the earlier ones;
  TTFT under load: one more request sent while 7 streams are decoding (the 8th row free).
Each figure is the best of --reps repetitions. The load average (1 minute) is printed at the start and the end.

    .venv/bin/python benchmarks/bench_serve.py --step-costs [--model DIR]

prints instead the time of one decode step of each row group's cache (1, 2, 4, 8 rows, every row at slot 40 of
512), in this process, no server: the bound on what batching can give (8 streams over one stream <= 8 x the
one-row step / the 8-row step).

    .venv/bin/python benchmarks/bench_serve.py --long-prompt [--model DIR] [--reps 2]

prints instead, for an engine with chunked prefill (the default) and one without, in this process, interleaved:
while one stream decodes, a 1080p image prompt (the real processor's pixel budget) arrives; the time to its first
token, the stream's longest wait between two tokens meanwhile and how many tokens the stream got meanwhile.
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
    # while every stream decodes: from the last stream's first token to the first stream's last one
    a, b = max(o["times"][0] for o in outs), min(o["times"][-1] for o in outs)
    # (a chunk may carry several tokens: the text of a token that ends inside a character waits for the next)
    steady = sum(sum(a < t <= b for t in o["times"]) * (o["tokens"] - 1) / max(len(o["times"]) - 1, 1)
                 for o in outs) / (b - a) if b > a else float("nan")
    return decoded / (last - first), sum(ttft) / s, max(ttft), steady


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


def step_costs(model_dir, rows=(1, 2, 4, 8), n=15):
    import numpy as np
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from glm4v_ms import Glm4vForConditionalGeneration
    from glm4v_ms.batch import Batch
    from glm4v_ms.steps import decode_one
    model = Glm4vForConditionalGeneration.from_pretrained(model_dir)
    load0, t = os.getloadavg()[0], {}
    for b in rows:
        batch = Batch.empty(model, b, 512)
        batch.st.kv_valid[:, :40] = True
        tok = np.zeros(b, np.int64)
        times = []
        for i in range(n + 1):   # the first compiles
            batch.st.slot[:], batch.st.next_pos[:] = 40, 40
            t0 = time.perf_counter()
            decode_one(model, batch.st, tok)
            times.append(time.perf_counter() - t0)
        t[b] = float(np.median(times[1:]))
    print(f"decode step of one cache, median of {n}; load average {load0:.1f} at the start, "
          f"{os.getloadavg()[0]:.1f} at the end")
    print("| rows | step (ms) | vs 1 row | tokens/s | vs 1 row |")
    print("|---:|---:|---:|---:|---:|")
    for b in rows:
        print(f"| {b} | {t[b] * 1e3:.1f} | {t[b] / t[rows[0]]:.2f}x | {b / t[b]:.1f} | "
              f"{b / t[b] / (rows[0] / t[rows[0]]):.2f}x |")
    return 0


def long_prompt(model_dir, reps=2, size=(1920, 1080)):
    """Chunked prefill: a stream decodes while a 1080p image prompt (the real processor's pixel budget, as
    bench_ttft) is prefilled, on engines with and without chunked prefill, in this process, interleaved."""
    import numpy as np
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from bench_generate import drawn_image
    from bench_ttft import QUESTION, REAL_SIZE
    from glm4v_ms import Glm4vForConditionalGeneration, Glm4vProcessor
    from glm4v_ms.engine import Engine
    model = Glm4vForConditionalGeneration.from_pretrained(model_dir)
    proc = Glm4vProcessor.from_pretrained(model_dir)
    chat = lambda content: proc.apply_chat_template(  # noqa: E731
        [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=True, return_dict=True,
        images_kwargs={"size": REAL_SIZE})
    big = chat([{"type": "image", "image": drawn_image(*size)}, {"type": "text", "text": QUESTION}])
    small = chat(PROMPTS[0])
    cfg = model.generation_config.updated(do_sample=False, min_new_tokens=10 ** 6)   # never stops early
    load0 = os.getloadavg()[0]
    # one engine thread at a time: MindSpore's eager ops are not to be run from two threads at once
    engines = {k: Engine(model, 2, 4096, chunked_prefill=k) for k in (True, False)}
    res = {k: [] for k in engines}

    def run(eng):
        eng.start()
        times, first = [], []
        done = threading.Event()
        eng.submit(small, cfg, None, lambda kind, v: times.append(time.perf_counter()) if kind == "token" else None)
        while len(times) < 5:
            time.sleep(0.01)
        t0 = time.perf_counter()
        eng.submit(big, cfg, 1, lambda kind, v: (first.append(time.perf_counter()) if kind == "token"
                                                       else done.set()))
        done.wait()
        t1 = first[0]
        for g in eng.groups:   # stop the stream
            for q in g.seqs:
                if q is not None:
                    q.cancel()
        while eng.busy_rows():
            time.sleep(0.01)
        eng.stop()
        during = [t for t in times if t0 <= t <= t1]
        gaps = np.diff([t0, *during, t1])
        return t1 - t0, float(gaps.max()), len(during)

    for eng in engines.values():   # warm-up: the prompt graphs
        run(eng)
    for _ in range(reps):
        for k, eng in engines.items():
            res[k].append(run(eng))
    print(f"a stream decoding while a {size[0]}x{size[1]} image prompt ({big['input_ids'].shape[1]} tokens) is "
          f"prefilled; 2 rows x 4096; best of {reps}; load average {load0:.1f} at the start, "
          f"{os.getloadavg()[0]:.1f} at the end")
    print("| prefill | image prompt's first token (s) | stream's longest wait for a token (s) "
          "| stream's tokens meanwhile |")
    print("|---|---:|---:|---:|")
    for k, name in ((True, "chunked (default)"), (False, "whole (--no-chunked-prefill)")):
        ttft, gap, n = min(res[k], key=lambda r: r[1])
        print(f"| {name} | {ttft:.2f} | {gap:.2f} | {n} |")
    return 0


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", help="checkpoint folder (default: the bench-serve-150m random checkpoint)")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--streams", type=int, nargs="+", default=[1, 4, 8])
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--step-costs", action="store_true", help="time one decode step per row-group size instead")
    ap.add_argument("--long-prompt", action="store_true",
                    help="instead: a stream's waits while a 1080p image prompt is prefilled, chunked or whole")
    a = ap.parse_args(argv)
    if a.step_costs:
        return step_costs(a.model or checkpoint())
    if a.long_prompt:
        return long_prompt(a.model or checkpoint(), a.reps)
    rows = max(8, max(a.streams))
    model = a.model or checkpoint()
    load0 = os.getloadavg()[0]
    kinds = {"groups": ["--max-num-seqs", str(rows)], "one cache": ["--max-num-seqs", str(rows), "--no-row-groups"],
             "1-row": ["--max-num-seqs", "1"]}
    servers = {}
    try:
        for k, extra in kinds.items():
            servers[k] = start_server(model, [*extra, "--max-model-len", "512"], timeout=900)
        for k, (_, url) in servers.items():   # warm-up: the prefill graphs (the decode graphs compile at start)
            for s in sorted(set(a.streams)) if k != "1-row" else [1]:
                run_streams(url, s, 4)
        res = {k: {} for k in kinds}
        for _ in range(a.reps):
            for s in a.streams:
                for k, (_, url) in servers.items():
                    if k == "1-row" and s != 1:
                        continue
                    r = run_streams(url, s, a.max_tokens)
                    if s not in res[k] or r[0] > res[k][s][0]:
                        res[k][s] = r
        under = {k: min(ttft_under_load(servers[k][1], a.max_tokens) for _ in range(a.reps))
                 for k in ("groups", "one cache")}
    finally:
        for proc, _ in servers.values():
            stop_server(proc)
    single = res["1-row"][1][0]
    print(f"model {a.model or 'bench-serve-150m'}, {rows} rows, {a.max_tokens} tokens per stream, best of {a.reps}; "
          f"load average {load0:.1f} at the start, {os.getloadavg()[0]:.1f} at the end")
    print("| streams | row groups: tokens/s | vs 1 stream | all decoding (vs 1) | TTFT mean / max (s) "
          "| one 8-row cache: tokens/s | vs 1 stream | all decoding (vs 1) | TTFT mean / max (s) "
          "| groups / one cache |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    g1, o1 = res["groups"][a.streams[0]], res["one cache"][a.streams[0]]
    for s in a.streams:
        (g, gm, gx, gs), (o, om, ox, os_) = res["groups"][s], res["one cache"][s]
        print(f"| {s} | {g:.1f} | {g / g1[0]:.2f}x | {gs:.1f} ({gs / g1[3]:.2f}x) | {gm:.2f} / {gx:.2f} | {o:.1f} "
              f"| {o / o1[0]:.2f}x | {os_:.1f} ({os_ / o1[3]:.2f}x) | {om:.2f} / {ox:.2f} | {g / o:.2f}x |")
    print(f"one stream on a 1-row server (--max-num-seqs 1): {single:.1f} tokens/s; 8 streams on the row groups: "
          f"{res['groups'][max(a.streams)][0] / single:.2f}x that")
    print(f"TTFT of one request arriving while 7 streams decode: {under['groups']:.2f} s (row groups), "
          f"{under['one cache']:.2f} s (one cache)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
