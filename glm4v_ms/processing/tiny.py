"""Tiny tokenizer and processor configs for tests and the `demo-tiny` model.

The tokenizer is a byte-level BPE (all 256 bytes, so any UTF-8 text encodes) with a few hundred merges
trained on a small built-in English+Chinese text, plus GLM-4.1V's added tokens in the real model's order.
As in the real GLM-4.1V tokenizer, the role/vision tokens are *special* (dropped by
`skip_special_tokens`) while `<think>`, `</think>`, `<answer>`, `</answer>`, the box tokens and `<|sep|>`
are ordinary added tokens (kept when decoding). The real ids are 151329... (`SPECIAL_TOKENS` below keeps
the order); here they follow the 448 trained ids, so a model with vocab_size 512 covers everything.

Real model, for comparison: eos ids [151329 <|endoftext|>, 151336 <|user|>, 151338 <|observation|>,
151348 </answer>] (151348 read from the checkpoint's tokenizer_config.json).
"""
from __future__ import annotations

import json
import os

# Trained part of the vocabulary: 256 byte tokens + 192 merges. Fixed, so the ids below never move.
TRAINED_VOCAB = 448

SPECIAL_TOKENS = (  # special=True in the real tokenizer, in its id order (151329...)
    "<|endoftext|>", "[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>",
    "<|system|>", "<|user|>", "<|assistant|>", "<|observation|>",
    "<|begin_of_image|>", "<|end_of_image|>", "<|begin_of_video|>", "<|end_of_video|>",
    "<|image|>", "<|video|>",
)
ADDED_TOKENS = (  # special=False in the real tokenizer (151345...)
    "<think>", "</think>", "<answer>", "</answer>", "<|begin_of_box|>", "<|end_of_box|>", "<|sep|>",
)
TOKEN_IDS = {tok: TRAINED_VOCAB + i for i, tok in enumerate(SPECIAL_TOKENS + ADDED_TOKENS)}
VOCAB_SIZE = TRAINED_VOCAB + len(TOKEN_IDS)  # 471

# What the lead's tiny configs use: same roles as the real checkpoint's ids.
EOS_TOKEN_IDS = [TOKEN_IDS[t] for t in ("<|endoftext|>", "<|user|>", "<|observation|>", "</answer>")]
PAD_TOKEN_ID = TOKEN_IDS["<|endoftext|>"]
IMAGE_TOKEN_ID = TOKEN_IDS["<|image|>"]
VIDEO_TOKEN_ID = TOKEN_IDS["<|video|>"]
IMAGE_START_TOKEN_ID = TOKEN_IDS["<|begin_of_image|>"]
IMAGE_END_TOKEN_ID = TOKEN_IDS["<|end_of_image|>"]
VIDEO_START_TOKEN_ID = TOKEN_IDS["<|begin_of_video|>"]
VIDEO_END_TOKEN_ID = TOKEN_IDS["<|end_of_video|>"]

# The official GLM-4.1V-9B-Thinking chat template, byte for byte (922 bytes, no trailing newline).
CHAT_TEMPLATE = (
    "[gMASK]<sop>\n"
    "{%- for msg in messages %}\n"
    "    {%- if msg.role == 'system' %}\n"
    "<|system|>\n"
    "{{ msg.content }}\n"
    "    {%- elif msg.role == 'user' %}\n"
    "<|user|>{{ '\\n' }}\n"
    "\n"
    "        {%- if msg.content is string %}\n"
    "{{ msg.content }}\n"
    "        {%- else %}\n"
    "            {%- for item in msg.content %}\n"
    "                {%- if item.type == 'video' or 'video' in item %}\n"
    "<|begin_of_video|><|video|><|end_of_video|>\n"
    "                {%- elif item.type == 'image' or 'image' in item %}\n"
    "<|begin_of_image|><|image|><|end_of_image|>\n"
    "                {%- elif item.type == 'text' %}\n"
    "{{ item.text }}\n"
    "                {%- endif %}\n"
    "            {%- endfor %}\n"
    "        {%- endif %}\n"
    "    {%- elif msg.role == 'assistant' %}\n"
    "        {%- if msg.metadata %}\n"
    "<|assistant|>{{ msg.metadata }}\n"
    "{{ msg.content }}\n"
    "        {%- else %}\n"
    "<|assistant|>\n"
    "{{ msg.content }}\n"
    "        {%- endif %}\n"
    "    {%- endif %}\n"
    "{%- endfor %}\n"
    "{% if add_generation_prompt %}<|assistant|>\n"
    "{% endif %}"
)

CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
IMAGE_SIZE = {"shortest_edge": 12544, "longest_edge": 9633792}   # the checkpoint's preprocessor_config.json
VIDEO_SIZE = {"shortest_edge": 12544, "longest_edge": 47040000}  # its video_preprocessor_config.json

_CORPUS = """\
The quick brown fox jumps over the lazy dog. Describe this image. What is in the picture?
A cat is sitting on the table next to a cup of tea. The dog runs in the park with a red ball.
Please describe the video in detail. How many people are there? What color is the car?
The answer is yes. The answer is no. Let me think about this step by step.
In the image there is a small house, a tree, the sky and some clouds. The sun is shining.
请描述这张图片。图片中有一只猫。这是什么？视频里有几个人？天空是蓝色的。
我们来一步一步地思考这个问题。答案是：是的。这是一只狗，它在公园里跑。
"""


def _train():
    """The trained byte-level BPE (without added tokens). Deterministic for the fixed corpus."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TRAINED_VOCAB, min_frequency=1, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[],
    )
    tok.train_from_iterator([_CORPUS] * 4, trainer=trainer)
    if tok.get_vocab_size() != TRAINED_VOCAB:
        raise RuntimeError(f"tiny tokenizer trained to {tok.get_vocab_size()} ids, expected {TRAINED_VOCAB}")
    return tok


def build_tokenizer():
    """The tiny `tokenizers.Tokenizer` with GLM's added tokens at the ids in `TOKEN_IDS`."""
    from tokenizers import AddedToken

    tok = _train()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in ADDED_TOKENS])
    for t, i in TOKEN_IDS.items():
        assert tok.token_to_id(t) == i, (t, i, tok.token_to_id(t))
    return tok


def special_token_ids(dst=None):
    """Ids of GLM's added tokens: read from `dst`/tokenizer.json when given, else the tiny tokenizer's."""
    if dst is None:
        return dict(TOKEN_IDS)
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(os.path.join(dst, "tokenizer.json"))
    return {t: tok.token_to_id(t) for t in SPECIAL_TOKENS + ADDED_TOKENS if tok.token_to_id(t) is not None}


def _dump(path, obj):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)
        f.write("\n")


def write_tokenizer_files(dst, chat_template=CHAT_TEMPLATE):
    """tokenizer.json, tokenizer_config.json and chat_template.jinja, laid out as the checkpoint has them."""
    os.makedirs(dst, exist_ok=True)
    build_tokenizer().save(os.path.join(dst, "tokenizer.json"))
    added = {
        str(TOKEN_IDS[t]): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                            "single_word": False, "special": t in SPECIAL_TOKENS}
        for t in SPECIAL_TOKENS + ADDED_TOKENS
    }
    _dump(os.path.join(dst, "tokenizer_config.json"), {
        "added_tokens_decoder": added,
        "additional_special_tokens": list(SPECIAL_TOKENS),
        "clean_up_tokenization_spaces": False,
        "do_lower_case": False,
        "eos_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "model_input_names": ["input_ids", "attention_mask"],
        "model_max_length": 65536,
        "padding_side": "left",
        "remove_space": False,
        "processor_class": "Glm4vProcessor",
        "tokenizer_class": "PreTrainedTokenizerFast",
    })
    with open(os.path.join(dst, "chat_template.jinja"), "w", encoding="utf-8", newline="") as f:
        f.write(chat_template)


def _image_config(size, patch_size, temporal_patch_size, merge_size):
    return {"size": dict(size), "do_rescale": True, "patch_size": patch_size,
            "temporal_patch_size": temporal_patch_size, "merge_size": merge_size,
            "image_mean": list(CLIP_MEAN), "image_std": list(CLIP_STD)}


def write_processor_configs(dst, layout="official", image_size=None, video_size=None, patch_size=14,
                            temporal_patch_size=2, merge_size=2, fps=None):
    """Processor configs in one of the two layouts seen on the hub.

    official: preprocessor_config.json + video_preprocessor_config.json (the checkpoint's files).
    v5: processor_config.json with nested image_processor / video_processor, as transformers 5 saves it.
    """
    os.makedirs(dst, exist_ok=True)
    image = _image_config(image_size or IMAGE_SIZE, patch_size, temporal_patch_size, merge_size)
    video = _image_config(video_size or VIDEO_SIZE, patch_size, temporal_patch_size, merge_size)
    if fps is not None:
        video["fps"] = fps
    if layout == "official":
        _dump(os.path.join(dst, "preprocessor_config.json"),
              {**image, "image_processor_type": "Glm4vImageProcessor", "processor_class": "Glm4vProcessor"})
        _dump(os.path.join(dst, "video_preprocessor_config.json"),
              {**video, "video_processor_type": "Glm4vVideoProcessor", "processor_class": "Glm4vProcessor"})
    elif layout == "v5":
        full_image = {**image, "do_convert_rgb": True, "do_normalize": True, "do_resize": True,
                      "rescale_factor": 1 / 255, "resample": 3, "image_processor_type": "Glm4vImageProcessor"}
        full_video = {**video, "do_convert_rgb": True, "do_normalize": True, "do_resize": True,
                      "do_sample_frames": True, "fps": fps if fps is not None else 2, "max_duration": 300,
                      "max_image_size": {"longest_edge": 47040000}, "num_frames": 16, "rescale_factor": 1 / 255,
                      "resample": 3, "return_metadata": False, "video_processor_type": "Glm4vVideoProcessor"}
        _dump(os.path.join(dst, "processor_config.json"), {
            "image_processor": full_image, "video_processor": full_video, "processor_class": "Glm4vProcessor",
        })
    else:
        raise ValueError(f"layout must be 'official' or 'v5', got {layout!r}")


def write_all(dst, layout="official", **kwargs):
    """Tokenizer files + processor configs: a folder both our processor and transformers' load."""
    write_tokenizer_files(dst)
    write_processor_configs(dst, layout=layout, **kwargs)
    return dst
