"""Multi-turn prefix reuse (PromptCache): the next turn runs only what it does not share with the cached one, and
its greedy output is that of a fresh run (which itself equals transformers', tests/test_generation.py)."""
import numpy as np
import pytest

import tinyref
from glm4v_ms import Glm4vForConditionalGeneration, PromptCache


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("reuse"))
    tinyref.build(d, seed=21)
    return d


@pytest.fixture(scope="module")
def model(folder):
    return Glm4vForConditionalGeneration.from_pretrained(folder)


@pytest.fixture(scope="module")
def fresh(folder):
    """A second instance for the runs without reuse (the same weights; its own static caches)."""
    return Glm4vForConditionalGeneration.from_pretrained(folder)


def _extend(inputs, reply, more):
    """The next turn's prompt: the last prompt (real tokens), part of the reply, then new text (and images)."""
    out = dict(inputs)
    ids = np.concatenate([inputs["input_ids"][0], reply, more["input_ids"][0]])[None]
    out["input_ids"], out["attention_mask"] = ids, np.ones_like(ids)
    out.pop("mm_token_type_ids", None)
    for k in ("pixel_values", "image_grid_thw"):
        parts = [x[k] for x in (inputs, more) if k in x]
        if parts:
            out[k] = np.concatenate(parts)
    return out


def _batch(rows):
    L = max(r["input_ids"].shape[1] for r in rows)
    out = {"input_ids": np.stack([np.pad(r["input_ids"][0], (L - r["input_ids"].shape[1], 0)) for r in rows]),
           "attention_mask": np.stack([np.pad(r["attention_mask"][0], (L - r["input_ids"].shape[1], 0)) for r in rows])}
    for k in ("pixel_values", "image_grid_thw"):
        parts = [r[k] for r in rows if k in r]
        if parts:
            out[k] = np.concatenate(parts)
    return out


def test_three_turn_image_chat_matches_fresh_runs(model, fresh):
    n = 8
    cache = PromptCache()
    turn = tinyref.Prompt(1).text(3).image(8, 8).text(5).inputs()
    for i, more in enumerate([None, tinyref.Prompt(2).text(6).inputs(), tinyref.Prompt(3).text(2).image(4, 6).text(3).inputs()]):
        if more is not None:
            turn = _extend(turn, reply[:-1], more)   # the reply as the template would keep it (its eos dropped)
        got = model.generate(**turn, max_new_tokens=n, do_sample=False, past_key_values=cache)
        reused = cache.reused
        want = fresh.generate(**turn, max_new_tokens=n, do_sample=False)
        np.testing.assert_array_equal(got, want)
        L = turn["input_ids"].shape[1]
        reply = got[0, L:]
        if i == 0:
            assert reused == 0
        else:   # everything up to the new message was reused (the image of turn 1 not encoded again)
            assert reused == L - more["input_ids"].shape[1]


def test_a_call_without_the_cache_in_between_is_noticed(model, fresh):
    """A plain generate() of the same size writes the model's shared cache: the PromptCache then starts afresh."""
    cache = PromptCache()
    a = tinyref.Prompt(12).text(3).image(6, 6).text(4).inputs()
    out = model.generate(**a, max_new_tokens=4, do_sample=False, past_key_values=cache)
    model.generate(**tinyref.Prompt(13).text(9).inputs(), max_new_tokens=4, do_sample=False)
    b = _extend(a, out[0, a["input_ids"].shape[1]:], tinyref.Prompt(14).text(3).inputs())
    got = model.generate(**b, max_new_tokens=4, do_sample=False, past_key_values=cache)
    assert cache.reused == 0
    np.testing.assert_array_equal(got, fresh.generate(**b, max_new_tokens=4, do_sample=False))


def test_batch_of_two_rows_each_with_its_own_prefix(model, fresh):
    n = 6
    rows = [tinyref.Prompt(4).text(3).image(6, 6).text(9).inputs(), tinyref.Prompt(5).text(4).image(4, 4).text(1).inputs()]
    cache = PromptCache()
    for more in (None, [tinyref.Prompt(6).text(5).inputs(), tinyref.Prompt(7).text(1).image(4, 4).text(2).inputs()],
                 [tinyref.Prompt(8).text(2).inputs(), tinyref.Prompt(9).text(7).inputs()]):
        if more is not None:
            rows = [_extend(r, out[b, L:][:-1], m) for b, (r, m) in enumerate(zip(rows, more))]
        inputs = _batch(rows)
        L = inputs["input_ids"].shape[1]
        out = model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False, past_key_values=cache)
        reused = cache.reused
        np.testing.assert_array_equal(out, fresh.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False))
        if more is not None:
            assert reused == sum(r["input_ids"].shape[1] - m["input_ids"].shape[1] for r, m in zip(rows, more))


def test_a_different_image_of_the_same_size_is_not_reused(model, fresh):
    cache = PromptCache()
    a = tinyref.Prompt(10).text(3).image(6, 6).text(4).inputs()
    b = dict(a, pixel_values=a["pixel_values"] + 1.0)   # same token ids, other pixels
    model.generate(**a, max_new_tokens=4, do_sample=False, past_key_values=cache)
    got = model.generate(**b, max_new_tokens=4, do_sample=False, past_key_values=cache)
    assert cache.reused == 4   # the text before the image only (its start token included)
    np.testing.assert_array_equal(got, fresh.generate(**b, max_new_tokens=4, do_sample=False))


def test_past_key_values_must_be_a_prompt_cache(model):
    inputs = tinyref.Prompt(11).text(5).inputs()
    with pytest.raises(ValueError, match="PromptCache"):
        model.generate(**inputs, max_new_tokens=2, past_key_values=object())
    with pytest.raises(ValueError, match="prefix reuse"):
        model.generate(**inputs, max_new_tokens=2, num_beams=2, past_key_values=PromptCache())


def test_later_conversations_compile_nothing_new(model):
    """The reused turn's suffix is padded to a prompt bucket: a second conversation whose turns differ in length
    (within the same buckets) and in max_new_tokens runs on the graphs the first one compiled."""
    from mindspore.graph import api

    def graphs():
        return {p for p in api.ms_compile_cache if "text.py" in p}

    def conversation(seed, lens, n):
        cache = PromptCache()
        turn = tinyref.Prompt(seed).text(lens[0]).image(6, 6).text(3).inputs()
        for k in lens[1:]:
            out = model.generate(**turn, max_new_tokens=n, min_new_tokens=n, do_sample=False, past_key_values=cache)
            turn = _extend(turn, out[0, turn["input_ids"].shape[1]:-1], tinyref.Prompt(seed + k).text(k).inputs())
        model.generate(**turn, max_new_tokens=n, min_new_tokens=n, do_sample=False, past_key_values=cache)
        return cache.reused

    assert conversation(30, [4, 5, 9], 6) > 0
    before = graphs()
    assert conversation(40, [9, 20, 3], 11) > 0
    assert graphs() == before
