"""The tiny tokenizer and processor configs the whole project uses: stable ids, loadable by transformers."""
import filecmp
import hashlib
import json
import os

import pytest

import reference  # noqa: F401
from transformers import AutoProcessor, AutoTokenizer

from glm4v_ms.processing import Glm4vProcessor, tiny
from processing_fixtures import *  # noqa: F401,F403


def test_ids_are_fixed_and_fit_a_512_vocab(model_dir):
    assert tiny.TOKEN_IDS["<|endoftext|>"] == 448 and tiny.TOKEN_IDS["<|image|>"] == 462
    assert tiny.TOKEN_IDS["</answer>"] == 467 and tiny.VOCAB_SIZE == 471 <= 480
    assert tiny.special_token_ids(model_dir) == tiny.special_token_ids() == tiny.TOKEN_IDS
    assert tiny.EOS_TOKEN_IDS == [448, 455, 457, 467]
    hf = AutoTokenizer.from_pretrained(model_dir)
    assert len(hf) == tiny.VOCAB_SIZE
    for token, i in tiny.TOKEN_IDS.items():
        assert hf.convert_tokens_to_ids(token) == i
    assert hf.eos_token == hf.pad_token == "<|endoftext|>" and hf.padding_side == "left"


def test_special_and_plain_added_tokens_as_in_the_real_tokenizer(model_dir):
    hf = AutoTokenizer.from_pretrained(model_dir)
    special = {tiny.TOKEN_IDS[t] for t in tiny.SPECIAL_TOKENS}
    plain = {tiny.TOKEN_IDS[t] for t in tiny.ADDED_TOKENS}
    assert special <= set(hf.all_special_ids)
    assert not plain & set(hf.all_special_ids)
    text = "<|user|>hi<think>x</think><answer>y</answer>"
    assert hf.decode(hf.encode(text), skip_special_tokens=True) == "hi<think>x</think><answer>y</answer>"


@pytest.mark.parametrize("text", ["Hello, world!", "请描述这张图片。", "emoji 🐱 and ümlaut", "\n\t  spaces "])
def test_any_text_round_trips(text, ours):
    ids = ours.tokenizer.encode(text)
    assert max(ids) < tiny.TRAINED_VOCAB
    assert ours.decode(ids) == text


def test_trained_merges_compress_the_corpus(ours):
    text = "Describe this image. 请描述这张图片。"
    assert len(ours.tokenizer.encode(text)) < len(text.encode()) * 0.6


def test_chat_template_is_the_official_one_byte_for_byte(model_dir):
    with open(os.path.join(model_dir, "chat_template.jinja"), "rb") as f:
        data = f.read()
    assert len(data) == 922
    assert hashlib.sha256(data).hexdigest() == "847603d3ed14387a2b45c197f8d07ddee0f9938051549c727cbc894facfea78b"


def test_files_are_deterministic(tmp_path):
    a, b = tiny.write_all(str(tmp_path / "a")), tiny.write_all(str(tmp_path / "b"))
    names = sorted(os.listdir(a))
    assert names == ["chat_template.jinja", "preprocessor_config.json", "tokenizer.json", "tokenizer_config.json",
                     "video_preprocessor_config.json"]
    match, mismatch, errors = filecmp.cmpfiles(a, b, names, shallow=False)
    assert not mismatch and not errors


def test_official_layout_is_the_checkpoint_file(model_dir):
    with open(os.path.join(model_dir, "preprocessor_config.json")) as f:
        cfg = json.load(f)
    assert cfg == {"size": {"shortest_edge": 12544, "longest_edge": 9633792}, "do_rescale": True, "patch_size": 14,
                   "temporal_patch_size": 2, "merge_size": 2, "image_mean": [0.48145466, 0.4578275, 0.40821073],
                   "image_std": [0.26862954, 0.26130258, 0.27577711], "image_processor_type": "Glm4vImageProcessor",
                   "processor_class": "Glm4vProcessor"}


def test_v5_layout_is_what_transformers_saves(model_dir, model_dir_v5, tmp_path):
    AutoProcessor.from_pretrained(model_dir, use_fast=False).save_pretrained(str(tmp_path))
    with open(tmp_path / "processor_config.json") as f:
        saved = json.load(f)
    with open(os.path.join(model_dir_v5, "processor_config.json")) as f:
        ours = json.load(f)
    assert ours == saved
    assert not os.path.exists(os.path.join(model_dir_v5, "preprocessor_config.json"))


def test_custom_sizes_reach_both_processors(tmp_path):
    d = tiny.write_all(str(tmp_path), layout="v5", image_size={"shortest_edge": 3136, "longest_edge": 28 * 28 * 2 * 16},
                       video_size={"shortest_edge": 3136, "longest_edge": 28 * 28 * 2 * 64}, fps=1)
    ours, ref = Glm4vProcessor.from_pretrained(d), AutoProcessor.from_pretrained(d, use_fast=False)
    assert ours.image_processor.max_pixels == ref.image_processor.size.longest_edge == 28 * 28 * 2 * 16
    assert ours.video_processor.max_pixels == ref.video_processor.size.longest_edge == 28 * 28 * 2 * 64
    assert ours.video_processor.fps == ref.video_processor.fps == 1
