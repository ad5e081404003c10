"""Image preprocessing vs transformers' PIL image processor: grids identical, pixels within 1e-5."""
import os

import numpy as np
import pytest

import reference  # noqa: F401
from transformers.models.glm4v.image_processing_pil_glm4v import smart_resize as ref_smart_resize

from glm4v_ms.processing import ProcessorError, smart_resize, tiny
from glm4v_ms.processing.image import ImageProcessor, normalize_table, patchify
from processing_fixtures import *  # noqa: F401,F403
from processing_fixtures import drawn_image, parity_images

TOL = 1e-5


def test_smart_resize_matches_reference_on_many_sizes():
    rng = np.random.default_rng(0)
    sizes = [(28, 28), (30, 30), (27, 5400), (5400, 27), (14, 14), (1, 150), (2160, 3840), (4096, 4096),
             (42, 42), (70, 70), (126, 98), (1, 1)] + [tuple(rng.integers(1, 5000, 2)) for _ in range(300)]
    budgets = [(tiny.IMAGE_SIZE["shortest_edge"], tiny.IMAGE_SIZE["longest_edge"], 2),
               (tiny.VIDEO_SIZE["shortest_edge"], tiny.VIDEO_SIZE["longest_edge"], 16),
               (tiny.VIDEO_SIZE["shortest_edge"], tiny.VIDEO_SIZE["longest_edge"], 600),
               (56 * 56, 28 * 28 * 4, 2)]
    checked = 0
    for h, w in sizes:
        for lo, hi, t in budgets:
            try:
                want = ref_smart_resize(t, int(h), int(w), 2, 28, lo, hi)
            except ValueError:
                with pytest.raises(ProcessorError):
                    smart_resize(t, int(h), int(w), 2, 28, lo, hi)
                continue
            assert smart_resize(t, int(h), int(w), 2, 28, lo, hi) == want, (h, w, lo, hi, t)
            checked += 1
    assert checked > 1000


@pytest.mark.parametrize("h, w, want", [(480, 640, (476, 644)), (1080, 1920, (1092, 1932)),
                                        (2160, 3840, (1624, 2912)), (4096, 4096, (2184, 2184)), (28, 28, (84, 84))])
def test_smart_resize_documented_examples(h, w, want):
    assert smart_resize(2, h, w, 2, 28, 12544, 9633792) == want


def test_banker_rounding():
    # 70 / 28 = 2.5 rounds to 2 (not 3): 56 px; 98 / 28 = 3.5 rounds to 4: 112 px
    assert smart_resize(2, 70 * 4, 98 * 4, min_pixels=1, max_pixels=10**9) == (280, 392)
    assert smart_resize(2, 70, 98, min_pixels=1, max_pixels=10**9) == (56, 112)


def test_patchify_order_by_hand():
    """Row r of the output is merge block -> 2x2 position; each row is (C, t, 14, 14) of one 14x14 patch."""
    rng = np.random.default_rng(1)
    img = rng.integers(0, 256, (56, 84, 3), dtype=np.uint8)  # grid 4 x 6
    table = normalize_table()
    out = patchify(img[None], table)
    assert out.shape == (24, 3 * 2 * 14 * 14)
    norm = table[np.arange(3)[None, None, :], img]  # (H, W, C) normalised
    row = 0
    for bh in range(2):
        for bw in range(3):
            for mh in range(2):
                for mw in range(2):
                    y, x = (2 * bh + mh) * 14, (2 * bw + mw) * 14
                    patch = norm[y:y + 14, x:x + 14].transpose(2, 0, 1)  # (C, 14, 14)
                    want = np.stack([patch, patch], 1).reshape(-1)  # the image repeated over t = 2
                    np.testing.assert_array_equal(out[row], want)
                    row += 1


@pytest.mark.parametrize("name, image", parity_images(), ids=[n for n, _ in parity_images()])
def test_pixel_parity_in_memory(name, image, ref):
    """PIL objects straight into both processors (alpha composited onto white, modes converted)."""
    want = ref.image_processor(images=[image], return_tensors="np")
    got = ImageProcessor(size=tiny.IMAGE_SIZE)([image])
    np.testing.assert_array_equal(got["image_grid_thw"], want["image_grid_thw"])
    assert got["pixel_values"].dtype == np.float32
    assert got["pixel_values"].shape == want["pixel_values"].shape
    assert np.abs(got["pixel_values"] - want["pixel_values"]).max() <= TOL, name


def test_pixel_parity_from_files_and_arrays(ref, ours, media_dir):
    """File paths (EXIF orientation, convert("RGB") as transformers' load_image) and uint8 arrays."""
    files = sorted(os.path.join(media_dir, f) for f in os.listdir(media_dir))
    assert len(files) >= 12
    arrays = [np.asarray(drawn_image(45, 33, 20)), np.asarray(drawn_image(45, 33, 21).convert("RGBA"))]
    for source in files + arrays:
        want = ref.image_processor(images=[source], return_tensors="np")
        got = ours(images=[source])
        np.testing.assert_array_equal(got["image_grid_thw"], want["image_grid_thw"])
        assert np.abs(got["pixel_values"] - want["pixel_values"]).max() <= TOL, source if isinstance(source, str) else source.shape


def test_exif_rotation_applied(ours, media_dir):
    got = ours(images=[os.path.join(media_dir, "exif_rotated.jpg")])
    # stored 80 wide x 40 high, orientation 6 -> upright 40 wide x 80 high: more rows than columns
    _, gh, gw = got["image_grid_thw"][0]
    assert gh > gw


def test_several_images_concatenate(ref, ours):
    images = [drawn_image(100, 60, 30), drawn_image(60, 100, 31), drawn_image(28, 28, 32)]
    want = ref.image_processor(images=images, return_tensors="np")
    got = ours(images=images)
    np.testing.assert_array_equal(got["image_grid_thw"], want["image_grid_thw"])
    assert np.abs(got["pixel_values"] - want["pixel_values"]).max() <= TOL
