"""resize_parallel (row bands for the horizontal pass, column bands for the vertical one) must equal PIL's
single resize bit for bit: up- and downscaling, both pass orders, odd, tiny and extreme aspect sizes."""
import numpy as np
import pytest
from PIL import Image

from glm4v_ms.processing import image as image_mod
from glm4v_ms.processing.image import resize_parallel

SIZES = [  # (src_w, src_h, dst_w, dst_h)
    (3840, 2160, 2912, 1624), (1500, 60, 1512, 56), (90, 700, 84, 672), (7, 5, 28, 56), (1, 1, 28, 28),
    (100, 100, 28, 28), (101, 37, 812, 308), (640, 480, 644, 476), (1874, 1779, 2324, 2352),
    (995, 761, 475, 185), (607, 634, 1032, 78), (414, 839, 483, 520), (436, 81, 1127, 64), (545, 1129, 24, 669),
    (333, 777, 336, 784), (1000, 1001, 1008, 1008), (3, 900, 56, 16800), (900, 3, 16800, 56), (640, 480, 640, 300),
    (640, 480, 300, 480),
]


def _image(w, h, mode, seed):
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 256, (h, w, 4), dtype=np.uint8)
    a[:, ::7] = 255  # hard edges make the uint8 rounding between passes matter
    a[::5] = 0
    return Image.fromarray(a, "RGBA").convert(mode)


@pytest.mark.parametrize("workers", [2, 3, 4])
def test_banded_resize_equals_single_resize(monkeypatch, workers):
    monkeypatch.setattr(image_mod, "_RESIZE_MIN_PIXELS", 0)  # band even the tiny ones
    rng = np.random.default_rng(workers)
    sizes = SIZES + [tuple(int(v) for v in rng.integers(2, 1300, 4)) for _ in range(25)]
    for i, (sw, sh, dw, dh) in enumerate(sizes):
        for mode in ("RGB", "L"):
            im = _image(sw, sh, mode, i)
            want = np.asarray(im.resize((dw, dh), Image.BICUBIC))
            got = np.asarray(resize_parallel(im, dw, dh, Image.BICUBIC, workers=workers))
            assert got.shape == want.shape and np.array_equal(got, want), (sw, sh, dw, dh, mode, workers)


def test_small_image_takes_the_single_call():
    im = _image(50, 40, "RGB", 0)
    assert np.array_equal(np.asarray(resize_parallel(im, 84, 56)), np.asarray(im.resize((84, 56), Image.BICUBIC)))
