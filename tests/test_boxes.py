"""Grounding boxes: 0-1000 relative coordinates -> pixel boxes of the original image; drawing; generate.py --boxes."""
import os
import subprocess
import sys

import numpy as np
from PIL import Image

from glm4v_ms.processing.boxes import draw_boxes, parse_boxes, strip_box_tags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_parse_single_several_decimal_and_clipped():
    t = ("The cat <|begin_of_box|>[100,200,500,1000]<|end_of_box|> and the dogs "
         "<|begin_of_box|>[[0, 0, 250.5, 100], [900,950,1200,-3]]<|end_of_box|>; not a box: [1,2,3,4]")
    got = parse_boxes(t, 640, 480)
    assert [b["relative"] for b in got] == [[100, 200, 500, 1000], [0, 0, 250.5, 100], [900, 950, 1200, -3]]
    assert got[0]["box"] == [64, 96, 320, 480]
    assert got[1]["box"] == [0, 0, 160, 48]            # 250.5 / 1000 * 640 = 160.3
    assert got[2]["box"] == [576, 0, 640, 456]          # clipped to the image, corners ordered
    assert all("box" not in b for b in parse_boxes(t))  # no size: relative only
    assert parse_boxes("no boxes here", 10, 10) == []
    assert strip_box_tags(t).startswith("The cat [100,200,500,1000] and")


def test_draw_marks_the_box_edges_only():
    im = Image.new("RGB", (200, 100), (255, 255, 255))
    out = draw_boxes(im, parse_boxes("<|begin_of_box|>[100,200,600,800]<|end_of_box|>", 200, 100), width=2)
    a = np.asarray(out)
    assert out.size == im.size and np.asarray(im).min() == 255          # a copy: the input is untouched
    assert tuple(a[20, 20 + 50]) == (255, 0, 0) and tuple(a[50, 20]) == (255, 0, 0)   # top edge, left edge
    assert tuple(a[50, 70]) == (255, 255, 255) and tuple(a[5, 5]) == (255, 255, 255)  # inside, outside


def test_generate_writes_the_boxes_image(tmp_path):
    from glm4v_ms import generate_cli
    src = tmp_path / "in.png"
    Image.new("RGB", (300, 150), (0, 0, 255)).save(src)
    out = tmp_path / "out.png"
    generate_cli.write_boxes(str(src), "A cat <|begin_of_box|>[0,0,500,500]<|end_of_box|>", str(out))
    a = np.asarray(Image.open(out))
    assert a.shape == (150, 300, 3) and tuple(a[0, 10]) == (255, 0, 0) and tuple(a[100, 200]) == (0, 0, 255)
    assert not [p for p in os.listdir(tmp_path) if "part" in p]


def test_generate_cli_boxes_flag(tmp_path):
    env = dict(os.environ, GLM4V_MS_CACHE=str(tmp_path / "cache"), GLM4V_MS_DEVICE="cpu", PYTHONPATH=ROOT)
    src = tmp_path / "cat.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (60, 90, 3), np.uint8)).save(src)
    run = lambda *a: subprocess.run([sys.executable, os.path.join(ROOT, "generate.py"), "--model_name", "demo-tiny",  # noqa: E731
                                     "--prompt", "Where?", "--max_new_tokens", "4", *a], env=env, capture_output=True,
                                    text=True, timeout=300, cwd=ROOT)
    p = run("--image", str(src), "--boxes", str(tmp_path / "boxes.png"))
    assert p.returncode == 0, p.stderr
    assert Image.open(tmp_path / "boxes.png").size == (90, 60) and "box(es) drawn on" in p.stderr
    p = run("--boxes", str(tmp_path / "x.png"))
    assert p.returncode == 2 and p.stderr.strip() == "generate.py: error: --boxes needs an --image to draw on"
