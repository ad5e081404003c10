"""Glm4vProcessor: chats (text, images, a video) -> numpy model inputs, as transformers' Glm4vProcessor makes them.

Outputs: input_ids, attention_mask, mm_token_type_ids (0 text, 1 image, 2 video) as int64 (batch, length), left
padded by default; pixel_values + image_grid_thw and/or pixel_values_videos + video_grid_thw.

Deviations: a batch is always padded into arrays (transformers returns ragged lists unless asked to pad); a chat
holding both an image and a video is an error (the model was not trained on that mix).
"""
from __future__ import annotations

import json
import os
import re

import numpy as np

from .chat import Tokenizer, render_chat
from .errors import ProcessorError
from .fetch import MAX_BYTES, TIMEOUT_S, fetch_bytes
from .image import ImageProcessor, open_image
from .video import VideoMetadata, VideoProcessor, frame_timestamps

IMAGE_TOKEN, VIDEO_TOKEN = "<|image|>", "<|video|>"
BEGIN_IMAGE, END_IMAGE = "<|begin_of_image|>", "<|end_of_image|>"
BEGIN_VIDEO, END_VIDEO = "<|begin_of_video|>", "<|end_of_video|>"
_PLACEHOLDER = re.compile(re.escape(IMAGE_TOKEN) + "|" + re.escape(VIDEO_TOKEN))


def _read_json(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _processor_kwargs(cfg, kind):
    """A preprocessor config dict -> our constructor kwargs; refuses settings we do not implement."""
    if cfg.get("do_resize") is False:
        raise ProcessorError(f"{kind} config sets do_resize=false, which is not supported")
    if cfg.get("resample", 3) != 3:
        raise ProcessorError(f"{kind} config sets resample={cfg['resample']}; only bicubic (3) is supported")
    kw = {k: cfg[k] for k in ("size", "patch_size", "temporal_patch_size", "merge_size", "image_mean", "image_std",
                              "rescale_factor", "fps", "max_duration") if cfg.get(k) is not None}
    if cfg.get("do_rescale") is False:
        kw["rescale_factor"] = 1.0
    if cfg.get("do_normalize") is False:
        kw["image_mean"], kw["image_std"] = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    return kw


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
        (official), or processor_config.json (transformers 5). Missing configs fall back to the class defaults."""
        if not os.path.isdir(path):
            raise ProcessorError(f"model folder not found: {path}")
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
        return cls(tokenizer, ImageProcessor(**_processor_kwargs(image_cfg, "image")),
                   VideoProcessor(**_processor_kwargs(video_cfg, "video")), template or tokenizer.chat_template,
                   **kwargs)

    # --- media ---------------------------------------------------------------------------------------------

    def _fetch(self, url):
        return fetch_bytes(url, self.fetch_timeout, self.max_download_bytes)

    def _video(self, video, metadata=None):
        """A path/URL/bytes, or frames (T, H, W, 3) / a list of PIL frames -> (uint8 frames, VideoMetadata)."""
        if isinstance(video, (str, os.PathLike, bytes, bytearray)):
            return self.video_processor.load(video, fetch=self._fetch)
        if isinstance(video, (list, tuple)):
            video = np.stack([np.asarray(open_image(f).convert("RGB")) if not isinstance(f, np.ndarray) else f
                              for f in video])
        frames = np.asarray(video)
        if isinstance(metadata, dict):
            metadata = VideoMetadata(**{k: metadata.get(k) for k in ("total_num_frames", "fps", "duration",
                                                                     "height", "width", "frames_indices")})
        if metadata is None or not metadata.fps:  # frames without timing: 24 fps, as the reference assumes
            indices = list(getattr(metadata, "frames_indices", None) or range(len(frames)))
            metadata = VideoMetadata(len(frames), 24.0, len(frames) / 24, frames.shape[1], frames.shape[2], indices)
        return frames, metadata

    # --- main entry points -----------------------------------------------------------------------------------

    def __call__(self, text=None, images=None, videos=None, video_metadata=None, padding_side=None,
                 add_special_tokens=True):
        """Prompt string(s) holding one `<|image|>` per image and one `<|video|>` per video -> model inputs."""
        texts = [text] if isinstance(text, str) else list(text or [])
        images = [] if images is None else _flatten(images)
        videos = [] if videos is None else _flatten_videos(videos)
        metas = video_metadata if isinstance(video_metadata, (list, tuple)) else [video_metadata] * len(videos)
        n_img = sum(t.count(IMAGE_TOKEN) for t in texts)
        n_vid = sum(t.count(VIDEO_TOKEN) for t in texts)
        if texts and (n_img != len(images) or n_vid != len(videos)):
            raise ProcessorError(f"the text has {n_img} image and {n_vid} video placeholders, "
                                 f"but {len(images)} images and {len(videos)} videos were given")
        out, replacements = {}, {IMAGE_TOKEN: [], VIDEO_TOKEN: []}
        merge = self.image_processor.merge_size ** 2
        if images:
            loaded = [open_image(im, fetch=self._fetch) for im in images]
            out.update(self.image_processor(loaded))
            replacements[IMAGE_TOKEN] = [IMAGE_TOKEN * int(np.prod(g) // merge) for g in out["image_grid_thw"]]
        if videos:
            patches, grids = [], []
            for video, meta in zip(videos, metas):
                frames, meta = self._video(video, meta)
                p, grid = self.video_processor.process_one(frames)
                patches.append(p)
                grids.append(grid)
                per_frame = IMAGE_TOKEN * (grid[1] * grid[2] // self.video_processor.merge_size ** 2)
                replacements[VIDEO_TOKEN].append("".join(
                    f"{BEGIN_IMAGE}{per_frame}{END_IMAGE}{s}" for s in frame_timestamps(meta, grid[0])))
            out["pixel_values_videos"] = np.concatenate(patches, 0)
            out["video_grid_thw"] = np.array(grids, dtype=np.int64)
        if not texts:
            return out
        queues = {k: iter(v) for k, v in replacements.items()}
        expanded = [_PLACEHOLDER.sub(lambda m: next(queues[m.group(0)]), t) for t in texts]
        ids, mask = self.tokenizer.pad(self.tokenizer.encode_batch(expanded, add_special_tokens), padding_side)
        out = {"input_ids": ids, "attention_mask": mask, "mm_token_type_ids": self.mm_token_type_ids(ids), **out}
        return out

    def mm_token_type_ids(self, input_ids):
        """0 for text, 1 for an image's tokens, 2 for a video's (the same `<|image|>` id inside video markers)."""
        ids = np.asarray(input_ids)
        inside_video = np.cumsum(ids == self.video_start_id, -1) > np.cumsum(ids == self.video_end_id, -1)
        is_image = ids == self.image_token_id
        return np.where(is_image, np.where(inside_video, 2, 1), 0).astype(np.int64)

    def apply_chat_template(self, conversation, add_generation_prompt=False, tokenize=False, return_dict=False,
                            chat_template=None, padding_side=None, **template_variables):
        """One chat (a list of messages) or a batch of chats -> the prompt(s), or the model inputs.

        Media in content items: {"type": "image", "image"|"url"|"path": ...} (a PIL image or array too),
        {"type": "video", "video"|"url"|"path": ...}; text items {"type": "text", "text": ...}; content may be
        a plain string.
        """
        batched = isinstance(conversation[0], (list, tuple)) if conversation else False
        chats = [_normalise(chat) for chat in (conversation if batched else [conversation])]
        template = chat_template or self.chat_template
        if template is None:
            raise ProcessorError("no chat template: the model folder has no chat_template.jinja")
        variables = {**self.tokenizer.template_variables, **template_variables}
        prompts = [render_chat(template, chat, add_generation_prompt, **variables) for chat in chats]
        if not tokenize:
            return prompts if batched else prompts[0]
        images, videos = [], []
        for chat in chats:
            chat_images, chat_videos = _media(chat)
            if chat_images and chat_videos:
                raise ProcessorError("a chat cannot hold both an image and a video (the model takes one or the other)")
            images += chat_images
            videos += chat_videos
        out = self(text=prompts, images=images or None, videos=videos or None, padding_side=padding_side)
        return out if return_dict else out["input_ids"]

    def decode(self, ids, skip_special_tokens=False):
        return self.tokenizer.decode(ids, skip_special_tokens)

    def batch_decode(self, sequences, skip_special_tokens=False):
        return self.tokenizer.batch_decode(sequences, skip_special_tokens)

    def post_process_image_text_to_text(self, generated, skip_special_tokens=True):
        return self.batch_decode(generated, skip_special_tokens)


def _flatten(items):
    """Images given flat or nested per sample -> a flat list."""
    if not isinstance(items, (list, tuple)):
        return [items]
    flat = []
    for item in items:
        flat.extend(_flatten(item) if isinstance(item, (list, tuple)) else [item])
    return flat


def _flatten_videos(videos):
    """A video is a path/bytes, a 4-D array, or a list of frames; a list of those is a batch of videos."""
    if isinstance(videos, (str, os.PathLike, bytes, bytearray)) or (isinstance(videos, np.ndarray)
                                                                    and videos.ndim == 4):
        return [videos]
    flat = []
    for v in videos:
        if isinstance(v, (list, tuple)) and v and isinstance(v[0], (list, tuple, str, os.PathLike)):
            flat.extend(_flatten_videos(v))  # nested per sample
        else:
            flat.append(v)
    return flat


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
