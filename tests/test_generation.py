"""Generation: greedy ids equal transformers' generate; the static cache's invariants; the thinking budget."""
import numpy as np
import pytest

import tinyref
import torch
from glm4v_ms import Glm4vForConditionalGeneration
from glm4v_ms.generation_config import GenerationConfig, GenerationError
from glm4v_ms.steps import decode_one, prefill
from glm4v_ms.prompt import Prompt


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("gen"))
    ref = tinyref.build(d, seed=11)
    return ref, Glm4vForConditionalGeneration.from_pretrained(d)


CASES = {
    "text": lambda: tinyref.Prompt(0).text(9).inputs(),
    "one_image": lambda: tinyref.Prompt(1).text(3).image(10, 14).text(5).inputs(),
    "several_images": lambda: tinyref.Prompt(2).text(2).image(4, 6).text(1).image(8, 8).image(6, 2).text(3).inputs(),
    "video": lambda: tinyref.Prompt(3).text(2).video(3, 6, 8).text(4).inputs(),
    "padded_batch": lambda: tinyref.batch(tinyref.Prompt(4).text(3).image(6, 6).text(9).inputs(),
                                          tinyref.Prompt(5).text(4).image(4, 4).text(1).inputs()),
    "padded_text_batch": lambda: tinyref.batch(tinyref.Prompt(6).text(11).inputs(), tinyref.Prompt(7).text(4).inputs()),
}


@pytest.mark.parametrize("case", list(CASES))
def test_greedy_matches_transformers(pair, case):
    ref, ours = pair
    inputs = CASES[case]()
    n = 24
    got = ours.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False)
    with torch.no_grad():
        want = ref.generate(**{k: torch.from_numpy(v) for k, v in inputs.items()}, max_new_tokens=n,
                            min_new_tokens=n, do_sample=False).numpy()
    assert got.dtype == np.int64 and got.shape == want.shape
    np.testing.assert_array_equal(got, want)


def test_cache_one_piece_two_pieces_token_by_token(pair):
    """Logits of every prompt position: one prefill == two chunks == one token at a time."""
    _, m = pair
    inputs = tinyref.Prompt(8).text(3).image(6, 8).text(7).inputs()
    ids = inputs["input_ids"]
    L = ids.shape[1]
    h = m.embed(ids, inputs["pixel_values"], inputs["image_grid_thw"])
    pos3, _ = m.positions(ids, inputs["attention_mask"], inputs["image_grid_thw"])
    valid = np.ones((1, 64), bool)

    def pieces(bounds):
        dec = m.decoder(1, 64)
        out = [m.run(dec, h[:, a:b], pos3[:, :, a:b], a, valid).asnumpy() for a, b in zip(bounds, bounds[1:])]
        return np.concatenate(out, 1)
    one = pieces([0, L])
    assert np.abs(pieces([0, 11, L]) - one).max() <= 1e-5 * np.abs(one).max()
    assert np.abs(pieces(list(range(L + 1))) - one).max() <= 1e-5 * np.abs(one).max()


def test_decode_continues_the_prompt(pair):
    """Prefill of the prompt, then decode of token t == the forward of prompt + t at that position."""
    _, m = pair
    inputs = tinyref.Prompt(9).text(4).image(4, 4).text(3).inputs()
    logits, st = prefill(m, Prompt.of(m.config, inputs), 128)
    tok = np.array([logits[0].argmax()])
    nxt = decode_one(m, st, tok)
    full = dict(inputs, input_ids=np.concatenate([inputs["input_ids"], tok[None]], 1),
                attention_mask=np.ones((1, inputs["input_ids"].shape[1] + 1), np.int64))
    want = m(**full).logits.asnumpy()[0, -1]
    assert np.abs(nxt[0] - want).max() <= 1e-5 * np.abs(want).max()
    np.testing.assert_allclose(logits[0], m(**inputs).logits.asnumpy()[0, -1], rtol=0, atol=1e-5 * np.abs(want).max())


def test_sampling_is_seeded(pair):
    _, m = pair
    inputs = tinyref.Prompt(10).text(6).inputs()
    kw = dict(max_new_tokens=12, min_new_tokens=12, do_sample=True, temperature=1.5, top_k=50, top_p=0.95,
              repetition_penalty=1.1)
    a = m.generate(**inputs, seed=1, **kw)
    assert np.array_equal(a, m.generate(**inputs, seed=1, **kw))
    assert not np.array_equal(a, m.generate(**inputs, seed=2, **kw))


def test_sampling_filters():
    """top-k 1 and a tiny top-p are greedy; the repetition penalty and min_new_tokens act as transformers'."""
    from glm4v_ms.sampling import sample
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((3, 50)).astype(np.float32)
    hist = np.full((3, 1), -1)
    for kw in (dict(top_k=1), dict(top_p=1e-6)):
        cfg = GenerationConfig(do_sample=True, temperature=1.0, **kw)
        assert (sample(logits, hist, 0, cfg, rng) == logits.argmax(-1)).all()
    best = logits.argmax(-1)
    cfg = GenerationConfig(repetition_penalty=1e6)
    assert (sample(logits, best[:, None], 0, cfg, rng) != best).all()
    cfg = GenerationConfig(min_new_tokens=2, eos_token_id=tuple(best.tolist()))
    assert not np.isin(sample(logits, hist, 1, cfg, rng), best).any()


def test_thinking_budget(tmp_path):
    """After max_thinking_tokens tokens without </think>, the ids of </think><answer> follow."""
    from glm4v_ms import demo
    d = demo.build(str(tmp_path / "demo"), "demo-tiny", seed=3)
    m = Glm4vForConditionalGeneration.from_pretrained(d)
    think = m.think_ids
    assert {"</think>", "<answer>"} <= set(think)
    prompt = {"input_ids": np.array([[5, 6, 7, 8]]), "attention_mask": np.ones((1, 4), np.int64)}
    eos = list(m.generation_config.eos_token_id)
    out = m.generate(**prompt, max_new_tokens=12, min_new_tokens=12, do_sample=False, max_thinking_tokens=5)[0, 4:]
    closes = np.nonzero(out == think["</think>"])[0]
    assert len(closes) and closes[0] <= 5
    if closes[0] == 5:   # the budget, not the model, closed the thinking
        assert out[6] == think["<answer>"]
    with pytest.raises(GenerationError, match="max_thinking_tokens"):
        m.generate(**prompt, max_thinking_tokens=-1)
    assert eos


def test_prompt_over_context(pair):
    _, m = pair
    n = m.config.text.max_position_embeddings
    with pytest.raises(GenerationError, match="context"):
        m.generate(input_ids=np.ones((1, n), np.int64), max_new_tokens=2)


def test_graphs_compile_per_bucket_not_per_token_or_length(pair):
    """Prompts of different lengths in one bucket share the prefill graph; decoding compiles nothing per token
    (MindSpore's own compile cache holds one entry per compiled graph)."""
    from mindspore.graph import api
    _, m = pair
    a = tinyref.Prompt(12).text(3).image(4, 4).text(5).inputs()       # 12 tokens
    b = tinyref.Prompt(13).text(20).image(6, 4).text(9).inputs()      # 37 tokens: the same bucket of 64
    def decoder_graphs():   # (the Ascend path also compiles a small varlen-attention graph per image layout)
        return {p for p in api.ms_compile_cache if "text.py" in p}
    m.generate(**a, max_new_tokens=20, min_new_tokens=20, do_sample=False)
    before = decoder_graphs()
    assert before
    m.generate(**b, max_new_tokens=30, min_new_tokens=30, do_sample=False)
    assert decoder_graphs() == before
