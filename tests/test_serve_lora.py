"""Adapters in the server (vLLM's --lora-modules, --max-loras, --max-lora-rank, /v1/load_lora_adapter and
/v1/unload_lora_adapter): PEFT adapters made by PEFT itself on the tiny checkpoint (different ranks, target modules
and scalings; B random, so that each changes the output), served beside the base. Requests for the base and the
adapters decode in the same batch step, each row with its own adapter, and each answer is the library's greedy
generate with that adapter loaded (model.load_adapter), token for token, and what the request gets alone; more
adapters than slots wait for one; an adapter loaded while serving writes a slot and compiles nothing. One server
launch, as the README writes the command; GLM-4.5V (MoE) in the engine in-process."""
import base64
import io
import json
import os
import shlex
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import pytest

from glm4v_ms import Glm4vForConditionalGeneration, Glm4vProcessor, demo, multi_lora
from glm4v_ms.engine import Engine
from glm4v_ms.finetune import lora as L
from glm4v_ms.processing.reply import split, strip_boxes
from processing_fixtures import drawn_image
from serving import sigterm, wait_healthy
from test_parallel import free_port
from test_readme_commands import ROOT, blocks, child_env

N = 10   # new tokens per request (min_tokens too: every answer has them all)


def peft_adapter(base, dst, r, alpha, target_modules, rslora=False, seed=0):
    import reference  # noqa: F401  (torchvision schemas before transformers)
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import Glm4vForConditionalGeneration as Ref
    torch.manual_seed(seed)   # PEFT draws A from torch's global generator: the same adapter whatever ran before
    pm = get_peft_model(Ref.from_pretrained(base).eval(), LoraConfig(
        r=r, lora_alpha=alpha, use_rslora=rslora, target_modules=target_modules, task_type="CAUSAL_LM"))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
    pm.save_pretrained(dst)
    return dst


def chats():
    buf = io.BytesIO()
    drawn_image(64, 48, seed=4).save(buf, "PNG")
    url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    text = [{"role": "user", "content": "Describe this image."}]
    image = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                          {"type": "text", "text": "What is in the picture?"}]}]
    return {"text": text, "image": image}


def for_processor(chat):
    """The same chat as the library takes it (the image decoded)."""
    from PIL import Image
    out = []
    for m in chat:
        if isinstance(m["content"], str):
            out.append(m)
            continue
        parts = []
        for p in m["content"]:
            if p["type"] == "image_url":
                raw = base64.b64decode(p["image_url"]["url"].split(",", 1)[1])
                parts.append({"type": "image", "image": Image.open(io.BytesIO(raw)).convert("RGB")})
            else:
                parts.append(p)
        out.append({"role": m["role"], "content": parts})
    return out


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve_lora")
    d = demo.build(str(root / "tiny"), "demo-tiny", seed=2)
    # "charts": rank 4 on q/v (a list, PEFT's suffix rule); "sql": rank 8, rsLoRA, the MLPs, o_proj and the vision
    # merger's down_proj (a regex), so rows of one step take different linears, ranks and scalings
    adapters = {
        "charts": peft_adapter(d, str(root / "charts"), 4, 8, ["q_proj", "v_proj"], seed=0),
        "sql": peft_adapter(d, str(root / "sql"), 8, 16, r"^(model\.language_model(?=\.).*\.(o_proj|gate_up_proj|"
                            r"down_proj)|model\.visual\.merger\.down_proj)$", rslora=True, seed=1)}
    # loaded while serving: "third" (rank 8 on k_proj and down_proj), "big" (rank 16: above --max-lora-rank 8)
    more = {"third": peft_adapter(d, str(root / "third"), 8, 8,
                                   r"^model\.language_model\..*\.(k_proj|down_proj)$", seed=2),
            "big": peft_adapter(d, str(root / "big"), 16, 16, ["q_proj"], seed=3)}
    model, proc = Glm4vForConditionalGeneration.from_pretrained(d), Glm4vProcessor.from_pretrained(d)
    inputs = {k: proc.apply_chat_template(for_processor(c), add_generation_prompt=True, tokenize=True,
                                          return_dict=True) for k, c in chats().items()}
    want = {}   # (adapter or None, chat) -> the library's greedy tokens
    for name in (None, *adapters, "third"):
        if name is not None:
            model.load_adapter({**adapters, **more}[name])
        for k, x in inputs.items():
            want[name, k] = model.generate(**x, max_new_tokens=N, min_new_tokens=N, do_sample=False)[
                0, x["input_ids"].shape[1]:]
        if name == "charts":   # a long answer: decoding while other slots are rewritten
            x = inputs["text"]
            want[name, "long"] = model.generate(**x, max_new_tokens=4 * N, min_new_tokens=4 * N, do_sample=False)[
                0, x["input_ids"].shape[1]:]
    L.remove(model)
    for k in inputs:   # each adapter changes the answer
        assert all(not np.array_equal(want[n, k], want[None, k]) for n in ("charts", "sql", "third"))
    return dict(folder=d, adapters=adapters, more=more, model=model, proc=proc, inputs=inputs, want=want, root=root)


def wait_all(reqs):
    while any(r.seq.finish_reason is None for r in reqs):
        time.sleep(0.02)


def test_rows_of_one_step_each_with_its_adapter(setup):
    """The engine on the library's model with a bank of 2 slots: the base and both adapters admitted together
    decode in the same steps (the selector of one step holds all three), each equal to the library's generate
    with its adapter; a second round reuses each prompt's cache from a row of the same adapter only. Then an
    adapter read while the engine runs goes into the slot used longest ago (no graph compiled), and requests for
    three adapters at once over two slots: one waits for a slot, then takes it while another row decodes, and each
    answers its own."""
    from mindspore.graph import api
    model, inputs, want = setup["model"], setup["inputs"], setup["want"]
    bank = multi_lora.install(model, list(setup["adapters"].items()), 4, max_loras=2, max_rank=8)
    assert bank.resident_names() == ["charts", "sql"] and bank.loads == 2
    steps, real = [], bank.select
    bank.select = lambda a: (steps.append(tuple(int(v) for v in np.asarray(a).reshape(-1))), real(a))[1]
    engine = Engine(model, 4, 256, prefix_reuse=True, row_groups=False).start()
    try:
        cfg = model.generation_config.updated(do_sample=False, min_new_tokens=N)
        names = [None, "charts", "sql"]
        for order in (names, names[::-1]):
            reqs = {n: engine.submit(inputs["text"], cfg, N, adapter=bank.adapters.get(n)) for n in order}
            wait_all(reqs.values())
            for n, r in reqs.items():
                assert r.tokens == want[n, "text"].tolist(), n
            if order is not names:   # the second round: every prompt's prefix from its own adapter's row
                assert all(r.reused_tokens > 0 for r in reqs.values()), [r.reused_tokens for r in reqs.values()]
        assert any(len(s) == 4 and {0, 1, 2} <= set(s) for s in steps), sorted(set(steps))
        g = engine.groups[-1]
        held = [r for r in g.free_rows() if g.saved[r] is not None]
        uids = {0} | {a.uid for a in bank.adapters.values()}
        assert held and all(g.shared(reqs[None].prompt, r, a) == 0 for r in held for a in uids
                            if g.saved[r][3] != a)

        graphs = set(api.ms_compile_cache)
        bank.adapters["third"] = third = bank.read("third", setup["more"]["third"])   # as /v1/load_lora_adapter
        r = engine.submit(inputs["text"], cfg, N, adapter=third)
        wait_all([r])
        assert r.tokens == want["third", "text"].tolist()
        # sql's slot was used longest ago (the second round admitted sql, then charts): it was rewritten
        assert bank.resident_names() == ["charts", "third"] and bank.loads == 3
        assert set(api.ms_compile_cache) == graphs, set(api.ms_compile_cache) - graphs

        # charts decodes 4N tokens; sql takes third's slot; third waits for it (both slots in use), then takes it
        # back while charts still decodes: slot writes beside a running row leave it undisturbed
        long = engine.submit(inputs["text"], cfg.updated(min_new_tokens=4 * N), 4 * N, adapter=bank.adapters["charts"])
        reqs = {n: engine.submit(inputs["text"], cfg, N, adapter=bank.adapters.get(n)) for n in ("sql", "third", None)}
        wait_all([long, *reqs.values()])
        for n, r in reqs.items():
            assert r.tokens == want[n, "text"].tolist(), n
        assert long.tokens == want["charts", "long"].tolist()
        assert engine.slot_waits > 0 and bank.loads == 5 and not engine.deferred
        assert reqs["third"].first_token_s > reqs["sql"].first_token_s
        assert set(api.ms_compile_cache) == graphs, set(api.ms_compile_cache) - graphs
    finally:
        engine.stop()
        multi_lora.uninstall(model)


def test_moe_adapter_in_the_engine(tmp_path):
    """GLM-4.5V (the tiny MoE checkpoint): an adapter made by PEFT on transformers' Glm4vMoe model (attention, the
    dense layer's MLP and the shared experts) served in the engine's bank beside the base, both rows in the same
    steps, each equal to the library's greedy generate (with model.load_adapter for the adapter's)."""
    import tinylora
    import tinyref
    from glm4v_ms import AutoModelForImageTextToText
    d, ad = str(tmp_path / "moe"), str(tmp_path / "moe-lora")
    tinylora.build("moe", d)
    tinylora.peft_model("moe", d, r=4, alpha=8, b_scale=0.5).save_pretrained(ad)
    model = AutoModelForImageTextToText.from_pretrained(d)
    x = tinyref.Prompt(3).text(5).image(4, 4).text(6).inputs()
    gen = dict(max_new_tokens=N, min_new_tokens=N, do_sample=False)
    n = x["input_ids"].shape[1]
    want = {None: model.generate(**x, **gen)[0, n:].tolist()}
    model.load_adapter(ad)
    want["moe"] = model.generate(**x, **gen)[0, n:].tolist()
    L.remove(model)
    assert want["moe"] != want[None]
    bank = multi_lora.install(model, [("moe", ad)], 2, max_loras=1, max_rank=8)
    assert any(".mlp.shared." in k for k in bank.adapters["moe"].deltas), sorted(bank.adapters["moe"].deltas)
    engine = Engine(model, 2, 256, row_groups=False).start()
    try:
        cfg = model.generation_config.updated(do_sample=False, min_new_tokens=N)
        reqs = {k: engine.submit(x, cfg, N, adapter=bank.adapters.get(k)) for k in (None, "moe")}
        wait_all(reqs.values())
        assert {k: r.tokens for k, r in reqs.items()} == want
    finally:
        engine.stop()
        multi_lora.uninstall(model)


def test_prompt_cache_is_keyed_by_adapter(setup):
    """generate(past_key_values=PromptCache()) after model.load_adapter: the prefix cached without the adapter
    is not reused (its keys and values are the base's); the next call with the same adapter reuses it."""
    from glm4v_ms import PromptCache
    model, x, want = setup["model"], setup["inputs"]["text"], setup["want"]
    n, pc = x["input_ids"].shape[1], PromptCache()
    gen = dict(max_new_tokens=N, min_new_tokens=N, do_sample=False, past_key_values=pc)
    try:
        assert model.generate(**x, **gen)[0, n:].tolist() == want[None, "text"].tolist()
        model.load_adapter(setup["adapters"]["charts"])
        assert model.generate(**x, **gen)[0, n:].tolist() == want["charts", "text"].tolist() and pc.reused == 0
        assert model.generate(**x, **gen)[0, n:].tolist() == want["charts", "text"].tolist() and pc.reused > 0
    finally:
        L.remove(model)


def test_beam_search_on_a_model_holding_a_bank(setup):
    """A model serving adapters (a bank installed, the last step's rows on an adapter's slot): the library's beam
    search runs the base, as generate() does, not the adapter the server's last step selected."""
    model, x = setup["model"], setup["inputs"]["text"]
    gen = dict(max_new_tokens=4, num_beams=2, do_sample=False)
    want = model.generate(**x, **gen)
    bank = multi_lora.install(model, list(setup["adapters"].items()), 4, max_loras=2, max_rank=8)
    try:
        bank.select([1, 1, 1, 1])   # as the engine leaves it after a step of rows on slot 1
        np.testing.assert_array_equal(model.generate(**x, **gen), want)
    finally:
        multi_lora.uninstall(model)


class FakeChannel:
    """ranks.Channel in one process, as rank `rank`: what rank 0 sends (msgs), what this rank receives (inbox),
    and what all-gather brings back: the next of `others` (the other ranks' parts, in rank order) with this rank's
    part inserted at its place."""

    def __init__(self, rank, inbox=(), others=()):
        self.rank, self.msgs, self.inbox, self.others, self.parts = rank, [], list(inbox), list(others), []
        self.sent, self.last = 0, time.monotonic()

    def send(self, msg):
        self.msgs.append(msg)
        self.sent, self.last = self.sent + 1, time.monotonic()

    def recv(self):
        return self.inbox.pop(0)

    def gather(self, obj):
        self.parts.append(obj)
        out = list(self.others.pop(0))
        out.insert(self.rank, obj)
        return out


def test_rank_protocol_for_adapters(setup, tmp_path, monkeypatch):
    """The msrun server's adapter messages (serve/ranks.py), each side alone over a FakeChannel. Rank 0: a runtime
    load that failed on another rank raises that rank's error (and nothing is kept); a slot write is sent before
    the admit that uses it, and the answer is the library's; an unload is sent, then, once nothing on rank 0 holds
    the adapter, a forget. Another rank: a load it cannot read (the folder gone) or that another rank failed is
    not kept (a later slot write naming it is an error, not a silent wrong answer); a load every rank read is
    written where rank 0 says."""
    from glm4v_ms.serve import ranks
    model, third = setup["model"], setup["more"]["third"]
    bank = multi_lora.install(model, [("charts", setup["adapters"]["charts"])], 1, max_loras=1, max_rank=8)
    try:
        gone = str(tmp_path / "gone")
        chan = FakeChannel(1, inbox=[("lora_load", 901, "third", gone), ("lora_load", 902, "third", third),
                                  ("lora_load", 903, "third", third), ("lora_write", 1, 903, "third"),
                                  ("lora_unload", 903), ("lora_forget", [903]), ("lora_write", 1, 902, "third")],
                           others=[[None], [None, (404, "Loading lora third failed: No adapter found")], [None]])
        monkeypatch.setattr(ranks, "Channel", lambda lay: chan)
        with pytest.raises(RuntimeError, match="does not hold it"):
            ranks.follow(Engine(model, 1, 256, row_groups=False))
        assert chan.parts[0][0] == 404 and "No adapter found" in chan.parts[0][1] and chan.parts[1:] == [None, None]
        assert [a.uid for a in bank.resident[1:]] == [903] and bank.resident[1].unloaded
        assert list(bank.adapters) == ["charts"]

        bank.write(1, bank.adapters["charts"])
        chan = FakeChannel(0, others=[[(404, "Loading lora third failed: No adapter found for X")], [None]])
        monkeypatch.setattr(ranks, "Channel", lambda lay: chan)
        engine = ranks.LeaderEngine(model, 1, 256, row_groups=False).start()
        try:
            ad = bank.read("third", third)
            with pytest.raises(multi_lora.AdapterNotFound, match=r"No adapter found for X \(on rank 1\)"):
                engine.adapter_loaded(ad)
            engine.adapter_loaded(ad)
            assert [m for m in chan.msgs if m[0] == "lora_load"] == [("lora_load", ad.uid, "third", third)] * 2
            bank.adapters["third"] = ad   # as /v1/load_lora_adapter does
            cfg = model.generation_config.updated(do_sample=False, min_new_tokens=N)
            r = engine.submit(setup["inputs"]["text"], cfg, N, adapter=ad)
            wait_all([r])
            assert r.tokens == setup["want"]["third", "text"].tolist()
            ops = [m[:2] if m[0] == "admit" else m for m in chan.msgs if m[0] in ("lora_write", "admit")]
            assert ops == [("lora_write", 1, ad.uid, "third"), ("admit", 0)], ops
            del bank.adapters["third"]
            ad.unloaded = True
            engine.adapter_unloaded(ad)
            assert chan.msgs[-1] == ("lora_unload", ad.uid)
            r = engine.submit(setup["inputs"]["text"], cfg, N, adapter=bank.adapters["charts"])   # takes third's slot
            wait_all([r])
            uid, ad, r = ad.uid, None, None
            import gc
            gc.collect()
            deadline = time.time() + 30
            while ("lora_forget", [uid]) not in chan.msgs:
                assert time.time() < deadline, chan.msgs[-5:]
                time.sleep(0.05)
        finally:
            engine.stop()
    finally:
        multi_lora.uninstall(model)


def lora_command():
    """The README's server command with --lora-modules, as (environment assignments, argv)."""
    for block in blocks():
        text = block.replace("\\\n", " ")
        for line in text.splitlines():
            words = shlex.split(line.split("#")[0]) if "glm4v_ms.serve" in line else []
            env = {}
            while words and "=" in words[0] and not words[0].startswith("-"):
                k, v = words.pop(0).split("=", 1)
                env[k] = v
            if words[:3] == ["python", "-m", "glm4v_ms.serve"] and "--lora-modules" in words:
                return env, words
    raise AssertionError("no `python -m glm4v_ms.serve ... --lora-modules` command in the README")


def request(url, body, path="/v1/chat/completions"):
    """(status, the reply: parsed JSON, or the text of a text/plain one)."""
    req = urllib.request.Request(url + path, data=None if body is None else json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=300) as r:
            raw, kind = r.read(), r.headers.get("Content-Type", "")
            return r.status, raw.decode() if kind.startswith("text/plain") else json.loads(raw)
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_server_with_adapters_slots_and_runtime_loading(setup, tmp_path):
    """The README's command (runtime loading on, 2 slots of rank 8): /v1/models lists the base and each adapter
    (root its folder, parent the base); six concurrent requests (the base and both adapters, a text and an image
    prompt each) answer what each answers alone and what the library's generate gives with that adapter; an
    unknown model is vLLM's 404. Then vLLM's runtime endpoints: a third adapter loaded (listed at once, answering
    the library's answer, in the slot used longest ago), three adapters at once over two slots, every refusal with
    vLLM's status, and an unload while a request for it streams (that request finishes undisturbed; then 404)."""
    env, argv = lora_command()
    assert env.get("VLLM_ALLOW_RUNTIME_LORA_UPDATING") in ("True", "1"), env
    assert argv[argv.index("--max-loras") + 1] == "2" and argv[argv.index("--max-lora-rank") + 1] == "8", argv
    i = argv.index("--lora-modules")
    names = [v.split("=", 1)[0] for v in argv[i + 1:i + 3]]
    assert sorted(names) == sorted(setup["adapters"]), argv
    argv[i + 1:i + 3] = [f"{n}={setup['adapters'][n]}" for n in names]
    argv[argv.index("--model") + 1] = setup["folder"]
    port = free_port()
    argv[argv.index("--port") + 1] = str(port)
    base = argv[argv.index("--served-model-name") + 1]
    argv = [sys.executable] + argv[1:] + ["--max-model-len", "512"]
    url = f"http://127.0.0.1:{port}"
    p = subprocess.Popen(argv, cwd=ROOT, env={**child_env(setup["root"] / "cache"), **env}, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    try:
        wait_healthy(url, p)
        with urllib.request.urlopen(url + "/v1/models") as r:
            cards = json.loads(r.read())["data"]
        assert [(c["id"], c["root"], c["parent"]) for c in cards] == [(base, base, None)] + [
            (n, setup["adapters"][n], base) for n in names]

        def body(m, k, **kw):
            return {"model": m, "messages": chats()[k], "max_tokens": N, "min_tokens": N, "temperature": 0, **kw}

        def together(jobs):
            got = {}
            threads = [threading.Thread(target=lambda j=j: got.__setitem__(j, request(url, body(*j))))
                       for j in jobs]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            return got
        proc, want = setup["proc"], setup["want"]

        def expected(m, k):
            tokens = want[None if m == base else m, k]
            return strip_boxes(split(proc.decode(tokens, skip_special_tokens=True))[1]).strip()

        jobs = [(m, k) for m in (base, *names) for k in chats()]
        both = together(jobs)
        alone = {j: request(url, body(*j)) for j in jobs}
        for j in jobs:
            (s1, r1), (s2, r2) = both[j], alone[j]
            assert s1 == s2 == 200, (j, r1, r2)
            assert r1["model"] == j[0] and r1["choices"][0]["message"] == r2["choices"][0]["message"], j
            assert r1["usage"]["completion_tokens"] == N, r1["usage"]
            assert r1["choices"][0]["message"]["content"] == expected(*j), j

        # streamed: the adapter's answer, chunk by chunk, each chunk naming it
        with urllib.request.urlopen(urllib.request.Request(
                url + "/v1/chat/completions", data=json.dumps({**body(names[1], "image"), "stream": True}).encode(),
                headers={"Content-Type": "application/json"}), timeout=300) as r:
            chunks = [json.loads(line[6:]) for line in r.read().decode().splitlines()
                      if line.startswith("data: {")]
        assert {c["model"] for c in chunks} == {names[1]}
        assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == \
            alone[names[1], "image"][1]["choices"][0]["message"]["content"]

        status, err = request(url, body("no-such-adapter", "text"))
        assert status == 404 and err["error"]["type"] == "NotFoundError" and err["error"]["code"] == 404
        assert err["error"]["message"] == "The model `no-such-adapter` does not exist."

        # runtime loading: the third adapter goes into the slot used longest ago, nothing else changes
        load = lambda b: request(url, b, "/v1/load_lora_adapter")  # noqa: E731
        unload = lambda b: request(url, b, "/v1/unload_lora_adapter")  # noqa: E731
        third = setup["more"]["third"]
        with urllib.request.urlopen(url + "/health") as r:
            lru = json.loads(r.read())["lora_slots"]
        assert sorted(lru) == sorted(names), lru
        assert load({"lora_name": "third", "lora_path": third}) == (
            200, "Success: LoRA adapter 'third' added successfully.")
        with urllib.request.urlopen(url + "/v1/models") as r:
            assert [(c["id"], c["root"], c["parent"]) for c in json.loads(r.read())["data"]][-1] == (
                "third", third, base)
        status, got = request(url, body("third", "text"))
        assert status == 200 and got["model"] == "third" and got["choices"][0]["message"]["content"] == \
            expected("third", "text"), got
        with urllib.request.urlopen(url + "/health") as r:
            h = json.loads(r.read())
        # the last request above was for names[1] (streamed): names[0]'s slot was the one used longest ago
        assert h["lora_slots"] == [("third" if n == names[0] else n) for n in lru] and h["lora_loads"] == 3, h
        # three adapters and the base at once over two slots: each answers its own
        jobs = [(m, "text") for m in (base, *names, "third")]
        for j, (status, got) in together(jobs).items():
            assert status == 200 and got["choices"][0]["message"]["content"] == expected(*j), (j, got)

        # refusals, with vLLM's statuses
        def refused(reply, status, kind, text):
            assert reply[0] == status and reply[1]["error"]["type"] == kind and text in reply[1]["error"][
                "message"], reply
        refused(load({"lora_name": "third", "lora_path": third}), 400, "InvalidUserInput",
                "The lora adapter 'third' has already been loaded.")
        refused(load({"lora_name": "x"}), 400, "InvalidUserInput", "Both 'lora_name' and 'lora_path' must be provided.")
        refused(load({"lora_name": "x", "lora_path": str(tmp_path / "absent")}), 404, "NotFoundError",
                f"Loading lora x failed: No adapter found for {tmp_path / 'absent'}")
        refused(load({"lora_name": "x", "lora_path": str(tmp_path)}), 404, "NotFoundError", "No adapter found")
        refused(load({"lora_name": "x", "lora_path": setup["more"]["big"]}), 400, "BadRequestError",
                "LoRA rank 16 is greater than max_lora_rank 8.")
        refused(load({"lora_name": "x", "lora_path": other_base_adapter(tmp_path)}), 400, "BadRequestError",
                "another base")
        refused(unload({"lora_name": "x"}), 404, "NotFoundError", "The lora adapter 'x' cannot be found.")
        with urllib.request.urlopen(url + "/v1/models") as r:
            assert [c["id"] for c in json.loads(r.read())["data"]] == [base, *names, "third"]

        # an unload while a request for it streams: that request finishes with the adapter, later ones are 404
        with urllib.request.urlopen(urllib.request.Request(
                url + "/v1/chat/completions", data=json.dumps({**body("third", "text"), "stream": True}).encode(),
                headers={"Content-Type": "application/json"}), timeout=300) as r:
            first = r.readline()
            assert first.startswith(b"data: {"), first
            assert unload({"lora_name": "third"}) == (200, "Success: LoRA adapter 'third' removed successfully.")
            chunks = [json.loads(line[6:]) for line in (first + r.read()).decode().splitlines()
                      if line.startswith("data: {")]
        # a stream cannot take back its trailing whitespace (the whole reply is stripped, as expected() is)
        assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks).strip() == \
            expected("third", "text")
        refused(request(url, body("third", "text")), 404, "NotFoundError", "The model `third` does not exist.")
        refused(unload({"lora_name": "third"}), 404, "NotFoundError", "cannot be found")
        with urllib.request.urlopen(url + "/v1/models") as r:
            assert [c["id"] for c in json.loads(r.read())["data"]] == [base, *names]
    finally:
        log = sigterm(p)
    assert "Traceback" not in log and "SIGTERM: stopping" in log, log[-3000:]
    assert f"adapters {', '.join(names)} beside {base}]" in log, log[-3000:]
    assert "LoRA dynamic loading & unloading is enabled" in log, log[-3000:]


def other_base_adapter(tmp_path):
    """An adapter made by PEFT for a base of another size (hidden 96)."""
    import tinyref
    other = str(tmp_path / "other")
    if not os.path.isdir(other):
        tinyref.build(other, hidden_size=96)
    return peft_adapter(other, str(tmp_path / "ad"), 4, 8, ["q_proj", "v_proj"])


def test_runtime_endpoints_only_when_enabled(monkeypatch):
    """Without VLLM_ALLOW_RUNTIME_LORA_UPDATING the endpoints do not exist (vLLM's 404); `1` and `True` turn
    them on (its reading of the variable)."""
    import types
    import uvicorn
    from glm4v_ms.serve.__main__ import runtime_lora_updating
    from glm4v_ms.serve.app import Server, create_app
    for v, on in (("", False), ("0", False), ("false", False), ("1", True), ("True", True), (" true ", True)):
        monkeypatch.setenv("VLLM_ALLOW_RUNTIME_LORA_UPDATING", v)
        assert runtime_lora_updating() is on, v
    engine = types.SimpleNamespace(model=types.SimpleNamespace(generation_config=None))
    server = uvicorn.Server(uvicorn.Config(create_app(Server(engine, None, "m")), host="127.0.0.1", port=0,
                                           log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        while not server.started:
            time.sleep(0.02)
        url = f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"
        for path in ("/v1/load_lora_adapter", "/v1/unload_lora_adapter"):
            status, err = request(url, {"lora_name": "a", "lora_path": "/x"}, path)
            assert status == 404 and err["error"]["type"] == "NotFoundError", (path, status, err)
    finally:
        server.should_exit = True
        thread.join(10)


def test_lora_modules_values():
    """vLLM's two forms; two adapters under one name, or one under the base's name: refused (one line)."""
    assert multi_lora.parse_modules(["a=/x", '{"name": "b", "path": "/y", "base_model_name": "m"}'], "m") == [
        ("a", "/x"), ("b", "/y")]
    for values, msg in ((["a=/x", "a=/y"], "two adapters under one name"),
                        (["m=/x"], "the base model is served under that name"),
                        (['{"name": "b", "path": "/y", "base_model_name": "other"}'], "is not this server's"),
                        (["a"], "expected name=path")):
        with pytest.raises(multi_lora.LoraModulesError, match=msg):
            multi_lora.parse_modules(values, "m")


@pytest.mark.parametrize("case", ["same_name", "another_base", "not_peft", "rank", "rank_value", "max_loras"])
def test_bad_adapters_exit_2_before_the_port_opens(setup, tmp_path, case):
    """One line, exit 2, no traceback, before uvicorn starts: two adapters under one name, a folder that is no
    PEFT adapter and an adapter of rank above --max-lora-rank (before the model loads), a --max-lora-rank vLLM
    does not take, --max-loras 0 (argument errors), an adapter made by PEFT for a base of another size (once the
    model loaded)."""
    a = setup["adapters"]["charts"]
    extra = []
    if case == "same_name":
        mods = [f"x={a}", f"x={setup['adapters']['sql']}"]
    elif case == "not_peft":
        mods = [f"x={tmp_path}"]
    elif case == "rank":
        mods, extra = [f"x={setup['more']['big']}"], ["--max-lora-rank", "8"]
    elif case == "rank_value":
        mods, extra = [f"x={a}"], ["--max-lora-rank", "12"]
    elif case == "max_loras":
        mods, extra = [f"x={a}"], ["--max-loras", "0"]
    else:
        mods = [f"x={other_base_adapter(tmp_path)}"]
    port = free_port()
    r = subprocess.run([sys.executable, "-m", "glm4v_ms.serve", "--model", setup["folder"], "--port", str(port),
                        *extra, "--lora-modules", *mods], cwd=ROOT, env=child_env(tmp_path / "cache"),
                       capture_output=True, text=True, timeout=300)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
    start = {"rank_value": "glm4v_ms.serve: error: argument --max-lora-rank: invalid choice: 12",
             "max_loras": "glm4v_ms.serve: error: --max-loras must be >= 1"}.get(
        case, "glm4v_ms.serve: error: --lora-modules x: ")
    assert lines[0].startswith(start), lines
    assert {"same_name": "two adapters under one name", "not_peft": "not a PEFT adapter folder",
            "another_base": "another base", "rank": "LoRA rank 16 is greater than max_lora_rank 8.",
            "rank_value": "1, 8, 16, 32, 64, 128, 256, 320, 512", "max_loras": "got 0"}[case] in lines[0], lines
