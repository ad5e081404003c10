"""The serving engine: requests decoded together in rows of the row groups' static caches return what each returns
alone, whichever group they decode in and however often they move."""
import threading
import time

import numpy as np
import pytest
from PIL import Image

from glm4v_ms import Glm4vForConditionalGeneration, Glm4vProcessor, demo
from glm4v_ms.engine import Engine, QueueFull, group_sizes
from glm4v_ms.generation_config import GenerationError


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = demo.build(str(tmp_path_factory.mktemp("eng") / "m"), "demo-tiny", seed=5)
    return Glm4vForConditionalGeneration.from_pretrained(d), Glm4vProcessor.from_pretrained(d)


def prompts(proc):
    rng = np.random.default_rng(0)
    im = lambda w, h: Image.fromarray(rng.integers(0, 255, (h, w, 3), np.uint8))  # noqa: E731
    chats = [[{"role": "user", "content": "Describe this image."}],
             [{"role": "user", "content": [{"type": "image", "image": im(56, 84)}, {"type": "text", "text": "What is in the picture?"}]}],
             [{"role": "user", "content": "The quick brown fox jumps over the lazy dog. " * 3}],
             [{"role": "user", "content": [{"type": "text", "text": "How many?"}, {"type": "image", "image": im(112, 56)}]}],
             [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "A cat is sitting on the table."}]]
    return [proc.apply_chat_template(c, add_generation_prompt=True, tokenize=True, return_dict=True) for c in chats]


def collect(engine, inputs, cfg, n):
    got, done = [], threading.Event()

    def listener(kind, value):
        if kind == "token":
            got.append(value)
        else:
            got.append(kind + ":" + str(value))
            done.set()
    return engine.submit(inputs, cfg, n, listener), got, done


def alone_outputs(model, cfg, inputs, lens):
    out = []
    for inp, n in zip(inputs, lens):
        got = model.generate(**inp, max_new_tokens=n, do_sample=False)[0, inp["input_ids"].shape[1]:]
        stop = np.flatnonzero(np.isin(got, cfg.eos_token_id))
        out.append(got[:stop[0] + 1] if len(stop) else got)   # generate() pads after the eos
    return out


def group_graphs(engine, before):
    """The decode graphs compiled for the engine's groups: a graph's key holds its Cell's id, and a dead Cell's id can
    be reused by a new one, so keys that existed before the engine (`before`) are not its own."""
    from mindspore.graph import api
    ids = [f".{id(g.st.dec)}." for g in engine.groups]
    return {k for k in set(api.ms_compile_cache) - before if "text.py" in k and any(i in k for i in ids)}


def test_group_sizes_bound_the_rows():
    assert group_sizes(1) == [1] and group_sizes(2) == [1, 2] and group_sizes(8) == [1, 2, 4, 8]
    assert group_sizes(6) == [1, 2, 6]
    for n in range(1, 40):
        g = group_sizes(n)
        assert g[0] == 1 and g[-1] == n and g == sorted(set(g)) and sum(g) <= 2 * n


def test_concurrent_requests_equal_each_alone(setup):
    """More requests than rows, submitted staggered so that they join while others decode: token for token what
    model.generate gives each alone, while the busy rows move up through the groups of 1, 2 and 4 rows as
    requests join and back down as they finish; one compiled decode graph per group (compiled at start), and no
    graph compiled by a repeat of the same traffic."""
    from mindspore.graph import api
    model, proc = setup
    cfg = model.generation_config.updated(do_sample=False)
    lens = [9, 14, 6, 11, 8]
    alone = alone_outputs(model, cfg, prompts(proc), lens)
    before = set(api.ms_compile_cache)
    engine = Engine(model, max_num_seqs=4, max_model_len=512).start()
    try:
        assert [len(g.seqs) for g in engine.groups] == [1, 2, 4]
        decoder_graphs = lambda: {p for p in api.ms_compile_cache if "text.py" in p}  # noqa: E731
        runs = []
        for inp, n in zip(prompts(proc), lens):
            runs.append(collect(engine, inp, cfg, n))
            steps = engine.steps
            while engine.steps < steps + 2 and not runs[-1][2].is_set():   # let the running rows move on first
                time.sleep(0.005)
        for req, got, done in runs:
            assert done.wait(120)
        assert len(group_graphs(engine, before)) == 3   # compiled by the warm-up, before the first request
        graphs = decoder_graphs()
        assert all(engine.group_steps[n] > 0 for n in (1, 2, 4)), engine.group_steps
        again = [collect(engine, inp, cfg, n) for inp, n in zip(prompts(proc), lens)]   # all at once this time
        for req, got, done in again:
            assert done.wait(120)
        assert [g for _, g, _ in again] == [g for _, g, _ in runs]
        assert engine.moves >= 4
        for (req, got, _), want in zip(runs, alone):
            assert got[-1] in ("done:stop", "done:length")
            assert got[:-1] == [int(t) for t in want]
        assert engine.busy_rows() == 0
        assert decoder_graphs() == graphs
    finally:
        engine.stop()


def long_prompt(proc):
    """An image and ~1070 tokens of text: a prefill of 7 pieces on demo-tiny (2 vision blocks, the embeddings' end,
    5 chunks of 256)."""
    im = Image.fromarray(np.random.default_rng(1).integers(0, 255, (84, 112, 3), np.uint8))
    words = "The quick brown fox jumps over the lazy dog. " * 55
    chat = [{"role": "user", "content": [{"type": "image", "image": im}, {"type": "text", "text": words}]}]
    return proc.apply_chat_template(chat, add_generation_prompt=True, tokenize=True, return_dict=True)


def test_long_prefill_runs_in_pieces_between_decode_steps(setup):
    """Chunked prefill: while a long prompt is prefilled, the streaming request decodes one token between each two
    of its pieces (vision blocks, prompt chunks) rather than waiting for the whole prefill; both return what each
    returns alone. A request cancelled mid-prefill stops at its next piece."""
    model, proc = setup
    cfg = model.generation_config.updated(do_sample=False)
    short, long_ = prompts(proc)[0], long_prompt(proc)
    want_short, want_long = alone_outputs(model, cfg, [short, long_], [60, 4])
    assert len(want_short) == 60   # no eos: it streams all through the long prefill
    engine = Engine(model, max_num_seqs=2, max_model_len=2048).start()
    try:
        n_long = long_["input_ids"].shape[1]   # the two prompts differ in length: the long one is told by its own
        prefilling_long = lambda: engine.prefilling is not None and engine.prefilling.prompt_tokens == n_long  # noqa: E731

        def listener(kind, value):   # runs on the engine thread: `prefilling` is exact here
            if kind == "token":
                got.append(value)
                during.append(prefilling_long())
            else:
                got.append(kind + ":" + str(value))
                done.set()
        got, done, during = [], threading.Event(), []
        engine.submit(short, cfg, 60, listener)
        while len(got) < 3:
            time.sleep(0.005)
        _, got_long, done_long = collect(engine, long_, cfg, 4)
        assert done.wait(120) and done_long.wait(120)
        assert got[:-1] == [int(t) for t in want_short] and got_long[:-1] == [int(t) for t in want_long]
        assert sum(during) == 6 == engine.steps_between   # one step between each two of the 7 pieces

        # cancelled while it is prefilled (from the other stream's listener, at a step between two pieces)
        streaming = threading.Event()

        def cancel_long(kind, value):
            streaming.set()
            if kind == "token" and prefilling_long():
                engine.prefilling.cancel()
        engine.submit(short, cfg, 400, cancel_long)   # long enough to outlast the other's prefill on any machine
        assert streaming.wait(60)
        _, got_long, done_long = collect(engine, long_, cfg, 4)
        assert done_long.wait(120) and got_long == ["done:cancelled"]
        assert engine.steps_between == 6 + 1   # it stopped at the piece after the cancel
    finally:
        engine.stop()


def test_two_groups_one_and_max_rows(setup):
    """row_groups=False: a one-row cache and one of max_num_seqs rows only; the same outputs."""
    model, proc = setup
    cfg = model.generation_config.updated(do_sample=False)
    lens = [7, 5, 6]
    alone = alone_outputs(model, cfg, prompts(proc)[:3], lens)
    engine = Engine(model, max_num_seqs=3, max_model_len=512, row_groups=False)
    assert [len(g.seqs) for g in engine.groups] == [1, 3] and "4 rows" in engine.plan()
    runs = [collect(engine, inp, cfg, n) for inp, n in zip(prompts(proc), lens)]   # queued before the start:
    engine.start()                                                                 # admitted together
    try:
        for (req, got, done), want in zip(runs, alone):
            assert done.wait(120) and got[:-1] == [int(t) for t in want]
        assert engine.group_steps[3] > 0
    finally:
        engine.stop()


def test_cancel_frees_the_row_and_queue_is_bounded(setup):
    model, proc = setup
    cfg = model.generation_config.updated(do_sample=False)
    engine = Engine(model, max_num_seqs=1, max_model_len=512, max_queue=1).start()
    try:
        inp = prompts(proc)[0]
        long_req, got, done = collect(engine, inp, cfg, 400)
        while not got:
            time.sleep(0.005)
        waiting, got2, done2 = collect(engine, inp, cfg, 3)   # waits for the only row
        with pytest.raises(QueueFull):
            collect(engine, inp, cfg, 3)
        assert engine.busy_rows() == 1 and not done2.is_set()
        long_req.cancel()
        assert done.wait(30) and got[-1] == "done:cancelled" and len(got) < 400
        assert done2.wait(60) and got2[-1] in ("done:stop", "done:length")   # it took the freed row
        with pytest.raises(GenerationError, match="maximum context length"):
            engine.submit(inp, cfg, 10_000)
    finally:
        engine.stop()


def test_sampling_settings_are_per_request(setup):
    """A seeded sampled request returns the same tokens alone and beside a greedy one (its own generator)."""
    model, proc = setup
    greedy = model.generation_config.updated(do_sample=False)
    sampled = model.generation_config.updated(do_sample=True, temperature=1.3, top_k=40, seed=7)
    inp = prompts(proc)[2]
    engine = Engine(model, max_num_seqs=2, max_model_len=512).start()
    try:
        _, alone, d = collect(engine, inp, sampled, 10)
        assert d.wait(60)
        a = collect(engine, prompts(proc)[0], greedy, 12)
        _, both, d2 = collect(engine, inp, sampled, 10)
        assert d2.wait(60) and a[2].wait(60)
        assert both == alone
        want = model.generate(**inp, max_new_tokens=10, do_sample=True, temperature=1.3, top_k=40, seed=7)
        mine = [t for t in alone if isinstance(t, int)]
        assert [int(t) for t in want[0, inp["input_ids"].shape[1]:]][:len(mine)] == mine
    finally:
        engine.stop()


def test_prefix_reuse_across_turns_of_two_conversations(setup):
    """prefix_reuse: each next turn goes to the row holding its conversation's cache and prefills only the new
    part (the image not encoded again); every reply equals model.generate's without reuse."""
    model, proc = setup
    cfg = model.generation_config.updated(do_sample=False)
    rng = np.random.default_rng(3)
    im = lambda w, h: Image.fromarray(rng.integers(0, 255, (h, w, 3), np.uint8))  # noqa: E731
    convs = [[{"role": "user", "content": [{"type": "image", "image": im(84, 56)}, {"type": "text", "text": "What is it?"}]}],
             [{"role": "user", "content": [{"type": "text", "text": "Compare:"}, {"type": "image", "image": im(56, 56)}]}]]
    follow = [["And the colours?", "Thanks. Anything else?"], ["Which is larger?", "Why?"]]
    n = 6
    engine = Engine(model, max_num_seqs=2, max_model_len=512, prefix_reuse=True).start()
    prev = {}
    try:
        for turn in range(3):
            inputs = [proc.apply_chat_template(c, add_generation_prompt=True, tokenize=True, return_dict=True)
                      for c in convs]
            runs = [collect(engine, inp, cfg, n) for inp in inputs]   # both at once: each to its own row
            for (req, got, done), inp, c in zip(runs, inputs, convs):
                assert done.wait(120)
                want = model.generate(**inp, max_new_tokens=n, do_sample=False)[0, inp["input_ids"].shape[1]:]
                stop = np.flatnonzero(np.isin(want, cfg.eos_token_id))
                want = want[:stop[0] + 1] if len(stop) else want
                assert got[:-1] == [int(t) for t in want]
                if turn == 0:
                    assert req.reused_tokens == 0
                else:   # at least the whole previous prompt came from the row's cache
                    assert req.reused_tokens >= prev[id(c)]
                prev[id(c)] = inp["input_ids"].shape[1]
                if turn < 2:
                    reply = proc.decode([t for t in got[:-1] if t not in cfg.eos_token_id], skip_special_tokens=True)
                    c += [{"role": "assistant", "content": reply},
                          {"role": "user", "content": follow[convs.index(c)][turn]}]
    finally:
        engine.stop()


def test_prefix_reuse_from_a_row_of_another_group(setup):
    """A conversation's next turn starts from its record wherever it is: turns 1 of two conversations decode in
    the 2-row group; turns 2 and a new request then decode in the 4-row group, both turns 2 prefilling only what
    their records do not hold; the replies are model.generate's."""
    model, proc = setup
    cfg = model.generation_config.updated(do_sample=False)
    convs = [[{"role": "user", "content": "Describe the quick brown fox."}],
             [{"role": "user", "content": "A cat is sitting on the table."}]]
    n = 5
    engine = Engine(model, max_num_seqs=4, max_model_len=512, prefix_reuse=True)
    try:
        first = [proc.apply_chat_template(c, add_generation_prompt=True, tokenize=True, return_dict=True)
                 for c in convs]
        runs = [collect(engine, inp, cfg, n) for inp in first]
        engine.start()   # both were queued: admitted together into the 2-row group
        for (_, got, done), c in zip(runs, convs):
            assert done.wait(120)
            c += [{"role": "assistant", "content": proc.decode([t for t in got[:-1] if t not in cfg.eos_token_id],
                                                               skip_special_tokens=True)},
                  {"role": "user", "content": "And then?"}]
        engine.stop()
        assert engine.group_steps == {1: 0, 2: engine.steps, 4: 0}
        second = [proc.apply_chat_template(c, add_generation_prompt=True, tokenize=True, return_dict=True)
                  for c in convs] + [prompts(proc)[2]]
        runs = [collect(engine, inp, cfg, n) for inp in second]
        engine.start()
        for i, ((req, got, done), inp) in enumerate(zip(runs, second)):
            assert done.wait(120)
            want = alone_outputs(model, cfg, [inp], [n])[0]
            assert got[:-1] == [int(t) for t in want]
            if i < 2:
                assert req.reused_tokens >= first[i]["input_ids"].shape[1]
        assert engine.group_steps[4] > 0
    finally:
        engine.stop()
