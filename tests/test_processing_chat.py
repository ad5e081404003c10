"""Chats vs transformers' Glm4vProcessor: prompt strings, input_ids, masks, mm_token_type_ids, pixels, grids."""
import os

import numpy as np
import pytest

import reference  # noqa: F401

from glm4v_ms.processing import Glm4vProcessor, split_thinking, strip_thinking, tiny
from processing_fixtures import *  # noqa: F401,F403
from processing_fixtures import drawn_image, rgba_image


def _chats(media_dir):
    f = lambda name: os.path.join(media_dir, name)  # noqa: E731
    cat, wide, tall = f("640x480.png"), f("wide_1500x60.png"), f("tall_90x700.png")
    return {
        "one_image": [{"role": "user", "content": [{"type": "image", "path": cat},
                                                   {"type": "text", "text": "Describe this image."}]}],
        "system_prompt": [
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": [{"type": "image", "url": wide}, {"type": "text", "text": "What is it?"}]}],
        "multi_turn": [
            {"role": "user", "content": [{"type": "image", "path": cat}, {"type": "text", "text": "What is this?"}]},
            {"role": "assistant", "content": "A drawing with boxes."},
            {"role": "user", "content": [{"type": "text", "text": "And this one?"}, {"type": "image", "path": tall}]}],
        "several_images_one_turn": [{"role": "user", "content": [
            {"type": "image", "path": cat}, {"type": "image", "path": wide}, {"type": "image", "path": tall},
            {"type": "text", "text": "Compare the three pictures."}]}],
        "chinese": [{"role": "user", "content": [{"type": "image", "path": f("odd_37x91.png")},
                                                 {"type": "text", "text": "请描述这张图片。图中有几只猫？"}]}],
        "plain_string": [{"role": "system", "content": "Answer briefly."},
                         {"role": "user", "content": "Why is the sky blue? 为什么天空是蓝色的？"}],
        "pil_objects": [{"role": "user", "content": [{"type": "image", "image": rgba_image()},
                                                     {"type": "image", "image": drawn_image(50, 29, 40)},
                                                     {"type": "text", "text": "Two pictures."}]}],
        "assistant_metadata": [{"role": "user", "content": "hi"},
                               {"role": "assistant", "metadata": "tool", "content": "<answer>ok</answer>"},
                               {"role": "user", "content": [{"type": "image", "path": f("gray_L.png")}]}],
    }


def _compare(got, want, keys=("input_ids", "attention_mask", "mm_token_type_ids", "image_grid_thw")):
    for key in keys:
        if key in want:
            np.testing.assert_array_equal(np.asarray(got[key]), np.asarray(want[key]), err_msg=key)
    if "pixel_values" in want:
        assert np.abs(got["pixel_values"] - want["pixel_values"]).max() <= 1e-5
    assert set(got) == set(want), (set(got), set(want))


@pytest.mark.parametrize("name", list(_chats("/")), ids=list(_chats("/")))
@pytest.mark.parametrize("generation_prompt", [True, False])
def test_chat_parity(name, generation_prompt, ours, ref, media_dir):
    chat = _chats(media_dir)[name]
    prompt = ours.apply_chat_template(chat, add_generation_prompt=generation_prompt)
    assert prompt == ref.apply_chat_template(chat, add_generation_prompt=generation_prompt)
    got = ours.apply_chat_template(chat, add_generation_prompt=generation_prompt, tokenize=True, return_dict=True)
    want = ref.apply_chat_template(chat, add_generation_prompt=generation_prompt, tokenize=True, return_dict=True,
                                   return_tensors="np")
    _compare(got, want)
    assert got["input_ids"].dtype == np.int64 and got["input_ids"].shape[0] == 1


def test_prompt_shape_of_the_hf_integration_test(ours):
    chat = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What kind of dog is this?"}]}]
    prompt = ours.apply_chat_template(chat, add_generation_prompt=True)
    assert prompt == ("[gMASK]<sop><|user|>\n<|begin_of_image|><|image|><|end_of_image|>"
                      "What kind of dog is this?<|assistant|>\n")
    ids = ours.tokenizer.encode(prompt)
    t = tiny.TOKEN_IDS
    assert ids[:6] == [t["[gMASK]"], t["<sop>"], t["<|user|>"], ids[3], t["<|begin_of_image|>"], t["<|image|>"]]
    assert ours.decode([ids[3]]) == "\n"


def test_batch_left_padding(ours, ref, media_dir):
    chats = _chats(media_dir)
    batch = [chats["plain_string"], chats["one_image"], chats["chinese"]]
    got = ours.apply_chat_template(batch, add_generation_prompt=True, tokenize=True, return_dict=True)
    want = ref.apply_chat_template(batch, add_generation_prompt=True, tokenize=True, return_dict=True,
                                   return_tensors="np", padding=True)
    _compare(got, want)
    mask = got["attention_mask"]
    assert mask.shape[0] == 3 and (mask[:, -1] == 1).all() and (mask[0, 0] == 0)  # left padded
    assert (got["input_ids"][mask == 0] == tiny.PAD_TOKEN_ID).all()
    right = ours.apply_chat_template(batch, add_generation_prompt=True, tokenize=True, return_dict=True,
                                     padding_side="right")
    assert (right["attention_mask"][:, 0] == 1).all()


def test_processor_call_text_and_images(ours, ref):
    images = [drawn_image(64, 64, 50), drawn_image(200, 40, 51)]
    text = ["<|begin_of_image|><|image|><|end_of_image|>one", "two <|begin_of_image|><|image|><|end_of_image|>"]
    got = ours(text=text, images=images)
    want = ref(text=text, images=images, return_tensors="np", padding=True)
    _compare(got, want)


def test_both_layouts_load_the_same(model_dir, model_dir_v5, ref):
    from transformers import AutoProcessor

    a, b = Glm4vProcessor.from_pretrained(model_dir), Glm4vProcessor.from_pretrained(model_dir_v5)
    ref_v5 = AutoProcessor.from_pretrained(model_dir_v5, use_fast=False)
    for p, r in ((a, ref), (b, ref_v5)):
        assert (p.image_processor.min_pixels, p.image_processor.max_pixels) == (12544, 9633792)
        assert (p.video_processor.min_pixels, p.video_processor.max_pixels) == (12544, 47040000)
        assert r.image_processor.size.longest_edge == 9633792 and r.video_processor.size.longest_edge == 47040000
        assert p.chat_template == tiny.CHAT_TEMPLATE == r.chat_template
    im = drawn_image(300, 200, 60)
    np.testing.assert_array_equal(a(images=[im])["pixel_values"], b(images=[im])["pixel_values"])


def test_decode_matches_reference(ours, ref):
    t = tiny.TOKEN_IDS
    text = "Hello 你好 world"
    ids = [t["[gMASK]"], t["<sop>"], t["<|assistant|>"], t["<think>"]] + ours.tokenizer.encode(text) + [
        t["</think>"], t["<answer>"]] + ours.tokenizer.encode("ok") + [t["</answer>"], t["<|endoftext|>"]]
    for skip in (False, True):
        assert ours.decode(ids, skip_special_tokens=skip) == ref.decode(ids, skip_special_tokens=skip)
    assert ours.decode(ids, skip_special_tokens=True) == f"<think>{text}</think><answer>ok</answer>"
    batch = np.array([ids, ids[::-1]])
    assert ours.batch_decode(batch, skip_special_tokens=True) == ref.batch_decode(batch, skip_special_tokens=True)


@pytest.mark.parametrize("text, thinking, answer", [
    ("<think>Let me look.</think><answer>A cat.</answer>", "Let me look.", "A cat."),
    ("\n<think>\nsteps\n</think>\n<answer>\nyes\n</answer>", "steps", "yes"),
    ("<think>unfinished thought", "unfinished thought", ""),          # cut off while thinking
    ("<think>done</think>The answer.", "done", "The answer."),         # no answer tags
    ("<think>a</think><answer>cut off", "a", "cut off"),              # no closing answer tag
    ("Just an answer.", "", "Just an answer."),                        # no thinking at all
    ("<answer><|begin_of_box|>42<|end_of_box|></answer>", "", "<|begin_of_box|>42<|end_of_box|>"),
])
def test_split_thinking(text, thinking, answer):
    assert split_thinking(text) == (thinking, answer)


def test_strip_thinking():
    msg = {"role": "assistant", "content": "<think>long</think><answer>short</answer>"}
    assert strip_thinking(msg) == {"role": "assistant", "content": "short"}
    assert msg["content"].startswith("<think>")  # the caller's message is not modified
    items = {"role": "assistant", "content": [{"type": "text", "text": "<think>x</think><answer>y</answer>"}]}
    assert strip_thinking(items)["content"] == [{"type": "text", "text": "y"}]
    user = {"role": "user", "content": "<think>not mine</think>"}
    assert strip_thinking(user) == user
    assert strip_thinking("<think>t</think><answer>a</answer>") == "a"
