"""Videos to GLM-4.1V patches: PyAV decode, the reference's frame sampling, one pixel budget for all frames.

Frame indices, timestamps and grids match transformers' `Glm4vVideoProcessor` exactly. Pixels do not quite:
the reference resizes with torchvision (bicubic, antialias, on uint8 tensors) where we use PIL's bicubic in
torchvision's pass order, the same filter with different fixed-point rounding, so 1-2 levels in 255 differ on
some pixels (measured in tests/test_processing_video.py, documented in the README).

Deviations: a container that does not report its frame count gets one estimated from its duration (the reference
fails); a sampled index past the last decodable frame takes the last decoded frame (the reference fails).
"""
from __future__ import annotations

import io
import math
import os
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from .errors import ProcessorError
from .image import CLIP_MEAN, CLIP_STD, normalize_table, patchify, smart_resize


@dataclass
class VideoMetadata:
    total_num_frames: int
    fps: float
    duration: float
    height: int
    width: int
    frames_indices: list = field(default_factory=list)

    @property
    def timestamps(self):
        """Seconds of each sampled frame."""
        return [i / self.fps for i in self.frames_indices]


def sample_frame_indices(total_frames, video_fps, duration=None, fps=2.0, max_duration=300):
    """The reference's sampler: `fps` frames a second over at most `max_duration` s, de-duplicated, even count."""
    max_idx = total_frames - 1
    duration = duration or round(max_idx / video_fps) + 1
    if duration <= max_duration:
        n = max(int(math.floor(duration * fps)), 1)
        idx = [min(max_idx, int(math.ceil(i * video_fps / fps))) for i in range(n)]
    else:
        n = int(max_duration * fps)
        if n >= total_frames:
            idx = list(range(total_frames))
        else:  # spread over the whole video
            idx = [min(max_idx, int(math.ceil(t * video_fps))) for t in np.linspace(0, duration, n, endpoint=True)]
    idx = list(dict.fromkeys(idx))  # de-duplicate, keep order
    if len(idx) % 2:  # the vision tower takes frames in pairs
        idx.append(idx[-1])
    return idx


def _open(source, fetch=None):
    import av

    name = source if isinstance(source, (str, os.PathLike)) else "<bytes>"
    try:
        if isinstance(source, (bytes, bytearray)):
            return av.open(io.BytesIO(source)), name
        source = os.fspath(source)
        if source.startswith(("http://", "https://")):
            if fetch is None:
                from .fetch import fetch_bytes as fetch
            return av.open(io.BytesIO(fetch(source))), name
        if source.startswith("file://"):
            source = source[len("file://"):]
        if not os.path.isfile(source):
            raise ProcessorError(f"video not found: {source}")
        return av.open(source), name
    except ProcessorError:
        raise
    except Exception as e:
        raise ProcessorError(f"cannot read video {name}: {e}") from None


def load_video(source, fps=2.0, max_duration=300, fetch=None):
    """Decode the sampled frames -> (uint8 (T, H, W, 3), VideoMetadata). Only sampled frames are converted to RGB."""
    container, name = _open(source, fetch)
    try:
        if not container.streams.video:
            raise ProcessorError(f"no video stream in {name}")
        stream = container.streams.video[0]
        video_fps = float(stream.average_rate or stream.guessed_rate or 0)
        if video_fps <= 0:
            raise ProcessorError(f"video {name} has no frame rate")
        total = int(stream.frames or 0)
        if total <= 0:  # not in the header: estimate from the duration
            if stream.duration is not None and stream.time_base is not None:
                seconds = float(stream.duration * stream.time_base)
            else:
                seconds = (container.duration or 0) / 1e6
            total = int(round(seconds * video_fps))
        if total <= 0:
            raise ProcessorError(f"video {name} has no frames")
        meta = VideoMetadata(total, video_fps, total / video_fps, stream.height, stream.width)
        meta.frames_indices = sample_frame_indices(total, video_fps, meta.duration, fps, max_duration)
        wanted, last = set(meta.frames_indices), meta.frames_indices[-1]
        frames, decoded, previous = {}, 0, None
        try:
            for i, frame in enumerate(container.decode(video=0)):
                if i in wanted:
                    frames[i] = frame.to_ndarray(format="rgb24")
                previous, decoded = frame, i + 1
                if i >= last:
                    break
        except Exception as e:
            if not decoded:
                raise ProcessorError(f"no decodable frame in video {name}: {e}") from None
        if not decoded:
            raise ProcessorError(f"no decodable frame in video {name}")
        for i in meta.frames_indices:  # indices past the end: reuse the last decoded frame
            if i not in frames:
                frames[i] = previous.to_ndarray(format="rgb24")
        return np.stack([frames[i] for i in meta.frames_indices]), meta
    finally:
        container.close()


def resize_like_torchvision(frame, height, width):
    """Bicubic (antialiased) resize of a uint8 (H, W, 3) frame as two explicit PIL passes, width first.

    torchvision's uint8 resize always filters horizontally first; PIL picks its own pass order, and at
    high-contrast edges the uint8 clipping between passes then differs by up to ~16 levels. Forcing the
    same order leaves differences of 1-2 levels from the two libraries' fixed-point rounding.
    """
    image = Image.fromarray(frame)
    if image.width != width:
        image = image.resize((width, image.height), Image.BICUBIC)
    if image.height != height:
        image = image.resize((width, height), Image.BICUBIC)
    return np.asarray(image)


class VideoProcessor:
    """GLM-4.1V video preprocessing with the checkpoint's settings (video_preprocessor_config.json)."""

    def __init__(self, size=None, patch_size=14, temporal_patch_size=2, merge_size=2, image_mean=CLIP_MEAN,
                 image_std=CLIP_STD, rescale_factor=1 / 255, fps=2, max_duration=300, **_ignored):
        size = size or {"shortest_edge": 112 * 112, "longest_edge": 28 * 28 * 2 * 30000}
        self.min_pixels, self.max_pixels = size["shortest_edge"], size["longest_edge"]
        self.patch_size, self.temporal_patch_size, self.merge_size = patch_size, temporal_patch_size, merge_size
        self.fps, self.max_duration = fps, max_duration
        self.table = normalize_table(image_mean, image_std, rescale_factor)

    def load(self, source, fetch=None):
        return load_video(source, self.fps, self.max_duration, fetch)

    def process_one(self, frames, meta=None):
        """uint8 frames (T, H, W, 3) -> (patches, grid [T/2, gh, gw]). All frames share one pixel budget."""
        if frames.ndim != 4 or frames.shape[-1] != 3:
            raise ProcessorError(f"video frames must be (T, H, W, 3), got {frames.shape}")
        t, h, w, _ = frames.shape
        th, tw = smart_resize(max(t, self.temporal_patch_size), h, w, self.temporal_patch_size,
                              self.patch_size * self.merge_size, self.min_pixels, self.max_pixels)
        if (th, tw) != (h, w):
            frames = np.stack([resize_like_torchvision(f, th, tw) for f in frames])
        if t == 1:  # a one-frame video is padded to a pair like any odd count
            frames = np.concatenate([frames, frames])
        patches = patchify(frames, self.table, self.patch_size, self.merge_size, self.temporal_patch_size)
        gt = -(-frames.shape[0] // self.temporal_patch_size)
        return patches, [gt, th // self.patch_size, tw // self.patch_size]

    def __call__(self, videos):
        """A list of uint8 frame arrays -> {"pixel_values_videos", "video_grid_thw"}."""
        patches, grids = zip(*(self.process_one(v) for v in videos))
        return {"pixel_values_videos": np.concatenate(patches, 0),
                "video_grid_thw": np.array(grids, dtype=np.int64)}


def frame_timestamps(meta, grid_t):
    """Whole seconds of the first frame of each temporal pair, `grid_t` entries (the prompt's frame labels)."""
    stamps = meta.timestamps[::2][:grid_t] if meta is not None else []
    while len(stamps) < grid_t:
        stamps.append(stamps[-1] if stamps else 0)
    return [int(s) for s in stamps]
