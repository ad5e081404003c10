"""Glm4vProcessor: chats (text, images, a video) -> numpy model inputs, as transformers' Glm4vProcessor makes them.

Outputs: input_ids, attention_mask, mm_token_type_ids (0 text, 1 image, 2 video) as int64 (batch, length), left
padded by default; pixel_values + image_grid_thw and/or pixel_values_videos + video_grid_thw.

Arguments are transformers' names (see TEXT_ARGS, SETTINGS, VIDEO_ARGS), flat or in text_kwargs / images_kwargs /
videos_kwargs; a name it does not know is an error that names it (transformers ignores most unknown names).

Deviations: the outputs are always numpy arrays (transformers returns lists unless asked for tensors); a batch is
padded to the longest unless padding=False is passed (transformers' default is no padding); a chat holding both an
image and a video is an error (the model was not trained on that mix); `num_frames` is refused: GLM-4.1V's frame
sampler works by rate only, and transformers accepts `num_frames` but ignores it.
"""
from __future__ import annotations

import json
import os
import re
from functools import lru_cache

import numpy as np

from .chat import Tokenizer, render_chat
from .errors import ProcessorError
from .fetch import MAX_BYTES, TIMEOUT_S, fetch_bytes
from .image import SETTINGS, ImageProcessor, open_image
from .video import VIDEO_SETTINGS, VideoMetadata, VideoProcessor, frame_timestamps

IMAGE_TOKEN, VIDEO_TOKEN = "<|image|>", "<|video|>"
BEGIN_IMAGE, END_IMAGE = "<|begin_of_image|>", "<|end_of_image|>"
BEGIN_VIDEO, END_VIDEO = "<|begin_of_video|>", "<|end_of_video|>"
_PLACEHOLDER = re.compile(re.escape(IMAGE_TOKEN) + "|" + re.escape(VIDEO_TOKEN))

TEXT_ARGS = ("padding", "max_length", "truncation", "padding_side", "pad_to_multiple_of", "return_attention_mask",
             "add_special_tokens", "return_token_type_ids", "return_mm_token_type_ids")
VIDEO_ARGS = VIDEO_SETTINGS + ("num_frames", "video_metadata", "return_metadata")
COMMON_ARGS = ("return_tensors",)
NESTED = {"text_kwargs": TEXT_ARGS, "images_kwargs": SETTINGS, "videos_kwargs": SETTINGS + VIDEO_ARGS,
          "common_kwargs": COMMON_ARGS}
PROCESSOR_ARGS = set(TEXT_ARGS) | set(SETTINGS) | set(VIDEO_ARGS) | set(COMMON_ARGS)


def _read_json(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _config_settings(cfg, names):
    """A preprocessor config dict -> the settings we take from it (the rest of its keys describe the class)."""
    out = {k: cfg[k] for k in names if cfg.get(k) is not None}
    if isinstance(out.get("size"), dict):  # transformers 5 saves every SizeDict key, most of them null
        out["size"] = {k: v for k, v in out["size"].items() if v is not None}
    return out


class Glm4vProcessor:
    def __init__(self, tokenizer, image_processor=None, video_processor=None, chat_template=None,
                 fetch_timeout=TIMEOUT_S, max_download_bytes=MAX_BYTES):
        self.tokenizer = tokenizer
        self.image_processor = image_processor or ImageProcessor()
        self.video_processor = video_processor or VideoProcessor()
        self.chat_template = chat_template or tokenizer.chat_template
        self.fetch_timeout, self.max_download_bytes = fetch_timeout, max_download_bytes
        ids = {t: tokenizer.token_to_id(t) for t in (IMAGE_TOKEN, VIDEO_TOKEN, BEGIN_VIDEO, END_VIDEO)}
        missing = [t for t, i in ids.items() if i is None]
        if missing:
            raise ProcessorError(f"tokenizer lacks {', '.join(missing)}")
        self.image_token_id, self.video_token_id = ids[IMAGE_TOKEN], ids[VIDEO_TOKEN]
        self.video_start_id, self.video_end_id = ids[BEGIN_VIDEO], ids[END_VIDEO]

    @classmethod
    def from_pretrained(cls, path, **kwargs):
        """A checkpoint folder in either layout: preprocessor_config.json + video_preprocessor_config.json
        (official), or processor_config.json (transformers 5). Missing configs fall back to the class defaults.

        Image/video settings given here (size, patch_size, do_normalize, fps, ...) override both configs, as in
        transformers; fetch_timeout and max_download_bytes bound URL downloads. `use_fast` and
        `trust_remote_code` are taken for code ported from transformers and change nothing: there is one image
        processor (equal to transformers' PIL one, which use_fast=False picks) and no remote code."""
        if not os.path.isdir(path):
            raise ProcessorError(f"model folder not found: {path}")
        for name in ("use_fast", "trust_remote_code"):
            kwargs.pop(name, None)
        own = {k: kwargs.pop(k) for k in ("fetch_timeout", "max_download_bytes") if k in kwargs}
        unknown = [k for k in kwargs if k not in SETTINGS + VIDEO_SETTINGS]
        if unknown:
            raise ProcessorError(f"unknown Glm4vProcessor.from_pretrained argument(s): {', '.join(unknown)}")
        tokenizer = Tokenizer(path)
        file = lambda name: os.path.join(path, name)  # noqa: E731
        image_cfg, video_cfg, template = {}, {}, None
        if os.path.isfile(file("processor_config.json")):
            proc = _read_json(file("processor_config.json"))
            image_cfg, video_cfg = proc.get("image_processor", {}), proc.get("video_processor", {})
            template = proc.get("chat_template")
        if os.path.isfile(file("preprocessor_config.json")):
            image_cfg = _read_json(file("preprocessor_config.json"))
        if os.path.isfile(file("video_preprocessor_config.json")):
            video_cfg = _read_json(file("video_preprocessor_config.json"))
        if os.path.isfile(file("chat_template.jinja")):
            with open(file("chat_template.jinja"), encoding="utf-8") as f:
                template = f.read()
        elif os.path.isfile(file("chat_template.json")):
            template = _read_json(file("chat_template.json")).get("chat_template")
        image_settings = {**_config_settings(image_cfg, SETTINGS), **{k: v for k, v in kwargs.items() if k in SETTINGS}}
        video_settings = {**_config_settings(video_cfg, SETTINGS + VIDEO_SETTINGS), **kwargs}
        return cls(tokenizer, ImageProcessor(**image_settings), VideoProcessor(**video_settings),
                   template or tokenizer.chat_template, **own)

    @property
    def model_input_names(self):
        """The keys __call__ returns, as transformers lists them."""
        return ["pixel_values", "image_grid_thw", "input_ids", "attention_mask", "pixel_values_videos",
                "video_grid_thw", "mm_token_type_ids"]

    # --- media ---------------------------------------------------------------------------------------------

    def _fetch(self, url):
        return fetch_bytes(url, self.fetch_timeout, self.max_download_bytes)

    # --- main entry points -----------------------------------------------------------------------------------

    def __call__(self, images=None, text=None, videos=None, **kwargs):
        """Prompt string(s) holding one `<|image|>` per image and one `<|video|>` per video -> model inputs.

        Takes transformers' arguments: the tokenizer's (padding, max_length, truncation, padding_side,
        pad_to_multiple_of, return_attention_mask, add_special_tokens, ...), the image and video processors'
        settings (size, patch_size, merge_size, do_resize, do_normalize, image_mean, ...: flat for both, or in
        images_kwargs / videos_kwargs), and for videos fps, do_sample_frames, video_metadata, return_metadata.
        The first positional argument is `images`, as in transformers; prompt strings holding a placeholder there
        (with no `text`) are taken as the text.
        """
        prompts = [images] if isinstance(images, str) else images if isinstance(images, (list, tuple)) else []
        if text is None and prompts and all(isinstance(t, str) for t in prompts) and _has_placeholder(prompts):
            images, text = None, images   # processor("<|image|> ...", images=...): the prompt came first
        text_args, image_args, video_args = self._split_args(kwargs)
        texts = [text] if isinstance(text, str) else list(text or [])
        images = [] if images is None else _flatten(images)
        video_list = [] if videos is None else batch_videos(videos)
        n_img = sum(t.count(IMAGE_TOKEN) for t in texts)
        n_vid = sum(t.count(VIDEO_TOKEN) for t in texts)
        if texts and (n_img != len(images) or n_vid != len(video_list)):
            raise ProcessorError(f"the text has {n_img} image and {n_vid} video placeholders, "
                                 f"but {len(images)} images and {len(video_list)} videos were given")
        out, replacements = {}, {IMAGE_TOKEN: [], VIDEO_TOKEN: []}
        if images:
            image_processor = self.image_processor.updated(**image_args)
            loaded = [open_image(im, fetch=self._fetch) for im in images]
            out.update(image_processor(loaded))
            # the model merges by its own (the configured) merge_size, whatever a call patchified with
            merge = self.image_processor.merge_size ** 2
            replacements[IMAGE_TOKEN] = [IMAGE_TOKEN * int(np.prod(g) // merge) for g in out["image_grid_thw"]]
        if video_list:
            metadata = _batch_metadata(video_args.pop("video_metadata", None), len(video_list))
            return_metadata = video_args.pop("return_metadata", False)
            video_processor = self.video_processor.updated(**video_args)
            patches, grids, metas = [], [], []
            for video, meta in zip(video_list, metadata):
                frames, meta = video_processor.prepare(video, meta, fetch=self._fetch)
                p, grid = video_processor.process_one(frames)
                patches.append(p)
                grids.append(grid)
                metas.append(meta)
                per_frame = IMAGE_TOKEN * (grid[1] * grid[2] // self.video_processor.merge_size ** 2)
                replacements[VIDEO_TOKEN].append("".join(
                    f"{BEGIN_IMAGE}{per_frame}{END_IMAGE}{s}" for s in frame_timestamps(meta, grid[0])))
            out["pixel_values_videos"] = np.concatenate(patches, 0)
            out["video_grid_thw"] = np.array(grids, dtype=np.int64)
            if return_metadata:
                out["video_metadata"] = metas
        if not texts:
            return out
        queues = {k: iter(v) for k, v in replacements.items()}
        expanded = [_PLACEHOLDER.sub(lambda m: next(queues[m.group(0)]), t) for t in texts]
        return {**self._tokenize(expanded, replacements, **text_args), **out}

    def _split_args(self, kwargs):
        """transformers' call arguments -> (text, image, video) argument dicts; unknown names are refused.

        A flat name goes to every part that takes it (`size` to images and videos), a nested dict to its part."""
        kwargs = dict(kwargs)
        nested = {k: dict(kwargs.pop(k) or {}) for k in list(kwargs) if k in NESTED}
        unknown = [k for k in kwargs if k not in PROCESSOR_ARGS]
        for part, given in nested.items():
            unknown += [f"{part}[{k!r}]" for k in given if k not in NESTED[part]]
        if unknown:
            raise ProcessorError(f"unknown Glm4vProcessor argument(s): {', '.join(unknown)}")
        common = {**{k: kwargs[k] for k in COMMON_ARGS if k in kwargs}, **nested.get("common_kwargs", {})}
        if common.get("return_tensors") not in (None, "np"):
            raise ProcessorError(f"return_tensors={common['return_tensors']!r} is not supported: this processor "
                                 "returns numpy arrays (the model takes them as they are)")
        text = {**{k: kwargs[k] for k in TEXT_ARGS if k in kwargs}, **nested.get("text_kwargs", {})}
        image = {**{k: kwargs[k] for k in SETTINGS if k in kwargs}, **nested.get("images_kwargs", {})}
        video = {**{k: kwargs[k] for k in SETTINGS + VIDEO_ARGS if k in kwargs}, **nested.get("videos_kwargs", {})}
        if video.pop("num_frames", None) is not None:
            raise ProcessorError("num_frames is not supported: GLM-4.1V samples video frames by rate (fps=...); "
                                 "transformers' Glm4vVideoProcessor accepts num_frames but ignores it")
        return text, image, video

    def _tokenize(self, texts, replacements, padding=None, max_length=None, truncation=None, padding_side=None,
                  pad_to_multiple_of=None, return_attention_mask=True, add_special_tokens=True,
                  return_token_type_ids=False, return_mm_token_type_ids=True):
        """The expanded prompts -> input_ids, attention_mask, mm_token_type_ids, with the tokenizer's options."""
        tok = self.tokenizer
        sequences = tok.encode_batch(texts, add_special_tokens)
        if truncation not in (None, False, True, "longest_first", "only_first", "do_not_truncate"):
            raise ProcessorError(f"truncation={truncation!r} is not supported for single prompts")
        if truncation not in (None, False, "do_not_truncate"):
            limit = max_length if max_length is not None else tok.model_max_length
            keep = (lambda s: s[:limit]) if tok.truncation_side == "right" else (lambda s: s[len(s) - limit:])
            cut = [keep(s) if len(s) > limit else s for s in sequences]
            # truncating inside an image or a video would leave the model fewer placeholders than features
            count = lambda seqs: [s.count(self.image_token_id) for s in seqs]  # noqa: E731
            if any(replacements.values()) and count(cut) != count(sequences):
                raise ProcessorError(f"truncation to max_length={limit} cuts into an image or video's tokens; "
                                     "disable truncation or raise max_length")
            sequences = cut
        if padding in (None, True, "longest"):
            length = None
        elif padding == "max_length":
            length = max_length if max_length is not None else tok.model_max_length
            if length >= 10**9:   # the tokenizer config sets no model_max_length
                raise ProcessorError("padding='max_length' needs max_length (the tokenizer sets no model_max_length)")
        elif padding in (False, "do_not_pad"):
            if len({len(s) for s in sequences}) > 1:
                raise ProcessorError(f"padding={padding!r} with prompts of different lengths "
                                     f"({sorted({len(s) for s in sequences})}): the outputs are arrays; pad them")
            length = None
        else:
            raise ProcessorError(f"padding must be True, False, 'longest', 'max_length' or 'do_not_pad', "
                                 f"got {padding!r}")
        if pad_to_multiple_of and padding not in (False, "do_not_pad"):
            longest = max([len(s) for s in sequences] + [length or 0])
            length = -(-longest // pad_to_multiple_of) * pad_to_multiple_of
        if padding == "max_length" and any(len(s) > length for s in sequences):
            raise ProcessorError(f"a prompt has {max(len(s) for s in sequences)} tokens, over "
                                 f"max_length={length}; pass truncation=True or a larger max_length")
        ids, mask = tok.pad(sequences, padding_side, length)
        out = {"input_ids": ids}
        if return_attention_mask:
            out["attention_mask"] = mask
        if return_token_type_ids:
            out["token_type_ids"] = np.zeros_like(ids)
        if return_mm_token_type_ids:
            out["mm_token_type_ids"] = self.mm_token_type_ids(ids)
        return out

    def mm_token_type_ids(self, input_ids):
        """0 for text, 1 for an image's tokens, 2 for a video's (the same `<|image|>` id inside video markers)."""
        ids = np.asarray(input_ids)
        inside_video = np.cumsum(ids == self.video_start_id, -1) > np.cumsum(ids == self.video_end_id, -1)
        is_image = ids == self.image_token_id
        return np.where(is_image, np.where(inside_video, 2, 1), 0).astype(np.int64)

    def apply_chat_template(self, conversation, chat_template=None, tools=None, documents=None,
                            add_generation_prompt=False, continue_final_message=False,
                            return_assistant_tokens_mask=False, tokenize=False, return_tensors=None,
                            return_dict=False, processor_kwargs=None, **kwargs):
        """One chat (a list of messages) or a batch of chats -> the prompt(s), or the model inputs.

        Media in content items: {"type": "image", "image"|"url"|"path": ...} (a PIL image or array too),
        {"type": "video", "video"|"url"|"path": ...} (a file or URL, frames as an array or a list of PIL images,
        or a list of frame files); text items {"type": "text", "text": ...}; content may be a plain string.
        Keyword arguments the template uses are template variables; the others go to __call__ (as transformers
        does), which refuses names it does not know. fps (or do_sample_frames) applies to the chat's videos.
        """
        for name, value in (("continue_final_message", continue_final_message),
                            ("return_assistant_tokens_mask", return_assistant_tokens_mask)):
            if value:
                raise ProcessorError(f"{name} is not supported")
        batched = isinstance(conversation[0], (list, tuple)) if conversation else False
        chats = [_normalise(chat) for chat in (conversation if batched else [conversation])]
        template = chat_template or self.chat_template
        if template is None:
            raise ProcessorError("no chat template: the model folder has no chat_template.jinja")
        used = _template_variables(template)
        call_args = {**{k: v for k, v in kwargs.items() if k not in used}, **(processor_kwargs or {})}
        if return_tensors not in (None, "auto"):
            call_args["return_tensors"] = return_tensors
        variables = {**self.tokenizer.template_variables, **kwargs}
        for name, value in (("tools", tools), ("documents", documents)):
            if value is not None:
                if name not in used:
                    raise ProcessorError(f"{name} given, but the chat template does not use {name}")
                variables[name] = value
        prompts = [render_chat(template, chat, add_generation_prompt, **variables) for chat in chats]
        if not tokenize:
            self._split_args(call_args)   # still refuse what would have been ignored
            return prompts if batched else prompts[0]
        images, videos = [], []
        for chat in chats:
            chat_images, chat_videos = _media(chat)
            if chat_images and chat_videos:
                raise ProcessorError("a chat cannot hold both an image and a video (the model takes one or the other)")
            images += chat_images
            videos += chat_videos
        bos = self.tokenizer.bos_token
        if bos and prompts[0].startswith(bos):   # the template wrote the special tokens itself
            call_args.setdefault("add_special_tokens", False)
        if "do_sample_frames" not in call_args and call_args.get("fps") is not None:
            call_args["do_sample_frames"] = True
        out = self(text=prompts, images=images or None, videos=_Videos(videos) if videos else None, **call_args)
        return out if return_dict else out["input_ids"]

    def decode(self, ids, skip_special_tokens=False, clean_up_tokenization_spaces=None):
        return self.tokenizer.decode(ids, skip_special_tokens, clean_up_tokenization_spaces)

    def batch_decode(self, sequences, skip_special_tokens=False, clean_up_tokenization_spaces=None):
        return self.tokenizer.batch_decode(sequences, skip_special_tokens, clean_up_tokenization_spaces)

    def post_process_image_text_to_text(self, generated_outputs, skip_special_tokens=True,
                                        clean_up_tokenization_spaces=False):
        return self.batch_decode(generated_outputs, skip_special_tokens, clean_up_tokenization_spaces)


def _has_placeholder(items):
    return any(IMAGE_TOKEN in t or VIDEO_TOKEN in t for t in items if isinstance(t, str))


@lru_cache(maxsize=8)
def _template_variables(template):
    from jinja2 import Environment, meta

    return meta.find_undeclared_variables(Environment().parse(template))


def _flatten(items):
    """Images given flat or nested per sample -> a flat list."""
    if not isinstance(items, (list, tuple)):
        return [items]
    flat = []
    for item in items:
        flat.extend(_flatten(item) if isinstance(item, (list, tuple)) else [item])
    return flat


def _is_source(v):
    return isinstance(v, (str, os.PathLike, bytes, bytearray))


def _is_frame(f):
    from PIL import Image

    return isinstance(f, Image.Image) or (isinstance(f, np.ndarray) and f.ndim == 3)


def _is_video(v):
    """Frames of one video: a 4-D array or a non-empty list of frames (PIL images or 3-D arrays)."""
    if isinstance(v, np.ndarray):
        return v.ndim == 4
    return isinstance(v, (list, tuple)) and len(v) > 0 and all(_is_frame(f) for f in v)


class _Videos(list):
    """Videos already one entry each (a chat's video items): a list of frame files stays one video."""


def batch_videos(videos):
    """`videos` as transformers reads it -> one entry per video (a file/URL, frames, or a list of frame files).

    A file or URL, a 4-D array or a list of frames is one video; a list of those is a batch, nested lists
    (per sample) are flattened; a list of file names inside two lists ([[["f0.png", "f1.png"]]]) is one video
    given as frame files (a flat list of names is a batch of video files); a single image is a one-frame video.
    """
    if isinstance(videos, _Videos):
        return list(videos)
    try:
        if isinstance(videos[0][0], (list, tuple)) and _is_source(videos[0][0][0]):
            return [list(frames) for sample in videos for frames in sample]
    except (IndexError, TypeError, KeyError):
        pass
    if _is_source(videos) or _is_video(videos):
        return [videos]
    if _is_frame(videos):
        return [[videos]]
    if not isinstance(videos, (list, tuple)):
        raise ProcessorError(f"a video must be a path, a URL, frames (a 4-D array or a list of images) or a list of "
                             f"those, got {type(videos).__name__}")
    flat = []
    for item in videos:
        if _is_source(item) or _is_video(item):
            flat.append(item)
        elif isinstance(item, (list, tuple)) and item:
            flat.extend(batch_videos(item))
        else:
            raise ProcessorError(f"cannot read {type(item).__name__} as a video")
    return flat


def _batch_metadata(metadata, n):
    """video_metadata: None, one entry for one video, a list (or per-sample lists) of entries -> n entries."""
    if metadata is None:
        return [None] * n
    if isinstance(metadata, (list, tuple)):
        entries = [m for item in metadata for m in (item if isinstance(item, (list, tuple)) else [item])]
    else:
        entries = [metadata]
    if len(entries) != n:
        raise ProcessorError(f"{n} videos but {len(entries)} video_metadata entries; pass one entry per video")
    return [None if m is None else VideoMetadata.of(m) for m in entries]


def _normalise(chat):
    """Drop None-valued keys; OpenAI {"type": "image_url", "image_url": {"url": ...}} -> an image item."""
    out = []
    for message in chat:
        message = {k: v for k, v in message.items() if v is not None}
        if isinstance(message.get("content"), list):
            items = []
            for item in message["content"]:
                if isinstance(item, dict) and item.get("type") == "image_url" and "image_url" in item:
                    url = item["image_url"]
                    item = {"type": "image", "url": url.get("url", "") if isinstance(url, dict) else url}
                items.append(item)
            message["content"] = items
        out.append(message)
    return out


def _media(chat):
    """The images and videos of one chat, in order of appearance."""
    images, videos = [], []
    for message in chat:
        content = message.get("content")
        if not isinstance(content, list):
            continue
        for item in content:
            kind = item.get("type")
            if kind == "image":
                source = next((item[k] for k in ("image", "url", "path", "base64") if k in item), None)
                if source is None:
                    raise ProcessorError("an image item has no 'image', 'url' or 'path'")
                images.append(source)
            elif kind == "video":
                source = next((item[k] for k in ("video", "url", "path") if item.get(k) is not None), None)
                if source is None:
                    raise ProcessorError("a video item has no 'video', 'url' or 'path'")
                videos.append(source)
    return images, videos
