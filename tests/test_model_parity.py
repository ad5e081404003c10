"""Logits parity with transformers' Glm4vForConditionalGeneration on tiny random checkpoints (fp32, CPU).

Criterion (issue 2): over every real position, max |ours - ref| <= 1e-4 * max |ref| and identical argmax.
"""
import json
import os

import numpy as np
import pytest

import tinyref
from glm4v_ms import Glm4vForConditionalGeneration

TOL = 1e-4


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("tiny_v5"))
    ref = tinyref.build(d, seed=1)
    return ref, Glm4vForConditionalGeneration.from_pretrained(d), d


def check(ref, ours, inputs):
    return tinyref.check_logits(ref, ours, inputs, TOL)


CASES = {
    "text": lambda: tinyref.Prompt(0).text(17),
    "one_image_odd_grid": lambda: tinyref.Prompt(1).text(4).image(10, 30).text(6),    # 10x30 patches: up- and downsampled table
    "five_images": lambda: (tinyref.Prompt(2).text(3).image(4, 4).text(1).image(6, 8).image(8, 6)
                            .text(2).image(26, 4).text(1).image(12, 12).text(5)),
    "multi_turn_two_images": lambda: (tinyref.Prompt(3).text(5).image(8, 10).text(9).text(7)   # user / assistant / user
                                      .image(14, 6).text(4)),
    "video": lambda: tinyref.Prompt(4).text(4).video(3, 8, 10).text(6),
    "video_one_frame_pair": lambda: tinyref.Prompt(5).video(1, 28, 28).text(3),
}


@pytest.mark.parametrize("case", list(CASES))
def test_parity(pair, case):
    ref, ours, _ = pair
    check(ref, ours, CASES[case]().inputs())


def test_left_padded_batch(pair):
    """Two prompts of different length in one batch, left-padded; the short one also matches its solo run."""
    ref, ours, _ = pair
    a = tinyref.Prompt(6).text(3).image(6, 6).text(12).inputs()
    b = tinyref.Prompt(7).text(2).image(4, 8).text(2).inputs()
    inputs = tinyref.batch(a, b)
    check(ref, ours, inputs)
    solo = ours(**b).logits.asnumpy()[0]
    both = ours(**inputs).logits.asnumpy()[1, -solo.shape[0]:]
    assert np.abs(solo - both).max() <= TOL * np.abs(solo).max()


def test_official_config_format(tmp_path):
    """The official hub layout (rope_scaling + partial_rotary_factor + rope_theta) loads to the same model."""
    ref = tinyref.build(str(tmp_path), seed=2, fmt="official")
    cfg = json.load(open(tmp_path / "config.json"))
    assert "rope_parameters" not in cfg["text_config"] and "rope_scaling" in cfg["text_config"]
    check(ref, Glm4vForConditionalGeneration.from_pretrained(str(tmp_path)),
          tinyref.Prompt(8).text(3).image(6, 10).text(4).inputs())


def test_tied_embeddings_and_no_partial_rotary(tmp_path):
    """tie_word_embeddings (no lm_head tensor in the file) and a config without partial_rotary_factor
    (the reference's default 1.0: rope over the whole head)."""
    import torch
    cfg = tinyref.tiny_config(rope_parameters={"rope_type": "default", "mrope_section": [4, 6, 6], "rope_theta": 500.0})
    cfg.tie_word_embeddings = True
    torch.manual_seed(0)
    ref = tinyref.randomize(tinyref.Glm4vForConditionalGeneration(cfg).eval(), 3)
    ref.tie_weights()
    ref.save_pretrained(str(tmp_path))
    check(ref, Glm4vForConditionalGeneration.from_pretrained(str(tmp_path)),
          tinyref.Prompt(9).text(5).image(4, 6).text(5).inputs())


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_sharded_half_precision_checkpoint(tmp_path, dtype):
    """A sharded checkpoint stored in bf16 / fp16 loads (to fp32 on CPU) and matches the reference cast alike."""
    import torch
    half = tinyref.build(str(tmp_path / "src"), seed=4).to(getattr(torch, dtype))
    half.save_pretrained(str(tmp_path / "half"), max_shard_size="200KB")
    # the reference reads the same rounded weights back in fp32 (its rope buffers stay exact)
    ref = tinyref.Glm4vForConditionalGeneration.from_pretrained(str(tmp_path / "half"), dtype=torch.float32).eval()
    assert os.path.exists(tmp_path / "half" / "model.safetensors.index.json")
    ours = Glm4vForConditionalGeneration.from_pretrained(str(tmp_path / "half"))
    check(ref, ours, tinyref.Prompt(10).text(4).image(6, 6).text(4).inputs())


def test_image_and_video_in_one_prompt(pair):
    """The reference cannot take both in one forward; we can. Each part must equal the same features written
    alone: compare with the image-only and video-only prompts' vision features through the logits of the
    text that follows the image, which cannot see the video (causal)."""
    _, ours, _ = pair
    p = tinyref.Prompt(11).text(2).image(6, 6).text(3)
    img_only = ours(**p.inputs()).logits.asnumpy()
    mixed = ours(**p.video(1, 4, 4).text(2).inputs()).logits.asnumpy()
    n = img_only.shape[1]
    assert np.abs(mixed[:, :n] - img_only).max() <= TOL * np.abs(img_only).max()


def test_mindspore_tensor_inputs(pair):
    """The same inputs as MindSpore tensors give the same logits as numpy arrays (extra keys ignored)."""
    from mindspore import Tensor
    ref, ours, _ = pair
    inputs = tinyref.Prompt(12).text(3).image(6, 4).text(2).inputs()
    as_tensors = {k: Tensor(v) for k, v in inputs.items()}
    np.testing.assert_array_equal(ours(**as_tensors).logits.asnumpy(), ours(**inputs).logits.asnumpy())
    check(ref, ours, inputs)


def test_vision_attention_in_query_blocks(pair, monkeypatch):
    """A score budget so small that every image's attention runs in blocks of a few queries (what a 4K image
    does with the real budget): still transformers' logits, and the same as in one block."""
    from glm4v_ms import attention
    ref, ours, _ = pair
    inputs = tinyref.Prompt(40).text(3).image(10, 30).text(2).image(6, 8).text(4).inputs()
    whole = ours(**inputs).logits.asnumpy()
    budget = 2 * 300 * 4 * 7   # 2 heads: 7 queries of 300 keys
    monkeypatch.setattr(attention, "VISION_SCORES_BUDGET", budget)
    check(ref, ours, inputs)
    np.testing.assert_allclose(ours(**inputs).logits.asnumpy(), whole, rtol=0, atol=1e-5 * np.abs(whole).max())
    # the serving engine's pieces: a call between every two query blocks and vision blocks, and one after them
    calls = []
    args = (inputs["input_ids"], inputs["pixel_values"], inputs["image_grid_thw"])
    h = ours.embed(*args, between=lambda: calls.append(1)).asnumpy()
    np.testing.assert_array_equal(h, ours.embed(*args).asnumpy())
    seg = [int(t * hh * ww) for t, hh, ww in inputs["image_grid_thw"]]
    per_block = sum(-(-n // max(1, budget // (2 * n * 4))) for n in seg)
    assert len(calls) == ours.config.vision.depth * per_block > ours.config.vision.depth
