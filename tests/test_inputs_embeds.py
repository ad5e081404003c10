"""inputs_embeds in forward and generate, as transformers takes it: logits and greedy ids equal the reference's
given the same embeddings (text, and an image whose tokens are found by their embedding)."""
import numpy as np
import pytest
import torch

import tinyref
from glm4v_ms import Glm4vForConditionalGeneration


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("embeds"))
    ref = tinyref.build(d, seed=17)
    return ref, Glm4vForConditionalGeneration.from_pretrained(d)


def embeds(ref, ids, noise=0.0):
    """The reference's embeddings of ids; noise on the text rows makes them inputs no id would give."""
    with torch.no_grad():
        e = ref.get_input_embeddings()(torch.from_numpy(ids))
    if noise:
        g = torch.Generator().manual_seed(3)
        keep = torch.from_numpy(ids == tinyref.IDS["image_token_id"])[..., None]
        e = torch.where(keep, e, e + noise * torch.randn(e.shape, generator=g))
    return e


def reference(ref, **kw):
    ref.model.rope_deltas = None   # the reference keeps rope deltas between calls: start clean
    with torch.no_grad():
        return ref(**kw).logits.numpy()


@pytest.mark.parametrize("case", ["text", "image"])
def test_forward_with_embeddings(pair, case):
    ref, ours = pair
    p = tinyref.Prompt(31).text(7)
    inputs = (p.image(6, 8).text(4) if case == "image" else p.text(5)).inputs()
    e = embeds(ref, inputs["input_ids"], noise=0.5)
    pixels = {k: inputs[k] for k in ("pixel_values", "image_grid_thw") if k in inputs}
    want = reference(ref, inputs_embeds=e, **{k: torch.from_numpy(v) for k, v in pixels.items()})
    got = ours(inputs_embeds=e.numpy(), **pixels).logits.asnumpy()
    np.testing.assert_allclose(got, want, atol=2e-4, rtol=1e-4)


def test_generate_from_embeddings_only_returns_the_new_tokens(pair):
    ref, ours = pair
    ids = tinyref.Prompt(32).text(11).inputs()["input_ids"]
    e = embeds(ref, ids, noise=0.5)
    ref.model.rope_deltas = None
    with torch.no_grad():
        want = ref.generate(inputs_embeds=e, max_new_tokens=10, min_new_tokens=10, do_sample=False).numpy()
    got = ours.generate(inputs_embeds=e.numpy(), max_new_tokens=10, min_new_tokens=10, do_sample=False)
    assert want.shape == (1, 10)
    np.testing.assert_array_equal(got, want)


def test_generate_with_ids_and_embeddings_returns_prompt_and_new(pair):
    ref, ours = pair
    ids = tinyref.Prompt(33).text(9).inputs()["input_ids"]
    e = embeds(ref, ids, noise=0.5)
    ref.model.rope_deltas = None
    with torch.no_grad():
        want = ref.generate(input_ids=torch.from_numpy(ids), inputs_embeds=e, max_new_tokens=8, min_new_tokens=8,
                            do_sample=False).numpy()
    got = ours.generate(input_ids=ids, inputs_embeds=e.numpy(), max_new_tokens=8, min_new_tokens=8, do_sample=False)
    assert want.shape == (1, 17)
    np.testing.assert_array_equal(got, want)


def test_exactly_one_of_ids_and_embeddings(pair):
    ref, ours = pair
    ids = tinyref.Prompt(34).text(4).inputs()["input_ids"]
    e = embeds(ref, ids).numpy()
    with pytest.raises(ValueError, match="exactly one"):
        ours(input_ids=ids, inputs_embeds=e)
    with pytest.raises(ValueError, match="exactly one"):
        ours()
    with pytest.raises(ValueError, match="inputs_embeds must be"):
        ours(inputs_embeds=e[..., :5])
    with pytest.raises(ValueError, match="input_ids or inputs_embeds"):
        ours.generate(max_new_tokens=2)
