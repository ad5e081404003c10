"""Beam search equals transformers' beam search token for token on a tiny random checkpoint: num_beams,
num_return_sequences, length_penalty, early_stopping, eos ids that end beams early, a padded batch with images;
return_dict_in_generate with sequences, sequences_scores, scores and beam_indices."""
import numpy as np
import pytest
import torch

import tinyref
from glm4v_ms import Glm4vForConditionalGeneration
from glm4v_ms.generation_config import GenerationError


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("beam"))
    ref = tinyref.build(d, seed=11)
    return ref, Glm4vForConditionalGeneration.from_pretrained(d)


def prompt():
    return tinyref.Prompt(0).text(9).inputs()


# eos ids chosen from this checkpoint's beams so that beams end at different lengths: each case below gives a
# different set of sequences (checked when the cases were picked), and shorter outputs than max_new_tokens
E1, E2, E3 = [445, 302], [184, 406], [268, 108, 406]
CASES = {
    "beams3": dict(num_beams=3),
    "beams4_return2_eos_pad0": dict(num_beams=4, num_return_sequences=2, eos_token_id=[12, 1], pad_token_id=0),
    "ended_early": dict(num_beams=3, num_return_sequences=3, eos_token_id=E1, pad_token_id=7),
    "ended_early_short_favoured": dict(num_beams=3, num_return_sequences=3, eos_token_id=E1, pad_token_id=7,
                                       length_penalty=-1.0),
    "long_favoured_never": dict(num_beams=3, num_return_sequences=3, eos_token_id=E1, pad_token_id=7,
                                length_penalty=3.0, early_stopping="never"),
    "early_stopping_true": dict(num_beams=3, num_return_sequences=3, eos_token_id=E1, pad_token_id=7,
                                early_stopping=True),
    "order_by_length_penalty": dict(num_beams=3, num_return_sequences=3, eos_token_id=E2, pad_token_id=7,
                                    length_penalty=-1.0),
    "three_eos_ids": dict(num_beams=3, num_return_sequences=3, eos_token_id=E3, pad_token_id=7, length_penalty=-1.0),
    "min_new_tokens_repetition_penalty": dict(num_beams=2, eos_token_id=[12, 1], pad_token_id=7, min_new_tokens=6,
                                              repetition_penalty=1.3),
}


def reference(ref, inputs, **kw):
    ref.model.rope_deltas = None
    with torch.no_grad():
        return ref.generate(**{k: torch.from_numpy(v) for k, v in inputs.items()}, do_sample=False, **kw)


@pytest.mark.parametrize("case", list(CASES))
def test_beams_equal_transformers(pair, case):
    ref, ours = pair
    kw = dict(CASES[case], max_new_tokens=16)
    want = reference(ref, prompt(), **kw).numpy()
    got = ours.generate(**prompt(), do_sample=False, **kw)
    assert got.dtype == np.int64 and got.shape == want.shape, (got, want)
    np.testing.assert_array_equal(got, want)


def test_padded_batch_with_images(pair):
    ref, ours = pair
    inputs = tinyref.batch(tinyref.Prompt(4).text(3).image(6, 6).text(9).inputs(),
                           tinyref.Prompt(5).text(4).image(4, 4).text(1).inputs())
    kw = dict(num_beams=3, num_return_sequences=2, max_new_tokens=10, eos_token_id=[12, 1, 11], pad_token_id=0)
    want = reference(ref, inputs, **kw).numpy()
    np.testing.assert_array_equal(ours.generate(**inputs, do_sample=False, **kw), want)


def test_return_dict_sequences_and_scores(pair):
    ref, ours = pair
    kw = dict(num_beams=3, num_return_sequences=2, max_new_tokens=12, eos_token_id=E2, pad_token_id=7,
              length_penalty=0.5, return_dict_in_generate=True, output_scores=True)
    want = reference(ref, prompt(), **kw)
    got = ours.generate(**prompt(), do_sample=False, **kw)
    np.testing.assert_array_equal(got.sequences, want.sequences.numpy())
    np.testing.assert_array_equal(got["sequences"], got.sequences)
    np.testing.assert_allclose(got.sequences_scores, want.sequences_scores.numpy(), rtol=1e-4, atol=1e-4)
    assert len(got.scores) == len(want.scores)
    for a, b in zip(got.scores, want.scores):
        np.testing.assert_allclose(a, b.numpy(), rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(got.beam_indices, want.beam_indices.numpy())


def test_refused_by_name(pair):
    _, ours = pair
    with pytest.raises(GenerationError, match="num_return_sequences"):
        ours.generate(**prompt(), num_beams=2, num_return_sequences=3, max_new_tokens=2)
    with pytest.raises(GenerationError, match="do_sample"):
        ours.generate(**prompt(), num_beams=2, do_sample=True, max_new_tokens=2)
    with pytest.raises(GenerationError, match="streamer"):
        ours.generate(**prompt(), num_beams=2, max_new_tokens=2, streamer=lambda t: None)
    with pytest.raises(GenerationError, match="early_stopping"):
        ours.generate(**prompt(), num_beams=2, max_new_tokens=2, early_stopping="sometimes")
