"""Videos to GLM-4.1V patches: PyAV decode, the reference's frame sampling, one pixel budget for all frames.

Frame indices, timestamps and grids match transformers' `Glm4vVideoProcessor` exactly. Pixels do not quite:
the reference resizes with torchvision (bicubic, antialias, on uint8 tensors) where we use PIL's bicubic in
torchvision's pass order, the same filter with different fixed-point rounding, so 1-2 levels in 255 differ on
some pixels (measured in tests/test_processing_video.py, documented in the README).

Deviations: a container that does not report its frame count gets one estimated from its duration (the reference
fails); a sampled index past the last decodable frame takes the last decoded frame (the reference fails); frames
given with metadata that lacks `fps` or `frames_indices` and not sampled are taken as frames 0..T-1 at 24 fps (the
reference fails computing their timestamps).
"""
from __future__ import annotations

import io
import math
import os
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from .errors import ProcessorError
from .fetch import check_scheme
from .image import MediaSettings, hwc_to_rgb, patchify, to_rgb


@dataclass
class VideoMetadata:
    """transformers' VideoMetadata fields: the source's frame count, rate and size, and the indices kept."""
    total_num_frames: int
    fps: float = None
    duration: float = None
    height: int = None
    width: int = None
    frames_indices: list = None
    video_backend: str = None

    @property
    def timestamps(self):
        """Seconds of each sampled frame."""
        return [i / self.fps for i in self.frames_indices]

    @classmethod
    def of(cls, value):
        """A dict, our VideoMetadata or any object with those attributes (transformers' own) -> VideoMetadata."""
        names = [f for f in cls.__dataclass_fields__]
        if isinstance(value, dict):
            unknown = [k for k in value if k not in names]
            if unknown:
                raise ProcessorError(f"unknown video_metadata key(s): {', '.join(map(str, unknown))} "
                                     f"(known: {', '.join(names)})")
            fields = dict(value)
        else:
            fields = {k: getattr(value, k, None) for k in names}
        if fields.get("total_num_frames") is None:
            raise ProcessorError("video_metadata needs total_num_frames")
        indices = fields.get("frames_indices")
        if indices is not None:
            fields["frames_indices"] = [int(i) for i in np.asarray(indices).reshape(-1)]
        return cls(**fields)


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
        check_scheme(source, "video")
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


def load_video(source, fps=2.0, max_duration=300, fetch=None, sample=True):
    """Decode a video -> (uint8 (T, H, W, 3), VideoMetadata): the frames the reference's sampler picks at `fps`,
    or every frame when `sample` is False. Only the frames kept are converted to RGB."""
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
        meta = VideoMetadata(total, video_fps, total / video_fps, stream.height, stream.width, video_backend="pyav")
        meta.frames_indices = (sample_frame_indices(total, video_fps, meta.duration, fps, max_duration) if sample
                               else list(range(total)))
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


def frames_to_array(video):
    """One video given as frames -> uint8 (T, H, W, 3).

    A 4-D array is (T, H, W, C) or (T, C, H, W) (channels first when dim 1 holds 1 or 3 channels, as the
    reference infers it); a list holds PIL images or (H, W, C) / (C, H, W) arrays. Grayscale is repeated to RGB
    and alpha composited onto white, as for images.
    """
    if isinstance(video, (list, tuple)) and video and all(isinstance(f, np.ndarray) for f in video):
        video = np.stack(video)   # arrays are stacked first and the layout inferred once, as the reference does
    if isinstance(video, np.ndarray):
        if video.ndim != 4:
            raise ProcessorError(f"a video array must be 4-D (T, H, W, C) or (T, C, H, W), got shape {video.shape}")
        if video.shape[1] in (1, 3):   # channels first wins when both dims could be channels, as in the reference
            video = np.moveaxis(video, 1, -1)
        if not len(video):
            raise ProcessorError("a video has no frames")
        return hwc_to_rgb(video)
    if not video:
        raise ProcessorError("a video has no frames")
    out = [np.asarray(to_rgb(f)) for f in video]
    shapes = {f.shape for f in out}
    if len(shapes) > 1:
        raise ProcessorError(f"the frames of one video differ in size: {sorted(shapes)}")
    return np.stack(out)


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


VIDEO_SETTINGS = ("fps", "max_duration", "do_sample_frames")
SAMPLE_FROM_FRAMES = "Sampling frames from a list of images is not supported! Set `do_sample_frames=False`."


class VideoProcessor(MediaSettings):
    """GLM-4.1V video preprocessing with the checkpoint's settings (video_preprocessor_config.json)."""

    DEFAULT_SIZE = {"shortest_edge": 112 * 112, "longest_edge": 28 * 28 * 2 * 30000}

    def __init__(self, fps=2, max_duration=300, do_sample_frames=True, **settings):
        super().__init__(**settings)
        if not fps or fps <= 0:
            raise ProcessorError(f"fps must be a positive number, got {fps!r}")
        self.fps, self.max_duration, self.do_sample_frames = fps, max_duration, bool(do_sample_frames)

    def settings(self):
        return {**super().settings(), **{k: getattr(self, k) for k in VIDEO_SETTINGS}}

    def load(self, source, fetch=None):
        return load_video(source, self.fps, self.max_duration, fetch, sample=self.do_sample_frames)

    def prepare(self, video, metadata=None, fetch=None):
        """One video in any form the processor takes -> (uint8 (T, H, W, 3), VideoMetadata), sampled by the
        reference's rules: a file or URL is decoded (and sampled at `fps` when do_sample_frames); frames given as
        arrays or PIL images are sampled the same way from their metadata, which then needs `fps`; a list of
        frame files is one video that cannot be sampled."""
        if isinstance(video, (str, os.PathLike, bytes, bytearray)):
            if metadata is not None:   # the reference silently replaces it with the file's own
                raise ProcessorError("video_metadata is for videos given as frames; a file's is read from the file "
                                     "(pass None for its entry)")
            return self.load(video, fetch)
        if isinstance(video, (list, tuple)) and video and isinstance(video[0], (str, os.PathLike)):
            if self.do_sample_frames:
                raise ProcessorError(SAMPLE_FROM_FRAMES)
            from .image import open_image
            video = [open_image(f, fetch=fetch) for f in video]
        if not self.do_convert_rgb:
            _check_rgb_frames(video)
        frames = frames_to_array(video)
        meta = VideoMetadata.of(metadata) if metadata is not None else VideoMetadata(
            len(frames), height=frames.shape[1], width=frames.shape[2])
        if self.do_sample_frames:
            if not meta.fps:
                raise ProcessorError("Asked to sample frames per second but no video metadata was provided which is "
                                     "required when sampling in GLM4V. Please pass in `VideoMetadata` object or set "
                                     "`do_sample_frames=False`")
            indices = sample_frame_indices(meta.total_num_frames, meta.fps, meta.duration, self.fps,
                                           self.max_duration)
            if indices[-1] >= len(frames):
                raise ProcessorError(f"video_metadata says {meta.total_num_frames} frames, but the video has "
                                     f"{len(frames)}: sampling at {self.fps} fps needs frame {indices[-1]}")
            frames, meta.frames_indices = frames[indices], indices
        else:
            if meta.frames_indices is None:
                meta.frames_indices = list(range(len(frames)))
            if not meta.fps:
                meta.fps = 24.0   # frames without timing: 24 fps, as the reference assumes
        return frames, meta

    def process_one(self, frames, meta=None):
        """uint8 frames (T, H, W, 3) -> (patches, grid [T/2, gh, gw]). All frames share one pixel budget."""
        if frames.ndim != 4 or frames.shape[-1] != 3:
            raise ProcessorError(f"video frames must be (T, H, W, 3), got {frames.shape}")
        t, h, w, _ = frames.shape
        th, tw = self.target_size(h, w, max(t, self.temporal_patch_size))
        if (th, tw) != (h, w):
            frames = np.stack([resize_like_torchvision(f, th, tw) for f in frames])
        patches = patchify(frames, self.table, self.patch_size, self.merge_size, self.temporal_patch_size)
        gt = -(-frames.shape[0] // self.temporal_patch_size)
        return patches, [gt, th // self.patch_size, tw // self.patch_size]

    def __call__(self, videos):
        """A list of uint8 frame arrays -> {"pixel_values_videos", "video_grid_thw"}."""
        patches, grids = zip(*(self.process_one(v) for v in videos))
        return {"pixel_values_videos": np.concatenate(patches, 0),
                "video_grid_thw": np.array(grids, dtype=np.int64)}


def _check_rgb_frames(video):
    """do_convert_rgb=False is the identity on RGB frames; others are refused (the vision tower takes RGB)."""
    if isinstance(video, np.ndarray):
        channels = video.shape[1] if video.ndim == 4 and video.shape[1] in (1, 3) else video.shape[-1]
        ok = channels == 3
    else:
        ok = all(f.mode == "RGB" if isinstance(f, Image.Image) else 3 in (np.shape(f)[0], np.shape(f)[-1])
                 for f in video)
    if not ok:
        raise ProcessorError("do_convert_rgb=False with frames that are not RGB: the vision tower takes RGB; "
                             "leave do_convert_rgb on")


def frame_timestamps(meta, grid_t):
    """Whole seconds of the first frame of each temporal pair, `grid_t` entries (the prompt's frame labels)."""
    stamps = meta.timestamps[::2][:grid_t] if meta is not None else []
    while len(stamps) < grid_t:
        stamps.append(stamps[-1] if stamps else 0)
    return [int(s) for s in stamps]
