"""Images to GLM-4.1V patches: smart_resize, PIL bicubic resize, CLIP normalisation, merge-block patch order.

Matches transformers' PIL image processor (`Glm4vImageProcessorPil`) bit for bit. It is faster because rescale +
normalise is one 256-entry lookup table per channel (each entry rounded as the reference rounds it), applied while
gathering the uint8 pixels into patch order, instead of a float64 rescale, a float32 normalise and a float32
transpose; the gather and PIL's resize (see resize_parallel) run on a few threads, and PIL images skip the
reference's numpy round trip before resize.

Deviations: a 2-D (H, W) array is taken as grayscale (the reference rejects it); a float array with values in
[0, 1] is scaled by 255 once (the reference scales it down twice).
"""
from __future__ import annotations

import io
import math
import os

import numpy as np
from PIL import Image, ImageOps

from .errors import ProcessorError
from .fetch import check_scheme

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
MAX_ASPECT_RATIO = 200


def smart_resize(num_frames, height, width, temporal_factor=2, factor=28, min_pixels=112 * 112,
                 max_pixels=14 * 14 * 2 * 2 * 2 * 6144):
    """Target (height, width), multiples of `factor`, for `num_frames` frames sharing one pixel budget.

    The temporal count is part of the budget: an image is counted as 2 frames, a video as all its sampled frames.
    Python's round() is banker's rounding, as in the reference.
    """
    if num_frames < temporal_factor:
        raise ProcessorError(f"{num_frames} frames, need at least {temporal_factor}")
    if height < factor or width < factor:  # tiny sides are scaled up first, keeping the aspect ratio
        scale = max(factor / height, factor / width)
        height, width = int(height * scale), int(width * scale)
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise ProcessorError(f"aspect ratio {max(height, width) / min(height, width):.1f} is over {MAX_ASPECT_RATIO}")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    t_bar = round(num_frames / temporal_factor) * temporal_factor
    if t_bar * h_bar * w_bar > max_pixels:
        beta = math.sqrt(num_frames * height * width / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif t_bar * h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (num_frames * height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def normalize_table(mean=CLIP_MEAN, std=CLIP_STD, rescale=1 / 255):
    """(3, 256) float32: the normalised value of every uint8 level, computed as the reference rounds it
    (level * rescale in float64, cast to float32, then (x - mean) / std in float32)."""
    levels = (np.arange(256, dtype=np.float64) * rescale).astype(np.float32)
    mean = np.asarray(mean, dtype=np.float32)[:, None]
    std = np.asarray(std, dtype=np.float32)[:, None]
    return ((levels[None, :] - mean) / std).astype(np.float32)


def patchify(frames, table, patch_size=14, merge_size=2, temporal_patch_size=2, out=None):
    """uint8 frames (T, H, W, 3) -> float32 (T/tp * H/p * W/p, 3 * tp * p * p) in the vision tower's order.

    Rows go time block -> 2x2 merge block (row-major) -> position inside the block; each row is (C, t, py, px).
    A single image is passed as one frame and repeated `temporal_patch_size` times, as the reference does.
    Large inputs are split by rows of merge blocks over a few threads (numpy releases the GIL), each writing
    its own contiguous slice of `out`.
    """
    t, h, w, c = frames.shape
    if t % temporal_patch_size and t != 1:  # pad with the last frame
        frames = np.concatenate([frames, np.repeat(frames[-1:], temporal_patch_size - t % temporal_patch_size, 0)])
        t = frames.shape[0]
    p, m = patch_size, merge_size
    tp = temporal_patch_size if t > 1 else 1
    gt, bh, bw = max(t // temporal_patch_size, 1), h // (p * m), w // (p * m)
    row = c * temporal_patch_size * p * p
    if out is None:
        out = np.empty((gt * bh * m * bw * m, row), dtype=np.float32)
    x = frames.reshape(gt, tp, bh, m, p, bw, m, p, c)
    # (gt, tp, bh, m, p, bw, m, p, c) -> (gt, bh, bw, m_h, m_w, c, tp, p_h, p_w); uint8 moves 4x cheaper than float32
    x = x.transpose(0, 2, 5, 3, 6, 8, 1, 4, 7).reshape(gt * bh, bw, m, m, c, tp, p, p)
    dst = out.reshape(gt * bh, bw, m, m, c, temporal_patch_size, p, p)

    def work(lo, hi):
        for ch in range(c):  # one table gather per channel; a single image broadcasts over time
            dst[lo:hi, ..., ch, :, :, :] = table[ch][x[lo:hi, ..., ch, :, :, :]]

    n, workers = gt * bh, _workers(out.size)
    if workers == 1:
        work(0, n)
    else:
        bounds = np.linspace(0, n, workers + 1).astype(int)
        list(_pool().map(work, bounds[:-1], bounds[1:]))
    return out


_POOL = None


def _workers(size):
    return 1 if size < (1 << 21) else max(1, min(4, os.cpu_count() or 1))


def _pool():
    global _POOL
    if _POOL is None:
        from concurrent.futures import ThreadPoolExecutor

        _POOL = ThreadPoolExecutor(max_workers=4, thread_name_prefix="glm4v-patchify")
    return _POOL


def resize_parallel(image, width, height, resample=Image.BICUBIC, workers=None):
    """`image.resize((width, height), resample)`, bit for bit, on a few threads (PIL releases the GIL).

    PIL resizes in two separable passes, each rounded to uint8. A horizontal pass computes every output row
    from the same source row only, a vertical pass every output column from the same source column only, with
    coefficients that depend on the full input/output lengths of that axis. So the horizontal pass is run on
    bands of whole rows and the vertical pass on bands of whole columns, each band a one-axis resize of a crop
    (integer crop bounds, no float box: the coefficients are exactly those of the full resize), and the bands
    are pasted back. The pass order copies Pillow's own rule (Resample.c since Pillow 13: vertical first when the
    height shrinks by more than twice as many pixels as the width; before that always horizontal first), since
    each pass rounds to uint8 and the order changes the result. Small images take the single call.
    """
    src_w, src_h = image.size
    workers = workers or min(4, os.cpu_count() or 1)
    if workers < 2 or src_w * src_h + width * height < _RESIZE_MIN_PIXELS or image.mode not in ("RGB", "L"):
        return image.resize((width, height), resample)
    vertical_first = _PIL_VERTICAL_FIRST and 0 < src_h - height and src_h - height > 2 * (src_w - width)

    def one_pass(img, w, h, rows):  # rows: horizontal pass (width img.width -> w) on bands of rows
        n = img.height if rows else img.width
        k = min(workers, n)  # no empty bands
        cuts = [n * i // k for i in range(k + 1)]

        def band(i):
            a, b = cuts[i], cuts[i + 1]
            if rows:
                return img.crop((0, a, img.width, b)).resize((w, b - a), resample), (0, a)
            return img.crop((a, 0, b, img.height)).resize((b - a, h), resample), (a, 0)

        out = Image.new(img.mode, (w, h))
        for part, at in _pool().map(band, range(k)):
            out.paste(part, at)
        return out

    if vertical_first:
        if height != src_h:
            image = one_pass(image, src_w, height, rows=False)
        return image if width == src_w else one_pass(image, width, height, rows=True)
    if width != src_w:
        image = one_pass(image, width, src_h, rows=True)
    return image if height == src_h else one_pass(image, width, height, rows=False)


_RESIZE_MIN_PIXELS = 1 << 20  # input + output pixels; below this the thread and paste overhead wins
_PIL_VERTICAL_FIRST = int(Image.__version__.split(".")[0]) >= 13


def to_rgb(image):
    """A PIL image or uint8 array as an RGB PIL image, the way the reference converts it.

    Alpha (or a palette transparency) is composited onto white; other modes use PIL's own convert.
    """
    if isinstance(image, Image.Image):
        if "A" in image.getbands() or image.info.get("transparency") is not None:
            rgba = image.convert("RGBA")
            white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return Image.alpha_composite(white, rgba).convert("RGB")
        return image if image.mode == "RGB" else image.convert("RGB")
    if isinstance(image, np.ndarray):
        return Image.fromarray(_array_to_rgb(image))
    raise ProcessorError(f"unsupported image type {type(image).__name__}")


def _array_to_rgb(a):
    """An (H, W), (H, W, C) or (C, H, W) array with C in 1, 3, 4 -> (H, W, 3) uint8."""
    if a.ndim == 2:
        a = a[:, :, None]
    if a.ndim != 3:
        raise ProcessorError(f"image array must be 2-D or 3-D, got shape {a.shape}")
    if a.shape[0] in (1, 3, 4):  # channels first wins when ambiguous, as in the reference
        a = np.moveaxis(a, 0, -1)
    elif a.shape[-1] not in (1, 3, 4):
        raise ProcessorError(f"image array must have 1, 3 or 4 channels, got shape {a.shape}")
    return hwc_to_rgb(a)


def hwc_to_rgb(a):
    """(..., C) pixels with C in 1, 3, 4, uint8 or float (0..255 or 0..1) -> (..., 3) uint8."""
    if a.shape[-1] not in (1, 3, 4):
        raise ProcessorError(f"pixels must have 1, 3 or 4 channels, got shape {a.shape}")
    if a.dtype != np.uint8:
        a = a.astype(np.float64)
        if np.all(a == np.round(a)) and a.min() >= 0 and a.max() <= 255:
            a = a.astype(np.uint8)
        elif a.min() >= 0 and a.max() <= 1:
            a = np.round(a * 255).astype(np.uint8)
        else:
            raise ProcessorError(f"image array values must be 0..255 or 0..1, got {a.min()}..{a.max()}")
    if a.shape[-1] == 1:
        return np.repeat(a, 3, axis=-1)
    if a.shape[-1] == 4:
        alpha = a[..., 3:4] / 255
        return np.round(alpha * a[..., :3] + (1 - alpha) * 255).astype(np.uint8)
    return np.ascontiguousarray(a)


def open_image(source, fetch=None):
    """A path, http(s) URL, raw bytes, PIL image or array -> PIL image (file sources upright and RGB).

    Files and URLs go through EXIF orientation and PIL's convert("RGB") first, as transformers' load_image does.
    `fetch(url) -> bytes` loads URLs (see fetch.py).
    """
    if isinstance(source, (Image.Image, np.ndarray)):
        return source
    name = source
    try:
        if isinstance(source, (bytes, bytearray)):
            name = "<bytes>"
            image = Image.open(io.BytesIO(source))
        elif isinstance(source, (str, os.PathLike)):
            source = os.fspath(source)
            check_scheme(source, "image")
            if source.startswith(("http://", "https://")):
                if fetch is None:
                    from .fetch import fetch_bytes as fetch
                image = Image.open(io.BytesIO(fetch(source)))
            elif source.startswith("file://"):
                image = Image.open(source[len("file://"):])
            else:
                if not os.path.isfile(source):
                    raise ProcessorError(f"image not found: {source}")
                image = Image.open(source)
        else:
            raise ProcessorError(f"unsupported image source {type(source).__name__}")
        image.load()
        return ImageOps.exif_transpose(image).convert("RGB")
    except ProcessorError:
        raise
    except Exception as e:  # PIL raises several types for a bad file
        raise ProcessorError(f"cannot read image {name}: {e}") from None


# The settings an image or video processor takes (transformers' names), from the checkpoint's config, as
# from_pretrained overrides, or per call. Anything else is refused by name.
SETTINGS = ("size", "patch_size", "temporal_patch_size", "merge_size", "do_resize", "resample", "do_rescale",
            "rescale_factor", "do_normalize", "image_mean", "image_std", "do_convert_rgb")


def _channels(value, name):
    """A float or three floats -> a 3-tuple (transformers broadcasts a single mean/std over the channels)."""
    values = (value,) * 3 if isinstance(value, (int, float)) else tuple(value)
    if len(values) != 3:
        raise ProcessorError(f"{name} must be one number or three, got {value!r}")
    return tuple(float(v) for v in values)


class MediaSettings:
    """What image and video preprocessing share: the pixel budget, the patch geometry and the pixel maths."""

    DEFAULT_SIZE = {"shortest_edge": 112 * 112, "longest_edge": 28 * 28 * 15000}

    def __init__(self, size=None, patch_size=14, temporal_patch_size=2, merge_size=2, do_resize=True,
                 resample=Image.BICUBIC, do_rescale=True, rescale_factor=1 / 255, do_normalize=True,
                 image_mean=CLIP_MEAN, image_std=CLIP_STD, do_convert_rgb=True):
        size = dict(size or self.DEFAULT_SIZE)
        if not size.get("shortest_edge") or not size.get("longest_edge"):
            raise ProcessorError(f"size must have 'shortest_edge' and 'longest_edge' (pixel counts), got {size}")
        if int(resample) != int(Image.BICUBIC):
            raise ProcessorError(f"resample={resample!r} is not supported: only bicubic (3)")
        for name, v in (("patch_size", patch_size), ("temporal_patch_size", temporal_patch_size),
                        ("merge_size", merge_size)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ProcessorError(f"{name} must be a positive integer, got {v!r}")
        self.size = {"shortest_edge": int(size["shortest_edge"]), "longest_edge": int(size["longest_edge"])}
        self.min_pixels, self.max_pixels = self.size["shortest_edge"], self.size["longest_edge"]
        self.patch_size, self.temporal_patch_size, self.merge_size = patch_size, temporal_patch_size, merge_size
        self.do_resize, self.resample, self.do_convert_rgb = bool(do_resize), Image.BICUBIC, bool(do_convert_rgb)
        self.do_rescale, self.rescale_factor = bool(do_rescale), float(rescale_factor)
        self.do_normalize = bool(do_normalize)
        self.image_mean, self.image_std = _channels(image_mean, "image_mean"), _channels(image_std, "image_std")
        # skipping a step is the identity in the lookup table: rescale by 1, normalise with mean 0 and std 1
        self.table = normalize_table(self.image_mean if do_normalize else (0.0, 0.0, 0.0),
                                     self.image_std if do_normalize else (1.0, 1.0, 1.0),
                                     self.rescale_factor if do_rescale else 1.0)

    @property
    def factor(self):
        return self.patch_size * self.merge_size

    def settings(self):
        return {k: getattr(self, k) for k in SETTINGS}

    def updated(self, **overrides):
        """A copy with some settings changed (per-call arguments); unknown names are refused."""
        unknown = [k for k in overrides if k not in self.settings()]
        if unknown:
            raise ProcessorError(f"unknown {type(self).__name__} argument(s): {', '.join(unknown)}")
        return type(self)(**{**self.settings(), **overrides}) if overrides else self

    def target_size(self, height, width, num_frames=None):
        """(height, width) after smart_resize, or the input size when do_resize is off (then it must tile)."""
        if not self.do_resize:
            if height % self.factor or width % self.factor:
                raise ProcessorError(f"do_resize=False needs sides that are multiples of {self.factor} "
                                     f"(patch_size * merge_size), got {height}x{width}")
            return height, width
        return smart_resize(num_frames or self.temporal_patch_size, height, width, self.temporal_patch_size,
                            self.factor, self.min_pixels, self.max_pixels)


class ImageProcessor(MediaSettings):
    """GLM-4.1V image preprocessing with the checkpoint's settings (preprocessor_config.json)."""

    def resize(self, image, height, width):
        """PIL RGB image -> (height, width, 3) uint8, resized as PIL does it (no reducing_gap)."""
        if image.size != (width, height):
            image = resize_parallel(image, width, height, self.resample)
        return np.asarray(image)

    def resized(self, image):
        """One image (PIL or array) -> its resized uint8 (H', W', 3) pixels."""
        if not self.do_convert_rgb:
            _check_rgb(image)
        image = to_rgb(image)
        width, height = image.size
        return self.resize(image, *self.target_size(height, width))

    def __call__(self, images):
        """A list of images -> {"pixel_values": (sum n, 1176) float32, "image_grid_thw": (N, 3) int64}.

        All images are resized first so the patches are written straight into one output array."""
        pixels = [self.resized(im) for im in images]
        p = self.patch_size
        grids = np.array([[1, a.shape[0] // p, a.shape[1] // p] for a in pixels], dtype=np.int64)
        out = np.empty((int(grids.prod(1).sum()), 3 * self.temporal_patch_size * p * p), dtype=np.float32)
        start = 0
        for a, n in zip(pixels, grids.prod(1)):
            patchify(a[None], self.table, p, self.merge_size, self.temporal_patch_size, out=out[start:start + n])
            start += n
        return {"pixel_values": out, "image_grid_thw": grids}


def _check_rgb(image):
    """do_convert_rgb=False is the identity on RGB input; anything else would reach the 3-channel vision tower
    with the wrong channel count, so it is refused rather than converted behind the user's back."""
    if isinstance(image, Image.Image):
        ok = image.mode == "RGB"
    else:
        a = np.asarray(image)
        ok = a.ndim == 3 and (a.shape[-1] == 3 or a.shape[0] == 3)
    if not ok:
        what = f"a {image.mode} image" if isinstance(image, Image.Image) else f"an array of shape {np.shape(image)}"
        raise ProcessorError(f"do_convert_rgb=False with {what}: the vision tower takes RGB; leave do_convert_rgb on")
