"""Shared media and model folders for the processor tests (import the fixtures with `from processing_fixtures
import *`). Everything is drawn or encoded here: nothing is downloaded."""
from __future__ import annotations

import os
from fractions import Fraction

import numpy as np
import pytest
from PIL import Image, ImageDraw

from glm4v_ms.processing import Glm4vProcessor, tiny


def drawn_image(width, height, seed=0, mode="RGB"):
    """A busy test picture: a gradient, noise and a few shapes, so resize errors show up."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 // max(width - 1, 1), y * 255 // max(height - 1, 1), (x + y) % 256], -1)
    noise = rng.integers(0, 64, (height, width, 3))
    im = Image.fromarray(np.clip(base + noise - 32, 0, 255).astype(np.uint8))
    d = ImageDraw.Draw(im)
    for _ in range(4):
        x0, y0 = int(rng.integers(0, width)), int(rng.integers(0, height))
        d.rectangle([x0, y0, x0 + width // 4, y0 + height // 4], fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
    d.ellipse([width // 3, height // 3, 2 * width // 3, 2 * height // 3], outline=(255, 255, 0), width=2)
    return im if mode == "RGB" else im.convert(mode)


def rgba_image(width=120, height=90):
    im = drawn_image(width, height, seed=3).convert("RGBA")
    alpha = np.tile(np.linspace(0, 255, width, dtype=np.uint8), (height, 1))
    im.putalpha(Image.fromarray(alpha))
    return im


def palette_image(width=77, height=51):
    im = drawn_image(width, height, seed=4).convert("P", palette=Image.ADAPTIVE, colors=16)
    im.info["transparency"] = 2  # one palette entry is transparent
    return im


def image16(width=64, height=48):
    y, x = np.mgrid[0:height, 0:width]
    return Image.fromarray(((x * 1000 + y * 300) % 65536).astype(np.uint16))  # mode I;16


def parity_images():
    """(name, image) pairs covering the sizes and modes the issue lists."""
    return [
        ("28x28", drawn_image(28, 28, 1)),
        ("30x30", drawn_image(30, 30, 2)),
        ("odd_37x91", drawn_image(37, 91, 5)),
        ("odd_333x211", drawn_image(333, 211, 6)),
        ("wide_1500x60", drawn_image(1500, 60, 7)),
        ("tall_90x700", drawn_image(90, 700, 8)),
        ("thin_10x200", drawn_image(10, 200, 9)),        # a side under 28 is scaled up first
        ("4k_3840x2160", drawn_image(3840, 2160, 10)),  # downscaled to the budget
        ("640x480", drawn_image(640, 480, 11)),
        ("rgba", rgba_image()),
        ("gray_L", drawn_image(100, 70, 12, mode="L")),
        ("gray_LA", drawn_image(50, 70, 13, mode="LA")),
        ("palette_P", palette_image()),
        ("16bit_I;16", image16()),
        ("cmyk", drawn_image(60, 45, 14, mode="CMYK")),
    ]


def encode_clip(path, seconds=3.0, fps=Fraction(10), size=(96, 64), codec="libx264", seed=0):
    """A short clip with moving content, so every frame differs and sampling errors show."""
    import av

    w, h = size
    n = int(round(seconds * fps))
    with av.open(str(path), "w") as out:
        stream = out.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        for i in range(n):
            im = drawn_image(w, h, seed + i % 7)
            ImageDraw.Draw(im).rectangle([i % w, 5, i % w + 10, 20], fill=(255, 0, 0))
            for packet in stream.encode(av.VideoFrame.from_image(im)):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return str(path)


def write_model_dir(path, layout="official", **kwargs):
    return tiny.write_all(str(path), layout=layout, **kwargs)


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    return write_model_dir(tmp_path_factory.mktemp("tiny_official"))


@pytest.fixture(scope="session")
def model_dir_v5(tmp_path_factory):
    return write_model_dir(tmp_path_factory.mktemp("tiny_v5"), layout="v5")


@pytest.fixture(scope="session")
def ours(model_dir):
    return Glm4vProcessor.from_pretrained(model_dir)


@pytest.fixture(scope="session")
def ref(model_dir):
    import reference  # noqa: F401  (torchvision schemas before transformers)
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(model_dir, use_fast=False)


@pytest.fixture(scope="session")
def media_dir(tmp_path_factory):
    """Image files of every parity image (PNG, lossless) plus a rotated-EXIF JPEG."""
    d = tmp_path_factory.mktemp("media")
    for name, im in parity_images():
        if name.startswith("4k"):
            continue  # the 4K image is compared in memory only, to keep the suite fast
        ext = "jpg" if im.mode == "CMYK" else "png"
        im.save(os.path.join(d, f"{name}.{ext}"))
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees
    drawn_image(80, 40, 15).save(os.path.join(d, "exif_rotated.jpg"), exif=exif, quality=95)
    return str(d)
