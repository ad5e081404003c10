"""The OpenAI-compatible server, driven by the official `openai` client against a real uvicorn on a free port."""
import base64
import io
import json
import os
import time
import urllib.request

import numpy as np
import openai
import pytest
from PIL import Image

from processing_fixtures import drawn_image, encode_clip
from serving import Running, script_sampler


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    from glm4v_ms import demo
    root = tmp_path_factory.mktemp("serve")
    d = demo.build(str(root / "tiny"), "demo-tiny", seed=2)
    media = root / "media"
    media.mkdir()
    drawn_image(64, 48).save(media / "ok.png")
    s = Running(["--model", d, "--max-num-seqs", "2", "--max-model-len", "1024", "--max-queue", "2",
                 "--served-model-name", "glm-tiny", "--allowed-local-media-path", str(media)])
    s.media, s.folder = media, d
    yield s
    s.close()


def data_url(im, fmt="PNG"):
    buf = io.BytesIO()
    im.save(buf, fmt)
    return f"data:image/{fmt.lower()};base64," + base64.b64encode(buf.getvalue()).decode()


def user(*parts):
    return [{"role": "user", "content": list(parts)}]


def text(t):
    return {"type": "text", "text": t}


def image(url):
    return {"type": "image_url", "image_url": {"url": url}}


def test_models_and_health(srv):
    assert [m.id for m in srv.client.models.list().data] == ["glm-tiny"]
    with urllib.request.urlopen(srv.url + "/health") as r:
        assert json.loads(r.read())["status"] == "ok"


def test_text_greedy_is_what_generate_gives(srv):
    """A greedy request's reply is model.generate's on the same prompt, decoded."""
    msgs = [{"role": "user", "content": "Describe this image."}]
    r = srv.client.chat.completions.create(model="glm-tiny", messages=msgs, max_tokens=12, temperature=0)
    proc = srv.state.processor
    inp = proc.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=True)
    out = srv.engine.model.generate(**inp, max_new_tokens=12, do_sample=False)[0, inp["input_ids"].shape[1]:]
    eos = srv.engine.model.generation_config.eos_token_id
    n = int(np.flatnonzero(np.isin(out, eos))[0]) + 1 if np.isin(out, eos).any() else len(out)
    from glm4v_ms.processing.reply import split, strip_boxes
    want = strip_boxes(split(proc.decode(out[:n], skip_special_tokens=True))[1]).strip()
    c = r.choices[0]
    assert c.message.content == want
    assert c.finish_reason == ("length" if n == 12 and not np.isin(out[:n], eos).any() else "stop")
    assert r.usage.prompt_tokens == inp["input_ids"].shape[1] and r.usage.completion_tokens == n
    assert r.usage.total_tokens == r.usage.prompt_tokens + n and r.model == "glm-tiny"


def test_image_data_url_local_file_and_video(srv, tmp_path):
    im = drawn_image(80, 60, seed=3)
    r = srv.client.chat.completions.create(model="glm-tiny", messages=user(image(data_url(im)), text("What is this?")),
                                           max_tokens=5, temperature=0)
    with_image = r.usage.prompt_tokens
    r2 = srv.client.chat.completions.create(model="glm-tiny", messages=user(text("What is this?")), max_tokens=5)
    assert with_image > r2.usage.prompt_tokens + 4   # the image's tokens are in the prompt
    r3 = srv.client.chat.completions.create(
        model="glm-tiny", messages=user(image("file://" + str(srv.media / "ok.png")), text("What is this?")), max_tokens=3)
    assert r3.usage.completion_tokens >= 1
    clip = tmp_path / "c.mp4"
    encode_clip(str(clip), seconds=1.0)
    url = "data:video/mp4;base64," + base64.b64encode(clip.read_bytes()).decode()
    r4 = srv.client.chat.completions.create(
        model="glm-tiny", messages=user({"type": "video_url", "video_url": {"url": url}}, text("What happens?")),
        max_tokens=4)
    assert r4.usage.prompt_tokens > r2.usage.prompt_tokens + 4 and r4.choices[0].finish_reason in ("stop", "length")


def test_stream_with_usage_equals_whole_reply(srv):
    msgs = user(text("The quick brown fox"))
    whole = srv.client.chat.completions.create(model="glm-tiny", messages=msgs, max_tokens=20, temperature=0)
    chunks = list(srv.client.chat.completions.create(model="glm-tiny", messages=msgs, max_tokens=20, temperature=0,
                                                     stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert content.strip() == whole.choices[0].message.content
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finals) == 1 and finals[0].choices[0].finish_reason == whole.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_n_choices(srv):
    """`n` choices are n requests to the engine: greedy, n copies of the one-choice reply; sampled with a seed,
    choice i samples with seed + i (choices differ, a repeat gives the same ones, choice 1 is the one-choice reply
    of seed + 1); streamed, each choice's chunks carry its index and add up to its reply; usage counts them all."""
    msgs = user(text("The quick brown fox"))
    def ask(**kw):
        return srv.client.chat.completions.create(model="glm-tiny", messages=msgs, max_tokens=12, **kw)
    one, two = ask(temperature=0), ask(temperature=0, n=2)
    assert [c.index for c in two.choices] == [0, 1]
    assert [c.message.content for c in two.choices] == [one.choices[0].message.content] * 2
    assert two.usage.completion_tokens == 2 * one.usage.completion_tokens
    assert two.usage.prompt_tokens == one.usage.prompt_tokens
    full = ask(temperature=1.0, seed=7, n=2)
    sampled = [c.message.content for c in full.choices]
    assert sampled == [c.message.content for c in ask(temperature=1.0, seed=7, n=2).choices]
    assert sampled[0] != sampled[1] and sampled[1] == ask(temperature=1.0, seed=8).choices[0].message.content
    chunks = list(ask(temperature=1.0, seed=7, n=2, stream=True, stream_options={"include_usage": True}))
    for i in range(2):
        mine = [c.choices[0] for c in chunks if c.choices and c.choices[0].index == i]
        assert mine[0].delta.role == "assistant" and sum(c.finish_reason is not None for c in mine) == 1
        assert "".join(c.delta.content or "" for c in mine).strip() == sampled[i]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    for bad in (0, 17, "two"):
        code, body = srv.post({"messages": msgs, "n": bad})
        assert code == 400 and body["error"]["param"] == "n", body


def test_sse_ends_with_done(srv):
    req = urllib.request.Request(srv.url + "/v1/chat/completions", method="POST", headers={"Content-Type": "application/json"},
                                 data=json.dumps({"messages": user(text("Hi")), "max_tokens": 3, "stream": True}).encode())
    with urllib.request.urlopen(req) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [ln for ln in r.read().decode().split("\n\n") if ln]
    assert lines[-1] == "data: [DONE]" and all(ln.startswith("data: ") for ln in lines)


def test_reasoning_split_and_boxes(srv, monkeypatch):
    """A reply scripted token by token (the sampler is forced; model, engine, detokenising are real):
    <think>...</think><answer>...<|begin_of_box|>[..]<|end_of_box|></answer> -> reasoning, clean content, and
    the box in pixels of the original image, streamed and whole."""
    script_sampler(monkeypatch, srv.state.processor.tokenizer,
                   "<think>Let me think.</think><answer>A cat <|begin_of_box|>[100,250,500,750]<|end_of_box|> here.</answer>")
    msgs = user(image(data_url(drawn_image(200, 120))), text("Where is the cat?"))
    r = srv.client.chat.completions.create(model="glm-tiny", messages=msgs, max_tokens=100)
    m = r.choices[0].message
    assert m.content == "A cat [100,250,500,750] here."
    assert m.reasoning_content == "Let me think." and m.reasoning == "Let me think."
    assert r.choices[0].finish_reason == "stop"   # </answer> is an eos id of GLM-4.1V
    assert m.boxes == [{"relative": [100, 250, 500, 750], "box": [20, 30, 100, 90]}]
    chunks = list(srv.client.chat.completions.create(model="glm-tiny", messages=msgs, max_tokens=100, stream=True))
    deltas = [c.choices[0].delta for c in chunks]
    assert "".join(getattr(d, "reasoning_content", None) or "" for d in deltas).strip() == "Let me think."
    assert "".join(d.content or "" for d in deltas).strip() == m.content
    assert not any("<" in (d.content or "") for d in deltas)
    assert getattr(deltas[-1], "boxes", None) == m.boxes


def test_stop_strings(srv, monkeypatch):
    script = script_sampler(monkeypatch, srv.state.processor.tokenizer, "The answer is yes. The dog runs")
    r = srv.client.chat.completions.create(model="glm-tiny", messages=user(text("?")), max_tokens=50, stop=["yes"])
    assert r.choices[0].message.content == "The answer is" and r.choices[0].finish_reason == "stop"
    assert r.usage.completion_tokens < len(script)


def test_errors_keep_the_server_serving(srv):
    big = Image.fromarray(np.random.default_rng(0).integers(0, 255, (900, 900, 3), np.uint8))
    cases = [
        (dict(raw=b"{not json"), 400, "not valid JSON"),
        (dict(body={"messages": "hi"}), 400, "messages"),
        (dict(body={"messages": user(text("x")), "max_tokens": "ten"}), 400, "max_tokens"),
        (dict(body={"messages": user(text("x")), "temperature": -1}), 400, "temperature"),
        (dict(body={"messages": user(text("x")), "bogus": 1}), 400, "bogus"),
        (dict(body={"messages": user(text("x")), "logprobs": True}), 400, "logprobs"),
        (dict(body={"messages": user(image("data:image/png;base64,aGVsbG8="))}), 400, "does not decode"),
        (dict(body={"messages": user(image("data:image/png;base64,@@@"))}), 400, "base64"),
        (dict(body={"messages": user(image("/etc/passwd"))}), 400, "outside the allowed"),
        (dict(body={"messages": user(image("file:///etc/hostname"))}), 400, "outside the allowed"),
        (dict(body={"messages": user(*[image(data_url(drawn_image(28, 28)))] * 9)}), 400, "too many images"),
        (dict(body={"messages": user(text("x")), "max_tokens": 5000}), 400, "maximum context length"),
        (dict(body={"messages": user(text("word " * 1500))}), 400, "maximum context length"),
        (dict(body={"model": "gpt-4", "messages": user(text("x"))}), 404, "does not exist"),
        (dict(body={"messages": user(text("x"))}, path="/v1/nothing"), 404, "Not Found"),
    ]
    for kw, status, words in cases:
        code, body = srv.post(kw.get("body"), kw.get("path", "/v1/chat/completions"), raw=kw.get("raw"))
        assert code == status, (kw, body)
        assert set(body) == {"error"} and words in body["error"]["message"] and body["error"]["code"] == status
    limit = srv.state.media.max_bytes
    srv.state.media.max_bytes = 1000
    try:
        with pytest.raises(openai.APIStatusError) as e:
            srv.client.chat.completions.create(model="glm-tiny", messages=user(image(data_url(big))), max_tokens=2)
        assert e.value.status_code == 413
    finally:
        srv.state.media.max_bytes = limit
    with pytest.raises(openai.BadRequestError) as e:
        srv.client.chat.completions.create(model="glm-tiny", messages=user(text("x")), max_tokens=5000)
    assert "maximum context length" in e.value.body["message"]
    srv.state.api_key = "sekret"
    try:
        with pytest.raises(openai.AuthenticationError):
            srv.client.models.list()
        ok = openai.OpenAI(base_url=srv.url + "/v1", api_key="sekret", max_retries=0)
        assert ok.chat.completions.create(model="glm-tiny", messages=user(text("x")), max_tokens=2).choices
    finally:
        srv.state.api_key = None
    r = srv.client.chat.completions.create(model="glm-tiny", messages=user(text("still there?")), max_tokens=3)
    assert r.usage.completion_tokens >= 1 and srv.engine.error is None


def test_disconnect_stops_generation_and_full_queue_is_503(srv):
    e = srv.engine
    cfg = e.model.generation_config.updated(do_sample=False, eos_token_id=[-5])   # never stops by itself
    e.model.generation_config, saved = cfg, e.model.generation_config
    srv.state.defaults = cfg
    try:
        streams = [srv.client.chat.completions.create(model="glm-tiny", messages=user(text(f"go {i}")), max_tokens=900,
                                                      stream=True) for i in range(2)]
        for s in streams:
            next(iter(s))
        t = time.time()
        while e.busy_rows() < 2 and time.time() - t < 20:
            time.sleep(0.02)
        assert e.busy_rows() == 2
        inp = srv.state.processor.apply_chat_template(user(text("wait")), add_generation_prompt=True, tokenize=True,
                                                      return_dict=True)
        waiting = [e.submit(inp, cfg, 5) for _ in range(2)]   # the queue (2) is full now
        code, body = srv.post({"messages": user(text("one more")), "max_tokens": 2})
        assert code == 503 and "try again" in body["error"]["message"]
        for w in waiting:
            w.cancel()
        for s in streams:
            s.close()   # the client goes away mid-stream
        t = time.time()
        while e.busy_rows() and time.time() - t < 20:
            time.sleep(0.05)
        assert e.busy_rows() == 0   # both rows freed long before 900 tokens
    finally:
        e.model.generation_config = srv.state.defaults = saved
    assert srv.client.chat.completions.create(model="glm-tiny", messages=user(text("ok")), max_tokens=2).choices


def test_incremental_text_equals_whole_decode(srv):
    """Windowed detokenising (multi-byte characters split over tokens included) gives the whole decode; the
    streamed deltas add up to the whole reply; a stop string cuts the text before it."""
    from glm4v_ms.processing.reply import Reply
    tok = srv.state.processor.tokenizer
    s = "<think>我们来一步一步地思考。</think><answer>这是一只狗 <|begin_of_box|>[1,2,3,4]<|end_of_box|>, yes.</answer>"
    ids = tok.encode(s, add_special_tokens=False)
    reply = Reply(tok)
    streamed = ["", ""]
    for i in ids:
        r, c = reply.add(i)
        streamed[0] += r
        streamed[1] += c
    r, c = reply.finish()
    assert reply.text == tok.decode(ids, skip_special_tokens=True) == s
    assert reply.result() == ("我们来一步一步地思考。", "这是一只狗 [1,2,3,4], yes.")
    assert (streamed[0] + r, streamed[1] + c) == reply.result()
    cut = Reply(tok, stops=["一只"])
    for i in ids:
        cut.add(i)
        if cut.stopped:
            break
    assert cut.stopped and cut.result() == ("我们来一步一步地思考。", "这是")


def test_http_image_with_size_cap(srv):
    """An http(s) image is fetched (timeout, size cap); one over the cap is a 413; a 404 upstream a 400."""
    import functools
    import http.server
    import threading
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(srv.media))
    handler.log_message = lambda *a: None
    web = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=web.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{web.server_address[1]}"
    try:
        drawn_image(300, 200, seed=9).save(srv.media / "big.png")
        r = srv.client.chat.completions.create(model="glm-tiny", messages=user(image(base + "/ok.png"), text("?")),
                                               max_tokens=2)
        assert r.usage.prompt_tokens > 10
        limit = srv.state.media.max_bytes
        srv.state.media.max_bytes = os.path.getsize(srv.media / "big.png") - 1
        try:
            code, body = srv.post({"messages": user(image(base + "/big.png"))})
            assert code == 413 and "limit" in body["error"]["message"]
        finally:
            srv.state.media.max_bytes = limit
        code, body = srv.post({"messages": user(image(base + "/missing.png"))})
        assert code == 400 and "HTTP 404" in body["error"]["message"]
    finally:
        web.shutdown()


def test_thinking_budget_and_template_kwargs(srv, monkeypatch):
    """max_thinking_tokens closes the thinking after that many tokens (</think><answer> forced by the engine);
    chat_template_kwargs reach the template (a wrong type, or a variable the template does not read, is a 400;
    test_moe_cli.py shows enable_thinking reaching GLM-4.5V's template)."""
    tok = srv.state.processor.tokenizer
    script = script_sampler(monkeypatch, tok, "<think>The quick brown fox jumps over the lazy dog")
    r = srv.client.chat.completions.create(model="glm-tiny", messages=user(text("Think.")), max_tokens=12,
                                           extra_body={"max_thinking_tokens": 3})
    m = r.choices[0].message
    assert m.reasoning_content == tok.decode(script[1:3]).strip()
    assert len(script) >= 8 and m.content.startswith(tok.decode(script[5:7]).strip())   # </think><answer> were 4th, 5th
    code, body = srv.post({"messages": user(text("x")), "chat_template_kwargs": "yes"})
    assert code == 400 and "chat_template_kwargs" in body["error"]["message"]
    # a variable this checkpoint's template does not read is refused by name, never dropped silently
    code, body = srv.post({"messages": user(text("x")), "chat_template_kwargs": {"enable_thinking": False}})
    assert code == 400 and "enable_thinking" in body["error"]["message"]



def test_cli_bad_arguments_one_line():
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for args, rc, line in ((["--model", "/nonexistent"], 1, "error: model folder not found: /nonexistent"),
                           (["--model", "x", "--max-num-seqs", "0"], 2, "glm4v_ms.serve: error: --max-num-seqs must be >= 1")):
        p = subprocess.run([sys.executable, "-m", "glm4v_ms.serve", *args], cwd=root, capture_output=True, text=True,
                           timeout=120, env=dict(os.environ, PYTHONPATH=root))
        assert p.returncode == rc and p.stderr.strip().startswith(line) and len(p.stderr.strip().splitlines()) == 1
